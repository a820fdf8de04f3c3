"""What a policy needs to be served by shmguard.service or shmguard@NAME.service (`policy check --unit`).

The units run shmguard as user shmguard, group ivshmem, with no capabilities, inside ProtectSystem=strict where
only the unit's RuntimeDirectory= and LogsDirectory= are writable. A policy that asks for more passes the plain
check and then fails at start with a bare "Operation not permitted"; this says which key and why, beforehand.
Pure: it reads the policy and the user database; a check run by the unit itself also asks its sandbox
whether a directory added with ReadWritePaths= is writable.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
from collections.abc import Callable

from .policy import Policy

# Mirrors systemd/shmguard.service and shmguard@.service (tests/test_systemd_container.py checks they agree).
UNIT_USER = "shmguard"
UNIT_GROUP = "ivshmem"
LIMIT_MEMLOCK = 64 << 20
_UNIT = re.compile(r"shmguard(?:@([^/@\s]+))?\.service")


def unit_dirs(unit: str) -> tuple[str, str]:
    """(RuntimeDirectory, LogsDirectory) of a unit, as absolute paths; ValueError for a unit not shmguard's."""
    match = _UNIT.fullmatch(unit)
    if not match:
        raise ValueError(f"unit {unit!r} is neither shmguard.service nor shmguard@NAME.service")
    instance = f"/{match.group(1)}" if match.group(1) else ""
    return f"/run/shmguard{instance}", f"/var/log/shmguard{instance}"


def unit_problems(policy: Policy, unit: str, writable: Callable[[str], bool] = lambda directory: False) -> list[str]:
    """Every reason the unit's user could not serve this policy, each naming the file, the key and the fix.
    writable(directory): whether a directory outside the unit's own is writable in its sandbox (ReadWritePaths=);
    only the unit's ExecStartPre, which runs in that sandbox, can tell (see `in_sandbox_writable`)."""
    runtime, logs = unit_dirs(unit)
    source, problems = policy.source, []
    try:
        user = pwd.getpwnam(UNIT_USER)
    except KeyError:
        return [f"{source}: user {UNIT_USER} does not exist yet: run systemd-sysusers (scripts/install-systemd does)"]
    groups = {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if UNIT_USER in g.gr_mem}
    for key, uid in (("server.owner", policy.server.owner), ("region.owner", policy.region.owner)):
        if key == "region.owner" and policy.region.backend != "file":
            continue
        if uid != user.pw_uid:
            problems.append(f"{source}: {key}: {unit} runs as {UNIT_USER}, which cannot give a file to "
                            f"{_user(uid)} (no CAP_CHOWN); set {key.split('.')[1]} = \"{UNIT_USER}\"")
    for key, gid in (("server.group", policy.server.group), ("region.group", policy.region.group)):
        if key == "region.group" and policy.region.backend != "file":
            continue
        if gid not in groups:
            problems.append(f"{source}: {key}: {UNIT_USER} is not a member of {_group(gid)} and cannot give it a "
                            f"file; use \"{UNIT_GROUP}\"")
    for key in ("user", "group"):
        if getattr(policy.hardening, key):
            problems.append(f"{source}: hardening.{key}: systemd has already switched to {UNIT_USER}:{UNIT_GROUP} "
                            "before exec; leave it empty")
    if policy.hardening.capabilities:
        caps = " ".join(f"CAP_{c.upper()}" for c in policy.hardening.capabilities)
        problems.append(f"{source}: hardening.capabilities: {unit} grants no capabilities; add "
                        f"CapabilityBoundingSet={caps} and AmbientCapabilities={caps} with `systemctl edit {unit}`")
    for key, path, allowed in (("server.socket", policy.server.socket, runtime),
                               ("control.socket", policy.control.socket, runtime),
                               ("audit.path", policy.audit.path, logs)):
        if not _inside(path, allowed) and not writable(os.path.dirname(path)):
            problems.append(f"{source}: {key}: {path} is read-only in {unit}'s sandbox (ProtectSystem=strict); "
                            f"put it under {allowed}/ (or add ReadWritePaths= with `systemctl edit {unit}`)")
    if policy.region.backend == "file" and not _inside(policy.region.path, "/dev/shm"):
        problems.append(f"{source}: region.path: {policy.region.path} is read-only in {unit}'s sandbox; "
                        "keep the region file in /dev/shm")
    if policy.region.mlock and policy.region.size > LIMIT_MEMLOCK:
        problems.append(f"{source}: region.size: {policy.region.size} bytes cannot be locked under {unit}'s "
                        f"LimitMEMLOCK={LIMIT_MEMLOCK >> 20}M; raise it with `systemctl edit {unit}` or set "
                        "region.mlock = false")
    return problems


def in_sandbox_writable(directory: str) -> bool:
    """For a check run by the unit itself (systemd sets INVOCATION_ID): is `directory` on a file system its
    sandbox mounts read-write? ProtectSystem=strict mounts everything else read-only."""
    if "INVOCATION_ID" not in os.environ:
        return False
    try:
        return not os.statvfs(directory).f_flag & os.ST_RDONLY
    except OSError:
        return False


def _inside(path: str, directory: str) -> bool:
    return os.path.normpath(path).startswith(directory.rstrip("/") + "/")


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return f"group {grp.getgrgid(gid).gr_name}"
    except KeyError:
        return f"gid {gid}"
