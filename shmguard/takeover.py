"""TakeOver: a supervisor composed from a predecessor's state and fds instead of made anew (see handover.py).

From a reload everything comes: peers, their sockets and eventfds, queued sends, the control connections, the
QEMU child and its console, the guard's copy, anchor and kernel witnesses, the audit log's open file. From the
fd store after a crash, what systemd kept: the region, the sockets, the peers; what is missing is said in the log
and in the take-over's audit record, and a peer whose fds are gone is told to the others as a leave.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from . import handover
from .audit import AuditLog
from .errors import ShmguardError
from .guest_session import GuestSession
from .guest_vm import GuestVM
from .hardening import lock_memory, raise_fd_limit
from .host import HostPeer
from .paths import policy_owners
from .recorder import Recorder
from .region import Region, pread_all
from .server import IvshmemServer

log = logging.getLogger("shmguard")


class TakeOver:
    def __init__(self, supervisor, inherited: handover.Inheritance):
        self.sup, self.inherited, self.state = supervisor, inherited, inherited.state
        self.from_reload = inherited.source == "reload"
        self.lost: list[str] = []  # what could not be recovered, for the log and the record

    def run(self) -> None:
        sup, state, policy = self.sup, self.state, self.sup.policy
        if problems := handover.problems(state, sup.succession.fixed_settings()):
            raise ShmguardError(f"cannot take over from {self.inherited.source}: {'; '.join(problems)}")
        raise_fd_limit()
        owners = policy_owners(policy.server.owner, policy.hardening.user)
        if self.from_reload:
            sup.audit = AuditLog.adopt(policy.audit.path, self.inherited.fd("audit"), policy.audit.durable)
        else:
            sup.audit = AuditLog.open(policy.audit.path, policy.audit.durable, owners)
        sup.recorder = Recorder(sup.audit)
        region = state["region"]
        sup.region = Region(self.inherited.fd("region"), region["size"], region["backend"], region["path"])
        if policy.region.mlock:
            try:
                lock_memory(sup.region.mapping)
            except ShmguardError as exc:
                self.lost.append(f"the region's memory lock ({exc})")
        sup.server = IvshmemServer(policy.server, sup.region.fd, sup.loop, on_event=sup._on_server_event,
                                   region_intact=sup._region_intact, shares=policy.shares, owners=owners)
        gone_peers = self._adopt_server()
        awaiting = sup.start_control(adopt=state["control"], fd=self.inherited.fd)
        self._adopt_guard()
        sup.guest = GuestSession.from_plain(state["guest"], policy.shares)
        options = sup.guest_options
        guests = options.guest_layout(sup.region.size) if options else None
        sup.host = HostPeer(sup.server.local_peer(), sup.region, sup.server, sup.guard, sup.recorder, sup.loop,
                            sup.guest, qemu=sup.qemu_facts, guests=guests, slot_qemus=sup.slot_qemus)
        sup._install_signals()
        self._adopt_qemu()
        sup._harden()
        for peer_id in gone_peers:
            sup.server.leave(peer_id, "its connection did not survive the supervisor's crash")
        if unclaimed := self.inherited.close_unclaimed():
            self.lost.append(f"fds nobody named in the state ({', '.join(unclaimed)}): closed")
        detail = {"from": self.inherited.source, "peers": sorted(sup.server.peers), "host_peer": sup.host.id,
                  "qemu": [vm.pid for vm in ([sup.qemu] if sup.qemu else []) + sup.qemus], "lost": self.lost,
                  "clean": bool(state.get("clean", self.from_reload)),
                  "package": str(Path(__file__).resolve().parent)}  # which shmguard took over (an upgrade shows)
        sup.record("take-over", detail=detail)
        for what in self.lost:
            log.warning("take-over: not recovered: %s", what)
        log.info("took over from %s: peers %s, host peer %d%s", self.inherited.source, sorted(sup.server.peers),
                 sup.host.id, f", QEMU pid {sup.qemu.pid}" if sup.qemu else "")
        sup.exit_code = state.get("exit_code", 0)
        sup.succession.start_store(self.inherited.fds if not self.from_reload else None, state.get("generation", 0))
        sup.say_ready()
        for connection in awaiting:
            connection.pending -= 1
            connection.send({"ok": True, "pid": os.getpid(), "peers": sorted(sup.server.peers),
                             "recovered_from": self.inherited.source, "lost": self.lost})

    def _adopt_server(self) -> list[int]:
        """The peers of the state; those whose fds did not come are returned, to leave once all is up."""
        gone: set[int] = set()

        def fd(name: str) -> int:
            if self.inherited.has(name):
                return self.inherited.fd(name)
            peer = int(name.split("-")[1])
            gone.add(peer)
            # a stand-in so that the table is whole; the peer leaves as soon as the others can be told
            return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

        state = self.state["server"]
        for key in list(state["connections"]):
            if not self.inherited.has(f"peer-{key}"):
                gone.add(int(key))
                del state["connections"][key]
        self.sup.server.adopt(state, fd)
        if gone:
            self.lost.append(f"peers {sorted(gone)}: their fds were not kept")
        return sorted(gone)

    def _adopt_guard(self) -> None:
        sup, inherited = self.sup, None
        guard_state = self.state.get("guard")
        if guard_state is not None:
            inherited = dict(guard_state)
            copy = self.inherited.fd("known-good")
            inherited["known_good"] = pread_all(copy, sup.region.size)
            os.close(copy)
            attribution = guard_state.get("attribution")
            if attribution is not None:
                attribution = dict(attribution, fanotify_fd=self.inherited.fd("fanotify"))
                if attribution.get("openers") is not None:
                    attribution["openers"] = dict(attribution["openers"], fd=self.inherited.fd("opener-witness"))
            inherited["attribution"] = attribution
        else:
            self.lost.append("the guard's known-good copy (taken anew from the region as it is now)")
        sup.start_guard(inherited)

    def _adopt_qemu(self) -> None:
        sup = self.sup
        if (qemu := self._adopted(self.state.get("qemu"))) is not None:
            sup.qemu = qemu
        sup.qemus = [vm for entry in self.state.get("qemus", []) if (vm := self._adopted(entry)) is not None]

    def _adopted(self, entry: dict | None) -> GuestVM | None:
        """A QEMU child of the predecessor's, with its console; None if there is none or it did not survive."""
        if entry is None:
            return None
        console = entry.get("console", "qemu-console")
        if not self.inherited.has(console):
            self.lost.append(f"QEMU pid {entry['pid']}: it died with its supervisor")
            return None
        vm = GuestVM.adopt(self.sup.loop, entry, self.inherited.fd(console), self.sup._on_qemu_exit)
        self.sup.add_stop_hook(vm.close)
        return vm
