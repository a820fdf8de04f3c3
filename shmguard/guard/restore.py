"""The repair that goes first: a region of the wrong size gets its size and contents back before the guard does
anything else on a wake by its watches.

The time from an attacker's truncation to the region whole again is spent mostly between the wake and the first
write back, in Python running right after the truncation emptied the CPU's caches (and on this class of VM, after an
idle CPU's wake): every line there costs several times what it costs warm. So that path is kept to the fewest
instructions and system calls there can be, and everything else comes after the repair:

- What a repair after a truncation writes is planned ahead, when the known-good copy changes (RestorePlan, made
  before the loop waits again), never at repair time: the copy's runs of pages that may hold anything but NULs, each
  a memoryview ready to write. A truncation leaves holes, which read as NULs; only those runs need writing.
- On a wake by inotify (FirstLook.on_inotify) the queued events are read into a buffer made ahead, then one fstat;
  a region of the right size costs nothing more. Reading the events first is what lets one fstat do: a write that
  lands after it is an event of the next batch, which the check that follows undoes (Contents.check, in the
  tampering's window); a write before it is seen by the fstat (blocks allocated: put_back, not the plan).
- On a wake by fanotify (FirstLook.on_fanotify), which is often ready before inotify has the same change queued:
  one lseek to the end gives the size (no stat result to build); only a wrong size costs the fstat and the repair.
  The inotify events stay queued for the next batch (a read finding none would cost an exception, 25 us cold).
- The repair: ftruncate to the size, then the plan's writes (nothing allocated since the truncation) or the copy's
  put_back (pages hold data, as after a truncation to half or a growth). Then the clock; the incident, its offender
  and the completion of the allocation are the check's, after (Contents.check reports what is left in _resized).
"""

from __future__ import annotations

import os
import time

from ..errors import ShmguardError
from .incidents import Responded
from .known_good import KnownGood


class RestorePlan:
    """The writes a repair makes where the region has no data: (offset, memoryview of the copy) for each run of the
    copy's marked pages. The views follow the copy's bytes (it never changes size); only its page map decides the
    runs, so the plan is made again when the copy changes (stale), before the loop waits (Contents.plan_ahead)."""

    __slots__ = ("source", "stale", "writes")

    def __init__(self) -> None:
        self.source: KnownGood | None = None
        self.stale = True
        self.writes: tuple[tuple[int, memoryview], ...] = ()

    def make(self, known_good: KnownGood) -> tuple[tuple[int, memoryview], ...]:
        view = known_good.view
        self.writes = tuple((start, view[start:stop]) for start, stop in known_good.nonzero_runs())
        self.source, self.stale = known_good, False
        return self.writes

    def for_copy(self, known_good: KnownGood) -> tuple[tuple[int, memoryview], ...]:
        """The plan for this copy: the one made ahead, or (the copy changed in this very turn) made now."""
        if self.stale or self.source is not known_good:
            return self.make(known_good)
        return self.writes


class FirstLook:
    """The guard's first step on every wake by its watches (see the module's docstring); contents: the Contents it
    repairs for (its target, known-good copy, plan, the state the check reads), take: the watches' event buffer."""

    __slots__ = ("contents", "fd", "size", "inotify_fd", "buffers", "keep")

    def __init__(self, contents, inotify_fd: int, buffers: list[memoryview], keep) -> None:
        """buffers: [a memoryview to read the inotify events into]; keep(n): the first n bytes of it are events
        taken (Watches.keep)."""
        self.contents = contents
        self.fd, self.size = contents.target.fd, contents.target.size
        self.inotify_fd, self.buffers, self.keep = inotify_fd, buffers, keep

    def on_inotify(self) -> bool:
        """The inotify fd is ready: take its events (always: the dispatch that follows handles them), one fstat,
        and if the size is wrong the repair. True if it repaired (the check that follows records it)."""
        detected_ns = time.monotonic_ns()
        try:
            taken = os.readv(self.inotify_fd, self.buffers)
        except BlockingIOError:
            taken = 0
        try:
            st = os.fstat(self.fd)
        except OSError:
            self.keep(taken)
            raise
        if st.st_size == self.size or not self.contents.may_restore_size():
            self.keep(taken)
            return False
        return self._repair(detected_ns, st, taken)

    def on_fanotify(self) -> bool:
        """fanotify is ready (it may be before inotify, whose events of the same change may not be queued yet): one
        lseek for the size; only if it is wrong the fstat and the repair. The inotify events are left queued: the
        check the caller runs for the repair has none of them, and they (the truncation's, the repair's own, a
        write landing after it) are the next batch, whose check undoes such a write. True if it repaired."""
        detected_ns = time.monotonic_ns()
        if os.lseek(self.fd, 0, os.SEEK_END) == self.size or not self.contents.may_restore_size():
            return False
        st = os.fstat(self.fd)
        if st.st_size == self.size:  # put back in between (by whom, the check says)
            return False
        return self._repair(detected_ns, st, 0)

    def _repair(self, detected_ns: int, st: os.stat_result, taken: int) -> bool:
        contents, fd = self.contents, self.fd
        known_good = contents.known_good
        try:
            os.ftruncate(fd, self.size)
            if st.st_blocks == 0:  # nothing allocated: all of it reads as NULs but for what the plan writes
                for offset, data in contents.plan.for_copy(known_good):
                    written = os.pwrite(fd, data, offset)
                    while written < len(data):
                        written += os.pwrite(fd, data[written:], offset + written)
            else:
                known_good.put_back(fd)
            result, after = "repaired", {}
        except (OSError, ShmguardError) as exc:
            result, after = "failed", {"error": str(exc)}
        done_ns = time.monotonic_ns()
        self.keep(taken)
        contents.resized_first(st, Responded(result, after, detected_ns, done_ns))
        return True
