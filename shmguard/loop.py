"""The one event loop: an epoll loop of fd callbacks and cancellable deadlines. No threads, no timers that poll.

epoll is used directly, not through selectors: the guard's repair of a truncated region runs right after the
kernel's truncation has emptied the CPU's caches, where every line of Python between epoll_wait and the repair
costs several times what it costs warm (measured: selectors' select 40 us against epoll.poll's 18 us).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import select
import time
from collections.abc import Callable

Callback = Callable[[], None]
WaitHook = Callable[[], "bool | None"]  # True: it has more to do at once, so the loop must not wait
log = logging.getLogger("shmguard")
_NOT_IN, _NOT_OUT = ~select.EPOLLIN, ~select.EPOLLOUT  # hang-up and error count as both (see run_once)


COMPACT_AFTER = 64  # cancelled deadlines the heap may hold before it is rebuilt (also at most half of it)


class Timer:
    """What call_at returns. cancel() drops the callback at once; its place in the heap goes when it comes up, or
    when cancelled ones are half the heap: a cancelled deadline never holds its callback, nor the heap long."""

    __slots__ = ("callback", "_loop")

    def __init__(self, callback: Callback, loop: EventLoop):
        self.callback: Callback | None = callback
        self._loop = loop

    def cancel(self) -> None:
        if self.callback is not None:  # not run, not cancelled yet
            self.callback = None
            self._loop._cancelled_one()


class EventLoop:
    """Calls a callback when its fd is readable or writable, and deadlines (for timeouts, never polling)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._registered: dict[int, int] = {}  # fd -> the epoll events it is registered for
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._deadlines: list[tuple[float, int, Timer]] = []
        self._cancelled = 0  # cancelled timers still in the heap
        self._order = itertools.count()
        self._running = False
        self._before_wait: list[WaitHook] = []
        self._first: set[int] = set()  # readers whose callbacks run before the others of a batch
        self._later = lambda item, first=self._first: item[0] not in first  # the sort key: made once, not per turn

    def add_reader(self, fd: int, callback: Callback, *, first: bool = False) -> None:
        """first: in a batch of ready fds, this one's callback runs before the others (the guard's watches: a
        truncated region is repaired before a control request, a join or a peer's message is served)."""
        self._readers[fd] = callback
        if first:
            self._first.add(fd)
        else:
            self._first.discard(fd)
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        self._readers.pop(fd, None)
        self._first.discard(fd)
        self._update(fd)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        self._writers.pop(fd, None)
        self._update(fd)

    def call_at(self, when: float, callback: Callback) -> Timer:
        """Run callback once at time.monotonic() >= when, unless the Timer returned is cancelled first."""
        if not math.isfinite(when):
            raise ValueError(f"deadline {when!r} is not a finite time")  # a NaN at the heap's top spins the loop
        timer = Timer(callback, self)
        heapq.heappush(self._deadlines, (when, next(self._order), timer))
        return timer

    def call_later(self, delay: float, callback: Callback) -> Timer:
        return self.call_at(time.monotonic() + delay, callback)

    def _cancelled_one(self) -> None:
        self._cancelled += 1
        if self._cancelled > COMPACT_AFTER and 2 * self._cancelled > len(self._deadlines):
            self._deadlines = [entry for entry in self._deadlines if entry[2].callback is not None]
            heapq.heapify(self._deadlines)
            self._cancelled = 0

    def before_wait(self, hook: WaitHook) -> None:
        """Run hook once per turn, before the loop waits again (and once more when it stops): the audit log's
        group commit, one fsync for everything recorded in the turn."""
        self._before_wait.append(hook)

    def _update(self, fd: int) -> None:
        events = (select.EPOLLIN if fd in self._readers else 0) | (select.EPOLLOUT if fd in self._writers else 0)
        registered = self._registered.get(fd)
        if events and registered is not None:
            if events != registered:
                self._epoll.modify(fd, events)
                self._registered[fd] = events
        elif events:
            self._epoll.register(fd, events)
            self._registered[fd] = events
        elif registered is not None:
            del self._registered[fd]
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass  # closed already, and so gone from the epoll set

    def stop(self) -> None:
        self._running = False

    def run(self) -> None:
        self._running = True
        while self._running:
            self.run_once()
        self._run_before_wait()  # what the last turn held for its hooks still goes out

    def run_once(self, timeout: float | None = None) -> None:
        """Wait for one batch of events (or the next deadline) and dispatch it."""
        if self._run_before_wait():
            timeout = 0.0
        deadlines = self._deadlines
        while deadlines and deadlines[0][2].callback is None:  # cancelled: never a wake of its own
            heapq.heappop(deadlines)
            self._cancelled -= 1
        if deadlines:
            wait = max(0.0, deadlines[0][0] - time.monotonic())
            timeout = wait if timeout is None else min(timeout, wait)
        ready = self._epoll.poll(-1 if timeout is None else timeout)
        if len(ready) > 1 and self._first:
            ready.sort(key=self._later)  # stable: the rest in the kernel's order
        readers, writers = self._readers, self._writers
        for fd, events in ready:
            # A callback may close and unregister another fd of this batch: look up each one afresh. Hang-up and
            # error count as both readable and writable (as selectors has it): the callback's read or write says.
            # The call is inline, not through _call: the guard's first reader runs right after the wait, where
            # every frame costs (see the module's docstring).
            if events & _NOT_IN and fd in writers:
                self._call(writers[fd])
            if events & _NOT_OUT and fd in readers:
                try:
                    readers[fd]()
                except Exception:  # noqa: BLE001 - as _call
                    log.exception("internal error in an event handler (still serving)")
        now = time.monotonic()
        deadlines = self._deadlines  # afresh: a callback of the batch may have compacted the heap
        while deadlines and deadlines[0][0] <= now:
            timer = heapq.heappop(deadlines)[2]
            callback, timer.callback = timer.callback, None  # run once: a cancel() from now on is nothing
            if callback is None:
                self._cancelled -= 1
            else:
                self._call(callback)
            deadlines = self._deadlines  # a callback may have cancelled enough to compact it

    def _run_before_wait(self) -> bool:
        more = False
        for hook in self._before_wait:
            try:
                more = bool(hook()) or more
            except Exception:  # noqa: BLE001 - as _call: report, keep serving
                log.exception("internal error in a before-wait hook (still serving)")
        return more

    @staticmethod
    def _call(callback: Callback) -> None:
        """One failing callback is a bug to report, not a reason to stop serving everyone else."""
        try:
            callback()
        except Exception:  # noqa: BLE001 - the safety net of a supervisor that must not die from outside
            log.exception("internal error in an event handler (still serving)")

    def close(self) -> None:
        self._epoll.close()
