"""The guard's promises one by one: what survives a repair, what the kernel allows for unlinked paths,
no repair loops, one record per unresolved incident, squatters on socket paths, stale anchors."""

from __future__ import annotations

import dataclasses
import errno
import glob
import mmap
import os
import signal
import time

import pytest

from arena import Arena
from helpers import MEMBER_USER, RunningSupervisor, as_user, policy_file
from shmguard.attack import AttackResult, Battery, exit_status, format_table, run_battery
from shmguard.client import IvshmemClient
from shmguard.control import ControlClient
from shmguard.hardening import read_proc_status
from shmguard.linux.inodes import link_fd
from shmguard.policy import load_policy

SETTLE = 0.3  # long enough for any repair, its own events and a deferred attribution (20 ms)


@pytest.fixture
def fresh(tmp_path):
    """A standard supervisor with QEMU attached, for attacks that leave lasting damage."""
    opened = Arena.open(tmp_path, "standard")
    yield opened
    assert opened.close() == 0, opened.supervisor.log()


def write(arena: Arena, text: bytes) -> None:
    assert ControlClient(arena.supervisor.control).write(text, text=True)["ok"]


def incidents_after(arena: Arena, count: int) -> list[dict]:
    time.sleep(SETTLE)
    return arena.incidents()[count:]


def region_fd(arena: Arena) -> int:
    return arena.battery.observer.shm_fd


def anchor_of(arena: Arena) -> str:
    found = glob.glob(f"/dev/shm/.shmguard-anchor.{arena.supervisor.proc.pid}.*/region")
    assert len(found) == 1, found
    return found[0]


def paused(arena: Arena):
    """SIGSTOP the supervisor so that several changes land before the guard looks (SIGCONT on exit)."""

    class Paused:
        def __enter__(self):
            os.kill(arena.supervisor.proc.pid, signal.SIGSTOP)

        def __exit__(self, *exc):
            os.kill(arena.supervisor.proc.pid, signal.SIGCONT)

    return Paused()


def test_one_truncation_one_incident_and_no_repair_loop(fresh):
    before = len(fresh.incidents())
    os.truncate(fresh.battery.region, 0)
    added = incidents_after(fresh, before)
    assert [(r["detail"]["kind"], r["result"]) for r in added] == [("shrink", "repaired")]
    assert incidents_after(fresh, before + 1) == [], "the guard's own ftruncate/pwrite/chmod must find nothing"
    assert os.fstat(region_fd(fresh)).st_size == fresh.battery.size


def test_what_survives_a_repair(fresh):
    """Audited writes and in-place writes through the path survive; bytes written only through a mapping
    since the guard last saw the file intact do not."""
    write(fresh, b"the audited message")

    def member_writes_in_place(path):
        fd = os.open(path, os.O_WRONLY)
        os.pwrite(fd, b"a member's in-place bytes", 1024)
        os.close(fd)

    as_user(MEMBER_USER, member_writes_in_place, fresh.battery.region)
    time.sleep(SETTLE)  # the guard refreshes its copy on the IN_MODIFY of that write
    with open(fresh.battery.region, "r+b") as f, mmap.mmap(f.fileno(), 4096) as mapping:
        mapping[2048:2048 + 13] = b"mapped bytes!"  # like a guest: no inotify event at all
    os.truncate(fresh.battery.region, 0)
    time.sleep(SETTLE)
    fd = region_fd(fresh)
    assert os.pread(fd, 20, 0) == b"the audited message\0"
    assert os.pread(fd, 25, 1024) == b"a member's in-place bytes"
    assert os.pread(fd, 13, 2048) == bytes(13), "a write the guard never saw cannot come back"


def test_a_write_after_the_truncation_belongs_to_the_tampering(fresh):
    """`echo hello >`: open(O_TRUNC), then write. The write lands after the repair, at full size; until the
    writer closes, it is undone too. After the close an in-place write is an in-place write again."""
    write(fresh, b"the audited message")
    before = len(fresh.incidents())
    fd = os.open(fresh.battery.region, os.O_WRONLY | os.O_TRUNC)
    try:
        time.sleep(SETTLE)  # repaired: full size, the message back
        os.write(fd, b"hello\n")
        added = incidents_after(fresh, before)
    finally:
        os.close(fd)
    assert [(r["detail"]["kind"], r["result"]) for r in added] == [("shrink", "repaired"), ("contents", "repaired")]
    assert os.pread(region_fd(fresh), 20, 0) == b"the audited message\0"
    time.sleep(SETTLE)
    with open(fresh.battery.region, "r+b") as f:
        f.write(b"in place")
    time.sleep(SETTLE)
    assert os.pread(region_fd(fresh), 8, 0) == b"in place", "after the close, writers write again"


def test_kernel_never_relinks_an_inode_whose_last_link_is_gone(tmp_path):
    """The reason for the guard's anchor: linkat(/proc/self/fd/N, AT_SYMLINK_FOLLOW) works while st_nlink > 0,
    then ENOENT, even for an O_TMPFILE file once it has been linked."""
    path = f"/dev/shm/shmguard-relink-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    tmpfile = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        link_fd(fd, path + ".second")  # still linked once: allowed
        os.unlink(path + ".second")
        os.unlink(path)
        with pytest.raises(FileNotFoundError):
            link_fd(fd, path)
        link_fd(tmpfile, path)  # an O_TMPFILE may be linked once ...
        os.unlink(path)
        with pytest.raises(OSError) as refused:
            link_fd(tmpfile, path)  # ... and never again
        assert refused.value.errno == errno.ENOENT
    finally:
        os.close(fd)
        os.close(tmpfile)
        for leftover in (path, path + ".second"):
            if os.path.lexists(leftover):
                os.unlink(leftover)


def test_os_link_cannot_relink_through_proc():
    """os.link calls link(2), which links the /proc magic link itself (EXDEV), never the inode behind it:
    the guard calls linkat(AT_SYMLINK_FOLLOW) through ctypes instead."""
    holder = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR, 0o600)
    target = f"/dev/shm/shmguard-python-link-{os.getpid()}"
    try:
        with pytest.raises(OSError) as refused:
            os.link(f"/proc/self/fd/{holder}", target)
        assert refused.value.errno == errno.EXDEV
        link_fd(holder, target)
        assert os.stat(target).st_ino == os.fstat(holder).st_ino
    finally:
        os.close(holder)
        if os.path.lexists(target):
            os.unlink(target)


def test_rm_of_the_path_is_undone_through_the_anchor(fresh):
    before = len(fresh.incidents())
    inode = os.fstat(region_fd(fresh)).st_ino
    os.unlink(fresh.battery.region)
    added = incidents_after(fresh, before)
    assert [(r["detail"]["kind"], r["result"]) for r in added] == [("unlink", "repaired")]
    assert os.stat(fresh.battery.region).st_ino == inode, "the same inode, not a copy"


def test_every_link_gone_is_recorded_as_failed_and_peers_keep_the_region(fresh):
    write(fresh, b"still here")
    before = len(fresh.incidents())
    inode = os.fstat(region_fd(fresh)).st_ino
    anchor = anchor_of(fresh)
    with paused(fresh):
        os.unlink(fresh.battery.region)
        os.unlink(anchor)
    added = incidents_after(fresh, before)
    assert [(r["detail"]["kind"], r["result"]) for r in added] == [("unlink", "failed")]
    assert "ENOENT" in added[0]["detail"]["after"]["error"]
    assert not os.path.exists(fresh.battery.region), "no impostor file with a copy of the contents"
    with IvshmemClient(fresh.supervisor.socket) as peer:
        assert os.fstat(peer.shm_fd).st_ino == inode
        assert os.pread(peer.shm_fd, 11, 0) == b"still here\0"
    assert fresh.qemu.poll() is None
    assert incidents_after(fresh, before + 1) == [], "recorded once, not on every later event"


def test_a_removed_anchor_is_renewed(fresh):
    before = len(fresh.incidents())
    os.unlink(anchor_of(fresh))
    added = incidents_after(fresh, before)
    assert [(r["detail"]["kind"], r["result"]) for r in added] == [("anchor", "repaired")]
    assert os.fstat(region_fd(fresh)).st_nlink == 2
    assert os.stat(anchor_of(fresh)).st_ino == os.fstat(region_fd(fresh)).st_ino


def test_a_directory_squatting_on_the_socket_path_is_moved_aside(fresh):
    path = fresh.supervisor.socket
    before = len(fresh.incidents())
    with paused(fresh):
        os.unlink(path)
        os.mkdir(path)
        open(os.path.join(path, "bait"), "w").close()
    added = incidents_after(fresh, before)
    assert [(r["detail"]["kind"], r["result"]) for r in added] == [("socket-replaced", "repaired")]
    aside = added[0]["detail"]["after"]["moved_aside"]
    assert os.path.isdir(aside) and os.path.exists(os.path.join(aside, "bait"))
    IvshmemClient(path).connect().close()


def test_alert_records_once_per_distinct_drift(tmp_path):
    supervisor = RunningSupervisor(policy_file(tmp_path, "standard", guard={"on_attributes": "alert"}))
    try:
        path = supervisor.region_path

        def incidents():
            time.sleep(SETTLE)
            return [(r["detail"]["kind"], r["result"]) for r in supervisor.audit_records()
                    if r["action"] == "incident"]

        os.chmod(path, 0o666)
        assert incidents() == [("attributes", "alerted")]
        with open(path, "r+b") as f:
            f.write(b"x")  # another event while the drift stands: no second record
        assert incidents() == [("attributes", "alerted")]
        os.chmod(path, 0o640)
        assert incidents() == [("attributes", "alerted")] * 2
        os.chmod(path, 0o660)
        os.chmod(path, 0o666)
        assert incidents() == [("attributes", "alerted")] * 3
        assert os.stat(path).st_mode & 0o777 == 0o666, "alert only: the guard changes nothing"
    finally:
        assert supervisor.stop() == 0


def test_stale_anchors_of_dead_supervisors_are_removed_at_start(tmp_path):
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    stale = f"/dev/shm/.shmguard-anchor.{dead}.stale"
    os.mkdir(stale, 0o700)
    with open(os.path.join(stale, "region"), "wb") as f:
        f.write(b"pinned memory of a supervisor that was killed")
    supervisor = RunningSupervisor(policy_file(tmp_path, "standard"))
    try:
        assert not os.path.exists(stale)
    finally:
        assert supervisor.stop() == 0
    assert glob.glob(f"/dev/shm/.shmguard-anchor.{supervisor.proc.pid}.*") == [], "removed at stop"


def test_opening_the_sealed_memfd_is_recorded_with_its_offender(tmp_path):
    arena = Arena.open(tmp_path, "strict")
    try:
        result = arena.battery.run("open-for-write", "root")
        assert result.observed == "allowed"
        assert [(i["kind"], i["result"]) for i in result.incidents] == [("region-opened", "blocked")]
        assert result.offender_named
    finally:
        assert arena.close() == 0


def test_run_battery_on_a_throwaway_supervisor():
    results = run_battery("standard", start_supervisor=True, with_qemu=True,
                          attacks=["truncate-zero", "chmod-0666", "rm", "connect"])
    assert len(results) == 12
    assert all(result.as_expected for result in results), format_table(results)
    table = format_table(results)
    assert table.splitlines()[0].split()[:4] == ["attack", "as", "expected", "observed"]
    assert table.splitlines()[-1] == "12 attacks, 0 succeeded"
    assert exit_status(results) == 0
    assert exit_status([_succeeded(results[0])]) == 1


def test_battery_against_a_supervisor_started_with_overrides(tmp_path):
    """What the demo does: `shmguard run --policy strict --audit-log ...`, then the whole battery."""
    moved = tmp_path / "moved.log"
    supervisor = RunningSupervisor(policy_file(tmp_path, "strict"), "--audit-log", str(moved))
    try:
        policy = load_policy(str(supervisor.policy_path)).with_overrides(audit_log=moved)
        with Battery(policy, supervisor=supervisor.proc) as battery:
            results = battery.run_all()
        assert results and all(result.defended for result in results), format_table(results)
    finally:
        assert supervisor.stop() == 0


def _succeeded(result: AttackResult) -> AttackResult:
    return dataclasses.replace(result, observed="FAILED", problems=("region is 0 bytes",))


def _witness_of(supervisor_pid: int) -> int:
    """The opener witness: the supervisor's child named shmguard-witness (comm keeps 15 characters)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)
        except OSError:
            continue
        comm, ppid = fields[0].split(b"(", 1)[1], int(fields[1].split()[1])
        if ppid == supervisor_pid and comm == b"shmguard-witnes":
            return int(name)
    raise AssertionError(f"supervisor {supervisor_pid} has no opener witness")


def test_a_stopped_supervisor_never_holds_an_open_of_the_region(tmp_path):
    """Opens of the region are held only by the opener witness, which answers at once: a supervisor that is
    stopped (or busy) delays no member's open."""
    supervisor = RunningSupervisor(policy_file(tmp_path, "standard"))
    try:
        os.kill(supervisor.proc.pid, signal.SIGSTOP)
        try:
            as_user(MEMBER_USER, lambda path: os.close(os.open(path, os.O_RDONLY)), supervisor.region_path)
        finally:
            os.kill(supervisor.proc.pid, signal.SIGCONT)
    finally:
        assert supervisor.stop() == 0


@pytest.mark.parametrize("hardening", [{}, {"user": MEMBER_USER, "group": "ivshmem"}], ids=["root", "dropped"])
def test_the_opener_witness_dies_with_the_supervisor_and_opens_go_on(tmp_path, hardening):
    """It keeps no capability and has no_new_privs; when the supervisor is killed it dies too, and the kernel
    allows opens again, also when the supervisor had dropped to another user (which may not signal root's)."""
    supervisor = RunningSupervisor(policy_file(tmp_path, "standard", hardening=hardening))
    witness = _witness_of(supervisor.proc.pid)
    status = read_proc_status(witness)
    assert (status["CapEff"], status["CapPrm"], status["CapBnd"], status["NoNewPrivs"]) == ("0" * 16,) * 3 + ("1",)
    supervisor.stop(signal.SIGKILL)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{witness}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{witness}"), "the witness outlived its supervisor"
    path = supervisor.region_path
    try:
        as_user(MEMBER_USER, lambda p: os.close(os.open(p, os.O_RDONLY)), path)
    finally:
        for leftover in glob.glob(f"/dev/shm/.shmguard-anchor.{supervisor.proc.pid}.*"):
            for inner in glob.glob(f"{leftover}/*"):
                os.unlink(inner)
            os.rmdir(leftover)
        os.unlink(path)
