"""Who did it: fanotify's touches, the opener witness's reports, and the peers' credentials.

inotify names no process. As root the guard holds a fanotify group that names each process that touches the
region or a socket, and starts the opener witness, which reads who opens the region while the kernel holds it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from ..linux.fanotify import (
    FAN_ATTRIB,
    FAN_DELETE_SELF,
    FAN_MODIFY,
    FAN_MOVE_SELF,
    FAN_OPEN,
    Fanotify,
    Touch,
    Witnesses,
)
from ..linux.opener_witness import Opener, OpenerWitness
from ..linux.procfs import fd_path

log = logging.getLogger("shmguard.guard")

FAN_REGION = FAN_MODIFY | FAN_ATTRIB | FAN_MOVE_SELF | FAN_DELETE_SELF
FAN_MEMFD = FAN_MODIFY | FAN_ATTRIB | FAN_OPEN
FAN_SOCKET = FAN_ATTRIB | FAN_MOVE_SELF | FAN_DELETE_SELF
OPENERS_REMEMBERED = 1024  # identities of processes that opened the region, read while the kernel held them


class Attribution:
    """The kernel's witnesses of who touched what, and the peer lookup, turned into a named offender."""

    def __init__(self, loop, peers: Callable[[], Iterable[Any]]):
        self.loop = loop
        self._peer_lookup = peers  # the connected peers: objects with .id and .cred (pid, uid, gid) or None
        self.witnesses: Witnesses | None = None
        self.openers: OpenerWitness | None = None
        self.description = "not started"
        self._identities: OrderedDict[int, Opener] = OrderedDict()  # pid -> who it was when it opened the region
        self._opened: list[Opener] = []  # memfd openers reported by the witness, to be recorded
        self._memfd = False
        self._on_opened: Callable[[Opener], None] = lambda opener: None

    def start(self, fd: int, is_file: bool, on_touch: Callable[[], None],
              on_opened: Callable[[Opener], None], inherited: dict | None = None) -> None:
        """on_touch: fanotify has events; on_opened: another process opened the memfd (named by the witness).
        inherited: a predecessor's fanotify fd and witness (see snapshot), taken over instead of made anew:
        after the predecessor dropped CAP_SYS_ADMIN, nobody could make them again."""
        self._memfd, self._on_opened = not is_file, on_opened
        if inherited is not None:
            self._adopt(inherited, on_touch)
            return
        try:
            fanotify = Fanotify.open()
        except OSError as exc:
            self.description = f"unavailable (fanotify_init: {exc.strerror}; it needs CAP_SYS_ADMIN)"
            return
        try:
            fanotify.mark(fd_path(fd), FAN_REGION if is_file else FAN_MEMFD)
        except OSError as exc:
            fanotify.close()
            self.description = f"unavailable (fanotify_mark: {exc.strerror})"
            return
        self.witnesses = Witnesses(fanotify)
        self.loop.add_reader(fanotify.fd, on_touch, first=True)  # on_touch repairs a resize before it names anyone
        self.description = "fanotify"
        self._start_openers(fd)

    def snapshot(self, fds: dict[str, int]) -> dict | None:
        """The kernel's witnesses for a successor (None: there are none, it starts its own if it may)."""
        if self.witnesses is None:
            return None
        fds["fanotify"] = self.witnesses.fanotify.fd
        state: dict = {"description": self.description, "openers": None}
        if self.openers is not None and not self.openers.ended:
            fds["opener-witness"] = self.openers.fd
            state["openers"] = {"pid": self.openers.pid, "execs_watched": self.openers.execs_watched}
        return state

    def _adopt(self, state: dict, on_touch: Callable[[], None]) -> None:
        fanotify = Fanotify(state["fanotify_fd"])
        self.witnesses = Witnesses(fanotify)
        self.loop.add_reader(fanotify.fd, on_touch, first=True)
        self.description = state["description"]
        if state.get("openers") is not None:
            self.openers = OpenerWitness(state["openers"]["pid"], state["openers"]["fd"],
                                         state["openers"]["execs_watched"])
            self.loop.add_reader(self.openers.fd, self.take_openers)

    def _start_openers(self, fd: int) -> None:
        """The child that holds each open of the region while it reads who opened it (linux/opener_witness.py)."""
        try:
            self.openers = OpenerWitness.start([fd_path(fd)])
        except OSError as exc:
            self.description += f"; openers not held (FAN_OPEN_PERM: {exc.strerror})"
            return
        self.loop.add_reader(self.openers.fd, self.take_openers)
        programs = ", ".join(self.openers.execs_watched) or "nowhere (exec events refused)"
        self.description += f"; openers held (FAN_OPEN_PERM, pid {self.openers.pid}); programs from exec events " \
                            f"on the filesystems of {programs}"

    def watch_socket(self, path: str) -> None:
        """Name who touches this socket inode too (path: a /proc/self/fd/N of it). Raises OSError."""
        if self.witnesses is not None:
            self.witnesses.fanotify.mark(path, FAN_SOCKET)

    def close(self) -> None:
        if self.witnesses is not None:
            self.loop.remove_reader(self.witnesses.fanotify.fd)
            self.witnesses.fanotify.close()
            self.witnesses = None
        if self.openers is not None:
            self.loop.remove_reader(self.openers.fd)
            self.openers.close()
            self.openers = None

    # --- the opener witness ------------------------------------------------------------------------------

    def take_openers(self) -> None:
        """The witness's reports, and the incidents of memfd opens among them (its fd's reader, and the guard's
        first step when fanotify is ready: an opener's incident is then there for its touch to name)."""
        if self.openers is not None:
            self._collect_openers()
        opened, self._opened = self._opened, []
        for opener in opened:
            self._on_opened(opener)

    def _collect_openers(self) -> None:
        """Take the witness's reports: identities to name offenders by, and (memfd) opens that are incidents."""
        for opener in self.openers.read():
            self._identities.pop(opener.pid, None)
            self._identities[opener.pid] = opener
            while len(self._identities) > OPENERS_REMEMBERED:
                self._identities.popitem(last=False)
            if self._memfd:
                if not self._opened:
                    self.loop.call_later(0, self.take_openers)  # recorded from the loop, never inside a record
                self._opened.append(opener)
        if self.openers.ended:
            log.warning("guard: the opener witness (pid %d) is gone: opens are no longer held, short-lived "
                        "offenders may go unnamed", self.openers.pid)
            self.loop.remove_reader(self.openers.fd)
            self.openers.close()
            self.openers = None
            self.description += "; opener witness gone"

    # --- naming ------------------------------------------------------------------------------------------

    def collect(self) -> None:
        if self.witnesses is not None:
            self.witnesses.collect()

    def claim(self, mask: int) -> Touch | None:
        return None if self.witnesses is None else self.witnesses.claim(mask)

    def prune(self, before_ns: int) -> None:
        if self.witnesses is not None:
            self.witnesses.prune(before_ns)

    def named(self, touch: Touch) -> dict:
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
        peer = next((p.cred for p in self.peers() if p.cred.pid == touch.pid), None)
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

    def named_opener(self, pid: int) -> dict | None:
        """The opener the witness reported with this pid (a region-opened incident whose fanotify touch never came)."""
        opener = self._identities.get(pid)
        if opener is None:
            return None
        return {**opener.describe(), "uid_from": "its open of the region (held by fanotify)"}

    def peers(self) -> list:
        return [peer for peer in list(self._peer_lookup() or ()) if getattr(peer, "cred", None) is not None]

    def holders(self) -> list[dict]:
        """Who holds the region through the socket: when nothing names an offender, one of these (or root) did."""
        return [{"peer": p.id, "pid": p.cred.pid, "uid": p.cred.uid, "gid": p.cred.gid} for p in self.peers()]
