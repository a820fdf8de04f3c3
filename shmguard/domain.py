"""A libvirt domain for the built-in guest, as `shmguard guest domain-xml` prints it.

`domain_xml` is pure: it only writes XML. `install_image` copies the guest image where libvirt may chown it:
libvirt's dynamic_ownership gives <kernel> and <initrd> to its QEMU user while the VM runs, so they must never
be the build cache's own files.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from .errors import ShmguardError
from .guest import GuestImage
from .layout import ACK_VECTOR, HOST_PEER_PARAM

IMAGE_DIR = Path("/var/lib/libvirt/boot")  # Debian's libvirt keeps kernels for direct boot here
SERIAL_LOG_DIR = Path("/var/log/libvirt/qemu")
QEMU = "/usr/bin/qemu-system-x86_64"
# libvirt refuses a domain name with '/'; the name also names the image directory and the serial log.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
_MEMORY = re.compile(r"(\d+)([KMG]?)(?:i?B)?", re.IGNORECASE)


@dataclass(frozen=True)
class Domain:
    name: str
    socket: str
    vectors: int
    host_peer: int
    kernel: Path
    initrd: Path | None
    cmdline: str
    memory: str = "256M"
    serial_log: Path | None = None  # default: /var/log/libvirt/qemu/NAME-serial.log
    kvm: bool = False


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ShmguardError(f"domain name {name!r}: use 1 to 64 letters, digits and _.+- (no '/'), starting with "
                            "a letter or digit")
    return name


def memory_kib(text: str) -> int:
    """The policy's qemu.memory ("256M", "1G", "262144K", bytes) in KiB, as libvirt's <memory> takes it."""
    match = _MEMORY.fullmatch(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ShmguardError(f"qemu.memory {text!r} is not a size such as 256M")
    number, unit = int(match.group(1)), match.group(2).upper()
    return number // 1024 if not unit else number << {"K": 0, "M": 10, "G": 20}[unit]


def domain_xml(domain: Domain) -> str:
    """The domain as libvirt 9 takes it: q35 with an Intel IOMMU whose interrupt remapping is off (vfio-pci in the
    guest needs the IOMMU; QEMU's ivshmem-doorbell has no remapping support), direct kernel boot with the host's
    peer id on the command line, the ivshmem-doorbell device on shmguard's socket, the serial console in a file,
    and every way out of the guest (it ignores ACPI shutdown) ending the domain. ACPI itself must stay on: the
    guest kernel finds the IOMMU in its DMAR table, and libvirt runs QEMU with -no-acpi without <acpi/>."""
    if domain.vectors <= ACK_VECTOR:
        raise ShmguardError(f"the built-in guest acknowledges on vector {ACK_VECTOR}: the policy's server.vectors "
                            f"must be at least {ACK_VECTOR + 1}")
    serial = domain.serial_log or SERIAL_LOG_DIR / f"{domain.name}-serial.log"
    initrd = f"\n    <initrd>{escape(str(domain.initrd))}</initrd>" if domain.initrd else ""
    cmdline = f"{domain.cmdline} {HOST_PEER_PARAM}={domain.host_peer}"
    return f"""<domain type='{"kvm" if domain.kvm else "qemu"}'>
  <name>{escape(domain.name)}</name>
  <memory unit='KiB'>{memory_kib(domain.memory)}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(domain.kernel))}</kernel>{initrd}
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{QEMU}</emulator>
    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path={quoteattr(str(serial))}/>
      <target port='0'/>
    </serial>
    <shmem name='shmguard'>
      <model type='ivshmem-doorbell'/>
      <server path={quoteattr(domain.socket)}/>
      <msi vectors='{domain.vectors}' ioeventfd='on'/>
    </shmem>
    <iommu model='intel'>
      <driver intremap='off'/>
    </iommu>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def install_image(image: GuestImage, name: str, image_dir: Path = IMAGE_DIR) -> GuestImage:
    """A copy of the image in IMAGE_DIR/NAME/, replaced only when its contents changed (a running VM keeps the
    files it opened: each copy is renamed into place)."""
    target = image_dir / check_name(name)
    try:
        target.mkdir(parents=True, exist_ok=True)
        kernel = _copy_if_changed(image.kernel, target / image.kernel.name)
        initrd = _copy_if_changed(image.initrd, target / image.initrd.name) if image.initrd else None
    except OSError as exc:
        raise ShmguardError(f"cannot copy the guest image into {target}: {exc.strerror}; give --image-dir a "
                            "directory libvirt's QEMU user can read") from None
    return GuestImage(kernel, initrd, image.cmdline)


def _copy_if_changed(source: Path, destination: Path) -> Path:
    if destination.exists() and _digest(destination) == _digest(source):
        return destination
    fd, staging = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}-")
    os.close(fd)
    shutil.copyfile(source, staging)
    os.chmod(staging, 0o644)
    os.replace(staging, destination)
    return destination


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
