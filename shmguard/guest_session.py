"""The guest handshake, sans-IO: events in, actions out, no sockets, no fds, no clock, no logging of its own.

A built-in guest says "ready <id>" on the host's vector 0 once its MSI-X vectors are live and "ack ..." on vector 1
after each message it has printed (see layout.py). Until the guest is ready a ring for it is held, once per (peer,
vector); a write that waits for the acknowledgement is the one message in flight, and those behind it wait in a
queue bounded per uid. The supervisor feeds `GuestSession.handle` each event with a `Peers` view of who is
connected, and carries out the actions it returns in order. Every state transition is in `handle`; the queries
(`guest_peer_id`, `guest_target`, `is_guest`, `holds`) change nothing.

The state is plain data (`GuestSessionState`): a successor takes it over with `snapshot()`/`from_snapshot()`.
Request tokens are opaque to the session: it only hands them back, and compares them with ==.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field, replace
from typing import Any

from . import layout
from .errors import ControlError
from .policy import SharesPolicy
from .shares import Share
from .values import Value, value

PENDING_GUEST = -1  # the peer id of "our guest", while its QEMU has not connected yet
Token = Hashable  # the supervisor's name for a control request, answered through Reply or Fail
QEMU_GONE_BEFORE_TURN = "QEMU exited before this write's turn came; nothing was written"
QEMU_GONE_BEFORE_ACK = "QEMU exited before the guest acknowledged"


@value
class Peers(Value):
    """What the supervisor sees when it feeds an event: the peers, and the QEMU it started (if any)."""

    connected: tuple[int, ...] = ()  # peer ids other than the host's, in the order they joined
    ours: int | None = None  # the peer whose process is the QEMU this supervisor started
    qemu_started: bool = False  # this supervisor started a QEMU (it may have exited since)
    qemu_exited: bool = False


# --- events --------------------------------------------------------------------------------------------------


@value
class RingRequested(Value):
    """A ring already recorded (see `holds` for what its record says): ring it now or hold it until ready."""

    peer: int  # PENDING_GUEST for the guest whose QEMU has not connected yet
    vector: int


@value
class WriteRequested(Value):
    token: Token
    plan: Any  # opaque: handed back in WriteNow
    uid: int
    waits: bool  # waits for the guest's acknowledgement
    size: int  # bytes of data, counted against the queue's byte share


@value
class Written(Value):
    """A WriteNow carried out: recorded, written and rung; `reply` are the fields of its answer."""

    token: Token
    reply: tuple[tuple[str, Any], ...]
    crc32: int  # of the message up to its first NUL, as the guest's ack reports it
    waits: bool
    timeout: float
    now: float  # when the clock of the round trip started: before the ring


@value
class WriteFailed(Value):
    """A WriteNow that could not be carried out (the log or the region failed after it was queued)."""

    token: Token
    error: str


@value
class HostRung(Value):
    vector: int
    reply: str  # the reply area's text, made printable
    now: float


@value
class TimedOut(Value):
    token: Token


@value
class QemuExited(Value):
    pass


@value
class PeerLeft(Value):
    peer: int


Event = RingRequested | WriteRequested | Written | WriteFailed | HostRung | TimedOut | QemuExited | PeerLeft


# --- actions -------------------------------------------------------------------------------------------------


@value
class Ring(Value):
    peer: int
    vector: int
    held: bool = False  # a held ring delivered at ready: a peer gone since is logged, not raised


@value
class Hold(Value):
    peer: int
    vector: int


@value
class WriteNow(Value):
    token: Token
    plan: Any


@value
class Queue(Value):
    token: Token
    waiting: int  # writes in the queue, this one included


@value
class Reply(Value):
    token: Token
    fields: tuple[tuple[str, Any], ...]


@value
class Fail(Value):
    token: Token
    error: str
    fields: tuple[tuple[str, Any], ...] = ()


@value
class RefreshGuard(Value):
    """The guest wrote through its mapping, which makes no inotify event: the guard's copy must follow. reply_only:
    an ack, which writes only the guest's reply area (layout.py), so only that area is taken again."""

    reply_only: bool = False


@value
class Record(Value):
    """A note of what has happened already: a log that cannot take it does not stop it."""

    action: str
    detail: tuple[tuple[str, Any], ...]


@value
class Log(Value):
    level: str  # "debug", "info", "warning"
    message: str


@value
class Notify(Value):
    status: str  # for systemd's STATUS=


@value
class ScheduleTimeout(Value):
    token: Token
    seconds: float


Action = Ring | Hold | WriteNow | Queue | Reply | Fail | RefreshGuard | Record | Log | Notify | ScheduleTimeout


# --- state ---------------------------------------------------------------------------------------------------


@value
class AckWaiter(Value):
    """The write whose acknowledgement is awaited."""

    token: Token
    reply: tuple[tuple[str, Any], ...]
    crc32: int
    timeout: float
    started: float


@value
class QueuedWrite(Value):
    token: Token
    plan: Any
    uid: int
    size: int


class WriteQueue:
    """Writes waiting behind the one whose acknowledgement is awaited, bounded in count and bytes, per uid and in
    all (shares.queued_writes*, shares.buffer_bytes*), with the reserve kept for shares.reserved_for."""

    def __init__(self, shares: SharesPolicy):
        reserved = frozenset(shares.reserved_for)
        self.count = Share("queued writes", shares.queued_writes, shares.queued_writes_per_uid,
                           min(shares.queued_writes_per_uid, shares.queued_writes - 1), reserved)
        self.bytes = Share("bytes of queued writes", shares.buffer_bytes, shares.buffer_bytes_per_uid,
                           min(shares.buffer_bytes_per_uid, shares.buffer_bytes - 1), reserved)
        self.entries: deque[QueuedWrite] = deque()

    def push(self, write: QueuedWrite) -> None:
        """Raises ControlError, taking nothing, if the write's uid may not queue it."""
        reason = self.count.refusal(write.uid) or self.bytes.refusal(write.uid, write.size)
        if reason is not None:
            raise ControlError(f"write not queued: {reason} (policy [shares]); try again once the guest has "
                               "acknowledged the writes before it")
        self._take(write)

    def keep(self, write: QueuedWrite) -> None:
        """Take over a write queued already (a successor's): held even past bounds a new policy may have lowered."""
        self.count.owe(write.uid, 1)
        self.bytes.owe(write.uid, write.size)
        self.entries.append(write)

    def _take(self, write: QueuedWrite) -> None:
        self.count.take(write.uid)
        self.bytes.take(write.uid, write.size)
        self.entries.append(write)

    def pop(self) -> QueuedWrite:
        write = self.entries.popleft()
        self.count.give(write.uid)
        self.bytes.give(write.uid, write.size)
        return write

    def __len__(self) -> int:
        return len(self.entries)


@value
class GuestSessionState(Value):
    """Everything the session knows, as plain data: what a successor takes over."""

    serving_only: bool  # no QEMU of ours: a guest that says "ready" turns the handshake on
    handshake: bool  # the built-in guest says "ready" and acknowledges; other guests do not
    ready: bool = False
    joined: tuple[int, ...] = ()  # peers whose built-in guest said "ready <id>" itself
    pending_rings: tuple[tuple[int, int], ...] = ()  # (peer, vector) held until ready, each once, in order
    waiter: AckWaiter | None = None
    queued: tuple[QueuedWrite, ...] = ()
    acks: int = 0
    last_reply: str = ""
    exchange: ExchangeState | None = None  # several built-in guests (--guests N): their slots


@dataclass
class GuestSession:
    """The guest handshake: held rings, one write in flight, the queue behind it, the ack timeout, QEMU gone."""

    shares: SharesPolicy
    serving_only: bool
    handshake: bool
    ready: bool = False
    joined: set[int] = field(default_factory=set)
    # (peer, vector) held until ready, each once: rings coalesce, so a flood of them holds no more than this
    pending_rings: dict[tuple[int, int], None] = field(default_factory=dict)
    waiter: AckWaiter | None = None  # one message in flight: the next would overwrite it before it is read
    acks: int = 0
    last_reply: str = ""
    exchange: GuestExchange | None = None  # several built-in guests: slots, sends, peers lines
    queue: WriteQueue = field(init=False)

    def __post_init__(self) -> None:
        self.queue = WriteQueue(self.shares)

    # --- queries (no state changes) ------------------------------------------------------------------------

    def guest_peer_id(self, peers: Peers) -> int | None:
        """The guest is the QEMU this supervisor started; else the one built-in guest that said it is ready,
        whoever started its QEMU (libvirt, by hand); else the only peer that is not the host."""
        if peers.ours is not None:
            return peers.ours
        if peers.qemu_started:
            return None
        joined = [peer for peer in peers.connected if peer in self.joined]
        if joined:
            return joined[0] if len(joined) == 1 else None  # several: each is rung by its id
        return peers.connected[0] if len(peers.connected) == 1 else None

    def ready_guests(self, peers: Peers) -> list[int]:
        return sorted(self.joined & set(peers.connected))

    def guest_target(self, peers: Peers) -> int:
        """The peer `--ring guest` means, PENDING_GUEST if its ring is to be held; raises ControlError if none."""
        peer_id = self.guest_peer_id(peers)
        joined = self.ready_guests(peers)
        if peer_id is None and not peers.qemu_started and len(joined) > 1:
            raise ControlError(f"several guests are ready (peers {', '.join(map(str, joined))}): ring one "
                               f"by its id, e.g. --ring {joined[0]}")
        if peer_id is not None:
            return peer_id
        if self.handshake and not peers.qemu_exited:  # not connected yet: ring once it is ready
            return PENDING_GUEST  # a ring held for a QEMU that is gone would wait forever
        raise ControlError("no guest is connected (ring a peer id instead; see `shmguard status`)")

    def is_guest(self, peer_id: int, peers: Peers) -> bool:
        return peer_id == PENDING_GUEST or peer_id == self.guest_peer_id(peers) or peer_id in self.joined

    def holds(self, peer_id: int, peers: Peers) -> bool:
        """A ring for the guest before it is ready is held (a doorbell rung before it enabled MSI-X is lost)."""
        return (self.is_guest(peer_id, peers) and self.handshake and not self.ready
                and peer_id not in self.joined)

    # --- the one place of every transition -----------------------------------------------------------------

    def handle(self, event: Event, peers: Peers) -> list[Action]:
        match event:
            case RingRequested(peer, vector):
                if self.holds(peer, peers):
                    self.pending_rings[peer, vector] = None
                    return [Hold(peer, vector)]
                return [Ring(peer, vector)]
            case WriteRequested(token, plan, uid, waits, size):
                if waits and self.waiter is not None:
                    try:
                        self.queue.push(QueuedWrite(token, plan, uid, size))
                    except ControlError as exc:  # refused: nothing changes
                        return [Fail(token, str(exc))]
                    return [Queue(token, len(self.queue))]  # its turn comes with the ack before it
                return [WriteNow(token, plan)]
            case Written(token, reply, crc32, waits, timeout, now):
                if not waits:
                    return [Reply(token, reply)]
                self.waiter = AckWaiter(token, reply, crc32, timeout, now)
                return [ScheduleTimeout(token, timeout)]
            case WriteFailed(token, error):
                return [Fail(token, error), *self._next_write()]
            case HostRung(vector, reply, now):
                return self._on_host_rung(vector, reply, now, peers)
            case TimedOut(token):
                waiter = self.waiter
                if waiter is None or waiter.token != token:
                    return []  # answered already
                self.waiter = None
                seq = dict(waiter.reply).get("seq")
                return [Fail(token, f"the guest did not acknowledge within {waiter.timeout:g} s (the write itself "
                                    f"is recorded as seq {seq})", waiter.reply), *self._next_write()]
            case QemuExited():
                self.ready = False
                actions: list[Action] = []
                if self.waiter is not None:
                    waiter, self.waiter = self.waiter, None
                    actions.append(Fail(waiter.token, QEMU_GONE_BEFORE_ACK, waiter.reply))
                while self.queue:
                    actions.append(Fail(self.queue.pop().token, QEMU_GONE_BEFORE_TURN))
                return actions
            case PeerLeft(peer):
                if self.serving_only:  # is "the guest" still one that said it is ready?
                    self.ready = self.ready and self.guest_peer_id(peers) in self.joined
                if self.exchange is not None and self.waiter is not None and _rang_only(self.waiter, peer):
                    waiter, self.waiter = self.waiter, None  # one of several guests: the others stay
                    return [Fail(waiter.token, f"guest peer {peer} left before it acknowledged", waiter.reply),
                            *self._next_write()]
                return []
        raise AssertionError(f"not an event of the guest session: {event!r}")

    def heeds_leaves(self) -> bool:
        """Would a PeerLeft change anything? Not before a guest is ready, with no exchange between guests: the
        server's churn of peers then costs the session nothing (not even a look at the peers)."""
        return self.ready or self.exchange is not None

    def _on_host_rung(self, vector: int, reply: str, now: float, peers: Peers) -> list[Action]:
        ready_id, ack = layout.parse_ready(reply), layout.parse_ack(reply)
        if vector == layout.READY_VECTOR and ready_id is not None and ready_id in peers.connected:
            return self._on_says_ready(ready_id, reply, peers)
        if vector == layout.ACK_VECTOR and ack is not None and self.handshake and (
                self.guest_peer_id(peers) is not None or self.waiter is not None):
            return self._on_ack(reply, ack, now)
        # any peer may ring the host: a stray ring is not worth more than a debug line
        return [Log("debug", f"host rung on vector {vector} (reply area: {reply[:80]!r})")]

    def _on_says_ready(self, peer_id: int, reply: str, peers: Peers) -> list[Action]:
        """A built-in guest joins the handshake by saying so, whoever started its QEMU. Serving only (--no-guest)
        turns the handshake on; a QEMU this supervisor boots stays the guest that `--ring guest` means."""
        self.joined &= set(peers.connected)  # ids are never reused: forget the guests that left
        said_before = peer_id in self.joined
        self.joined.add(peer_id)
        if self.serving_only:
            self.handshake = True
        guest_id = self.guest_peer_id(peers)
        # Said again, nothing changes: any peer may ring the host, and a record per ring would let it fill the log.
        if said_before and (peer_id != guest_id or self.ready):
            return [Log("debug", f"guest said ready again: {reply}")]
        if peer_id != guest_id:
            return [Log("info", f"guest ready: {reply} (one of several guests: ring it by its id)"),
                    Record("guest-ready", (("reply", reply), ("peer", peer_id)))]
        self.ready, self.last_reply = True, reply
        pending, self.pending_rings = self.pending_rings, {}
        return [RefreshGuard(), Log("info", f"guest ready: {reply}"),
                Record("guest-ready", (("reply", reply), ("peer", guest_id))), Notify("guest ready"),
                *(Ring(guest_id if peer == PENDING_GUEST else peer, vector, held=True) for peer, vector in pending)]

    def _on_ack(self, reply: str, ack: layout.Ack, now: float) -> list[Action]:
        self.acks += 1
        self.last_reply = reply
        waiter, self.waiter = self.waiter, None
        # An ack nobody waits for (a --no-wait write, or forged by a peer) is worth a debug line, not one per ring.
        # The reply first: what follows (the log line, the guard's copy of the reply area) is not the requester's wait.
        actions: list[Action] = []
        if waiter is not None:
            actions.append(Reply(waiter.token, (*waiter.reply, ("ack", reply),
                                                ("round_trip_ms", round((now - waiter.started) * 1000, 3)),
                                                ("delivered_exactly", ack.crc32 == waiter.crc32))))
        actions += [Log("info" if waiter else "debug", f"guest acknowledged: {reply}"), RefreshGuard(reply_only=True)]
        return [*actions, *self._next_write()]

    def _next_write(self) -> list[Action]:
        """The next queued write, if none is in flight: its Written or WriteFailed comes back as an event."""
        if self.waiter is None and self.queue:
            write = self.queue.pop()
            return [WriteNow(write.token, write.plan)]
        return []

    # --- hand-over -----------------------------------------------------------------------------------------

    def snapshot(self) -> GuestSessionState:
        return GuestSessionState(self.serving_only, self.handshake, self.ready, tuple(sorted(self.joined)),
                                 tuple(self.pending_rings), self.waiter, tuple(self.queue.entries), self.acks,
                                 self.last_reply, self.exchange.snapshot() if self.exchange else None)

    def plain(self) -> dict:
        """The snapshot as JSON-ready data, between writes (no write in flight or queued: a hand-over waits for
        that, and a crash loses it)."""
        exchange = None
        if self.exchange is not None:
            exchange = {"commands": self.exchange.commands, "generation": self.exchange.generation,
                        "slots": [{"peer": slot.peer, "reply": slot.reply, "report": slot.report, "sent": slot.sent}
                                  for slot in self.exchange.slots]}
        return {"serving_only": self.serving_only, "handshake": self.handshake, "ready": self.ready,
                "joined": sorted(self.joined), "pending_rings": [list(ring) for ring in self.pending_rings],
                "acks": self.acks, "last_reply": self.last_reply, "exchange": exchange}

    def busy(self) -> bool:
        """A write in flight or queued, or a guest-to-guest send not yet reported: a hand-over waits for it."""
        sending = self.exchange is not None and any(slot.sending for slot in self.exchange.slots)
        return self.waiter is not None or bool(self.queue) or sending

    @classmethod
    def from_plain(cls, data: dict, shares: SharesPolicy) -> GuestSession:
        exchange = None
        if data.get("exchange") is not None:
            exchange = ExchangeState(tuple(SlotState(slot["peer"], slot["reply"], slot["report"], None, slot["sent"])
                                           for slot in data["exchange"]["slots"]),
                                     data["exchange"]["commands"], data["exchange"]["generation"])
        return cls.from_snapshot(GuestSessionState(
            data["serving_only"], data["handshake"], data["ready"], tuple(data["joined"]),
            tuple(tuple(ring) for ring in data["pending_rings"]), None, (), data["acks"], data["last_reply"],
            exchange), shares)

    @classmethod
    def from_snapshot(cls, state: GuestSessionState, shares: SharesPolicy) -> GuestSession:
        session = cls(shares, state.serving_only, state.handshake, state.ready, set(state.joined),
                      dict.fromkeys(state.pending_rings), state.waiter, state.acks, state.last_reply,
                      GuestExchange(state.exchange) if state.exchange else None)
        for write in state.queued:
            session.queue.keep(write)
        return session



def _rang_only(waiter: AckWaiter, peer: int) -> bool:
    rang = dict(waiter.reply).get("rang") or []
    return bool(rang) and all(ring.get("peer") == peer for ring in rang)


# --- several built-in guests (`shmguard run --guests N`): each in its slot, sending to each other --------------
#
# The host never carries guest-to-guest bytes: it writes a "send" command into one guest's slot and rings it; that
# guest writes into the other's inbox and rings it through its own doorbell register, the receiver prints and acks
# to the sender directly, and the sender reports the round trip in its report line (layout.py). The host sees
# only what it asked for and what the guests reported. Replies ("ready", "ack") go on to the GuestSession as the
# one guest's would; a guest that leaves is forgotten and the others are told with a new peers line.


@value
class SlotPeers(Value):
    """What the supervisor sees: the connected peers, and per slot the peer of the QEMU it runs for that slot
    (PENDING_GUEST while it has not connected; None when none runs: then whoever says ready there takes it)."""

    connected: tuple[int, ...] = ()
    owners: tuple[int | None, ...] = ()


@value
class SendRequested(Value):
    token: Token
    from_slot: int
    to_slot: int
    text: bytes
    timeout: float
    now: float


@value
class SendFailed(Value):
    """The command could not be written (the log or the region failed)."""

    token: Token
    error: str


@value
class SlotsRead(Value):
    """The host was rung: every slot's reply and report line, as read."""

    replies: tuple[str | None, ...]  # None: the guest was rewriting it (it rings when done)
    reports: tuple[str | None, ...]
    now: float


@value
class Nudged(Value):
    """A send's nudge is due (ScheduleNudge); the host has just read every slot again."""

    token: Token


@value
class ScheduleNudge(Value):
    """Feed Nudged(token) after `seconds`, reading the slots first: an interrupt can be lost under load."""

    token: Token
    seconds: float


@value
class WriteCommand(Value):
    """Write data into `slot`'s command area (audited, for the request `token`) and ring `peer` on GUEST_VECTOR."""

    token: Token
    slot: int
    peer: int
    data: bytes


@value
class WritePeers(Value):
    """Write data into `slot`'s peers line (audited) and ring `peer` on GUEST_VECTOR."""

    slot: int
    peer: int
    data: bytes


@value
class PassOn(Value):
    """A slot's reply line, for the GuestSession as a HostRung on `vector`."""

    vector: int
    reply: str


@value
class SendWaiter(Value):
    token: Token
    command: int
    to_slot: int
    to_peer: int
    crc32: int
    length: int
    timeout: float
    started: float


@value
class SlotState(Value):
    peer: int | None = None  # the guest that said "ready <id>" in this slot and has not left
    reply: str = ""  # the last reply and report line read from it
    report: str = ""
    sending: SendWaiter | None = None  # one send in flight per guest
    sent: int = 0  # sends it reported as acknowledged


@value
class ExchangeState(Value):
    slots: tuple[SlotState, ...]
    commands: int = 0  # the last command number written
    generation: int = 0  # of the peers lines


NUDGE_SECONDS = 1.0  # a send unreported this long: the slots are read again and the sender rung again


class GuestExchange:
    """Slots, their guests, the sends in flight and the peers lines: state as plain data, no I/O."""

    def __init__(self, state: ExchangeState):
        self.slots = list(state.slots)
        self.commands, self.generation = state.commands, state.generation

    @classmethod
    def new(cls, guests: int) -> GuestExchange:
        return cls(ExchangeState(tuple(SlotState() for _ in range(guests))))

    def snapshot(self) -> ExchangeState:
        return ExchangeState(tuple(self.slots), self.commands, self.generation)

    # --- queries -------------------------------------------------------------------------------------------

    def describe(self, owners: tuple[int | None, ...] = ()) -> list[dict]:
        def state(k: int, slot: SlotState) -> str:
            if slot.peer is not None:
                return "sending" if slot.sending else "ready"
            return "booting" if k < len(owners) and owners[k] is not None else "empty"
        return [{"guest": k, "peer": slot.peer, "state": state(k, slot), "sent": slot.sent,
                 "sending_to": slot.sending.to_slot if slot.sending else None} for k, slot in enumerate(self.slots)]

    def ready_count(self) -> int:
        return sum(slot.peer is not None for slot in self.slots)

    # --- transitions ---------------------------------------------------------------------------------------

    def handle(self, event: Event | ExchangeEvent, peers: SlotPeers) -> list[Action | ExchangeAction]:
        match event:
            case SendRequested(token, from_slot, to_slot, text, timeout, now):
                return self._send(token, from_slot, to_slot, text, timeout, now)
            case SendFailed(token, error):
                return self._settle(lambda w: w.token == token, lambda k, w: Fail(token, error))
            case TimedOut(token):
                return self._settle(lambda w: w.token == token, lambda k, w: Fail(
                    token, f"guest {k} did not report within {w.timeout:g} s"))
            case Nudged(token):
                for k, slot in enumerate(self.slots):
                    if slot.sending is not None and slot.sending.token == token:  # still unreported: ring again
                        return [Log("debug", f"guest {k} has not reported command {slot.sending.command} yet: "
                                             "rung again"),
                                Ring(slot.peer, layout.GUEST_VECTOR), ScheduleNudge(token, NUDGE_SECONDS)]
                return []
            case SlotsRead(replies, reports, now):
                actions: list = []
                for k in range(len(self.slots)):
                    if replies[k] is not None:
                        actions += self._on_reply(k, replies[k], peers)
                    if reports[k] is not None:
                        actions += self._on_report(k, reports[k], now)
                return actions
            case PeerLeft(peer):
                return self._on_left(peer)
        return []

    def _send(self, token, from_slot: int, to_slot: int, text: bytes, timeout: float, now: float) -> list:
        count = len(self.slots)
        if not (0 <= from_slot < count and 0 <= to_slot < count) or from_slot == to_slot:
            return [Fail(token, f"--from {from_slot} --to {to_slot}: two different guests of 0..{count - 1}")]
        sender, receiver = self.slots[from_slot], self.slots[to_slot]
        for k, slot in ((from_slot, sender), (to_slot, receiver)):
            if slot.peer is None:
                return [Fail(token, f"guest {k} is not ready (see `shmguard status`)")]
        if sender.sending is not None:
            return [Fail(token, f"guest {from_slot} is still sending command {sender.sending.command}: "
                                "try again once it has reported")]
        self.commands += 1
        crc = zlib.crc32(text)
        waiter = SendWaiter(token, self.commands, to_slot, receiver.peer, crc, len(text), timeout, now)
        self.slots[from_slot] = replace(sender, sending=waiter)
        # The ring comes last: whatever the host does after it competes with the guests for the CPU in their round trip
        return [ScheduleTimeout(token, timeout), ScheduleNudge(token, NUDGE_SECONDS),
                WriteCommand(token, from_slot, sender.peer,
                             layout.command_bytes(self.commands, receiver.peer, to_slot, text))]

    def _settle(self, which, answer) -> list:
        for k, slot in enumerate(self.slots):
            if slot.sending is not None and which(slot.sending):
                self.slots[k] = replace(slot, sending=None)
                return [answer(k, slot.sending)]
        return []

    def _on_reply(self, k: int, reply: str, peers: SlotPeers) -> list:
        slot = self.slots[k]
        if reply == slot.reply:
            return []  # unchanged: a ring for another slot, or one said again
        self.slots[k] = slot = replace(slot, reply=reply)
        ready_id, ack = layout.parse_ready(reply), layout.parse_ack(reply)
        if ready_id is not None and ready_id in peers.connected and ready_id != slot.peer:
            owner = peers.owners[k] if k < len(peers.owners) else None
            if owner is not None and owner != ready_id:
                return [Log("warning", f"peer {ready_id} says it is ready as guest {k}, whose QEMU this "
                                       "supervisor runs: ignored")]
            self.slots[k] = replace(slot, peer=ready_id)
            return [Log("info", f"guest {k} ready: peer {ready_id}"), PassOn(layout.READY_VECTOR, reply),
                    *self._tell_peers(), Notify(f"guests ready: {self.ready_count()} of {len(self.slots)}")]
        if ack is not None and slot.peer is not None:
            return [PassOn(layout.ACK_VECTOR, reply)]
        return [Log("debug", f"guest {k} reply area: {reply[:80]!r}")]

    def _on_report(self, k: int, line: str, now: float) -> list:
        slot = self.slots[k]
        if line == slot.report:
            return []
        self.slots[k] = slot = replace(slot, report=line)
        report, waiter = layout.parse_report(line), slot.sending
        if report is None or waiter is None or report.command != waiter.command:
            # a late "lost" of a send already answered, or a line cleared: nothing waits for it
            return [Log("debug", f"guest {k} report: {line[:80]!r}")] if line else []
        self.slots[k] = replace(slot, sending=None, sent=slot.sent + report.sent)
        detail = (("guest", k), ("command", report.command), ("to", waiter.to_slot), ("to_peer", report.peer),
                  ("report", line))
        fields = (("from", k), ("from_peer", slot.peer), ("to", waiter.to_slot), ("to_peer", waiter.to_peer),
                  ("command", waiter.command), ("report", line))
        if not report.sent:
            return [Record("guest-report", (*detail, ("result", "lost"))),
                    Fail(waiter.token, f"guest {k} could not send command {waiter.command}: {report.why}", fields)]
        return [RefreshGuard(), Record("guest-report", (*detail, ("result", "acknowledged"))),
                Log("info", f"guest {k} sent to guest {waiter.to_slot}: {line}"),
                Reply(waiter.token, (*fields, ("seq", report.seq), ("length", report.length),
                                     ("delivered_exactly", report.crc32 == waiter.crc32 and
                                      report.length == waiter.length),
                                     ("round_trip_ms", report.round_trip_us / 1000),
                                     ("host_round_trip_ms", round((now - waiter.started) * 1000, 3))))]

    def _on_left(self, peer: int) -> list:
        actions: list = []
        for k, slot in enumerate(self.slots):
            if slot.peer != peer:
                continue
            self.slots[k] = replace(slot, peer=None, sending=None)
            actions.append(Log("info", f"guest {k} (peer {peer}) left; the other guests are told"))
            if slot.sending is not None:
                actions.append(Fail(slot.sending.token, f"guest {k} (peer {peer}) left before it reported"))
        if not actions:
            return []
        actions += self._settle(lambda w: w.to_peer == peer, lambda k, w: Fail(
            w.token, f"guest {w.to_slot} (peer {peer}) left before acknowledging guest {k}'s message"))
        return [*self._tell_peers(), *actions]  # told first: a later command finds its guest knowing

    def _tell_peers(self) -> list:
        self.generation += 1
        ready = {k: slot.peer for k, slot in enumerate(self.slots) if slot.peer is not None}
        line = layout.peers_line(self.generation, ready)
        return [WritePeers(k, peer, line) for k, peer in ready.items()]


ExchangeEvent = SendRequested | SendFailed | SlotsRead | Nudged
ExchangeAction = WriteCommand | WritePeers | PassOn | ScheduleNudge
