"""Region: the shared memory itself, a sealed memfd or a file in /dev/shm, and the only code that touches it.

Every write goes through `write()`: offset and length within the size, checked against fstat on the file
backend (a truncated mapping kills the process with SIGBUS, which CPython cannot catch).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from .errors import RegionError
from .paths import check_directory_chain, trusted_owners
from .policy import RegionPolicy, parse_size

SEALS = {
    "seal": fcntl.F_SEAL_SEAL,
    "shrink": fcntl.F_SEAL_SHRINK,
    "grow": fcntl.F_SEAL_GROW,
    "write": fcntl.F_SEAL_WRITE,
}
REQUIRED_SEALS = ("shrink", "grow", "seal")
CHUNK = 1 << 16  # bytes zeroed, read or compared at once: never a region-sized temporary
_ZEROS = memoryview(bytes(CHUNK))  # what a zero-fill writes
ZERO_PIECE = 1 << 18  # bytes is_zero compares at once: these NULs and as much of the region fit the L2 cache
# compared with as `bytearray == view`
_ZERO_BUFFERS = {4096: bytearray(4096), CHUNK: bytearray(CHUNK), ZERO_PIECE: bytearray(ZERO_PIECE)}


def is_zero(view: memoryview) -> bool:
    """Are all bytes of view NULs? Compared in pieces of the largest zero buffer that fits, each one memcmp
    (bytearray == view), never a copy; the last piece ends at the view's end (overlapping the one before), so no
    buffer is made for a remainder. A 4 MiB padding is 16 pieces of ZERO_PIECE."""
    size = len(view)
    zeros = _ZERO_BUFFERS.get(size)
    if zeros is not None:
        return zeros == view
    if size < 4096:
        return bytearray(size) == view
    piece = ZERO_PIECE if size >= ZERO_PIECE else CHUNK if size >= CHUNK else 4096
    zeros, last = _ZERO_BUFFERS[piece], size - piece
    for start in range(0, last, piece):
        if zeros != view[start:start + piece]:
            return False
    return zeros == view[last:]


@dataclass(frozen=True)
class FileState:
    """What fstat/lstat say about the region; the guard compares it with the policy."""

    size: int
    uid: int
    gid: int
    mode: int
    inode: int
    nlink: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileState:
        return cls(st.st_size, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_ino, st.st_nlink)

    def describe(self) -> dict:
        return {"size": self.size, "uid": self.uid, "gid": self.gid, "mode": f"0{self.mode:o}",
                "inode": self.inode, "nlink": self.nlink}


class Region:
    """A shared-memory region of fixed size, held open (pinned) for the life of the supervisor."""

    def __init__(self, fd: int, size: int, backend: str, path: str | None = None):
        self.fd, self.size, self.backend, self.path = fd, size, backend, path
        self.mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.nuls = (0, size)  # where our own writes left NULs: a hint for the next padding, checked before use
        self._scratch = bytearray(CHUNK)
        self._sealed = False

    @classmethod
    def create(cls, policy: RegionPolicy, name: str = "shmguard") -> Region:
        if policy.backend == "memfd":
            return create_memfd(policy.size, name)
        return create_file(policy.path, policy.size, policy.owner, policy.group, policy.mode)

    def state(self) -> FileState:
        return FileState.of(os.fstat(self.fd))

    def seals(self) -> set[str]:
        try:
            bits = fcntl.fcntl(self.fd, fcntl.F_GET_SEALS)
        except OSError:
            return set()
        return {name for name, bit in SEALS.items() if bits & bit}

    @property
    def sealed(self) -> bool:
        """Once true, true for good: F_SEAL_SEAL forbids any change to the seals, so it is asked only until then."""
        if not self._sealed:
            self._sealed = set(REQUIRED_SEALS) <= self.seals()
        return self._sealed

    def check_bounds(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise RegionError(f"offset {offset} and length {length} must not be negative")
        if offset + length > self.size:
            raise RegionError(
                f"{length} bytes at offset {offset} do not fit the {self.size}-byte region "
                f"(at most {max(0, self.size - offset)} bytes fit there)"
            )

    def check_intact(self) -> None:
        """On the file backend, refuse to touch the mapping unless the file still has its full size."""
        if self.backend == "memfd" and self.sealed:
            return
        actual = os.fstat(self.fd).st_size
        if actual != self.size:
            raise RegionError(f"region is {actual} bytes instead of {self.size} (tampered with); "
                              "refusing to touch the mapping until it is repaired")

    def write(self, offset: int, data: bytes, zero_fill: int = 0,
              before: Callable[[int, int], bool] | None = None, defer_check: bool = False) -> Callable[[], None]:
        """Put data at offset, then `zero_fill` NULs after it, without building region-sized buffers.

        The sealed memfd is written through the mapping. A file is written with pwrite at the checked
        offsets: a copy into the mapping that races a truncation kills the process with SIGBUS, pwrite
        cannot fault, and within the checked size it never changes the size.

        Afterwards the region reads as if every NUL had been written, but only those that may not be NULs already
        are (`_nuls_to_write`). before(start, end), if given, is called with the bytes the write is about to
        touch; if it returns True (it changed the region: the guard repaired a hole) every NUL is written.

        Returns finish(), which has nothing left to do unless defer_check: then the NULs expected already (where our
        own earlier writes left them) are looked at only by finish(), which writes them if they are not NULs. Before
        it returns, write() has put in place the data, every other NUL of the fill, and the fill's first and last
        bytes (the message's terminator, and the region's last byte that a reader takes as "not truncated"), so a
        reader of the message may start before finish(): the supervisor rings first, and looks while the guest
        reads (a read of 4 MiB expected to be NULs costs a few hundred microseconds).
        """
        self.check_bounds(offset, len(data) + zero_fill)
        self.check_intact()
        end, fill_end = offset + len(data), offset + len(data) + zero_fill
        expected = expected_part(end, fill_end, self.nuls) if defer_check else None
        nuls = nul_ranges(end, fill_end, self.nuls, lambda _a, _b: True) if expected else self._nuls_to_write(
            end, fill_end)
        if before is not None and before(offset, max([end] + [stop for _, stop in nuls])):
            nuls, expected = [(end, fill_end)] if zero_fill else [], None
        put = self._put_mapped if self.backend == "memfd" else self._put_file  # a memfd is sealed at creation
        put(offset, data)
        self._put_nuls(put, nuls)
        self._expect_nuls(offset, end, fill_end)  # a hint: every later use reads first
        if expected is None:
            return _nothing
        first, stop = expected
        for at in {first, stop - 1}:  # the terminator and the last byte, now: a reader looks at both at once
            if (self.mapping[at] if self.backend == "memfd" else not self._reads_nuls(at, at + 1)):
                put(at, _ZEROS[:1])

        def finish() -> None:
            if self._reads_nuls(first, stop):
                return
            if before is not None:
                before(first, stop)  # a hole inside is repaired first; every NUL is written either way
            self._put_nuls(put, [(first, stop)])
        return finish

    @staticmethod
    def _put_nuls(put: Callable[[int, memoryview], None], ranges: list[tuple[int, int]]) -> None:
        for first, stop in ranges:
            for start in range(first, stop, CHUNK):
                put(start, _ZEROS[:min(CHUNK, stop - start)])

    def _nuls_to_write(self, end: int, fill_end: int) -> list[tuple[int, int]]:
        """The ranges of end..fill_end that must be written with NULs (see nul_ranges). Reading the part expected to
        hold NULs costs about a third of writing it, and dirties nothing; at 4 KiB it is nothing."""
        return nul_ranges(end, fill_end, self.nuls, self._reads_nuls)

    def _expect_nuls(self, offset: int, end: int, fill_end: int) -> None:
        self.nuls = nuls_after(self.nuls, offset, end, fill_end)

    def _reads_nuls(self, start: int, stop: int) -> bool:
        if self.backend == "memfd":  # sealed: its mapping can never fault
            with memoryview(self.mapping) as view:
                return is_zero(view[start:stop])
        for at in range(start, stop, CHUNK):  # a file may be truncated under us: pread, which cannot fault
            length = min(CHUNK, stop - at)
            buf = self._scratch if length == CHUNK else bytearray(length)
            with memoryview(buf) as view:
                if os.preadv(self.fd, [view], at) != length or not is_zero(view):
                    return False
        return True

    def _put_mapped(self, offset: int, data) -> None:
        self.mapping[offset:offset + len(data)] = data

    def _put_file(self, offset: int, data) -> None:
        pwrite_all(self.fd, data, offset)

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """Read with pread: a read never faults, even if the file was truncated under us."""
        length = self.size - offset if length is None else length
        self.check_bounds(offset, length)
        return pread_all(self.fd, length, offset)

    def snapshot(self) -> bytes:
        return self.read(0, self.size)

    def restore(self, contents: bytes) -> None:
        """Put back size and contents (the guard's repair); the mapping stays the same."""
        if len(contents) != self.size:
            raise RegionError("snapshot does not match the region size")
        if os.fstat(self.fd).st_size != self.size:
            os.ftruncate(self.fd, self.size)
        self.mapping[:] = contents

    def close(self) -> None:
        self.mapping.close()
        os.close(self.fd)

    def describe(self) -> dict:
        return {"backend": self.backend, "size": self.size, "path": self.path, "seals": sorted(self.seals())}


def nul_ranges(end: int, fill_end: int, expected: tuple[int, int],
               reads_nuls: Callable[[int, int], bool]) -> list[tuple[int, int]]:
    """The ranges of the fill end..fill_end to write with NULs. `expected` is where our own writes left NULs (where
    the last padding went, less what later data covered); the rest of the fill is written (the previous message's
    bytes, say). The part expected to hold NULs is written only if reads_nuls says it does not: a peer or the guest
    may have written there through its mapping, which makes no event."""
    if fill_end <= end:
        return []
    first, stop = max(end, expected[0]), min(fill_end, expected[1])
    if first >= stop:
        return [(end, fill_end)]
    if first == end and stop == fill_end:  # all of it expected to hold NULs (the same message length again, say)
        return [] if reads_nuls(end, fill_end) else [(end, fill_end)]
    ranges = [(end, first), (first, first if reads_nuls(first, stop) else stop), (stop, fill_end)]
    merged: list[tuple[int, int]] = []
    for start, finish in ranges:
        if start >= finish:
            continue
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], finish)
        else:
            merged.append((start, finish))
    return merged


def expected_part(end: int, fill_end: int, expected: tuple[int, int]) -> tuple[int, int] | None:
    """The part of the fill end..fill_end where our own writes left NULs (see nul_ranges), or None."""
    first, stop = max(end, expected[0]), min(fill_end, expected[1])
    return (first, stop) if first < stop else None


def _nothing() -> None:
    """A write's finish() with nothing left to do."""


def nuls_after(expected: tuple[int, int], offset: int, end: int, fill_end: int) -> tuple[int, int]:
    """Where the region should hold NULs after data at offset..end and NULs at end..fill_end (one range: a hint,
    checked by reading before it is relied on)."""
    first, stop = expected
    if fill_end > end:  # the fill, and what was expected beyond it if the two touch
        return end, stop if first <= fill_end < stop else fill_end
    if offset < stop and end > first:  # data over the range: keep the part after it, else the part before
        return (end, stop) if end < stop and offset <= first else (first, max(first, offset))
    return expected


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def pread_all(fd: int, length: int, offset: int = 0) -> bytes:
    """Up to length bytes; fewer only if the file is shorter than it should be (a read never faults)."""
    chunks, done = [], 0
    while done < length:
        chunk = os.pread(fd, length - done, offset + done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def text_padding(message: bytes, offset: int, size: int, allow_unterminated: bool = False) -> int:
    """How many NULs follow a text message at offset, as the seed's script pads it: to the end of the region."""
    room = size - offset
    if offset < 0 or offset >= size:
        raise RegionError(f"offset {offset} is outside the {size}-byte region (0..{size - 1})")
    if len(message) > room:
        raise RegionError(f"a {len(message)}-byte message does not fit at offset {offset}: "
                          f"the region has {room} bytes from there")
    if len(message) == room and not allow_unterminated:
        raise RegionError(f"a {len(message)}-byte message at offset {offset} leaves no room for its NUL "
                          f"terminator (at most {room - 1} bytes; or pass --allow-unterminated)")
    return room - len(message)


def text_payload(message: bytes, offset: int, size: int, allow_unterminated: bool = False) -> bytes:
    """The bytes a text message puts into the region: the text, then NUL padding to the end."""
    return message + bytes(text_padding(message, offset, size, allow_unterminated))


def create_memfd(size: int, name: str = "shmguard") -> Region:
    """A memfd sized and sealed so that nobody, root included, can ever change its size."""
    size = parse_size(size)
    fd = os.memfd_create(name, os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        os.fchmod(fd, 0o600)  # memfds are born 0777; only /proc/PID/fd would reach it, but still
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        region = Region(fd, size, "memfd")
    except BaseException:
        os.close(fd)
        raise
    missing = set(REQUIRED_SEALS) - region.seals()
    if missing:
        region.close()
        raise RegionError(f"memfd seals {sorted(missing)} did not take; this kernel cannot seal the region")
    return region


def create_file(path: str, size: int, owner: int, group: int, mode: int) -> Region:
    """Create the file with O_EXCL and the policy's identity, or adopt one that already matches it exactly."""
    size = parse_size(size)
    # Its directory (normally /dev/shm, sticky and root's) must be one nobody untrusted can change: shmguard/paths.py
    check_directory_chain(os.path.dirname(path) or ".", trusted_owners(owner))
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0)
        created = True
    except FileExistsError:
        fd = _open_existing(path, flags, size, owner, group, mode)
        created = False
    except OSError as exc:
        raise RegionError(f"{path}: cannot create the region: {exc.strerror}") from None
    try:
        if created:
            os.fchown(fd, owner, group)
            os.fchmod(fd, mode)
            os.ftruncate(fd, size)
        return Region(fd, size, "file", path)
    except BaseException:
        os.close(fd)
        if created:
            os.unlink(path)
        raise


def _open_existing(path: str, flags: int, size: int, owner: int, group: int, mode: int) -> int:
    try:
        kind = _kind(os.lstat(path).st_mode)
    except OSError as exc:
        raise RegionError(f"{path}: cannot inspect the existing file: {exc.strerror}") from None
    if kind != "regular file":  # never open a FIFO, a device or a directory just to look at it
        raise RegionError(f"{path}: already exists and is a {kind}, not a regular file; refusing it "
                          "(remove it and start again)")
    try:
        fd = os.open(path, flags | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO swapped in meanwhile cannot block us
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RegionError(f"{path}: is a symbolic link; refusing it (remove it and start again)") from None
        raise RegionError(f"{path}: cannot open the existing file: {exc.strerror}") from None
    os.set_blocking(fd, True)
    st = os.fstat(fd)
    wanted = {"type": "regular file", "owner": owner, "group": group, "mode": f"0{mode:o}", "size": size}
    found = {"type": _kind(st.st_mode), "owner": st.st_uid, "group": st.st_gid,
             "mode": f"0{stat.S_IMODE(st.st_mode):o}", "size": st.st_size}
    wrong = [f"{key} is {found[key]} (policy: {wanted[key]})" for key in wanted if found[key] != wanted[key]]
    if wrong:
        os.close(fd)
        raise RegionError(f"{path}: already exists and does not match the policy: {'; '.join(wrong)}. "
                          "Remove it, or make it match, and start again")
    return fd


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symbolic link"),
             (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"))
    return next((name for is_kind, name in kinds if is_kind(mode)), "file of unknown type")
