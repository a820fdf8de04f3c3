"""The audit log's fsync run by the kernel while the event loop goes on (linux/aio.py, Recorder.commit): a real
file, a real event loop, a real disk that fails its write-back. A record is told durable only once the fsync that
began after it completed; records written while one is in flight wait for the next; a failed fsync fails exactly
the records it could not vouch for."""

from __future__ import annotations

import contextlib
import errno
import os
import select

import pytest
from test_group_commit import disk_that_fills, fill

from shmguard.audit import AuditLog
from shmguard.linux.aio import IOCB_CMD_FDSYNC, AsyncFsync
from shmguard.loop import EventLoop
from shmguard.recorder import Recorder


def wait_readable(fd: int, timeout: float = 10.0) -> None:
    assert select.select([fd], [], [], timeout)[0], "the fsync never completed"


@pytest.mark.parametrize("datasync", [False, True], ids=["fsync", "fdatasync"])
def test_an_fsync_completes_on_its_eventfd_and_says_it_succeeded(tmp_path, datasync):
    fd = os.open(tmp_path / "file", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    fsync = AsyncFsync(fd, datasync=datasync)
    try:
        for round in range(3):  # the slots, used again and again
            os.write(fd, b"a record\n")
            for token in range(4):
                fsync.start(token + 10 * round)
            assert fsync.in_flight == 4 and fsync.full
            with pytest.raises(RuntimeError):
                fsync.start(99)  # no fifth
            done = []
            while len(done) < 4:
                wait_readable(fsync.fileno())
                done += fsync.completed()
            assert sorted(done) == [(token + 10 * round, 0) for token in range(4)] and not fsync.in_flight
        os.close(fd)  # the owner's close: the fsync's own duplicate still names the file
        assert held_open(tmp_path / "file")
    finally:
        fsync.close()
    assert not held_open(tmp_path / "file"), "close() lets go of the duplicate"


def held_open(path) -> bool:
    return any(os.path.realpath(f"/proc/self/fd/{n}") == str(path)
               for n in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{n}"))


def test_an_fd_the_kernel_cannot_fsync_is_refused_at_once_and_nothing_is_in_flight():
    read_end, write_end = os.pipe()
    fsync = AsyncFsync(read_end)
    try:
        with pytest.raises(OSError) as refused:
            fsync.start(1)
        assert refused.value.errno == errno.EINVAL and not fsync.in_flight
    finally:
        fsync.close()
        os.close(read_end)
        os.close(write_end)


@pytest.mark.parametrize("datasync", [False, True], ids=["fsync", "fdatasync"])
def test_a_failed_write_back_is_the_fsyncs_result(tmp_path, datasync):
    with disk_that_fills(tmp_path) as (mnt, filler):
        fd = os.open(mnt / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fsync = AsyncFsync(fd, datasync=datasync)
        try:
            os.write(fd, b"first\n")
            os.fsync(fd)
            fill(filler)
            results = []
            for number in range(60):  # the loop device reports it at this fsync or one after
                os.write(fd, b"record %d %s\n" % (number, b"x" * 4096))
                fsync.start(number)
                results += fsync.completed(wait=True)
                if results[-1][1]:
                    break
            assert results[-1][1] in (errno.EIO, errno.ENOSPC), results
        finally:
            fsync.close()
            os.close(fd)


def turn_until(loop: EventLoop, condition, turns: int = 1000) -> None:
    for _ in range(turns):
        if condition():
            return
        loop.run_once(timeout=0.05)
    raise AssertionError("the loop never got there")


@contextlib.contextmanager
def attached_recorder(path):
    """A durable log at path and its recorder, attached to a loop of its own (the fsync in the background); all
    three closed after."""
    loop = EventLoop()
    log = AuditLog.open(path, durable=True)
    recorder = Recorder(log)
    recorder.attach(loop)
    try:
        yield loop, log, recorder
    finally:
        recorder.close()
        log.close()
        loop.close()


def test_a_record_is_durable_only_after_the_fsync_that_began_after_it(tmp_path):
    told: list[tuple[str, int]] = []
    with attached_recorder(tmp_path / "audit.log") as (loop, log, recorder):
        loop.before_wait(recorder.commit)
        first = recorder.stage("write", detail={"n": 1})["seq"]
        recorder.when_durable(first, lambda: told.append(("done", first)), lambda why: told.append((why, first)))
        assert recorder.commit() is False and recorder._fsync.in_flight == 1, "the fsync runs while the loop waits"
        assert recorder._fsync._opcode == IOCB_CMD_FDSYNC, "the append-only log's commit is an fdatasync"
        second = recorder.stage("write", detail={"n": 2})["seq"]  # written while the first fsync is in flight
        recorder.when_durable(second, lambda: told.append(("done", second)), lambda why: told.append((why, second)))
        assert told == [] and log.synced_seq < first
        turn_until(loop, lambda: told[:1] == [("done", first)])
        assert log.synced_seq >= first
        turn_until(loop, lambda: len(told) == 2)  # the next fsync, begun by the next turn's commit
        assert told == [("done", first), ("done", second)] and log.synced_seq == second
        assert not recorder._fsync.in_flight


def test_a_stop_waits_for_the_fsync_in_flight_and_answers_everyone(tmp_path):
    told = []
    with attached_recorder(tmp_path / "audit.log") as (_loop, log, recorder):
        seq = recorder.stage("write")["seq"]
        recorder.when_durable(seq, lambda: told.append("done"), told.append)
        recorder.commit()
        later = recorder.stage("write")["seq"]
        recorder.when_durable(later, lambda: told.append("done"), told.append)
        recorder.flush()  # in line, as a stop or a hand-over does: no turn of the loop needed
        assert told == ["done", "done"] and log.synced_seq == later


def test_a_failed_background_fsync_fails_what_it_could_not_vouch_for_and_does_not_spin(tmp_path):
    with disk_that_fills(tmp_path) as (mnt, filler):
        loop = EventLoop()
        log = AuditLog.open(mnt / "audit.log", durable=True)
        recorder = Recorder(log)
        recorder.attach(loop)
        loop.before_wait(recorder.commit)
        try:
            fill(filler)
            outcome: dict[int, str] = {}
            for number in range(60):
                seq = recorder.stage("write", detail={"n": number, "pad": "x" * 4096})["seq"]
                recorder.when_durable(seq, lambda s=seq: outcome.setdefault(s, "done"),
                                      lambda why, s=seq: outcome.setdefault(s, why))
                turn_until(loop, lambda s=seq: s in outcome)
                if outcome[seq] != "done":
                    break
            failed = [why for why in outcome.values() if why != "done"]
            assert failed and "cannot sync audit log" in failed[0], outcome
            assert recorder.describe()["writable"] is False
            assert not recorder._fsync.in_flight
            loop.run_once(timeout=0.1)  # no new record: no new fsync started against the failing disk
            assert not recorder._fsync.in_flight
        finally:
            recorder.close()
            log.close()
            loop.close()


def test_a_later_fsyncs_success_waits_for_every_earlier_one_and_an_earlier_failure_takes_all(tmp_path):
    """The kernel reports a write-back error to one fsync of a file description only: if the later of two in
    flight completes first with success, the earlier may still fail. Completions out of order cannot be made to
    happen on demand, so this feeds the recorder the completions (the one fake here, named so)."""
    log = AuditLog.open(tmp_path / "audit.log", durable=True)
    recorder = Recorder(log)
    told: dict[int, str] = {}
    try:
        seqs = [recorder.stage("write", detail={"n": n})["seq"] for n in range(3)]
        for seq in seqs:
            recorder.when_durable(seq, lambda s=seq: told.setdefault(s, "done"),
                                  lambda why, s=seq: told.setdefault(s, why))
        recorder._outcomes = {seqs[0]: None, seqs[2]: None}  # two fsyncs in flight: up to the first, up to the last
        recorder._synced([(seqs[2], 0)])  # FAKE completion: the later one first, and a success
        assert told == {} and log.synced_seq < seqs[0], "nothing is told while an earlier fsync may still fail"
        recorder._synced([(seqs[0], errno.EIO)])  # FAKE completion: the earlier one failed
        assert set(told) == set(seqs) and all("cannot sync audit log" in why for why in told.values()), told
        assert recorder.describe()["writable"] is False
    finally:
        log.close()
