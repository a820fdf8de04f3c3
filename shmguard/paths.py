"""Every path the supervisor opens or creates goes through here, checked like the region.

A directory on the way to anything the supervisor makes (audit log, sockets, the region file) must be owned by
root or by one of the policy's owners and writable by nobody else: whoever can write a directory can replace what
is in it, plant a FIFO or a symlink where the supervisor will look, or rewrite a log it will continue. The one
exception is a sticky directory owned by root (/tmp, /dev/shm): there the kernel lets nobody but root and a file's
owner remove or rename that file, so what the supervisor makes there stays its own.

The checks walk the path from / with lstat, one component at a time, and follow a symbolic link only when the
link itself was made by root or one of the owners (/var/run -> /run); its target is then checked the same way.
Each directory is checked before anything below it is looked at, so a path that passed cannot be changed under
the supervisor by anyone it does not trust.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from collections.abc import Iterable

from .errors import ShmguardError

ROOT = 0
MAX_SYMLINKS = 40  # as the kernel's own limit on one lookup
OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY  # a FIFO or device can never block us
_OTHERS_MAY_WRITE = stat.S_IWGRP | stat.S_IWOTH  # an ACL granting write to anyone else shows in the group bits


def default_owners() -> frozenset[int]:
    """Root and the uid the supervisor runs as: the safe default when a caller names nobody else."""
    return frozenset({ROOT, os.geteuid()})


def trusted_owners(*uids: int | None) -> frozenset[int]:
    """Root, the uid the supervisor runs as, and the given uids (the policy's owners)."""
    return default_owners() | {uid for uid in uids if uid is not None}


def policy_owners(server_owner: int, hardening_user: str | int = "") -> frozenset[int]:
    """Who may own a directory the supervisor uses: root, its own uid, server.owner and hardening.user if set."""
    return trusted_owners(server_owner, _uid_of(hardening_user))


def _uid_of(user: str | int) -> int | None:
    if user == "" or user is None:
        return None
    if isinstance(user, int) or str(user).isdigit():
        return int(user)
    try:
        return pwd.getpwnam(str(user)).pw_uid
    except KeyError:
        return None  # the policy's own check names a missing user; trusting nobody more is the safe side


def user_name(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _owners_text(owners: Iterable[int]) -> str:
    return ", ".join(user_name(uid) for uid in sorted(owners))


def file_kind(mode: int) -> str:
    kinds = ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symbolic link"),
             (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"))
    return next((name for is_kind, name in kinds if is_kind(mode)), "file of unknown type")


# ---------------------------------------------------------------------------------------------------- directories


def directory_problem(st: os.stat_result, owners: frozenset[int]) -> tuple[str, str] | None:
    """(what is wrong, what to do) about one directory on the way, or None if only trusted users can change it."""
    mode = stat.S_IMODE(st.st_mode)
    found = f"owner {user_name(st.st_uid)}, mode {mode:04o}"
    if not stat.S_ISDIR(st.st_mode):
        return f"is a {file_kind(st.st_mode)}, not a directory", "remove it or choose another path"
    if st.st_uid not in owners:
        return (f"is owned by someone shmguard does not trust ({found}; trusted: {_owners_text(owners)})",
                "remove it, or chown it to root, and start again")
    if mode & _OTHERS_MAY_WRITE and not (mode & stat.S_ISVTX and st.st_uid == ROOT):
        who = " and ".join(name for bit, name in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "others"))
                           if mode & bit)
        return (f"is writable by {who} ({found}), who could replace what shmguard puts there",
                "chmod go-w it (or use a root-owned sticky directory like /tmp) and start again")
    return None


def _refuse(where: str, target: str, problem: tuple[str, str]) -> ShmguardError:
    what, fix = problem
    on_the_way = "" if where == target else f" (on the way to {target})"
    return ShmguardError(f"{where}{on_the_way} {what}: refusing it; {fix}")


def _walk(path: str | os.PathLike, owners: Iterable[int] | None, create_mode: int | None) -> tuple[str, list[str]]:
    """Resolve `path` from / checking every directory; create missing ones if create_mode is given.

    Returns the resolved path (no symlinks) and the directories created, outermost first."""
    trusted = default_owners() if owners is None else frozenset(owners) | {ROOT}
    target = os.fspath(path)
    if not os.path.isabs(target):
        target = os.path.join(os.getcwd(), target)  # getcwd is resolved; it is walked from / like the rest
    pending = list(reversed(target.split("/")))  # components still to resolve, next one last
    current, links, created = "/", 0, []
    problem = directory_problem(os.lstat("/"), trusted)
    if problem:
        raise _refuse("/", target, problem)
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":  # current has no symlinks in it, so its parent is the kernel's `..` too, checked already
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, name)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            if create_mode is None:
                raise ShmguardError(f"{candidate} (on the way to {target}) does not exist: create it "
                                    "or choose another path") from None
            if _make_one(candidate, create_mode, target):
                created.append(candidate)
            st = os.lstat(candidate)
        except OSError as err:
            raise ShmguardError(f"{candidate} (on the way to {target}): cannot inspect it: {err.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise ShmguardError(f"{target}: too many symbolic links on the way: choose another path")
            if st.st_uid not in trusted:
                raise _refuse(candidate, target, (
                    f"is a symbolic link made by {user_name(st.st_uid)}, not by root or a trusted owner "
                    f"({_owners_text(trusted)})", "remove it and start again"))
            link = os.readlink(candidate)
            if link.startswith("/"):
                current = "/"  # / was checked already
            pending.extend(reversed(link.split("/")))
            continue
        problem = directory_problem(st, trusted)
        if problem:
            raise _refuse(candidate, target, problem)
        current = candidate
    return current, created


def _make_one(directory: str, mode: int, target: str) -> bool:
    """mkdir one directory in a checked parent with exactly `mode`; False if someone made it first."""
    assert not mode & _OTHERS_MAY_WRITE, "a directory shmguard makes is writable by its owner only"
    try:
        os.mkdir(directory, mode)
    except FileExistsError:
        return False  # whoever made it, it is checked like any other directory on the way
    except OSError as err:
        raise ShmguardError(f"cannot create directory {directory} (for {target}): {err.strerror}") from None
    # The umask must neither loosen nor tighten the mode; through an fd, never a path someone could swap.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return True


def check_directory_chain(path: str | os.PathLike, allowed_owners: Iterable[int] | None = None) -> str:
    """Refuse, in one line, a directory from / down to `path` that someone untrusted could change.

    Trusted are root and `allowed_owners` (default: root and the uid we run as). Returns the path resolved."""
    return _walk(path, allowed_owners, None)[0]


def make_directory(path: str | os.PathLike, mode: int, allowed_owners: Iterable[int] | None = None) -> list[str]:
    """Create the missing tail of `path` with mkdir (mode exactly `mode`) and check the whole chain.

    An existing directory is never adopted for being there: it is checked like every other one.
    Returns the directories created, outermost first (their parents need an fsync for durability)."""
    return _walk(path, allowed_owners, mode)[1]


# ---------------------------------------------------------------------------------------------------- files


def file_problem(st: os.stat_result, owners: frozenset[int]) -> str | None:
    """Why an opened file must not be used as a log (or a file shmguard keeps writing), or None."""
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode):
        return f"it is a {file_kind(st.st_mode)}, not a regular file"
    if st.st_uid not in owners:
        return f"it is owned by {user_name(st.st_uid)} (trusted: {_owners_text(owners)})"
    if mode & _OTHERS_MAY_WRITE:
        return f"it is writable by others than its owner (mode {mode:04o})"
    if st.st_nlink != 1:
        return f"it has {st.st_nlink} hard links (another name for it may be in someone else's hands)"
    return None


def open_log(path: str | os.PathLike, flags: int = os.O_WRONLY | os.O_APPEND, mode: int = 0o640,
             allowed_owners: Iterable[int] | None = None, what: str = "log") -> tuple[int, bool]:
    """Open (or create with exactly `mode`) a file the supervisor keeps appending to: (fd, created).

    Never follows a symlink, never opens a FIFO or a device, and refuses in one line a file that someone
    untrusted owns, that others may write, or that has another name. The directory is the caller's to check."""
    trusted = default_owners() if allowed_owners is None else frozenset(allowed_owners) | {ROOT}
    path = os.fspath(path)
    try:
        fd = os.open(path, flags | OPEN_FLAGS | os.O_CREAT | os.O_EXCL, mode)
        created = True
    except FileExistsError:
        fd, created = _open_existing(path, flags, trusted, what), False
    except OSError as err:
        raise ShmguardError(f"cannot create {what} {path}: {err.strerror}") from None
    try:
        if created:
            os.fchmod(fd, mode)  # the umask must not loosen or tighten the documented mode
        problem = file_problem(os.fstat(fd), trusted)
        if problem:
            raise ShmguardError(f"refusing {what} {path}: {problem}; remove it (keep a copy if you need it) "
                                "and start again")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, created


def _open_existing(path: str, flags: int, trusted: frozenset[int], what: str) -> int:
    try:
        st = os.lstat(path)
    except OSError as err:
        raise ShmguardError(f"cannot open {what} {path}: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):  # a device is never opened at all: its open alone can have effects
        raise ShmguardError(f"refusing {what} {path}: {file_problem(st, trusted)}; remove it and start again")
    try:
        return os.open(path, flags | OPEN_FLAGS)
    except OSError as err:
        why = {errno.ELOOP: "it is a symbolic link", errno.ENXIO: "it is a FIFO, not a regular file"}.get(
            err.errno, err.strerror)
        raise ShmguardError(f"refusing {what} {path}: {why}; remove it and start again") from None


def open_for_reading(path: str | os.PathLike, what: str = "file") -> int:
    """Open any file the caller names for reading, but never hang on a FIFO: the fd of a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as err:
        raise ShmguardError(f"cannot read {what} {path}: {err.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ShmguardError(f"cannot read {what} {path}: it is a {file_kind(st.st_mode)}, not a regular file")
    os.set_blocking(fd, True)
    return fd
