"""Audited appends per second, durable and not, next to plain os.write of the same lines in the same run.

    .venv/bin/python bench/bench_audit.py [--count N] [--durable-count N] [--dir DIR] [--rounds N]

The baseline writes the very bytes the audit log wrote (same line sizes) to an O_APPEND file, with an fsync per
line for the durable row, so the ratio is the cost of the record itself: time stamp, canonical JSON, sha256 chain.
Durable figures depend on the file system: on tmpfs fsync costs nothing, so pass --dir on the target disk.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

from common import file_system_of

from shmguard.audit import Actor, AuditLog

ACTOR = Actor(pid=4242, uid=0, gid=993, exe="/usr/bin/write_shared_memory")
PAYLOAD_SHA = hashlib.sha256(b"Hello from the host").hexdigest()


def audited_rate(path: Path, count: int, durable: bool) -> float:
    """Appends per second of typical write records to a fresh audit log."""
    with AuditLog.open(path, durable=durable) as log:
        start = time.perf_counter()
        for number in range(count):
            log.append("write", actor=ACTOR, offset=number % 4096, length=20, sha256=PAYLOAD_SHA,
                       detail={"peer": 1, "via": "control"})
        elapsed = time.perf_counter() - start
    return count / elapsed


def plain_rate(path: Path, lines: list[bytes], durable: bool) -> float:
    """os.write per second of the same lines to an O_APPEND file (plus fsync when durable)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        start = time.perf_counter()
        for line in lines:
            os.write(fd, line)
            if durable:
                os.fsync(fd)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    return len(lines) / elapsed


def measure(directory: Path, count: int, durable: bool, rounds: int) -> tuple[float, float, int]:
    """Best of `rounds` for each side (the least disturbed run); also the mean line size."""
    best_audited = best_plain = 0.0
    for round_number in range(rounds):
        log_path = directory / f"audit-{durable}-{round_number}.log"
        best_audited = max(best_audited, audited_rate(log_path, count, durable))
        lines = log_path.read_bytes().splitlines(keepends=True)
        best_plain = max(best_plain, plain_rate(directory / f"plain-{durable}-{round_number}.log", lines, durable))
        mean_size = sum(map(len, lines)) // len(lines)
    return best_audited, best_plain, mean_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000, help="appends in the non-durable run")
    parser.add_argument("--durable-count", type=int, default=1_000, help="appends in the durable run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: the temp directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as temporary:
        directory = Path(temporary)
        print(f"directory {directory} ({file_system_of(directory)}), best of {args.rounds} rounds")
        print(f"{'':12} {'count':>7} {'line B':>7} {'audited/s':>11} {'os.write/s':>11} {'ratio':>7}")
        for label, count, durable in (("not durable", args.count, False), ("durable", args.durable_count, True)):
            audited, plain, size = measure(directory, count, durable, args.rounds)
            print(f"{label:12} {count:7} {size:7} {audited:11.0f} {plain:11.0f} {audited / plain:7.3f}"
                  f"  (audited is {plain / audited:.1f}x slower)")


if __name__ == "__main__":
    main()
