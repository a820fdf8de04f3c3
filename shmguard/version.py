"""`shmguard --version`: the installed version, and the commit when it runs from a git checkout."""

from __future__ import annotations

import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def version_text() -> str:
    try:
        number = version("shmguard")
    except PackageNotFoundError:
        number = "(not installed)"
    commit = checkout_commit(CHECKOUT)
    return f"shmguard {number}" + (f" (commit {commit})" if commit else "")


def checkout_commit(root: Path) -> str | None:
    """The checkout's HEAD, "-dirty" if tracked files changed; None outside a checkout or without git."""
    if not (root / ".git").exists():
        return None  # an installed package: site-packages is no checkout
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if changed.returncode == 0 and changed.stdout.strip() else "")
