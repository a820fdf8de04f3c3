"""The control protocol: one JSON line per request (write, ring, status, reload, send), one JSON line per reply.

Every request is a typed value here: `to_body()` is what a client sends, `parse(body)` what the server makes of
it (the request, or one line saying why not), so the client's encoding and the server's parsing are one module.
ControlClient (control_client.py, re-exported here) is the one client: it refuses to send anything to a server
whose SO_PEERCRED uid the caller did not name (by default only root), so a local user who binds the path while no
supervisor holds it receives nothing. The server side (connections, shares, deadlines) is control_server.py.

A request may carry an "id", a whole number the reply echoes (request_echo), so that pipelined requests on one
connection are matched to their replies whatever order those come in.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import ClassVar

from .control_client import (  # noqa: F401 - the client's names, re-exported: shmguard.control is the API
    DEFAULT_TIMEOUT,
    MAX_REQUEST_ID,
    REPLY_SLACK,
    ControlClient,
    ControlRefused,
    encode_body,
    reload_body,
    ring_body,
    status_body,
    write_body,
)
from .errors import ControlError
from .policy import SharesPolicy

DEFAULT_WAIT_SECONDS = SharesPolicy.wait_seconds  # the policy's bound on a write's timeout, unless it says otherwise


@dataclass(frozen=True)
class WriteRequest:
    """Bytes at an offset; `text` pads with NULs after them (to the end of the region or of the guest's room);
    `ring` rings a target once the write is recorded; `wait` waits for the built-in guest's acknowledgement."""

    OP: ClassVar[str] = "write"
    data: bytes
    offset: int = 0
    text: bool = False
    ring: str | None = None
    wait: bool = False
    timeout: float = DEFAULT_TIMEOUT
    allow_unterminated: bool = False

    def to_body(self) -> dict:
        return write_body(self.data, self.offset, self.text, self.ring, self.wait, self.timeout,
                          self.allow_unterminated)

    @classmethod
    def from_body(cls, body: dict, wait_seconds: float) -> WriteRequest:
        data = _decode_data(body.get("data"))
        offset = _whole_number(body.get("offset", 0), "offset")
        timeout = _seconds(body.get("timeout", DEFAULT_TIMEOUT), "timeout", wait_seconds)
        ring = body.get("ring")
        # As cls(...) makes it, without the frozen __init__'s setattr per field: one of these per write request.
        request = object.__new__(cls)
        request.__dict__.update(data=data, offset=offset, text=bool(body.get("text")),
                                ring=str(ring) if ring else None, wait=bool(body.get("wait")), timeout=timeout,
                                allow_unterminated=bool(body.get("allow_unterminated")))
        return request


@dataclass(frozen=True)
class RingRequest:
    """Ring 'guest', 'all', PEER or PEER:VECTOR (the supervisor checks the target against the peers it has)."""

    OP: ClassVar[str] = "ring"
    target: str

    def to_body(self) -> dict:
        return ring_body(self.target)

    @classmethod
    def from_body(cls, body: dict, wait_seconds: float) -> RingRequest:
        return cls(str(body.get("target")))  # a missing target is 'None', refused as a target like any other


@dataclass(frozen=True)
class StatusRequest:
    OP: ClassVar[str] = "status"

    def to_body(self) -> dict:
        return status_body()

    @classmethod
    def from_body(cls, body: dict, wait_seconds: float) -> StatusRequest:
        return cls()


@dataclass(frozen=True)
class ReloadRequest:
    """Read the policy again and take over in place (`shmguard reload`; root and the supervisor's uid only)."""

    OP: ClassVar[str] = "reload"

    def to_body(self) -> dict:
        return reload_body()

    @classmethod
    def from_body(cls, body: dict, wait_seconds: float) -> ReloadRequest:
        return cls()


@dataclass(frozen=True)
class SendRequest:
    """Ask built-in guest `source` to send `data` to guest `target` (guest numbers, as `status` lists them) through
    the region and its own doorbell; the reply is the sender's report, once the receiver has acknowledged."""

    OP: ClassVar[str] = "send"
    wait: ClassVar[bool] = True  # the reply comes with the report: up to `timeout` seconds
    source: int
    target: int
    data: bytes
    timeout: float = DEFAULT_TIMEOUT

    def to_body(self) -> dict:
        return {"op": self.OP, "from": self.source, "to": self.target, "data": base64.b64encode(self.data).decode(),
                "timeout": self.timeout}

    @classmethod
    def from_body(cls, body: dict, wait_seconds: float) -> SendRequest:
        return cls(_whole_number(body.get("from"), "from"), _whole_number(body.get("to"), "to"),
                   _decode_data(body.get("data")), _seconds(body.get("timeout", DEFAULT_TIMEOUT), "timeout",
                                                            wait_seconds))


ControlRequest = WriteRequest | RingRequest | StatusRequest | ReloadRequest | SendRequest
REQUEST_TYPES: dict[str, type[ControlRequest]] = {kind.OP: kind for kind in (WriteRequest, RingRequest, StatusRequest,
                                                                             ReloadRequest, SendRequest)}


_scan = json.JSONDecoder().scan_once  # json.loads' own scanner (C), without its per-call wrappers
_SPACE = " \t\n\r"  # JSON's whitespace


def _loads(line: bytes):
    """json.loads(line), faster for the common line (UTF-8, starting with "{"); anything else, and every error,
    is json.loads' own, so what is accepted and what a refusal says do not change."""
    if line[:1] == b"{" and line[1:2] != b"\0":  # json.loads would take it as UTF-8 too
        try:
            text = line.decode("utf-8", "surrogatepass")
            body, end = _scan(text, 0)
            if not text[end:].strip(_SPACE):
                return body
        except (UnicodeDecodeError, ValueError, StopIteration):
            pass
    return json.loads(line)


def parse_line(line: bytes) -> dict | str:
    """The request object of one line, or why it is not one (deeply nested JSON included: no RecursionError)."""
    try:
        body = _loads(line)
    except RecursionError:
        return "nested too deeply"
    except ValueError as exc:
        return f"not JSON: {exc}"
    if not isinstance(body, dict) or not isinstance(body.get("op"), str):
        return "a request is a JSON object with a string \"op\""
    return body


def parse(body: dict, wait_seconds: float = DEFAULT_WAIT_SECONDS) -> ControlRequest | str:
    """The typed request of a request object (see parse_line), or the one line that says what is wrong with it.
    wait_seconds is the policy's bound on a write's timeout (shares.wait_seconds)."""
    op = body.get("op")
    kind = REQUEST_TYPES.get(op) if isinstance(op, str) else None
    if kind is None:
        return f"unknown op {str(op)[:64]!r} (known: {', '.join(sorted(REQUEST_TYPES))})"
    try:
        return kind.from_body(body, wait_seconds)
    except ControlError as exc:
        return str(exc)


def encode(request: ControlRequest) -> bytes:
    """The request as the line a client sends."""
    return encode_body(request.to_body())


def request_echo(body: dict) -> dict:
    """What a reply to this request object echoes: its "id" when that is a whole number from 0 to MAX_REQUEST_ID
    (anything else is not echoed: a reply never grows with what the request sent)."""
    value = body.get("id")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_REQUEST_ID:
        return {"id": value}
    return {}


def _decode_data(value) -> bytes:
    if not isinstance(value, str):
        raise ControlError("a write needs \"data\": the bytes in base64")
    try:
        return binascii.a2b_base64(value, strict_mode=True)  # what base64.b64decode(value, validate=True) runs
    except ValueError:  # binascii.Error, or a character that is not ASCII
        raise ControlError("\"data\" is not valid base64") from None


def _seconds(value, name: str, limit: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= limit:
        raise ControlError(f"{name} {value!r} must be a number of seconds above 0 and at most {limit:g} "
                           "(policy shares.wait_seconds)")
    return float(value)


def _whole_number(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ControlError(f"{name} {value!r} must be a whole number")
    return value
