"""A running supervisor is hard to subvert: checked from outside, in /proc, and by trying."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import time

import pytest

from helpers import MEMBER_USER, RunningSupervisor, as_user, policy_file
from shmguard.hardening import capability_names, read_proc_status
from shmguard.protocol import recv_message


def open_fds_of(pid: int) -> list[int]:
    """What an attacker tries: open every fd of the target through /proc; returns those it got."""
    opened = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            fd = os.open(f"/proc/{pid}/fd/{name}", os.O_RDONLY)
        except OSError:
            continue
        opened.append(fd)
        os.close(fd)
    return opened


def list_fds_of(pid: int) -> list[str]:
    return os.listdir(f"/proc/{pid}/fd")


@pytest.fixture
def start(tmp_path):
    running = []

    def start(*args, base="strict", guest=False, **sections):
        supervisor = RunningSupervisor(policy_file(tmp_path, base=base, **sections), *args, guest=guest,
                                       timeout=120)
        running.append(supervisor)
        return supervisor

    yield start
    for supervisor in running:
        supervisor.stop()


def test_strict_supervisor_has_no_new_privs_no_capabilities_and_is_not_dumpable(start):
    supervisor = start()
    status = read_proc_status(supervisor.proc.pid)
    assert status["NoNewPrivs"] == "1"
    for field in ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"):
        assert int(status[field], 16) == 0, (field, status[field])
    # non-dumpable: the kernel hands its /proc files to root, whatever uid the process runs as
    assert os.stat(f"/proc/{supervisor.proc.pid}/fd").st_uid == 0


def test_standard_supervisor_keeps_exactly_the_capabilities_repairs_need(start):
    supervisor = start(base="standard")
    status = read_proc_status(supervisor.proc.pid)
    assert sorted(capability_names(status["CapEff"])) == ["chown", "dac_override", "fowner"]
    assert sorted(capability_names(status["CapPrm"])) == ["chown", "dac_override", "fowner"]
    assert status["NoNewPrivs"] == "1"


def test_a_process_of_the_same_uid_cannot_take_the_supervisors_fds(start):
    # The supervisor drops to a dedicated user; an attacker running as that same user tries /proc/PID/fd.
    member = pwd.getpwnam(MEMBER_USER)
    supervisor = start(hardening={"user": MEMBER_USER, "group": "ivshmem"})
    pid = supervisor.proc.pid
    assert read_proc_status(pid)["Uid"].split() == [str(member.pw_uid)] * 4
    with pytest.raises(PermissionError):
        as_user(MEMBER_USER, list_fds_of, pid)
    with pytest.raises(PermissionError):
        as_user(MEMBER_USER, os.open, f"/proc/{pid}/mem", os.O_RDONLY)
    # control: an ordinary process of that user falls to the same attack, so this test can fail
    decoy = subprocess.Popen(["sleep", "60"], user=member.pw_uid, group=member.pw_gid, extra_groups=[])
    try:
        assert as_user(MEMBER_USER, open_fds_of, decoy.pid)
    finally:
        decoy.kill()
        decoy.wait()
    # and it still stops cleanly, though its witness was forked as root before the drop
    assert supervisor.stop() == 0, supervisor.log_tail()


def test_qemu_starts_unprivileged_and_kill_9_of_the_supervisor_takes_it_down(start):
    supervisor = start("--qemu-arg=-S", guest=True)  # a parked guest is enough: only the process matters
    qemu_pid = int(supervisor.wait_for_log(r"started QEMU pid (\d+)").group(1))
    qemu = read_proc_status(qemu_pid)  # started after hardening: nothing the supervisor dropped comes back
    assert qemu["NoNewPrivs"] == "1" and int(qemu["CapEff"], 16) == 0 and int(qemu["CapPrm"], 16) == 0
    supervisor.proc.send_signal(signal.SIGKILL)
    supervisor.proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(qemu_pid):
        time.sleep(0.05)
    assert not _alive(qemu_pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_ready_is_sent_only_once_a_peer_can_connect(start):
    supervisor = start()  # RunningSupervisor returns as soon as READY=1 arrived
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(supervisor.socket)  # no retry: the socket must already be listening
    version, fds = recv_message(sock)
    assert version == 0 and fds == []
    sock.close()
