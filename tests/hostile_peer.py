"""A peer that turns what it was given against the supervisor, run as its own process (and uid) by the tests.

    python hostile_peer.py SOCKET ACTION [CONTROL]   (or main() in a forked child) says "ready <own id>" on fd 1 once it
                                           has done ACTION, then holds on until fd 0 closes (its fds, and
                                           their flags, stay alive)

ACTION: append      O_APPEND on its region fd (shared with the supervisor's, if the server dups it)
        block-own   O_NONBLOCK cleared on its own eventfds and their counters filled to the maximum
        drain-host  O_NONBLOCK cleared on the host's eventfds, then ring and drain them until the supervisor
                    stops answering `status` on CONTROL (a read that caught a drained counter sleeps), then
                    never rings again, so such a read would sleep for ever
        hog         joins again and again, holding every connection, until refused; prints "ready <joins>"
        churn       joins and leaves again and again until refused; prints "ready <joins>"
"""

from __future__ import annotations

import fcntl
import os
import select
import sys

from shmguard.client import IvshmemClient
from shmguard.control import ControlClient, StatusRequest
from shmguard.errors import ControlError, ProtocolError
from shmguard.linux.eventfd import MAX_COUNT, drain


def make_blocking(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)


def stdin_closed(timeout: float | None) -> bool:
    """fd 0 and 1, not sys.stdin/stdout: a forked test child has them as pipes while pytest holds sys.stdout."""
    return bool(select.select([0], [], [], timeout)[0]) and not os.read(0, 1)


def say(line: str) -> None:
    os.write(1, f"{line}\n".encode())


def joins_until_refused(socket_path: str, hold: bool, limit: int = 1000) -> tuple[int, list[IvshmemClient]]:
    held = []
    for count in range(limit):
        try:
            client = IvshmemClient(socket_path, timeout=10).connect()
        except ProtocolError as exc:
            if "refused this peer" not in str(exc):
                raise
            return count, held
        if hold:
            held.append(client)
        else:
            client.close()
    return limit, held


def main(socket_path: str, action: str, control_path: str = "") -> None:
    if action in ("hog", "churn"):
        count, held = joins_until_refused(socket_path, hold=action == "hog")
        say(f"ready {count}")
        stdin_closed(None)
        for client in held:
            client.close()
        return
    client = IvshmemClient(socket_path, timeout=10).connect()
    host_id = min(client.peers)  # the supervisor's own peer joined first
    if action == "append":
        fcntl.fcntl(client.shm_fd, fcntl.F_SETFL, fcntl.fcntl(client.shm_fd, fcntl.F_GETFL) | os.O_APPEND)
    elif action == "block-own":
        for fd in client.own_vectors:
            make_blocking(fd)
            os.eventfd_write(fd, MAX_COUNT)
    elif action == "drain-host":
        for fd in client.peers[host_id]:
            make_blocking(fd)
        race_the_host_reads(client.peers[host_id], control_path)
    say(f"ready {client.own_id}")
    stdin_closed(None)
    client.close()


def race_the_host_reads(host_vectors: list[int], control_path: str, rounds: int = 200) -> None:
    for _ in range(rounds):
        for _ in range(200):
            for fd in host_vectors:
                os.eventfd_write(fd, 1)  # wakes the supervisor's epoll ...
                drain(fd)  # ... and empties the counter before it reads
        try:
            ControlClient(control_path, timeout=0.5).ask(StatusRequest())
        except ControlError:
            return  # it is asleep in a read: ring no more



if __name__ == "__main__":
    main(*sys.argv[1:4])
