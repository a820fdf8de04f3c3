"""Who is at the other end of a UNIX socket: SO_PEERCRED and SO_PEERGROUPS, as the kernel saw it at connect time."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from dataclasses import dataclass, field, replace

from . import libc, procfs

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux; Python 3.11 does not name it
MAX_GROUPS = 65536  # NGROUPS_MAX
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


_accept4 = libc.function("accept4", [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int])
_ACCEPT_FLAGS = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK  # tells socket() the fd is non-blocking already


def accept_nonblocking(listener: socket.socket) -> socket.socket | None:
    """The next connection waiting on a UNIX stream listener, as a socket that is non-blocking and close-on-exec
    from accept4(2) on: no ioctl to make it so, and no peer address (listener.accept() asks for both). None if
    nobody is waiting (EAGAIN: no exception for the usual end of a batch); any other failure raises OSError."""
    fd = _accept4(listener.fileno(), None, None, _ACCEPT_FLAGS)
    if fd < 0:
        error = ctypes.get_errno()
        if error == errno.EAGAIN:
            return None
        raise OSError(error, os.strerror(error))
    return socket.socket(socket.AF_UNIX, _STREAM_NONBLOCK, 0, fd)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected (or listened, for a client's socket): SO_PEERCRED."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """SO_PEERGROUPS: the groups the peer really holds (a sandbox that dropped a group does not have it)."""
    size = 64 * 4
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
            return struct.unpack(f"{len(raw) // 4}I", raw)
        except OSError as exc:
            if exc.errno != errno.ERANGE or size >= MAX_GROUPS * 4:
                raise
            size *= 4


@dataclass(frozen=True)
class PeerCred:
    """Who is at the other end of a UNIX socket, as the kernel saw it at connect time.

    `executable` is what /proc named the process when `named()` was called (once, at connect time, for a peer
    that stays: the pid may be gone or reused by the time it leaves); without it exe() asks /proc each time."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary groups of the connecting process (where they were asked for)
    executable: str | None = field(default=None, compare=False)

    @classmethod
    def of(cls, sock: socket.socket, named: bool = False, groups: bool = True) -> PeerCred:
        """The credential of sock's peer; named: with its executable read from /proc now, once; groups=False:
        without its supplementary groups (with_groups() adds them), for a caller that may not need them."""
        pid, uid, gid = peer_credentials(sock)
        return cls(pid, uid, gid, peer_groups(sock) if groups else (), procfs.executable(pid) if named else None)

    def with_groups(self, sock: socket.socket) -> PeerCred:
        """This credential with the supplementary groups of sock's peer (SO_PEERGROUPS)."""
        return replace(self, groups=peer_groups(sock))

    def named(self) -> PeerCred:
        """This credential with its executable read from /proc now, once."""
        return self if self.executable is not None else replace(self, executable=procfs.executable(self.pid))

    def exe(self) -> str:
        return self.executable if self.executable is not None else procfs.executable(self.pid)

    def describe(self) -> dict:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "exe": self.exe()}
