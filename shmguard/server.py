"""IvshmemServer: the ivshmem server protocol over a UNIX socket, safe against QEMU's known crashes.

One selectors loop drives it. Each peer has its own send queue, so a greeting is never truncated and a
slow peer delays nobody; a peer whose queue passes the policy's bound is disconnected.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import socket
import stat
import struct
import time
from collections import Counter, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from .audit import Actor
from .errors import ShmguardError
from .limits import PEER_IDS
from .linux import procfs
from .linux.files import reopen
from .linux.sockets import PeerCred, accept_nonblocking
from .loop import EventLoop
from .paths import file_kind, make_directory, trusted_owners
from .peers import Action, Gone, Peer, PeerIds, PeerTable, Send
from .policy import ServerPolicy, SharesPolicy
from .protocol import MESSAGE, REFUSED_VERSION, SharedFd, ring_eventfd
from .shares import Share

log = logging.getLogger("shmguard.server")
EventSink = Callable[..., "dict | None"]  # on_event(action, *, sync, **fields): the record written, if any
# when_durable(seq, done, failed): done() once audit record seq is on disk, or failed(why) (Recorder.when_durable)
WhenDurable = Callable[[int, Callable[[], None], Callable[[str], None]], None]


SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path), the terminating NUL included


class Connection:
    """A remote peer's socket and its send queue: bytes and fds the table's sends left to go. (A plain class with
    slots: one is made per join.)"""

    __slots__ = ("peer_id", "sock", "actor", "queue", "writing")

    def __init__(self, peer_id: int, sock: socket.socket, actor: Actor | None = None):
        self.peer_id, self.sock = peer_id, sock
        self.actor = actor  # who it is in the audit log, named once when it connected
        self.queue: deque[tuple[bytes, SharedFd | None]] = deque()
        self.writing = False  # is the loop watching the socket for room (a flush stopped at EAGAIN)?


ACCEPT_BATCH = 64  # connections accepted before they are admitted; the listener stays readable for the rest
COALESCE = 64  # plain words (no fd) that go out in one send
_FD = struct.Struct("i")  # an fd in SCM_RIGHTS
_NOSIGNAL = socket.MSG_NOSIGNAL  # a peer gone is EPIPE, not a SIGPIPE to ignore


@dataclass(eq=False)
class HeldJoin:
    """A join recorded but not yet known to be on disk: its id, slot and eventfds are taken, nobody has heard of it
    (its socket is not even watched), and it is greeted once its record is durable, or refused if it never is."""

    sock: socket.socket
    cred: PeerCred
    actor: Actor
    vectors: list[SharedFd]
    seq: int


def actor_of(cred: PeerCred) -> Actor:
    """The audit record's actor for a peer named once (PeerCred.named): its records never ask /proc again."""
    return Actor(cred.pid, cred.uid, cred.gid, cred.exe())


class PeerLog:
    """The log's lines about joins, leaves and refusals: of each kind at most BURST a PERIOD at their level, the
    rest at DEBUG, counted and summed up in one INFO line with the first event of the next period. Each one is in
    the audit log anyway: a peer that joins in a loop must not cost a log line (and the journal's disk) per join,
    nor hide the first refusals of the next kind."""

    BURST, PERIOD = 20, 60.0

    def __init__(self, logger: logging.Logger):
        self.log, self.since = logger, time.monotonic()
        self.said: Counter[str] = Counter()
        self.held: Counter[str] = Counter()

    def say(self, kind: str, level: int, message: str, *args) -> None:
        now = time.monotonic()
        if now - self.since >= self.PERIOD:
            self.flush()
            self.said.clear()
            self.since = now
        said = self.said.get(kind, 0)
        if said < self.BURST:
            self.said[kind] = said + 1
            self.log.log(level, message, *args)
        else:
            self.held[kind] += 1
            if self.log.isEnabledFor(logging.DEBUG):  # past the burst, a join costs no formatting at all
                self.log.debug(message, *args)

    def flush(self) -> None:
        if self.held:
            counts = ", ".join(f"{count} {kind}" for kind, count in sorted(self.held.items()))
            self.log.info("%s in the last %.0f s not logged one by one (at most %d of each a minute; each is in "
                          "the audit log)", counts, time.monotonic() - self.since, self.BURST)
            self.held.clear()


class IvshmemServer:
    """The sockets of the ivshmem protocol: it asks the PeerTable what each join and leave sends, and sends it."""

    def __init__(self, policy: ServerPolicy, shm_fd: int, loop: EventLoop, on_event: EventSink | None = None,
                 region_intact: Callable[[], bool] = lambda: True, shares: SharesPolicy | None = None,
                 owners: Collection[int] = ()):
        self.policy, self.loop = policy, loop
        self.owners = tuple(owners)  # who else may own the socket's directory (paths.policy_owners)
        self.region_intact = region_intact  # checked before a greeting: QEMU aborts on a resized region
        # The peers' own open file description: flags a peer sets on it (O_APPEND) never reach our I/O.
        self.shm = SharedFd(reopen(shm_fd))
        self.on_event = on_event or (lambda action, **fields: None)
        # Group commit (set by the supervisor): a join's greeting waits here until its record is on disk, and
        # records of what has happened (leaves, refusals) go unsynced into the turn's one fsync. None: every record
        # is durable on return, and a join is greeted at once.
        self.when_durable: WhenDurable | None = None
        self._held: dict[int, HeldJoin] = {}  # joins waiting for their record's fsync, by id, in order
        self._admitting: int | None = None  # the join being admitted (greeted at once if its record is durable)
        shares = shares or SharesPolicy()
        reserved = frozenset(shares.reserved_for)
        slots = Share("peer slots", policy.max_peers, shares.peers_per_uid,
                      min(shares.peers_reserved, policy.max_peers - 1), reserved)
        ids = PeerIds(share=Share("peer ids", PEER_IDS, shares.ids_per_uid, shares.ids_reserved, reserved))
        self.table = PeerTable(self.shm, slots, ids)
        self.connections: dict[int, Connection] = {}  # remote peers by id
        self.listener: BoundSocket | None = None
        self._unsent: dict[Connection, None] = {}  # connections with messages queued and not yet flushed, in order
        self._settling = False
        # Told of every peer's fds as it joins (names as in snapshot) and of their names as it leaves: the fd store.
        self.on_fds: Callable[[dict[str, int], list[str]], None] | None = None
        self.peer_log = PeerLog(log)

    @property
    def peers(self) -> dict[int, Peer]:
        return self.table.peers

    # --- the listening socket -------------------------------------------------------------------------

    def start(self) -> None:
        self.listener = bind_socket(self.policy.socket, self.policy.owner, self.policy.group, self.policy.mode,
                                    allowed_owners=self.owners)
        self.loop.add_reader(self.listener.sock.fileno(), self._on_accept)
        log.info("serving %s (vectors=%d, max peers=%d)", self.policy.socket, self.policy.vectors,
                 self.policy.max_peers)

    def rebind(self) -> None:
        """Put the socket back at its path (after it was removed or replaced); connected peers are unaffected."""
        self.listener = self.listener.rebound(self.loop, self._on_accept, self._admit, self._on_shed)

    def _on_accept(self) -> None:
        self.listener.accept_waiting(self._admit, self._on_shed)

    def _on_shed(self) -> None:
        self.peer_log.say("refusals", logging.WARNING, "out of file descriptors: refused a connection, still "
                          "serving %d peers", len(self.peers))
        self._record("refused", result="refused", detail={"reason": "out of file descriptors"})

    # --- joining and leaving --------------------------------------------------------------------------

    def _admit(self, sock: socket.socket) -> None:
        """A join is complete (recorded, greeted, announced) or not visible to anyone: each step that can fail
        comes before the first one anybody sees, and a refusal gives back everything taken. With group commit the
        greeting (and with it the region's fd) waits for the join's record to be on disk: the loop goes on serving
        meanwhile, and the turn's one fsync releases every join it recorded."""
        # Named from /proc once: every record and line of it says the same. Its groups are asked for only where
        # they decide (a policy that admits it by uid or gid never looks at them); the socket is non-blocking from
        # accept4 on.
        cred = PeerCred.of(sock, named=True, groups=False)
        if not self.policy.peers.admits(cred.uid, cred.gid):
            cred = cred.with_groups(sock)
        actor = actor_of(cred)
        peer_id = None
        reason = self._refusal(cred)
        if reason is None:
            peer_id, reason = self.table.reserve(cred.uid, cred)
        if reason is None:
            try:
                vectors = new_vectors(self.policy.vectors)
            except OSError as exc:
                reason = f"cannot create eventfds: {exc.strerror}"
        if reason is None:
            try:  # recorded before anyone hears of it: an audit log that cannot take it refuses the join
                record = self.on_event("peer-join", actor=actor, detail={"peer": peer_id},
                                       sync=self.when_durable is None)
            except ShmguardError as exc:
                reason = f"the join cannot be recorded ({exc})"
                release_all(vectors)
        if reason is not None:
            if peer_id is not None:
                self.table.cancel(peer_id)
            self._refuse(sock, cred, reason, actor)
            return
        seq = record["seq"] if record else 0
        self._held[peer_id] = HeldJoin(sock, cred, actor, vectors, seq)
        if self.when_durable is None or not seq:
            self._greet(peer_id)
            return
        self._admitting = peer_id
        try:
            self.when_durable(seq, lambda: self._greet(peer_id), lambda why: self._not_durable(peer_id, why))
        finally:
            self._admitting = None

    def _greet(self, peer_id: int) -> None:
        """The join's record is on disk: greet, then announce. A join that waited for the fsync looks at the region
        again first: a greeting never carries a region that is not its policy size (QEMU aborts on one)."""
        if peer_id != self._admitting and not self.region_intact():
            self._cancel_held(peer_id, "the region is not its policy size right now (tampered with, being "
                                       "repaired); join again")
            return
        held = self._held.pop(peer_id)
        self.peer_log.say("joins", logging.INFO, "peer %d joined: pid=%d uid=%d exe=%s", peer_id, held.cred.pid,
                          held.cred.uid, held.actor.exe)
        self._join(peer_id, held.vectors, held.sock, held.actor)

    def _not_durable(self, peer_id: int, why: str) -> None:
        """The fsync that was to put the join's record on disk failed: the peer is refused, nobody heard of it."""
        self._cancel_held(peer_id, f"its join record (seq {self._held[peer_id].seq}) could not be made durable: "
                                   f"{why}")

    def _cancel_held(self, peer_id: int, reason: str) -> None:
        held = self._held.pop(peer_id)
        self.table.cancel(peer_id)
        release_all(held.vectors)
        self._refuse(held.sock, held.cred, reason, held.actor)

    def _refuse(self, sock: socket.socket, cred: PeerCred, reason: str, actor: Actor) -> None:
        """A refused QEMU must fail, not spin: it reads its greeting synchronously and loops forever on EOF, but
        exits at once on a version other than 0 (docs/protocol.md §2)."""
        self.peer_log.say("refusals", logging.WARNING, "refused peer pid=%d uid=%d gid=%d: %s", cred.pid, cred.uid,
                          cred.gid, reason)
        # Recorded before the peer hears of it: whoever sees the refusal finds it in the log.
        self._record("refused", result="refused", actor=actor, detail={"reason": reason, "what": "peer"})
        try:
            sock.send(MESSAGE.pack(REFUSED_VERSION))  # 8 bytes into an empty socket buffer: never partial
        except OSError:
            pass  # it is gone already
        sock.close()

    def _refusal(self, cred: PeerCred) -> str | None:
        if not self.policy.peers.admits(cred.uid, cred.gid, cred.groups):
            return f"uid {cred.uid} is not allowed by the policy"
        if not self.region_intact():
            return "the region is not its policy size right now (tampered with, being repaired); join again"
        return None

    def _join(self, peer_id: int, vectors: list[SharedFd], sock: socket.socket | None,
              actor: Actor | None = None) -> None:
        """Greet the newcomer first and flush it at once (nothing may reach it before its greeting), then announce
        it to the others; a newcomer gone before its greeting went out leaves unannounced: nobody hears of it."""
        greeting_sends = self.table.join(peer_id, tuple(vectors))
        if sock is not None:
            connection = self.connections[peer_id] = Connection(peer_id, sock, actor)
            self.loop.add_reader(sock.fileno(), lambda: self._on_peer_readable(connection))
            self._carry_out(greeting_sends)
            del self._unsent[connection]
            if (error := self._flush(connection)) is not None:
                self._leave(peer_id, f"gone before its greeting was sent: {error}")
                return
        self._carry_out(self.table.announce(peer_id))
        if self.on_fds is not None:  # only under the fd store: a join without it does no extra work
            self.on_fds(self.peer_fds(peer_id), [])
        self._settle()

    def peer_fds(self, peer_id: int) -> dict[str, int]:
        """A peer's fds under their hand-over names: its socket (remote peers) and its eventfds."""
        fds = {f"peer-{peer_id}-v{k}": handle.fd for k, handle in enumerate(self.peers[peer_id].vectors)}
        if peer_id in self.connections:
            fds[f"peer-{peer_id}"] = self.connections[peer_id].sock.fileno()
        return fds

    def add_local_peer(self) -> Peer:
        """The supervisor's own peer: it owns eventfds that guests ring, and rings theirs directly."""
        peer_id, reason = self.table.reserve(0, None)
        if peer_id is None:
            raise ShmguardError(f"no peer id is free for the supervisor's own peer: {reason}")
        try:
            vectors = new_vectors(self.policy.vectors)
        except OSError:
            self.table.cancel(peer_id)
            raise
        self._join(peer_id, vectors, None)
        return self.peers[peer_id]

    def _on_peer_readable(self, connection: Connection) -> None:
        try:
            data = connection.sock.recv(1)  # any byte at all means it leaves: one is enough to know
        except BlockingIOError:
            return
        except OSError as exc:
            self._leave(connection.peer_id, f"socket error: {exc.strerror}")
            return
        self._leave(connection.peer_id, "sent data (clients never send)" if data else "disconnected")

    def leave(self, peer_id: int, reason: str) -> None:
        """A peer the supervisor sends away (one whose fds a crash lost): as if it had disconnected."""
        self._leave(peer_id, reason)

    def _leave(self, peer_id: int, reason: str) -> None:
        """A leave cannot be refused: it completes whatever fails, and an audit log that cannot take its record
        is the supervisor's to report (see Supervisor.record)."""
        self._carry_out(self.table.leave(peer_id, reason))
        self._settle()

    def _record(self, action: str, **fields) -> None:
        """Records that cannot veto what they record (a leave, a refusal): a failing log must not stop them. Under
        group commit nothing waits for them: they are written at once and made durable by the turn's fsync."""
        try:
            self.on_event(action, sync=self.when_durable is None, **fields)
        except ShmguardError:
            pass  # the sink has said so once already

    # --- carrying out what the table says -------------------------------------------------------------

    def _carry_out(self, actions: list[Action]) -> None:
        """Queue each send on its connection and close each connection gone; sending is _settle's."""
        connections, unsent, pack = self.connections, self._unsent, MESSAGE.pack
        for action in actions:
            if type(action) is Send:
                connection = connections[action.to]
                fd = action.fd
                connection.queue.append((pack(action.value), None if fd is None else fd.acquire()))
                unsent[connection] = None
            else:
                self._close_gone(action.peer, action.reason)

    def _close_gone(self, peer: Peer, reason: str) -> None:
        connection = self.connections.pop(peer.id, None)
        actor = None
        if connection is not None:
            actor = connection.actor
            self._unsent.pop(connection, None)
            self.loop.remove_reader(connection.sock.fileno())
            if connection.writing:
                self.loop.remove_writer(connection.sock.fileno())
            release_all(fd for _, fd in connection.queue if fd is not None)
            connection.queue.clear()
            connection.sock.close()
        release_all(peer.vectors)
        if self.on_fds is not None:
            self.on_fds({}, [f"peer-{peer.id}", *(f"peer-{peer.id}-v{k}" for k in range(len(peer.vectors)))])
        self.peer_log.say("leaves", logging.INFO, "peer %d left: %s", peer.id, reason)
        if actor is None and peer.cred is not None:  # a peer handed over without its connection's record
            actor = actor_of(peer.cred)
        self._record("peer-leave", actor=actor, detail={"peer": peer.id, "reason": reason})

    def _settle(self) -> None:
        """Send what the transitions queued. A peer whose send fails or whose queue passes its bound leaves, and
        its leave is a transition of its own, settled by this same loop: no send ever runs inside another's."""
        if self._settling:
            return
        self._settling = True
        try:
            while self._unsent:
                connection = next(iter(self._unsent))
                del self._unsent[connection]
                if len(connection.queue) > self.policy.max_queue:
                    reason = f"send queue passed {self.policy.max_queue} messages (peer is not reading)"
                    self._carry_out(self.table.leave(connection.peer_id, reason))
                elif (error := self._flush(connection)) is not None:
                    self._carry_out(self.table.leave(connection.peer_id, f"send failed: {error}"))
        finally:
            self._settling = False

    def _on_writable(self, connection: Connection) -> None:
        self._unsent[connection] = None
        self._settle()

    def _flush(self, connection: Connection) -> str | None:
        """Send as much of the queue as the socket takes; why it failed (EPIPE, ECONNRESET: gone), or None."""
        sock, queue = connection.sock, connection.queue
        while queue:
            data, fd = queue[0]
            words = 1
            try:
                if fd is not None:  # an fd travels with its own word's first byte, never with another's bytes
                    sent = sock.sendmsg((data,), ((socket.SOL_SOCKET, socket.SCM_RIGHTS, _FD.pack(fd.fd)),), _NOSIGNAL)
                else:  # plain words in a row go out in one send
                    limit = min(len(queue), COALESCE)
                    while words < limit and queue[words][1] is None:
                        words += 1
                    if words > 1:
                        data = b"".join([queue[n][0] for n in range(words)])
                    sent = sock.send(data, _NOSIGNAL)
            except BlockingIOError:
                if not connection.writing:
                    connection.writing = True
                    self.loop.add_writer(sock.fileno(), lambda: self._on_writable(connection))
                return None
            except OSError as exc:
                return exc.strerror or str(exc)
            if fd is not None and sent > 0:
                fd.release()
            if words > 1:
                for _ in range(words):
                    queue.popleft()
                if sent < len(data):
                    queue.appendleft((data[sent:], None))
            elif sent < len(data):  # the fd went with the first byte; the rest goes plain
                queue[0] = (data[sent:], None)
            else:
                queue.popleft()
        if connection.writing:
            connection.writing = False
            self.loop.remove_writer(sock.fileno())
        return None

    # --- ringing --------------------------------------------------------------------------------------

    def ring(self, peer_id: int, vector: int) -> None:
        peer = self.peers.get(peer_id)
        if peer is None:
            raise ShmguardError(f"no peer {peer_id} is connected (connected: {sorted(self.peers) or 'none'})")
        if not 0 <= vector < len(peer.vectors):
            raise ShmguardError(f"peer {peer_id} has vectors 0..{len(peer.vectors) - 1}, not {vector}")
        ring_eventfd(peer.vectors[vector].fd)

    def describe_shares(self) -> dict:
        return self.table.describe_shares()

    # --- hand-over ------------------------------------------------------------------------------------

    def snapshot(self, fds: dict[str, int]) -> dict:
        """Plain data for a successor (taken between transitions); the fds it names are added to `fds`."""
        names: dict[int, str] = {id(self.shm): "shm"}
        for peer in self.peers.values():
            for vector, handle in enumerate(peer.vectors):
                names[id(handle)] = name = f"peer-{peer.id}-v{vector}"
                fds[name] = handle.fd
        connections = {}
        for peer_id, connection in self.connections.items():
            fds[f"peer-{peer_id}"] = connection.sock.fileno()
            queue = []
            for index, (data, handle) in enumerate(connection.queue):
                if handle is not None and id(handle) not in names:  # a leaver's fd still to be sent
                    names[id(handle)] = f"peer-{peer_id}-q{index}"
                    fds[names[id(handle)]] = handle.fd
                queue.append([data.hex(), None if handle is None else names[id(handle)]])
            connections[str(peer_id)] = queue
        return {"table": self.table.snapshot(lambda h: _encode_handle(h, names)), "connections": connections,
                "listener": self.listener.snapshot(fds, "ivshmem-listener")}

    def adopt(self, state: dict, fd: Callable[[str], int]) -> None:
        """Instead of start(): serve the same peers on the same sockets as the predecessor whose snapshot this is.
        `fd(name)` gives an inherited fd. Shares keep who holds what, under this policy's bounds."""
        handles: dict[str, SharedFd] = {"shm": self.shm}

        def decode(value):
            if isinstance(value, list):
                return PeerCred(value[0], value[1], value[2], tuple(value[3]), *value[4:5])
            if value not in handles:
                handles[value] = SharedFd(fd(value))
            return handles[value]

        fresh = self.table
        self.table = PeerTable.from_snapshot(state["table"], decode)
        self.table.slots = adopt_share(fresh.slots, self.table.slots)
        self.table.ids.share = adopt_share(fresh.ids.share, self.table.ids.share)
        for key, queue in state["connections"].items():
            peer_id = int(key)
            sock = socket.socket(fileno=fd(f"peer-{peer_id}"))
            sock.setblocking(False)
            connection = self.connections[peer_id] = Connection(peer_id, sock)
            for data, name in queue:
                connection.queue.append((bytes.fromhex(data), None if name is None else decode(name).acquire()))
            self.loop.add_reader(sock.fileno(), lambda c=connection: self._on_peer_readable(c))
            if connection.queue:
                self._unsent[connection] = None
        in_table = {id(handle) for peer in self.peers.values() for handle in peer.vectors}
        for name, handle in handles.items():  # decode's holder is the table's; a queue-only fd is the queue's alone
            if name != "shm" and id(handle) not in in_table:
                handle.release()
        self.listener = BoundSocket.adopt(state["listener"], fd("ivshmem-listener"))
        self.loop.add_reader(self.listener.sock.fileno(), self._on_accept)
        self._settle()

    def local_peer(self) -> Peer:
        """The supervisor's own peer, as a successor finds it in the table."""
        return next(peer for peer in self.peers.values() if not peer.remote)

    def close(self, linger: float = 1.0) -> None:
        """Orderly shutdown: every peer hears every other leave (waiting up to `linger` s), then the socket goes.
        A join still waiting for its record's fsync (the loop's last flush releases them first) is refused."""
        for peer_id in list(self._held):
            self._cancel_held(peer_id, "the server is shutting down")
        actions = self.table.shutdown()
        self._carry_out([action for action in actions if isinstance(action, Send)])
        self._unsent.clear()
        for connection in self.connections.values():
            if connection.queue:
                connection.sock.settimeout(linger)  # a last, bounded, blocking flush
                self._flush(connection)
        self._carry_out([action for action in actions if isinstance(action, Gone)])
        if self.listener is not None:
            self.loop.remove_reader(self.listener.sock.fileno())
            self.listener.remove()
            self.listener = None
        self.shm.release()


def _encode_handle(handle, names: dict[int, str]):
    if isinstance(handle, PeerCred):
        return [handle.pid, handle.uid, handle.gid, list(handle.groups), handle.executable]
    return names[id(handle)]


def adopt_share(fresh: Share, held: Share) -> Share:
    """This policy's bounds (`fresh`) with what the predecessor's holders hold (`held`): a smaller bound refuses
    the next taker, never takes from a holder."""
    fresh.used, fresh.in_use = held.used, held.in_use
    return fresh


def release_all(fds) -> None:
    for fd in fds:
        fd.release()


def new_vectors(count: int) -> list[SharedFd]:
    vectors: list[SharedFd] = []
    try:
        for _ in range(count):
            vectors.append(SharedFd(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)))
    except OSError:
        for fd in vectors:
            fd.release()
        raise
    return vectors


@dataclass
class BoundSocket:
    """A listening socket and the identity of the file it is bound to (the guard compares them)."""

    sock: socket.socket
    path: str
    owner: int
    group: int
    mode: int
    device: int
    inode: int
    allowed_owners: tuple[int, ...] = ()  # who else may own its directory (the policy's owners), for a rebind
    reserve_fd: int = field(default_factory=lambda: os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))

    def snapshot(self, fds: dict[str, int], name: str) -> dict:
        fds[name] = self.sock.fileno()
        return {"path": self.path, "owner": self.owner, "group": self.group, "mode": self.mode,
                "device": self.device, "inode": self.inode, "allowed_owners": list(self.allowed_owners)}

    @classmethod
    def adopt(cls, state: dict, fd: int) -> BoundSocket:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        return cls(sock, state["path"], state["owner"], state["group"], state["mode"], state["device"],
                   state["inode"], tuple(state["allowed_owners"]))

    def is_at_path(self) -> bool:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        return stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == (self.device, self.inode)

    def accept_waiting(self, admit: Callable[[socket.socket], None], shed: Callable[[], None]) -> bool:
        """Accept what is waiting (up to ACCEPT_BATCH), then hand each to admit(): admitting may repair and rebind
        this very socket, so it never runs inside the accept loop. Out of fds, the waiting one is accepted through
        the reserve fd and closed, then shed() is told: a listener that stays readable would spin the loop.
        Returns True when the batch was full (more may be waiting)."""
        accepted: list[socket.socket] = []
        out_of_fds = False
        while len(accepted) < ACCEPT_BATCH:
            try:
                if (sock := accept_nonblocking(self.sock)) is None:
                    break  # nobody else is waiting
                accepted.append(sock)
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EINTR):
                    continue
                if exc.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                if not accepted:  # with some accepted, admitting them frees fds; the next wake-up sheds if need be
                    self._refuse_one()
                    out_of_fds = True
                break
        for sock in accepted:
            admit(sock)
        if out_of_fds:
            shed()
        return len(accepted) == ACCEPT_BATCH

    def _refuse_one(self) -> None:
        os.close(self.reserve_fd)
        try:
            self.sock.accept()[0].close()
        except OSError:
            pass
        self.reserve_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)

    def rebound(self, loop: EventLoop, on_accept: Callable[[], None], admit: Callable[[socket.socket], None],
                shed: Callable[[], None]) -> BoundSocket:
        """A fresh listening socket at the same path, with the same identity, taking over from this one. What is
        still waiting in this one's backlog is admitted first: closing it would drop those connections."""
        fresh = bind_socket(self.path, self.owner, self.group, self.mode, replace=True,
                            allowed_owners=self.allowed_owners)
        loop.remove_reader(self.sock.fileno())
        loop.add_reader(fresh.sock.fileno(), on_accept)
        while self.accept_waiting(admit, shed):
            pass
        self.close()
        return fresh

    def remove(self) -> None:
        """Unlink the path only if it is still ours, never a file someone put there since; then close."""
        if self.is_at_path():
            try:
                os.unlink(self.path)
            except OSError as exc:  # a directory only root may write, after a drop to the policy's user
                log.warning("%s: cannot remove the socket (%s); the next start removes it", self.path, exc.strerror)
        self.close()

    def close(self) -> None:
        self.sock.close()
        os.close(self.reserve_fd)


SOCKET_DIRECTORY_MODE = 0o755  # a socket directory shmguard creates (/run/shmguard): searchable, ours alone to write


def bind_socket(path: str, owner: int, group: int, mode: int, replace: bool = False,
                allowed_owners: tuple[int, ...] = ()) -> BoundSocket:
    """Bind a listening socket that appears at `path` only once its owner, group and mode are final.

    Its directory must be one only root, the uid we run as, the socket's owner or `allowed_owners` can change
    (created 0755 if missing, like /run/shmguard); anything else is refused in one line (shmguard/paths.py)."""
    directory = os.path.dirname(path) or "."
    make_directory(directory, SOCKET_DIRECTORY_MODE, trusted_owners(owner, *allowed_owners))
    if not replace:
        check_stale_socket(path)
    staging = f"{path}.{secrets.token_hex(4)}"  # unpredictable: nobody can squat it in /tmp beforehand
    if len(os.fsencode(staging)) >= SUN_PATH_MAX:
        raise ShmguardError(f"{path}: too long for a UNIX socket ({len(os.fsencode(path))} bytes; at most "
                            f"{SUN_PATH_MAX - 10}, leaving room for the staging name): choose a shorter path")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    old_umask = os.umask(0o777)  # the staging socket is born mode 0000: never more open than the policy
    try:
        _unlink_if_socket(staging)
        sock.bind(staging)
    except OSError as exc:
        sock.close()
        raise ShmguardError(f"{path}: cannot create the socket: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    try:
        st = claim_bound_socket(staging, owner, group, mode)
        sock.listen(socket.SOMAXCONN)
        try:
            os.rename(staging, path)
        except OSError as exc:
            raise ShmguardError(f"{path}: cannot put the socket in place: {exc.strerror}") from None
        if not _is_inode(path, st):
            raise ShmguardError(f"{path}: the socket was replaced while it was put in place; refusing the path "
                                "(someone who may write its directory is at work: check it)")
    except BaseException:
        sock.close()
        _unlink_if_socket(staging)
        raise
    return BoundSocket(sock, path, owner, group, mode, st.st_dev, st.st_ino, allowed_owners=tuple(allowed_owners))


def claim_bound_socket(staging: str, owner: int, group: int, mode: int) -> os.stat_result:
    """Give the socket just bound at `staging` its owner, group and mode, never following a link.

    The path is opened O_PATH|O_NOFOLLOW (a symlink swapped in is opened as itself) and the inode is checked to be
    the one bind() made: a socket of ours, mode 0 as born under umask 0777. chown and chmod then go through
    /proc/self/fd/N, which is that inode whatever the path holds by then (there is no fchmod on an O_PATH fd)."""
    try:
        fd = os.open(staging, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ShmguardError(f"{staging}: cannot open the socket just bound: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        born = stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0
        if not born:
            raise ShmguardError(
                f"{staging}: is not the socket just bound (a {file_kind(st.st_mode)} of uid {st.st_uid}, mode "
                f"{stat.S_IMODE(st.st_mode):04o}): something replaced it; refusing to chown or chmod it")
        inode = procfs.fd_path(fd)
        os.chown(inode, owner, group)
        os.chmod(inode, mode)
        return os.fstat(fd)
    finally:
        os.close(fd)


def _is_inode(path: str, st: os.stat_result) -> bool:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def check_stale_socket(path: str) -> None:
    """Refuse anything at `path` but a socket that nobody answers on (which is removed). Follows no symlink:
    the probe connects through an O_PATH fd of the very socket file that was looked at."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)  # never blocks, never opens a device
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ShmguardError(f"{path}: cannot inspect what is there ({exc.strerror}); remove it yourself") from None
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode):
            raise ShmguardError(f"{path}: exists and is not a socket (a {file_kind(st.st_mode)}); refusing to "
                                "replace it (remove it yourself)")
        probe.settimeout(1.0)
        probe.connect(procfs.fd_path(fd))
    except ConnectionRefusedError:  # only this means nobody listens; EAGAIN is a server with a full backlog
        # Unlinked only if still the file probed: in a sticky directory only its owner could swap it meanwhile.
        if _is_inode(path, st):
            os.unlink(path)
            log.info("removed stale socket %s", path)
        return
    except OSError as exc:
        raise ShmguardError(f"{path}: cannot tell whether a server listens there ({exc.strerror or exc}); "
                            "stop it or remove the socket yourself") from None
    finally:
        probe.close()
        os.close(fd)
    raise ShmguardError(f"{path}: another server is listening there; stop it or choose another --socket")


def _unlink_if_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
