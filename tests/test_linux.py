"""shmguard.linux: the one libc helper (errno, EINTR) and the procfs readers, on real processes; no root needed."""

from __future__ import annotations

import ast
import ctypes
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shmguard.linux import libc, procfs

pytestmark = pytest.mark.pure

LINUX = Path(__file__).resolve().parent.parent / "shmguard" / "linux"
# A name the process gives itself: spaces and both parentheses, in the 15 bytes the kernel keeps.
TRICKY_NAME = "a) b (c) 1 2"


# ---- libc.call ----------------------------------------------------------------------------------------


class Scripted:
    """Stands in for a libc function: each call returns the next (result, errno) of the script."""

    def __init__(self, *script: tuple[int, int]):
        self.script, self.calls = list(script), 0

    def __call__(self, *args) -> int:
        result, error = self.script[self.calls]
        self.calls += 1
        ctypes.set_errno(error)
        return result


def test_call_retries_on_eintr_until_the_call_answers():
    func = Scripted((-1, errno.EINTR), (-1, errno.EINTR), (7, 0))
    assert libc.call(func) == 7
    assert func.calls == 3


def test_call_raises_the_errno_once_without_retrying_other_errors():
    func = Scripted((-1, errno.EAGAIN), (0, 0))
    with pytest.raises(OSError) as raised:
        libc.call(func, what="fallocate")
    assert (raised.value.errno, raised.value.filename) == (errno.EAGAIN, "fallocate")
    assert raised.value.strerror == os.strerror(errno.EAGAIN)
    assert func.calls == 1


def test_call_passes_results_other_than_minus_one_through():
    assert libc.call(Scripted((0, errno.EPERM))) == 0  # a stale errno means nothing when the call succeeded
    assert libc.call(libc.function("getpid", [])) == os.getpid()


def test_a_real_failure_carries_the_kernels_errno():
    close = libc.function("close", [ctypes.c_int])
    with pytest.raises(OSError) as raised:
        libc.call(close, -1, what="close")
    assert raised.value.errno == errno.EBADF


def test_a_real_read_interrupted_by_a_signal_is_retried_and_returns_the_data():
    """Python installs handlers without SA_RESTART, so a blocking libc read returns EINTR at each signal."""
    read = libc.function("read", [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_ssize_t)
    calls = 0

    def counted(*args):
        nonlocal calls
        calls += 1
        return read(*args)

    reader, writer = os.pipe()
    # The writer writes only once the reader was interrupted twice: nothing depends on timing.
    child = subprocess.Popen([sys.executable, "-c", "import os, sys; os.read(0, 1); os.write(int(sys.argv[1]), b'x')",
                              str(writer)], stdin=subprocess.PIPE, pass_fds=(writer,))
    signals = []

    def release_writer_after_two(signum, frame):
        signals.append(signum)
        if len(signals) == 2:
            child.stdin.write(b"go")
            child.stdin.flush()

    previous = signal.signal(signal.SIGALRM, release_writer_after_two)
    try:
        os.close(writer)
        buffer = ctypes.create_string_buffer(1)
        signal.setitimer(signal.ITIMER_REAL, 0.02, 0.02)
        try:
            assert libc.call(counted, reader, buffer, 1, what="read") == 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        assert buffer.raw == b"x"
        assert calls >= 3  # interrupted at least twice (the writer waited for that), then the byte
    finally:
        signal.signal(signal.SIGALRM, previous)
        os.close(reader)
        child.stdin.close()
        child.wait()


# ---- procfs -------------------------------------------------------------------------------------------


@pytest.fixture
def renamed_child():
    """A live child that named itself TRICKY_NAME with prctl (PR_SET_NAME), as any process may."""
    code = ("import sys; from shmguard.linux.hardening import set_process_name; "
            "print(set_process_name(sys.argv[1]), flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code, TRICKY_NAME], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == TRICKY_NAME
        yield child
    finally:
        child.stdin.close()
        child.wait()


def test_stat_is_parsed_past_a_name_with_spaces_and_parentheses(renamed_child):
    raw = Path(f"/proc/{renamed_child.pid}/stat").read_bytes()
    name, fields = procfs.parse_stat(raw)
    assert name == TRICKY_NAME
    assert fields[0] in (b"R", b"S")  # field 3, the state: the fields line up after the name
    assert int(fields[4 - 3]) == os.getpid()  # field 4, the parent
    assert procfs.start_time(renamed_child.pid) == int(fields[22 - 3])
    assert procfs.start_time(renamed_child.pid) >= procfs.start_time(os.getpid())
    assert len(raw.split()) > 22  # a naive split on spaces would have read the wrong field


@pytest.mark.parametrize("line, name, state", [
    (b"1 (init) S 0 1\n", "init", b"S"),
    (b"42 (a) b (c) R 1 42\n", "a) b (c", b"R"),
    (b"7 ()) Z 1 7\n", ")", b"Z"),
    (b"9 ( ) S 1 9\n", " ", b"S"),
])
def test_parse_stat_takes_the_name_to_the_last_parenthesis(line, name, state):
    assert procfs.parse_stat(line)[0] == name
    assert procfs.parse_stat(line)[1][0] == state


def test_comm_status_and_identity_of_a_renamed_child(renamed_child):
    assert procfs.comm(renamed_child.pid) == TRICKY_NAME
    status = procfs.status(renamed_child.pid)
    assert status["Name"] == TRICKY_NAME and status["PPid"] == str(os.getpid())
    assert procfs.identity(renamed_child.pid) == (os.geteuid(), os.getegid(), TRICKY_NAME)
    assert procfs.exe(renamed_child.pid) == os.path.realpath(sys.executable)
    assert procfs.executable(renamed_child.pid) == os.path.realpath(sys.executable)


def test_a_process_that_is_gone_is_unknown_not_an_error():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid names nothing now (unless reused, which these answers survive too)
    if os.path.exists(f"/proc/{child.pid}"):
        pytest.fail(f"pid {child.pid} was reused at once; run again")
    assert procfs.start_time(child.pid) is None
    assert procfs.identity(child.pid) == (None, None, "unknown")
    assert (procfs.exe(child.pid), procfs.comm(child.pid)) == (None, None)
    assert procfs.executable(child.pid) == "unknown"


def test_status_of_this_thread_and_process():
    assert procfs.status()["Pid"] == str(os.getpid())
    assert procfs.status("thread-self")["Pid"] == str(os.getpid())
    assert procfs.thread_count() >= 1


def test_fd_readers_see_an_eventfd_and_its_counter():
    fd = os.eventfd(5, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        assert procfs.fd_target(fd) == "anon_inode:[eventfd]"
        assert procfs.fd_path(fd) == f"/proc/self/fd/{fd}"
        info = procfs.fdinfo(fd)
        assert int(info["eventfd-count"], 16) == 5
        assert int(info["flags"], 8) & os.O_NONBLOCK
    finally:
        os.close(fd)
    assert procfs.fd_target(fd) is None


def test_boot_id_is_this_boots_id_without_dashes():
    expected = Path(procfs.BOOT_ID).read_text().strip().replace("-", "")
    assert procfs.boot_id() == expected and len(expected) == 32


# ---- the layer's one rule ------------------------------------------------------------------------------


def test_linux_imports_nothing_of_shmguard_but_errors():
    wrong = []
    for path in sorted(LINUX.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2 and node.module != "errors":
                wrong.append(f"{path.name}: from {'.' * node.level}{node.module or ''}")
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else (
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            wrong += [f"{path.name}: {m}" for m in modules
                      if m.startswith("shmguard") and not m.startswith(("shmguard.linux", "shmguard.errors"))]
    assert not wrong


def test_a_ring_whose_bound_expires_just_after_the_write_returns_does_not_escape(monkeypatch):
    """Under load the process can be descheduled past the 2 ms bound between the write and the disarm: the alarm
    then comes while the ring is already done, and must not escape as an exception."""
    from shmguard.linux import eventfd

    real_setitimer = signal.setitimer

    def late_alarm(which, seconds, *rest):
        if seconds == 0:  # the disarm, as if the alarm had fired just before it
            eventfd._on_alarm(signal.SIGALRM, None)
        return real_setitimer(which, seconds, *rest)

    monkeypatch.setattr(eventfd.signal, "setitimer", late_alarm)
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        assert eventfd.ring(fd)  # raised _Stuck from its finally before
        assert eventfd.drain(fd) == 1
    finally:
        os.close(fd)


def test_a_ring_whose_bound_expires_before_the_write_starts_still_rings_once(monkeypatch):
    """The other side of a loaded machine: the alarm comes before the write is made. The write must still be made,
    once: a ring lost here left a guest without its message, a ring made twice made it print the message twice."""
    from shmguard.linux import eventfd

    real_setitimer = signal.setitimer

    def early_alarm(which, seconds, *rest):
        result = real_setitimer(which, seconds, *rest)
        if seconds:  # armed: the alarm arrives at once, before the write
            os.kill(os.getpid(), signal.SIGALRM)
        return result

    monkeypatch.setattr(eventfd.signal, "setitimer", early_alarm)
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        for _ in range(100):
            assert eventfd.ring(fd)
        assert eventfd.drain(fd) == 100
    finally:
        os.close(fd)
