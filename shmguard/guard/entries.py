"""What every part of the guard shares: the region it guards, the one error, and how an entry is described."""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ShmguardError
from ..linux.procfs import fd_path
from ..region import FileState, Region


class GuardError(ShmguardError):
    """A repair the kernel does not allow; the incident is recorded as failed."""


@dataclass(frozen=True)
class Target:
    """The region as the guard holds it: its fd (always our inode), the size the policy gave it, its identity."""

    region: Region
    fd: int
    size: int
    inode: tuple[int, int]

    @classmethod
    def of(cls, region: Region) -> Target:
        return cls(region, region.fd, region.size, identity(os.fstat(region.fd)))

    @property
    def is_file(self) -> bool:
        return self.region.backend == "file"

    @property
    def path(self) -> str:
        """The region's path, or for a memfd the only name it has: the supervisor's /proc/PID/fd/N."""
        return self.region.path if self.is_file else fd_path(self.fd, os.getpid())


class FollowUp:
    """A check scheduled from the loop at once, to go on where the last one stopped (or to look again)."""

    def __init__(self, loop, check: Callable[[], None]):
        self.loop, self.check = loop, check
        self.pending = False
        self.closed = False

    def schedule(self) -> None:
        if not self.pending:
            self.pending = True
            self.loop.call_later(0, self._run)

    def _run(self) -> None:
        self.pending = False
        if not self.closed:
            self.check()


def describe_entry(path: str, st: os.stat_result | None) -> dict:
    """What sits at a path, for an incident's before/after."""
    if st is None:
        return {"present": False}
    kinds = {stat.S_IFREG: "file", stat.S_IFSOCK: "socket", stat.S_IFLNK: "symlink", stat.S_IFDIR: "directory"}
    entry = {"present": True, "type": kinds.get(stat.S_IFMT(st.st_mode), "other"), "inode": st.st_ino,
             "uid": st.st_uid, "gid": st.st_gid, "mode": f"0{stat.S_IMODE(st.st_mode):o}", "size": st.st_size}
    if stat.S_ISLNK(st.st_mode):
        try:
            entry["target"] = os.readlink(path)
        except OSError:
            pass
    return entry


def lstat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def region_state(st: os.stat_result) -> dict:
    return {**FileState.of(st).describe(), "blocks": st.st_blocks}


def rename_over(source: str, path: str) -> str | None:
    """rename(2) replaces any non-directory at path atomically; a directory there is moved aside first."""
    try:
        os.rename(source, path)
        return None
    except OSError as exc:
        if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
    aside = move_aside(path)
    os.rename(source, path)
    return aside


def move_aside(path: str) -> str:
    aside = f"{path}.foreign-{time.time_ns()}"
    os.rename(path, aside)
    return aside


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
