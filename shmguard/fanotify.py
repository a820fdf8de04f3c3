"""fanotify through ctypes: which process (pid, uid, exe) touched a watched inode.

Only the guard uses it, to name the offender of an incident; inotify cannot (its events carry no pid).
fanotify needs CAP_SYS_ADMIN when it is opened; marks on single inodes can be added later without it.
The group reports file ids (FAN_REPORT_FID): that is the only mode in which the kernel reports a truncation
(FAN_MODIFY from ftruncate carries no path, so an fd-mode group drops it) and attribute changes (FAN_ATTRIB).
Reading never blocks: the fd is non-blocking and sits in the supervisor's one event loop.
"""

from __future__ import annotations

import ctypes
import os
import struct
import time
from collections import deque
from dataclasses import dataclass

FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_REPORT_FID = 0x200
FAN_MARK_ADD = 0x1
FAN_MARK_REMOVE = 0x2

FAN_MODIFY = 0x2
FAN_ATTRIB = 0x4
FAN_OPEN = 0x20
FAN_DELETE_SELF = 0x400
FAN_MOVE_SELF = 0x800
FAN_Q_OVERFLOW = 0x4000

AT_FDCWD = -100
_METADATA = struct.Struct("<IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
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
    cmdline: str
    when_ns: int

    @classmethod
    def of(cls, mask: int, pid: int) -> Touch:
        uid, gid, comm = _status_identity(pid)
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            exe = "unknown"  # exited (a zombie keeps its uid, not its exe), or hidden without CAP_SYS_PTRACE
        return cls(mask, pid, uid, gid, exe, comm, _cmdline(pid), time.monotonic_ns())

    def describe(self) -> dict:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "exe": self.exe, "comm": self.comm,
                "cmdline": self.cmdline}


def _cmdline(pid: int) -> str:
    """World-readable, unlike exe, but written by the process itself: a hint, not proof."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(256)
    except OSError:
        return ""
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")


def _status_identity(pid: int) -> tuple[int | None, int | None, str]:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as status:
            fields = dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)
    except OSError:
        return None, None, "unknown"
    uid = int(fields["Uid"].split()[1]) if "Uid" in fields else None  # the effective uid did the deed
    gid = int(fields["Gid"].split()[1]) if "Gid" in fields else None
    return uid, gid, fields.get("Name", "unknown")


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
