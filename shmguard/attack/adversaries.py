"""The adversaries: a peer or member acting within what the policy admits. Each action runs in the child, which
stays alive holding what it took (fds, peer slots, control connections) while the battery judges (judges.py).
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable

from ..client import IvshmemClient
from ..errors import ShmguardError
from ..protocol import PROTOCOL_VERSION, recv_message
from .children import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    Done,
    Scene,
    errno_name,
    fallocate,
    kept,
    refusal_in_words,
)
from .supervisor_link import ANSWER_SECONDS

REFUSAL_NOTICE = -1  # the first word a refused peer receives: QEMU exits "server sent version -1, expecting 0"
EVENTFD_FULL = 0xFFFFFFFFFFFFFFFE  # the largest counter an eventfd holds: one more ring would block
PREALLOCATION = 1 << 20  # bytes allocated past the end (FALLOC_FL_KEEP_SIZE), so st_blocks never drops
ADVERSARY_SECONDS = 20.0  # an adversary that takes slots gives up after this, whatever the server does


def _as_peer(scene: Scene, act: Callable[[IvshmemClient], dict]) -> Done:
    """Join as a peer (a refusal is the result), then act on what the greeting handed over."""
    started = time.monotonic_ns()
    try:
        client = IvshmemClient(scene.socket, timeout=5.0).connect()
    except ShmguardError as exc:
        return Done(False, refusal_in_words(str(exc)), os.getpid(), time.monotonic_ns(), 0.0)
    kept.append(client)
    facts, error = {"peer": client.own_id}, None
    try:
        facts.update(act(client))
    except OSError as exc:
        error = errno_name(exc)
    returned = time.monotonic_ns()
    return Done(error is None, error, os.getpid(), returned, (returned - started) / 1e6, facts)


def drain_eventfd(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def peer_sets_append(scene: Scene) -> Done:
    def act(client: IvshmemClient) -> dict:
        fcntl.fcntl(client.shm_fd, fcntl.F_SETFL, fcntl.fcntl(client.shm_fd, fcntl.F_GETFL) | os.O_APPEND)
        return {}

    return _as_peer(scene, act)


def peer_blocks_eventfds(scene: Scene) -> Done:
    def act(client: IvshmemClient) -> dict:
        host = next(iter(client.peers))  # the supervisor's own peer joined first: the first id in the greeting
        for fd in client.peers[host]:
            drain_eventfd(fd)  # while it is still non-blocking
            os.set_blocking(fd, True)
        for fd in client.own_vectors:
            drain_eventfd(fd)
            os.eventfd_write(fd, EVENTFD_FULL)
            os.set_blocking(fd, True)
        return {"host": host}

    return _as_peer(scene, act)


def peer_punches_hole(scene: Scene, preallocate: bool) -> Done:
    def act(client: IvshmemClient) -> dict:
        if preallocate:  # pages past the end keep st_blocks up; a sealed memfd refuses them (EPERM)
            fallocate(client.shm_fd, FALLOC_FL_KEEP_SIZE, scene.size, PREALLOCATION)
        fallocate(client.shm_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, min(scene.size, 65536))
        return {}

    return _as_peer(scene, act)


def _raw_join(path: str) -> tuple[socket.socket, int | None]:
    """Connect to the ivshmem socket and read the first word (None: closed without one); fds are dropped."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(5.0)
        sock.connect(path)
        message = recv_message(sock, time.monotonic() + 5.0)
    except BaseException:
        sock.close()
        raise
    if message is None:
        return sock, None
    for fd in message[1]:
        os.close(fd)
    return sock, message[0]


def _closed_after(sock: socket.socket, seconds: float) -> bool:
    """Does EOF (and nothing else) follow within seconds?"""
    try:
        return recv_message(sock, time.monotonic() + seconds) is None
    except (OSError, TimeoutError):
        return False


def _discard_pending(sock: socket.socket) -> None:
    """Read what the server sent a held peer (announcements), closing the fds: it never reaches its bound."""
    while True:
        try:
            data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(64 * 4), socket.MSG_DONTWAIT)
        except OSError:
            return
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in struct.unpack(f"{len(payload) // 4}i", payload[:len(payload) - len(payload) % 4]):
                    os.close(fd)
        if not data:
            return


def take_peer_slots(scene: Scene) -> Done:
    """Join again and again, holding every peer slot it gets, until a join is refused; say how it was refused."""
    started, held, refusal, give_up = time.monotonic_ns(), [], None, time.monotonic() + ADVERSARY_SECONDS
    for _ in range(scene.peer_slots + 2):
        if time.monotonic() > give_up:
            refusal = {"error": f"still joining after {ADVERSARY_SECONDS:g} s"}
            break
        try:
            sock, first = _raw_join(scene.socket)
        except (OSError, TimeoutError) as exc:
            refusal = {"error": errno_name(exc) if isinstance(exc, OSError) else "timed out"}
            break
        if first == PROTOCOL_VERSION:
            sock.setblocking(False)  # a socket with a timeout would wait for data before each MSG_DONTWAIT read
            held.append(sock)
            for peer in held:
                _discard_pending(peer)
            continue
        refusal = {"first": first, "then_eof": first is not None and _closed_after(sock, ANSWER_SECONDS)}
        sock.close()
        break
    kept.extend(held)
    returned = time.monotonic_ns()
    facts = {"joined": len(held), "refusal": refusal}
    if held:
        error = None
    elif refusal and "error" in refusal:
        error = refusal["error"]
    else:
        error = "refused by the server" if refusal and refusal["first"] == REFUSAL_NOTICE else \
            f"closed by the server after {'no word' if not refusal or refusal['first'] is None else refusal['first']}"
    return Done(bool(held), error, os.getpid(), returned, (returned - started) / 1e6, facts)


def _unread_bytes(sock: socket.socket) -> int:
    """Bytes sent on a UNIX socket that the other end has not read yet (SIOCOUTQ)."""
    count = struct.pack("i", 0)
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, count))[0]


def _answered_or_closed(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def take_control_connections(scene: Scene) -> Done:
    """Open every control connection it can, each with a request begun and never finished, and hold them."""
    started, opened, give_up = time.monotonic_ns(), [], time.monotonic() + ADVERSARY_SECONDS
    for _ in range(scene.control_slots + 4):
        if time.monotonic() > give_up:
            break
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(5.0)
        try:
            sock.connect(scene.control)
            sock.send(b"{")
        except OSError as exc:
            sock.close()
            if not opened:
                return Done(False, errno_name(exc), os.getpid(), time.monotonic_ns(), 0.0)
            break
        opened.append(sock)
    deadline = time.monotonic() + ANSWER_SECONDS  # until the server has taken up or turned away every one
    while time.monotonic() < deadline and any(_unread_bytes(s) and not _answered_or_closed(s) for s in opened):
        time.sleep(0.01)
    turned_away = [s for s in opened if _answered_or_closed(s)]
    held = [s for s in opened if s not in turned_away and not _unread_bytes(s)]
    kept.extend(opened)
    threading.Thread(target=_keep_alive, args=(held,), daemon=True).start()
    returned = time.monotonic_ns()
    facts = {"opened": len(opened), "held": len(held), "turned_away": len(turned_away),
             "waiting": len(opened) - len(held) - len(turned_away)}
    return Done(True, None, os.getpid(), returned, (returned - started) / 1e6, facts)


def _keep_alive(held: list[socket.socket]) -> None:
    """A byte every few seconds: a connection that sends is never idle."""
    while True:
        time.sleep(2.0)
        for sock in held:
            try:
                sock.send(b" ")
            except OSError:
                pass
