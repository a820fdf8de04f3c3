"""The client side of the control protocol: ControlClient, and the request bodies it sends.

control.py holds the schema as typed requests and the server's parsing; their to_body() are the functions here,
so the client's encoding and the server's parsing still meet in one place. This module imports nothing heavy
(no json, socket, dataclasses or typing: C modules only), because `shmguard write` starts a new process per
message and every millisecond of import is paid per message (see shmguard/lean.py).

ControlClient refuses to send anything to a server whose SO_PEERCRED uid the caller did not name (by default only
root), so a local user who binds the path while no supervisor holds it receives nothing.
"""

from __future__ import annotations

import _socket  # socket.py adds enums and makefile() for ~5 ms of imports; a client needs none of them
import binascii
import pwd
import select
import struct

# The C halves of json (CPython's): the same escaping and parsing as json.dumps and json.loads, without json's
# import of re.
from _json import encode_basestring_ascii as _quote
from _json import make_scanner as _make_scanner

from .errors import ControlError

ROOT_ONLY = frozenset({0})  # who answers when the caller names nobody: refuse everything else
DEFAULT_TIMEOUT = 60.0  # seconds a waiting write waits for the guest's acknowledgement, unless the request says
REPLY_SLACK = 30.0  # seconds a client waits for a waiting write's reply beyond the write's own timeout
MAX_REQUEST_ID = (1 << 63) - 1  # ids a supervisor echoes in its replies (control_server.py)
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


# --- request bodies (the typed requests of control.py send these) ------------------------------------------


def write_body(data: bytes, offset: int = 0, text: bool = False, ring: str | None = None, wait: bool = False,
               timeout: float = DEFAULT_TIMEOUT, allow_unterminated: bool = False) -> dict:
    return {"op": "write", "data": binascii.b2a_base64(data, newline=False).decode(), "offset": offset,
            "text": text, "ring": ring, "wait": wait, "timeout": timeout, "allow_unterminated": allow_unterminated}


def ring_body(target: str) -> dict:
    return {"op": "ring", "target": target}


def status_body() -> dict:
    return {"op": "status"}


def reload_body() -> dict:
    return {"op": "reload"}


def encode_body(body: dict) -> bytes:
    """A request body as the line a client sends: exactly json.dumps(body) and a newline, for the values a body
    holds (str, int, float, bool, None)."""
    return ("{" + ", ".join(f"{_quote(key)}: {_value(value)}" for key, value in body.items()) + "}\n").encode()


def _value(value) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):  # as json.dumps writes them, NaN and Infinity included (the server refuses those)
        if value != value:
            return "NaN"
        return float.__repr__(value) if abs(value) != float("inf") else ("Infinity" if value > 0 else "-Infinity")
    raise ControlError(f"a control request cannot hold {value!r}")


class _Strict:
    """What the C scanner asks of json.JSONDecoder: plain dicts and numbers; NaN and Infinity are not JSON."""

    strict, object_hook, object_pairs_hook, parse_float, parse_int, memo = True, None, None, float, int, {}

    @staticmethod
    def parse_constant(name: str):
        raise ValueError(name)


_scan = _make_scanner(_Strict())
_SPACE = " \t\n\r"  # JSON's whitespace


def decode_reply(line: bytes, where: str) -> dict:
    """One reply line as an object; ControlError if it is not a JSON object."""
    try:
        text = line.decode()
        reply, end = _scan(text, len(text) - len(text.lstrip(_SPACE)))
    except (UnicodeDecodeError, ValueError, StopIteration, RecursionError):
        raise ControlError(f"{where}: the reply is not JSON") from None
    if text[end:].strip(_SPACE):
        raise ControlError(f"{where}: the reply is not JSON")
    if not isinstance(reply, dict):
        raise ControlError(f"{where}: the reply is not a JSON object")
    return reply


# --- who serves the socket --------------------------------------------------------------------------------


def peer_uid(sock) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a connected UNIX socket: SO_PEERCRED."""
    pid, uid, _ = _UCRED.unpack(sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _UCRED.size))
    return pid, uid


def untrusted_server(sock, path: str, answerers) -> str | None:
    """Why the server at the other end of the connected sock must not be talked to, or None."""
    pid, uid = peer_uid(sock)
    if uid in answerers:
        return None
    trusted = ", ".join(f"{_user_name(u)} ({u})" for u in sorted(answerers))
    return (f"{path}: refused: the socket is served by uid {uid} ({_user_name(uid)}, pid {pid}), not by the policy's "
            f"{trusted}; nothing was sent (someone else may have bound the path while no supervisor held it: "
            "remove it and start the supervisor)")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "no such user"


# --- the client --------------------------------------------------------------------------------------------


class ControlRefused(ControlError):
    """The supervisor answered, and refused: str() is its one line, `reply` the whole reply (a write whose
    acknowledgement timed out still carries its seq)."""

    def __init__(self, reply: dict):
        super().__init__(str(reply.get("error", "the supervisor refused the request")))
        self.reply = reply

    def __reduce__(self):  # pickled whole (a test's forked child sends it back to its parent)
        return type(self), (self.reply,)


class ControlClient:
    """Requests to the supervisor at `path`, sent only to a server whose uid is in `answerers` (the CLI passes
    client.answering_uids(policy)); `timeout` bounds each reply (None: no bound). Each request has a connection
    of its own, except those of connect(), which share one."""

    def __init__(self, path: str, answerers=ROOT_ONLY, timeout: float | None = 30.0):
        self.path, self.answerers, self.timeout = path, frozenset(answerers), timeout

    def write(self, data: bytes, offset: int = 0, *, text: bool = False, ring: str | None = None, wait: bool = False,
              timeout: float = DEFAULT_TIMEOUT, allow_unterminated: bool = False) -> dict:
        return self.call_body(write_body(data, offset, text, ring, wait, timeout, allow_unterminated))

    def ring(self, target: str) -> dict:
        return self.call_body(ring_body(target))

    def status(self) -> dict:
        return self.call_body(status_body())

    def reload(self) -> dict:
        return self.call_body(reload_body())

    def send(self, source: int, target: int, data: bytes, timeout: float = DEFAULT_TIMEOUT) -> dict:
        """Ask built-in guest `source` to send `data` to guest `target`; the reply is the sender's report."""
        return self.call_body({"op": "send", "from": source, "to": target,
                               "data": binascii.b2a_base64(data, newline=False).decode(), "timeout": timeout})

    def call(self, request) -> dict:
        """The reply of a typed request (control.py) the supervisor carried out; ControlRefused (a ControlError)
        if it refused it."""
        return self.call_body(request.to_body())

    def ask(self, request) -> dict:
        """The reply to a typed request as the supervisor sent it, ok or not; ControlError if none came."""
        body = request.to_body()
        return self.exchange(encode_body(body), self.reply_seconds(body))

    def call_body(self, body: dict) -> dict:
        reply = self.exchange(encode_body(body), self.reply_seconds(body))
        if not reply.get("ok"):
            raise ControlRefused(reply)
        return reply

    def exchange(self, line: bytes, timeout: float | None = None) -> dict:
        """Send one line and read one reply line: for requests that are not typed on purpose (hostile-input
        tests); everything else goes through ask()."""
        with self.connect(timeout) as connection:
            connection.send(line)
            return connection.receive()

    def connect(self, timeout: float | None = None) -> Connection:
        """One connection to the trusted server, for requests sent one after another or pipelined."""
        return Connection(self, timeout)

    def reply_seconds(self, body: dict) -> float | None:
        """A write that waits for the guest may take its own timeout, and then some, to be answered."""
        waits = body.get("op") == "send" or (body.get("op") == "write" and body.get("wait"))
        if self.timeout is None or not waits:
            return self.timeout
        return max(self.timeout, body["timeout"] + REPLY_SLACK)


class Connection:
    """A connection to the supervisor, connected and its server's uid checked before anything is sent. Every
    failure is one ControlError line naming the socket."""

    def __init__(self, client: ControlClient, timeout: float | None):
        self.path, self.timeout = client.path, timeout
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        self.received = b""  # bytes after the last complete reply line
        try:
            with self._errors():
                self.sock.settimeout(timeout)
                self.sock.connect(self.path)
                if (why := untrusted_server(self.sock, self.path, client.answerers)) is not None:
                    raise ControlError(why)
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.sock.settimeout(timeout)

    def send(self, line: bytes) -> None:
        with self._errors():
            self.sock.sendall(line)

    def send_some(self, data: bytes | memoryview) -> int:
        """As much of data as the socket takes now (the socket is non-blocking: settimeout(0)); 0 if none."""
        with self._errors():
            try:
                return self.sock.send(data)
            except BlockingIOError:
                return 0

    def receive(self) -> dict:
        """The next reply; ControlError if the connection ends or the time runs out first."""
        while (reply := self.next_reply()) is None:
            self.read_some()
        return reply

    def next_reply(self) -> dict | None:
        """A reply already received whole, or None."""
        end = self.received.find(b"\n")
        if end < 0:
            return None
        line, self.received = self.received[:end], self.received[end + 1:]
        return decode_reply(line, self.path)

    def read_some(self) -> bool:
        """Read what has arrived (waiting up to the timeout for something); False if nothing could be read now
        on a non-blocking socket; ControlError if the supervisor closed the connection."""
        with self._errors():
            try:
                chunk = self.sock.recv(1 << 16)
            except BlockingIOError:
                return False
        if not chunk:
            raise ControlError(f"{self.path}: the supervisor closed the connection without a reply")
        self.received += chunk
        return True

    def _errors(self):
        return _ConnectionErrors(self.path, self.timeout)


class _ConnectionErrors:
    """OSErrors of a control connection as one ControlError line each (a context manager, without contextlib)."""

    def __init__(self, path: str, timeout: float | None):
        self.path, self.timeout = path, timeout

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, _traceback) -> None:
        if kind is None or not issubclass(kind, OSError):
            return
        path = self.path
        if issubclass(kind, TimeoutError):
            raise ControlError(f"{path}: no reply from the supervisor within {self.timeout:g} s") from None
        if issubclass(kind, FileNotFoundError):
            raise ControlError(f"{path}: no control socket (is `shmguard run` running with this policy?)") from None
        if issubclass(kind, PermissionError):
            raise ControlError(f"{path}: permission denied (the policy's control socket mode/group)") from None
        if issubclass(kind, ConnectionRefusedError):
            raise ControlError(f"{path}: nothing is listening (stale socket: is the supervisor running?)") from None
        raise ControlError(f"{path}: cannot talk to the supervisor: {exc.strerror or exc}") from None


class Pipeline:
    """Requests sent ahead on one connection: at most `window` unanswered (and, beyond the first, at most
    `window_bytes` of them), each numbered with an "id" the supervisor echoes in its reply, so a reply is matched
    to its request whatever order the replies come in (a refusal can overtake a write waiting for the guest).

    Until a reply has shown that the supervisor echoes ids, one request at a time: replies then come in order.
    Replies collect in `answered` as (key, reply). A reply with no id while ids are echoed is about the connection,
    not a request: like a connection that ends, it raises ControlError; `unanswered` then names the requests whose
    outcome is unknown."""

    def __init__(self, connection: Connection, window: int, window_bytes: int = 1 << 20):
        self.connection, self.window, self.window_bytes = connection, max(1, window), window_bytes
        self.unanswered: dict[int, object] = {}  # id -> the caller's key, in the order sent
        self.answered: list[tuple[object, dict]] = []
        self.echoes: bool | None = None  # None until the first reply says
        self._out = bytearray()  # bytes of the requests sent ahead, not yet taken by the socket
        self._sizes: dict[int, int] = {}
        self._pending_bytes = 0
        self._ids = 0
        self._timeout = connection.timeout
        connection.settimeout(0)
        self._poller = select.poll()  # one for the connection, its interest in POLLOUT changed only when it must
        self._polling_out = False
        self._poller.register(connection.fileno(), select.POLLIN)

    def send(self, key, body: dict) -> None:
        """Send a request, first waiting while the window is full."""
        while self._full():
            self._pump()
        self._ids += 1
        line = encode_body({**body, "id": self._ids})
        self.unanswered[self._ids] = key
        self._sizes[self._ids] = len(line)
        self._pending_bytes += len(line)
        self._out += line
        if len(self._out) == len(line):  # nothing was waiting for the socket: try it at once, without a poll
            try:
                del self._out[:self.connection.send_some(self._out)]
            except ControlError:  # it hung up: what it said before that says more than EPIPE
                self._read()
                raise
        if self._out:
            self._pump(block=False)

    def finish(self) -> None:
        """Wait for every reply still owed."""
        while self.unanswered:
            self._pump()

    def take(self) -> list[tuple[object, dict]]:
        """The replies received since the last take(), as (key, reply), in the order they came."""
        answered, self.answered = self.answered, []
        return answered

    def idle_and_closed(self) -> bool:
        """Whether the supervisor has closed the connection with nothing owed (it closes one idle for
        control.idle_seconds); the replies that came are read first. ControlError if it closed with replies owed."""
        if self._out:
            return False
        try:
            while self._pump(block=False):
                pass
        except ControlError:
            if self.unanswered:
                raise
            return True
        return False

    def _full(self) -> bool:
        count = len(self.unanswered)
        if not count:
            return False
        if not self.echoes:
            return True
        return count >= self.window or self._pending_bytes >= self.window_bytes

    def _pump(self, block: bool = True) -> bool:
        """Read what has come and send what the socket takes; with block, wait (up to the timeout) for either.
        Whether anything happened."""
        connection = self.connection
        if self._polling_out != bool(self._out):
            self._polling_out = bool(self._out)
            self._poller.modify(connection.fileno(), select.POLLIN | (select.POLLOUT if self._out else 0))
        timeout = None if self._timeout is None else self._timeout * 1000
        events = self._poller.poll(timeout if block else 0)
        if block and not events:
            raise ControlError(f"{connection.path}: no reply from the supervisor within {self._timeout:g} s")
        for _fd, event in events:
            if event & ~select.POLLOUT:
                self._read()
            if event & select.POLLOUT and self._out:
                try:
                    del self._out[:connection.send_some(self._out)]
                except ControlError:  # it hung up: what it said before that says more than EPIPE
                    self._read()
                    raise
        return bool(events)

    def _read(self) -> None:
        try:
            self.connection.read_some()
        finally:  # the replies that came before the connection ended are answers too
            while (reply := self.connection.next_reply()) is not None:
                self.answered.append(self._match(reply))

    def _match(self, reply: dict) -> tuple[object, dict]:
        request_id = reply.get("id")
        if self.echoes is None:
            self.echoes = request_id is not None
        if not self.echoes:  # one request at a time: the reply is the only one owed
            request_id = next(iter(self.unanswered), None)
        if request_id not in self.unanswered:
            raise ControlError(f"{self.connection.path}: {reply.get('error') or 'a reply to no request'}")
        self._pending_bytes -= self._sizes.pop(request_id)
        return self.unanswered.pop(request_id), reply
