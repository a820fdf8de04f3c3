"""The audit log: chain, tamper evidence, crash recovery, locking. Real files and real processes only."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmguard.audit import (
    ACTIONS,
    ZERO_HASH,
    Actor,
    AuditLog,
    VerifyResult,
    canonical_json,
    format_record,
    read_records,
    verify,
)
from shmguard.errors import ShmguardError

REPO = Path(__file__).resolve().parents[1]
SHA = hashlib.sha256(b"hello").hexdigest()


def write_sample_log(path: Path, count: int) -> None:
    with AuditLog.open(path, durable=False) as log:
        for number in range(count):
            log.append(
                ACTIONS[number % 4],
                actor=Actor(pid=100 + number, uid=0, gid=993, exe="/usr/bin/writer"),
                offset=number * 16,
                length=5,
                sha256=SHA,
                detail={"peer": number},
            )


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def child(code: str, *args: str, **popen_args: object) -> subprocess.Popen:
    """A real Python process running `code` with this repository importable."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True, **popen_args)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.log"


# ------------------------------------------------------------------------------------------- records and chain


def test_chain_continues_across_reopen(log_path: Path) -> None:
    write_sample_log(log_path, 3)
    with AuditLog.open(log_path, durable=False) as log:
        assert log.last_seq == 3
        assert log.torn_tail is None
        record = log.append("stop")
    assert record["seq"] == 4
    records = list(read_records(log_path))
    assert [r["seq"] for r in records] == [1, 2, 3, 4]
    assert records[0]["prev"] == ZERO_HASH
    assert all(later["prev"] == earlier["hash"] for earlier, later in zip(records, records[1:], strict=False))
    assert verify(log_path) == VerifyResult(True, 4, 4, None, None)


def test_record_has_documented_shape_and_hash(log_path: Path) -> None:
    with AuditLog.open(log_path, durable=False) as log:
        record = log.append("ring", result="ok", detail={"peer": 3, "vector": 1})
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", record["time"])
    assert record["actor"] is None
    assert "offset" not in record and "sha256" not in record
    body = {name: value for name, value in record.items() if name != "hash"}
    expected = hashlib.sha256((ZERO_HASH + canonical_json(body)).encode()).hexdigest()
    assert record["hash"] == expected
    assert log_path.read_bytes() == (canonical_json(record) + "\n").encode()


def test_actor_exe_comes_from_proc_or_is_unknown() -> None:
    sleeper = subprocess.Popen(["sleep", "5"])
    try:
        actor = Actor.from_pid(sleeper.pid, 1000, 1000)
        assert actor.exe == os.readlink(f"/proc/{sleeper.pid}/exe")
        assert actor.exe.endswith("sleep")
    finally:
        sleeper.kill()
        sleeper.wait()
    no_such_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    assert Actor.from_pid(no_such_pid, 0, 0) == Actor(no_such_pid, 0, 0, "unknown")


def test_durable_log_fsyncs_and_verifies(log_path: Path) -> None:
    with AuditLog.open(log_path, durable=True) as log:
        for number in range(20):
            log.append("write", offset=number, length=1, sha256=SHA)
    result = verify(log_path)
    assert result.ok and result.count == 20 and result.last_seq == 20


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    details=st.lists(
        st.dictionaries(
            st.text(max_size=8),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                | st.text(max_size=20),
                lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                max_leaves=8,
            ),
            max_size=4,
        ),
        min_size=1,
        max_size=5,
    )
)
def test_any_json_detail_round_trips_and_verifies(details: list[dict]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "audit.log"
        with AuditLog.open(path, durable=False) as log:
            written = [log.append("incident", result="repaired", detail=detail) for detail in details]
        assert list(read_records(path)) == written
        assert verify(path).ok


texts = st.text(max_size=12)  # any code point: the line escapes what is not printable ASCII
counts = st.integers(min_value=0, max_value=2**64)
rings = st.lists(st.fixed_dictionaries({"peer": counts, "vector": counts, "held_until_ready": st.booleans()}),
                 max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.fixed_dictionaries(
    {"action": st.sampled_from([a for a in ACTIONS if a != "torn-tail"]), "result": texts.filter(bool),
     "actor": st.none() | st.builds(Actor, pid=st.integers(), uid=counts, gid=counts, exe=texts),
     "detail": st.dictionaries(texts, st.none() | st.booleans() | st.integers() | texts, max_size=3)},
    optional={"offset": counts, "length": counts, "sha256": st.just(SHA), "rings": rings}),
    min_size=1, max_size=4))
def test_every_record_is_written_exactly_as_canonical_json_says(records: list[dict]) -> None:
    """The writer formats a record field by field: each line must be the canonical JSON of what it returned, and
    the hash must be record_hash's, for any field it may hold."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "audit.log"
        with AuditLog.open(path, durable=False) as log:
            written = []
            for fields in records:
                if "rings" in fields and fields["action"] != "write":
                    fields = {**fields, "action": "write"}
                written.append(log.append(fields.pop("action"), **fields))
        lines = lines_of(path)
        assert lines == [(canonical_json(record) + "\n").encode("ascii") for record in written]
        assert list(read_records(path)) == written
        assert verify(path).ok


# ------------------------------------------------------------------------------------------- refused appends


@pytest.mark.parametrize(
    "bad_arguments",
    [
        {"action": "delete"},
        {"action": "torn-tail"},
        {"action": "write", "sha256": "ABC"},
        {"action": "write", "offset": -1},
        {"action": "write", "length": True},
        {"action": "write", "result": ""},
        {"action": "write", "detail": {"data": b"raw bytes"}},
        {"action": "write", "detail": {"x": float("nan")}},
        {"action": "write", "detail": {"blob": "x" * 70_000}},
    ],
)
def test_refused_append_leaves_log_untouched(log_path: Path, bad_arguments: dict) -> None:
    write_sample_log(log_path, 2)
    before = log_path.read_bytes()
    with AuditLog.open(log_path, durable=False) as log:
        with pytest.raises(ValueError):
            log.append(**bad_arguments)
        assert log.last_seq == 2
    assert log_path.read_bytes() == before


# ------------------------------------------------------------------------------------------- tampering


def test_one_edited_byte_is_found_with_its_line(log_path: Path) -> None:
    write_sample_log(log_path, 5)
    lines = lines_of(log_path)
    lines[2] = lines[2].replace(b'"offset":32', b'"offset":33')
    write_lines(log_path, lines)
    result = verify(log_path)
    assert (result.ok, result.bad_line, result.count, result.last_seq) == (False, 3, 2, 2)
    assert result.reason == "line 3: edited: hash mismatch (the record was changed after it was written)"


@cache
def sample_log_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "audit.log"
        write_sample_log(path, 6)
        return path.read_bytes()


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_single_byte_edit_is_found_on_its_line(data: st.DataObject) -> None:
    original = sample_log_bytes()
    index = data.draw(st.integers(0, len(original) - 1))
    new_byte = data.draw(st.integers(0, 255).filter(lambda value: value != original[index]))
    edited = original[:index] + bytes([new_byte]) + original[index + 1 :]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "audit.log"
        path.write_bytes(edited)
        result = verify(path)
    assert not result.ok
    assert result.bad_line == original[:index].count(b"\n") + 1
    assert result.reason.startswith(f"line {result.bad_line}: ") and "\n" not in result.reason


@pytest.mark.parametrize(
    ("deleted", "reason"),
    [
        (3, "line 3: deleted: seq jumps from 2 to 4 (record 3 is missing)"),
        (1, "line 1: deleted: the first record has seq 2, not 1 (record 1 is missing)"),
    ],
)
def test_deleted_line_is_found(log_path: Path, deleted: int, reason: str) -> None:
    write_sample_log(log_path, 5)
    lines = lines_of(log_path)
    del lines[deleted - 1]
    write_lines(log_path, lines)
    result = verify(log_path)
    assert (result.ok, result.bad_line, result.reason) == (False, deleted, reason)


def test_deleted_run_of_lines_is_found(log_path: Path) -> None:
    write_sample_log(log_path, 6)
    lines = lines_of(log_path)
    write_lines(log_path, lines[:2] + lines[4:])
    assert verify(log_path).reason == "line 3: deleted: seq jumps from 2 to 5 (records 3-4 are missing)"


def test_two_swapped_lines_are_found(log_path: Path) -> None:
    write_sample_log(log_path, 5)
    lines = lines_of(log_path)
    lines[1], lines[2] = lines[2], lines[1]
    write_lines(log_path, lines)
    result = verify(log_path)
    assert (result.ok, result.bad_line) == (False, 2)
    assert result.reason == "line 2: reordered: seq 3 comes before seq 2, which is at line 3"


def test_repeated_and_backward_lines_are_reordering(log_path: Path) -> None:
    write_sample_log(log_path, 4)
    lines = lines_of(log_path)
    write_lines(log_path, lines[:3] + [lines[2]] + lines[3:])
    assert verify(log_path).reason == "line 4: reordered: seq 3 appears twice"
    write_lines(log_path, lines[:3] + [lines[0]] + lines[3:])
    assert verify(log_path).reason == "line 4: reordered: seq goes backwards from 3 to 1"


def test_rehashed_record_with_wrong_prev_breaks_chain(log_path: Path) -> None:
    write_sample_log(log_path, 4)
    lines = lines_of(log_path)
    forged = json.loads(lines[2])
    forged["prev"] = json.loads(lines[0])["hash"]  # as if record 2 had been cut out and 3 renumbered by hand
    body = {name: value for name, value in forged.items() if name != "hash"}
    forged["hash"] = hashlib.sha256((forged["prev"] + canonical_json(body)).encode()).hexdigest()
    lines[2] = (canonical_json(forged) + "\n").encode()
    write_lines(log_path, lines)
    result = verify(log_path)
    assert result.bad_line == 3 and result.reason.startswith("line 3: chain broken: prev is not the hash")


@pytest.mark.parametrize(
    ("cut", "reason"),
    [
        (1, "line 4: torn tail: the last line has no final newline (a write was cut short)"),
        (60, "line 4: torn tail: the last line has no final newline (a write was cut short)"),
    ],
)
def test_cut_last_line_is_a_torn_tail(log_path: Path, cut: int, reason: str) -> None:
    write_sample_log(log_path, 4)
    data = log_path.read_bytes()
    log_path.write_bytes(data[:-cut])
    result = verify(log_path)
    assert (result.ok, result.bad_line, result.reason, result.last_seq) == (False, 4, reason, 3)


def test_not_json_and_missing_field_are_named(log_path: Path) -> None:
    write_sample_log(log_path, 4)
    lines = lines_of(log_path)
    write_lines(log_path, lines[:1] + [b"this is not json\n"] + lines[2:])
    result = verify(log_path)
    assert result.bad_line == 2 and result.reason.startswith("line 2: not JSON: Expecting value")
    without_time = json.loads(lines[1])
    del without_time["time"]
    write_lines(log_path, lines[:1] + [(canonical_json(without_time) + "\n").encode()] + lines[2:])
    assert verify(log_path).reason == "line 2: missing field 'time'"
    write_lines(log_path, lines[:3] + [lines[3][:50] + b"\n"])
    assert verify(log_path).reason == "line 4: torn tail: the last line is not complete JSON (a write was cut short)"


def test_verify_stops_early_on_a_file_that_is_not_a_log(tmp_path: Path) -> None:
    text = tmp_path / "syslog"
    text.write_bytes(b"Nov 26 03:17:00 host kernel: hello\n" * 1000)
    result = verify(text)
    assert (result.ok, result.bad_line, result.count) == (False, 1, 0)
    assert result.reason.startswith("line 1: not JSON: Expecting value at column 1")


def test_verify_of_empty_log_and_missing_log(tmp_path: Path) -> None:
    empty = tmp_path / "empty.log"
    empty.write_bytes(b"")
    assert verify(empty) == VerifyResult(True, 0, 0, None, None)
    with pytest.raises(ShmguardError, match="cannot read audit log .*missing.log"):
        verify(tmp_path / "missing.log")


# ------------------------------------------------------------------------------------------- crash recovery


def test_torn_tail_is_sealed_at_reopen_not_rewritten(log_path: Path) -> None:
    write_sample_log(log_path, 4)
    torn = log_path.read_bytes()[:-40]  # record 4 cut short by a crash
    log_path.write_bytes(torn)
    fragment = torn[torn.rindex(b"\n") + 1 :]
    with AuditLog.open(log_path, durable=False) as log:
        assert log.last_seq == 4
        expected = f"line 4 was torn ({len(fragment)} bytes, no final newline); sealed by torn-tail record seq 4"
        assert log.torn_tail == expected
        log.append("start")
    data = log_path.read_bytes()
    assert data.startswith(torn + b"\n")  # the torn bytes are kept as they were, only terminated
    seal = json.loads(lines_of(log_path)[4])
    assert seal["action"] == "torn-tail" and seal["seq"] == 4 and seal["result"] == "sealed"
    assert seal["prev"] == json.loads(lines_of(log_path)[2])["hash"]  # chains to the last good record
    assert seal["detail"] == {
        "line": 4,
        "lines": 1,
        "length": len(fragment),
        "sha256": hashlib.sha256(fragment).hexdigest(),
        "reason": "no final newline",
    }
    result = verify(log_path)
    assert (result.ok, result.count, result.last_seq, result.sealed_lines) == (True, 5, 5, (4,))
    assert result.summary() == "OK: 5 records, last seq 5; torn line(s) 4 sealed by torn-tail records"


def test_incomplete_json_with_newline_is_sealed_without_an_extra_newline(log_path: Path) -> None:
    write_sample_log(log_path, 3)
    lines = lines_of(log_path)
    write_lines(log_path, lines[:2] + [lines[2][:70] + b"\n"])
    before = log_path.read_bytes()
    with AuditLog.open(log_path, durable=False) as log:
        assert "incomplete JSON" in log.torn_tail
    assert lines_of(log_path)[:3] == lines_of(log_path)[:2] + [lines[2][:70] + b"\n"]
    assert log_path.read_bytes().startswith(before) and len(lines_of(log_path)) == 4
    assert verify(log_path).sealed_lines == (3,)


def test_crash_while_sealing_is_sealed_again(log_path: Path) -> None:
    write_sample_log(log_path, 3)
    lines = lines_of(log_path)
    write_lines(log_path, lines[:2] + [lines[2][:90]])
    with AuditLog.open(log_path, durable=False):
        pass
    sealing = lines_of(log_path)
    write_lines(log_path, sealing[:3] + [sealing[3][:30]])  # the torn-tail record itself was cut short
    with AuditLog.open(log_path, durable=False) as log:
        assert log.torn_tail.startswith("lines 3-4 were torn")
        assert log.last_seq == 3
    result = verify(log_path)
    assert (result.ok, result.last_seq, result.sealed_lines) == (True, 3, (3, 4))


def test_torn_first_write_is_sealed_as_first_record(log_path: Path) -> None:
    write_sample_log(log_path, 1)
    log_path.write_bytes(log_path.read_bytes()[:25])
    with AuditLog.open(log_path, durable=False) as log:
        assert log.last_seq == 1
    records = list(read_records(log_path))
    assert [(r["seq"], r["action"], r["prev"]) for r in records] == [(1, "torn-tail", ZERO_HASH)]
    assert verify(log_path).ok


def test_edited_sealed_fragment_is_found(log_path: Path) -> None:
    write_sample_log(log_path, 3)
    log_path.write_bytes(log_path.read_bytes()[:-30])
    with AuditLog.open(log_path, durable=False):
        pass
    lines = lines_of(log_path)
    lines[2] = lines[2].replace(b"action", b"actiom")
    write_lines(log_path, lines)
    result = verify(log_path)
    assert result.bad_line == 3
    assert result.reason == "line 3: edited: torn bytes differ from what the torn-tail record at line 4 sealed"


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (lambda lines: lines[:-1] + [lines[-1].replace(b'"peer":3', b'"peer":9')], "last record: edited"),
        (lambda lines: lines[:-2] + [lines[-2].replace(b'"peer":2', b'"peer":9'), lines[-1]], "before the last"),
        (lambda lines: lines[:-2] + lines[-1:], "does not chain"),
        (lambda lines: lines + [b"root:x:0:0:root:/root:/bin/bash\n"], "not an audit record"),
    ],
)
def test_open_refuses_a_damaged_tail_without_appending(log_path: Path, damage, what: str) -> None:
    write_sample_log(log_path, 4)
    write_lines(log_path, damage(lines_of(log_path)))
    before = log_path.read_bytes()
    with pytest.raises(ShmguardError) as raised:
        AuditLog.open(log_path, durable=False)
    message = str(raised.value)
    assert what in message and f"run `shmguard audit verify {log_path}`" in message and "\n" not in message
    assert log_path.read_bytes() == before


def test_open_checks_only_the_tail_verify_checks_everything(log_path: Path) -> None:
    write_sample_log(log_path, 300)
    lines = lines_of(log_path)
    lines[1] = lines[1].replace(b'"peer":1', b'"peer":7')
    write_lines(log_path, lines)
    with AuditLog.open(log_path, durable=False) as log:  # fast: reads the last records, not the whole file
        assert log.last_seq == 300
    assert verify(log_path).bad_line == 2


KILLED_WRITER = """
import sys
from shmguard.audit import AuditLog
log = AuditLog.open(sys.argv[1], durable=False)
while True:
    record = log.append("write", offset=0, length=8, detail={"pid": 1})
    sys.stdout.write(f"{record['seq']}\\n")
    sys.stdout.flush()
"""


def test_kill_9_mid_loop_keeps_every_reported_record(log_path: Path) -> None:
    reported: list[int] = []
    for _round in range(2):  # the second writer continues the chain the killed one left
        writer = child(KILLED_WRITER, str(log_path), stdout=subprocess.PIPE)
        for line in writer.stdout:
            reported.append(int(line))
            if len(reported) % 150 == 0:
                break
        writer.send_signal(signal.SIGKILL)
        reported.extend(int(line) for line in writer.stdout if line.endswith("\n"))
        writer.stdout.close()
        assert writer.wait() == -signal.SIGKILL
    with AuditLog.open(log_path, durable=False) as log:  # the killed writer's lock died with it
        log.append("start")
    result = verify(log_path)
    assert result.ok, result.reason
    in_log = {record["seq"] for record in read_records(log_path)}
    assert set(reported) <= in_log
    assert reported == sorted(reported) and len(set(reported)) == len(reported)


SHORT_WRITER = """
import resource, signal, sys
from shmguard.audit import AuditLog
from shmguard.errors import ShmguardError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG / a short write instead of death
log = AuditLog.open(sys.argv[1], durable=False)
log.append("start")
limit = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (log.path.stat().st_size + 100, limit[1]))
try:
    log.append("write", detail={"note": "x" * 400})
except ShmguardError as err:
    print("refused:", err)
resource.setrlimit(resource.RLIMIT_FSIZE, limit)
print("after:", log.append("stop")["seq"], log.torn_tail)
"""


def test_short_write_is_sealed_before_the_next_append(log_path: Path) -> None:
    writer = child(SHORT_WRITER, str(log_path), stdout=subprocess.PIPE)
    output, _ = writer.communicate(timeout=10)
    assert writer.returncode == 0
    assert f"refused: cannot append to audit log {log_path}: short write (100 of " in output
    assert "after: 3 line 2 was torn (100 bytes, no final newline); sealed by torn-tail record seq 2" in output
    result = verify(log_path)
    assert (result.ok, result.last_seq, result.sealed_lines) == (True, 3, (2,))


# ------------------------------------------------------------------------------------------- files and locks


@pytest.mark.parametrize("umask", [0o077, 0o000])
def test_new_log_is_0640_in_a_0750_directory(log_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        AuditLog.open(log_path, durable=True).close()
    finally:
        os.umask(previous)
    assert log_path.stat().st_mode & 0o7777 == 0o640
    assert log_path.parent.stat().st_mode & 0o7777 == 0o750


def test_symlinked_log_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    (tmp_path / "audit.log").symlink_to(target)
    with pytest.raises(ShmguardError, match="it is a symbolic link"):
        AuditLog.open(tmp_path / "audit.log", durable=False)


LOCK_HOLDER = """
import sys
from shmguard.audit import AuditLog
log = AuditLog.open(sys.argv[1], durable=False)
log.append("start")
print("locked", flush=True)
sys.stdin.read()
log.append("stop")
"""


def test_second_supervisor_is_refused_while_the_first_holds_the_log(log_path: Path) -> None:
    holder = child(LOCK_HOLDER, str(log_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == "locked\n"
        before = log_path.read_bytes()
        in_use = re.escape(f"audit log {log_path} is in use by another supervisor") + "$"
        with pytest.raises(ShmguardError, match=in_use):
            AuditLog.open(log_path, durable=False)
        assert log_path.read_bytes() == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    with AuditLog.open(log_path, durable=False) as log:
        assert log.last_seq == 2


# ------------------------------------------------------------------------------------------- reading


def test_read_records_since_and_format_one_line_each(log_path: Path) -> None:
    write_sample_log(log_path, 5)
    with AuditLog.open(log_path, durable=False) as log:
        log.append("refused", result="refused", actor=Actor(7, 1000, 1000, "/tmp/evil\n#99 forged"),
                   detail={"reason": "write beyond the region"})
    assert [r["seq"] for r in read_records(log_path, since=3)] == [4, 5, 6]
    shown = [format_record(record) for record in read_records(log_path)]
    assert all("\n" not in line for line in shown)
    assert shown[0].startswith("#1 ") and " write ok pid=100 uid=0 gid=993 exe=/usr/bin/writer offset=0 " in shown[0]
    assert shown[0].endswith(f"sha256={SHA[:16]} peer=0")
    assert shown[5].endswith('refused refused pid=7 uid=1000 gid=1000 exe="/tmp/evil\\n#99 forged" '
                             'reason="write beyond the region"')


# ------------------------------------------------------------------------- format 2: rings, group commit

OLD_FORMAT_LOG = REPO / "tests" / "data" / "audit-format-1.log"  # written by a supervisor before format 2


def test_a_log_written_the_old_way_verifies_shows_and_continues(tmp_path: Path) -> None:
    """Format 1 (a `ring` record after each write for each ring) reads and verifies as before, and a supervisor of
    format 2 chains on to it: one log may hold both."""
    old = verify(OLD_FORMAT_LOG)
    assert old.ok and old.count == 11, old
    records = list(read_records(OLD_FORMAT_LOG))
    assert [r["action"] for r in records[2:5]] == ["write", "ring", "ring"] and "rings" not in records[2]
    assert all("\n" not in format_record(record) for record in records)
    log_path = tmp_path / "audit" / "audit.log"
    log_path.parent.mkdir(mode=0o750)
    log_path.write_bytes(OLD_FORMAT_LOG.read_bytes())
    with AuditLog.open(log_path, durable=True) as log:
        record = log.append("write", offset=0, length=5, sha256=SHA, detail={"padding": 3},
                            rings=[{"peer": 1, "vector": 0, "held_until_ready": False}])
    assert record["seq"] == 12 and record["rings"] == [{"held_until_ready": False, "peer": 1, "vector": 0}]
    assert verify(log_path) == VerifyResult(True, 12, 12, None, None)
    assert "rings=1:0 " in format_record(record) + " "
    result = subprocess.run([sys.executable, "-m", "shmguard", "audit", "verify", str(log_path)],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0 and result.stdout.startswith("OK: 12 records"), result


@pytest.mark.parametrize("rings, why", [
    ([{"peer": 1, "vector": 0}], "each audit ring"),
    ([{"peer": 1, "vector": 0, "held_until_ready": False, "extra": 1}], "each audit ring"),
    ([{"peer": True, "vector": 0, "held_until_ready": False}], "each audit ring"),
    ([{"peer": -1, "vector": 0, "held_until_ready": False}], "each audit ring"),
    ("1:0", "must be a list"),
])
def test_bad_rings_are_refused_before_a_byte_is_written(log_path: Path, rings, why: str) -> None:
    with AuditLog.open(log_path, durable=False) as log:
        with pytest.raises(ValueError, match=why):
            log.append("write", offset=0, length=1, sha256=SHA, rings=rings)
        with pytest.raises(ValueError, match="only a write record lists rings"):
            log.append("ring", rings=[])
    assert log_path.read_bytes() == b""


def test_rings_on_a_record_other_than_a_write_is_bad(log_path: Path) -> None:
    """Rehashed, so only the field check can tell: `rings` belongs to write records alone."""
    write_sample_log(log_path, 2)
    lines = lines_of(log_path)
    record = json.loads(lines[1])
    record["action"], record["rings"] = "stop", []
    body = {name: value for name, value in record.items() if name != "hash"}
    record["hash"] = hashlib.sha256((record["prev"] + canonical_json(body)).encode()).hexdigest()
    write_lines(log_path, [lines[0], (canonical_json(record) + "\n").encode()])
    result = verify(log_path)
    assert not result.ok and result.bad_line == 2 and "'rings'" in result.reason, result


def test_unsynced_appends_are_in_the_file_and_one_flush_makes_them_durable(log_path: Path) -> None:
    with AuditLog.open(log_path, durable=True) as log:
        assert log.synced_seq == 0 and not log.unsynced
        log.append("start")
        assert log.synced_seq == 1
        staged = [log.append("write", offset=n, length=1, sha256=SHA, rings=[], sync=False) for n in range(5)]
        assert [r["seq"] for r in staged] == [2, 3, 4, 5, 6]
        assert log.unsynced and log.synced_seq == 1
        assert [r["seq"] for r in read_records(log_path)] == [1, 2, 3, 4, 5, 6]  # written: in order, visible
        log.flush()
        assert log.synced_seq == 6 and not log.unsynced
        log.append("stop", sync=False)
    with AuditLog.open(log_path, durable=False) as log:  # close() flushed the last one
        assert log.last_seq == 7 and log.synced_seq == 7
    assert verify(log_path).ok


def test_a_log_that_is_not_durable_counts_every_written_record_as_synced(log_path: Path) -> None:
    with AuditLog.open(log_path, durable=False) as log:
        log.append("start", sync=False)
        assert log.synced_seq == 1 and not log.unsynced


def test_recorder_answers_once_the_record_is_on_disk(log_path: Path) -> None:
    from shmguard.recorder import Recorder

    told: list[str] = []
    with AuditLog.open(log_path, durable=True) as log:
        recorder = Recorder(log)
        first = recorder.stage("write", offset=0, length=1, sha256=SHA, rings=[])
        second = recorder.stage("write", offset=1, length=1, sha256=SHA, rings=[])
        recorder.when_durable(first["seq"], lambda: told.append("first"), lambda why: told.append(f"lost {why}"))
        recorder.when_durable(second["seq"], lambda: told.append("second"), lambda why: told.append(f"lost {why}"))
        assert told == []  # nobody hears of a record before its fsync
        assert recorder.flush() is False
        assert told == ["first", "second"] and log.synced_seq == second["seq"]
        recorder.when_durable(first["seq"], lambda: told.append("at once"), lambda why: told.append("lost"))
        assert told[-1] == "at once"
        recorder.record("stop")  # record() is durable on return
        assert not log.unsynced
