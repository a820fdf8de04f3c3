"""Audited writes through the control socket: bounded, serialised, recorded, refused whole."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import subprocess

import pytest

from helpers import OUTSIDER_USER, SHMGUARD, RunningSupervisor, as_user, policy_file
from shmguard.audit import verify
from shmguard.client import IvshmemClient
from shmguard.control import ControlClient
from shmguard.errors import ControlError

SIZE = 4096


def region_bytes(supervisor: RunningSupervisor) -> bytes:
    """Read the region the way a peer sees it: through the fd the server handed to one long-lived peer
    (joining afresh for every read would add join and leave records to the log under test)."""
    if not hasattr(supervisor, "reader"):
        supervisor.reader = IvshmemClient(supervisor.socket, vectors=2).connect()
    return os.pread(supervisor.reader.shm_fd, supervisor.reader.shm_size, 0)


@pytest.fixture
def supervisor(tmp_path):
    running = RunningSupervisor(policy_file(tmp_path, region={"size": SIZE}))
    yield running
    running.stop()


def test_text_message_is_padded_with_nul_and_recorded(supervisor):
    result = supervisor.cli("write", "-m", "hello world", "--policy", str(supervisor.policy_path), "--json")
    assert '"seq": 2' in result.stdout
    region = region_bytes(supervisor)
    assert region == b"hello world" + bytes(SIZE - 11)
    record = [r for r in supervisor.audit_records() if r["action"] == "write"][-1]
    assert record["action"] == "write" and record["length"] == 11 and record["offset"] == 0
    assert record["sha256"] == hashlib.sha256(b"hello world").hexdigest()
    assert record["actor"]["uid"] == 0


@pytest.mark.parametrize("args, why", [
    (["-m", "x" * SIZE], "no room for its NUL"),
    (["-m", "x" * (SIZE + 1)], "does not fit"),
    (["-m", "abc", "--offset", str(2 ** 63)], "outside"),
    (["-m", "abc", "--offset", "-1"], "outside"),
    (["--stdin", "--offset", "1"], "do not fit"),
])
def test_refused_writes_leave_region_and_log_untouched(supervisor, args, why):
    supervisor.cli("write", "-m", "before", "--policy", str(supervisor.policy_path))
    region = region_bytes(supervisor)
    log = open(supervisor.audit, "rb").read()
    result = supervisor.cli("write", *args, "--policy", str(supervisor.policy_path), input=b"y" * SIZE, check=False)
    assert result.returncode != 0
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and why in lines[0] and "Traceback" not in lines[0]
    assert open(supervisor.audit, "rb").read() == log
    assert region_bytes(supervisor) == region


def test_empty_non_utf8_and_full_size_messages(supervisor):
    policy = str(supervisor.policy_path)
    supervisor.cli("write", "-m", "", "--policy", policy)
    assert region_bytes(supervisor) == bytes(SIZE)  # an empty message clears the region

    subprocess.run([*SHMGUARD, "write", "-m", b"caf\xe9 \xff", "--policy", policy], check=True, capture_output=True)
    assert region_bytes(supervisor).startswith(b"caf\xe9 \xff\0")  # the argument's bytes, exactly

    supervisor.cli("write", "-m", "z" * SIZE, "--allow-unterminated", "--policy", policy)
    assert region_bytes(supervisor) == b"z" * SIZE
    supervisor.cli("write", "--stdin", "--policy", policy, input=bytes(range(256)) * 16)
    assert region_bytes(supervisor) == bytes(range(256)) * 16


def _storm(control_path: str, writer: int, count: int, results) -> None:
    for n in range(count):
        data = f"writer {writer} message {n} ".encode() * (1 + n % 7)
        reply = ControlClient(control_path).write(data, text=True)
        results.put((reply["seq"], hashlib.sha256(data).hexdigest()))


def test_concurrent_writers_never_interleave(supervisor):
    results = multiprocessing.Queue()
    writers = [multiprocessing.Process(target=_storm, args=(supervisor.control, w, 1000, results)) for w in range(8)]
    for process in writers:
        process.start()
    replies = dict(results.get(timeout=120) for _ in range(8000))
    for process in writers:
        process.join()
        assert process.exitcode == 0
    records = {r["seq"]: r for r in supervisor.audit_records() if r["action"] == "write"}
    assert {seq: r["sha256"] for seq, r in records.items()} == replies  # every write applied and recorded once
    last = records[max(records)]
    region = region_bytes(supervisor)
    assert hashlib.sha256(region[:last["length"]]).hexdigest() == last["sha256"]
    assert region[last["length"]:] == bytes(SIZE - last["length"])
    assert verify(supervisor.audit).ok


def test_kill_9_during_a_write_storm_then_restart(tmp_path):
    policy = policy_file(tmp_path, region={"size": SIZE}, audit={"durable": True})
    supervisor = RunningSupervisor(policy)
    results = multiprocessing.Queue()
    storm = multiprocessing.Process(target=_storm, args=(supervisor.control, 0, 100000, results))
    storm.start()
    acknowledged = [results.get(timeout=60) for _ in range(300)]
    supervisor.proc.send_signal(signal.SIGKILL)
    supervisor.proc.wait()
    storm.join(30)
    while not results.empty():
        acknowledged.append(results.get())
    supervisor.notify.close()

    restarted = RunningSupervisor(policy)
    try:
        result = verify(restarted.audit)
        assert result.ok, result.reason
        recorded = {r["seq"]: r.get("sha256") for r in restarted.audit_records() if r["action"] == "write"}
        for seq, sha in acknowledged:
            assert recorded[seq] == sha  # every write a client saw succeed is in the log
        actions = [r["action"] for r in restarted.audit_records()]
        assert actions[-1] == "start"  # the chain continues after the crash
    finally:
        restarted.stop()


def test_write_from_a_uid_the_policy_does_not_allow_is_refused_and_recorded(tmp_path):
    # The socket admits everyone so that the policy's writers list, not the file mode, does the refusing.
    policy = policy_file(tmp_path, region={"size": SIZE}, control={"mode": "0666", "writers": ["root"]})
    supervisor = RunningSupervisor(policy)
    try:
        before = region_bytes(supervisor)
        with pytest.raises(ControlError, match="may not write"):
            as_user(OUTSIDER_USER, _write_as_cli, supervisor.control)
        assert region_bytes(supervisor) == before
        refused = [r for r in supervisor.audit_records() if r["action"] == "refused"][-1]
        assert refused["action"] == "refused" and refused["result"] == "refused"
        assert refused["actor"]["uid"] == 65534 and refused["detail"]["op"] == "write"
        assert not [r for r in supervisor.audit_records() if r["action"] == "write"]
    finally:
        supervisor.stop()


def _write_as_cli(control_path: str) -> None:
    ControlClient(control_path).write(b"evil")


def test_outsider_cannot_even_reach_the_control_socket(supervisor):
    with pytest.raises(ControlError, match="permission denied"):
        as_user(OUTSIDER_USER, _write_as_cli, supervisor.control)


def test_malformed_requests_get_an_error_and_the_connection_survives(supervisor):
    """Raw lines on purpose: no ControlClient can send these."""
    import json
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(supervisor.control)
    stream = sock.makefile("rwb")
    for line in (b"not json", b"[1,2]", b'{"op": "explode"}', b'{"op": "write", "data": "***"}',
                 b'{"op": "write", "data": "", "offset": "zero"}', b'{"op": "status"}'):
        stream.write(line + b"\n")
        stream.flush()
        reply = json.loads(stream.readline())
        assert reply["ok"] == (line == b'{"op": "status"}'), (line, reply)
    sock.close()
