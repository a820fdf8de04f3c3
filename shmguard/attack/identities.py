"""Who attacks (root, a member of the policy's group, an outsider) and a pure model of what the kernel lets
each uid try: DAC as the kernel applies it, search on every directory above, the sticky-bit rule.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass

from ..errors import ShmguardError
from ..policy import Policy

ROLES = ("root", "member", "outsider")
MEMBER_USER = "shmguard-member"
OUTSIDER_USER = "nobody"


@dataclass(frozen=True)
class Identity:
    """A uid an attack really drops to, with its primary and supplementary groups."""

    role: str
    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    fs_group: int | None = None  # a group held only as the fsgid: the kernel's file checks see it, SO_PEERCRED not

    @classmethod
    def of(cls, role: str, user: str, extra_groups: tuple[int, ...] = ()) -> Identity:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise ShmguardError(f"user {user!r} for the {role} attacks does not exist (scripts/bootstrap "
                                "creates shmguard-member)") from None
        groups = tuple(sorted(set(os.getgrouplist(user, entry.pw_gid)) | set(extra_groups)))
        return cls(role, user, entry.pw_uid, entry.pw_gid, groups)

    @property
    def label(self) -> str:
        return "root" if self.role == "root" else f"{self.role} ({self.user})"

    def may(self, st: os.stat_result, want: int) -> bool:
        """DAC as the kernel applies it (ACLs aside): owner bits, else group bits, else other bits."""
        if self.uid == 0:
            return True
        mode = stat.S_IMODE(st.st_mode)
        if self.uid == st.st_uid:
            bits = mode >> 6
        elif st.st_gid in self.groups or st.st_gid == self.fs_group:
            bits = mode >> 3
        else:
            bits = mode
        return bits & want == want

    def may_reach(self, path: str) -> bool:
        """Search permission on every directory above path."""
        parent = os.path.dirname(os.path.abspath(path))
        while True:
            if not self.may(os.stat(parent), 1):
                return False
            if parent == "/":
                return True
            parent = os.path.dirname(parent)

    def may_unlink(self, path: str) -> bool:
        """Write+search on the directory, and the sticky-bit rule (owner of the file or of the directory)."""
        directory = os.stat(os.path.dirname(path))
        entry = os.lstat(path)
        if self.uid == 0:
            return True
        if not self.may_reach(path) or not self.may(directory, 3):
            return False
        return not directory.st_mode & stat.S_ISVTX or self.uid in (entry.st_uid, directory.st_uid)


def permitted(needs: str, who: Identity, policy: Policy, region: str, memfd: bool) -> bool:
    """Would the kernel let `who` try this at all? (A sealed memfd is reachable by root only, through
    /proc/<pid>/fd, which needs ptrace access to the supervisor.)"""
    root = who.uid == 0
    region_st = os.stat(region)
    sockets = {"unlink-socket": policy.server.socket, "unlink-control": policy.control.socket}
    if needs in sockets:
        return who.may_unlink(sockets[needs])
    if needs in ("connect", "connect-control"):
        path = policy.server.socket if needs == "connect" else policy.control.socket
        return who.may_reach(path) and who.may(os.stat(path), 2)
    if needs == "own-socket":
        return root or who.uid == os.lstat(policy.server.socket).st_uid
    if memfd:
        return root and needs in ("write", "own", "chgrp", "root")
    checks = {
        "write": lambda: who.may_reach(region) and who.may(region_st, 2),
        "own": lambda: root or who.uid == region_st.st_uid,
        "chgrp": lambda: root or who.uid == region_st.st_uid,
        "root": lambda: root,
        "unlink": lambda: who.may_unlink(region),
        # protected_hardlinks: the owner, or whoever may read and write the file
        "link": lambda: root or (who.may_reach(region) and (who.uid == region_st.st_uid or who.may(region_st, 6))),
    }
    return checks[needs]()
