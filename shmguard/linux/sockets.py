"""Who is at the other end of a UNIX socket: SO_PEERCRED and SO_PEERGROUPS, as the kernel saw it at connect time."""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

from . import procfs

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux; Python 3.11 does not name it
MAX_GROUPS = 65536  # NGROUPS_MAX
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


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
    """Who is at the other end of a UNIX socket, as the kernel saw it at connect time."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary groups of the connecting process

    @classmethod
    def of(cls, sock: socket.socket) -> PeerCred:
        return cls(*peer_credentials(sock), peer_groups(sock))

    def exe(self) -> str:
        return procfs.executable(self.pid)

    def describe(self) -> dict:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "exe": self.exe()}
