"""A raw ivshmem peer for conformance tests: records every message exactly as the server sent it."""

from __future__ import annotations

import os
import select
import socket

from shmguard.protocol import recv_message


def fd_kind(fd: int) -> str:
    link = os.readlink(f"/proc/self/fd/{fd}")
    if link == "anon_inode:[eventfd]":
        return "eventfd"
    return "shm" if link.startswith("/memfd:") or link.startswith("/dev/shm/") else link


class RawPeer:
    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.messages: list[tuple[int, str | None]] = []  # (value, kind of fd or None)
        self.fds: list[int] = []

    def read(self, count: int, timeout: float = 10.0) -> list[tuple[int, str | None]]:
        """Read exactly `count` more messages."""
        start = len(self.messages)
        while len(self.messages) < start + count:
            if not select.select([self.sock], [], [], timeout)[0]:
                raise AssertionError(f"only {len(self.messages) - start} of {count} messages arrived")
            message = recv_message(self.sock)
            assert message is not None, "server closed the connection"
            value, fds = message
            assert len(fds) <= 1
            self.fds.extend(fds)
            self.messages.append((value, fd_kind(fds[0]) if fds else None))
        return self.messages[start:]

    def quiet(self, timeout: float = 0.3) -> bool:
        """True if nothing more arrives within timeout."""
        return not select.select([self.sock], [], [], timeout)[0]

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        if not select.select([self.sock], [], [], timeout)[0]:
            return False
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        self.sock.close()
