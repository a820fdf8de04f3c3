"""Every row of the performance goals in one run: each benchmark in turn, each with its baseline measured in the same
run, and at the end the rows that give a ratio, gathered. `--quick` passes --quick to those that have it.

    .venv/bin/python bench/run_all.py [--quick]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (script, its arguments, whether it takes --quick): the order of the goals' table
BENCHMARKS = (
    ("bench_write.py", [], True),  # write -m as a new process vs printf | dd; write --lines vs dd per message
    ("bench_durable_write.py", [], True),  # write + ring + ack, durable, 4 KiB and 4 MiB vs a ring-and-ack ping
    ("bench_join.py", [], False),  # joins/s, durable and not, vs QEMU's C ivshmem-server
    ("bench_repair.py", [], False),  # truncation to repaired, 4 MiB holding a message, vs the ftruncate
    ("bench_boot.py", [], True),  # boot to ready, warm median and a cold run
    ("bench_guest_to_guest.py", [], True),  # guest-to-guest round trip vs QEMU's contrib server
)
RATIO = re.compile(r"(ratio|goal|\d+(\.\d+)?x\b)", re.IGNORECASE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the shorter run of each benchmark that has one")
    options = parser.parse_args()
    gathered: list[str] = []
    failed = []
    for script, arguments, has_quick in BENCHMARKS:
        quick = ["--quick"] if options.quick and has_quick else []
        command = [sys.executable, str(HERE / script), *arguments, *quick]
        print(f"\n=== {script} ({' '.join(command[2:]) or 'defaults'})", flush=True)
        started = time.monotonic()
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        print(result.stdout, end="", flush=True)
        print(f"=== {script}: {time.monotonic() - started:.0f} s, exit {result.returncode}", flush=True)
        if result.returncode != 0:
            failed.append(script)
        gathered += [f"{script}: {line.strip()}" for line in result.stdout.splitlines() if RATIO.search(line)]
    print("\n=== the ratios, gathered")
    print("\n".join(gathered))
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
