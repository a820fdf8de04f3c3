"""The ivshmem server wire format (docs/protocol.md §1): 8-byte little-endian int64 messages, at most one fd each.

Encoding and the order of a greeting live here (QEMU's limits on ids, vectors and sizes in limits.py); the server
and client decide when to send and receive.
"""

from __future__ import annotations

import array
import os
import socket
import struct
import time
from collections.abc import Iterator, Sequence

from .linux import eventfd

MESSAGE = struct.Struct("<q")
PROTOCOL_VERSION = 0
REFUSED_VERSION = -1  # sent as the first word to a refused peer: QEMU exits ("server sent version -1, expecting 0")
SHM_MESSAGE = -1
FD_SIZE = array.array("i").itemsize


class SharedFd:
    """An fd shared by the peer table and the send queues; closed when the last holder releases it."""

    __slots__ = ("fd", "_holders")

    def __init__(self, fd: int):
        self.fd, self._holders = fd, 1

    def acquire(self) -> SharedFd:
        self._holders += 1
        return self

    def release(self) -> None:
        self._holders -= 1
        if self._holders == 0:
            os.close(self.fd)


Message = tuple[int, SharedFd | None]


def ring_eventfd(fd: int) -> bool:
    """Ring a doorbell: add 1 to the eventfd, never blocking. False if a holder had filled the counter: the
    owner is rung already (rings coalesce)."""
    return eventfd.ring(fd)


def greeting(new_id: int, shm: SharedFd, others: Sequence[tuple[int, Sequence[SharedFd]]],
             own: Sequence[SharedFd]) -> Iterator[Message]:
    """What a joining peer receives, in the only order QEMU survives (docs/protocol.md §1 and §2)."""
    yield PROTOCOL_VERSION, None
    yield new_id, None
    yield SHM_MESSAGE, shm
    for peer_id, fds in others:
        for fd in fds:
            yield peer_id, fd
    for fd in own:
        yield new_id, fd


def announcement(new_id: int, own: Sequence[SharedFd]) -> Iterator[Message]:
    """What every connected peer receives when new_id joins: one message per vector, in order."""
    for fd in own:
        yield new_id, fd


def send_message(sock: socket.socket, data: bytes, fd: int | None = None) -> int:
    """Send (the rest of) one encoded message; returns bytes sent. An fd travels with the first byte."""
    if fd is None:
        return sock.send(data)
    return sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def recv_message(sock: socket.socket, deadline: float | None = None) -> tuple[int, list[int]] | None:
    """Receive one whole message and the fds that came with it; None on EOF. Blocking.

    With a deadline (time.monotonic()), the whole message must arrive by then or TimeoutError is raised,
    however slowly its bytes trickle in. Fds received with a message that does not complete are closed.
    """
    data, fds = b"", []
    try:
        while len(data) < MESSAGE.size:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out")
                sock.settimeout(left)
            chunk, ancdata, flags, _ = sock.recvmsg(MESSAGE.size - len(data), socket.CMSG_SPACE(4 * FD_SIZE))
            fds.extend(_fds_from(ancdata))
            if flags & socket.MSG_CTRUNC:
                raise OSError("server sent more fds with one message than the protocol allows")
            if not chunk:
                _close_all(fds)
                return None
            data += chunk
    except BaseException:
        _close_all(fds)  # a message cut short (timeout, error) must not leak the fds that came with it
        raise
    return MESSAGE.unpack(data)[0], fds


def _fds_from(ancdata) -> list[int]:
    fds = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
