"""HostPeer: the supervisor's own ivshmem peer. Audited writes into the region, rings, and the guest session's
actions carried out: what the sans-IO GuestSession decides, this does."""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
import zlib
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from . import layout
from .control import WriteRequest
from .control_server import Request
from .errors import ControlError, RegionError, ShmguardError
from .guard import Guard
from .guest_session import (
    PENDING_GUEST,
    Action,
    Event,
    Fail,
    GuestSession,
    Hold,
    HostRung,
    Log,
    Notify,
    Nudged,
    PassOn,
    PeerLeft,
    Peers,
    Queue,
    Record,
    RefreshGuard,
    Reply,
    Ring,
    RingRequested,
    ScheduleNudge,
    ScheduleTimeout,
    SendFailed,
    SendRequested,
    SlotPeers,
    SlotsRead,
    TimedOut,
    WriteCommand,
    WriteFailed,
    WriteNow,
    WritePeers,
    WriteRequested,
    Written,
)
from .linux import eventfd, sdnotify
from .loop import EventLoop, Timer
from .recorder import Recorder
from .region import Region, text_padding
from .server import IvshmemServer, Peer

log = logging.getLogger("shmguard")


class WritePlan(NamedTuple):
    """A write request, checked in full before anything is written or recorded (a tuple: made for every write,
    and only read after)."""

    data: bytes
    offset: int
    padding: int
    targets: list[tuple[int, int]]
    wait_for_guest: bool
    timeout: float


class HostPeer:
    def __init__(self, peer: Peer, region: Region, server: IvshmemServer, guard: Guard, recorder: Recorder,
                 loop: EventLoop, guest: GuestSession, qemu: Callable[[], tuple[int | None, bool, bool]],
                 guests: layout.GuestLayout | None = None,
                 slot_qemus: Callable[[], list[tuple[int, bool]]] = lambda: []):
        self.peer, self.region, self.server, self.guard = peer, region, server, guard
        self.recorder, self.loop, self.guest = recorder, loop, guest
        self.qemu = qemu  # (pid, started, exited) of the QEMU this supervisor runs, if any
        self.guests = guests  # several built-in guests: their slots (guest.exchange holds their state)
        self.slots = GuestSlots(guests, region, server, slot_qemus) if guests else None
        self._requests: dict[int, Request] = {}  # the control requests the guest session knows by token
        self._timers: dict[tuple[int, str], Timer] = {}  # (token, "timeout" or "nudge"): cancelled once answered
        self._tokens = itertools.count()
        self._looked: Peers | None = None  # the peers as looked at for the request or ring being handled
        for vector, fd in enumerate(peer.vectors):
            loop.add_reader(fd.fd, lambda v=vector, f=fd.fd: self._on_host_rung(v, f))

    @property
    def id(self) -> int:
        return self.peer.id

    def _looking_once(self, handle: Callable[[Request], None] | Callable[[int], None], arg) -> None:
        """handle(arg) with peers() looked at once for what it handles (a request, a ring of the host), not per
        question (a plain try, not a context manager: it runs for every request)."""
        if self._looked is not None:
            handle(arg)  # inside another: its look holds
            return
        self._looked = self.peers()
        try:
            handle(arg)
        finally:
            self._looked = None

    def handle_write(self, request: Request) -> None:
        self._looking_once(self._handle_write, request)

    def _handle_write(self, request: Request) -> None:
        """Check everything first: a refused write leaves the region and the log exactly as they were."""
        plan = self._plan_write(request.message)
        token = next(self._tokens)
        self._requests[token] = request
        try:
            self.feed(WriteRequested(token, plan, request.cred.uid, plan.wait_for_guest, len(plan.data)))
        except BaseException:
            self._answered(token)  # answered by the control server, which the exception reaches
            raise

    def _plan_write(self, asked: WriteRequest) -> WritePlan:
        """What bytes go where and whom to ring, from a request whose fields control.parse has checked."""
        data, offset = asked.data, asked.offset
        try:
            if asked.text:
                padding = text_padding(data, offset, self.region.size, asked.allow_unterminated)
                padding = self._keep_reply_area(offset + len(data), padding)
            else:
                padding = 0
                self.region.check_bounds(offset, len(data))
            self.region.check_intact()
        except RegionError as exc:
            raise ControlError(str(exc)) from None
        targets = self.ring_targets(asked.ring) if asked.ring else []
        wait = asked.wait and self.guest.handshake and any(self._is_guest(p) for p, _ in targets)
        return WritePlan(data, offset, padding, targets, wait, asked.timeout)

    def _keep_reply_area(self, end: int, padding: int) -> int:
        """With the built-in guest attached, padding stops short of its reply area (see layout.py); with several,
        short of their slots, which a host message never covers."""
        if self.guests is not None:
            if end > self.guests.host_area_end:
                raise RegionError(f"a message for the guests fits in the host's area of {self.guests.host_area_end} "
                                  f"bytes at offset 0 (the {self.guests.guests} guests' slots follow)")
            return min(padding, self.guests.host_area_end - end)
        reply_start = layout.reply_offset(self.region.size)
        if self.guest.handshake and end <= reply_start:
            return min(padding, reply_start - end)
        return padding

    def _write(self, token: int, plan: WritePlan) -> Written | WriteFailed:
        """Carry out a WriteNow: recorded (one record, its rings listed), written, rung; returns how it went, for
        the guest session. The record is in the log before the region is touched; its reply waits for the flush
        that puts it on disk (group commit: the writes of one turn of the loop share one fsync)."""
        request = self._requests[token]
        data, offset, padding, targets, wait_for_guest, timeout = plan
        try:
            sha = hashlib.sha256(data).hexdigest()
            peers = self.peers()
            rang = [self._ring_plan(peer, vector, peers) for peer, vector in targets]
            # Recorded first: if the log cannot be written, the region is not either, nor is anyone rung.
            record = self.recorder.stage("write", actor=request.actor, offset=offset, length=len(data), sha256=sha,
                                         detail={"padding": padding}, rings=[_ring_record(ring) for ring in rang])
            # before: a hole this write would fill again (and hide) is repaired from the copy first. With rings,
            # the padding our earlier writes left as NULs is looked at after them (finish), while the guest reads.
            finish = self.region.write(offset, data, zero_fill=padding, before=self.guard.before_write,
                                       defer_check=bool(targets))
            try:
                # What the guest waits for goes first: the ring. Then what its reply waits for too: the record's fsync,
                # started at once (not at the end of the turn), so that it runs while the guest reads. Then the guard's
                # copy and the padding's look, which nothing outside sees before the reply. Nothing between the write
                # and remember() can repair the region.
                started = time.monotonic()  # the clock starts before the ring: the round trip is ring, guest, ack
                for peer, vector in targets:
                    self._carry_out(self.guest.handle(RingRequested(peer, vector), peers))
                if wait_for_guest:
                    self.recorder.start_commit()
            finally:
                try:
                    self.guard.remember(offset, data, padding)  # this write survives every later repair
                finally:
                    finish()  # before anyone is answered: the region reads as if every NUL of the padding was written
            reply = (("seq", record["seq"]), ("sha256", sha), ("offset", offset), ("length", len(data)),
                     ("rang", rang))
        except ShmguardError as exc:  # checked when planned; the log or the region may have failed since
            return WriteFailed(token, str(exc))
        return Written(token, reply, zlib.crc32(data.split(b"\0", 1)[0]), wait_for_guest, timeout, started)

    def handle_ring(self, request: Request) -> None:
        self._looking_once(self._handle_ring, request)

    def _handle_ring(self, request: Request) -> None:
        targets = self.ring_targets(request.message.target)
        rang, seq = [], None
        for peer, vector in targets:
            ring, seq = self.ring(peer, vector, request.actor)
            rang.append(ring)
        if seq is None:
            request.reply(rang=rang)
        else:  # what it tells of is on record once the last of its records is
            request.reply_once_recorded(seq, rang=rang)

    # --- ringing peers -------------------------------------------------------------------------------

    def guest_peer_id(self) -> int | None:
        return self.guest.guest_peer_id(self.peers())

    def peers(self) -> Peers:
        """What the guest session is told of the peers: those that are not the host, and which is our QEMU. Looked
        at once per request or ring of the host (`_looked`): nothing in between changes them, and asking whether
        QEMU has exited is a wait4 each time."""
        if self._looked is not None:
            return self._looked
        others = [p for p in self.server.peers.values() if p.cred is not None]
        qemu_pid, started, exited = self.qemu()
        ours = next((p.id for p in others if p.cred.pid == qemu_pid), None)
        return Peers(tuple(p.id for p in others), ours, started, exited)

    def ring_targets(self, target) -> list[tuple[int, int]]:
        """'guest', 'all', 'PEER' or 'PEER:VECTOR' as (peer, vector) pairs; raises ControlError if unknown."""
        peers = self.server.peers
        if target == "guest":
            return [(self.guest.guest_target(self.peers()), 0)]
        if target == "all":
            return [(p.id, v) for p in peers.values() if p.cred is not None for v in range(len(p.vectors))]
        peer_text, _, vector_text = str(target).partition(":")
        if not _is_number(peer_text) or (vector_text and not _is_number(vector_text)):
            raise ControlError(f"ring target {str(target)[:64]!r} is not 'guest', 'all', PEER or PEER:VECTOR")
        peer_id, vector = int(peer_text), int(vector_text or 0)
        if peer_id not in peers or peer_id == self.peer.id:
            raise ControlError(f"no peer {peer_id} to ring (peers: {sorted(set(peers) - {self.peer.id}) or 'none'})")
        if vector >= len(peers[peer_id].vectors):
            raise ControlError(f"peer {peer_id} has vectors 0..{len(peers[peer_id].vectors) - 1}, not {vector}")
        return [(peer_id, vector)]

    def _is_guest(self, peer_id: int) -> bool:
        return self.guest.is_guest(peer_id, self.peers())

    def ring(self, peer_id: int, vector: int, actor) -> tuple[dict, int]:
        """Ring now, or hold the ring until the built-in guest has said it is ready (a doorbell rung
        before the guest enabled MSI-X is lost). Returns what the reply says of it, and its record's seq."""
        peers = self.peers()
        ring = self._ring_plan(peer_id, vector, peers)
        # Recorded first: a ring the log cannot take is not rung, nor held.
        record = self.recorder.stage("ring", actor=actor, detail=_ring_record(ring))
        self._carry_out(self.guest.handle(RingRequested(peer_id, vector), peers))
        return ring, record["seq"]

    def _ring_plan(self, peer_id: int, vector: int, peers: Peers) -> dict:
        return {"peer": peer_id, "vector": vector, "guest": self.guest.is_guest(peer_id, peers),
                "held_until_ready": self.guest.holds(peer_id, peers)}

    def feed(self, event: Event) -> None:
        if type(event) is PeerLeft and not self.guest.heeds_leaves():
            return  # then the peers need not be looked at for it
        self._carry_out(self.guest.handle(event, self.peers()))
        if isinstance(event, (PeerLeft, TimedOut)) and self.guest.exchange is not None:
            self._carry_out(self.guest.exchange.handle(event, self.slot_peers()))

    # --- several guests: sends between them, their slots ---------------------------------------------------

    def handle_send(self, request: Request) -> None:
        """Ask one guest to send to another; answered with the sender's report. Checked first: a refused send
        writes nothing and records nothing."""
        asked, exchange, guests = request.message, self.guest.exchange, self.guests
        if exchange is None or guests is None:
            raise ControlError("this supervisor runs one guest: guests send to each other under "
                               "`shmguard run --guests 2` (or more)")
        if len(asked.data) > guests.text:
            raise ControlError(f"a message between guests holds at most {guests.text} bytes here ({guests.guests} "
                               f"guests in {self.region.size} bytes), not {len(asked.data)}: raise --size")
        if b"\0" in asked.data:
            raise ControlError("a message between guests is text: it has no NUL bytes")
        try:
            self.region.check_intact()
        except RegionError as exc:
            raise ControlError(str(exc)) from None
        token = next(self._tokens)
        self._requests[token] = request
        try:
            self._carry_out(exchange.handle(SendRequested(token, asked.source, asked.target, asked.data,
                                                          asked.timeout, time.monotonic()), self.slot_peers()))
        except BaseException:
            if self._answered(token) is not None:  # answered by the control server, which this reaches
                exchange.handle(SendFailed(token, "failed"), self.slot_peers())  # its guest may be asked again
            raise

    def slot_peers(self) -> SlotPeers:
        return self.slots.peers() if self.slots else SlotPeers()

    def describe_guests(self) -> list[dict]:
        return self.slots.describe(self.guest.exchange) if self.slots and self.guest.exchange else []

    def _write_slot(self, offset: int, data: bytes, cred, what: dict, peer: int) -> None:
        """An audited write into a guest's slot, then a ring of that guest: recorded first, as every write."""
        sha = hashlib.sha256(data).hexdigest()
        self.guard.before_write()
        self.recorder.record("write", actor=cred, offset=offset, length=len(data), sha256=sha,
                             detail={**what, "ring": [peer, layout.GUEST_VECTOR]})
        self.region.write(offset, data)
        self.guard.remember(offset, data, 0)
        self.server.ring(peer, layout.GUEST_VECTOR)


    def _carry_out(self, actions: list[Action]) -> None:
        """Do what the guest session says, in its order; a write's outcome goes back to it before the rest."""
        todo = deque(actions)  # not recursion: a queue of writes that all fail is as long as the policy allows
        while todo:
            action = todo.popleft()
            match action:
                case WriteNow(token, plan):  # the most frequent cases first: every case tried costs a look
                    todo.extendleft(reversed(self.guest.handle(self._write(token, plan), self.peers())))
                case Reply(token, fields):  # a write's is sent once its record is on disk
                    fields = dict(fields)
                    if (request := self._answered(token)) is None:
                        pass  # answered by an error already
                    elif "seq" in fields:  # a write's; with an ack its requester waits for this one reply alone
                        request.reply_once_recorded(fields["seq"], promptly="ack" in fields, **fields)
                    else:
                        request.reply(**fields)
                case Ring(peer, vector, held=False):
                    self.server.ring(peer, vector)
                case RefreshGuard(reply_only=True):  # an ack: the guest rewrote its reply area, nothing else
                    self.guard.refresh((layout.reply_offset(self.region.size), self.region.size))
                case Log(level, message):  # one per acknowledged write
                    log.log(_LEVELS.get(level) or logging.getLevelName(level.upper()), "%s", message)
                case ScheduleTimeout(token, seconds):
                    self._timers[token, "timeout"] = self.loop.call_later(seconds,
                                                                          lambda t=token: self.feed(TimedOut(t)))
                case Ring(peer, vector, held=True):
                    try:
                        self.server.ring(peer, vector)
                    except ShmguardError as exc:  # that peer left while its ring was held
                        log.warning("held ring for peer %d vector %d dropped: %s", peer, vector, exc)
                case Hold() | Queue():
                    pass  # the session keeps them
                case Fail(token, error, fields):
                    if (request := self._answered(token)) is not None:
                        request.fail(error, **dict(fields))
                case RefreshGuard():
                    self.guard.refresh()
                case Record(what, detail):
                    self.recorder.note(what, detail=dict(detail))
                case Notify(status):
                    sdnotify.status(status)
                case WriteCommand(token, slot, peer, data):
                    try:
                        self._write_slot(self.guests.command(slot), data, self._requests[token].cred,
                                         {"command_for_guest": slot}, peer)
                    except ShmguardError as exc:  # the log, the region, or the guest gone since
                        todo.extendleft(reversed(self.guest.exchange.handle(SendFailed(token, str(exc)),
                                                                            self.slot_peers())))
                case WritePeers(slot, peer, data):
                    if peer not in self.server.peers:
                        continue  # gone too (every peer leaves at shutdown): nobody to tell
                    try:
                        self._write_slot(self.guests.peers(slot), data, None, {"peers_for_guest": slot}, peer)
                    except ShmguardError as exc:
                        log.warning("guest %d was not told who is there: %s", slot, exc)
                case ScheduleNudge(token, seconds):
                    self._timers[token, "nudge"] = self.loop.call_later(seconds, lambda t=token: self._nudge(t))
                case PassOn(vector, reply):
                    todo.extendleft(reversed(self.guest.handle(HostRung(vector, reply, time.monotonic()),
                                                               self.peers())))
                case _:
                    raise AssertionError(f"not an action of the guest session: {action!r}")

    def _answered(self, token: int) -> Request | None:
        """The request of token, gone from those waiting, and its timers cancelled: a flood of acknowledged writes
        must not leave a timeout each in the loop's heap for the whole of its timeout."""
        for kind in ("timeout", "nudge"):
            if (timer := self._timers.pop((token, kind), None)) is not None:
                timer.cancel()
        return self._requests.pop(token, None)

    def _on_host_rung(self, vector: int, fd: int) -> None:
        if eventfd.drain(fd) is None:  # a peer drained it between epoll and now; never a blocking read
            return
        self._looking_once(self._host_rung, vector)

    def _host_rung(self, vector: int) -> None:
        if self.guests is not None and self.guest.exchange is not None:  # rings coalesce: read every slot
            self._read_slots()
            return
        self.feed(HostRung(vector, self.read_reply(), time.monotonic()))

    def _read_slots(self) -> None:
        self._carry_out(self.guest.exchange.handle(self.slots.read(time.monotonic()), self.slot_peers()))

    def _nudge(self, token) -> None:
        """A send still unreported: its report may be there with its ring lost, or the sender's ring lost."""
        self._read_slots()
        self._carry_out(self.guest.exchange.handle(Nudged(token), self.slot_peers()))

    def read_reply(self) -> str:
        raw = self.region.read(layout.reply_offset(self.region.size), layout.REPLY_SIZE)
        text = raw.split(b"\0", 1)[0].decode("ascii", "replace")
        if text.isprintable():  # an ack or "ready" line: nothing to replace
            return text
        return "".join(c if c.isprintable() else "?" for c in text)  # the guest must not forge log lines


class GuestSlots:
    """Several built-in guests as the host sees them: their slots' reply and report lines, and which connected peer
    is the QEMU this supervisor started for each slot."""

    def __init__(self, places: layout.GuestLayout, region: Region, server: IvshmemServer,
                 qemus: Callable[[], list[tuple[int, bool]]]):
        self.places, self.region, self.server = places, region, server
        self.qemus = qemus  # (pid, exited) of the QEMU this supervisor started for each slot

    def peers(self) -> SlotPeers:
        others = [p for p in self.server.peers.values() if p.cred is not None]
        owners = [None if exited else next((p.id for p in others if p.cred.pid == pid), PENDING_GUEST)
                  for pid, exited in self.qemus()]
        return SlotPeers(tuple(p.id for p in others), tuple(owners))

    def read(self, now: float) -> SlotsRead:
        count = range(self.places.guests)
        return SlotsRead(tuple(self._line(self.places.reply(k)) for k in count),
                         tuple(self._line(self.places.report(k)) for k in count), now)

    def describe(self, exchange) -> list[dict]:
        pids = [pid for pid, _ in self.qemus()]
        return [{**entry, "qemu_pid": pids[entry["guest"]] if entry["guest"] < len(pids) else None,
                 "text": self.places.text} for entry in exchange.describe(self.peers().owners)]

    def _line(self, offset: int) -> str | None:
        text = layout.whole_line(self.region.read, offset)
        return None if text is None else "".join(c if c.isprintable() else "?" for c in text)  # no forged log lines


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _ring_record(ring: dict) -> dict:
    """A ring as its audit record lists it."""
    return {"peer": ring["peer"], "vector": ring["vector"], "held_until_ready": ring["held_until_ready"]}


def _is_number(text: str) -> bool:
    """A peer id or vector as digits: "²".isdigit() is true and int("²") is not; 5000 digits make int() raise."""
    return text.isascii() and text.isdigit() and len(text) <= 5
