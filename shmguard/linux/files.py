"""Open file descriptions: a fresh one of a file we hold, never a dup that shares its flags."""

from __future__ import annotations

import os

from .procfs import fd_path


def reopen(fd: int, flags: int = os.O_RDWR) -> int:
    """A new open file description of the file behind fd. A dup (and an fd passed over SCM_RIGHTS) shares the
    description, so fcntl(F_SETFL) by its holder (O_APPEND) changes our I/O too; this one is ours alone. Works for
    regular files and memfds, not for anonymous inodes such as eventfds (docs/protocol.md §4)."""
    return os.open(fd_path(fd), flags | os.O_CLOEXEC)
