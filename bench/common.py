"""What the benchmarks share: figures (nearest-rank percentiles, series of timings), timed loops with a warm-up,
the file system under a directory, and the time a durable append takes there. A benchmark starts its supervisor
with shmguard.launcher.ThrowawaySupervisor, the one way the tests, `shmguard attack` and the demo start theirs too.

A benchmark run as `.venv/bin/python bench/NAME.py` (from the repository or from bench/) has bench/ first on its
module path, so `import common` finds this file.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile: p99 of 1000 values is the 990th smallest, p50 of 1000 the 500th."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


@dataclass
class Series:
    """Timings of one thing, in one unit (the benchmark says which)."""

    label: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def p99(self) -> float:
        return percentile(self.values, 0.99)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)


def timed_calls(call: Callable[[int], object], count: int, warmup: int) -> Iterator[tuple[float, object]]:
    """Call call(number) for number in range(warmup + count); yield (milliseconds, result) for all but the warm-up.
    Only the call itself is timed."""
    for number in range(warmup + count):
        start = time.perf_counter_ns()
        result = call(number)
        elapsed = time.perf_counter_ns() - start
        if number >= warmup:
            yield elapsed / 1e6, result


def file_system_of(directory: Path) -> str:
    """The file system type of the mount holding `directory` (from /proc/self/mountinfo)."""
    best, fs_type = "", "unknown"
    resolved = str(directory.resolve())
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            mount_point, after = fields[4], fields[fields.index("-") + 1]
            inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, fs_type = mount_point, after
    return fs_type


def append_sync_times(directory: Path, count: int = 300, line_bytes: int = 450) -> Series:
    """The floor of a durable record on the file system under directory: `count` appends of one line the size of
    an audit record to a new file, each followed by an fdatasync (what the audit log's commit is), in ms."""
    import os
    import tempfile

    times = Series("append + fdatasync")
    line = b"x" * (line_bytes - 1) + b"\n"
    fd, path = tempfile.mkstemp(prefix="sync-floor-", dir=directory)
    try:
        for _ in range(count):
            os.write(fd, line)
            start = time.perf_counter_ns()
            os.fdatasync(fd)
            times.values.append((time.perf_counter_ns() - start) / 1e6)
    finally:
        os.close(fd)
        os.unlink(path)
    return times



def region_sizes(text: str) -> list[int]:
    """An argparse type: region sizes, comma-separated, each as a policy writes it (4096, 4K, 4M); a bad one is
    argparse's one-line usage error, not a traceback."""
    import argparse

    from shmguard.policy import parse_size

    try:
        return [parse_size(part.strip()) for part in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
