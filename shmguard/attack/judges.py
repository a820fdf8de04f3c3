"""What the battery checks as root while an adversary holds its ground, and the undo that puts back what it left
in the supervisor's own descriptions. A judge returns (problems, the message the region must now hold).
"""

from __future__ import annotations

import fcntl
import os
from typing import TYPE_CHECKING

from ..client import IvshmemClient
from ..control import RingRequest, StatusRequest
from ..errors import ShmguardError
from .adversaries import PREALLOCATION, REFUSAL_NOTICE, drain_eventfd
from .children import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, Done, Scene, fallocate
from .supervisor_link import ANSWER_SECONDS, eventually

if TYPE_CHECKING:
    from .battery import Battery

REPAIR_SECONDS = 2.0  # a tamper the guard must see is put back (and recorded) within this
Verdict = tuple[list[str], bytes]  # what went wrong, and the message the region must hold now


def judge_append(battery: Battery, scene: Scene, done: Done, offset: int, expected: str) -> Verdict:
    if not done.ok:
        return [], scene.message
    message = scene.message + b" (written after the peer set O_APPEND)"
    problems = battery.link.ask_write(message)
    if not battery.memfd:
        os.truncate(battery.region, battery.size // 2)  # the guard's repair must land in place too
    return problems + eventually(lambda: battery.region_problems(message), REPAIR_SECONDS), message


def undo_append(battery: Battery, scene: Scene, done: Done) -> None:
    """Today the observer's fd is the supervisor's own description: clearing O_APPEND there stops the loop."""
    fd = battery.observer.shm_fd
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_APPEND)
    eventually(lambda: [] if os.fstat(fd).st_size == battery.size else ["resized"], REPAIR_SECONDS)


def judge_eventfds(battery: Battery, scene: Scene, done: Done, offset: int, expected: str) -> Verdict:
    if not done.ok:
        return [], scene.message
    peer, problems = done.facts["peer"], []
    if battery.link.ask(RingRequest(f"{peer}:0")) is None:
        problems.append(f"no answer within {ANSWER_SECONDS:g} s to a ring of peer {peer}, whose eventfds it made "
                        "blocking and full (the supervisor blocks in eventfd_write)")
    status = battery.link.ask(StatusRequest())
    if status is None or not status.get("ok"):
        problems.append(f"status not answered within {ANSWER_SECONDS:g} s after peer {peer} made the host's "
                        "eventfds blocking and drained them and its own blocking and full")
    return problems, scene.message


def undo_eventfds(battery: Battery, scene: Scene, done: Done) -> None:
    """Through the observer's copies (the same descriptions): non-blocking again, and the full counter drained,
    which also frees a supervisor stuck in eventfd_write."""
    if not done.facts:
        return
    try:
        battery.observer.update()
    except ShmguardError:
        pass
    for fd in battery.observer.peers.get(done.facts.get("host"), []):
        os.set_blocking(fd, False)
    for fd in battery.observer.peers.get(done.facts.get("peer"), []):
        os.set_blocking(fd, False)
        drain_eventfd(fd)


def judge_refusal(battery: Battery, scene: Scene, done: Done, offset: int, expected: str) -> Verdict:
    refusal = done.facts.get("refusal")
    if not done.facts or (refusal and "error" in refusal and not done.facts.get("joined")):
        return [f"the attack did not reach the server's refusal ({done.error})"], scene.message
    problems = []
    if refusal is None:
        problems.append(f"{done.facts['joined']} joins and none refused")
    elif "error" in refusal:
        problems.append(f"join {done.facts['joined'] + 1} failed with {refusal['error']}, not a refusal")
    elif refusal["first"] != REFUSAL_NOTICE:
        said = "nothing" if refusal["first"] is None else f"the word {refusal['first']}"
        problems.append(f"a refused join received {said} before EOF, not the version {REFUSAL_NOTICE} notice "
                        "(QEMU spins in device realize)")
    elif not refusal["then_eof"]:
        problems.append(f"the version {REFUSAL_NOTICE} notice was not followed by EOF")
    if refusal is not None and "error" not in refusal:
        records = [r for r in battery.link.records_since(offset) if r.get("action") == "refused"
                   and (r.get("actor") or {}).get("uid") == scene.identity.uid
                   and (r.get("detail") or {}).get("reason")]
        if not records:
            problems.append(f"no refusal of uid {scene.identity.uid} with its reason in the audit log")
    return problems, scene.message


def judge_peer_slots(battery: Battery, scene: Scene, done: Done, offset: int, expected: str) -> Verdict:
    if not done.ok:
        return [], scene.message
    shares, joined, problems = battery.policy.shares, done.facts["joined"], []
    if scene.identity.uid not in shares.reserved_for and joined > shares.peers_per_uid:
        problems.append(f"uid {scene.identity.uid} took {joined} peer slots (shares.peers_per_uid: "
                        f"{shares.peers_per_uid})")
    try:
        IvshmemClient(battery.policy.server.socket, timeout=ANSWER_SECONDS).connect().close()
    except ShmguardError as exc:
        problems.append(f"a root peer cannot join while uid {scene.identity.uid} holds {joined} slots: {exc}")
    return problems, scene.message


def judge_control_connections(battery: Battery, scene: Scene, done: Done, offset: int, expected: str) -> Verdict:
    if not done.ok:
        return [], scene.message
    shares, facts, problems = battery.policy.shares, done.facts, []
    if scene.identity.uid not in shares.reserved_for and facts["held"] > shares.connections_per_uid:
        problems.append(f"uid {scene.identity.uid} holds {facts['held']} control connections "
                        f"(shares.connections_per_uid: {shares.connections_per_uid})")
    status = battery.link.ask(StatusRequest())
    if status is None or not status.get("ok"):
        why = "no answer" if status is None else status.get("error")
        problems.append(f"root's status failed while uid {scene.identity.uid} holds {facts['held']} control "
                        f"connections: {why}")
    return problems, scene.message


def judge_hole(battery: Battery, scene: Scene, done: Done, offset: int, expected: str) -> Verdict:
    if not done.ok:
        return [], scene.message

    def unrepaired() -> list[str]:
        holes = [r for r in battery.link.incidents_since(offset) if r["detail"].get("kind") == "hole"]
        problems = [] if holes else ["no \"hole\" incident in the audit log"]
        return problems + (battery.region_problems(scene.message) if expected == "repaired" else [])

    return eventually(unrepaired, REPAIR_SECONDS), scene.message


def undo_hole(battery: Battery, scene: Scene, done: Done) -> None:
    """The message back (an alerting policy does not put it back) and no pages left past the end."""
    if not done.ok:
        return
    battery.link.ask_write(scene.message)
    if not battery.memfd:
        try:
            fallocate(battery.observer.shm_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, battery.size,
                       PREALLOCATION)
        except OSError:
            pass


