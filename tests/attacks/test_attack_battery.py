"""Every listed attack, as root, as a member of the policy's group and as an outsider, against strict and
standard, while a paused QEMU is attached: the defence the policy promises, and nothing else, happens."""

from __future__ import annotations

import pytest

from arena import check
from shmguard.attack import ATTACKS, ROLES

LISTED = [attack.name for attack in ATTACKS if not attack.extra and not attack.adversary]  # adversaries: their own file
INCIDENT_FIELDS = {"kind", "path", "before", "after", "response", "repair_ms", "offender"}


def audit_details(arena) -> list[dict]:
    return [record["detail"] for record in arena.incidents()]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("attack", LISTED)
def test_listed_attack(arena, attack, role):
    check(arena, arena.battery.run(attack, role))


def test_every_incident_names_what_happened(arena):
    arena.battery.run("truncate-zero" if arena.name == "standard" else "chmod-0666", "root")
    details = audit_details(arena)
    assert details
    for detail in details:
        assert INCIDENT_FIELDS <= set(detail), detail


def test_the_seed_script_can_no_longer_hurt(arena):
    """write_shared_memory.sh as written (dd without conv=notrunc), run by a member of the group."""
    result = arena.battery.run("seed-dd", "member")
    check(arena, result)
    expected = {"strict": "refused", "standard": "repaired"}[arena.name]
    assert result.observed == expected
