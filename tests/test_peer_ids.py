"""Peer ids: handed out in order, never repeated while a connected peer remembers the leave (docs/protocol.md §2).

The unit tests drive peers.PeerIds directly; the big test makes 70,000 joins against a real supervisor with a
long-lived peer and a real QEMU attached, runs the id space dry and checks that everyone survives it.
Run as a script, this file is one joiner process of the big test: `python test_peer_ids.py SOCKET COUNT`.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import RunningSupervisor, policy_file
from shmguard.client import IvshmemClient
from shmguard.errors import ProtocolError
from shmguard.limits import MAX_PEER_ID
from shmguard.loop import EventLoop
from shmguard.peers import PeerIds
from shmguard.policy import Access, ServerPolicy
from shmguard.protocol import REFUSED_VERSION, recv_message
from shmguard.qemu import monitor_command
from shmguard.region import create_memfd
from shmguard.server import IvshmemServer

# --- PeerIds on its own -------------------------------------------------------------------------------------


@pytest.mark.pure
def test_ids_are_handed_out_in_order_from_zero():
    ids = PeerIds()
    assert [ids.allocate(None) for _ in range(5)] == [0, 1, 2, 3, 4]


@pytest.mark.pure
def test_the_whole_id_space_is_0_to_65535_and_then_exhausted_while_a_peer_stays():
    ids = PeerIds()
    handed_out = [ids.allocate(0) for _ in range(MAX_PEER_ID + 1)]
    assert handed_out == list(range(MAX_PEER_ID + 1))
    ids.release(7, counter=10)
    assert ids.allocate(oldest_join=0) is None  # the peer that joined at 0 saw id 7 leave


@pytest.mark.pure
def test_fresh_ids_come_before_any_departed_one():
    ids = PeerIds(limit=4)
    assert ids.allocate(None) == 0
    ids.release(0, counter=1)
    assert [ids.allocate(None) for _ in range(3)] == [1, 2, 3]  # monotonic while fresh ids last


@pytest.mark.pure
def test_a_departed_id_stays_out_while_a_peer_that_joined_before_the_leave_is_connected():
    ids = PeerIds(limit=2)
    ids.allocate(0), ids.allocate(1)
    ids.release(1, counter=5)
    for oldest_join in (0, 1, 2, 3, 4):
        assert ids.allocate(oldest_join) is None


@pytest.mark.pure
def test_a_departed_id_comes_back_once_every_connected_peer_joined_after_the_leave():
    ids = PeerIds(limit=2)
    ids.allocate(0), ids.allocate(1)
    ids.release(1, counter=5)
    assert ids.allocate(oldest_join=9) == 1
    assert ids.allocate(oldest_join=9) is None  # and only once


@pytest.mark.pure
def test_with_nobody_connected_every_departed_id_comes_back_oldest_first():
    ids = PeerIds(limit=3)
    for _ in range(3):
        ids.allocate(None)
    for counter, peer_id in enumerate((2, 0, 1), start=1):
        ids.release(peer_id, counter)
    assert [ids.allocate(None) for _ in range(4)] == [2, 0, 1, None]


@pytest.mark.pure
def test_an_id_that_was_never_announced_is_free_at_once():
    ids = PeerIds(limit=2)
    ids.allocate(0), ids.allocate(0)
    ids.release(0, counter=3)
    ids.unused(1)  # nobody ever heard of peer 1 (its eventfds could not be created)
    assert ids.allocate(oldest_join=0) == 1
    assert ids.allocate(oldest_join=0) is None  # id 0 is still remembered by the peer that joined at 0


@pytest.mark.pure
def test_churn_with_a_long_lived_peer_never_repeats_an_id():
    ids, counter = PeerIds(limit=100), 0
    watcher_joined = counter  # joins first and never leaves, like QEMU
    ids.allocate(None)
    seen = []
    for _ in range(300):
        peer_id = ids.allocate(watcher_joined)
        if peer_id is None:
            continue
        seen.append(peer_id)
        counter += 2  # its join, then its leave
        ids.release(peer_id, counter)
    assert seen == list(range(1, 100))


# --- the server's use of PeerIds, in process with a small id space --------------------------------------------


class ServingThread(threading.Thread):
    """A real IvshmemServer on a real socket, its loop in a thread, with an id space of `limit` ids."""

    def __init__(self, path: Path, limit: int):
        super().__init__(daemon=True)
        self.region, self.loop, self.serving = create_memfd(4096), EventLoop(), True
        policy = ServerPolicy(socket=str(path), mode=0o600, vectors=1, peers=Access(anyone=True))
        self.server = IvshmemServer(policy, self.region.fd, self.loop)
        self.server.table.ids = PeerIds(limit)  # the one seam: 65,536 joins would make this a slow test
        self.server.start()
        self.server.add_local_peer()  # like the supervisor's own peer, id 0

    def run(self) -> None:
        while self.serving:
            self.loop.run_once(0.05)

    def stop(self) -> None:
        self.serving = False
        self.join(10)
        self.server.close(linger=0.1)
        self.loop.close()
        self.region.close()


def join_and_leave(path: str) -> int:
    with IvshmemClient(path, vectors=1, timeout=10) as client:
        return client.own_id


def test_departed_ids_come_back_once_no_remote_peer_remembers_them(tmp_path):
    # The supervisor's own peer keeps no state per peer id, so it must not pin departed ids for ever:
    # otherwise 65,533 joins in a supervisor's life (`shmguard peers` once a second for 18 hours) lock out
    # every peer, QEMU included, until a restart.

    path = str(tmp_path / "ivshmem.sock")
    serving = ServingThread(tmp_path / "ivshmem.sock", limit=4)
    serving.start()
    try:
        watcher = IvshmemClient(path, vectors=1, timeout=10).connect()
        assert watcher.own_id == 1
        assert [join_and_leave(path), join_and_leave(path)] == [2, 3]
        with pytest.raises(ProtocolError, match="refused this peer"):
            join_and_leave(path)  # the watcher saw 2 and 3 leave: both stay out
        watcher.close()
        wait_until(lambda: len(serving.server.peers) == 1, 10, "the watcher's leave")
        assert join_and_leave(path) == 2  # nobody connected remembers the leave of 2 any more
    finally:
        serving.stop()


# --- 70,000 joins against a real supervisor, a long-lived peer and a real QEMU ------------------------------

JOINS = 70_000
JOINERS = 2  # the supervisor is one thread; two joiners keep it busy on two cores
WATCHER_ID, QEMU_ID = 1, 2  # the supervisor's own peer is 0
FIRST_JOINER_ID = 3


class DrainingPeer(threading.Thread):
    """A long-lived peer that reads everything the server sends (one that stops reading is dropped)."""

    def __init__(self, path: str):
        super().__init__(daemon=True)
        self.client = IvshmemClient(path, vectors=1, timeout=10).connect()
        self.joins: list[int] = []
        self.leaves: list[int] = []
        self.rings = 0
        self.dropped = False  # the server closed our connection
        self._stop_read, self._stop_write = os.pipe()

    def run(self) -> None:
        sock, own_vector = self.client.sock, self.client.own_vectors[0]
        while True:
            ready = select.select([sock, own_vector, self._stop_read], [], [])[0]
            if self._stop_read in ready:
                return
            if own_vector in ready:
                os.eventfd_read(own_vector)
                self.rings += 1
            if sock in ready and not self._read_one(sock):
                return

    def _read_one(self, sock: socket.socket) -> bool:
        message = recv_message(sock)
        if message is None:
            self.dropped = True
            return False
        value, fds = message
        for fd in fds:  # we only count: holding 65,000 eventfds would exhaust our own fd limit
            os.close(fd)
        (self.joins if fds else self.leaves).append(value)
        return True

    def stop(self) -> None:
        os.write(self._stop_write, b"x")
        self.join(10)
        self.client.close()
        os.close(self._stop_read)
        os.close(self._stop_write)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def start_qemu(socket_path: str, monitor: Path, log: Path) -> subprocess.Popen:
    """Debian's QEMU with an ivshmem-doorbell on the supervisor's socket; the CPU never starts (-S)."""
    command = ["qemu-system-x86_64", "-M", "q35", "-S", "-display", "none", "-nodefaults",
               "-chardev", f"socket,path={socket_path},id=ivs", "-device", "ivshmem-doorbell,chardev=ivs,vectors=1",
               "-monitor", f"unix:{monitor},server=on,wait=off"]
    with log.open("wb") as output:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)


def run_joiners(socket_path: str) -> list[str]:
    """JOINS joins split over JOINERS processes; every line of their output is a peer id or 'refused'."""
    joiners = [subprocess.Popen([sys.executable, __file__, socket_path, str(JOINS // JOINERS)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(JOINERS)]
    lines = []
    for joiner in joiners:
        out, err = joiner.communicate(timeout=600)
        assert joiner.returncode == 0, err
        lines += out.split()
    return lines


@pytest.fixture
def attached(tmp_path):
    """A supervisor at 1 vector, a draining long-lived peer (id 1) and QEMU (id 2)."""
    supervisor = RunningSupervisor(policy_file(tmp_path, server={"vectors": 1}))
    watcher = DrainingPeer(supervisor.socket)
    watcher.start()
    qemu = start_qemu(supervisor.socket, tmp_path / "monitor.sock", tmp_path / "qemu.log")
    try:
        wait_until(lambda: QEMU_ID in watcher.joins, 30, "QEMU to join")
        yield supervisor, watcher, qemu, tmp_path
    finally:
        qemu.terminate()
        qemu.wait(10)
        watcher.stop()
        assert supervisor.stop() == 0, supervisor.log_tail()


def test_70000_joins_run_the_id_space_dry_without_a_repeat_and_everyone_survives(attached):

    supervisor, watcher, qemu, tmp_path = attached
    started = time.monotonic()
    lines = run_joiners(supervisor.socket)
    print(f"\n{JOINS} joins by {JOINERS} processes in {time.monotonic() - started:.1f} s")

    ids = [int(line) for line in lines if line != "refused"]
    assert len(ids) == len(set(ids)), "a peer id was handed out twice"
    assert sorted(ids) == list(range(FIRST_JOINER_ID, MAX_PEER_ID + 1))
    assert lines.count("refused") == JOINS - len(ids)
    assert "no peer id is free" in supervisor.log()

    # the long-lived peer heard every join and every leave, each once, and was never dropped
    wait_until(lambda: len(watcher.leaves) >= len(ids), 60, "the long-lived peer to hear every leave")
    assert sorted(watcher.joins) == [QEMU_ID, *range(FIRST_JOINER_ID, MAX_PEER_ID + 1)]
    assert sorted(watcher.leaves) == sorted(ids)
    assert watcher.is_alive() and not watcher.dropped

    # QEMU survived 65,533 joins and leaves: still running, its monitor answers, the device is there
    assert qemu.poll() is None, (tmp_path / "qemu.log").read_text()
    assert (tmp_path / "qemu.log").read_text() == ""  # not one complaint about a message it was sent
    assert "1af4:1110" in monitor_command(str(tmp_path / "monitor.sock"), "info pci")

    # ids stay exhausted while the long-lived peer and QEMU remember every leave: refused before any message
    with pytest.raises(ProtocolError, match="refused this peer"):
        IvshmemClient(supervisor.socket, vectors=1, timeout=10).connect()

    # ... but the supervisor still serves the peers it has: it rings the long-lived peer, QEMU is listed
    supervisor.cli("ring", f"{WATCHER_ID}:0", "--policy", str(supervisor.policy_path))
    wait_until(lambda: watcher.rings == 1, 10, "the ring to reach the long-lived peer")
    status = supervisor.cli("status", "--json", "--policy", str(supervisor.policy_path)).stdout
    assert f'"pid": {qemu.pid}' in status


# --- one joiner process of the big test --------------------------------------------------------------------


def join_once(path: str) -> str:
    """Connect, read the whole greeting to learn our id, close. 'refused' if the first word is the refusal (-1)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)  # a hung server fails the test instead of hanging it
        sock.connect(path)
        received, own_id = 0, None
        while (message := recv_message(sock)) is not None:
            value, fds = message
            for fd in fds:
                os.close(fd)
            received += 1
            if received == 1 and value == REFUSED_VERSION and not fds:
                return "refused" if recv_message(sock) is None else "refusal followed by more messages"
            if received == 2:
                own_id = value
            elif fds and value == own_id:  # our own (only) vector ends the greeting
                return str(own_id)
    if received:
        raise SystemExit(f"the server closed the connection after {received} messages of a greeting")
    return "refused"


if __name__ == "__main__":
    socket_path, count = sys.argv[1], int(sys.argv[2])
    print("\n".join(join_once(socket_path) for _ in range(count)))
