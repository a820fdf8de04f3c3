"""systemd's file descriptor store (sd_notify(3): FDSTORE=1, FDNAME=, FDSTOREREMOVE=1), one datagram a call.

The store keeps a service's fds across its restarts: a process started after a crash gets them back through
LISTEN_FDS/LISTEN_FDNAMES. It needs FileDescriptorStoreMax= in the unit; without it systemd drops what it is
sent (and says so in its log), which these calls cannot see.
"""

from __future__ import annotations

import array
import os
import socket

from .sdnotify import socket_address

SEND_SECONDS = 1.0  # systemd reads its notify socket at once; a store that lags this much loses the message
FDNAME_MAX = 255  # systemd: a name is at most 255 printable ASCII characters, no ':'


def valid_name(name: str) -> bool:
    return 0 < len(name) <= FDNAME_MAX and name.isascii() and name.isprintable() and ":" not in name


class FdStore:
    """Store and remove named fds; `available` is False when there is no $NOTIFY_SOCKET to send to."""

    def __init__(self, notify_socket: str | None = None) -> None:
        address = socket_address(os.environ.get("NOTIFY_SOCKET", "") if notify_socket is None else notify_socket)
        self._address = address
        self._sock = None
        if address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.settimeout(SEND_SECONDS)

    @property
    def available(self) -> bool:
        return self._sock is not None

    def store(self, name: str, *fds: int) -> bool:
        """Keep `fds` under `name` (several fds may share one; poll-able ones are dropped by systemd on POLLHUP)."""
        if not valid_name(name):
            raise ValueError(f"{name!r} is not a valid fd store name")
        return self._send(f"FDSTORE=1\nFDNAME={name}", fds)

    def remove(self, name: str) -> bool:
        """Forget every fd stored under `name`."""
        return self._send(f"FDSTOREREMOVE=1\nFDNAME={name}", ())

    def _send(self, message: str, fds: tuple[int, ...]) -> bool:
        if self._sock is None:
            return False
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self._sock.sendmsg([message.encode()], ancillary, 0, self._address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
