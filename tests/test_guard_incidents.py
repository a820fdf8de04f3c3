"""The guard's incident pipeline as tables: respond, dedupe, bounded detail, the record sink; and its one rule."""

from __future__ import annotations

import ast
import types
from pathlib import Path

import pytest

import shmguard.guard
from shmguard.guard.attribution import Attribution
from shmguard.guard.incidents import DETAIL_LIMIT, LIST_LIMIT, TEXT_LIMIT, Incidents, bounded, fitted, respond

pytestmark = pytest.mark.pure
GUARD = Path(shmguard.guard.__file__).parent


def failing_repair() -> dict:
    raise OSError(1, "Operation not permitted")


@pytest.mark.parametrize(("response", "repair", "expected"), [
    ("block", lambda: {"after": 1}, ("blocked", {"before": 1})),
    ("alert", lambda: {"after": 1}, ("alerted", {"before": 1})),
    ("repair", None, ("alerted", {"before": 1})),
    ("repair", lambda: {"after": 1}, ("repaired", {"after": 1})),
    ("repair", failing_repair, ("failed", {"error": "[Errno 1] Operation not permitted"})),
])
def test_respond_carries_out_the_policys_response(response, repair, expected):
    assert respond(response, {"before": 1}, repair) == expected


def pipeline(peers=()) -> tuple[Incidents, list[dict]]:
    """Incidents without fanotify (no witnesses): each is recorded at once, into the list."""
    records: list[dict] = []
    incidents = Incidents(Attribution(None, lambda: peers), None,
                          lambda action, **kw: records.append({"action": action, **kw}))
    return incidents, records


# Each step: one check, the incidents it reports (kind, before, response); then the kinds recorded so far.
DEDUPE = [
    ([("attributes", {"mode": "0777"}, "alert")], ["attributes"]),
    ([("attributes", {"mode": "0777"}, "alert"), ("attributes", {"mode": "0777"}, "alert")], ["attributes"]),
    ([("attributes", {"mode": "0707"}, "alert")], ["attributes", "attributes"]),  # what is seen changed
    ([], ["attributes", "attributes"]),  # not seen: resolved
    ([("attributes", {"mode": "0707"}, "alert")], ["attributes", "attributes", "attributes"]),
    ([("shrink", {"size": 0}, "repair"), ("shrink", {"size": 0}, "repair")], ["attributes"] * 3 + ["shrink"] * 2),
]


def test_an_unresolved_incident_is_recorded_once_until_what_is_seen_changes():
    incidents, records = pipeline()
    for reports, recorded in DEDUPE:
        incidents.begin_check()
        for kind, before, response in reports:
            repair = (lambda: {"size": 4096}) if response == "repair" else None
            incidents.report(kind, "/dev/shm/region", before, response, repair)
        incidents.end_check()
        assert [r["detail"]["kind"] for r in records] == recorded, reports


def test_an_unnamed_incident_says_why_and_who_holds_the_region():
    peer = types.SimpleNamespace(id=3, cred=types.SimpleNamespace(pid=42, uid=1000, gid=100))
    incidents, records = pipeline(peers=[peer, types.SimpleNamespace(id=0, cred=None)])
    incidents.begin_check()
    incidents.report("attributes", "/dev/shm/region", {"mode": "0777"}, "repair", lambda: {"mode": "0660"})
    [record] = records
    assert (record["action"], record["result"], record["actor"]) == ("incident", "repaired", None)
    detail = record["detail"]
    assert detail["offender"] == "unknown"
    assert detail["offender_unknown"] == "offenders cannot be named: not started"
    assert detail["holders"] == [{"peer": 3, "pid": 42, "uid": 1000, "gid": 100}] and detail["holders_count"] == 1
    assert (detail["found_by"], detail["before"], detail["after"]) == ("event", {"mode": "0777"}, {"mode": "0660"})
    assert (incidents.count, incidents.last["kind"]) == (1, "attributes")


def test_a_sink_that_refuses_the_record_stops_nothing():
    def refuse(action, **kw):
        raise OSError(28, "No space left on device")
    incidents = Incidents(Attribution(None, tuple), None, refuse)
    incidents.begin_check()
    incidents.report("attributes", "/dev/shm/region", {"mode": "0777"}, "repair", lambda: {"mode": "0660"})
    assert incidents.count == 1


def test_every_list_and_string_of_a_detail_is_bounded():
    detail = bounded({"strays": [f"/dev/shm/link{i}" for i in range(1000)], "target": "x" * 5000,
                      "nested": {"names": list(range(LIST_LIMIT))}})
    assert len(detail["strays"]) == LIST_LIMIT and detail["strays_count"] == 1000
    assert detail["target"].startswith("x" * TEXT_LIMIT) and detail["target"].endswith("(5000 characters)")
    assert "names_count" not in detail["nested"], "a list within the limit is whole"


def test_a_detail_over_its_limit_keeps_its_kind_and_loses_before_and_after():
    huge = {"names": ["\u0001" * TEXT_LIMIT] * LIST_LIMIT}  # each escaped six times over as JSON
    detail = fitted(bounded({"kind": "extra-link", "before": huge, "after": huge}))
    assert detail["kind"] == "extra-link"
    assert set(detail["before"]) == {"omitted"} and str(DETAIL_LIMIT) in detail["before"]["omitted"]


def test_the_guard_never_imports_the_supervisor():
    wrong = []
    for path in sorted(GUARD.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            wrong += [f"{path.name}: {name}" for name in names if name.split(".")[-1] in ("supervisor", "cli")]
    assert not wrong
