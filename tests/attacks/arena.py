"""The arena of the attack tests: a supervisor, a paused QEMU attached to it, and the battery."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from helpers import RunningSupervisor, policy_file
from shmguard.attack import ATTACKS_BY_NAME, AttackResult, Battery, start_paused_qemu, wait_for_peer
from shmguard.policy import load_policy
from shmguard.qemu import QemuProcess

POLICIES = ("strict", "standard")


@dataclass
class Arena:
    """A supervisor, the paused QEMU attached to it, and the battery that attacks both."""

    name: str
    supervisor: RunningSupervisor
    qemu: QemuProcess
    battery: Battery

    @classmethod
    def open(cls, tmp_path: Path, base: str, **sections: dict) -> Arena:
        supervisor = RunningSupervisor(policy_file(tmp_path, base, **sections))
        qemu = battery = None
        try:
            qemu = start_paused_qemu(load_policy(str(supervisor.policy_path)))
            battery = Battery(str(supervisor.policy_path), qemu=qemu, supervisor=supervisor.proc)
            wait_for_peer(battery, qemu.pid)
        except BaseException:
            for thing in (battery, qemu):
                if thing is not None:
                    thing.close()
            supervisor.stop()
            raise
        return cls(base, supervisor, qemu, battery)

    def close(self) -> int:
        self.battery.close()
        alive = self.qemu.poll() is None
        self.qemu.close()
        code = self.supervisor.stop()
        assert alive, "QEMU died during the attacks"
        return code

    def incidents(self) -> list[dict]:
        return [r for r in self.supervisor.audit_records() if r["action"] == "incident"]


def refusal_errnos(attack: str, memfd: bool) -> set[str]:
    """What the kernel says when it refuses. Path and link attacks on a memfd meet /proc/<pid>/fd, a directory
    in which nothing can be created, and a mount nothing else lives on: ENOENT and EXDEV there."""
    attack_ = ATTACKS_BY_NAME[attack]
    if attack_.kind == "connect":
        return {"EACCES", "refused by the server"}
    if memfd and (attack_.kind == "path" or attack_.needs == "link"):
        return {"EPERM", "EACCES", "ENOENT", "EXDEV"}
    return {"EPERM", "EACCES"}


def check(arena, result: AttackResult) -> None:
    assert result.as_expected, result.describe()
    assert not result.succeeded
    assert arena.qemu.poll() is None, "QEMU died"
    memfd = arena.battery.memfd
    if result.observed in ("blocked", "refused"):
        assert result.error in refusal_errnos(result.attack, memfd), result.describe()
    if result.observed == "blocked":
        assert result.error == "EPERM", "the seals refuse with EPERM"
    if result.observed in ("repaired", "alerted", "failed"):
        assert result.incidents, "a change must leave an incident in the audit log"
        assert result.offender_named, f"fanotify should name pid {result.attacker_pid}: {result.describe()}"
        assert result.offender["uid"] == result.uid
    if result.observed == "repaired":
        assert result.repair_ms is not None and result.repair_ms < 1000
