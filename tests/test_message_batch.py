"""MessageBatch (linux/sockets.py): several messages of a stream socket in one sendmmsg, each arriving as if it had
been one sendmsg: its fd with its own first byte, in order, and nothing of a later message after a partial one."""

from __future__ import annotations

import os
import socket

import pytest

from shmguard.linux.sockets import MessageBatch
from shmguard.protocol import MESSAGE, recv_message


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    yield ours, theirs
    ours.close()
    theirs.close()


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def test_each_message_arrives_with_its_own_fd_in_order(pair):
    ours, theirs = pair
    first, second = os.eventfd(0), os.eventfd(0)
    try:
        sent = MessageBatch(8, 64).send(ours.fileno(), [(MESSAGE.pack(0) + MESSAGE.pack(7), -1),
                                                        (MESSAGE.pack(-1), first), (MESSAGE.pack(3), second),
                                                        (MESSAGE.pack(9), -1)])
        assert sent == (4, 8), "all four, the last whole"
        received = [recv_message(theirs) for _ in range(5)]
        assert [value for value, _ in received] == [0, 7, -1, 3, 9]
        assert [len(fds) for _, fds in received] == [0, 0, 1, 1, 0]
        assert inode(received[2][1][0]) == inode(first) and inode(received[3][1][0]) == inode(second)
        for _, fds in received:
            for fd in fds:
                os.close(fd)
    finally:
        os.close(first)
        os.close(second)


def test_a_full_socket_stops_the_batch_at_its_partial_message_and_keeps_the_stream_in_order(pair):
    ours, theirs = pair
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    batch = MessageBatch(2, 1 << 18)
    big, small = b"a" * (1 << 18), b"b" * 8
    count, last = batch.send(ours.fileno(), [(big, -1), (small, -1)])
    assert count == 1 and 0 < last < len(big), "the first is partial and the kernel reports it last"
    with pytest.raises(BlockingIOError):
        batch.send(ours.fileno(), [(small, -1)])  # nothing at all fits: raised, not an empty list
    theirs.setblocking(False)
    data = b""
    while True:
        try:
            data += theirs.recv(1 << 20)
        except BlockingIOError:
            break
    assert data == big[:last], "not a byte of the later message went after the partial one"


def test_a_slot_used_again_without_its_fd_sends_none(pair):
    ours, theirs = pair
    batch = MessageBatch(1, 8)
    passed = os.eventfd(0)
    try:
        batch.send(ours.fileno(), [(MESSAGE.pack(1), passed)])
        batch.send(ours.fileno(), [(MESSAGE.pack(2), -1)])
        first, second = recv_message(theirs), recv_message(theirs)
        assert first[0] == 1 and len(first[1]) == 1 and second == (2, [])
        os.close(first[1][0])
    finally:
        os.close(passed)


def test_a_peer_gone_is_an_error_not_a_signal(pair):
    ours, theirs = pair
    theirs.close()
    with pytest.raises(BrokenPipeError):
        MessageBatch(1, 8).send(ours.fileno(), [(MESSAGE.pack(1), -1)])


def test_a_slow_reader_gets_every_word_in_order_with_its_fds_through_partial_sends(pair):
    """The server's flush (IvshmemServer._flush) through a socket that fills again and again: runs of plain words cut
    where the socket filled, and fd words, all arrive in order, each fd with its own word."""
    from shmguard.loop import EventLoop
    from shmguard.protocol import SharedFd
    from shmguard.server import Connection, IvshmemServer

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
