"""The ivshmem server's flush of a connection's queue (IvshmemServer._flush): whatever the socket takes at a time,
every word arrives in order, each fd with its own word."""

from __future__ import annotations

import os
import socket

import pytest

from shmguard.loop import EventLoop
from shmguard.protocol import MESSAGE, SharedFd, recv_message
from shmguard.server import Connection, IvshmemServer


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    yield ours, theirs
    ours.close()
    theirs.close()


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def test_a_slow_reader_gets_every_word_in_order_with_its_fds(pair):
    """The server's flush (IvshmemServer._flush) through a socket that fills again and again: runs of plain words cut
    where the socket filled, and fd words, all arrive in order, each fd with its own word."""
    ours, theirs = pair
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    server = IvshmemServer.__new__(IvshmemServer)  # only its flush: no policy, no listener
    server.loop = EventLoop()
    connection = Connection(1, ours)
    passed = SharedFd(os.eventfd(0))
    expected = []
    for number in range(3000):
        with_fd = number % 100 in (3, 4, 50)  # runs of up to 64 plain words between fd words
        connection.queue.append((MESSAGE.pack(number), passed.acquire() if with_fd else None))
        expected.append((number, with_fd))
    received = []
    theirs.settimeout(10)
    try:
        while connection.queue or len(received) < len(expected):
            assert server._flush(connection) is None
            for _ in range(5):  # a slow reader: a few words at a time
                if len(received) == len(expected):
                    break
                value, fds = recv_message(theirs)
                received.append((value, len(fds) == 1))
                assert len(fds) <= 1
                if fds:
                    assert inode(fds[0]) == inode(passed.fd)
                    os.close(fds[0])
        assert received == expected
    finally:
        if connection.writing:
            server.loop.remove_writer(ours.fileno())
        server.loop.close()
        passed.release()
