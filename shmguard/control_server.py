"""The control socket's server: authenticated JSON-line requests (see control.py) to a running supervisor.

Each request names an operation; the policy says which uids and groups may perform it, checked against
SO_PEERCRED of the connection. A bad request gets an error reply; the connection and supervisor survive. The
request's fields are parsed (control.parse) only for a uid the operation admits, and the handler routed for its
type receives it typed, as Request.message.

What the supervisor holds for its control clients is bounded by the policy's [shares] (see SECURITY.md):
- connections: `shares.connections` in all, `connections_per_uid` for one uid, and the last
  `connections_reserved` only for `shares.reserved_for` (root). A refused connection gets one error line.
- bytes: request bytes read but not yet dispatched plus reply bytes not yet read count against
  `shares.buffer_bytes_per_uid` for the uid and `shares.buffer_bytes` in all. The reserve is one uid's share
  (at most half the total): other uids together hold at most the total minus it, and `reserved_for` uids are
  bounded by the total alone. A uid at its bound is not read from (the kernel keeps the rest); a uid whose bytes
  are all unfinished request lines could never finish one, so the connection asking for more is refused.
- time: a request line must arrive whole within `shares.request_seconds` of its first byte, and each reply
  must be read within `shares.request_seconds` of being queued; with nothing pending and nothing arriving a
  connection is closed after `control.idle_seconds`. A write waiting for the guest's acknowledgement is bounded
  by its own timeout, not by these.
- pipelining: requests are dispatched only while the connection's unread replies are under OUTBOX_LIMIT.

A reply that tells of a record (a write's, a ring's) goes out only once that record is on disk: it is held until
the audit log's flush at the end of the loop's turn (group commit: the writes of one batch share one fsync), and
becomes a failure if the flush fails. Replies leave each connection in the order they were given, held or not;
those given in one turn of the loop leave together, in one send at the end of the turn (a connection closed in
the turn still sends what the socket takes of them first). The one exception is a reply its requester waits for
alone (a write's, once the guest acknowledged it: `reply_once_recorded(promptly=True)`): it is sent the moment it
may go, with whatever is queued before it, and the work that follows it in the turn (a log line, the guard's copy
of the guest's reply area) runs while the requester reads it.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from json.encoder import c_make_encoder, encode_basestring_ascii

from .audit import Actor
from .control import ControlRequest, parse, parse_line, request_echo
from .errors import ShmguardError
from .linux.sockets import PeerCred
from .loop import EventLoop
from .policy import Access, ControlPolicy, SharesPolicy
from .server import BoundSocket, bind_socket
from .shares import Share

log = logging.getLogger("shmguard.control")
READ_CHUNK = 1 << 16
OUTBOX_LIMIT = 256 << 10  # unread reply bytes of one connection before none of its requests are dispatched
MAX_ERROR = 2048  # characters of an error reply: a reply never grows with what the request sent
CLOCK_SLACK = 0.01  # a deadline check runs just after the deadline, never just before it


@dataclass
class Request:
    """One request, answered exactly once with reply() (now or later, e.g. after the guest's ack); `message` is
    what it asks, typed (control.py)."""

    op: str
    message: ControlRequest | None  # None only in a refusal sent before the request was parsed
    cred: PeerCred
    connection: Connection
    echo: dict = field(default_factory=dict)  # the request's "id", echoed in its reply (control.request_echo)

    def reply(self, **fields) -> None:
        self.connection.pending -= 1
        self.connection.send({"ok": True, **fields, **self.echo})

    def reply_once_recorded(self, seq: int, /, promptly: bool = False, **fields) -> None:
        """reply(), once audit record `seq` (what the reply tells of) is on disk; a failure if it cannot be.
        promptly: someone waits for this one reply (a write's, once the guest acknowledged it): it is sent as soon as
        it may go, ahead of the rest of the turn, not with the turn's other replies at its end."""
        self.connection.pending -= 1
        self.connection.send_once_recorded(seq, {"ok": True, **fields, **self.echo}, promptly)

    def fail(self, error: str, **fields) -> None:
        self.connection.pending -= 1
        self.connection.send({"ok": False, "error": _clip(error), **fields, **self.echo})

    @property
    def actor(self) -> Actor:
        """Who asks, for its audit records: named from /proc once per connection, not once per record."""
        return self.connection.actor()


Handler = Callable[[Request], None]
# when_durable(seq, done, failed): done() once audit record seq is on disk, or failed(why) (Recorder.when_durable)
WhenDurable = Callable[[int, Callable[[], None], Callable[[str], None]], None]


@dataclass(eq=False)
class HeldReply:
    """A reply given but not sent yet: it waits for its record's flush, or for a held reply before it."""

    message: dict
    line: bytes  # what is sent if all goes well (its length is charged while it waits)
    seq: int | None  # the audit record it waits for; None: it only keeps its place in line
    ready: bool = False
    error: str | None = None  # the flush failed: sent as a failure instead
    promptly: bool = False  # sent as soon as it may go (Connection.push), not at the end of the turn


def held_failure(held: HeldReply) -> dict:
    fields = {name: value for name, value in held.message.items() if name != "ok"}
    return {**fields, "ok": False, "error": _clip(
        f"carried out, but its audit record (seq {held.seq}) could not be made durable: {held.error}; it is not known "
        "to be on record (see `shmguard status`)")}


@dataclass(eq=False)
class Connection:
    sock: socket.socket
    cred: PeerCred
    server: ControlServer
    inbox: bytearray = field(default_factory=bytearray)
    scanned: int = 0  # bytes of inbox already searched for a newline
    outbox: bytearray = field(default_factory=bytearray)
    queued: int = 0  # reply bytes ever queued, and ever sent: offsets into the stream of replies
    sent: int = 0
    replies: deque[tuple[int, float]] = field(default_factory=deque)  # (end offset, when queued) of unread replies
    input_since: float | None = None  # since when unconsumed request bytes have waited with no request dispatched
    last_active: float = field(default_factory=time.monotonic)
    pending: int = 0  # requests not answered yet (a write may wait for the guest's acknowledgement)
    charged: int = 0  # bytes counted against the uid's buffer share
    reading: bool = False
    serving: bool = False  # dispatching its lines now: a reply's flush must not start a nested dispatch
    watch_at: float | None = None  # when the deadline check is due
    closed: bool = False
    held: deque[HeldReply] = field(default_factory=deque)  # replies waiting for the audit log's flush, in order
    held_bytes: int = 0
    named: Actor | None = None  # the caller as its audit records name it, looked up once
    flush_due: bool = False  # a send of the outbox is scheduled for the end of this turn of the loop

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    @property
    def unread(self) -> int:
        """Reply bytes given and not yet read: queued to send, or held for the flush."""
        return len(self.outbox) + self.held_bytes

    @property
    def buffered(self) -> int:
        """What the connection holds against its uid's byte share."""
        return len(self.inbox) + self.unread

    def actor(self) -> Actor:
        if self.named is None:
            self.named = Actor.from_pid(self.cred.pid, self.cred.uid, self.cred.gid)
        return self.named

    def send(self, message: dict) -> None:
        if self.closed:
            return  # the requester went away; its reply has nowhere to go
        line = _encode(message)
        if self.held:  # behind a held reply: replies keep their order
            self._hold(HeldReply(message, line, None, ready=True))
            return
        self._queue(line)

    def send_once_recorded(self, seq: int, message: dict, promptly: bool = False) -> None:
        if self.closed:
            return
        held = HeldReply(message, _encode(message), seq, promptly=promptly)
        self._hold(held)
        self.server.when_durable(seq, lambda: self._resolve(held, None), lambda why: self._resolve(held, why))

    def _hold(self, held: HeldReply) -> None:
        self.held.append(held)
        self.held_bytes += len(held.line)

    def _resolve(self, held: HeldReply, error: str | None) -> None:
        held.ready, held.error = True, error
        promptly = False
        while self.held and self.held[0].ready and not self.closed:
            first = self.held.popleft()
            self.held_bytes -= len(first.line)
            self._queue(first.line if first.error is None else _encode(held_failure(first)))
            promptly = promptly or first.promptly
        if promptly:
            self.push()

    def _queue(self, line: bytes) -> None:
        """Queue a reply; it is sent with the others queued in the same turn of the loop, in one send: a batch of
        pipelined requests (or of replies a flush of the audit log released) is answered with one syscall, not
        one each. The send comes after the callbacks of this turn, before the loop waits again."""
        now = time.monotonic()
        self.outbox += line
        self.queued += len(line)
        self.replies.append((self.queued, now))
        if not self.pending:
            self.last_active = now
        if not self.flush_due:
            self.flush_due = True
            self.server.loop.call_later(0, self._due_flush)

    def push(self) -> None:
        """Send what is queued now, as far as the socket takes it, ahead of the rest of the turn: a reply someone
        waits for leaves before the work that follows it (a log line, the guard's copy of the guest's reply area).
        What a send leads to (the connection's next requests dispatched, other uids read again) still waits for the
        turn's flush that _queue scheduled, so nothing is dispatched from inside the caller."""
        if self.closed or not self.outbox:
            return
        try:
            self._sent(self.sock.send(self.outbox))
        except OSError:
            return  # no room (the flush waits for it), or gone (the flush finds out and closes)

    def _sent(self, sent: int) -> None:
        """sent bytes of the outbox went out: the replies wholly sent no longer wait to be read."""
        del self.outbox[:sent]
        self.sent += sent
        self.last_active = time.monotonic()
        while self.replies and self.replies[0][0] <= self.sent:
            self.replies.popleft()

    def _due_flush(self) -> None:
        self.flush_due = False
        self.flush()

    def flush(self) -> None:
        while self.outbox and not self.closed:
            try:
                sent = self.sock.send(self.outbox)
            except BlockingIOError:
                self.server.loop.add_writer(self.fd, self.flush)
                break
            except OSError:
                self.close()
                return
            self._sent(sent)
        if self.closed:
            return
        if not self.outbox:
            self.server.loop.remove_writer(self.fd)
            self.outbox = bytearray()  # a bytearray keeps its largest size: give the memory back
        self.server.changed(self)

    def next_line(self) -> bytes | None:
        """The next complete request line, searching only bytes not searched before."""
        end = self.inbox.find(b"\n", self.scanned)
        if end < 0:
            self.scanned = len(self.inbox)
            return None
        line = bytes(self.inbox[:end])
        del self.inbox[:end + 1]
        self.scanned = 0
        if not self.inbox:
            self.inbox = bytearray()
        return line

    def has_line(self) -> bool:
        return self.inbox.find(b"\n", self.scanned) >= 0

    def deadline(self, request_seconds: float, idle_seconds: float) -> tuple[float, str] | None:
        """The next moment this connection has made no progress for too long, and why; None if it need not end."""
        first = min(self._dues(request_seconds, idle_seconds), default=None)
        if first is None:
            return None
        return first[0], _DEADLINE_REASONS[first[1]].format(request=request_seconds, idle=idle_seconds)

    def next_due(self, request_seconds: float, idle_seconds: float) -> float | None:
        """When deadline() is due, without saying why (watch() runs after every batch of requests)."""
        first = min(self._dues(request_seconds, idle_seconds), default=None)
        return None if first is None else first[0]

    def _dues(self, request_seconds: float, idle_seconds: float) -> list[tuple[float, str]]:
        """(when, which) of each deadline that applies now; which is a key of _DEADLINE_REASONS."""
        due = []
        if self.input_since is not None:
            due.append((self.input_since + request_seconds, "request"))
        if self.replies:
            due.append((self.replies[0][1] + request_seconds, "reply"))
        if not self.inbox and not self.outbox and not self.pending and not self.held:
            due.append((self.last_active + idle_seconds, "idle"))
        return due

    # --- deadlines: a connection that makes no progress is closed, whatever it sends --------------------

    def watch(self) -> None:
        """Make sure a check runs at the next deadline (one timer per connection, reused)."""
        server = self.server
        when = self.next_due(server.shares.request_seconds, server.policy.idle_seconds)
        if self.closed or when is None:
            return
        if self.watch_at is not None and self.watch_at <= when:
            return  # a check is due earlier; it looks again then
        self.watch_at = when
        server.loop.call_at(when + CLOCK_SLACK, lambda: self._check_deadline(when))

    def _check_deadline(self, scheduled: float) -> None:
        if self.closed or self.watch_at != scheduled:
            return  # closed, or superseded by an earlier check that has rescheduled
        self.watch_at = None
        next_due = self.deadline(self.server.shares.request_seconds, self.server.policy.idle_seconds)
        if next_due is not None and next_due[0] <= time.monotonic():
            reason = next_due[1]
            log.info("control socket: closed a connection of uid %d pid %d: %s", self.cred.uid, self.cred.pid,
                     reason)
            if self.inbox and not self.outbox:  # it may still read: say why, once
                self.inbox = bytearray()
                self.input_since = None
                self.send({"ok": False, "error": f"connection closed: {reason}"})
            self.close()
            return
        self.watch()

    def close(self) -> None:
        if not self.closed:
            if self.outbox:  # the replies queued this turn (a refusal's, say) go out as far as the socket takes them
                try:
                    self.sock.send(self.outbox)
                except OSError:
                    pass
            self.closed = True
            self.server.loop.remove_reader(self.fd)
            self.server.loop.remove_writer(self.fd)
            self.sock.close()
            self.inbox, self.outbox, self.replies = bytearray(), bytearray(), deque()
            self.held, self.held_bytes = deque(), 0
            self.server.closed(self)  # however it ends (EOF, a failed send, a refusal), it gives back what it held


class ControlServer:
    def __init__(self, policy: ControlPolicy, owner: int, group: int, loop: EventLoop, max_request: int,
                 shares: SharesPolicy | None = None, owners: Collection[int] = ()):
        self.policy, self.owner, self.group, self.loop = policy, owner, group, loop
        self.owners = tuple(owners)  # who else may own the socket's directory (paths.policy_owners)
        self.max_request = max_request
        self.shares = shares = shares or SharesPolicy()
        reserved_for = frozenset(shares.reserved_for)
        self.slots = Share("control connections", shares.connections, shares.connections_per_uid,
                           shares.connections_reserved, reserved_for)
        self.buffers = Share("buffered control bytes", shares.buffer_bytes, shares.buffer_bytes_per_uid,
                             min(shares.buffer_bytes_per_uid, shares.buffer_bytes // 2), reserved_for)
        self.handlers: dict[str, tuple[Access, Handler]] = {}
        self.connections: set[Connection] = set()
        self.paused: set[Connection] = set()  # not read from while their uid (or everyone) is at the byte bound
        self._resume_due = False
        self._warned_uids: set[int] = set()  # a uid at its connection share is logged once, not per attempt
        self.listener = None
        self.holding = False  # a hand-over is being prepared: requests wait in their connections
        self.on_refused: Callable[[PeerCred, str, str], None] = lambda cred, op, reason: None
        # Where a reply waits for its audit record to be on disk (the supervisor's Recorder.when_durable).
        self.when_durable: WhenDurable = lambda seq, done, failed: done()

    def route(self, kind: type[ControlRequest], access: Access, handler: Handler) -> None:
        """Requests of this kind (control.WriteRequest, ...) from those `access` admits go to handler."""
        self.handlers[kind.OP] = (access, handler)

    def start(self) -> None:
        self.listener = bind_socket(self.policy.socket, self.owner, self.group, self.policy.mode,
                                    allowed_owners=self.owners)
        self.loop.add_reader(self.listener.sock.fileno(), self._on_accept)

    def rebind(self) -> None:
        """Put the socket back at its path; open connections are unaffected."""
        self.listener = self.listener.rebound(self.loop, self._on_accept, self._admit, self._on_shed)

    def describe(self) -> dict:
        return {"connections": self.slots.describe(), "buffered_bytes": self.buffers.describe()}

    # --- connections: one slot each, from the uid's share -----------------------------------------------

    def _on_accept(self) -> None:
        self.listener.accept_waiting(self._admit, self._on_shed)

    @staticmethod
    def _on_shed() -> None:
        log.warning("control socket: out of file descriptors: refused a connection")

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            cred = PeerCred.of(sock)
        except OSError:  # gone before it was looked at
            sock.close()
            return
        if (reason := self.slots.take(cred.uid)) is not None:
            self._refuse_connection(sock, cred, reason)
            return
        connection = Connection(sock, cred, self)
        self.connections.add(connection)
        self._set_reading(connection, True)
        connection.watch()

    def _refuse_connection(self, sock: socket.socket, cred: PeerCred, reason: str) -> None:
        """One error line into an empty socket buffer, then closed; it took nothing, so it gives nothing back."""
        key = _bound_key(self.slots, cred.uid, "shares.connections", "shares.connections_per_uid",
                         "shares.connections_reserved")
        if cred.uid not in self._warned_uids:
            self._warned_uids.add(cred.uid)
            log.warning("control socket: refused a connection of uid %d pid %d: %s (policy %s)", cred.uid, cred.pid,
                        reason, key)
        line = json.dumps({"ok": False, "error": f"control connection refused: {reason} (policy {key}); "
                           "close one or try again later"}) + "\n"
        try:
            sock.send(line.encode())
        except OSError:
            pass
        sock.close()

    def closed(self, connection: Connection) -> None:
        self.connections.discard(connection)
        self.paused.discard(connection)
        self._charge(connection, 0)
        self.slots.give(connection.cred.uid)
        if not self.slots.held_by(connection.cred.uid):
            self._warned_uids.discard(connection.cred.uid)

    # --- reading, dispatching, and the byte share ----------------------------------------------------

    def _on_readable(self, connection: Connection) -> None:
        uid = connection.cred.uid
        if connection.has_line() or connection.unread >= OUTBOX_LIMIT:
            self._set_reading(connection, False)  # its replies are not read: leave its requests in the kernel
            return
        room = self.buffers.room(uid)
        if room <= 0:
            self._at_byte_bound(connection)
            return
        try:
            data = connection.sock.recv(min(READ_CHUNK, room))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            connection.close()
            return
        now = time.monotonic()
        connection.last_active = now
        if not connection.inbox:
            connection.input_since = now
        connection.inbox += data
        self._charge(connection, connection.buffered)
        self._serve(connection)
        if not connection.closed and not connection.has_line():
            self._refuse_if_too_long(connection)

    def _serve(self, connection: Connection) -> None:
        """Dispatch complete lines while the connection's replies are being read and its uid has room; the first
        reply is always allowed, so every connection can make progress."""
        if connection.serving:
            return
        connection.serving = True
        try:
            while not connection.closed and not self.holding and (not connection.unread or (
                    connection.unread < OUTBOX_LIMIT and self.buffers.room(connection.cred.uid) > 0)):
                line = connection.next_line()
                if line is None:
                    break
                connection.input_since = time.monotonic() if connection.inbox else None
                self._dispatch(connection, line)
                self._charge(connection, connection.buffered)
        finally:
            connection.serving = False
        if not connection.closed:
            self._charge(connection, connection.buffered)
            self._set_reading(connection, not connection.has_line() and connection.unread < OUTBOX_LIMIT)
            connection.watch()

    def changed(self, connection: Connection) -> None:
        """After a flush: replies were read, so more lines may be dispatched and other uids may read again."""
        if not connection.serving:
            self._serve(connection)

    def _refuse_if_too_long(self, connection: Connection) -> None:
        """An unfinished line longer than a request may be, or than the uid may ever buffer, is refused at once."""
        uid, length = connection.cred.uid, len(connection.inbox)
        if length > self.max_request:
            self._refuse_request(connection, f"request longer than {self.max_request} bytes (twice the region "
                                             "size plus 64 KiB)")
            return
        limit, key = self._limit_of(uid)
        if length >= limit:
            self._refuse_request(connection, f"request refused: uid {uid} may buffer at most {limit} bytes of "
                                             f"requests and replies (policy {key}) and this request is longer")

    def _at_byte_bound(self, connection: Connection) -> None:
        """Backpressure while something the uid holds will be freed (a reply being read, a line being dispatched);
        when everything it holds is unfinished lines nothing will free, so the connection asking for more ends."""
        uid = connection.cred.uid
        limit, key = self._limit_of(uid)
        stuck = all(not other.unread and not other.has_line() for other in self.connections if other.cred.uid == uid)
        held = self.buffers.held_by(uid)
        if stuck and held >= limit:
            self._refuse_request(connection, f"request refused: uid {uid} already buffers {held} bytes of unfinished "
                                             f"requests, its share of {limit} (policy {key})")
            return
        self._set_reading(connection, False)
        self.paused.add(connection)

    def _refuse_request(self, connection: Connection, reason: str) -> None:
        log.info("control socket: closed a connection of uid %d pid %d: %s", connection.cred.uid, connection.cred.pid,
                 reason)
        connection.inbox = bytearray()
        connection.input_since = None
        connection.send({"ok": False, "error": reason})
        connection.close()

    def _limit_of(self, uid: int) -> tuple[int, str]:
        if uid in self.buffers.reserved_for:
            return self.buffers.total, "shares.buffer_bytes"
        return min(self.buffers.per_uid, self.buffers.total - self.buffers.reserved), "shares.buffer_bytes_per_uid"

    def _charge(self, connection: Connection, holding: int) -> None:
        """Count what the connection holds now against its uid's share. Reads never pass the share (they ask for
        no more than the room); a reply already owed is queued even past it, which only stops further reading."""
        delta = holding - connection.charged
        if not delta:
            return
        uid, connection.charged = connection.cred.uid, holding
        if delta > 0 and self.buffers.take(uid, delta) is not None:
            self.buffers.owe(uid, delta)
        elif delta < 0:
            self.buffers.give(uid, -delta)
            if self.paused and not self._resume_due:
                self._resume_due = True
                self.loop.call_later(0, self._resume_paused)  # later, from the loop: never inside another's flush

    def _resume_paused(self) -> None:
        self._resume_due = False
        for connection in list(self.paused):
            if self.buffers.room(connection.cred.uid) > 0:
                self.paused.discard(connection)
                self._serve(connection)

    def _set_reading(self, connection: Connection, reading: bool) -> None:
        if connection.closed or reading == connection.reading:
            return
        connection.reading = reading
        if reading:
            self.loop.add_reader(connection.fd, lambda: self._on_readable(connection))
        else:
            self.loop.remove_reader(connection.fd)

    # --- requests ------------------------------------------------------------------------------------

    def _dispatch(self, connection: Connection, line: bytes) -> None:
        body = parse_line(line)
        if isinstance(body, str):
            connection.send({"ok": False, "error": _clip(f"malformed request: {body}")})
            return
        op, echo = body["op"], request_echo(body)
        if op not in self.handlers:
            connection.send({"ok": False, "error": _clip(f"unknown op {op[:64]!r} (known: "
                                                         f"{', '.join(sorted(self.handlers))})"), **echo})
            return
        access, handler = self.handlers[op]
        connection.pending += 1
        if not access.admits(connection.cred.uid, connection.cred.gid, connection.cred.groups):
            reason = f"uid {connection.cred.uid} may not {op} (policy control section)"
            self.on_refused(connection.cred, op, reason)
            Request(op, None, connection.cred, connection, echo).fail(reason)
            connection.close()  # one refusal, one record: a client with no rights cannot flood the log
            return
        message = parse(body, self.shares.wait_seconds)  # only for those allowed: a refusal says nothing more
        if isinstance(message, str):
            Request(op, None, connection.cred, connection, echo).fail(message)
            return
        request = Request(op, message, connection.cred, connection, echo)
        try:
            handler(request)
        except ShmguardError as exc:
            request.fail(str(exc))
        except Exception:  # noqa: BLE001 - a bug must still answer the client, and keep the supervisor up
            log.exception("internal error handling %r", op)
            request.fail(f"internal error handling {op!r}; see the supervisor's log")

    # --- hand-over ---------------------------------------------------------------------------------------

    def hold(self, holding: bool) -> None:
        """While a hand-over is prepared no request is dispatched; they wait, in order, in their connections."""
        self.holding = holding
        if not holding:
            for connection in list(self.connections):
                self._serve(connection)

    def snapshot(self, fds: dict[str, int], reload_request: Request | None) -> dict:
        """Each connection with what it has sent and not been answered, and what it has not read yet; the one
        whose reload this is is answered by the successor, once it serves."""
        connections = []
        for index, connection in enumerate(sorted(self.connections, key=lambda c: c.fd)):
            if connection.closed:
                continue
            connection.flush()  # the replies queued this turn go now, as far as the socket takes them
            if connection.closed:
                continue
            awaiting = reload_request is not None and reload_request.connection is connection
            fds[name := f"control-{index}"] = connection.fd
            connections.append({"fd": name, "inbox": connection.inbox.hex(), "outbox": connection.outbox.hex(),
                                "awaiting_reload": awaiting,
                                "unanswered": connection.pending - (1 if awaiting else 0)})
        return {"listener": self.listener.snapshot(fds, "control-listener"), "connections": connections}

    def adopt(self, state: dict, fd: Callable[[str], int]) -> list[Connection]:
        """Instead of start(): the predecessor's socket and connections; returns those awaiting a reload's reply
        (answered by the caller once it serves). A request left unanswered is answered with a failure."""
        self.listener = BoundSocket.adopt(state["listener"], fd("control-listener"))
        self.loop.add_reader(self.listener.sock.fileno(), self._on_accept)
        awaiting = []
        for entry in state["connections"]:
            sock = socket.socket(fileno=fd(entry["fd"]))
            sock.setblocking(False)
            try:
                cred = PeerCred.of(sock)
            except OSError:
                sock.close()
                continue
            self.slots.owe(cred.uid, 1)
            connection = Connection(sock, cred, self, inbox=bytearray.fromhex(entry["inbox"]))
            self.connections.add(connection)
            if entry["outbox"]:
                connection.outbox = bytearray.fromhex(entry["outbox"])
                connection.queued = len(connection.outbox)
                connection.replies.append((connection.queued, time.monotonic()))
            for _ in range(entry["unanswered"]):
                connection.send({"ok": False, "error": "the supervisor was reloaded before it answered; ask again"})
            if entry["awaiting_reload"]:
                connection.pending += 1
                awaiting.append(connection)
            if connection.inbox:
                connection.input_since = time.monotonic()
            self._charge(connection, len(connection.inbox) + len(connection.outbox))
            connection.flush()
            self._serve(connection)
        return awaiting

    def close(self, keep_socket: bool = False) -> None:
        """keep_socket: leave the path in place (its listener lives on in systemd's fd store)."""
        for connection in list(self.connections):
            connection.close()
        if self.listener is not None:
            self.loop.remove_reader(self.listener.sock.fileno())
            self.listener.close() if keep_socket else self.listener.remove()
            self.listener = None


def _bound_key(share: Share, uid: int, total_key: str, per_uid_key: str, reserved_key: str) -> str:
    """The policy key of the bound that Share.refusal(uid) names, so a refusal says what to change."""
    if share.in_use + 1 > share.total:
        return total_key
    if uid not in share.reserved_for and share.held_by(uid) + 1 > share.per_uid:
        return per_uid_key
    return reserved_key


_DEADLINE_REASONS = {  # why a connection is closed, by Connection._dues' names (formatted only when it is)
    "request": "the request did not arrive whole within {request:g} s (policy shares.request_seconds)",
    "reply": "its reply was not read within {request:g} s (policy shares.request_seconds)",
    "idle": "idle for {idle:g} s (policy control.idle_seconds)",
}
_ENCODER = json.JSONEncoder(sort_keys=True)  # one encoder for every reply (json.dumps makes one per call)
# Its C core, made once: the same output, without the record of what it is inside that catches a value holding
# itself (a reply is made of fresh dicts, lists and scalars: it never does; if one did, RecursionError).
_C_ENCODER = c_make_encoder and c_make_encoder(None, _ENCODER.default, encode_basestring_ascii, None,
                                               _ENCODER.key_separator, _ENCODER.item_separator, True, False, True)


def _encode(message: dict) -> bytes:
    """json.dumps(message, sort_keys=True) and a newline, through json's C encoder without the Python layers
    around it."""
    if _C_ENCODER is None:
        return _ENCODER.encode(message).encode() + b"\n"
    return "".join(_C_ENCODER(message, 0)).encode() + b"\n"


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR else text[:MAX_ERROR] + "…"
