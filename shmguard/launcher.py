"""The one way to start a throwaway supervisor: `ThrowawaySupervisor`, used by the tests (tests/helpers.py is a thin
use of it), `shmguard attack`, the benchmarks and the demo.

`SupervisorProcess` is `shmguard run` as a child process, ready when it says so over NOTIFY_SOCKET: the same
datagram protocol systemd uses (READY=1, STATUS=...) tells a parent when peers can connect and when the guest is
ready, so nothing has to poll a socket path or parse a log to know. `ThrowawaySupervisor` adds a private directory
(its log and notify socket, and for a relocated policy the policy, sockets and audit log too), the policy's paths
as attributes, restart, and the few things a caller asks of a running supervisor (its log, its audit records, a
control client, a subcommand). `relocate_policy` writes the relocated copy of a policy that it runs.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from inotify_simple import INotify
from inotify_simple import flags as F

from .control import ControlClient
from .errors import ShmguardError
from .policy import Policy, load_policy, locate, relocated_policy_text

SHMGUARD = [sys.executable, "-m", "shmguard"]


class SupervisorProcess:
    """`shmguard run RUN_ARGS` with its stderr in log_path, started (and startable again once it has stopped) and
    ready at the READY=1 it sends to notify_path. notify_owner: the uid the supervisor drops to, which must be able
    to send there (the socket is made its own, mode 0600; nobody else but root can send)."""

    def __init__(self, run_args: list[str], log_path: Path, notify_path: Path, timeout: float = 60.0,
                 notify_owner: int | None = None):
        self.run_args, self.log_path, self.notify_path = list(run_args), log_path, notify_path
        self.timeout, self.notify_owner = timeout, notify_owner
        self.notify: socket.socket | None = None
        self.proc: subprocess.Popen | None = None
        SupervisorProcess.start(self)

    def start(self) -> None:
        """Start the supervisor (again, after it stopped or died: same arguments, same paths); return at READY=1.
        Its log starts afresh; a supervisor never ready is stopped and nothing is left bound."""
        if self.proc is not None and self.proc.poll() is None:
            raise ShmguardError(f"the supervisor (pid {self.proc.pid}) is already running")
        if self.notify is not None:
            self.notify.close()
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if self.notify_path.exists() or self.notify_path.is_symlink():  # left by an earlier run in the same place
            self.notify_path.unlink()
        self.notify.bind(str(self.notify_path))
        if self.notify_owner is not None:  # a supervisor that drops to another user must still reach it
            os.chown(self.notify_path, self.notify_owner, -1)
            self.notify_path.chmod(0o600)
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path))
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen([*SHMGUARD, "run", *self.run_args], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log, env=env)
        try:
            self.wait_for("READY=1", self.timeout)
        except BaseException:
            SupervisorProcess.stop(self)  # never ready: nothing is left running, nothing bound
            raise

    def wait_for(self, word: str, timeout: float) -> str:
        """Wait for a notify message containing `word`; a supervisor that exits first is an error."""
        assert self.proc is not None and self.notify is not None
        deadline = time.monotonic() + timeout
        with _ExitWatch(self.proc) as exited:  # readable once it exits: no period to poll with
            while exited.fds and (remaining := deadline - time.monotonic()) > 0:
                readable, _, _ = select.select([self.notify, *exited.fds], [], [], remaining)
                if self.notify in readable:
                    message = self.notify.recv(4096).decode(errors="replace")
                    if word in message:
                        return message
                elif self.proc.poll() is not None:
                    break
        if self.proc.poll() is not None:
            raise ShmguardError(f"the supervisor exited with status {self.proc.returncode}; "
                                f"its log: {self.log_path}\n{self.log_tail()}")
        raise ShmguardError(f"no {word} from the supervisor within {timeout:g} s; its log: {self.log_path}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send sig (killing it if it is still there after timeout s), unbind the notify socket; the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            with _ExitWatch(self.proc) as exited:
                if not exited.within(timeout):
                    self.proc.kill()
            self.proc.wait()
        if self.notify is not None:
            self.notify.close()
        if self.notify_path.exists():
            self.notify_path.unlink()
        return self.proc.returncode


class _ExitWatch:
    """A pidfd of a child not yet reaped, readable once it exits (Popen.wait(timeout) polls every 50 ms)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.fds = proc, []
        if proc.returncode is None:
            try:
                self.fds = [os.pidfd_open(proc.pid)]  # a zombie still has its pid: it cannot be reused before wait()
            except ProcessLookupError:
                pass

    def within(self, timeout: float) -> bool:
        """Whether it exited within timeout seconds."""
        if self.fds:
            select.select(self.fds, [], [], timeout)
        return self.proc.poll() is not None

    def __enter__(self) -> _ExitWatch:
        return self

    def __exit__(self, *exc) -> None:
        for fd in self.fds:
            os.close(fd)


def relocate_policy(source: str, directory: Path, *, policy_path: Path | None = None, audit_log: Path | None = None,
                    durable: bool = False, region_prefix: str = "shmguard-", **sections: dict) -> Path:
    """Write a copy of a policy (built-in name or file) with its sockets in `directory`, its audit log at audit_log
    (directory/audit.log by default; fsync'd only if durable), a file-backed region at a new /dev/shm path starting
    with region_prefix, and `sections` merged over it, to policy_path (directory/policy.toml by default); return
    that path. The copy is not checked: ThrowawaySupervisor loads it, and a test may want a bad one."""
    text = relocated_policy_text(source, socket_dir=directory, audit_log=audit_log or directory / "audit.log",
                                 durable=durable, region_path=f"/dev/shm/{region_prefix}{secrets.token_hex(6)}",
                                 **sections)
    path = policy_path or directory / "policy.toml"
    path.write_text(text)
    return path


def _uid_of(user: str) -> int | None:
    """The uid a supervisor drops to; None if it drops to none, or to a user that does not exist (it says so)."""
    try:
        return pwd.getpwnam(user).pw_uid if user else None
    except KeyError:
        return None


OVERRIDES = {"--size": "size", "--vectors": "vectors", "--socket": "socket", "--control-socket": "control_socket",
             "--audit-log": "audit_log"}


def run_overrides(run_args: tuple[str, ...] | list[str]) -> dict[str, str]:
    """The `shmguard run` options among run_args that move a policy's paths or change its shape, as keywords of
    Policy.with_overrides (so that a supervisor's attributes name what it really uses)."""
    found, args = {}, list(run_args)
    for i, arg in enumerate(args):
        name, equals, value = arg.partition("=")
        if name in OVERRIDES:
            if not equals:
                if i + 1 == len(args):
                    break
                value = args[i + 1]
            found[OVERRIDES[name]] = value
    return found


class ThrowawaySupervisor(SupervisorProcess):
    """`shmguard run` (--no-guest unless guest) with a policy of its own, in a private directory made in `parent`
    (the system's temporary directory by default, mode 0755 so that a supervisor that drops to another user, and
    the users an attack plays, reach what is in it).

    relocate (the default): `source` (built-in name or file) is copied by relocate_policy into the directory with
    `sections` merged over it, so it shares no path with anything else. relocate=False: the policy file `source`
    is run as it is, and the directory holds only the log and the notify socket.

    The supervisor runs until stop(); start() starts it again on the same directory and policy, restart() does
    both. stop() removes the directory with everything in it unless keep (or remove=False); log() still answers
    after that. Attributes: policy (the Policy, with the run options applied), policy_path, socket, control, audit,
    region_path (None for a memfd), directory, proc."""

    def __init__(self, source: str = "strict", *run_args: str, guest: bool = False, relocate: bool = True,
                 parent: Path | str | None = None, prefix: str = "shmguard-supervisor-", durable: bool = False,
                 keep: bool = False, timeout: float = 30.0, **sections: dict):
        if not relocate and (sections or durable):
            raise ShmguardError("a policy run as it is takes no sections and no durable: relocate it, or edit it")
        policy = load_policy(source)  # a bad policy stops here, before anything is created
        self.keep, self._last_log = keep, ""
        self.directory = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        self.log_path = self.directory / "supervisor.log"
        try:
            self.directory.chmod(0o755)
            if relocate:
                self.policy_path = relocate_policy(source, self.directory, durable=durable, region_prefix=prefix,
                                                   **sections)
                policy = load_policy(str(self.policy_path))
            else:
                self.policy_path = locate(source)
            self.policy: Policy = policy.with_overrides(**run_overrides(run_args))
        except BaseException:
            if not keep:
                self._remove()
            raise
        self.socket, self.control = self.policy.server.socket, self.policy.control.socket
        self.audit = self.policy.audit.path
        self.region_path = self.policy.region.path if self.policy.region.backend == "file" else None
        owner = _uid_of(self.policy.hardening.user)
        args = ["--policy", str(self.policy_path), *([] if guest else ["--no-guest"]), *run_args]
        try:
            super().__init__(args, self.log_path, self.directory / "notify", timeout, owner)
        except BaseException as exc:
            self._failed_to_start(exc)

    @property
    def process(self) -> subprocess.Popen:
        assert self.proc is not None
        return self.proc

    def start(self) -> None:
        if not self.directory.is_dir():
            raise ShmguardError(f"{self.directory} was removed when the supervisor stopped: stop it with "
                                f"remove=False (or keep=True) to start it again")
        try:
            super().start()
        except BaseException as exc:
            self._failed_to_start(exc)

    def restart(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Stop (sig) and start again on the same directory and policy; the status the first run exited with."""
        status = self.stop(sig, timeout, remove=False)
        self.start()
        return status

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0, remove: bool | None = None) -> int:
        try:
            return super().stop(sig, timeout)
        finally:
            if remove if remove is not None else not self.keep:
                self._remove()

    def log(self) -> str:
        """What the supervisor wrote to stderr in this run (also after stop() removed the directory)."""
        try:
            return super().log()
        except FileNotFoundError:
            return self._last_log

    def wait_for_log(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """The first match of a regular expression in the supervisor's log, once it appears (woken by each write
        to the log, never by a period)."""
        deadline = time.monotonic() + timeout
        with INotify() as watch:
            watch.add_watch(self.log_path, F.MODIFY)  # before the first look: no write falls between the two
            while True:
                if match := re.search(pattern, self.log()):
                    return match
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ShmguardError(f"{pattern!r} not in the supervisor's log within {timeout:g} s; its log: "
                                        f"{self.log_path}\n{self.log_tail(40)}")
                watch.read(timeout=max(1, int(remaining * 1000)))

    def audit_records(self) -> list[dict]:
        """The audit log's records, oldest first."""
        with open(self.audit) as f:
            return [json.loads(line) for line in f if line.strip()]

    def client(self, timeout: float | None = 30.0) -> ControlClient:
        """A control client for this supervisor (every control request goes through ControlClient)."""
        return ControlClient(self.control, timeout=timeout)

    def cli(self, *args: str, input: str | bytes | None = None, check: bool = True,
            timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run `shmguard ARGS` (give it `--policy`, self.policy_path, where it takes one); check: a non-zero exit
        raises ShmguardError with its stderr."""
        result = subprocess.run([*SHMGUARD, *args], input=input, capture_output=True, timeout=timeout,
                                text=not isinstance(input, bytes))
        if check and result.returncode != 0:
            raise ShmguardError(f"shmguard {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def _failed_to_start(self, exc: BaseException) -> None:
        last = self.log().strip().splitlines()[-1:] if self.log_path.exists() else []
        if not self.keep:
            self._remove()
        if not isinstance(exc, ShmguardError):
            raise exc
        # One line, as for every error a user can cause: what happened and the supervisor's last word.
        raise ShmguardError(f"the throwaway supervisor did not start: {str(exc).split(';')[0]}: "
                            f"{last[0] if last else 'no output'}") from None

    def _remove(self) -> None:
        if self.log_path.exists():
            self._last_log = self.log_path.read_text(errors="replace")
        shutil.rmtree(self.directory, ignore_errors=True)
