"""Planted paths: an outsider who makes the audit log's or the sockets' directory first, or plants a FIFO, a forged
log or a symlink where the supervisor will look, gets a supervisor that refuses in one line naming the path, never
one that hangs, adopts what was planted, or follows a link to change another file.

The outsider is the real `nobody`, working in a directory like /tmp (root's, sticky, world-writable): the only
kind of directory it can write on a sound host. Every attack first runs as nobody, then `shmguard run` is started
as root on a policy pointing there.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from inotify_simple import INotify
from inotify_simple import flags as F

from helpers import MEMBER_USER, OUTSIDER_USER, SHMGUARD, as_user, policy_file
from shmguard.audit import AuditLog, verify
from shmguard.errors import PolicyError, ShmguardError
from shmguard.paths import check_directory_chain, make_directory, policy_owners
from shmguard.server import bind_socket, check_stale_socket, claim_bound_socket

POLICIES = ("strict", "standard", "compat", "zephyr")
HANG = 60  # a supervisor still running after this hangs: the test fails instead of waiting for ever
OUTSIDER_UID = pwd.getpwnam(OUTSIDER_USER).pw_uid


@pytest.fixture
def sticky():
    """A directory like /tmp: root's, sticky and world-writable, so `nobody` can plant things in it."""
    directory = Path(tempfile.mkdtemp(prefix="shmguard-planted-", dir="/tmp"))
    directory.chmod(0o1777)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def tree(root: Path) -> dict[str, tuple]:
    """Everything under root as lstat sees it (type, owner, mode, size, contents or link): nothing is followed."""
    entries = {}
    for directory, subdirs, files in os.walk(root):
        for name in [".", *subdirs, *files]:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            content = ""
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            entries[os.path.relpath(path, root)] = (stat.S_IFMT(st.st_mode), st.st_uid, st.st_gid,
                                                     stat.S_IMODE(st.st_mode), st.st_size, content)
    return entries


def run_supervisor(policy: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SHMGUARD, "run", "--no-guest", "--policy", str(policy), *args], capture_output=True,
                          text=True, timeout=HANG, stdin=subprocess.DEVNULL)


def assert_refused_naming(result: subprocess.CompletedProcess, path: Path) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("shmguard: error:")]
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and re.search(re.escape(str(path)) + r"(?=[ :)]|$)", errors[0]), result.stderr
    return errors[0]


# ---------------------------------------------------------------------------------------------- what nobody plants


def plant_directory(directory: str) -> None:
    os.mkdir(directory, 0o755)


def plant_fifo_log(directory: str) -> None:
    os.mkdir(directory, 0o755)
    os.mkfifo(os.path.join(directory, "audit.log"), 0o666)


def plant_fifo(path: str) -> None:
    os.mkfifo(path, 0o666)


def plant_forged_log(path: str, make_directory_first: bool) -> None:
    """A log with a valid chain and a history of nobody's choosing."""
    if make_directory_first:
        os.mkdir(os.path.dirname(path), 0o755)
    with AuditLog.open(path, durable=False) as forged:
        forged.append("start", detail={"policy": "strict"})
        forged.append("write", offset=0, length=5, sha256="0" * 64, detail={"note": "never happened"})


def plant_symlink(target: str, link: str) -> None:
    os.symlink(target, link)


# ---------------------------------------------------------------------------------------------- the audit log


@pytest.mark.parametrize("base", POLICIES)
def test_a_fifo_planted_as_the_audit_log_is_refused_without_hanging(tmp_path, sticky, base):
    logs = sticky / "logs"
    as_user(OUTSIDER_USER, plant_fifo_log, str(logs))
    before = tree(sticky)
    result = run_supervisor(policy_file(tmp_path, base), "--audit-log", str(logs / "audit.log"))
    line = assert_refused_naming(result, logs)
    assert "owned by" in line and "nobody" in line
    assert tree(sticky) == before


def test_a_fifo_in_a_sticky_directory_is_refused_without_hanging(tmp_path, sticky):
    log = sticky / "audit.log"  # the directory is sound (like /tmp); the file is nobody's FIFO
    as_user(OUTSIDER_USER, plant_fifo, str(log))
    before = tree(sticky)
    line = assert_refused_naming(run_supervisor(policy_file(tmp_path), "--audit-log", str(log)), log)
    assert "FIFO" in line
    assert tree(sticky) == before


@pytest.mark.parametrize("in_own_directory", [True, False], ids=["nobody's-directory", "sticky-directory"])
def test_a_forged_log_is_never_continued(tmp_path, sticky, in_own_directory):
    log = sticky / "logs" / "audit.log" if in_own_directory else sticky / "audit.log"
    as_user(OUTSIDER_USER, plant_forged_log, str(log), in_own_directory)
    assert verify(log).ok  # a chain the supervisor would have continued as its own history
    before = tree(sticky)
    result = run_supervisor(policy_file(tmp_path), "--audit-log", str(log))
    assert_refused_naming(result, log.parent if in_own_directory else log)
    assert "nobody" in result.stderr
    assert tree(sticky) == before


def test_a_symlink_planted_as_the_log_directory_is_not_followed(tmp_path, sticky):
    victim = sticky / "victim"  # root's own directory, where nobody would like root to write
    victim.mkdir(mode=0o755)
    as_user(OUTSIDER_USER, plant_symlink, str(victim), str(sticky / "logs"))
    before = tree(sticky)
    result = run_supervisor(policy_file(tmp_path), "--audit-log", str(sticky / "logs" / "audit.log"))
    line = assert_refused_naming(result, sticky / "logs")
    assert "symbolic link" in line
    assert tree(sticky) == before and list(victim.iterdir()) == []


def test_a_symlink_planted_as_the_log_is_not_followed(tmp_path, sticky):
    target = sticky / "victim.log"
    target.write_bytes(b"root's file\n")
    as_user(OUTSIDER_USER, plant_symlink, str(target), str(sticky / "audit.log"))
    before = tree(sticky)
    line = assert_refused_naming(run_supervisor(policy_file(tmp_path), "--audit-log", str(sticky / "audit.log")),
                                 sticky / "audit.log")
    assert "symbolic link" in line
    assert tree(sticky) == before


def test_a_root_made_link_to_a_directory_nobody_owns_is_refused_at_the_target(tmp_path, sticky):
    """A link only root could make is followed, and where it leads is checked like the rest."""
    theirs = sticky / "theirs"
    as_user(OUTSIDER_USER, plant_directory, str(theirs))
    (tmp_path / "logs").symlink_to(theirs)
    before = tree(sticky)
    result = run_supervisor(policy_file(tmp_path), "--audit-log", str(tmp_path / "logs" / "audit.log"))
    assert_refused_naming(result, theirs)
    assert tree(sticky) == before


def make_log(directory: Path) -> Path:
    directory.mkdir(mode=0o750, exist_ok=True)
    log = directory / "audit.log"
    AuditLog.open(log, durable=False).close()
    return log


def fifo_with_a_reader(log: Path) -> None:
    log.unlink()
    os.mkfifo(log, 0o640)
    reader = os.open(log, os.O_RDONLY | os.O_NONBLOCK)  # with a reader, a non-blocking open for writing succeeds
    FIFO_READERS.append(reader)


FIFO_READERS: list[int] = []

LOG_TAMPERS = {
    "owned by nobody": (lambda log: os.chown(log, OUTSIDER_UID, -1), "owned by uid"),
    "group-writable": (lambda log: os.chmod(log, 0o660), "writable by others"),
    "world-writable": (lambda log: os.chmod(log, 0o646), "writable by others"),
    "hard-linked": (lambda log: os.link(log, log.with_name("second-name")), "2 hard links"),
    "a character device": (lambda log: (log.unlink(), os.mknod(log, stat.S_IFCHR | 0o600, os.makedev(1, 3))),
                           "character device"),
    "a FIFO with a reader": (fifo_with_a_reader, "FIFO"),
    "a socket": (lambda log: (log.unlink(), socket.socket(socket.AF_UNIX).bind(str(log))), "socket"),
}


@pytest.mark.parametrize("tamper", LOG_TAMPERS)
def test_a_log_the_supervisor_cannot_trust_is_refused_in_one_line(tmp_path, tamper):
    change, why = LOG_TAMPERS[tamper]
    log = make_log(tmp_path / "logs")
    change(log)
    before = tree(tmp_path / "logs")
    try:
        with pytest.raises(ShmguardError, match=why) as refused:
            AuditLog.open(log, durable=True)
    finally:
        while FIFO_READERS:
            os.close(FIFO_READERS.pop())
    assert str(log) in str(refused.value) and "\n" not in str(refused.value)
    assert tree(tmp_path / "logs") == before


def test_audit_verify_and_show_do_not_hang_on_a_fifo(tmp_path):
    fifo = tmp_path / "audit.log"
    os.mkfifo(fifo, 0o600)
    for command in (["audit", "verify", str(fifo)], ["audit", "show", "--path", str(fifo)]):
        result = subprocess.run([*SHMGUARD, *command], capture_output=True, text=True, timeout=HANG)
        assert result.returncode != 0 and "FIFO" in result.stderr and "Traceback" not in result.stderr, command


# ---------------------------------------------------------------------------------------------- the sockets


@pytest.mark.parametrize("base", POLICIES)
def test_a_socket_directory_made_by_nobody_is_refused(tmp_path, sticky, base):
    sockets = sticky / "sockets"
    as_user(OUTSIDER_USER, plant_directory, str(sockets))
    before = tree(sticky)
    result = run_supervisor(policy_file(tmp_path, base), "--socket", str(sockets / "ivshmem.sock"),
                            "--control-socket", str(sockets / "control.sock"))
    line = assert_refused_naming(result, sockets)
    assert "nobody" in line
    assert tree(sticky) == before


def test_a_socket_directory_that_is_nobody_s_symlink_is_refused(tmp_path, sticky):
    victim = sticky / "victim"
    victim.mkdir(mode=0o755)
    as_user(OUTSIDER_USER, plant_symlink, str(victim), str(sticky / "sockets"))
    before = tree(sticky)
    result = run_supervisor(policy_file(tmp_path), "--socket", str(sticky / "sockets" / "ivshmem.sock"),
                            "--control-socket", str(sticky / "sockets" / "control.sock"))
    assert "symbolic link" in assert_refused_naming(result, sticky / "sockets")
    assert tree(sticky) == before and list(victim.iterdir()) == []


def test_a_missing_socket_directory_is_made_root_s_and_0755(tmp_path):
    parent = Path(tempfile.mkdtemp(prefix="shmguard-run-", dir="/tmp"))
    try:
        bound = bind_socket(str(parent / "shmguard" / "ivshmem.sock"), 0, 0, 0o660)
        st = os.lstat(parent / "shmguard")
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
        bound.remove()
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_the_chmod_after_bind_never_follows_a_symlink_at_the_staging_name(tmp_path):
    """The helper that gives the fresh socket its owner and mode, called with a symlink where the socket was."""
    target = tmp_path / "precious"
    target.write_text("root's\n")
    target.chmod(0o600)
    staging = tmp_path / "ivshmem.sock.0badf00d"
    staging.symlink_to(target)
    with pytest.raises(ShmguardError, match="is not the socket just bound"):
        claim_bound_socket(str(staging), OUTSIDER_UID, OUTSIDER_UID, 0o666)
    st = os.stat(target)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0)


def test_a_symlink_raced_in_at_the_staging_name_is_never_followed(tmp_path):
    """A thread replaces every staging socket the moment it appears; bind_socket must refuse, never chmod the
    link's target to the socket's mode."""
    sockets = tmp_path / "sockets"
    sockets.mkdir(mode=0o755)
    target = tmp_path / "precious"
    target.write_text("root's\n")
    target.chmod(0o600)
    watcher = INotify()
    watcher.add_watch(sockets, F.CREATE)
    done = threading.Event()
    swapped = []

    def swap_in_symlinks():
        while not done.is_set():
            for event in watcher.read(timeout=50):
                if ".sock." in event.name and event.name not in swapped:  # not the links it made itself
                    staging = sockets / event.name
                    try:
                        staging.unlink()
                        staging.symlink_to(target)
                        swapped.append(event.name)
                    except OSError:
                        pass  # already renamed into place: too late for this one

    racer = threading.Thread(target=swap_in_symlinks, daemon=True)
    racer.start()
    outcomes = []
    try:
        for attempt in range(1000):  # until the racer has won a few times
            if attempt >= 100 and len(swapped) >= 10:
                break
            try:
                bind_socket(str(sockets / "ivshmem.sock"), 0, 0, 0o666).remove()
                outcomes.append("bound")
            except ShmguardError as refused:
                assert "\n" not in str(refused)
                outcomes.append("refused")
                if (sockets / "ivshmem.sock").is_symlink():  # swapped after the chmod, renamed into place, refused
                    (sockets / "ivshmem.sock").unlink()
    finally:
        done.set()
        racer.join()
        watcher.close()
    assert swapped, "the racing thread never swapped a staging name"
    st = os.stat(target)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0), outcomes


def test_a_stale_socket_check_never_follows_a_symlink(tmp_path):
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(tmp_path / "live.sock"))
    live.listen()
    (tmp_path / "ivshmem.sock").symlink_to(tmp_path / "live.sock")
    try:
        with pytest.raises(ShmguardError, match="exists and is not a socket"):
            check_stale_socket(str(tmp_path / "ivshmem.sock"))
    finally:
        live.close()
    assert (tmp_path / "ivshmem.sock").is_symlink()


# ---------------------------------------------------------------------------------------------- the rules


def test_the_chain_check_accepts_root_s_links_and_sticky_directories():
    assert check_directory_chain("/var/run") == "/run"  # a link root made, to a directory that passes
    assert check_directory_chain("/dev/shm") == "/dev/shm"  # sticky and root's
    assert check_directory_chain("/tmp/../tmp") == "/tmp"


def test_the_chain_check_refuses_what_others_may_write(tmp_path, sticky):
    shared = tmp_path / "group-writable"
    shared.mkdir()
    shared.chmod(0o775)
    with pytest.raises(ShmguardError, match="writable by its group"):
        check_directory_chain(shared / "below" / "..")
    theirs = sticky / "theirs"
    as_user(OUTSIDER_USER, plant_directory, str(theirs))
    with pytest.raises(ShmguardError, match=re.escape(f"{theirs} (on the way to {theirs}/logs) is owned by")):
        make_directory(theirs / "logs", 0o750)
    assert list(theirs.iterdir()) == []
    assert make_directory(theirs / "logs", 0o750, {OUTSIDER_UID})  # unless the caller trusts its owner
    sticky_of_theirs = sticky / "their-sticky"
    as_user(OUTSIDER_USER, plant_directory, str(sticky_of_theirs))
    os.chmod(sticky_of_theirs, 0o1777)  # sticky protects only when root owns it: its owner may remove anything
    with pytest.raises(ShmguardError, match="writable by its group and others"):
        check_directory_chain(sticky_of_theirs, {OUTSIDER_UID})


def test_the_policy_s_owners_are_root_the_running_uid_the_socket_owner_and_the_hardening_user():
    assert policy_owners(0) == {0, os.geteuid()}
    assert policy_owners(0, OUTSIDER_USER) == {0, os.geteuid(), OUTSIDER_UID}
    member = pwd.getpwnam(MEMBER_USER).pw_uid
    assert policy_owners(member, "") == {0, os.geteuid(), member}


@pytest.mark.parametrize("plant", ["owned by nobody", "writable by its group", "a symlink", "directory of nobody's"])
def test_a_local_policy_someone_else_could_have_planted_is_refused_not_read(tmp_path, monkeypatch, plant):
    """/etc/shmguard/NAME.toml replaces a built-in by its name alone: only root's, writable by root alone, counts."""
    from shmguard import policy

    local = tmp_path / "etc-shmguard"
    local.mkdir()
    planted = local / "strict.toml"
    planted.write_text('[server]\npeers = ["*"]\n')  # what a planter wants: everyone admitted
    nobody = pwd.getpwnam(OUTSIDER_USER).pw_uid
    if plant == "owned by nobody":
        os.chown(planted, nobody, -1)
    elif plant == "writable by its group":
        planted.chmod(0o664)
    elif plant == "a symlink":
        planted.unlink()
        planted.symlink_to(policy.BUILTIN_DIR / "compat.toml")
    else:
        os.chown(local, nobody, -1)
    monkeypatch.setattr(policy, "LOCAL_DIR", local)
    with pytest.raises(PolicyError) as refused:
        policy.load_policy("strict")
    assert str(local) in str(refused.value) and "\n" not in str(refused.value)
