"""Calls on an inode we hold that Python's os module lacks: a new name for it, and freeing its pages past EOF."""

from __future__ import annotations

import ctypes
import os

from .libc import call, function
from .procfs import fd_path

AT_FDCWD = -100
AT_SYMLINK_FOLLOW = 0x400
FALLOC_FL_KEEP_SIZE = 0x1
FALLOC_FL_PUNCH_HOLE = 0x2
PAST_EOF_END = 1 << 62  # freeing "everything past EOF": offset + length must still fit in a loff_t
_linkat = function("linkat", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int])
_fallocate = function("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])


def link_fd(fd: int, destination: str) -> None:
    """Give the inode behind fd a new name. os.link cannot: it calls link(2), which does not follow
    /proc/self/fd magic links. The kernel refuses (ENOENT) once the inode's last link is gone."""
    call(_linkat, AT_FDCWD, fd_path(fd).encode(), AT_FDCWD, os.fsencode(destination), AT_SYMLINK_FOLLOW,
         what=destination)


def free_past_eof(fd: int, size: int) -> None:
    """Give back pages allocated past the end of file (fallocate KEEP_SIZE): they would hide a hole from st_blocks."""
    try:
        call(_fallocate, fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, size, PAST_EOF_END - size)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot free the pages past the end of the region: {exc.strerror}") from None
