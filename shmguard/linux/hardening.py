"""Process hardening primitives: prctl, capabilities, the uid/gid switch, mlock, child setup.

Plain values in, OSError out: which steps to take and what to tell the user is shmguard/hardening.py's.
Capabilities and no_new_privs are per thread: use these before any thread starts.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
from collections.abc import Callable, Iterable

import prctl

from . import libc, procfs

PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_SETPCAP = prctl.CAP_SETPCAP
CAP_SETUID = prctl.CAP_SETUID
CAP_SETGID = prctl.CAP_SETGID
CAP_NUMBERS = dict(zip(prctl.ALL_CAP_NAMES, prctl.ALL_CAPS, strict=True))  # "chown" -> 0, ...
_CAP_NAMES = {number: name for name, number in CAP_NUMBERS.items()}

# python-prctl has no PR_CAP_AMBIENT and refuses capability numbers newer than its own table
_prctl = libc.function("prctl", [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong])
_mlock = libc.function("mlock", [ctypes.c_void_p, ctypes.c_size_t])


# ---------------------------------------------------------------- capabilities


def bits(mask: int) -> list[int]:
    return [bit for bit in range(mask.bit_length()) if mask >> bit & 1]


def capability_names(mask: int | str) -> list[str]:
    """Names ("chown", "dac_override", ...) of the bits set in a capability mask such as CapEff's hex."""
    value = int(mask, 16) if isinstance(mask, str) else mask
    return [_CAP_NAMES.get(bit, f"cap_{bit}") for bit in bits(value)]


def capability_number(name: str) -> int | None:
    """The number of a capability written "chown" or "CAP_CHOWN", or None if this kernel's table lacks it."""
    return CAP_NUMBERS.get(name.lower().removeprefix("cap_"))


def own_capabilities(field: str) -> int:
    """A capability set of the calling thread ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb")."""
    return int(procfs.status("thread-self").get(field, "0"), 16)  # capabilities are per thread


def has_effective(capability: int) -> bool:
    return bool(own_capabilities("CapEff") >> capability & 1)


def drop_from_bounding_set(capabilities: Iterable[int]) -> None:
    """Needs CAP_SETPCAP."""
    for capability in capabilities:
        libc.call(_prctl, PR_CAPBSET_DROP, capability, 0, 0, 0, what="PR_CAPBSET_DROP")


def clear_ambient() -> None:
    libc.call(_prctl, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0, what="PR_CAP_AMBIENT")


def limit_capabilities(kept: list[int], raise_effective: bool, inheritable: bool = True) -> None:
    """Effective and permitted become `kept` (effective raised first when asked, since a uid switch clears it);
    the inheritable set is emptied unless told not to."""
    if raise_effective:
        prctl.set_caps((kept, prctl.CAP_EFFECTIVE, True))
    prctl.cap_effective.limit(*kept)  # effective first: it must stay a subset of permitted
    if inheritable:
        prctl.cap_inheritable.limit()  # nothing is passed to programs with inheritable file capabilities
    prctl.cap_permitted.limit(*kept)


PR_CAP_AMBIENT_RAISE = 2


def keep_across_exec(names: Iterable[str]) -> None:
    """Raise the kept capabilities into the ambient set, so that an exec (a reload) keeps them; the successor's
    hardening clears the ambient and inheritable sets again. Raises OSError if the kernel refuses."""
    kept = [CAP_NUMBERS[name.lower().removeprefix("cap_")] for name in names]
    if not kept:
        return
    prctl.set_caps((kept, prctl.CAP_INHERITABLE, True))
    for capability in kept:
        libc.call(_prctl, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, capability, 0, 0, what="PR_CAP_AMBIENT_RAISE")


def drop_exec_capabilities() -> None:
    """Undo keep_across_exec after an exec that failed: nothing this process starts may inherit them."""
    clear_ambient()
    prctl.cap_inheritable.limit()


def switch_identity(uid: int, gid: int, keep_permitted: bool) -> None:
    """Every uid and gid to uid/gid, no supplementary groups; the permitted set survives only if asked."""
    prctl.set_keepcaps(1 if keep_permitted else 0)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    prctl.set_keepcaps(0)


def lock_securebits() -> None:
    """uid 0 no longer implies capabilities on execve, and KEEPCAPS stays off for good. Needs CAP_SETPCAP."""
    bits_wanted = prctl.SECBIT_NOROOT | prctl.SECBIT_NOROOT_LOCKED | prctl.SECBIT_KEEP_CAPS_LOCKED
    prctl.set_securebits((prctl.get_securebits() & ~prctl.SECBIT_KEEP_CAPS) | bits_wanted)


def set_process_name(name: str) -> str:
    """comm, as the kernel keeps it (15 bytes)."""
    prctl.set_name(name[:15])
    return prctl.get_name()


def set_dumpable(value: bool) -> None:
    """Not dumpable: no core dumps, and same-uid processes can neither ptrace it nor open /proc/PID/fd."""
    prctl.set_dumpable(1 if value else 0)


def dumpable() -> bool:
    return bool(prctl.get_dumpable())


def set_no_new_privs() -> None:
    """For good: execve can no longer grant privileges (setuid bits, file capabilities)."""
    prctl.set_no_new_privs(1)


def process_security(pid: int | str = "self") -> dict:
    """Identity, no_new_privs, seccomp and capabilities of a process, from /proc/PID/status."""
    status = procfs.status(pid)
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


# ---------------------------------------------------------------- memory


def mlock(mapping: mmap.mmap) -> None:
    """mlock every page of a writable mapping; OSError with the kernel's errno if it refuses. munmap unlocks."""
    libc.call(_mlock, mapping_address(mapping), len(mapping), what="mlock")


def mapping_address(mapping: mmap.mmap) -> int:
    """The address of a writable mapping; the buffer export is released before returning."""
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # a live export would make mapping.close() raise BufferError


# ---------------------------------------------------------------- children


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
