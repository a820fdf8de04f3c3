"""Test helpers: policies in a temporary directory, a supervisor in a real child process, real uids.

policy_file and RunningSupervisor are thin uses of shmguard.launcher (relocate_policy, ThrowawaySupervisor), the
one way a supervisor of its own is started, here with the places and the names the tests expect.
"""

from __future__ import annotations

import os
import pickle
import pwd
import shutil
import signal
import tempfile
import tomllib
import uuid
from pathlib import Path

from shmguard.launcher import SHMGUARD, ThrowawaySupervisor, relocate_policy

__all__ = ["MEMBER_USER", "OUTSIDER_USER", "SHMGUARD", "SOCKET_DIRS", "RunningSupervisor", "as_user", "policy_file"]

SOCKET_DIRS: list[Path] = []  # made under /tmp here; removed when the session ends (conftest.py)
MEMBER_USER = "shmguard-member"  # a system user in the ivshmem group (created by scripts/bootstrap)
OUTSIDER_USER = "nobody"


def policy_file(tmp_path: Path, base: str = "strict", **sections: dict) -> Path:
    """A copy of a built-in policy in tmp_path (with its audit log, so both outlive the supervisor), its sockets in
    a short directory of their own under /tmp (mode 0755: the sockets' own modes decide who gets in), its region
    file (if any) under /dev/shm, and `sections` merged over it."""
    sockets = Path(tempfile.mkdtemp(prefix="shmguard-test-", dir="/tmp"))
    SOCKET_DIRS.append(sockets)
    sockets.chmod(0o755)  # reachable by the unprivileged uids of attack tests
    return relocate_policy(base, sockets, policy_path=tmp_path / f"{base}-{uuid.uuid4().hex[:8]}.toml",
                           audit_log=tmp_path / "audit.log", region_prefix="shmguard-test-", **sections)


class RunningSupervisor(ThrowawaySupervisor):
    """`shmguard run --policy FILE` in a child process (--no-guest unless guest=True), ready at READY=1: the
    ThrowawaySupervisor of an existing policy file, run as it is. Its log and notify socket are in a directory of
    their own; stop() also removes the policy's socket directory (policy_file made it). `policy` is the file's
    TOML as a dict; the rest (socket, control, audit, region_path, log(), wait_for_log(), audit_records(),
    client(), cli(), restart()) is ThrowawaySupervisor's."""

    def __init__(self, policy_path: Path, *args: str, guest: bool = False, timeout: float = 60.0):
        super().__init__(str(policy_path), *args, guest=guest, relocate=False, prefix="shmguard-test-run-",
                         timeout=timeout)
        SOCKET_DIRS.append(self.directory)  # a supervisor killed and never stopped leaves it until the end
        self.policy = tomllib.loads(Path(policy_path).read_text())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30, remove: bool | None = None) -> int:
        status = super().stop(sig, timeout, remove)
        if remove is not False:
            shutil.rmtree(os.path.dirname(self.socket), ignore_errors=True)  # the per-test socket directory
        return status


def as_user(user: str, func, *args, groups_from_user: bool = True):
    """Run func(*args) in a forked child that has really dropped to `user`; return its result or raise."""
    entry = pwd.getpwnam(user)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges for real, then run the attack
        os.close(read_end)
        try:
            os.setgroups(os.getgrouplist(user, entry.pw_gid) if groups_from_user else [])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            outcome = ("ok", func(*args))
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
            outcome = ("error", exc)
        try:
            data = pickle.dumps(outcome)
        except Exception:  # noqa: BLE001
            data = pickle.dumps(("error", RuntimeError(repr(outcome[1]))))
        os.write(write_end, data)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "error":
        raise value
    return value


def rss_kib(pid: int) -> int:
    """The resident memory of a process (VmRSS), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmRSS:")))
