"""Fair shares of the control socket (issue 9, class 3): a group member attacks a running supervisor.

The member's connections are made by the member's real uid (in a child dropped to it) and handed back to the
test over SCM_RIGHTS: SO_PEERCRED is fixed at connect time, so the supervisor counts them as the member's.
Requests go through shmguard.control (ControlClient, encode); the unfinished, dripped and padded lines are raw bytes
on purpose: no client would send them.
"""

from __future__ import annotations

import fcntl
import json
import socket
import struct
import termios
import threading
import time

import pytest

from helpers import MEMBER_USER, RunningSupervisor, as_user, policy_file, rss_kib
from shmguard.control import StatusRequest, encode

POLICIES = ("strict", "standard")
SIZE = 4096
MAX_REQUEST = SIZE * 2 + 65536  # the supervisor's bound on one request line for this region
STATUS = encode(StatusRequest())


def _connect_and_hand_back(path: str, count: int, back: socket.socket) -> None:
    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        sockets.append(sock)
    socket.send_fds(back, [b"s"], [sock.fileno() for sock in sockets])


def connect_as(user: str, path: str, count: int) -> list[socket.socket]:
    """`count` connections to path made by `user` (in order), now held by this process."""
    here, there = socket.socketpair()
    try:
        as_user(user, _connect_and_hand_back, path, count, there)
        _, fds, _, _ = socket.recv_fds(here, 1, count)
    finally:
        here.close()
        there.close()
    assert len(fds) == count
    return [socket.socket(fileno=fd) for fd in fds]


def ask(sock: socket.socket, line: bytes = STATUS, timeout: float = 10) -> dict | None:
    """Send one request line (if the supervisor still reads) and read one reply line; None at EOF."""
    sock.settimeout(timeout)
    try:
        sock.sendall(line)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused at once: its one error line is still waiting to be read
    return read_line(sock, timeout)


def read_line(sock: socket.socket, timeout: float = 10) -> dict | None:
    sock.settimeout(timeout)
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return json.loads(data) if data else None
        data += chunk
    return json.loads(data)


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True once the supervisor has closed sock (EOF after any error line)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 16):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def unread_by_peer(sock: socket.socket) -> int:
    """Bytes sent on sock that the other end has not read yet (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def wait_until(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def root_status(supervisor) -> dict:
    return supervisor.client(timeout=10).ask(StatusRequest())


def close_all(sockets) -> None:
    for sock in sockets:
        sock.close()


@pytest.fixture
def start(tmp_path):
    running = []

    def start(base: str, **shares) -> RunningSupervisor:
        supervisor = RunningSupervisor(policy_file(tmp_path, base=base, region={"size": SIZE}, shares=shares))
        running.append(supervisor)
        return supervisor

    yield start
    for supervisor in running:
        assert supervisor.stop() == 0, supervisor.log()
        assert "Traceback" not in supervisor.log(), supervisor.log()


# --- connections ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", POLICIES)
def test_a_member_gets_exactly_its_connection_share_and_root_still_connects(start, base):
    supervisor = start(base, connections_per_uid=2)
    held = connect_as(MEMBER_USER, supervisor.control, 3)
    replies = [ask(sock) for sock in held]
    assert [reply["ok"] for reply in replies] == [True, True, False], replies
    refusal = replies[2]["error"]
    assert "shares.connections_per_uid" in refusal and "2" in refusal, refusal
    assert closed_by_peer(held[2], 10)  # one error line, then closed
    assert root_status(supervisor)["ok"]  # root is not counted against the member's share
    assert all(ask(sock)["ok"] for sock in held[:2])  # the member's own two still work

    close_all(held)  # its share comes back once its connections are gone
    for _attempt in range(100):  # the supervisor may see the new connections before the old ones' EOF
        again = connect_as(MEMBER_USER, supervisor.control, 2)
        replies = [ask(sock) for sock in again]
        close_all(again)
        if all(reply and reply["ok"] for reply in replies):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the member's connection share never came back: {replies}")


@pytest.mark.parametrize("base", POLICIES)
def test_the_last_connections_are_kept_for_root(start, base):
    supervisor = start(base, connections=4, connections_per_uid=4, connections_reserved=2)
    member = connect_as(MEMBER_USER, supervisor.control, 3)
    replies = [ask(sock) for sock in member]
    assert [reply["ok"] for reply in replies] == [True, True, False], replies
    assert "shares.connections_reserved" in replies[2]["error"], replies[2]
    root = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    for sock in root:
        sock.connect(supervisor.control)
    assert all(ask(sock)["ok"] for sock in root)  # the reserve: root takes the last two the member could not
    extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    extra.connect(supervisor.control)
    reply = ask(extra)  # the total binds root too
    assert reply["ok"] is False and "shares.connections" in reply["error"], reply
    close_all([*member, *root, extra])


# --- no progress: closed on a deadline, whatever it sends --------------------------------------------------


@pytest.mark.parametrize("base", POLICIES)
def test_a_slow_drip_is_closed_after_request_seconds(start, base):
    supervisor = start(base, request_seconds=2)
    (drip,) = connect_as(MEMBER_USER, supervisor.control, 1)
    line = b'{"op": "status"' + b" " * 60 + b"}\n"
    reply, sent = None, 0
    for byte in line[:30]:  # a byte a second: the whole line would take more than a minute
        try:
            drip.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += 1
        drip.settimeout(1.0)
        try:
            data = drip.recv(1 << 16)
        except TimeoutError:
            continue
        reply = json.loads(data) if data else None
        break
    assert reply is not None and reply["ok"] is False, f"still open after {sent} bytes, one a second"
    assert "shares.request_seconds" in reply["error"], reply
    assert closed_by_peer(drip, 10)
    drip.close()
    assert root_status(supervisor)["ok"]


@pytest.mark.parametrize("base", POLICIES)
def test_pipelined_requests_never_read_keep_memory_bounded_and_it_comes_back(start, base):
    supervisor = start(base, connections_per_uid=4, request_seconds=2)
    pid = supervisor.proc.pid
    for _ in range(20):
        assert root_status(supervisor)["ok"]
    before = rss_kib(pid)
    flooders = connect_as(MEMBER_USER, supervisor.control, 4)
    outcome: dict[int, str] = {}

    def flood(index: int, sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(60)
        try:
            sock.sendall(STATUS * 100_000)  # 1.7 MB of requests in one send, and not one reply read
            outcome[index] = "all sent"
        except (BrokenPipeError, ConnectionResetError):
            outcome[index] = "closed by the supervisor"
        except TimeoutError:
            outcome[index] = "still open after 60 s"

    threads = [threading.Thread(target=flood, args=(i, sock)) for i, sock in enumerate(flooders)]
    for thread in threads:
        thread.start()
    peak = before
    while any(thread.is_alive() for thread in threads):
        peak = max(peak, rss_kib(pid))
        time.sleep(0.02)
    close_all(flooders)
    assert root_status(supervisor)["ok"]
    after = rss_kib(pid)
    # Bounded: 4 connections x (64 KiB read + 256 KiB of replies) and the objects around them, not the
    # 100,000 replies each flooder asked for (the unbounded dispatch grew by about 20 MiB here before it stalled).
    assert peak - before < 8 * 1024, (before, peak, after)
    assert after - before < 4 * 1024, (before, peak, after)
    assert outcome == dict.fromkeys(range(4), "closed by the supervisor"), outcome  # the replies were never read


# --- buffered bytes: a share per uid, backpressure, and refusal past it -------------------------------------


def _partial_request(length: int) -> bytes:
    head = b'{"op": "write", "data": "'
    return head + b"A" * (length - len(head))  # never finished: no closing quote, no newline


@pytest.mark.parametrize("base", POLICIES)
def test_partial_lines_past_the_members_buffer_share_are_refused_and_root_still_writes(start, base):
    share = 2 * MAX_REQUEST + 16384  # two requests of the largest size fit, a third does not
    supervisor = start(base, buffer_bytes="1M", buffer_bytes_per_uid=share, connections_per_uid=4,
                       request_seconds=10)
    held = connect_as(MEMBER_USER, supervisor.control, 3)
    for sock in held[:2]:
        sock.sendall(_partial_request(MAX_REQUEST))
        wait_until(lambda s=sock: unread_by_peer(s) == 0, "the supervisor read the partial request")
    try:
        held[2].sendall(_partial_request(MAX_REQUEST))
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused and closed before the rest was sent: the refusal waits unread in the socket all the same
    reply = read_line(held[2])
    assert reply is not None and reply["ok"] is False, reply
    assert "shares.buffer_bytes_per_uid" in reply["error"] and str(share) in reply["error"], reply
    assert closed_by_peer(held[2], 10)
    for sock in held[:2]:  # the member's first two are still open, holding their lines
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(1)

    result = supervisor.cli("write", "-m", "root still writes", "--policy", str(supervisor.policy_path))
    assert "wrote 17 bytes" in result.stdout
    writes = [r for r in supervisor.audit_records() if r["action"] == "write"]
    assert len(writes) == 1 and writes[0]["actor"]["uid"] == 0

    for sock in held[:2]:  # and their lines never finish: closed on the request deadline
        reply = read_line(sock, timeout=30)
        assert reply is not None and "shares.request_seconds" in reply["error"], reply
        assert closed_by_peer(sock, 10)
    close_all(held)
    assert root_status(supervisor)["ok"]


@pytest.mark.parametrize("base", POLICIES)
def test_one_line_longer_than_the_members_share_is_refused(start, base):
    supervisor = start(base, buffer_bytes_per_uid="32K")
    (sock,) = connect_as(MEMBER_USER, supervisor.control, 1)
    sock.settimeout(30)
    try:
        sock.sendall(_partial_request(40_000))  # under the 73 KiB a request may be, over the 32 KiB share
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply = read_line(sock)
    assert reply is not None and "shares.buffer_bytes_per_uid" in reply["error"] and "32768" in reply["error"], reply
    assert closed_by_peer(sock, 10)
    sock.close()
    assert root_status(supervisor)["ok"]  # and root may send a line that long: its bound is the total
    long_status = b'{"op": "status", "pad": "' + b"x" * 40_000 + b'"}\n'
    root = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    root.connect(supervisor.control)
    assert ask(root, long_status)["ok"]
    root.close()
