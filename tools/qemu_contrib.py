"""QEMU's own contrib ivshmem-server (and ivshmem-client), built from Debian's qemu source package: a baseline.

    python3 tools/qemu_contrib.py            # prints the server's path, building it first if need be
    python3 tools/qemu_contrib.py --client   # the client's path

The source is the one of the installed `qemu-system-x86` (`dpkg-query -W`): its .dsc, orig tarball and Debian
tarball come from deb.debian.org's pool, and each tarball is checked against the SHA-256 the .dsc gives before it
is used. Debian's patch series is applied, then a few files are compiled with one explicit gcc command each,
never QEMU's own build: contrib/ivshmem-server/*.c, the util sources they call, two of QEMU's link stubs, the
two generated headers they include (QAPI types, util trace points with the `nop` backend) and glib from
libglib2.0-dev (installed with apt-get if missing). Unused code in the util files is dropped at link time
(--gc-sections), as QEMU's static libqemuutil.a drops whole unused objects.

The binaries are cached in ~/.cache/shmguard/qemu-contrib-KEY/, KEY a hash of the source version, glib's version
and the recipe below, so a second call returns at once; the downloads are kept in ~/.cache/shmguard/qemu-source/.
Standalone: imports nothing from shmguard.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

POOL = "https://deb.debian.org/debian/pool/main/q/qemu/"
PACKAGE = "qemu-system-x86"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shmguard"

# --- the recipe (every line of it goes into the cache key) -----------------------------------------------------

CFLAGS = ("-O2", "-g0", "-std=gnu11", "-ffunction-sections", "-fdata-sections", "-D_GNU_SOURCE",
          "-D_FILE_OFFSET_BITS=64", "-D_LARGEFILE64_SOURCE")
LDFLAGS = ("-Wl,--gc-sections",)
LIBS = ("-lrt",)
UTIL = ("util/event_notifier-posix.c", "util/oslib-posix.c", "util/osdep.c", "util/cutils.c", "util/qemu-option.c",
        "util/error.c", "util/error-report.c", "util/host-utils.c", "stubs/error-printf.c", "stubs/monitor-core.c")
PROGRAMS = {
    "ivshmem-server": ("contrib/ivshmem-server/ivshmem-server.c", "contrib/ivshmem-server/main.c"),
    "ivshmem-client": ("contrib/ivshmem-client/ivshmem-client.c", "contrib/ivshmem-client/main.c"),
}
# What QEMU's configure would say about this host, for the few macros these files test.
CONFIG_HOST = """\
#define CONFIG_POSIX 1
#define CONFIG_LINUX 1
#define CONFIG_IOVEC 1
#define CONFIG_EVENTFD 1
#define CONFIG_ACCEPT4 1
#define CONFIG_FDATASYNC 1
#define CONFIG_MADVISE 1
#define CONFIG_POSIX_MADVISE 1
#define HOST_X86_64 1
#define CONFIG_PREFIX "/usr"
#define CONFIG_BINDIR "/usr/bin"
#define CONFIG_QEMU_CONFDIR "/etc/qemu"
#define CONFIG_QEMU_DATADIR "/usr/share/qemu"
#define CONFIG_QEMU_MODDIR "/usr/lib/x86_64-linux-gnu/qemu"
#define CONFIG_QEMU_HELPERDIR "/usr/lib/qemu"
#define CONFIG_QEMU_LOCALSTATEDIR "/var"
#define QEMU_PKGVERSION "Debian"
"""
RECIPE_VERSION = 1  # bump when the steps below change in a way the constants above do not show


class ContribError(Exception):
    """Why the contrib programs cannot be had, in one line."""


# --- the public API --------------------------------------------------------------------------------------------


def ivshmem_server() -> Path:
    """QEMU's contrib ivshmem-server for the installed QEMU, built when missing. Raises ContribError."""
    return _built()["ivshmem-server"]


def ivshmem_client() -> Path:
    """QEMU's contrib ivshmem-client, built with the server. Raises ContribError."""
    return _built()["ivshmem-client"]


def source_version() -> str:
    """The Debian source version of the installed qemu-system-x86 (epoch included), e.g. 1:7.2+dfsg-7+deb12u18."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${source:Package} ${source:Version}", PACKAGE],
                             capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        raise ContribError(f"{PACKAGE} is not installed (dpkg-query -W {PACKAGE} fails): "
                           f"apt-get install {PACKAGE}") from None
    if len(out) != 2 or out[0] != "qemu":
        raise ContribError(f"dpkg-query says {PACKAGE} comes from source {' '.join(out)!r}, not qemu")
    return out[1]


def cache_directory(version: str | None = None) -> Path:
    version = version or source_version()
    recipe = json.dumps([RECIPE_VERSION, version, _glib_version(), CFLAGS, LDFLAGS, LIBS, UTIL, PROGRAMS,
                         CONFIG_HOST], sort_keys=True)
    return CACHE / f"qemu-contrib-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}"


# --- building --------------------------------------------------------------------------------------------------


def _built() -> dict[str, Path]:
    version = source_version()
    _need_glib()
    directory = cache_directory(version)
    paths = {name: directory / name for name in PROGRAMS}
    if all(os.access(path, os.X_OK) for path in paths.values()):
        return paths
    CACHE.mkdir(parents=True, exist_ok=True)
    sources = _fetch(version)
    with tempfile.TemporaryDirectory(prefix="qemu-contrib-build-", dir=CACHE) as temporary:
        work = Path(temporary)
        tree = _unpack(sources, work)
        out = work / "out"
        out.mkdir()
        _compile(tree, work / "gen", out)
        (out / "SOURCE.json").write_text(json.dumps({"version": version, "pool": POOL, "glib": _glib_version(),
                                                     "files": {n: s for n, s in sources["sha256"].items()}},
                                                    indent=1) + "\n")
        try:
            out.rename(directory)
        except OSError:
            if not all(os.access(path, os.X_OK) for path in paths.values()):  # not another build winning the race
                raise ContribError(f"cannot put the built programs in {directory}") from None
    return paths


def _fetch(version: str) -> dict:
    """The .dsc and its tarballs in the download cache, each tarball checked against the .dsc's SHA-256."""
    upstream_less_epoch = version.split(":", 1)[-1]
    store = CACHE / "qemu-source"
    store.mkdir(parents=True, exist_ok=True)
    dsc_name = f"qemu_{upstream_less_epoch}.dsc"
    dsc = _download(dsc_name, store).read_text(errors="replace")
    files = _dsc_sha256(dsc, dsc_name)
    paths = {}
    for name, (digest, size) in files.items():
        path = store / name
        if not (path.exists() and path.stat().st_size == size and _sha256(path) == digest):
            path = _download(name, store)
            if path.stat().st_size != size or _sha256(path) != digest:
                path.unlink()
                raise ContribError(f"{POOL}{name}: does not match the SHA-256 in {dsc_name}; not used")
        paths[name] = path
    orig = [p for n, p in paths.items() if ".orig.tar." in n]
    debian = [p for n, p in paths.items() if ".debian.tar." in n]
    if len(orig) != 1 or len(debian) != 1:
        raise ContribError(f"{dsc_name}: expected one orig and one debian tarball, found {sorted(paths)}")
    return {"orig": orig[0], "debian": debian[0], "sha256": {n: files[n][0] for n in files}}


def _dsc_sha256(dsc: str, dsc_name: str) -> dict[str, tuple[str, int]]:
    match = re.search(r"^Checksums-Sha256:\n((?: .*\n)+)", dsc, re.M)
    if match is None:
        raise ContribError(f"{dsc_name}: has no Checksums-Sha256 field")
    files = {}
    for line in match.group(1).splitlines():
        digest, size, name = line.split()
        if "/" in name or name.startswith("."):
            raise ContribError(f"{dsc_name}: names a file {name!r}; refusing it")
        files[name] = (digest, int(size))
    return files


def _download(name: str, store: Path) -> Path:
    target = store / name
    partial = store / f".{name}.partial"
    try:
        with urllib.request.urlopen(POOL + name, timeout=60) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except urllib.error.HTTPError as exc:
        partial.unlink(missing_ok=True)
        raise ContribError(f"{POOL}{name}: HTTP {exc.code} (is this version still in Debian's main pool?)") from None
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ContribError(f"{POOL}{name}: cannot download ({getattr(exc, 'reason', None) or exc})") from None
    partial.rename(target)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _unpack(sources: dict, work: Path) -> Path:
    """The orig tree with Debian's patch series applied, as dpkg-source would leave it."""
    for tarball in (sources["orig"], sources["debian"]):
        with tarfile.open(tarball) as archive:
            archive.extractall(work / "src", filter="data")
    trees = [p for p in (work / "src").iterdir() if p.is_dir() and p.name != "debian"]
    if len(trees) != 1:
        raise ContribError(f"{sources['orig'].name}: expected one top directory, found {[p.name for p in trees]}")
    tree = trees[0]
    patches = work / "src" / "debian" / "patches"
    series = patches / "series"
    names = [line.split()[0] for line in series.read_text().splitlines() if line.strip() and not line.startswith("#")]
    for name in names:
        with open(patches / name, "rb") as patch:
            result = subprocess.run(["patch", "-p1", "-s", "-f", "-N"], stdin=patch, cwd=tree, capture_output=True)
        if result.returncode != 0:
            first = (result.stdout + result.stderr).decode(errors="replace").strip().splitlines()[:1]
            raise ContribError(f"debian/patches/{name} does not apply: {' '.join(first) or 'patch failed'}")
    return tree


def _compile(tree: Path, gen: Path, out: Path) -> None:
    """The generated headers, then one gcc command per program."""
    gen.mkdir()
    (gen / "config-host.h").write_text(CONFIG_HOST)
    (gen / "config-poison.h").write_text("")  # only target code is poisoned
    _run([sys.executable, str(tree / "scripts/qapi-gen.py"), "-b", "-o", str(gen / "qapi"),
          str(tree / "qapi/qapi-schema.json")], "generating the QAPI headers")
    (gen / "trace").mkdir()
    _run([sys.executable, str(tree / "scripts/tracetool.py"), "--backend=nop", "--group=util", "--format=h",
          str(tree / "util/trace-events"), str(gen / "trace/trace-util.h")], "generating the util trace header")
    glib = _pkg_config("--cflags", "--libs", "glib-2.0")
    for name, files in PROGRAMS.items():
        includes = [f"-I{gen}", f"-I{tree / 'include'}", f"-I{tree}", f"-I{tree / Path(files[0]).parent}"]
        command = ["gcc", *CFLAGS, *includes, *[str(tree / f) for f in files + UTIL], *LDFLAGS, *glib, *LIBS,
                   "-o", str(out / name)]
        _run(command, f"compiling {name}")


def _run(command: list[str], what: str) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as exc:
        raise ContribError(f"{what}: cannot run {command[0]} ({exc.strerror}): apt-get install gcc") from None
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
        raise ContribError(f"{what} failed: {errors[0] if errors else 'exit ' + str(result.returncode)}")


def _pkg_config(*args: str) -> list[str]:
    try:
        return subprocess.run(["pkg-config", *args], capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        raise ContribError("glib-2.0 is not known to pkg-config: apt-get install pkg-config libglib2.0-dev") from None


def _glib_version() -> str:
    try:
        return subprocess.run(["pkg-config", "--modversion", "glib-2.0"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "missing"


def _need_glib() -> None:
    """libglib2.0-dev is a build dependency of these two files alone: installed on first need (as root)."""
    if _glib_version() != "missing":
        return
    if os.geteuid() != 0:
        raise ContribError("libglib2.0-dev is missing and installing it needs root: apt-get install libglib2.0-dev")
    result = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "pkg-config", "libglib2.0-dev"],
                            capture_output=True, text=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if result.returncode != 0 or _glib_version() == "missing":
        raise ContribError("cannot install libglib2.0-dev with apt-get: run apt-get install libglib2.0-dev")


def main(argv: list[str]) -> int:
    try:
        print(ivshmem_client() if "--client" in argv else ivshmem_server())
    except ContribError as exc:
        print(f"qemu_contrib: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
