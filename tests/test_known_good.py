"""The guard's known-good copy: its page map (which pages hold anything but NULs), updates without region-sized
temporaries, refreshes that copy only what changed, and the fast put-back after a truncation or a punch that
writes only the copy's non-zero pages and whatever the file still holds."""

from __future__ import annotations

import ctypes
import os
import random

import pytest

from shmguard.guard.contents import PAGE, Allocation, KnownGood, fill_holes
from shmguard.linux.inodes import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE

pytestmark = pytest.mark.pure

SIZE = 1 << 20
PAGES = SIZE // PAGE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def page_map_of(contents: bytes | bytearray) -> list[int]:
    return [int(any(contents[page * PAGE:(page + 1) * PAGE])) for page in range(-(-len(contents) // PAGE))]


def assert_map_covers(copy: KnownGood, exact: bool = True) -> None:
    """Every page holding a non-zero byte is marked (exact: and no other)."""
    truth = page_map_of(copy.data)
    marked = list(copy.pages)
    if exact:
        assert marked == truth
    else:
        assert all(m >= t for m, t in zip(marked, truth, strict=True)), "a non-zero page is not marked"


@pytest.fixture
def memfd():
    """A plain memfd (unsealed, so it can be truncated like a region file)."""
    fd = os.memfd_create("known-good-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    yield fd
    os.close(fd)


def blocks_of(fd: int) -> int:
    return os.fstat(fd).st_blocks


def test_the_map_of_a_fresh_copy_is_exact():
    contents = bytearray(SIZE)
    contents[5] = 1
    contents[PAGE * 7 + 4095] = 2
    contents[SIZE - 1] = 3
    copy = KnownGood(bytes(contents))
    assert [p for p in range(PAGES) if copy.pages[p]] == [0, 7, PAGES - 1]
    assert_map_covers(copy)


def test_a_message_then_a_shorter_one_leaves_only_the_first_page_marked():
    copy = KnownGood(bytes(SIZE))
    copy.remember(0, b"x" * 200_000, SIZE - 200_000)
    assert_map_covers(copy)
    copy.remember(0, b"short", SIZE - 5)
    assert copy.data[:5] == b"short" and not any(copy.data[5:])
    assert list(copy.pages) == [1] + [0] * (PAGES - 1)


def test_a_large_write_marks_its_pages_without_looking_and_a_refresh_makes_the_map_exact(memfd):
    copy = KnownGood(bytes(SIZE))
    copy.remember(0, bytes(SIZE // 2))  # a large write of zeros: marked, not looked at
    assert_map_covers(copy, exact=False)
    os.pwrite(memfd, bytes(SIZE), 0)
    os.pwrite(memfd, b"z", 300)
    full = blocks_of(memfd)
    assert copy.refresh(memfd, SIZE, full)
    assert_map_covers(copy)


@pytest.mark.parametrize("seed", range(6))
def test_random_remembers_keep_the_copy_and_its_map_true(seed):
    rng = random.Random(seed)
    model, copy = bytearray(SIZE), KnownGood(bytes(SIZE))
    for _ in range(80):
        offset = rng.randrange(SIZE)
        data = bytes(rng.choice([0, 0, rng.randrange(256)]) for _ in range(min(rng.choice([1, 50, 9000]),
                                                                               SIZE - offset)))
        fill = rng.randrange(SIZE - offset - len(data) + 1) if rng.random() < 0.5 else 0
        copy.remember(offset, data, fill)
        end = offset + len(data)
        model[offset:end] = data
        model[end:end + fill] = bytes(fill)
        assert copy.data == model
        assert_map_covers(copy)  # writes up to 16 pages are looked at: exact


@pytest.mark.parametrize("seed", range(6))
def test_remembers_at_page_edges_keep_the_map_exact(seed):
    """Data and fills that start or end on a page boundary, or one byte either side of it."""
    rng = random.Random(seed)
    model, copy = bytearray(SIZE), KnownGood(bytes(SIZE))
    edge = [0, 1, PAGE - 1, PAGE, PAGE + 1, 2 * PAGE]
    for _ in range(80):
        offset = min(SIZE - 1, rng.randrange(PAGES) * PAGE + rng.choice([0, 0, 1, PAGE - 1]))
        data = bytes(rng.choice([0, rng.randrange(1, 256)]) for _ in range(min(rng.choice(edge), SIZE - offset)))
        end = offset + len(data)
        fill = min(SIZE - end, rng.choice(edge) + (-end % PAGE if rng.random() < 0.5 else 0))
        copy.remember(offset, data, fill)
        model[offset:end] = data
        model[end:end + fill] = bytes(fill)
        assert copy.data == model
        assert_map_covers(copy)


def test_a_refresh_takes_the_file_only_where_it_changed_and_maps_those_pages(memfd):
    copy = KnownGood(bytes(SIZE))
    os.pwrite(memfd, bytes(SIZE), 0)
    full = blocks_of(memfd)
    os.pwrite(memfd, b"reply", SIZE - 256)
    os.pwrite(memfd, b"peer", 123_456)
    assert copy.refresh(memfd, SIZE, full)
    assert copy.data == os.pread(memfd, SIZE, 0)
    assert_map_covers(copy)
    assert copy.matches(memfd, SIZE)


def test_a_refresh_of_a_region_that_is_not_intact_changes_nothing(memfd):
    copy = KnownGood(b"kept" + bytes(SIZE - 4))
    os.pwrite(memfd, b"other" + bytes(SIZE - 5), 0)
    full = blocks_of(memfd)
    punch_hole(memfd, PAGE * 10, PAGE)
    assert not copy.refresh(memfd, SIZE, full)
    assert copy.data[:4] == b"kept" and list(copy.pages) == [1] + [0] * (PAGES - 1)


def test_a_refresh_of_the_reply_area_takes_those_bytes_only(memfd):
    """An ack rewrites only the guest's reply area: only it is read into the copy, and its page mapped again."""
    copy = KnownGood(bytes(SIZE))
    os.pwrite(memfd, bytes(SIZE), 0)
    full = blocks_of(memfd)
    os.pwrite(memfd, b"ack 1 5 0000abcd", SIZE - 256)
    os.pwrite(memfd, b"peer", 123_456)  # elsewhere: not the ack's, not taken
    assert copy.refresh_range(memfd, SIZE - 256, SIZE, full)
    assert bytes(copy.data[SIZE - 256:SIZE - 240]) == b"ack 1 5 0000abcd" and not any(copy.data[:SIZE - 256])
    assert copy.pages[PAGES - 1] == 1 and not any(copy.pages[:PAGES - 1])
    os.pwrite(memfd, bytes(256), SIZE - 256)
    assert copy.refresh_range(memfd, SIZE - 256, SIZE, full)
    assert not any(copy.data[SIZE - 256:]) and copy.pages[PAGES - 1] == 0, "the page map follows a cleared area"


@pytest.mark.parametrize("damage", ["hole in the area", "hole elsewhere", "shrunk"])
def test_a_refresh_of_the_reply_area_of_a_region_not_intact_changes_nothing(memfd, damage):
    copy = KnownGood(bytes(SIZE))
    os.pwrite(memfd, b"\1" * SIZE, 0)
    full = blocks_of(memfd)
    if damage == "shrunk":
        os.ftruncate(memfd, SIZE - PAGE)
    else:
        punch_hole(memfd, SIZE - PAGE if damage == "hole in the area" else PAGE * 3, PAGE)
    assert not copy.refresh_range(memfd, SIZE - 256, SIZE, full)
    assert not any(copy.data) and not any(copy.pages)


def test_after_a_truncation_only_the_non_zero_pages_are_written_and_the_holes_filled_after(memfd):
    contents = bytearray(SIZE)
    contents[:11] = b"the message"
    contents[PAGE * 100:PAGE * 100 + 5] = b"reply"
    copy = KnownGood(bytes(contents))
    os.pwrite(memfd, contents, 0)
    full = blocks_of(memfd)
    os.ftruncate(memfd, 0)
    os.ftruncate(memfd, SIZE)
    copy.put_back(memfd)
    assert os.pread(memfd, SIZE, 0) == contents
    assert blocks_of(memfd) == 2 * PAGE // 512, "only the two non-zero pages were written"
    fill_holes(memfd, SIZE, copy.view)
    assert Allocation.of(memfd, SIZE) == Allocation(SIZE, full, SIZE)
    assert os.pread(memfd, SIZE, 0) == contents


def test_a_truncation_to_half_puts_the_copy_over_what_the_file_still_holds(memfd):
    """What the file still holds may have been written meanwhile (data, not holes): the copy goes there whole."""
    contents = bytearray(SIZE)
    contents[:5] = b"hello"
    copy = KnownGood(bytes(contents))
    os.pwrite(memfd, contents, 0)
    os.ftruncate(memfd, SIZE // 2)
    os.pwrite(memfd, b"garbage", 70_000)  # into a page the copy has as zeros
    os.ftruncate(memfd, SIZE)
    copy.put_back(memfd)
    assert os.pread(memfd, SIZE, 0) == contents


def test_a_punched_hole_and_garbage_elsewhere_are_both_put_back(memfd):
    rng = random.Random(1)
    contents = bytearray(SIZE)
    for page in rng.sample(range(PAGES), 40):
        contents[page * PAGE:page * PAGE + 100] = os.urandom(100)
    copy = KnownGood(bytes(contents))
    os.pwrite(memfd, contents, 0)
    marked = next(p for p in range(PAGES) if copy.pages[p])
    punch_hole(memfd, marked * PAGE, 3 * PAGE)
    os.pwrite(memfd, b"junk", SIZE - 10)
    copy.put_back(memfd)
    assert os.pread(memfd, SIZE, 0) == contents
