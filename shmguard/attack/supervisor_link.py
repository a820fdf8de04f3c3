"""How the battery talks to the supervisor it attacks: control requests (retried while an attacked control socket
is being rebound, or asked once with a deadline) and the audit log read from an offset.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from ..control import ControlClient, ControlRequest, WriteRequest
from ..errors import ShmguardError

ANSWER_SECONDS = 3.0  # while an adversary holds its ground, the supervisor still answers within this


class SupervisorLink:
    """The control socket and audit log of one supervisor."""

    def __init__(self, control_socket: str, audit_path: str):
        self.control_socket, self.audit_path = control_socket, audit_path

    def control(self, body: ControlRequest, attempts: int = 40) -> dict:
        """A control request; retried for a moment while an attacked control socket is being rebound."""
        for attempt in range(attempts):
            try:
                reply = ControlClient(self.control_socket, timeout=10).ask(body)
            except ShmguardError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.05)
                continue
            if not reply.get("ok"):
                raise ShmguardError(f"the supervisor refused {body.OP}: {reply.get('error')}")
            return reply
        raise AssertionError("unreachable")

    def write(self, message: bytes) -> None:
        self.control(WriteRequest(message, text=True))

    def ask(self, body: ControlRequest, timeout: float = ANSWER_SECONDS) -> dict | None:
        """One request, no retry: its reply (ok or not), or None if none came within timeout."""
        try:
            return ControlClient(self.control_socket, timeout=timeout).ask(body)
        except ShmguardError:
            return None

    def ask_write(self, message: bytes) -> list[str]:
        reply = self.ask(WriteRequest(message, text=True))
        if reply is None or not reply.get("ok"):
            return [f"an audited write failed: {'no answer' if reply is None else reply.get('error')}"]
        return []

    def audit_size(self) -> int:
        return os.path.getsize(self.audit_path)

    def records_since(self, offset: int) -> list[dict]:
        with open(self.audit_path, "rb") as log:
            log.seek(offset)
            return [json.loads(line) for line in log.read().splitlines() if line.strip()]

    def incidents_since(self, offset: int) -> list[dict]:
        return [record for record in self.records_since(offset) if record.get("action") == "incident"]

    def await_incidents(self, offset: int, timeout: float = 0.5) -> list[dict]:
        """The guard records an incident at once when fanotify has named the offender, else within 50 ms."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.01)
            incidents = self.incidents_since(offset)
            if incidents:
                return incidents
        return []


def eventually(problems: Callable[[], list[str]], seconds: float) -> list[str]:
    """Look until nothing is wrong or the time is up; what was still wrong at the end."""
    deadline = time.monotonic() + seconds
    while True:
        found = problems()
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.02)
