"""Process hardening: identity drop, capabilities, no_new_privs, non-dumpable, mlock, child setup.

The supervisor calls these once its region and sockets exist, in this order:
lock_memory(mapping) -> drop_identity(user, group, keep=...) -> harden(policy) -> sdnotify.ready().
Capabilities and no_new_privs are per thread: call drop_identity() and harden() before any thread starts.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import mmap
import os
import pwd
import resource
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import prctl

from .errors import PolicyError, ShmguardError
from .policy import HardeningPolicy

PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_SETPCAP = prctl.CAP_SETPCAP
CAP_SETUID = prctl.CAP_SETUID
CAP_SETGID = prctl.CAP_SETGID
_CAP_NUMBERS = dict(zip(prctl.ALL_CAP_NAMES, prctl.ALL_CAPS, strict=True))
_CAP_NAMES = {number: name for name, number in _CAP_NUMBERS.items()}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


# ---------------------------------------------------------------- reading the truth from /proc


def read_proc_status(pid: int | str = "self") -> dict[str, str]:
    """The fields of /proc/<pid>/status ("self" and "thread-self" work too), values stripped."""
    fields: dict[str, str] = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def capability_names(mask: int | str) -> list[str]:
    """Names ("chown", "dac_override", ...) of the bits set in a capability mask such as CapEff's hex."""
    value = int(mask, 16) if isinstance(mask, str) else mask
    return [_CAP_NAMES.get(bit, f"cap_{bit}") for bit in _bits(value)]


def capability_mask(names: Iterable[str]) -> int:
    """The mask of capability names as a policy writes them ("chown" or "CAP_CHOWN")."""
    mask = 0
    for name in names:
        key = name.lower().removeprefix("cap_")
        if key not in _CAP_NUMBERS:
            raise PolicyError(f"hardening.capabilities: unknown capability {name!r} "
                              f"(known: {', '.join(sorted(_CAP_NUMBERS))})")
        mask |= 1 << _CAP_NUMBERS[key]
    return mask


def process_security(pid: int | str = "self") -> dict:
    """What `shmguard status` shows about a process: identity, no_new_privs, seccomp and capabilities."""
    status = read_proc_status(pid)
    return {
        "uid": status.get("Uid", "").split(),
        "gid": status.get("Gid", "").split(),
        "no_new_privs": status.get("NoNewPrivs") == "1",
        "seccomp": status.get("Seccomp", "0") != "0",
        "capabilities": {key: capability_names(status.get(field, "0"))
                         for key, field in (("effective", "CapEff"), ("permitted", "CapPrm"),
                                            ("inheritable", "CapInh"), ("bounding", "CapBnd"),
                                            ("ambient", "CapAmb"))},
    }


def _bits(mask: int) -> list[int]:
    return [bit for bit in range(mask.bit_length()) if mask >> bit & 1]


def _own_capabilities(field: str) -> int:
    # thread-self: capabilities belong to the calling thread, not to the process
    return int(read_proc_status("thread-self").get(field, "0"), 16)


def _has_effective(capability: int) -> bool:
    return bool(_own_capabilities("CapEff") >> capability & 1)


def _raw_prctl(option: int, arg2: int = 0) -> None:
    # python-prctl has no PR_CAP_AMBIENT and refuses capability numbers newer than its own table
    if _libc.prctl(option, arg2, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


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
    prctl.set_keepcaps(1 if wanted else 0)  # keep the permitted set across setuid only if something is kept
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    prctl.set_keepcaps(0)
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
    missing = [name for cap, name in ((CAP_SETUID, "setuid"), (CAP_SETGID, "setgid")) if not _has_effective(cap)]
    if missing:
        raise ShmguardError(f"cannot switch to user {user!r}: this process (uid {os.getuid()}) lacks "
                            f"CAP_{'/CAP_'.join(n.upper() for n in missing)}; start shmguard as root, "
                            "or let systemd switch (User=/Group=) and leave hardening.user empty")


def _limit_bounding_set_early(wanted: int) -> None:
    # After the switch CAP_SETPCAP is gone, so the bounding set can only be limited now.
    if not _has_effective(CAP_SETPCAP):
        return
    for capability in _bits(_own_capabilities("CapBnd") & ~wanted):
        _raw_prctl(PR_CAPBSET_DROP, capability)


def _restrict_kept_capabilities(wanted: int) -> None:
    if not wanted:
        return
    kept = _bits(wanted)
    missing = wanted & ~_own_capabilities("CapPrm")
    if missing:
        raise ShmguardError(f"identity drop lost {', '.join(capability_names(missing))}: they were not in the "
                            "permitted set before the switch; start shmguard as root")
    prctl.set_caps((kept, prctl.CAP_EFFECTIVE, True))  # setuid cleared the effective set
    prctl.cap_effective.limit(*kept)
    prctl.cap_permitted.limit(*kept)  # root's full permitted set survived KEEPCAPS: shrink it now


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
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise _StepFailed(f"{threads} threads are running, but capabilities and no_new_privs apply per "
                          "thread; call harden() before starting any thread")
    return "one thread"


def _set_process_name(name: str) -> str:
    prctl.set_name(name[:15])  # the kernel keeps 15 bytes of comm
    return f"comm = {prctl.get_name()}"


def _set_dumpable(dumpable: bool) -> str:
    if dumpable:
        return "left dumpable (hardening.dumpable = true)"
    prctl.set_dumpable(0)
    return "not dumpable: no core dumps; same-uid processes cannot ptrace it or open /proc/PID/fd"


def _set_no_new_privs(wanted: bool) -> str:
    if not wanted:
        return "not set (hardening.no_new_privs = false)"
    prctl.set_no_new_privs(1)
    return "set: execve can no longer grant privileges (setuid bits, file capabilities)"


def _lock_securebits() -> str:
    if not _has_effective(CAP_SETPCAP):
        return "skipped: no CAP_SETPCAP (nothing to lock for a process without it)"
    # uid 0 no longer implies capabilities on execve, and KEEPCAPS stays off for good
    bits = prctl.SECBIT_NOROOT | prctl.SECBIT_NOROOT_LOCKED | prctl.SECBIT_KEEP_CAPS_LOCKED
    prctl.set_securebits((prctl.get_securebits() & ~prctl.SECBIT_KEEP_CAPS) | bits)
    return "noroot and keep_caps locked"


def _limit_bounding_set(wanted: int) -> str:
    extra = _own_capabilities("CapBnd") & ~wanted
    if not extra:
        return f"bounding set = {_describe_mask(_own_capabilities('CapBnd'))}"
    if not _has_effective(CAP_SETPCAP):
        raise _StepFailed(f"cannot drop {len(_bits(extra))} capabilities from the bounding set without "
                          "CAP_SETPCAP; set CapabilityBoundingSet= in the unit or call drop_identity() first")
    for capability in _bits(extra):
        _raw_prctl(PR_CAPBSET_DROP, capability)
    return f"dropped {len(_bits(extra))}; bounding set = {_describe_mask(wanted)}"


def _clear_ambient() -> str:
    _raw_prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    return "cleared"


def _limit_capabilities(wanted: int) -> str:
    effective, permitted, inheritable = (_own_capabilities(f) for f in ("CapEff", "CapPrm", "CapInh"))
    missing = wanted & ~permitted
    if missing:
        raise _StepFailed(f"{', '.join(capability_names(missing))} not permitted for uid {os.getuid()}; "
                          "start shmguard as root or grant them (AmbientCapabilities= in the unit), "
                          "or remove them from hardening.capabilities")
    if (effective, permitted, inheritable) == (wanted, wanted, 0):
        return f"already exactly {_describe_mask(wanted)}"  # no capset: a syscall filter may forbid it
    kept = _bits(wanted)
    if wanted & ~effective:
        prctl.set_caps((kept, prctl.CAP_EFFECTIVE, True))
    prctl.cap_effective.limit(*kept)  # effective first: it must stay a subset of permitted
    prctl.cap_inheritable.limit()  # nothing is passed to programs with inheritable file capabilities
    prctl.cap_permitted.limit(*kept)
    return f"effective = permitted = {_describe_mask(wanted)}; inheritable = none"


def _verify(policy: HardeningPolicy, wanted: int) -> str:
    status = read_proc_status("thread-self")
    problems = _capability_problems(status, wanted)
    if policy.no_new_privs and status.get("NoNewPrivs") != "1":
        problems.append(f"NoNewPrivs is {status.get('NoNewPrivs', 'missing')}, expected 1")
    if not policy.dumpable and prctl.get_dumpable():
        problems.append("the process is still dumpable")
    if problems:
        raise _StepFailed("; ".join(problems))
    return (f"NoNewPrivs={status.get('NoNewPrivs')} dumpable={int(prctl.get_dumpable())} "
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
    length = len(mapping)
    if _libc.mlock(mapping_address(mapping), length) == 0:
        return
    raise ShmguardError(_mlock_failure(ctypes.get_errno(), length))


def mapping_address(mapping: mmap.mmap) -> int:
    """The address of a writable mapping; the buffer export is released before returning."""
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # a live export would make mapping.close() raise BufferError


def _mlock_failure(error: int, length: int) -> str:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
    locked = read_proc_status().get("VmLck", "0 kB")
    where = (f"cannot lock the {length}-byte region in memory ({os.strerror(error)}; "
             f"RLIMIT_MEMLOCK {limit}, already locked {locked})")
    if error == errno.EPERM and soft != 0:  # the kernel's mlock says EPERM only for a zero limit: a filter refused
        return (f"{where}: the limit allows it, so a seccomp filter refused mlock (systemd-nspawn without "
                "--capability=CAP_IPC_LOCK, or SystemCallFilter=~@memlock): grant CAP_IPC_LOCK to the container, "
                "or set region.mlock = false")
    return (f"{where}: raise LimitMEMLOCK= in the unit (or `ulimit -l`) above the region size, "
            "grant CAP_IPC_LOCK, or set region.mlock = false")


# ---------------------------------------------------------------- children (QEMU)


def child_preexec(pdeathsig: int = signal.SIGKILL) -> Callable[[], None]:
    """A Popen preexec_fn: the child gets `pdeathsig` when its parent dies, and no_new_privs.

    Create it in the parent (it records the parent's pid) from the thread that will own the child:
    the kernel sends the signal when that thread exits.
    """
    parent = os.getpid()

    def preexec() -> None:
        prctl.set_pdeathsig(int(pdeathsig))
        prctl.set_no_new_privs(1)
        if os.getppid() != parent:  # the parent died before the signal was armed: die as if it had been
            os.kill(os.getpid(), int(pdeathsig))
            os._exit(128 + int(pdeathsig))

    return preexec
