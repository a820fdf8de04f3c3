"""Guard: watches the region's path and both sockets, re-reads the truth on every event, and responds.

It is part of the supervisor's one event loop: an inotify fd (watches.py), a periodic scan of the region's
allocation (contents.py: some tampers make no event at all, a hole punched through a memfd's own description),
and, as root, a fanotify fd that names offenders plus the report pipe of the opener witness (attribution.py,
linux/opener_witness.py), which reads who opens the region while the kernel holds the opener.
An event only says "look now": the truth is fstat of the held region fd, lstat of the paths and the directory
entries, compared with the policy. Repairs cause events of their own; those find nothing wrong and do nothing.

Responses ([guard] in the policy): block = the sealed memfd refuses any resize in the kernel; repair = put back
size, contents, owner/group/mode, ACLs, the path and the sockets; alert = log and record only. Each part guards
one thing (contents, names, sockets); incidents.py turns what they find into audit records.

The Guard is given its dependencies, never the supervisor: the guard policy, the region, the loop, the guarded
sockets (endpoints with .listener and .rebind()), a record function and a peer lookup for attribution.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from ..policy import GuardPolicy
from ..region import Region, pwrite_all
from .attribution import Attribution
from .contents import Allocation, Contents, KnownGood, first_hole
from .entries import FollowUp, GuardError, Target
from .incidents import Incidents
from .names import Names
from .restore import FirstLook
from .sockets import GuardedSocket, Sockets, guarded_sockets
from .watches import Watches

__all__ = ["Allocation", "Guard", "GuardError", "GuardedSocket", "KnownGood", "first_hole", "guarded_sockets"]

log = logging.getLogger("shmguard.guard")


class Guard:
    """The coordinator: one check runs every part's checks in turn; the hooks are the supervisor's."""

    def __init__(self, policy: GuardPolicy, region: Region, loop, *, record: Callable[..., Any],
                 sockets: Iterable[GuardedSocket] = (), peers: Callable[[], Iterable[Any]] = tuple,
                 region_attributes: tuple[int, int, int] | None = None) -> None:
        """record(action, actor=, result=, detail=) appends to the audit log; peers() gives the connected peers
        (.id, .cred); region_attributes: (owner, group, mode) a region file must have (a memfd keeps its own)."""
        self.policy, self.region, self.loop = policy, region, loop
        self.target = Target.of(region)
        self.follow_up = FollowUp(loop, self.check)
        self.attribution = Attribution(loop, peers)
        self.incidents = Incidents(self.attribution, loop, record)
        self.contents = Contents(self.target, policy, loop, self.incidents, self.follow_up, self.check)
        self.names = Names(self.target, policy, self.incidents, self.follow_up, region_attributes)
        self.sockets = Sockets(list(sockets), policy, self.incidents, self._ensure_watches)
        self.watches = Watches(loop, self.attribution)
        self.first_look: FirstLook | None = None  # the repair of a resize, first on every wake (restore.py)
        self.started = False
        self._checking = False  # a check is under way (a repair it makes may ask for another: see check)

    # --- starting and stopping ---------------------------------------------------------------------------

    def start(self, inherited: dict | None = None) -> None:
        """inherited: a predecessor's snapshot(), its fds already resolved (see Supervisor's take-over)."""
        target = self.target
        inherited = inherited or {}
        if inherited.get("known_good") is not None:
            self.contents.known_good = KnownGood(inherited["known_good"])
        self.incidents.count = inherited.get("incidents", self.incidents.count)
        self.incidents.last = inherited.get("last_incident", self.incidents.last)
        self.contents.start()
        self.names.start(anchor=inherited.get("anchor"))
        self.watches.open()
        self.first_look = FirstLook(self.contents)
        self.loop.before_wait(self.contents.plan_ahead)  # the restore plan is made ahead, never at repair time
        self.attribution.start(target.fd, target.is_file, self._on_touch, self.contents.opened_by,
                               inherited=inherited.get("attribution"))
        self.watches.start(target.fd, target.is_file, self._on_events, self.first_look.look)
        self.started = True
        self._ensure_watches()
        self.check()  # whatever is already wrong is an incident too
        self.contents.start_scans()
        log.info("guard: watching %s; offenders named by %s", ", ".join(self.watched_paths()),
                 self.attribution.description)

    def snapshot(self, fds: dict[str, int]) -> dict:
        """For a successor: the known-good copy (in a memfd), incidents so far, the anchor, the kernel's witnesses."""
        copy = os.memfd_create("shmguard-known-good", os.MFD_CLOEXEC)
        os.ftruncate(copy, len(self.contents.known_good.data))
        pwrite_all(copy, memoryview(self.contents.known_good.data), 0)
        fds["known-good"] = copy
        return {"incidents": self.incidents.count, "last_incident": self.incidents.last,
                "anchor": self.names.anchor.directory if self.names.anchor else None,
                "attribution": self.attribution.snapshot(fds)}

    def record_pending(self) -> None:
        """Before a hand-over: incidents still being collected are recorded now; the guard goes on watching."""
        self.incidents.record_overdue(everything=True)

    def close(self) -> None:
        self.incidents.record_overdue(everything=True)
        self.started = False
        self.follow_up.closed = self.contents.closed = True
        self.watches.close()
        self.attribution.close()
        self.names.close()

    # --- the supervisor's hooks --------------------------------------------------------------------------

    def before_write(self, start: int = 0, end: int | None = None) -> bool:
        """For the supervisor to call just before an audited write of bytes start..end: a hole the write would fill
        again (and so hide: a refilled page is whole, with zeros around the written bytes) is repaired from the
        copy first. Cheap: an fstat, and a look at the pages the write touches (Contents.needs_check).
        True if it looked, and so may have changed the region."""
        if self.started and self.contents.needs_check(start, end):
            self.check()
            return True
        return False

    def remember(self, offset: int, data: bytes, zero_fill: int = 0) -> None:
        """The supervisor's hook after an audited write (data, then zero_fill NULs): it survives every repair."""
        self.contents.known_good.remember(offset, data, zero_fill)
        self.contents.copy_changed()

    def refresh(self, area: tuple[int, int] | None = None) -> bool:
        """The supervisor's hook after its guest reported: take the region (or only area), if intact, as the
        known-good copy (at most once per interval, never while a tampering may still be writing; Contents.refresh)."""
        return self.contents.refresh(area)

    # --- the check ---------------------------------------------------------------------------------------

    def check(self, modified: bool = False, closed: bool = False, opened: bool = False) -> None:
        """Compare the truth with the policy and respond to every difference.

        Never inside itself: a socket's repair admits the connections waiting in the old listener's backlog,
        and admitting asks for a check (the region must be whole before a greeting). A check run there would
        compare the socket's path, which holds the fresh listener already, with the listener the server still
        names, rebind again, and reset the incidents this check has seen. So a check asked for during one is
        a follow-up check right after it; the region was looked at first in this one (the contents step)."""
        if self._checking:
            self.follow_up.schedule()
            return
        self._checking = True
        try:
            self._check(modified, closed, opened)
        finally:
            self._checking = False

    def _check(self, modified: bool, closed: bool, opened: bool) -> None:
        self.incidents.begin_check()
        self.names.begin_check()
        # The contents first: a repair does not wait for the offender to be named (attribution.collect reads the
        # fanotify queue); a repaired incident whose offender is not known yet waits for it (Incidents.settle).
        steps = [lambda: self.contents.check(modified, closed), self.attribution.collect,
                 lambda: self.contents.check_opened(opened, self.attribution.openers is not None),
                 self.names.check_attributes, self.names.check_acl]
        if self.target.is_file:
            steps += [self.names.check_path, self.names.check_anchor, self.names.check_extra_links]
        steps += [lambda sock=sock: self.sockets.check(sock) for sock in self.sockets.sockets]
        for step in steps:
            try:
                step()
            except OSError as exc:  # the truth could not be read; the next event looks again
                log.error("guard: check failed: %s", exc)
            except Exception:  # noqa: BLE001 - a bug in one step must not skip the others, nor the watches
                log.exception("guard: check step failed (the next event looks again)")
        self.incidents.end_check()
        self._ensure_watches()
        self.incidents.settle()

    def _on_events(self, modified: bool, closed: bool, opened: bool) -> None:
        self.check(modified=modified, closed=closed, opened=opened)

    def _on_wake(self) -> bool:
        """First on every wake by the kernel's watches (the watches call FirstLook.look themselves, _on_touch inline),
        before any event is read and before anyone is named: a resized region gets its size and contents back; the
        check that follows records the incident (the events, left queued, are a batch of their own after it)."""
        try:
            return self.first_look is not None and self.first_look.look()
        except OSError as exc:  # the region could not be looked at; the check looks again
            log.error("guard: check failed: %s", exc)
            return False

    def _on_touch(self) -> None:
        """fanotify has events (it may be ready before inotify): repair first (as _on_wake, inline: one frame less
        between the wake and the repair), then the check that records it, then the waiting incidents get their
        offenders."""
        try:
            repaired = self.first_look is not None and self.first_look.look()
        except OSError as exc:  # the region could not be looked at; the check looks again
            log.error("guard: check failed: %s", exc)
            repaired = False
        if repaired:
            self.watches.dispatch(repaired=True)
        self.attribution.take_openers()  # whichever fd the loop took first, the open's incident waits for its touch
        self.incidents.on_touch()

    def _ensure_watches(self) -> None:
        """(Re)watch the directories and the current socket inodes; cheap, so done after every check."""
        if self.target.is_file:
            self.watches.watch_directory(os.path.dirname(self.region.path), self.names.watched_names())
        for sock in self.sockets.sockets:
            listener = sock.listener
            if listener is not None:
                self.watches.watch_directory(os.path.dirname(listener.path), {os.path.basename(listener.path)})
                self.watches.watch_socket(sock, listener)

    # --- status ------------------------------------------------------------------------------------------

    def watched_paths(self) -> list[str]:
        paths = [self.target.path] + ([os.path.dirname(self.region.path)] if self.target.is_file else [])
        for sock in self.sockets.sockets:
            if sock.listener is not None:
                paths += [sock.listener.path, os.path.dirname(sock.listener.path)]
        return list(dict.fromkeys(paths))

    def describe(self) -> dict:
        """For `shmguard status`."""
        return {
            "watching": self.watched_paths(),
            "responses": {name: getattr(self.policy, name) for name in
                          ("on_resize", "on_attributes", "on_unlink", "on_socket")},
            "attribution": self.attribution.description,
            "anchor": self.names.anchor.path if self.names.anchor else None,
            "incidents": self.incidents.count,
            "last_incident": self.incidents.last,
        }
