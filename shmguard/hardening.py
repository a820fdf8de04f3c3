"""Process hardening as the policy asks for it: identity drop, capabilities, no_new_privs, non-dumpable, mlock.

The supervisor calls these once its region and sockets exist, in this order:
lock_memory(mapping) -> drop_identity(user, group, keep=...) -> harden(policy) -> sdnotify.ready().
Capabilities and no_new_privs are per thread: call drop_identity() and harden() before any thread starts.
The kernel calls themselves are in shmguard/linux/hardening.py; this layer decides the steps and words the errors.
"""

from __future__ import annotations

import errno
import grp
import mmap
import os
import pwd
import resource
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .errors import PolicyError, ShmguardError
from .linux import procfs
from .linux.hardening import (
    CAP_NUMBERS,
    CAP_SETGID,
    CAP_SETPCAP,
    CAP_SETUID,
    bits,
    capability_names,
    capability_number,
    child_preexec,
    clear_ambient,
    drop_from_bounding_set,
    dumpable,
    has_effective,
    limit_capabilities,
    lock_securebits,
    mapping_address,
    mlock,
    own_capabilities,
    process_security,
    set_dumpable,
    set_no_new_privs,
    set_process_name,
    switch_identity,
)
from .policy import HardeningPolicy

# Importable from here while callers move to shmguard.linux: the supervisor, qemu, attack and the tests use them.
__all__ = ["HardeningReport", "HardeningStep", "capability_mask", "capability_names", "child_preexec",
           "drop_identity", "harden", "lock_memory", "mapping_address", "process_security", "read_proc_status"]
read_proc_status = procfs.status


def capability_mask(names: Iterable[str]) -> int:
    """The mask of capability names as a policy writes them ("chown" or "CAP_CHOWN")."""
    mask = 0
    for name in names:
        number = capability_number(name)
        if number is None:
            raise PolicyError(f"hardening.capabilities: unknown capability {name!r} "
                              f"(known: {', '.join(sorted(CAP_NUMBERS))})")
        mask |= 1 << number
    return mask


# ---------------------------------------------------------------- identity


def drop_identity(user: str, group: str = "", keep: Iterable[str] = ()) -> None:
    """Switch every uid and gid to user/group (no supplementary groups), keeping only the `keep` capabilities.

    Verifies that the ids really changed and that setuid(0) now fails. A no-op when the process already
    runs as that user and group (for example under systemd's User=/Group=).
    """
    uid, gid = _resolve_identity(user, group)
    wanted = capability_mask(keep)
    if wanted & (1 << CAP_SETUID):
        raise PolicyError("hardening.capabilities: keeping \"setuid\" would let the supervisor become root "
                          "again after dropping to its user; remove it")
    if os.getresuid() == (uid, uid, uid) and os.getresgid() == (gid, gid, gid):
        _verify_identity(user, uid, gid)
        return
    _require_switch_capabilities(user)
    _limit_bounding_set_early(wanted)
    switch_identity(uid, gid, keep_permitted=bool(wanted))  # the permitted set survives only if something is kept
    _restrict_kept_capabilities(wanted)
    _verify_identity(user, uid, gid)


def _resolve_identity(user: str, group: str) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ShmguardError(f"hardening.user: user {user!r} does not exist; create it "
                            "(systemd-sysusers systemd/sysusers.d/shmguard.conf) or name another") from None
    if not group:
        return entry.pw_uid, entry.pw_gid
    try:
        return entry.pw_uid, grp.getgrnam(group).gr_gid
    except KeyError:
        raise ShmguardError(f"hardening.group: group {group!r} does not exist; create it "
                            f"(groupadd --system {group}) or name another") from None


def _require_switch_capabilities(user: str) -> None:
    missing = [name for cap, name in ((CAP_SETUID, "setuid"), (CAP_SETGID, "setgid")) if not has_effective(cap)]
    if missing:
        raise ShmguardError(f"cannot switch to user {user!r}: this process (uid {os.getuid()}) lacks "
                            f"CAP_{'/CAP_'.join(n.upper() for n in missing)}; start shmguard as root, "
                            "or let systemd switch (User=/Group=) and leave hardening.user empty")


def _limit_bounding_set_early(wanted: int) -> None:
    # After the switch CAP_SETPCAP is gone, so the bounding set can only be limited now.
    if not has_effective(CAP_SETPCAP):
        return
    drop_from_bounding_set(bits(own_capabilities("CapBnd") & ~wanted))


def _restrict_kept_capabilities(wanted: int) -> None:
    if not wanted:
        return
    kept = bits(wanted)
    missing = wanted & ~own_capabilities("CapPrm")
    if missing:
        raise ShmguardError(f"identity drop lost {', '.join(capability_names(missing))}: they were not in the "
                            "permitted set before the switch; start shmguard as root")
    # setuid cleared the effective set; root's full permitted set survived KEEPCAPS: shrink it now
    limit_capabilities(kept, raise_effective=True, inheritable=False)


def _verify_identity(user: str, uid: int, gid: int) -> None:
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise ShmguardError(f"identity drop to {user!r} did not take: uids {os.getresuid()}, "
                            f"gids {os.getresgid()}")
    if uid == 0:
        return
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise ShmguardError(f"identity drop to {user!r} is reversible: setuid(0) succeeded; "
                        "remove setuid from hardening.capabilities")


# ---------------------------------------------------------------- harden


@dataclass(frozen=True)
class HardeningStep:
    name: str
    ok: bool
    detail: str
    required: bool = True


@dataclass(frozen=True)
class HardeningReport:
    steps: tuple[HardeningStep, ...]

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(f"hardening step {s.name!r} failed: {s.detail}" for s in self.steps if not s.ok)

    def step(self, name: str) -> HardeningStep:
        return next(step for step in self.steps if step.name == name)

    def describe(self) -> list[dict]:
        return [{"name": s.name, "ok": s.ok, "detail": s.detail, "required": s.required} for s in self.steps]


class _StepFailed(Exception):
    """A hardening step could not be applied; the message says why and what to do."""


def harden(policy: HardeningPolicy, process_name: str = "shmguard") -> HardeningReport:
    """Apply the policy's hardening to this process, verify it from /proc, and report each step.

    A failed step the policy requires raises ShmguardError when policy.required; otherwise it is a warning.
    """
    wanted = capability_mask(policy.capabilities)
    plan: list[tuple[str, bool, Callable[[], str]]] = [
        ("single-thread", True, _check_single_thread),
        ("process-name", False, lambda: _set_process_name(process_name)),
        ("dumpable", not policy.dumpable, lambda: _set_dumpable(policy.dumpable)),
        ("no-new-privs", policy.no_new_privs, lambda: _set_no_new_privs(policy.no_new_privs)),
        ("securebits", False, _lock_securebits),
        ("bounding-set", True, lambda: _limit_bounding_set(wanted)),
        ("ambient", True, _clear_ambient),
        ("capabilities", True, lambda: _limit_capabilities(wanted)),
        ("verify", True, lambda: _verify(policy, wanted)),
    ]
    steps: list[HardeningStep] = []
    for name, required, action in plan:
        step = _run_step(name, required, action)
        steps.append(step)
        if not step.ok and required and policy.required:
            raise ShmguardError(f"hardening step {name!r} failed: {step.detail}")
    return HardeningReport(tuple(steps))


def _run_step(name: str, required: bool, action: Callable[[], str]) -> HardeningStep:
    try:
        return HardeningStep(name, True, action(), required)
    except (_StepFailed, OSError, ValueError) as exc:
        return HardeningStep(name, False, " ".join(str(exc).split()), required)


def _check_single_thread() -> str:
    threads = procfs.thread_count()
    if threads != 1:
        raise _StepFailed(f"{threads} threads are running, but capabilities and no_new_privs apply per "
                          "thread; call harden() before starting any thread")
    return "one thread"


def _set_process_name(name: str) -> str:
    return f"comm = {set_process_name(name)}"


def _set_dumpable(wanted: bool) -> str:
    if wanted:
        return "left dumpable (hardening.dumpable = true)"
    set_dumpable(False)
    return "not dumpable: no core dumps; same-uid processes cannot ptrace it or open /proc/PID/fd"


def _set_no_new_privs(wanted: bool) -> str:
    if not wanted:
        return "not set (hardening.no_new_privs = false)"
    set_no_new_privs()
    return "set: execve can no longer grant privileges (setuid bits, file capabilities)"


def _lock_securebits() -> str:
    if not has_effective(CAP_SETPCAP):
        return "skipped: no CAP_SETPCAP (nothing to lock for a process without it)"
    lock_securebits()
    return "noroot and keep_caps locked"


def _limit_bounding_set(wanted: int) -> str:
    extra = own_capabilities("CapBnd") & ~wanted
    if not extra:
        return f"bounding set = {_describe_mask(own_capabilities('CapBnd'))}"
    if not has_effective(CAP_SETPCAP):
        raise _StepFailed(f"cannot drop {len(bits(extra))} capabilities from the bounding set without "
                          "CAP_SETPCAP; set CapabilityBoundingSet= in the unit or call drop_identity() first")
    drop_from_bounding_set(bits(extra))
    return f"dropped {len(bits(extra))}; bounding set = {_describe_mask(wanted)}"


def _clear_ambient() -> str:
    clear_ambient()
    return "cleared"


def _limit_capabilities(wanted: int) -> str:
    effective, permitted, inheritable = (own_capabilities(f) for f in ("CapEff", "CapPrm", "CapInh"))
    missing = wanted & ~permitted
    if missing:
        raise _StepFailed(f"{', '.join(capability_names(missing))} not permitted for uid {os.getuid()}; "
                          "start shmguard as root or grant them (AmbientCapabilities= in the unit), "
                          "or remove them from hardening.capabilities")
    if (effective, permitted, inheritable) == (wanted, wanted, 0):
        return f"already exactly {_describe_mask(wanted)}"  # no capset: a syscall filter may forbid it
    limit_capabilities(bits(wanted), raise_effective=bool(wanted & ~effective))
    return f"effective = permitted = {_describe_mask(wanted)}; inheritable = none"


def _verify(policy: HardeningPolicy, wanted: int) -> str:
    status = procfs.status("thread-self")
    problems = _capability_problems(status, wanted)
    if policy.no_new_privs and status.get("NoNewPrivs") != "1":
        problems.append(f"NoNewPrivs is {status.get('NoNewPrivs', 'missing')}, expected 1")
    if not policy.dumpable and dumpable():
        problems.append("the process is still dumpable")
    if problems:
        raise _StepFailed("; ".join(problems))
    return (f"NoNewPrivs={status.get('NoNewPrivs')} dumpable={int(dumpable())} "
            f"CapEff={status['CapEff']} CapPrm={status['CapPrm']} CapBnd={status['CapBnd']}")


def _capability_problems(status: dict[str, str], wanted: int) -> list[str]:
    problems = []
    for field in ("CapEff", "CapPrm"):
        if int(status[field], 16) != wanted:
            problems.append(f"{field} is {_describe_mask(int(status[field], 16))}, "
                            f"expected {_describe_mask(wanted)}")
    for field in ("CapInh", "CapAmb"):
        if int(status.get(field, "0"), 16):
            problems.append(f"{field} is {_describe_mask(int(status[field], 16))}, expected none")
    extra = int(status["CapBnd"], 16) & ~wanted
    if extra:
        problems.append(f"CapBnd still holds {_describe_mask(extra)}")
    return problems


def _describe_mask(mask: int) -> str:
    return ",".join(capability_names(mask)) or "none"


# ---------------------------------------------------------------- memory


def lock_memory(mapping: mmap.mmap) -> None:
    """mlock every page of a writable mapping (pages come in now and are never swapped out).

    munmap (mapping.close()) releases the lock.
    """
    try:
        mlock(mapping)
    except OSError as exc:
        raise ShmguardError(_mlock_failure(exc.errno, len(mapping))) from None


def _mlock_failure(error: int, length: int) -> str:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
    locked = procfs.status().get("VmLck", "0 kB")
    where = (f"cannot lock the {length}-byte region in memory ({os.strerror(error)}; "
             f"RLIMIT_MEMLOCK {limit}, already locked {locked})")
    if error == errno.EPERM and soft != 0:  # the kernel's mlock says EPERM only for a zero limit: a filter refused
        return (f"{where}: the limit allows it, so a seccomp filter refused mlock (systemd-nspawn without "
                "--capability=CAP_IPC_LOCK, or SystemCallFilter=~@memlock): grant CAP_IPC_LOCK to the container, "
                "or set region.mlock = false")
    return (f"{where}: raise LimitMEMLOCK= in the unit (or `ulimit -l`) above the region size, "
            "grant CAP_IPC_LOCK, or set region.mlock = false")


def raise_fd_limit() -> None:
    """Peers cost one socket plus one eventfd per vector: use the whole hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def raise_memlock_limit(size: int) -> None:
    """A successor exec'd after the capabilities are gone locks the region again under this limit: room for two."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    wanted = 2 * size + (1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (wanted, max(hard, wanted) if hard != resource.RLIM_INFINITY
                                                     else hard))
    except (OSError, ValueError):
        pass  # not root: the limit is the unit's (LimitMEMLOCK=)
