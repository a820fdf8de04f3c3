"""Policies and sizes: every mistake a user can make ends in one line that says where and why, and creates nothing."""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from pathlib import Path

import pytest

from helpers import SHMGUARD, policy_file
from shmguard.errors import PolicyError
from shmguard.policy import builtin_names, load_policy, parse_mode, parse_size


def shmguard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SHMGUARD, *args], capture_output=True, text=True, timeout=60)


def assert_one_error_line(result: subprocess.CompletedProcess, *reasons: str) -> None:
    assert result.returncode != 0, result
    assert result.stderr.startswith("shmguard: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    for reason in reasons:
        assert reason in result.stderr, result.stderr


# --- sizes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, size", [("4096", 4096), (4096, 4096), ("4K", 4096), ("4k", 4096), ("4KiB", 4096),
                                        ("4kB", 4096), ("4M", 4 << 20), ("1G", 1 << 30), ("64 K", 64 << 10)])
def test_sizes_that_are_powers_of_two_of_at_least_4096_bytes_are_accepted(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, reason", [
    ("3000", "below the minimum of 4096 bytes"),
    ("0", "below the minimum of 4096 bytes"),
    ("2K", "below the minimum of 4096 bytes"),
    ("3G", "not a power of two"),
    ("4097", "not a power of two"),
    ("12288", "not a power of two"),
    ("abc", "not a number of bytes"),
    ("-4096", "not a number of bytes"),
    ("4.5M", "not a number of bytes"),
    ("4X", "not a number of bytes"),
    ("", "not a number of bytes"),
    (True, "not a number"),
])
def test_other_sizes_are_refused_with_the_reason(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_size(text)


def test_a_size_above_the_maximum_is_refused():
    assert parse_size("1G", maximum=1 << 30) == 1 << 30
    with pytest.raises(ValueError, match="exceeds the policy maximum of 1073741824 bytes"):
        parse_size("2G", maximum=1 << 30)


@pytest.mark.parametrize("text, mode", [("0660", 0o660), ("660", 0o660), ("0o600", 0o600), (0o640, 0o640)])
def test_octal_modes_are_accepted(text, mode):
    assert parse_mode(text) == mode


@pytest.mark.parametrize("text, reason", [("rw-rw----", "not an octal mode"), ("0999", "not an octal mode"),
                                          ("04660", "may not set setuid"), (660, "decimal number"),
                                          (True, "not an octal mode")])
def test_other_modes_are_refused_with_the_reason(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_mode(text)


def test_command_line_overrides_are_checked_like_the_file_and_name_the_option():
    policy = load_policy("strict")
    assert policy.with_overrides(size="8M", vectors=64).region.size == 8 << 20
    with pytest.raises(PolicyError, match="--size: size '2G'.*exceeds the policy maximum"):
        policy.with_overrides(size="2G")
    with pytest.raises(PolicyError, match="--vectors: vectors 65 must be a whole number from 1 to 64"):
        policy.with_overrides(vectors=65)


# --- shmguard run with a bad size creates nothing ------------------------------------------------------------


@pytest.fixture
def standard_policy(tmp_path):
    """The standard policy (a region file, two sockets, an audit log), all moved into test paths."""
    path = policy_file(tmp_path, base="standard")
    data = tomllib.loads(path.read_text())
    yield path, data
    os.rmdir(os.path.dirname(data["server"]["socket"]))  # fails if anything was left in it


def nothing_created(data: dict) -> bool:
    paths = [data["server"]["socket"], data["control"]["socket"], data["audit"]["path"], data["region"]["path"]]
    return not any(os.path.lexists(path) for path in paths)


@pytest.mark.parametrize("size, reason", [
    ("3000", "below the minimum of 4096 bytes"),
    ("0", "below the minimum of 4096 bytes"),
    ("3G", "not a power of two"),
    ("abc", "not a number of bytes"),
    ("-4096", "not a number of bytes"),
    ("4097", "not a power of two"),
    ("2G", "exceeds the policy maximum of 1073741824 bytes"),
])
def test_run_with_a_bad_size_says_why_in_one_line_and_creates_nothing(standard_policy, size, reason):
    path, data = standard_policy
    result = shmguard("run", "--no-guest", "--policy", str(path), f"--size={size}")
    assert_one_error_line(result, "--size", reason)
    assert nothing_created(data)


@pytest.mark.parametrize("vectors", ["0", "65", "-1"])
def test_run_with_bad_vectors_says_why_in_one_line_and_creates_nothing(standard_policy, vectors):
    path, data = standard_policy
    result = shmguard("run", "--no-guest", "--policy", str(path), f"--vectors={vectors}")
    assert_one_error_line(result, "--vectors", "from 1 to 64")
    assert nothing_created(data)


# --- shmguard policy check ------------------------------------------------------------------------------------

ONE_ERROR = {
    "bad TOML": ("[server\nvectors = 2\n", "not valid TOML"),
    "unknown section": ("[network]\nport = 1\n", "[network]: unknown section"),
    "unknown key": ("[region]\ncolour = \"blue\"\n", "region.colour: unknown key"),
    "not a table": ("region = 5\n", "[region]: must be a table"),
    "bad mode": ("[server]\nmode = \"rw-rw----\"\n", "server.mode: mode 'rw-rw----' is not an octal mode"),
    "decimal mode": ("[region]\nmode = 660\n", "region.mode: mode 660 is a decimal number"),
    "setuid mode": ("[control]\nmode = \"04660\"\n", "control.mode: mode '04660' may not set setuid"),
    "unknown user": ("[region]\nowner = \"no-such-user\"\n", "region.owner: user 'no-such-user' does not exist"),
    "unknown group": ("[server]\ngroup = \"no-such-group\"\n", "server.group: group 'no-such-group' does not exist"),
    "unknown peer group": ("[server]\npeers = [\"@no-such-group\"]\n", "server.peers: group 'no-such-group'"),
    "vectors 0": ("[server]\nvectors = 0\n", "server.vectors: vectors 0 must be a whole number from 1 to 64"),
    "vectors 65": ("[server]\nvectors = 65\n", "server.vectors: vectors 65 must be a whole number from 1 to 64"),
    "block on a file backend": ("[region]\nbackend = \"file\"\npath = \"/dev/shm/x\"\n",
                                "guard.on_resize: \"block\" needs region.backend = \"memfd\""),
    "max_queue too small": ("[server]\nmax_queue = 100\n", "server.max_queue: 100 is smaller than the largest"),
    "bad size": ("[region]\nsize = \"3000\"\n", "region.size: size '3000' is below the minimum"),
    "size over max_size": ("[region]\nsize = \"8M\"\nmax_size = \"4M\"\n", "region.size: size '8M'"),
    "bad response": ("[guard]\non_unlink = \"ignore\"\n", "guard.on_unlink: 'ignore' is not one of block, repair"),
    "wrong type": ("[region]\nmlock = \"yes\"\n", "region.mlock: expected bool"),
    "relative region path": ("[region]\nbackend = \"file\"\npath = \"shm\"\n[guard]\non_resize = \"repair\"\n",
                             "region.path: 'shm' must be an absolute path"),
}


@pytest.mark.parametrize("case", ONE_ERROR)
def test_policy_check_names_the_file_the_key_and_the_reason(tmp_path, case):
    text, expected = ONE_ERROR[case]
    path = tmp_path / "mine.toml"
    path.write_text(text)
    result = shmguard("policy", "check", str(path))
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{path}: {expected}"), line


def test_policy_check_lists_every_error_at_once(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[region]\nbackend = \"file\"\npath = \"/dev/shm/x\"\nmode = \"rw\"\nowner = \"no-such-user\"\n"
                    "colour = 1\n[server]\nvectors = 65\nmax_queue = 10\n[network]\nport = 1\n")
    result = shmguard("policy", "check", str(path))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    keys = ["[network]", "region.owner", "region.mode", "region.colour", "server.vectors", "server.max_queue",
            "guard.on_resize"]
    assert len(lines) == len(keys) and all(line.startswith(f"{path}: ") for line in lines), lines
    for key in keys:
        assert any(line.startswith(f"{path}: {key}: ") for line in lines), (key, lines)


def test_policy_check_of_a_good_file_says_ok(tmp_path):
    path = policy_file(tmp_path)
    result = shmguard("policy", "check", str(path))
    assert (result.returncode, result.stdout) == (0, f"{path}: OK\n")
    os.rmdir(os.path.dirname(tomllib.loads(path.read_text())["server"]["socket"]))


@pytest.mark.parametrize("content, reason", [(None, "policy file not found"), (b"\x9f\xff[region]", "not UTF-8")])
def test_policy_check_of_a_missing_or_binary_file_is_one_line(tmp_path, content, reason):
    path = tmp_path / "policy.toml"
    if content is not None:
        path.write_bytes(content)
    result = shmguard("policy", "check", str(path))
    assert_one_error_line(result, str(path), reason)
    assert result.returncode == 2


# --- shmguard policy show -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", builtin_names())
def test_policy_show_prints_every_built_in_policy_as_text_and_json(name):
    text = shmguard("policy", "show", name)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith(f"policy {name} (") and "[region]" in text.stdout and "[server]" in text.stdout
    shown = shmguard("policy", "show", name, "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    policy = load_policy(name)
    assert data["name"] == name and data["region"]["size"] == policy.region.size
    assert data["server"]["vectors"] == policy.server.vectors and data["server"]["mode"] == f"0{policy.server.mode:o}"
    assert set(data) >= {"region", "server", "control", "guard", "audit", "hardening", "qemu"}


def test_policy_show_of_a_file_shows_its_values(tmp_path):
    path = policy_file(tmp_path, region={"size": "64K"}, server={"vectors": 7})
    data = json.loads(shmguard("policy", "show", str(path), "--json").stdout)
    assert (data["region"]["size"], data["server"]["vectors"], data["source"]) == (65536, 7, str(path))
    os.rmdir(os.path.dirname(data["server"]["socket"]))


@pytest.mark.parametrize("name, reason", [("nosuch", "no built-in policy 'nosuch'"),
                                          ("/no/such/policy.toml", "policy file not found")])
def test_policy_show_of_an_unknown_policy_is_one_line(name, reason):
    result = shmguard("policy", "show", name)
    assert_one_error_line(result, reason)
    assert result.returncode == 2


def test_a_bad_policy_file_stops_every_command_with_its_first_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nvectors = 0\nmode = \"rw\"\n")
    result = shmguard("peers", "--policy", str(path))
    assert_one_error_line(result, f"{path}: server.mode", "(and 1 more; run `shmguard policy check")


def test_every_built_in_policy_is_valid():
    for name in builtin_names():
        policy = load_policy(name)
        assert Path(policy.source).name == f"{name}.toml"


def test_a_relocated_policy_parses_with_its_paths_moved_and_everything_else_kept(tmp_path):
    import dataclasses

    from shmguard.policy import parse_policy, policy_toml, relocated_policy_text

    for name in ("standard", "strict"):
        text = relocated_policy_text(name, socket_dir=tmp_path, audit_log=tmp_path / "audit.log",
                                     region_path="/dev/shm/shmguard-test-moved", server={"vectors": 4})
        assert tomllib.loads(policy_toml(tomllib.loads(text))) == tomllib.loads(text)
        moved, errors = parse_policy(text, "moved.toml", name)
        assert errors == []
        original = load_policy(name)
        region_path = "/dev/shm/shmguard-test-moved" if original.region.backend == "file" else original.region.path
        assert moved.region == dataclasses.replace(original.region, path=region_path)
        assert moved.server == dataclasses.replace(original.server, socket=str(tmp_path / "ivshmem.sock"), vectors=4)
        assert moved.control == dataclasses.replace(original.control, socket=str(tmp_path / "control.sock"))
        assert moved.audit == dataclasses.replace(original.audit, path=str(tmp_path / "audit.log"), durable=False)
        assert (moved.guard, moved.hardening, moved.qemu) == (original.guard, original.hardening, original.qemu)
