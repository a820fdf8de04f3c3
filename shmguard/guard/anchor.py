"""The anchor: a second hard link to the region in a private directory, so that an `rm` of its path can be undone."""

from __future__ import annotations

import logging
import os
import tempfile

from ..linux import procfs
from ..linux.inodes import link_fd
from .entries import identity, lstat_or_none

log = logging.getLogger("shmguard.guard")

ANCHOR_PREFIX = ".shmguard-anchor."


class Anchor:
    """A second hard link to the region in a private (0700) directory beside its path.

    The kernel never links an inode again once its last link is gone (linkat: ENOENT, even for an O_TMPFILE
    file after its first link), so without this `rm` of the path could never be undone.
    """

    def __init__(self, parent: str):
        self.parent = parent
        self.directory = self._make_directory()
        self.path = os.path.join(self.directory, "region")

    def _make_directory(self) -> str:
        """`.shmguard-anchor.<pid>.<start time>.<boot id>.<random>`: the owner is this very process, which a
        later process given the same pid (or pid 1 of the next container) is not."""
        return tempfile.mkdtemp(prefix=f"{ANCHOR_PREFIX}{owner_token(os.getpid())}.", dir=self.parent)

    @classmethod
    def create(cls, region_path: str, fd: int) -> Anchor:
        parent = os.path.dirname(region_path)
        remove_stale_anchors(parent)
        anchor = cls(parent)
        link_fd(fd, anchor.path)
        return anchor

    @classmethod
    def adopt(cls, directory: str) -> Anchor:
        """The anchor a predecessor made (the same process after exec: its owner token still names us)."""
        anchor = cls.__new__(cls)
        anchor.parent, anchor.directory = os.path.dirname(directory), directory
        anchor.path = os.path.join(directory, "region")
        return anchor

    @property
    def name(self) -> str:
        return os.path.basename(self.directory)

    def holds(self, inode: tuple[int, int]) -> bool:
        st = lstat_or_none(self.path)
        return st is not None and identity(st) == inode

    def renew(self, fd: int) -> dict:
        """A fresh private directory and link (someone with root removed ours)."""
        self.remove()
        self.directory = self._make_directory()
        self.path = os.path.join(self.directory, "region")
        link_fd(fd, self.path)
        return {"anchor": self.path}

    def remove(self) -> None:
        for path, remove in ((self.path, os.unlink), (self.directory, os.rmdir)):
            try:
                remove(path)
            except OSError:
                pass


def remove_stale_anchors(parent: str) -> None:
    """Anchors whose owner is gone: supervisors that died without cleaning up (each pins a region's memory).
    The owner is the exact process named in the anchor's name, not whichever process has its pid now."""
    for entry in os.scandir(parent):
        if not entry.name.startswith(ANCHOR_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.geteuid() or not _anchor_is_stale(entry.path):
                continue
            for inner in os.scandir(entry.path):
                os.unlink(inner.path)
            os.rmdir(entry.path)
        except OSError as exc:
            log.warning("guard: cannot remove the stale anchor %s: %s", entry.path, exc.strerror)
            continue
        log.info("guard: removed the stale anchor %s", entry.path)


def _anchor_is_stale(directory: str) -> bool:
    """Raises OSError when that cannot be known (then the anchor stays)."""
    parts = os.path.basename(directory).split(".")
    if len(parts) == 6 and parts[2].isdigit() and parts[3].isdigit():  # .shmguard-anchor.<pid>.<start>.<boot>.<r>
        pid, start, boot = int(parts[2]), int(parts[3]), parts[4]
        return boot != procfs.boot_id() or procfs.start_time(pid) != start
    if len(parts) == 4 and parts[2].isdigit():  # .shmguard-anchor.<pid>.<random>, from before start times
        pid = int(parts[2])
        if procfs.start_time(pid) is None:
            return True
        anchored = lstat_or_none(os.path.join(directory, "region"))
        return anchored is None or not procfs.holds_open(pid, identity(anchored))
    return False  # not a name a supervisor makes


def owner_token(pid: int) -> str:
    """`<pid>.<start time>.<boot id>`: one process, never another (pids are reused, start times within one
    boot are not)."""
    return f"{pid}.{procfs.start_time(pid)}.{procfs.boot_id()}"
