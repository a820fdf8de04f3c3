"""Eventfd doorbells that never block their caller, whatever another holder did to the description.

An eventfd passed over SCM_RIGHTS is one open file description shared by every holder, and an eventfd
cannot be re-opened to get a private one: any holder may clear O_NONBLOCK on it (docs/protocol.md §4). Then
read() sleeps while the counter is 0 and write() sleeps while the counter is full. So a read here is a
preadv2(RWF_NOWAIT), which the kernel answers at once whatever the flags, and a write puts O_NONBLOCK
back and is bounded by a one-shot timer for the race in which a holder clears it again in between.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import threading

from . import libc

MAX_COUNT = 0xFFFF_FFFF_FFFF_FFFE  # the largest value an eventfd counter holds
WRITE_BOUND_SECONDS = 0.002  # the longest a ring may ever take, if a holder races us to make it block
_ONE = (1).to_bytes(8, "little")


_write = libc.function("write", [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t], ctypes.c_ssize_t)
_handler_installed = False


def _on_alarm(signum, frame) -> None:
    """Nothing: the signal is there to interrupt a write the kernel put to sleep (EINTR, not retried here)."""


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
    """write(2) through libc, which hands EINTR back instead of retrying it: the timer then ends only a write
    that sleeps (a full counter made blocking by a holder), and a timer that fires early, before the write,
    interrupts nothing. So a ring is never lost to a late write nor sent twice."""
    global _handler_installed
    if not _handler_installed:
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.siginterrupt(signal.SIGALRM, True)
        _handler_installed = True
    signal.setitimer(signal.ITIMER_REAL, WRITE_BOUND_SECONDS)
    try:
        written = _write(fd, _ONE, len(_ONE))
        error = ctypes.get_errno() if written < 0 else 0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if written == len(_ONE):
        return True
    if error in (errno.EAGAIN, errno.EINTR):
        return False  # the counter is full: its owner has a ring pending already (rings coalesce)
    raise OSError(error, os.strerror(error))
