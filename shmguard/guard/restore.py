"""The repair that goes first: a region of the wrong size gets its size and contents back before the guard does
anything else on a wake by its watches.

The time from an attacker's truncation to the region whole again is spent mostly between the wake and the first
write back, in Python running right after the truncation emptied the CPU's caches (and on this class of VM, after an
idle CPU's wake): every line there costs several times what it costs warm. So that path is kept to the fewest
instructions and system calls there can be, and everything else comes after the repair:

- What a repair after a truncation writes is planned ahead, when the known-good copy changes (RestorePlan, made
  before the loop waits again), never at repair time: the copy's runs of pages that may hold anything but NULs, each
  a memoryview ready to write. A truncation leaves holes, which read as NULs; only those runs need writing.
- On every wake by the watches (inotify's or fanotify's fd, whichever the loop takes first), one fstat and nothing
  else (FirstLook.look); a region of the right size costs nothing more.
- A wrong size is put back before the watches' events are read: they (the truncation's, the repair's own, and any
  write landing after the fstat) stay queued and are the next batch, whose check finds a write that landed after
  the fstat and undoes it (Contents.check, in the tampering's window). A write that landed before the fstat is seen
  by it: pages are allocated, so the whole copy is put back over them (put_back), not only the plan's pages. The
  check that records the repair, run at once, has no events of its own. (Reading them after the fstat would put a
  write landing between the two into the batch the repair answers, whose contents are not looked at again; reading
  them before it costs a read, and on a fanotify wake inotify often has nothing queued yet: a read that raises,
  25 us cold.)
- The repair: ftruncate to the size, then the plan's writes (nothing allocated since the truncation) or the copy's
  put_back (pages hold data, as after a truncation to half or a growth). Then the clock; the incident, its offender
  and the completion of the allocation are the check's, after (Contents.check reports what is left in _resized).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from ..errors import ShmguardError
from ..region import pwrite_all
from .incidents import Responded
from .known_good import KnownGood

PLAN_RUNS = 64  # runs of non-zero pages a plan holds ready; a copy with more is written from its page map


class RestorePlan:
    """The writes a repair makes where the region has no data: (offset, memoryview of the copy) for each run of the
    copy's marked pages. The views follow the copy's bytes (it never changes size); only its page map decides the
    runs, so the plan is made again when the copy changes (stale), before the loop waits (Contents.plan_ahead).

    Making it costs at most PLAN_RUNS views (and a scan of the page map in C): a peer can make the region's
    non-zero pages as scattered as it likes, and a copy changed by every acknowledgement must not cost a view per
    run each time. For a copy of more runs the plan is None, and a repair walks the page map then (its thousands of
    writes cost far more than that walk)."""

    __slots__ = ("source", "stale", "writes")

    def __init__(self) -> None:
        self.source: KnownGood | None = None
        self.stale = True
        self.writes: tuple[tuple[int, memoryview], ...] | None = ()

    def make(self, known_good: KnownGood) -> None:
        view, writes = known_good.view, []
        self.writes = None
        for start, stop in known_good.nonzero_runs():
            if len(writes) == PLAN_RUNS:
                break
            writes.append((start, view[start:stop]))
        else:
            self.writes = tuple(writes)
        self.source, self.stale = known_good, False

    def for_copy(self, known_good: KnownGood) -> Iterable[tuple[int, memoryview]]:
        """The plan for this copy: the one made ahead, or (the copy changed in this very turn) made now; for a copy
        of more than PLAN_RUNS runs, its runs from the page map."""
        if self.stale or self.source is not known_good:
            self.make(known_good)
        if self.writes is not None:
            return self.writes
        view = known_good.view
        return ((start, view[start:stop]) for start, stop in known_good.nonzero_runs())


def write_back(fd: int, known_good: KnownGood, plan: RestorePlan, allocated: bool) -> None:
    """The contents back after the size: with nothing allocated (a truncation to 0: all of it reads as NULs) only
    the plan's writes; where pages hold data (a truncation to half, a growth), the whole copy (put_back)."""
    if allocated:
        known_good.put_back(fd)
        return
    for offset, data in plan.for_copy(known_good):
        pwrite_all(fd, data, offset)


class FirstLook:
    """The guard's first step on every wake by its watches, inotify's or fanotify's (see the module's docstring):
    contents is the Contents it repairs for (its target, known-good copy and plan, the state the check reads)."""

    __slots__ = ("contents", "fd", "size")

    def __init__(self, contents) -> None:
        self.contents = contents
        self.fd, self.size = contents.target.fd, contents.target.size

    def look(self) -> bool:
        """One fstat; if the size is wrong (and the policy repairs it), size and contents back at once. True if it
        repaired: the caller then runs the check that records it, without reading the watches' events, which are a
        batch of their own after it (see the module's docstring)."""
        detected_ns = time.monotonic_ns()
        st = os.fstat(self.fd)
        if st.st_size == self.size or not self.contents.may_restore_size():
            return False
        contents, fd = self.contents, self.fd
        known_good = contents.known_good
        try:
            os.ftruncate(fd, self.size)
            write_back(fd, known_good, contents.plan, allocated=st.st_blocks != 0)
            result, after = "repaired", {}
        except (OSError, ShmguardError) as exc:
            result, after = "failed", {"error": str(exc)}
        contents.resized_first(st, Responded(result, after, detected_ns, time.monotonic_ns()))
        return True
