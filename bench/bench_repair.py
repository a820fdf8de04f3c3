"""How long a truncated region stays broken: from the end of the attacking ftruncate to size and contents restored.

    .venv/bin/python bench/bench_repair.py [--count N] [--policy standard] [--contents message|pattern]

A throwaway supervisor (file backend) with a paused QEMU attached; the region holds a message (`--contents
message`, the default: a text message and its NUL padding, as `shmguard write -m` leaves it) or a random pattern
in every byte (`pattern`), written through the control socket. Each round ftruncates the region to 0 through an
fd (the call and the clock reads around it in C: bench/truncator.c, compiled with gcc at the start and called
through ctypes), then spins on fstat and pread until the size is back and the last page that is not all NULs (the
guard writes front to back) holds its bytes again, then checks every byte.

The figure (issue 11's "truncation to repaired"): from the end of the attacking syscall, when the kernel has
truncated the file and told the watchers, to the supervisor's `done_ns` in the incident, taken right after its
last write of size and contents back (both CLOCK_MONOTONIC). The attacker's own clock read after the call cannot
give that end: the woken supervisor often preempts the attacker on its way back to user space and repairs before
the attacker runs again, so that "from the return" would read about 0. So the call's end is taken as the
attacker's clock read before the call plus the CPU time its thread spent until the call returned, less what those
clock reads cost on their own: exact to about a microsecond unless the attacker waited for the CPU inside the call,
and then too early, so the window reads longer than it was. (Read from Python, the clocks after the call cost 4 to
11 us more than warm, after the truncation emptied the caches, and the window read that much shorter.)
A second row bounds it from the other side: the call's end at its latest (all the attacker's
waiting for the CPU, from /proc/thread-self/schedstat, put before the return, but never after the guard looked).
Beside it: the attacking syscall itself (its CPU time, the baseline, and its wall time), when the supervisor
looked, its own look-to-repaired time, and the attacker's own view (its clock after the call to its spin seeing
the region whole) over the rounds in which nothing preempted it. Between rounds two status round trips let the
supervisor's loop go idle. Run as root.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from common import percentile

from shmguard.attack import start_paused_qemu
from shmguard.control import ControlClient
from shmguard.launcher import ThrowawaySupervisor
from shmguard.policy import load_policy

PAGE = 4096
HERE = os.path.dirname(os.path.abspath(__file__))


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


@dataclass(frozen=True)
class Round:
    """One truncation as the attacker saw it (CLOCK_MONOTONIC ns; durations in ms)."""

    started_ns: int  # the clock read right before the call
    cpu_ns: int  # the CPU time the thread spent in the call: what the attacker's ftruncate itself costs
    waited_ns: int  # how long it waited in the run queue from before the call until just after it returned
    wall_ms: float  # from before the call until the attacker ran again after it
    seen_ms: float  # from the attacker running again to its spin seeing size and contents back
    preempted: bool  # the attacker was switched out involuntarily during the round: its own clock reads late

    @property
    def ended_ns(self) -> int:
        """The call's end at its earliest: any waiting for the CPU came after the call returned."""
        return self.started_ns + self.cpu_ns

    def ended_latest_ns(self, detected_ns: int) -> int:
        """The call's end at its latest: all the waiting came before the return, but the end was before the guard
        looked (the guard is woken by the end)."""
        return max(self.ended_ns, min(self.ended_ns + self.waited_ns, detected_ns))


def run_delay(schedstat: int) -> int:
    """The ns this thread has waited in the run queue (the second field of /proc/thread-self/schedstat)."""
    return int(os.pread(schedstat, 128, 0).split()[1])


class TimedTruncate:
    """bench/truncator.c's truncate_timed, compiled into a shared object in directory and called through ctypes: the
    clock reads around the call in C (about a microsecond; from Python, those after the call cost 4 to 11 us more
    than warm after the truncation emptied the caches, and the window read that much shorter)."""

    def __init__(self, directory: str):
        library = os.path.join(directory, "truncator.so")
        result = subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", library, os.path.join(HERE, "truncator.c")],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"bench_repair: cannot compile bench/truncator.c: "
                             f"{result.stderr.strip().splitlines()[:1]}")
        self._call = ctypes.CDLL(library, use_errno=True).truncate_timed
        self._call.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_longlong)]
        self._out = (ctypes.c_longlong * 2)()

    def __call__(self, fd: int) -> tuple[int, int]:
        """ftruncate(fd, 0): (the clock right before the call, the thread's CPU time in it)."""
        if self._call(fd, self._out) != 0:
            raise OSError(ctypes.get_errno(), "ftruncate of the region failed")
        return self._out[0], self._out[1]


def one_round(fd: int, size: int, pattern: bytes, schedstat: int, truncate: TimedTruncate) -> Round:
    at = last_page(pattern)
    tail = pattern[at:at + PAGE]
    switches = resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw
    waited = run_delay(schedstat)
    started, spent = truncate(fd)
    returned = time.monotonic_ns()
    waited = run_delay(schedstat) - waited
    while os.fstat(fd).st_size != size or os.pread(fd, PAGE, at) != tail:
        pass
    restored = time.monotonic_ns()
    preempted = resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw != switches
    if os.pread(fd, size, 0) != pattern:
        raise SystemExit("contents differ after the repair")
    return Round(started, spent, waited, (returned - started) / 1e6, (restored - returned) / 1e6, preempted)


def guard_timings(audit_path: str, rounds: list[Round]) -> dict[str, list[float]]:
    """Per round, from the incidents in the audit log: the call's end -> repaired (at its earliest and at its
    latest), the call's end -> the guard looks, the guard looks -> repaired."""
    with open(audit_path) as log:
        records = [json.loads(line) for line in log if line.strip()]
    details = [r["detail"] for r in records if r["action"] == "incident" and r["result"] == "repaired"]
    if len(details) != len(rounds):
        raise SystemExit(f"{len(details)} repaired incidents for {len(rounds)} truncations")
    pairs = list(zip(details, rounds, strict=True))
    if any(d["done_ns"] < r.started_ns for d, r in pairs):
        raise SystemExit("a repair was done before its truncation started: the rounds and the records differ")
    return {"repaired": [(d["done_ns"] - r.ended_ns) / 1e6 for d, r in pairs],
            "at least": [(d["done_ns"] - r.ended_latest_ns(d["detected_ns"])) / 1e6 for d, r in pairs],
            "woke": [(d["detected_ns"] - r.ended_ns) / 1e6 for d, r in pairs],
            "repair": [d["repair_ms"] for d in details]}


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
        schedstat = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
        with tempfile.TemporaryDirectory(prefix="bench-repair-") as scratch:
            truncate = TimedTruncate(scratch)
        rounds = []
        for _ in range(args.count):
            idle(control)
            rounds.append(one_round(fd, size, pattern, schedstat, truncate))
        idle(control)
        os.close(schedstat)
        os.close(fd)
        report(args.count, size, args.contents, rounds, guard_timings(policy.audit.path, rounds), qemu.poll() is None)
        if qemu.poll() is not None:
            print(f"QEMU exited with status {qemu.poll()}: {' | '.join(qemu.read_console()[-5:])}")
        return 0 if qemu.poll() is None else 1
    finally:
        if qemu is not None:
            qemu.close()
        supervisor.stop()


def report(count: int, size: int, contents: str, rounds: list[Round], timings: dict[str, list[float]],
           qemu_alive: bool) -> None:
    holding = "a message" if contents == "message" else "random bytes"
    repaired = timings["repaired"]
    syscall = [r.cpu_ns / 1e6 for r in rounds]
    alone = [r.seen_ms for r in rounds if not r.preempted]
    print(f"{count} truncations to 0 of a {size >> 20} MiB region holding {holding} (file backend), QEMU attached")
    print(f"{'':46}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    rows = [("ftruncate(fd, 0) itself: its CPU time", syscall),
            ("  its wall time (preemption included)", [r.wall_ms for r in rounds]),
            ("broken: the call's end -> repaired", repaired),
            ("  of which: the call's end -> guard looks", timings["woke"]),
            ("  of which: guard looks -> repaired", timings["repair"]),
            ("  at least (the call's end at its latest)", timings["at least"])]
    if alone:
        rows.append((f"the attacker's view, {len(alone)} rounds not preempted", alone))
    for name, values in rows:
        print(f"{name:46}{percentile(values, .5):10.3f}{percentile(values, .99):10.3f}{max(values):10.3f}")
    print(f"truncation to repaired, {size >> 20} MiB region holding {holding}, from the end of the attacking "
          f"ftruncate: p50 {percentile(repaired, .5):.3f} ms, p99 {percentile(repaired, .99):.3f} ms (goal p50 <= "
          f"0.2 ms); the attacking ftruncate itself: p50 {percentile(syscall, .5):.3f} ms, p99 "
          f"{percentile(syscall, .99):.3f} ms; ratio {percentile(repaired, .5) / percentile(syscall, .5):.2f}x at "
          f"p50, {percentile(repaired, .99) / percentile(syscall, .99):.2f}x at p99")
    waited = sum(1 for r in rounds if r.waited_ns)
    print(f"mean broken {statistics.mean(repaired):.3f} ms; incidents recorded: {len(repaired)}; rounds in which "
          f"the attacker was preempted (its own clock after the call reads late): {count - len(alone)}, in which "
          f"it waited for the CPU around the call (the two bounds differ): {waited}")
    print(f"QEMU still running: {'yes' if qemu_alive else 'NO'}")


if __name__ == "__main__":
    sys.exit(main())
