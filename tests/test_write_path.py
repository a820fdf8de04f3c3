"""The order of a durable write's work (host.py, recorder.py, control_server.py): its fsync starts right after the
ring when its reply waits for the guest too, never as an fsync in line; a reply its requester waits for alone leaves at
once, ahead of the rest of the turn; a connection's next deadline is the one its check would find. Real files,
real AIO, a real event loop and real sockets."""

from __future__ import annotations

import os
import socket
from collections import deque

import pytest
from test_background_commit import attached_recorder, turn_until

from shmguard.audit import AuditLog
from shmguard.control_server import Connection, ControlServer
from shmguard.linux.sockets import PeerCred
from shmguard.loop import EventLoop
from shmguard.policy import ControlPolicy, SharesPolicy
from shmguard.recorder import Recorder


def test_start_commit_starts_the_background_fsync_of_what_is_recorded_now_and_the_turn_adds_none(tmp_path):
    told = []
    with attached_recorder(tmp_path / "audit.log") as (loop, log, recorder):
        recorder.start_commit()
        assert recorder._fsync.in_flight == 0, "nothing recorded: nothing to start"
        seq = recorder.stage("write")["seq"]
        recorder.when_durable(seq, lambda: told.append("done"), told.append)
        recorder.start_commit()
        assert recorder._fsync.in_flight == 1 and told == [], "started, and nobody told before it completes"
        recorder.start_commit()
        assert recorder.commit() is False and recorder._fsync.in_flight == 1, "the turn's commit has nothing new"
        turn_until(loop, lambda: told == ["done"])
        assert log.synced_seq == seq


def test_start_commit_never_fsyncs_in_line_and_never_takes_the_last_slot_twice(tmp_path):
    log = AuditLog.open(tmp_path / "audit.log", durable=True)
    recorder = Recorder(log)  # not attached: the turn's commit would fsync in line
    try:
        recorder.stage("write")
        recorder.start_commit()
        assert log.unsynced, "no fsync in line from the write path: the turn's commit does it"
        assert recorder.flush() is False and not log.unsynced
    finally:
        recorder.close()
        log.close()
    with attached_recorder(tmp_path / "other.log") as (_loop, log, recorder):
        slots = 0
        while not recorder._fsync.full:
            recorder.stage("write")
            recorder.start_commit()
            slots += 1
            assert recorder._fsync.in_flight == slots
        recorder.stage("write")
        recorder.start_commit()  # every slot taken: a completion starts it, as for the turn's commit
        assert recorder._fsync.in_flight == slots and log.unsynced


@pytest.fixture
def connection():
    loop = EventLoop()
    server = ControlServer(ControlPolicy(), os.getuid(), os.getgid(), loop, 1 << 20, SharesPolicy())
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    theirs.settimeout(0)
    held: list = []
    server.when_durable = lambda seq, done, failed: held.append(done)
    changed: list[Connection] = []
    server.changed = changed.append  # what a flush leads to: more of the connection's requests dispatched
    conn = Connection(ours, PeerCred.of(ours), server)
    assert server.slots.take(conn.cred.uid) is None  # as _admit takes it: close() gives it back
    server.connections.add(conn)
    yield conn, theirs, held, changed, loop
    conn.close()
    theirs.close()
    loop.close()


def readable(sock: socket.socket) -> bytes:
    try:
        return sock.recv(1 << 16)
    except BlockingIOError:
        return b""


def test_a_reply_its_requester_waits_for_leaves_when_it_may_before_the_turn_ends(connection):
    conn, theirs, held, changed, loop = connection
    conn.pending = 2
    conn.send({"ok": True, "n": 1})  # an ordinary reply: with the others of the turn, at its end
    conn.send_once_recorded(7, {"ok": True, "seq": 7, "ack": "ack 1 2 00000000"}, promptly=True)
    assert readable(theirs) == b"", "held until its record is on disk"
    held.pop()()  # the record is on disk: it goes now, with the reply queued before it, in order
    assert readable(theirs) == b'{"n": 1, "ok": true}\n{"ack": "ack 1 2 00000000", "ok": true, "seq": 7}\n'
    assert changed == [], "nothing is dispatched from inside the caller"
    loop.run_once(timeout=0)  # the turn's flush still runs, and what follows a send with it
    assert changed == [conn] and not conn.outbox and not conn.replies


def test_replies_of_a_batch_still_leave_together_at_the_end_of_the_turn(connection):
    conn, theirs, held, changed, loop = connection
    conn.pending = 3
    for seq in (1, 2, 3):
        conn.send_once_recorded(seq, {"ok": True, "seq": seq})
    for done in held:
        done()
    assert readable(theirs) == b"", "not one send each"
    loop.run_once(timeout=0)
    assert readable(theirs).count(b"\n") == 3 and changed == [conn]


@pytest.mark.parametrize("state", [
    {},
    {"input_since": 100.0},
    {"replies": [(10, 50.0)]},
    {"input_since": 100.0, "replies": [(10, 50.0)]},
    {"input_since": 10.0, "replies": [(10, 50.0)]},
    {"pending": 1},
    {"pending": 1, "input_since": 3.0},
    {"inbox": b"half a line"},
    {"outbox": b"unread", "replies": [(6, 20.0)]},
    {"held": [object()]},
    {"last_active": 7.5},
])
def test_the_next_deadline_watched_is_the_one_the_check_finds(connection, state):
    conn = connection[0]
    conn.last_active = 1000.0
    for name, value in state.items():
        kinds = {"inbox": bytearray, "outbox": bytearray, "replies": deque, "held": deque}
        setattr(conn, name, kinds[name](value) if name in kinds else value)
    for request_seconds, idle_seconds in ((10.0, 60.0), (60.0, 10.0)):
        due = conn.deadline(request_seconds, idle_seconds)
        assert conn.next_due(request_seconds, idle_seconds) == (None if due is None else due[0])
