"""Protocol conformance: the exact messages QEMU's ivshmem-doorbell expects (docs/protocol.md §1 and §2)."""

from __future__ import annotations

import pytest

from helpers import RunningSupervisor, policy_file
from rawpeer import RawPeer

HOST = 0  # the supervisor's own peer always takes the first id


def expected_greeting(new_id: int, existing: list[int], vectors: int) -> list:
    messages = [(0, None), (new_id, None), (-1, "shm")]
    for peer_id in existing:
        messages += [(peer_id, "eventfd")] * vectors
    return messages + [(new_id, "eventfd")] * vectors


@pytest.fixture
def start(tmp_path):
    running = []

    def start(vectors: int, **server):
        supervisor = RunningSupervisor(policy_file(tmp_path, server={"vectors": vectors, **server}))
        running.append(supervisor)
        return supervisor

    yield start
    for supervisor in running:
        assert supervisor.stop() == 0, supervisor.log()


@pytest.mark.parametrize("vectors", [1, 2, 64])
def test_first_second_third_peer_and_leaves(start, vectors):
    supervisor = start(vectors)
    peers = []
    for n in range(3):
        peer = RawPeer(supervisor.socket)
        existing = [HOST] + list(range(1, n + 1))
        greeting = expected_greeting(n + 1, existing, vectors)
        assert peer.read(len(greeting)) == greeting
        for earlier in peers:  # everyone already connected hears the new id once per vector
            assert earlier.read(vectors) == [(n + 1, "eventfd")] * vectors
        peers.append(peer)
    assert all(p.quiet() for p in peers)

    peers[1].close()  # peer 2 leaves: the others get its bare id, no fd
    for peer in (peers[0], peers[2]):
        assert peer.read(1) == [(2, None)]
        assert peer.quiet()
    peers[0].close()
    assert peers[2].read(1) == [(1, None)]
    peers[2].close()


def test_ids_are_never_reused_while_a_peer_remembers_the_leave(start):
    supervisor = start(1)
    watcher = RawPeer(supervisor.socket)
    watcher.read(len(expected_greeting(1, [HOST], 1)))
    seen = []
    for _ in range(20):
        peer = RawPeer(supervisor.socket)
        new_id = peer.read(6)[1][0]  # the whole greeting: a peer that leaves mid-greeting is never announced
        seen.append(new_id)
        peer.close()
        assert watcher.read(2) == [(new_id, "eventfd"), (new_id, None)]
    assert seen == list(range(2, 22))


def test_shutdown_tells_every_peer_and_removes_the_socket(start):
    import os

    supervisor = start(2)
    peers = [RawPeer(supervisor.socket) for _ in range(2)]
    peers[0].read(len(expected_greeting(1, [HOST], 2)) + 2)
    peers[1].read(len(expected_greeting(2, [HOST, 1], 2)))
    assert supervisor.stop() == 0
    # each peer hears the host and the other peer leave, then the server closes the connection
    assert peers[0].read(2) == [(HOST, None), (2, None)]
    assert peers[1].read(2) == [(HOST, None), (1, None)]
    assert peers[0].closed_by_server()
    assert not os.path.exists(supervisor.socket)
    for peer in peers:
        peer.close()
