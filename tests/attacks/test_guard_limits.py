"""The guard under pressure: thousands of hard links, an audit log that cannot take a record, floods of
refreshes, anchors of processes that are gone although their pid is alive, and peers admitted by the groups
they really hold."""

from __future__ import annotations

import glob
import json
import os
import pickle
import pwd
import shutil
import signal
import stat
import subprocess
import time

from helpers import MEMBER_USER, OUTSIDER_USER, RunningSupervisor, as_user, policy_file
from shmguard.audit import MAX_RECORD_BYTES
from shmguard.client import IvshmemClient
from shmguard.errors import ShmguardError
from shmguard.guard import Guard
from shmguard.policy import load_policy
from shmguard.region import Region
from shmguard.supervisor import Supervisor

LINKS = 10_000  # what a group member did to a supervisor in a review, with names of 200 characters
SETTLE = 0.3


def wait_until(condition, timeout: float = 10.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.02)


def incidents(supervisor: RunningSupervisor) -> list[dict]:
    """The incidents recorded; a line a full filesystem tore (sealed off later by a torn-tail record) is none."""
    records = []
    with open(supervisor.audit) as log:
        for line in log:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return [r for r in records if r["action"] == "incident"]


def make_links(region: str, prefix: str, count: int) -> int:
    for n in range(count):
        os.link(region, f"{prefix}{n:05d}")
    return count


def test_thousands_of_hard_links_by_a_member_are_all_removed_and_recorded(tmp_path):
    supervisor = RunningSupervisor(policy_file(tmp_path, "standard"))
    prefix = f"/dev/shm/shmguard-links-{os.getpid()}-"
    prefix += "x" * (200 - len(os.path.basename(prefix)) - 5)  # names of 200 characters
    try:
        region = supervisor.region_path
        inode = os.stat(region).st_ino
        os.kill(supervisor.proc.pid, signal.SIGSTOP)  # the guard finds every link at once, as in the review
        try:
            assert as_user(MEMBER_USER, make_links, region, prefix, LINKS) == LINKS
        finally:
            os.kill(supervisor.proc.pid, signal.SIGCONT)
        wait_until(lambda: os.stat(region).st_nlink == 2, what="every stray link removed")
        assert glob.glob(f"{prefix}*") == []
        time.sleep(SETTLE)  # the last incidents wait up to 20 ms for their offender
        assert supervisor.proc.poll() is None, supervisor.log()
        links = [r for r in incidents(supervisor) if r["detail"]["kind"] == "extra-link"]
        assert links and all(r["result"] == "repaired" for r in links), links
        assert links[0]["detail"]["before"]["strays_count"] == LINKS
        assert sum(r["detail"]["after"]["removed_count"] for r in links) == LINKS
        assert all(len(r["detail"]["before"]["strays"]) <= 16 for r in links)
        with open(supervisor.audit, "rb") as log:
            longest = max(len(line) for line in log)
        assert longest < MAX_RECORD_BYTES // 2, f"a record of {longest} bytes"
        assert os.stat(region).st_ino == inode
        assert "internal error" not in supervisor.log() and "Traceback" not in supervisor.log()
    finally:
        for name in glob.glob(f"{prefix}*"):
            os.unlink(name)
        assert supervisor.stop() == 0


def fill(path: str) -> None:
    """Write until the filesystem is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        chunk = bytes(65536)
        while True:
            try:
                os.write(fd, chunk)
            except OSError:
                try:
                    while True:
                        os.write(fd, b"\0")  # the last bytes too
                except OSError:
                    return
    finally:
        os.close(fd)


def test_an_incident_the_audit_log_cannot_take_is_repaired_and_logged(tmp_path):
    mount = tmp_path / "audit"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "shmguard-test-audit", str(mount)],
                   check=True)
    try:
        policy = policy_file(tmp_path, "standard", audit={"path": str(mount / "audit.log")})
        supervisor = RunningSupervisor(policy)
        try:
            region = supervisor.region_path
            fill(str(mount / "filler"))
            for _ in range(20):  # the log's last page may still have room for a record or two
                os.chmod(region, 0o666)
                wait_until(lambda: stat.S_IMODE(os.stat(region).st_mode) == 0o660, what="repaired")
                time.sleep(0.05)  # recorded (or not) once its offender is named, at most 20 ms later
                if "incident not recorded" in supervisor.log():
                    break
            supervisor.wait_for_log(r"ERROR: guard: incident not recorded in the audit log \(.*\): attributes at "
                                    rf"{region}: repaired", timeout=10)
            assert stat.S_IMODE(os.stat(region).st_mode) == 0o660, "the repair does not depend on the record"
            assert supervisor.proc.poll() is None
            os.unlink(mount / "filler")
            recorded = len(incidents(supervisor))
            os.chmod(region, 0o600)
            wait_until(lambda: len(incidents(supervisor)) > recorded,
                       what="the next incident recorded once the log has room again")
            assert incidents(supervisor)[-1]["detail"]["before"]["region"]["mode"] == "0600"
            assert stat.S_IMODE(os.stat(region).st_mode) == 0o660
            supervisor.cli("audit", "verify", "--policy", str(policy))
        finally:
            assert supervisor.stop() == 0, supervisor.log()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_flood_of_refreshes_reads_the_region_once_per_interval(tmp_path):
    """Each refresh reads the whole region: one asked for within 50 ms of the last is done once, later."""
    policy = load_policy(str(policy_file(tmp_path, "strict")))
    supervisor = Supervisor(policy)
    supervisor.region = Region.create(policy.region)
    region = policy.region
    guard = Guard(policy.guard, supervisor.region, supervisor.loop, record=supervisor.record,
                  region_attributes=(region.owner, region.group, region.mode))
    guard.start()
    try:
        mapping = supervisor.region.mapping
        mapping[0:5] = b"first"
        assert guard.refresh(), "the first refresh is done at once"
        mapping[0:5] = b"again"
        assert not guard.refresh(), "deferred"
        mapping[0:5] = b"third"
        assert not guard.refresh(), "deferred, and done only once"
        assert bytes(guard.contents.known_good.data[:5]) == b"first"
        deadline = time.monotonic() + 2
        while bytes(guard.contents.known_good.data[:5]) != b"third" and time.monotonic() < deadline:
            supervisor.loop.run_once(timeout=0.1)
        assert bytes(guard.contents.known_good.data[:5]) == b"third", "the deferred refresh took the latest contents"
    finally:
        guard.close()
        supervisor.region.close()


def process_start(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[19])


def test_anchors_belong_to_one_process_not_to_a_pid(tmp_path):
    """pid 1 is always alive (and in a container a restarted supervisor may be pid 1 again): an anchor is
    stale unless its owner is the very process that made it, same pid, start time and boot."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip().replace("-", "")
    me, started = os.getpid(), process_start(os.getpid())
    anchors = {
        f"/dev/shm/.shmguard-anchor.1.{process_start(1) + 1}.{boot}.reused": False,  # pid 1, another process
        f"/dev/shm/.shmguard-anchor.{me}.{started}.{'0' * 32}.lastboot": False,  # same pid and start, other boot
        f"/dev/shm/.shmguard-anchor.{me}.legacy": False,  # an older name: its pid does not hold the inode
        f"/dev/shm/.shmguard-anchor.{me}.{started}.{boot}.alive": True,  # this very process
        f"/dev/shm/.shmguard-anchor.{me}.heldopen": True,  # an older name whose pid holds the inode open
    }
    held = []
    try:
        for directory in anchors:
            os.mkdir(directory, 0o700)
            with open(os.path.join(directory, "region"), "wb") as f:
                f.write(b"pinned memory")
            if directory.endswith("heldopen"):
                held.append(os.open(os.path.join(directory, "region"), os.O_RDONLY))
        supervisor = RunningSupervisor(policy_file(tmp_path, "standard"))
        try:
            assert {directory: os.path.isdir(directory) for directory in anchors} == anchors
            own = glob.glob(f"/dev/shm/.shmguard-anchor.{supervisor.proc.pid}.*/region")
            assert len(own) == 1
            pid, start, boot_of_anchor = os.path.basename(os.path.dirname(own[0])).split(".")[2:5]
            assert (int(pid), int(start), boot_of_anchor) == (supervisor.proc.pid,
                                                               process_start(supervisor.proc.pid), boot)
        finally:
            assert supervisor.stop() == 0
    finally:
        for fd in held:
            os.close(fd)
        for directory in anchors:
            shutil.rmtree(directory, ignore_errors=True)


def join_with_groups(socket_path: str, user: str, groups: list[int]) -> str:
    """Join the ivshmem server as user, holding exactly groups as supplementary groups."""
    entry = pwd.getpwnam(user)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            os.setgroups(groups)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            try:
                IvshmemClient(socket_path, timeout=5.0).connect().close()
                outcome = "admitted"
            except ShmguardError as exc:
                outcome = f"refused: {exc}"
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            outcome = f"broken: {exc!r}"
        os.write(write_end, pickle.dumps(outcome))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return pickle.loads(data)


def test_peers_are_admitted_by_the_groups_they_really_hold(tmp_path):
    """A socket anyone may connect to, so that the server decides: a process that holds the policy's group
    (even only as a supplementary group) is a member; one without it is refused, whatever /etc/group says."""
    supervisor = RunningSupervisor(policy_file(tmp_path, "standard", server={"mode": "0666"}))
    try:
        group = load_policy(str(supervisor.policy_path)).server.group
        assert join_with_groups(supervisor.socket, OUTSIDER_USER, [group]) == "admitted"
        assert join_with_groups(supervisor.socket, OUTSIDER_USER, []).startswith("refused")
        assert pwd.getpwnam(MEMBER_USER).pw_gid != group, "the member holds the group as a supplementary group"
        assert join_with_groups(supervisor.socket, MEMBER_USER, []).startswith("refused"), \
            "a member that dropped the group is no longer one"
        refused = {r["actor"]["uid"] for r in supervisor.audit_records() if r["action"] == "refused"}
        assert refused == {pwd.getpwnam(OUTSIDER_USER).pw_uid, pwd.getpwnam(MEMBER_USER).pw_uid}
    finally:
        assert supervisor.stop() == 0
