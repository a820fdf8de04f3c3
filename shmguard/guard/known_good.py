"""The known-good copy: what a repair puts back, with a map of the pages that may hold anything but NULs; and the
facts of a file's allocation (size, blocks, first hole) it and the scan both read."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from ..region import CHUNK, is_zero, pwrite_all


def first_hole(fd: int, size: int, offset: int = 0) -> int:
    """Where the first page without data is (from offset), or size if every page holds data. tmpfs counts a page
    that is allocated but never written (fallocate) as a hole too, so this sees what st_blocks cannot."""
    try:
        return min(os.lseek(fd, offset, os.SEEK_HOLE), size)
    except OSError:
        return size  # ENXIO (offset at the end), or a filesystem without SEEK_HOLE: st_blocks alone decides


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


PAGE = 4096  # the unit of the page map (and of tmpfs holes)
SMALL_WRITE = 16 * PAGE  # a write up to this size has its pages looked at; a larger one marks them all
_ZERO_CHUNK = memoryview(bytes(CHUNK))


class KnownGood:
    """The contents a repair puts back: every audited write, and the region as last seen intact.

    Beside the copy, a map of its pages: 1 where a page may hold a non-zero byte, 0 where it is all NULs (exact
    after a refresh; a write marks the pages it touches). A region holding a short message is mostly zeros, and a
    repair after a truncation (which leaves holes, reading as zeros) writes only its marked pages. No operation
    builds a region-sized temporary: writes go into the copy through a memoryview, a refresh reads CHUNK bytes at
    a time and keeps only the chunks that changed until it knows the region was intact throughout."""

    def __init__(self, contents: bytes | bytearray):
        self.data = bytearray(contents)
        self.size = len(self.data)
        self.view = memoryview(self.data)  # the copy never changes size, so the view stays valid
        self.pages = bytearray(-(-self.size // PAGE))
        self._scratch = bytearray(CHUNK)
        self._map(0, self.size)

    # --- the page map ------------------------------------------------------------------------------------

    def _map(self, start: int, end: int) -> None:
        """Look again at the pages that hold bytes start..end: a chunk of zeros at once, else page by page."""
        for at in range(start - start % CHUNK, end, CHUNK):
            first, stop = max(at, start - start % PAGE), min(at + CHUNK, self.size, -(-end // PAGE) * PAGE)
            if is_zero(self.view[first:stop]):
                self.pages[first // PAGE:-(-stop // PAGE)] = bytes(-(-stop // PAGE) - first // PAGE)
                continue
            for page in range(first // PAGE, -(-stop // PAGE)):
                self.pages[page] = not is_zero(self.view[page * PAGE:min((page + 1) * PAGE, self.size)])

    def nonzero_runs(self, start: int = 0, end: int | None = None):
        """(start, end) byte ranges of runs of marked pages within start..end (page-aligned within it)."""
        end = self.size if end is None else end
        first, last = start // PAGE, -(-end // PAGE)
        page = self.pages.find(1, first, last)
        while page >= 0:
            stop = self.pages.find(0, page, last)
            stop = last if stop < 0 else stop
            yield max(start, page * PAGE), min(end, stop * PAGE)
            page = self.pages.find(1, stop, last)

    # --- updates -----------------------------------------------------------------------------------------

    def remember(self, offset: int, data: bytes, zero_fill: int = 0) -> None:
        """An audited write: data at offset, then zero_fill NULs. Only the marked pages of the fill are zeroed; each
        page the write leaves partly written is looked at once, after the fill."""
        end, fill_end = offset + len(data), offset + len(data) + zero_fill
        self.view[offset:end] = data
        if zero_fill:  # the marked runs of the fill (nonzero_runs, in line: this runs for every write)
            pages, last = self.pages, -(-fill_end // PAGE)
            page = pages.find(1, end // PAGE, last)
            while page >= 0:
                stop = pages.find(0, page, last)
                stop = last if stop < 0 else stop
                for at in range(max(end, page * PAGE), min(fill_end, stop * PAGE), CHUNK):
                    length = min(CHUNK, fill_end - at, stop * PAGE - at)
                    self.view[at:at + length] = _ZERO_CHUNK[:length]
                page = pages.find(1, stop, last)
            whole_first, whole_stop = -(-end // PAGE), fill_end // PAGE  # the pages the fill covers whole: zeros
            if whole_stop > whole_first:
                self.pages[whole_first:whole_stop] = bytes(whole_stop - whole_first)
        looked = range(0)
        if data and len(data) <= SMALL_WRITE:
            page = offset // PAGE
            if (end - 1) // PAGE == page and data != _ZERO_CHUNK[:len(data)]:
                self.pages[page] = 1  # one page, and the write put a non-zero byte into it: no need to look
            else:
                self._map(offset, end)
            looked = range(page, -(-end // PAGE))
        elif data:  # marked without looking (a page that is zeros after all only costs a repair one more write)
            self.pages[offset // PAGE:-(-end // PAGE)] = b"\x01" * (-(-end // PAGE) - offset // PAGE)
        if not zero_fill:
            return
        if end % PAGE and end // PAGE not in looked:
            self._map(end, end + 1)  # the page the data ends in
            looked = range(end // PAGE, end // PAGE + 1)
        if fill_end % PAGE and (fill_end - 1) // PAGE not in looked:
            self._map(fill_end - 1, fill_end)  # the page the fill ends in

    def matches(self, fd: int, size: int) -> bool:
        """Does the file read exactly as the copy (CHUNK bytes at a time)?"""
        for start in range(0, size, CHUNK):
            length = min(CHUNK, size - start)
            if self._read_chunk(fd, start, length) != self.view[start:start + length]:
                return False
        return True

    def _read_chunk(self, fd: int, start: int, length: int) -> bytearray | None:
        """length bytes at start into the scratch buffer (a new one for a short last chunk); None if short."""
        buf = self._scratch if length == CHUNK else bytearray(length)
        done = 0
        with memoryview(buf) as view:
            while done < length:
                got = os.preadv(fd, [view[done:]], start + done)
                if got == 0:
                    return None
                done += got
        return buf

    def refresh(self, fd: int, size: int, full_blocks: int) -> bool:
        """Take the file's contents, only if it is intact (its size, every page allocated and written, none past
        its end: st_blocks exactly full, no hole) before and after we read it. Chunks that differ from the copy
        are held aside until the second look; only they are copied in, and only their pages are mapped again."""
        intact = Allocation(size, full_blocks, size)
        if Allocation.of(fd, size) != intact:
            return False
        changed: list[tuple[int, bytes]] = []
        for start in range(0, size, CHUNK):
            length = min(CHUNK, size - start)
            chunk = self._read_chunk(fd, start, length)
            if chunk is None:
                return False
            if chunk != self.view[start:start + length]:
                changed.append((start, bytes(chunk)))
        if Allocation.of(fd, size) != intact:
            return False
        for start, chunk in changed:
            self.view[start:start + len(chunk)] = chunk
        changed_at = {start for start, _ in changed}
        for start in range(0, size, CHUNK):  # the map exact again: where it changed, and where a large write marked
            stop = min(size, start + CHUNK)
            if start in changed_at or self.pages.find(1, start // PAGE, -(-stop // PAGE)) >= 0:
                self._map(start, stop)
        return True

    def refresh_range(self, fd: int, start: int, end: int, full_blocks: int) -> bool:
        """Take only bytes start..end of the file (an ack rewrote only the guest's reply area), if the file is intact
        there before and after the read: its size, st_blocks exactly full, and every page of the range holding
        data. The rest of the copy is left as it is; only the range's pages are mapped again."""
        def intact() -> bool:
            st = os.fstat(fd)
            return st.st_size == self.size and st.st_blocks == full_blocks and all(
                next_extent(fd, page, os.SEEK_DATA, self.size) == page
                for page in range(start - start % PAGE, end, PAGE))
        if not 0 <= start < end <= self.size or not intact():
            return False
        chunk = self._read_chunk(fd, start, end - start)
        if chunk is None or not intact():
            return False
        self.view[start:end] = chunk
        self._map(start, end)
        return True

    # --- repair ------------------------------------------------------------------------------------------

    def put_back(self, fd: int) -> None:
        """Make the file read exactly as the copy, fast: where it holds data (any bytes at all) the copy goes
        there whole; where it has holes (they read as zeros: after a truncation, all of it) only the copy's
        marked pages are written. The holes that remain are filled by fill_holes, after the repair is done."""
        position = 0
        while position < self.size:
            data = next_extent(fd, position, os.SEEK_DATA, self.size)
            for start, stop in self.nonzero_runs(position, data):  # a hole: zeros, but for the copy's marked pages
                pwrite_all(fd, self.view[start:stop], start)
            if data >= self.size:
                break
            hole = next_extent(fd, data, os.SEEK_HOLE, self.size)
            pwrite_all(fd, self.view[data:hole], data)
            position = hole


def next_extent(fd: int, offset: int, whence: int, size: int) -> int:
    """lseek SEEK_DATA/SEEK_HOLE from offset, at most size. Where the kernel cannot tell, all is taken as data."""
    try:
        return min(os.lseek(fd, offset, whence), size)
    except OSError as exc:
        if whence == os.SEEK_DATA and exc.errno != errno.ENXIO:
            return offset  # no SEEK_DATA here: data from offset on (ENXIO: none from offset on)
        return size
