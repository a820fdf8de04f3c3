"""The README's commands are idempotent: run again on a set-up machine, bootstrap installs nothing."""

from __future__ import annotations

import os
import shutil
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



def test_the_environment_runs_debians_interpreter_whatever_python3_comes_first(tmp_path):
    # A python3 first on PATH (a pyenv shim, say) is never the one the environment is made from: a copy of the
    # checkout is set up from nothing with a decoy python3 ahead of everything else.
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info"))
    decoy = tmp_path / "bin" / "python3"
    decoy.parent.mkdir()
    decoy.write_text("#!/bin/sh\necho 'the python3 on PATH was run' >&2\nexit 97\n")
    decoy.chmod(0o755)
    result = subprocess.run(["bash", "scripts/bootstrap", "setup"], cwd=checkout, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PATH": f"{decoy.parent}:{os.environ['PATH']}"})
    assert result.returncode == 0 and "was run" not in result.stderr, result.stderr
    assert (checkout / ".venv/bin/python").resolve() == Path("/usr/bin/python3").resolve()
    # An environment made from another interpreter (its stamp says which) is made again, from Debian's.
    stamp = checkout / ".venv/.shmguard-installed"
    stamp.write_text(stamp.read_text().rsplit(" ", 1)[0] + " /root/.pyenv/versions/3.11.7/bin/python3.11\n")
    again = subprocess.run(["bash", "scripts/bootstrap", "setup"], cwd=checkout, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and "creating the virtual environment" in again.stderr, again.stderr
    assert stamp.read_text().split()[-1] == str(Path("/usr/bin/python3").resolve())
