"""Inputs that once crashed or stalled the supervisor: each must get an answer and leave it serving."""

from __future__ import annotations

import json
import mmap
import os
import socket
import struct
import time

import pytest

from helpers import RunningSupervisor, policy_file
from shmguard import layout
from shmguard.client import IvshmemClient
from shmguard.control import RingRequest, StatusRequest, WriteRequest, encode


def request_line(supervisor, line: bytes) -> dict:
    """A raw line on purpose: hostile bytes that no ControlClient request encodes to."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(supervisor.control)
    sock.sendall(line + b"\n")
    reply = sock.makefile("rb").readline()
    sock.close()
    return json.loads(reply)


def still_serving(supervisor) -> None:
    assert supervisor.proc.poll() is None, supervisor.log()
    assert supervisor.client(timeout=10).status()["ok"]
    with IvshmemClient(supervisor.socket, vectors=2, timeout=10):
        pass
    assert "Traceback" not in supervisor.log()


@pytest.fixture
def supervisor(tmp_path):
    running = RunningSupervisor(policy_file(tmp_path, region={"size": 4096}))
    yield running
    assert running.stop() == 0, running.log()


@pytest.mark.parametrize("line, why", [
    (b"[" * 5000, "nested too deeply"),
    (b'{"op": "ring", "target": "\xc2\xb2"}', "is not 'guest', 'all', PEER or PEER:VECTOR"),
    (b'{"op": "ring", "target": "1:\xc2\xb2"}', "is not 'guest', 'all', PEER or PEER:VECTOR"),
    (b'{"op": "ring", "target": "' + b"9" * 5000 + b'"}', "is not 'guest', 'all', PEER or PEER:VECTOR"),
    (b'{"op": "write", "data": "aGk=", "timeout": "x"}', "timeout"),
    (b'{"op": "write", "data": "aGk=", "timeout": NaN}', "timeout"),
    (b'{"op": "write", "data": "aGk=", "timeout": Infinity}', "timeout"),
    (b'{"op": "write", "data": "aGk=", "timeout": -1}', "timeout"),
    (b'{"op": "write", "data": "aGk=", "offset": 1e400}', "offset"),
    (b'{"op": "write", "data": "aGk\xc3\xa9"}', "not valid base64"),  # not ASCII: was left unanswered
    (b'{"op": "send", "from": 0, "to": 1, "data": "\xe2\x80\xa8"}', "not valid base64"),
])
def test_hostile_control_requests_get_an_error_reply(supervisor, line, why):
    before = open(supervisor.audit, "rb").read()
    reply = request_line(supervisor, line)
    assert reply["ok"] is False and why in reply["error"], reply
    assert open(supervisor.audit, "rb").read() == before  # refused whole: nothing written, nothing recorded
    still_serving(supervisor)


def test_a_client_that_never_reads_its_replies_cannot_grow_the_supervisor(supervisor):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(supervisor.control)
    sock.setblocking(False)
    request = encode(StatusRequest()) * 1000
    sent = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # pipeline requests until the supervisor stops reading them
        try:
            sent += sock.send(request)
        except BlockingIOError:
            time.sleep(0.05)
    rss_kib = int(next(line.split()[1] for line in open(f"/proc/{supervisor.proc.pid}/status")
                       if line.startswith("VmRSS:")))
    assert sent < 200 * len(request)  # it stopped reading: the kernel's buffers filled up
    assert rss_kib < 200 * 1024, rss_kib
    sock.close()
    still_serving(supervisor)


def test_a_peer_that_fills_an_eventfd_counter_cannot_break_ringing(supervisor):
    with IvshmemClient(supervisor.socket, vectors=2) as victim, IvshmemClient(supervisor.socket, vectors=2) as evil:
        evil.update()
        os.write(evil.peers[victim.own_id][0], struct.pack("Q", 0xFFFFFFFFFFFFFFFE))  # the counter is full
        reply = supervisor.client().ask(RingRequest(f"{victim.own_id}:0"))
        assert reply["ok"], reply
        assert victim.wait([0], timeout=5) == 0
    still_serving(supervisor)


def test_a_guest_that_lies_in_its_replies_cannot_crash_the_handshake(tmp_path):
    # The built-in guest's CPU never starts (-S): the handshake is on, the ring is held, the write waits.
    supervisor = RunningSupervisor(policy_file(tmp_path, region={"size": 4096}), "--qemu-arg=-S", guest=True)
    try:
        supervisor.wait_for_log(r"peer \d+ joined: .*qemu")
        waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        waiting.connect(supervisor.control)
        waiting.sendall(encode(WriteRequest(b"hello", text=True, ring="guest", wait=True, timeout=30)))
        with IvshmemClient(supervisor.socket, vectors=2) as liar:
            host = min(liar.peers)
            region = mmap.mmap(liar.shm_fd, 4096)
            start = layout.reply_offset(4096)
            for lie in (b"ack 1 2 zz", b"ack 1\nshmguard: forged", b"ready None", b"ready 99999",
                        b"ready -1", b"\xff" * 255, b"ack 99999999999999999999999 1 00000000"):
                region[start:start + layout.REPLY_SIZE] = lie + bytes(layout.REPLY_SIZE - len(lie))
                liar.notify(host, 0)
                liar.notify(host, 1)
                time.sleep(0.05)
            region.close()
        status = supervisor.client().status()
        assert status["guest"]["ready"] is False  # no lie made the parked guest ready
        assert supervisor.proc.poll() is None and "Traceback" not in supervisor.log()
        waiting.close()
    finally:
        assert supervisor.stop() == 0, supervisor.log()


def test_a_truncated_file_region_is_never_handed_to_a_joining_peer(tmp_path):
    supervisor = RunningSupervisor(policy_file(tmp_path, base="standard", region={"size": 1 << 20}))
    try:
        for size in (0, 3000, 12288, 1 << 21) * 10:  # shrunk, odd, grown: QEMU would abort on any of them
            os.truncate(supervisor.region_path, size)
            with IvshmemClient(supervisor.socket, vectors=2, timeout=10) as peer:
                assert os.fstat(peer.shm_fd).st_size == 1 << 20
        still_serving(supervisor)
    finally:
        assert supervisor.stop() == 0, supervisor.log()


def _two_requests_on_one_connection(path: str) -> list[bytes]:
    """Raw on purpose: two pipelined lines on one connection, which ControlClient never sends."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    sock.sendall(encode(WriteRequest(b"hi")) * 2)
    stream = sock.makefile("rb")
    return [stream.readline(), stream.readline()]


def test_a_refused_client_is_disconnected_after_one_record(tmp_path):
    from helpers import OUTSIDER_USER, as_user

    policy = policy_file(tmp_path, region={"size": 4096}, control={"mode": "0666", "writers": ["root"]})
    supervisor = RunningSupervisor(policy)
    try:
        first, second = as_user(OUTSIDER_USER, _two_requests_on_one_connection, supervisor.control)
        assert json.loads(first)["ok"] is False and second == b""  # refused, then the connection is closed
        refused = [r for r in supervisor.audit_records() if r["action"] == "refused"]
        assert len(refused) == 1
        still_serving(supervisor)
    finally:
        assert supervisor.stop() == 0, supervisor.log()


def test_clients_that_leave_before_their_reply_do_not_use_up_the_connection_slots(supervisor):
    for _ in range(200):  # more than the 64 connections the control socket keeps at once (raw: gone unread)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(supervisor.control)
        try:
            sock.sendall(encode(StatusRequest()))
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused while the burst drains ("too many connections", below) and closed before this send
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # gone before the reply: the supervisor's send fails
    deadline = time.monotonic() + 10  # while the burst drains, "too many connections" is a fair answer
    while not supervisor.client().ask(StatusRequest())["ok"]:
        assert time.monotonic() < deadline, "the connection slots were never given back"
        time.sleep(0.1)
    still_serving(supervisor)


def test_an_idle_control_connection_is_closed(tmp_path):
    supervisor = RunningSupervisor(policy_file(tmp_path, region={"size": 4096}, control={"idle_seconds": 1}))
    try:
        idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        idle.connect(supervisor.control)
        idle.settimeout(10)
        assert idle.recv(1) == b""  # closed by the supervisor, having sent nothing
        idle.close()
        still_serving(supervisor)
    finally:
        assert supervisor.stop() == 0, supervisor.log()
