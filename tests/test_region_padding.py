"""The NUL padding after a message: the region reads byte for byte as if every NUL were written (the seed's
padding), while only what may not be NULs already is written: what earlier messages left behind, and what a peer
or the guest wrote past the message through its mapping (found by reading, since it makes no event)."""

from __future__ import annotations

import mmap
import os
import random
import uuid

import pytest

from shmguard.region import create_file, create_memfd, nul_ranges, nuls_after

pytestmark = pytest.mark.pure

SIZE = 1 << 20
PAGE = 4096


class Model:
    """The region as the old code left it: data, then every NUL of the padding written."""

    def __init__(self, size: int):
        self.bytes = bytearray(size)

    def write(self, offset: int, data: bytes, zero_fill: int) -> None:
        end = offset + len(data)
        self.bytes[offset:end] = data
        self.bytes[end:end + zero_fill] = bytes(zero_fill)


@pytest.fixture(params=["memfd", "file"])
def region(request):
    """Both backends: the memfd is looked at through its mapping, the file with pread (it may be truncated)."""
    if request.param == "memfd":
        region = create_memfd(SIZE)
    else:
        path = f"/dev/shm/shmguard-test-{uuid.uuid4().hex[:8]}"
        region = create_file(path, SIZE, os.getuid(), os.getgid(), 0o600)
        os.unlink(path)  # the fd holds it
    yield region
    region.close()


@pytest.fixture
def peer_mapping(region):
    """A peer's own mapping of the region, from its own open of it (as QEMU maps the fd it is sent)."""
    fd = os.open(f"/proc/self/fd/{region.fd}", os.O_RDWR | os.O_CLOEXEC)
    mapping = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(fd)
    yield mapping
    mapping.close()


def text_write(region, model, offset: int, message: bytes, pad_end: int | None = None, touched=None,
               defer: bool = False) -> None:
    """A text message padded to pad_end (the end of the region, or where the reply area begins); defer: the NULs
    expected already are looked at by finish(), as the supervisor does after its rings."""
    pad_end = SIZE if pad_end is None else pad_end
    zero_fill = pad_end - offset - len(message)

    def before(start: int, end: int) -> bool:
        if touched is not None:
            touched.append((start, end))
        return False

    finish = region.write(offset, message, zero_fill=zero_fill, before=before, defer_check=defer)
    if defer and zero_fill:  # what a reader of the message looks at is in place before finish()
        assert region.read(offset, len(message) + 1) == message + b"\0" and region.read(pad_end - 1, 1) == b"\0"
    finish()
    model.write(offset, message, zero_fill)
    assert region.read(0, SIZE) == model.bytes


def test_a_short_message_after_a_long_one_reads_as_if_padded_to_the_end(region):
    model, touched = Model(SIZE), []
    text_write(region, model, 0, b"L" * 300_000)
    text_write(region, model, 0, b"short", touched=touched)
    assert touched == [(0, 300_000)], "only what the long message left behind is written"
    text_write(region, model, 0, b"again", touched=touched)
    assert touched[-1] == (0, 5), "nothing past the message is written when nothing is left behind"


@pytest.mark.parametrize("defer", [False, True])
def test_a_peer_scribbling_past_the_message_is_cleared_by_the_next_write(region, peer_mapping, defer):
    model = Model(SIZE)
    text_write(region, model, 0, b"some message")
    for offset in (20, PAGE * 3 + 7, SIZE - 1, SIZE // 2, 12):
        peer_mapping[offset:offset + 1] = b"\xff"  # no event: only a look finds it
        model.bytes[offset] = 0xFF
        touched: list[tuple[int, int]] = []
        text_write(region, model, 0, b"next message", touched=touched, defer=defer)
        if defer and offset in (12, SIZE - 1):  # the terminator and the last byte are put right at once
            assert touched == [(0, 12)], touched
        elif defer:  # the rest by finish(), which asks before() first
            assert touched == [(0, 12), (12, SIZE)], touched
        else:
            assert touched == [(0, SIZE)], "a scribble found by reading makes the whole padding written"


def test_a_deferred_look_writes_nothing_when_the_padding_reads_as_nuls(region):
    model, touched = Model(SIZE), []
    text_write(region, model, 0, b"L" * 300_000)
    text_write(region, model, 0, b"short", touched=touched, defer=True)
    assert touched == [(0, 300_000)], "what the long message left behind is written at once"
    text_write(region, model, 0, b"again", touched=touched, defer=True)
    assert touched[-1] == (0, 5) and len(touched) == 2, "no NUL past the message is written, none looked at twice"


def test_a_write_through_another_description_past_the_message_is_cleared(region):
    model = Model(SIZE)
    text_write(region, model, 0, b"first")
    fd = os.open(f"/proc/self/fd/{region.fd}", os.O_RDWR | os.O_CLOEXEC)  # a member's `dd conv=notrunc`
    try:
        os.pwrite(fd, b"in place", 70_000)
    finally:
        os.close(fd)
    text_write(region, model, 0, b"second")


def test_the_reply_area_past_the_padding_is_left_alone(region, peer_mapping):
    model, reply = Model(SIZE), SIZE - 256
    text_write(region, model, 0, b"hello guest", pad_end=reply)
    peer_mapping[reply:reply + 9] = b"ack 1 2 3"  # the guest's reply, written through its mapping
    model.bytes[reply:reply + 9] = b"ack 1 2 3"
    text_write(region, model, 0, b"hi", pad_end=reply)
    assert region.read(reply, 9) == b"ack 1 2 3"


def test_binary_writes_over_the_padding_are_cleared_by_the_next_text_message(region):
    model = Model(SIZE)
    text_write(region, model, 0, b"text")
    for offset, data in ((5000, b"binary"), (100, b"\x01" * 9000), (SIZE - 6, b"at end")):
        region.write(offset, data)
        model.write(offset, data, 0)
        assert region.read(0, SIZE) == model.bytes
        text_write(region, model, 0, b"text again")


def test_a_repair_just_before_the_write_makes_every_nul_written(region, peer_mapping):
    """before() returning True means the region changed under the write (the guard repaired a hole from its copy,
    which may hold bytes past the message): nothing that was looked at before it counts."""
    model = Model(SIZE)
    text_write(region, model, 0, b"first")

    def repair(start: int, end: int) -> bool:
        peer_mapping[SIZE - 10:SIZE] = b"from copy!"
        return True

    region.write(0, b"second", zero_fill=SIZE - 6, before=repair)
    model.write(0, b"second", SIZE - 6)
    assert region.read(0, SIZE) == model.bytes


@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("seed", range(8))
def test_random_writes_and_scribbles_read_exactly_as_the_old_padding(region, peer_mapping, seed, defer):
    rng, model = random.Random(seed), Model(SIZE)
    reply = SIZE - 256
    for _ in range(60):
        choice = rng.random()
        if choice < 0.5:  # a text message, padded to the end or to the reply area
            offset = rng.choice([0, 0, 0, rng.randrange(SIZE // 2)])
            message = bytes(rng.randrange(1, 256) for _ in range(rng.choice([1, 10, 5000, 70_000])))
            text_write(region, model, offset, message, pad_end=rng.choice([SIZE, reply]), defer=defer)
        elif choice < 0.7:  # a binary write, no padding
            offset = rng.randrange(SIZE - 100)
            data = os.urandom(rng.randrange(1, 100))
            region.write(offset, data)
            model.write(offset, data, 0)
        else:  # a peer's scribble through its mapping, anywhere
            offset = rng.randrange(SIZE)
            peer_mapping[offset:offset + 1] = bytes([rng.randrange(256)])
            model.bytes[offset] = peer_mapping[offset]
    assert region.read(0, SIZE) == model.bytes


# --- the two rules, as tables ----------------------------------------------------------------------------


@pytest.mark.parametrize("end, fill_end, expected, reads_nuls, ranges", [
    (5, 100, (0, 100), True, []),  # all expected and read as NULs: nothing written
    (5, 100, (0, 100), False, [(5, 100)]),  # a scribble: all of it
    (5, 100, (300, 400), True, [(5, 100)]),  # nothing expected there: all of it
    (5, 100, (40, 100), True, [(5, 40)]),  # the previous message's bytes 5..40 only
    (5, 100, (40, 100), False, [(5, 100)]),
    (5, 100, (40, 60), True, [(5, 40), (60, 100)]),
    (50, 50, (0, 100), True, []),  # no fill
])
def test_which_nuls_are_written(end, fill_end, expected, reads_nuls, ranges):
    looked: list[tuple[int, int]] = []

    def look(start: int, stop: int) -> bool:
        looked.append((start, stop))
        return reads_nuls

    assert nul_ranges(end, fill_end, expected, look) == ranges
    assert all(start >= end and stop <= fill_end for start, stop in looked), "only the fill is read"


@pytest.mark.parametrize("expected, offset, end, fill_end, after", [
    ((40, 100), 0, 5, 100, (5, 100)),  # a shorter message: its fill
    ((40, 200), 0, 5, 100, (5, 200)),  # the fill touches what was expected beyond it
    ((150, 200), 0, 5, 100, (5, 100)),  # ... or does not
    ((40, 100), 10, 20, 20, (40, 100)),  # data elsewhere
    ((40, 100), 30, 50, 50, (50, 100)),  # data over its start
    ((40, 100), 60, 70, 70, (40, 60)),  # data inside: the part before it
    ((40, 100), 0, 120, 120, (40, 40)),  # data over all of it
])
def test_where_nuls_are_expected_after_a_write(expected, offset, end, fill_end, after):
    assert nuls_after(expected, offset, end, fill_end) == after
