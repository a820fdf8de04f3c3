"""The suite needs root, QEMU and the identities scripts/bootstrap creates: say so once, clearly, and fail.

Nothing here skips: a missing prerequisite is an install step that did not run (under CI=true above all).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil

import pytest

from helpers import MEMBER_USER, SOCKET_DIRS


def missing_prerequisites() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root (the tests create sockets for other uids and drop privileges for real)")
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86_64 (apt-get install qemu-system-x86)")
    try:
        grp.getgrnam("ivshmem")
        pwd.getpwnam(MEMBER_USER)
    except KeyError:
        missing.append(f"the ivshmem group and the {MEMBER_USER} user")
    return missing


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = missing_prerequisites()
    if missing:
        pytest.exit("missing: " + "; ".join(missing) + ". Run `bash scripts/bootstrap test` as root, which "
                    "installs them.", returncode=1)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for directory in SOCKET_DIRS:  # tests that never started a supervisor leave theirs empty
        shutil.rmtree(directory, ignore_errors=True)
