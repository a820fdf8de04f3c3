"""The guest's own kernel: its config fragment, the cache, and the fall-back to Debian's cloud kernel."""

from __future__ import annotations

import re

import pytest

from shmguard import guest_kernel
from shmguard.errors import ShmguardError
from shmguard.guest import GUEST_SOURCES, build_guest, has_pvh_note
from shmguard.guest_kernel import build_kernel, cached_kernel, config_mismatches, config_path, missing_build_tools

FRAGMENT = config_path(GUEST_SOURCES).read_text()


@pytest.mark.parametrize(("fragment", "config", "wrong"), [
    ("CONFIG_A=y\n", "CONFIG_A=y\n", []),
    ("CONFIG_A=y\n", "# CONFIG_A is not set\n", ["CONFIG_A=y"]),
    ("CONFIG_A=n\n", "# CONFIG_A is not set\n", []),
    ("CONFIG_A=n\n", "", []),  # an option whose dependencies are off is absent: not set
    ("CONFIG_A=n\n", "CONFIG_A=y\n", ["CONFIG_A=n"]),  # selected by something else
    ("CONFIG_N=1\n# CONFIG_B=y in a comment\n", "CONFIG_N=2\n", ["CONFIG_N=1"]),
])
def test_config_mismatches_names_what_did_not_stick(fragment, config, wrong):
    assert config_mismatches(fragment, config) == wrong


def test_the_fragment_builds_in_what_the_agent_uses_and_leaves_out_what_tcg_pays_for():
    options = dict(re.findall(r"^(CONFIG_\w+)=(\S+)$", FRAGMENT, re.MULTILINE))
    for name in ("64BIT", "PVH", "PCI_MSI", "ACPI", "INTEL_IOMMU", "VFIO", "VFIO_IOMMU_TYPE1", "VFIO_PCI", "EVENTFD",
                 "SERIAL_8250_CONSOLE", "DEVTMPFS", "BLK_DEV_INITRD", "BINFMT_ELF"):
        assert options[f"CONFIG_{name}"] == "y", name
    for name in ("MODULES", "FTRACE", "KPROBES", "JUMP_LABEL", "CPU_MITIGATIONS", "PARAVIRT", "CRYPTO"):
        assert options[f"CONFIG_{name}"] == "n", name


def test_the_cached_kernel_is_built_from_the_fragment_as_a_pvh_vmlinux():
    """bootstrap's setup builds it (`shmguard guest build`); without it the guest boots Debian's kernel."""
    assert not missing_build_tools(), "scripts/bootstrap installs the kernel's build dependencies"
    built = cached_kernel(GUEST_SOURCES)
    assert built is not None, "`shmguard guest build` has not built the guest's kernel"
    assert config_mismatches(FRAGMENT, (built.vmlinux.parent / "config").read_text()) == []
    assert has_pvh_note(built.vmlinux.read_bytes())
    assert "linux-source-6.1" in built.description


def test_an_empty_kernel_cache_without_a_build_boots_debians_kernel_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("SHMGUARD_KERNEL_CACHE", str(tmp_path / "kernels"))
    lines: list[str] = []
    image = build_guest(log=lines.append)
    assert image.kernel_name.startswith("Debian's linux-image-") and "`shmguard guest build` builds it" in \
        image.kernel_name
    assert "-cloud-" in str(image.kernel.parent) and has_pvh_note(image.kernel.read_bytes())
    assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").glob("linux-*"))


def test_a_build_that_cannot_run_falls_back_to_debians_kernel_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SHMGUARD_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setattr(guest_kernel, "_LIBELF_HEADER", tmp_path / "no-gelf.h")
    with pytest.raises(ShmguardError, match=r"needs libelf-dev .*apt-get install make flex bison bc libelf-dev"):
        build_kernel(GUEST_SOURCES, log=lambda _line: None)
    lines: list[str] = []
    image = build_guest(log=lines.append, build=True)
    assert [line for line in lines if "cannot build" in line] == [
        f"guest: cannot build the guest's own kernel: {_missing_libelf()}; booting Debian's cloud kernel instead"]
    assert image.kernel_name.startswith("Debian's linux-image-") and "could not be built" in image.kernel_name


def _missing_libelf() -> str:
    return ("building the guest kernel needs libelf-dev (objtool's gelf.h): apt-get install "
            f"{' '.join(guest_kernel.BUILD_PACKAGES)} gcc libc6-dev")
