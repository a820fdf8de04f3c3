"""SupervisorProcess: `shmguard run` as a child process, ready when it says so over NOTIFY_SOCKET; and
ThrowawaySupervisor, the one way tests, attacks, benchmarks and the demo start one with a policy of their own.

The same datagram protocol systemd uses (READY=1, STATUS=...) tells a parent when peers can connect and
when the guest is ready, so nothing has to poll a socket path or parse a log to know.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import ShmguardError
from .policy import load_policy, relocated_policy_text

SHMGUARD = [sys.executable, "-m", "shmguard"]


class SupervisorProcess:
    def __init__(self, run_args: list[str], log_path: Path, notify_path: Path, timeout: float = 60.0,
                 notify_mode: int | None = None):
        self.log_path, self.notify_path = log_path, notify_path
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if notify_path.exists():  # left by an earlier run in the same place
            notify_path.unlink()
        self.notify.bind(str(notify_path))
        if notify_mode is not None:  # a supervisor that drops to another user must still reach it
            notify_path.chmod(notify_mode)
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen([*SHMGUARD, "run", *run_args], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log, env=env)
        try:
            self.wait_for("READY=1", timeout)
        except BaseException:
            SupervisorProcess.stop(self)  # never ready: nothing is left running, nothing bound
            raise

    def wait_for(self, word: str, timeout: float) -> str:
        """Wait for a notify message containing `word`; a supervisor that exits first is an error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ShmguardError(f"the supervisor exited with status {self.proc.returncode}; "
                                    f"its log: {self.log_path}\n{self.log_tail()}")
            self.notify.settimeout(min(0.2, max(0.01, deadline - time.monotonic())))
            try:
                message = self.notify.recv(4096).decode(errors="replace")
            except TimeoutError:
                continue
            if word in message:
                return message
        raise ShmguardError(f"no {word} from the supervisor within {timeout:g} s; its log: {self.log_path}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.notify.close()
        if self.notify_path.exists():
            self.notify_path.unlink()
        return self.proc.returncode


class ThrowawaySupervisor(SupervisorProcess):
    """`shmguard run` (--no-guest unless guest) with a copy of a policy, built-in name or file, whose sockets, audit
    log and region file are moved into a private directory (in `parent`, or the system's temporary directory) and
    `sections` merged over it; the directory goes with everything in it when it stops, unless keep."""

    def __init__(self, source: str = "strict", *run_args: str, guest: bool = False, parent: Path | None = None,
                 prefix: str = "shmguard-supervisor-", durable: bool = False, keep: bool = False,
                 timeout: float = 30.0, **sections: dict):
        load_policy(source)  # a bad policy stops here, before anything is created
        self.keep = keep
        self.directory = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        self.directory.chmod(0o755)  # the outsider and the member must reach the sockets to be refused by them
        self.policy_path = self.directory / "policy.toml"
        self.policy_path.write_text(relocated_policy_text(
            source, socket_dir=self.directory, audit_log=self.directory / "audit.log", durable=durable,
            region_path=f"/dev/shm/{prefix}{secrets.token_hex(6)}", **sections))
        self.policy = load_policy(str(self.policy_path))
        args = ["--policy", str(self.policy_path), *([] if guest else ["--no-guest"]), *run_args]
        try:
            super().__init__(args, self.directory / "supervisor.log", self.directory / "notify", timeout)
        except BaseException as exc:
            log = self.directory / "supervisor.log"
            last = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            self._remove()
            if not isinstance(exc, ShmguardError):
                raise
            # One line, as for every error a user can cause: what happened and the supervisor's last word.
            raise ShmguardError(f"the throwaway supervisor did not start: {str(exc).split(';')[0]}: "
                                f"{last[0] if last else 'no output'}") from None

    @property
    def control(self) -> str:
        return self.policy.control.socket

    @property
    def process(self) -> subprocess.Popen:
        return self.proc

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        try:
            return super().stop(sig, timeout)
        finally:
            self._remove()

    def _remove(self) -> None:
        if not self.keep:
            shutil.rmtree(self.directory, ignore_errors=True)
