"""The inotify watches: the region (through our fd), its directory, each socket inode and its directory.

An event only says "look now" (docs/protocol.md §4: a truncation arrives as IN_MODIFY like a write, `rm` of an open file
as IN_ATTRIB only, writes through mmap as nothing at all); the check re-reads the truth.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import inotify_simple
from inotify_simple import INotify, parse_events
from inotify_simple import flags as F

from ..linux import libc
from ..linux.procfs import fd_path
from .attribution import Attribution
from .entries import identity
from .sockets import GuardedSocket

log = logging.getLogger("shmguard.guard")

REGION_EVENTS = F.MODIFY | F.CLOSE_WRITE | F.ATTRIB | F.MOVE_SELF | F.DELETE_SELF
MEMFD_EVENTS = F.MODIFY | F.ATTRIB | F.OPEN  # nobody but us may open the memfd: any open is news
SOCKET_EVENTS = F.ATTRIB | F.MOVE_SELF | F.DELETE_SELF
DIR_EVENTS = (F.CREATE | F.DELETE | F.MOVED_FROM | F.MOVED_TO | F.ATTRIB | F.DELETE_SELF | F.MOVE_SELF
              | F.ONLYDIR | F.DONT_FOLLOW)

# What a batch of events asks the check to do: (modified, closed, opened) on the region itself.
OnEvents = Callable[[bool, bool, bool], None]
TAKE_BYTES = 65536  # what one read of the inotify fd takes


class Watches:
    """One non-blocking inotify fd in the loop; each batch of events that concerns us is one check."""

    def __init__(self, loop, attribution: Attribution):
        self.loop, self.attribution = loop, attribution
        self.inotify: INotify | None = None
        self._region_wd: int | None = None
        self._dir_names: dict[int, set[str]] = {}  # directory watch -> the entry names that concern us
        self._socket_watches: dict[str, tuple[tuple[int, int], int]] = {}
        self._on_events: OnEvents = lambda modified, closed, opened: None
        self._on_wake: Callable[[], bool] = lambda: False
        self._taken = b""  # events read (take) and not yet handled (dispatch)
        self.fd = -1  # the inotify fd
        self.buffers = [memoryview(bytearray(TAKE_BYTES))]  # what a take reads into: made once

    def open(self) -> None:
        # inotify_simple looks libc up with ctypes.util.find_library, which runs `ldconfig -p` (a fork and an exec on
        # every start); this process's libc is that library.
        inotify_simple._libc = inotify_simple._libc or libc._libc
        self.inotify = INotify(nonblocking=True)
        self.fd = self.inotify.fileno()

    def start(self, fd: int, is_file: bool, on_events: OnEvents, on_wake: Callable[[], bool] | None = None) -> None:
        """on_wake: called first when the inotify fd is ready, before the events are read (what must not wait for
        them: a resize's repair, restore.FirstLook.look); True if it repaired: the events are then left queued, a
        batch of their own in the next turn (see _on_inotify). The inotify fd is the loop's first reader: in a batch
        of ready fds, it is handled before the others."""
        self._region_wd = self.inotify.add_watch(fd_path(fd), REGION_EVENTS if is_file else MEMFD_EVENTS)
        self._on_events, self._on_wake = on_events, on_wake or (lambda: False)
        self.loop.add_reader(self.inotify.fileno(), self._on_inotify, first=True)

    def close(self) -> None:
        if self.inotify is not None:
            self.loop.remove_reader(self.inotify.fileno())
            self.inotify.close()
            self.inotify = None

    def watch_directory(self, directory: str, names: set[str]) -> None:
        try:
            wd = self.inotify.add_watch(directory, DIR_EVENTS)
        except OSError:
            return  # gone for now; the socket repair recreates it and the next check watches it again
        self._dir_names.setdefault(wd, set()).update(names)

    def watch_socket(self, sock: GuardedSocket, listener) -> None:
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
            wd = self.inotify.add_watch(fd_path(fd), SOCKET_EVENTS)
            self.attribution.watch_socket(fd_path(fd))
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

    def take(self) -> None:
        """Read the events queued now, unparsed (one read, into a buffer made once). Never right after a repair: the
        events then wait for the next turn, a batch of their own, so that a write landing after the repair's look is
        never folded into the batch the repair answers (Contents.check undoes it in the tampering's second)."""
        try:
            taken = os.readv(self.fd, self.buffers)
        except BlockingIOError:
            return
        self._taken += self.buffers[0][:taken]

    def _on_inotify(self) -> None:
        try:
            repaired = self._on_wake()
        except OSError as exc:  # the region could not be looked at; the check looks again
            log.error("guard: check failed: %s", exc)
            repaired = False
        if not repaired:  # after a repair the events wait: the next turn's batch, a check of its own
            self.take()
        self.dispatch(repaired)

    def dispatch(self, repaired: bool = False) -> None:
        """Handle the events taken: one check if any concern us, or if a repair was made (it is recorded by it)."""
        events, self._taken = parse_events(self._taken), b""
        for event in events:
            if event.mask & F.IGNORED:
                self._dir_names.pop(event.wd, None)
        relevant = [event for event in events if self._concerns_us(event)]
        if not relevant and not repaired:
            return
        on_region = [event.mask for event in relevant if event.wd == self._region_wd]
        self._on_events(repaired or any(mask & F.MODIFY for mask in on_region),
                        any(mask & F.CLOSE_WRITE for mask in on_region), any(mask & F.OPEN for mask in on_region))

    def _concerns_us(self, event) -> bool:
        if event.mask & (F.Q_OVERFLOW | F.IGNORED):
            return bool(event.mask & F.Q_OVERFLOW)  # an overflow may hide anything: look at everything
        names = self._dir_names.get(event.wd)
        return names is None or not event.name or event.name in names
