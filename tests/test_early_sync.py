"""The early fsync of a write that rings (shmguard/early_sync.py): started from a helper thread through a file
description of its own as soon as the record is in the file, while the loop's own fsync at the end of the turn
still decides durability. Watched on a real supervisor with strace: no reply before the loop's fsync; and a failed
write-back is still reported, to the log's own fsync and to the requester, with the helper syncing too."""

from __future__ import annotations

import os
import re
import time

from test_group_commit import disk_that_fills, fd_of, fill, pipelined, trace_lines, traced

from helpers import RunningSupervisor, policy_file
from rawpeer import RawPeer
from shmguard import audit
from shmguard.control import WriteRequest
from shmguard.early_sync import EarlySync


def test_the_helper_syncs_through_a_description_of_its_own(tmp_path):
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    early = EarlySync(lambda: fd)
    try:
        os.write(fd, b"a record\n")
        early.start_sync()
        deadline = time.monotonic() + 10
        while early._wanted.is_set() and time.monotonic() < deadline:  # taken up by the helper
            time.sleep(0.001)
        assert not early._wanted.is_set(), "the helper never took up the fsync"
        assert early._fd not in (-1, fd) and os.fstat(early._fd).st_ino == os.fstat(fd).st_ino
        assert os.readlink(f"/proc/self/fd/{early._fd}") == str(path)
        assert early._thread is not None and early._thread.daemon
    finally:
        early.close()
        os.close(fd)
    assert early._fd == -1


def test_a_write_back_error_the_helper_meets_is_still_reported_to_the_log_s_own_fsync(tmp_path):
    """With the helper's fsync always first, the log's own fsync still reports the failed write-back. (The kernel
    reports such an error once per file description, hence the helper's own; on this loop device the log's fsync
    also fails writing the inode, so this shows the outcome, not which of the two reasons gave it.)"""
    with disk_that_fills(tmp_path) as (mnt, filler):
        fd = os.open(mnt / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        early = EarlySync(lambda: fd)
        try:
            os.write(fd, b"first\n")
            os.fsync(fd)
            fill(filler)
            reported = None
            for number in range(60):
                os.write(fd, b"record %d %s\n" % (number, b"x" * 4096))
                before = early.syncs
                early.start_sync()
                deadline = time.monotonic() + 10
                while early.syncs == before and time.monotonic() < deadline:  # the helper's fsync comes first
                    time.sleep(0.001)
                assert early.syncs > before, "the helper never synced"
                try:
                    os.fsync(fd)
                except OSError as exc:
                    reported = exc
                    break
            assert reported is not None, "the log's own fsync never heard of the failed write-back"
        finally:
            early.close()
            os.close(fd)


def test_no_early_sync_for_a_log_that_is_not_durable():
    early = EarlySync(lambda: -1)
    early.start_sync()
    assert early._thread is None and early._fd == -1


def test_a_write_that_rings_syncs_early_and_still_replies_only_after_the_loops_fsync(tmp_path):
    supervisor = RunningSupervisor(policy_file(tmp_path, audit={"durable": True}))
    try:
        peer = RawPeer(supervisor.socket)
        peer.read(3)  # its id, the region, its vectors
        pid = supervisor.proc.pid
        log_fd = fd_of(pid, supervisor.audit)
        out = tmp_path / "trace"
        with traced(pid, "write,fsync,sendto", out):
            replies = pipelined(supervisor.control, [WriteRequest(b"rung", text=True, ring="all")])
        assert replies[0]["ok"] and len(replies[0]["rang"]) == 2, replies
        lines = trace_lines(out)
        record = next(n for n, line in enumerate(lines) if re.search(rf"^{pid} .*\bwrite\({log_fd}, ", line))
        syncs = [(n, line) for n, line in enumerate(lines) if re.search(r"\bfsync\(", line)]
        main = [n for n, line in syncs if line.startswith(f"{pid} ") and f"fsync({log_fd}" in line]
        helper = [n for n, line in syncs if not line.startswith(f"{pid} ")]
        reply = next(n for n, line in enumerate(lines) if "sendto(" in line and '\\"ok\\": true' in line)
        assert helper and record < helper[0], "the helper thread syncs once the record is written"
        assert main and record < main[0] < reply, "the reply waits for the loop's own fsync, early sync or not"
        peer.close()
    finally:
        supervisor.stop()
    assert audit.verify(supervisor.audit).ok


def test_a_failed_write_back_met_by_the_early_fsync_still_fails_the_reply(tmp_path):
    """The kernel reports a write-back error once per file description: the helper's own description meeting it
    must not hide it from the log's, so a write that rang is answered as not known to be on disk."""
    with disk_that_fills(tmp_path) as (mnt, filler):
        log_path = mnt / "log" / "audit.log"
        supervisor = RunningSupervisor(policy_file(tmp_path, audit={"durable": True, "path": str(log_path)}))
        try:
            peer = RawPeer(supervisor.socket)
            peer.read(3)
            assert pipelined(supervisor.control, [WriteRequest(b"before", text=True, ring="all")])[0]["ok"]
            fill(filler)
            failed = []
            for number in range(60):  # one at a time: each write's record meets the early fsync first
                reply = pipelined(supervisor.control, [WriteRequest(f"rung {number}".encode(), text=True,
                                                                    ring="all")])[0]
                if not reply["ok"]:
                    failed.append(reply)
                    break
            assert failed, "with the disk under the log full, a write that rings is not told it is on disk"
            assert "could not be made durable" in failed[0]["error"] and "seq" in failed[0], failed
            assert supervisor.client().status()["audit"]["writable"] is False
            peer.close()
        finally:
            supervisor.stop()
