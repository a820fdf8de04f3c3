"""fanotify through ctypes: which process (pid, uid, exe) touched a watched inode.

Only the guard (shmguard/guard/) uses it, to name the offender of an incident; inotify cannot (its events carry
no pid). fanotify needs CAP_SYS_ADMIN when it is opened; marks on single inodes can be added later without it.
The group reports file ids (FAN_REPORT_FID): that is the only mode in which the kernel reports a truncation
(FAN_MODIFY from ftruncate carries no path, so an fd-mode group drops it) and attribute changes (FAN_ATTRIB).
Reading never blocks: the fd is non-blocking and sits in the supervisor's one event loop.

A short-lived offender is often gone before the supervisor reads /proc: opener_witness.py holds each open of the
region while it reads who opened it.

Nothing here reads /proc/PID/cmdline: that reads the process's memory, which it can map from something that never
answers (a FUSE file), and the reader (the supervisor's loop, or the witness holding every open) would hang.
"""

from __future__ import annotations

import ctypes
import os
import struct
import time
from collections import deque
from dataclasses import dataclass

from . import procfs
from .libc import call, function

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
RESPONSE = struct.Struct("<iI")  # struct fanotify_response: fd, response
_fanotify_init_call = function("fanotify_init", [ctypes.c_uint, ctypes.c_uint])
_fanotify_mark_call = function("fanotify_mark", [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                                 ctypes.c_char_p])


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
        uid, gid, comm = procfs.identity(pid)
        return cls(mask, pid, uid, gid, exe_or_unknown(pid), comm, time.monotonic_ns(), start_time_or_none(pid))

    def describe(self) -> dict:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "exe": self.exe, "comm": self.comm}


def exe_or_unknown(pid: int) -> str:
    return procfs.exe(pid) or "unknown"  # exited (a zombie keeps its uid, not its exe), or hidden (no CAP_SYS_PTRACE)


def start_time_or_none(pid: int) -> int | None:
    """With the pid, one process and never another; None when /proc will not say (gone, hidepid)."""
    try:
        return procfs.start_time(pid)
    except OSError:
        return None


class Fanotify:
    """A notification-only fanotify group that reports file ids; marks are on single inodes."""

    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def open(cls) -> Fanotify:
        """Raises OSError (EPERM without CAP_SYS_ADMIN, EINVAL on kernels without FAN_REPORT_FID)."""
        flags = FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_FID
        return cls(call(_fanotify_init_call, flags, os.O_RDONLY | os.O_CLOEXEC | os.O_LARGEFILE))

    def mark(self, path: str, mask: int) -> None:
        """Mark the inode at path (a /proc/self/fd/N path marks exactly the inode we hold)."""
        call(_fanotify_mark_call, self.fd, FAN_MARK_ADD, mask, AT_FDCWD, os.fsencode(path))

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


def init_group(flags: int) -> int:
    """A non-blocking group of the class in flags (the witness's: a permission group, an exec group)."""
    return call(_fanotify_init_call, flags | FAN_CLOEXEC | FAN_NONBLOCK, os.O_RDONLY | os.O_CLOEXEC | os.O_LARGEFILE)


def mark_group(fd: int, flags: int, mask: int, path: str) -> None:
    """Add a mark (flags: FAN_MARK_FILESYSTEM, FAN_MARK_MOUNT, or 0 for the inode at path)."""
    call(_fanotify_mark_call, fd, FAN_MARK_ADD | flags, mask, AT_FDCWD, os.fsencode(path))


def read_events(fd: int, limit: int = 65536) -> list[tuple[int, int, int]]:
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
