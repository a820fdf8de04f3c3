"""The region's contents: its size, holes and pre-allocation, repairs from the known-good copy (known_good.py),
and the periodic scan.

Some tampers make no event at all (a hole punched through a memfd's own file description, a write through a
mapping), so besides answering events the scan looks at the allocation on a deadline (docs/protocol.md §4).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable

from ..linux.inodes import free_past_eof
from ..linux.opener_witness import Opener
from ..policy import GuardPolicy
from ..region import pwrite_all
from .entries import FollowUp, Target, region_state
from .incidents import Incidents, Responded
from .known_good import PAGE, Allocation, KnownGood, first_hole, next_extent  # noqa: F401 - PAGE: its unit
from .restore import RestorePlan, write_back

TAMPER_WINDOW_NS = 1_000_000_000  # after a resize or hole, writes until the writer's close are undone too
HOLE_SEEK_BYTES = 64 << 20  # bytes a scan looks through for holes (SEEK_HOLE costs about 10 us per MiB)
REFRESH_INTERVAL_NS = 50_000_000  # at most one read of the whole region per interval for the known-good copy
# Incidents that mean the region's contents cannot be trusted: no known-good copy is taken while one is unresolved.
PAGE_LOOKS = 32  # a write touching up to this many pages is checked for holes page by page (SEEK_DATA each)
CONTENT_KINDS = frozenset({"shrink", "grow", "hole", "preallocation", "contents"})
SIZE_KINDS = frozenset({"shrink", "grow"})


def allocate(fd: int, size: int) -> None:
    """Back every page, so that a punched hole or a truncate-and-regrow shows as fewer st_blocks."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


def fill_holes(fd: int, size: int, contents: bytes | bytearray | memoryview) -> None:
    """Write the contents into every hole (they read as zeros), so that from now on a hole means a tamper."""
    view, offset = memoryview(contents), 0
    while (hole := first_hole(fd, size, offset)) < size:
        try:
            end = min(os.lseek(fd, hole, os.SEEK_DATA), size)
        except OSError:
            end = size  # ENXIO: no data after the hole
        pwrite_all(fd, view[hole:end], hole)
        offset = end


def prepare_allocation(fd: int, size: int, contents: bytes | bytearray, is_file: bool) -> int:
    """Every page of the region allocated and written, none past its end; returns the st_blocks of that state."""
    allocate(fd, size)
    if is_file:
        free_past_eof(fd, size)  # a pre-allocation made before we started would hide the first hole
    fill_holes(fd, size, contents)
    return os.fstat(fd).st_blocks


class Contents:
    """Size, holes, pre-allocation and opens of the region; the known-good copy a repair puts back."""

    def __init__(self, target: Target, responses: GuardPolicy, loop, incidents: Incidents, follow_up: FollowUp,
                 check: Callable[[], None]):
        self.target, self.responses, self.loop, self.incidents = target, responses, loop, incidents
        self.follow_up = follow_up  # a look at everything, at once (a refresh that finds the region not intact)
        self._check_everything = check
        self.known_good = KnownGood(target.region.snapshot())
        self.plan = RestorePlan()  # what a repair after a truncation writes, made before the loop waits (plan_ahead)
        self.full_blocks = 0
        self.tampered_until_ns = 0  # until then (or a close), writes continue a tampering and are undone
        self.closed = False
        self._scan_s = responses.scan_ms / 1000
        self._scan_damage: Allocation | None = None  # damage the last scan left unresolved (alerted, failed)
        self._scans = 0
        self._hole_stride = -(-target.size // HOLE_SEEK_BYTES)  # every scan fstats; every this many, SEEK_HOLE too
        self._last_refresh_ns = 0
        self._refresh_scheduled = False
        self._resized: tuple[os.stat_result, Responded] | None = None  # put back at once, for the check to report

    @property
    def intact(self) -> Allocation:
        return Allocation(self.target.size, self.full_blocks, self.target.size)

    def start(self) -> None:
        self.full_blocks = prepare_allocation(self.target.fd, self.target.size, self.known_good.data,
                                              self.target.is_file)

    def start_scans(self) -> None:
        self.loop.call_later(self._scan_s, self._scan)

    def needs_check(self, start: int = 0, end: int | None = None) -> bool:
        """Is the allocation other than whole where a write of bytes start..end lands (a hole the write would fill
        again, and so hide)? One fstat for all of it (a punch anywhere lowers st_blocks, a resize changes the
        size); for a page allocated but never written (st_blocks whole) only the pages the write touches are
        looked at: SEEK_DATA on each of a few, one SEEK_HOLE from the first of many (it walks to the first hole,
        about 10 us per MiB). A hole elsewhere is not hidden by this write; the scan finds it."""
        fd, size = self.target.fd, self.target.size
        end = size if end is None else min(end, size)
        st = os.fstat(fd)
        if st.st_size != size or st.st_blocks != self.full_blocks:
            return True
        first = start - start % PAGE
        if end - first <= PAGE_LOOKS * PAGE:
            return any(next_extent(fd, page, os.SEEK_DATA, size) != page for page in range(first, end, PAGE))
        return first_hole(fd, size, first) < end

    def refresh(self, area: tuple[int, int] | None = None) -> bool:
        """The supervisor's hook after its guest reported (it wrote through its mapping, which makes no inotify
        event): take the region as it is now, if it is intact, as the copy a repair puts back. area (start, end):
        only those bytes (an ack rewrites only the guest's reply area), read at once, outside a tampering's window.

        A refresh reads the whole region, so there is at most one per REFRESH_INTERVAL_NS: one asked for sooner
        is done once, at the end of the interval (a flood of acknowledgements or of in-place writes costs one
        read per interval, not one per event). None is done while a tampering may still be writing (the second
        after a resize or a hole, until the writer closes): its bytes must not become the copy. Returns True if
        the copy was taken now."""
        if self.incidents.unresolved(CONTENT_KINDS):
            return False  # an alerted or failed resize or hole stands: the region is not the known-good copy
        now = time.monotonic_ns()
        if area is not None and now >= self.tampered_until_ns:
            if self.known_good.refresh_range(self.target.fd, *area, self.full_blocks):
                self.copy_changed()
                return True
            self.follow_up.schedule()
            return False
        due = max(self._last_refresh_ns + REFRESH_INTERVAL_NS, self.tampered_until_ns)
        if now < due:
            if not self._refresh_scheduled:
                self._refresh_scheduled = True
                self.loop.call_at(due / 1e9, self._deferred_refresh)
            return False
        self._last_refresh_ns = now
        if self.known_good.refresh(self.target.fd, self.target.size, self.full_blocks):
            self.copy_changed()
            return True
        self.follow_up.schedule()  # not intact (a hole that made no event, say): look, and repair, at once
        return False

    def _deferred_refresh(self) -> None:
        self._refresh_scheduled = False
        if not self.closed:
            self.refresh()

    def _scan(self) -> None:
        """The periodic look at the region's allocation: a hole punched through a memfd's own file description
        makes no fsnotify event at all (docs/protocol.md §4), so only looking finds it. One fstat each time (a
        punch lowers st_blocks), and a SEEK_HOLE for a page allocated but never written (st_blocks whole, contents
        zeros) every scan for a region up to 64 MiB, every size/64 MiB scans for a larger one."""
        if self.closed:
            return
        self.loop.call_later(self._scan_s, self._scan)  # first: a failure below must not end the scans
        self._scans += 1
        fd, size = self.target.fd, self.target.size
        state = Allocation.of(fd, size, holes=self._scans % self._hole_stride == 0)
        if state == self.intact:
            self._scan_damage = None
        elif state != self._scan_damage:  # new damage; damage already responded to is recorded once
            self.incidents.by_scan = True
            try:
                self._check_everything()
            finally:
                self.incidents.by_scan = False
            after = Allocation.of(fd, size)
            self._scan_damage = None if after == self.intact else after

    # --- the checks --------------------------------------------------------------------------------------

    def may_restore_size(self) -> bool:
        """May a wrong size be put back first thing on a wake (restore.FirstLook)? Only where the policy repairs
        resizes, not after close, not while a resize put back first waits for its check to record it, and not while
        a failed repair of one stands (the check retries that)."""
        return (not self.closed and self._resized is None and self.responses.on_resize == "repair"
                and not self.incidents.unresolved(SIZE_KINDS))

    def resized_first(self, st: os.stat_result, responded: Responded) -> None:
        """restore.FirstLook put size and contents back (or failed to): the check that follows records it, names
        the offender and completes the allocation. st: what the look found."""
        self._resized = (st, responded)
        self.tampered_until_ns = responded.detected_ns + TAMPER_WINDOW_NS

    def copy_changed(self) -> None:
        """The known-good copy changed (an audited write, a refresh): the restore plan is made again before the loop
        waits."""
        self.plan.stale = True

    def plan_ahead(self) -> None:
        """The loop's hook before it waits: the restore plan made now if the copy changed, so that a repair never
        makes it (RestorePlan)."""
        if not self.closed and (self.plan.stale or self.plan.source is not self.known_good):
            self.plan.make(self.known_good)

    def check(self, modified: bool, closed: bool) -> None:
        fd, size, path = self.target.fd, self.target.size, self.target.path
        resized, self._resized = self._resized, None
        if resized is not None:  # size and contents were put back first thing: record it, complete the allocation
            self._report_resize(*resized)
        st = os.fstat(fd)
        content_response = "alert" if self.responses.on_resize == "alert" else "repair"
        if st.st_size != size:
            self._report_resize(st)
        elif resized is not None:
            pass  # the allocation was completed with the incident, as after a resize found by this check
        elif self._check_allocation(st, content_response):
            self.tampered_until_ns = time.monotonic_ns() + TAMPER_WINDOW_NS
        elif modified and time.monotonic_ns() < self.tampered_until_ns:
            # `echo hello >` truncates, then writes: a write landing after our repair belongs to the tampering.
            if not self.known_good.matches(fd, size):
                self.incidents.report("contents", path, {"region": region_state(st)}, content_response,
                                      self._restore_contents, self._complete_allocation)
        elif modified:
            self.refresh()  # an in-place write (a member's `dd conv=notrunc`) survives repairs
        if closed:
            self.tampered_until_ns = 0  # the writer is done: its next write is an in-place write again

    def _report_resize(self, st: os.stat_result, responded: Responded | None = None) -> None:
        kind = "shrink" if st.st_size < self.target.size else "grow"
        self.incidents.report(kind, self.target.path, {"region": region_state(st)}, self.responses.on_resize,
                              self._restore_size_and_contents, self._complete_allocation, responded)
        self.tampered_until_ns = time.monotonic_ns() + TAMPER_WINDOW_NS

    def _check_allocation(self, st: os.stat_result, response: str) -> bool:
        """Pages past the end (fallocate KEEP_SIZE, which would hide a hole from st_blocks) and holes inside
        (a punch, a truncate-and-regrow between two looks, a page allocated but never written). True if found."""
        fd, size, path = self.target.fd, self.target.size, self.target.path
        found = False
        if st.st_blocks > self.full_blocks:
            self.incidents.report("preallocation", path, {"region": region_state(st), "full_blocks": self.full_blocks},
                                  response, self._free_past_eof)
            st, found = os.fstat(fd), True
        hole = first_hole(fd, size)
        if st.st_blocks < self.full_blocks or hole < size:
            self.incidents.report("hole", path, {"region": region_state(st), "full_blocks": self.full_blocks,
                                                 "first_hole": hole}, response, self._restore_contents,
                                  self._complete_allocation)
            found = True
        return found

    def _free_past_eof(self) -> dict:
        free_past_eof(self.target.fd, self.target.size)
        return {"region": region_state(os.fstat(self.target.fd))}

    def _restore_size_and_contents(self) -> dict:
        """After a resize: the size back (no fstat first: the size was seen wrong, and an ftruncate to the right
        size is right whatever happened since), then the contents (_restore_contents). With nothing allocated
        after the ftruncate (a truncation to 0: all of it reads as zeros) only the copy's non-zero pages are
        written (the restore plan), known from one fstat: put_back's SEEK_DATA would fail with ENXIO, which costs
        20 us cold. (A resize seen first thing on a wake is put back by restore.FirstLook instead.)"""
        fd = self.target.fd
        os.ftruncate(fd, self.target.size)
        write_back(fd, self.known_good, self.plan, allocated=os.fstat(fd).st_blocks != 0)
        return {}

    def _restore_contents(self) -> dict:
        """Contents back, and nothing else: the pages a truncation or a punch left as holes already read as zeros,
        so only the copy's non-zero pages (and whatever holds data) are written. _complete_allocation follows,
        once the incident has its time."""
        fd = self.target.fd
        if os.fstat(fd).st_size != self.target.size:
            os.ftruncate(fd, self.target.size)
        self.known_good.put_back(fd)
        return {}

    def _complete_allocation(self) -> dict:
        """After a repair: the holes it left (zeros, as the copy) written too, so that every page is allocated and
        written again and from now on a hole means a tamper."""
        fd = self.target.fd
        fill_holes(fd, self.target.size, self.known_good.view)
        return {"region": region_state(os.fstat(fd))}

    def check_opened(self, opened: bool, openers_held: bool) -> None:
        # Only the memfd is watched for opens: nobody but the supervisor ever opens it. inotify cannot tell the
        # supervisor's own opens (the descriptions it hands to peers) from others': while the opener witness runs,
        # it reports every other opener instead (opened_by), and this event is left to it.
        if opened and not openers_held:
            self.incidents.report("region-opened", self.target.path, {"region": region_state(os.fstat(self.target.fd))},
                                  self.responses.on_resize, None)

    def opened_by(self, opener: Opener) -> None:
        """Another process opened the memfd (the witness held it and read who): an incident, named."""
        if self.closed:
            return
        self.incidents.detected_now()
        self.incidents.report("region-opened", self.target.path, {"region": region_state(os.fstat(self.target.fd)),
                                                                  "opener": opener.pid}, self.responses.on_resize, None)
