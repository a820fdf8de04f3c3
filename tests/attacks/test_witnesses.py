"""Witnesses: the fanotify touches waiting to name an offender keep their own state, whatever Python does with
the memory of touches that were dropped."""

from __future__ import annotations

import os
import select

from shmguard.fanotify import FAN_MODIFY, Fanotify, Witnesses


def touch_from_another_process(fd: int) -> None:
    """A write to the marked file by a child: a FAN_MODIFY event with the child's pid."""
    child = os.fork()
    if child == 0:
        try:
            os.pwrite(fd, b"x", 0)
        finally:
            os._exit(0)
    os.waitpid(child, 0)


def wait_for_event(fanotify: Fanotify) -> None:
    readable, _, _ = select.select([fanotify.fd], [], [], 5)
    assert readable, "no fanotify event within 5 s"


def test_a_touch_dropped_after_its_claim_never_uses_up_a_later_touch(tmp_path):
    """A claimed touch pushed out of the queue (its limit reached) before the next prune: a later touch, which
    Python may place at the very same address, keeps every one of its events."""
    path = f"/dev/shm/shmguard-witness-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fanotify = Fanotify.open()
    try:
        fanotify.mark(path, FAN_MODIFY)
        witnesses = Witnesses(fanotify, limit=1)
        for attempt in range(300):
            touch_from_another_process(fd)
            wait_for_event(fanotify)
            assert witnesses.claim(FAN_MODIFY) is not None, f"attempt {attempt}: the first touch"
            for _ in range(2):  # the claimed touch falls out of the queue and is freed; the next may take its place
                touch_from_another_process(fd)
                wait_for_event(fanotify)
                witnesses.collect()
            witnesses.prune(0)
            later = witnesses.claim(FAN_MODIFY)
            assert later is not None, f"attempt {attempt}: a later touch lost its events to a dropped one"
            witnesses.prune(0)
            assert witnesses.claim(FAN_MODIFY) is None, "a claim uses up the events it was for"
    finally:
        fanotify.close()
        os.close(fd)
        os.unlink(path)
