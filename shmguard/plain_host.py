"""PlainHost: the host's part of `--guests N` as a plain ivshmem peer, for any ivshmem server.

It joins like any peer (shmguard's IvshmemClient, which speaks the plain protocol), maps the region and asks
built-in guests to send to each other exactly as the supervisor does (layout.py): a command in the sender's slot,
a ring on its vector 1, the sender's report read back. With QEMU's own contrib ivshmem-server in shmguard's place,
it shows that the guests' messages and doorbells never pass through the server: they go from QEMU to QEMU.
No audit, no guard, no policy: a baseline and a test tool, not a way to run guests in production.
"""

from __future__ import annotations

import mmap
import time
import zlib
from collections.abc import Collection
from dataclasses import dataclass

from . import layout
from .client import ROOT_ONLY, IvshmemClient
from .errors import ShmguardError
from .guest_session import NUDGE_SECONDS


def wait_listening(socket_path: str, timeout: float) -> None:
    """Until a server listens at socket_path (its file appears at bind(), before listen()): read from
    /proc/net/unix, so that no peer joins to find out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/unix") as table:
            for line in table.readlines()[1:]:
                fields = line.split()
                if len(fields) >= 8 and fields[7] == socket_path and int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON
                    return
        time.sleep(0.02)
    raise ShmguardError(f"nothing listens at {socket_path} within {timeout:g} s")


@dataclass(frozen=True)
class Sent:
    report: layout.Report
    crc32: int  # of the text asked for
    host_round_trip_ms: float  # command written to report read, as this peer saw it
    nudges: int = 0  # times the sender was rung again, silent for NUDGE_SECONDS (an interrupt lost under load)

    @property
    def exact(self) -> bool:
        return self.report.sent and self.report.crc32 == self.crc32


class PlainHost:
    """Joins the server at `socket_path` first (so its peer id is the guests' `shmguard.host=`), then drives the
    slots of `guests` built-in guests."""

    def __init__(self, socket_path: str, guests: int, vectors: int = 2, timeout: float = 10.0,
                 answerers: Collection[int] = ROOT_ONLY):
        self.client = IvshmemClient(socket_path, vectors=vectors, timeout=timeout, answerers=answerers).connect()
        self.mem = mmap.mmap(self.client.shm_fd, self.client.shm_size)
        self.layout = layout.GuestLayout.of(self.client.shm_size, guests)
        self.peers: dict[int, int] = {}  # slot -> peer id of the guest that said ready there
        self.commands = 0

    @property
    def id(self) -> int:
        return self.client.own_id

    def line(self, offset: int) -> str:
        """The line as its guest last wrote it whole; "" while it is being rewritten (read again at its ring)."""
        return layout.whole_line(lambda at, length: self.mem[at:at + length], offset) or ""

    def wait_ready(self, timeout: float) -> dict[int, int]:
        """Every slot's guest once it has said "ready <id>" (rings coalesce: every slot is read on each)."""
        deadline = time.monotonic() + timeout
        while len(self.peers) < self.layout.guests:
            for k in range(self.layout.guests):
                peer = layout.parse_ready(self.line(self.layout.reply(k)))
                if peer is not None:
                    self.peers[k] = peer
            if len(self.peers) < self.layout.guests and self._wait(deadline) is None:
                raise ShmguardError(f"guests ready within {timeout:g} s: only {sorted(self.peers)}")
        return dict(self.peers)

    def send(self, source: int, target: int, text: bytes, timeout: float = 30.0) -> Sent:
        """Ask guest `source` to send `text` to guest `target`; its report once `target` has acknowledged."""
        self.commands += 1
        number, started = self.commands, time.monotonic()
        data = layout.command_bytes(number, self.peers[target], target, text)
        self.mem[self.layout.command(source):self.layout.command(source) + len(data)] = data
        self.client.notify(self.peers[source], layout.GUEST_VECTOR)
        deadline, nudges = started + timeout, 0
        while True:
            report = layout.parse_report(self.line(self.layout.report(source)))
            if report is not None and report.command == number:
                return Sent(report, zlib.crc32(text), (time.monotonic() - started) * 1000, nudges)
            if time.monotonic() >= deadline:
                raise ShmguardError(f"guest {source} did not report command {number} within {timeout:g} s")
            if self._wait(min(deadline, time.monotonic() + NUDGE_SECONDS)) is None:  # as the supervisor does
                nudges += 1
                self.client.notify(self.peers[source], layout.GUEST_VECTOR)

    def _wait(self, deadline: float) -> int | None:
        return self.client.wait(None, max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self.mem.close()
        self.client.close()

    def __enter__(self) -> PlainHost:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
