"""The region's names and attributes: its path, the anchor link, stray links, owner/group/mode and ACLs."""

from __future__ import annotations

import logging
import os
import secrets
import stat

from ..linux.inodes import link_fd
from ..policy import GuardPolicy
from .anchor import Anchor
from .entries import (
    FollowUp,
    GuardError,
    Target,
    describe_entry,
    identity,
    lstat_or_none,
    region_state,
    rename_over,
    unlink_quietly,
)
from .incidents import Incidents, listed

log = logging.getLogger("shmguard.guard")

ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
STRAYS_PER_CHECK = 1024  # stray links unlinked per check; more are left to a follow-up check at once


def acl_names(target: int | str) -> list[str]:
    try:
        return [name for name in os.listxattr(target) if name in ACL_XATTRS]
    except OSError:
        return []  # a filesystem without xattrs has no ACLs either


class Names:
    """Owner, group, mode and ACLs of the region (both backends); its path, anchor and strays (file backend)."""

    def __init__(self, target: Target, responses: GuardPolicy, incidents: Incidents, follow_up: FollowUp,
                 attributes: tuple[int, int, int] | None):
        self.target, self.responses, self.incidents, self.follow_up = target, responses, incidents, follow_up
        self.expected = self._expected_attributes(attributes)
        self.anchor: Anchor | None = None
        self._unlink_budget = STRAYS_PER_CHECK  # stray links this check may still unlink

    def _expected_attributes(self, attributes: tuple[int, int, int] | None) -> tuple[int, int, int]:
        if self.target.is_file:
            if attributes is None:
                raise GuardError("a region file is guarded with the owner, group and mode of its policy")
            return attributes
        st = os.fstat(self.target.fd)  # a memfd has no policy identity: keep the one it was born with
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    def start(self, anchor: str | None = None) -> None:
        """anchor: the directory of a predecessor's anchor, taken over instead of making one."""
        if not self.target.is_file:
            return
        if anchor is not None and os.path.isdir(anchor):
            self.anchor = Anchor.adopt(anchor)
            return
        try:
            self.anchor = Anchor.create(self.target.region.path, self.target.fd)
        except OSError as exc:
            log.warning("guard: no anchor beside %s (%s): an `rm` of the path cannot be undone",
                        self.target.region.path, exc.strerror)

    def close(self) -> None:
        if self.anchor is not None:
            self.anchor.remove()
            self.anchor = None

    def begin_check(self) -> None:
        self._unlink_budget = STRAYS_PER_CHECK

    def watched_names(self) -> set[str]:
        """The entries of the region's directory that concern us."""
        return {os.path.basename(self.target.region.path)} | ({self.anchor.name} if self.anchor else set())

    # --- attributes (both backends) ------------------------------------------------------------------------

    def check_attributes(self) -> None:
        st = os.fstat(self.target.fd)
        if (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) != self.expected:
            self.incidents.report("attributes", self.target.path, {"region": region_state(st)},
                                  self.responses.on_attributes, self._restore_attributes)

    def _restore_attributes(self) -> dict:
        uid, gid, mode = self.expected
        try:
            os.fchown(self.target.fd, uid, gid)
            os.fchmod(self.target.fd, mode)  # after chown, which may clear bits
        except PermissionError as exc:
            raise GuardError(f"cannot restore owner/group/mode: {exc.strerror} (a file given to another owner "
                             "can only be taken back with CAP_CHOWN and CAP_FOWNER: hardening.capabilities)") from None
        return {"region": region_state(os.fstat(self.target.fd))}

    def check_acl(self) -> None:
        names = acl_names(self.target.fd)
        if names:  # an ACL can grant access that the mode bits do not show
            self.incidents.report("acl", self.target.path, {"xattrs": names}, self.responses.on_attributes,
                                  self._remove_acl)

    def _remove_acl(self) -> dict:
        for name in acl_names(self.target.fd):
            os.removexattr(self.target.fd, name)
        self._restore_attributes()
        return {"xattrs": acl_names(self.target.fd), "region": region_state(os.fstat(self.target.fd))}

    # --- the region's names (file backend) -----------------------------------------------------------------

    def check_path(self) -> None:
        path = self.target.region.path
        entry = lstat_or_none(path)
        if entry is not None and identity(entry) == self.target.inode:
            return
        strays = self._stray_names()
        kind = "replaced" if entry is not None else "rename" if strays else "unlink"
        before = {"path": describe_entry(path, entry), "region": region_state(os.fstat(self.target.fd)),
                  **listed("strays", strays)}
        self.incidents.report(kind, path, before, self.responses.on_unlink, lambda: self._relink(strays))

    def _relink(self, strays: list[str]) -> dict:
        """Our inode back at the path in one rename (whatever else was there is replaced), strays removed."""
        if os.fstat(self.target.fd).st_nlink == 0:
            raise GuardError("every link to the region is gone and the kernel never relinks such an inode "
                             "(linkat: ENOENT); peers keep it through their fds, the path cannot come back")
        path = self.target.region.path
        temporary = self._link_beside(path)
        try:
            moved_aside = rename_over(temporary, path)
        except OSError:
            unlink_quietly(temporary)
            raise
        removed = self._unlink_strays(strays)
        return {"path": describe_entry(path, lstat_or_none(path)), **listed("removed", removed),
                "moved_aside": moved_aside, "region": region_state(os.fstat(self.target.fd))}

    def _link_beside(self, path: str) -> str:
        directory, base = os.path.split(path)
        for _ in range(8):  # a random name in a shared directory: someone may hold one we pick
            temporary = os.path.join(directory, f".{base}.relink-{secrets.token_hex(6)}")
            try:
                link_fd(self.target.fd, temporary)
                return temporary
            except FileExistsError:
                continue
            except OSError:
                if self.anchor is None or not self.anchor.holds(self.target.inode):
                    raise
                os.link(self.anchor.path, temporary)  # the anchor is a plain name on the same filesystem
                return temporary
        raise GuardError(f"{directory}: cannot find a free name to relink the region")

    def _stray_names(self) -> list[str]:
        """Other names of our inode in the region's directory and the anchor's (rename, hard link)."""
        path = self.target.region.path
        directories = [os.path.dirname(path)] + ([self.anchor.directory] if self.anchor else [])
        keep = {path} | ({self.anchor.path} if self.anchor else set())
        found = []
        for directory in directories:
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                if entry.path not in keep and entry.inode() == self.target.inode[1] and self._is_ours(entry.path):
                    found.append(entry.path)
        return found

    def _is_ours(self, path: str) -> bool:
        st = lstat_or_none(path)
        return st is not None and identity(st) == self.target.inode

    def _unlink_if_ours(self, path: str) -> bool:
        if not self._is_ours(path):
            return False
        unlink_quietly(path)
        return not self._is_ours(path)

    def _unlink_strays(self, strays: list[str]) -> list[str]:
        """Unlink as many strays as this check's budget allows; the rest wait for a follow-up check, scheduled at
        once, so that thousands of links are all removed without holding up the loop for long."""
        batch, rest = strays[:self._unlink_budget], strays[self._unlink_budget:]
        self._unlink_budget -= len(batch)
        if rest:
            self.follow_up.schedule()
        return [name for name in batch if self._unlink_if_ours(name)]

    def check_anchor(self) -> None:
        anchor = self.anchor
        if anchor is None or anchor.holds(self.target.inode) or os.fstat(self.target.fd).st_nlink == 0:
            return
        before = {"anchor": describe_entry(anchor.path, lstat_or_none(anchor.path))}
        self.incidents.report("anchor", anchor.path, before, self.responses.on_unlink,
                              lambda: anchor.renew(self.target.fd))

    def check_extra_links(self) -> None:
        st = os.fstat(self.target.fd)
        path = self.target.region.path
        expected = int(self._is_ours(path)) + int(self.anchor is not None and self.anchor.holds(self.target.inode))
        if st.st_nlink <= expected:
            return
        if self._unlink_budget == 0 and self.follow_up.pending:
            self.incidents.still("extra-link", path)
            return  # the relink used up this check's unlinks: the follow-up check goes on
        strays = self._stray_names()
        before = {"nlink": st.st_nlink, "expected": expected, **listed("strays", strays)}
        self.incidents.report("extra-link", path, before, self.responses.on_unlink,
                              lambda: self._remove_strays(strays))

    def _remove_strays(self, strays: list[str]) -> dict:
        removed = self._unlink_strays(strays)
        left = os.fstat(self.target.fd).st_nlink
        if not removed and not self.follow_up.pending:
            raise GuardError(f"a hard link to the region outside {os.path.dirname(self.target.region.path)} "
                             f"(st_nlink {left}) cannot be found without walking the whole filesystem")
        return {**listed("removed", removed), "nlink": left}
