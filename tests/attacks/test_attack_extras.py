"""What a demanding attacker tries beyond the list: hard links, same-size rename-over, set-id bits, ACLs,
punched holes, truncate-and-regrow, bursts of truncations, truncations racing audited writes."""

from __future__ import annotations

import os

import pytest

from arena import check
from shmguard.attack import ATTACKS, ROLES

EXTRAS = [(attack.name, role) for attack in ATTACKS if attack.extra for role in ROLES if role in attack.roles]


@pytest.mark.parametrize(("attack", "role"), EXTRAS)
def test_extra_attack(arena, attack, role):
    check(arena, arena.battery.run(attack, role))


def test_no_stray_link_survives_a_hard_link_attack(arena):
    arena.battery.run("hardlink-truncate", "member")
    if arena.battery.memfd:
        return  # a memfd cannot be linked anywhere (EXDEV): nothing to look for
    region = os.fstat(arena.battery.observer.shm_fd)
    assert region.st_nlink == 2, "the path and the guard's private anchor, nothing else"
    strays = [entry.name for entry in os.scandir("/dev/shm")
              if entry.inode() == region.st_ino and entry.path != arena.battery.region]
    assert strays == []


def test_no_acl_survives(arena):
    result = arena.battery.run("acl-grant", "root")
    check(arena, result)
    assert "system.posix_acl_access" not in os.listxattr(arena.battery.region)


def test_a_burst_is_repaired_without_a_record_per_event_storm(arena):
    before = len(arena.incidents())
    result = arena.battery.run("truncate-burst", "root")
    check(arena, result)
    added = len(arena.incidents()) - before
    assert added <= 100, "at most one incident per truncation, and usually far fewer (events coalesce)"


def test_audited_writes_survive_truncations_racing_them(arena):
    """The supervisor writes by pwrite on the file backend: a racing truncation cannot SIGBUS it."""
    result = arena.battery.run("truncate-during-write", "member" if not arena.battery.memfd else "root")
    check(arena, result)
    assert arena.supervisor.proc.poll() is None
