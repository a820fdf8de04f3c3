"""The incident pipeline: dedupe, respond, wait a moment for the offender's name, bound the detail, record.

Every difference a check finds becomes one Incident: the policy's response is carried out at once, then the
incident waits up to ATTRIBUTION_WAIT_NS for fanotify to name the offender (attribution.py) and goes to the
record sink (the audit log). An unresolved incident (alerted, failed) is recorded once until what is seen changes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..audit import MAX_RECORD_BYTES, Actor, canonical_json
from ..errors import ShmguardError
from ..linux.fanotify import FAN_ATTRIB, FAN_DELETE_SELF, FAN_MODIFY, FAN_MOVE_SELF, FAN_OPEN, Touch
from .attribution import FAN_SOCKET, Attribution

log = logging.getLogger("shmguard.guard")

# The fanotify events whose process is the offender of each kind of incident.
OFFENCES = {
    "shrink": FAN_MODIFY, "grow": FAN_MODIFY, "hole": FAN_MODIFY, "contents": FAN_MODIFY, "preallocation": FAN_MODIFY,
    "attributes": FAN_ATTRIB, "acl": FAN_ATTRIB, "extra-link": FAN_ATTRIB, "anchor": FAN_ATTRIB,
    "unlink": FAN_ATTRIB | FAN_DELETE_SELF, "rename": FAN_MOVE_SELF, "replaced": FAN_ATTRIB | FAN_MOVE_SELF,
    "socket-removed": FAN_SOCKET, "socket-replaced": FAN_SOCKET, "socket-attributes": FAN_ATTRIB,
    "region-opened": FAN_OPEN,
}
ATTRIBUTION_WAIT_NS = 20_000_000  # how long a repaired incident waits for its offender's fanotify event
LIST_LIMIT = 16  # entries of any list in an incident's detail; `<name>_count` says how many there were
TEXT_LIMIT = 1024  # characters of any string in an incident's detail
DETAIL_LIMIT = MAX_RECORD_BYTES // 4  # bytes of an incident's detail as JSON: its record stays far below the limit


@dataclass(frozen=True)
class Incident:
    """A difference found and responded to, about to be recorded."""

    kind: str
    result: str  # repaired | blocked | alerted | failed
    mask: int  # the fanotify events whose process is the offender
    deadline_ns: int  # record by then, named or not
    detail: dict


@dataclass(frozen=True)
class Responded:
    """A response carried out before its incident is reported (restore.FirstLook: size and contents put
    back first thing on a wake, before the check that reports it): what respond() returned, when the guard looked
    and when it was done."""

    result: str
    after: dict
    detected_ns: int
    done_ns: int

    @classmethod
    def now(cls, response: str, before: dict, repair: Callable[[], dict] | None, detected_ns: int) -> Responded:
        result, after = respond(response, before, repair)
        return cls(result, after, detected_ns, time.monotonic_ns())


def listed(name: str, items: list) -> dict:
    """A list for an incident's detail: its first LIST_LIMIT entries, and how many there are."""
    return {name: items[:LIST_LIMIT], f"{name}_count": len(items)}


def bounded(value: Any) -> Any:
    """An incident's detail as an audit record can hold it, whatever an attacker made (thousands of links, names
    and symlink targets of any length): every list cut to its first LIST_LIMIT entries (`<key>_count` in the same
    dict gives how many there were), every string to TEXT_LIMIT characters."""
    if isinstance(value, dict):
        out: dict = {}
        for key, item in value.items():
            out[key] = bounded(item)
            if isinstance(item, list | tuple) and len(item) > LIST_LIMIT:
                out.setdefault(f"{key}_count", len(item))
        return out
    if isinstance(value, list | tuple):
        return [bounded(item) for item in value[:LIST_LIMIT]]
    if isinstance(value, str) and len(value) > TEXT_LIMIT:
        return f"{value[:TEXT_LIMIT]}... ({len(value)} characters)"
    return value


def fitted(detail: dict) -> dict:
    """The detail, or, if it is still over DETAIL_LIMIT bytes as JSON (many long names full of characters that
    JSON escapes), the detail with `before` and `after` replaced by their sizes."""
    size = len(canonical_json(detail))
    if size <= DETAIL_LIMIT:
        return detail
    omitted = {"omitted": f"{size} bytes of JSON, over the {DETAIL_LIMIT} an incident may take"}
    return {**detail, "before": omitted, "after": omitted}


def respond(response: str, before: dict, repair: Callable[[], dict] | None) -> tuple[str, dict]:
    """Carry out the policy's response; returns the audit result and the state after."""
    if response == "block":
        return "blocked", before  # the seals already refused the change in the kernel
    if response == "alert" or repair is None:
        return "alerted", before
    try:
        return "repaired", repair()
    except (OSError, ShmguardError) as exc:
        return "failed", {"error": str(exc)}


class Incidents:
    """From a difference found to its audit record, once; record(action, actor=, result=, detail=) is the sink."""

    def __init__(self, attribution: Attribution, loop, record: Callable[..., Any]):
        self.attribution, self.loop, self._record_sink = attribution, loop, record
        self.count = 0
        self.last: dict | None = None
        self.by_scan = False  # the check under way was started by the periodic scan, not by an event
        self._outstanding: dict[tuple[str, str], str] = {}  # unresolved incidents, recorded once
        self._seen: set[tuple[str, str]] = set()
        self._unattributed: list[Incident] = []  # responded to, waiting a moment for fanotify to name the offender
        self._detected_ns = 0

    def begin_check(self) -> None:
        self.detected_now()
        self._seen = set()

    def detected_now(self) -> None:
        self._detected_ns = time.monotonic_ns()

    def end_check(self) -> None:
        """Incidents not seen again in this check are resolved: seen once more, they are recorded again."""
        self._outstanding = {key: value for key, value in self._outstanding.items() if key in self._seen}

    def settle(self) -> None:
        """After a check: late touches first go to the incidents waiting for them, then the rest are pruned."""
        if self.attribution.witnesses is not None:
            self.on_touch()
            self.attribution.prune(self._detected_ns)

    def still(self, kind: str, path: str) -> None:
        """An incident that stands, left for the follow-up check to respond to."""
        self._seen.add((kind, path))

    def unresolved(self, kinds: frozenset[str]) -> bool:
        # (first the empty case, without a generator: this runs between a wake and a repair, see restore.py)
        return bool(self._outstanding) and any(kind in kinds for kind, _ in self._outstanding)

    def report(self, kind: str, path: str, before: dict, response: str, repair: Callable[[], dict] | None,
               complete: Callable[[], dict] | None = None, responded: Responded | None = None) -> None:
        """complete: the rest of a repair that the incident's time does not include (what a reader of the region
        no longer waits for); its result is the state after. responded: the response was carried out already
        (repair is then not called again)."""
        key = (kind, path)
        self._seen.add(key)
        signature = json.dumps(before, sort_keys=True, default=str)
        if responded is None and self._outstanding.get(key) == signature:
            return  # already recorded, still unresolved: one record, not one per event
        if responded is None:
            responded = Responded.now(response, before, repair, self._detected_ns)
        result, after, detected_ns, done_ns = (responded.result, responded.after, responded.detected_ns,
                                               responded.done_ns)
        if result == "repaired" and complete is not None:
            try:
                after = {**after, **complete()}
            except (OSError, ShmguardError) as exc:  # the contents are back; the next look finds what is left
                after = {**after, "completion_failed": str(exc)}
        if result in ("alerted", "failed"):
            self._outstanding[key] = signature
        incident = Incident(kind, result, OFFENCES.get(kind, FAN_MODIFY | FAN_ATTRIB), done_ns + ATTRIBUTION_WAIT_NS, {
            "kind": kind, "path": path, "before": before, "after": after, "response": response,
            "repair_ms": round((done_ns - detected_ns) / 1e6, 3),
            "detected_ns": detected_ns, "done_ns": done_ns, "found_by": "scan" if self.by_scan else "event",
        })
        offender = self.attribution.claim(incident.mask)
        if offender is None and self.attribution.witnesses is not None:
            # The offender's fanotify event may still be on its way: the attacker can be preempted between
            # queueing our inotify event and its fanotify event. Record when it comes, or at the deadline.
            self._unattributed.append(incident)
            self.loop.call_at(incident.deadline_ns / 1e9, self.record_overdue)
            return
        self._record(incident, offender)

    def on_touch(self) -> None:
        """fanotify has events: the incidents waiting for an offender get theirs."""
        self.attribution.collect()
        waiting, self._unattributed = self._unattributed, []
        for incident in waiting:
            offender = self.attribution.claim(incident.mask)
            if offender is None:
                self._unattributed.append(incident)
            else:
                self._record(incident, offender)

    def record_overdue(self, everything: bool = False) -> None:
        now = time.monotonic_ns()
        overdue = [i for i in self._unattributed if everything or i.deadline_ns <= now]
        self._unattributed = [i for i in self._unattributed if i not in overdue]
        for incident in overdue:
            self._record(incident, None)

    def _record(self, incident: Incident, offender: Touch | None) -> None:
        attribution = self.attribution
        if offender is not None:
            named = attribution.named(offender)
        else:
            named = attribution.named_opener(incident.detail["before"].get("opener", -1))
        why = {} if named is not None else {"offender_unknown": self._why_unknown(incident),
                                            **listed("holders", attribution.holders())}
        detail = fitted(bounded({**incident.detail, "offender": named or "unknown", **why}))
        _log(incident.kind, detail["path"], incident.result, detail)
        self.count += 1
        self.last = {"kind": incident.kind, "path": detail["path"], "result": incident.result,
                     "repair_ms": detail["repair_ms"]}
        actor = None
        if named is not None and named["uid"] is not None and named["gid"] is not None:
            actor = Actor(named["pid"], named["uid"], named["gid"], bounded(named["exe"]))
        try:
            self._record_sink("incident", actor=actor, result=incident.result, detail=detail)
        except (ValueError, OSError, ShmguardError) as exc:
            # The response is carried out already; a log that cannot take the record (full, unwritable, or a
            # record it refuses) must not stop the supervisor, nor the rest of this check.
            log.error("guard: incident not recorded in the audit log (%s): %s at %s: %s in %.3f ms", exc,
                      incident.kind, detail["path"], incident.result, detail["repair_ms"])

    def _why_unknown(self, incident: Incident) -> str:
        if self.attribution.witnesses is None:
            return f"offenders cannot be named: {self.attribution.description}"
        if incident.detail.get("found_by") == "scan":
            return ("no fanotify event named a process: the change made none (a hole punched or a write through "
                    "the memfd's own file description makes no fsnotify event, checked on Linux 6.18, nor does a "
                    "write through a mapping); the periodic scan (guard.scan_ms) found it")
        return (f"no fanotify event of another process arrived within {ATTRIBUTION_WAIT_NS // 1_000_000} ms "
                "(the change made none, or the event queue overflowed)")


def _log(kind: str, path: str, result: str, detail: dict) -> None:
    offender = detail["offender"]
    who = offender if offender == "unknown" else f"pid {offender['pid']} uid {offender['uid']} ({offender['exe']})"
    level = logging.ERROR if result == "failed" else logging.WARNING
    log.log(level, "guard: %s at %s by %s: %s in %.3f ms%s", kind, path, who, result, detail["repair_ms"],
            f" ({detail['after'].get('error')})" if result == "failed" else "")
