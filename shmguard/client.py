"""IvshmemClient: joins an ivshmem server as a peer and checks everything the server sends.

A broken or malicious server ends in one ProtocolError line, never a hang or a traceback. Before reading a
byte, the client checks who answers (SO_PEERCRED): a socket path in /tmp can be bound by any local user while no
supervisor holds it, so only the uids the caller names are believed (by default root alone; the CLI passes
answering_uids(policy): root, the policy's socket owner and the user the supervisor drops to).
"""

from __future__ import annotations

import os
import select
import socket
import stat
import time
from collections.abc import Collection

from .control_client import ROOT_ONLY, untrusted_server  # noqa: F401 - who may answer: one check for both clients
from .errors import ProtocolError
from .limits import MAX_PEER_ID, MAX_VECTORS, MIN_SIZE, valid_peer_id, valid_region_size
from .linux import procfs
from .policy import Policy
from .policy_facts import answerers
from .protocol import PROTOCOL_VERSION, REFUSED_VERSION, SHM_MESSAGE, recv_message, ring_eventfd


def answering_uids(policy: Policy) -> frozenset[int]:
    """The uids that may serve this policy's sockets: root, the sockets' owner, and hardening.user when set
    (a socket the guard rebinds after the supervisor dropped to that user is that user's)."""
    return answerers(policy.server.owner, policy.hardening.user)


def _readable(fds: list[int], timeout: float | None) -> list[int]:
    """The fds that are readable (or hung up) within timeout seconds; poll(), as select() stops at fd 1023."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(None if timeout is None else timeout * 1000)]


def _is_eventfd(fd: int) -> bool:
    return procfs.fd_target(fd) == "anon_inode:[eventfd]"


class IvshmemClient:
    """A peer: its own id and vectors, the shared memory fd, and the other peers' vectors."""

    def __init__(self, path: str, *, vectors: int | None = None, timeout: float = 5.0,
                 answerers: Collection[int] = ROOT_ONLY):
        self.path, self.expected_vectors, self.timeout = path, vectors, timeout
        self.answerers = frozenset(answerers)  # the uids believed as the server (SO_PEERCRED), checked first
        self.sock: socket.socket | None = None
        self.own_id: int | None = None
        self.shm_fd: int | None = None
        self.shm_size = 0
        self.own_vectors: list[int] = []
        self.peers: dict[int, list[int]] = {}
        self._deadline: float | None = None  # the whole greeting must arrive by then
        self._received = 0  # messages received, to tell a refusal from a greeting cut short
        self._joined = False

    # --- joining ---------------------------------------------------------------------------------------

    def connect(self) -> IvshmemClient:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(self.timeout)
        self._deadline = time.monotonic() + self.timeout
        try:
            self._connect_retrying()
            if (why := untrusted_server(self.sock, self.path, self.answerers)) is not None:
                raise ProtocolError(why)
            self._read_greeting()
            self._deadline, self._joined = None, True
            self.sock.settimeout(self.timeout)
        except TimeoutError:
            self.close()
            raise ProtocolError(f"{self.path}: no complete greeting within {self.timeout:g} s") from None
        except OSError as exc:
            self.close()
            raise ProtocolError(f"{self.path}: cannot join: {exc.strerror or exc}") from None
        except ProtocolError:
            self.close()
            raise
        return self

    def _connect_retrying(self) -> None:
        """A full listen backlog answers EAGAIN at once on UNIX sockets: retry until the timeout."""
        while True:
            try:
                self.sock.connect(self.path)
                return
            except BlockingIOError:
                if time.monotonic() > self._deadline:
                    raise TimeoutError from None
                time.sleep(0.01)

    def _next(self) -> tuple[int, int | None]:
        message = recv_message(self.sock, self._deadline)
        if message is None:
            if self._joined:
                why = "the server stopped"
            elif self._received:
                why = f"in the middle of the greeting, after {self._received} messages"
            else:
                why = "refused: check the policy's peers and the server's log"
            raise ProtocolError(f"{self.path}: the server closed the connection ({why})")
        self._received += 1
        value, fds = message
        if len(fds) > 1:
            for fd in fds:
                os.close(fd)
            raise ProtocolError(f"{self.path}: the server sent {len(fds)} fds with one message (at most 1)")
        return value, (fds[0] if fds else None)

    def _read_greeting(self) -> None:
        version, fd = self._next()
        if version == REFUSED_VERSION and fd is None:  # shmguard's refusal, the word that makes QEMU exit
            raise ProtocolError(f"{self.path}: the server refused this peer (see the server's log for why)")
        self._expect(version == PROTOCOL_VERSION and fd is None, fd,
                     f"protocol version {version} (expected {PROTOCOL_VERSION} with no fd)")
        own_id, fd = self._next()
        self._expect(valid_peer_id(own_id) and fd is None, fd, f"own peer id {own_id} (expected 0..{MAX_PEER_ID})")
        self.own_id = own_id
        marker, fd = self._next()
        self._expect(marker == SHM_MESSAGE and fd is not None, fd,
                     f"message {marker} {'with' if fd is not None else 'without'} an fd where the shared memory "
                     "(-1 with an fd) must come")
        self._adopt_shm(fd)
        while not self._has_all_own_vectors():
            self._handle(*self._next())
        self._drain_ready()

    def _expect(self, ok: bool, fd: int | None, what: str) -> None:
        if not ok:
            if fd is not None:
                os.close(fd)
            raise ProtocolError(f"{self.path}: the server broke the protocol: {what}")

    def _adopt_shm(self, fd: int) -> None:
        st = os.fstat(fd)
        size = st.st_size
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ProtocolError(f"{self.path}: the shared memory fd is not a regular file")
        if not valid_region_size(size):
            os.close(fd)
            raise ProtocolError(f"{self.path}: the shared memory is {size} bytes, not a power of two >= {MIN_SIZE} "
                                "(QEMU would abort on it)")
        self.shm_fd, self.shm_size = fd, size

    def _has_all_own_vectors(self) -> bool:
        """Own vectors come last in a greeting, as many as every other peer has."""
        if not self.own_vectors:
            return False
        if self.expected_vectors is not None:
            return len(self.own_vectors) >= self.expected_vectors
        if self.peers:  # every peer has the server's vector count
            return len(self.own_vectors) >= max(len(fds) for fds in self.peers.values())
        return True  # alone, with no count given: what is already queued is read by _drain_ready

    def _drain_ready(self) -> None:
        """Read whatever the server has already sent, without waiting."""
        while _readable([self.sock.fileno()], 0):
            self._handle(*self._next())

    def _handle(self, value: int, fd: int | None) -> None:
        if value == SHM_MESSAGE or not valid_peer_id(value):
            self._expect(False, fd, f"unexpected message {value} after the greeting's shared memory")
        if fd is None:
            self._peer_left(value)
            return
        if not _is_eventfd(fd):
            self._expect(False, fd, f"the fd for peer {value} is not an eventfd")
        vectors = self.own_vectors if value == self.own_id else self.peers.setdefault(value, [])
        limit = self.expected_vectors or MAX_VECTORS
        if len(vectors) >= limit:
            self._expect(False, fd, f"more than {limit} vectors for peer {value} (too many eventfds)")
        vectors.append(fd)

    def _peer_left(self, peer_id: int) -> None:
        if peer_id == self.own_id:
            raise ProtocolError(f"{self.path}: the server says this peer ({peer_id}) left")
        for fd in self.peers.pop(peer_id, []):
            os.close(fd)

    # --- after joining ---------------------------------------------------------------------------------

    def update(self) -> None:
        """Apply joins and leaves the server has sent since; raises ProtocolError if the server went away."""
        try:
            self._drain_ready()
        except OSError as exc:  # a reset or a timed-out read after the greeting
            raise ProtocolError(f"{self.path}: the connection to the server broke: {exc.strerror or exc}") from None

    def notify(self, peer_id: int, vector: int | None = None) -> int:
        """Ring one vector of a peer, or every vector when vector is None; returns how many were rung."""
        self.update()
        fds = self.own_vectors if peer_id == self.own_id else self.peers.get(peer_id)
        if fds is None:
            raise ProtocolError(f"no peer {peer_id} (peers: {sorted(self.peers) or 'none'})")
        targets = range(len(fds)) if vector is None else [vector]
        for v in targets:
            if not 0 <= v < len(fds):
                raise ProtocolError(f"peer {peer_id} has vectors 0..{len(fds) - 1}, not {v}")
            ring_eventfd(fds[v])
        return len(targets)

    def notify_all(self) -> int:
        self.update()
        return sum(self.notify(peer_id) for peer_id in sorted(self.peers))

    def wait(self, vectors: list[int] | None = None, timeout: float | None = None) -> int | None:
        """Block until one of our vectors is rung; returns that vector, or None on timeout."""
        wanted = list(range(len(self.own_vectors))) if vectors is None else vectors
        for v in wanted:
            if not 0 <= v < len(self.own_vectors):
                raise ProtocolError(f"this peer has vectors 0..{len(self.own_vectors) - 1}, not {v}")
        deadline = None if timeout is None else time.monotonic() + timeout
        by_fd = {self.own_vectors[v]: v for v in wanted}
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = _readable([*by_fd, self.sock.fileno()], left)
            if not ready:
                return None
            for fd in ready:
                if fd == self.sock.fileno():
                    self.update()
                else:
                    os.eventfd_read(fd)
                    return by_fd[fd]

    def describe(self) -> dict:
        return {
            "own_id": self.own_id,
            "own_vectors": len(self.own_vectors),
            "shm_size": self.shm_size,
            "peers": {peer_id: len(fds) for peer_id, fds in sorted(self.peers.items())},
        }

    def close(self) -> None:
        for fd in [*self.own_vectors, *(fd for fds in self.peers.values() for fd in fds)]:
            os.close(fd)
        self.own_vectors, self.peers = [], {}
        if self.shm_fd is not None:
            os.close(self.shm_fd)
            self.shm_fd = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> IvshmemClient:
        return self.connect() if self.sock is None else self

    def __exit__(self, *exc) -> None:
        self.close()
