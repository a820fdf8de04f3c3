"""The audit log: append-only, hash-chained JSON lines that make tampering evident.

Each line is one record in canonical JSON, ending in "\\n" (docs/audit.md describes every field):
    seq, time, actor, action, result, [offset, length, sha256, rings], detail, prev, hash
A write record lists the rings it made (`rings`); a log written before that has a `ring` record after its write
for each ring instead, and reads and verifies the same.
`hash` is sha256 hex over `prev` + the canonical JSON of the record without `hash`; `prev` is the hash of the
record before (64 zeros for the first). One supervisor appends at a time (flock), with one os.write per record,
so a crash leaves at worst a torn last line. `AuditLog.open` never rewrites such a line: it terminates it and
seals it off with a `torn-tail` record that gives its line number, length and sha256 and chains to the last
good record.

Group commit: `append(..., sync=False)` writes the record (one os.write, so it is in the file and ordered) without
an fsync; `flush()` makes every record written so far durable with one fsync. `synced_seq` says how far the log is
known to be on disk: whoever must not be told of a record before it is durable waits until `synced_seq` reaches it.

`verify` reads the whole file and names the first bad line. `AuditLog.open` checks only the tail (the last record
and its link to the record before it), so opening a large log stays fast; an edit further back is verify's to find.

Counting: `VerifyResult.count` counts records, not lines. A torn fragment sealed by a torn-tail record is not a
record, so it is not counted; its line number is listed in `VerifyResult.sealed_lines`. For a good log
`count == last_seq`.

Arguments that no user can cause (an unknown action, a detail that is not JSON, an oversize record) raise
ValueError before a single byte is written; what a user or the system can cause raises ShmguardError.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import c_make_encoder
from json.encoder import encode_basestring_ascii as _string  # a str as canonical JSON writes it
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ShmguardError
from .linux import procfs
from .linux.files import reopen
from .paths import make_directory, open_for_reading, open_log

ACTIONS: tuple[str, ...] = (
    "write",
    "ring",
    "refused",
    "incident",
    "peer-join",
    "peer-leave",
    "start",
    "stop",
    "torn-tail",
    "qemu-exit",
    "guest-ready",
    "guest-report",  # what a guest reported of a send between guests (the host never sees those bytes)
    "audit-gap",
    "reload",
    "take-over",
)
_ACTION_SET = frozenset(ACTIONS)
TORN_TAIL = "torn-tail"
ZERO_HASH = "0" * 64
FILE_MODE = 0o640
DIR_MODE = 0o750
MAX_RECORD_BYTES = 64 * 1024  # one record is one os.write; the bound also bounds the tail scan at open
MAX_TORN_LINES = 16  # each crash while sealing adds at most one line; more than this is not a crash
_COUNT_CHUNK = 1 << 20
_TAIL_CHUNK = 64 * 1024
_REQUIRED = ("seq", "time", "actor", "action", "result", "detail", "prev", "hash")
_OPTIONAL = ("offset", "length", "sha256", "rings")
_RING_FIELDS = ("held_until_ready", "peer", "vector")
_SCALARS = (str, int, bool, type(None))  # exact types: a detail of these alone needs no JSON round trip
log = logging.getLogger("shmguard")
_ACTOR_FIELDS = ("exe", "gid", "pid", "uid")
_HEX64 = re.compile("[0-9a-f]{64}")


# ---------------------------------------------------------------------------------------------------- records


class _made_once:  # noqa: N801 - a decorator, named as functools.cached_property is
    """functools.cached_property without its lock (Python 3.11 takes one on every first access): the value goes
    into the instance's __dict__, which takes precedence from then on. For values that are the same however often
    they are made."""

    def __init__(self, make: Callable[[Any], Any]):
        self.make, self.name = make, make.__name__

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.make(instance)
        return value


@dataclass(frozen=True)
class Actor:
    """Who asked for an action: a peer or control client, identified by SO_PEERCRED."""

    pid: int
    uid: int
    gid: int
    exe: str

    @classmethod
    def from_pid(cls, pid: int, uid: int, gid: int) -> Actor:
        return cls(pid=pid, uid=uid, gid=gid, exe=executable_of(pid))

    def plain(self) -> dict:
        """The record's `actor` field."""
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "exe": self.exe}

    @_made_once
    def json(self) -> str:
        """The `actor` field as canonical JSON, made once per actor: a peer's join and leave, a control
        connection's every write, all say the same."""
        if type(self.exe) is str and type(self.gid) is type(self.pid) is type(self.uid) is int:
            return f'{{"exe":{_string(self.exe)},"gid":{self.gid},"pid":{self.pid},"uid":{self.uid}}}'
        return canonical_json(self.plain())


def executable_of(pid: int) -> str:
    """The process's executable; informational only, since the pid may be gone (or reused) already.

    A hardened supervisor may not read /proc/PID/exe of a process with more privilege (QEMU as root);
    the name the process gives itself (comm) is then the best there is, and is labelled as such.
    """
    return procfs.executable(pid)


# One encoder for every record: json.dumps would build a new one per call when given options.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
# Its C core, made once (JSONEncoder.encode makes one per call): the same output, without the circular-reference
# check, so a cyclic value is a RecursionError (turned into ValueError where a caller's value is encoded).
_C_CANONICAL = c_make_encoder and c_make_encoder(None, _CANONICAL.default, _string, None, ":", ",", True, False,
                                                 False)


def canonical_json(value: Any) -> str:
    """The one serialisation that is hashed and written; NaN and infinities are not JSON, so they are refused.

    Same output as json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)."""
    if _C_CANONICAL is None:
        return _CANONICAL.encode(value)
    return "".join(_C_CANONICAL(value, 0))


def record_hash(record: dict) -> str:
    """sha256 hex over prev + canonical JSON of the record without its `hash`."""
    body = {name: value for name, value in record.items() if name != "hash"}
    return hashlib.sha256((record["prev"] + canonical_json(body)).encode("ascii")).hexdigest()


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_hex64(value: Any) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def _encode(record: dict) -> bytes:
    return (canonical_json(record) + "\n").encode("ascii")


def _joined(low: str, high: str) -> str:
    """Two canonical objects as one, where every key of `low` sorts before every key of `high`."""
    if low == "{}":
        return high
    if high == "{}":
        return low
    return low[:-1] + "," + high[1:]


def _sealed_line(record: dict, actor_json: str | None = None) -> tuple[str, bytes]:
    """(hash, line) of a record without its hash, serialised once and hashed once: the same bytes as
    record_hash() and _encode() of the record with its hash (canonical JSON sorts keys, and `hash` sits between
    `detail` and the rest). verify() checks every line against canonical_json itself.

    actor_json: the record's actor as canonical JSON already (Actor.json). A record as AuditLog writes it is then
    formatted field by field, in the sorted order, with only its detail through the encoder; anything else is
    encoded whole, in the two halves around `hash`."""
    if actor_json is not None and _PLAIN <= record.keys() <= _ALL:
        head = (f'{{"action":{_string(record["action"])},"actor":{actor_json},'
                f'"detail":{canonical_json(record["detail"])}')
        if record.keys() == _PLAIN:  # most records: no optional field
            tail = (f'"prev":"{record["prev"]}","result":{_string(record["result"])},"seq":{record["seq"]},'
                    f'"time":{_string(record["time"])}}}')
        else:
            tail = _tail(record)
        digest = hashlib.sha256(f'{record["prev"]}{head},{tail}'.encode("ascii")).hexdigest()
        return digest, f'{head},"hash":"{digest}",{tail}\n'.encode("ascii")
    low = canonical_json({name: value for name, value in record.items() if name < "hash"})
    high = canonical_json({name: value for name, value in record.items() if name > "hash"})
    digest = hashlib.sha256((record["prev"] + _joined(low, high)).encode("ascii")).hexdigest()
    return digest, (_joined(_joined(low, '{"hash":"' + digest + '"}'), high) + "\n").encode("ascii")


_PLAIN = frozenset(("action", "actor", "detail", "prev", "result", "seq", "time"))  # in every record
_ALL = _PLAIN | {"length", "offset", "rings", "sha256"}


def _tail(record: dict) -> str:
    """The fields sorting after `hash`, as canonical JSON without the opening brace, for a record as
    _checked_fields makes it (counts are ints, sha256 is hex, rings are checked; _sealed_line has checked that its
    fields are among _ALL, so one of each of _ALL is all of them)."""
    if len(record) == len(_ALL):  # a write record, every field present: one format
        rings = ",".join(f'{{"held_until_ready":{"true" if ring["held_until_ready"] else "false"},'
                         f'"peer":{ring["peer"]},"vector":{ring["vector"]}}}' for ring in record["rings"])
        return (f'"length":{record["length"]},"offset":{record["offset"]},"prev":"{record["prev"]}",'
                f'"result":{_string(record["result"])},"rings":[{rings}],"seq":{record["seq"]},'
                f'"sha256":"{record["sha256"]}","time":{_string(record["time"])}}}')
    parts = [f'"{name}":{record[name]}' for name in ("length", "offset") if name in record]
    parts.append(f'"prev":"{record["prev"]}","result":{_string(record["result"])}')
    if "rings" in record:
        rings = ",".join(f'{{"held_until_ready":{"true" if ring["held_until_ready"] else "false"},'
                         f'"peer":{ring["peer"]},"vector":{ring["vector"]}}}' for ring in record["rings"])
        parts.append(f'"rings":[{rings}]')
    parts.append(f'"seq":{record["seq"]}')
    if "sha256" in record:
        parts.append(f'"sha256":"{record["sha256"]}"')
    parts.append(f'"time":{_string(record["time"])}')
    return ",".join(parts) + "}"


class _Clock:
    """The record's time stamp, datetime.now(UTC).isoformat(timespec="microseconds") exactly: the date and time
    of day are formatted once a second, the microseconds each time."""

    def __init__(self) -> None:
        self.second, self.prefix = -1, ""

    def now(self) -> str:
        micros = time.time_ns() // 1000
        second, fraction = divmod(micros, 1_000_000)
        if second != self.second:
            self.second = second
            self.prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self.prefix}.{fraction:06d}+00:00"


_now = _Clock().now


def _checked_fields(
    action: str,
    result: str,
    actor: Actor | None,
    offset: int | None,
    length: int | None,
    sha256: str | None,
    detail: dict | None,
    rings: list[dict] | None = None,
) -> dict:
    """The caller's part of a record, validated before anything touches the file."""
    if action not in _ACTION_SET:
        raise ValueError(f"unknown audit action {action!r}; expected one of: {', '.join(ACTIONS)}")
    if not isinstance(result, str) or not result:
        raise ValueError(f"audit result must be a non-empty string, not {result!r}")
    if actor is not None and not isinstance(actor, Actor):
        raise ValueError(f"audit actor must be an Actor or None, not {type(actor).__name__}")
    if detail is not None and not isinstance(detail, dict):
        raise ValueError(f"audit detail must be a dict, not {type(detail).__name__}")
    fields: dict[str, Any] = {
        "action": action,
        "result": result,
        "actor": None if actor is None else actor.plain(),
        "detail": _json_round_trip(detail or {}),
    }
    if rings is not None:
        if action != "write":
            raise ValueError(f"only a write record lists rings, not a {action!r} record")
        fields["rings"] = _checked_rings(rings)
    for name, value in (("offset", offset), ("length", length)):
        if value is not None:
            if type(value) is not int or value < 0:
                if not _is_count(value):
                    raise ValueError(f"audit {name} must be a non-negative integer, not {value!r}")
                value = int(value)  # a subclass of int (an IntEnum) formats otherwise than canonical JSON writes it
            fields[name] = value
    if sha256 is not None:
        if not _is_hex64(sha256):
            raise ValueError(f"audit sha256 must be 64 lowercase hex digits, not {sha256!r}")
        fields["sha256"] = sha256
    return fields


def _checked_rings(rings: Any) -> list[dict]:
    if not isinstance(rings, (list, tuple)):  # noqa: UP038 - a constant, not a union made per record
        raise ValueError(f"audit rings must be a list of dicts, not {rings!r}")
    checked = []
    for ring in rings:
        if type(ring) is not dict or len(ring) != len(_RING_FIELDS):
            raise ValueError(f"each audit ring is {{peer, vector, held_until_ready}}, not {ring!r}")
        peer, vector, held = ring.get("peer"), ring.get("vector"), ring.get("held_until_ready")
        if type(peer) is not int or type(vector) is not int or type(held) is not bool or min(peer, vector) < 0:
            raise ValueError(f"each audit ring is {{peer, vector, held_until_ready}}, not {ring!r}")
        checked.append({"peer": peer, "vector": vector, "held_until_ready": held})
    return checked


def _is_ring(value: Any) -> bool:
    return (isinstance(value, dict) and sorted(value) == list(_RING_FIELDS) and _is_count(value["peer"])
            and _is_count(value["vector"]) and isinstance(value["held_until_ready"], bool))


def _json_round_trip(detail: dict) -> dict:
    # The record handed back must equal the one read back later (tuples become lists, int keys strings).
    for key, value in detail.items():
        if type(key) is not str or type(value) not in _SCALARS:
            break
    else:
        return dict(detail)  # already what reading it back gives: no need to serialise it twice
    try:
        return json.loads(canonical_json(detail))
    except (TypeError, ValueError, RecursionError) as err:
        raise ValueError(f"audit detail is not JSON: {err}") from None


def _field_problem(record: dict) -> str | None:
    """What is missing or malformed in a parsed record, or None."""
    for name in _REQUIRED:
        if name not in record:
            return f"missing field {name!r}"
    extra = sorted(set(record) - set(_REQUIRED) - set(_OPTIONAL))
    if extra:
        return f"unexpected field {extra[0]!r}"
    expectations = (
        ("seq", _is_count(record["seq"]) and record["seq"] >= 1, "a positive integer"),
        ("time", isinstance(record["time"], str), "a string"),
        ("actor", _is_actor(record["actor"]), "null or an object with pid, uid, gid and exe"),
        ("action", record["action"] in ACTIONS, "one of " + ", ".join(ACTIONS)),
        ("result", isinstance(record["result"], str) and record["result"] != "", "a non-empty string"),
        ("detail", isinstance(record["detail"], dict), "an object"),
        ("prev", _is_hex64(record["prev"]), "64 hex digits"),
        ("hash", _is_hex64(record["hash"]), "64 hex digits"),
        ("offset", "offset" not in record or _is_count(record["offset"]), "a non-negative integer"),
        ("length", "length" not in record or _is_count(record["length"]), "a non-negative integer"),
        ("sha256", "sha256" not in record or _is_hex64(record["sha256"]), "64 hex digits"),
        ("rings", "rings" not in record or (record["action"] == "write" and isinstance(record["rings"], list)
                                            and all(_is_ring(ring) for ring in record["rings"])),
         "on a write record only, a list of objects with peer, vector and held_until_ready"),
    )
    for name, good, expected in expectations:
        if not good:
            return f"bad field {name!r} (expected {expected})"
    return None


def _is_actor(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, dict) or sorted(value) != list(_ACTOR_FIELDS):
        return False
    ids_ok = all(isinstance(value[name], int) and not isinstance(value[name], bool) for name in ("pid", "uid", "gid"))
    return ids_ok and isinstance(value["exe"], str)


def _record_problem(record: dict, raw: bytes) -> str | None:
    """Why a parsed line is not a sound record on its own (fields, hash, exact bytes), or None."""
    problem = _field_problem(record)
    if problem:
        return problem
    try:
        if record_hash(record) != record["hash"]:
            return "edited: hash mismatch (the record was changed after it was written)"
        if raw != _encode(record):
            return "edited: the line's bytes differ from the record's canonical form"
    except ValueError:  # e.g. 1e999 parses as infinity, which canonical JSON cannot hold
        return "edited: the record holds a number canonical JSON cannot represent"
    return None


def _parse_line(raw: bytes) -> tuple[dict | None, str]:
    """(record, "") for a complete line holding a JSON object, else (None, why not)."""
    if not raw.endswith(b"\n"):
        return None, "no final newline"
    try:
        value = json.loads(raw[:-1].decode("ascii"), parse_constant=_refuse_constant)
    except json.JSONDecodeError as err:
        return None, f"{err.msg} at column {err.colno}"
    except UnicodeDecodeError as err:
        return None, f"non-ASCII byte at column {err.start + 1}"
    except (ValueError, RecursionError) as err:
        return None, str(err) or type(err).__name__
    if not isinstance(value, dict):
        return None, "not a JSON object"
    return value, ""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _seal_detail(first_line: int, raws: list[bytes]) -> dict:
    """What a torn-tail record says about the torn lines it seals: the bytes without the final newline."""
    torn = b"".join(raws)
    if torn.endswith(b"\n"):
        torn = torn[:-1]
    return {"line": first_line, "lines": len(raws), "length": len(torn), "sha256": hashlib.sha256(torn).hexdigest()}


def _seal_matches(record: dict, expected: dict, check_line: bool = True) -> bool:
    keys = ("line", "lines", "length", "sha256") if check_line else ("lines", "length", "sha256")
    return all(record["detail"].get(key) == expected[key] for key in keys)


# ---------------------------------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    count: int  # records checked good (not lines: sealed torn fragments are not records)
    last_seq: int  # seq of the last good record, 0 if none
    bad_line: int | None  # 1-based line number of the first bad line
    reason: str | None  # one line: "line N: <kind>: <why>"
    sealed_lines: tuple[int, ...] = ()  # torn fragment lines sealed off by torn-tail records

    def summary(self) -> str:
        """One line for `shmguard audit verify`."""
        if not self.ok:
            return f"BAD: {self.reason}"
        text = f"OK: {self.count} records, last seq {self.last_seq}"
        if self.sealed_lines:
            lines = ", ".join(str(number) for number in self.sealed_lines)
            text += f"; torn line(s) {lines} sealed by torn-tail records"
        return text


@dataclass
class _Fragment:
    number: int
    raw: bytes
    why: str


class _ChainCheck:
    """Walks the lines of a log in order and stops at the first one that breaks the chain."""

    def __init__(self) -> None:
        self.next_seq = 1
        self.last_hash = ZERO_HASH
        self.count = 0
        self.fragments: list[_Fragment] = []
        self.sealed: list[int] = []

    def feed(self, number: int, raw: bytes, rest: Iterator[tuple[int, bytes]]) -> tuple[int, str] | None:
        record, why = _parse_line(raw)
        if record is None:
            # Maybe torn bytes that a torn-tail record seals further on; judged when that record (or EOF) comes.
            self.fragments.append(_Fragment(number, raw, why))
            if len(self.fragments) > MAX_TORN_LINES:  # more than a torn-tail record may seal: stop holding them
                return self.fragments[0].number, f"not JSON: {self.fragments[0].why}"
            return None
        if self.fragments and record.get("action") != TORN_TAIL:
            first = self.fragments[0]
            return first.number, f"not JSON: {first.why}"
        problem = _record_problem(record, raw)
        if problem and self.fragments:
            first = self.fragments[0]
            return first.number, f"not JSON: {first.why} (the torn-tail record at line {number} is bad: {problem})"
        if problem:
            return number, problem
        failure = self._take_seal(record, number) or self._link(record, number, rest)
        if failure:
            return failure
        self.count += 1
        self.next_seq = record["seq"] + 1
        self.last_hash = record["hash"]
        return None

    def _take_seal(self, record: dict, number: int) -> tuple[int, str] | None:
        if record["action"] != TORN_TAIL:
            return None
        if not self.fragments:
            return number, "edited: torn-tail record with no torn line before it"
        first = self.fragments[0].number
        expected = _seal_detail(first, [fragment.raw for fragment in self.fragments])
        if not _seal_matches(record, expected):
            return first, f"edited: torn bytes differ from what the torn-tail record at line {number} sealed"
        self.sealed.extend(fragment.number for fragment in self.fragments)
        self.fragments = []
        return None

    def _link(self, record: dict, number: int, rest: Iterator[tuple[int, bytes]]) -> tuple[int, str] | None:
        seq, expected = record["seq"], self.next_seq
        if seq == expected:
            if record["prev"] != self.last_hash:
                return number, (
                    "chain broken: prev is not the hash of the record before it "
                    "(a record was deleted, replaced or moved)"
                )
            return None
        if seq > expected:
            later = _find_seq(rest, expected)
            if later is not None:
                return number, f"reordered: seq {seq} comes before seq {expected}, which is at line {later}"
            missing = f"record {expected} is" if seq == expected + 1 else f"records {expected}-{seq - 1} are"
            if expected == 1:
                return number, f"deleted: the first record has seq {seq}, not 1 ({missing} missing)"
            return number, f"deleted: seq jumps from {expected - 1} to {seq} ({missing} missing)"
        if seq == expected - 1:
            return number, f"reordered: seq {seq} appears twice"
        return number, f"reordered: seq goes backwards from {expected - 1} to {seq}"

    def finish(self) -> tuple[int, str] | None:
        if not self.fragments:
            return None
        first, last = self.fragments[0], self.fragments[-1]
        if first is not last:
            where = f"lines {first.number}-{last.number} end the log without a complete record"
        elif last.raw.endswith(b"\n"):
            where = "the last line is not complete JSON"
        else:
            where = "the last line has no final newline"
        return first.number, f"torn tail: {where} (a write was cut short)"


def _find_seq(rest: Iterable[tuple[int, bytes]], seq: int) -> int | None:
    """Line number of the first later record with this seq (tells a reordering from a deletion)."""
    for number, raw in rest:
        record, _ = _parse_line(raw)
        if record is not None and record.get("seq") == seq:
            return number
    return None


def verify(path: str | Path) -> VerifyResult:
    """Check every line of the log; stop at the first bad one and say why."""
    with _open_for_reading(Path(path)) as file:
        chain = _ChainCheck()
        lines = enumerate(file, 1)
        failure = None
        try:
            for number, raw in lines:
                failure = chain.feed(number, raw, lines)
                if failure:
                    break
        except OSError as err:
            raise ShmguardError(f"cannot read audit log {path}: {err.strerror}") from None
        failure = failure or chain.finish()
    last_seq = chain.next_seq - 1
    if failure:
        return VerifyResult(False, chain.count, last_seq, failure[0], f"line {failure[0]}: {failure[1]}")
    return VerifyResult(True, chain.count, last_seq, None, None, tuple(chain.sealed))


def _open_for_reading(path: Path) -> BinaryIO:
    # Any file the caller names may be read, but a FIFO must not hang `audit verify` or `audit show`.
    return os.fdopen(open_for_reading(path, "audit log"), "rb")


def read_records(path: str | Path, since: int | None = None) -> Iterator[dict]:
    """Records in file order (only seq > since if given). Does not verify: torn lines are skipped silently."""
    return _records_in(_open_for_reading(Path(path)), since)


def _records_in(file: BinaryIO, since: int | None) -> Iterator[dict]:
    with file:
        for raw in file:
            record, _ = _parse_line(raw)
            if record is None:
                continue
            seq = record.get("seq")
            if since is not None and not (isinstance(seq, int) and seq > since):
                continue
            yield record


# ---------------------------------------------------------------------------------------------------- show


def format_record(record: dict) -> str:
    """One human-readable line; every string a peer could influence is quoted so it cannot forge a line."""
    parts = [
        f"#{_text(record.get('seq', '?'))}",
        _text(record.get("time", "?")),
        _text(record.get("action", "?")),
        _text(record.get("result", "?")),
        _actor_text(record.get("actor")),
    ]
    for name in ("offset", "length"):
        if name in record:
            parts.append(f"{name}={_text(record[name])}")
    if "sha256" in record:
        parts.append(f"sha256={_text(record['sha256'])[:16]}")
    if "rings" in record:
        parts.append(f"rings={_rings_text(record['rings'])}")
    detail = record.get("detail")
    if isinstance(detail, dict):
        parts.extend(f"{_text(key)}={_text(detail[key])}" for key in sorted(detail))
    elif detail is not None:
        parts.append(f"detail={_text(detail)}")
    return " ".join(parts)


def _rings_text(rings: Any) -> str:
    """peer:vector,... (a held ring marked +held); none as '-'."""
    if not isinstance(rings, list) or not all(_is_ring(ring) for ring in rings):
        return _text(rings)
    texts = [f"{ring['peer']}:{ring['vector']}{'+held' if ring['held_until_ready'] else ''}" for ring in rings]
    return ",".join(texts) or "-"


def _actor_text(actor: Any) -> str:
    if actor is None:
        return "supervisor"
    if not _is_actor(actor):
        return f"actor={_text(actor)}"
    return f"pid={actor['pid']} uid={actor['uid']} gid={actor['gid']} exe={_text(actor['exe'])}"


def _text(value: Any) -> str:
    """Plain if printable ASCII without spaces, else JSON (escapes newlines and control characters)."""
    if isinstance(value, str):
        if value and all(33 <= ord(char) < 127 for char in value):
            return value
        return json.dumps(value)
    try:
        return canonical_json(value)
    except (TypeError, ValueError):
        return json.dumps(repr(value))


# ---------------------------------------------------------------------------------------------------- writing


@dataclass
class _Tail:
    last_seq: int
    last_hash: str
    torn: list[tuple[int, bytes]]  # (offset, bytes) of torn lines after the last record, oldest first


class AuditLog:
    """The one writer of an audit log. Use `AuditLog.open`; it continues the chain of an existing log."""

    def __init__(self, path: Path, fd: int, durable: bool) -> None:
        self.path = path
        self.durable = durable
        self.last_seq = 0
        self.synced_seq = 0  # every record up to here is on disk (or, not durable, written)
        self.torn_tail: str | None = None  # what open found torn and sealed, for the supervisor to report
        self._fd = fd
        self._last_hash = ZERO_HASH
        self._tail_unknown = True  # set again when a write fails: the file may end in a fragment

    @classmethod
    def open(cls, path: str | Path, durable: bool, owners: Iterable[int] | None = None) -> AuditLog:
        """owners: who besides root may own the log and its directories (default: the uid we run as)."""
        path = Path(path)
        fd = _open_for_append(path, durable, owners)
        log = cls(path, fd, durable)
        try:
            _lock(fd, path)
            log._take_up_tail()
        except BaseException:
            log.close()
            raise
        return log

    @classmethod
    def adopt(cls, path: str | Path, fd: int, durable: bool) -> AuditLog:
        """The log a predecessor had open (its flock goes with the open file), continued from its last record."""
        log = cls(Path(path), fd, durable)
        try:
            _lock(fd, log.path)
            log._take_up_tail()
        except BaseException:
            log.close()
            raise
        return log

    def append(
        self,
        action: str,
        *,
        result: str = "ok",
        actor: Actor | None = None,
        offset: int | None = None,
        length: int | None = None,
        sha256: str | None = None,
        detail: dict | None = None,
        rings: list[dict] | None = None,
        sync: bool = True,
    ) -> dict:
        """Append one record and return it. Bad arguments raise ValueError with the file untouched.

        sync=True: durable on return (one fsync, which covers every record written before it too); sync=False:
        in the file, durable at the next flush()."""
        if action == TORN_TAIL:
            raise ValueError("torn-tail records are written only by AuditLog itself")
        fields = _checked_fields(action, result, actor, offset, length, sha256, detail, rings)
        self._require_open()
        if self._tail_unknown:
            self._take_up_tail()
        return self._write_record(fields, sync=sync, actor_json="null" if actor is None else actor.json)

    @property
    def unsynced(self) -> bool:
        """Records are in the file that are not known to be on disk yet."""
        return self.synced_seq < self.last_seq

    def flush(self) -> None:
        """Make every record written so far durable: one fsync for all of them (nothing to do if not durable)."""
        if not self.unsynced:
            return
        self._require_open()
        if self.durable:
            try:
                os.fsync(self._fd)
            except OSError as err:
                raise self.sync_failed(err.errno) from None
        self.synced_seq = self.last_seq

    def synced_up_to(self, seq: int) -> None:
        """An fsync started when `seq` was the last record has returned: every record up to it is on disk."""
        self.synced_seq = max(self.synced_seq, seq)

    def sync_failed(self, error: int) -> ShmguardError:
        """An fsync of the log failed with `error`: the error to raise or report."""
        # The kernel may have dropped the pages: look at the tail again, and never count these records as durable
        # (a later fsync that succeeds says nothing of them).
        self._tail_unknown = True
        return ShmguardError(f"cannot sync audit log {self.path} to disk: {os.strerror(error)}")

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.flush()
            except ShmguardError as exc:
                log.error("%s; the last records may not be on disk", exc)
            os.close(self._fd)  # also releases the flock
            self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _require_open(self) -> None:
        if self._fd < 0:
            raise ValueError(f"audit log {self.path} is closed")

    def _write_record(self, fields: dict, prefix: bytes = b"", sync: bool = True,
                      actor_json: str | None = None) -> dict:
        record = {"seq": self.last_seq + 1, "time": _now(), **fields, "prev": self._last_hash}
        record["hash"], line = _sealed_line(record, actor_json)
        if len(line) > MAX_RECORD_BYTES:
            raise ValueError(f"audit record is larger than {MAX_RECORD_BYTES} bytes; shorten its detail")
        self._write_line(prefix + line, sync)
        self.last_seq, self._last_hash = record["seq"], record["hash"]
        if sync or not self.durable:
            self.synced_seq = self.last_seq
        return record

    def _write_line(self, line: bytes, sync: bool = True) -> None:
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(0, f"short write ({written} of {len(line)} bytes)")
            if self.durable and sync:
                os.fsync(self._fd)
        except OSError as err:
            # The file may now end in a fragment: look at the tail again before chaining on to it.
            self._tail_unknown = True
            raise ShmguardError(f"cannot append to audit log {self.path}: {err.strerror or err}") from None

    def _take_up_tail(self) -> None:
        """Continue from the last record; seal a torn tail; refuse a damaged one."""
        read_fd = _reopen_for_reading(self._fd, self.path)
        try:
            tail = _inspect_tail(read_fd, os.fstat(read_fd).st_size, self.path)
            if self.synced_seq < self.last_seq:
                self.synced_seq = min(self.synced_seq, tail.last_seq)  # what was not synced stays unconfirmed
            else:
                self.synced_seq = tail.last_seq
            self.last_seq, self._last_hash = tail.last_seq, tail.last_hash
            self._tail_unknown = False
            if tail.torn:
                self._seal(read_fd, tail.torn)
        finally:
            os.close(read_fd)

    def _seal(self, read_fd: int, torn: list[tuple[int, bytes]]) -> None:
        raws = [raw for _, raw in torn]
        first_line = _count_newlines(read_fd, torn[0][0]) + 1
        detail = _seal_detail(first_line, raws)
        terminated = raws[-1].endswith(b"\n")
        detail["reason"] = "incomplete JSON" if terminated else "no final newline"
        fields = {"action": TORN_TAIL, "result": "sealed", "actor": None, "detail": detail}
        # The newline that ends the fragment goes in the same write as the record that seals it.
        record = self._write_record(fields, prefix=b"" if terminated else b"\n")
        where = f"line {first_line} was" if len(raws) == 1 else f"lines {first_line}-{first_line + len(raws) - 1} were"
        self.torn_tail = (
            f"{where} torn ({detail['length']} bytes, {detail['reason']}); "
            f"sealed by torn-tail record seq {record['seq']}"
        )


def _open_for_append(path: Path, durable: bool, owners: Iterable[int] | None = None) -> int:
    """The log's directory (made 0750 if missing) and the file itself, checked: see shmguard/paths.py."""
    created_dirs = _ensure_directory(path.parent, owners)
    fd, created = open_log(path, os.O_WRONLY | os.O_APPEND, FILE_MODE, owners, "audit log")
    try:
        if created and durable:
            _fsync_directory(path.parent)
        if durable:
            for directory in created_dirs:
                _fsync_directory(Path(directory).parent)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _ensure_directory(directory: Path, owners: Iterable[int] | None = None) -> list[str]:
    """Create the log's directory (mode 0750) if missing and check every directory on the way to it.

    A directory someone untrusted could write is refused: they could plant a FIFO or rewrite the history."""
    return make_directory(directory, DIR_MODE, owners)


def _fsync_directory(directory: Path) -> None:
    # Without it a crash can lose the new file's directory entry along with every record in it.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ShmguardError(f"audit log {path} is in use by another supervisor") from None


def _reopen_for_reading(fd: int, path: Path) -> int:
    # A new description of the very inode we hold and locked, even if the path was renamed meanwhile.
    try:
        return reopen(fd, os.O_RDONLY)
    except OSError as err:
        raise ShmguardError(f"cannot read audit log {path}: {err.strerror}") from None


def _damaged(path: Path, what: str) -> ShmguardError:
    return ShmguardError(f"audit log {path} is damaged ({what}); run `shmguard audit verify {path}`")


def _lines_backwards(fd: int, size: int, path: Path) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of each line from the last to the first, reading the file backwards in chunks."""
    start, data = size, b""  # data = the file's bytes [start, start + len(data)) not yet handed out
    while True:
        cut = data.rfind(b"\n", 0, len(data) - 1)  # skip the current line's own newline
        if cut >= 0:
            yield start + cut + 1, data[cut + 1 :]
            data = data[: cut + 1]
        elif start == 0:
            if data:
                yield 0, data
            return
        elif len(data) > MAX_RECORD_BYTES:
            raise _damaged(path, f"a line near its end is longer than {MAX_RECORD_BYTES} bytes")
        else:
            step = min(_TAIL_CHUNK, start)
            start -= step
            data = os.pread(fd, step, start) + data


def _inspect_tail(fd: int, size: int, path: Path) -> _Tail:
    """Where the chain continues: the last record (checked with its link back) and any torn lines after it."""
    lines = _lines_backwards(fd, size, path)
    torn: list[tuple[int, bytes]] = []
    for offset, raw in lines:
        record, _ = _parse_line(raw)
        if record is not None:
            _check_last_record(record, raw, lines, path)
            return _Tail(record["seq"], record["hash"], torn[::-1])
        _check_torn(raw, path)
        torn.append((offset, raw))
        if len(torn) > MAX_TORN_LINES:
            raise _damaged(path, f"more than {MAX_TORN_LINES} lines at its end are not records")
    return _Tail(0, ZERO_HASH, torn[::-1])  # empty, or nothing but a torn first write


def _check_torn(raw: bytes, path: Path) -> None:
    # A cut record starts like one; a crash can also leave NUL bytes. Anything else is not ours to seal.
    body = raw.rstrip(b"\n").rstrip(b"\0")
    if body and not body.startswith(b"{"):
        raise _damaged(path, "its last line is not an audit record")


def _check_last_record(record: dict, raw: bytes, earlier: Iterator[tuple[int, bytes]], path: Path) -> None:
    problem = _record_problem(record, raw)
    if problem:
        raise _damaged(path, f"last record: {problem}")
    sealed: list[bytes] = []
    before = None
    for _, line in earlier:
        before, _ = _parse_line(line)
        if before is not None:
            problem = _record_problem(before, line)
            if problem:
                raise _damaged(path, f"record before the last: {problem}")
            break
        if record["action"] != TORN_TAIL or len(sealed) >= MAX_TORN_LINES:
            raise _damaged(path, "the line before its last record is not a record")
        sealed.insert(0, line)
    if record["action"] == TORN_TAIL and not (sealed and _seal_matches(record, _seal_detail(0, sealed), False)):
        raise _damaged(path, "its last torn-tail record does not match the bytes it seals")
    expected_seq, expected_prev = (1, ZERO_HASH) if before is None else (before["seq"] + 1, before["hash"])
    if record["seq"] != expected_seq or record["prev"] != expected_prev:
        raise _damaged(path, "its last record does not chain to the record before it")


def _count_newlines(fd: int, end: int) -> int:
    """Newlines in the first `end` bytes: only needed to name a torn line, so only read then."""
    count, offset = 0, 0
    while offset < end:
        chunk = os.pread(fd, min(_COUNT_CHUNK, end - offset), offset)
        if not chunk:
            break
        count += chunk.count(b"\n")
        offset += len(chunk)
    return count
