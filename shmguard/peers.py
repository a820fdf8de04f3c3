"""PeerTable: the ivshmem server's peers, ids and slots as a state machine with no I/O (the h11 way).

Every transition returns what it causes, in order: `Send`s (one 8-byte word, at most one fd, to one remote peer)
and `Gone`s (a peer has left the table: the server closes its connection and records the leave). The server
carries them out; a send that fails comes back in as `leave()`, a transition of its own, so no send ever runs
inside another transition. Vector and shm handles and credentials are opaque: the table only passes them on.
The state is plain data: `snapshot()`/`from_snapshot()` let a successor take over.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from .limits import PEER_IDS
from .protocol import announcement, greeting
from .shares import Share

Handle = Any  # an eventfd or the shared memory as the server holds it
Encode = Callable[[Any], Any]


def _same(value: Any) -> Any:
    return value


class Send(NamedTuple):
    """One message for the remote peer `to`: the word `value`, with `fd` attached when it is not None. A tuple:
    every join makes several, and a frozen dataclass costs several times as much to make."""

    to: int
    value: int
    fd: Handle | None = None


class Gone(NamedTuple):
    """`peer` has left the table: its connection goes, its vectors go, its leave is recorded."""

    peer: Peer
    reason: str


Action = Send | Gone


@dataclass(eq=False)
class Peer:
    id: int
    vectors: tuple[Handle, ...]
    joined: int  # the join counter when it joined: it has seen every leave after this
    cred: Any | None = None  # None for the supervisor's own (local) peer, which reads nothing from the wire
    uid: int = 0  # charged for its slot and id
    announced: bool = False  # have the other peers been told it joined?

    @property
    def remote(self) -> bool:
        return self.cred is not None

    def describe(self) -> dict:
        who = self.cred.describe() if self.cred is not None else {"local": True}
        return {"id": self.id, "vectors": len(self.vectors), **who}


class PeerIds:
    """Hands out ids 0..65535 in order; a departed id comes back only once no connected peer has seen it leave.

    QEMU frees a departed peer's state and crashes if that id reappears while it remembers the leave
    (docs/protocol.md §2), so an id is reusable only when every connected peer joined after it left. Ids are a
    resource like any other: each is charged to the uid it went to until it is reusable again, so one uid that
    joins and leaves in a loop exhausts its own share (`shares.ids_per_uid`), never the ids of root or QEMU.
    """

    def __init__(self, limit: int = PEER_IDS, share: Share | None = None):
        self.limit, self.next_fresh = limit, 0
        self.share = share or Share("peer ids", limit, limit, 0, frozenset({0}))
        self.departed: deque[tuple[int, int, int | None]] = deque()  # (id, leave counter, uid charged), oldest first
        self.free = 0  # departed[:free] are reusable: no connected peer saw them leave (their charge is given back)

    def take(self, uid: int, oldest_join: int | None) -> tuple[int | None, str | None]:
        """An id for a peer of uid, or (None, why not)."""
        self._forget_before(oldest_join)
        if self.next_fresh >= self.limit and not self.free:
            return None, "no peer id is free (every departed id is still remembered by a connected peer)"
        reason = self.share.take(uid)
        if reason is not None:
            return None, reason + " (departed ids count until no connected peer remembers them)"
        if self.next_fresh < self.limit:
            self.next_fresh += 1
            return self.next_fresh - 1, None
        self.free -= 1
        return self.departed.popleft()[0], None

    def allocate(self, oldest_join: int | None, uid: int = 0) -> int | None:
        return self.take(uid, oldest_join)[0]

    def release(self, peer_id: int, counter: int, uid: int = 0) -> None:
        """peer_id left at `counter`: it stays charged to uid while a connected peer remembers the leave."""
        self.departed.append((peer_id, counter, uid))

    def unused(self, peer_id: int, uid: int = 0) -> None:
        """Give back an id that was never announced: nobody saw it, so it is free at once."""
        self.share.give(uid)
        self.departed.appendleft((peer_id, -1, None))
        self.free += 1

    def _forget_before(self, oldest_join: int | None) -> None:
        """Leaves before the oldest connected peer joined are remembered by nobody: those ids are free again.
        The oldest join only moves forward, and departures are in leave order, so this walks each one once."""
        while self.free < len(self.departed) and (oldest_join is None or self.departed[self.free][1] < oldest_join):
            uid = self.departed[self.free][2]
            if uid is not None:
                self.share.give(uid)
                self.departed[self.free] = self.departed[self.free][:2] + (None,)
            self.free += 1

    def snapshot(self) -> dict:
        return {"limit": self.limit, "next_fresh": self.next_fresh, "free": self.free,
                "departed": [list(entry) for entry in self.departed], "share": share_snapshot(self.share)}

    @classmethod
    def from_snapshot(cls, data: dict) -> PeerIds:
        ids = cls(data["limit"], share_from_snapshot(data["share"]))
        ids.next_fresh, ids.free = data["next_fresh"], data["free"]
        ids.departed = deque(tuple(entry) for entry in data["departed"])
        return ids


class PeerTable:
    """Who is connected, under which id, and who has heard of whom.

    A join takes three steps, so that each one that can fail comes before the first one anybody sees:
    `reserve()` takes a slot and an id (the server then creates the eventfds and has the join recorded, and
    `cancel()`s if either fails); `join()` returns the newcomer's greeting, which the server flushes at once;
    `announce()` then returns the announcements to the others. A newcomer gone before its greeting is sent
    `leave()`s unannounced, and nobody ever hears of it.
    """

    def __init__(self, shm: Handle, slots: Share, ids: PeerIds):
        self.shm, self.slots, self.ids = shm, slots, ids
        self.peers: dict[int, Peer] = {}  # in join order
        self.counter = 0  # counts joins and leaves, to know who has seen which leave
        self._reserved: dict[int, tuple[int, Any | None]] = {}  # id -> (uid, cred) between reserve and join

    def reserve(self, uid: int, cred: Any | None) -> tuple[int | None, str | None]:
        """A slot and an id for a peer of uid (cred None: the local peer, which takes no slot), or why not."""
        if cred is not None and (reason := self.slots.take(uid)) is not None:
            return None, reason
        peer_id, reason = self.ids.take(uid, self._oldest_join())
        if peer_id is None:
            if cred is not None:
                self.slots.give(uid)
            return None, reason
        self._reserved[peer_id] = (uid, cred)
        return peer_id, None

    def cancel(self, peer_id: int) -> None:
        """A reserved id that never joined: nobody saw it, so its id and slot come back at once."""
        uid, cred = self._reserved.pop(peer_id)
        self.ids.unused(peer_id, uid)
        if cred is not None:
            self.slots.give(uid)

    def join(self, peer_id: int, vectors: tuple[Handle, ...]) -> list[Action]:
        """The reserved peer joins: its greeting (nothing else may reach it before), in docs/protocol.md §1's order."""
        uid, cred = self._reserved.pop(peer_id)
        self.counter += 1
        peer = self.peers[peer_id] = Peer(peer_id, tuple(vectors), self.counter - 1, cred, uid)
        if not peer.remote:
            return []
        others = [(other.id, other.vectors) for other in self.peers.values() if other is not peer]
        return [Send(peer_id, value, fd) for value, fd in greeting(peer_id, self.shm, others, peer.vectors)]

    def announce(self, peer_id: int) -> list[Action]:
        """The newcomer's greeting is out: every other remote peer hears of it, one message per vector."""
        peer = self.peers[peer_id]
        peer.announced = True
        return [Send(other.id, value, fd) for other in self._remote(but=peer)
                for value, fd in announcement(peer_id, peer.vectors)]

    def leave(self, peer_id: int, reason: str) -> list[Action]:
        """peer_id leaves (it may not refuse): it is gone, then every remaining remote peer hears its bare id if
        it was ever announced. Its id stays charged while a connected peer remembers the leave."""
        peer = self.peers.pop(peer_id)
        self.counter += 1
        self.ids.release(peer_id, self.counter, peer.uid)
        if peer.remote:
            self.slots.give(peer.uid)
        actions: list[Action] = [Gone(peer, reason)]
        if peer.announced:
            actions += [Send(other.id, peer_id) for other in self._remote()]
        return actions

    def shutdown(self, reason: str = "server shutting down") -> list[Action]:
        """Everyone hears every other leave first (the server flushes these before closing), then all are gone."""
        everyone = list(self.peers.values())
        actions: list[Action] = [Send(peer.id, other.id) for peer in everyone if peer.remote
                                 for other in everyone if other is not peer]
        for peer in everyone:
            self.peers.pop(peer.id)
            self.counter += 1
            self.ids.release(peer.id, self.counter, peer.uid)
            if peer.remote:
                self.slots.give(peer.uid)
            actions.append(Gone(peer, reason))
        return actions

    def _remote(self, but: Peer | None = None) -> list[Peer]:
        return [peer for peer in self.peers.values() if peer.cred is not None and peer is not but]

    def _oldest_join(self) -> int | None:
        """The oldest remote peer's join; the supervisor's own peer never trips over a reused id. The table is in
        join order, so it is the first remote peer's."""
        for peer in self.peers.values():
            if peer.cred is not None:
                return peer.joined
        return None

    def describe_shares(self) -> dict:
        return {"peer_slots": self.slots.describe(), "peer_ids": self.ids.share.describe()}

    # --- plain data, for a successor --------------------------------------------------------------------

    def snapshot(self, encode: Encode = _same) -> dict:
        """The whole state as lists, dicts, ints and strings; `encode` turns each handle and credential into
        plain data (the fds themselves travel separately). Taken between transitions; a reserved join (one waiting
        for its record's fsync) is in it as if cancelled: nobody has heard of it, and its socket is not handed on."""
        peers = [{"id": p.id, "vectors": [encode(v) for v in p.vectors], "joined": p.joined, "uid": p.uid,
                  "cred": None if p.cred is None else encode(p.cred), "announced": p.announced}
                 for p in self.peers.values()]
        ids, slots = self.ids.snapshot(), share_snapshot(self.slots)
        for peer_id, (uid, cred) in self._reserved.items():  # as cancel() of each, in order, leaves them
            ids["departed"].insert(0, [peer_id, -1, None])
            ids["free"] += 1
            _give_back(ids["share"], uid)
            if cred is not None:
                _give_back(slots, uid)
        return {"counter": self.counter, "shm": encode(self.shm), "peers": peers, "ids": ids, "slots": slots}

    @classmethod
    def from_snapshot(cls, data: dict, decode: Encode = _same) -> PeerTable:
        table = cls(decode(data["shm"]), share_from_snapshot(data["slots"]), PeerIds.from_snapshot(data["ids"]))
        table.counter = data["counter"]
        for p in data["peers"]:
            cred = None if p["cred"] is None else decode(p["cred"])
            table.peers[p["id"]] = Peer(p["id"], tuple(decode(v) for v in p["vectors"]), p["joined"], cred,
                                        p["uid"], p["announced"])
        return table


def share_snapshot(share: Share) -> dict:
    return {"name": share.name, "total": share.total, "per_uid": share.per_uid, "reserved": share.reserved,
            "reserved_for": sorted(share.reserved_for), "used": sorted([uid, n] for uid, n in share.used.items())}


def _give_back(share: dict, uid: int) -> None:
    """Share.give(uid) on a share_snapshot."""
    share["used"] = [[holder, count - (holder == uid)] for holder, count in share["used"]
                     if count - (holder == uid) > 0]


def share_from_snapshot(data: dict) -> Share:
    used = Counter({uid: count for uid, count in data["used"]})
    return Share(data["name"], data["total"], data["per_uid"], data["reserved"], frozenset(data["reserved_for"]),
                 used, sum(used.values()))
