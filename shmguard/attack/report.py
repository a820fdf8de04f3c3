"""What came of each attack (AttackResult), the table `shmguard attack` prints and its exit status.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .catalogue import Attack
    from .children import Done
    from .identities import Identity

REFUSALS = ("blocked", "refused")


@dataclass(frozen=True)
class AttackResult:
    attack: str
    description: str
    attacker: str
    uid: int
    expected: str  # blocked | refused | repaired | alerted | failed (recorded, not repairable) | allowed
    observed: str  # the same words, or FAILED
    error: str | None  # the kernel's (or server's) refusal
    syscall_ms: float
    repair_ms: float | None  # from the attacking syscall's return to the guard's repair
    incidents: tuple[dict, ...] = ()
    attacker_pid: int = 0
    offender: dict | str | None = None
    problems: tuple[str, ...] = ()
    extra: bool = False
    adversary: bool = False  # acted within what the policy admits (a peer, a member); judged by its own checks
    facts: dict = field(default_factory=dict)  # what an adversary learnt: its peer id, slots held, a refusal

    @property
    def succeeded(self) -> bool:
        """The attacker got further than the policy allows (a "failed" repair that the policy's capabilities
        make unavoidable is expected, recorded and listed, but not counted)."""
        if self.observed == "FAILED" or (self.observed == "failed" and self.expected != "failed"):
            return True
        return self.expected in REFUSALS and self.observed not in REFUSALS

    @property
    def defended(self) -> bool:
        return not self.succeeded

    @property
    def as_expected(self) -> bool:
        return self.observed == self.expected and not self.problems

    @property
    def offender_named(self) -> bool:
        return isinstance(self.offender, dict) and self.offender.get("pid") == self.attacker_pid

    def describe(self) -> dict:
        return {**asdict(self), "incidents": list(self.incidents), "problems": list(self.problems),
                "succeeded": self.succeeded, "as_expected": self.as_expected, "offender_named": self.offender_named}


def result_of(attack: Attack, identity: Identity, expected: str, observed: str, done: Done, incidents: list[dict],
              problems: list[str]) -> AttackResult:
    """The result, with the time from the attacking syscall's return to the guard's last repair or alert."""
    finished = [r["detail"].get("done_ns", 0) for r in incidents if r["result"] in ("repaired", "alerted")]
    repair_ms = max(0.0, (max(finished) - done.returned_ns) / 1e6) if finished else None
    first = incidents[0]["detail"]["offender"] if incidents else None
    summary = tuple({"kind": r["detail"]["kind"], "result": r["result"], "repair_ms": r["detail"]["repair_ms"],
                     "offender": r["detail"]["offender"]} for r in incidents)
    return AttackResult(attack.name, attack.description, identity.label, identity.uid, expected, observed,
                        done.error, round(done.syscall_ms, 3), None if repair_ms is None else round(repair_ms, 3),
                        summary, done.pid, first, tuple(problems), attack.extra, attack.adversary, done.facts)


def format_table(results: list[AttackResult]) -> str:
    header = ("attack", "as", "expected", "observed", "refusal", "attack ms", "repair ms", "offender", "notes")
    rows = [header] + [(
        r.attack, r.attacker, r.expected, r.observed, r.error or "-", f"{r.syscall_ms:.2f}",
        "-" if r.repair_ms is None else f"{r.repair_ms:.2f}",
        "-" if r.offender is None else "named" if r.offender_named else "unknown",
        "; ".join(r.problems) or ("" if r.as_expected else f"expected {r.expected}"),
    ) for r in results]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
             for row in rows]
    failed = sum(r.succeeded for r in results)
    lines.append(f"{len(results)} attacks, {failed} succeeded" + (" (see FAILED above)" if failed else ""))
    return "\n".join(line.rstrip() for line in lines)


def exit_status(results: list[AttackResult]) -> int:
    """Non-zero if any attack succeeded."""
    return 1 if any(result.succeeded for result in results) else 0
