"""The control socket: authenticated JSON-line requests (write, ring, status) to a running supervisor.

Each request names an operation; the policy says which uids and groups may perform it, checked against
SO_PEERCRED of the connection. A bad request gets an error reply; the connection and supervisor survive.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import ControlError
from .loop import EventLoop
from .policy import Access, ControlPolicy
from .server import PeerCred, bind_socket

log = logging.getLogger("shmguard.control")
MAX_CONNECTIONS = 64


@dataclass
class Request:
    """One request, answered exactly once with reply() (now or later, e.g. after the guest's ack)."""

    op: str
    body: dict
    cred: PeerCred
    connection: Connection

    def reply(self, **fields) -> None:
        self.connection.send({"ok": True, **fields})

    def fail(self, error: str, **fields) -> None:
        self.connection.send({"ok": False, "error": error, **fields})


Handler = Callable[[Request], None]


@dataclass(eq=False)
class Connection:
    sock: socket.socket
    cred: PeerCred
    loop: EventLoop
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytearray = field(default_factory=bytearray)
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
                return
            except OSError:
                self.close()
                return
            del self.outbox[:sent]
        if not self.closed:
            self.loop.remove_writer(self.sock.fileno())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.sock.fileno())
            self.loop.remove_writer(self.sock.fileno())
            self.sock.close()


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
        connection = Connection(sock, PeerCred.of(sock), self.loop)
        if len(self.connections) >= MAX_CONNECTIONS:
            connection.send({"ok": False, "error": "too many control connections; try again"})
            connection.close()
            return
        self.connections.add(connection)
        self.loop.add_reader(sock.fileno(), lambda: self._on_readable(connection))

    def _on_readable(self, connection: Connection) -> None:
        try:
            data = connection.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(connection)
            return
        connection.inbox += data
        while b"\n" in connection.inbox:
            line, _, rest = bytes(connection.inbox).partition(b"\n")
            connection.inbox = bytearray(rest)
            self._dispatch(connection, line)
        if len(connection.inbox) > self.max_request:
            connection.send({"ok": False, "error": f"request longer than {self.max_request} bytes"})
            self._drop(connection)

    def _dispatch(self, connection: Connection, line: bytes) -> None:
        try:
            body = json.loads(line)
            if not isinstance(body, dict) or not isinstance(body.get("op"), str):
                raise ValueError("a request is a JSON object with a string \"op\"")
        except ValueError as exc:
            connection.send({"ok": False, "error": f"malformed request: {exc}"})
            return
        op = body["op"]
        if op not in self.handlers:
            connection.send({"ok": False, "error": f"unknown op {op!r} (known: {', '.join(sorted(self.handlers))})"})
            return
        access, handler = self.handlers[op]
        request = Request(op, body, connection.cred, connection)
        if not access.admits(connection.cred.uid, connection.cred.gid):
            reason = f"uid {connection.cred.uid} may not {op} (policy control section)"
            self.on_refused(connection.cred, op, reason)
            request.fail(reason)
            return
        try:
            handler(request)
        except ControlError as exc:
            request.fail(str(exc))

    def _drop(self, connection: Connection) -> None:
        self.connections.discard(connection)
        connection.close()

    def close(self) -> None:
        for connection in list(self.connections):
            self._drop(connection)
        if self.listener is not None:
            self.loop.remove_reader(self.listener.sock.fileno())
            self.listener.remove()
            self.listener = None


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
    finally:
        sock.close()
    return json.loads(reply)
