"""The classic attacks: real commands (truncate, dd, chmod, rm, mv, ln) and syscalls against the region, its
path and the sockets, by whoever the kernel lets through.
"""

from __future__ import annotations

import os
import pwd
import socket
import struct
import threading

from ..client import IvshmemClient
from ..control import ControlClient, WriteRequest
from ..errors import ShmguardError
from .children import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, Done, Scene, command, fallocate, kept, syscalls
from .identities import OUTSIDER_USER

ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x1, 0x2, 0x4, 0x10, 0x20


def acl_granting(uid: int) -> bytes:
    """system.posix_acl_access (version 2) that gives uid read and write, with the mode bits unchanged."""
    everyone = 0xFFFFFFFF
    entries = [(ACL_USER_OBJ, 6, everyone), (ACL_USER, 6, uid), (ACL_GROUP_OBJ, 6, everyone),
               (ACL_MASK, 6, everyone), (ACL_OTHER, 0, everyone)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


def ftruncate_held(scene: Scene) -> Done:
    fd: list[int] = []
    return syscalls(lambda: fd.append(os.open(scene.region, os.O_RDWR)), lambda: os.ftruncate(fd[0], 0))


def seed_dd(scene: Scene) -> Done:
    message = scene.name("msg", scene.scratch)
    with open(message, "wb") as f:  # printf "%s" "$message" > /tmp/msg, as the seed's script does
        f.write(scene.message)
    return command(["dd", f"if={message}", f"of={scene.region}", f"bs={scene.size}", "count=1"])


def chgrp(scene: Scene) -> Done:
    group = 65534 if scene.identity.uid == 0 else scene.identity.gid  # root: nogroup; others: their own
    return command(["chgrp", str(group), scene.region])


def mv_away(scene: Scene) -> Done:
    return command(["mv", "-f", scene.region, scene.name("moved", scene.scratch if scene.memfd else None)])


def symlink_replace(scene: Scene) -> Done:
    decoy = scene.name("decoy", scene.scratch)
    with open(decoy, "wb") as f:
        f.write(b"not the region\n")
    return command(["ln", "-sfn", decoy, scene.region])


def replace_socket(scene: Scene) -> Done:
    """Remove the socket and listen at its path instead: a man in the middle for the next peer."""
    impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    kept.append(impostor)

    def take_over() -> None:
        os.unlink(scene.socket)
        impostor.bind(scene.socket)
        impostor.listen(1)

    return syscalls(take_over)


def connect(scene: Scene) -> Done:
    def join() -> None:
        IvshmemClient(scene.socket, timeout=5.0).connect().close()

    return syscalls(join)


def open_for_write(scene: Scene) -> Done:
    return syscalls(lambda: os.open(scene.region, os.O_WRONLY | os.O_CLOEXEC))


def hardlink_truncate(scene: Scene) -> Done:
    link, fd = scene.name("link"), []
    return syscalls(lambda: os.link(scene.region, link), lambda: fd.append(os.open(link, os.O_RDWR)),
                    lambda: os.ftruncate(fd[0], 0))


def rename_over(scene: Scene) -> Done:
    decoy = scene.name("decoy")

    def make_decoy() -> None:
        fd = os.open(decoy, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
        os.ftruncate(fd, scene.size)  # the same size as the region: a size check alone would not notice
        os.close(fd)

    return syscalls(make_decoy, lambda: os.rename(decoy, scene.region))


def acl_grant(scene: Scene) -> Done:
    nobody = pwd.getpwnam(OUTSIDER_USER).pw_uid
    return syscalls(lambda: os.setxattr(scene.region, "system.posix_acl_access", acl_granting(nobody)))


def punch_hole(scene: Scene) -> Done:
    fd: list[int] = []
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    return syscalls(lambda: fd.append(os.open(scene.region, os.O_RDWR)),
                    lambda: fallocate(fd[0], mode, 0, min(scene.size, 65536)))


def shrink_regrow(scene: Scene) -> Done:
    fd: list[int] = []

    def shrink_and_regrow() -> None:
        os.ftruncate(fd[0], 0)
        os.ftruncate(fd[0], scene.size)  # back to the right size at once: only st_blocks still tells

    return syscalls(lambda: fd.append(os.open(scene.region, os.O_RDWR)), shrink_and_regrow)


def burst(scene: Scene) -> Done:
    fd: list[int] = []

    def hundred() -> None:
        for n in range(100):
            os.ftruncate(fd[0], (n % 4) * scene.size // 4)

    return syscalls(lambda: fd.append(os.open(scene.region, os.O_RDWR)), hundred)


def truncate_during_writes(scene: Scene) -> Done:
    """Truncations racing audited writes: a write copied into a mapping would SIGBUS the supervisor."""
    fd: list[int] = []
    client, body = ControlClient(scene.control, timeout=10), WriteRequest(scene.message, text=True)

    def writes() -> None:
        for _ in range(20):
            try:
                client.ask(body)
            except (ShmguardError, OSError):
                pass  # a write refused while the region is truncated is the right answer

    def race() -> None:
        writer = threading.Thread(target=writes)
        writer.start()
        for n in range(200):
            os.ftruncate(fd[0], 0 if n % 2 == 0 else scene.size // 2)
        writer.join()

    return syscalls(lambda: fd.append(os.open(scene.region, os.O_RDWR)), race)
