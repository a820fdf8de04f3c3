"""The README's commands are idempotent: run again on a set-up machine, bootstrap installs nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_second_setup_installs_nothing():
    # The test command itself ran `bootstrap setup` before pytest: this is the second run.
    result = subprocess.run(["bash", "scripts/bootstrap", "setup"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == "", (result.stdout, result.stderr)


def test_an_unknown_command_is_one_clear_line():
    result = subprocess.run(["bash", "scripts/bootstrap", "deploy"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr == "bootstrap: usage: bash scripts/bootstrap demo|test|setup\n"
