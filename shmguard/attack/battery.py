"""The battery: runs one attack at a time against a running supervisor as a child that drops uid, observes the
region, the sockets and the audit log afterwards, and judges what came of it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import replace

from ..client import IvshmemClient
from ..control import StatusRequest
from ..errors import ShmguardError
from ..linux import procfs
from ..linux.sockets import peer_credentials
from ..policy import Policy, load_policy
from . import expectations
from .catalogue import ATTACKS, ATTACKS_BY_NAME, Attack
from .children import Done, Scene, release_child, run_as
from .identities import MEMBER_USER, OUTSIDER_USER, ROLES, Identity
from .report import AttackResult, result_of
from .supervisor_link import ANSWER_SECONDS, SupervisorLink, eventually

ATTRIBUTION_GRACE = 0.025
MAX_LISTED_INCIDENTS = 20


class Battery:
    """Runs attacks one at a time against the supervisor serving a policy (a name, a path, or a Policy with
    command-line overrides applied); must run as root."""

    def __init__(self, policy: str | Policy, *, member_user: str = MEMBER_USER, outsider_user: str = OUTSIDER_USER,
                 qemu=None, supervisor: subprocess.Popen | None = None):
        if os.geteuid() != 0:
            raise ShmguardError("the attack battery runs as root: it attacks as root and drops to other uids")
        self.policy: Policy = policy if isinstance(policy, Policy) else load_policy(str(policy))
        self.qemu, self.supervisor = qemu, supervisor
        self.link = SupervisorLink(self.policy.control.socket, self.policy.audit.path)
        self.observer = IvshmemClient(self.policy.server.socket, timeout=10.0).connect()
        self.supervisor_pid = peer_credentials(self.observer.sock)[0]
        self.memfd = self.policy.region.backend == "memfd"
        self.region = self._memfd_path() if self.memfd else self.policy.region.path
        self.size = self.policy.region.size
        self.baseline = self._attributes(os.fstat(self.observer.shm_fd))
        self.scratch = tempfile.mkdtemp(prefix="shmguard-attack-")
        os.chmod(self.scratch, 0o1777)  # like /tmp: every uid can leave decoys, nobody can remove another's
        self.near = os.path.dirname(self.region) if not self.memfd else "/dev/shm"
        self.identities = {"root": Identity("root", "root", 0, 0, (0,)),
                           "member": Identity.of("member", member_user),
                           "outsider": Identity.of("outsider", outsider_user)}
        self.count = 0

    def _memfd_path(self) -> str:
        """/proc/<pid>/fd/<n> of the supervisor's memfd: the only way to name a region without a path."""
        wanted = _identity(os.fstat(self.observer.shm_fd))
        directory = procfs.fd_directory(self.supervisor_pid)
        for name in sorted(os.listdir(directory), key=int):
            try:
                if _identity(os.stat(f"{directory}/{name}")) == wanted:
                    return f"{directory}/{name}"
            except OSError:
                continue
        raise ShmguardError(f"no fd of supervisor {self.supervisor_pid} is the region")

    def _attributes(self, st: os.stat_result) -> tuple[int, int, int]:
        if self.memfd:
            return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)
        region = self.policy.region
        return region.owner, region.group, region.mode

    # --- running ---------------------------------------------------------------------------------------

    def run(self, attack: str | Attack, role: str) -> AttackResult:
        attack = ATTACKS_BY_NAME[attack] if isinstance(attack, str) else attack
        identity = self._identity_for(attack, role)
        expected = self.expected(attack, identity)
        self.count += 1
        message = f"shmguard attack {self.count}: {attack.name} as {role} {secrets.token_hex(8)}".encode()
        self.link.write(message)
        scene = Scene(self.region, self.memfd, self.size, self.policy.server.socket, self.policy.control.socket,
                      message, secrets.token_hex(6), self.scratch, self.near, identity,
                      self.policy.server.max_peers, self.policy.shares.connections)
        offset = self.link.audit_size()
        pid, done, release = run_as(identity, attack.action, scene)
        carry_on = self._run_adversary if attack.adversary else self._run_tamper
        return carry_on(attack, identity, expected, scene, done, offset, (pid, release))

    def _identity_for(self, attack: Attack, role: str) -> Identity:
        identity = self.identities[role]
        if attack.group_only:
            identity = Identity.of(role, identity.user, (self.policy.server.group,))
        if attack.fs_group_only:
            identity = replace(identity, fs_group=self.policy.server.group)
        return identity

    def _run_tamper(self, attack: Attack, identity: Identity, expected: str, scene: Scene, done: Done,
                    offset: int, child: tuple[int, int]) -> AttackResult:
        """Observe once every event the attack caused has been handled; undo what an alerting policy leaves."""
        try:
            self._settle()
            incidents = self._incidents_after(attack, done, offset)
            observed = self._observe(attack, done, incidents)
            if observed in ("alerted", "failed") and observed == expected:
                self._undo(attack)
            problems = self._problems(scene.message)
        finally:
            release_child(*child)
            self._clear_up(scene)
        if problems:
            observed = "FAILED"
        return result_of(attack, identity, expected, observed, done, incidents, problems)

    def _incidents_after(self, attack: Attack, done: Done, offset: int) -> list[dict]:
        if done.ok and not attack.legit:
            time.sleep(ATTRIBUTION_GRACE)  # an incident whose offender fanotify has not named yet waits 20 ms
        incidents = self.link.incidents_since(offset)
        if done.ok and not attack.legit and not incidents:
            incidents = self.link.await_incidents(offset)
        return incidents

    def _run_adversary(self, attack: Attack, identity: Identity, expected: str, scene: Scene, done: Done,
                       offset: int, child: tuple[int, int]) -> AttackResult:
        """Judge while the attacker still holds what it took; undo what it left in the supervisor's own
        descriptions; then, with the attacker gone, the same checks as after every attack."""
        try:
            try:
                problems, message = attack.judge(self, scene, done, offset, expected)
            finally:
                if attack.undo is not None:
                    attack.undo(self, scene, done)
        finally:
            release_child(*child)
            self._clear_up(scene)
        problems = problems + self._problems_after_adversary(message)
        incidents = self.link.incidents_since(offset)
        observed = "FAILED" if problems else self._observe_adversary(attack, done, incidents)
        if len(incidents) > MAX_LISTED_INCIDENTS:  # a repair that loops records without end: the first tell it
            done.facts["incidents"] = len(incidents)
            incidents = incidents[:MAX_LISTED_INCIDENTS]
        return result_of(attack, identity, expected, observed, done, incidents, problems)

    def run_all(self, attacks: list[str] | None = None, roles: tuple[str, ...] = ROLES,
                extras: bool = True) -> list[AttackResult]:
        chosen = [ATTACKS_BY_NAME[name] for name in attacks] if attacks else \
            [attack for attack in ATTACKS if extras or not attack.extra]
        return [self.run(attack, role) for attack in chosen for role in roles if role in attack.roles]

    def expected(self, attack: Attack, identity: Identity) -> str:
        return expectations.expected(attack, identity, self.policy, self.region, self.memfd, self.supervisor_pid)

    # --- what did happen -------------------------------------------------------------------------------

    def _observe(self, attack: Attack, done: Done, incidents: list[dict]) -> str:
        results = {record["result"] for record in incidents}
        if attack.legit and done.ok:
            return "allowed"
        if "repaired" in results:
            return "repaired"
        if "alerted" in results:
            return "alerted"
        if "failed" in results:
            return "failed"  # seen and recorded, but the guard could not put it back
        if not done.ok:
            sealed = self.memfd and attack.kind == "resize" and done.error == "EPERM"
            return "blocked" if sealed else "refused"
        return "FAILED"  # the attack did what it wanted and nobody noticed

    def _observe_adversary(self, attack: Attack, done: Done, incidents: list[dict]) -> str:
        if not done.ok:
            sealed = self.memfd and attack.kind == "hole-preallocated" and done.error == "EPERM"
            return "blocked" if sealed else "refused"
        if attack.kind.startswith("hole"):
            results = {record["result"] for record in incidents if record["detail"].get("kind") == "hole"}
            return "repaired" if "repaired" in results else "alerted" if "alerted" in results else "FAILED"
        return "withstood"

    def _problems_after_adversary(self, message: bytes) -> list[str]:
        """The supervisor answers again once the attacker is gone (its connections take a moment to close)."""
        if eventually(lambda: [] if (self.link.ask(StatusRequest()) or {}).get("ok") else ["no answer"],
                      ANSWER_SECONDS * 2):
            return [f"the supervisor does not answer status within {ANSWER_SECONDS * 2:g} s after the attack"]
        try:
            self._settle()
            return self._problems(message)
        except ShmguardError as exc:
            return [f"after the attack: {exc}"]

    def _problems(self, message: bytes) -> list[str]:
        problems = self.region_problems(message) + self._socket_problems()
        if self.qemu is not None and self.qemu.poll() is not None:
            problems.append(f"QEMU exited with status {self.qemu.poll()}")
        elif self.qemu is not None and not self._qemu_connected():
            problems.append("QEMU is no longer a peer")
        if self.supervisor is not None and self.supervisor.poll() is not None:
            problems.append(f"the supervisor exited with status {self.supervisor.poll()}")
        return problems

    def region_problems(self, message: bytes) -> list[str]:
        st = os.fstat(self.observer.shm_fd)
        problems = []
        if st.st_size != self.size:
            problems.append(f"region is {st.st_size} bytes, not {self.size}")
        content = os.pread(self.observer.shm_fd, len(message) + 1, 0)
        if content != message + b"\0":
            problems.append(f"message changed: {content[:40]!r}")
        found = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
        if found != self.baseline:
            problems.append(f"owner/group/mode are {found[0]}/{found[1]}/0{found[2]:o}, not "
                            f"{self.baseline[0]}/{self.baseline[1]}/0{self.baseline[2]:o}")
        if not self.memfd:
            entry = _lstat(self.region)
            if entry is None or _identity(entry) != _identity(st):
                problems.append(f"{self.region} is no longer the region")
        return problems

    def _socket_problems(self) -> list[str]:
        server = self.policy.server
        problems = []
        for path, mode in ((server.socket, server.mode), (self.policy.control.socket, self.policy.control.mode)):
            entry = _lstat(path)
            if entry is None or not stat.S_ISSOCK(entry.st_mode):
                problems.append(f"{path} is not a socket")
            elif (entry.st_uid, entry.st_gid, stat.S_IMODE(entry.st_mode)) != (server.owner, server.group, mode):
                problems.append(f"{path} has owner/group/mode {entry.st_uid}/{entry.st_gid}/"
                                f"0{stat.S_IMODE(entry.st_mode):o}")
        try:
            IvshmemClient(server.socket, timeout=5.0).connect().close()
        except ShmguardError as exc:
            problems.append(f"a new peer cannot join: {exc}")
        return problems

    def _qemu_connected(self) -> bool:
        peers = self.link.control(StatusRequest()).get("peers", [])
        return any(peer.get("pid") == self.qemu.pid for peer in peers)

    # --- putting things back ---------------------------------------------------------------------------

    def _settle(self) -> None:
        """Two round trips through the supervisor's loop: every event the attack caused has been handled."""
        for _ in range(2):
            self.link.control(StatusRequest())
        self.observer.update()

    def _undo(self, attack: Attack) -> None:
        """After an attack the policy only alerts on, put things back by hand for the next attack."""
        uid, gid, mode = self.baseline
        target = self.region
        for name in ("system.posix_acl_access", "system.posix_acl_default"):
            try:
                os.removexattr(target, name)
            except OSError:
                pass
        os.chown(target, uid, gid)
        os.chmod(target, mode)
        socket_path = self.policy.server.socket
        if attack.kind == "socket-attributes":
            os.chown(socket_path, self.policy.server.owner, self.policy.server.group)
            os.chmod(socket_path, self.policy.server.mode)
        self._settle()

    def _clear_up(self, scene: Scene) -> None:
        for directory in {self.scratch, self.near, os.path.dirname(self.policy.server.socket)}:
            for entry in os.scandir(directory):
                if scene.token in entry.name:
                    _remove(entry.path)

    def close(self) -> None:
        self.observer.close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> Battery:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
