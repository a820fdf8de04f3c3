"""Signals as readable bytes: the handler only wakes the loop, and the signal is handled in the loop."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterable


class SignalWakeup:
    """A socket pair behind signal.set_wakeup_fd: the loop reads signal numbers from `fileno()`."""

    def __init__(self, signums: Iterable[int]):
        self.signums = frozenset(signums)
        self._reader, self._writer = socket.socketpair()
        for sock in (self._reader, self._writer):
            sock.setblocking(False)
        for signum in self.signums:
            signal.signal(signum, lambda *_: None)  # a Python-level handler, so the wake-up fd is written
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)

    def fileno(self) -> int:
        return self._reader.fileno()

    def received(self) -> list[int]:
        """The signals of `signums` received since the last call (others, such as SIGALRM, are passed over)."""
        try:
            data = self._reader.recv(64)
        except BlockingIOError:
            return []
        return [signum for signum in data if signum in self.signums]

    def each(self, handle: Callable[[int], None]) -> None:
        for signum in self.received():
            handle(signum)

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self._reader.close()
        self._writer.close()
