"""Test helpers: policies in a temporary directory, a supervisor in a real child process, real uids."""

from __future__ import annotations

import json
import os
import pickle
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

from shmguard.policy import BUILTIN_DIR

SHMGUARD = [sys.executable, "-m", "shmguard"]
MEMBER_USER = "shmguard-member"  # a system user in the ivshmem group (created by scripts/bootstrap)
OUTSIDER_USER = "nobody"


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def policy_file(tmp_path: Path, base: str = "strict", **sections: dict) -> Path:
    """A copy of a built-in policy with its paths moved into tmp_path and `sections` merged over it."""
    data = tomllib.loads((BUILTIN_DIR / f"{base}.toml").read_text())
    data.pop("description", None)
    tag = uuid.uuid4().hex[:8]
    sockets = Path(tempfile.mkdtemp(prefix="shmguard-test-", dir="/tmp"))
    sockets.chmod(0o755)  # reachable by the unprivileged uids of attack tests; the sockets' own modes decide
    data["server"]["socket"] = str(sockets / "ivshmem.sock")
    data["control"]["socket"] = str(sockets / "control.sock")
    data["audit"]["path"] = str(tmp_path / "audit.log")
    data["audit"]["durable"] = False
    if data["region"]["backend"] == "file":
        data["region"]["path"] = f"/dev/shm/shmguard-test-{tag}"
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    text = "".join(f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items()) + "\n"
                   for name, table in data.items())
    path = tmp_path / f"{base}-{tag}.toml"
    path.write_text(text)
    return path


class RunningSupervisor:
    """`shmguard run` in a child process, ready once it sends READY=1 on a NOTIFY_SOCKET."""

    def __init__(self, policy_path: Path, *args: str, guest: bool = False, timeout: float = 60.0):
        self.policy_path = policy_path
        self.policy = tomllib.loads(policy_path.read_text())
        self.socket = self.policy["server"]["socket"]
        self.control = self.policy["control"]["socket"]
        self.audit = self.policy["audit"]["path"]
        self.region_path = self.policy["region"].get("path") if self.policy["region"]["backend"] == "file" else None
        self.log_path = policy_path.with_suffix(".log")
        notify_path = str(policy_path.with_suffix(".notify"))
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if os.path.exists(notify_path):  # left by an earlier run of the same policy
            os.unlink(notify_path)
        self.notify.bind(notify_path)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path)
        args = args if guest else ("--no-guest", *args)
        self.proc = subprocess.Popen([*SHMGUARD, "run", "--policy", str(policy_path), *args],
                                     stdout=subprocess.DEVNULL, stderr=self.log_path.open("wb"), env=env)
        self.wait_for("READY=1", timeout)

    def wait_for(self, word: str, timeout: float) -> str:
        """Wait for a notify message containing `word` (READY=1, or STATUS=... lines)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited with {self.proc.returncode}:\n{self.log()}")
            self.notify.settimeout(0.2)
            try:
                message = self.notify.recv(4096).decode()
            except TimeoutError:
                continue
            if word in message:
                return message
        raise AssertionError(f"no {word} from the supervisor within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

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
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.notify.close()
        try:
            os.rmdir(os.path.dirname(self.socket))  # the per-test socket directory, if the supervisor emptied it
        except OSError:
            pass
        return self.proc.returncode


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
