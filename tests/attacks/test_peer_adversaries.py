"""Admitted peers and members, within what the policy lets them do, against the supervisor (issue classes 1-4).

Each attacker is a real process of a real uid: a member of the ivshmem group that joined as a peer and holds the
region fd and the eventfds it was given, or root where the policy's reserve is the point.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import signal
import socket
import subprocess
import time
from pathlib import Path

import hostile_peer
import pytest

from helpers import MEMBER_USER, OUTSIDER_USER, RunningSupervisor, as_user, policy_file
from rawpeer import RawPeer
from shmguard.client import IvshmemClient
from shmguard.errors import ProtocolError
from shmguard.protocol import MESSAGE, REFUSED_VERSION

REGION_SIZE = 4 << 20


class Hostile:
    """tests/hostile_peer.py's main() in a forked child really dropped to `user`, holding on until closed."""

    def __init__(self, supervisor: RunningSupervisor, action: str, user: str = MEMBER_USER):
        entry = pwd.getpwnam(user)
        to_child, self._to_child = os.pipe()
        self._from_child, from_child = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.dup2(to_child, 0)
                os.dup2(from_child, 1)
                os.setgroups(os.getgrouplist(user, entry.pw_gid))
                os.setgid(entry.pw_gid)
                os.setuid(entry.pw_uid)
                hostile_peer.main(supervisor.socket, action, supervisor.control)
            except BaseException as exc:  # noqa: BLE001 - everything goes back to the test
                os.write(1, f"error {exc!r}\n".encode())
            finally:
                os._exit(0)
        os.close(to_child)
        os.close(from_child)
        line = self._read_line()
        if not line.startswith("ready "):
            self.close()
            raise AssertionError(f"hostile peer ({action}) did not get ready: {line!r}")
        self.value = int(line.split()[1])

    def _read_line(self) -> str:
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(self._from_child, 4096)
            if not chunk:
                break
            data += chunk
        return data.decode()

    def close(self) -> None:
        if self.pid:
            os.close(self._to_child)  # its signal to let go of everything
            os.close(self._from_child)
            deadline = time.monotonic() + 10
            while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    break
                time.sleep(0.01)
            self.pid = 0


def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def status(supervisor: RunningSupervisor) -> str:
    """`shmguard status --json`, which must answer: a stalled loop fails here, not by hanging the suite.
    Its exit status says whether the supervisor is healthy (an unwritable audit log is not), so it is not checked."""
    return supervisor.cli("status", "--json", "--policy", str(supervisor.policy_path), timeout=20, check=False).stdout


@pytest.fixture
def started(tmp_path):
    running: list[RunningSupervisor] = []

    def start(base: str, **sections) -> RunningSupervisor:
        running.append(RunningSupervisor(policy_file(tmp_path, base, **sections)))
        return running[-1]

    yield start
    for supervisor in running:
        assert supervisor.stop() == 0, supervisor.log()


# --- class 1: shared open file descriptions ----------------------------------------------------------------


def test_o_append_on_a_peers_region_fd_never_moves_the_supervisors_writes_or_repairs(started):
    supervisor = started("standard")
    region = supervisor.region_path
    peer = Hostile(supervisor, "append")
    try:
        supervisor.cli("write", "-m", "where it belongs", "--policy", str(supervisor.policy_path))
        assert os.stat(region).st_size == REGION_SIZE, "the write went past the end of the region"
        with open(region, "rb") as f:
            assert f.read(17) == b"where it belongs\0"
        os.truncate(region, 8192)  # the guard puts size and contents back with its own writes
        wait_until(lambda: os.stat(region).st_size == REGION_SIZE, "the repair")
        time.sleep(0.3)  # a repair that appended would go on growing the file
        assert os.stat(region).st_size == REGION_SIZE
        with open(region, "rb") as f:
            assert f.read(17) == b"where it belongs\0"
    finally:
        peer.close()


@pytest.mark.parametrize("base", ["strict", "standard"])
def test_a_peer_that_makes_its_eventfds_blocking_and_full_cannot_stall_the_supervisor(started, base):
    supervisor = started(base)
    peer = Hostile(supervisor, "block-own")
    try:
        for vector in (0, 1):  # each ring lands on a full, blocking counter
            supervisor.cli("ring", f"{peer.value}:{vector}", "--policy", str(supervisor.policy_path), timeout=20)
        assert f'"id": {peer.value}' in status(supervisor)
    finally:
        peer.close()


@pytest.mark.parametrize("base", ["strict", "standard"])
def test_a_peer_that_drains_the_hosts_eventfds_cannot_stall_the_supervisor(started, base):
    supervisor = started(base)
    peer = Hostile(supervisor, "drain-host")
    try:
        for _ in range(20):  # each status is a round through the loop while the host's counters are raced
            status(supervisor)
        with IvshmemClient(supervisor.socket, vectors=2, timeout=10):
            pass  # joins still served
    finally:
        peer.close()


# --- class 2: a refused QEMU fails at once --------------------------------------------------------------------


def start_qemu(socket_path: str) -> subprocess.Popen:
    """Debian's QEMU with an ivshmem-doorbell on the socket, its CPU never started; QEMU runs as root."""
    return subprocess.Popen(["qemu-system-x86_64", "-M", "q35", "-S", "-display", "none", "-nodefaults",
                             "-chardev", f"socket,path={socket_path},id=ivs",
                             "-device", "ivshmem-doorbell,chardev=ivs,vectors=2"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("why", ["not a policy peer", "no free slot"])
def test_a_refused_qemu_exits_at_once_with_a_clear_error_and_the_record_says_why(started, why):
    if why == "not a policy peer":  # root is neither listed nor in the group
        supervisor = started("strict", server={"peers": ["@ivshmem"]})
        reason = "is not allowed by the policy"
    else:
        supervisor = started("strict", server={"max_peers": 1}, shares={"peers_reserved": 0})
        reason = "peer slots are in use"
    holder = IvshmemClient(supervisor.socket, vectors=2).connect() if why == "no free slot" else None
    qemu = start_qemu(supervisor.socket)
    try:
        output, _ = qemu.communicate(timeout=30)  # a QEMU that spins in device realize never gets here
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
        if holder is not None:
            holder.close()
    assert qemu.returncode != 0
    assert "server sent version -1, expecting 0" in output, output
    refused = [r for r in supervisor.audit_records() if r["action"] == "refused" and r["actor"]["pid"] == qemu.pid]
    assert refused and reason in refused[-1]["detail"]["reason"], refused
    assert reason in supervisor.log()


# --- class 3: fair shares of peer slots and ids ---------------------------------------------------------------


@pytest.mark.parametrize("base", ["strict", "standard"])
def test_a_member_gets_its_share_of_peer_slots_and_root_still_joins(started, base):
    supervisor = started(base, server={"max_peers": 8}, shares={"peers_per_uid": 3, "peers_reserved": 2})
    hog = Hostile(supervisor, "hog")
    try:
        assert hog.value == 3
        with IvshmemClient(supervisor.socket, vectors=2, timeout=10) as root_peer:
            assert root_peer.own_id is not None
    finally:
        hog.close()
    again = Hostile(supervisor, "hog")  # its share came back when its peers left
    try:
        assert again.value == 3
    finally:
        again.close()
    assert "holds 3 of its share of 3 peer slots" in supervisor.log()


def test_members_cannot_take_the_slots_kept_for_root(started):
    supervisor = started("strict", server={"max_peers": 4}, shares={"peers_per_uid": 4, "peers_reserved": 2})
    hog = Hostile(supervisor, "hog")
    try:
        assert hog.value == 2  # the other two are root's
        with IvshmemClient(supervisor.socket, vectors=2) as first, IvshmemClient(supervisor.socket, vectors=2):
            assert first.own_id is not None
    finally:
        hog.close()


def test_a_member_that_churns_ids_exhausts_only_its_own_share(started):
    supervisor = started("strict", shares={"ids_per_uid": 20})
    watcher = IvshmemClient(supervisor.socket, vectors=2).connect()  # remembers every leave it hears
    try:
        churn = Hostile(supervisor, "churn")
        churn.close()
        assert churn.value == 20
        with IvshmemClient(supervisor.socket, vectors=2, timeout=10):
            pass  # root's ids are untouched
        assert "uid" in supervisor.log() and "peer ids" in supervisor.log()
    finally:
        watcher.close()
    again = Hostile(supervisor, "hog")  # nobody remembers those leaves any more: its ids are free again
    again.close()
    assert again.value == 16  # as many as its peer slots allow (shares.peers_per_uid), ids no longer the bound


# --- class 4: a join is whole or invisible, whatever fails -----------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "audit"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "shmguard-test-audit", str(mount)],
                   check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(path: Path) -> None:
    """Write until the filesystem is full (unbuffered: nothing is left to fail at close)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def first_word(sock_path: str) -> tuple[socket.socket, int | None]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(sock_path)
    data = b""
    while len(data) < 8:
        chunk = sock.recv(8 - len(data))
        if not chunk:
            return sock, None
        data += chunk
    return sock, MESSAGE.unpack(data)[0]


def test_with_the_audit_log_full_a_join_is_refused_whole_and_the_connected_peers_are_served(started, small_disk):
    supervisor = started("strict", audit={"path": str(small_disk / "audit.log"), "durable": True})
    policy = str(supervisor.policy_path)
    watcher = RawPeer(supervisor.socket)
    watcher.read(3 + 2 + 2)  # version, id, region, the host's two vectors, its own two
    fill(small_disk / "filler")
    admitted, refusals = [], 0
    for _ in range(100):  # the log's last page takes records, then parts of records, until it is full too
        sock, word = first_word(supervisor.socket)
        if word == REFUSED_VERSION:
            assert sock.recv(8) == b"", "a refused peer receives nothing after the refusal"
            sock.close()
            refusals += 1
            if refusals == 3:
                break
            continue
        assert word == 0
        admitted.append(sock)
    else:
        raise AssertionError("joins were not refused with the audit log full")
    for sock in admitted:
        sock.close()
    # each admitted newcomer: its two vectors announced, then its leave
    announced = {value for value, kind in watcher.read(3 * len(admitted)) if kind == "eventfd"} if admitted else set()
    assert len(announced) == len(admitted), "only peers that were greeted are announced"
    assert watcher.quiet(), "the refused peer was announced"
    unhealthy = supervisor.cli("status", "--json", "--policy", policy, check=False)
    assert '"writable": false' in unhealthy.stdout and "cannot append to audit log" in unhealthy.stdout
    write = supervisor.cli("write", "-m", "x", "--policy", policy, check=False)
    assert write.returncode != 0 and "audit log" in write.stderr
    assert supervisor.log().count("refusing joins, writes and rings") == 1
    os.unlink(small_disk / "filler")
    with IvshmemClient(supervisor.socket, vectors=2, timeout=10):
        pass  # the log has room again: joins are back
    records = []
    for line in Path(supervisor.audit).read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # the fragment a full disk tore, sealed off by a torn-tail record
    gaps = [r for r in records if r["action"] == "audit-gap"]
    assert gaps, [r["action"] for r in records]
    gap = gaps[-1]
    assert gap["detail"]["missed"].get("peer-join", 0) >= 1
    assert '"writable": true' in status(supervisor)
    supervisor.cli("audit", "verify", "--policy", policy)
    watcher.close()


# --- also: a repair never runs inside the accept loop ------------------------------------------------------------


def test_connections_waiting_while_the_socket_is_repaired_are_all_served(started):
    supervisor = started("standard")
    os.kill(supervisor.proc.pid, signal.SIGSTOP)
    try:
        waiting = [RawPeer(supervisor.socket) for _ in range(5)]  # in the listener's backlog
        os.unlink(supervisor.socket)  # the guard rebinds it, with these still waiting on the old one
    finally:
        os.kill(supervisor.proc.pid, signal.SIGCONT)
    for peer in waiting:
        assert peer.read(3)[0] == (0, None), "a waiting connection was dropped"
        peer.close()
    wait_until(lambda: os.path.exists(supervisor.socket), "the socket to be back")
    with IvshmemClient(supervisor.socket, vectors=2, timeout=10):
        pass
    assert "internal error" not in supervisor.log()


def test_no_write_may_hold_the_in_flight_slot_longer_than_the_policy_says(started):
    supervisor = started("strict", shares={"wait_seconds": 5})
    before = supervisor.audit_records()
    result = supervisor.cli("write", "-m", "x", "--timeout", "6", "--policy", str(supervisor.policy_path), check=False)
    assert result.returncode != 0
    assert "at most 5 (policy shares.wait_seconds)" in result.stderr and len(result.stderr.splitlines()) == 1
    assert supervisor.audit_records() == before, "a refused write is not recorded"


# --- class 8: the file backend's boundary, as SECURITY.md states it ----------------------------------------------


def _truncate_by_path(path: str) -> str:
    try:
        os.truncate(path, 3 * 4096)  # a page multiple that is not a power of two: what makes QEMU abort
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "done"


def _truncate_through_the_socket(socket_path: str) -> str:
    try:
        client = IvshmemClient(socket_path, timeout=5).connect()
    except (ProtocolError, OSError) as exc:
        return f"no fd: {exc}"
    try:
        os.ftruncate(client.shm_fd, 3 * 4096)
    except OSError as exc:
        return errno.errorcode[exc.errno]
    finally:
        client.close()
    return "done"


def test_who_can_still_resize_the_file_region_under_standard_and_nobody_can_under_strict(started):
    """Between a repair and a joining QEMU's fstat, whoever may write the file can shrink it: members by the path
    (mode 0660) and every admitted peer through the fd it was sent; outsiders cannot. Only the sealed memfd
    closes it, for root too."""
    standard = started("standard")
    region = standard.region_path
    assert as_user(OUTSIDER_USER, _truncate_by_path, region) == "EACCES"
    assert as_user(OUTSIDER_USER, _truncate_through_the_socket, standard.socket).startswith("no fd")
    for attack in (lambda: as_user(MEMBER_USER, _truncate_by_path, region),
                   lambda: as_user(MEMBER_USER, _truncate_through_the_socket, standard.socket)):
        assert attack() == "done"  # the boundary: a member can
        wait_until(lambda: os.stat(region).st_size == REGION_SIZE, "the repair")
    strict = started("strict", audit={"path": str(Path(standard.audit).with_name("strict-audit.log"))})
    for who in (MEMBER_USER, "root"):
        assert as_user(who, _truncate_through_the_socket, strict.socket) == "EPERM"  # sealed, root included


def _say_ready_in_a_loop(socket_path: str, rings: int) -> int:
    """As a member peer: write "ready <own id>" in the reply area and ring the host's vector 0 again and again."""
    with IvshmemClient(socket_path, timeout=10) as client:
        reply = f"ready {client.own_id}".encode()
        os.pwrite(client.shm_fd, reply + bytes(256 - len(reply)), client.shm_size - 256)
        host = min(client.peers)
        for _ in range(rings):
            client.notify(host, 0)
            time.sleep(0.002)  # rings coalesce: give the supervisor a wake-up for each
        return client.own_id


def test_a_peer_that_says_ready_again_and_again_adds_one_record_not_one_per_ring(started):
    supervisor = started("strict")
    before = len(supervisor.audit_records())
    peer_id = as_user(MEMBER_USER, _say_ready_in_a_loop, supervisor.socket, 300)
    ready = [r for r in supervisor.audit_records()[before:] if r["action"] == "guest-ready"]
    assert [r["detail"]["peer"] for r in ready] == [peer_id]  # once, however often it rang
    assert supervisor.log().count("guest ready:") == 1
