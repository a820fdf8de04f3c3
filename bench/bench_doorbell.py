"""Doorbell round trip and boot-to-ready with the built-in guest, next to an eventfd ping-pong in the same run.

    .venv/bin/python bench/bench_doorbell.py [--quick] [--count N] [--boots N] [--dir DIR]

shmguard side: `shmguard run` (strict policy, 4 KiB sealed region, paths moved into a temporary directory)
boots the built-in guest under QEMU; boot-to-ready is the time from starting the supervisor to its
`STATUS=guest ready` over NOTIFY_SOCKET. Then one client process sends COUNT write requests through the
control socket, each ringing the guest and waiting for its acknowledgement. Reported per request: the time the
client saw (connect, request, write, its audit record, ring, guest prints and acks, reply) and the supervisor's
own `round_trip_ms` (its clock starts once the ring has been sent and recorded). The same loop without `ring`
shows what the write alone costs the client. The first boot measures with a durable audit log (the reply
waits for the fsync of the write's record, the strict policy's default), the second without; further boots
(--boots) only time boot-to-ready.
The write's record (listing its ring) is written before the ring and made durable by the fsync at the end of
the loop's turn, while the guest works; the client's figure has all of it. bench_durable_write.py compares the
durable write + ring + ack with a ring-and-ack ping through the same supervisor.

Baseline: two host processes ping-pong over two eventfds (A writes X, B waits on X and writes Y, A waits on
Y), COUNT round trips: the floor for the host's share of a doorbell round trip in Python.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import Series, file_system_of, timed_calls

from shmguard.control import ControlClient, ControlError, WriteRequest
from shmguard.launcher import ThrowawaySupervisor

REGION_SIZE = 4096  # the demo's size, and all the seed's Zephyr x86_64 guest fits
WARMUP = 20


# --- the baseline: eventfd ping-pong between two host processes ------------------------------------------


def eventfd_ping_pong(count: int) -> Series:
    """A writes eventfd X, B waits on X and writes eventfd Y, A waits on Y; A times each round trip."""
    x, y = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # B
        status = 1
        try:
            for _ in range(WARMUP + count):
                os.eventfd_read(x)
                os.eventfd_write(y, 1)
            status = 0
        finally:
            os._exit(status)

    def round_trip(_: int) -> None:
        os.eventfd_write(x, 1)
        os.eventfd_read(y)

    series = Series("eventfd ping-pong, 2 host processes")
    try:
        series.values = [ms for ms, _ in timed_calls(round_trip, count, WARMUP)]
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(x)
        os.close(y)
    if status != 0:
        raise SystemExit(f"the eventfd partner process failed (wait status {status})")
    return series


# --- shmguard with the built-in guest ---------------------------------------------------------------------


@dataclass
class Boot:
    durable: bool
    serving_s: float = 0.0  # start to READY=1 (peers can connect)
    ready_s: float = 0.0  # start to STATUS=guest ready
    accel: str = "?"
    client: Series | None = None
    supervisor: Series | None = None
    write_only: Series | None = None
    inexact: int = 0


def write_request(number: int, ring: bool) -> WriteRequest:
    message = f"doorbell {number}".encode()
    return WriteRequest(message, text=True, ring="guest", wait=True, timeout=30) if ring else WriteRequest(
        message, text=True)


def doorbells(control_path: str, count: int, boot: Boot) -> None:
    """COUNT writes that ring the guest and wait for its ack, then COUNT writes that ring nothing."""
    mode = "durable" if boot.durable else "not durable"
    boot.client = Series(f"shmguard, client-observed ({mode})")
    boot.supervisor = Series(f"shmguard, supervisor round_trip_ms ({mode})")
    boot.write_only = Series(f"write without ring, client ({mode})")
    client = ControlClient(control_path, timeout=60)

    def request(ring: bool) -> Callable[[int], dict]:
        def call(number: int) -> dict:
            try:
                return client.call(write_request(number, ring=ring))
            except ControlError as exc:
                raise SystemExit(f"{'doorbell' if ring else 'write'} {number}: {exc}") from None

        return call

    for ms, reply in timed_calls(request(ring=True), count, WARMUP):
        boot.client.values.append(ms)
        boot.supervisor.values.append(reply["round_trip_ms"])
        boot.inexact += not reply["delivered_exactly"]
    boot.write_only.values = [ms for ms, _ in timed_calls(request(ring=False), count, WARMUP)]


def boot_guest(root: Path, durable: bool, count: int) -> Boot:
    """Start `shmguard run` with the built-in guest, time it to ready, run the doorbells (count > 0), stop."""
    boot = Boot(durable)
    started = time.monotonic()
    supervisor = ThrowawaySupervisor("strict", guest=True, parent=root, prefix="boot-", durable=durable, keep=True,
                                     timeout=120, region={"size": REGION_SIZE})
    directory = supervisor.directory
    try:
        boot.serving_s = time.monotonic() - started
        supervisor.wait_for("guest ready", 300)
        boot.ready_s = time.monotonic() - started
        found = re.search(r"QEMU accelerator: (\w+)", supervisor.log())
        boot.accel = found.group(1) if found else "?"
        if count:
            doorbells(supervisor.control, count, boot)
    except BaseException:
        print(f"supervisor log ({directory / 'supervisor.log'}):\n{supervisor.log_tail()}")
        raise
    finally:
        status = supervisor.stop()
    if status != 0:
        raise SystemExit(f"the supervisor exited with status {status}; its log: {directory / 'supervisor.log'}")
    shutil.rmtree(directory, ignore_errors=True)
    return boot


# --- report ------------------------------------------------------------------------------------------------


def print_report(boots: list[Boot], baseline: Series, count: int) -> None:
    measured = [boot for boot in boots if boot.client is not None]
    print(f"\nround trip, {count} doorbells per row (after {WARMUP} warm-up)")
    print(f"  {'':52} {'median ms':>10} {'p99 ms':>9} {'median/floor':>13} {'p99/floor':>10}")
    rows = [row for boot in measured for row in (boot.client, boot.supervisor, boot.write_only)] + [baseline]
    for series in rows:
        print(f"  {series.label:52} {series.median:10.3f} {series.p99:9.3f} "
              f"{series.median / baseline.median:12.1f}x {series.p99 / baseline.p99:9.1f}x")
    for boot in measured:
        added = boot.client.median - boot.write_only.median
        print(f"  {'durable' if boot.durable else 'not durable'}: the ring (listed in the write's record), the guest "
              f"and its ack add {added:.3f} ms to a write (client medians), {added / baseline.median:.0f}x the floor")
    inexact = sum(boot.inexact for boot in measured)
    print(f"  acks whose checksum did not match the message: {inexact} of {count * len(measured)}")
    accel = ", ".join(sorted({boot.accel for boot in boots}))
    print(f"\nboot to ready, {len(boots)} boots, QEMU accelerator {accel}")
    print(f"  {'':52} {'median s':>10} {'min s':>9} {'max s':>9}")
    for series in (Series("start to READY=1 (serving peers)", [b.serving_s for b in boots]),
                   Series("start to STATUS=guest ready", [b.ready_s for b in boots])):
        print(f"  {series.label:52} {series.median:10.3f} {series.min:9.3f} {series.max:9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 doorbells and 2 boots")
    parser.add_argument("--count", type=int, help="doorbells per measured boot (default 1000; --quick 200)")
    parser.add_argument("--boots", type=int, help="boots timed, at least 2 (default 4; --quick 2)")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                        help="where the sockets and the audit log go (default /var/tmp, not tmpfs)")
    args = parser.parse_args()
    count = args.count or (200 if args.quick else 1000)
    boots_wanted = max(2, args.boots or (2 if args.quick else 4))
    if os.geteuid() != 0:
        print("note: not root; the strict policy's socket group and hardening may refuse to start")
    root = Path(tempfile.mkdtemp(prefix="shmguard-bench-doorbell-", dir=args.dir))
    root.chmod(0o755)
    try:
        print(f"audit log on {args.dir} ({file_system_of(root)}); {count} doorbells per measured boot; "
              f"{os.cpu_count()} CPUs")
        print(f"baseline: eventfd ping-pong, {count} round trips")
        baseline = eventfd_ping_pong(count)
        boots = []
        for number in range(boots_wanted):
            durable = number % 2 == 0  # the strict policy's default first
            measure = count if number < 2 else 0
            what = f", then {count} doorbells" if measure else ""
            print(f"boot {number + 1}/{boots_wanted}: built-in guest, audit log "
                  f"{'durable' if durable else 'not durable'}{what}", flush=True)
            boots.append(boot_guest(root, durable, measure))
        print_report(boots, baseline, count)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
