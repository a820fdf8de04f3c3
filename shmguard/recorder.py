"""Recorder: the supervisor's one way into its audit log, and the one rule for a log that cannot be written.

The rule: joins, writes and rings are recorded before they happen (`record`), so a log that refuses their
record refuses them; leaves, refusals and incidents have happened already (`note`), so they go on unrecorded
and are counted. The failure is said once in the log and in `status`; every new record tries the log again,
and the first that succeeds is preceded by an `audit-gap` record of what is missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .audit import Actor, AuditLog
from .errors import ShmguardError
from .linux import sdnotify
from .linux.sockets import PeerCred

log = logging.getLogger("shmguard")


@dataclass
class AuditTrouble:
    """The audit log cannot be written since `since`, and which records were missed meanwhile."""

    error: str
    since: str
    missed: dict[str, int] = field(default_factory=dict)  # action -> records not written

    def describe(self) -> dict:
        return {"error": self.error, "since": self.since, "missed": dict(self.missed)}


class Recorder:
    def __init__(self, audit: AuditLog):
        self.audit = audit
        self.trouble: AuditTrouble | None = None

    def record(self, action: str, *, actor: PeerCred | Actor | None = None, result: str = "ok", **fields) -> dict:
        """Append a record; raises ShmguardError if the log cannot take it."""
        if isinstance(actor, PeerCred):
            actor = Actor.from_pid(actor.pid, actor.uid, actor.gid)
        try:
            if self.trouble is not None:
                self._record_gap()
            return self.audit.append(action, actor=actor, result=result, **fields)
        except ShmguardError as exc:
            self._failed(action, str(exc))
            raise

    def note(self, action: str, **fields) -> dict | None:
        """Record what has happened already and cannot be undone: a log that cannot take it does not stop it."""
        try:
            return self.record(action, **fields)
        except ShmguardError:
            return None  # counted in trouble, said once in the log

    def describe(self) -> dict:
        return {"path": str(self.audit.path), "last_seq": self.audit.last_seq, "writable": self.trouble is None,
                "trouble": self.trouble.describe() if self.trouble else None}

    def _failed(self, action: str, error: str) -> None:
        if self.trouble is None:
            self.trouble = AuditTrouble(error, datetime.now(UTC).isoformat(timespec="seconds"))
            log.error("%s: refusing joins, writes and rings until it can be written again; connected peers are "
                      "still served, leaves and incidents go unrecorded (counted in `shmguard status`)", error)
            sdnotify.status(f"audit log unwritable: {error}")
        self.trouble.missed[action] = self.trouble.missed.get(action, 0) + 1

    def _record_gap(self) -> None:
        trouble = self.trouble
        self.audit.append("audit-gap", result="resumed", detail=trouble.describe())
        self.trouble = None
        log.warning("audit log %s is writable again; records missed while it was not: %s", self.audit.path,
                    trouble.missed)
        sdnotify.status("audit log writable again")
