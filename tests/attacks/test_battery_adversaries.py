"""The adversaries inside the policy, through the battery: a peer that changes the flags of the descriptions it was
handed, a join the policy refuses, a member that takes every peer slot or control connection it can, a hole
punched through a peer's own fd. As every role the policy admits (the outsider is refused at the socket), against
strict and standard while a paused QEMU is attached: the supervisor is not turned, and says so in the log."""

from __future__ import annotations

import pytest

from shmguard.attack import ATTACKS, ATTACKS_BY_NAME, REFUSAL_NOTICE, ROLES

ADVERSARIES = [(attack.name, role) for attack in ATTACKS if attack.adversary for role in ROLES if role in attack.roles]
PROMISED = {  # attack: (strict, standard) as the member; the outsider is refused in both
    "peer-append-region": ("withstood", "withstood"),
    "peer-blocking-eventfds": ("withstood", "withstood"),
    "refused-peer-told": ("withstood", "withstood"),
    "peer-slots-hog": ("withstood", "withstood"),
    "control-connections-hog": ("withstood", "withstood"),
    "peer-punch-hole": ("repaired", "repaired"),
    "peer-preallocated-punch-hole": ("blocked", "repaired"),
}


def test_every_adversary_has_its_promise():
    assert sorted(PROMISED) == sorted(attack.name for attack in ATTACKS if attack.adversary)


def test_the_expected_defence_is_the_promised_one(arena):
    battery = arena.battery
    for name, by_policy in PROMISED.items():
        attack = ATTACKS_BY_NAME[name]
        member = battery.expected(attack, battery.identities["member"])
        assert member == by_policy[("strict", "standard").index(arena.name)], name
        assert battery.expected(attack, battery.identities["outsider"]) == "refused", name


@pytest.mark.parametrize(("attack", "role"), ADVERSARIES)
def test_adversary_is_defended(arena, attack, role):
    result = arena.battery.run(attack, role)
    assert result.describe()["adversary"], "--json says which attacks are adversaries"
    assert result.as_expected and result.defended, result.describe()
    assert arena.qemu.poll() is None, "QEMU died"
    assert arena.supervisor.proc.poll() is None, "the supervisor died"
    if role == "outsider" and not ATTACKS_BY_NAME[attack].fs_group_only:
        assert result.error == "EACCES", "the outsider is refused at the socket, by its mode"


def test_a_refused_peer_is_told_with_version_minus_one_and_the_log_says_why(arena):
    for role in ("outsider", "member"):  # the outsider reaches the server through its fsgid only; the member fills
        result = arena.battery.run("refused-peer-told", role)
        assert result.as_expected, result.describe()
        assert result.facts["refusal"] == {"first": REFUSAL_NOTICE, "then_eof": True}, result.describe()


def test_a_member_gets_at_most_its_share(arena):
    shares = arena.battery.policy.shares
    peers = arena.battery.run("peer-slots-hog", "member")
    assert 0 < peers.facts["joined"] <= shares.peers_per_uid, peers.describe()
    connections = arena.battery.run("control-connections-hog", "member")
    assert 0 < connections.facts["held"] <= shares.connections_per_uid, connections.describe()
    assert peers.as_expected and connections.as_expected, (peers.describe(), connections.describe())
