"""How the host and the built-in guest share the region (see README, "Region layout").

Offset 0 holds the host's message, NUL-terminated, exactly as the seed's Zephyr guest expects.
The last REPLY_SIZE bytes are the guest's reply area: the guest rewrites all of it (its line, then NULs)
and then rings one of the host's vectors. While the built-in guest is attached, a host message's NUL
padding stops where the reply area begins, so a reply is never wiped before the host has read it; a
message long enough to reach into the area covers it, and the guest's next reply clears it again.
"""

from __future__ import annotations

import re
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
