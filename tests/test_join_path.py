"""The join path of the ivshmem server: every join and leave is in the audit log, the peer is named once, a peer
that joins in a loop costs no log line per join, and with a durable log the joins of one turn of the loop share one
fsync, which comes before any of them is greeted (issue 11's joins row, bench/bench_join.py)."""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import signal
import socket
import time

import pytest
from test_group_commit import SYNC_CALLS, disk_that_fills, fd_of, fill, sync_ends, sync_starts, trace_lines, traced

from helpers import RunningSupervisor, policy_file
from rawpeer import RawPeer
from shmguard import audit
from shmguard.linux.sockets import accept_nonblocking, peer_credentials
from shmguard.server import PeerLog

PR_SET_NAME, PR_GET_NAME = 15, 16
GREETING = 5  # 0, the id, -1 + shm, the host's vector, its own vector (1 vector)
JOINS = 3 * PeerLog.BURST


@pytest.fixture
def supervisor(tmp_path):
    running = RunningSupervisor(policy_file(tmp_path, server={"vectors": 1}))
    yield running
    assert running.stop() == 0, running.log_tail()


def records_settle(supervisor: RunningSupervisor, action: str, count: int) -> list[dict]:
    deadline = time.monotonic() + 30
    while True:
        records = [r for r in supervisor.audit_records() if r["action"] == action]
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def set_thread_name(name: bytes) -> bytes:
    libc = ctypes.CDLL(None, use_errno=True)
    old = ctypes.create_string_buffer(16)
    assert libc.prctl(PR_GET_NAME, old, 0, 0, 0) == 0
    assert libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0) == 0
    return old.value


def test_a_join_loop_is_recorded_join_by_join_and_logged_within_the_rate_limit(supervisor):
    for _ in range(JOINS):
        peer = RawPeer(supervisor.socket)
        peer.read(GREETING)
        peer.close()
    joins = records_settle(supervisor, "peer-join", JOINS)
    leaves = records_settle(supervisor, "peer-leave", JOINS)
    assert len(joins) == len(leaves) == JOINS
    by_peer = {r["detail"]["peer"]: r["actor"] for r in joins}
    assert all(by_peer[r["detail"]["peer"]] == r["actor"] for r in leaves)  # the name of the join, kept
    log = supervisor.log()
    joined = [line for line in log.splitlines() if " joined: " in line]
    left = [line for line in log.splitlines() if " left: " in line]
    assert len(joined) == PeerLog.BURST and len(left) <= PeerLog.BURST, log  # the first ones, then none per join


def test_a_peer_is_named_when_it_joins_and_its_leave_says_the_same(supervisor):
    """A pid's name can change (or the pid go) before it leaves: the records give the name it joined with."""
    old = set_thread_name(b"joiner-named")
    try:
        peer = RawPeer(supervisor.socket)
        peer.read(GREETING)
        set_thread_name(b"renamed-later")
        peer.close()
    finally:
        set_thread_name(old)
    join = records_settle(supervisor, "peer-join", 1)[0]
    leave = records_settle(supervisor, "peer-leave", 1)[0]
    assert "joiner-named" in join["actor"]["exe"] or join["actor"]["exe"].startswith("/"), join
    assert leave["actor"] == join["actor"]


def read_greeting(peer: RawPeer) -> list[tuple[int, str | None]]:
    """The whole greeting at 1 vector: up to and with the peer's own vector (the others' vectors come before it)."""
    messages = peer.read(2)
    own_id = messages[1][0]
    while messages[-1] != (own_id, "eventfd"):
        messages += peer.read(1)
    return messages


BATCH = 20


def test_the_joins_of_one_turn_share_one_fsync_and_none_is_greeted_before_it(tmp_path):
    supervisor = RunningSupervisor(policy_file(tmp_path, audit={"durable": True}, server={"vectors": 1}))
    try:
        pid = supervisor.proc.pid
        log_fd = fd_of(pid, supervisor.audit)
        out = tmp_path / "trace"
        with traced(pid, f"write,{SYNC_CALLS},sendto,sendmsg", out):
            os.kill(pid, signal.SIGSTOP)  # the connections wait in the backlog: one turn of the loop takes them all
            try:
                peers = [RawPeer(supervisor.socket) for _ in range(BATCH)]
            finally:
                os.kill(pid, signal.SIGCONT)
            greetings = [read_greeting(peer) for peer in peers]
        assert all(greeting[:3] == [(0, None), (greeting[1][0], None), (-1, "shm")] for greeting in greetings)
        lines = trace_lines(out)
        joins = [n for n, line in enumerate(lines) if re.search(rf"\bwrite\({log_fd}, ", line) and "peer-join" in line]
        starts, ends = sync_starts(lines), sync_ends(lines)
        sends = [n for n, line in enumerate(lines) if re.search(r"\b(sendmsg|sendto)\(", line)]
        assert len(joins) == BATCH and sends and starts and ends, "\n".join(lines)
        assert joins[-1] < starts[0] <= ends[0] < sends[0], "every join recorded, then one fsync, then a greeting"
        assert len([n for n in starts if n < sends[0]]) == 1, f"{BATCH} joins in one turn share one fsync"
        for peer in peers:
            peer.close()
        assert len(records_settle(supervisor, "peer-leave", BATCH)) == BATCH
    finally:
        supervisor.stop()
    assert audit.verify(supervisor.audit).ok


def test_a_join_whose_record_cannot_be_made_durable_is_refused_and_never_sees_the_region(tmp_path):
    with disk_that_fills(tmp_path) as (mnt, filler):
        log_path = mnt / "log" / "audit.log"
        supervisor = RunningSupervisor(policy_file(tmp_path, audit={"durable": True, "path": str(log_path)},
                                                   server={"vectors": 1}))
        try:
            peer = RawPeer(supervisor.socket)
            assert read_greeting(peer)[2] == (-1, "shm")
            peer.close()
            fill(filler)
            # The loop device reports the failed write-back at the next fsync or the one after: join until refused.
            for _ in range(30):
                peer = RawPeer(supervisor.socket)
                first = peer.read(1)
                if first == [(-1, None)]:
                    break
                read_greeting_rest(peer)
                peer.close()
            assert first == [(-1, None)], "with the disk under the log full a join's fsync fails, and it is refused"
            assert peer.closed_by_server() and not peer.fds, "refused before anything else: no region, no eventfd"
            peer.close()
            # The failure is counted: in the trouble `status` shows, or, if a later fsync already succeeded (the
            # loop device fails only the write-back of blocks it cannot allocate), in the audit-gap record after it.
            trouble = supervisor.client().status()["audit"]["trouble"]
            gaps = [r for r in supervisor.audit_records() if r["action"] == "audit-gap"]
            missed = trouble["missed"] if trouble else gaps[-1]["detail"]["missed"]
            assert missed.get("not-synced", 0) >= 1, (trouble, gaps)
            assert "could not be made durable" in supervisor.log()
        finally:
            supervisor.stop()


def read_greeting_rest(peer: RawPeer) -> None:
    """The rest of a greeting whose first word was read already."""
    own_id = peer.read(1)[0][0]
    while peer.read(1)[0] != (own_id, "eventfd"):
        pass


def test_a_connection_is_accepted_non_blocking_and_close_on_exec_and_an_empty_backlog_is_none(tmp_path):
    """The server's accept (accept4 with the flags: no ioctl, no address) gives what listener.accept() and
    setblocking(False) gave, and the usual end of an accept batch is None, not an exception."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    listener.bind(str(tmp_path / "s"))
    listener.listen()
    with listener, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        assert accept_nonblocking(listener) is None
        client.connect(str(tmp_path / "s"))
        accepted = accept_nonblocking(listener)
        assert accepted is not None
        with accepted:
            assert accepted.family == socket.AF_UNIX and accepted.type == socket.SOCK_STREAM
            assert fcntl.fcntl(accepted.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK  # the fd itself, not just Python
            assert fcntl.fcntl(accepted.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert accepted.gettimeout() == 0.0
            with pytest.raises(BlockingIOError):
                accepted.recv(1)
            assert peer_credentials(accepted)[0] == os.getpid()
        assert accept_nonblocking(listener) is None


def test_a_stop_tells_every_peer_of_every_other_leave_before_it_closes(tmp_path):
    """The server's last flush at a stop (IvshmemServer.close): each remote peer hears the others leave (their bare
    ids, the supervisor's own peer's included), then EOF."""
    supervisor = RunningSupervisor(policy_file(tmp_path, server={"vectors": 1}))
    first = RawPeer(supervisor.socket)
    read_greeting(first)
    second = RawPeer(supervisor.socket)
    greeting = read_greeting(second)
    ids = {first.messages[1][0], second.messages[1][0]}
    host = next(value for value, kind in greeting[3:] if kind == "eventfd" and value not in ids)
    assert first.read(1) == [(second.messages[1][0], "eventfd")]  # the newcomer announced to the first
    try:
        assert supervisor.stop() == 0, supervisor.log_tail()
        for peer, other in ((first, second), (second, first)):
            heard = []
            while not peer.quiet(timeout=2):
                try:
                    heard += peer.read(1, timeout=2)
                except AssertionError:
                    break  # EOF
            assert {value for value, _ in heard} == {host, other.messages[1][0]}, heard
            assert all(kind is None for _, kind in heard), heard
    finally:
        first.close()
        second.close()
