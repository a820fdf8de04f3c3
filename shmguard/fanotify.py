"""fanotify through ctypes: which process (pid, uid, exe) touched a watched inode.

Only the guard uses it, to name the offender of an incident; inotify cannot (its events carry no pid).
fanotify needs CAP_SYS_ADMIN when it is opened; marks on single inodes can be added later without it.
The group reports file ids (FAN_REPORT_FID): that is the only mode in which the kernel reports a truncation
(FAN_MODIFY from ftruncate carries no path, so an fd-mode group drops it) and attribute changes (FAN_ATTRIB).
Reading never blocks: the fd is non-blocking and sits in the supervisor's one event loop.

A short-lived offender (`truncate -s 0`) is often gone before the supervisor reads /proc, and a hardened supervisor
may not read another uid's /proc/PID/exe at all (no CAP_SYS_PTRACE). `OpenerWitness` closes both gaps: a small
child process holds a permission-event group (FAN_OPEN_PERM on the region) and an exec-event group, reads each
opener's identity while the kernel holds it inside open(), answers FAN_ALLOW at once, and reports it. It is a
separate process because the supervisor opens the region itself (a fresh description per peer): a permission
event of its own would wait for the supervisor forever. If the child dies, the kernel allows what it held.

Nothing here reads /proc/PID/cmdline: that reads the process's memory, which it can map from something that never
answers (a FUSE file), and the reader (the supervisor's loop, or the witness holding every open) would hang.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import select
import signal
import struct
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_CLASS_CONTENT = 0x4
FAN_REPORT_FID = 0x200
FAN_MARK_ADD = 0x1
FAN_MARK_REMOVE = 0x2
FAN_MARK_MOUNT = 0x10
FAN_MARK_FILESYSTEM = 0x100
FAN_ALLOW = 0x1

FAN_MODIFY = 0x2
FAN_ATTRIB = 0x4
FAN_OPEN = 0x20
FAN_OPEN_EXEC = 0x1000
FAN_OPEN_PERM = 0x10000
FAN_DELETE_SELF = 0x400
FAN_MOVE_SELF = 0x800
FAN_Q_OVERFLOW = 0x4000

AT_FDCWD = -100
_METADATA = struct.Struct("<IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
_RESPONSE = struct.Struct("<iI")  # struct fanotify_response: fd, response
PIPE_BUF = 4096  # a write of up to this many bytes to a pipe is never interleaved nor cut
# Where programs are run from: an exec from any filesystem holding one of these is seen (one mark per filesystem).
EXEC_PLACES = ("/", "/usr", "/bin", "/usr/local", "/opt", "/home", "/root", "/tmp", "/var/tmp", "/dev/shm", "/run")
EXEC_MEMORY = 4096  # processes whose last exec is remembered (the oldest is forgotten first)
EXEC_READ_BYTES = 16 * 1024  # exec events read before the openers waiting are answered: a flood delays them little
PERM_READ_BYTES = 4096  # a read opens an fd per event: few at once, or at the fd limit the kernel denies the open
TEXT_LIMIT = 1024  # characters of a path or command line in a report: a report line stays below PIPE_BUF
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]


def _raise_errno() -> None:
    error = ctypes.get_errno()
    raise OSError(error, os.strerror(error))


@dataclass(frozen=True)
class Touch:
    """One fanotify event by another process, resolved to an identity at once (the process may exit soon)."""

    mask: int
    pid: int
    uid: int | None
    gid: int | None
    exe: str
    comm: str
    when_ns: int
    start: int | None = None  # the process's start time: with the pid, one process and never another

    @classmethod
    def of(cls, mask: int, pid: int) -> Touch:
        uid, gid, comm = _status_identity(pid)
        return cls(mask, pid, uid, gid, _exe(pid), comm, time.monotonic_ns(), _start_time(pid))

    def describe(self) -> dict:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "exe": self.exe, "comm": self.comm}


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return "unknown"  # exited (a zombie keeps its uid, not its exe), or hidden without CAP_SYS_PTRACE


def _status_identity(pid: int) -> tuple[int | None, int | None, str]:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as status:
            fields = dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)
    except OSError:
        return None, None, "unknown"
    uid = int(fields["Uid"].split()[1]) if "Uid" in fields else None  # the effective uid did the deed
    gid = int(fields["Gid"].split()[1]) if "Gid" in fields else None
    return uid, gid, fields.get("Name", "unknown")


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot): with the pid, one process and never another."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data.rsplit(b")", 1)[-1].split()[19])


class Fanotify:
    """A notification-only fanotify group that reports file ids; marks are on single inodes."""

    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def open(cls) -> Fanotify:
        """Raises OSError (EPERM without CAP_SYS_ADMIN, EINVAL on kernels without FAN_REPORT_FID)."""
        flags = FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_FID
        fd = _libc.fanotify_init(flags, os.O_RDONLY | os.O_CLOEXEC | os.O_LARGEFILE)
        if fd < 0:
            _raise_errno()
        return cls(fd)

    def mark(self, path: str, mask: int) -> None:
        """Mark the inode at path (a /proc/self/fd/N path marks exactly the inode we hold)."""
        if _libc.fanotify_mark(self.fd, FAN_MARK_ADD, mask, AT_FDCWD, os.fsencode(path)) != 0:
            _raise_errno()

    def read(self) -> list[tuple[int, int]]:
        """Every queued (mask, pid); event fds (none in FID mode, but be sure) are closed."""
        events: list[tuple[int, int]] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return events
            if not data:
                return events
            offset = 0
            while offset + _METADATA.size <= len(data):
                length, _, _, _, mask, fd, pid = _METADATA.unpack_from(data, offset)
                if fd >= 0:
                    os.close(fd)
                events.append((mask, pid))
                offset += max(length, _METADATA.size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Waiting:
    """A touch in the queue with its own account of what is left of it: state kept by the entry itself, never in
    a table keyed by id() (the id of a touch that was dropped is free for the next object Python makes)."""

    __slots__ = ("touch", "left", "claimed")

    def __init__(self, touch: Touch):
        self.touch = touch
        self.left = touch.mask  # its events not yet used up by an incident
        self.claimed = 0  # events claimed since the last prune


class Witnesses:
    """Touches by other processes, waiting to be claimed as the offender of an incident.

    fanotify merges the events of one process on one inode while they wait in its queue (a link then a truncate
    arrive as one touch, ATTRIB|MODIFY), so a claim uses up only the events it was for.
    """

    def __init__(self, fanotify: Fanotify, limit: int = 256):
        self.fanotify = fanotify
        self.pending: deque[_Waiting] = deque(maxlen=limit)  # the oldest falls out, with its state
        self.own_pid = os.getpid()

    def collect(self) -> None:
        for mask, pid in self.fanotify.read():
            if pid != self.own_pid and not mask & FAN_Q_OVERFLOW:  # our own repairs are not offences
                self.pending.append(_Waiting(Touch.of(mask, pid)))

    def claim(self, mask: int) -> Touch | None:
        """The latest touch with any of the events in mask left (one syscall may cause several incidents)."""
        self.collect()
        for waiting in reversed(self.pending):
            if waiting.left & mask:
                waiting.claimed |= waiting.touch.mask & mask
                return waiting.touch
        return None

    def prune(self, before_ns: int) -> None:
        """Use up what was claimed; drop touches from before before_ns that nobody claimed. A touch that arrived
        later, or that still has unclaimed events, stays for an incident that may still need it."""
        kept: deque[_Waiting] = deque(maxlen=self.pending.maxlen)
        for waiting in self.pending:
            claimed, waiting.claimed = waiting.claimed, 0
            waiting.left &= ~claimed
            if waiting.left and (waiting.touch.when_ns >= before_ns or claimed):
                kept.append(waiting)
        self.pending = kept


# ---------------------------------------------------------------------------------------------------- openers


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


def _fanotify_init(flags: int) -> int:
    fd = _libc.fanotify_init(flags | FAN_CLOEXEC | FAN_NONBLOCK, os.O_RDONLY | os.O_CLOEXEC | os.O_LARGEFILE)
    if fd < 0:
        _raise_errno()
    return fd


def _mark(fd: int, flags: int, mask: int, path: str) -> None:
    if _libc.fanotify_mark(fd, FAN_MARK_ADD | flags, mask, AT_FDCWD, os.fsencode(path)) != 0:
        _raise_errno()


def _events(fd: int, limit: int = 65536) -> list[tuple[int, int, int]]:
    """(mask, fd, pid) of the events one read returns (none if there are none)."""
    try:
        data = os.read(fd, limit)
    except BlockingIOError:
        return []
    events, offset = [], 0
    while offset + _METADATA.size <= len(data):
        length, _, _, _, mask, event_fd, pid = _METADATA.unpack_from(data, offset)
        events.append((mask, event_fd, pid))
        offset += max(length, _METADATA.size)
    return events


class ExecMemory:
    """The programs each process ran, from exec events: the file the kernel opened, not what the process says."""

    def __init__(self, limit: int = EXEC_MEMORY):
        self.limit = limit
        self.runs: OrderedDict[int, tuple[int | None, list[str]]] = OrderedDict()

    def ran(self, pid: int, path: str) -> None:
        start = _start_time(pid)
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
    uid, gid, comm = _status_identity(pid)
    start = _start_time(pid)
    exe, exe_from = _exe(pid), "/proc/PID/exe"
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
            perm = _fanotify_init(FAN_CLASS_CONTENT)
            if 0 <= perm < execs:  # an fd freed below the exec group's: move the permission group above it
                perm, lower = fcntl.fcntl(perm, fcntl.F_DUPFD_CLOEXEC, execs + 1), perm
                os.close(lower)
            for path in paths:
                _mark(perm, 0, FAN_OPEN_PERM, path)
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
        fd = _fanotify_init(FAN_CLASS_NOTIF)
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
                _mark(fd, flags, FAN_OPEN_EXEC, place)
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
    for name in os.listdir("/proc/self/fd"):
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
        events = _events(perm, PERM_READ_BYTES)
        for _, event_fd, pid in events:
            if pid == parent and event_fd >= 0:  # the supervisor's own opens first: its loop waits in open()
                os.write(perm, _RESPONSE.pack(event_fd, FAN_ALLOW))
                os.close(event_fd)
        if execs >= 0:  # then the execs queued so far: an opener's exec came before its open
            for _, event_fd, pid in _events(execs, EXEC_READ_BYTES):
                if event_fd >= 0:
                    try:
                        memory.ran(pid, os.readlink(f"/proc/self/fd/{event_fd}"))
                    except OSError:
                        pass
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
                    os.write(perm, _RESPONSE.pack(event_fd, FAN_ALLOW))
                    os.close(event_fd)
