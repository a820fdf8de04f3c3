"""An fsync the kernel runs while the event loop goes on: Linux native AIO's IOCB_CMD_FSYNC (Linux 4.18), its
completion signalled on an eventfd the loop watches. No thread: the kernel's own workqueue does the waiting.

One fsync in flight at a time is all the audit log's group commit needs (records written meanwhile wait for the
next one), so this is a context of one slot, not a general AIO binding.
"""

from __future__ import annotations

import ctypes
import os
import platform

from . import libc

IOCB_CMD_FSYNC = 2
IOCB_FLAG_RESFD = 1 << 0  # the kernel adds 1 to aio_resfd when the request completes
# io_setup, io_destroy, io_getevents, io_submit: only where we know the numbers (x86-64 is what QEMU hosts run)
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}


class _Iocb(ctypes.Structure):  # struct iocb, little-endian field order (linux/aio_abi.h)
    _fields_ = [("aio_data", ctypes.c_uint64), ("aio_key", ctypes.c_uint32), ("aio_rw_flags", ctypes.c_int32),
                ("aio_lio_opcode", ctypes.c_uint16), ("aio_reqprio", ctypes.c_int16), ("aio_fildes", ctypes.c_uint32),
                ("aio_buf", ctypes.c_uint64), ("aio_nbytes", ctypes.c_uint64), ("aio_offset", ctypes.c_int64),
                ("aio_reserved2", ctypes.c_uint64), ("aio_flags", ctypes.c_uint32), ("aio_resfd", ctypes.c_uint32)]


class _IoEvent(ctypes.Structure):  # struct io_event
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                ("res2", ctypes.c_int64)]


_syscall = libc.function("syscall", [ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_long,
                                     ctypes.c_long], ctypes.c_long)


class AsyncFsync:
    """fsync(fd) started now, finished later: `start(fd)`, then `fileno()` turns readable and `result()` says how
    it ended (0, or the errno the fsync would have raised). Raises OSError at creation where the kernel (or a
    seccomp filter) refuses native AIO: the caller then fsyncs in line."""

    def __init__(self) -> None:
        numbers = _SYSCALLS.get(platform.machine())
        if numbers is None:
            raise OSError(0, f"native AIO's system call numbers are not known on {platform.machine()}")
        self._setup, self._destroy, self._getevents, self._submit = numbers
        self._context = ctypes.c_ulong(0)
        self._call(self._setup, 1, ctypes.addressof(self._context), what="io_setup")
        self._done = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._iocb = _Iocb()
        self._pointer = ctypes.c_void_p(ctypes.addressof(self._iocb))  # io_submit takes an array of iocb pointers
        self._fd = -1  # our duplicate of the fd being synced: a close by its owner meanwhile cannot reuse it
        self.in_flight = False

    def fileno(self) -> int:
        """Readable once the fsync in flight has completed."""
        return self._done

    def start(self, fd: int) -> None:
        if self.in_flight:
            raise RuntimeError("an fsync is already in flight")
        self._fd = os.dup(fd)  # the same open file description, so its write-back errors are reported to us
        ctypes.memset(ctypes.addressof(self._iocb), 0, ctypes.sizeof(self._iocb))
        self._iocb.aio_lio_opcode, self._iocb.aio_fildes = IOCB_CMD_FSYNC, self._fd
        self._iocb.aio_flags, self._iocb.aio_resfd = IOCB_FLAG_RESFD, self._done
        try:
            self._call(self._submit, self._context.value, 1, ctypes.addressof(self._pointer), what="io_submit")
        except OSError:
            self._close_fd()
            raise
        self.in_flight = True

    def result(self, wait: bool = False) -> int | None:
        """0 or the fsync's errno once it completed; None while it has not (always an answer with wait=True)."""
        if not self.in_flight:
            raise RuntimeError("no fsync in flight")
        event = _IoEvent()
        got = self._call(self._getevents, self._context.value, 1 if wait else 0, 1, ctypes.addressof(event), 0,
                         what="io_getevents")
        if got == 0:
            return None
        try:
            os.eventfd_read(self._done)  # the completion's count, reset for the next one
        except BlockingIOError:
            pass
        self.in_flight = False
        self._close_fd()
        return -event.res if event.res < 0 else 0

    def close(self) -> None:
        if self.in_flight:
            self.result(wait=True)  # the kernel holds our iocb's file until it completes
        if self._done >= 0:
            self._call(self._destroy, self._context.value, what="io_destroy")
            os.close(self._done)
            self._done = -1

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @staticmethod
    def _call(number: int, *args: int, what: str) -> int:
        padded = (list(args) + [0] * 5)[:5]
        return libc.call(_syscall, number, *padded, what=what)
