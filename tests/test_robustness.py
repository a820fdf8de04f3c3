"""The server survives every client misbehaviour and keeps serving the peers that behave."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from helpers import OUTSIDER_USER, SHMGUARD, RunningSupervisor, as_user, policy_file
from rawpeer import RawPeer
from shmguard.client import IvshmemClient
from shmguard.errors import ProtocolError, ShmguardError


@pytest.fixture
def start(tmp_path):
    running = []

    def start(*args, **sections):
        supervisor = RunningSupervisor(policy_file(tmp_path, **sections), *args)
        running.append(supervisor)
        return supervisor

    yield start
    for supervisor in running:
        assert supervisor.stop() == 0, supervisor.log()


def greeting_length(peers_before: int, vectors: int) -> int:
    return 3 + vectors * (peers_before + 1)


def test_eight_peers_at_64_vectors_each_get_their_whole_greeting(start):
    supervisor = start(server={"vectors": 64})
    peers = [RawPeer(supervisor.socket) for _ in range(8)]
    for n, peer in enumerate(peers):  # read only after all joined: the server had to queue, not drop
        messages = peer.read(greeting_length(n + 1, 64) + 64 * (7 - n), timeout=20)
        # every peer ends up holding all 64 vectors of all nine peers (the host and the eight)
        assert sum(1 for _, kind in messages if kind == "eventfd") == 9 * 64
        assert messages[:3] == [(0, None), (n + 1, None), (-1, "shm")]
        assert peer.quiet()
    for peer in peers:
        peer.close()


def test_a_peer_that_never_reads_delays_nobody_and_is_dropped_past_its_bound(start):
    supervisor = start(server={"vectors": 64, "max_queue": 400, "max_peers": 4}, shares={"peers_reserved": 1})
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    stuck.connect(supervisor.socket)  # never reads a byte
    started = time.monotonic()
    for _ in range(30):
        with IvshmemClient(supervisor.socket, vectors=64, timeout=10) as client:
            assert len(client.own_vectors) == 64
    assert time.monotonic() - started < 30  # each join completed while the stuck peer's queue grew
    deadline = time.monotonic() + 10
    while "send queue passed 400 messages" not in supervisor.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "send queue passed 400 messages" in supervisor.log()
    stuck.close()


def test_burst_of_1000_connect_and_close_leaves_the_server_serving(start):
    supervisor = start()
    for _ in range(1000):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(supervisor.socket)
        sock.close()
    with IvshmemClient(supervisor.socket, vectors=2) as client:
        assert client.shm_size == 4 << 20


def test_clients_that_send_bytes_or_reset_are_dropped(start):
    supervisor = start()
    watcher = RawPeer(supervisor.socket)
    watcher.read(greeting_length(1, 2))
    talker = RawPeer(supervisor.socket)
    talker.read(greeting_length(2, 2))
    talker.sock.send(b"hello")  # clients never send: the server drops it
    assert watcher.read(3)[-1] == (2, None)
    resetter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    resetter.connect(supervisor.socket)
    resetter.close()  # gone before its greeting is sent: EPIPE on the server's side
    with IvshmemClient(supervisor.socket, vectors=2):
        pass
    # a peer whose greeting failed was never announced, so the watcher hears nothing of it
    assert [value for value, _ in watcher.read(3)] == [4, 4, 4]
    assert "sent data" in supervisor.log()
    talker.close()
    watcher.close()


def _join_without_fd(path: str):
    """As an unprivileged uid: connect and report every fd the server sent (must be none)."""
    from shmguard.protocol import recv_message

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.settimeout(5)
    received = []
    while (message := recv_message(sock)) is not None:
        received.append(message)
    return received


def test_an_unauthorised_uid_is_refused_with_the_refusal_word_and_no_fd(start):
    # The socket mode lets anyone connect, so the SO_PEERCRED check is what refuses.
    supervisor = start(server={"mode": "0666", "peers": ["root"]})
    received = as_user(OUTSIDER_USER, _join_without_fd, supervisor.socket)
    assert received == [(-1, [])]  # only the refusal word that makes QEMU exit, and never an fd
    assert "refused peer" in supervisor.log() and "uid 65534" in supervisor.log()
    refused = [r for r in supervisor.audit_records() if r["action"] == "refused"]
    assert refused and refused[-1]["actor"]["uid"] == 65534


def test_a_group_member_is_admitted(start):
    supervisor = start(server={"mode": "0660", "peers": ["root", "@ivshmem"]})
    received = as_user("shmguard-member", _count_greeting, supervisor.socket)
    assert received >= 3


def _count_greeting(path: str) -> int:
    client = IvshmemClient(path, vectors=2).connect()
    count = 3 + sum(len(v) for v in client.peers.values()) + len(client.own_vectors)
    client.close()
    return count


def test_running_out_of_fds_keeps_serving_connected_peers(tmp_path):
    policy = policy_file(tmp_path, server={"vectors": 2})
    supervisor = RunningSupervisor(policy)
    subprocess.run(["prlimit", f"--pid={supervisor.proc.pid}", "--nofile=40:40"], check=True)
    try:
        first = IvshmemClient(supervisor.socket, vectors=2).connect()
        crowd = []
        for _ in range(40):  # far more than 40 fds' worth of peers
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(supervisor.socket)
            crowd.append(sock)
        time.sleep(0.5)
        # refused at accept() or eventfd(), or dropped when its greeting's fds exceed the in-flight limit
        log = supervisor.log()
        assert any(why in log for why in ("out of file descriptors", "Too many open files", "Too many references"))
        first.update()  # still served: its socket is alive and the server answers rings
        for sock in crowd:
            sock.close()
        with IvshmemClient(supervisor.socket, vectors=2, timeout=10) as late:
            late.notify(first.own_id, 1)
            assert first.wait(timeout=5) == 1
        first.close()
    finally:
        assert supervisor.stop() == 0, supervisor.log()


def test_two_clients_ring_each_other_on_every_vector(start):
    supervisor = start(server={"vectors": 4})
    with IvshmemClient(supervisor.socket, vectors=4) as a, IvshmemClient(supervisor.socket, vectors=4) as b:
        deadline = time.monotonic() + 10
        while b.own_id not in a.peers and time.monotonic() < deadline:  # b's announcement may still be on its way
            a.wait([], timeout=0.05)
        for vector in range(4):
            a.notify(b.own_id, vector)
            assert b.wait(timeout=5) == vector
            b.notify(a.own_id, vector)
            assert a.wait(timeout=5) == vector


def test_shmguard_wait_returns_the_vector_it_was_rung_on(start):
    supervisor = start(server={"vectors": 2})
    waiter = subprocess.Popen([*SHMGUARD, "wait", "--vector", "1", "--timeout", "30", "--socket", supervisor.socket],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "waiting" in waiter.stderr.readline()
    peers = subprocess.run([*SHMGUARD, "peers", "--json", "--socket", supervisor.socket], capture_output=True,
                           text=True, check=True)
    import json

    waiting_id = max(int(peer_id) for peer_id in json.loads(peers.stdout)["peers"])
    subprocess.run([*SHMGUARD, "notify", str(waiting_id), "1", "--socket", supervisor.socket], check=True)
    out, _ = waiter.communicate(timeout=30)
    assert waiter.returncode == 1 and out.strip() == "vector 1"  # the exit status is the vector
    timed_out = subprocess.run([*SHMGUARD, "wait", "--timeout", "0.5", "--socket", supervisor.socket],
                               capture_output=True, text=True)
    assert timed_out.returncode == 124
    unreachable = subprocess.run([*SHMGUARD, "wait", "--socket", "/nonexistent/socket"], capture_output=True,
                                 text=True)
    assert unreachable.returncode == 125 and unreachable.stderr.startswith("shmguard: error:")


def test_interactive_client_commands(start):
    supervisor = start(server={"vectors": 2})
    with IvshmemClient(supervisor.socket, vectors=2) as other:
        result = subprocess.run([*SHMGUARD, "client", "--socket", supervisor.socket],
                                input=f"help\ndump\nint {other.own_id} 1\nint {other.own_id} all\nint all\n"
                                      "int 99 0\nbogus\n", capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert "our_id = " in result.stdout and f"peer_id = {other.own_id}" in result.stdout
        assert "no peer 99" in result.stdout and "unknown command 'bogus'" in result.stdout
        assert other.wait([1], timeout=5) == 1 and other.wait([0], timeout=5) == 0


def test_the_sealed_region_cannot_be_resized_through_proc(start):
    supervisor = start()
    fd_dir = f"/proc/{supervisor.proc.pid}/fd"
    memfd = next(f"{fd_dir}/{n}" for n in os.listdir(fd_dir) if os.readlink(f"{fd_dir}/{n}").startswith("/memfd:"))
    for command in (["truncate", "-s", "0", memfd], ["sh", "-c", f"echo x > {memfd}"],
                    ["truncate", "-s", "8M", memfd]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode != 0 and "Operation not permitted" in result.stderr, command
        assert os.stat(memfd).st_size == 4 << 20
    with pytest.raises(PermissionError):
        os.truncate(memfd, 0)


def test_refused_join_as_client_is_one_clear_error(start):
    supervisor = start(server={"mode": "0666", "peers": ["root"]})

    def join(path):
        try:
            IvshmemClient(path, vectors=2, timeout=5).connect()
        except ProtocolError as exc:
            return str(exc)
        return "joined"

    assert "refused" in as_user(OUTSIDER_USER, join, supervisor.socket)


def test_control_socket_out_of_fds_refuses_and_recovers(tmp_path):
    from shmguard.control import StatusRequest

    supervisor = RunningSupervisor(policy_file(tmp_path))
    subprocess.run(["prlimit", f"--pid={supervisor.proc.pid}", "--nofile=40:40"], check=True)
    try:
        crowd = []
        for _ in range(60):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(supervisor.control)
            crowd.append(sock)
        supervisor.wait_for_log("control socket: out of file descriptors")
        for sock in crowd:
            sock.close()
        deadline = time.monotonic() + 10
        while True:  # the crowd's connections are closed as the loop reads their EOFs
            try:
                assert supervisor.client(timeout=5).ask(StatusRequest())["ok"]
                break
            except ShmguardError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        assert supervisor.stop() == 0, supervisor.log()
