"""Supervisor: composes region, server, audit, control socket, guard and QEMU into one event loop."""

from __future__ import annotations

import logging
import os
import resource
import signal
from collections.abc import Callable

from . import layout
from .audit import AuditLog
from .control import RingRequest, StatusRequest, WriteRequest
from .control_server import ControlServer, Request
from .errors import ShmguardError
from .guard import Guard, guarded_sockets
from .guest_session import (
    GuestSession,
    PeerLeft,
    QemuExited,
)
from .guest_vm import GuestOptions, GuestVM, guest_command
from .hardening import drop_identity, harden, lock_memory
from .host import HostPeer
from .linux import sdnotify
from .linux.signals import SignalWakeup
from .loop import EventLoop
from .paths import policy_owners
from .policy import Policy
from .recorder import Recorder
from .region import Region
from .server import IvshmemServer

log = logging.getLogger("shmguard")


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
        self.host: HostPeer | None = None  # the supervisor's own peer: writes, rings, the guest handshake
        self.guest = GuestSession(policy.shares, serving_only=guest is None, handshake=bool(guest and guest.builtin))
        self.recorder: Recorder | None = None  # the audit log, and its rule when it cannot be written
        self.exit_code = 0
        self.qemu: GuestVM | None = None
        self.guard: Guard | None = None
        self.control: ControlServer | None = None
        self.signals: SignalWakeup | None = None
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
        self.recorder = Recorder(self.audit)
        self.region = Region.create(self.policy.region)
        if self.policy.region.mlock:
            lock_memory(self.region.mapping)
        log.info("region: %s backend, %d bytes%s", self.region.backend, self.region.size,
                 f", sealed {sorted(self.region.seals())}" if self.region.sealed else f" at {self.region.path}")
        self.server = IvshmemServer(self.policy.server, self.region.fd, self.loop, on_event=self._on_server_event,
                                    region_intact=self._region_intact, shares=self.policy.shares, owners=owners)
        self.server.start()
        own_peer = self.server.add_local_peer()
        self._start_control()
        self.control.when_durable = self.recorder.when_durable  # a reply that tells of a record waits for its fsync
        self.loop.before_wait(self.recorder.flush)  # group commit: one fsync per turn of the loop
        # It watches the region and both sockets, so it starts once they exist.
        region = self.policy.region
        self.guard = Guard(self.policy.guard, self.region, self.loop, record=self.record,
                           sockets=guarded_sockets(self.policy, lambda: self.server, lambda: self.control),
                           peers=lambda: self.server.peers.values() if self.server else (),
                           region_attributes=(region.owner, region.group, region.mode))
        self.add_stop_hook(self.guard.close)
        self.guard.start()
        self.host = HostPeer(own_peer, self.region, self.server, self.guard, self.recorder, self.loop, self.guest,
                             qemu=lambda: (self.qemu.pid if self.qemu else None, self.qemu is not None,
                                           self.qemu is not None and self.qemu.exited()))
        self._install_signals()
        # The guest image may need building (apt-get, gcc): done while the process still may.
        qemu_argv = guest_command(self.guest_options, self.policy, self.host.id) if self.guest_options else None
        self._harden()
        self.record("start", detail={"policy": self.policy.name, "region": self.region.describe(),
                                     "socket": self.policy.server.socket, "host_peer": self.host.id})
        if not sdnotify.ready(f"serving {self.policy.server.socket}") and "NOTIFY_SOCKET" in os.environ:
            log.warning("could not send READY=1 to NOTIFY_SOCKET %s", os.environ["NOTIFY_SOCKET"])
        if qemu_argv is not None:
            self.qemu = GuestVM(self.loop, qemu_argv, self._on_qemu_exit)
            self.add_stop_hook(self.qemu.close)

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

    def _on_qemu_exit(self, pid: int, status: int) -> None:
        leaving = self.policy.qemu.on_exit == "exit"
        log.warning("QEMU pid %d exited with status %d; %s", pid, status,
                    "stopping (policy qemu.on_exit = exit)" if leaving else "still serving peers")
        self.note("qemu-exit", result="exited", detail={"pid": pid, "status": status,
                                                          "response": self.policy.qemu.on_exit})
        self.host.feed(QemuExited())
        if leaving:
            self.exit_code = 3
            self.loop.stop()

    def _install_signals(self) -> None:
        self.signals = SignalWakeup((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
        self.loop.add_reader(self.signals.fileno(), lambda: self.signals.each(self._on_signal))

    def _on_signal(self, signum: int) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        self.loop.stop()

    # --- the control socket --------------------------------------------------------------------------

    def _start_control(self) -> None:
        policy = self.policy
        max_request = self.region.size * 2 + 65536  # a whole region in base64, plus the request around it
        self.control = ControlServer(policy.control, policy.server.owner, policy.server.group, self.loop, max_request,
                                     policy.shares, owners=self.server.owners)
        self.control.route(WriteRequest, policy.control.writers, lambda request: self.host.handle_write(request))
        self.control.route(RingRequest, policy.control.ringers, lambda request: self.host.handle_ring(request))
        self.control.route(StatusRequest, policy.control.readers, self._handle_status)
        self.control.on_refused = lambda cred, op, reason: self.note(
            "refused", actor=cred, result="refused", detail={"op": op, "reason": reason})
        self.control.start()
        self.add_stop_hook(self.control.close)

    def _handle_status(self, request: Request) -> None:
        request.reply(**self.status())

    def status(self) -> dict:
        return {
            "policy": self.policy.name,
            "region": self.region.describe(),
            "socket": self.policy.server.socket,
            "host_peer": self.host.id,
            "peers": [peer.describe() for peer in self.server.peers.values()],
            "guest": {"peer": self.host.guest_peer_id(), "handshake": self.guest.handshake, "ready": self.guest.ready,
                      "acks": self.guest.acks, "last_reply": self.guest.last_reply,
                      "ready_guests": self.guest.ready_guests(self.host.peers()),
                      "writes_waiting": len(self.guest.queue)},
            "audit": self.recorder.describe(),
            "shares": {**self.server.describe_shares(), "queued_writes": self.guest.queue.count.describe(),
                       "queued_write_bytes": self.guest.queue.bytes.describe()},
            "guard": self.guard.describe(),
        }

    # --- events --------------------------------------------------------------------------------------

    def record(self, action: str, **fields) -> dict:
        """Append a record before it happens; raises ShmguardError if the log cannot take it (Recorder's rule)."""
        return self.recorder.record(action, **fields)

    def note(self, action: str, **fields) -> dict | None:
        """Record what has happened already: a log that cannot take it does not stop it (Recorder's rule)."""
        return self.recorder.note(action, **fields)

    def _on_server_event(self, action: str, **fields) -> dict:
        if action == "peer-leave":
            if self.host is not None:  # the supervisor's own join comes before there is a host to tell
                self.host.feed(PeerLeft(fields.get("detail", {}).get("peer", -1)))
        return self.record(action, **fields)

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
        if self.signals is not None:
            self.signals.close()
            self.signals = None


def _unlink_if_ours(path: str, inode: int) -> None:
    """Release the region's path, but never a file that someone else put there."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("%s: cannot remove the region file: %s", path, exc.strerror)
