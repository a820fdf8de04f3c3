"""How long a truncated region stays broken: from the attacking ftruncate's return to size and contents restored.

    .venv/bin/python bench/bench_repair.py [--count N] [--policy standard] [--contents message|pattern]

A throwaway supervisor (file backend) with a paused QEMU attached; the region holds a message (`--contents
message`, the default: a text message and its NUL padding, as `shmguard write -m` leaves it) or a random pattern
in every byte (`pattern`), written through the control socket. Each round ftruncates the region to 0 through an
fd, then spins on fstat and pread until the size is back and the last page that is not all NULs (the guard writes
front to back) holds its bytes again, then checks every byte. Beside it: the attacking syscall itself, and from
the incidents in the audit log how long the supervisor took to wake and look, and its own detection-to-repair
time (both on CLOCK_MONOTONIC). Between rounds two status round trips let the supervisor's loop go idle. Run as
root.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from common import percentile

from shmguard.attack import start_paused_qemu
from shmguard.control import ControlClient
from shmguard.launcher import ThrowawaySupervisor
from shmguard.policy import load_policy

PAGE = 4096


def idle(control: str) -> None:
    """Two round trips through the supervisor's loop: the repair and its own events are all handled."""
    for _ in range(2):
        ControlClient(control).status()


MESSAGE = b"a message the guest has not read yet, as shmguard write -m leaves it"


def last_page(contents: bytes) -> int:
    """The offset of the last page that is not all NULs (0 if there is none)."""
    stripped = len(contents.rstrip(b"\0"))
    return max(0, (stripped - 1) // PAGE * PAGE)


def wait_for_qemu(control: str, qemu, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(peer.get("pid") == qemu.pid for peer in ControlClient(control).status().get("peers", [])):
        if qemu.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"QEMU did not join the ivshmem server: {' | '.join(qemu.read_console()[-5:])}")
        time.sleep(0.05)
    time.sleep(0.5)  # joined; let it map the region and realize the device


def one_round(fd: int, size: int, pattern: bytes) -> tuple[float, float, int]:
    """(ftruncate ms, broken ms, when it returned): the attacking syscall, then until size and contents are back.
    CLOCK_MONOTONIC is the supervisor's clock too, so its audit record can be set against ours."""
    at = last_page(pattern)
    tail = pattern[at:at + PAGE]
    started = time.monotonic_ns()
    os.ftruncate(fd, 0)
    returned = time.monotonic_ns()
    while os.fstat(fd).st_size != size or os.pread(fd, PAGE, at) != tail:
        pass
    restored = time.monotonic_ns()
    if os.pread(fd, size, 0) != pattern:
        raise SystemExit("contents differ after the repair")
    return (returned - started) / 1e6, (restored - returned) / 1e6, returned


def guard_timings(audit_path: str, returns: list[int]) -> tuple[list[float], list[float], list[float]]:
    """Per round, from the incidents in the audit log: return -> repaired, return -> the guard looks,
    the guard looks -> repaired."""
    with open(audit_path) as log:
        records = [json.loads(line) for line in log if line.strip()]
    details = [r["detail"] for r in records if r["action"] == "incident" and r["result"] == "repaired"]
    if len(details) != len(returns):
        raise SystemExit(f"{len(details)} repaired incidents for {len(returns)} truncations")
    pairs = list(zip(details, returns, strict=True))
    repaired = [(d["done_ns"] - returned) / 1e6 for d, returned in pairs]
    woke = [(d["detected_ns"] - returned) / 1e6 for d, returned in pairs]
    return repaired, woke, [d["repair_ms"] for d in details]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="truncations (default 1000)")
    parser.add_argument("--policy", default="standard", help="a policy with the file backend (default standard)")
    parser.add_argument("--contents", choices=("message", "pattern"), default="message",
                        help="what the region holds: a text message and its padding (default), or random bytes")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the supervisor owns /dev/shm files, sockets and QEMU")
    supervisor = ThrowawaySupervisor(args.policy)
    qemu = None
    try:
        policy = load_policy(str(supervisor.policy_path))
        if policy.region.backend != "file":
            raise SystemExit(f"policy {args.policy} has no region file to truncate (a sealed memfd refuses it)")
        qemu = start_paused_qemu(policy)
        size, control = policy.region.size, policy.control.socket
        wait_for_qemu(control, qemu)  # a QEMU that maps the region while it is truncated exits (size 0)
        if args.contents == "message":
            ControlClient(control).write(MESSAGE, text=True)
            pattern = MESSAGE + bytes(size - len(MESSAGE))
        else:
            pattern = os.urandom(size)
            ControlClient(control).write(pattern)
        fd = os.open(policy.region.path, os.O_RDONLY | os.O_CLOEXEC)
        if os.pread(fd, size, 0) != pattern:
            raise SystemExit("the region does not hold what was written")
        os.close(fd)
        fd = os.open(policy.region.path, os.O_RDWR | os.O_CLOEXEC)
        syscall, broken, returns = [], [], []
        for _ in range(args.count):
            idle(control)
            took, gone, returned = one_round(fd, size, pattern)
            syscall.append(took)
            broken.append(gone)
            returns.append(returned)
        idle(control)
        os.close(fd)
        repaired, woke, repair = guard_timings(policy.audit.path, returns)
        rows = {"broken: return -> repaired": repaired, "  of which: return -> guard looks": woke,
                "  of which: guard looks -> repaired": repair, "seen restored by the attacker": broken}
        report(args.count, size, args.contents, syscall, rows, qemu.poll() is None)
        if qemu.poll() is not None:
            print(f"QEMU exited with status {qemu.poll()}: {' | '.join(qemu.read_console()[-5:])}")
        return 0 if qemu.poll() is None else 1
    finally:
        if qemu is not None:
            qemu.close()
        supervisor.stop()


def report(count: int, size: int, contents: str, syscall: list[float], rows: dict[str, list[float]],
           qemu_alive: bool) -> None:
    holding = "a message" if contents == "message" else "random bytes"
    print(f"{count} truncations to 0 of a {size >> 20} MiB region holding {holding} (file backend), QEMU attached")
    print(f"{'':38}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for name, values in [("ftruncate(fd, 0) itself", syscall), *rows.items()]:
        print(f"{name:38}{percentile(values, .5):10.3f}{percentile(values, .99):10.3f}{max(values):10.3f}")
    broken, seen = rows["broken: return -> repaired"], rows["seen restored by the attacker"]
    print(f"truncation to repaired, {size >> 20} MiB region holding {holding}, as the attacker sees it: "
          f"p50 {percentile(seen, .5):.3f} ms, p99 {percentile(seen, .99):.3f} ms; the attacking ftruncate itself: "
          f"p50 {percentile(syscall, .5):.3f} ms, p99 {percentile(syscall, .99):.3f} ms; ratio "
          f"{percentile(seen, .5) / percentile(syscall, .5):.2f}x at p50, "
          f"{percentile(seen, .99) / percentile(syscall, .99):.2f}x at p99")
    if percentile(broken, .5) < 0:
        print("(broken below 0: the supervisor repaired before the attacker's ftruncate returned to it, which it "
              "does when the attacker is preempted between the syscall's event and its return)")
    print(f"mean broken {statistics.mean(broken):.3f} ms (supervisor's clock); incidents recorded: {len(broken)}")
    print(f"QEMU still running: {'yes' if qemu_alive else 'NO'}")


if __name__ == "__main__":
    sys.exit(main())
