"""A hostile or broken ivshmem server: the client and the CLI end in one clear error, leak no fd and never hang.

Each server is a real UNIX-socket server in a forked child that answers every connection with crafted
messages and real fds (memfds, eventfds, pipes, files) passed with SCM_RIGHTS.
"""

from __future__ import annotations

import array
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable

import pytest

from helpers import SHMGUARD
from shmguard.client import IvshmemClient
from shmguard.errors import ProtocolError
from shmguard.protocol import MESSAGE

FdMaker = Callable[[], list[int]]
Script = Callable[[socket.socket], None]


# --- fds a hostile server can pass ---------------------------------------------------------------------------


def eventfd() -> list[int]:
    return [os.eventfd(0, os.EFD_NONBLOCK)]


def memfd(size: int) -> FdMaker:
    def make() -> list[int]:
        fd = os.memfd_create("hostile")
        os.ftruncate(fd, size)
        return [fd]

    return make


def pipe_end() -> list[int]:
    read_end, write_end = os.pipe()
    os.close(write_end)
    return [read_end]


def regular_file() -> list[int]:
    return [os.open("/etc/hostname", os.O_RDONLY)]


def several(*makers: FdMaker) -> FdMaker:
    return lambda: [fd for make in makers for fd in make()]


SHM = memfd(4096)


# --- scripts: what the server sends on each connection -------------------------------------------------------


def send(conn: socket.socket, value: int, make: FdMaker | None = None) -> None:
    fds = make() if make else []
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    conn.sendmsg([MESSAGE.pack(value)], ancillary)
    for fd in fds:  # the client has its own copies now
        os.close(fd)


def messages(*steps: tuple, then_close: bool = False) -> Script:
    """Send each (value[, fd maker]) in order; then keep the connection open, or close it."""

    def script(conn: socket.socket) -> None:
        for step in steps:
            send(conn, *step)
        if not then_close:
            hold(conn)

    return script


def valid_greeting(own: int = 1, vectors: int = 1) -> list[tuple]:
    return [(0,), (own,), (-1, SHM), *[(0, eventfd)] * vectors, *[(own, eventfd)] * vectors]


def hold(conn: socket.socket) -> None:
    """Keep the connection open until the client goes away."""
    conn.settimeout(60)
    try:
        while conn.recv(4096):
            pass
    except OSError:
        pass


def silent(conn: socket.socket) -> None:
    hold(conn)


def partial_message_with_fd(conn: socket.socket) -> None:
    """Half of the shm message, with its fd, and then nothing: the fd must not leak when the client gives up."""
    send(conn, 0)
    send(conn, 1)
    fds = SHM()
    conn.sendmsg([MESSAGE.pack(-1)[:4]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    os.close(fds[0])
    hold(conn)


def trickle(conn: socket.socket) -> None:
    """A valid greeting one byte at a time, slowly: every read makes progress, but the greeting never ends in time."""
    conn.settimeout(60)
    try:
        for value, *make in valid_greeting():
            fds = make[0]() if make else []
            data = MESSAGE.pack(value)
            conn.sendmsg([data[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])
            for fd in fds:
                os.close(fd)
            for byte in data[1:]:
                time.sleep(0.5)
                conn.send(bytes([byte]))
    except OSError:
        pass  # the client gave up
    hold(conn)


# --- the server process --------------------------------------------------------------------------------------


class HostileServer:
    """A real UNIX-socket server in a forked child: every connection gets `script`, one after another."""

    def __init__(self, path: str, script: Script):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(16)
        self.path = path
        self.pid = os.fork()
        if self.pid == 0:
            self._serve(listener, script)
        listener.close()

    @staticmethod
    def _serve(listener: socket.socket, script: Script) -> None:
        try:
            while True:
                conn, _ = listener.accept()
                try:
                    script(conn)
                except OSError:
                    pass  # the client hung up first
                finally:
                    conn.close()
        finally:
            os._exit(0)

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


@pytest.fixture
def serve(tmp_path):
    servers = []

    def serve(script: Script) -> str:
        server = HostileServer(str(tmp_path / f"hostile-{len(servers)}.sock"), script)
        servers.append(server)
        return server.path

    yield serve
    for server in servers:
        server.stop()


def open_fds() -> set[str]:
    return {f"{n} -> {os.readlink(f'/proc/self/fd/{n}')}" for n in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{n}")}


def refusal(path: str, vectors: int | None = None, timeout: float = 5.0) -> str:
    """Join and expect a ProtocolError; return its message after checking that no fd leaked."""
    before = open_fds()
    with pytest.raises(ProtocolError) as error:
        IvshmemClient(path, vectors=vectors, timeout=timeout).connect()
    assert open_fds() == before, "the refused join leaked fds"
    message = str(error.value)
    assert "\n" not in message and message.startswith(path)
    return message


# --- every way the greeting can be wrong ---------------------------------------------------------------------

WRONG_GREETINGS = {
    "wrong version": ([(1,), (1,), (-1, SHM), (1, eventfd)], "protocol version 1"),
    "version with an fd": ([(0, eventfd), (1,), (-1, SHM), (1, eventfd)], "protocol version 0"),
    "peer id 70000": ([(0,), (70000,), (-1, SHM), (70000, eventfd)], "own peer id 70000"),
    "peer id -5": ([(0,), (-5,), (-1, SHM), (-5, eventfd)], "own peer id -5"),
    "peer id with an fd": ([(0,), (1, SHM), (-1, SHM), (1, eventfd)], "own peer id 1"),
    "an eventfd before the shm": ([(0,), (1,), (0, eventfd), (-1, SHM), (1, eventfd)], "message 0 with an fd"),
    "own vectors before the shm": ([(0,), (1,), (1, eventfd), (1, eventfd), (-1, SHM)], "message 1 with an fd"),
    "shm message without an fd": ([(0,), (1,), (-1,), (1, eventfd)], "message -1 without an fd"),
    "shm of 3000 bytes": ([(0,), (1,), (-1, memfd(3000)), (1, eventfd)], "3000 bytes, not a power of two"),
    "shm of 12288 bytes": ([(0,), (1,), (-1, memfd(12288)), (1, eventfd)], "12288 bytes, not a power of two"),
    "shm of 2048 bytes": ([(0,), (1,), (-1, memfd(2048)), (1, eventfd)], "2048 bytes, not a power of two >= 4096"),
    "shm of 0 bytes": ([(0,), (1,), (-1, memfd(0)), (1, eventfd)], "0 bytes"),
    "shm is a pipe": ([(0,), (1,), (-1, pipe_end), (1, eventfd)], "not a regular file"),
    "shm is an eventfd": ([(0,), (1,), (-1, eventfd), (1, eventfd)], "not a regular file"),
    "own vector is a regular file": ([(0,), (1,), (-1, SHM), (1, regular_file)], "not an eventfd"),
    "a peer's vector is a memfd": ([(0,), (1,), (-1, SHM), (0, SHM), (1, eventfd)], "peer 0 is not an eventfd"),
    "65 vectors for one peer": ([(0,), (1,), (-1, SHM), *[(0, eventfd)] * 65, (1, eventfd)], "more than 64 vectors"),
    "two fds on one message": ([(0,), (1,), (-1, several(SHM, eventfd)), (1, eventfd)], "2 fds with one message"),
    "six fds on one message": ([(0,), (1,), (-1, several(*[eventfd] * 6))], "more fds with one message"),
    "a second shm": ([(0,), (1,), (-1, SHM), (-1, SHM), (1, eventfd)], "unexpected message -1"),
    "a peer id out of range": ([(0,), (1,), (-1, SHM), (70000, eventfd), (1, eventfd)], "unexpected message 70000"),
    "says this peer left": ([(0,), (1,), (-1, SHM), (1,)], "says this peer (1) left"),
}
CLOSED_EARLY = {
    "closed before any message": ([], "closed the connection (refused"),
    "closed after the version": ([(0,)], "closed the connection (in the middle of the greeting"),
    "closed after the shm": ([(0,), (1,), (-1, SHM)], "closed the connection (in the middle of the greeting"),
    "closed after a peer's vectors": ([(0,), (1,), (-1, SHM), (0, eventfd)], "in the middle of the greeting"),
}


@pytest.mark.parametrize("case", WRONG_GREETINGS)
def test_a_wrong_greeting_is_one_clear_protocol_error(serve, case):
    steps, reason = WRONG_GREETINGS[case]
    assert reason in refusal(serve(messages(*steps)))


@pytest.mark.parametrize("case", CLOSED_EARLY)
def test_a_server_that_closes_early_is_one_clear_protocol_error(serve, case):
    steps, reason = CLOSED_EARLY[case]
    assert reason in refusal(serve(messages(*steps, then_close=True)))


def test_more_vectors_for_a_peer_than_expected_is_refused(serve):
    path = serve(messages((0,), (1,), (-1, SHM), *[(0, eventfd)] * 3, (1, eventfd), (1, eventfd)))
    assert "more than 2 vectors for peer 0" in refusal(path, vectors=2)


def test_more_own_vectors_than_expected_is_refused_at_join_or_at_the_next_read(serve):
    path = serve(messages(*valid_greeting(vectors=2), (1, eventfd)))
    before = open_fds()
    client = IvshmemClient(path, vectors=2, timeout=5)
    with pytest.raises(ProtocolError, match="more than 2 vectors for peer 1"):
        client.connect()
        client.wait(timeout=5)  # if the third vector was still on its way at the end of the greeting
    client.close()
    assert open_fds() == before


def test_a_silent_server_times_out(serve):
    assert "no complete greeting within 0.5 s" in refusal(serve(silent), timeout=0.5)


def test_half_a_message_with_an_fd_then_silence_times_out_without_leaking_the_fd(serve):
    assert "no complete greeting within 0.5 s" in refusal(serve(partial_message_with_fd), timeout=0.5)


def test_a_server_that_trickles_bytes_cannot_stretch_the_greeting_past_the_timeout(serve):
    # every read makes progress, so only a deadline for the whole greeting ends it
    assert "no complete greeting within 1 s" in refusal(serve(trickle), timeout=1.0)


def test_a_valid_greeting_joins_and_leaves_no_fd_behind(serve):
    before = open_fds()
    with IvshmemClient(serve(messages(*valid_greeting(vectors=2))), vectors=2) as client:
        assert (client.own_id, client.shm_size, len(client.own_vectors)) == (1, 4096, 2)
        assert client.describe()["peers"] == {0: 2}
    assert open_fds() == before


def test_a_client_in_a_process_with_more_than_1024_fds_still_joins(serve):
    # select() cannot watch fds above 1023; a client with many fds open must still work
    path = serve(messages(*valid_greeting(vectors=2)))
    padding = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        with IvshmemClient(path, vectors=2) as client:
            assert client.sock.fileno() > 1024
            client.notify(client.own_id, 1)
            assert client.wait(timeout=5) == 1
    finally:
        for fd in padding:
            os.close(fd)


# --- the same servers through the CLI ------------------------------------------------------------------------

CLI_CASES = {
    **{case: messages(*WRONG_GREETINGS[case][0]) for case in (
        "wrong version", "peer id 70000", "peer id -5", "an eventfd before the shm", "own vectors before the shm",
        "shm of 3000 bytes", "shm of 12288 bytes", "shm of 2048 bytes", "shm is a pipe",
        "own vector is a regular file", "65 vectors for one peer", "two fds on one message")},
    "closed mid-greeting": messages(*CLOSED_EARLY["closed after the shm"][0], then_close=True),
    "silent": silent,
}
COMMANDS = (["peers"], ["peers", "--json"], ["wait", "--timeout", "30"], ["notify", "0", "0"])


@pytest.mark.parametrize("case", CLI_CASES)
def test_the_cli_ends_in_one_error_line_without_a_traceback(serve, case):
    path = serve(CLI_CASES[case])
    runs = [subprocess.Popen([*SHMGUARD, *command, "--socket", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for command in COMMANDS]  # in parallel: the silent case waits 5 s each
    for command, run in zip(COMMANDS, runs, strict=True):
        out, err = run.communicate(timeout=30)
        assert run.returncode != 0, (command, out, err)
        assert err.startswith("shmguard: error: ") and err.count("\n") == 1, (command, err)
        assert "Traceback" not in err and out == "", (command, out, err)
