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


class _Msghdr(ctypes.Structure):  # struct msghdr (ctypes lays out its padding as the C compiler does)
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32), ("msg_iov", ctypes.c_void_p),
                ("msg_iovlen", ctypes.c_size_t), ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):  # struct mmsghdr
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_sendmmsg = libc.function("sendmmsg", [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int])
_FD_SPACE = socket.CMSG_SPACE(4)  # one cmsghdr carrying one int fd, padded
_CONTROL = struct.Struct("PN")  # msg_control, msg_controllen: adjacent in struct msghdr
_SIZE = struct.Struct("N")
_UINT = struct.Struct("I")
_INT = struct.Struct("i")
_FD_AT = socket.CMSG_LEN(0)  # the fd follows its cmsghdr


class MessageBatch:
    """Up to `capacity` messages to one stream socket in one sendmmsg(2): each is bytes (at most `size`) with at
    most one fd in SCM_RIGHTS, and arrives as a message of its own, its fd with its first byte, exactly as if
    each were one sendmsg. One system call instead of one per message, and the receiver, woken by the first, finds
    the rest already queued instead of contending for the socket with each next send.

    The kernel stops at the first message it cannot send whole (a partial one is the last it reports): nothing of
    a later message is sent after a partial one, so the byte stream stays in order. The memory is allocated once;
    a batch is not safe for two threads at once (the supervisor's loop is one)."""

    def __init__(self, capacity: int = 64, size: int = 512) -> None:
        self.capacity, self.size = capacity, size
        header, iovec = ctypes.sizeof(_Mmsghdr), ctypes.sizeof(_Iovec)
        iovecs = capacity * header
        controls = iovecs + capacity * iovec
        data = controls + capacity * _FD_SPACE
        self._memory = bytearray(data + capacity * size)
        self._base = base = ctypes.addressof(ctypes.c_char.from_buffer(self._memory))
        control_field = _Mmsghdr.msg_hdr.offset + _Msghdr.msg_control.offset
        # Where each slot's fields are, worked out once: a send only writes what changed since the slot's last.
        self._data_at = [data + slot * size for slot in range(capacity)]
        self._iov_len_at = [iovecs + slot * iovec + _Iovec.iov_len.offset for slot in range(capacity)]
        self._control_at = [slot * header + control_field for slot in range(capacity)]
        self._cmsg_at = [controls + slot * _FD_SPACE for slot in range(capacity)]
        self._sent_at = [slot * header + _Mmsghdr.msg_len.offset for slot in range(capacity)]
        self._lengths = [0] * capacity  # each slot's iov_len as last written
        self._passed = [-1] * capacity  # each slot's fd as last written (-1: no control message)
        for slot in range(capacity):
            message = _Mmsghdr.from_buffer(self._memory, slot * header)
            message.msg_hdr.msg_iov, message.msg_hdr.msg_iovlen = base + iovecs + slot * iovec, 1
            _Iovec.from_buffer(self._memory, iovecs + slot * iovec).iov_base = base + self._data_at[slot]
            # struct cmsghdr: cmsg_len (size_t), cmsg_level, cmsg_type (int); then the fd, set per send
            struct.pack_into("Nii", self._memory, self._cmsg_at[slot], socket.CMSG_LEN(4), socket.SOL_SOCKET,
                             socket.SCM_RIGHTS)

    def send(self, fd: int, messages: list[tuple[bytes, int]], flags: int = socket.MSG_NOSIGNAL) -> tuple[int, int]:
        """Send `messages` ((data, fd to pass or -1), at most `capacity`, data at most `size` bytes) on socket fd:
        (how many were sent, the bytes sent of the last of them). Every one before the last went whole; fewer
        than given, or a last one in part, if the socket's buffer filled. Raises OSError when none was sent
        (BlockingIOError: the buffer is full)."""
        memory, lengths, passed_before = self._memory, self._lengths, self._passed
        for slot, (data, passed) in enumerate(messages):
            at, size = self._data_at[slot], len(data)
            if size > self.size:
                raise ValueError(f"a message of {size} bytes in a batch of at most {self.size} a message")
            memory[at:at + size] = data
            if lengths[slot] != size:
                _SIZE.pack_into(memory, self._iov_len_at[slot], size)
                lengths[slot] = size
            if passed_before[slot] != passed:
                if passed >= 0:
                    _INT.pack_into(memory, self._cmsg_at[slot] + _FD_AT, passed)
                    _CONTROL.pack_into(memory, self._control_at[slot], self._base + self._cmsg_at[slot], _FD_SPACE)
                else:
                    _CONTROL.pack_into(memory, self._control_at[slot], 0, 0)
                passed_before[slot] = passed
        while (sent := _sendmmsg(fd, self._base, len(messages), flags)) < 0:
            error = ctypes.get_errno()
            if error != errno.EINTR:
                raise OSError(error, os.strerror(error))
        return sent, _UINT.unpack_from(memory, self._sent_at[sent - 1])[0] if sent else 0


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
