"""`shmguard write --lines` against a real supervisor: every line one audited write over one connection, each
written once, in order; a line the client can check stops the run before it is sent; a line the supervisor refuses
is named, and the summary and exit status say exactly which lines were written."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time

import pytest

from helpers import SHMGUARD, RunningSupervisor, policy_file
from shmguard.client import IvshmemClient
from shmguard.control import ControlClient
from shmguard.control_client import Pipeline, write_body

SIZE = 4096


@pytest.fixture
def supervisor(tmp_path):
    running = RunningSupervisor(policy_file(tmp_path, region={"size": SIZE}))
    yield running
    running.stop()


def write_lines(supervisor: RunningSupervisor, data: bytes, *args: str) -> subprocess.CompletedProcess:
    return supervisor.cli("write", "--lines", "--policy", str(supervisor.policy_path), "--json", *args, input=data,
                          check=False)


def written_shas(supervisor: RunningSupervisor) -> list[str]:
    return [r["sha256"] for r in supervisor.audit_records() if r["action"] == "write"]


def sha(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def region(supervisor: RunningSupervisor) -> bytes:
    reader = IvshmemClient(supervisor.socket, vectors=2).connect()
    try:
        return os.pread(reader.shm_fd, SIZE, 0)
    finally:
        reader.close()


def test_every_line_is_one_write_in_order_over_one_connection(supervisor):
    lines = [f"message {n} ".encode() * (1 + n % 5) for n in range(500)] + [b""] + [b"last, no newline"]
    result = write_lines(supervisor, b"\n".join(lines))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["lines_read"] == summary["written"] == len(lines) and summary["failed"] == []
    assert summary["written_lines"] == f"1-{len(lines)}"
    assert written_shas(supervisor) == [sha(line) for line in lines]  # each once, in the order of the lines
    assert summary["last_seq"] - summary["first_seq"] == len(lines) - 1
    assert region(supervisor) == b"last, no newline" + bytes(SIZE - 16)
    log = supervisor.log()
    assert log.count("control socket: closed") == 0


def test_the_supervisor_echoes_ids_so_the_window_opens(supervisor):
    with ControlClient(supervisor.control).connect(30) as connection:
        pipeline = Pipeline(connection, 64)
        for n in range(200):
            pipeline.send(n, write_body(f"m{n}".encode(), text=True))
        pipeline.finish()
        replies = pipeline.take()
    assert pipeline.echoes is True
    assert [key for key, _ in replies] == list(range(200)) and all(reply["ok"] for _, reply in replies)
    assert [reply["id"] for _, reply in replies] == list(range(1, 201))


@pytest.mark.parametrize("bad, why", [
    (b"has a \0 inside", "line 3: a NUL at byte 6"),
    (b"x" * SIZE, f"line 3: {SIZE} bytes, and the policy's {SIZE}-byte region holds at most {SIZE - 1}"),
])
def test_a_line_the_client_can_check_stops_the_run_before_it_is_sent(supervisor, bad, why):
    before = open(supervisor.audit, "rb").read()
    result = write_lines(supervisor, b"one\ntwo\n" + bad + b"\nfour\n")
    assert result.returncode == 1
    errors = result.stderr.decode().strip().splitlines()
    assert len(errors) == 1 and why in errors[0] and "(written: 1-2)" in errors[0], errors
    summary = json.loads(result.stdout)
    assert summary["written_lines"] == "1-2" and summary["not_sent_from"] == 3 and summary["lines_read"] == 3
    assert open(supervisor.audit, "rb").read().startswith(before)
    assert written_shas(supervisor) == [sha(b"one"), sha(b"two")]


def test_allow_unterminated_lets_a_line_fill_the_region(supervisor):
    result = write_lines(supervisor, b"z" * SIZE + b"\n", "--allow-unterminated")
    assert result.returncode == 0, result.stderr
    assert region(supervisor) == b"z" * SIZE


def test_a_line_the_supervisor_refuses_is_named_and_the_written_lines_are_exact(tmp_path):
    # The policy says 8 KiB, the supervisor runs with 4 KiB: the client lets a 5000-byte line through, the
    # supervisor refuses it, and the lines already sent behind it may or may not have been written.
    supervisor = RunningSupervisor(policy_file(tmp_path, region={"size": 2 * SIZE}), "--size", str(SIZE))
    try:
        lines = [b"one", b"two", b"y" * 5000] + [f"after {n}".encode() for n in range(100)]
        result = write_lines(supervisor, b"\n".join(lines) + b"\n")
        assert result.returncode == 1
        errors = result.stderr.decode().strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("shmguard: error: line 3: a 5000-byte message does not fit")
        summary = json.loads(result.stdout)
        assert [f["line"] for f in summary["failed"]] == [3] and not summary["failed"][0]["written"]
        assert summary["unknown_lines"] == "" and summary["not_sent_from"] is None
        written = [n for n in range(1, len(lines) + 1) if n != 3][:summary["written"]]
        assert written_shas(supervisor) == [sha(lines[n - 1]) for n in written]  # exactly those, each once
        tail = "" if len(written) == 2 else ",4" if written[-1] == 4 else f",4-{written[-1]}"
        expected_ranges = "1-2" + tail
        assert summary["written_lines"] == expected_ranges
    finally:
        supervisor.stop()


def test_ring_applies_to_each_line(supervisor):
    peer = IvshmemClient(supervisor.socket, vectors=2).connect()
    try:
        result = supervisor.cli("write", "--lines", "--ring", f"{peer.own_id}:1", "--policy",
                                str(supervisor.policy_path), input="a\nb\nc\n")
        assert result.stdout.splitlines()[0].startswith("wrote 3 of 3 lines at offset 0 (audit seq ")
        assert "3 rings" in result.stdout
        writes = [r for r in supervisor.audit_records() if r["action"] == "write"]
        assert [r["rings"] for r in writes] == [[{"held_until_ready": False, "peer": peer.own_id, "vector": 1}]] * 3
        assert not [r for r in supervisor.audit_records() if r["action"] == "ring"], "one record per write"
    finally:
        peer.close()


def test_a_connection_closed_while_idle_is_opened_again(tmp_path):
    supervisor = RunningSupervisor(policy_file(tmp_path, region={"size": SIZE}, control={"idle_seconds": 1}))
    try:
        process = subprocess.Popen([*SHMGUARD, "write", "--lines", "--policy", str(supervisor.policy_path)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        process.stdin.write(b"before the pause\n")
        process.stdin.flush()
        supervisor.wait_for_log("idle for 1 s")
        time.sleep(0.2)
        out, err = process.communicate(b"after the pause\n", timeout=60)
        assert process.returncode == 0, err
        assert out.decode().startswith("wrote 2 of 2 lines")
        assert written_shas(supervisor) == [sha(b"before the pause"), sha(b"after the pause")]
    finally:
        supervisor.stop()


def test_no_lines_is_no_write(supervisor):
    result = supervisor.cli("write", "--lines", "--policy", str(supervisor.policy_path), input="")
    assert result.stdout == "wrote 0 of 0 lines at offset 0\n"
    assert written_shas(supervisor) == []


# --- the pipeline against a stand-in server on a real socket: replies out of order, no ids, a connection error --


class StandIn:
    """A control server on a real UNIX socket that answers as told: `answer(requests)` returns the reply objects
    for the requests read so far (or None to read more); after `close_after` replies it hangs up."""

    def __init__(self, tmp_path, answer, close_after: int | None = None):
        import socket
        import threading

        self.path = str(tmp_path / "standin.sock")
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen()
        self.answer, self.close_after, self.most_unanswered = answer, close_after, 0
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        import socket

        sock, _ = self.listener.accept()
        stream, waiting, sent = b"", [], 0
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            stream += chunk
            *lines, stream = stream.split(b"\n")
            waiting += [json.loads(line) for line in lines]
            time.sleep(0.01)  # anything sent ahead arrives meanwhile
            try:
                more = sock.recv(65536, socket.MSG_DONTWAIT | socket.MSG_PEEK)
            except BlockingIOError:
                more = b""
            self.most_unanswered = max(self.most_unanswered, len(waiting) + more.count(b"\n"))
            replies = self.answer(waiting)
            if replies is None:
                continue
            waiting = []
            for reply in replies:
                if self.close_after is not None and sent == self.close_after:
                    sock.sendall(json.dumps({"ok": False, "error": "connection closed: told to"}).encode() + b"\n")
                    sock.close()
                    return
                sock.sendall(json.dumps(reply).encode() + b"\n")
                sent += 1
        sock.close()


def reply_to(request: dict, echo: bool = True) -> dict:
    return {"ok": True, "seq": int(request["data"] != ""), "data": request["data"],
            **({"id": request["id"]} if echo else {})}


def run_pipeline(path: str, count: int, window: int = 8):
    with ControlClient(path, answerers={os.getuid()}).connect(10) as connection:
        pipeline = Pipeline(connection, window)
        try:
            for n in range(count):
                pipeline.send(n, write_body(f"m{n}".encode(), text=True))
            pipeline.finish()
        finally:
            replies = pipeline.take()
    return pipeline, replies


def test_replies_in_any_order_are_matched_by_id(tmp_path):
    def reversed_in_fours(waiting):
        first, last = waiting[0]["id"] == 1, waiting[-1]["id"] == 30  # the first is sent alone, the last may be
        if len(waiting) < 4 and not (first or last):
            return None  # hold the replies until four are owed
        return [reply_to(request) for request in reversed(waiting)]

    server = StandIn(tmp_path, reversed_in_fours)
    pipeline, replies = run_pipeline(server.path, 30)
    assert pipeline.echoes and server.most_unanswered > 1
    assert sorted(key for key, _ in replies) == list(range(30))
    assert all(reply["data"] == write_body(f"m{key}".encode())["data"] for key, reply in replies)
    assert [key for key, _ in replies] != list(range(30))  # they did come out of order


def test_a_supervisor_that_echoes_no_id_gets_one_request_at_a_time(tmp_path):
    server = StandIn(tmp_path, lambda waiting: [reply_to(request, echo=False) for request in waiting])
    pipeline, replies = run_pipeline(server.path, 20)
    assert pipeline.echoes is False and server.most_unanswered == 1
    assert [key for key, _ in replies] == list(range(20))
    assert all(reply["data"] == write_body(f"m{key}".encode())["data"] for key, reply in replies)


def test_a_reply_about_the_connection_names_the_requests_left_unknown(tmp_path):
    from shmguard.errors import ControlError

    server = StandIn(tmp_path, lambda waiting: [reply_to(request) for request in waiting], close_after=5)
    with ControlClient(server.path, answerers={os.getuid()}).connect(10) as connection:
        pipeline = Pipeline(connection, 4)
        with pytest.raises(ControlError, match="connection closed: told to"):
            for n in range(50):
                pipeline.send(n, write_body(f"m{n}".encode(), text=True))
            pipeline.finish()
        answered = [key for key, _ in pipeline.take()]
    assert answered == [0, 1, 2, 3, 4]
    assert list(pipeline.unanswered.values()) == list(range(5, 5 + len(pipeline.unanswered)))
