"""What /proc says about a process and about this boot: each reader in one place, each failure spelled out.

Nothing here reads /proc/PID/cmdline: that reads the process's memory, which it can map from a file that never
answers (FUSE), and the reader would hang. A pid names a process only while it lives; `start_time` (field 22 of
/proc/PID/stat) with the pid names one process and never another, within one boot (`boot_id`).
"""

from __future__ import annotations

import os

BOOT_ID = "/proc/sys/kernel/random/boot_id"


def _fields(path: str) -> dict[str, str]:
    """A "Key: value" file of /proc as a dict, values stripped. Raises OSError."""
    fields: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def status(pid: int | str = "self") -> dict[str, str]:
    """The fields of /proc/PID/status ("self" and "thread-self" work too). Raises OSError."""
    return _fields(f"/proc/{pid}/status")


def identity(pid: int) -> tuple[int | None, int | None, str]:
    """(effective uid, effective gid, name) from /proc/PID/status; (None, None, "unknown") once it is gone."""
    try:
        fields = status(pid)
    except OSError:
        return None, None, "unknown"
    uid = int(fields["Uid"].split()[1]) if "Uid" in fields else None  # the effective ids did the deed
    gid = int(fields["Gid"].split()[1]) if "Gid" in fields else None
    return uid, gid, fields.get("Name", "unknown")


def exe(pid: int) -> str | None:
    """/proc/PID/exe, or None: exited (a zombie keeps its uid, not its exe), or hidden without CAP_SYS_PTRACE."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


COMM_READ = 64  # TASK_COMM_LEN is 16 bytes with the newline: one read takes all of it


def comm(pid: int) -> str | None:
    """The name the process gives itself: world-readable, and a hint, not proof. Three syscalls (open, one read,
    close): a supervisor without CAP_SYS_PTRACE names every peer of another uid this way."""
    try:
        fd = os.open(f"/proc/{pid}/comm", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, COMM_READ).decode("utf-8", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)


def executable(pid: int) -> str:
    """exe where it can be read, else comm labelled as such, else "unknown" (for records and logs)."""
    path = exe(pid)
    if path is not None:
        return path
    name = comm(pid)
    return f"{name} (comm)" if name is not None else "unknown"


def parse_stat(data: bytes) -> tuple[str, list[bytes]]:
    """The name (field 2) and fields 3 onward of a /proc/PID/stat line. The name is the process's own choice and
    may hold spaces and parentheses, so it ends at the last ")", never at the first."""
    head, _, tail = data.rpartition(b")")
    name = head.partition(b"(")[2]
    return name.decode("utf-8", "replace"), tail.split()


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat, in clock ticks since boot; None if there is no such process. Raises OSError
    if /proc will not say (hidepid)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(parse_stat(data)[1][22 - 3])


def boot_id() -> str:
    """This boot's id without dashes, or "unknown"."""
    try:
        with open(BOOT_ID) as f:
            return f.read().strip().replace("-", "") or "unknown"
    except OSError:
        return "unknown"


def fdinfo(fd: int, pid: int | str = "self") -> dict[str, str]:
    """The fields of /proc/PID/fdinfo/FD (flags in octal, eventfd-count in hex, ...). Raises OSError."""
    return _fields(f"/proc/{pid}/fdinfo/{fd}")


def fd_directory(pid: int | str = "self") -> str:
    """/proc/PID/fd: one entry per open fd, each a magic link to the very file (a memfd has no other name)."""
    return f"/proc/{pid}/fd"


def fd_path(fd: int, pid: int | str = "self") -> str:
    """/proc/PID/fd/FD: opening, chmod-ing or connecting through it reaches the inode behind the fd, whatever
    path names it now (or none: a memfd, an unlinked file)."""
    return f"{fd_directory(pid)}/{fd}"


def fd_target(fd: int, pid: int | str = "self") -> str | None:
    """What /proc/PID/fd/FD points at ("anon_inode:[eventfd]", "/memfd:shmguard (deleted)", a path), or None."""
    try:
        return os.readlink(fd_path(fd, pid))
    except OSError:
        return None


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def holds_open(pid: int, inode: tuple[int, int]) -> bool:
    """Does the process hold the inode (st_dev, st_ino) open? Raises OSError if its fds cannot be read."""
    directory = fd_directory(pid)
    for name in os.listdir(directory):
        try:
            st = os.stat(os.path.join(directory, name))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == inode:
            return True
    return False
