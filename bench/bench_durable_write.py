"""A durable write that rings the built-in guest and waits for its ack, next to a ring-and-ack ping through the
same supervisor without any audit record, at 4 KiB and 4 MiB, measured in the same run.

    .venv/bin/python bench/bench_durable_write.py [--quick] [--count N] [--sizes 4096,4194304] [--dir DIR]

For each region size one `shmguard run` (strict policy, sealed memfd of that size, durable audit log in --dir,
default /var/tmp, not tmpfs) boots the built-in guest. Then, in alternating blocks of BLOCK:
- write + ring + guest ack, durable: one persistent control connection sends a write request (a short text
  message, `ring guest`, wait for the ack) and reads its reply; the reply comes only once the write's audit
  record (one record, listing its ring) is on disk and the guest has acknowledged. Timed by the client, request
  sent to reply read.
- ring-and-ack ping, no audit: this process, joined to the same supervisor's ivshmem server as a peer, rings the
  guest's vector 0 itself and spins on the region's reply area until the guest's next `ack` appears there. The
  guest does what it does for a write (reads and prints the message, checksums it, writes its ack, rings the
  host, whose supervisor handles it), but no control request is made and nothing is recorded.
Before a block of writes the benchmark waits until the supervisor has seen every ack of the pings (status
`guest.last_reply`), so that no ping's ack answers a write. Each row reports
median and p99 and the ratio median/median (goal <= 2x at both sizes), and the CPU time per operation of the
supervisor and of its QEMU (all their threads, from /proc/PID/task/*/schedstat), which tells how much of a write's
time is the supervisor's own work on this shared machine. The 4 MiB figure also depends on how the
supervisor updates its guard's known-good copy and clears the padding after a message (guard/contents.py,
region.py), which this benchmark does not change.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from common import Series, append_sync_times, file_system_of, region_sizes

from shmguard import layout
from shmguard.audit import verify
from shmguard.client import IvshmemClient
from shmguard.control import StatusRequest, WriteRequest, encode
from shmguard.launcher import ThrowawaySupervisor

BLOCK = 25
WARMUP = 20
PAUSE = 0.05  # s after a block of writes; a tenth of it between looks at the supervisor's ack count


class ControlLine:
    """One persistent control connection: a request line out, its reply line back."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.buffer = b""

    def call(self, request: WriteRequest | StatusRequest) -> dict:
        self.sock.sendall(encode(request))
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise SystemExit("the supervisor closed the control connection")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise SystemExit(f"request refused: {reply.get('error')}")
        return reply

    def close(self) -> None:
        self.sock.close()


class Pinger:
    """A peer of the same server: rings the guest directly and watches the reply area for its next ack."""

    def __init__(self, socket_path: str, guest_id: int):
        self.peer = IvshmemClient(socket_path, timeout=10).connect()
        self.guest_id = guest_id
        self.mapping = mmap.mmap(self.peer.shm_fd, self.peer.shm_size, mmap.MAP_SHARED, mmap.PROT_READ)
        self.offset = layout.reply_offset(self.peer.shm_size)

    def reply(self) -> str:
        return self.mapping[self.offset:self.offset + 64].split(b"\0", 1)[0].decode("ascii", "replace")

    def ack_count(self) -> int:
        ack = layout.parse_ack(self.reply())
        return ack.count if ack else -1

    def ping(self) -> None:
        wanted = self.ack_count() + 1
        os.eventfd_write(self.peer.peers[self.guest_id][0], 1)  # the guest's vector 0, as any peer rings it
        deadline = time.monotonic() + 30
        while self.ack_count() < wanted:
            if time.monotonic() > deadline:
                raise SystemExit("the guest did not acknowledge a ping within 30 s")

    def close(self) -> None:
        self.mapping.close()
        self.peer.close()


class CpuClock:
    """CPU time of a process, all its threads (ns, from the scheduler's own accounting), as a sum of deltas."""

    def __init__(self, pid: int | None):
        self.pid, self.spent = pid, 0

    def now(self) -> int:
        if self.pid is None:
            return 0
        total = 0
        for task in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                pass  # a thread that ended meanwhile
        return total


def child_named(parent: int, prefix: str) -> int | None:
    """The pid of parent's child whose command name starts with prefix (the supervisor's QEMU), or None."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            comm, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == parent and comm.startswith(prefix):
                return int(entry)
    return None


def measure_size(root: Path, size: int, count: int) -> tuple[Series, Series, int, str, dict]:
    supervisor = ThrowawaySupervisor("strict", guest=True, parent=root, prefix="durable-", durable=True,
                                     keep=True, timeout=120, region={"size": size})
    try:
        supervisor.wait_for("guest ready", 300)
        guest_id = _status(supervisor.control)["guest"]["peer"]
        control = ControlLine(supervisor.control)
        pinger = Pinger(supervisor.policy.server.socket, guest_id)
        writes = Series(f"write + ring + guest ack, durable, {_size(size)}")
        pings = Series(f"ring-and-ack ping, no audit, {_size(size)}")
        inexact = 0
        number = 0
        clocks = {"supervisor": CpuClock(supervisor.process.pid),
                  "qemu": CpuClock(child_named(supervisor.process.pid, "qemu"))}
        cpu = {(who, what): 0 for who in clocks for what in ("write", "ping")}
        try:
            while len(writes.values) < count or len(pings.values) < count:
                before = {who: clock.now() for who, clock in clocks.items()}
                for _ in range(BLOCK):
                    started = time.perf_counter_ns()
                    pinger.ping()
                    if number >= WARMUP:
                        pings.values.append((time.perf_counter_ns() - started) / 1e6)
                    number += 1
                _caught_up(control, pinger)  # the supervisor's handling of the pings' acks counts with them
                for who, clock in clocks.items():
                    cpu[who, "ping"] += clock.now() - before[who]
                before = {who: clock.now() for who, clock in clocks.items()}
                for _ in range(BLOCK):
                    request = WriteRequest(f"doorbell {number}".encode(), text=True, ring="guest", wait=True,
                                           timeout=30)
                    started = time.perf_counter_ns()
                    reply = control.call(request)
                    if number >= WARMUP:
                        writes.values.append((time.perf_counter_ns() - started) / 1e6)
                    inexact += not reply["delivered_exactly"]
                    number += 1
                for who, clock in clocks.items():
                    cpu[who, "write"] += clock.now() - before[who]
                time.sleep(PAUSE)
        finally:
            pinger.close()
            control.close()
    except BaseException:
        print(f"supervisor log:\n{supervisor.log_tail(40)}")
        raise
    finally:
        status_code = supervisor.stop()
    if status_code != 0:
        raise SystemExit(f"the supervisor exited with status {status_code}; its log: {supervisor.directory}")
    checked = verify(supervisor.policy.audit.path).summary()
    shutil.rmtree(supervisor.directory, ignore_errors=True)
    done = {"write": number // 2, "ping": number // 2}  # blocks of each in turn, BLOCK in each, warm-up included
    per_op = {key: value / done[key[1]] / 1e3 for key, value in cpu.items()}  # µs per operation
    return writes, pings, inexact, checked, per_op


def _caught_up(control: ControlLine, pinger: Pinger) -> None:
    """Wait until the supervisor has handled the guest's last ack (acks rung in quick succession coalesce, so it
    is the reply the supervisor last read that tells), so no ping's ack answers a write."""
    deadline = time.monotonic() + 30
    while control.call(StatusRequest())["guest"]["last_reply"] != pinger.reply():
        if time.monotonic() > deadline:
            raise SystemExit("the supervisor did not see the guest's acks of the pings within 30 s")
        time.sleep(PAUSE / 10)


def _status(control: str) -> dict:
    line = ControlLine(control)
    try:
        return line.call(StatusRequest())
    finally:
        line.close()


def _size(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 of each per size")
    parser.add_argument("--count", type=int, help="writes and pings per size (default 300; --quick 100)")
    parser.add_argument("--sizes", type=region_sizes, default="4096,4194304",
                        help="region sizes, comma-separated (4096, 4K, 4M)")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                        help="where the sockets and the audit log go (default /var/tmp, not tmpfs)")
    args = parser.parse_args()
    count = args.count or (100 if args.quick else 300)
    sizes = args.sizes
    root = Path(tempfile.mkdtemp(prefix="shmguard-bench-durable-", dir=args.dir))
    root.chmod(0o755)
    try:
        print(f"audit log on {args.dir} ({file_system_of(root)}), durable; {count} writes and {count} pings per "
              f"size, in blocks of {BLOCK}, after {WARMUP} warm-up; {os.cpu_count()} CPUs")
        rows = []
        for size in sizes:
            print(f"region {_size(size)}: booting the built-in guest", flush=True)
            rows.append(measure_size(root, size, count))
        print(f"\n  {'':48} {'median ms':>10} {'p99 ms':>9} {'median ratio':>13} {'CPU us/op: sup':>15} "
              f"{'qemu':>6}")
        for writes, pings, inexact, checked, cpu in rows:
            print(f"  {pings.label:48} {pings.median:10.3f} {pings.p99:9.3f} {'1.0x':>13} "
                  f"{cpu['supervisor', 'ping']:15.0f} {cpu['qemu', 'ping']:6.0f}")
            print(f"  {writes.label:48} {writes.median:10.3f} {writes.p99:9.3f} "
                  f"{writes.median / pings.median:12.2f}x {cpu['supervisor', 'write']:15.0f} "
                  f"{cpu['qemu', 'write']:6.0f}")
            print(f"  {'':48} acks not matching the message: {inexact}; audit log: {checked}")
        sync = append_sync_times(root).median
        print(f"  an append + fdatasync alone on this file system: p50 {sync:.3f} ms (a write's reply waits for one; "
              f"it runs while the guest reads, so the floor of a write is about the larger of the two plus the "
              f"request's own work)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
