"""Builds the built-in guest: a kernel plus an initrd with /init, the agent and (for Debian's kernel) its VFIO modules.

The kernel is the guest's own, built from Debian's kernel source with guest/kernel.config by
`shmguard guest build` (shmguard/guest_kernel.py: everything built in, nothing the guest does not use). Where
that cannot be built, or has not been yet, it is Debian's cloud kernel from the archive (`apt-get download`,
never installed) and its VFIO modules. The image is cached by kernel + a hash of the guest sources, so a second
build only checks files; GuestImage.kernel_name says which kernel it is.

What the boot costs under TCG, and what is done about it (docs/guest.md has the figures):
- the guest's own kernel has no code to patch at boot, no modules and no initcalls but its drivers'; the cloud
  kernel (linux-image-cloud-amd64) has a fraction of the generic one's drivers and initcalls;
- it is booted as the decompressed vmlinux through its PVH entry (no decompression under emulation);
- GUEST_CMDLINE skips what an emulated CPU pays dearly for and the agent never needs;
- /init is a small static C program (guest/init.c) with the agent (guest/agent.c) linked in: no shell, no fork
  and no exec; the initrd holds only it and the modules, uncompressed (copying 1 MB is cheaper than inflating it
  under TCG);
- QEMU boots it with the qboot firmware where Debian ships it (shmguard/qemu.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

from shmguard.errors import ShmguardError
from shmguard.guest_kernel import BuiltKernel, build_kernel, cached_kernel
from shmguard.values import Value, value

# guest/ at the top of the repository, installed as shmguard.guest_sources (a directory, never a zip). Found by its
# import spec, not importlib.resources, which a supervisor's start would pay for (~5 ms of imports, zipfile's among
# them) and never use again.
GUEST_SOURCES = Path(importlib.util.find_spec("shmguard.guest_sources").submodule_search_locations[0])
# The cloud flavour: the drivers of virtual machines only, and VFIO as modules, as the agent needs.
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
# vfio_pci drives the device; vfio_iommu_type1 is the container's IOMMU backend (not a dependency of it).
ROOT_MODULES = ("vfio_iommu_type1", "vfio_pci")
# Initcalls the agent never needs that cost the most under TCG: the kprobe-events tracefs files (~0.45 s, the
# trace event table is rewritten behind them), the X.509 certificates and IMA/EVM keys (modules are unsigned
# here, and nothing is appraised), the KDF self-test, fs-verity, the trace_printk export.
SKIPPED_INITCALLS = (
    "init_kprobe_trace", "load_system_certificate_list", "crypto_kdf108_init", "init_ima", "init_encrypted",
    "fsverity_init", "init_trace_printk_function_export",
)
# mitigations=off saves ~0.3 s of boot under TCG; the guest runs nothing but the agent. cryptomgr.notests skips
# the crypto self-tests; noapictimer and no_timer_check skip calibrating and checking the local APIC timer
# (the HPET ticks instead), which an emulated CPU does slowly. pnpacpi=off skips evaluating every ACPI device's
# resources for the PnP layer (pnpacpi_init, 10-17 ms under TCG): its only device here is the serial port, which
# the 8250 driver finds at its legacy address all the same, and PCI, the IOMMU and the HPET come from ACPI itself.
FAST_BOOT_PARAMS = (
    f"mitigations=off cryptomgr.notests noapictimer no_timer_check pnpacpi=off "
    f"initcall_blacklist={','.join(SKIPPED_INITCALLS)}"
)
GUEST_CMDLINE = (
    f"console=ttyS0 quiet loglevel=3 panic=-1 {FAST_BOOT_PARAMS}"
    " intel_iommu=on vfio_iommu_type1.allow_unsafe_interrupts=1"
)

# The built-in guest needs none of q35's SATA controller, SMBus, VMware port, keyboard controller or SMM: fewer
# devices for the firmware, the ACPI tables and the kernel to go through. (pit=off would cost the TSC calibration.)
LEAN_Q35 = "q35,sata=off,smbus=off,vmport=off,i8042=off,smm=off"
# qboot (in qemu-system-data) starts a -kernel in a few milliseconds where SeaBIOS takes a few hundred under TCG.
QBOOT = Path("/usr/share/qemu/qboot.rom")

Log = Callable[[str], None]


@value
class GuestImage(Value):
    kernel: Path
    initrd: Path | None
    cmdline: str  # without shmguard.host=, which qemu_command adds
    firmware: Path | None = None  # QEMU's -bios; None keeps QEMU's default (SeaBIOS)
    machine: str = "q35"  # QEMU's -M
    kernel_name: str = ""  # which kernel it is, for the log ("" for a kernel given by the user)


def default_cache_dir() -> Path:
    if env := os.environ.get("SHMGUARD_GUEST_CACHE"):
        return Path(env)
    # In a writable checkout, guest/build (ignored by git); an installed package never caches inside itself.
    in_checkout = GUEST_SOURCES / "build"
    checkout = (GUEST_SOURCES.parent / "pyproject.toml").is_file()
    if checkout and os.access(GUEST_SOURCES, os.W_OK) and (not in_checkout.exists() or os.access(in_checkout, os.W_OK)):
        return in_checkout
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shmguard" / "guest"


def build_guest(cache_dir: Path | None = None, log: Log = print, build: bool = False) -> GuestImage:
    """The built-in guest's image, from the cache when it is there. build: also build the guest's own kernel if
    it is not cached (minutes, once: `shmguard guest build`); without it, a supervisor starting boots the cached
    one or else Debian's cloud kernel, never waiting for a compiler."""
    cache = cache_dir or default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    own, why_not = _own_kernel(build, log)
    if own is not None:
        kernel, modules, kernel_name = own.vmlinux, [], f"the guest's own kernel, {own.description}"
        image_dir = cache / f"guest-own-{own.vmlinux.parent.name}-{_sources_hash()}"
        kernel_dir = None
    else:
        kernel_dir = _kernel(cache, log)
        kernel_meta = json.loads((kernel_dir / "kernel.json").read_text())
        kernel, modules = kernel_dir / kernel_meta["kernel"], kernel_meta["modules"]
        kernel_name = f"Debian's {kernel_dir.name.removeprefix('kernel-')} ({why_not})"
        image_dir = cache / f"guest-{kernel_dir.name.removeprefix('kernel-')}-{_sources_hash()}"
    image = GuestImage(kernel, image_dir / "initrd.cpio", GUEST_CMDLINE, QBOOT if QBOOT.is_file() else None,
                       LEAN_Q35, kernel_name)
    if not image_dir.exists():
        log(f"guest: building the initrd in {image_dir}")
        _build_initrd(image_dir, kernel_dir, modules, "guest-own-*" if own else "guest-linux-image-*")
    return image


def _own_kernel(build: bool, log: Log) -> tuple[BuiltKernel | None, str]:
    """The guest's own kernel (built now if build), or None and why it is not booted."""
    if not build:
        found = cached_kernel(GUEST_SOURCES)
        return found, "" if found else "the guest's own kernel is not built: `shmguard guest build` builds it"
    try:
        return build_kernel(GUEST_SOURCES, log), ""
    except ShmguardError as error:
        log(f"guest: cannot build the guest's own kernel: {error}; booting Debian's cloud kernel instead")
        return None, f"the guest's own kernel could not be built: {error}"


# ---- the kernel: resolve, download, extract, decompress -------------------------------------------


def _kernel(cache: Path, log: Log) -> Path:
    """The cache directory of the current Debian kernel, fetched on first use."""
    package = _kernel_package(cache, log)
    kernel_dir = cache / f"kernel-{package}"
    if (kernel_dir / "kernel.json").exists():
        return kernel_dir
    try:
        _fetch_kernel(package, kernel_dir, log)
    except ShmguardError as error:
        older = _cached_kernels(cache)
        if not older:
            raise
        log(f"guest: {error}; booting the cached {older[-1].name.removeprefix('kernel-')} instead")
        return older[-1]
    return kernel_dir


def _cached_kernels(cache: Path) -> list[Path]:
    return sorted(meta.parent for meta in cache.glob("kernel-linux-image-*/kernel.json"))


def _kernel_package(cache: Path, log: Log) -> str:
    """KERNEL_META_PACKAGE's dependency, remembered until the apt lists change (apt-cache takes ~0.7 s)."""
    memo = cache / "kernel-package.json"
    try:
        remembered = json.loads(memo.read_text())
        if remembered["apt_lists"] == _apt_lists_fingerprint() and remembered.get("meta") == KERNEL_META_PACKAGE:
            return remembered["package"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # nothing remembered yet
    package = _resolve_kernel_package()
    if package is None:
        if cached := _cached_kernels(cache):
            log("guest: apt-cache cannot resolve the kernel; using the cached one")
            return cached[-1].name.removeprefix("kernel-")
        log("guest: apt-cache knows no kernel yet: running apt-get update")
        _run(["apt-get", "update"], "update the package lists with apt-get update")
        package = _resolve_kernel_package()
    if package is None:
        raise ShmguardError(f"apt-cache cannot resolve {KERNEL_META_PACKAGE}: this needs a Debian 12 host")
    remembered = {"apt_lists": _apt_lists_fingerprint(), "meta": KERNEL_META_PACKAGE, "package": package}
    memo.write_text(json.dumps(remembered))
    return package


def _apt_lists_fingerprint() -> list[list]:
    lists = Path("/var/lib/apt/lists")
    files = sorted(lists.glob("*_Packages*")) if lists.is_dir() else []
    return [[f.name, f.stat().st_mtime_ns, f.stat().st_size] for f in files]


def _resolve_kernel_package() -> str | None:
    try:
        out = subprocess.run(
            ["apt-cache", "depends", KERNEL_META_PACKAGE], capture_output=True, text=True, check=False
        ).stdout
    except FileNotFoundError:
        return None
    match = re.search(r"Depends: (linux-image-\S+)", out)
    return match.group(1) if match else None


def _fetch_kernel(package: str, kernel_dir: Path, log: Log) -> None:
    log(f"guest: downloading {package} from the Debian archive")
    with tempfile.TemporaryDirectory(dir=kernel_dir.parent, prefix="fetch-") as tmp:
        work = Path(tmp)
        what = f"download {package} into {kernel_dir.parent} with apt-get download (needs the Debian archive)"
        _run(["apt-get", "download", package], what, cwd=work)
        deb = next(work.glob("*.deb"))
        _run(["dpkg-deb", "-x", str(deb), str(work / "root")], f"unpack {deb.name} with dpkg-deb")
        staging = work / "kernel"
        staging.mkdir()
        kernel_name = _stage_kernel(work / "root", staging, log)
        modules = _stage_modules(work / "root", staging)
        meta = {"deb": deb.name, "kernel": kernel_name, "modules": modules}
        (staging / "kernel.json").write_text(json.dumps(meta, indent=1))
        _publish(staging, kernel_dir, "kernel-linux-image-*")


def _stage_kernel(root: Path, staging: Path, log: Log) -> str:
    """Writes vmlinux (PVH entry: boots far faster under TCG) or, failing that, vmlinuz."""
    vmlinuz = next((root / "boot").glob("vmlinuz-*"))
    vmlinux = decompress_kernel(vmlinuz.read_bytes())
    if vmlinux is not None and has_pvh_note(vmlinux):
        (staging / "vmlinux").write_bytes(vmlinux)
        return "vmlinux"
    log("guest: no PVH vmlinux inside the kernel image; booting vmlinuz (slower)")
    shutil.copy(vmlinuz, staging / "vmlinuz")
    return "vmlinuz"


def _stage_modules(root: Path, staging: Path) -> list[str]:
    """Copies the VFIO modules and returns them in load order (dependencies first)."""
    module_root = next((root / "lib" / "modules").iterdir())
    files = {_module_name(p): p for p in module_root.rglob("*.ko")}
    builtin = {_module_name(Path(line)) for line in (module_root / "modules.builtin").read_text().split()}
    order = load_order(ROOT_MODULES, {name: _module_depends(path) for name, path in files.items()}, builtin)
    for name in order:
        shutil.copy(files[name], staging / f"{name}.ko")
    return order


def _module_name(path: Path) -> str:
    return path.name.removesuffix(".ko").replace("-", "_")


def _module_depends(path: Path) -> list[str]:
    match = re.search(rb"\0depends=([^\0]*)\0", path.read_bytes())
    names = match.group(1).decode().split(",") if match else []
    return [n.replace("-", "_") for n in names if n]


def load_order(roots: Iterable[str], depends: dict[str, list[str]], builtin: set[str]) -> list[str]:
    """The modules needed for roots, each after its dependencies; built-in ones are left out."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in builtin or name in order:
            return
        if name not in depends:
            raise ShmguardError(f"kernel module {name} is neither built in nor shipped in the kernel package")
        for dep in depends[name]:
            visit(dep)
        order.append(name)

    for root in roots:
        visit(root)
    return order


def decompress_kernel(vmlinuz: bytes) -> bytes | None:
    """The ELF vmlinux inside a bzImage, found by the compressed payload's magic; None if none works."""
    for magic, inflate in _PAYLOADS:
        start = vmlinuz.find(magic)
        while start != -1:
            try:
                data = inflate(vmlinuz[start:])
            except (lzma.LZMAError, zlib.error, OSError, subprocess.CalledProcessError):
                data = b""
            if _whole_elf(data):
                return data
            start = vmlinuz.find(magic, start + 1)
    return None


def _inflate_xz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _inflate_gzip(data: bytes) -> bytes:
    return zlib.decompressobj(wbits=31).decompress(data)


def _inflate_zstd(data: bytes) -> bytes:
    # The stdlib has no zstd; the payload is followed by trailing bytes, which zstd -d tolerates.
    return _inflate_with(["zstd", "-dcq"], data)


def _inflate_lz4(data: bytes) -> bytes:
    # The kernel's legacy LZ4 frame; lz4 -d writes it all, then exits 1 on the trailing bytes (_whole_elf checks).
    return _inflate_with(["lz4", "-dcq"], data)


def _inflate_with(command: list[str], data: bytes) -> bytes:
    try:
        return subprocess.run(command, input=data, capture_output=True, check=False).stdout
    except FileNotFoundError:
        raise ShmguardError(f"{command[0]} not found: the kernel is {command[0]}-compressed; "
                            f"apt-get install {command[0]}") from None


def _whole_elf(data: bytes) -> bool:
    """An ELF image whose program headers and segments all lie inside data (an inflater stopped short fails)."""
    if not data.startswith(b"\x7fELF\x02") or len(data) < 0x40:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    if phoff + phnum * phentsize > len(data):
        return False
    for i in range(phnum):
        _, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_offset + p_filesz > len(data):
            return False
    return True


_PAYLOADS = (
    (b"\x02\x21\x4c\x18", _inflate_lz4),  # Debian 12's cloud kernel uses CONFIG_KERNEL_LZ4
    (b"\xfd7zXZ\x00", _inflate_xz),  # its generic kernel CONFIG_KERNEL_XZ
    (b"\x28\xb5\x2f\xfd", _inflate_zstd),
    (b"\x1f\x8b\x08\x00", _inflate_gzip),
)

XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point QEMU's -kernel looks for


def has_pvh_note(elf: bytes) -> bool:
    """True for a 64-bit little-endian ELF with a Xen PHYS32_ENTRY note in a PT_NOTE segment."""
    if elf[:5] != b"\x7fELF\x02":
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type == 4 and _notes_have_pvh(elf[p_offset : p_offset + p_filesz]):
            return True
    return False


def _notes_have_pvh(notes: bytes) -> bool:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, note_type = struct.unpack_from("<III", notes, pos)
        name = notes[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
        if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        pos += 12 + _align4(namesz) + _align4(descsz)
    return False


def _align4(n: int) -> int:
    return (n + 3) & ~3


# ---- the initrd -------------------------------------------------------------------------------------


def _sources_hash() -> str:
    digest = hashlib.sha256()
    for path in (GUEST_SOURCES / "agent.c", GUEST_SOURCES / "init.c", Path(__file__)):
        try:
            digest.update(path.read_bytes())
        except OSError as error:
            raise ShmguardError(f"guest source {path} is unreadable ({error.strerror}): {_INSTALL_HINT}") from None
    return digest.hexdigest()[:16]


_INSTALL_HINT = "reinstall shmguard (its package carries guest/) and apt-get install gcc libc6-dev lz4"


def _build_initrd(image_dir: Path, kernel_dir: Path | None, modules: list[str], siblings: str) -> None:
    """/init with the agent linked in, and the modules to load (none for the guest's own kernel: no lib/modules
    at all); older images of the same kind (siblings) go."""
    with tempfile.TemporaryDirectory(dir=image_dir.parent, prefix="build-") as tmp:
        staging = Path(tmp) / "guest"
        staging.mkdir()
        init = staging / "init"
        # One program: init.c's main goes on as agent.c's agent_main, so the guest starts one program, not two.
        _compile([GUEST_SOURCES / "init.c", GUEST_SOURCES / "agent.c"], init, ["-DAGENT_MAIN=agent_main"])
        files = [("init", 0o755, init.read_bytes())]
        if modules:
            assert kernel_dir is not None
            files.append(("lib/modules/load-order", 0o644, "".join(f"{m}\n" for m in modules).encode()))
            files += [(f"lib/modules/{m}.ko", 0o644, (kernel_dir / f"{m}.ko").read_bytes()) for m in modules]
        (staging / "initrd.cpio").write_bytes(newc_archive(files))  # /init stays beside it, for whoever looks
        _publish(staging, image_dir, siblings)


def _publish(staging: Path, final: Path, siblings: str) -> None:
    """Renames a finished directory into place (a directory that exists is complete) and drops older ones."""
    try:
        staging.rename(final)
    except OSError:
        if not final.is_dir():
            raise
        # another build finished the same directory first: its copy is as good as ours
    for old in final.parent.glob(siblings):
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def _compile(sources: list[Path], output: Path, defines: list[str]) -> None:
    names = " and ".join(str(source) for source in sources)
    if shutil.which("gcc") is None:
        raise ShmguardError(f"gcc not found: {names} are compiled with gcc -static; apt-get install gcc libc6-dev")
    command = ["gcc", "-static", "-O2", "-s", "-Wall", "-Wextra", *defines, "-o", str(output), *map(str, sources)]
    _run(command, f"compile {names} with gcc -static (needs gcc and libc6-dev)")


def newc_archive(files: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of regular files, their parent directories and /dev/console."""
    dirs = sorted({str(p) for name, _, _ in files for p in Path(name).parents if str(p) != "."} | _BASE_DIRS)
    entries = [(d, stat.S_IFDIR | 0o755, b"", 0, 0) for d in dirs]
    # The kernel opens /dev/console for init before anything mounts devtmpfs.
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", 5, 1))
    entries += [(name, stat.S_IFREG | mode, data, 0, 0) for name, mode, data in files]
    out = bytearray()
    for ino, entry in enumerate(entries, start=1):
        out += _newc_entry(ino, *entry)
    out += _newc_entry(0, "TRAILER!!!", 0, b"", 0, 0)
    return bytes(out)


_BASE_DIRS = {"bin", "dev", "lib", "proc", "sys", "tmp"}


def _newc_entry(ino: int, name: str, mode: int, data: bytes, rdev_major: int, rdev_minor: int) -> bytes:
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev_major, rdev_minor, len(name) + 1, 0)
    header = b"070701" + b"".join(b"%08x" % field for field in fields) + name.encode() + b"\0"
    return header + _pad4(header) + data + _pad4(data)


def _pad4(data: bytes) -> bytes:
    return b"\0" * (-len(data) % 4)


def _run(command: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ShmguardError(f"cannot {what}: {command[0]} not found; {_INSTALL_HINT}") from None
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"exit status {result.returncode}"
        raise ShmguardError(f"cannot {what}: {reason}")
