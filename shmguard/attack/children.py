"""The child that really drops to an attacker's uid: what it is handed (Scene), what it did (Done), the real
syscalls and commands it makes, and what it holds (fds, sockets, zombies) until the battery has looked.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pickle
import select
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ShmguardError
from ..linux import libc
from .identities import Identity

ATTACK_TIMEOUT = 60.0
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x1, 0x2
_fallocate_call = libc.function("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long])
_setfsgid = libc.function("setfsgid", [ctypes.c_uint])  # returns the previous fsgid, never -1
_ERRNO_TEXTS = sorted(((os.strerror(number), name) for number, name in errno.errorcode.items()),
                      key=lambda item: -len(item[0]))


@dataclass(frozen=True)
class Scene:
    """What an attack needs to know, handed to the child that runs it."""

    region: str  # the file, or /proc/<supervisor pid>/fd/<n> of the memfd
    memfd: bool
    size: int
    socket: str
    control: str
    message: bytes
    token: str  # every file an attack creates has it in its name, so the battery can clear up
    scratch: str  # a sticky directory any uid may write (decoys)
    near: str  # a sticky directory on the region's filesystem (hard links, rename-over)
    identity: Identity
    peer_slots: int = 64  # server.max_peers: how many joins it takes to be refused
    control_slots: int = 64  # shares.connections: how many control connections there are in all

    def name(self, suffix: str, directory: str | None = None) -> str:
        return os.path.join(directory or self.near, f"shmguard-attack-{self.token}-{suffix}")


@dataclass
class Done:
    """What the attacking syscall or command did, as the child saw it."""

    ok: bool
    error: str | None  # the errno name (EPERM, EACCES, ...) or the refusal in words
    pid: int  # the process that made the attacking syscall: fanotify should name it
    returned_ns: int  # CLOCK_MONOTONIC (system-wide) just after it returned
    syscall_ms: float
    facts: dict = field(default_factory=dict)  # what an adversary learnt (its peer id, what a refusal said)


kept: list = []  # in the child: what must outlive the attack until the parent has looked (fds, zombies)


def syscalls(*steps: Callable[[], object]) -> Done:
    """Run steps in order; the last one is the attack and is timed; any OSError ends it as a refusal."""
    for step in steps[:-1]:
        try:
            kept.append(step())
        except OSError as exc:
            return Done(False, errno_name(exc), os.getpid(), time.monotonic_ns(), 0.0)
    started = time.monotonic_ns()
    try:
        kept.append(steps[-1]())
        error = None
    except OSError as exc:
        error = errno_name(exc)
    except ShmguardError as exc:
        error = refusal_in_words(str(exc))
    returned = time.monotonic_ns()
    return Done(error is None, error, os.getpid(), returned, (returned - started) / 1e6)


def command(argv: list[str]) -> Done:
    """Run a real command; its zombie is kept (waitid WNOWAIT) so that its uid stays visible in /proc."""
    started = time.monotonic_ns()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               cwd="/")
    stderr = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    status = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
    returned = time.monotonic_ns()
    kept.append(process)
    ok = status.si_status == 0 and status.si_code == os.CLD_EXITED
    return Done(ok, None if ok else _errno_from_text(stderr), process.pid, returned, (returned - started) / 1e6)


def errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno, str(exc)) if exc.errno else str(exc)


def refusal_in_words(text: str) -> str:
    """A client error as an errno name where it carries one (EACCES on connect), else the server's refusal."""
    name = _errno_from_text(text)
    return "refused by the server" if name == text.strip().splitlines()[-1] and "refused" in text else name


def _errno_from_text(text: str) -> str:
    for message, name in _ERRNO_TEXTS:
        if message in text:
            return name
    return text.strip().splitlines()[-1] if text.strip() else "failed"


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    libc.call(_fallocate_call, fd, mode, offset, length)


def run_as(identity: Identity, action: Callable[[Scene], Done], scene: Scene) -> tuple[int, Done, int]:
    """Fork a child that really drops to identity and attacks; it stays alive (holding its fds, sockets and
    zombies) until release_child(), so that the guard can still see who it was."""
    result_read, result_write = os.pipe()
    release_read, release_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(result_read)
        os.close(release_write)
        _child(identity, action, scene, result_write, release_read)
    os.close(result_write)
    os.close(release_read)
    try:
        data = _read_result(result_read, pid)
    finally:
        os.close(result_read)
    return pid, pickle.loads(data), release_write


def _child(identity: Identity, action, scene: Scene, result_write: int, release_read: int) -> None:
    try:
        if identity.uid != 0 or identity.groups != (0,):
            os.setgroups(list(identity.groups))
            os.setgid(identity.gid)
            if identity.fs_group is not None:
                _setfsgid(identity.fs_group)  # kept by setuid(), which resets only the fsuid
            os.setuid(identity.uid)
        done = action(scene)
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
        done = Done(False, f"the attack itself broke: {exc!r}", os.getpid(), time.monotonic_ns(), 0.0)
    try:
        os.write(result_write, pickle.dumps(done))
        os.close(result_write)
        os.read(release_read, 1)  # returns at EOF, when the parent releases us
        for thing in kept:
            if isinstance(thing, subprocess.Popen):
                thing.wait()
    finally:
        os._exit(0)


def _read_result(fd: int, pid: int) -> bytes:
    chunks, deadline = [], time.monotonic() + ATTACK_TIMEOUT
    while True:
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise ShmguardError(f"an attack did not finish within {ATTACK_TIMEOUT:g} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def release_child(pid: int, release_write: int) -> None:
    os.close(release_write)
    os.waitpid(pid, 0)
