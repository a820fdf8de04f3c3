"""Guard: watches the region's path and both sockets, re-reads the truth on every event, and responds.

It is part of the supervisor's one event loop: an inotify fd, a periodic scan of the region's allocation (some
tampers make no event at all: a hole punched through a memfd's own description), and, as root, a fanotify fd that
names offenders plus the report pipe of the opener witness (fanotify.py), which reads who opens the region while
the kernel holds the opener.
An event only says "look now": the truth is fstat of the held region fd, lstat of the paths and the directory
entries, compared with the policy (REFERENCE §4: a truncation arrives as IN_MODIFY like a write, `rm` of an
open file as IN_ATTRIB only, writes through mmap as nothing at all). Repairs cause events of their own; those
find nothing wrong and so do nothing.

Responses ([guard] in the policy): block = the sealed memfd refuses any resize in the kernel; repair = put back
size, contents, owner/group/mode, ACLs, the path and the sockets; alert = log and record only.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import secrets
import stat
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inotify_simple import INotify
from inotify_simple import flags as F

from .audit import MAX_RECORD_BYTES, Actor, canonical_json
from .errors import ShmguardError
from .fanotify import (
    FAN_ATTRIB,
    FAN_DELETE_SELF,
    FAN_MODIFY,
    FAN_MOVE_SELF,
    FAN_OPEN,
    Fanotify,
    Opener,
    OpenerWitness,
    Touch,
    Witnesses,
)
from .region import FileState, Region, pread_all, pwrite_all

log = logging.getLogger("shmguard.guard")

REGION_EVENTS = F.MODIFY | F.CLOSE_WRITE | F.ATTRIB | F.MOVE_SELF | F.DELETE_SELF
MEMFD_EVENTS = F.MODIFY | F.ATTRIB | F.OPEN  # nobody but us may open the memfd: any open is news
SOCKET_EVENTS = F.ATTRIB | F.MOVE_SELF | F.DELETE_SELF
DIR_EVENTS = (F.CREATE | F.DELETE | F.MOVED_FROM | F.MOVED_TO | F.ATTRIB | F.DELETE_SELF | F.MOVE_SELF
              | F.ONLYDIR | F.DONT_FOLLOW)
FAN_REGION = FAN_MODIFY | FAN_ATTRIB | FAN_MOVE_SELF | FAN_DELETE_SELF
FAN_MEMFD = FAN_MODIFY | FAN_ATTRIB | FAN_OPEN
FAN_SOCKET = FAN_ATTRIB | FAN_MOVE_SELF | FAN_DELETE_SELF

# The fanotify events whose process is the offender of each kind of incident.
OFFENCES = {
    "shrink": FAN_MODIFY, "grow": FAN_MODIFY, "hole": FAN_MODIFY, "contents": FAN_MODIFY, "preallocation": FAN_MODIFY,
    "attributes": FAN_ATTRIB, "acl": FAN_ATTRIB, "extra-link": FAN_ATTRIB, "anchor": FAN_ATTRIB,
    "unlink": FAN_ATTRIB | FAN_DELETE_SELF, "rename": FAN_MOVE_SELF, "replaced": FAN_ATTRIB | FAN_MOVE_SELF,
    "socket-removed": FAN_SOCKET, "socket-replaced": FAN_SOCKET, "socket-attributes": FAN_ATTRIB,
    "region-opened": FAN_OPEN,
}
# Incidents that mean the region's contents cannot be trusted: no known-good copy is taken while one is unresolved.
CONTENT_KINDS = frozenset({"shrink", "grow", "hole", "preallocation", "contents"})
ATTRIBUTION_WAIT_NS = 20_000_000  # how long a repaired incident waits for its offender's fanotify event
OPENERS_REMEMBERED = 1024  # identities of processes that opened the region, read while the kernel held them
TAMPER_WINDOW_NS = 1_000_000_000  # after a resize or hole, writes until the writer's close are undone too
HOLE_SEEK_BYTES = 64 << 20  # bytes a scan looks through for holes (SEEK_HOLE costs about 10 us per MiB)
REFRESH_INTERVAL_NS = 50_000_000  # at most one read of the whole region per interval for the known-good copy
STRAYS_PER_CHECK = 1024  # stray links unlinked per check; more are left to a follow-up check at once
LIST_LIMIT = 16  # entries of any list in an incident's detail; `<name>_count` says how many there were
TEXT_LIMIT = 1024  # characters of any string in an incident's detail
DETAIL_LIMIT = MAX_RECORD_BYTES // 4  # bytes of an incident's detail as JSON: its record stays far below the limit
ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
ANCHOR_PREFIX = ".shmguard-anchor."
BOOT_ID = "/proc/sys/kernel/random/boot_id"
AT_FDCWD = -100
AT_SYMLINK_FOLLOW = 0x400
FALLOC_FL_KEEP_SIZE = 0x1
FALLOC_FL_PUNCH_HOLE = 0x2
PAST_EOF_END = 1 << 62  # freeing "everything past EOF": offset + length must still fit in a loff_t
_libc = ctypes.CDLL(None, use_errno=True)
_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class GuardError(ShmguardError):
    """A repair the kernel does not allow; the incident is recorded as failed."""


# ---------------------------------------------------------------------------------------------------- syscalls


def link_fd(fd: int, destination: str) -> None:
    """Give the inode behind fd a new name. os.link cannot: it calls link(2), which does not follow
    /proc/self/fd magic links. The kernel refuses (ENOENT) once the inode's last link is gone."""
    if _libc.linkat(AT_FDCWD, f"/proc/self/fd/{fd}".encode(), AT_FDCWD, os.fsencode(destination),
                    AT_SYMLINK_FOLLOW) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error), destination)


def acl_names(target: int | str) -> list[str]:
    try:
        return [name for name in os.listxattr(target) if name in ACL_XATTRS]
    except OSError:
        return []  # a filesystem without xattrs has no ACLs either


def allocate(fd: int, size: int) -> None:
    """Back every page, so that a punched hole or a truncate-and-regrow shows as fewer st_blocks."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


def free_past_eof(fd: int, size: int) -> None:
    """Give back pages allocated past the end of file (fallocate KEEP_SIZE): they would hide a hole from st_blocks."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, size, PAST_EOF_END - size) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"cannot free the pages past the end of the region: {os.strerror(error)}")


def first_hole(fd: int, size: int, offset: int = 0) -> int:
    """Where the first page without data is (from offset), or size if every page holds data. tmpfs counts a page
    that is allocated but never written (fallocate) as a hole too, so this sees what st_blocks cannot."""
    try:
        return min(os.lseek(fd, offset, os.SEEK_HOLE), size)
    except OSError:
        return size  # ENXIO (offset at the end), or a filesystem without SEEK_HOLE: st_blocks alone decides


def fill_holes(fd: int, size: int, contents: bytes | bytearray) -> None:
    """Write the contents into every hole (they read as zeros), so that from now on a hole means a tamper."""
    view, offset = memoryview(contents), 0
    while (hole := first_hole(fd, size, offset)) < size:
        try:
            end = min(os.lseek(fd, hole, os.SEEK_DATA), size)
        except OSError:
            end = size  # ENXIO: no data after the hole
        pwrite_all(fd, view[hole:end], hole)
        offset = end


@dataclass(frozen=True)
class Allocation:
    """How the region's pages are held: what a tamper that makes no event still changes."""

    size: int
    blocks: int
    first_hole: int

    @classmethod
    def of(cls, fd: int, size: int, holes: bool = True) -> Allocation:
        """holes=False: fstat alone (first_hole is taken to be size), for looks that must stay cheap."""
        st = os.fstat(fd)
        return cls(st.st_size, st.st_blocks, first_hole(fd, size) if holes else size)


def prepare_allocation(fd: int, size: int, contents: bytes | bytearray, is_file: bool) -> int:
    """Every page of the region allocated and written, none past its end; returns the st_blocks of that state."""
    allocate(fd, size)
    if is_file:
        free_past_eof(fd, size)  # a pre-allocation made before we started would hide the first hole
    fill_holes(fd, size, contents)
    return os.fstat(fd).st_blocks


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


def listed(name: str, items: list) -> dict:
    """A list for an incident's detail: its first LIST_LIMIT entries, and how many there are."""
    return {name: items[:LIST_LIMIT], f"{name}_count": len(items)}


def bounded(value: Any) -> Any:
    """An incident's detail as an audit record can hold it, whatever an attacker made (thousands of links, names
    and symlink targets of any length): every list cut to its first LIST_LIMIT entries (`<key>_count` in the same
    dict gives how many there were), every string to TEXT_LIMIT characters."""
    if isinstance(value, dict):
        out: dict = {}
        for key, item in value.items():
            out[key] = bounded(item)
            if isinstance(item, list | tuple) and len(item) > LIST_LIMIT:
                out.setdefault(f"{key}_count", len(item))
        return out
    if isinstance(value, list | tuple):
        return [bounded(item) for item in value[:LIST_LIMIT]]
    if isinstance(value, str) and len(value) > TEXT_LIMIT:
        return f"{value[:TEXT_LIMIT]}... ({len(value)} characters)"
    return value


def fitted(detail: dict) -> dict:
    """The detail, or, if it is still over DETAIL_LIMIT bytes as JSON (many long names full of characters that
    JSON escapes), the detail with `before` and `after` replaced by their sizes."""
    size = len(canonical_json(detail))
    if size <= DETAIL_LIMIT:
        return detail
    omitted = {"omitted": f"{size} bytes of JSON, over the {DETAIL_LIMIT} an incident may take"}
    return {**detail, "before": omitted, "after": omitted}


# ---------------------------------------------------------------------------------------------------- parts


class KnownGood:
    """The contents a repair puts back: every audited write, and the region as last seen intact."""

    def __init__(self, contents: bytes):
        self.data = bytearray(contents)

    def remember(self, offset: int, data: bytes, zero_fill: int = 0) -> None:
        end = offset + len(data)
        self.data[offset:end] = data
        self.data[end:end + zero_fill] = bytes(zero_fill)

    def matches(self, fd: int, size: int) -> bool:
        return pread_all(fd, size) == self.data

    def refresh(self, fd: int, size: int, full_blocks: int) -> bool:
        """Take the file's contents, only if it is intact (its size, every page allocated and written, none past
        its end: st_blocks exactly full, no hole) before and after we read it."""
        intact = Allocation(size, full_blocks, size)
        if Allocation.of(fd, size) != intact:
            return False
        current = pread_all(fd, size)
        if len(current) != size or Allocation.of(fd, size) != intact:
            return False
        self.data[:] = current
        return True


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
        return boot != boot_id() or process_start(pid) != start
    if len(parts) == 4 and parts[2].isdigit():  # .shmguard-anchor.<pid>.<random>, from before start times
        pid = int(parts[2])
        if process_start(pid) is None:
            return True
        anchored = lstat_or_none(os.path.join(directory, "region"))
        return anchored is None or not _holds_open(pid, identity(anchored))
    return False  # not a name a supervisor makes


def owner_token(pid: int) -> str:
    """`<pid>.<start time>.<boot id>`: one process, never another (pids are reused, start times within one
    boot are not)."""
    return f"{pid}.{process_start(pid)}.{boot_id()}"


def process_start(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: when the process started, in clock ticks since boot; None if there is no
    such process. Raises OSError if /proc does not say (hidepid)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data.rsplit(b")", 1)[-1].split()  # the name in parentheses may hold spaces and parentheses
    return int(fields[19])  # fields[0] is field 3 (state)


def boot_id() -> str:
    try:
        with open(BOOT_ID) as f:
            return f.read().strip().replace("-", "") or "unknown"
    except OSError:
        return "unknown"


def _holds_open(pid: int, inode: tuple[int, int]) -> bool:
    """Does the process hold the inode open? Raises OSError if its fds cannot be read."""
    directory = f"/proc/{pid}/fd"
    for name in os.listdir(directory):
        try:
            if identity(os.stat(os.path.join(directory, name))) == inode:
                return True
        except OSError:
            continue
    return False


@dataclass(frozen=True)
class Incident:
    """A difference found and responded to, about to be recorded."""

    kind: str
    result: str  # repaired | blocked | alerted | failed
    mask: int  # the fanotify events whose process is the offender
    deadline_ns: int  # record by then, named or not
    detail: dict


@dataclass(frozen=True)
class GuardedSocket:
    """A listening socket the guard keeps at its path: the IvshmemServer's or the ControlServer's."""

    name: str
    endpoint: Callable[[], Any]  # has .listener (BoundSocket | None) and .rebind()
    owner: int
    group: int
    mode: int

    @property
    def listener(self):
        endpoint = self.endpoint()
        return None if endpoint is None else endpoint.listener


# ---------------------------------------------------------------------------------------------------- the guard


class Guard:
    def __init__(self, supervisor) -> None:
        self.supervisor = supervisor
        self.responses = supervisor.policy.guard
        self.region: Region = supervisor.region
        self.loop = supervisor.loop
        self.size = self.region.size
        self.fd = self.region.fd
        self.inode = identity(os.fstat(self.fd))
        self.known_good = KnownGood(self.region.snapshot())
        self.anchor: Anchor | None = None
        self.expected = self._expected_attributes()
        self.full_blocks = 0
        self.sockets = self._guarded_sockets()
        self.inotify: INotify | None = None
        self.witnesses: Witnesses | None = None
        self.openers: OpenerWitness | None = None
        self.attribution = "not started"
        self._identities: OrderedDict[int, Opener] = OrderedDict()  # pid -> who it was when it opened the region
        self._by_scan = False  # this check was started by the periodic scan, not by an event
        self._opened: list[Opener] = []  # memfd openers reported by the witness, to be recorded
        self.incidents = 0
        self.last_incident: dict | None = None
        self._region_wd: int | None = None
        self._dir_names: dict[int, set[str]] = {}  # directory watch -> the entry names that concern us
        self._socket_watches: dict[str, tuple[tuple[int, int], int]] = {}
        self._outstanding: dict[tuple[str, str], str] = {}  # unresolved incidents, recorded once
        self._seen: set[tuple[str, str]] = set()
        self._unattributed: list[Incident] = []  # repaired, waiting a moment for fanotify to name the offender
        self._detected_ns = 0
        self._tampered_until_ns = 0  # until then (or a close), writes continue a tampering and are undone
        self._scan_s = self.responses.scan_ms / 1000
        self._scan_damage: Allocation | None = None  # damage the last scan left unresolved (alerted, failed)
        self._scans = 0
        self._hole_stride = -(-self.size // HOLE_SEEK_BYTES)  # every scan fstats; every this many, SEEK_HOLE too
        self._last_refresh_ns = 0
        self._refresh_scheduled = False
        self._unlink_budget = STRAYS_PER_CHECK  # stray links this check may still unlink
        self._follow_up = False  # a check is scheduled to go on where this one stopped

    @property
    def is_file(self) -> bool:
        return self.region.backend == "file"

    @property
    def region_path(self) -> str:
        return self.region.path if self.is_file else f"/proc/{os.getpid()}/fd/{self.fd}"

    def _expected_attributes(self) -> tuple[int, int, int]:
        if self.is_file:
            policy = self.supervisor.policy.region
            return policy.owner, policy.group, policy.mode
        st = os.fstat(self.fd)  # a memfd has no policy identity: keep the one it was born with
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    def _guarded_sockets(self) -> list[GuardedSocket]:
        policy = self.supervisor.policy
        server = policy.server
        return [
            GuardedSocket("ivshmem", lambda: self.supervisor.server, server.owner, server.group, server.mode),
            GuardedSocket("control", lambda: getattr(self.supervisor, "control", None), server.owner,
                          server.group, policy.control.mode),
        ]

    # --- starting and stopping ---------------------------------------------------------------------------

    def start(self) -> None:
        self.full_blocks = prepare_allocation(self.fd, self.size, self.known_good.data, self.is_file)
        if self.is_file:
            self.anchor = self._create_anchor()
        self.inotify = INotify(nonblocking=True)
        self._start_attribution()
        self._watch_everything()
        self.loop.add_reader(self.inotify.fileno(), self._on_inotify)
        self.check()  # whatever is already wrong is an incident too
        self.loop.call_later(self._scan_s, self._scan)
        log.info("guard: watching %s; offenders named by %s", ", ".join(self.watched_paths()), self.attribution)

    def _create_anchor(self) -> Anchor | None:
        try:
            return Anchor.create(self.region.path, self.fd)
        except OSError as exc:
            log.warning("guard: no anchor beside %s (%s): an `rm` of the path cannot be undone", self.region.path,
                        exc.strerror)
            return None

    def _start_attribution(self) -> None:
        try:
            fanotify = Fanotify.open()
        except OSError as exc:
            self.attribution = f"unavailable (fanotify_init: {exc.strerror}; it needs CAP_SYS_ADMIN)"
            return
        try:
            fanotify.mark(f"/proc/self/fd/{self.fd}", FAN_REGION if self.is_file else FAN_MEMFD)
        except OSError as exc:
            fanotify.close()
            self.attribution = f"unavailable (fanotify_mark: {exc.strerror})"
            return
        self.witnesses = Witnesses(fanotify)
        self.loop.add_reader(fanotify.fd, self._on_fanotify)
        self.attribution = "fanotify"
        self._start_openers()

    def _start_openers(self) -> None:
        """The child that holds each open of the region while it reads the opener's identity (fanotify.py)."""
        try:
            self.openers = OpenerWitness.start([f"/proc/self/fd/{self.fd}"])
        except OSError as exc:
            self.attribution += f"; openers not held (FAN_OPEN_PERM: {exc.strerror})"
            return
        self.loop.add_reader(self.openers.fd, self._on_openers)
        programs = ", ".join(self.openers.execs_watched) or "nowhere (exec events refused)"
        self.attribution += f"; openers held (FAN_OPEN_PERM, pid {self.openers.pid}); programs from exec events " \
                            f"on the filesystems of {programs}"

    def _on_openers(self) -> None:
        if self.openers is not None:
            self._collect_openers()
        opened, self._opened = self._opened, []
        for opener in opened:
            self._opened_by(opener)

    def _collect_openers(self) -> None:
        """Take the witness's reports: identities to name offenders by, and (memfd) opens that are incidents."""
        for opener in self.openers.read():
            self._identities.pop(opener.pid, None)
            self._identities[opener.pid] = opener
            while len(self._identities) > OPENERS_REMEMBERED:
                self._identities.popitem(last=False)
            if not self.is_file:
                if not self._opened:
                    self.loop.call_later(0, self._on_openers)  # recorded from the loop, never inside a record
                self._opened.append(opener)
        if self.openers.ended:
            log.warning("guard: the opener witness (pid %d) is gone: opens are no longer held, short-lived "
                        "offenders may go unnamed", self.openers.pid)
            self.loop.remove_reader(self.openers.fd)
            self.openers.close()
            self.openers = None
            self.attribution += "; opener witness gone"

    def before_write(self) -> None:
        """For the supervisor to call just before an audited write: a hole the write would fill again (and so hide:
        a refilled page is whole, with zeros around the written bytes) is repaired from the copy first."""
        intact = Allocation(self.size, self.full_blocks, self.size)
        if self.inotify is not None and Allocation.of(self.fd, self.size) != intact:
            self.check()

    def remember(self, offset: int, data: bytes, zero_fill: int = 0) -> None:
        """The supervisor's hook after an audited write (data, then zero_fill NULs): it survives every repair."""
        self.known_good.remember(offset, data, zero_fill)

    def refresh(self) -> bool:
        """The supervisor's hook after its guest reported (it wrote through its mapping, which makes no inotify
        event): take the region as it is now, if it is intact, as the copy a repair puts back.

        A refresh reads the whole region, so there is at most one per REFRESH_INTERVAL_NS: one asked for sooner
        is done once, at the end of the interval (a flood of acknowledgements or of in-place writes costs one
        read per interval, not one per event). None is done while a tampering may still be writing (the second
        after a resize or a hole, until the writer closes): its bytes must not become the copy. Returns True if
        the copy was taken now."""
        if self._contents_unresolved():
            return False  # an alerted or failed resize or hole stands: the region is not the known-good copy
        now = time.monotonic_ns()
        due = max(self._last_refresh_ns + REFRESH_INTERVAL_NS, self._tampered_until_ns)
        if now < due:
            if not self._refresh_scheduled:
                self._refresh_scheduled = True
                self.loop.call_at(due / 1e9, self._deferred_refresh)
            return False
        self._last_refresh_ns = now
        if self.known_good.refresh(self.fd, self.size, self.full_blocks):
            return True
        self._check_again()  # not intact (a hole that made no event, say): look, and repair, at once
        return False

    def _contents_unresolved(self) -> bool:
        return any(kind in CONTENT_KINDS for kind, _ in self._outstanding)

    def _scan(self) -> None:
        """The periodic look at the region's allocation: a hole punched through a memfd's own file description
        makes no fsnotify event at all (REFERENCE §4), so only looking finds it. One fstat each time (a punch lowers
        st_blocks), and a SEEK_HOLE for a page allocated but never written (st_blocks whole, contents zeros) every
        scan for a region up to 64 MiB, every size/64 MiB scans for a larger one."""
        if self.inotify is None:
            return  # closed
        self.loop.call_later(self._scan_s, self._scan)  # first: a failure below must not end the scans
        self._scans += 1
        state = Allocation.of(self.fd, self.size, holes=self._scans % self._hole_stride == 0)
        if state == Allocation(self.size, self.full_blocks, self.size):
            self._scan_damage = None
        elif state != self._scan_damage:  # new damage; damage already responded to is recorded once
            self._by_scan = True
            try:
                self.check()
            finally:
                self._by_scan = False
            after = Allocation.of(self.fd, self.size)
            self._scan_damage = None if after == Allocation(self.size, self.full_blocks, self.size) else after

    def _deferred_refresh(self) -> None:
        self._refresh_scheduled = False
        if self.inotify is not None:  # not after close
            self.refresh()

    def close(self) -> None:
        self._record_overdue(everything=True)
        if self.inotify is not None:
            self.loop.remove_reader(self.inotify.fileno())
            self.inotify.close()
            self.inotify = None
        if self.witnesses is not None:
            self.loop.remove_reader(self.witnesses.fanotify.fd)
            self.witnesses.fanotify.close()
            self.witnesses = None
        if self.openers is not None:
            self.loop.remove_reader(self.openers.fd)
            self.openers.close()
            self.openers = None
        if self.anchor is not None:
            self.anchor.remove()
            self.anchor = None

    def watched_paths(self) -> list[str]:
        paths = [self.region_path] + ([os.path.dirname(self.region.path)] if self.is_file else [])
        for sock in self.sockets:
            if sock.listener is not None:
                paths += [sock.listener.path, os.path.dirname(sock.listener.path)]
        return list(dict.fromkeys(paths))

    def describe(self) -> dict:
        """For `shmguard status`."""
        return {
            "watching": self.watched_paths(),
            "responses": {name: getattr(self.responses, name) for name in
                          ("on_resize", "on_attributes", "on_unlink", "on_socket")},
            "attribution": self.attribution,
            "anchor": self.anchor.path if self.anchor else None,
            "incidents": self.incidents,
            "last_incident": self.last_incident,
        }

    # --- watches -----------------------------------------------------------------------------------------

    def _watch_everything(self) -> None:
        self._region_wd = self.inotify.add_watch(f"/proc/self/fd/{self.fd}",
                                                 REGION_EVENTS if self.is_file else MEMFD_EVENTS)
        self._ensure_watches()

    def _ensure_watches(self) -> None:
        """(Re)watch the directories and the current socket inodes; cheap, so done after every check."""
        if self.is_file:
            names = {os.path.basename(self.region.path)} | ({self.anchor.name} if self.anchor else set())
            self._watch_directory(os.path.dirname(self.region.path), names)
        for sock in self.sockets:
            listener = sock.listener
            if listener is not None:
                self._watch_directory(os.path.dirname(listener.path), {os.path.basename(listener.path)})
                self._watch_socket(sock, listener)

    def _watch_directory(self, directory: str, names: set[str]) -> None:
        try:
            wd = self.inotify.add_watch(directory, DIR_EVENTS)
        except OSError:
            return  # gone for now; the socket repair recreates it and the next check watches it again
        self._dir_names.setdefault(wd, set()).update(names)

    def _watch_socket(self, sock: GuardedSocket, listener) -> None:
        inode = (listener.device, listener.inode)
        known = self._socket_watches.get(sock.name)
        if known is not None and known[0] == inode:
            return
        try:
            fd = os.open(listener.path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return
        try:
            if identity(os.fstat(fd)) != inode:
                return  # not our socket at the path: the check repairs that first
            wd = self.inotify.add_watch(f"/proc/self/fd/{fd}", SOCKET_EVENTS)
            if self.witnesses is not None:
                self.witnesses.fanotify.mark(f"/proc/self/fd/{fd}", FAN_SOCKET)
        except OSError as exc:
            log.warning("guard: cannot watch socket %s: %s", listener.path, exc.strerror)
            return
        finally:
            os.close(fd)
        if known is not None and known[1] != wd:
            self._forget_watch(known[1])
        self._socket_watches[sock.name] = (inode, wd)

    def _forget_watch(self, wd: int) -> None:
        try:
            self.inotify.rm_watch(wd)
        except OSError:
            pass  # the inode is already gone, and the watch with it

    def _on_inotify(self) -> None:
        events = self.inotify.read(timeout=0)
        for event in events:
            if event.mask & F.IGNORED:
                self._dir_names.pop(event.wd, None)
        relevant = [event for event in events if self._concerns_us(event)]
        if not relevant:
            return
        on_region = [event.mask for event in relevant if event.wd == self._region_wd]
        self.check(modified=any(mask & F.MODIFY for mask in on_region),
                   closed=any(mask & F.CLOSE_WRITE for mask in on_region),
                   opened=any(mask & F.OPEN for mask in on_region))

    def _concerns_us(self, event) -> bool:
        if event.mask & (F.Q_OVERFLOW | F.IGNORED):
            return bool(event.mask & F.Q_OVERFLOW)  # an overflow may hide anything: look at everything
        names = self._dir_names.get(event.wd)
        return names is None or not event.name or event.name in names

    # --- the check ---------------------------------------------------------------------------------------

    def check(self, modified: bool = False, closed: bool = False, opened: bool = False) -> None:
        """Compare the truth with the policy and respond to every difference."""
        self._detected_ns = time.monotonic_ns()
        self._seen = set()
        self._unlink_budget = STRAYS_PER_CHECK
        if self.witnesses is not None:
            self.witnesses.collect()
        steps = [lambda: self._check_contents(modified, closed), lambda: self._check_opened(opened),
                 self._check_attributes, self._check_acl]
        if self.is_file:
            steps += [self._check_path, self._check_anchor, self._check_extra_links]
        steps += [lambda sock=sock: self._check_socket(sock) for sock in self.sockets]
        for step in steps:
            try:
                step()
            except OSError as exc:  # the truth could not be read; the next event looks again
                log.error("guard: check failed: %s", exc)
            except Exception:  # noqa: BLE001 - a bug in one step must not skip the others, nor the watches
                log.exception("guard: check step failed (the next event looks again)")
        self._outstanding = {key: value for key, value in self._outstanding.items() if key in self._seen}
        self._ensure_watches()
        if self.witnesses is not None:
            self._on_fanotify()  # late touches first go to the incidents waiting for them
            self.witnesses.prune(self._detected_ns)

    def _check_contents(self, modified: bool, closed: bool) -> None:
        st = os.fstat(self.fd)
        content_response = "alert" if self.responses.on_resize == "alert" else "repair"
        if st.st_size != self.size:
            kind = "shrink" if st.st_size < self.size else "grow"
            self._incident(kind, self.region_path, {"region": region_state(st)}, self.responses.on_resize,
                           self._restore_contents)
            self._tampered_until_ns = time.monotonic_ns() + TAMPER_WINDOW_NS
        elif self._check_allocation(st, content_response):
            self._tampered_until_ns = time.monotonic_ns() + TAMPER_WINDOW_NS
        elif modified and time.monotonic_ns() < self._tampered_until_ns:
            # `echo hello >` truncates, then writes: a write landing after our repair belongs to the tampering.
            if not self.known_good.matches(self.fd, self.size):
                self._incident("contents", self.region_path, {"region": region_state(st)}, content_response,
                               self._restore_contents)
        elif modified:
            self.refresh()  # an in-place write (a member's `dd conv=notrunc`) survives repairs
        if closed:
            self._tampered_until_ns = 0  # the writer is done: its next write is an in-place write again

    def _check_allocation(self, st: os.stat_result, response: str) -> bool:
        """Pages past the end (fallocate KEEP_SIZE, which would hide a hole from st_blocks) and holes inside
        (a punch, a truncate-and-regrow between two looks, a page allocated but never written). True if found."""
        found = False
        if st.st_blocks > self.full_blocks:
            self._incident("preallocation", self.region_path, {"region": region_state(st),
                                                               "full_blocks": self.full_blocks},
                           response, self._free_past_eof)
            st, found = os.fstat(self.fd), True
        hole = first_hole(self.fd, self.size)
        if st.st_blocks < self.full_blocks or hole < self.size:
            self._incident("hole", self.region_path, {"region": region_state(st), "full_blocks": self.full_blocks,
                                                      "first_hole": hole}, response, self._restore_contents)
            found = True
        return found

    def _free_past_eof(self) -> dict:
        free_past_eof(self.fd, self.size)
        return {"region": region_state(os.fstat(self.fd))}

    def _restore_contents(self) -> dict:
        if os.fstat(self.fd).st_size != self.size:
            os.ftruncate(self.fd, self.size)
        pwrite_all(self.fd, self.known_good.data, 0)  # every byte written: every page allocated again
        return {"region": region_state(os.fstat(self.fd))}

    def _check_opened(self, opened: bool) -> None:
        # Only the memfd is watched for opens: nobody but the supervisor ever opens it. inotify cannot tell the
        # supervisor's own opens (the descriptions it hands to peers) from others': while the opener witness runs,
        # it reports every other opener instead (_on_openers), and this event is left to it.
        if opened and self.openers is None:
            self._incident("region-opened", self.region_path, {"region": region_state(os.fstat(self.fd))},
                           self.responses.on_resize, None)

    def _opened_by(self, opener: Opener) -> None:
        """Another process opened the memfd (the witness held it and read who): an incident, named."""
        if self.inotify is None:
            return  # closed
        self._detected_ns = time.monotonic_ns()
        self._incident("region-opened", self.region_path, {"region": region_state(os.fstat(self.fd)),
                                                           "opener": opener.pid}, self.responses.on_resize, None)

    def _check_attributes(self) -> None:
        st = os.fstat(self.fd)
        if (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) != self.expected:
            self._incident("attributes", self.region_path, {"region": region_state(st)},
                           self.responses.on_attributes, self._restore_attributes)

    def _restore_attributes(self) -> dict:
        uid, gid, mode = self.expected
        try:
            os.fchown(self.fd, uid, gid)
            os.fchmod(self.fd, mode)  # after chown, which may clear bits
        except PermissionError as exc:
            raise GuardError(f"cannot restore owner/group/mode: {exc.strerror} (a file given to another owner "
                             "can only be taken back with CAP_CHOWN and CAP_FOWNER: hardening.capabilities)") from None
        return {"region": region_state(os.fstat(self.fd))}

    def _check_acl(self) -> None:
        names = acl_names(self.fd)
        if names:  # an ACL can grant access that the mode bits do not show
            self._incident("acl", self.region_path, {"xattrs": names}, self.responses.on_attributes,
                           self._remove_acl)

    def _remove_acl(self) -> dict:
        for name in acl_names(self.fd):
            os.removexattr(self.fd, name)
        self._restore_attributes()
        return {"xattrs": acl_names(self.fd), "region": region_state(os.fstat(self.fd))}

    # --- the region's names (file backend) -----------------------------------------------------------------

    def _check_path(self) -> None:
        path = self.region.path
        entry = lstat_or_none(path)
        if entry is not None and identity(entry) == self.inode:
            return
        strays = self._stray_names()
        kind = "replaced" if entry is not None else "rename" if strays else "unlink"
        before = {"path": describe_entry(path, entry), "region": region_state(os.fstat(self.fd)),
                  **listed("strays", strays)}
        self._incident(kind, path, before, self.responses.on_unlink, lambda: self._relink(strays))

    def _relink(self, strays: list[str]) -> dict:
        """Our inode back at the path in one rename (whatever else was there is replaced), strays removed."""
        if os.fstat(self.fd).st_nlink == 0:
            raise GuardError("every link to the region is gone and the kernel never relinks such an inode "
                             "(linkat: ENOENT); peers keep it through their fds, the path cannot come back")
        path = self.region.path
        temporary = self._link_beside(path)
        try:
            moved_aside = rename_over(temporary, path)
        except OSError:
            _unlink_quietly(temporary)
            raise
        removed = self._unlink_strays(strays)
        return {"path": describe_entry(path, lstat_or_none(path)), **listed("removed", removed),
                "moved_aside": moved_aside, "region": region_state(os.fstat(self.fd))}

    def _link_beside(self, path: str) -> str:
        directory, base = os.path.split(path)
        for _ in range(8):  # a random name in a shared directory: someone may hold one we pick
            temporary = os.path.join(directory, f".{base}.relink-{secrets.token_hex(6)}")
            try:
                link_fd(self.fd, temporary)
                return temporary
            except FileExistsError:
                continue
            except OSError:
                if self.anchor is None or not self.anchor.holds(self.inode):
                    raise
                os.link(self.anchor.path, temporary)  # the anchor is a plain name on the same filesystem
                return temporary
        raise GuardError(f"{directory}: cannot find a free name to relink the region")

    def _stray_names(self) -> list[str]:
        """Other names of our inode in the region's directory and the anchor's (rename, hard link)."""
        path = self.region.path
        directories = [os.path.dirname(path)] + ([self.anchor.directory] if self.anchor else [])
        keep = {path} | ({self.anchor.path} if self.anchor else set())
        found = []
        for directory in directories:
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                if entry.path not in keep and entry.inode() == self.inode[1] and self._is_ours(entry.path):
                    found.append(entry.path)
        return found

    def _is_ours(self, path: str) -> bool:
        st = lstat_or_none(path)
        return st is not None and identity(st) == self.inode

    def _unlink_if_ours(self, path: str) -> bool:
        if not self._is_ours(path):
            return False
        _unlink_quietly(path)
        return not self._is_ours(path)

    def _unlink_strays(self, strays: list[str]) -> list[str]:
        """Unlink as many strays as this check's budget allows; the rest wait for a follow-up check, scheduled at
        once, so that thousands of links are all removed without holding up the loop for long."""
        batch, rest = strays[:self._unlink_budget], strays[self._unlink_budget:]
        self._unlink_budget -= len(batch)
        if rest:
            self._check_again()
        return [name for name in batch if self._unlink_if_ours(name)]

    def _check_again(self) -> None:
        if not self._follow_up:
            self._follow_up = True
            self.loop.call_later(0, self._follow_up_check)

    def _follow_up_check(self) -> None:
        self._follow_up = False
        if self.inotify is not None:  # not after close
            self.check()

    def _check_anchor(self) -> None:
        if self.anchor is None or self.anchor.holds(self.inode) or os.fstat(self.fd).st_nlink == 0:
            return
        self._incident("anchor", self.anchor.path, {"anchor": describe_entry(self.anchor.path,
                                                                             lstat_or_none(self.anchor.path))},
                       self.responses.on_unlink, lambda: self.anchor.renew(self.fd))

    def _check_extra_links(self) -> None:
        st = os.fstat(self.fd)
        expected = int(self._is_ours(self.region.path)) + int(self.anchor is not None and self.anchor.holds(
            self.inode))
        if st.st_nlink <= expected:
            return
        if self._unlink_budget == 0 and self._follow_up:
            self._seen.add(("extra-link", self.region.path))
            return  # the relink used up this check's unlinks: the follow-up check goes on
        strays = self._stray_names()
        before = {"nlink": st.st_nlink, "expected": expected, **listed("strays", strays)}
        self._incident("extra-link", self.region.path, before, self.responses.on_unlink,
                       lambda: self._remove_strays(strays))

    def _remove_strays(self, strays: list[str]) -> dict:
        removed = self._unlink_strays(strays)
        left = os.fstat(self.fd).st_nlink
        if not removed and not self._follow_up:
            raise GuardError(f"a hard link to the region outside {os.path.dirname(self.region.path)} "
                             f"(st_nlink {left}) cannot be found without walking the whole filesystem")
        return {**listed("removed", removed), "nlink": left}

    # --- sockets -----------------------------------------------------------------------------------------

    def _check_socket(self, sock: GuardedSocket) -> None:
        listener = sock.listener
        if listener is None:
            return  # shutting down
        path = listener.path
        entry = lstat_or_none(path)
        if entry is not None and identity(entry) == (listener.device, listener.inode):
            attributes = (entry.st_uid, entry.st_gid, stat.S_IMODE(entry.st_mode))
            if attributes != (sock.owner, sock.group, sock.mode):
                self._incident("socket-attributes", path, {"socket": sock.name, "entry": describe_entry(path, entry)},
                               self.responses.on_attributes, lambda: self._restore_socket_attributes(sock))
            return
        kind = "socket-removed" if entry is None else "socket-replaced"
        self._incident(kind, path, {"socket": sock.name, "entry": describe_entry(path, entry)},
                       self.responses.on_socket, lambda: self._rebind(sock))

    def _restore_socket_attributes(self, sock: GuardedSocket) -> dict:
        listener = sock.listener
        fd = os.open(listener.path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if identity(os.fstat(fd)) != (listener.device, listener.inode):
                raise GuardError(f"{listener.path}: the socket was replaced while being repaired")
            os.chown(f"/proc/self/fd/{fd}", sock.owner, sock.group)  # the inode we checked, never a symlink
            os.chmod(f"/proc/self/fd/{fd}", sock.mode)
        finally:
            os.close(fd)
        return {"entry": describe_entry(listener.path, lstat_or_none(listener.path))}

    def _rebind(self, sock: GuardedSocket) -> dict:
        """A fresh listening socket renamed over the path: a foreign file there is replaced in that one rename
        (its identity is in the incident's `before`); a directory there is moved aside first."""
        path = sock.listener.path
        entry = lstat_or_none(path)
        moved_aside = move_aside(path) if entry is not None and stat.S_ISDIR(entry.st_mode) else None
        sock.endpoint().rebind()  # binds under a fresh random staging name, then renames it over the path
        self._ensure_watches()
        return {"entry": describe_entry(path, lstat_or_none(path)), "moved_aside": moved_aside}

    # --- incidents ---------------------------------------------------------------------------------------

    def _incident(self, kind: str, path: str, before: dict, response: str,
                  repair: Callable[[], dict] | None) -> None:
        key = (kind, path)
        self._seen.add(key)
        signature = json.dumps(before, sort_keys=True, default=str)
        if self._outstanding.get(key) == signature:
            return  # already recorded, still unresolved: one record, not one per event
        result, after = respond(response, before, repair)
        done_ns = time.monotonic_ns()
        if result in ("alerted", "failed"):
            self._outstanding[key] = signature
        incident = Incident(kind, result, OFFENCES.get(kind, FAN_MODIFY | FAN_ATTRIB), done_ns + ATTRIBUTION_WAIT_NS, {
            "kind": kind, "path": path, "before": before, "after": after, "response": response,
            "repair_ms": round((done_ns - self._detected_ns) / 1e6, 3),
            "detected_ns": self._detected_ns, "done_ns": done_ns, "found_by": "scan" if self._by_scan else "event",
        })
        offender = self._offender(incident.mask)
        if offender is None and self.witnesses is not None:
            # The offender's fanotify event may still be on its way: the attacker can be preempted between
            # queueing our inotify event and its fanotify event. Record when it comes, or at the deadline.
            self._unattributed.append(incident)
            self.loop.call_at(incident.deadline_ns / 1e9, self._record_overdue)
            return
        self._record(incident, offender)

    def _on_fanotify(self) -> None:
        self.witnesses.collect()
        waiting, self._unattributed = self._unattributed, []
        for incident in waiting:
            offender = self.witnesses.claim(incident.mask)
            if offender is None:
                self._unattributed.append(incident)
            else:
                self._record(incident, offender)

    def _record_overdue(self, everything: bool = False) -> None:
        now = time.monotonic_ns()
        overdue = [i for i in self._unattributed if everything or i.deadline_ns <= now]
        self._unattributed = [i for i in self._unattributed if i not in overdue]
        for incident in overdue:
            self._record(incident, None)

    def _record(self, incident: Incident, offender: Touch | None) -> None:
        named = self._named(offender) if offender is not None else self._named_opener(incident)
        why = {} if named is not None else {"offender_unknown": self._why_unknown(incident),
                                            **listed("holders", self._holders())}
        detail = fitted(bounded({**incident.detail, "offender": named or "unknown", **why}))
        self._log(incident.kind, detail["path"], incident.result, detail)
        self.incidents += 1
        self.last_incident = {"kind": incident.kind, "path": detail["path"], "result": incident.result,
                              "repair_ms": detail["repair_ms"]}
        actor = None
        if named is not None and named["uid"] is not None and named["gid"] is not None:
            actor = Actor(named["pid"], named["uid"], named["gid"], bounded(named["exe"]))
        try:
            self.supervisor.record("incident", actor=actor, result=incident.result, detail=detail)
        except (ValueError, OSError, ShmguardError) as exc:
            # The response is carried out already; a log that cannot take the record (full, unwritable, or a
            # record it refuses) must not stop the supervisor, nor the rest of this check.
            log.error("guard: incident not recorded in the audit log (%s): %s at %s: %s in %.3f ms", exc,
                      incident.kind, detail["path"], incident.result, detail["repair_ms"])

    def _named(self, touch: Touch) -> dict:
        """The touch's process, completed from what else the kernel told us about that very process: its
        identity when it opened the region (held, so read before it could exit), or its peer credentials."""
        named = {**touch.describe(), "uid_from": "/proc/PID/status", "exe_from": "/proc/PID/exe"}
        if self.openers is not None:
            self._collect_openers()  # a report written before the opener's open returned is surely in the pipe
        opener = self._identities.get(touch.pid)
        if opener is not None and None not in (opener.start, touch.start) and opener.start != touch.start:
            opener = None  # the pid was reused
        if named["uid"] is None and opener is not None and opener.uid is not None:
            named.update(uid=opener.uid, gid=opener.gid, uid_from="its open of the region (held by fanotify)")
        if named["exe"] == "unknown" and opener is not None:
            named.update(exe=opener.exe, exe_from=opener.exe_from)
        if opener is not None and named["comm"] == "unknown":
            named.update(comm=opener.comm)  # a gone process leaves no name in /proc
        peer = next((p.cred for p in self._peers() if p.cred.pid == touch.pid), None)
        if named["uid"] is None and peer is not None:
            named.update(uid=peer.uid, gid=peer.gid, uid_from="its peer credentials (SO_PEERCRED at join)")
        if named["uid"] is None:
            named["uid_from"] = ("unknown: the process was gone before /proc/PID/status was read, and it neither "
                                 "opened the region by path while watched nor joined as a peer")
        elif named["exe"] == "unknown" and named["exe_from"] == "/proc/PID/exe":
            named["exe_from"] = ("unknown: /proc/PID/exe was unreadable (the process was gone, or is another uid's "
                                 "and the supervisor has no CAP_SYS_PTRACE), and it did not open the region by path "
                                 "while watched (then its program comes from its exec event)")
        return named

    def _named_opener(self, incident: Incident) -> dict | None:
        """The opener the witness reported for a region-opened incident whose fanotify touch never came."""
        opener = self._identities.get(incident.detail["before"].get("opener", -1))
        if opener is None:
            return None
        return {**opener.describe(), "uid_from": "its open of the region (held by fanotify)"}

    def _peers(self) -> list:
        server = getattr(self.supervisor, "server", None)
        peers = getattr(server, "peers", None) or {}
        return [peer for peer in list(peers.values()) if getattr(peer, "cred", None) is not None]

    def _holders(self) -> list[dict]:
        """Who holds the region through the socket: when nothing names an offender, one of these (or root) did."""
        return [{"peer": p.id, "pid": p.cred.pid, "uid": p.cred.uid, "gid": p.cred.gid} for p in self._peers()]

    def _why_unknown(self, incident: Incident) -> str:
        if self.witnesses is None:
            return f"offenders cannot be named: {self.attribution}"
        if incident.detail.get("found_by") == "scan":
            return ("no fanotify event named a process: the change made none (a hole punched or a write through "
                    "the memfd's own file description makes no fsnotify event, checked on Linux 6.18, nor does a "
                    "write through a mapping); the periodic scan (guard.scan_ms) found it")
        return (f"no fanotify event of another process arrived within {ATTRIBUTION_WAIT_NS // 1_000_000} ms "
                "(the change made none, or the event queue overflowed)")

    def _offender(self, mask: int) -> Touch | None:
        return None if self.witnesses is None else self.witnesses.claim(mask)

    @staticmethod
    def _log(kind: str, path: str, result: str, detail: dict) -> None:
        offender = detail["offender"]
        who = offender if offender == "unknown" else f"pid {offender['pid']} uid {offender['uid']} " \
                                                       f"({offender['exe']})"
        level = logging.ERROR if result == "failed" else logging.WARNING
        log.log(level, "guard: %s at %s by %s: %s in %.3f ms%s", kind, path, who, result, detail["repair_ms"],
                f" ({detail['after'].get('error')})" if result == "failed" else "")


def respond(response: str, before: dict, repair: Callable[[], dict] | None) -> tuple[str, dict]:
    """Carry out the policy's response; returns the audit result and the state after."""
    if response == "block":
        return "blocked", before  # the seals already refused the change in the kernel
    if response == "alert" or repair is None:
        return "alerted", before
    try:
        return "repaired", repair()
    except (OSError, ShmguardError) as exc:
        return "failed", {"error": str(exc)}


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


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
