"""Eventfd doorbells that never block their caller, whatever another holder did to the description.

An eventfd passed over SCM_RIGHTS is one open file description shared by every holder, and an eventfd
cannot be re-opened to get a private one: any holder may clear O_NONBLOCK on it (docs/protocol.md §4). Then
read() sleeps while the counter is 0 and write() sleeps while the counter is full. So a read here is a
preadv2(RWF_NOWAIT), which the kernel answers at once whatever the flags, and a write puts O_NONBLOCK
back and is bounded by a one-shot timer for the race in which a holder clears it again in between.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading

MAX_COUNT = 0xFFFF_FFFF_FFFF_FFFE  # the largest value an eventfd counter holds
WRITE_BOUND_SECONDS = 0.002  # the longest a ring may ever take, if a holder races us to make it block
_ONE = (1).to_bytes(8, "little")


class _Stuck(Exception):
    """Raised by the timer's signal handler to break a write that the kernel put to sleep."""


_armed = False
_handler_installed = False


def _on_alarm(signum, frame) -> None:
    if _armed:
        raise _Stuck


def drain(fd: int) -> int | None:
    """Read and reset the counter; None if it was 0. Never sleeps (RWF_NOWAIT)."""
    buffer = bytearray(8)
    try:
        os.preadv(fd, [buffer], -1, os.RWF_NOWAIT)
    except BlockingIOError:
        return None
    return int.from_bytes(buffer, "little")


def ring(fd: int) -> bool:
    """Add 1 to the counter; False if it was full (its owner has a ring pending either way: rings coalesce)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & os.O_NONBLOCK:  # a holder made the shared description blocking: the protocol says it is not
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    if threading.current_thread() is not threading.main_thread():
        return _write_once(fd)  # signals reach only the main thread: a thread relies on the flag alone
    return _bounded_write(fd)


def _write_once(fd: int) -> bool:
    try:
        os.write(fd, _ONE)
    except BlockingIOError:
        return False
    return True


def _bounded_write(fd: int) -> bool:
    global _armed, _handler_installed
    if not _handler_installed:
        signal.signal(signal.SIGALRM, _on_alarm)
        _handler_installed = True
    try:
        _armed = True
        signal.setitimer(signal.ITIMER_REAL, WRITE_BOUND_SECONDS)
        return _write_once(fd)
    except _Stuck:
        return False  # the counter was full and the description blocking: the owner is rung already
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _armed = False
