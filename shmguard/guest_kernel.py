"""The built-in guest's own kernel: Debian's kernel source (linux-source-6.1) built with guest/kernel.config.

Debian's cloud kernel spends most of its boot under TCG patching its own code (alternatives, jump labels,
ftrace's NOPs: self-modifying code is slow to emulate), running initcalls for drivers the guest never sees and
loading the VFIO modules. A kernel configured for the guest alone has none of that (docs/guest.md has the
figures). It is built once per source version, config and compiler, with `shmguard guest build`, and cached
outside the checkout; `build_kernel` returns the cached kernel or raises a ShmguardError saying why there is none
(then shmguard/guest.py boots Debian's cloud kernel instead, and says so).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from shmguard.errors import ShmguardError
from shmguard.values import Value, value

SOURCE_PACKAGE = "linux-source-6.1"  # Debian 12's kernel source; its version is the cloud kernel's
# What the build needs besides gcc and libc6-dev: make, the Kconfig parser's flex and bison, bc for the
# timeconst header, libelf for objtool (every x86-64 build runs it), xz for the source tarball, patch for
# guest/kernel-*.patch; scripts/bootstrap installs them.
BUILD_PACKAGES = ("make", "flex", "bison", "bc", "libelf-dev", "xz-utils", "patch")
_BUILD_TOOLS = ("make", "flex", "bison", "bc", "gcc", "xz", "patch")
_LIBELF_HEADER = Path("/usr/include/gelf.h")
# Reproducible enough to compare: the build's own stamp, user and host do not vary with the machine.
_BUILD_ENV = {"KBUILD_BUILD_TIMESTAMP": "1970-01-01", "KBUILD_BUILD_USER": "shmguard", "KBUILD_BUILD_HOST": "guest"}

Log = Callable[[str], None]


@value
class BuiltKernel(Value):
    vmlinux: Path
    description: str  # which kernel this is, for the log and `shmguard guest build`


def config_path(sources: Path) -> Path:
    return sources / "kernel.config"


def kernel_cache_dir() -> Path:
    """Outside any checkout and apart from the image: an empty image cache (a cold run) still finds the kernel."""
    if env := os.environ.get("SHMGUARD_KERNEL_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shmguard" / "kernel"


def cached_kernel(sources: Path, cache: Path | None = None) -> BuiltKernel | None:
    """The kernel built from this config with this compiler, if one is cached (the newest source version)."""
    cache = cache or kernel_cache_dir()
    suffix = f"-{_config_hash(sources)}-{_compiler_key()}"
    found = sorted(meta.parent for meta in cache.glob(f"linux-*{suffix}/kernel.json"))
    return _load(found[-1]) if found else None


def build_kernel(sources: Path, log: Log, cache: Path | None = None) -> BuiltKernel:
    """The kernel for the current source version, config and compiler: cached, or built now (a few minutes)."""
    cache = cache or kernel_cache_dir()
    version = _source_version(cache)
    if version is None:
        if found := cached_kernel(sources, cache):
            return found
        raise ShmguardError(f"apt-cache knows no {SOURCE_PACKAGE} (run apt-get update; this needs Debian 12)")
    key = _config_hash(sources)  # read once: the sources may change while the build runs
    final = cache / f"linux-{version}-{key}-{_compiler_key()}"
    if (final / "kernel.json").exists():
        return _load(final)
    missing = missing_build_tools()
    if missing:
        raise ShmguardError(f"building the guest kernel needs {', '.join(missing)}: "
                            f"apt-get install {' '.join(BUILD_PACKAGES)} gcc libc6-dev")
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".lock"):
        if not (final / "kernel.json").exists():  # another build may have finished while this one waited
            _build(sources, version, key, final, log)
    return _load(final)


def missing_build_tools() -> list[str]:
    missing = [tool for tool in _BUILD_TOOLS if shutil.which(tool) is None]
    return missing + ([] if _LIBELF_HEADER.exists() else ["libelf-dev (objtool's gelf.h)"])


def _load(directory: Path) -> BuiltKernel:
    meta = json.loads((directory / "kernel.json").read_text())
    return BuiltKernel(directory / "vmlinux", f"built from {meta['source']} {meta['version']} "
                                              f"with guest/kernel.config ({meta['config_sha']})")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def patches(sources: Path) -> list[Path]:
    """guest/kernel-*.patch, applied to the source in name order (`patch -p1`) before it is configured."""
    return sorted(sources.glob("kernel-*.patch"))


def _config_hash(sources: Path) -> str:
    """The config fragment and the patches: what makes this kernel differ from another of the same source."""
    digest = hashlib.sha256()
    try:
        digest.update(config_path(sources).read_bytes())
        for patch in patches(sources):
            digest.update(b"\0" + patch.name.encode() + b"\0" + patch.read_bytes())
    except OSError as error:
        raise ShmguardError(f"the guest kernel's config {config_path(sources)} is unreadable ({error.strerror}): "
                            "reinstall shmguard") from None
    return digest.hexdigest()[:12]


def _compiler_key() -> str:
    """The compiler by what it is on disk (resolving, stat: no process started on the warm path)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return "nogcc"
    real = Path(gcc).resolve()
    info = real.stat()
    return hashlib.sha256(f"{real}:{info.st_size}:{info.st_mtime_ns}".encode()).hexdigest()[:8]


def _source_version(cache: Path) -> str | None:
    """The candidate version of SOURCE_PACKAGE, remembered until the apt lists change (apt-cache takes ~0.5 s)."""
    memo = cache / "source-version.json"
    fingerprint = _apt_lists_fingerprint()
    try:
        remembered = json.loads(memo.read_text())
        if remembered["apt_lists"] == fingerprint and remembered["package"] == SOURCE_PACKAGE:
            return remembered["version"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # nothing remembered yet
    try:
        out = subprocess.run(["apt-cache", "policy", SOURCE_PACKAGE], capture_output=True, text=True,
                             check=False).stdout
    except FileNotFoundError:
        return None
    match = re.search(r"Candidate: (\S+)", out)
    if not match or match.group(1) == "(none)":
        return None
    with contextlib.suppress(OSError):
        cache.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps({"apt_lists": fingerprint, "package": SOURCE_PACKAGE, "version": match.group(1)}))
    return match.group(1)


def _apt_lists_fingerprint() -> list[list]:
    lists = Path("/var/lib/apt/lists")
    files = sorted(lists.glob("*_Packages*")) if lists.is_dir() else []
    return [[f.name, f.stat().st_mtime_ns, f.stat().st_size] for f in files]


def _build(sources: Path, version: str, key: str, final: Path, log: Log) -> None:
    started = time.monotonic()
    log(f"guest: building the guest's kernel from {SOURCE_PACKAGE} {version} with {config_path(sources)} "
        f"(once: a few minutes) in {final.parent}")
    with tempfile.TemporaryDirectory(dir=final.parent, prefix="build-") as tmp:
        work = Path(tmp)
        _run(["apt-get", "download", f"{SOURCE_PACKAGE}={version}"], work,
             f"download {SOURCE_PACKAGE} {version} with apt-get download (needs the Debian archive)")
        deb = next(work.glob("*.deb"))
        _run(["dpkg-deb", "-x", str(deb), "root"], work, f"unpack {deb.name} with dpkg-deb")
        deb.unlink()
        tarball = next((work / "root" / "usr" / "src").glob("linux-source-*.tar.*"))
        _run(["tar", "-xf", str(tarball)], work, f"unpack {tarball.name} with tar")
        shutil.rmtree(work / "root")
        tree = next(p for p in work.iterdir() if p.is_dir() and p.name.startswith("linux-source-"))
        for patch in patches(sources):
            _run(["patch", "-p1", "-N", "-s", "-i", str(patch)], tree, f"apply {patch} to {tree.name}")
        out = work / "out"
        _configure(tree, out, config_path(sources))
        env = dict(os.environ, **_BUILD_ENV)
        _run(["make", "-s", f"O={out}", f"-j{os.cpu_count() or 1}", "vmlinux"], tree,
             f"build the guest kernel in {tree}", env)
        staging = work / "kernel"
        staging.mkdir()
        shutil.copy(out / "vmlinux", staging / "vmlinux")
        shutil.copy(out / ".config", staging / "config")
        seconds = time.monotonic() - started
        meta = {"source": SOURCE_PACKAGE, "version": version, "config_sha": key,
                "compiler": _compiler_key(), "build_seconds": round(seconds, 1)}
        (staging / "kernel.json").write_text(json.dumps(meta, indent=1))
        staging.rename(final)
    for old in final.parent.glob(f"linux-*-{key}-*"):  # older versions or compilers of this config
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    log(f"guest: built the guest's kernel in {seconds:.0f} s")


def _configure(tree: Path, out: Path, fragment: Path) -> None:
    """tinyconfig + the fragment; every option the fragment names must come out as it says."""
    _run(["make", "-s", f"O={out}", "tinyconfig"], tree, "configure the guest kernel (make tinyconfig)")
    _run(["scripts/kconfig/merge_config.sh", "-m", "-O", str(out), str(out / ".config"), str(fragment)], tree,
         "merge guest/kernel.config into the kernel's config")
    _run(["make", "-s", f"O={out}", "olddefconfig"], tree, "complete the guest kernel's config (make olddefconfig)")
    wrong = config_mismatches(fragment.read_text(), (out / ".config").read_text())
    if wrong:
        raise ShmguardError(f"the guest kernel's config does not hold {', '.join(wrong)} "
                            f"(a dependency missing from {fragment})")


def config_mismatches(fragment: str, config: str) -> list[str]:
    """The fragment's NAME=VALUE lines the final config does not have (=n means "is not set" or absent)."""
    have = {}
    for line in config.splitlines():
        if match := re.fullmatch(r"(CONFIG_\w+)=(.*)", line):
            have[match.group(1)] = match.group(2)
    wrong = []
    for line in fragment.splitlines():
        if match := re.fullmatch(r"(CONFIG_\w+)=(.*)", line.strip()):
            name, value = match.groups()
            if have.get(name, "n") != value:
                wrong.append(f"{name}={value}")
    return wrong


def _run(command: list[str], cwd: Path, what: str, env: dict[str, str] | None = None) -> None:
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False, env=env)
    except FileNotFoundError:
        raise ShmguardError(f"cannot {what}: {command[0]} not found") from None
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()] or lines
        reason = errors[-1].strip() if errors else f"exit status {result.returncode}"
        raise ShmguardError(f"cannot {what}: {reason}")
