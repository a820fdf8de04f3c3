"""Group commit, watched from outside with strace on a real supervisor: the writes of one batch share one fsync,
no reply that tells of a record goes out before the fsync that puts it on disk, a failed fsync turns the held
replies into failures, and the caller is named from /proc once per connection.

The supervisor's fsync is native AIO (io_submit of IOCB_CMD_FSYNC, its completion reaped by io_getevents), or an
fsync(2) in line where the kernel refuses AIO: the helpers below read either from a trace."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import RunningSupervisor, policy_file
from rawpeer import RawPeer
from shmguard import audit
from shmguard.control import StatusRequest, WriteRequest, encode

BATCH = 40
SYNC_CALLS = "fsync,fdatasync,io_submit,io_getevents"  # strace -e trace= for both ways of syncing
_SYNC_START = re.compile(r"\b(fsync|fdatasync)\(|\bio_submit\(.*IOCB_CMD_FD?SYNC")
_SYNC_END = re.compile(r"\b(fsync|fdatasync)\(.*\) = 0|\bio_getevents\(.*\bres=0\b.*\) = 1")


def sync_starts(lines: list[str]) -> list[int]:
    """The line numbers where an fsync of the log begins."""
    return [n for n, line in enumerate(lines) if _SYNC_START.search(line)]


def sync_ends(lines: list[str]) -> list[int]:
    """The line numbers where an fsync of the log is known to have succeeded."""
    return [n for n, line in enumerate(lines) if _SYNC_END.search(line)]


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is needed for this test (apt-get install {tool})")
    return path


@contextmanager
def traced(pid: int, calls: str, out: Path) -> Iterator[None]:
    """strace -f on a running process (-e trace=calls) for the duration of the block; the trace is in `out`."""
    proc = subprocess.Popen([require("strace"), "-f", "-tt", "-e", f"trace={calls}", "-s", "256", "-o", str(out),
                             "-p", str(pid)], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()  # "strace: Process PID attached"
        assert "attached" in line, f"strace did not attach to {pid}: {line}{proc.stderr.read()}"
        yield
    finally:
        time.sleep(0.2)  # let the last calls reach the trace
        proc.send_signal(signal.SIGINT)  # detaches, leaving the supervisor running
        proc.wait(10)


def fd_of(pid: int, path: str) -> int:
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == path:
                return int(name)
        except FileNotFoundError:
            continue
    raise AssertionError(f"{path} is not open in process {pid}")


def pipelined(control: str, requests: list[WriteRequest], timeout: float = 30) -> list[dict]:
    """All requests in one send on one connection, then every reply, in order."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(control)
        sock.sendall(b"".join(encode(request) for request in requests))
        data = b""
        while data.count(b"\n") < len(requests):
            chunk = sock.recv(1 << 16)
            assert chunk, f"the supervisor closed the connection after {len(data.splitlines())} replies"
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def messages(count: int) -> list[WriteRequest]:
    return [WriteRequest(f"message {number}".encode(), text=True) for number in range(count)]


def trace_lines(out: Path) -> list[str]:
    return [line for line in out.read_text().splitlines() if "resumed>" not in line or "= " in line]


def test_a_batch_of_pipelined_writes_is_one_fsync_and_no_reply_precedes_it(tmp_path):
    supervisor = RunningSupervisor(policy_file(tmp_path, audit={"durable": True}))
    try:
        pid = supervisor.proc.pid
        log_fd = fd_of(pid, supervisor.audit)
        out = tmp_path / "trace"
        with traced(pid, f"write,{SYNC_CALLS},sendto,sendmsg,readlink,readlinkat", out):
            replies = pipelined(supervisor.control, messages(BATCH))
        assert all(reply["ok"] for reply in replies), replies
        seqs = [reply["seq"] for reply in replies]
        assert seqs == list(range(seqs[0], seqs[0] + BATCH)), "replies come back in the order of the requests"
        lines = trace_lines(out)
        record_writes = [n for n, line in enumerate(lines) if re.search(rf"\bwrite\({log_fd}, ", line)]
        starts, ends = sync_starts(lines), sync_ends(lines)
        sends = [n for n, line in enumerate(lines) if re.search(r"\bsendto\(", line) and '\\"ok\\": true' in line]
        assert len(record_writes) == BATCH, "one record per write, each one os.write"
        assert len(starts) == 1, f"{BATCH} pipelined writes in one request buffer share one fsync:\n" + "\n".join(
            lines[n] for n in starts)
        assert sends and ends, "\n".join(lines)
        assert record_writes[-1] < starts[0] <= ends[0] < sends[0], "every record, its fsync done, then a reply"
        # The caller is named from /proc once for the connection, not once per record.
        exe_lookups = [line for line in lines if "/exe" in line and "readlink" in line]
        assert len(exe_lookups) <= 1, exe_lookups
        records = [r for r in supervisor.audit_records() if r["action"] == "write"]
        assert [r["seq"] for r in records[-BATCH:]] == seqs
        assert all(r["rings"] == [] for r in records[-BATCH:])
    finally:
        supervisor.stop()
    assert audit.verify(supervisor.audit).ok


def test_held_replies_keep_their_order_and_a_write_is_one_record_listing_its_rings(tmp_path):
    supervisor = RunningSupervisor(policy_file(tmp_path, audit={"durable": True}))
    try:
        peer = RawPeer(supervisor.socket)
        peer.read(3)  # its id, the region, its vectors
        requests = [WriteRequest(b"one", text=True, ring="all"), StatusRequest(), WriteRequest(b"two", text=True)]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(supervisor.control)
            sock.sendall(b"".join(encode(request) for request in requests))
            data = b""
            while data.count(b"\n") < len(requests):
                chunk = sock.recv(1 << 16)
                assert chunk
                data += chunk
        first, status, second = [json.loads(line) for line in data.splitlines()]
        assert first["ok"] and first["sha256"] and len(first["rang"]) == 2  # the peer's two vectors
        assert status["ok"] and "region" in status and "sha256" not in status
        assert second["ok"] and second["seq"] == first["seq"] + 1  # no ring records between the writes
        records = {r["seq"]: r for r in supervisor.audit_records()}
        assert records[first["seq"]]["rings"] == [{"held_until_ready": False, "peer": ring["peer"], "vector": v}
                                                  for v, ring in enumerate(first["rang"])]
        assert not any(r["action"] == "ring" for r in records.values())
        peer.close()
    finally:
        supervisor.stop()
    assert audit.verify(supervisor.audit).ok


@contextmanager
def disk_that_fills(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """An ext4 file system (no journal) on a loop device whose backing file is on an 8 MiB tmpfs: writes to the
    ext4 go on succeeding once the tmpfs is full (the page cache takes them), and the fsync that must write them
    back fails. Yields (mount point, filler path): writing the filler until ENOSPC makes the disk full."""
    for tool in ("mount", "umount", "mkfs.ext4", "losetup"):
        require(tool)
    if os.geteuid() != 0:
        pytest.fail("mounting a loop file system needs root")
    base = Path(tempfile.mkdtemp(prefix="shmguard-full-", dir="/tmp"))
    backing, mnt = base / "backing", base / "mnt"
    mounted: list[Path] = []
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(base)], check=True)
        mounted.append(base)
        subprocess.run(["truncate", "-s", "64M", str(backing)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-O", "^has_journal", "-m", "0", "-E", "lazy_itable_init=1",
                        str(backing)], check=True)
        mnt.mkdir(mode=0o755)
        subprocess.run(["mount", "-o", "loop", str(backing), str(mnt)], check=True)
        mounted.append(mnt)
        yield mnt, base / "filler"
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", str(point)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def fill(path: Path) -> None:
    """Write until ENOSPC, in ever smaller pieces: tmpfs may give a little more after the first refusal."""
    with open(path, "wb", buffering=0) as f:
        for piece in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\1" * piece)
            except OSError as exc:
                assert exc.errno == 28, exc  # ENOSPC


def test_a_failed_fsync_turns_the_held_replies_into_failures(tmp_path):
    with disk_that_fills(tmp_path) as (mnt, filler):
        log_path = mnt / "log" / "audit.log"
        supervisor = RunningSupervisor(policy_file(tmp_path, audit={"durable": True, "path": str(log_path)}))
        try:
            before = pipelined(supervisor.control, messages(2))
            assert all(reply["ok"] for reply in before), before
            fill(filler)
            # The loop device reports the failed write-back of a full backing file at the next fsync or the one
            # after: send batches until one is refused, as a supervisor on a disk filling up would see it.
            for _ in range(30):
                replies = pipelined(supervisor.control, messages(BATCH))
                failed = [reply for reply in replies if not reply["ok"]]
                if failed:
                    break
            assert failed, "with the disk under the log full, an fsync fails and so do the replies waiting for it"
            for reply in failed:
                assert "could not be made durable" in reply["error"], reply
                assert "seq" in reply  # it says which record is not known to be on disk
            # The replies of the batch whose fsync failed are all failures: none told success before its fsync.
            first_failure = replies.index(failed[0])
            assert all(not reply["ok"] for reply in replies[first_failure:]), replies
            status = supervisor.client().status()
            assert status["audit"]["writable"] is False
            assert status["audit"]["trouble"]["missed"].get("not-synced", 0) >= 1
        finally:
            supervisor.stop()
