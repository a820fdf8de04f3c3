"""A resize is repaired first thing on a wake: before the guard reads its events, before anyone is named, before
any other reader of the loop's batch; the check that follows records it once and names the offender."""

from __future__ import annotations

import os
import select
import subprocess
import time

from helpers import policy_file
from shmguard.guard import Allocation, Guard
from shmguard.guard.restore import PLAN_RUNS
from shmguard.loop import EventLoop
from shmguard.policy import load_policy
from shmguard.region import Region

WAIT = 10.0  # a bound on waiting, never a timing assertion
MESSAGE = b"a message the guest has not read yet"


class Guarded:
    """A guard of a standard (file) region holding MESSAGE, alone in its own loop, recording into records."""

    def __init__(self, tmp_path, **guard):
        self.policy = load_policy(str(policy_file(tmp_path, "standard", **({"guard": guard} if guard else {}))))
        self.region = Region.create(self.policy.region)
        self.size = self.region.size
        self.loop = EventLoop()
        self.records: list[dict] = []
        attributes = (self.policy.region.owner, self.policy.region.group, self.policy.region.mode)
        self.guard = Guard(self.policy.guard, self.region, self.loop, region_attributes=attributes,
                           record=lambda action, **kw: self.records.append({"action": action, **kw}))
        self.region.write(0, MESSAGE, zero_fill=self.size - len(MESSAGE))
        self.guard.remember(0, MESSAGE, self.size - len(MESSAGE))
        self.guard.start()

    def turns_until(self, count: int) -> None:
        deadline = time.monotonic() + WAIT
        while len(self.records) < count and time.monotonic() < deadline:
            self.loop.run_once(0.05)

    def whole(self) -> bool:
        return os.pread(self.region.fd, self.size, 0) == MESSAGE + bytes(self.size - len(MESSAGE))

    def close(self) -> None:
        self.guard.close()
        os.unlink(self.policy.region.path)
        self.region.close()
        self.loop.close()


def test_a_truncation_is_repaired_before_its_events_are_read_or_its_offender_named(tmp_path):
    guarded = Guarded(tmp_path)
    first_look: list[int] = []
    witnesses = guarded.guard.attribution.witnesses
    assert witnesses is not None, guarded.guard.attribution.description
    collect = witnesses.collect

    def collect_and_note() -> None:  # the real collect; only when it first ran is noted
        first_look.append(time.monotonic_ns())
        collect()

    witnesses.collect = collect_and_note
    try:
        truncate = subprocess.run(["truncate", "-s", "0", guarded.policy.region.path], capture_output=True, text=True)
        assert truncate.returncode == 0, truncate.stderr
        guarded.turns_until(1)
        assert [(r["detail"]["kind"], r["result"]) for r in guarded.records] == [("shrink", "repaired")]
        detail = guarded.records[0]["detail"]
        assert detail["before"]["region"]["size"] == 0
        assert detail["detected_ns"] <= detail["done_ns"] <= min(first_look), "named (fanotify read) before repaired"
        assert detail["offender"] != "unknown" and detail["offender"]["exe"] == "/usr/bin/truncate", detail
        assert guarded.whole()
        assert Allocation.of(guarded.region.fd, guarded.size) == guarded.guard.contents.intact
        for _ in range(10):  # its own repair's events find nothing: one truncation, one incident
            guarded.loop.run_once(0.02)
        assert len(guarded.records) == 1, guarded.records
    finally:
        guarded.close()


def test_the_guards_readers_go_before_a_reader_that_was_ready_first(tmp_path):
    """A control request or a join waiting in the same batch as the truncation is served after the repair."""
    guarded = Guarded(tmp_path)
    r, w = os.pipe()
    seen: list[bool] = []
    try:
        guarded.loop.add_reader(r, lambda: seen.append(guarded.whole()))
        os.write(w, b"x")  # ready before the truncation, registered before the guard's watches are read
        fd = os.open(guarded.policy.region.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        guarded.loop.run_once(WAIT)
        assert seen == [True], "the other reader ran while the region was still truncated"
        guarded.turns_until(1)
        assert [(r["detail"]["kind"], r["result"]) for r in guarded.records] == [("shrink", "repaired")]
    finally:
        guarded.loop.remove_reader(r)
        os.close(r)
        os.close(w)
        guarded.close()


def test_a_growth_and_a_truncation_to_half_are_repaired_first_too(tmp_path):
    guarded = Guarded(tmp_path)
    try:
        fd = os.open(guarded.policy.region.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, 2 * guarded.size)
            guarded.turns_until(1)
            os.ftruncate(fd, guarded.size // 2)
            os.pwrite(fd, b"scribble", guarded.size // 4)  # into the half that is kept: the copy goes over it
            guarded.turns_until(2)
        finally:
            os.close(fd)
        kinds = [(r["detail"]["kind"], r["result"]) for r in guarded.records]
        assert kinds[:2] == [("grow", "repaired"), ("shrink", "repaired")], kinds
        assert guarded.whole()
    finally:
        guarded.close()


def test_an_alerted_resize_is_not_repaired_first_and_is_recorded_once(tmp_path):
    guarded = Guarded(tmp_path, on_resize="alert")
    try:
        fd = os.open(guarded.policy.region.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, 0)
            guarded.turns_until(1)
            for _ in range(10):
                guarded.loop.run_once(0.02)
        finally:
            os.close(fd)
        assert [(r["detail"]["kind"], r["result"]) for r in guarded.records] == [("shrink", "alerted")]
        assert os.fstat(guarded.region.fd).st_size == 0, "alert leaves it as it is"
    finally:
        os.ftruncate(guarded.region.fd, guarded.size)
        guarded.close()


def test_a_write_landing_right_after_the_first_repair_is_a_batch_of_its_own_and_undone(tmp_path):
    """`echo hello >` truncates, then writes: a write landing between the repair and the check that records it
    must not be folded into the events the repair answers (the check skips the contents of that batch)."""
    guarded = Guarded(tmp_path)
    try:
        fd = os.open(guarded.policy.region.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, 0)
            assert guarded.guard._on_wake() is True, "repaired first thing, the events queued so far taken"
            os.pwrite(fd, b"hello", 8 * 4096)  # the tampering's write, after the repair
            guarded.guard.watches.dispatch(repaired=True)  # the check of the batch the repair answers
        finally:
            os.close(fd)
        guarded.turns_until(2)
        kinds = [(r["detail"]["kind"], r["result"]) for r in guarded.records]
        assert kinds == [("shrink", "repaired"), ("contents", "repaired")], kinds
        assert guarded.whole()
    finally:
        guarded.close()


PAGE = 4096


def truncate_to_zero(guarded: Guarded) -> None:
    fd = os.open(guarded.policy.region.path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def test_the_restore_plan_is_made_before_the_loop_waits_and_never_at_repair_time(tmp_path):
    """The copy's non-zero runs are planned when the copy changes, before the loop waits again: the repair after a
    truncation writes the plan's views, and the page map is not looked at between the wake and done_ns."""
    guarded = Guarded(tmp_path)
    looked: list[int] = []
    try:
        plan = guarded.guard.contents.plan
        stale_at_wait: list[bool] = []
        guarded.loop.before_wait(lambda: stale_at_wait.append(plan.stale))  # runs after the guard's hook
        guarded.loop.run_once(0)
        assert [(offset, len(view)) for offset, view in plan.writes or ()] == [(0, PAGE)]
        guarded.region.write(5 * PAGE, b"page five")
        guarded.guard.remember(5 * PAGE, b"page five")
        assert plan.stale, "an audited write changes the copy: the plan is made again"
        for _ in range(5):  # the write's own event, and the refresh it asks for
            guarded.loop.run_once(0.02)
        assert [offset for offset, _ in plan.writes or ()] == [0, 5 * PAGE]
        assert stale_at_wait and not any(stale_at_wait), "the loop waited with a plan not made again"
        known_good = guarded.guard.contents.known_good
        runs = known_good.nonzero_runs

        def noted_runs(*args):  # the real nonzero_runs; only when it ran is noted
            looked.append(time.monotonic_ns())
            return runs(*args)

        known_good.nonzero_runs = noted_runs
        truncate_to_zero(guarded)
        guarded.turns_until(1)
        assert [(r["detail"]["kind"], r["result"]) for r in guarded.records] == [("shrink", "repaired")]
        done_ns = guarded.records[0]["detail"]["done_ns"]
        assert all(when > done_ns for when in looked), "the page map was read to repair: the plan was not ready"
        assert os.pread(guarded.region.fd, 9, 5 * PAGE) == b"page five"
        assert os.pread(guarded.region.fd, len(MESSAGE), 0) == MESSAGE
    finally:
        guarded.close()


def test_a_copy_changed_in_the_same_turn_as_the_truncation_is_what_the_repair_puts_back(tmp_path):
    """A plan not yet made again (the copy changed after the loop last waited) is made at the repair: never a stale
    plan's pages."""
    guarded = Guarded(tmp_path)
    try:
        guarded.loop.run_once(0)
        guarded.region.write(7 * PAGE, b"written this turn")
        guarded.guard.remember(7 * PAGE, b"written this turn")
        truncate_to_zero(guarded)
        assert guarded.guard.first_look.look() is True, "repaired on the wake"
        guarded.guard.watches.dispatch(repaired=True)
        guarded.turns_until(1)
        assert [(r["detail"]["kind"], r["result"]) for r in guarded.records] == [("shrink", "repaired")]
        assert os.pread(guarded.region.fd, 17, 7 * PAGE) == b"written this turn"
        assert os.fstat(guarded.region.fd).st_size == guarded.size
    finally:
        guarded.close()


def test_a_write_before_the_first_look_is_seen_by_its_one_fstat_and_put_back_over(tmp_path):
    """A truncation, then a write (the file now holds data, short of its size) before the guard looks: the first
    look's fstat sees blocks allocated, so the whole copy is put back where there is data, not only the plan's
    pages."""
    guarded = Guarded(tmp_path)
    try:
        fd = os.open(guarded.policy.region.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, b"scribble", 8 * PAGE)
        finally:
            os.close(fd)
        guarded.turns_until(1)
        assert [(r["detail"]["kind"], r["result"]) for r in guarded.records][:1] == [("shrink", "repaired")]
        assert guarded.records[0]["detail"]["before"]["region"]["size"] == 8 * PAGE + 8
        assert guarded.whole()
        assert Allocation.of(guarded.region.fd, guarded.size) == guarded.guard.contents.intact
    finally:
        guarded.close()


def test_a_wake_repairs_before_reading_the_events_and_leaves_them_for_a_batch_of_their_own(tmp_path):
    """The first look repairs without reading inotify's events (on a fanotify wake inotify may have none yet: a
    read that raises, which costs); they are a later batch, and here it finds nothing more."""
    guarded = Guarded(tmp_path)
    try:
        truncate_to_zero(guarded)
        assert guarded.guard._on_wake() is True
        assert guarded.whole()
        readable, _, _ = select.select([guarded.guard.watches.fd], [], [], 0)
        assert readable, "the truncation's inotify events were left queued"
        guarded.guard.watches.dispatch(repaired=True)
        guarded.turns_until(1)
        for _ in range(10):
            guarded.loop.run_once(0.02)
        assert [(r["detail"]["kind"], r["result"]) for r in guarded.records] == [("shrink", "repaired")]
        assert guarded.whole()
    finally:
        guarded.close()


def test_a_copy_of_scattered_pages_is_planned_within_a_bound_and_still_put_back_whole(tmp_path):
    """A peer can scatter non-zero pages as it likes: the plan holds at most PLAN_RUNS views (made before every wait
    in which the copy changed, so its cost must stay bounded), and a copy of more runs is put back from its page
    map."""
    guarded = Guarded(tmp_path)
    try:
        pages = range(2 * PAGE, 2 * PAGE * (PLAN_RUNS + 10), 2 * PAGE)  # every other page: one run each
        for offset in pages:
            guarded.region.write(offset, b"scattered")
            guarded.guard.remember(offset, b"scattered")
        for _ in range(5):
            guarded.loop.run_once(0.02)
        assert guarded.guard.contents.plan.writes is None, "more runs than a plan holds"
        truncate_to_zero(guarded)
        guarded.turns_until(1)
        assert [(r["detail"]["kind"], r["result"]) for r in guarded.records] == [("shrink", "repaired")]
        assert all(os.pread(guarded.region.fd, 9, offset) == b"scattered" for offset in pages)
        assert os.pread(guarded.region.fd, len(MESSAGE), 0) == MESSAGE
    finally:
        guarded.close()
