"""systemd's readiness protocol (sd_notify) without a dependency: one datagram to $NOTIFY_SOCKET.

With Type=notify and NotifyAccess=main only the main process may send, so call these from the supervisor itself.
"""

from __future__ import annotations

import os
import socket

STATES = ("READY=1", "RELOADING=1", "STOPPING=1")
STATE_WAIT_SECONDS = 1.0


def notify(message: str) -> bool:
    """Send `message` ("READY=1", "STATUS=...", newline-separated) to the service manager.

    Returns False when not started by systemd (NOTIFY_SOCKET unset or not a UNIX socket) or when the
    datagram could not be delivered; True once the manager's socket accepted it.
    """
    address = socket_address(os.environ.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            try:
                sock.send(message.encode("utf-8"), socket.MSG_DONTWAIT)
            except BlockingIOError:
                # The manager's queue is full (e.g. of FDSTORE messages it has yet to read). A state change waits a
                # moment for room; a status line is dropped: a listener that never reads must not stop us.
                if not any(state in message.split("\n") for state in STATES):
                    return False
                sock.settimeout(STATE_WAIT_SECONDS)
                sock.send(message.encode("utf-8"))
    except OSError:
        return False
    return True


def ready(status: str = "") -> bool:
    """Tell systemd that start-up is complete (sockets listening, process hardened)."""
    return notify(_with_status("READY=1", status))


def stopping(status: str = "") -> bool:
    """Tell systemd that an orderly shutdown has begun."""
    return notify(_with_status("STOPPING=1", status))


def reloading(status: str = "") -> bool:
    """Tell systemd that a reload has begun (READY=1 again when it is done)."""
    return notify(_with_status("RELOADING=1", status))


def status(text: str) -> bool:
    """A one-line status that `systemctl status` shows."""
    return notify(_with_status("", text))


def _with_status(state: str, text: str) -> str:
    lines = [state] if state else []
    if text:
        lines.append("STATUS=" + " ".join(text.split()))  # one line: a newline would start a new field
    return "\n".join(lines)


def socket_address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace
    if value.startswith("/"):
        return value
    return None  # unset, or a transport (vsock) this module does not speak
