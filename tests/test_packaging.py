"""The package as a user gets it: wheel and sdist built from a clean, read-only checkout, installed into a fresh
virtual environment, run with no checkout around (guest build and a short demo).

The clean checkout is the files git would commit (tracked and new, not ignored), exactly what a clone of the
commit holds, so the test sees the working tree too. It is mounted read-only for the build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.1.0"
DATA = f"shmguard-{VERSION}.data/data/share/shmguard/"
# What share/shmguard/ holds in an installed package: the repository's layout for these files.
SHARED_FILES = {"systemd/shmguard.service", "systemd/shmguard@.service", "systemd/sysusers.d/shmguard.conf",
                "systemd/tmpfiles.d/shmguard.conf", "scripts/install-systemd", "scripts/write_shared_memory.sh",
                "policies/compat.toml", "policies/standard.toml", "policies/strict.toml", "policies/zephyr.toml",
                "docs/libvirt.md", "docs/guard.md", "docs/README.md", "docs/SECURITY.md"}


def committed_files() -> list[str]:
    """The files a commit of the working tree would hold (tracked or new, not ignored, not deleted)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sorted(name for name in listed if name and (ROOT / name).is_file())


def clean_env() -> dict[str, str]:
    # PYTHONDONTWRITEBYTECODE (set on this machine) makes setuptools warn "byte-compiling is disabled".
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return env


def run(command: list, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> str:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env or clean_env(), capture_output=True,
                            text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, command))} exited {result.returncode}:\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """wheel and sdist built by `python -m build` (isolated, as pip does) from a read-only clean checkout."""
    work = tmp_path_factory.mktemp("packaging")
    checkout = work / "shmguard"
    files = committed_files()
    for name in files:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, checkout / name)
    readonly = work / "readonly"
    readonly.mkdir()
    run(["mount", "--bind", checkout, readonly])
    try:
        run(["mount", "-o", "remount,bind,ro", readonly])
        output = run([sys.executable, "-m", "build", "--outdir", work / "dist", "."], cwd=readonly)
    finally:
        subprocess.run(["umount", str(readonly)], check=False)
    assert sorted(os.listdir(checkout)) == sorted({name.split("/")[0] for name in files}), "the build wrote into it"
    return {"files": files, "output": output, "wheel": work / "dist" / f"shmguard-{VERSION}-py3-none-any.whl",
            "sdist": work / "dist" / f"shmguard-{VERSION}.tar.gz", "work": work}


def test_the_build_warns_of_nothing(built):
    warnings = [line for line in built["output"].splitlines() if "warn" in line.lower() or "deprecat" in line.lower()]
    assert warnings == []
    assert "Successfully built" in built["output"]


def test_the_sdist_holds_every_committed_file_and_nothing_else(built):
    with tarfile.open(built["sdist"]) as sdist:
        names = {member.name.split("/", 1)[1] for member in sdist.getmembers() if member.isfile()}
    generated = {"PKG-INFO", "setup.cfg"} | {n for n in names if n.startswith("shmguard.egg-info/")}
    assert names - generated == set(built["files"])


def test_the_wheel_holds_the_package_its_data_and_the_licence(built):
    files = built["files"]
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(f"shmguard-{VERSION}.dist-info/METADATA").decode()
        modes = {info.filename: info.external_attr >> 16 for info in wheel.infolist()}
    modules = {n for n in files if n.startswith("shmguard/") and n.endswith(".py")}
    policies = {"shmguard/" + n for n in files if n.startswith("policies/")}
    guest = {"shmguard/guest_sources/" + n.removeprefix("guest/") for n in files if n.startswith("guest/")}
    shared = {DATA + name for name in SHARED_FILES}
    dist_info = {f"shmguard-{VERSION}.dist-info/{n}" for n in (
        "METADATA", "WHEEL", "RECORD", "entry_points.txt", "top_level.txt", "licenses/LICENSE")}
    assert names == modules | policies | guest | shared | dist_info
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    assert modes[DATA + "scripts/install-systemd"] & 0o111 and modes[DATA + "scripts/write_shared_memory.sh"] & 0o111


def test_the_sdist_builds_the_same_wheel(built):
    out = built["work"] / "from-sdist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, built["sdist"]])
    with zipfile.ZipFile(built["wheel"]) as direct, zipfile.ZipFile(out / built["wheel"].name) as again:
        assert sorted(direct.namelist()) == sorted(again.namelist())


@pytest.fixture(scope="module")
def installed(built) -> Path:
    """A fresh virtual environment with the wheel installed (pip caches the dependencies' wheels)."""
    venv = built["work"] / "venv"
    run([sys.executable, "-m", "venv", venv])
    run([venv / "bin/pip", "install", "-q", built["wheel"]])
    return venv


def installed_env(tmp_path: Path) -> dict[str, str]:
    env = clean_env()
    cache = tmp_path / "guest-cache"
    cache.mkdir()
    # The kernel comes from the checkout's cache (bootstrap downloaded it); the initrd is built from the package.
    for kernel in (ROOT / "guest/build").glob("kernel-*"):
        shutil.copytree(kernel, cache / kernel.name) if kernel.is_dir() else shutil.copy(kernel, cache)
    env["SHMGUARD_GUEST_CACHE"] = str(cache)
    return env


def test_the_installed_package_builds_the_guest_and_runs_the_demo(installed, tmp_path):
    env, elsewhere = installed_env(tmp_path), tmp_path / "elsewhere"
    elsewhere.mkdir()  # no checkout in sight: everything comes from site-packages
    build = run([installed / "bin/shmguard", "guest", "build"], cwd=elsewhere, env=env)
    assert "building the initrd" in build and "downloading" not in build
    assert str(tmp_path / "guest-cache") in build
    demo = run([installed / "bin/shmguard", "demo", "--no-attacks"], cwd=elsewhere, env=env, timeout=300)
    assert "received IRQ and full message: hello world" in demo


def test_the_installed_package_finds_its_policies_and_shared_files(installed, tmp_path):
    show = run([installed / "bin/shmguard", "policy", "show", "strict"], cwd=tmp_path)
    site = next((installed / "lib").glob("python3*/site-packages"))
    assert show.splitlines()[0] == f"policy strict ({site}/shmguard/policies/strict.toml)"
    shared = installed / "share/shmguard"
    assert {str(p.relative_to(shared)) for p in shared.rglob("*") if p.is_file()} == SHARED_FILES
    assert os.access(shared / "scripts/install-systemd", os.X_OK)


def test_a_name_is_looked_up_in_etc_shmguard_before_the_built_ins(tmp_path, monkeypatch):
    from shmguard import policy

    local = tmp_path / "etc-shmguard"
    local.mkdir()
    (local / "strict.toml").write_text((policy.BUILTIN_DIR / "strict.toml").read_text())
    monkeypatch.setattr(policy, "LOCAL_DIR", local)
    assert policy.locate("strict") == local / "strict.toml"
    assert policy.locate("standard") == policy.BUILTIN_DIR / "standard.toml"
    assert policy.load_policy("strict").source == str(local / "strict.toml")


# ---- the CLI as people use it ----------------------------------------------------------------------------------


def test_version_names_the_commit_of_a_checkout_and_only_the_version_when_installed(installed, tmp_path):
    from shmguard.launcher import SHMGUARD

    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    checkout = subprocess.run([*SHMGUARD, "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert checkout.returncode == 0 and checkout.stdout.startswith(f"shmguard {VERSION} (commit {head}")
    assert run([installed / "bin/shmguard", "--version"], cwd=tmp_path) == f"shmguard {VERSION}\n"


def test_shell_completion_completes_commands_and_options(installed, tmp_path):
    script = run([installed / "bin/shmguard", "completion", "bash"], cwd=tmp_path)
    assert "_SHMGUARD_COMPLETE=bash_complete" in script and "complete -o nosort -F" in script
    env = clean_env() | {"_SHMGUARD_COMPLETE": "bash_complete", "COMP_WORDS": "shmguard gue", "COMP_CWORD": "1"}
    assert "plain,guest" in run([installed / "bin/shmguard"], cwd=tmp_path, env=env).splitlines()
    env |= {"COMP_WORDS": "shmguard guest domain-xml --na", "COMP_CWORD": "3"}
    assert "plain,--name" in run([installed / "bin/shmguard"], cwd=tmp_path, env=env).splitlines()


def test_the_health_line_names_every_problem():
    from shmguard import health

    healthy = {"policy": "strict", "region": {"backend": "memfd", "seals": ["grow", "seal", "shrink"]},
               "peers": [{"local": True}, {"id": 1}], "guest": {"peer": 1, "handshake": True, "ready": True},
               "audit": {"path": "/var/log/shmguard/audit.log", "last_seq": 9, "writable": True}, "guard": {}}
    assert health.summary(healthy) == "healthy: policy strict, 1 peer, guest peer 1 ready, audit seq 9"
    sick = healthy | {"region": {"backend": "memfd", "seals": []}, "guest": {"peer": 1, "handshake": True},
                      "audit": {"path": "/a.log", "writable": False, "trouble": {"error": "ENOSPC", "since": "t"}}}
    assert health.summary(sick) == (
        "UNHEALTHY: the region is not sealed against resizing (seals: none); the audit log /a.log cannot be written "
        "(ENOSPC; since t); the guest (peer 1) has not said it is ready")
