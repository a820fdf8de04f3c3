"""Tampers that make no event, or whose traces another change hides, and offenders gone before they are named.

A hole punched through a memfd's own file description makes no fsnotify event (docs/protocol.md §4): only the guard's
periodic scan finds it. On the file backend a KEEP_SIZE pre-allocation past the end keeps st_blocks up while a hole
is punched inside. A known-good copy is never taken from a damaged region. A short-lived process (`truncate`) is
named with its uid and program, read while the kernel held it inside open().
"""

from __future__ import annotations

import ctypes
import mmap
import os
import pwd
import signal
import subprocess
import time

import pytest

from helpers import MEMBER_USER, RunningSupervisor, as_user, policy_file
from shmguard.client import IvshmemClient, answering_uids
from shmguard.control import ControlClient
from shmguard.guard import Allocation, Guard, KnownGood, first_hole
from shmguard.loop import EventLoop
from shmguard.policy import load_policy
from shmguard.region import Region

KEEP_SIZE, PUNCH_HOLE = 0x1, 0x2
PAGE = 4096
WAIT = 10.0  # generous: a bound on waiting, never a timing assertion
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.syscall.restype = ctypes.c_long
SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 434, 438


def guard_alone(policy, region: Region, loop: EventLoop, records: list[dict]) -> Guard:
    """A guard of the region with no sockets and no peers, recording into records."""
    attributes = (policy.region.owner, policy.region.group, policy.region.mode)
    return Guard(policy.guard, region, loop, record=lambda action, **kw: records.append({"action": action, **kw}),
                 region_attributes=attributes)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def punch(fd: int, offset: int, length: int = PAGE) -> None:
    fallocate(fd, PUNCH_HOLE | KEEP_SIZE, offset, length)


def take_fd(pid: int, fd: int) -> int:
    """pidfd_getfd: the very open file description another process holds (root, with CAP_SYS_PTRACE)."""
    pidfd = _libc.syscall(SYS_PIDFD_OPEN, pid, 0)
    assert pidfd >= 0, os.strerror(ctypes.get_errno())
    try:
        taken = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        assert taken >= 0, os.strerror(ctypes.get_errno())
        return taken
    finally:
        os.close(pidfd)


def region_fd_of(supervisor: RunningSupervisor) -> int:
    """The fd number of the supervisor's own memfd (its /memfd: link)."""
    directory = f"/proc/{supervisor.proc.pid}/fd"
    for name in os.listdir(directory):
        try:
            if os.readlink(os.path.join(directory, name)).startswith("/memfd:"):
                return int(name)
        except OSError:
            continue
    raise AssertionError("the supervisor holds no memfd")


def write(supervisor: RunningSupervisor, text: bytes, offset: int = 0) -> None:
    answerers = answering_uids(load_policy(str(supervisor.policy_path)))
    assert ControlClient(supervisor.control, answerers=answerers).write(text, offset, text=True)["ok"]


def incidents(supervisor: RunningSupervisor) -> list[dict]:
    return [r for r in supervisor.audit_records() if r["action"] == "incident"]


def wait_for_incidents(supervisor: RunningSupervisor, count: int, kinds: set[str]) -> list[dict]:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        found = [r for r in incidents(supervisor)[count:] if r["detail"]["kind"] in kinds]
        if found:
            time.sleep(0.3)  # let an incident that follows from the same tamper be recorded too
            return incidents(supervisor)[count:]
        time.sleep(0.02)
    raise AssertionError(f"no {sorted(kinds)} incident within {WAIT} s: {incidents(supervisor)[count:]}\n"
                         f"{supervisor.log()}")


@pytest.fixture
def strict(tmp_path):
    supervisor = RunningSupervisor(policy_file(tmp_path, "strict"))
    yield supervisor
    assert supervisor.stop() == 0, supervisor.log()


@pytest.fixture
def standard(tmp_path):
    supervisor = RunningSupervisor(policy_file(tmp_path, "standard"))
    yield supervisor
    assert supervisor.stop() == 0, supervisor.log()


# --------------------------------------------------------------------------------------- the kernel facts


def test_a_memfd_makes_no_fsnotify_event_through_its_own_description():
    """Why the guard must look: a punch through the memfd's own description is silent; through a description
    opened by path it is not."""
    from inotify_simple import INotify
    from inotify_simple import flags as F

    memfd = os.memfd_create("shmguard-fact", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    watcher = INotify(nonblocking=True)
    try:
        os.ftruncate(memfd, 4 * PAGE)
        os.posix_fallocate(memfd, 0, 4 * PAGE)
        watcher.add_watch(f"/proc/self/fd/{memfd}", F.MODIFY)
        punch(memfd, 0)
        assert watcher.read(timeout=0) == [], "the memfd's own description made an event"
        by_path = os.open(f"/proc/self/fd/{memfd}", os.O_RDWR | os.O_CLOEXEC)
        punch(by_path, PAGE)
        os.close(by_path)
        assert [e.mask & F.MODIFY for e in watcher.read(timeout=0)] == [F.MODIFY]
    finally:
        watcher.close()
        os.close(memfd)


def test_keep_size_preallocation_hides_a_hole_from_st_blocks_but_not_from_seek_hole(tmp_path):
    """On tmpfs: as many pages allocated past the end as are punched inside leave st_blocks unchanged."""
    path = f"/dev/shm/shmguard-prealloc-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.pwrite(fd, b"x" * 8 * PAGE, 0)
        full = os.fstat(fd).st_blocks
        fallocate(fd, KEEP_SIZE, 8 * PAGE, PAGE)
        punch(fd, 2 * PAGE)
        assert os.fstat(fd).st_blocks == full
        assert first_hole(fd, 8 * PAGE) == 2 * PAGE
        assert not KnownGood(bytes(8 * PAGE)).refresh(fd, 8 * PAGE, full), "a punched region is no known-good copy"
    finally:
        os.close(fd)
        os.unlink(path)


def test_the_sealed_memfd_refuses_allocation_past_its_end():
    """Why st_blocks below full is exact for the memfd: F_SEAL_GROW refuses KEEP_SIZE allocation past EOF."""
    import fcntl

    memfd = os.memfd_create("shmguard-fact", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, 4 * PAGE)
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        with pytest.raises(PermissionError):
            fallocate(memfd, KEEP_SIZE, 4 * PAGE, PAGE)
    finally:
        os.close(memfd)


# --------------------------------------------------------------------------------------- memfd (strict)


def test_a_hole_punched_through_the_memfds_own_description_is_found_and_repaired(strict):
    """Root takes the supervisor's own region description (pidfd_getfd) and punches: no event at all."""
    write(strict, b"the audited message")
    answerers = answering_uids(load_policy(str(strict.policy_path)))
    with IvshmemClient(strict.socket, answerers=answerers) as holder:  # a peer holding the region meanwhile
        before = len(incidents(strict))
        fd = take_fd(strict.proc.pid, region_fd_of(strict))
        try:
            punch(fd, 0)
            assert os.pread(fd, 19, 0) == bytes(19)
            added = wait_for_incidents(strict, before, {"hole"})
            assert [(r["detail"]["kind"], r["result"]) for r in added] == [("hole", "repaired")]
            detail = added[0]["detail"]
            assert detail["found_by"] == "scan"
            assert detail["offender"] == "unknown"
            assert "memfd's own file description" in detail["offender_unknown"]
            assert detail["holders"] == [{"peer": holder.own_id, "pid": os.getpid(), "uid": 0, "gid": 0}]
            assert os.pread(fd, 20, 0) == b"the audited message\0"
        finally:
            os.close(fd)


def test_a_member_peer_punching_a_hole_is_repaired_and_named(strict):
    write(strict, b"the audited message")
    before = len(incidents(strict))
    socket_path = strict.socket
    answerers = answering_uids(load_policy(str(strict.policy_path)))

    def join_and_punch() -> int:
        with IvshmemClient(socket_path, answerers=answerers) as peer:
            punch(peer.shm_fd, 0)
            deadline = time.monotonic() + WAIT
            while os.pread(peer.shm_fd, 19, 0) != b"the audited message" and time.monotonic() < deadline:
                time.sleep(0.02)
            return os.getpid()

    pid = as_user(MEMBER_USER, join_and_punch)
    added = wait_for_incidents(strict, before, {"hole"})
    holes = [r for r in added if r["detail"]["kind"] == "hole"]
    assert [(r["detail"]["kind"], r["result"]) for r in holes] == [("hole", "repaired")]
    offender = holes[0]["detail"]["offender"]
    assert isinstance(offender, dict), holes[0]["detail"]
    assert (offender["pid"], offender["uid"]) == (pid, pwd.getpwnam(MEMBER_USER).pw_uid)


def test_a_punch_then_an_audited_write_never_makes_zeros_the_known_good_copy(strict):
    """Punch where an audited message is, then at once an audited write elsewhere (the supervisor calls
    guard.remember): the repair puts back the audited bytes, never the zeros."""
    write(strict, b"first audited message")
    before = len(incidents(strict))
    fd = take_fd(strict.proc.pid, region_fd_of(strict))
    try:
        punch(fd, 0)
        write(strict, b"second audited message", offset=2 * PAGE)
        wait_for_incidents(strict, before, {"hole"})
        assert os.pread(fd, 22, 0) == b"first audited message\0"
        assert os.pread(fd, 23, 2 * PAGE) == b"second audited message\0"
        assert Allocation.of(fd, os.fstat(fd).st_size).first_hole == os.fstat(fd).st_size
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------- file (standard)


def member_preallocates_and_punches(path: str, size: int, pages: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        fallocate(fd, KEEP_SIZE, size, pages * PAGE)
        punch(fd, 0, pages * PAGE)
    finally:
        os.close(fd)


def test_a_punch_hidden_by_preallocation_past_the_end_is_found_and_repaired(standard):
    """As many pages allocated past the end as punched inside, both before the guard looks (it is paused):
    st_blocks is unchanged, yet the hole is found, the pages past the end freed, the contents put back."""
    write(standard, b"the audited message")
    path, size = standard.region_path, os.stat(standard.region_path).st_size
    full = os.stat(path).st_blocks
    before = len(incidents(standard))
    os.kill(standard.proc.pid, signal.SIGSTOP)
    try:
        as_user(MEMBER_USER, member_preallocates_and_punches, path, size, 1)
        assert os.stat(path).st_blocks == full, "the pre-allocation hides the hole from st_blocks"
    finally:
        os.kill(standard.proc.pid, signal.SIGCONT)
    added = wait_for_incidents(standard, before, {"hole"})
    assert ("hole", "repaired") in [(r["detail"]["kind"], r["result"]) for r in added]
    with open(path, "rb") as f:
        assert f.read(20) == b"the audited message\0"
    assert os.stat(path).st_blocks == full


def test_preallocation_past_the_end_is_freed_and_a_later_punch_is_seen(standard):
    write(standard, b"the audited message")
    path, size = standard.region_path, os.stat(standard.region_path).st_size
    full = os.stat(path).st_blocks
    before = len(incidents(standard))

    def preallocate() -> None:
        fd = os.open(path, os.O_RDWR)
        fallocate(fd, KEEP_SIZE, size, 64 * PAGE)
        os.close(fd)

    as_user(MEMBER_USER, preallocate)
    added = wait_for_incidents(standard, before, {"preallocation"})
    assert [(r["detail"]["kind"], r["result"]) for r in added] == [("preallocation", "repaired")]
    assert os.stat(path).st_blocks == full
    as_user(MEMBER_USER, member_preallocates_and_punches, path, size, 1)
    added = wait_for_incidents(standard, before + 1, {"hole"})
    assert ("hole", "repaired") in [(r["detail"]["kind"], r["result"]) for r in added]
    with open(path, "rb") as f:
        assert f.read(20) == b"the audited message\0"


# --------------------------------------------------------------------------------------- attribution


def test_a_short_lived_truncate_by_a_member_is_named_with_uid_and_program(standard):
    member = pwd.getpwnam(MEMBER_USER)
    before = len(incidents(standard))
    run = subprocess.run(["setpriv", f"--reuid={member.pw_uid}", f"--regid={member.pw_gid}", "--init-groups",
                          "truncate", "-s", "0", standard.region_path], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    added = wait_for_incidents(standard, before, {"shrink"})
    shrink = next(r for r in added if r["detail"]["kind"] == "shrink")
    offender = shrink["detail"]["offender"]
    assert isinstance(offender, dict), shrink["detail"]
    assert offender["uid"] == member.pw_uid, offender
    assert offender["exe"] == "/usr/bin/truncate", offender
    assert shrink["actor"]["uid"] == member.pw_uid


# --------------------------------------------------------------------------------------- the copy, directly


def test_no_copy_is_taken_while_an_alerted_hole_stands(tmp_path):
    """With on_resize = "alert" a hole is recorded and left; its page written again through a mapping (no
    event, the allocation looks whole): until the guard has looked again, no refresh takes the zeroed page."""
    policy = load_policy(str(policy_file(tmp_path, "standard", guard={"on_resize": "alert"})))
    region = Region.create(policy.region)
    records: list[dict] = []
    loop = EventLoop()
    guard = guard_alone(policy, region, loop, records)
    try:
        region.write(0, b"known good")
        guard.remember(0, b"known good")
        guard.start()
        with open(region.path, "r+b") as f:
            punch(f.fileno(), 0)
        guard.check()
        deadline = time.monotonic() + WAIT
        while not records and time.monotonic() < deadline:
            loop.run_once(0.05)  # the record waits a moment for fanotify to name the offender
        assert [r["detail"]["kind"] for r in records] == ["hole"]
        assert records[0]["result"] == "alerted"
        with open(region.path, "r+b") as f, mmap.mmap(f.fileno(), PAGE) as mapping:
            mapping[100:104] = b"gone"  # the page comes back (zeros and these bytes), with no event
        assert Allocation.of(region.fd, region.size) == Allocation(region.size, guard.contents.full_blocks, region.size)
        time.sleep(0.06)  # past the refresh interval, so only the standing hole can refuse it
        guard.contents.tampered_until_ns = 0
        assert guard.refresh() is False, "the zeroed region became the known-good copy"
        assert bytes(guard.contents.known_good.data[:10]) == b"known good"
    finally:
        guard.close()
        region.close()
        os.unlink(region.path)
        loop.close()


def test_the_supervisors_own_opens_of_the_memfd_are_no_incident_and_anyone_elses_is_named(tmp_path):
    """The supervisor reopens the memfd by /proc/self/fd/N for the descriptions it hands out: inotify cannot tell
    that from another process's open, the opener witness can (it reports every opener but the supervisor)."""
    policy = load_policy(str(policy_file(tmp_path, "strict")))
    region = Region.create(policy.region)
    records: list[dict] = []
    loop = EventLoop()
    guard = guard_alone(policy, region, loop, records)
    try:
        guard.start()
        assert guard.attribution.openers is not None, guard.attribution.description
        own = os.open(f"/proc/self/fd/{region.fd}", os.O_RDWR | os.O_CLOEXEC)  # what the server does per peer
        os.close(own)
        for _ in range(10):
            loop.run_once(0.05)
        assert records == [], "the supervisor's own open is no incident"
        child = subprocess.run(["dd", f"if=/proc/{os.getpid()}/fd/{region.fd}", "of=/dev/null", "count=0",
                                "status=none"], timeout=30)
        assert child.returncode == 0
        deadline = time.monotonic() + WAIT
        while not records and time.monotonic() < deadline:
            loop.run_once(0.05)
        assert [(r["detail"]["kind"], r["result"]) for r in records] == [("region-opened", "blocked")]
        offender = records[0]["detail"]["offender"]
        assert isinstance(offender, dict) and offender["exe"] == "/usr/bin/dd", offender
    finally:
        guard.close()
        region.close()
        loop.close()


def test_before_write_repairs_a_hole_the_write_would_hide(tmp_path):
    """An audited write into a punched page would allocate it again, zeros around the new bytes, and hide the
    hole: guard.before_write() (the supervisor calls it before region.write) repairs it from the copy first."""
    policy = load_policy(str(policy_file(tmp_path, "strict")))
    region = Region.create(policy.region)
    records: list[dict] = []
    loop = EventLoop()
    guard = guard_alone(policy, region, loop, records)
    try:
        region.write(0, b"first audited message")
        guard.remember(0, b"first audited message")
        guard.start()
        punch(region.fd, 0)
        guard.before_write()
        region.write(100, b"second")  # the same page
        guard.remember(100, b"second")
        assert os.pread(region.fd, 21, 0) == b"first audited message"
        assert os.pread(region.fd, 6, 100) == b"second"
        deadline = time.monotonic() + WAIT
        while not records and time.monotonic() < deadline:
            loop.run_once(0.05)
        assert [(r["detail"]["kind"], r["result"]) for r in records] == [("hole", "repaired")]
    finally:
        guard.close()
        region.close()
        loop.close()


# --- the fast repair: only the copy's non-zero pages, then the allocation made whole again -------------------


def wait_for_records(loop: EventLoop, records: list[dict], count: int) -> None:
    deadline = time.monotonic() + WAIT
    while len(records) < count and time.monotonic() < deadline:
        loop.run_once(0.05)


def test_a_truncated_region_holding_a_message_is_repaired_then_allocated_whole(tmp_path):
    """The repair writes the message's page into the holes a truncation left (they read as zeros already); the
    rest of the allocation follows, so the record's state after is whole and the next look finds nothing."""
    policy = load_policy(str(policy_file(tmp_path, "standard")))
    region = Region.create(policy.region)
    records: list[dict] = []
    loop = EventLoop()
    guard = guard_alone(policy, region, loop, records)
    size, message = region.size, b"a message the guest has not read"
    try:
        region.write(0, message, zero_fill=size - len(message))
        guard.remember(0, message, size - len(message))
        guard.start()
        full = guard.contents.full_blocks
        fd = os.open(policy.region.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(3):
                os.ftruncate(fd, 0)
                guard.check(modified=True)
                assert os.pread(fd, size, 0) == message + bytes(size - len(message))
                assert Allocation.of(fd, size) == Allocation(size, full, size), "every page allocated and written"
        finally:
            os.close(fd)
        wait_for_records(loop, records, 3)
        guard.check()  # nothing is left to find: no hole the repair left behind
        wait_for_records(loop, records, 4)
        assert [(r["detail"]["kind"], r["result"]) for r in records] == [("shrink", "repaired")] * 3
        assert all(r["detail"]["after"]["region"]["blocks"] == full for r in records)
    finally:
        guard.close()
        os.unlink(policy.region.path)
        region.close()
        loop.close()


def test_a_truncation_to_half_and_writes_into_the_kept_half_are_all_put_back(tmp_path):
    """What the file still holds is data, not holes, and may have been written meanwhile: the copy goes there whole."""
    policy = load_policy(str(policy_file(tmp_path, "standard")))
    region = Region.create(policy.region)
    records: list[dict] = []
    loop = EventLoop()
    guard = guard_alone(policy, region, loop, records)
    size = region.size
    try:
        region.write(0, b"hello", zero_fill=size - 5)
        guard.remember(0, b"hello", size - 5)
        guard.start()
        fd = os.open(policy.region.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, size // 2)
            os.pwrite(fd, b"scribble", size // 4)  # a page the copy holds as zeros
            guard.check(modified=True)
            assert os.pread(fd, size, 0) == b"hello" + bytes(size - 5)
        finally:
            os.close(fd)
    finally:
        guard.close()
        os.unlink(policy.region.path)
        region.close()
        loop.close()


def test_before_write_looks_for_holes_only_where_the_write_lands(tmp_path):
    """A page allocated again after a punch (st_blocks whole, SEEK_HOLE still sees it) is looked for only in the
    pages the write touches: one elsewhere is not hidden by the write, and the scan finds it."""
    policy = load_policy(str(policy_file(tmp_path, "strict")))
    region = Region.create(policy.region)
    records: list[dict] = []
    loop = EventLoop()
    guard = guard_alone(policy, region, loop, records)
    try:
        region.write(5 * PAGE, b"page five")
        guard.remember(5 * PAGE, b"page five")
        guard.start()
        punch(region.fd, 5 * PAGE)
        fallocate(region.fd, 0, 5 * PAGE, PAGE)  # allocated, never written: st_blocks is whole again
        assert os.fstat(region.fd).st_blocks == guard.contents.full_blocks
        assert not guard.before_write(0, 100), "a write of page 0 does not hide a hole in page 5"
        assert guard.before_write(5 * PAGE + 100, 5 * PAGE + 110)
        assert os.pread(region.fd, 9, 5 * PAGE) == b"page five"
        wait_for_records(loop, records, 1)
        assert [(r["detail"]["kind"], r["result"]) for r in records] == [("hole", "repaired")]
    finally:
        guard.close()
        region.close()
        loop.close()
