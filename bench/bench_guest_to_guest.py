"""Guest-to-guest round trip: two built-in guests through shmguard, and the same two through QEMU's own contrib
ivshmem-server built from Debian's qemu source package (tools/qemu_contrib.py), in the same run.

    .venv/bin/python bench/bench_guest_to_guest.py [--quick] [--count N]

Each side boots two built-in guests (TCG or KVM, as `shmguard run` chooses) on a 4 KiB region and asks them to send
COUNT messages, alternating the direction; both sides are up at once and take blocks of messages in turn, so that
the other load on the machine falls on all alike. The figure is the round trip each sending guest measures itself: from
just before it rings the receiver (message already in the receiver's inbox) to the moment it sees the receiver's
ack, CLOCK_MONOTONIC inside the guest. That path is QEMU to QEMU through the eventfds the server handed out; the
server is not on it.

Three pairs of guests, up at once: (1) `shmguard run --guests 2` (strict policy, durable audit log), one `send`
request per message over the control socket (each command and each report recorded); (2) shmguard's server alone
(`shmguard run --no-guest`) with shmguard.plain_host.PlainHost as the guests' host, a plain peer that writes the
same command into the sender's slot and reads its report from the mapping; (3) QEMU's `ivshmem-server -F` with the
same PlainHost. (2) against (3) differs only in the server: that ratio is the figure. (1) against (3) adds
shmguard as the guests' host; on 2 CPUs its work around each send competes with the guests for the CPU. The
host-observed times (request to report) are printed too: shmguard's include the control socket and two audit
records with fsync, the plain peer's neither.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import Series, file_system_of, timed_calls

from shmguard.client import ROOT_ONLY, answering_uids
from shmguard.control import ControlClient
from shmguard.guest_session import NUDGE_SECONDS
from shmguard.guest_vm import slot_command
from shmguard.launcher import ThrowawaySupervisor
from shmguard.plain_host import PlainHost, wait_listening

ROOT = Path(__file__).resolve().parents[1]
REGION_SIZE = 4096
WARMUP = 10
BLOCK = 20  # messages per side in turn


def message(number: int) -> bytes:
    return f"guest-to-guest {number}".encode()


class ShmguardSide:
    """`shmguard run --guests 2`: one `send` request per message over the control socket."""

    label = "shmguard"
    host_label = "shmguard: send request to report (control socket, audited)"

    def __init__(self, root: Path):
        self.supervisor = ThrowawaySupervisor("strict", "--guests", "2", guest=True, parent=root, prefix="g2g-",
                                              durable=True, timeout=120, region={"size": REGION_SIZE})
        try:
            self.supervisor.wait_for("guests ready: 2 of 2", 300)
        except BaseException:
            self.close()
            raise
        self.client = ControlClient(self.supervisor.control, timeout=90)

    def send(self, number: int) -> float:
        """The round trip the sending guest measured, in ms."""
        reply = self.client.send(number % 2, 1 - number % 2, message(number), timeout=60)
        if not reply["delivered_exactly"]:
            raise SystemExit(f"shmguard: message not delivered exactly: {reply}")
        return reply["round_trip_ms"]

    def close(self) -> None:
        self.supervisor.stop()


class PlainSide:
    """An ivshmem server, two built-in guests, PlainHost as their host (a plain peer writing the mapping)."""

    label = host_label = ""
    nudges = 0  # senders rung again after a second of silence: interrupts lost under load
    processes: list[subprocess.Popen]
    plain: PlainHost | None = None

    def boot(self, root: Path, socket_path: str, answerers=ROOT_ONLY) -> None:
        try:
            self.plain = PlainHost(socket_path, guests=2, answerers=answerers)
            for k in (0, 1):
                with (root / f"{self.tag}-guest{k}.log").open("wb") as console:  # a console written, like shmguard's
                    self.processes.append(subprocess.Popen(slot_command(socket_path, 2, self.plain.id, 2, k),
                                                           stdin=subprocess.DEVNULL, stdout=console,
                                                           stderr=subprocess.STDOUT))
            self.plain.wait_ready(300)
        except BaseException:
            self.close()
            raise

    def send(self, number: int) -> float:
        sent = self.plain.send(number % 2, 1 - number % 2, message(number))
        self.nudges += sent.nudges
        if not sent.exact:
            raise SystemExit(f"{self.label}: message not delivered exactly: {sent}")
        return sent.report.round_trip_us / 1000

    def close(self) -> None:
        if self.plain is not None:
            self.plain.close()
        for process in self.processes:
            process.kill()
            process.wait()


class ContribSide(PlainSide):
    """QEMU's contrib ivshmem-server."""

    label, tag = "contrib ivshmem-server", "contrib"
    host_label = "contrib: command to report (plain peer, mmap)"

    def __init__(self, root: Path):
        sys.path.insert(0, str(ROOT / "tools"))
        try:
            import qemu_contrib
        except ImportError:
            raise SystemExit("tools/qemu_contrib.py (QEMU's contrib ivshmem-server) is missing") from None
        socket_path = root / "contrib.sock"
        self.processes = [subprocess.Popen([str(qemu_contrib.ivshmem_server()), "-F", "-S", str(socket_path), "-m",
                                            "/dev/shm", "-l", str(REGION_SIZE), "-n", "2"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)]
        try:
            wait_listening(str(socket_path), 10)
        except BaseException:
            self.close()
            raise
        self.boot(root, str(socket_path))


class ShmguardServerSide(PlainSide):
    """shmguard's server alone (`run --no-guest`), the same plain host: only the server differs from contrib."""

    label, tag = "shmguard server, plain host", "served"
    host_label = "shmguard server: command to report (plain peer, mmap)"

    def __init__(self, root: Path):
        self.supervisor = ThrowawaySupervisor("strict", parent=root, prefix="served-", timeout=120,
                                              region={"size": REGION_SIZE})
        self.processes = []
        self.boot(root, self.supervisor.policy.server.socket, answering_uids(self.supervisor.policy))

    def close(self) -> None:
        super().close()
        self.supervisor.stop()


def measure(sides: list, count: int) -> dict[str, tuple[Series, Series]]:
    """Both sides booted, then blocks of BLOCK messages taken in turn, so that both see the same machine load."""
    figures = {side.label: (Series(f"{side.label}: inside the sending guest"), Series(side.host_label))
               for side in sides}
    for side in sides:
        list(timed_calls(side.send, 0, WARMUP))
    for start in range(0, count, BLOCK):
        for side in sides:
            guest, host = figures[side.label]
            for ms, guest_ms in timed_calls(side.send, min(BLOCK, count - start), 0):
                host.values.append(ms)
                guest.values.append(guest_ms)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 messages per side")
    parser.add_argument("--count", type=int, help="messages per side (default 1000; --quick 200)")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                        help="where the sockets and the audit log go (default /var/tmp, not tmpfs)")
    args = parser.parse_args()
    count = args.count or (200 if args.quick else 1000)
    root = Path(tempfile.mkdtemp(prefix="shmguard-bench-g2g-", dir=args.dir))
    root.chmod(0o755)
    sides: list = []
    try:
        print(f"audit log on {args.dir} ({file_system_of(root)}); {count} messages per side (after {WARMUP} warm-up), "
              f"alternating direction, in blocks of {BLOCK} taken in turn by the two sides; {os.cpu_count()} CPUs")
        print("booting two built-in guests under shmguard and two under QEMU's contrib ivshmem-server ...", flush=True)
        sides.append(ShmguardSide(root))
        sides.append(ContribSide(root))
        sides.append(ShmguardServerSide(root))
        figures = measure(sides, count)
    finally:
        for side in sides:
            side.close()
        shutil.rmtree(root, ignore_errors=True)
    shmguard_guest, shmguard_host = figures[ShmguardSide.label]
    contrib_guest, contrib_host = figures[ContribSide.label]
    served_guest, served_host = figures[ShmguardServerSide.label]
    nudged = ", ".join(f"{side.label} {side.nudges}" for side in sides if isinstance(side, PlainSide))
    print(f"\nround trip, {count} messages per row")
    print(f"  {'':60} {'median ms':>10} {'p99 ms':>9}")
    for series in (shmguard_guest, served_guest, contrib_guest, shmguard_host, served_host, contrib_host):
        print(f"  {series.label:60} {series.median:10.3f} {series.p99:9.3f}")
    print(f"\nthe figure, guest-to-guest round trip, the server alone (same plain host), shmguard / contrib: median "
          f"{served_guest.median / contrib_guest.median:.2f}x, p99 {served_guest.p99 / contrib_guest.p99:.2f}x")
    print(f"with shmguard also the guests' host (`run --guests 2`, control socket, audit), shmguard / contrib: median "
          f"{shmguard_guest.median / contrib_guest.median:.2f}x, p99 {shmguard_guest.p99 / contrib_guest.p99:.2f}x")
    print(f"senders rung again after {NUDGE_SECONDS:g} s of silence (a lost interrupt): {nudged}")
    print(f"host side (not the data path), shmguard / plain peer: median "
          f"{shmguard_host.median / contrib_host.median:.2f}x, p99 {shmguard_host.p99 / contrib_host.p99:.2f}x")


if __name__ == "__main__":
    main()
