"""QEMU's ivshmem limits, written once (docs/protocol.md gives the source of each).

Nothing else in shmguard writes these numbers: policy, region, client, protocol and cli import them from here.
"""

from __future__ import annotations

MAX_VECTORS = 64  # interrupt vectors per peer: QEMU's example server caps them at 64
MIN_SIZE = 4096  # the smallest region: one page, QEMU's BAR2 minimum
MAX_PEER_ID = 65535  # a peer id is 16 bits: the doorbell register is (peer id << 16) | vector
PEER_IDS = MAX_PEER_ID + 1  # ids 0..MAX_PEER_ID


def valid_region_size(size: int) -> bool:
    """A size QEMU maps: a power of two (anything else aborts QEMU in pci_register_bar) of at least a page."""
    return size >= MIN_SIZE and not size & (size - 1)


def valid_peer_id(value: int) -> bool:
    return 0 <= value <= MAX_PEER_ID
