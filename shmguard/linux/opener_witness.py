"""The opener witness: a child process that holds each open of the region while it reads who opened it.

A short-lived offender (`truncate -s 0`) is often gone before the supervisor reads /proc, and a hardened supervisor
may not read another uid's /proc/PID/exe at all (no CAP_SYS_PTRACE). `OpenerWitness` closes both gaps: a small
child process holds a permission-event group (FAN_OPEN_PERM on the region) and an exec-event group, reads each
opener's identity while the kernel holds it inside open(), answers FAN_ALLOW at once, and reports it. It is a
separate process because the supervisor opens the region itself (a fresh description per peer): a permission
event of its own would wait for the supervisor forever. If the child dies, the kernel allows what it held.

Nothing here reads /proc/PID/cmdline (see fanotify.py): the witness holds every open while it reads.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
from collections import OrderedDict
from dataclasses import dataclass

from . import procfs
from .fanotify import (
    FAN_ALLOW,
    FAN_CLASS_CONTENT,
    FAN_CLASS_NOTIF,
    FAN_MARK_FILESYSTEM,
    FAN_MARK_MOUNT,
    FAN_OPEN_EXEC,
    FAN_OPEN_PERM,
    RESPONSE,
    exe_or_unknown,
    init_group,
    mark_group,
    read_events,
    start_time_or_none,
)

PIPE_BUF = 4096  # a write of up to this many bytes to a pipe is never interleaved nor cut
# Where programs are run from: an exec from any filesystem holding one of these is seen (one mark per filesystem).
EXEC_PLACES = ("/", "/usr", "/bin", "/usr/local", "/opt", "/home", "/root", "/tmp", "/var/tmp", "/dev/shm", "/run")
EXEC_MEMORY = 4096  # processes whose last exec is remembered (the oldest is forgotten first)
EXEC_READ_BYTES = 16 * 1024  # exec events read before the openers waiting are answered: a flood delays them little
PERM_READ_BYTES = 4096  # a read opens an fd per event: few at once, or at the fd limit the kernel denies the open
TEXT_LIMIT = 1024  # characters of a path or command line in a report: a report line stays below PIPE_BUF


@dataclass(frozen=True)
class Opener:
    """Who opened the region, read while the kernel held the process inside open()."""

    pid: int
    start: int | None
    uid: int | None
    gid: int | None
    exe: str
    exe_from: str  # "/proc/PID/exe", "exec event", or why it is unknown
    comm: str

    def describe(self) -> dict:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "exe": self.exe, "exe_from": self.exe_from,
                "comm": self.comm, "start": self.start}

    @classmethod
    def parse(cls, line: bytes) -> Opener | None:
        try:
            data = json.loads(line)
            return cls(int(data["pid"]), data["start"], data["uid"], data["gid"], str(data["exe"]),
                       str(data["exe_from"]), str(data["comm"]))
        except (ValueError, KeyError, TypeError):
            return None


class ExecMemory:
    """The programs each process ran, from exec events: the file the kernel opened, not what the process says."""

    def __init__(self, limit: int = EXEC_MEMORY):
        self.limit = limit
        self.runs: OrderedDict[int, tuple[int | None, list[str]]] = OrderedDict()

    def ran(self, pid: int, path: str) -> None:
        start = start_time_or_none(pid)
        known = self.runs.pop(pid, None)
        paths = known[1][-3:] if known is not None and known[0] == start else []
        self.runs[pid] = (start, [*paths, path])  # each exec: the file, its #! interpreter, then the ELF loader
        while len(self.runs) > self.limit:
            self.runs.popitem(last=False)

    def program(self, pid: int, start: int | None) -> str | None:
        """What /proc/PID/exe would say: the last file the process executed that is not the ELF loader."""
        known = self.runs.get(pid)
        if known is None or (known[0] is not None and start is not None and known[0] != start):
            return None
        programs = [path for path in known[1] if not is_elf_loader(path)]
        return programs[-1] if programs else known[1][-1]


def is_elf_loader(path: str) -> bool:
    """ld-linux-x86-64.so.2, ld-musl-x86_64.so.1, ld.so: opened for exec after every dynamically linked program."""
    name = os.path.basename(path)
    return name == "ld.so" or (name.startswith("ld-") and ".so" in name)


def identify(pid: int, execs: ExecMemory | None) -> Opener:
    """Read a (held) process's identity: uid and gid from /proc/PID/status, the program from /proc/PID/exe where
    the kernel lets us read it, else from its exec event."""
    uid, gid, comm = procfs.identity(pid)
    start = start_time_or_none(pid)
    exe, exe_from = exe_or_unknown(pid), "/proc/PID/exe"
    if exe == "unknown":
        ran = execs.program(pid, start) if execs is not None else None
        if ran is not None:
            exe, exe_from = ran, "exec event"
        elif execs is None:
            exe_from = "unknown: /proc/PID/exe is unreadable (no CAP_SYS_PTRACE) and exec events are not watched"
        else:
            exe_from = ("unknown: /proc/PID/exe is unreadable (no CAP_SYS_PTRACE) and no exec of this process was "
                        "seen (run from an unwatched filesystem, or before the supervisor started)")
    return Opener(pid, start, uid, gid, exe[:TEXT_LIMIT], exe_from, comm[:TEXT_LIMIT])


class OpenerWitness:
    """The child process that holds opens of the region while it reads who opened it (see the module's doc)."""

    def __init__(self, pid: int, fd: int, execs_watched: list[str]):
        self.pid, self.fd, self.execs_watched = pid, fd, execs_watched
        self.ended = False  # the child is gone: opens are no longer held
        self._buffer = b""

    @classmethod
    def start(cls, paths: list[str]) -> OpenerWitness:
        """Mark paths (as the supervisor names them: /proc/self/fd/N) for FAN_OPEN_PERM and fork the child.
        Needs CAP_SYS_ADMIN; raises OSError when the kernel refuses."""
        # The exec group first, so that it has the lower fd and is released first when the witness dies: released
        # after the permission group, it leaves a held open waiting forever (seen on 6.18). Past the default
        # queue (16384 events) an open is allowed unheld, not refused.
        execs, watched = _exec_group()
        perm = -1
        try:
            perm = init_group(FAN_CLASS_CONTENT)
            if 0 <= perm < execs:  # an fd freed below the exec group's: move the permission group above it
                perm, lower = fcntl.fcntl(perm, fcntl.F_DUPFD_CLOEXEC, execs + 1), perm
                os.close(lower)
            for path in paths:
                mark_group(perm, 0, FAN_OPEN_PERM, path)
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
        except BaseException:
            for fd in (perm, execs):
                if fd >= 0:
                    os.close(fd)
            raise
        parent = os.getpid()
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                _become_witness(parent, (perm, execs, write_end))
                _serve(parent, perm, execs, write_end)
                code = 0
            finally:
                os._exit(code)
        for fd in (perm, execs, write_end):
            if fd >= 0:
                os.close(fd)  # the groups live in the child alone: it answers, and its death allows
        os.set_blocking(read_end, False)
        return cls(child, read_end, watched)

    def read(self) -> list[Opener]:
        """The openers reported since the last read (non-blocking)."""
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not data:
                self.ended = True
                break
            self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        self._buffer = self._buffer[-65536:]  # only a report cut short stays; the child writes whole lines
        return [opener for line in lines if (opener := Opener.parse(line)) is not None]

    def alive(self) -> bool:
        try:
            return os.waitpid(self.pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        except PermissionError:
            pass  # it was forked as root before the supervisor dropped to its user: it dies with us (pdeathsig)


def report_line(opener: Opener) -> bytes:
    """One JSON line, short enough to be written whole (escapes can make a path six times longer)."""
    line = json.dumps(opener.describe()).encode() + b"\n"
    if len(line) <= PIPE_BUF:
        return line
    return json.dumps({**opener.describe(), "exe": opener.exe[:256],
                       "exe_from": f"{opener.exe_from} (cut to 256 characters)"}).encode() + b"\n"


def _exec_group() -> tuple[int, list[str]]:
    """A notification group for FAN_OPEN_EXEC on every filesystem programs are usually run from; (-1, []) if
    the kernel refuses them all."""
    try:
        fd = init_group(FAN_CLASS_NOTIF)
    except OSError:
        return -1, []
    watched, devices = [], set()
    for place in EXEC_PLACES:
        try:
            device = os.stat(place).st_dev
        except OSError:
            continue
        if device in devices:
            continue
        for flags in (FAN_MARK_FILESYSTEM, FAN_MARK_MOUNT):  # some filesystems take only a mount mark
            try:
                mark_group(fd, flags, FAN_OPEN_EXEC, place)
            except OSError:
                continue
            devices.add(device)
            watched.append(place)
            break
    if not watched:
        os.close(fd)
        return -1, []
    return fd, watched


def _become_witness(parent: int, keep: tuple[int, ...]) -> None:  # pragma: no cover - runs in the child
    """Nothing of the supervisor but the groups and the report pipe; no capabilities; dies with the parent."""
    for name in os.listdir(procfs.fd_directory()):
        fd = int(name)
        if fd not in keep and fd > 2:
            try:
                os.close(fd)
            except OSError:
                pass
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_DFL)
    import prctl  # python-prctl: already a dependency of hardening

    prctl.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(0)  # the parent died before PDEATHSIG was set
    os.set_blocking(keep[-1], False)  # the report pipe: a supervisor that does not read never holds an open up
    prctl.set_name("shmguard-witness")
    prctl.set_dumpable(0)
    prctl.set_no_new_privs(1)
    for capability in prctl.ALL_CAPS:
        try:
            prctl.capbset.drop(capability)
        except (OSError, ValueError):
            pass
    prctl.cap_inheritable.limit()
    prctl.cap_effective.limit()
    prctl.cap_permitted.limit()


def _serve(parent: int, perm: int, execs: int, out: int) -> None:  # pragma: no cover - runs in the child
    """Answer every held open at once: read who it is, report it, FAN_ALLOW. The supervisor's own opens are
    allowed and not reported. Exec events are read first, so an opener's program is known when it is held."""
    memory = ExecMemory() if execs >= 0 else None
    poller = select.poll()
    for fd in (perm, execs):
        if fd >= 0:
            poller.register(fd, select.POLLIN)
    poller.register(out, 0)  # POLLERR once the supervisor's end is closed: it is gone, so is its witness
    while True:
        ready = dict(poller.poll())
        if ready.get(out, 0) & (select.POLLERR | select.POLLHUP) or os.getppid() != parent:
            return  # PR_SET_PDEATHSIG is not enough: a parent that dropped to another uid may not signal us
        events = read_events(perm, PERM_READ_BYTES)
        for _, event_fd, pid in events:
            if pid == parent and event_fd >= 0:  # the supervisor's own opens first: its loop waits in open()
                os.write(perm, RESPONSE.pack(event_fd, FAN_ALLOW))
                os.close(event_fd)
        if execs >= 0:  # then the execs queued so far: an opener's exec came before its open
            for _, event_fd, pid in read_events(execs, EXEC_READ_BYTES):
                if event_fd >= 0:
                    if (program := procfs.fd_target(event_fd)) is not None:
                        memory.ran(pid, program)
                    os.close(event_fd)
        for mask, event_fd, pid in events:
            if pid == parent:
                continue
            try:
                if mask & FAN_OPEN_PERM:
                    line = report_line(identify(pid, memory))
                    try:
                        os.write(out, line)  # before the open returns, so before anything it does next
                    except BlockingIOError:
                        pass  # the supervisor is not reading: the opener goes unnamed, never held up
            finally:
                if event_fd >= 0:
                    os.write(perm, RESPONSE.pack(event_fd, FAN_ALLOW))
                    os.close(event_fd)
