"""The hand-over: everything a supervisor knows that its successor needs, as versioned plain data plus named fds.

Two ways to a successor, one format:
- reload (`shmguard reload`, SIGHUP, ExecReload=): the running supervisor execs the installed shmguard in place
  (same pid: QEMU children and systemd's MAINPID stay), the fds inherited, SHMGUARD_HANDOVER naming them;
- crash recovery under systemd: the fds live in the service's fd store (FDSTORE=1, FDNAME=), the state in two
  memfds written in turn ("state-a", "state-b"), and a process started after a crash gets them all back through
  LISTEN_FDS/LISTEN_FDNAMES.
The state names fds, never fd numbers: "region", "ivshmem-listener", "peer-3", "peer-3-v0", ... A successor that
does not know the state's version refuses it (`problems`), so the old process goes on serving.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from .errors import ShmguardError

STATE_VERSION = 1
HANDOVER_ENV = "SHMGUARD_HANDOVER"  # "NAME=FD,NAME=FD,..." for a successor exec'd in place
STATE_SLOTS = ("state-a", "state-b")  # the fd store's two state memfds, written in turn
LISTEN_FDS_START = 3  # sd_listen_fds(3)


@dataclass
class Inheritance:
    """What a successor takes: the state and the fds it names. Fds nobody claims are closed by `close_unclaimed`."""

    state: dict
    fds: dict[str, int]
    source: str  # "reload" or "fd store"
    claimed: set[str] = field(default_factory=set)

    def fd(self, name: str) -> int:
        """The fd called `name`; ShmguardError if it did not come (the caller says what it could not recover)."""
        if name not in self.fds:
            raise ShmguardError(f"the hand-over has no fd named {name!r}")
        self.claimed.add(name)
        return self.fds[name]

    def has(self, name: str) -> bool:
        return name in self.fds

    def unclaimed(self) -> list[str]:
        return sorted(set(self.fds) - self.claimed - set(STATE_SLOTS))

    def close_unclaimed(self) -> list[str]:
        names = self.unclaimed()
        for name in names:
            try:
                os.close(self.fds[name])
            except OSError:
                pass
        return names


# --- the state as bytes --------------------------------------------------------------------------------------

def encode_state(state: dict, generation: int = 0) -> bytes:
    """One JSON document with a checksum line in front: a state torn by a crash mid-write is recognised."""
    body = json.dumps({"generation": generation, **state}, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(body).hexdigest().encode() + b"\n" + body


def decode_state(raw: bytes) -> dict | None:
    """The state, or None if it is torn, empty or not ours."""
    digest, _, body = raw.partition(b"\n")
    if not body or hashlib.sha256(body).hexdigest().encode() != digest:
        return None
    try:
        state = json.loads(body)
    except ValueError:
        return None
    return state if isinstance(state, dict) else None


def read_state_fd(fd: int) -> dict | None:
    size = os.fstat(fd).st_size
    return decode_state(os.pread(fd, size, 0)) if size else None


def state_memfd(state: dict, generation: int = 0) -> int:
    """A memfd holding the state, sealed against change (CLOEXEC: the exec path clears it for the successor)."""
    fd = os.memfd_create("shmguard-state", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    write_state(fd, state, generation)
    return fd


def write_state(fd: int, state: dict, generation: int) -> None:
    data = encode_state(state, generation)
    os.ftruncate(fd, len(data))
    view = memoryview(data)
    offset = 0
    while offset < len(view):
        offset += os.pwrite(fd, view[offset:], offset)


def problems(state: dict, live: dict) -> list[str]:
    """Why this process cannot take the state over: a version it does not know, or a change that cannot apply
    live (`live`: what the successor's own policy says of the same things). Empty when it can."""
    version = state.get("version")
    if version != STATE_VERSION:
        return [f"the running supervisor hands over state version {version!r}; this shmguard takes version "
                f"{STATE_VERSION} only (keep the running version, or restart the VMs with the new one)"]
    found = []
    for key, was in sorted(state.get("fixed", {}).items()):
        now = live.get(key)
        if now != was:
            found.append(f"{key} cannot change while peers are connected ({was!r} -> {now!r}); restart shmguard "
                         f"and the VMs to change it")
    return found


# --- where the fds come from ---------------------------------------------------------------------------------

def handover_environment(fds: dict[str, int]) -> str:
    return ",".join(f"{name}={fd}" for name, fd in fds.items())


def parse_fd_names(text: str) -> dict[str, int]:
    """SHMGUARD_HANDOVER's "NAME=FD,..." as a dict; ShmguardError on anything else."""
    fds: dict[str, int] = {}
    for item in filter(None, text.split(",")):
        name, sep, number = item.partition("=")
        if not sep or not name or not number.isdigit():
            raise ShmguardError(f"{HANDOVER_ENV}: {item[:64]!r} is not NAME=FD")
        fds[name] = int(number)
    return fds


def parse_listen_fds(env: dict[str, str], pid: int) -> dict[str, int]:
    """systemd's LISTEN_FDS/LISTEN_FDNAMES for this pid as {name: fd}; {} when they are not ours."""
    if env.get("LISTEN_PID") != str(pid) or not env.get("LISTEN_FDS", "").isdigit():
        return {}
    count = int(env["LISTEN_FDS"])
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    fds: dict[str, int] = {}
    for index in range(count):
        name = names[index] if index < len(names) else f"unknown-{index}"
        while name in fds:  # a name stored twice: keep both, the second under a name of its own
            name += "+"
        fds[name] = LISTEN_FDS_START + index
    return fds


def newest_state(fds: dict[str, int]) -> dict | None:
    """Of the fd store's two state memfds, the whole one written last."""
    states = [state for name in STATE_SLOTS if name in fds and (state := read_state_fd(fds[name])) is not None]
    return max(states, key=lambda state: state.get("generation", 0), default=None)


def inherited(env: dict[str, str] | None = None) -> Inheritance | None:
    """What this process was handed, by a predecessor that exec'd it or by systemd's fd store; None if nothing.
    Takes the variables out of the environment: QEMU and other children must not see them."""
    env = os.environ if env is None else env
    if HANDOVER_ENV in env:
        fds = parse_fd_names(env.pop(HANDOVER_ENV))
        for fd in fds.values():  # inherited across exec: no child of ours may inherit them again
            os.set_inheritable(fd, False)
        state = read_state_fd(fds["state"]) if "state" in fds else None
        if state is None:
            raise ShmguardError("the hand-over came without a readable state; not taking over")
        os.close(fds.pop("state"))
        return Inheritance(state, fds, "reload")
    fds = parse_listen_fds(env, os.getpid())
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if not fds:
        return None
    for fd in fds.values():
        os.set_inheritable(fd, False)
    state = newest_state(fds)
    return Inheritance(state or {}, fds, "fd store")
