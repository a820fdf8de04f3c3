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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .audit import executable_of
from .errors import ShmguardError
from .loop import EventLoop
from .policy import ServerPolicy
from .protocol import MAX_PEER_ID, MESSAGE, SharedFd, announcement, greeting, ring_eventfd, send_message

log = logging.getLogger("shmguard.server")
EventSink = Callable[..., None]


SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path), the terminating NUL included
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux; Python 3.11 does not name it
MAX_GROUPS = 65536


@dataclass(frozen=True)
class PeerCred:
    """Who is at the other end of a UNIX socket, as the kernel saw it at connect time."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary groups of the connecting process

    @classmethod
    def of(cls, sock: socket.socket) -> PeerCred:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return cls(pid, uid, gid, peer_groups(sock))

    def exe(self) -> str:
        return executable_of(self.pid)

    def describe(self) -> dict:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "exe": self.exe()}


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """SO_PEERGROUPS: the groups the peer really holds (a sandbox that dropped a group does not have it)."""
    size = 64 * 4
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
            return struct.unpack(f"{len(raw) // 4}I", raw)
        except OSError as exc:
            if exc.errno != errno.ERANGE or size >= MAX_GROUPS * 4:
                raise
            size *= 4


@dataclass(eq=False)
class Peer:
    id: int
    vectors: list[SharedFd]
    joined: int  # the join counter when it joined: it has seen every leave after this
    cred: PeerCred | None = None  # None for the supervisor's own (local) peer
    sock: socket.socket | None = None
    queue: deque[tuple[bytes, SharedFd | None]] = field(default_factory=deque)
    announced: bool = False  # have the other peers been told it joined?

    def describe(self) -> dict:
        who = self.cred.describe() if self.cred else {"local": True}
        return {"id": self.id, "vectors": len(self.vectors), **who}


class PeerIds:
    """Hands out ids 0..65535 in order; a departed id comes back only once no connected peer has seen it leave.

    QEMU frees a departed peer's state and crashes if that id reappears while it remembers the leave
    (REFERENCE §2), so an id is reusable only when every connected peer joined after it left.
    """

    def __init__(self, limit: int = MAX_PEER_ID + 1):
        self.limit, self.next_fresh = limit, 0
        self.departed: deque[tuple[int, int]] = deque()  # (id, leave counter), oldest first

    def allocate(self, oldest_join: int | None) -> int | None:
        if self.next_fresh < self.limit:
            self.next_fresh += 1
            return self.next_fresh - 1
        if self.departed and (oldest_join is None or self.departed[0][1] < oldest_join):
            return self.departed.popleft()[0]
        return None

    def release(self, peer_id: int, counter: int) -> None:
        self.departed.append((peer_id, counter))

    def unused(self, peer_id: int) -> None:
        """Give back an id that was never announced: nobody saw it, so it is free at once."""
        self.departed.appendleft((peer_id, -1))


class IvshmemServer:
    def __init__(self, policy: ServerPolicy, shm_fd: int, loop: EventLoop, on_event: EventSink | None = None,
                 region_intact: Callable[[], bool] = lambda: True):
        self.policy, self.loop = policy, loop
        self.region_intact = region_intact  # checked before a greeting: QEMU aborts on a resized region
        self.shm = SharedFd(os.dup(shm_fd))
        self.on_event = on_event or (lambda action, **fields: None)
        self.peers: dict[int, Peer] = {}
        self.ids = PeerIds()
        self.counter = 0  # counts joins and leaves, to know who has seen which leave
        self.listener: BoundSocket | None = None

    # --- the listening socket -------------------------------------------------------------------------

    def start(self) -> None:
        self.listener = bind_socket(self.policy.socket, self.policy.owner, self.policy.group, self.policy.mode)
        self.loop.add_reader(self.listener.sock.fileno(), self._on_accept)
        log.info("serving %s (vectors=%d, max peers=%d)", self.policy.socket, self.policy.vectors,
                 self.policy.max_peers)

    def rebind(self) -> None:
        """Put the socket back at its path (after it was removed or replaced); connected peers are unaffected."""
        self.listener = self.listener.rebound(self.loop, self._on_accept)

    def _on_accept(self) -> None:
        self.listener.accept_waiting(self._admit, self._on_shed)

    def _on_shed(self) -> None:
        log.warning("out of file descriptors: refused a connection, still serving %d peers", len(self.peers))
        self.on_event("refused", result="refused", detail={"reason": "out of file descriptors"})

    # --- joining and leaving --------------------------------------------------------------------------

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        cred = PeerCred.of(sock)
        reason = self._refusal(cred)
        if reason is None:
            peer_id = self.ids.allocate(self._oldest_join())
            reason = "no peer id is free (every departed id is still remembered by a connected peer)" \
                if peer_id is None else None
        if reason is None:
            try:
                vectors = new_vectors(self.policy.vectors)
            except OSError as exc:
                self.ids.unused(peer_id)
                reason = f"cannot create eventfds: {exc.strerror}"
        if reason is not None:
            log.warning("refused peer pid=%d uid=%d gid=%d: %s", cred.pid, cred.uid, cred.gid, reason)
            self.on_event("refused", result="refused", actor=cred, detail={"reason": reason, "what": "peer"})
            sock.close()
            return
        self._join(Peer(peer_id, vectors, self.counter, cred, sock))

    def _refusal(self, cred: PeerCred) -> str | None:
        if not self.policy.peers.admits(cred.uid, cred.gid, cred.groups):
            return f"uid {cred.uid} is not allowed by the policy"
        if len(self.peers) >= self.policy.max_peers:
            return f"the policy's maximum of {self.policy.max_peers} peers is reached"
        if not self.region_intact():
            return "the region is not its policy size right now (tampered with, being repaired); join again"
        return None

    def _oldest_join(self) -> int | None:
        """The oldest remote peer's join; the supervisor's own peer never trips over a reused id."""
        return min((p.joined for p in self.peers.values() if p.sock is not None), default=None)

    def _join(self, peer: Peer) -> None:
        self.counter += 1
        self.peers[peer.id] = peer
        if peer.cred:
            log.info("peer %d joined: pid=%d uid=%d exe=%s", peer.id, peer.cred.pid, peer.cred.uid, peer.cred.exe())
            self.on_event("peer-join", actor=peer.cred, detail={"peer": peer.id})
        if peer.sock is not None:  # greet first: nothing may reach the newcomer before its greeting
            self.loop.add_reader(peer.sock.fileno(), lambda: self._on_peer_readable(peer))
            others = [(p.id, p.vectors) for p in self.peers.values() if p is not peer]
            self._enqueue(peer, greeting(peer.id, self.shm, others, peer.vectors))
            if self.peers.get(peer.id) is not peer:
                return  # its greeting failed; nobody else ever heard of it
        peer.announced = True
        for other in list(self.peers.values()):
            if other is not peer and self.peers.get(other.id) is other:
                self._enqueue(other, announcement(peer.id, peer.vectors))

    def add_local_peer(self) -> Peer:
        """The supervisor's own peer: it owns eventfds that guests ring, and rings theirs directly."""
        peer_id = self.ids.allocate(self._oldest_join())
        if peer_id is None:
            raise ShmguardError("no peer id is free for the supervisor's own peer")
        peer = Peer(peer_id, new_vectors(self.policy.vectors), self.counter)
        self._join(peer)
        return peer

    def _on_peer_readable(self, peer: Peer) -> None:
        try:
            data = peer.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self.remove_peer(peer, f"socket error: {exc.strerror}")
            return
        self.remove_peer(peer, "sent data (clients never send)" if data else "disconnected")

    def remove_peer(self, peer: Peer, reason: str, announce: bool = True) -> None:
        if self.peers.get(peer.id) is not peer:
            return
        del self.peers[peer.id]
        self.counter += 1
        self.ids.release(peer.id, self.counter)
        if peer.sock is not None:
            self.loop.remove_reader(peer.sock.fileno())
            self.loop.remove_writer(peer.sock.fileno())
            for _, fd in peer.queue:
                if fd is not None:
                    fd.release()
            peer.queue.clear()
            peer.sock.close()
        for fd in peer.vectors:
            fd.release()
        log.info("peer %d left: %s", peer.id, reason)
        self.on_event("peer-leave", actor=peer.cred, detail={"peer": peer.id, "reason": reason})
        if announce and peer.announced:
            for other in list(self.peers.values()):
                self._enqueue(other, [(peer.id, None)])

    # --- sending --------------------------------------------------------------------------------------

    def _enqueue(self, peer: Peer, messages) -> None:
        if peer.sock is None or self.peers.get(peer.id) is not peer:
            return  # the local peer reads nothing from the wire; a removed one reads nothing more
        was_idle = not peer.queue
        for value, fd in messages:
            peer.queue.append((MESSAGE.pack(value), fd.acquire() if fd else None))
        if len(peer.queue) > self.policy.max_queue:
            self.remove_peer(peer, f"send queue passed {self.policy.max_queue} messages (peer is not reading)")
            return
        if was_idle:
            self._flush(peer)

    def _flush(self, peer: Peer) -> None:
        while peer.queue:
            data, fd = peer.queue[0]
            try:
                sent = send_message(peer.sock, data, fd.fd if fd else None)
            except BlockingIOError:
                self.loop.add_writer(peer.sock.fileno(), lambda: self._flush(peer))
                return
            except OSError as exc:  # EPIPE, ECONNRESET: the peer is gone
                self.remove_peer(peer, f"send failed: {exc.strerror}")
                return
            if sent < len(data):  # the fd went with the first byte; the rest goes plain
                peer.queue[0] = (data[sent:], None)
            else:
                peer.queue.popleft()
            if fd is not None and sent > 0:
                fd.release()
        self.loop.remove_writer(peer.sock.fileno())

    # --- ringing --------------------------------------------------------------------------------------

    def ring(self, peer_id: int, vector: int) -> None:
        peer = self.peers.get(peer_id)
        if peer is None:
            raise ShmguardError(f"no peer {peer_id} is connected (connected: {sorted(self.peers) or 'none'})")
        if not 0 <= vector < len(peer.vectors):
            raise ShmguardError(f"peer {peer_id} has vectors 0..{len(peer.vectors) - 1}, not {vector}")
        ring_eventfd(peer.vectors[vector].fd)

    def close(self, linger: float = 1.0) -> None:
        """Orderly shutdown: every peer hears every other leave (waiting up to `linger` s), then the socket goes."""
        everyone = list(self.peers.values())
        for peer in everyone:
            self._enqueue(peer, [(other.id, None) for other in everyone if other is not peer])
        for peer in everyone:
            if peer.sock is not None and peer.queue:
                peer.sock.settimeout(linger)  # a last, bounded, blocking flush
                self._flush(peer)
            self.remove_peer(peer, "server shutting down", announce=False)
        if self.listener is not None:
            self.loop.remove_reader(self.listener.sock.fileno())
            self.listener.remove()
            self.listener = None
        self.shm.release()


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
    reserve_fd: int = field(default_factory=lambda: os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))

    def is_at_path(self) -> bool:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        return stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == (self.device, self.inode)

    def accept_waiting(self, admit: Callable[[socket.socket], None], shed: Callable[[], None]) -> None:
        """Hand every waiting connection to admit(). Out of fds, the waiting one is accepted through the
        reserve fd and closed, then shed() is told: a listener that stays readable would spin the loop."""
        while True:
            try:
                sock, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EINTR):
                    continue
                if exc.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                self._refuse_one()
                shed()
                return
            admit(sock)

    def _refuse_one(self) -> None:
        os.close(self.reserve_fd)
        try:
            self.sock.accept()[0].close()
        except OSError:
            pass
        self.reserve_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)

    def rebound(self, loop: EventLoop, on_accept) -> BoundSocket:
        """A fresh listening socket at the same path, with the same identity, taking over from this one."""
        fresh = bind_socket(self.path, self.owner, self.group, self.mode, replace=True)
        loop.remove_reader(self.sock.fileno())
        loop.add_reader(fresh.sock.fileno(), on_accept)
        self.close()
        return fresh

    def remove(self) -> None:
        """Unlink the path only if it is still ours, never a file someone put there since; then close."""
        if self.is_at_path():
            os.unlink(self.path)
        self.close()

    def close(self) -> None:
        self.sock.close()
        os.close(self.reserve_fd)


def bind_socket(path: str, owner: int, group: int, mode: int, replace: bool = False) -> BoundSocket:
    """Bind a listening socket that appears at `path` only once its owner, group and mode are final."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
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
        os.chown(staging, owner, group, follow_symlinks=False)
        os.chmod(staging, mode)  # our own fresh socket file in a directory we checked
        sock.listen(socket.SOMAXCONN)
        st = os.lstat(staging)
        os.rename(staging, path)
    except BaseException:
        sock.close()
        _unlink_if_socket(staging)
        raise
    return BoundSocket(sock, path, owner, group, mode, st.st_dev, st.st_ino)


def check_stale_socket(path: str) -> None:
    """Refuse anything at `path` but a socket that nobody answers on (which is removed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ShmguardError(f"{path}: exists and is not a socket; refusing to replace it (remove it yourself)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:  # only this means nobody listens; EAGAIN is a server with a full backlog
        os.unlink(path)
        log.info("removed stale socket %s", path)
        return
    except OSError as exc:
        raise ShmguardError(f"{path}: cannot tell whether a server listens there ({exc.strerror or exc}); "
                            "stop it or remove the socket yourself") from None
    finally:
        probe.close()
    raise ShmguardError(f"{path}: another server is listening there; stop it or choose another --socket")


def _unlink_if_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
