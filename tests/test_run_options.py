"""`shmguard run` refuses option combinations that cannot work before it creates anything."""

from __future__ import annotations

import subprocess

import pytest

from helpers import SHMGUARD, policy_file


@pytest.mark.parametrize("args, why", [
    (["--vectors", "1"], "the built-in guest acknowledges on vector 1"),
    (["--no-guest", "--qemu-arg=-S"], "--no-guest boots nothing"),
    (["--guest-initrd", "/etc/hostname"], "--guest-initrd needs --guest-kernel"),
])
def test_impossible_combinations_are_one_clear_line(tmp_path, args, why):
    policy = policy_file(tmp_path)
    result = subprocess.run([*SHMGUARD, "run", "--policy", str(policy), *args], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[0]] and why in lines[0], result.stderr
    assert not (tmp_path / "audit.log").exists()  # refused before anything was created
