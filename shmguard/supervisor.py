"""Supervisor: composes region, server, audit, control socket, guard and QEMU into one event loop."""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import resource
import signal
import socket
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from . import layout, sdnotify
from .audit import Actor, AuditLog
from .control import ControlServer, Request
from .errors import ControlError, RegionError, ShmguardError
from .guard import Guard
from .guest import GuestImage, build_guest
from .hardening import drop_identity, harden, lock_memory
from .linux import eventfd
from .loop import EventLoop
from .paths import policy_owners
from .policy import Policy, SharesPolicy
from .qemu import QemuProcess, choose_accel, qemu_command
from .region import Region, text_padding
from .server import IvshmemServer, Peer, PeerCred
from .shares import Share

log = logging.getLogger("shmguard")


@dataclass(frozen=True)
class GuestOptions:
    """Which guest to boot under QEMU; kernel None means the built-in guest."""

    kernel: str | None = None
    initrd: str | None = None
    append: str = ""
    qemu_args: tuple[str, ...] = ()

    @property
    def builtin(self) -> bool:
        return self.kernel is None


PENDING_GUEST = -1  # the peer id of "our guest", while its QEMU has not connected yet


@dataclass(frozen=True)
class WritePlan:
    """A write request, checked in full before anything is written or recorded."""

    data: bytes
    offset: int
    padding: int
    targets: list[tuple[int, int]]
    wait_for_guest: bool
    timeout: float


@dataclass(eq=False)
class AckWaiter:
    """A write request waiting for the guest's acknowledgement of its message."""

    request: Request
    reply: dict
    crc32: int
    started: float = field(default_factory=time.monotonic)


@dataclass
class GuestState:
    """What the supervisor knows of the guest it rings: is it ready, and who waits for its acks."""

    handshake: bool = False  # the built-in guest says "ready" and acknowledges; other guests do not
    ready: bool = False
    joined: set[int] = field(default_factory=set)  # peers whose built-in guest said "ready <id>" itself
    # (peer, vector) held until ready, each once: rings coalesce, so a flood of them holds no more than this
    pending_rings: dict[tuple[int, int], None] = field(default_factory=dict)
    waiter: AckWaiter | None = None  # one message in flight: the next would overwrite it before it is read
    acks: int = 0
    last_reply: str = ""


@dataclass
class AuditTrouble:
    """The audit log cannot be written. The rule: joins, writes and rings, which are recorded before they happen,
    are refused; leaves, refusals and incidents go on unrecorded and are counted here; every new record tries the
    log again, and the first that succeeds is an `audit-gap` record of what is missing."""

    error: str
    since: str
    missed: dict[str, int] = field(default_factory=dict)  # action -> records not written

    def describe(self) -> dict:
        return {"error": self.error, "since": self.since, "missed": dict(self.missed)}


class WriteQueue:
    """Writes waiting behind the one whose acknowledgement is awaited, bounded in count and bytes, per uid and in
    all (shares.queued_writes*, shares.buffer_bytes*), with the reserve kept for shares.reserved_for."""

    def __init__(self, shares: SharesPolicy):
        reserved = frozenset(shares.reserved_for)
        self.count = Share("queued writes", shares.queued_writes, shares.queued_writes_per_uid,
                           min(shares.queued_writes_per_uid, shares.queued_writes - 1), reserved)
        self.bytes = Share("bytes of queued writes", shares.buffer_bytes, shares.buffer_bytes_per_uid,
                           min(shares.buffer_bytes_per_uid, shares.buffer_bytes - 1), reserved)
        self.entries: deque[tuple[Request, WritePlan]] = deque()

    def push(self, request: Request, plan: WritePlan) -> None:
        uid, size = request.cred.uid, len(plan.data)
        reason = self.count.refusal(uid) or self.bytes.refusal(uid, size)
        if reason is not None:
            raise ControlError(f"write not queued: {reason} (policy [shares]); try again once the guest has "
                               "acknowledged the writes before it")
        self.count.take(uid)
        self.bytes.take(uid, size)
        self.entries.append((request, plan))

    def pop(self) -> tuple[Request, WritePlan]:
        request, plan = self.entries.popleft()
        self.count.give(request.cred.uid)
        self.bytes.give(request.cred.uid, len(plan.data))
        return request, plan

    def __len__(self) -> int:
        return len(self.entries)


def raise_fd_limit() -> None:
    """Peers cost one socket plus one eventfd per vector: use the whole hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Supervisor:
    def __init__(self, policy: Policy, guest: GuestOptions | None = None):
        self.policy, self.guest_options = policy, guest
        self.loop = EventLoop()
        self.audit: AuditLog | None = None
        self.region: Region | None = None
        self.server: IvshmemServer | None = None
        self.host: Peer | None = None  # the supervisor's own peer
        self.guest = GuestState()
        self.queued = WriteQueue(policy.shares)
        self.audit_trouble: AuditTrouble | None = None
        self.exit_code = 0
        self.qemu: QemuProcess | None = None
        self.guard: Guard | None = None
        self.control: ControlServer | None = None
        self._signal_sockets: tuple[socket.socket, socket.socket] | None = None
        self._stop_hooks: list[Callable[[], None]] = []

    # --- start-up ----------------------------------------------------------------------------------

    def start(self) -> None:
        options = self.guest_options
        if options and options.builtin and self.policy.server.vectors <= layout.ACK_VECTOR:
            raise ShmguardError(f"the built-in guest acknowledges on vector {layout.ACK_VECTOR}: run it with "
                                f"--vectors {layout.ACK_VECTOR + 1} or more, or serve only with --no-guest")
        raise_fd_limit()
        owners = policy_owners(self.policy.server.owner, self.policy.hardening.user)  # may own its directories
        self.audit = AuditLog.open(self.policy.audit.path, self.policy.audit.durable, owners)
        if self.audit.torn_tail:
            log.warning("audit log %s: %s (sealed off with a torn-tail record)", self.audit.path, self.audit.torn_tail)
        self.region = Region.create(self.policy.region)
        if self.policy.region.mlock:
            lock_memory(self.region.mapping)
        log.info("region: %s backend, %d bytes%s", self.region.backend, self.region.size,
                 f", sealed {sorted(self.region.seals())}" if self.region.sealed else f" at {self.region.path}")
        self.server = IvshmemServer(self.policy.server, self.region.fd, self.loop, on_event=self._on_server_event,
                                    region_intact=self._region_intact, shares=self.policy.shares, owners=owners)
        self.server.start()
        self.host = self.server.add_local_peer()
        for vector, fd in enumerate(self.host.vectors):
            self.loop.add_reader(fd.fd, lambda v=vector, f=fd.fd: self._on_host_rung(v, f))
        self._start_control()
        self.guard = Guard(self)  # it watches the region and both sockets, so it starts once they exist
        self.add_stop_hook(self.guard.close)
        self.guard.start()
        self._install_signals()
        # The guest image may need building (apt-get, gcc): done while the process still may.
        qemu_argv = self._prepare_guest(self.guest_options) if self.guest_options else None
        self._harden()
        self.record("start", detail={"policy": self.policy.name, "region": self.region.describe(),
                                     "socket": self.policy.server.socket, "host_peer": self.host.id})
        if not sdnotify.ready(f"serving {self.policy.server.socket}") and "NOTIFY_SOCKET" in os.environ:
            log.warning("could not send READY=1 to NOTIFY_SOCKET %s", os.environ["NOTIFY_SOCKET"])
        if qemu_argv is not None:
            self._start_qemu(qemu_argv)

    def _harden(self) -> None:
        """Drop what the policy does not need, once the region and sockets exist and before QEMU starts."""
        hardening = self.policy.hardening
        if hardening.user:
            drop_identity(hardening.user, hardening.group, keep=hardening.capabilities)
            log.info("running as user %s from here on", hardening.user)
        elif os.geteuid() == 0:
            # Without CAP_CHOWN, a repair may still give a file to a group the process is a member of.
            os.setgroups(sorted({self.policy.server.group, self.policy.region.group}))
        report = harden(hardening)
        for warning in report.warnings:
            log.warning("hardening: %s", warning)
        log.info("hardened: %s", ", ".join(step.name for step in report.steps if step.ok))

    # --- the guest under QEMU ------------------------------------------------------------------------

    def _region_intact(self) -> bool:
        """Before the region goes to a new peer: let the guard repair what it can, then look again."""
        if self.region.backend == "memfd":  # sealed at creation: its size cannot change
            return True
        if self.guard is not None:
            self.guard.check()
        return self.region.state().size == self.region.size

    def _prepare_guest(self, options: GuestOptions) -> list[str]:
        """The QEMU command line for the guest: the image built, the accelerator chosen."""
        image = build_guest(log=log.info) if options.builtin else GuestImage(
            Path(options.kernel), Path(options.initrd) if options.initrd else None, options.append)
        accel, reason = choose_accel(kernel=image.kernel)
        log.info("QEMU accelerator: %s (%s)", accel, reason)
        self.guest.handshake = options.builtin
        return qemu_command(socket_path=self.policy.server.socket, vectors=self.policy.server.vectors, guest=image,
                            host_peer_id=self.host.id if options.builtin else None, accel=accel,
                            memory=self.policy.qemu.memory, extra_args=options.qemu_args)

    def _start_qemu(self, argv: list[str]) -> None:
        """QEMU starts after hardening, so it inherits no capability the supervisor dropped."""
        self.qemu = QemuProcess(argv)
        log.info("started QEMU pid %d: %s", self.qemu.pid, " ".join(argv))
        self.loop.add_reader(self.qemu.console_fd, self._on_console)
        self.add_stop_hook(self._stop_qemu)

    def _on_console(self) -> None:
        for line in self.qemu.read_console():
            if line.strip():
                log.info("guest: %s", line)
        if self.qemu.console_eof:  # the pipe closes when QEMU exits (or closes its stdout: then it is ended)
            self.loop.remove_reader(self.qemu.console_fd)
            self._on_qemu_exit(self.qemu.terminate(timeout=2.0))

    def _on_qemu_exit(self, status: int) -> None:
        leaving = self.policy.qemu.on_exit == "exit"
        log.warning("QEMU pid %d exited with status %d; %s", self.qemu.pid, status,
                    "stopping (policy qemu.on_exit = exit)" if leaving else "still serving peers")
        self.note("qemu-exit", result="exited", detail={"pid": self.qemu.pid, "status": status,
                                                          "response": self.policy.qemu.on_exit})
        self.guest.ready = False
        if self.guest.waiter is not None:
            waiter, self.guest.waiter = self.guest.waiter, None
            waiter.request.fail("QEMU exited before the guest acknowledged", **waiter.reply)
        while self.queued:
            request, _ = self.queued.pop()
            request.fail("QEMU exited before this write's turn came; nothing was written")
        if leaving:
            self.exit_code = 3
            self.loop.stop()

    def _stop_qemu(self) -> None:
        if self.qemu is not None:
            if not self.qemu.console_eof:
                self.loop.remove_reader(self.qemu.console_fd)
            self.qemu.close()

    def _install_signals(self) -> None:
        """Signals wake the loop through a socket, so they are handled in the loop, not in a handler."""
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._signal_sockets = (reader, writer)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda *_: None)
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self.loop.add_reader(reader.fileno(), self._on_signal)

    def _on_signal(self) -> None:
        try:
            received = self._signal_sockets[0].recv(64)
        except BlockingIOError:
            return
        for signum in received:
            if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                log.info("received %s: shutting down", signal.Signals(signum).name)
                self.loop.stop()

    # --- the control socket --------------------------------------------------------------------------

    def _start_control(self) -> None:
        policy = self.policy
        max_request = self.region.size * 2 + 65536  # a whole region in base64, plus the request around it
        self.control = ControlServer(policy.control, policy.server.owner, policy.server.group, self.loop, max_request,
                                     policy.shares, owners=self.server.owners)
        self.control.route("write", policy.control.writers, self._handle_write)
        self.control.route("ring", policy.control.ringers, self._handle_ring)
        self.control.route("status", policy.control.readers, self._handle_status)
        self.control.on_refused = lambda cred, op, reason: self.note(
            "refused", actor=cred, result="refused", detail={"op": op, "reason": reason})
        self.control.start()
        self.add_stop_hook(self.control.close)

    def _handle_write(self, request: Request) -> None:
        """Check everything first: a refused write leaves the region and the log exactly as they were."""
        plan = self._plan_write(request.body)
        if plan.wait_for_guest and self.guest.waiter is not None:
            self.queued.push(request, plan)  # its turn comes with the acknowledgement before it
            return
        self._write(request, plan)

    def _plan_write(self, body: dict) -> WritePlan:
        data = _decode_data(body.get("data"))
        offset = _whole_number(body.get("offset", 0), "offset")
        timeout = _seconds(body.get("timeout", 60), "timeout", self.policy.shares.wait_seconds)
        try:
            if body.get("text"):
                padding = text_padding(data, offset, self.region.size, bool(body.get("allow_unterminated")))
                padding = self._keep_reply_area(offset + len(data), padding)
            else:
                padding = 0
                self.region.check_bounds(offset, len(data))
            self.region.check_intact()
        except RegionError as exc:
            raise ControlError(str(exc)) from None
        targets = self.ring_targets(body["ring"]) if body.get("ring") else []
        wait = bool(body.get("wait")) and self.guest.handshake and any(self._is_guest(p) for p, _ in targets)
        return WritePlan(data, offset, padding, targets, wait, timeout)

    def _keep_reply_area(self, end: int, padding: int) -> int:
        """With the built-in guest attached, padding stops short of its reply area (see layout.py)."""
        reply_start = layout.reply_offset(self.region.size)
        if self.guest.handshake and end <= reply_start:
            return min(padding, reply_start - end)
        return padding

    def _write(self, request: Request, plan: WritePlan) -> None:
        sha = hashlib.sha256(plan.data).hexdigest()
        # Recorded first: if the log cannot be written, the region is not either.
        record = self.record("write", actor=request.cred, offset=plan.offset, length=len(plan.data), sha256=sha,
                             detail={"padding": plan.padding})
        self.region.write(plan.offset, plan.data, zero_fill=plan.padding)
        self.guard.remember(plan.offset, plan.data, plan.padding)  # this write survives every later repair
        reply = {"seq": record["seq"], "sha256": sha, "offset": plan.offset, "length": len(plan.data)}
        if plan.wait_for_guest:  # the clock starts before the ring: the round trip is ring, guest, ack
            waiter = self.guest.waiter = AckWaiter(request, reply, zlib.crc32(plan.data.split(b"\0", 1)[0]))
            self.loop.call_later(plan.timeout, lambda: self._ack_timeout(waiter, plan.timeout))
        reply["rang"] = [self.ring(peer, vector, request.cred) for peer, vector in plan.targets]
        if not plan.wait_for_guest:
            request.reply(**reply)

    def _next_queued_write(self) -> None:
        while self.guest.waiter is None and self.queued:
            request, plan = self.queued.pop()
            try:
                self._write(request, plan)
            except ShmguardError as exc:  # checked when queued; the log or the region may have failed since
                request.fail(str(exc))

    def _handle_ring(self, request: Request) -> None:
        targets = self.ring_targets(request.body.get("target"))
        request.reply(rang=[self.ring(peer, vector, request.cred) for peer, vector in targets])

    def _handle_status(self, request: Request) -> None:
        request.reply(**self.status())

    def status(self) -> dict:
        return {
            "policy": self.policy.name,
            "region": self.region.describe(),
            "socket": self.policy.server.socket,
            "host_peer": self.host.id,
            "peers": [peer.describe() for peer in self.server.peers.values()],
            "guest": {"peer": self.guest_peer_id(), "handshake": self.guest.handshake, "ready": self.guest.ready,
                      "acks": self.guest.acks, "last_reply": self.guest.last_reply,
                      "ready_guests": sorted(self.guest.joined & set(self.server.peers)),
                      "writes_waiting": len(self.queued)},
            "audit": {"path": str(self.audit.path), "last_seq": self.audit.last_seq,
                      "writable": self.audit_trouble is None,
                      "trouble": self.audit_trouble.describe() if self.audit_trouble else None},
            "shares": {**self.server.describe_shares(), "queued_writes": self.queued.count.describe(),
                       "queued_write_bytes": self.queued.bytes.describe()},
            "guard": self.guard.describe(),
        }

    # --- ringing peers -------------------------------------------------------------------------------

    def guest_peer_id(self) -> int | None:
        """The guest is the QEMU this supervisor started; else the one built-in guest that said it is ready,
        whoever started its QEMU (libvirt, by hand); else the only peer that is not the host."""
        others = [p for p in self.server.peers.values() if p.cred is not None]
        qemu_pid = self.qemu_pid()
        ours = [p for p in others if p.cred.pid == qemu_pid]
        if ours:
            return ours[0].id
        if qemu_pid is not None:
            return None
        joined = [p.id for p in others if p.id in self.guest.joined]
        if joined:
            return joined[0] if len(joined) == 1 else None  # several: each is rung by its id
        return others[0].id if len(others) == 1 else None

    def qemu_pid(self) -> int | None:
        return self.qemu.pid if self.qemu is not None else None

    def _qemu_exited(self) -> bool:
        """A ring held for a guest whose QEMU is gone would wait forever: QEMU never comes back."""
        return self.qemu is not None and self.qemu.poll() is not None

    def ring_targets(self, target) -> list[tuple[int, int]]:
        """'guest', 'all', 'PEER' or 'PEER:VECTOR' as (peer, vector) pairs; raises ControlError if unknown."""
        peers = self.server.peers
        if target == "guest":
            peer_id = self.guest_peer_id()
            joined = sorted(p for p in self.guest.joined if p in peers)
            if peer_id is None and self.qemu is None and len(joined) > 1:
                raise ControlError(f"several guests are ready (peers {', '.join(map(str, joined))}): ring one "
                                   f"by its id, e.g. --ring {joined[0]}")
            if peer_id is None:
                if self.guest.handshake and not self._qemu_exited():  # not connected yet: ring once it is ready
                    return [(PENDING_GUEST, 0)]
                raise ControlError("no guest is connected (ring a peer id instead; see `shmguard status`)")
            return [(peer_id, 0)]
        if target == "all":
            return [(p.id, v) for p in peers.values() if p.cred is not None for v in range(len(p.vectors))]
        peer_text, _, vector_text = str(target).partition(":")
        if not _is_number(peer_text) or (vector_text and not _is_number(vector_text)):
            raise ControlError(f"ring target {str(target)[:64]!r} is not 'guest', 'all', PEER or PEER:VECTOR")
        peer_id, vector = int(peer_text), int(vector_text or 0)
        if peer_id not in peers or peer_id == self.host.id:
            raise ControlError(f"no peer {peer_id} to ring (peers: {sorted(set(peers) - {self.host.id}) or 'none'})")
        if vector >= len(peers[peer_id].vectors):
            raise ControlError(f"peer {peer_id} has vectors 0..{len(peers[peer_id].vectors) - 1}, not {vector}")
        return [(peer_id, vector)]

    def _is_guest(self, peer_id: int) -> bool:
        return peer_id == PENDING_GUEST or peer_id == self.guest_peer_id() or peer_id in self.guest.joined

    def ring(self, peer_id: int, vector: int, cred) -> dict:
        """Ring now, or hold the ring until the built-in guest has said it is ready (a doorbell rung
        before the guest enabled MSI-X is lost)."""
        is_guest = self._is_guest(peer_id)
        held = is_guest and self.guest.handshake and not self.guest.ready and peer_id not in self.guest.joined
        # Recorded first: a ring the log cannot take is not rung.
        self.record("ring", actor=cred, detail={"peer": peer_id, "vector": vector, "held_until_ready": held})
        if held:
            self.guest.pending_rings[peer_id, vector] = None
        else:
            self.server.ring(peer_id, vector)
        return {"peer": peer_id, "vector": vector, "guest": is_guest, "held_until_ready": held}

    def _ack_timeout(self, waiter: AckWaiter, timeout: float) -> None:
        if self.guest.waiter is waiter:
            self.guest.waiter = None
            waiter.request.fail(f"the guest did not acknowledge within {timeout:g} s (the write itself is "
                                f"recorded as seq {waiter.reply['seq']})", **waiter.reply)
            self._next_queued_write()

    # --- events --------------------------------------------------------------------------------------

    def record(self, action: str, *, actor: PeerCred | Actor | None = None, result: str = "ok", **fields) -> dict:
        """Append a record; raises ShmguardError if the log cannot take it (see AuditTrouble for the rule)."""
        if isinstance(actor, PeerCred):
            actor = Actor.from_pid(actor.pid, actor.uid, actor.gid)
        try:
            if self.audit_trouble is not None:
                self._record_gap()
            return self.audit.append(action, actor=actor, result=result, **fields)
        except ShmguardError as exc:
            self._audit_failed(action, str(exc))
            raise

    def note(self, action: str, **fields) -> dict | None:
        """Record what has happened already and cannot be undone: a log that cannot take it does not stop it."""
        try:
            return self.record(action, **fields)
        except ShmguardError:
            return None  # counted in audit_trouble, said once in the log

    def _audit_failed(self, action: str, error: str) -> None:
        if self.audit_trouble is None:
            self.audit_trouble = AuditTrouble(error, datetime.now(UTC).isoformat(timespec="seconds"))
            log.error("%s: refusing joins, writes and rings until it can be written again; connected peers are "
                      "still served, leaves and incidents go unrecorded (counted in `shmguard status`)", error)
            sdnotify.status(f"audit log unwritable: {error}")
        missed = self.audit_trouble.missed
        missed[action] = missed.get(action, 0) + 1

    def _record_gap(self) -> None:
        trouble = self.audit_trouble
        self.audit.append("audit-gap", result="resumed", detail=trouble.describe())
        self.audit_trouble = None
        log.warning("audit log %s is writable again; records missed while it was not: %s", self.audit.path,
                    trouble.missed)
        sdnotify.status("audit log writable again")

    def _on_host_rung(self, vector: int, fd: int) -> None:
        if eventfd.drain(fd) is None:  # a peer drained it between epoll and now; never a blocking read
            return
        reply = self.read_reply()
        ready_id, ack = layout.parse_ready(reply), layout.parse_ack(reply)
        if vector == layout.READY_VECTOR and ready_id is not None and self._is_peer(ready_id):
            self._on_guest_says_ready(ready_id, reply)
        elif vector == layout.ACK_VECTOR and ack is not None and self.guest.handshake and (
                self.guest_peer_id() is not None or self.guest.waiter is not None):
            self.on_guest_ack(reply, ack)
        else:  # any peer may ring the host: a stray ring is not worth more than a debug line
            log.debug("host rung on vector %d (reply area: %r)", vector, reply[:80])

    def _is_peer(self, peer_id: int) -> bool:
        peer = self.server.peers.get(peer_id)
        return peer is not None and peer.cred is not None  # connected, and not the host itself

    def _on_server_event(self, action: str, **fields) -> dict:
        if action == "peer-leave" and self.guest_options is None:  # serving only: is "the guest" still one that
            self.guest.ready = self.guest.ready and self.guest_peer_id() in self.guest.joined  # said it is ready?
        return self.record(action, **fields)

    def _on_guest_says_ready(self, peer_id: int, reply: str) -> None:
        """A built-in guest joins the handshake by saying so, whoever started its QEMU. Serving only (--no-guest)
        turns the handshake on; a QEMU this supervisor boots stays the guest that `--ring guest` means."""
        self.guest.joined &= set(self.server.peers)  # ids are never reused: forget the guests that left
        self.guest.joined.add(peer_id)
        if self.guest_options is None:
            self.guest.handshake = True
        if peer_id == self.guest_peer_id():
            self.on_guest_ready(reply)
        else:
            log.info("guest ready: %s (one of several guests: ring it by its id)", reply)
            self.note("guest-ready", detail={"reply": reply, "peer": peer_id})

    def read_reply(self) -> str:
        raw = self.region.read(layout.reply_offset(self.region.size), layout.REPLY_SIZE)
        text = raw.split(b"\0", 1)[0].decode("ascii", "replace")
        return "".join(c if c.isprintable() else "?" for c in text)  # the guest must not forge log lines

    def on_guest_ready(self, reply: str) -> None:
        self.guest.ready, self.guest.last_reply = True, reply
        self.guard.refresh()  # the guest wrote through its mapping, which makes no inotify event
        log.info("guest ready: %s", reply)
        self.note("guest-ready", detail={"reply": reply, "peer": self.guest_peer_id()})
        sdnotify.status("guest ready")
        pending, self.guest.pending_rings = self.guest.pending_rings, {}
        guest_id = self.guest_peer_id()
        for peer_id, vector in pending:
            try:
                self.server.ring(guest_id if peer_id == PENDING_GUEST else peer_id, vector)
            except ShmguardError as exc:  # that peer left while its ring was held
                log.warning("held ring for peer %d vector %d dropped: %s", peer_id, vector, exc)

    def on_guest_ack(self, reply: str, ack: layout.Ack) -> None:
        self.guest.acks += 1
        self.guest.last_reply = reply
        self.guard.refresh()
        log.info("guest acknowledged: %s", reply)
        waiter, self.guest.waiter = self.guest.waiter, None
        if waiter is not None:
            rtt_ms = (time.monotonic() - waiter.started) * 1000
            waiter.request.reply(**waiter.reply, ack=reply, round_trip_ms=round(rtt_ms, 3),
                                 delivered_exactly=ack.crc32 == waiter.crc32)
        self._next_queued_write()

    # --- running and stopping ------------------------------------------------------------------------

    def add_stop_hook(self, hook: Callable[[], None]) -> None:
        self._stop_hooks.append(hook)

    def run(self) -> int:
        try:
            self.loop.run()
        finally:
            self.stop()
        return self.exit_code

    def stop(self) -> None:
        for hook in reversed(self._stop_hooks):
            hook()
        self._stop_hooks.clear()
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.region is not None:
            last = self.note("stop", detail={"exit_code": self.exit_code})
            if last is not None:  # a copy outside the log (the journal) shows if records are later cut from its end
                log.info("audit log %s ends at seq %d, hash %s", self.audit.path, last["seq"], last["hash"])
            if self.region.backend == "file":
                _unlink_if_ours(self.region.path, self.region.state().inode)
            self.region.close()
            self.region = None
        if self.audit is not None:
            self.audit.close()
            self.audit = None
        if self._signal_sockets:
            signal.set_wakeup_fd(-1)
            for sock in self._signal_sockets:
                sock.close()
            self._signal_sockets = None


def _decode_data(value) -> bytes:
    if not isinstance(value, str):
        raise ControlError("a write needs \"data\": the bytes in base64")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ControlError("\"data\" is not valid base64") from None


def _is_number(text: str) -> bool:
    """A peer id or vector as digits: "²".isdigit() is true and int("²") is not; 5000 digits make int() raise."""
    return text.isascii() and text.isdigit() and len(text) <= 5


def _seconds(value, name: str, limit: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= limit:
        raise ControlError(f"{name} {value!r} must be a number of seconds above 0 and at most {limit:g} "
                           "(policy shares.wait_seconds)")
    return float(value)


def _whole_number(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ControlError(f"{name} {value!r} must be a whole number")
    return value


def _unlink_if_ours(path: str, inode: int) -> None:
    """Release the region's path, but never a file that someone else put there."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("%s: cannot remove the region file: %s", path, exc.strerror)
