"""The suite needs root, QEMU and the identities scripts/bootstrap creates: say so once, clearly, and fail.

Under CI=true nothing skips: a missing prerequisite is an install step that did not run, and the run fails.
Elsewhere (a developer without root) only the tests marked `pure` run, and the run says why.
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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "pure: needs nothing but Python (no root, no QEMU): runs anywhere")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without root or QEMU a developer still runs the pure tests; CI (CI=true) runs everything or fails."""
    missing = missing_prerequisites()
    if not missing:
        return
    how = "Run `bash scripts/bootstrap test` as root, which installs them."
    if os.environ.get("CI") == "true":
        pytest.exit("missing: " + "; ".join(missing) + ". " + how, returncode=1)
    pure = [item for item in items if item.get_closest_marker("pure")]
    if len(pure) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in pure])
        items[:] = pure
        message = (f"running only the {len(pure)} pure tests: missing {'; '.join(missing)}. {how}")
        config.issue_config_time_warning(pytest.PytestWarning(message), stacklevel=2)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for directory in SOCKET_DIRS:  # tests that never started a supervisor leave theirs empty
        shutil.rmtree(directory, ignore_errors=True)
