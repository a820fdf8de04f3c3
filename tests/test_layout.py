"""The region layout for several built-in guests: where each slot and its parts are, and when a region is too small.
guest/agent.c computes the same offsets; tests/e2e/test_guest_to_guest.py shows that both agree."""

from __future__ import annotations

import zlib

import pytest

from shmguard import layout
from shmguard.layout import GuestLayout, Report, command_bytes, parse_report, peers_line

pytestmark = pytest.mark.pure


@pytest.mark.parametrize("size, guests, text, slot_size", [
    (4096, 2, 168, 1024),  # the demo's region: half of it for two guests
    (8192, 3, 192, 1344),
    (1 << 20, 2, layout.MAX_TEXT, 12800),  # a large region leaves the rest to the host's message
    (65536, 16, 64, 2048),
])
def test_slots_are_sized_from_the_region_and_the_number_of_guests(size, guests, text, slot_size):
    places = GuestLayout.of(size, guests)
    assert (places.text, places.slot_size) == (text, slot_size)
    assert places.host_area_end == size - guests * slot_size >= size // 2
    for k in range(guests):  # the parts of a slot follow each other inside it, in the order the agent reads them
        parts = [places.command(k), places.reply(k), places.report(k), places.peers(k), places.ack(k, 0),
                 places.mailbox(k, 0)]
        assert parts == sorted(parts) and parts[0] == places.slot(k) == places.host_area_end + k * slot_size
        last_byte = places.mailbox(k, guests - 1) + layout.MAILBOX_HEADER + text
        assert last_byte <= places.slot(k) + slot_size
    assert places.slot(guests - 1) + slot_size == size


@pytest.mark.parametrize("size, guests, message", [
    (4096, 3, "a region of 4096 bytes is too small for 3 guests (each slot needs 832 bytes, in half the region): "
              "use --size 8192 or more"),
    (4096, 17, "--guests 17: a region is shared by 2 to 16 built-in guests (1 is the single-guest layout)"),
    (4096, 1, "--guests 1: a region is shared by 2 to 16 built-in guests (1 is the single-guest layout)"),
])
def test_a_region_too_small_for_its_guests_is_refused_in_one_line(size, guests, message):
    with pytest.raises(ValueError) as refused:
        GuestLayout.of(size, guests)
    assert str(refused.value) == message


def test_the_size_a_refusal_asks_for_is_enough():
    for guests in range(2, layout.MAX_GUESTS + 1):
        try:
            GuestLayout.of(4096, guests)
        except ValueError as exc:
            GuestLayout.of(int(str(exc).rsplit("--size ", 1)[1].split()[0]), guests)


def test_a_guest_outside_the_layout_is_refused():
    with pytest.raises(ValueError, match=r"guest 2 does not exist \(guests 0..1\)"):
        GuestLayout.of(4096, 2).slot(2)


def test_command_and_peers_lines_are_what_the_agent_parses():
    data = command_bytes(7, 12, 1, b"hello")
    assert data[:layout.COMMAND_HEADER].rstrip(b"\0") == f"send 7 12 1 5 {zlib.crc32(b'hello'):08x}".encode()
    assert len(data) == layout.COMMAND_HEADER + 5 and data.endswith(b"hello")
    line = peers_line(3, {1: 12, 0: 4})
    assert len(line) == layout.SLOT_LINE and line.rstrip(b"\0") == b"peers 3 4:0 12:1"
    assert peers_line(4, {}).rstrip(b"\0") == b"peers 4"


@pytest.mark.parametrize("line, report", [
    ("sent 7 12 3 5 0000abcd 1500", Report(7, 12, True, 3, 5, 0xabcd, 1500)),
    ("lost 7 12 peer left", Report(7, 12, False, why="peer left")),
    ("lost 7 12 busy", Report(7, 12, False, why="busy")),
    ("sent 7 12 3 5 0000abcd", None),
    ("sent 7 123456 3 5 0000abcd 1", None),
    ("lost 7 12 <script>", None),
    ("ready 5", None),
    ("", None),
])
def test_reports_are_parsed_strictly(line, report):
    assert parse_report(line) == report


def area_with(text: bytes, generation: int) -> bytearray:
    area = bytearray(layout.SLOT_LINE)
    area[:len(text)] = text
    area[-1] = generation
    return area


def test_a_line_is_taken_only_whole_the_same_even_generation_before_and_after_it():
    """The guest writes a slot line with its last byte odd, then even: the host, which reads every slot whenever any
    guest rings, must never take a line half rewritten (seen: a report whose crc was the new line's head and the old
    line's last digit)."""
    def reader(area):
        return lambda at, length: bytes(area[at:at + length])

    assert layout.whole_line(reader(area_with(b"sent 3 6 2 17 fe17a234 979", 4)), 0) == "sent 3 6 2 17 fe17a234 979"
    assert layout.whole_line(reader(area_with(b"sent 3 6 2 17 fe17a23", 5)), 0) is None  # being rewritten

    area = area_with(b"sent 3 6 2 17 fe17a234 979", 4)
    reads = []

    def racing(at, length):  # the guest rewrites it between the host's reads of the generation and the line
        reads.append(at)
        if len(reads) == 2:
            area[-1] = 6
        return bytes(area[at:at + length])
    assert layout.whole_line(racing, 0) == "sent 3 6 2 17 fe17a234 979"  # torn once, taken on the next read
    assert len(reads) == 6
