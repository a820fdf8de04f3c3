"""Recorder: the supervisor's one way into its audit log, and the one rule for a log that cannot be written.

The rule: joins, writes and rings are recorded before they happen (`record`, `stage`), so a log that refuses their
record refuses them; leaves, refusals and incidents have happened already (`note`), so they go on unrecorded
and are counted. The failure is said once in the log and in `status`; every new record tries the log again,
and the first that succeeds is preceded by an `audit-gap` record of what is missing.

Group commit: `stage` and `note` write their record without an fsync; the event loop calls `commit` once before it
waits again, and that one fsync makes every record of the turn durable. The fsync runs in the kernel (native AIO,
linux/aio.py) while the loop goes on serving; its completion is an event of the loop, and the records written
meanwhile wait for the next one. Whoever must not be told of a record before it is on disk (a write's reply, a
peer's greeting) asks `when_durable(seq, done, failed)`: `done` runs once the record is on disk (at once if it is
already, or the log is not durable), `failed(why)` if the fsync failed, never both. `flush` is the same in line
(it waits), for a stop or a hand-over; `record` stays durable on return, for callers that go on at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .audit import Actor, AuditLog
from .errors import ShmguardError
from .linux import sdnotify
from .linux.aio import AsyncFsync
from .linux.sockets import PeerCred

log = logging.getLogger("shmguard")
Done = Callable[[], None]
Failed = Callable[[str], None]


@dataclass
class AuditTrouble:
    """The audit log cannot be written since `since`, and which records were missed meanwhile."""

    error: str
    since: str
    missed: dict[str, int] = field(default_factory=dict)  # action -> records not written ("not-synced": written,
    # but their fsync failed, so they may not be on disk)

    def describe(self) -> dict:
        return {"error": self.error, "since": self.since, "missed": dict(self.missed)}


class Recorder:
    def __init__(self, audit: AuditLog):
        self.audit = audit
        self.trouble: AuditTrouble | None = None
        self._waiting: list[tuple[int, Done, Failed]] = []  # (seq, done, failed) until the next flush
        self._lost: tuple[int, str] | None = None  # records up to this seq failed their fsync, and why
        self._fsync: AsyncFsync | None = None  # the fsync in the background, once attached to a loop
        self._started_to = 0  # the last record the newest fsync in flight covers
        self._outcomes: dict[int, int | None] = {}  # target -> errno once its fsync completed, None before
        self._failed_at = 0  # the last record when an fsync last failed: no new one before a new record

    def attach(self, loop) -> None:
        """Commit in the background from here on: the loop's `commit` starts the fsync, its completion answers."""
        if not self.audit.durable or self._fsync is not None:
            return
        try:
            # fdatasync, not fsync: the log is only ever appended to, and for an append fdatasync(2) writes the
            # data and the new size (the metadata "needed in order to allow a subsequent data retrieval to be
            # correctly handled", the man page's own example), so every record it covers reads back after a
            # crash just as with fsync; what it may leave out is the modification time. (The file's name was made
            # durable when it was created: its directory is fsynced then.) The log keeps one fd for its life.
            self._fsync = AsyncFsync(self.audit.fileno(), datasync=True)
        except OSError as exc:  # a kernel or seccomp filter without native AIO: the fsync in line, as before
            log.info("audit log: each turn's fsync in line (no native AIO: %s)", exc.strerror or exc)
            return
        loop.add_reader(self._fsync.fileno(), self._on_synced)

    def close(self) -> None:
        """The commit in flight finished in line, and what was recorded since too."""
        self.flush()
        if self._fsync is not None:
            self._fsync.close()
            self._fsync = None

    def record(self, action: str, *, actor: PeerCred | Actor | None = None, result: str = "ok", sync: bool = True,
               **fields) -> dict:
        """Append a record (durable on return unless sync=False); raises ShmguardError if the log cannot take it."""
        if isinstance(actor, PeerCred):
            actor = Actor.from_pid(actor.pid, actor.uid, actor.gid)
        try:
            if self.trouble is not None:
                self._record_gap()
            return self.audit.append(action, actor=actor, result=result, sync=sync, **fields)
        except ShmguardError as exc:
            self._failed(action, str(exc))
            raise

    def stage(self, action: str, **fields) -> dict:
        """Append a record that the next flush makes durable: tell nobody of it before when_durable says so."""
        return self.record(action, sync=False, **fields)

    def note(self, action: str, **fields) -> dict | None:
        """Record what has happened already and cannot be undone: a log that cannot take it does not stop it."""
        try:
            return self.stage(action, **fields)
        except ShmguardError:
            return None  # counted in trouble, said once in the log

    def when_durable(self, seq: int, done: Done, failed: Failed) -> None:
        """done() once record `seq` is on disk, or failed(why) if it never will be; never both, exactly once."""
        if self._lost is not None and seq <= self._lost[0]:
            failed(self._lost[1])
        elif seq <= self.audit.synced_seq:
            done()
        else:
            self._waiting.append((seq, done, failed))

    def commit(self) -> bool:
        """The loop's hook before it waits: start an fsync of what was recorded since the newest one in flight
        began (a few run at once; with every slot taken, a completion starts it). Returns True if the loop must
        come back at once, not wait."""
        if self._fsync is None:
            return self.flush()
        last = self.audit.last_seq
        if self.audit.unsynced and last > max(self._failed_at, self._started_to):
            if self._fsync.full:
                return False  # a completion starts it
            try:
                self._fsync.start(last)
            except OSError:
                return self.flush()  # the kernel refused this one: in line, this once
            self._started_to = last
            self._outcomes[last] = None
            return False
        if self._fsync.in_flight:
            return False
        self._answer_waiting()
        return bool(self._waiting)

    def start_commit(self) -> None:
        """Start the background fsync of what is recorded now, before the turn ends: a write that rang the guest and
        waits for its ack then has its fsync run while the guest reads. Only where the fsync runs in the background
        and a slot is free; otherwise the turn's commit does it, as always (never an fsync in line from here)."""
        fsync, last = self._fsync, self.audit.last_seq
        if fsync is None or fsync.full or not self.audit.unsynced or last <= max(self._failed_at, self._started_to):
            return
        try:
            fsync.start(last)
        except OSError:
            return  # the turn's commit tries again (and falls back to the fsync in line)
        self._started_to = last
        self._outcomes[last] = None

    def _on_synced(self) -> None:
        if self._fsync is not None:
            self._synced(self._fsync.completed())

    def _synced(self, results: list[tuple[int, int]]) -> None:
        """(last record it covers, errno) of each fsync that completed, taken in the order they were started: the
        kernel reports a write-back error to one fsync of the description only, so a later one's success says
        nothing until every earlier one has said how it ended. A success puts every record up to its target on
        disk; a failure vouches for none written so far."""
        for target, error in results:
            self._outcomes[target] = error
        settled = False
        while self._outcomes and self._outcomes[first := min(self._outcomes)] is not None:
            error = self._outcomes.pop(first)
            if error:
                self._lose(self.audit.sync_failed(error))
            else:
                self.audit.synced_up_to(first)
            settled = True
        if settled:
            self._answer_waiting()

    def _lose(self, exc: ShmguardError) -> None:
        unsynced = self.audit.last_seq - self.audit.synced_seq
        self._lost = (self.audit.last_seq, str(exc))
        self._failed_at = self.audit.last_seq
        self._failed("not-synced", str(exc), unsynced)

    def flush(self) -> bool:
        """One fsync in line for what was recorded, then the replies and greetings that waited for it.
        Returns True if they recorded more meanwhile (the loop must come back at once, not wait)."""
        if self._fsync is not None and self._fsync.in_flight:
            self._synced(self._fsync.completed(wait=True))
        if self.audit.unsynced:
            try:
                self.audit.flush()
            except ShmguardError as exc:
                self._lose(exc)
                self._answer_waiting()
                return False  # no hurry on a failing disk: the next turn of the loop tries again
        self._answer_waiting()
        return bool(self._waiting) or self.audit.unsynced

    def _answer_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        for seq, done, failed in waiting:
            try:
                self.when_durable(seq, done, failed)
            except Exception:  # noqa: BLE001 - one failing reply must not keep the others waiting forever
                log.exception("internal error answering after the audit log's flush (still serving)")

    def describe(self) -> dict:
        return {"path": str(self.audit.path), "last_seq": self.audit.last_seq, "writable": self.trouble is None,
                "trouble": self.trouble.describe() if self.trouble else None}

    def _failed(self, action: str, error: str, count: int = 1) -> None:
        if self.trouble is None:
            self.trouble = AuditTrouble(error, datetime.now(UTC).isoformat(timespec="seconds"))
            log.error("%s: refusing joins, writes and rings until it can be written again; connected peers are "
                      "still served, leaves and incidents go unrecorded (counted in `shmguard status`)", error)
            sdnotify.status(f"audit log unwritable: {error}")
        self.trouble.missed[action] = self.trouble.missed.get(action, 0) + count

    def _record_gap(self) -> None:
        trouble = self.trouble
        self.audit.append("audit-gap", result="resumed", detail=trouble.describe(), sync=False)
        self.trouble = None
        log.warning("audit log %s is writable again; records missed while it was not: %s", self.audit.path,
                    trouble.missed)
        sdnotify.status("audit log writable again")
