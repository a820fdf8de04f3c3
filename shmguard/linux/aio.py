"""An fsync the kernel runs while the event loop goes on: Linux native AIO's IOCB_CMD_FSYNC (Linux 4.18), its
completion signalled on an eventfd the loop watches. No thread: the kernel's own workqueue does the waiting.

A few fsyncs in flight at once are all the audit log's group commit needs (a new one starts for the records
written since the last began, so a join need not wait for the fsync before its own), so this is a context of a
few slots, not a general AIO binding.
"""

from __future__ import annotations

import ctypes
import os

from . import libc

IOCB_CMD_FSYNC = 2
IOCB_CMD_FDSYNC = 3  # fdatasync(2): the data and the metadata needed to read it back (the size), not the times
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
    """fsync(fd) started now, finished later, up to `slots` at once: `start(token)`, then `fileno()` turns
    readable and `completed()` says which ended and how (token, 0 or the errno the fsync would have raised).
    Raises OSError at creation where the kernel (or a seccomp filter) refuses native AIO, or where every AIO
    context of the machine is taken (fs.aio-max-nr, which any local user can fill): the caller then fsyncs in
    line. datasync: fdatasync(fd) instead (IOCB_CMD_FDSYNC, Linux 4.18 as well)."""

    def __init__(self, fd: int, slots: int = 4, datasync: bool = False) -> None:
        machine = os.uname().machine  # what platform.machine() returns, without importing platform (~3 ms)
        numbers = _SYSCALLS.get(machine)
        if numbers is None:
            raise OSError(0, f"native AIO's system call numbers are not known on {machine}")
        self._setup, self._destroy, self._getevents, self._submit = numbers
        self._opcode = IOCB_CMD_FDSYNC if datasync else IOCB_CMD_FSYNC
        self._context = ctypes.c_ulong(0)
        self._call(self._setup, slots, ctypes.addressof(self._context), what="io_setup")
        # Our duplicate of the fd: the same open file description, so its write-back errors are reported to us,
        # and a number its owner's close cannot hand to another file while an fsync is in flight.
        self._fd = os.dup(fd)
        self._done = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._iocbs = [_Iocb() for _ in range(slots)]
        self._free = list(range(slots))
        self._busy: dict[int, int] = {}  # slot -> the caller's token
        self._pointer = ctypes.c_void_p()  # io_submit takes an array of iocb pointers: ours has one
        self._events = (_IoEvent * slots)()

    @property
    def in_flight(self) -> int:
        return len(self._busy)

    @property
    def full(self) -> bool:
        return not self._free

    def fileno(self) -> int:
        """Readable once an fsync in flight has completed."""
        return self._done

    def start(self, token: int) -> None:
        if not self._free:
            raise RuntimeError("every slot has an fsync in flight")
        slot = self._free.pop()
        iocb = self._iocbs[slot]
        ctypes.memset(ctypes.addressof(iocb), 0, ctypes.sizeof(iocb))
        iocb.aio_data, iocb.aio_lio_opcode, iocb.aio_fildes = slot, self._opcode, self._fd
        iocb.aio_flags, iocb.aio_resfd = IOCB_FLAG_RESFD, self._done
        self._pointer.value = ctypes.addressof(iocb)
        try:
            self._call(self._submit, self._context.value, 1, ctypes.addressof(self._pointer), what="io_submit")
        except OSError:
            self._free.append(slot)
            raise
        self._busy[slot] = token

    def completed(self, wait: bool = False) -> list[tuple[int, int]]:
        """(token, 0 or the fsync's errno) of each fsync that has completed; with wait=True, of every one in
        flight, waiting for them."""
        try:
            os.eventfd_read(self._done)  # reset first: a completion after the reaping below sets it again
        except BlockingIOError:
            pass
        results = []
        while self._busy:
            want = len(self._busy) if wait else 0
            got = self._call(self._getevents, self._context.value, want, len(self._busy),
                             ctypes.addressof(self._events), 0, what="io_getevents")
            for event in self._events[:got]:
                self._free.append(event.data)
                results.append((self._busy.pop(event.data), -event.res if event.res < 0 else 0))
            if not wait or got == 0:
                break
        return results

    def close(self) -> None:
        self.completed(wait=True)  # the kernel holds each iocb's file until it completes
        if self._done >= 0:
            self._call(self._destroy, self._context.value, what="io_destroy")
            os.close(self._done)
            os.close(self._fd)
            self._done = self._fd = -1

    @staticmethod
    def _call(number: int, *args: int, what: str) -> int:
        padded = (list(args) + [0] * 5)[:5]
        return libc.call(_syscall, number, *padded, what=what)
