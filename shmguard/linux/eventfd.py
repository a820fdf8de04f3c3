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
WRITE_BOUND_SECONDS = 0.002  # the longest one attempt at a ring may take, if a holder races us to make it block
WRITE_ATTEMPTS = 3
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
    if threading.current_thread() is not threading.main_thread():
        _make_nonblocking(fd)
        return _write_once(fd)  # signals reach only the main thread: a thread relies on the flag alone
    return _bounded_write(fd)


def _make_nonblocking(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & os.O_NONBLOCK:  # a holder made the shared description blocking: the protocol says it is not
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


def _write_once(fd: int) -> bool:
    try:
        os.write(fd, _ONE)
    except BlockingIOError:
        return False
    return True


def _bounded_write(fd: int) -> bool:
    """The timer also fires when the process merely waited for a CPU past the bound before its write: then
    the ring was not made, so it is tried again (a ring made twice is one ring: they coalesce). Everything done
    while the handler is armed is inside the try, so a timer that fires late is caught there or finds the handler
    disarmed: it never escapes from a ring that worked."""
    global _armed, _handler_installed
    if not _handler_installed:
        signal.signal(signal.SIGALRM, _on_alarm)
        _handler_installed = True
    for _ in range(WRITE_ATTEMPTS):
        _make_nonblocking(fd)
        try:
            _armed = True
            signal.setitimer(signal.ITIMER_REAL, WRITE_BOUND_SECONDS)
            written = _write_once(fd)
            _armed = False  # from here on the timer finds the handler disarmed
            signal.setitimer(signal.ITIMER_REAL, 0)
            return written
        except _Stuck:  # asleep on a full counter of a blocking description, or the timer beat the write
            pass
        except BaseException:
            _disarm()
            raise
        _disarm()  # a one-shot timer that has fired: nothing more can arrive from it
    return False  # stuck every time: the counter is full and the description blocking; the owner is rung already


def _disarm() -> None:
    global _armed
    _armed = False
    signal.setitimer(signal.ITIMER_REAL, 0)
