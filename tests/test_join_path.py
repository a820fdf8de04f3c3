"""The join path of the ivshmem server: every join and leave is in the audit log, the peer is named once, and a
peer that joins in a loop costs no log line per join (issue 11's joins row, bench/bench_join.py)."""

from __future__ import annotations

import ctypes
import time

import pytest

from helpers import RunningSupervisor, policy_file
from rawpeer import RawPeer
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
