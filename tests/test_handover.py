"""The hand-over's format as data: the state's checksum, why a successor refuses, where the fds come from."""

from __future__ import annotations

import os

import pytest

from shmguard import handover
from shmguard.errors import ShmguardError

pytestmark = pytest.mark.pure

STATE = {"version": handover.STATE_VERSION, "fixed": {"region.size": 65536, "server.vectors": 2}}


def test_a_state_comes_back_whole_and_a_torn_one_not_at_all():
    raw = handover.encode_state(STATE, generation=7)
    assert handover.decode_state(raw) == {**STATE, "generation": 7}
    for torn in (raw[:-1], raw[:40], b"", raw.replace(b"65536", b"65537"), b"x\n{}"):
        assert handover.decode_state(torn) is None


@pytest.mark.parametrize("state, live, expected", [
    (STATE, STATE["fixed"], []),
    ({**STATE, "version": 2}, STATE["fixed"], ["state version 2; this shmguard takes version 1 only"]),
    ({"fixed": {}}, {}, ["state version None"]),
    (STATE, {"region.size": 131072, "server.vectors": 2}, ["region.size cannot change while peers are connected"]),
    (STATE, {"region.size": 65536, "server.vectors": 4}, ["server.vectors cannot change"]),
])
def test_a_successor_refuses_what_it_cannot_take(state, live, expected):
    found = handover.problems(state, live)
    assert len(found) == len(expected)
    for problem, words in zip(found, expected, strict=True):
        assert words in problem


@pytest.mark.parametrize("env, pid, expected", [
    ({"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "region:peer-1"}, 42, {"region": 3, "peer-1": 4}),
    ({"LISTEN_PID": "41", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "region:peer-1"}, 42, {}),  # not ours
    ({"LISTEN_PID": "42", "LISTEN_FDS": "x"}, 42, {}),
    ({"LISTEN_PID": "42", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "a:a"}, 42, {"a": 3, "a+": 4, "unknown-2": 5}),
    ({}, 42, {}),
])
def test_systemd_fds_by_name(env, pid, expected):
    assert handover.parse_listen_fds(env, pid) == expected


def test_the_exec_path_names_fds_and_refuses_garbage():
    assert handover.parse_fd_names(handover.handover_environment({"region": 7, "peer-3-v0": 12})) == \
        {"region": 7, "peer-3-v0": 12}
    for bad in ("region", "region=x", "=3"):
        with pytest.raises(ShmguardError):
            handover.parse_fd_names(bad)


def test_of_two_state_slots_the_whole_newer_one_wins():
    slots = {}
    for name, generation in (("state-a", 4), ("state-b", 5)):
        slots[name] = handover.state_memfd(STATE, generation)
    try:
        assert handover.newest_state(slots)["generation"] == 5
        os.ftruncate(slots["state-b"], 10)  # torn by a crash mid-write
        assert handover.newest_state(slots)["generation"] == 4
    finally:
        for fd in slots.values():
            os.close(fd)


def test_an_inheritance_closes_what_nobody_claimed():
    fds = {name: os.open("/dev/null", os.O_RDONLY) for name in ("region", "peer-9", "state-a")}
    inheritance = handover.Inheritance(STATE, fds, "fd store")
    inheritance.fd("region")
    assert inheritance.close_unclaimed() == ["peer-9"]
    with pytest.raises(OSError):
        os.fstat(fds["peer-9"])
    for name in ("region", "state-a"):
        os.close(fds[name])
    with pytest.raises(ShmguardError):
        inheritance.fd("control-listener")
