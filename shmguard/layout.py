"""How the host and the built-in guest share the region (see README, "Region layout").

Offset 0 holds the host's message, NUL-terminated, exactly as the seed's Zephyr guest expects.
The last REPLY_SIZE bytes are the guest's reply area: the guest rewrites all of it (its line, then NULs)
and then rings one of the host's vectors. While the built-in guest is attached, a host message's NUL
padding stops where the reply area begins, so a reply is never wiped before the host has read it; a
message long enough to reach into the area covers it, and the guest's next reply clears it again.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

REPLY_SIZE = 256
READY_VECTOR = 0  # the guest rings the host's vector 0 once its MSI-X vectors are live
ACK_VECTOR = 1  # ... and vector 1 after each message it has printed
HOST_PEER_PARAM = "shmguard.host"  # guest kernel parameter: the host's peer id to ring back


def reply_offset(region_size: int) -> int:
    return region_size - REPLY_SIZE


@dataclass(frozen=True)
class Ack:
    count: int  # messages the guest has handled since it booted
    length: int  # bytes of text it printed
    crc32: int  # of those bytes


_READY = re.compile(r"ready (\d{1,5})")
_ACK = re.compile(r"ack (\d{1,20}) (\d{1,20}) ([0-9a-f]{8})")


def parse_ready(reply: str) -> int | None:
    """The peer id in a guest's "ready <id>", or None: the reply area is the guest's to fill with anything."""
    match = _READY.fullmatch(reply)
    return int(match.group(1)) if match else None


def parse_ack(reply: str) -> Ack | None:
    match = _ACK.fullmatch(reply)
    return Ack(int(match.group(1)), int(match.group(2)), int(match.group(3), 16)) if match else None


# --- several built-in guests (`shmguard run --guests N`, N >= 2) ------------------------------------------
#
# The host's message area stays at offset 0; the guests' slots fill the end of the region, slot 0 lowest.
# A slot is the guest's place, not its identity: a guest started in place of one that left takes its slot
# (and gets a new peer id). Inside slot k, at these offsets from its start:
#   command   COMMAND_HEADER + text: the host's "send <n> <peer> <slot> <length> <crc32>" line, NUL-padded to
#             COMMAND_HEADER bytes, then the text; written by the host, rung on the guest's vector 1
#   reply     SLOT_LINE: "ready <id>", "ack <n> <length> <crc32>" (the host's message at 0), as for one guest
#   report    SLOT_LINE: "sent <n> <peer> <seq> <length> <crc32> <round trip us>" or "lost <n> <peer> <why>"
#   peers     SLOT_LINE: "peers <generation> <id>:<slot> ...": the guests the host knows are there
#             (reply and report: the area's last byte is the guest's write generation, odd while it rewrites the
#             line; the host takes a line only with the same even generation before and after reading it)
#   acks      N x 16 bytes: entry j is written by the guest in slot j when it has printed a message from k:
#             u32 seq, u32 crc32, u32 length, u32 its peer id (little-endian)
#   inbox     N x (16 + text): mailbox j holds the message the guest in slot j sent to k: u32 seq, u32 the
#             sender's peer id, u32 length, u32 crc32, then the text; seq is written last
# A guest rings the host's vector 0 after "ready" and vector 1 after any other line; guests ring each other on
# vector 1 after a message or an ack, so nothing passes through the host. guest/agent.c computes the same.

MAX_GUESTS = 16
SLOT_LINE = 128
COMMAND_HEADER = 64
MAILBOX_HEADER = 16
ACK_ENTRY = 16
MIN_TEXT = 64  # the smallest text room a slot may have; below it the region is too small for its guests
MAX_TEXT = 4096  # a larger region leaves the rest to the host's message area
SLOT_ALIGN = 64
GUESTS_PARAM = "shmguard.guests"  # guest kernel parameters: how many slots, and which one is this guest's
SLOT_PARAM = "shmguard.slot"
GUEST_VECTOR = 1  # what guests ring each other on, and what the host rings for a command or a peers line


def _slot_bytes(guests: int, text: int) -> int:
    raw = COMMAND_HEADER + text + 3 * SLOT_LINE + guests * ACK_ENTRY + guests * (MAILBOX_HEADER + text)
    return -(-raw // SLOT_ALIGN) * SLOT_ALIGN


@dataclass(frozen=True)
class GuestLayout:
    """Where each of `guests` built-in guests has its slot in a region of `size` bytes (see above)."""

    size: int
    guests: int
    text: int  # the longest message one guest can send another, in bytes
    slot_size: int

    @classmethod
    def of(cls, size: int, guests: int) -> GuestLayout:
        """Raises ValueError with one line when the region is too small for that many guests."""
        if not 2 <= guests <= MAX_GUESTS:
            raise ValueError(f"--guests {guests}: a region is shared by 2 to {MAX_GUESTS} built-in guests "
                             "(1 is the single-guest layout)")
        budget = size // 2 // guests  # the guests' slots take at most half the region
        text = min(MAX_TEXT, (budget - _slot_bytes(guests, 0)) // (guests + 1)) // 8 * 8
        while text >= MIN_TEXT and _slot_bytes(guests, text) > budget:
            text -= 8
        if text < MIN_TEXT:
            need = 1 << (2 * guests * _slot_bytes(guests, MIN_TEXT) - 1).bit_length()
            raise ValueError(f"a region of {size} bytes is too small for {guests} guests (each slot needs "
                             f"{_slot_bytes(guests, MIN_TEXT)} bytes, in half the region): use --size {need} or more")
        return cls(size, guests, text, _slot_bytes(guests, text))

    @property
    def host_area_end(self) -> int:
        """The host's message area is [0, host_area_end); the slots follow."""
        return self.size - self.guests * self.slot_size

    def slot(self, k: int) -> int:
        if not 0 <= k < self.guests:
            raise ValueError(f"guest {k} does not exist (guests 0..{self.guests - 1})")
        return self.host_area_end + k * self.slot_size

    def command(self, k: int) -> int:
        return self.slot(k)

    def reply(self, k: int) -> int:
        return self.slot(k) + COMMAND_HEADER + self.text

    def report(self, k: int) -> int:
        return self.reply(k) + SLOT_LINE

    def peers(self, k: int) -> int:
        return self.report(k) + SLOT_LINE

    def ack(self, k: int, sender: int) -> int:
        return self.peers(k) + SLOT_LINE + sender * ACK_ENTRY

    def mailbox(self, k: int, sender: int) -> int:
        return self.peers(k) + SLOT_LINE + self.guests * ACK_ENTRY + sender * (MAILBOX_HEADER + self.text)

    def describe(self) -> dict:
        return {"guests": self.guests, "slot_size": self.slot_size, "text": self.text,
                "host_area": [0, self.host_area_end],
                "slots": [self.slot(k) for k in range(self.guests)]}


@dataclass(frozen=True)
class Report:
    """What a guest says in its report line about a send command."""

    command: int
    peer: int
    sent: bool
    seq: int = 0
    length: int = 0
    crc32: int = 0
    round_trip_us: int = 0
    why: str = ""


_SENT = re.compile(r"sent (\d{1,10}) (\d{1,5}) (\d{1,10}) (\d{1,10}) ([0-9a-f]{8}) (\d{1,12})")
_LOST = re.compile(r"lost (\d{1,10}) (\d{1,5}) ([a-z -]{1,64})")


def parse_report(line: str) -> Report | None:
    if match := _SENT.fullmatch(line):
        command, peer, seq, length, crc, rtt = match.groups()
        return Report(int(command), int(peer), True, int(seq), int(length), int(crc, 16), int(rtt))
    if match := _LOST.fullmatch(line):
        return Report(int(match.group(1)), int(match.group(2)), False, why=match.group(3))
    return None


def command_bytes(command: int, peer: int, slot: int, text: bytes) -> bytes:
    """The command area's contents for "send text to peer in slot": header line NUL-padded, then the text."""
    header = f"send {command} {peer} {slot} {len(text)} {zlib.crc32(text):08x}".encode()
    return header.ljust(COMMAND_HEADER, b"\0") + text


LINE_READS = 3  # a guest rewrites a line in microseconds; if still torn after these, its ring follows


def whole_line(read: Callable[[int, int], bytes], offset: int) -> str | None:
    """A reply or report line as its guest last wrote it whole, through read(offset, length); None while the guest
    is rewriting it (it rings when done). The same even generation (the area's last byte) before and after the
    line, else a read that races the guest could mix the new line's head with the old one's tail."""
    generation = offset + SLOT_LINE - 1
    for _ in range(LINE_READS):
        before = read(generation, 1)[0]
        raw = read(offset, SLOT_LINE - 1)
        if not before & 1 and read(generation, 1)[0] == before:
            return raw.split(b"\0", 1)[0].decode("ascii", "replace")
    return None


def peers_line(generation: int, guests: dict[int, int]) -> bytes:
    """The peers line for slot -> peer id of every guest the host knows is there, NUL-padded to SLOT_LINE."""
    text = " ".join(f"{peer}:{slot}" for slot, peer in sorted(guests.items()))
    return f"peers {generation} {text}".strip().encode().ljust(SLOT_LINE, b"\0")
