"""Witnesses: the fanotify touches waiting to name an offender keep their own state, whatever Python does with
the memory of touches that were dropped; the opener witness names who opened the region and never holds an open
for long."""

from __future__ import annotations

import os
import pwd
import select
import signal
import subprocess
import time

from helpers import MEMBER_USER
from shmguard.linux.fanotify import FAN_MODIFY, Fanotify, Witnesses
from shmguard.linux.opener_witness import ExecMemory, OpenerWitness


def touch_from_another_process(fd: int) -> None:
    """A write to the marked file by a child: a FAN_MODIFY event with the child's pid."""
    child = os.fork()
    if child == 0:
        try:
            os.pwrite(fd, b"x", 0)
        finally:
            os._exit(0)
    os.waitpid(child, 0)


def wait_for_event(fanotify: Fanotify) -> None:
    readable, _, _ = select.select([fanotify.fd], [], [], 5)
    assert readable, "no fanotify event within 5 s"


def test_a_touch_dropped_after_its_claim_never_uses_up_a_later_touch(tmp_path):
    """A claimed touch pushed out of the queue (its limit reached) before the next prune: a later touch, which
    Python may place at the very same address, keeps every one of its events."""
    path = f"/dev/shm/shmguard-witness-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fanotify = Fanotify.open()
    try:
        fanotify.mark(path, FAN_MODIFY)
        witnesses = Witnesses(fanotify, limit=1)
        for attempt in range(300):
            touch_from_another_process(fd)
            wait_for_event(fanotify)
            assert witnesses.claim(FAN_MODIFY) is not None, f"attempt {attempt}: the first touch"
            for _ in range(2):  # the claimed touch falls out of the queue and is freed; the next may take its place
                touch_from_another_process(fd)
                wait_for_event(fanotify)
                witnesses.collect()
            witnesses.prune(0)
            later = witnesses.claim(FAN_MODIFY)
            assert later is not None, f"attempt {attempt}: a later touch lost its events to a dropped one"
            witnesses.prune(0)
            assert witnesses.claim(FAN_MODIFY) is None, "a claim uses up the events it was for"
    finally:
        fanotify.close()
        os.close(fd)
        os.unlink(path)


def test_the_program_of_a_process_is_its_last_exec_that_is_not_the_elf_loader():
    memory = ExecMemory()
    pid = os.getpid()  # alive: its start time is read, and matches
    for path in ("/usr/bin/setpriv", "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "/usr/bin/truncate",
                 "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"):
        memory.ran(pid, path)
    assert memory.program(pid, None) == "/usr/bin/truncate"
    assert memory.program(pid, 1) is None, "another process that had the same pid"
    assert memory.program(pid + 1 if pid < 4_000_000 else 2, None) is None


def _open_and_close(path: str) -> None:
    os.close(os.open(path, os.O_RDONLY))


def test_opens_are_held_named_and_allowed_and_our_own_never_waits_for_us(tmp_path):
    """The opener witness is a child: the opening process's uid and program are read while the kernel holds it,
    and an open by the process that started the witness (the supervisor reopens the region per peer) is allowed
    at once, never a permission event waiting for its own reader."""
    path = f"/dev/shm/shmguard-opener-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    os.fchmod(fd, 0o666)
    witness = OpenerWitness.start([f"/proc/self/fd/{fd}"])
    try:
        _open_and_close(f"/proc/self/fd/{fd}")  # our own: would hang forever if we had to answer it
        member = pwd.getpwnam(MEMBER_USER)
        run = subprocess.run(["setpriv", f"--reuid={member.pw_uid}", f"--regid={member.pw_gid}", "--clear-groups",
                              "dd", f"if={path}", "of=/dev/null", "count=0", "status=none"], timeout=30)
        assert run.returncode == 0
        openers = []
        deadline = time.monotonic() + 10
        while not openers and time.monotonic() < deadline:
            select.select([witness.fd], [], [], 1)
            openers += witness.read()
        assert [(o.uid, o.exe, o.exe_from) for o in openers] == [(member.pw_uid, "/usr/bin/dd", "exec event")]
    finally:
        witness.close()
        os.close(fd)
        os.unlink(path)


def test_when_the_witness_dies_the_kernel_allows_what_it_held(tmp_path):
    path = f"/dev/shm/shmguard-opener-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    witness = OpenerWitness.start([f"/proc/self/fd/{fd}"])
    try:
        os.kill(witness.pid, signal.SIGSTOP)  # it holds the next open ...
        opener = subprocess.Popen(["dd", f"if={path}", "of=/dev/null", "count=0", "status=none"])
        time.sleep(0.2)
        assert opener.poll() is None, "a stopped witness holds the open"
        os.kill(witness.pid, signal.SIGKILL)  # ... until it is gone
        assert opener.wait(timeout=30) == 0
    finally:
        witness.close()
        os.close(fd)
        os.unlink(path)
