"""scripts/write_shared_memory.sh: the seed's flags, through shmguard write, never truncating."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import RunningSupervisor, policy_file

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "write_shared_memory.sh"
SIZE = 4096


@pytest.fixture
def standard(tmp_path):
    supervisor = RunningSupervisor(policy_file(tmp_path, base="standard", region={"size": SIZE}))
    yield supervisor
    supervisor.stop()


def run_script(supervisor, *args):
    env = dict(os.environ, SHMGUARD_POLICY=str(supervisor.policy_path), SHMGUARD=str(Path(sys.executable).parent /
                                                                                        "shmguard"))
    return subprocess.run(["sh", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def region(supervisor) -> bytes:
    with open(supervisor.region_path, "rb") as f:
        return f.read()


def test_writes_a_padded_message_without_truncating(standard):
    inode = os.stat(standard.region_path).st_ino
    result = run_script(standard, "-s", str(SIZE), "-l", standard.region_path, "-m", "hello world")
    assert result.returncode == 0, result.stderr
    assert region(standard) == b"hello world" + bytes(SIZE - 11)
    assert os.stat(standard.region_path).st_ino == inode  # the same file, never recreated or truncated
    writes = [r for r in standard.audit_records() if r["action"] == "write"]
    assert writes and writes[-1]["length"] == 11


def test_a_message_longer_than_the_region_is_cut_like_the_seed(standard):
    result = run_script(standard, "-s", str(SIZE), "-l", standard.region_path, "-m", "y" * (SIZE + 100), "-v")
    assert result.returncode == 0, result.stderr
    assert region(standard) == b"y" * SIZE
    assert "wrote 4096 bytes" in result.stdout


@pytest.mark.parametrize("args, why", [
    (["-s", "1000"], "does not match the region's 4096 bytes"),
    (["-s", "4096", "-l", "/dev/shm/elsewhere"], "is not the supervised region"),
    (["-s", "abc"], "must be a number"),
    (["-x"], "Usage"),
])
def test_wrong_arguments_write_nothing(standard, args, why):
    run_script(standard, "-s", str(SIZE), "-l", standard.region_path, "-m", "keep me")
    before = region(standard)
    result = run_script(standard, *args, "-m", "overwrite")
    assert result.returncode != 0 and why in result.stderr
    assert region(standard) == before
