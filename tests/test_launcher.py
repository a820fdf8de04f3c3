"""ThrowawaySupervisor, the one way to start a supervisor of its own: relocated or as it is, restartable, its paths
named, its log readable after it is gone, a supervisor that drops to another user still heard, a failure one line."""

from __future__ import annotations

import os
import pwd
import stat
import tempfile
from pathlib import Path

import pytest

from helpers import MEMBER_USER, RunningSupervisor, policy_file
from shmguard.audit import verify
from shmguard.errors import PolicyError, ShmguardError
from shmguard.launcher import ThrowawaySupervisor, run_overrides


@pytest.mark.pure
def test_run_overrides_are_the_options_that_move_a_policys_paths():
    args = ("--audit-log", "/a/log", "--socket=/s.sock", "-v", "--vectors", "4", "--qemu-arg=--socket")
    assert run_overrides(args) == {"audit_log": "/a/log", "socket": "/s.sock", "vectors": "4"}
    assert run_overrides(("--audit-log",)) == {}  # click refuses it; nothing to name


def test_a_relocated_policy_lives_in_its_directory_and_goes_with_it():
    supervisor = ThrowawaySupervisor("standard", region={"size": 8192})
    directory, region = supervisor.directory, supervisor.region_path
    try:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755
        for path in (supervisor.socket, supervisor.control, supervisor.audit, supervisor.policy_path):
            assert Path(path).parent == directory
        assert supervisor.policy.region.size == 8192  # a file-backed region, in a path of its own
        assert supervisor.region_path.startswith("/dev/shm/shmguard-supervisor-") and os.path.exists(region)
        reply = supervisor.client().write(b"hello", text=True)
        assert [r["seq"] for r in supervisor.audit_records() if r["action"] == "write"] == [reply["seq"]]
        assert supervisor.wait_for_log(r"serving (\S+)").group(1) == supervisor.socket
        with pytest.raises(ShmguardError, match="'never said' not in the supervisor's log within 0.3 s"):
            supervisor.wait_for_log("never said", timeout=0.3)
    finally:
        assert supervisor.stop() == 0
    assert not directory.exists() and not os.path.exists(region)
    assert "serving" in supervisor.log()  # still readable once the directory is gone


def test_restart_keeps_the_directory_the_policy_and_the_audit_chain():
    supervisor = ThrowawaySupervisor("strict", region={"size": 4096}, audit={"durable": True})
    try:
        first = supervisor.client().write(b"before", text=True)["seq"]
        pid = supervisor.proc.pid
        assert supervisor.restart() == 0
        assert supervisor.proc.pid != pid
        second = supervisor.client().write(b"after", text=True)["seq"]
        assert second > first
        assert [r["action"] for r in supervisor.audit_records()].count("start") == 2
        assert verify(supervisor.audit).ok
        supervisor.proc.kill()  # a crash, not a stop: start() picks up after it as well
        supervisor.proc.wait()
        supervisor.start()
        assert supervisor.client().status()
        assert supervisor.stop(remove=False) == 0
        supervisor.start()
        with pytest.raises(ShmguardError, match="already running"):
            supervisor.start()
    finally:
        supervisor.stop()
    with pytest.raises(ShmguardError, match="was removed when the supervisor stopped"):
        supervisor.start()


def test_a_policy_file_runs_as_it_is_and_stays(tmp_path):
    path = policy_file(tmp_path, region={"size": 4096})
    text = path.read_text()
    supervisor = ThrowawaySupervisor(str(path), "--audit-log", str(tmp_path / "moved.log"), relocate=False)
    try:
        assert supervisor.policy_path == path and supervisor.audit == str(tmp_path / "moved.log")
        assert sorted(p.name for p in supervisor.directory.iterdir()) == ["notify", "supervisor.log"]
        supervisor.client().write(b"x", text=True)
        assert supervisor.audit_records()[-1]["action"] == "write"
    finally:
        assert supervisor.stop() == 0
    assert path.read_text() == text and (tmp_path / "moved.log").exists()
    with pytest.raises(ShmguardError, match="takes no sections"):
        ThrowawaySupervisor(str(path), relocate=False, region={"size": 8192})


def test_a_supervisor_that_drops_to_another_user_is_heard_and_only_that_user_can_speak():
    supervisor = ThrowawaySupervisor("strict", region={"size": 4096},
                                     hardening={"user": MEMBER_USER, "group": "ivshmem"})
    try:
        member = pwd.getpwnam(MEMBER_USER).pw_uid
        notify = os.stat(supervisor.notify_path)
        assert (notify.st_uid, stat.S_IMODE(notify.st_mode)) == (member, 0o600)
        assert "running as user" in supervisor.log()
    finally:
        supervisor.stop()  # its status is the supervisor's business (test_supervisor_hardening.py)
    assert not supervisor.directory.exists()


def test_a_supervisor_that_cannot_start_is_one_line_and_leaves_nothing():
    parent = Path(tempfile.mkdtemp(prefix="shmguard-test-"))
    try:
        with pytest.raises(PolicyError):  # refused before it runs
            ThrowawaySupervisor("strict", parent=parent, region={"size": 1000})
        with pytest.raises(ShmguardError) as refused:  # made, started, and gone again
            ThrowawaySupervisor("strict", "--socket", "/proc/self/no/ivshmem.sock", parent=parent)
        assert str(refused.value).startswith("the throwaway supervisor did not start: ")
        assert "\n" not in str(refused.value)
        assert list(parent.iterdir()) == []
    finally:
        os.rmdir(parent)


def test_the_tests_running_supervisor_is_the_same_thing(tmp_path):
    policy = policy_file(tmp_path, region={"size": 4096})
    supervisor = RunningSupervisor(policy)
    assert isinstance(supervisor, ThrowawaySupervisor) and supervisor.policy["region"]["size"] == 4096
    sockets = Path(supervisor.socket).parent
    assert supervisor.restart() == 0 and sockets.is_dir()  # a restart keeps the policy's sockets' directory
    assert supervisor.stop() == 0
    assert not sockets.exists() and policy.exists()  # stop() takes it; the policy stays
