"""The one event loop: readiness as selectors had it, deadlines, and the readers that go first in a batch."""

from __future__ import annotations

import os
import socket

import pytest

from shmguard.loop import EventLoop

pytestmark = pytest.mark.pure


@pytest.fixture
def loop():
    made = EventLoop()
    yield made
    made.close()


def readable_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.write(w, b"x")
    return r, w


def test_a_first_reader_runs_before_the_others_of_its_batch_whatever_the_kernels_order(loop):
    """The guard's watches are first readers: a truncated region is repaired before a control request, a join or
    a peer's message of the same batch is served."""
    pipes = [readable_pipe() for _ in range(4)]
    order: list[str] = []
    try:
        for number, (r, _) in enumerate(pipes[:3]):  # ready, and registered, before the first reader
            loop.add_reader(r, lambda number=number: order.append(f"other {number}"))
        loop.add_reader(pipes[3][0], lambda: order.append("first"), first=True)
        loop.run_once(0)
        assert order[0] == "first" and sorted(order[1:]) == ["other 0", "other 1", "other 2"], order
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_a_reader_added_again_without_first_is_an_ordinary_one(loop):
    (r1, w1), (r2, w2) = readable_pipe(), readable_pipe()
    order: list[str] = []
    try:
        loop.add_reader(r1, lambda: order.append("one"))
        loop.add_reader(r2, lambda: order.append("two"), first=True)
        loop.add_reader(r2, lambda: order.append("two"))
        loop.remove_reader(r1)
        loop.add_reader(r1, lambda: order.append("one"), first=True)
        loop.run_once(0)
        assert order == ["one", "two"]
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def test_readers_writers_hang_ups_and_deadlines(loop):
    """Readable and writable as selectors had them: a hang-up wakes both a reader and a writer (their own call
    then says what happened); a deadline runs once; a removed fd is never called."""
    a, b = socket.socketpair()
    seen: list[str] = []
    try:
        loop.add_writer(a.fileno(), lambda: seen.append("writable"))
        loop.run_once(0)
        assert seen == ["writable"]
        loop.remove_writer(a.fileno())
        loop.add_reader(a.fileno(), lambda: seen.append("readable"))
        loop.run_once(0)
        assert seen == ["writable"], "nothing to read yet"
        b.send(b"x")
        loop.run_once(0)
        assert seen == ["writable", "readable"]
        a.recv(1)
        loop.add_writer(a.fileno(), lambda: seen.append("writable"))
        b.close()
        loop.remove_writer(a.fileno())
        loop.call_later(0, lambda: seen.append("deadline"))
        loop.run_once(0)
        assert seen == ["writable", "readable", "readable", "deadline"], "the hang-up reads as readable"
        loop.remove_reader(a.fileno())
        loop.run_once(0)
        assert seen[-1] == "deadline" and len(seen) == 4
    finally:
        a.close()
        b.close()


def test_removing_an_fd_already_closed_is_quiet(loop):
    r, w = os.pipe()
    loop.add_reader(r, lambda: None)
    os.close(r)
    os.close(w)
    loop.remove_reader(r)  # epoll dropped it with the close; nothing to say
    loop.run_once(0)


def test_a_cancelled_deadline_never_runs_and_a_cancel_after_it_ran_is_nothing(loop):
    seen: list[str] = []
    kept = loop.call_later(0, lambda: seen.append("kept"))
    dropped = loop.call_later(0, lambda: seen.append("dropped"))
    dropped.cancel()
    dropped.cancel()  # twice is once
    loop.run_once(0)
    assert seen == ["kept"]
    kept.cancel()  # it has run: nothing to take back, and nothing counted
    assert loop._cancelled == 0 and loop._deadlines == []


def test_a_cancelled_deadline_at_the_top_does_not_wake_the_loop_early(loop):
    """The wait is until the next deadline that will run: a cancelled sooner one is not a wake of its own."""
    seen: list[str] = []
    loop.call_later(0.0, lambda: seen.append("soon")).cancel()
    loop.call_later(60.0, lambda: seen.append("later"))
    r, w = readable_pipe()
    try:
        loop.add_reader(r, lambda: seen.append("readable"))
        loop.run_once()  # would block for 60 s if the later deadline were not the wait: the pipe wakes it
        assert seen == ["readable"] and len(loop._deadlines) == 1
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize(("scheduled", "cancelled", "at_most"), [
    (10, 10, 10),  # a few: they wait for their time in the heap
    (10_000, 10_000, 128),  # a flood of timeouts answered at once: the heap is rebuilt, never holds them all
    (10_000, 9_000, 2_000),  # cancelled ones are at most half of the heap (and at most COMPACT_AFTER past that)
])
def test_cancelled_deadlines_do_not_pile_up_in_the_heap(loop, scheduled, cancelled, at_most):
    timers = [loop.call_later(3600, lambda: None) for _ in range(scheduled)]
    for timer in timers[:cancelled]:
        timer.cancel()
    assert len(loop._deadlines) <= at_most
    live = [entry for entry in loop._deadlines if entry[2].callback is not None]
    assert len(live) == scheduled - cancelled, "no live deadline is lost by a rebuild"


def test_a_deadline_may_cancel_another_of_the_same_turn(loop):
    seen: list[str] = []
    second = None

    def first() -> None:
        seen.append("first")
        second.cancel()
        for timer in [loop.call_later(3600, lambda: None) for _ in range(200)]:
            timer.cancel()  # enough to rebuild the heap inside the turn

    loop.call_later(0, first)
    second = loop.call_later(0, lambda: seen.append("second"))
    third = loop.call_later(0, lambda: seen.append("third"))
    loop.run_once(0)
    assert seen == ["first", "third"] and third.callback is None
