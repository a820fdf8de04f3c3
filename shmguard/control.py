"""The control protocol: one JSON line per request (write, ring, status, reload, send), one JSON line per reply.

Every request is a typed value here: `to_body()` is what a client sends, `parse(body)` what the server makes of
it (the request, or one line saying why not), so the client's encoding and the server's parsing are one module.
ControlClient is the one client: it refuses to send anything to a server whose SO_PEERCRED uid the caller did
not name (by default only root), so a local user who binds the path while no supervisor holds it receives
nothing. The server side (connections, shares, deadlines) is control_server.py.
"""

from __future__ import annotations

import base64
import binascii
import json
import socket
from collections.abc import Collection
from dataclasses import dataclass
from typing import ClassVar

from .client import ROOT_ONLY, untrusted_server
from .errors import ControlError
from .policy import SharesPolicy

DEFAULT_WAIT_SECONDS = SharesPolicy.wait_seconds  # the policy's bound on a write's timeout, unless it says otherwise
DEFAULT_TIMEOUT = 60.0  # seconds a waiting write waits for the guest's acknowledgement, unless the request says
REPLY_SLACK = 30.0  # seconds a client waits for a waiting write's reply beyond the write's own timeout


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
        return {"op": self.OP, "data": base64.b64encode(self.data).decode(), "offset": self.offset,
                "text": self.text, "ring": self.ring, "wait": self.wait, "timeout": self.timeout,
                "allow_unterminated": self.allow_unterminated}

    @classmethod
    def from_body(cls, body: dict, wait_seconds: float) -> WriteRequest:
        data = _decode_data(body.get("data"))
        offset = _whole_number(body.get("offset", 0), "offset")
        timeout = _seconds(body.get("timeout", DEFAULT_TIMEOUT), "timeout", wait_seconds)
        ring = body.get("ring")
        return cls(data, offset, bool(body.get("text")), str(ring) if ring else None, bool(body.get("wait")),
                   timeout, bool(body.get("allow_unterminated")))


@dataclass(frozen=True)
class RingRequest:
    """Ring 'guest', 'all', PEER or PEER:VECTOR (the supervisor checks the target against the peers it has)."""

    OP: ClassVar[str] = "ring"
    target: str

    def to_body(self) -> dict:
        return {"op": self.OP, "target": self.target}

    @classmethod
    def from_body(cls, body: dict, wait_seconds: float) -> RingRequest:
        return cls(str(body.get("target")))  # a missing target is 'None', refused as a target like any other


@dataclass(frozen=True)
class StatusRequest:
    OP: ClassVar[str] = "status"

    def to_body(self) -> dict:
        return {"op": self.OP}

    @classmethod
    def from_body(cls, body: dict, wait_seconds: float) -> StatusRequest:
        return cls()


@dataclass(frozen=True)
class ReloadRequest:
    """Read the policy again (no supervisor serves it yet: it answers "unknown op")."""

    OP: ClassVar[str] = "reload"

    def to_body(self) -> dict:
        return {"op": self.OP}

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


def parse_line(line: bytes) -> dict | str:
    """The request object of one line, or why it is not one (deeply nested JSON included: no RecursionError)."""
    try:
        body = json.loads(line)
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
    return json.dumps(request.to_body()).encode() + b"\n"


def _decode_data(value) -> bytes:
    if not isinstance(value, str):
        raise ControlError("a write needs \"data\": the bytes in base64")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
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


# --- the client ------------------------------------------------------------------------------------------


class ControlRefused(ControlError):
    """The supervisor answered, and refused: str() is its one line, `reply` the whole reply (a write whose
    acknowledgement timed out still carries its seq)."""

    def __init__(self, reply: dict):
        super().__init__(str(reply.get("error", "the supervisor refused the request")))
        self.reply = reply

    def __reduce__(self):  # pickled whole (a test's forked child sends it back to its parent)
        return type(self), (self.reply,)


class ControlClient:
    """Requests to the supervisor at `path`, one connection each, sent only to a server whose uid is in
    `answerers` (the CLI passes client.answering_uids(policy)); `timeout` bounds each reply (None: no bound)."""

    def __init__(self, path: str, answerers: Collection[int] = ROOT_ONLY, timeout: float | None = 30.0):
        self.path, self.answerers, self.timeout = path, frozenset(answerers), timeout

    def write(self, data: bytes, offset: int = 0, *, text: bool = False, ring: str | None = None, wait: bool = False,
              timeout: float = DEFAULT_TIMEOUT, allow_unterminated: bool = False) -> dict:
        return self.call(WriteRequest(data, offset, text, ring, wait, timeout, allow_unterminated))

    def ring(self, target: str) -> dict:
        return self.call(RingRequest(target))

    def status(self) -> dict:
        return self.call(StatusRequest())

    def send(self, source: int, target: int, data: bytes, timeout: float = DEFAULT_TIMEOUT) -> dict:
        return self.call(SendRequest(source, target, data, timeout))

    def reload(self) -> dict:
        return self.call(ReloadRequest())

    def call(self, request: ControlRequest) -> dict:
        """The reply of a request the supervisor carried out; ControlRefused (a ControlError) if it refused it."""
        reply = self.ask(request)
        if not reply.get("ok"):
            raise ControlRefused(reply)
        return reply

    def ask(self, request: ControlRequest) -> dict:
        """The reply as the supervisor sent it, ok or not; ControlError if none came."""
        return self.exchange(encode(request), self._reply_seconds(request))

    def exchange(self, line: bytes, timeout: float | None = None) -> dict:
        """Send one line and read one reply line: for requests that are not typed on purpose (hostile-input
        tests); everything else goes through ask()."""
        path = self.path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            if (why := untrusted_server(sock, path, self.answerers)) is not None:
                raise ControlError(why)
            sock.sendall(line)
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise ControlError(f"{path}: the supervisor closed the connection without a reply")
                reply += chunk
        except TimeoutError:
            raise ControlError(f"{path}: no reply from the supervisor within {timeout:g} s") from None
        except FileNotFoundError:
            raise ControlError(f"{path}: no control socket (is `shmguard run` running with this policy?)") from None
        except PermissionError:
            raise ControlError(f"{path}: permission denied (the policy's control socket mode/group)") from None
        except ConnectionRefusedError:
            raise ControlError(f"{path}: nothing is listening (stale socket: is the supervisor running?)") from None
        except OSError as exc:
            raise ControlError(f"{path}: cannot talk to the supervisor: {exc.strerror or exc}") from None
        finally:
            sock.close()
        try:
            return json.loads(reply)
        except ValueError:
            raise ControlError(f"{path}: the reply is not JSON") from None

    def _reply_seconds(self, request: ControlRequest) -> float | None:
        """A write that waits for the guest may take its own timeout, and then some, to be answered."""
        if self.timeout is None or not getattr(request, "wait", False):
            return self.timeout
        return max(self.timeout, request.timeout + REPLY_SLACK)
