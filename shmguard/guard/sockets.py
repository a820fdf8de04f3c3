"""The two listening sockets (the ivshmem server's and the control socket): at their paths, with their attributes."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..linux.procfs import fd_path
from ..policy import GuardPolicy, Policy
from .entries import GuardError, describe_entry, identity, lstat_or_none, move_aside
from .incidents import Incidents


@dataclass(frozen=True)
class GuardedSocket:
    """A listening socket the guard keeps at its path: the IvshmemServer's or the ControlServer's."""

    name: str
    endpoint: Callable[[], Any]  # has .listener (BoundSocket | None) and .rebind(); None while there is none
    owner: int
    group: int
    mode: int

    @property
    def listener(self):
        endpoint = self.endpoint()
        return None if endpoint is None else endpoint.listener


def guarded_sockets(policy: Policy, server: Callable[[], Any], control: Callable[[], Any]) -> list[GuardedSocket]:
    """The ivshmem socket and the control socket, with the owner, group and mode the policy gives them."""
    return [
        GuardedSocket("ivshmem", server, policy.server.owner, policy.server.group, policy.server.mode),
        GuardedSocket("control", control, policy.server.owner, policy.server.group, policy.control.mode),
    ]


class Sockets:
    """Each socket's path holds our listening inode, with its owner, group and mode; else it is put back."""

    def __init__(self, sockets: list[GuardedSocket], responses: GuardPolicy, incidents: Incidents,
                 rewatch: Callable[[], None]):
        self.sockets, self.responses, self.incidents = sockets, responses, incidents
        self._rewatch = rewatch  # a rebound socket is a new inode: watch it

    def check(self, sock: GuardedSocket) -> None:
        listener = sock.listener
        if listener is None:
            return  # shutting down
        path = listener.path
        entry = lstat_or_none(path)
        if entry is not None and identity(entry) == (listener.device, listener.inode):
            attributes = (entry.st_uid, entry.st_gid, stat.S_IMODE(entry.st_mode))
            if attributes != (sock.owner, sock.group, sock.mode):
                self.incidents.report("socket-attributes", path, {"socket": sock.name,
                                                                  "entry": describe_entry(path, entry)},
                                      self.responses.on_attributes, lambda: self._restore_attributes(sock))
            return
        kind = "socket-removed" if entry is None else "socket-replaced"
        self.incidents.report(kind, path, {"socket": sock.name, "entry": describe_entry(path, entry)},
                              self.responses.on_socket, lambda: self._rebind(sock))

    def _restore_attributes(self, sock: GuardedSocket) -> dict:
        listener = sock.listener
        fd = os.open(listener.path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if identity(os.fstat(fd)) != (listener.device, listener.inode):
                raise GuardError(f"{listener.path}: the socket was replaced while being repaired")
            os.chown(fd_path(fd), sock.owner, sock.group)  # the inode we checked, never a symlink
            os.chmod(fd_path(fd), sock.mode)
        finally:
            os.close(fd)
        return {"entry": describe_entry(listener.path, lstat_or_none(listener.path))}

    def _rebind(self, sock: GuardedSocket) -> dict:
        """A fresh listening socket renamed over the path: a foreign file there is replaced in that one rename
        (its identity is in the incident's `before`); a directory there is moved aside first."""
        path = sock.listener.path
        entry = lstat_or_none(path)
        moved_aside = move_aside(path) if entry is not None and stat.S_ISDIR(entry.st_mode) else None
        sock.endpoint().rebind()  # binds under a fresh random staging name, then renames it over the path
        self._rewatch()
        return {"entry": describe_entry(path, lstat_or_none(path)), "moved_aside": moved_aside}
