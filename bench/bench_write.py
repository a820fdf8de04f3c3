"""One message through `shmguard write` next to the seed's dd command, many messages through `write --lines`
next to the same dd once per message, and audited writes per second next to plain mmap writes, all measured in
the same run.

    .venv/bin/python bench/bench_write.py [--quick] [--messages N] [--lines N] [--count N] [--durable-count N]
                                          [--rounds N] [--budget S] [--sizes 4096,4194304] [--dir DIR]
                                          [--installed VENV]

`shmguard` is a normal install: the package pip-installed (not editable) into a virtual environment made for the
run in --dir (about 20 s), or the one --installed names; the checkout's editable install would add its import
hook's ~20 ms to every process. Against a running `shmguard run --no-guest` (strict policy, sealed memfd of the
size measured, durable audit log as strict has it):
- latency of one message, a new process per message as a user or a script would run it:
  `shmguard write -m TEXT --policy strict --control-socket SOCKET` (the built-in policy: read from its record),
  `shmguard write -m TEXT --policy FILE` (a policy file: checked in full by the warm-up, then read from this
  user's cache of it, policy_facts.FactsCache), the first through the click CLI
  (what every command cost before write took the lean path), and the seed's script, reduced to
  the command it runs for a message that fits: `printf %s "$MSG" | dd of=/dev/shm/FILE ibs=SIZE conv=sync
  status=none` under /bin/sh, against a scratch file of the same size in /dev/shm (dd truncates it and writes
  SIZE bytes: the message and NUL padding). The four are interleaved message by message, so all see the same
  machine;
- many messages: one `shmguard write --lines` process writing --lines messages from its standard input (each an
  audited, durable write), its wall time divided by the messages, against the seed's dd once per message
  (the dd figure of the row above), and the same against the not-durable supervisor, which shows what is the
  client's and what is the fsync per record. Best of --rounds.

Rate: one persistent client (this process) calls shmguard.control.ControlClient.call in a loop, each request one audited
write of the message padded to the end of the region, with a durable audit log (fsync per record) and without.
Each rate stops after its count or after --budget seconds, whichever comes first (a 4 MiB write takes
milliseconds). Baseline: plain writes of the same padded message into an mmap of a memfd of the same size.
Best of --rounds.
The audit logs go to --dir (default /var/tmp): on tmpfs an fsync costs nothing, so keep it on a disk.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Series, file_system_of, region_sizes

from shmguard.audit import verify
from shmguard.control import ControlClient, ControlError, WriteRequest
from shmguard.launcher import ThrowawaySupervisor
from shmguard.region import text_payload

WARMUP = 3
SEED_COMMAND = 'printf %s "$MSG" | dd of={path} ibs={size} conv=sync status=none'
CLICK_CLI = "import sys; from shmguard.cli import main; main(sys.argv[1:], prog_name='shmguard')"  # click for all


def size_label(size: int) -> str:
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def normal_install(root: Path, venv: Path | None) -> list[str]:
    """The `shmguard` script of a normal (not editable) install: --installed's, else one made now in root."""
    if venv is None:
        venv = root / "venv"
        source = root / "source"
        checkout = Path(__file__).resolve().parents[1]
        shutil.copytree(checkout, source, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", ".cache"))
        for command in ([sys.executable, "-m", "venv", "--upgrade-deps", venv],
                        [venv / "bin/pip", "install", "-q", source]):
            result = subprocess.run([str(c) for c in command], capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"{' '.join(map(str, command))} exited {result.returncode}: {result.stderr[-2000:]}")
    script = venv / "bin/shmguard"
    if not os.access(script, os.X_OK):
        raise SystemExit(f"{script}: no installed shmguard there")
    return [str(script)]


# --- the supervisor ---------------------------------------------------------------------------------------


class Supervisor:
    """`shmguard run --no-guest` with its own policy in its own directory."""

    def __init__(self, root: Path, size: int, durable: bool):
        self.process = ThrowawaySupervisor("strict", parent=root, prefix=f"{size_label(size)}-"
                                           f"{'durable' if durable else 'fast'}-", durable=durable, keep=True,
                                           timeout=60, region={"size": size})
        self.policy, self.audit = self.process.policy_path, self.process.policy.audit.path
        self.client = ControlClient(self.process.control)

    def stop(self) -> str:
        status = self.process.stop()
        if status != 0:
            raise SystemExit(f"the supervisor exited with status {status}; its log: {self.process.log_path}")
        return verify(self.audit).summary()


# --- latency of one message, a new process each ----------------------------------------------------------


def timed_run(argv: list[str], env: dict | None = None) -> float:
    start = time.perf_counter_ns()
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env)
    elapsed = time.perf_counter_ns() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.decode(errors='replace')}")
    return elapsed / 1e6


def message_latency(supervisor: Supervisor, shmguard: list[str], size: int, message: str,
                    count: int) -> list[Series]:
    """[write -m with the built-in policy, with a policy file, through the click CLI, seed dd] ms per message,
    interleaved, the order turning round each message."""
    fd, scratch = tempfile.mkstemp(prefix="shmguard-bench-seed-", dir="/dev/shm")
    try:
        os.ftruncate(fd, size)
        os.close(fd)
        seed_env = dict(os.environ, MSG=message)
        runs = [(Series("shmguard write -m, built-in policy"),
                 [*shmguard, "write", "-m", message, "--policy", "strict", "--control-socket",
                  str(supervisor.process.control)], None),
                (Series("shmguard write -m, policy file"),
                 [*shmguard, "write", "-m", message, "--policy", str(supervisor.policy)], None),
                (Series("the same through the click CLI"),
                 [str(Path(shmguard[0]).with_name("python")), "-I", "-c", CLICK_CLI, "write", "-m", message, "--policy",
                  "strict", "--control-socket", str(supervisor.process.control)], None),
                (Series("seed: printf | dd conv=sync"),
                 ["/bin/sh", "-c", SEED_COMMAND.format(path=scratch, size=size)], seed_env)]
        for number in range(WARMUP + count):
            turn = number % len(runs)
            for series, argv, env in runs[turn:] + runs[:turn]:
                elapsed = timed_run(argv, env)
                if number >= WARMUP:
                    series.values.append(elapsed)
        if os.stat(scratch).st_size != size:
            raise SystemExit(f"the seed's command left {scratch} at {os.stat(scratch).st_size} bytes, not {size}")
    finally:
        os.unlink(scratch)
    return [series for series, _, _ in runs]


def lines_per_message(supervisor: Supervisor, shmguard: list[str], message: str, count: int) -> float:
    """ms per message of one `shmguard write --lines` process writing `count` messages (durable audit)."""
    text = "".join(f"{message} {n}\n" for n in range(count)).encode()
    before = supervisor.client.status()["audit"]["last_seq"]
    start = time.perf_counter_ns()
    result = subprocess.run([*shmguard, "write", "--lines", "--policy", "strict", "--control-socket",
                             str(supervisor.process.control)], input=text, capture_output=True)
    elapsed = time.perf_counter_ns() - start
    if result.returncode != 0 or not result.stdout.startswith(f"wrote {count} of {count} lines".encode()):
        raise SystemExit(f"write --lines failed ({result.returncode}): {result.stderr.decode(errors='replace')}")
    written = supervisor.client.status()["audit"]["last_seq"] - before
    if written < count:
        raise SystemExit(f"write --lines: {count} messages, {written} audit records")
    return elapsed / 1e6 / count


# --- writes per second -----------------------------------------------------------------------------------


def audited_rate(supervisor: Supervisor, message: bytes, count: int, budget_s: float) -> tuple[float, int]:
    """Writes per second over `count` requests, or fewer if `budget_s` runs out first (at least 20)."""
    write = WriteRequest(message, text=True)
    for _ in range(WARMUP):
        supervisor.client.ask(write)
    start = time.perf_counter()
    done = 0
    while done < count and (done < 20 or time.perf_counter() - start < budget_s):
        try:
            supervisor.client.call(write)
        except ControlError as exc:
            raise SystemExit(f"write refused: {exc}") from None
        done += 1
    return done / (time.perf_counter() - start), done


def mmap_rate(size: int, message: bytes, count: int) -> tuple[float, int]:
    """The same padded message written into an mmap of a memfd of the same size, as plainly as it gets.

    Batches of `count` writes until 0.2 s have passed: a 4 KiB write takes a fraction of a microsecond."""
    fd = os.memfd_create("bench", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mapping:
            payload = text_payload(message, 0, size)
            mapping[0:size] = payload  # fault the pages in first, as the supervisor's mapping already is
            done, start = 0, time.perf_counter()
            while done == 0 or time.perf_counter() - start < 0.2:
                for _ in range(count):
                    mapping[0:len(payload)] = payload
                done += count
            return done / (time.perf_counter() - start), done
    finally:
        os.close(fd)


# --- main ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages and requests, one round")
    parser.add_argument("--messages", type=int, help="CLI messages per size and side (default 100; --quick 20)")
    parser.add_argument("--lines", type=int, help="messages of one write --lines process (default 2000; --quick 500)")
    parser.add_argument("--installed", type=Path, help="a virtual environment with shmguard installed (default: "
                        "one made for the run)")
    parser.add_argument("--count", type=int, help="requests in the non-durable rate (default 3000; --quick 500)")
    parser.add_argument("--durable-count", type=int, help="requests in the durable rate (default 500; --quick 100)")
    parser.add_argument("--rounds", type=int, help="rate rounds, best kept (default 3; --quick 1)")
    parser.add_argument("--budget", type=float, help="seconds at most per rate measurement (default 3; --quick 1)")
    parser.add_argument("--sizes", type=region_sizes, default="4096,4194304",
                        help="region sizes, 4096 or 4K as a policy writes them (default 4096,4194304: the Zephyr "
                        "x86_64 size, the seed's)")
    parser.add_argument("--message", default="hello world")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                        help="where the sockets and audit logs go (default /var/tmp, not tmpfs)")
    args = parser.parse_args()
    messages = args.messages or (20 if args.quick else 100)
    line_count = args.lines or (500 if args.quick else 2000)
    count = args.count or (500 if args.quick else 3000)
    durable_count = args.durable_count or (100 if args.quick else 500)
    rounds = args.rounds or (1 if args.quick else 3)
    budget = args.budget or (1.0 if args.quick else 3.0)
    sizes = args.sizes
    message = args.message.encode()

    root = Path(tempfile.mkdtemp(prefix="shmguard-bench-write-", dir=args.dir))
    root.chmod(0o755)
    latency, rates, many, audits = {}, {}, {}, []
    try:
        shmguard = normal_install(root, args.installed)
        print(f"audit logs in {args.dir} ({file_system_of(root)}); message {args.message!r}; {os.cpu_count()} CPUs; "
              f"shmguard as {' '.join(shmguard)}")
        for size in sizes:
            durable, fast = Supervisor(root, size, True), Supervisor(root, size, False)
            try:
                print(f"{size_label(size)}: {messages} messages each side, then {rounds} x ({line_count} lines, up to "
                      f"{durable_count} durable, {count} non-durable writes, at most {budget:g} s each; mmap writes "
                      "for 0.2 s)", flush=True)
                latency[size] = message_latency(durable, shmguard, size, args.message, messages)
                many[size] = (min(lines_per_message(durable, shmguard, args.message, line_count)
                                  for _ in range(rounds)),
                              min(lines_per_message(fast, shmguard, args.message, line_count) for _ in range(rounds)))
                best = {"durable": (0.0, 0), "not durable": (0.0, 0), "mmap": (0.0, 0)}
                for _ in range(rounds):
                    best["durable"] = max(best["durable"], audited_rate(durable, message, durable_count, budget))
                    best["not durable"] = max(best["not durable"], audited_rate(fast, message, count, budget))
                    best["mmap"] = max(best["mmap"], mmap_rate(size, message, count))
                rates[size] = best
            finally:
                audits += [f"{size_label(size)} durable: {durable.stop()}", f"{size_label(size)} not durable: "
                           f"{fast.stop()}"]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\none message, a new process each ({messages} per row, after {WARMUP} warm-up; ms)")
    print(f"  {'size':>5} {'':36} {'median':>8} {'p99':>8} {'min':>8} {'ratio (median)':>15}")
    for size, rows in latency.items():
        seed = rows[-1]
        for series in rows:
            print(f"  {size_label(size):>5} {series.label:36} {series.median:8.2f} {series.p99:8.2f} "
                  f"{series.min:8.2f} {series.median / seed.median:14.1f}x")
    print(f"\nmany messages: one `write --lines` process, {line_count} messages, durable audit, best of {rounds}; "
          "against the seed's dd once per message (median above)")
    print(f"  {'size':>5} {'':36} {'ms/message':>11} {'faster than dd':>15}")
    for size, (per_message, not_durable) in many.items():
        seed = latency[size][-1].median
        print(f"  {size_label(size):>5} {'shmguard write --lines':36} {per_message:11.3f} {seed / per_message:14.1f}x")
        print(f"  {size_label(size):>5} {'  (audit not durable: the client side)':36} {not_durable:11.3f} "
              f"{seed / not_durable:14.1f}x")
        print(f"  {size_label(size):>5} {'seed: printf | dd, once per message':36} {seed:11.3f} {1:14.1f}x")
    print(f"\nwrites per second, one persistent client, best of {rounds} (mmap baseline: the same padded bytes)")
    print(f"  {'size':>5} {'':36} {'writes':>8} {'writes/s':>10} {'us/write':>9} {'slower than mmap':>17}")
    for size, best in rates.items():
        base = best["mmap"][0]
        for label, key in (("control socket, durable (fsync)", "durable"),
                           ("control socket, not durable", "not durable"), ("plain mmap write", "mmap")):
            rate, done = best[key]
            print(f"  {size_label(size):>5} {label:36} {done:8} {rate:10.0f} {1e6 / rate:9.1f} {base / rate:16.0f}x")
    print("\naudit logs afterwards:")
    for line in audits:
        print(f"  {line}")


if __name__ == "__main__":
    main()
