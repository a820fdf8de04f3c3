"""Test helpers: policies in a temporary directory, a supervisor in a real child process, real uids."""

from __future__ import annotations

import json
import os
import pickle
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

from shmguard.control import ControlClient
from shmguard.launcher import SHMGUARD, SupervisorProcess
from shmguard.policy import relocated_policy_text

SOCKET_DIRS: list[Path] = []  # made by policy_file under /tmp; removed when the session ends (conftest.py)
MEMBER_USER = "shmguard-member"  # a system user in the ivshmem group (created by scripts/bootstrap)
OUTSIDER_USER = "nobody"


def policy_file(tmp_path: Path, base: str = "strict", **sections: dict) -> Path:
    """A copy of a built-in policy with its paths moved into tmp_path and `sections` merged over it."""
    tag = uuid.uuid4().hex[:8]
    sockets = Path(tempfile.mkdtemp(prefix="shmguard-test-", dir="/tmp"))
    SOCKET_DIRS.append(sockets)
    sockets.chmod(0o755)  # reachable by the unprivileged uids of attack tests; the sockets' own modes decide
    path = tmp_path / f"{base}-{tag}.toml"
    path.write_text(relocated_policy_text(base, socket_dir=sockets, audit_log=tmp_path / "audit.log",
                                          region_path=f"/dev/shm/shmguard-test-{tag}", **sections))
    return path


class RunningSupervisor(SupervisorProcess):
    """`shmguard run --policy FILE` in a child process (--no-guest unless guest=True), ready at READY=1."""

    def __init__(self, policy_path: Path, *args: str, guest: bool = False, timeout: float = 60.0):
        self.policy_path = policy_path
        self.policy = tomllib.loads(policy_path.read_text())
        self.socket = self.policy["server"]["socket"]
        self.control = self.policy["control"]["socket"]
        self.audit = self.policy["audit"]["path"]
        self.region_path = self.policy["region"].get("path") if self.policy["region"]["backend"] == "file" else None
        args = args if guest else ("--no-guest", *args)
        # The notify socket sits beside the sockets, reachable by a supervisor that drops to another user.
        super().__init__(["--policy", str(policy_path), *args], policy_path.with_suffix(".log"),
                         Path(self.socket).with_name("notify"), timeout, notify_mode=0o622)

    def client(self, timeout: float | None = 30.0) -> ControlClient:
        """The control client for this supervisor (every request a test sends on purpose goes through it)."""
        return ControlClient(self.control, timeout=timeout)

    def wait_for_log(self, pattern: str, timeout: float = 60) -> re.Match:
        """The first match of a regular expression in the supervisor's log, once it appears."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := re.search(pattern, self.log()):
                return match
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not in the supervisor's log within {timeout} s:\n{self.log()}")

    def audit_records(self) -> list[dict]:
        with open(self.audit) as f:
            return [json.loads(line) for line in f if line.strip()]

    def cli(self, *args: str, input: str | bytes | None = None, check: bool = True, timeout: float = 60):
        """Run a shmguard subcommand against this supervisor's policy."""
        result = subprocess.run([*SHMGUARD, *args], input=input, capture_output=True, timeout=timeout,
                                text=not isinstance(input, bytes))
        if check and result.returncode != 0:
            raise AssertionError(f"shmguard {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        status = super().stop(sig, timeout)
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
