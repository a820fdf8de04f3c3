"""The control socket: authenticated JSON-line requests (write, ring, status) to a running supervisor.

Each request names an operation; the policy says which uids and groups may perform it, checked against
SO_PEERCRED of the connection. A bad request gets an error reply; the connection and supervisor survive.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import ControlError, ShmguardError
from .loop import EventLoop
from .policy import Access, ControlPolicy
from .server import PeerCred, bind_socket

log = logging.getLogger("shmguard.control")
MAX_CONNECTIONS = 64
MAX_PENDING_REPLIES = 1 << 20  # bytes of replies a client has not read before we stop reading its requests


@dataclass
class Request:
    """One request, answered exactly once with reply() (now or later, e.g. after the guest's ack)."""

    op: str
    body: dict
    cred: PeerCred
    connection: Connection

    def reply(self, **fields) -> None:
        self.connection.pending -= 1
        self.connection.send({"ok": True, **fields})

    def fail(self, error: str, **fields) -> None:
        self.connection.pending -= 1
        self.connection.send({"ok": False, "error": error, **fields})


Handler = Callable[[Request], None]


@dataclass(eq=False)
class Connection:
    sock: socket.socket
    cred: PeerCred
    loop: EventLoop
    on_readable: Callable[[], None]
    inbox: bytearray = field(default_factory=bytearray)
    scanned: int = 0  # bytes of inbox already searched for a newline
    outbox: bytearray = field(default_factory=bytearray)
    last_active: float = field(default_factory=time.monotonic)
    pending: int = 0  # requests not answered yet (a write may wait for the guest's acknowledgement)
    on_close: Callable[[], None] = lambda: None
    closed: bool = False

    def send(self, message: dict) -> None:
        if self.closed:
            return  # the requester went away; its reply has nowhere to go
        self.outbox += json.dumps(message, sort_keys=True).encode() + b"\n"
        self.flush()

    def flush(self) -> None:
        while self.outbox and not self.closed:
            try:
                sent = self.sock.send(self.outbox)
            except BlockingIOError:
                self.loop.add_writer(self.sock.fileno(), self.flush)
                break
            except OSError:
                self.close()
                return
            del self.outbox[:sent]
        if self.closed:
            return
        if not self.outbox:
            self.loop.remove_writer(self.sock.fileno())
        # A client that does not read its replies gets no more requests read: memory stays bounded.
        if len(self.outbox) > MAX_PENDING_REPLIES:
            self.loop.remove_reader(self.sock.fileno())
        else:
            self.loop.add_reader(self.sock.fileno(), self.on_readable)

    def next_line(self) -> bytes | None:
        """The next complete request line, searching only bytes not searched before."""
        end = self.inbox.find(b"\n", self.scanned)
        if end < 0:
            self.scanned = len(self.inbox)
            return None
        line = bytes(self.inbox[:end])
        del self.inbox[:end + 1]
        self.scanned = 0
        return line

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.sock.fileno())
            self.loop.remove_writer(self.sock.fileno())
            self.sock.close()
            self.on_close()  # however it ends (EOF, a failed send, a refusal), it frees its slot


class ControlServer:
    def __init__(self, policy: ControlPolicy, owner: int, group: int, loop: EventLoop, max_request: int):
        self.policy, self.owner, self.group, self.loop = policy, owner, group, loop
        self.max_request = max_request
        self.handlers: dict[str, tuple[Access, Handler]] = {}
        self.connections: set[Connection] = set()
        self.listener = None
        self.on_refused: Callable[[PeerCred, str, str], None] = lambda cred, op, reason: None

    def route(self, op: str, access: Access, handler: Handler) -> None:
        self.handlers[op] = (access, handler)

    def start(self) -> None:
        self.listener = bind_socket(self.policy.socket, self.owner, self.group, self.policy.mode)
        self.loop.add_reader(self.listener.sock.fileno(), self._on_accept)

    def rebind(self) -> None:
        """Put the socket back at its path; open connections are unaffected."""
        self.listener = self.listener.rebound(self.loop, self._on_accept)

    def _on_accept(self) -> None:
        self.listener.accept_waiting(self._admit, lambda: log.warning("control socket: out of file descriptors: "
                                                                      "refused a connection"))

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        connection = Connection(sock, PeerCred.of(sock), self.loop, lambda: self._on_readable(connection),
                                on_close=lambda: self.connections.discard(connection))
        if len(self.connections) >= MAX_CONNECTIONS:
            connection.send({"ok": False, "error": "too many control connections; try again"})
            connection.close()
            return
        self.connections.add(connection)
        self.loop.add_reader(sock.fileno(), connection.on_readable)
        self._close_when_idle(connection)

    def _close_when_idle(self, connection: Connection) -> None:
        idle = time.monotonic() - connection.last_active
        if connection.closed:
            return
        limit = self.policy.idle_seconds
        if idle >= limit and not connection.outbox and not connection.pending:
            connection.close()
            return
        self.loop.call_later(limit - min(idle, limit) + 0.01, lambda: self._close_when_idle(connection))

    def _on_readable(self, connection: Connection) -> None:
        try:
            data = connection.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            connection.close()
            return
        connection.last_active = time.monotonic()
        connection.inbox += data
        while not connection.closed and (line := connection.next_line()) is not None:
            self._dispatch(connection, line)
        if len(connection.inbox) > self.max_request:
            connection.send({"ok": False, "error": f"request longer than {self.max_request} bytes"})
            connection.close()

    def _dispatch(self, connection: Connection, line: bytes) -> None:
        body = parse_request(line)
        if isinstance(body, str):
            connection.send({"ok": False, "error": f"malformed request: {body}"})
            return
        op = body["op"]
        if op not in self.handlers:
            connection.send({"ok": False, "error": f"unknown op {op!r} (known: {', '.join(sorted(self.handlers))})"})
            return
        access, handler = self.handlers[op]
        request = Request(op, body, connection.cred, connection)
        connection.pending += 1
        if not access.admits(connection.cred.uid, connection.cred.gid, connection.cred.groups):
            reason = f"uid {connection.cred.uid} may not {op} (policy control section)"
            self.on_refused(connection.cred, op, reason)
            request.fail(reason)
            connection.close()  # one refusal, one record: a client with no rights cannot flood the log
            return
        try:
            handler(request)
        except ShmguardError as exc:
            request.fail(str(exc))
        except Exception:  # noqa: BLE001 - a bug must still answer the client, and keep the supervisor up
            log.exception("internal error handling %r", op)
            request.fail(f"internal error handling {op!r}; see the supervisor's log")

    def close(self) -> None:
        for connection in list(self.connections):
            connection.close()
        if self.listener is not None:
            self.loop.remove_reader(self.listener.sock.fileno())
            self.listener.remove()
            self.listener = None


def parse_request(line: bytes) -> dict | str:
    """The request object, or why it is not one (deeply nested JSON included: no RecursionError escapes)."""
    try:
        body = json.loads(line)
    except RecursionError:
        return "nested too deeply"
    except ValueError as exc:
        return f"not JSON: {exc}"
    if not isinstance(body, dict) or not isinstance(body.get("op"), str):
        return "a request is a JSON object with a string \"op\""
    return body


def request(path: str, body: dict, timeout: float | None = 30.0) -> dict:
    """Send one request and wait for its reply (the client side, used by the CLI)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(json.dumps(body).encode() + b"\n")
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
    return json.loads(reply)
