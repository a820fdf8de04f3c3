"""The built-in guest, booted under a real QEMU: build cache, image contents, handshake, messages, acks."""

from __future__ import annotations

import array
import gzip
import lzma
import mmap
import os
import select
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from shmguard.errors import ShmguardError
from shmguard.guest import (
    GUEST_SOURCES,
    GuestImage,
    build_guest,
    decompress_kernel,
    has_pvh_note,
    load_order,
    newc_archive,
)
from shmguard.layout import ACK_VECTOR, READY_VECTOR, REPLY_SIZE
from shmguard.qemu import QemuProcess, qemu_command

HOST, GUEST = 0, 1
BOOT_TIMEOUT = 60.0  # TCG boots in about 2.5 s; a loaded CI machine gets slack


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    return build_guest(log=lambda _line: None)


class HostPeerServer:
    """An ivshmem server that is itself the host (peer 0) and serves one QEMU as the guest (peer 1)."""

    def __init__(self, path: Path, vectors: int = 2, size: int = 4096):
        self.path, self.size = path, size
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.shm = os.memfd_create("test-region")
        os.ftruncate(self.shm, size)
        self.region = memoryview(mmap.mmap(self.shm, size))
        self.host_vectors = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(vectors)]
        self.guest_vectors = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(vectors)]
        self.peer: socket.socket | None = None

    def accept(self) -> None:
        assert select.select([self.listener], [], [], 10)[0], "QEMU never connected"
        self.peer, _ = self.listener.accept()
        greeting = [(0, None), (GUEST, None), (-1, self.shm)]
        greeting += [(HOST, fd) for fd in self.host_vectors] + [(GUEST, fd) for fd in self.guest_vectors]
        for value, fd in greeting:
            fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
            self.peer.sendmsg([struct.pack("<q", value)], fds)

    def write_message(self, text: bytes) -> None:
        self.region[: len(text)] = text
        if len(text) < self.size:
            self.region[len(text)] = 0

    def ring_guest(self, vector: int) -> None:
        os.write(self.guest_vectors[vector], struct.pack("<Q", 1))

    def reply(self) -> str:
        area = bytes(self.region[self.size - REPLY_SIZE :])
        return area[: area.index(b"\0")].decode()

    def close(self) -> None:
        self.region.release()
        for fd in [self.shm, *self.host_vectors, *self.guest_vectors]:
            os.close(fd)
        if self.peer:
            self.peer.close()
        self.listener.close()


class BootedGuest:
    """QEMU running the built-in guest against a HostPeerServer; the console is read while waiting."""

    def __init__(self, server: HostPeerServer, qemu: QemuProcess):
        self.server, self.qemu = server, qemu
        self.console: list[str] = []
        self._next_line = 0  # lines before it were matched already

    def wait_for_ring(self, vector: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        host_fd = self.server.host_vectors[vector]
        while time.monotonic() < deadline:
            ready = select.select([self.qemu.console_fd, host_fd], [], [], deadline - time.monotonic())[0]
            if self.qemu.console_fd in ready:  # keep the console flowing: a full pipe stalls the guest
                self.console += self.qemu.read_console()
            if host_fd in ready:
                os.read(host_fd, 8)
                return True
        return False

    def wait_for_line(self, prefix: str, timeout: float = 10.0) -> str:
        """The next console line that starts with prefix; it and the lines before it are used up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for index in range(self._next_line, len(self.console)):
                if self.console[index].startswith(prefix):
                    self._next_line = index + 1
                    return self.console[index]
            select.select([self.qemu.console_fd], [], [], 0.2)
            self.console += self.qemu.read_console()
        raise AssertionError(f"no console line {prefix!r} in {self.console[-5:]}")

    def send(self, text: bytes, vector: int = 0) -> str:
        self.server.write_message(text)
        self.server.ring_guest(vector)
        assert self.wait_for_ring(ACK_VECTOR, 30), f"no ack; console: {self.console[-3:]}"
        return self.server.reply()


@contextmanager
def booted_guest(tmp_path: Path, guest: GuestImage, host: int | None = HOST, iommu: bool = True):
    server = HostPeerServer(tmp_path / "ivshmem.sock")
    command = qemu_command(socket_path=str(server.path), vectors=2, guest=guest, host_peer_id=host, accel="tcg")
    if not iommu:
        at = command.index("intel-iommu,intremap=off")
        del command[at - 1 : at + 1]
    qemu = QemuProcess(command)
    try:
        server.accept()
        yield BootedGuest(server, qemu)
    finally:
        qemu.close()
        server.close()


@pytest.fixture
def booted(tmp_path, guest) -> Iterator[BootedGuest]:
    with booted_guest(tmp_path, guest) as running:
        yield running


# ---- the build ---------------------------------------------------------------------------------------


def test_second_build_comes_from_the_cache(guest):
    started = time.monotonic()
    again = build_guest(log=lambda line: pytest.fail(f"cached build still worked: {line}"))
    assert time.monotonic() - started < 1.0
    assert again == guest and guest.kernel.exists() and guest.initrd.exists()
    assert "shmguard.host" not in guest.cmdline and "intel_iommu=on" in guest.cmdline


def test_kernel_is_a_pvh_vmlinux(guest):
    assert guest.kernel.name == "vmlinux"
    assert has_pvh_note(guest.kernel.read_bytes())


def test_agent_compiles_without_warnings(tmp_path):
    command = ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(tmp_path / "agent")]
    subprocess.run([*command, str(GUEST_SOURCES / "agent.c")], check=True, capture_output=True)


def test_initrd_holds_init_busybox_agent_and_modules_in_load_order(guest):
    files = read_newc(guest.initrd.read_bytes())
    assert files["init"][0] & 0o777 == 0o755 and files["init"][1].startswith(b"#!/bin/busybox sh")
    assert files["dev/console"][0] == 0o20600  # character device: init's console before devtmpfs
    assert files["bin/shmguard-agent"][1].startswith(b"\x7fELF")
    assert files["bin/busybox"][1].startswith(b"\x7fELF")
    order = files["lib/modules/load-order"][1].decode().split()
    assert order.index("vfio") < order.index("vfio_iommu_type1") < order.index("vfio_pci")
    assert all(f"lib/modules/{name}.ko" in files for name in order)


def read_newc(archive: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) of a newc cpio archive."""
    files, pos = {}, 0
    while True:
        assert archive[pos : pos + 6] == b"070701"
        fields = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = archive[pos + 110 : pos + 110 + namesize - 1].decode()
        data_start = (pos + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return files
        files[name] = (mode, archive[data_start : data_start + size])
        pos = (data_start + size + 3) & ~3


def test_newc_archive_round_trips():
    files = read_newc(newc_archive([("a/b/c.txt", 0o644, b"hello"), ("x", 0o755, b"")]))
    assert files["a/b/c.txt"] == (0o100644, b"hello") and files["x"] == (0o100755, b"")
    assert files["a"][0] == files["a/b"][0] == 0o40755


def test_load_order_puts_dependencies_first_and_skips_built_ins():
    depends = {"vfio_pci": ["vfio_pci_core", "vfio"], "vfio_pci_core": ["vfio", "irqbypass"], "vfio": [],
               "vfio_iommu_type1": ["vfio"]}
    assert load_order(["vfio_iommu_type1", "vfio_pci"], depends, builtin={"irqbypass"}) == [
        "vfio", "vfio_iommu_type1", "vfio_pci_core", "vfio_pci"]
    with pytest.raises(ShmguardError, match="irqbypass"):
        load_order(["vfio_pci"], depends, builtin=set())


def test_decompress_kernel_finds_xz_and_gzip_payloads():
    elf = b"\x7fELF" + bytes(range(256)) * 64
    for packed in (lzma.compress(elf, format=lzma.FORMAT_XZ), gzip.compress(elf)):
        assert decompress_kernel(b"MZ setup code" + b"\x1f\x8b" * 3 + packed + b"\x00size") == elf
    assert decompress_kernel(b"no payload at all") is None


# ---- booting it ----------------------------------------------------------------------------------------


def test_guest_says_ready_then_prints_and_acks_every_message(booted):
    started = time.monotonic()
    assert booted.wait_for_ring(READY_VECTOR, BOOT_TIMEOUT), f"guest never rang; console: {booted.console}"
    print(f"boot to ready under TCG: {time.monotonic() - started:.2f} s")
    assert booted.server.reply() == f"ready {GUEST}"
    assert booted.wait_for_line("shmguard-guest: ready") == "shmguard-guest: ready peer=1 vectors=2 size=4096"

    region_size = booted.server.size
    cases = [
        (b"hello from the host", 0, "full"),
        (b"", 1, "full"),  # any vector carries a message
        (b"T" * region_size, 0, "truncated"),  # no NUL at all: everything but the last byte is shown
        (b"after the flood", 0, "truncated"),  # the region's last byte is still 'T'
    ]
    for number, (message, vector, kind) in enumerate(cases, start=1):
        started = time.monotonic()
        reply = booted.send(message, vector)
        round_trip = time.monotonic() - started
        text = message[: region_size - 1]
        assert reply == f"ack {number} {len(text)} {zlib.crc32(text):08x}"
        line = booted.wait_for_line(f"received IRQ and {kind} message: {text[:40].decode()}")
        assert line == f"received IRQ and {kind} message: {text.decode()}"
        print(f"round trip for {len(text)} bytes: {round_trip * 1000:.1f} ms")


def test_guest_without_host_prints_but_never_rings(tmp_path, guest):
    with booted_guest(tmp_path, guest, host=None) as booted:
        booted.wait_for_line("shmguard-guest: ready", BOOT_TIMEOUT)
        booted.server.write_message(b"nobody listens")
        booted.server.ring_guest(0)
        booted.wait_for_line("received IRQ and full message: nobody listens")
        assert not booted.wait_for_ring(ACK_VECTOR, 0.5) and not booted.wait_for_ring(READY_VECTOR, 0)
        assert booted.server.reply() == ""


def test_guest_without_iommu_says_why_and_stays_up(tmp_path, guest):
    with booted_guest(tmp_path, guest, iommu=False) as booted:
        line = booted.wait_for_line("shmguard-guest: error:", BOOT_TIMEOUT)
        assert "IOMMU" in line and "intel-iommu" in line
        time.sleep(0.5)
        assert booted.qemu.poll() is None  # the VM stays up so that its console stays readable
