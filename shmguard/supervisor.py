"""Supervisor: composes region, server, audit, control socket, guard and QEMU into one event loop."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

from . import handover, layout, succession
from .audit import AuditLog
from .control import ReloadRequest, RingRequest, SendRequest, StatusRequest, WriteRequest
from .control_server import ControlServer, Request
from .errors import ShmguardError
from .guard import Guard, guarded_sockets
from .guest_session import GuestExchange, GuestSession, PeerLeft, QemuExited
from .guest_vm import GuestOptions, GuestVM, guest_command, start_guests
from .hardening import drop_identity, harden, lock_memory, raise_fd_limit, raise_memlock_limit
from .host import HostPeer
from .linux import sdnotify
from .linux.signals import SignalWakeup
from .loop import EventLoop
from .paths import policy_owners
from .policy import Access, Policy
from .recorder import Recorder
from .region import Region
from .server import IvshmemServer
from .takeover import TakeOver

log = logging.getLogger("shmguard")


class Supervisor:
    def __init__(self, policy: Policy, guest: GuestOptions | None = None, fd_store: bool = False):
        self.policy, self.guest_options = policy, guest
        self.succession = succession.Succession(self, fd_store)  # reload in place; the fd store under systemd
        self.stopping = False
        self.loop = EventLoop()
        self.audit: AuditLog | None = None
        self.region: Region | None = None
        self.server: IvshmemServer | None = None
        self.host: HostPeer | None = None  # the supervisor's own peer: writes, rings, the guest handshake
        self.guest = GuestSession(policy.shares, serving_only=guest is None, handshake=bool(guest and guest.builtin))
        self.recorder: Recorder | None = None  # the audit log, and its rule when it cannot be written
        self.exit_code = 0
        self.qemu: GuestVM | None = None
        self.qemus: list[GuestVM] = []  # with --guests N (N >= 2): one QEMU per slot, and self.qemu stays None
        self.guard: Guard | None = None
        self.control: ControlServer | None = None
        self.signals: SignalWakeup | None = None
        self._stop_hooks: list[Callable[[], None]] = []

    # --- start-up ----------------------------------------------------------------------------------

    def start(self, inherited: handover.Inheritance | None = None) -> None:
        """A fresh start, or (inherited) the take-over of a predecessor's state and fds: see takeover.py."""
        if inherited is not None and not inherited.state:
            log.warning("the fd store holds %s but no state to take them over with: starting afresh",
                        ", ".join(sorted(inherited.fds)) or "nothing")
            inherited.close_unclaimed()
            inherited = None
        if inherited is not None:
            try:
                TakeOver(self, inherited).run()
            except Exception:
                log.exception("the take-over failed")
                raise
            return
        options = self.guest_options
        if options and options.builtin and self.policy.server.vectors <= layout.ACK_VECTOR:
            raise ShmguardError(f"the built-in guest acknowledges on vector {layout.ACK_VECTOR}: run it with "
                                f"--vectors {layout.ACK_VECTOR + 1} or more, or serve only with --no-guest")
        guests = options.guest_layout(self.policy.region.size) if options else None  # refused before anything exists
        if guests is not None:
            self.guest.exchange = self.guest.exchange or GuestExchange.new(guests.guests)
        raise_fd_limit()
        raise_memlock_limit(self.policy.region.size)
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
        self.start_control()
        # It watches the region and both sockets, so it starts once they exist.
        self.start_guard()
        self.host = HostPeer(own_peer, self.region, self.server, self.guard, self.recorder, self.loop, self.guest,
                             qemu=self.qemu_facts, guests=guests, slot_qemus=self.slot_qemus)
        self._install_signals()
        # The guest image may need building (apt-get, gcc): done while the process still may.
        qemu_argv = guest_command(self.guest_options, self.policy, self.host.id) if options and not guests else None
        slot_argvs = [guest_command(options, self.policy, self.host.id, k) for k in range(guests.guests)] \
            if guests else []
        self._harden()
        self.record("start", detail={"policy": self.policy.name, "region": self.region.describe(),
                                     "socket": self.policy.server.socket, "host_peer": self.host.id})
        self.succession.start_store()
        self.say_ready()
        if qemu_argv is not None:
            self.qemu = GuestVM(self.loop, qemu_argv, self._on_qemu_exit)
            self.add_stop_hook(self.qemu.close)
        self.qemus = start_guests(self.loop, slot_argvs, self._on_qemu_exit)
        for vm in self.qemus:
            self.add_stop_hook(vm.close)

    def start_guard(self, inherited: dict | None = None) -> None:
        """The guard of the region and both sockets; inherited: a predecessor's (Guard.snapshot, fds resolved)."""
        region = self.policy.region
        self.guard = Guard(self.policy.guard, self.region, self.loop, record=self.record,
                           sockets=guarded_sockets(self.policy, lambda: self.server, lambda: self.control),
                           peers=lambda: self.server.peers.values() if self.server else (),
                           region_attributes=(region.owner, region.group, region.mode))
        self.add_stop_hook(self.guard.close)
        self.guard.start(inherited)

    def say_ready(self) -> None:
        if not sdnotify.ready(f"serving {self.policy.server.socket}") and "NOTIFY_SOCKET" in os.environ:
            log.warning("could not send READY=1 to NOTIFY_SOCKET %s", os.environ["NOTIFY_SOCKET"])

    def _harden(self) -> None:
        """Drop what the policy does not need, once the region and sockets exist and before QEMU starts."""
        hardening = self.policy.hardening
        if hardening.user:
            drop_identity(hardening.user, hardening.group, keep=hardening.capabilities)
            log.info("running as user %s from here on", hardening.user)
        elif os.geteuid() == 0:
            # Without CAP_CHOWN, a repair may still give a file to a group the process is a member of.
            groups = sorted({self.policy.server.group, self.policy.region.group})
            if sorted(os.getgroups()) != groups:  # a successor exec'd after CAP_SETGID went has them already
                os.setgroups(groups)
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
        if not self.qemus:  # with several guests, the one that left is told by its peer's leave
            self.host.feed(QemuExited())
        if leaving:
            self.exit_code = 3
            self.loop.stop()

    def _install_signals(self) -> None:
        self.signals = SignalWakeup((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
        self.loop.add_reader(self.signals.fileno(), lambda: self.signals.each(self._on_signal))

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            log.info("received SIGHUP: reloading")
            self.succession.reload()
            return
        log.info("received %s: shutting down", signal.Signals(signum).name)
        self.loop.stop()

    # --- the control socket --------------------------------------------------------------------------

    def slot_qemus(self) -> list[tuple[int, bool]]:
        """(pid, exited) of each guest's QEMU this supervisor runs, when it runs several."""
        return [(vm.pid, vm.exited()) for vm in self.qemus]

    def qemu_facts(self) -> tuple[int | None, bool, bool]:
        """(pid, started, exited) of the QEMU this supervisor runs, if any."""
        return (self.qemu.pid if self.qemu else None, self.qemu is not None,
                self.qemu is not None and self.qemu.exited())

    def start_control(self, adopt: dict | None = None, fd: Callable[[str], int] | None = None) -> list:
        """The control socket, new or (adopt) the predecessor's; returns the connections awaiting a reload reply."""
        policy = self.policy
        max_request = self.region.size * 2 + 65536  # a whole region in base64, plus the request around it
        self.control = ControlServer(policy.control, policy.server.owner, policy.server.group, self.loop, max_request,
                                     policy.shares, owners=self.server.owners)
        self.control.route(WriteRequest, policy.control.writers, lambda request: self.host.handle_write(request))
        self.control.route(RingRequest, policy.control.ringers, lambda request: self.host.handle_ring(request))
        self.control.route(StatusRequest, policy.control.readers, self._handle_status)
        # Reloading execs a program: root and the uid the supervisor runs as only, whatever the policy says.
        self.control.route(ReloadRequest, Access(uids=tuple(sorted({0, os.geteuid()}))), self.succession.reload)
        self.control.route(SendRequest, policy.control.writers, lambda request: self.host.handle_send(request))
        self.control.on_refused = lambda cred, op, reason: self.note(
            "refused", actor=cred, result="refused", detail={"op": op, "reason": reason})
        self.control.when_durable = self.recorder.when_durable  # a reply that tells of a record waits for its fsync
        self.server.when_durable = self.recorder.when_durable  # and so does a greeting: a join's record first
        self.recorder.attach(self.loop)  # group commit: one fsync per turn of the loop, run by the kernel
        self.loop.before_wait(self.recorder.commit)  # while the loop goes on
        self.add_stop_hook(lambda: self.control.close(keep_socket=self.succession.keeping_fds()))
        if adopt is not None:
            return self.control.adopt(adopt, fd)
        self.control.start()
        return []

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
                      "writes_waiting": len(self.guest.queue), "guests": self.host.describe_guests()},
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
        keeping = self.succession.keeping_fds()
        self.stopping = True
        if self.recorder is not None:
            self.recorder.flush()  # the commit in flight, in line: its held replies and greetings go out first
        if keeping and self.server is not None:
            self.succession.store.write_now()  # the last state, marked as a clean stop
        for hook in reversed(self._stop_hooks):
            hook()
        self._stop_hooks.clear()
        if self.server is not None and not keeping:
            self.server.close()
        self.server = None
        if self.region is not None:
            last = self.note("stop", detail={"exit_code": self.exit_code, **({"fds": "kept in systemd's fd store"}
                                                                              if keeping else {})})
            if last is not None:  # a copy outside the log (the journal) shows if records are later cut from its end
                log.info("audit log %s ends at seq %d, hash %s", self.audit.path, last["seq"], last["hash"])
            if self.region.backend == "file" and not keeping:
                _unlink_if_ours(self.region.path, self.region.state().inode)
            self.region.close()
            self.region = None
        if self.recorder is not None:
            self.recorder.close()
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
