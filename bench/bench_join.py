"""Peer joins against `shmguard run --no-guest`: throughput and latency, next to two baselines from the same run.

    .venv/bin/python bench/bench_join.py [--count N] [--rounds N] [--durable]

A join is IvshmemClient(...).connect(): connect, then the whole greeting read and checked (its fds included);
then the client closes, and the next join starts. Configurations: 1, 8 and 64 vectors, with 0 and 8 idle peers
connected (they read everything, as QEMU does, so each join also costs the announcements to them).
Baselines, measured in the same run with the same client code where it applies:
  bare  a connect + accept + close round trip on a UNIX socket (the floor of any join);
  ref   a minimal ivshmem server (a forked child, no authentication, no log, no audit, no queues, nobody to
        announce joins to) that sends the same greeting, the host's and the idle peers' vectors included:
        the cost of the protocol itself, fds and all.
The audit log is not durable unless --durable (then every join and leave is an fsync on the log's file system).
"""

from __future__ import annotations

import argparse
import array
import itertools
import os
import signal
import socket
import statistics
import tempfile
import time
from pathlib import Path

from common import percentile

from shmguard.client import IvshmemClient
from shmguard.launcher import ThrowawaySupervisor
from shmguard.protocol import MESSAGE, recv_message

VECTORS = (1, 8, 64)
IDLE = (0, 8)
RUNS = itertools.count()


# --- what is measured ----------------------------------------------------------------------------------------


def join_times(path: str, vectors: int, count: int) -> tuple[list[float], float]:
    """Seconds per join (connect to complete greeting) and the wall time of all `count` joins, closes included."""
    times = []
    started = time.perf_counter()
    for _ in range(count):
        begin = time.perf_counter()
        client = IvshmemClient(path, vectors=vectors).connect()
        times.append(time.perf_counter() - begin)
        client.close()
    return times, time.perf_counter() - started


def bare_round_trips(path: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        begin = time.perf_counter()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            sock.recv(1)  # EOF: the server accepted and closed
        times.append(time.perf_counter() - begin)
    return times


# --- servers in forked children ------------------------------------------------------------------------------


def fork_server(serve) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            serve()
        finally:
            os._exit(0)
    return pid


def bare_server(listener: socket.socket) -> None:
    while True:
        listener.accept()[0].close()


def new_eventfds(count: int) -> list[int]:
    return [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]


def reference_server(listener: socket.socket, vectors: int, others: int) -> None:
    """Greets one peer at a time, as if `others` peers were connected, and forgets it when it leaves."""
    shm = os.memfd_create("bench-ref")
    os.ftruncate(shm, 4 << 20)
    existing = [(peer_id, new_eventfds(vectors)) for peer_id in range(others)]
    next_id = others
    while True:
        conn, _ = listener.accept()
        own = new_eventfds(vectors)
        greeting = [(0, None), (next_id, None), (-1, shm)]
        greeting += [(peer_id, fd) for peer_id, fds in existing for fd in fds] + [(next_id, fd) for fd in own]
        for value, fd in greeting:
            fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
            conn.sendmsg([MESSAGE.pack(value)], fds)
        conn.recv(1)  # the peer leaves
        conn.close()
        for fd in own:
            os.close(fd)
        next_id += 1


def idle_peers(path: str, count: int, vectors: int, ready: int) -> None:
    """`count` peers that stay connected and read everything (a peer that does not read is dropped)."""
    import select

    clients = [IvshmemClient(path, vectors=vectors).connect() for _ in range(count)]
    os.write(ready, b"!")
    by_fd = {client.sock.fileno(): client for client in clients}
    poller = select.poll()
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            message = recv_message(by_fd[fd].sock)
            if message is None:
                return
            for received in message[1]:
                os.close(received)


def listening(path: Path) -> socket.socket:
    if path.exists():  # left by the previous round
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)
    return listener


def stop(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


# --- the supervisor ------------------------------------------------------------------------------------------


def measure_supervisor(directory: Path, vectors: int, count: int, durable: bool) -> dict[int, tuple]:
    """For each number of idle peers: (per-join times, wall time) against one supervisor."""
    supervisor = ThrowawaySupervisor("strict", parent=directory, prefix=f"run-{vectors}-{next(RUNS)}-",
                                     durable=durable, timeout=60, server={"vectors": vectors})
    socket_path = supervisor.policy.server.socket  # a new set of files for every run
    results, idle_pid = {}, None
    try:
        for idle in IDLE:
            if idle:
                idle_pid = start_idle_peers(socket_path, idle, vectors)
            join_times(socket_path, vectors, min(count, 20))  # warm up
            results[idle] = join_times(socket_path, vectors, count)
    finally:
        if idle_pid is not None:
            stop(idle_pid)
        supervisor.stop()
    return results


def start_idle_peers(path: str, count: int, vectors: int) -> int:
    """Fork the idle peers and return once all of them have joined."""
    ready_read, ready_write = os.pipe()
    pid = fork_server(lambda: idle_peers(path, count, vectors, ready_write))
    os.close(ready_write)
    with os.fdopen(ready_read, "rb") as ready:
        if ready.read(1) != b"!":
            raise SystemExit("the idle peers could not join")
    return pid


def measure_reference(directory: Path, vectors: int, others: int, count: int) -> list[float]:
    path = directory / f"ref-{vectors}-{others}.sock"
    listener = listening(path)
    pid = fork_server(lambda: reference_server(listener, vectors, others))
    listener.close()
    try:
        join_times(str(path), vectors, min(count, 20))
        return join_times(str(path), vectors, count)[0]
    finally:
        stop(pid)


def measure_bare(directory: Path, count: int) -> list[float]:
    listener = listening(directory / "bare.sock")
    pid = fork_server(lambda: bare_server(listener))
    listener.close()
    try:
        bare_round_trips(str(directory / "bare.sock"), min(count, 20))
        return bare_round_trips(str(directory / "bare.sock"), count)
    finally:
        stop(pid)


# --- the table -----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="joins per configuration")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole table, keeping the best p50s")
    parser.add_argument("--durable", action="store_true", help="make the audit log durable (fsync per record)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shmguard-bench-join-") as temporary:
        directory = Path(temporary)
        bare = min((measure_bare(directory, args.count) for _ in range(args.rounds)), key=statistics.median)
        bare_p50 = statistics.median(bare)
        print(f"{args.count} joins per row, sequential; audit log {'durable' if args.durable else 'not durable'}; "
              f"bare connect+accept+close p50 {bare_p50 * 1e3:.3f} ms ({1 / bare_p50:.0f}/s)")
        print(f"{'vectors':>7} {'idle':>4} {'joins/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'ref p50':>8} "
              f"{'x ref':>6} {'x bare':>7}")
        for vectors in VECTORS:
            rounds = [measure_supervisor(directory, vectors, args.count, args.durable) for _ in range(args.rounds)]
            for idle in IDLE:
                reference = min(statistics.median(measure_reference(directory, vectors, 1 + idle, args.count))
                                for _ in range(args.rounds))  # the same greeting: the host and the idle peers
                times, wall = min((r[idle] for r in rounds), key=lambda result: statistics.median(result[0]))
                p50 = statistics.median(times)
                print(f"{vectors:7} {idle:4} {len(times) / wall:8.0f} {p50 * 1e3:7.3f} "
                      f"{percentile(times, 0.99) * 1e3:7.3f} {reference * 1e3:8.3f} {p50 / reference:6.1f} "
                      f"{p50 / bare_p50:7.1f}")


if __name__ == "__main__":
    main()
