"""The one place that loads libc: the calls Python's os module lacks, with errno and EINTR handled once."""

from __future__ import annotations

import ctypes
import errno
import os

_libc = ctypes.CDLL(None, use_errno=True)


def function(name: str, argtypes: list, restype=ctypes.c_int):
    """A libc function with its argument types declared (ctypes guesses wrong for pointers and longs)."""
    func = getattr(_libc, name)
    func.argtypes, func.restype = argtypes, restype
    return func


def call(func, *args, what: str | None = None) -> int:
    """Call a function that returns -1 and sets errno on failure; retried on EINTR, OSError otherwise."""
    while True:
        result = func(*args)
        if result != -1:
            return result
        error = ctypes.get_errno()
        if error != errno.EINTR:
            raise OSError(error, os.strerror(error), what)
