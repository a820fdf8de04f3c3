"""Peer joins against `shmguard run --no-guest`, next to QEMU's own C ivshmem-server in the same run.

    .venv/bin/python bench/bench_join.py [--joins N] [--clients N] [--rounds N] [--dir DIR]
    .venv/bin/python bench/bench_join.py --table [--count N] [--rounds N] [--durable]
    .venv/bin/python bench/bench_join.py --syscalls [--joins N] [--clients N]

The joins row (issue 11): joins per second at 1 vector, audit log durable and not, against QEMU's contrib
ivshmem-server built from Debian's qemu source package (tools/qemu_contrib.py), with the same churn client
(bench/churn.c, compiled with gcc at the start: connect, read the whole greeting with its fds, close; --clients
of them at once, --joins joins each). Both servers greet with the same words and fds: shmguard's own peer is
always there, so the C server has one idle peer connected that reads everything (and so also hears every join
and leave, which shmguard's own peer does not need to); the C server with no peer at all is printed too. Rounds
alternate between the servers; each figure is the best of --rounds. The audit log is in --dir (/var/tmp by
default: a durable record is an fsync there; tmpfs would make it free), whose file system is printed.

--syscalls: the system calls per join+leave of the C server (1 idle peer) and of shmguard, durable and not, each
counted by `strace -c -f` over one churn run, call by call side by side (strace slows both: the counts, not the
times, are the figure).

--table: the latency table of earlier rounds: 1, 8 and 64 vectors, with 0 and 8 idle peers connected (they read
everything, as QEMU does, so each join also costs the announcements to them), one sequential Python client.
A join there is IvshmemClient(...).connect(): connect, then the whole greeting read and checked (its fds
included). Baselines, measured in the same run with the same client code where it applies:
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
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import append_sync_times, file_system_of, percentile

from shmguard.client import IvshmemClient
from shmguard.launcher import ThrowawaySupervisor
from shmguard.protocol import MESSAGE, recv_message

VECTORS = (1, 8, 64)
IDLE = (0, 8)
RUNS = itertools.count()
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tools"))
GOALS = {False: 0.5, True: 0.25}  # issue 11: joins/s at 1 vector as a fraction of the C server's


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


def floor_server(listener: socket.socket, vectors: int) -> None:
    """The ivshmem protocol alone in Python, as fast as this interpreter speaks it: one epoll loop that greets, tells
    the others of each join and leave, and nothing else (no credentials, policy, audit, log, queues or bounds).
    Blocking sends: every peer of the joins row reads everything, and a peer gone is EPIPE, its leave to come."""
    import select

    pack, nosignal, rights = MESSAGE.pack, socket.MSG_NOSIGNAL, (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    shm = os.memfd_create("bench-floor")
    os.ftruncate(shm, 4 << 20)
    listener.setblocking(False)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    peers: dict[int, tuple[socket.socket, int, list[tuple[int, bytes]]]] = {}  # by fd: socket, id, vectors

    def send(sock: socket.socket, word: bytes, fd_bytes: bytes | None = None) -> None:
        try:
            if fd_bytes is None:
                sock.send(word, nosignal)
            else:
                sock.sendmsg((word,), ((*rights, fd_bytes),), nosignal)
        except OSError:
            pass  # gone: its own leave comes through the loop

    shm_fd = array.array("i", [shm]).tobytes()
    next_id = 0
    while True:
        for fd, _ in poller.poll():
            if fd != listener.fileno():
                sock, gone, own = peers.pop(fd)
                poller.unregister(fd)
                sock.close()
                for efd, _ in own:
                    os.close(efd)
                word = pack(gone)
                for other, _, _ in peers.values():
                    send(other, word)
                continue
            try:  # one join per wake, as the C server: leaves come in between (a batch would starve them)
                sock, _ = listener.accept()
            except BlockingIOError:
                continue
            peer_id, next_id = next_id, next_id + 1
            own = []
            for _ in range(vectors):
                efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                own.append((efd, array.array("i", [efd]).tobytes()))
            word = pack(peer_id)
            send(sock, pack(0) + word)
            send(sock, pack(-1), shm_fd)
            for _, other_id, vectors_of in peers.values():
                other_word = pack(other_id)
                for _, fd_bytes in vectors_of:
                    send(sock, other_word, fd_bytes)
            for _, fd_bytes in own:
                send(sock, word, fd_bytes)
            for other, _, _ in peers.values():
                for _, fd_bytes in own:
                    send(other, word, fd_bytes)
            peers[sock.fileno()] = (sock, peer_id, own)
            poller.register(sock.fileno(), select.EPOLLIN)


class FloorServer:
    """floor_server in a forked child on its own socket, with `idle` peers connected that read everything."""

    def __init__(self, directory: Path, vectors: int, idle: int):
        self.path = str(directory / f"floor-{idle}-{next(RUNS)}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(128)
        self.pid = fork_server(lambda: floor_server(listener, vectors))
        listener.close()
        self.idle_pid = start_raw_idle_peers(self.path, idle) if idle else None

    def stop(self) -> None:
        if self.idle_pid is not None:
            stop(self.idle_pid)
        stop(self.pid)


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


# --- the joins row: shmguard against QEMU's C server, one churn client --------------------------------------


def build_churn(directory: Path) -> Path:
    binary = directory / "churn"
    result = subprocess.run(["gcc", "-O2", "-o", str(binary), str(HERE / "churn.c")], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"bench_join: cannot compile bench/churn.c: {result.stderr.strip().splitlines()[:1]}")
    return binary


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (not its children), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def churn(binary: Path, path: str, clients: int, joins: int, server_pid: int) -> tuple[float, float]:
    """(joins per second, the server's CPU seconds per join) of `clients` churn processes doing `joins` joins each
    at 1 vector, all at once. CPU time is what the other load on the machine disturbs least."""
    command = [str(binary), path, str(joins), "1"]
    cpu = cpu_seconds(server_pid)
    started = time.perf_counter()
    processes = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(clients)]
    errors = [process.communicate()[1] for process in processes]
    wall = time.perf_counter() - started
    time.sleep(0.05)  # the last leaves
    cpu = cpu_seconds(server_pid) - cpu
    for process, error in zip(processes, errors, strict=True):
        if process.returncode != 0:
            raise SystemExit(f"bench_join: a churn client failed against {path}: {error.strip()}")
    return clients * joins / wall, cpu / (clients * joins)


class ContribServer:
    """QEMU's contrib ivshmem-server in the foreground, 1 vector, its region a 4 MiB file in /dev/shm (unlinked
    at once, like shmguard's memfd a tmpfs inode), and `idle` peers connected that read everything."""

    def __init__(self, binary: Path, directory: Path, idle: int):
        self.path = str(directory / f"contrib-{idle}-{next(RUNS)}.sock")
        self.process = subprocess.Popen([str(binary), "-F", "-S", self.path, "-m", "/dev/shm", "-l", "4M", "-n", "1"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench_join: QEMU's ivshmem-server did not start on {self.path}")
            time.sleep(0.01)
        self.idle_pid = start_raw_idle_peers(self.path, idle) if idle else wait_listening(self.path)

    def stop(self) -> None:
        if self.idle_pid is not None:
            stop(self.idle_pid)
        self.process.kill()
        self.process.wait()


def wait_listening(path: str) -> None:
    """Until a connect succeeds: the C server's socket file appears at bind(), before it listens. The probe is a
    join and a leave for it, before the measured ones; it reads its whole greeting first (the C server dies of
    SIGPIPE writing to a peer gone)."""
    deadline = time.monotonic() + 10
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
                continue
            probe.settimeout(10)
            own, messages = None, 0
            while (message := recv_message(probe)) is not None:
                value, fds = message
                for received in fds:
                    os.close(received)
                messages += 1
                own = value if messages == 2 else own
                if messages > 3 and value == own:  # its own vector: the greeting is whole
                    return None
            raise SystemExit("bench_join: QEMU's ivshmem-server closed on a peer before its greeting")


def start_raw_idle_peers(path: str, count: int) -> int:
    """`count` peers of any server (no client checks): they stay and read everything, fds closed as they come."""
    ready_read, ready_write = os.pipe()

    def serve() -> None:
        import select

        peers = []
        for _ in range(count):
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            deadline = time.monotonic() + 10
            while True:  # the C server's socket file appears at bind(), before it listens
                try:
                    peer.connect(path)
                    break
                except ConnectionRefusedError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            peers.append(peer)
        os.write(ready_write, b"!")
        poller = select.poll()
        for peer in peers:
            poller.register(peer.fileno(), select.POLLIN)
        by_fd = {peer.fileno(): peer for peer in peers}
        while True:
            for fd, _ in poller.poll():
                message = recv_message(by_fd[fd])
                if message is None:
                    return
                for received in message[1]:
                    os.close(received)

    pid = fork_server(serve)
    os.close(ready_write)
    with os.fdopen(ready_read, "rb") as ready:
        if ready.read(1) != b"!":
            raise SystemExit("bench_join: the idle peers could not join")
    time.sleep(0.05)  # their greetings are read before the churn starts
    return pid


def joins_row(args: argparse.Namespace) -> None:
    import qemu_contrib

    try:
        contrib = qemu_contrib.ivshmem_server()
    except qemu_contrib.ContribError as exc:
        raise SystemExit(f"bench_join: {exc}") from None
    directory = Path(tempfile.mkdtemp(prefix="shmguard-bench-join-", dir=args.dir))
    try:
        binary = build_churn(directory)
        best: dict[str, float] = {}
        cpu: dict[str, float] = {}

        def keep(name: str, figures: tuple[float, float]) -> None:
            best[name] = max(best.get(name, 0.0), figures[0])
            cpu[name] = min(cpu.get(name, float("inf")), figures[1])

        supervisors = {durable: ThrowawaySupervisor("strict", parent=directory, prefix=f"run-{int(durable)}-",
                                                    durable=durable, timeout=60, server={"vectors": 1})
                       for durable in (False, True)}
        try:
            for _ in range(args.rounds):
                for idle in (1, 0):
                    server = ContribServer(contrib, directory, idle)
                    try:
                        churn(binary, server.path, 1, 200, server.process.pid)  # warm up
                        keep(f"c{idle}", churn(binary, server.path, args.clients, args.joins, server.process.pid))
                    finally:
                        server.stop()
                floor = FloorServer(directory, 1, 1)
                try:
                    churn(binary, floor.path, 1, 200, floor.pid)
                    keep("p1", churn(binary, floor.path, args.clients, args.joins, floor.pid))
                finally:
                    floor.stop()
                for durable, supervisor in supervisors.items():
                    socket_path = supervisor.policy.server.socket
                    pid = supervisor.process.pid
                    churn(binary, socket_path, 1, 200, pid)
                    keep(f"s{int(durable)}", churn(binary, socket_path, args.clients, args.joins, pid))
        finally:
            for supervisor in supervisors.values():
                supervisor.stop()
        print(f"joins/s at 1 vector, {args.clients} churn clients x {args.joins} joins (bench/churn.c), best of "
              f"{args.rounds} rounds; audit log on {file_system_of(directory)} ({directory.parent})")
        print(f"  {'server':48} {'joins/s':>8} {'CPU/join':>9}  ratio to the C server (1 idle peer; no peer)")
        rows = [("QEMU's C ivshmem-server, 1 idle peer (same greeting)", "c1"),
                ("QEMU's C ivshmem-server, no peer", "c0"),
                ("the protocol alone in Python, 1 idle peer (floor)", "p1"),
                ("shmguard, audit not durable", "s0"), ("shmguard, audit durable", "s1")]
        for label, key in rows:
            line = f"  {label:48} {best[key]:8.0f} {cpu[key] * 1e6:7.1f}us"
            if key == "p1":
                line += (f"  {best[key] / best['c1']:.2f}x: what Python reaches with no work but the protocol; "
                         f"CPU {cpu[key] / cpu['c1']:.1f}x the C server's")
            if key.startswith("s"):
                ratio = best[key] / best["c1"]
                goal = GOALS[key == "s1"]
                line += (f"  {ratio:.2f}x; {best[key] / best['c0']:.2f}x (goal >= {goal}x: "
                         f"{'met' if ratio >= goal else 'not met'}); CPU {cpu[key] / cpu['c1']:.1f}x the C server's")
            print(line)
        sync = append_sync_times(directory).median / 1e3
        ceiling = args.clients / sync
        print(f"  an append + fdatasync alone on this file system: p50 {sync * 1e3:.3f} ms. A durable join is greeted "
              f"once its record is on disk, so {args.clients} churn clients, each waiting for at least one, join at "
              f"most about {ceiling:.0f}/s ({ceiling / best['c1']:.2f}x the C server) before any CPU is spent")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- system calls per join, both servers -------------------------------------------------------------------


def traced_calls(binary: Path, path: str, pid: int, clients: int, joins: int, out: Path) -> dict[str, tuple[int, int]]:
    """{syscall: (calls, errors)} of process pid under `strace -c -f` over one churn run."""
    strace = shutil.which("strace")
    if strace is None:
        raise SystemExit("bench_join: --syscalls needs strace (apt-get install strace)")
    tracer = subprocess.Popen([strace, "-c", "-f", "-o", str(out), "-p", str(pid)], stderr=subprocess.PIPE, text=True)
    if "attached" not in tracer.stderr.readline():
        raise SystemExit(f"bench_join: strace did not attach to {pid}")
    try:
        churn(binary, path, clients, joins, pid)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
    calls = {}
    for line in out.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
            errors = int(fields[4]) if len(fields) == 6 else 0
            calls[fields[-1]] = (int(fields[3]), errors)
    return calls


def syscalls_row(args: argparse.Namespace) -> None:
    """System calls per join+leave of each server over the same churn run, call by call."""
    import qemu_contrib

    contrib = qemu_contrib.ivshmem_server()
    directory = Path(tempfile.mkdtemp(prefix="shmguard-bench-join-", dir=args.dir))
    try:
        binary = build_churn(directory)
        joins = args.clients * args.joins
        counted: dict[str, dict[str, tuple[int, int]]] = {}
        server = ContribServer(contrib, directory, 1)
        try:
            churn(binary, server.path, 1, 200, server.process.pid)
            counted["C server"] = traced_calls(binary, server.path, server.process.pid, args.clients, args.joins,
                                               directory / "c.strace")
        finally:
            server.stop()
        for durable in (False, True):
            supervisor = ThrowawaySupervisor("strict", parent=directory, prefix=f"trace-{int(durable)}-",
                                             durable=durable, timeout=60, server={"vectors": 1})
            try:
                socket_path, pid = supervisor.policy.server.socket, supervisor.process.pid
                churn(binary, socket_path, 1, 200, pid)
                counted[f"shmguard{', durable' if durable else ''}"] = traced_calls(
                    binary, socket_path, pid, args.clients, args.joins, directory / f"s{int(durable)}.strace")
            finally:
                supervisor.stop()
        names = sorted({name for calls in counted.values() for name in calls},
                       key=lambda name: -max(calls.get(name, (0, 0))[0] for calls in counted.values()))
        print(f"system calls per join+leave under strace -c -f, {args.clients} churn clients x {args.joins} joins "
              f"(the C server with 1 idle peer, as in the joins row; (errors) where some failed)")
        print(f"  {'call':16}" + "".join(f"{label:>20}" for label in counted))
        for name in names:
            cells = []
            for calls in counted.values():
                count, errors = calls.get(name, (0, 0))
                cells.append(f"{count / joins:.2f}" + (f" ({errors / joins:.2f})" if errors else ""))
            print(f"  {name:16}" + "".join(f"{cell:>20}" for cell in cells))
        print(f"  {'total':16}" + "".join(f"{sum(c for c, _ in calls.values()) / joins:>20.2f}"
                                          for calls in counted.values()))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- the table -----------------------------------------------------------------------------------------------


def table(args: argparse.Namespace) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--joins", type=int, default=5000, help="joins per churn client and round (joins row)")
    parser.add_argument("--clients", type=int, default=2, help="churn clients at once (joins row)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, keeping the best figure of each")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where the audit logs go (joins row)")
    parser.add_argument("--table", action="store_true", help="the latency table instead of the joins row")
    parser.add_argument("--syscalls", action="store_true",
                        help="system calls per join of both servers under strace instead of the joins row")
    parser.add_argument("--count", type=int, default=1000, help="joins per configuration (--table)")
    parser.add_argument("--durable", action="store_true", help="make the audit log durable (--table)")
    args = parser.parse_args()
    if args.table:
        table(args)
    elif args.syscalls:
        syscalls_row(args)
    else:
        joins_row(args)


if __name__ == "__main__":
    main()
