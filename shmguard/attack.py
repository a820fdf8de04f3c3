"""The attack battery: real tampering by real uids against a running supervisor, and what came of it.

Each attack runs in a child process that has really dropped to its uid (root, a member of the policy's group,
an outsider) and does what an attacker would: real commands (truncate, dd, chmod, rm, mv, ln) or real syscalls.
With a sealed memfd (no path) the region attacks go through /proc/<supervisor pid>/fd/<n>. Before each attack a
known message is written through the control socket; afterwards the battery checks the region's size, the
message byte for byte, owner/group/mode, the path, the incident in the audit log, that new peers are still
served and, when QEMU is attached, that it still runs.

An attack succeeded when the attacker got further than the policy allows: a change nobody put back or recorded,
or an access that should have been refused. `exit_status` is then non-zero.

The adversaries (`Attack.judge`) act within what the policy admits: a peer that changes the flags of the file
descriptions it was handed, a join the policy refuses, a member that takes every peer slot or control
connection it can, a hole punched through a peer's own fd. The battery then does what reveals the harm (a write,
a ring, a repair, root's own request) while the attacker still holds what it took, and judges the promised
behaviour; `withstood` is what it observes when the supervisor was not turned.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import fcntl
import json
import os
import pickle
import pwd
import secrets
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .client import IvshmemClient
from .control import request
from .errors import ShmguardError
from .hardening import capability_names, read_proc_status
from .launcher import SupervisorProcess
from .policy import Policy, load_policy, relocated_policy_text
from .protocol import PROTOCOL_VERSION, recv_message

ROLES = ("root", "member", "outsider")
MEMBER_USER = "shmguard-member"
OUTSIDER_USER = "nobody"
OUTCOMES = {"repair": "repaired", "alert": "alerted", "block": "blocked"}
REFUSALS = ("blocked", "refused")
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x1, 0x2
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x1, 0x2, 0x4, 0x10, 0x20
ATTACK_TIMEOUT = 60.0
ATTRIBUTION_GRACE = 0.025
ANSWER_SECONDS = 3.0  # while an adversary holds its ground, the supervisor still answers within this
REPAIR_SECONDS = 2.0  # a tamper the guard must see is put back (and recorded) within this
REFUSAL_NOTICE = -1  # the first word a refused peer receives: QEMU exits "server sent version -1, expecting 0"
EVENTFD_FULL = 0xFFFFFFFFFFFFFFFE  # the largest counter an eventfd holds: one more ring would block
PREALLOCATION = 1 << 20  # bytes allocated past the end (FALLOC_FL_KEEP_SIZE), so st_blocks never drops
MAX_LISTED_INCIDENTS = 20
ADVERSARY_SECONDS = 20.0  # an adversary that takes slots gives up after this, whatever the server does
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.setfsgid.argtypes = [ctypes.c_uint]
_ERRNO_TEXTS = sorted(((os.strerror(number), name) for number, name in errno.errorcode.items()),
                      key=lambda item: -len(item[0]))


# ---------------------------------------------------------------------------------------------------- who attacks


@dataclass(frozen=True)
class Identity:
    """A uid an attack really drops to, with its primary and supplementary groups."""

    role: str
    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    fs_group: int | None = None  # a group held only as the fsgid: the kernel's file checks see it, SO_PEERCRED not

    @classmethod
    def of(cls, role: str, user: str, extra_groups: tuple[int, ...] = ()) -> Identity:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise ShmguardError(f"user {user!r} for the {role} attacks does not exist (scripts/bootstrap "
                                "creates shmguard-member)") from None
        groups = tuple(sorted(set(os.getgrouplist(user, entry.pw_gid)) | set(extra_groups)))
        return cls(role, user, entry.pw_uid, entry.pw_gid, groups)

    @property
    def label(self) -> str:
        return "root" if self.role == "root" else f"{self.role} ({self.user})"

    def may(self, st: os.stat_result, want: int) -> bool:
        """DAC as the kernel applies it (ACLs aside): owner bits, else group bits, else other bits."""
        if self.uid == 0:
            return True
        mode = stat.S_IMODE(st.st_mode)
        if self.uid == st.st_uid:
            bits = mode >> 6
        elif st.st_gid in self.groups or st.st_gid == self.fs_group:
            bits = mode >> 3
        else:
            bits = mode
        return bits & want == want

    def may_reach(self, path: str) -> bool:
        """Search permission on every directory above path."""
        parent = os.path.dirname(os.path.abspath(path))
        while True:
            if not self.may(os.stat(parent), 1):
                return False
            if parent == "/":
                return True
            parent = os.path.dirname(parent)

    def may_unlink(self, path: str) -> bool:
        """Write+search on the directory, and the sticky-bit rule (owner of the file or of the directory)."""
        directory = os.stat(os.path.dirname(path))
        entry = os.lstat(path)
        if self.uid == 0:
            return True
        if not self.may_reach(path) or not self.may(directory, 3):
            return False
        return not directory.st_mode & stat.S_ISVTX or self.uid in (entry.st_uid, directory.st_uid)


# ---------------------------------------------------------------------------------------------------- the scene


@dataclass(frozen=True)
class Scene:
    """What an attack needs to know, handed to the child that runs it."""

    region: str  # the file, or /proc/<supervisor pid>/fd/<n> of the memfd
    memfd: bool
    size: int
    socket: str
    control: str
    message: bytes
    token: str  # every file an attack creates has it in its name, so the battery can clear up
    scratch: str  # a sticky directory any uid may write (decoys)
    near: str  # a sticky directory on the region's filesystem (hard links, rename-over)
    identity: Identity
    peer_slots: int = 64  # server.max_peers: how many joins it takes to be refused
    control_slots: int = 64  # shares.connections: how many control connections there are in all

    def name(self, suffix: str, directory: str | None = None) -> str:
        return os.path.join(directory or self.near, f"shmguard-attack-{self.token}-{suffix}")


@dataclass
class Done:
    """What the attacking syscall or command did, as the child saw it."""

    ok: bool
    error: str | None  # the errno name (EPERM, EACCES, ...) or the refusal in words
    pid: int  # the process that made the attacking syscall: fanotify should name it
    returned_ns: int  # CLOCK_MONOTONIC (system-wide) just after it returned
    syscall_ms: float
    facts: dict = field(default_factory=dict)  # what an adversary learnt (its peer id, what a refusal said)


_held: list = []  # in the child: what must outlive the attack until the parent has looked (fds, zombies)


def syscalls(*steps: Callable[[], object]) -> Done:
    """Run steps in order; the last one is the attack and is timed; any OSError ends it as a refusal."""
    for step in steps[:-1]:
        try:
            _held.append(step())
        except OSError as exc:
            return Done(False, _errno_name(exc), os.getpid(), time.monotonic_ns(), 0.0)
    started = time.monotonic_ns()
    try:
        _held.append(steps[-1]())
        error = None
    except OSError as exc:
        error = _errno_name(exc)
    except ShmguardError as exc:
        error = _refusal_in_words(str(exc))
    returned = time.monotonic_ns()
    return Done(error is None, error, os.getpid(), returned, (returned - started) / 1e6)


def command(argv: list[str]) -> Done:
    """Run a real command; its zombie is kept (waitid WNOWAIT) so that its uid stays visible in /proc."""
    started = time.monotonic_ns()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               cwd="/")
    stderr = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    status = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
    returned = time.monotonic_ns()
    _held.append(process)
    ok = status.si_status == 0 and status.si_code == os.CLD_EXITED
    return Done(ok, None if ok else _errno_from_text(stderr), process.pid, returned, (returned - started) / 1e6)


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno, str(exc)) if exc.errno else str(exc)


def _refusal_in_words(text: str) -> str:
    """A client error as an errno name where it carries one (EACCES on connect), else the server's refusal."""
    name = _errno_from_text(text)
    return "refused by the server" if name == text.strip().splitlines()[-1] and "refused" in text else name


def _errno_from_text(text: str) -> str:
    for message, name in _ERRNO_TEXTS:
        if message in text:
            return name
    return text.strip().splitlines()[-1] if text.strip() else "failed"


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def acl_granting(uid: int) -> bytes:
    """system.posix_acl_access (version 2) that gives uid read and write, with the mode bits unchanged."""
    everyone = 0xFFFFFFFF
    entries = [(ACL_USER_OBJ, 6, everyone), (ACL_USER, 6, uid), (ACL_GROUP_OBJ, 6, everyone),
               (ACL_MASK, 6, everyone), (ACL_OTHER, 0, everyone)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


# ---------------------------------------------------------------------------------------------------- attacks


def _ftruncate_held(scene: Scene) -> Done:
    fd: list[int] = []
    return syscalls(lambda: fd.append(os.open(scene.region, os.O_RDWR)), lambda: os.ftruncate(fd[0], 0))


def _seed_dd(scene: Scene) -> Done:
    message = scene.name("msg", scene.scratch)
    with open(message, "wb") as f:  # printf "%s" "$message" > /tmp/msg, as the seed's script does
        f.write(scene.message)
    return command(["dd", f"if={message}", f"of={scene.region}", f"bs={scene.size}", "count=1"])


def _chgrp(scene: Scene) -> Done:
    group = 65534 if scene.identity.uid == 0 else scene.identity.gid  # root: nogroup; others: their own
    return command(["chgrp", str(group), scene.region])


def _mv_away(scene: Scene) -> Done:
    return command(["mv", "-f", scene.region, scene.name("moved", scene.scratch if scene.memfd else None)])


def _symlink_replace(scene: Scene) -> Done:
    decoy = scene.name("decoy", scene.scratch)
    with open(decoy, "wb") as f:
        f.write(b"not the region\n")
    return command(["ln", "-sfn", decoy, scene.region])


def _replace_socket(scene: Scene) -> Done:
    """Remove the socket and listen at its path instead: a man in the middle for the next peer."""
    impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    _held.append(impostor)

    def take_over() -> None:
        os.unlink(scene.socket)
        impostor.bind(scene.socket)
        impostor.listen(1)

    return syscalls(take_over)


def _connect(scene: Scene) -> Done:
    def join() -> None:
        IvshmemClient(scene.socket, timeout=5.0).connect().close()

    return syscalls(join)


def _open_for_write(scene: Scene) -> Done:
    return syscalls(lambda: os.open(scene.region, os.O_WRONLY | os.O_CLOEXEC))


def _hardlink_truncate(scene: Scene) -> Done:
    link, fd = scene.name("link"), []
    return syscalls(lambda: os.link(scene.region, link), lambda: fd.append(os.open(link, os.O_RDWR)),
                    lambda: os.ftruncate(fd[0], 0))


def _rename_over(scene: Scene) -> Done:
    decoy = scene.name("decoy")

    def make_decoy() -> None:
        fd = os.open(decoy, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
        os.ftruncate(fd, scene.size)  # the same size as the region: a size check alone would not notice
        os.close(fd)

    return syscalls(make_decoy, lambda: os.rename(decoy, scene.region))


def _acl_grant(scene: Scene) -> Done:
    nobody = pwd.getpwnam(OUTSIDER_USER).pw_uid
    return syscalls(lambda: os.setxattr(scene.region, "system.posix_acl_access", acl_granting(nobody)))


def _punch_hole(scene: Scene) -> Done:
    fd: list[int] = []
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    return syscalls(lambda: fd.append(os.open(scene.region, os.O_RDWR)),
                    lambda: _fallocate(fd[0], mode, 0, min(scene.size, 65536)))


def _shrink_regrow(scene: Scene) -> Done:
    fd: list[int] = []

    def shrink_and_regrow() -> None:
        os.ftruncate(fd[0], 0)
        os.ftruncate(fd[0], scene.size)  # back to the right size at once: only st_blocks still tells

    return syscalls(lambda: fd.append(os.open(scene.region, os.O_RDWR)), shrink_and_regrow)


def _burst(scene: Scene) -> Done:
    fd: list[int] = []

    def hundred() -> None:
        for n in range(100):
            os.ftruncate(fd[0], (n % 4) * scene.size // 4)

    return syscalls(lambda: fd.append(os.open(scene.region, os.O_RDWR)), hundred)


def _truncate_during_writes(scene: Scene) -> Done:
    """Truncations racing audited writes: a write copied into a mapping would SIGBUS the supervisor."""
    fd: list[int] = []
    body = {"op": "write", "data": base64.b64encode(scene.message).decode(), "text": True, "offset": 0}

    def writes() -> None:
        for _ in range(20):
            try:
                request(scene.control, body, timeout=10)
            except (ShmguardError, OSError):
                pass  # a write refused while the region is truncated is the right answer

    def race() -> None:
        writer = threading.Thread(target=writes)
        writer.start()
        for n in range(200):
            os.ftruncate(fd[0], 0 if n % 2 == 0 else scene.size // 2)
        writer.join()

    return syscalls(lambda: fd.append(os.open(scene.region, os.O_RDWR)), race)


# ---------------------------------------------------------------------------------------------------- adversaries
# A peer or member acting within what the policy admits. The action runs in the child (which stays alive, holding
# what it took); the judge runs in the battery as root while it does, and returns (problems, the message the
# region must now hold); the undo puts back what the attack left in the supervisor's own descriptions.


Verdict = tuple[list[str], bytes]  # what went wrong, and the message the region must hold now


def _as_peer(scene: Scene, act: Callable[[IvshmemClient], dict]) -> Done:
    """Join as a peer (a refusal is the result), then act on what the greeting handed over."""
    started = time.monotonic_ns()
    try:
        client = IvshmemClient(scene.socket, timeout=5.0).connect()
    except ShmguardError as exc:
        return Done(False, _refusal_in_words(str(exc)), os.getpid(), time.monotonic_ns(), 0.0)
    _held.append(client)
    facts, error = {"peer": client.own_id}, None
    try:
        facts.update(act(client))
    except OSError as exc:
        error = _errno_name(exc)
    returned = time.monotonic_ns()
    return Done(error is None, error, os.getpid(), returned, (returned - started) / 1e6, facts)


def _drain_eventfd(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def _peer_sets_append(scene: Scene) -> Done:
    def act(client: IvshmemClient) -> dict:
        fcntl.fcntl(client.shm_fd, fcntl.F_SETFL, fcntl.fcntl(client.shm_fd, fcntl.F_GETFL) | os.O_APPEND)
        return {}

    return _as_peer(scene, act)


def _peer_blocks_eventfds(scene: Scene) -> Done:
    def act(client: IvshmemClient) -> dict:
        host = next(iter(client.peers))  # the supervisor's own peer joined first: the first id in the greeting
        for fd in client.peers[host]:
            _drain_eventfd(fd)  # while it is still non-blocking
            os.set_blocking(fd, True)
        for fd in client.own_vectors:
            _drain_eventfd(fd)
            os.eventfd_write(fd, EVENTFD_FULL)
            os.set_blocking(fd, True)
        return {"host": host}

    return _as_peer(scene, act)


def _peer_punches_hole(scene: Scene, preallocate: bool) -> Done:
    def act(client: IvshmemClient) -> dict:
        if preallocate:  # pages past the end keep st_blocks up; a sealed memfd refuses them (EPERM)
            _fallocate(client.shm_fd, FALLOC_FL_KEEP_SIZE, scene.size, PREALLOCATION)
        _fallocate(client.shm_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, min(scene.size, 65536))
        return {}

    return _as_peer(scene, act)


def _raw_join(path: str) -> tuple[socket.socket, int | None]:
    """Connect to the ivshmem socket and read the first word (None: closed without one); fds are dropped."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(5.0)
        sock.connect(path)
        message = recv_message(sock, time.monotonic() + 5.0)
    except BaseException:
        sock.close()
        raise
    if message is None:
        return sock, None
    for fd in message[1]:
        os.close(fd)
    return sock, message[0]


def _closed_after(sock: socket.socket, seconds: float) -> bool:
    """Does EOF (and nothing else) follow within seconds?"""
    try:
        return recv_message(sock, time.monotonic() + seconds) is None
    except (OSError, TimeoutError):
        return False


def _discard_pending(sock: socket.socket) -> None:
    """Read what the server sent a held peer (announcements), closing the fds: it never reaches its bound."""
    while True:
        try:
            data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(64 * 4), socket.MSG_DONTWAIT)
        except OSError:
            return
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in struct.unpack(f"{len(payload) // 4}i", payload[:len(payload) - len(payload) % 4]):
                    os.close(fd)
        if not data:
            return


def _take_peer_slots(scene: Scene) -> Done:
    """Join again and again, holding every peer slot it gets, until a join is refused; say how it was refused."""
    started, held, refusal, give_up = time.monotonic_ns(), [], None, time.monotonic() + ADVERSARY_SECONDS
    for _ in range(scene.peer_slots + 2):
        if time.monotonic() > give_up:
            refusal = {"error": f"still joining after {ADVERSARY_SECONDS:g} s"}
            break
        try:
            sock, first = _raw_join(scene.socket)
        except (OSError, TimeoutError) as exc:
            refusal = {"error": _errno_name(exc) if isinstance(exc, OSError) else "timed out"}
            break
        if first == PROTOCOL_VERSION:
            sock.setblocking(False)  # a socket with a timeout would wait for data before each MSG_DONTWAIT read
            held.append(sock)
            for peer in held:
                _discard_pending(peer)
            continue
        refusal = {"first": first, "then_eof": first is not None and _closed_after(sock, ANSWER_SECONDS)}
        sock.close()
        break
    _held.extend(held)
    returned = time.monotonic_ns()
    facts = {"joined": len(held), "refusal": refusal}
    if held:
        error = None
    elif refusal and "error" in refusal:
        error = refusal["error"]
    else:
        error = "refused by the server" if refusal and refusal["first"] == REFUSAL_NOTICE else \
            f"closed by the server after {'no word' if not refusal or refusal['first'] is None else refusal['first']}"
    return Done(bool(held), error, os.getpid(), returned, (returned - started) / 1e6, facts)


def _unread_bytes(sock: socket.socket) -> int:
    """Bytes sent on a UNIX socket that the other end has not read yet (SIOCOUTQ)."""
    count = struct.pack("i", 0)
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, count))[0]


def _answered_or_closed(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def _take_control_connections(scene: Scene) -> Done:
    """Open every control connection it can, each with a request begun and never finished, and hold them."""
    started, opened, give_up = time.monotonic_ns(), [], time.monotonic() + ADVERSARY_SECONDS
    for _ in range(scene.control_slots + 4):
        if time.monotonic() > give_up:
            break
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(5.0)
        try:
            sock.connect(scene.control)
            sock.send(b"{")
        except OSError as exc:
            sock.close()
            if not opened:
                return Done(False, _errno_name(exc), os.getpid(), time.monotonic_ns(), 0.0)
            break
        opened.append(sock)
    deadline = time.monotonic() + ANSWER_SECONDS  # until the server has taken up or turned away every one
    while time.monotonic() < deadline and any(_unread_bytes(s) and not _answered_or_closed(s) for s in opened):
        time.sleep(0.01)
    turned_away = [s for s in opened if _answered_or_closed(s)]
    held = [s for s in opened if s not in turned_away and not _unread_bytes(s)]
    _held.extend(opened)
    threading.Thread(target=_keep_alive, args=(held,), daemon=True).start()
    returned = time.monotonic_ns()
    facts = {"opened": len(opened), "held": len(held), "turned_away": len(turned_away),
             "waiting": len(opened) - len(held) - len(turned_away)}
    return Done(True, None, os.getpid(), returned, (returned - started) / 1e6, facts)


def _keep_alive(held: list[socket.socket]) -> None:
    """A byte every few seconds: a connection that sends is never idle."""
    while True:
        time.sleep(2.0)
        for sock in held:
            try:
                sock.send(b" ")
            except OSError:
                pass


def _judge_append(battery: Battery, scene: Scene, done: Done, offset: int, expected: str) -> Verdict:
    if not done.ok:
        return [], scene.message
    message = scene.message + b" (written after the peer set O_APPEND)"
    problems = battery._ask_write(message)
    if not battery.memfd:
        os.truncate(battery.region, battery.size // 2)  # the guard's repair must land in place too
    return problems + battery._eventually(lambda: battery._region_problems(message), REPAIR_SECONDS), message


def _undo_append(battery: Battery, scene: Scene, done: Done) -> None:
    """Today the observer's fd is the supervisor's own description: clearing O_APPEND there stops the loop."""
    fd = battery.observer.shm_fd
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_APPEND)
    battery._eventually(lambda: [] if os.fstat(fd).st_size == battery.size else ["resized"], REPAIR_SECONDS)


def _judge_eventfds(battery: Battery, scene: Scene, done: Done, offset: int, expected: str) -> Verdict:
    if not done.ok:
        return [], scene.message
    peer, problems = done.facts["peer"], []
    if battery._ask({"op": "ring", "target": f"{peer}:0"}) is None:
        problems.append(f"no answer within {ANSWER_SECONDS:g} s to a ring of peer {peer}, whose eventfds it made "
                        "blocking and full (the supervisor blocks in eventfd_write)")
    status = battery._ask({"op": "status"})
    if status is None or not status.get("ok"):
        problems.append(f"status not answered within {ANSWER_SECONDS:g} s after peer {peer} made the host's "
                        "eventfds blocking and drained them and its own blocking and full")
    return problems, scene.message


def _undo_eventfds(battery: Battery, scene: Scene, done: Done) -> None:
    """Through the observer's copies (the same descriptions): non-blocking again, and the full counter drained,
    which also frees a supervisor stuck in eventfd_write."""
    if not done.facts:
        return
    try:
        battery.observer.update()
    except ShmguardError:
        pass
    for fd in battery.observer.peers.get(done.facts.get("host"), []):
        os.set_blocking(fd, False)
    for fd in battery.observer.peers.get(done.facts.get("peer"), []):
        os.set_blocking(fd, False)
        _drain_eventfd(fd)


def _judge_refusal(battery: Battery, scene: Scene, done: Done, offset: int, expected: str) -> Verdict:
    refusal = done.facts.get("refusal")
    if not done.facts or (refusal and "error" in refusal and not done.facts.get("joined")):
        return [f"the attack did not reach the server's refusal ({done.error})"], scene.message
    problems = []
    if refusal is None:
        problems.append(f"{done.facts['joined']} joins and none refused")
    elif "error" in refusal:
        problems.append(f"join {done.facts['joined'] + 1} failed with {refusal['error']}, not a refusal")
    elif refusal["first"] != REFUSAL_NOTICE:
        said = "nothing" if refusal["first"] is None else f"the word {refusal['first']}"
        problems.append(f"a refused join received {said} before EOF, not the version {REFUSAL_NOTICE} notice "
                        "(QEMU spins in device realize)")
    elif not refusal["then_eof"]:
        problems.append(f"the version {REFUSAL_NOTICE} notice was not followed by EOF")
    if refusal is not None and "error" not in refusal:
        records = [r for r in battery._records_since(offset) if r.get("action") == "refused"
                   and (r.get("actor") or {}).get("uid") == scene.identity.uid
                   and (r.get("detail") or {}).get("reason")]
        if not records:
            problems.append(f"no refusal of uid {scene.identity.uid} with its reason in the audit log")
    return problems, scene.message


def _judge_peer_slots(battery: Battery, scene: Scene, done: Done, offset: int, expected: str) -> Verdict:
    if not done.ok:
        return [], scene.message
    shares, joined, problems = battery.policy.shares, done.facts["joined"], []
    if scene.identity.uid not in shares.reserved_for and joined > shares.peers_per_uid:
        problems.append(f"uid {scene.identity.uid} took {joined} peer slots (shares.peers_per_uid: "
                        f"{shares.peers_per_uid})")
    try:
        IvshmemClient(battery.policy.server.socket, timeout=ANSWER_SECONDS).connect().close()
    except ShmguardError as exc:
        problems.append(f"a root peer cannot join while uid {scene.identity.uid} holds {joined} slots: {exc}")
    return problems, scene.message


def _judge_control_connections(battery: Battery, scene: Scene, done: Done, offset: int, expected: str) -> Verdict:
    if not done.ok:
        return [], scene.message
    shares, facts, problems = battery.policy.shares, done.facts, []
    if scene.identity.uid not in shares.reserved_for and facts["held"] > shares.connections_per_uid:
        problems.append(f"uid {scene.identity.uid} holds {facts['held']} control connections "
                        f"(shares.connections_per_uid: {shares.connections_per_uid})")
    status = battery._ask({"op": "status"})
    if status is None or not status.get("ok"):
        why = "no answer" if status is None else status.get("error")
        problems.append(f"root's status failed while uid {scene.identity.uid} holds {facts['held']} control "
                        f"connections: {why}")
    return problems, scene.message


def _judge_hole(battery: Battery, scene: Scene, done: Done, offset: int, expected: str) -> Verdict:
    if not done.ok:
        return [], scene.message

    def unrepaired() -> list[str]:
        holes = [r for r in battery._incidents_since(offset) if r["detail"].get("kind") == "hole"]
        problems = [] if holes else ["no \"hole\" incident in the audit log"]
        return problems + (battery._region_problems(scene.message) if expected == "repaired" else [])

    return battery._eventually(unrepaired, REPAIR_SECONDS), scene.message


def _undo_hole(battery: Battery, scene: Scene, done: Done) -> None:
    """The message back (an alerting policy does not put it back) and no pages left past the end."""
    if not done.ok:
        return
    battery._ask_write(scene.message)
    if not battery.memfd:
        try:
            _fallocate(battery.observer.shm_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, battery.size,
                       PREALLOCATION)
        except OSError:
            pass


Judge = Callable[["Battery", Scene, Done, int, str], Verdict]  # (battery, scene, done, audit offset, expected)


@dataclass(frozen=True)
class Attack:
    name: str
    description: str
    kind: str  # resize | hole | attributes | path | socket | socket-attributes | connect | open
    needs: str  # the permission the kernel checks first (see Battery.permitted)
    action: Callable[[Scene], Done]
    roles: tuple[str, ...] = ROLES
    extra: bool = False  # beyond the listed attacks: what a demanding attacker also tries
    legit: bool = False  # an access the policy allows to whoever the kernel lets through
    group_only: bool = False  # the outsider holds the socket's group as a supplementary group only
    fs_group_only: bool = False  # the socket's group as the fsgid only: past the socket's mode, not the policy
    judge: Judge | None = None  # an adversary inside the policy: what the battery checks while it holds its ground
    undo: Callable[[Battery, Scene, Done], None] | None = None  # puts back what it left in the supervisor's own fds

    @property
    def adversary(self) -> bool:
        return self.judge is not None


ATTACKS: tuple[Attack, ...] = (
    Attack("truncate-zero", "truncate -s 0", "resize", "write",
           lambda s: command(["truncate", "-s", "0", s.region])),
    Attack("truncate-half", "truncate -s SIZE/2", "resize", "write",
           lambda s: command(["truncate", "-s", str(s.size // 2), s.region])),
    Attack("grow-double", "truncate -s SIZE*2", "resize", "write",
           lambda s: command(["truncate", "-s", str(s.size * 2), s.region])),
    Attack("echo-redirect", "echo hello > REGION", "resize", "write",
           lambda s: command(["sh", "-c", 'echo hello > "$1"', "sh", s.region])),
    Attack("seed-dd", "write_shared_memory.sh: dd if=msg of=REGION bs=SIZE count=1", "resize", "write", _seed_dd),
    Attack("ftruncate-held-fd", "ftruncate(0) through an fd opened earlier", "resize", "write", _ftruncate_held),
    Attack("chmod-0666", "chmod 0666", "attributes", "own",
           lambda s: command(["chmod", "0666", s.region])),
    Attack("chgrp", "chgrp to another group", "attributes", "chgrp", _chgrp),
    Attack("chown", "chown nobody", "attributes", "root", lambda s: command(["chown", OUTSIDER_USER, s.region])),
    Attack("rm", "rm -f REGION", "path", "unlink", lambda s: command(["rm", "-f", s.region])),
    Attack("mv-away", "mv REGION elsewhere", "path", "unlink", _mv_away),
    Attack("symlink-replace", "ln -sfn decoy REGION", "path", "unlink", _symlink_replace),
    Attack("socket-remove", "rm -f the ivshmem socket", "socket", "unlink-socket",
           lambda s: command(["rm", "-f", s.socket])),
    Attack("socket-replace", "replace the ivshmem socket with a listener of one's own", "socket",
           "unlink-socket", _replace_socket),
    Attack("control-socket-remove", "rm -f the control socket", "socket", "unlink-control",
           lambda s: command(["rm", "-f", s.control])),
    Attack("connect", "join the ivshmem server as a peer", "connect", "connect", _connect, legit=True),
    Attack("open-for-write", "open(REGION, O_WRONLY)", "open", "write", _open_for_write, legit=True),
    # --- what a demanding attacker tries next ---------------------------------------------------------
    Attack("hardlink-truncate", "ln REGION link; ftruncate(link, 0)", "resize", "link", _hardlink_truncate,
           extra=True),
    Attack("rename-over", "mv a same-size file of one's own over REGION", "path", "unlink", _rename_over,
           extra=True),
    Attack("chmod-setid", "chmod u+s,g+s,+x (executable, set-id)", "attributes", "own",
           lambda s: command(["chmod", "u+s,g+s,+x", s.region]), extra=True),
    Attack("acl-grant", "setfacl -m u:nobody:rw (mode bits unchanged)", "attributes", "own", _acl_grant,
           extra=True),
    Attack("punch-hole", "fallocate PUNCH_HOLE: zeroes without a size change", "hole", "write", _punch_hole,
           extra=True),
    Attack("shrink-regrow", "ftruncate 0 then back to SIZE at once", "resize", "write", _shrink_regrow,
           extra=True),
    Attack("truncate-burst", "100 truncations in a row", "resize", "write", _burst, extra=True),
    Attack("truncate-during-write", "200 truncations racing 20 audited writes", "resize", "write",
           _truncate_during_writes, extra=True),
    Attack("socket-chmod", "chmod 0777 the ivshmem socket", "socket-attributes", "own-socket",
           lambda s: command(["chmod", "0777", s.socket]), extra=True),
    Attack("connect-group-only", "join holding the socket's group only as a supplementary group (a member: admitted)",
           "connect", "connect", _connect, roles=("outsider",), extra=True, legit=True, group_only=True),
    # --- adversaries inside the policy: a peer or member turning what it was given against the supervisor ----
    Attack("peer-append-region", "a peer sets O_APPEND on its region fd; then an audited write and a repair",
           "descriptions", "connect", _peer_sets_append, judge=_judge_append, undo=_undo_append),
    Attack("peer-blocking-eventfds", "a peer makes the host's eventfds blocking and drains them, and its own "
           "blocking and full; then a ring of it and a status", "descriptions", "connect", _peer_blocks_eventfds,
           judge=_judge_eventfds, undo=_undo_eventfds),
    Attack("refused-peer-told", "joins until one is refused (the outsider passes the socket by its fsgid only): "
           "the version -1 notice, EOF, the reason in the log", "refusal", "connect", _take_peer_slots,
           roles=("member", "outsider"), fs_group_only=True, judge=_judge_refusal),
    Attack("peer-slots-hog", "a member holds every peer slot it can get; a root peer still joins", "shares",
           "connect", _take_peer_slots, roles=("member", "outsider"), judge=_judge_peer_slots),
    Attack("control-connections-hog", "a member holds every control connection it can (a byte every 2 s); root's "
           "status still works", "shares", "connect-control", _take_control_connections,
           roles=("member", "outsider"), judge=_judge_control_connections),
    Attack("peer-punch-hole", "a peer punches a hole through its own region fd", "hole", "connect",
           lambda s: _peer_punches_hole(s, preallocate=False), judge=_judge_hole, undo=_undo_hole),
    Attack("peer-preallocated-punch-hole", "a peer allocates past the end (KEEP_SIZE), then punches a hole through "
           "its own fd", "hole-preallocated", "connect", lambda s: _peer_punches_hole(s, preallocate=True),
           judge=_judge_hole, undo=_undo_hole),
)
ATTACKS_BY_NAME = {attack.name: attack for attack in ATTACKS}


# ---------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class AttackResult:
    attack: str
    description: str
    attacker: str
    uid: int
    expected: str  # blocked | refused | repaired | alerted | failed (recorded, not repairable) | allowed
    observed: str  # the same words, or FAILED
    error: str | None  # the kernel's (or server's) refusal
    syscall_ms: float
    repair_ms: float | None  # from the attacking syscall's return to the guard's repair
    incidents: tuple[dict, ...] = ()
    attacker_pid: int = 0
    offender: dict | str | None = None
    problems: tuple[str, ...] = ()
    extra: bool = False
    adversary: bool = False  # acted within what the policy admits (a peer, a member); judged by its own checks
    facts: dict = field(default_factory=dict)  # what an adversary learnt: its peer id, slots held, a refusal

    @property
    def succeeded(self) -> bool:
        """The attacker got further than the policy allows (a "failed" repair that the policy's capabilities
        make unavoidable is expected, recorded and listed, but not counted)."""
        if self.observed == "FAILED" or (self.observed == "failed" and self.expected != "failed"):
            return True
        return self.expected in REFUSALS and self.observed not in REFUSALS

    @property
    def defended(self) -> bool:
        return not self.succeeded

    @property
    def as_expected(self) -> bool:
        return self.observed == self.expected and not self.problems

    @property
    def offender_named(self) -> bool:
        return isinstance(self.offender, dict) and self.offender.get("pid") == self.attacker_pid

    def describe(self) -> dict:
        return {**asdict(self), "incidents": list(self.incidents), "problems": list(self.problems),
                "succeeded": self.succeeded, "as_expected": self.as_expected, "offender_named": self.offender_named}


def format_table(results: list[AttackResult]) -> str:
    header = ("attack", "as", "expected", "observed", "refusal", "attack ms", "repair ms", "offender", "notes")
    rows = [header] + [(
        r.attack, r.attacker, r.expected, r.observed, r.error or "-", f"{r.syscall_ms:.2f}",
        "-" if r.repair_ms is None else f"{r.repair_ms:.2f}",
        "-" if r.offender is None else "named" if r.offender_named else "unknown",
        "; ".join(r.problems) or ("" if r.as_expected else f"expected {r.expected}"),
    ) for r in results]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
             for row in rows]
    failed = sum(r.succeeded for r in results)
    lines.append(f"{len(results)} attacks, {failed} succeeded" + (" (see FAILED above)" if failed else ""))
    return "\n".join(line.rstrip() for line in lines)


def exit_status(results: list[AttackResult]) -> int:
    """Non-zero if any attack succeeded."""
    return 1 if any(result.succeeded for result in results) else 0


# ---------------------------------------------------------------------------------------------------- the battery


class Battery:
    """Runs attacks one at a time against the supervisor serving a policy (a name, a path, or a Policy with
    command-line overrides applied); must run as root."""

    def __init__(self, policy: str | Policy, *, member_user: str = MEMBER_USER, outsider_user: str = OUTSIDER_USER,
                 qemu=None, supervisor: subprocess.Popen | None = None):
        if os.geteuid() != 0:
            raise ShmguardError("the attack battery runs as root: it attacks as root and drops to other uids")
        self.policy: Policy = policy if isinstance(policy, Policy) else load_policy(str(policy))
        self.qemu, self.supervisor = qemu, supervisor
        self.observer = IvshmemClient(self.policy.server.socket, timeout=10.0).connect()
        self.supervisor_pid = _peer_pid(self.observer.sock)
        self.memfd = self.policy.region.backend == "memfd"
        self.region = self._memfd_path() if self.memfd else self.policy.region.path
        self.size = self.policy.region.size
        self.baseline = self._attributes(os.fstat(self.observer.shm_fd))
        self.scratch = tempfile.mkdtemp(prefix="shmguard-attack-")
        os.chmod(self.scratch, 0o1777)  # like /tmp: every uid can leave decoys, nobody can remove another's
        self.near = os.path.dirname(self.region) if not self.memfd else "/dev/shm"
        self.identities = {"root": Identity("root", "root", 0, 0, (0,)),
                           "member": Identity.of("member", member_user),
                           "outsider": Identity.of("outsider", outsider_user)}
        self.count = 0

    def _memfd_path(self) -> str:
        """/proc/<pid>/fd/<n> of the supervisor's memfd: the only way to name a region without a path."""
        wanted = _identity(os.fstat(self.observer.shm_fd))
        directory = f"/proc/{self.supervisor_pid}/fd"
        for name in sorted(os.listdir(directory), key=int):
            try:
                if _identity(os.stat(f"{directory}/{name}")) == wanted:
                    return f"{directory}/{name}"
            except OSError:
                continue
        raise ShmguardError(f"no fd of supervisor {self.supervisor_pid} is the region")

    def _attributes(self, st: os.stat_result) -> tuple[int, int, int]:
        if self.memfd:
            return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)
        region = self.policy.region
        return region.owner, region.group, region.mode

    # --- running ---------------------------------------------------------------------------------------

    def run(self, attack: str | Attack, role: str) -> AttackResult:
        attack = ATTACKS_BY_NAME[attack] if isinstance(attack, str) else attack
        identity = self.identities[role]
        if attack.group_only:
            identity = Identity.of(role, identity.user, (self.policy.server.group,))
        if attack.fs_group_only:
            identity = replace(identity, fs_group=self.policy.server.group)
        expected = self.expected(attack, identity)
        self.count += 1
        message = f"shmguard attack {self.count}: {attack.name} as {role} {secrets.token_hex(8)}".encode()
        self._write(message)
        scene = Scene(self.region, self.memfd, self.size, self.policy.server.socket, self.policy.control.socket,
                      message, secrets.token_hex(6), self.scratch, self.near, identity,
                      self.policy.server.max_peers, self.policy.shares.connections)
        offset = self._audit_size()
        pid, done, release = run_as(identity, attack.action, scene)
        if attack.adversary:
            return self._run_adversary(attack, identity, expected, scene, done, offset, (pid, release))
        try:
            self._settle()
            if done.ok and not attack.legit:
                time.sleep(ATTRIBUTION_GRACE)  # an incident whose offender fanotify has not named yet waits 20 ms
            incidents = self._incidents_since(offset)
            if done.ok and not attack.legit and not incidents:
                incidents = self._await_incidents(offset)
            observed = self._observe(attack, done, incidents)
            if observed in ("alerted", "failed") and observed == expected:
                self._undo(attack)
            problems = self._problems(message)
        finally:
            release_child(pid, release)
            self._clear_up(scene)
        if problems:
            observed = "FAILED"
        return self._result(attack, identity, expected, observed, done, incidents, problems)

    def _run_adversary(self, attack: Attack, identity: Identity, expected: str, scene: Scene, done: Done,
                       offset: int, child: tuple[int, int]) -> AttackResult:
        """Judge while the attacker still holds what it took; undo what it left in the supervisor's own
        descriptions; then, with the attacker gone, the same checks as after every attack."""
        try:
            try:
                problems, message = attack.judge(self, scene, done, offset, expected)
            finally:
                if attack.undo is not None:
                    attack.undo(self, scene, done)
        finally:
            release_child(*child)
            self._clear_up(scene)
        problems = problems + self._problems_after_adversary(message)
        incidents = self._incidents_since(offset)
        observed = "FAILED" if problems else self._observe_adversary(attack, done, incidents)
        if len(incidents) > MAX_LISTED_INCIDENTS:  # a repair that loops records without end: the first tell it
            done.facts["incidents"] = len(incidents)
            incidents = incidents[:MAX_LISTED_INCIDENTS]
        return self._result(attack, identity, expected, observed, done, incidents, problems)

    def _observe_adversary(self, attack: Attack, done: Done, incidents: list[dict]) -> str:
        if not done.ok:
            sealed = self.memfd and attack.kind == "hole-preallocated" and done.error == "EPERM"
            return "blocked" if sealed else "refused"
        if attack.kind.startswith("hole"):
            results = {record["result"] for record in incidents if record["detail"].get("kind") == "hole"}
            return "repaired" if "repaired" in results else "alerted" if "alerted" in results else "FAILED"
        return "withstood"

    def _problems_after_adversary(self, message: bytes) -> list[str]:
        """The supervisor answers again once the attacker is gone (its connections take a moment to close)."""
        if self._eventually(lambda: [] if (self._ask({"op": "status"}) or {}).get("ok") else ["no answer"],
                            ANSWER_SECONDS * 2):
            return [f"the supervisor does not answer status within {ANSWER_SECONDS * 2:g} s after the attack"]
        try:
            self._settle()
            return self._problems(message)
        except ShmguardError as exc:
            return [f"after the attack: {exc}"]

    def run_all(self, attacks: list[str] | None = None, roles: tuple[str, ...] = ROLES,
                extras: bool = True) -> list[AttackResult]:
        chosen = [ATTACKS_BY_NAME[name] for name in attacks] if attacks else \
            [attack for attack in ATTACKS if extras or not attack.extra]
        return [self.run(attack, role) for attack in chosen for role in roles if role in attack.roles]

    def _result(self, attack: Attack, identity: Identity, expected: str, observed: str, done: Done,
                incidents: list[dict], problems: list[str]) -> AttackResult:
        finished = [r["detail"].get("done_ns", 0) for r in incidents if r["result"] in ("repaired", "alerted")]
        repair_ms = max(0.0, (max(finished) - done.returned_ns) / 1e6) if finished else None
        first = incidents[0]["detail"]["offender"] if incidents else None
        summary = tuple({"kind": r["detail"]["kind"], "result": r["result"], "repair_ms": r["detail"]["repair_ms"],
                         "offender": r["detail"]["offender"]} for r in incidents)
        return AttackResult(attack.name, attack.description, identity.label, identity.uid, expected, observed,
                            done.error, round(done.syscall_ms, 3), None if repair_ms is None else round(repair_ms, 3),
                            summary, done.pid, first, tuple(problems), attack.extra, attack.adversary, done.facts)

    # --- what should happen ----------------------------------------------------------------------------

    def expected(self, attack: Attack, identity: Identity) -> str:
        if not self.permitted(attack.needs, identity):
            return "refused"
        if attack.adversary:
            return self._expected_of_adversary(attack, identity)
        if attack.legit:
            return "allowed" if self._admitted(attack, identity) else "refused"
        guard = self.policy.guard
        if attack.kind == "resize":
            return "blocked" if self.memfd else OUTCOMES[guard.on_resize]
        if attack.kind == "hole":  # seals do not stop a punched hole; the guard puts the contents back
            return "alerted" if guard.on_resize == "alert" else "repaired"
        response = {"attributes": guard.on_attributes, "socket-attributes": guard.on_attributes,
                    "path": guard.on_unlink, "socket": guard.on_socket}[attack.kind]
        if attack.needs == "root" and response == "repair" and not self._supervisor_may("chown"):
            return "failed"  # a file given away can only be taken back with CAP_CHOWN
        return OUTCOMES[response]

    def _expected_of_adversary(self, attack: Attack, identity: Identity) -> str:
        if attack.needs == "connect" and not self.policy.server.peers.admits(identity.uid, identity.gid,
                                                                             identity.groups):
            return "refused"  # by the server, with the version -1 notice
        if attack.kind == "hole-preallocated" and self.memfd:
            return "blocked"  # the seals refuse to grow the allocation past the end
        if attack.kind.startswith("hole"):
            return "alerted" if self.policy.guard.on_resize == "alert" else "repaired"
        return "withstood"

    def _supervisor_may(self, capability: str) -> bool:
        return capability in capability_names(read_proc_status(self.supervisor_pid).get("CapEff", "0"))

    def _admitted(self, attack: Attack, identity: Identity) -> bool:
        # The server admits by the groups the process really holds (SO_PEERGROUPS), supplementary ones included.
        return attack.kind != "connect" or self.policy.server.peers.admits(identity.uid, identity.gid,
                                                                           identity.groups)

    def permitted(self, needs: str, who: Identity) -> bool:
        """Would the kernel let `who` try this at all? (A sealed memfd is reachable by root only, through
        /proc/<pid>/fd, which needs ptrace access to the supervisor.)"""
        root = who.uid == 0
        region = os.stat(self.region)
        sockets = {"unlink-socket": self.policy.server.socket, "unlink-control": self.policy.control.socket}
        if needs in sockets:
            return who.may_unlink(sockets[needs])
        if needs in ("connect", "connect-control"):
            path = self.policy.server.socket if needs == "connect" else self.policy.control.socket
            return who.may_reach(path) and who.may(os.stat(path), 2)
        if needs == "own-socket":
            return root or who.uid == os.lstat(self.policy.server.socket).st_uid
        if self.memfd:
            return root and needs in ("write", "own", "chgrp", "root")
        checks = {
            "write": lambda: who.may_reach(self.region) and who.may(region, 2),
            "own": lambda: root or who.uid == region.st_uid,
            "chgrp": lambda: root or who.uid == region.st_uid,
            "root": lambda: root,
            "unlink": lambda: who.may_unlink(self.region),
            # protected_hardlinks: the owner, or whoever may read and write the file
            "link": lambda: root or (who.may_reach(self.region) and (who.uid == region.st_uid or who.may(region, 6))),
        }
        return checks[needs]()

    # --- what did happen -------------------------------------------------------------------------------

    def _observe(self, attack: Attack, done: Done, incidents: list[dict]) -> str:
        results = {record["result"] for record in incidents}
        if attack.legit and done.ok:
            return "allowed"
        if "repaired" in results:
            return "repaired"
        if "alerted" in results:
            return "alerted"
        if "failed" in results:
            return "failed"  # seen and recorded, but the guard could not put it back
        if not done.ok:
            sealed = self.memfd and attack.kind == "resize" and done.error == "EPERM"
            return "blocked" if sealed else "refused"
        return "FAILED"  # the attack did what it wanted and nobody noticed

    def _problems(self, message: bytes) -> list[str]:
        problems = self._region_problems(message) + self._socket_problems()
        if self.qemu is not None and self.qemu.poll() is not None:
            problems.append(f"QEMU exited with status {self.qemu.poll()}")
        elif self.qemu is not None and not self._qemu_connected():
            problems.append("QEMU is no longer a peer")
        if self.supervisor is not None and self.supervisor.poll() is not None:
            problems.append(f"the supervisor exited with status {self.supervisor.poll()}")
        return problems

    def _region_problems(self, message: bytes) -> list[str]:
        st = os.fstat(self.observer.shm_fd)
        problems = []
        if st.st_size != self.size:
            problems.append(f"region is {st.st_size} bytes, not {self.size}")
        content = os.pread(self.observer.shm_fd, len(message) + 1, 0)
        if content != message + b"\0":
            problems.append(f"message changed: {content[:40]!r}")
        found = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
        if found != self.baseline:
            problems.append(f"owner/group/mode are {found[0]}/{found[1]}/0{found[2]:o}, not "
                            f"{self.baseline[0]}/{self.baseline[1]}/0{self.baseline[2]:o}")
        if not self.memfd:
            entry = _lstat(self.region)
            if entry is None or _identity(entry) != _identity(st):
                problems.append(f"{self.region} is no longer the region")
        return problems

    def _socket_problems(self) -> list[str]:
        server = self.policy.server
        problems = []
        for path, mode in ((server.socket, server.mode), (self.policy.control.socket, self.policy.control.mode)):
            entry = _lstat(path)
            if entry is None or not stat.S_ISSOCK(entry.st_mode):
                problems.append(f"{path} is not a socket")
            elif (entry.st_uid, entry.st_gid, stat.S_IMODE(entry.st_mode)) != (server.owner, server.group, mode):
                problems.append(f"{path} has owner/group/mode {entry.st_uid}/{entry.st_gid}/"
                                f"0{stat.S_IMODE(entry.st_mode):o}")
        try:
            IvshmemClient(server.socket, timeout=5.0).connect().close()
        except ShmguardError as exc:
            problems.append(f"a new peer cannot join: {exc}")
        return problems

    def _qemu_connected(self) -> bool:
        peers = self._control({"op": "status"}).get("peers", [])
        return any(peer.get("pid") == self.qemu.pid for peer in peers)

    # --- talking to the supervisor ---------------------------------------------------------------------

    def _control(self, body: dict, attempts: int = 40) -> dict:
        """A control request; retried for a moment while an attacked control socket is being rebound."""
        for attempt in range(attempts):
            try:
                reply = request(self.policy.control.socket, body, timeout=10)
            except ShmguardError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.05)
                continue
            if not reply.get("ok"):
                raise ShmguardError(f"the supervisor refused {body['op']}: {reply.get('error')}")
            return reply
        raise AssertionError("unreachable")

    def _write(self, message: bytes) -> None:
        self._control({"op": "write", "data": base64.b64encode(message).decode(), "text": True, "offset": 0})

    def _ask(self, body: dict, timeout: float = ANSWER_SECONDS) -> dict | None:
        """One request, no retry: its reply (ok or not), or None if none came within timeout."""
        try:
            return request(self.policy.control.socket, body, timeout=timeout)
        except (ShmguardError, ValueError):
            return None

    def _ask_write(self, message: bytes) -> list[str]:
        reply = self._ask({"op": "write", "data": base64.b64encode(message).decode(), "text": True, "offset": 0})
        if reply is None or not reply.get("ok"):
            return [f"an audited write failed: {'no answer' if reply is None else reply.get('error')}"]
        return []

    @staticmethod
    def _eventually(problems: Callable[[], list[str]], seconds: float) -> list[str]:
        """Look until nothing is wrong or the time is up; what was still wrong at the end."""
        deadline = time.monotonic() + seconds
        while True:
            found = problems()
            if not found or time.monotonic() >= deadline:
                return found
            time.sleep(0.02)

    def _records_since(self, offset: int) -> list[dict]:
        with open(self.policy.audit.path, "rb") as log:
            log.seek(offset)
            return [json.loads(line) for line in log.read().splitlines() if line.strip()]

    def _settle(self) -> None:
        """Two round trips through the supervisor's loop: every event the attack caused has been handled."""
        for _ in range(2):
            self._control({"op": "status"})
        self.observer.update()

    def _audit_size(self) -> int:
        return os.path.getsize(self.policy.audit.path)

    def _incidents_since(self, offset: int) -> list[dict]:
        with open(self.policy.audit.path, "rb") as log:
            log.seek(offset)
            lines = log.read().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        return [record for record in records if record.get("action") == "incident"]

    def _await_incidents(self, offset: int, timeout: float = 0.5) -> list[dict]:
        """The guard records an incident at once when fanotify has named the offender, else within 50 ms."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.01)
            incidents = self._incidents_since(offset)
            if incidents:
                return incidents
        return []

    def _undo(self, attack: Attack) -> None:
        """After an attack the policy only alerts on, put things back by hand for the next attack."""
        uid, gid, mode = self.baseline
        target = self.region
        for name in ("system.posix_acl_access", "system.posix_acl_default"):
            try:
                os.removexattr(target, name)
            except OSError:
                pass
        os.chown(target, uid, gid)
        os.chmod(target, mode)
        socket_path = self.policy.server.socket
        if attack.kind == "socket-attributes":
            os.chown(socket_path, self.policy.server.owner, self.policy.server.group)
            os.chmod(socket_path, self.policy.server.mode)
        self._settle()

    def _clear_up(self, scene: Scene) -> None:
        for directory in {self.scratch, self.near, os.path.dirname(self.policy.server.socket)}:
            for entry in os.scandir(directory):
                if scene.token in entry.name:
                    _remove(entry.path)

    def close(self) -> None:
        self.observer.close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> Battery:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _peer_pid(sock: socket.socket) -> int:
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------------- children


def run_as(identity: Identity, action: Callable[[Scene], Done], scene: Scene) -> tuple[int, Done, int]:
    """Fork a child that really drops to identity and attacks; it stays alive (holding its fds, sockets and
    zombies) until release_child(), so that the guard can still see who it was."""
    result_read, result_write = os.pipe()
    release_read, release_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(result_read)
        os.close(release_write)
        _child(identity, action, scene, result_write, release_read)
    os.close(result_write)
    os.close(release_read)
    try:
        data = _read_result(result_read, pid)
    finally:
        os.close(result_read)
    return pid, pickle.loads(data), release_write


def _child(identity: Identity, action, scene: Scene, result_write: int, release_read: int) -> None:
    try:
        if identity.uid != 0 or identity.groups != (0,):
            os.setgroups(list(identity.groups))
            os.setgid(identity.gid)
            if identity.fs_group is not None:
                _libc.setfsgid(identity.fs_group)  # kept by setuid(), which resets only the fsuid
            os.setuid(identity.uid)
        done = action(scene)
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
        done = Done(False, f"the attack itself broke: {exc!r}", os.getpid(), time.monotonic_ns(), 0.0)
    try:
        os.write(result_write, pickle.dumps(done))
        os.close(result_write)
        os.read(release_read, 1)  # returns at EOF, when the parent releases us
        for thing in _held:
            if isinstance(thing, subprocess.Popen):
                thing.wait()
    finally:
        os._exit(0)


def _read_result(fd: int, pid: int) -> bytes:
    chunks, deadline = [], time.monotonic() + ATTACK_TIMEOUT
    while True:
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise ShmguardError(f"an attack did not finish within {ATTACK_TIMEOUT:g} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def release_child(pid: int, release_write: int) -> None:
    os.close(release_write)
    os.waitpid(pid, 0)


# ---------------------------------------------------------------------------------------------------- one-shot


def run_battery(policy_path: str, *, start_supervisor: bool, attacks: list[str] | None = None,
                roles: tuple[str, ...] = ROLES, extras: bool = True, with_qemu: bool = False,
                member_user: str = MEMBER_USER, outsider_user: str = OUTSIDER_USER) -> list[AttackResult]:
    """Attack the supervisor serving policy_path, or (start_supervisor) a throwaway one with that policy whose
    paths are moved into a private directory; with_qemu attaches a paused QEMU that must survive every attack."""
    throwaway = ThrowawaySupervisor(policy_path) if start_supervisor else None
    try:
        target = throwaway.policy_path if throwaway else policy_path
        qemu = start_paused_qemu(load_policy(str(target))) if with_qemu else None
        try:
            with Battery(str(target), member_user=member_user, outsider_user=outsider_user, qemu=qemu,
                         supervisor=throwaway.process if throwaway else None) as battery:
                if qemu is not None:
                    wait_for_peer(battery, qemu.pid)
                return battery.run_all(attacks, roles, extras)
        finally:
            if qemu is not None:
                qemu.close()
    finally:
        if throwaway is not None:
            throwaway.stop()


def start_paused_qemu(policy: Policy):
    """A QEMU whose CPU never starts (-S) but whose ivshmem-doorbell joins and maps the region."""
    from .qemu import QemuProcess, qemu_command

    return QemuProcess(qemu_command(socket_path=policy.server.socket, vectors=policy.server.vectors, guest=None,
                                    host_peer_id=None, accel="tcg", memory="128M"))


def wait_for_peer(battery: Battery, pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        peers = battery._control({"op": "status"}).get("peers", [])
        if any(peer.get("pid") == pid for peer in peers):
            return
        if battery.qemu is not None and battery.qemu.poll() is not None:
            raise ShmguardError(f"QEMU exited with status {battery.qemu.poll()} before joining")
        time.sleep(0.05)
    raise ShmguardError(f"QEMU (pid {pid}) did not join the ivshmem server within {timeout:g} s")


class ThrowawaySupervisor:
    """`shmguard run --no-guest` with a copy of a policy whose paths are moved into a private directory, removed
    with everything in it when it stops."""

    def __init__(self, source: str, timeout: float = 30.0):
        self.source = source
        policy = load_policy(source)  # a bad policy stops here, before anything is created
        self.directory = Path(tempfile.mkdtemp(prefix="shmguard-attack-supervisor-"))
        self.directory.chmod(0o755)  # the outsider and the member must reach the sockets to be refused by them
        self.policy_path = self.directory / "policy.toml"
        self.policy_path.write_text(relocated_policy_text(
            policy.source, socket_dir=self.directory, audit_log=self.directory / "audit.log",
            region_path=f"/dev/shm/shmguard-attack-{secrets.token_hex(6)}"))
        log = self.directory / "supervisor.log"
        try:
            self.supervisor = SupervisorProcess(["--policy", str(self.policy_path), "--no-guest"], log,
                                                self.directory / "notify", timeout)
        except BaseException as exc:
            last = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            shutil.rmtree(self.directory, ignore_errors=True)
            if not isinstance(exc, ShmguardError):
                raise
            # One line, as for every error a user can cause: what happened and the supervisor's last word.
            raise ShmguardError(f"the throwaway supervisor did not start: {str(exc).split(';')[0]}: "
                                f"{last[0] if last else 'no output'}") from None

    @property
    def process(self) -> subprocess.Popen:
        return self.supervisor.proc

    def stop(self) -> int:
        try:
            return self.supervisor.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
