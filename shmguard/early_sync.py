"""EarlySync: the audit log's fsync started as soon as a write's record is in the file, so the disk flushes while
the region is written, the guest is rung and reads its message.

It decides nothing. Durability is still what the event loop's own fsync at the end of the turn says
(Recorder.flush, docs/audit.md): no reply is sent before that fsync has returned. The early one only starts the
disk's work sooner, so the loop's fsync finds most or all of it done. It runs in one helper thread (os.fsync lets
go of the interpreter while it waits), through a file description of its own: the kernel reports a write-back
error once per description, so an error the early fsync meets is still reported to the loop's fsync, and a failed
record is still answered as a failure. The helper never touches anything else.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger("shmguard")


class EarlySync:
    def __init__(self, audit_fd: Callable[[], int]):
        self._audit_fd = audit_fd  # the log's fd now (a take-over may open it anew)
        self._source = -1  # the fd our own description was opened from
        self._fd = -1
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # our fd is not closed or replaced while the helper syncs through it
        self.syncs = 0  # early fsyncs done (whatever they returned)

    def start_sync(self) -> None:
        """Begin an fsync of the log now, without waiting for it."""
        source = self._audit_fd()
        if source < 0:
            return
        if source != self._source:
            with self._lock:
                self._reopen(source)
        if self._fd < 0:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shmguard-early-sync", daemon=True)
            self._thread.start()
        self._wanted.set()

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd, self._source = -1, -1

    def _reopen(self, source: int) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._source = -1, source
        try:
            self._fd = os.open(f"/proc/self/fd/{source}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:  # then the loop's fsync alone does it, as without this
            log.debug("audit log: no early fsync (%s)", exc)

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            with self._lock:
                if self._fd < 0:
                    continue
                try:
                    os.fsync(self._fd)
                except OSError:
                    pass  # the loop's own fsync, through the log's description, meets the error and reports it
                self.syncs += 1
