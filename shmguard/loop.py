"""The one event loop: an epoll loop of fd callbacks. No threads, no timers that poll.

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


class EventLoop:
    """Calls a callback when its fd is readable or writable, and deadlines (for timeouts, never polling)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._registered: dict[int, int] = {}  # fd -> the epoll events it is registered for
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._deadlines: list[tuple[float, int, Callback]] = []
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

    def call_at(self, when: float, callback: Callback) -> None:
        """Run callback once at time.monotonic() >= when."""
        if not math.isfinite(when):
            raise ValueError(f"deadline {when!r} is not a finite time")  # a NaN at the heap's top spins the loop
        heapq.heappush(self._deadlines, (when, next(self._order), callback))

    def call_later(self, delay: float, callback: Callback) -> None:
        self.call_at(time.monotonic() + delay, callback)

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
        if self._deadlines:
            wait = max(0.0, self._deadlines[0][0] - time.monotonic())
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
        while self._deadlines and self._deadlines[0][0] <= now:
            self._call(heapq.heappop(self._deadlines)[2])

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
