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
from dataclasses import dataclass

from . import layout
from .control import WriteRequest
from .control_server import Request
from .errors import ControlError, RegionError, ShmguardError
from .guard import Guard
from .guest_session import (
    Action,
    Event,
    Fail,
    GuestSession,
    Hold,
    HostRung,
    Log,
    Notify,
    Peers,
    Queue,
    Record,
    RefreshGuard,
    Reply,
    Ring,
    RingRequested,
    ScheduleTimeout,
    TimedOut,
    WriteFailed,
    WriteNow,
    WriteRequested,
    Written,
)
from .linux import eventfd, sdnotify
from .loop import EventLoop
from .recorder import Recorder
from .region import Region, text_padding
from .server import IvshmemServer, Peer

log = logging.getLogger("shmguard")


@dataclass(frozen=True)
class WritePlan:
    """A write request, checked in full before anything is written or recorded."""

    data: bytes
    offset: int
    padding: int
    targets: list[tuple[int, int]]
    wait_for_guest: bool
    timeout: float


class HostPeer:
    def __init__(self, peer: Peer, region: Region, server: IvshmemServer, guard: Guard, recorder: Recorder,
                 loop: EventLoop, guest: GuestSession, qemu: Callable[[], tuple[int | None, bool, bool]]):
        self.peer, self.region, self.server, self.guard = peer, region, server, guard
        self.recorder, self.loop, self.guest = recorder, loop, guest
        self.qemu = qemu  # (pid, started, exited) of the QEMU this supervisor runs, if any
        self._requests: dict[int, Request] = {}  # the control requests the guest session knows by token
        self._tokens = itertools.count()
        for vector, fd in enumerate(peer.vectors):
            loop.add_reader(fd.fd, lambda v=vector, f=fd.fd: self._on_host_rung(v, f))

    @property
    def id(self) -> int:
        return self.peer.id

    def handle_write(self, request: Request) -> None:
        """Check everything first: a refused write leaves the region and the log exactly as they were."""
        plan = self._plan_write(request.message)
        token = next(self._tokens)
        self._requests[token] = request
        try:
            self.feed(WriteRequested(token, plan, request.cred.uid, plan.wait_for_guest, len(plan.data)))
        except BaseException:
            self._requests.pop(token, None)  # answered by the control server, which the exception reaches
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
        """With the built-in guest attached, padding stops short of its reply area (see layout.py)."""
        reply_start = layout.reply_offset(self.region.size)
        if self.guest.handshake and end <= reply_start:
            return min(padding, reply_start - end)
        return padding

    def _write(self, token: int, plan: WritePlan) -> Written | WriteFailed:
        """Carry out a WriteNow: recorded (one record, its rings listed), written, rung; returns how it went, for
        the guest session. The record is in the log before the region is touched; its reply waits for the flush
        that puts it on disk (group commit: the writes of one turn of the loop share one fsync)."""
        request = self._requests[token]
        try:
            sha = hashlib.sha256(plan.data).hexdigest()
            self.guard.before_write()  # a hole this write would fill again (and hide) is repaired from the copy
            peers = self.peers()
            rang = [self._ring_plan(peer, vector, peers) for peer, vector in plan.targets]
            # Recorded first: if the log cannot be written, the region is not either, nor is anyone rung.
            record = self.recorder.stage("write", actor=request.actor, offset=plan.offset, length=len(plan.data),
                                         sha256=sha, detail={"padding": plan.padding},
                                         rings=[_ring_record(ring) for ring in rang])
            self.region.write(plan.offset, plan.data, zero_fill=plan.padding)
            self.guard.remember(plan.offset, plan.data, plan.padding)  # this write survives every later repair
            reply = {"seq": record["seq"], "sha256": sha, "offset": plan.offset, "length": len(plan.data)}
            started = time.monotonic()  # the clock starts before the ring: the round trip is ring, guest, ack
            for peer, vector in plan.targets:
                self._carry_out(self.guest.handle(RingRequested(peer, vector), peers))
            reply["rang"] = rang
        except ShmguardError as exc:  # checked when planned; the log or the region may have failed since
            return WriteFailed(token, str(exc))
        return Written(token, tuple(reply.items()), zlib.crc32(plan.data.split(b"\0", 1)[0]), plan.wait_for_guest,
                       plan.timeout, started)

    def handle_ring(self, request: Request) -> None:
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
        """What the guest session is told of the peers: those that are not the host, and which is our QEMU."""
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
        self._carry_out(self.guest.handle(event, self.peers()))

    def _carry_out(self, actions: list[Action]) -> None:
        """Do what the guest session says, in its order; a write's outcome goes back to it before the rest."""
        todo = deque(actions)  # not recursion: a queue of writes that all fail is as long as the policy allows
        while todo:
            action = todo.popleft()
            match action:
                case Ring(peer, vector, held=False):
                    self.server.ring(peer, vector)
                case Ring(peer, vector, held=True):
                    try:
                        self.server.ring(peer, vector)
                    except ShmguardError as exc:  # that peer left while its ring was held
                        log.warning("held ring for peer %d vector %d dropped: %s", peer, vector, exc)
                case Hold() | Queue():
                    pass  # the session keeps them
                case WriteNow(token, plan):
                    todo.extendleft(reversed(self.guest.handle(self._write(token, plan), self.peers())))
                case Reply(token, fields):  # a write's: sent once its record is on disk
                    fields = dict(fields)
                    self._requests.pop(token).reply_once_recorded(fields["seq"], **fields)
                case Fail(token, error, fields):
                    self._requests.pop(token).fail(error, **dict(fields))
                case RefreshGuard():
                    self.guard.refresh()
                case Record(what, detail):
                    self.recorder.note(what, detail=dict(detail))
                case Log(level, message):
                    log.log(logging.getLevelName(level.upper()), "%s", message)
                case Notify(status):
                    sdnotify.status(status)
                case ScheduleTimeout(token, seconds):
                    self.loop.call_later(seconds, lambda t=token: self.feed(TimedOut(t)))
                case _:
                    raise AssertionError(f"not an action of the guest session: {action!r}")

    def _on_host_rung(self, vector: int, fd: int) -> None:
        if eventfd.drain(fd) is None:  # a peer drained it between epoll and now; never a blocking read
            return
        self.feed(HostRung(vector, self.read_reply(), time.monotonic()))

    def read_reply(self) -> str:
        raw = self.region.read(layout.reply_offset(self.region.size), layout.REPLY_SIZE)
        text = raw.split(b"\0", 1)[0].decode("ascii", "replace")
        return "".join(c if c.isprintable() else "?" for c in text)  # the guest must not forge log lines


def _ring_record(ring: dict) -> dict:
    """A ring as its audit record lists it."""
    return {"peer": ring["peer"], "vector": ring["vector"], "held_until_ready": ring["held_until_ready"]}


def _is_number(text: str) -> bool:
    """A peer id or vector as digits: "²".isdigit() is true and int("²") is not; 5000 digits make int() raise."""
    return text.isascii() and text.isdigit() and len(text) <= 5
