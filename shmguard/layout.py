"""How the host and the built-in guest share the region (see README, "Region layout").

Offset 0 holds the host's message, NUL-terminated, exactly as the seed's Zephyr guest expects.
The last REPLY_SIZE bytes are the guest's reply area: the guest writes a NUL-terminated line there
and then rings one of the host's vectors. A host message padded to the end of the region clears it.
"""

REPLY_SIZE = 256
READY_VECTOR = 0  # the guest rings the host's vector 0 once its MSI-X vectors are live
ACK_VECTOR = 1  # ... and vector 1 after each message it has printed
HOST_PEER_PARAM = "shmguard.host"  # guest kernel parameter: the host's peer id to ring back


def reply_offset(region_size: int) -> int:
    return region_size - REPLY_SIZE
