"""The built-in guest: build cache and image contents, then booted under a real QEMU joined to the real supervisor."""

from __future__ import annotations

import gzip
import lzma
import select
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator

import pytest

from helpers import RunningSupervisor, policy_file
from shmguard.control import WriteRequest
from shmguard.errors import ShmguardError
from shmguard.guest import (
    GUEST_CMDLINE,
    GUEST_SOURCES,
    QBOOT,
    GuestImage,
    build_guest,
    decompress_kernel,
    has_pvh_note,
    load_order,
    newc_archive,
)
from shmguard.qemu import QemuProcess, choose_accel, qemu_command

SIZE = 4096
BOOT_TIMEOUT = 60.0  # TCG boots in about 1 s; a loaded CI machine gets slack


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    return build_guest(log=lambda _line: None)


def status(supervisor: RunningSupervisor) -> dict:
    return supervisor.client().status()


def send(supervisor: RunningSupervisor, text: bytes, **fields) -> dict:
    return supervisor.client(timeout=90).ask(WriteRequest(text, text=True, **{"ring": "guest", **fields}))


def guest_lines(supervisor: RunningSupervisor) -> list[str]:
    """The guest's console lines that report a message, as the supervisor logged them."""
    return [line.split("guest: ", 1)[1] for line in supervisor.log().splitlines() if "guest: received IRQ" in line]


def wait_for_guest_lines(supervisor: RunningSupervisor, count: int, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(lines := guest_lines(supervisor)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return lines


# ---- the build ---------------------------------------------------------------------------------------


def test_second_build_comes_from_the_cache(guest):
    started = time.monotonic()
    again = build_guest(log=lambda line: pytest.fail(f"cached build still worked: {line}"))
    assert time.monotonic() - started < 1.0
    assert again == guest and guest.kernel.exists() and guest.initrd.exists()
    assert "shmguard.host" not in guest.cmdline and "intel_iommu=on" in guest.cmdline


def test_kernel_is_the_guests_own_as_a_pvh_vmlinux(guest):
    """bootstrap's setup builds it once; Debian's cloud kernel is only the fall-back (tests/test_guest_kernel.py)."""
    assert guest.kernel.name == "vmlinux" and guest.kernel_name.startswith("the guest's own kernel, built from "), \
        guest.kernel_name
    assert has_pvh_note(guest.kernel.read_bytes())


def test_guest_boots_with_qboot_and_a_lean_command_line(guest):
    assert QBOOT.is_file(), "qemu-system-data ships /usr/share/qemu/qboot.rom"
    assert guest.firmware == QBOOT
    assert guest.machine == "q35,sata=off,smbus=off,vmport=off,i8042=off,smm=off"
    words = GUEST_CMDLINE.split()
    expected = {"quiet", "cryptomgr.notests", "noapictimer", "no_timer_check", "mitigations=off", "pnpacpi=off"}
    assert expected <= set(words)
    assert any(word.startswith("initcall_blacklist=init_kprobe_trace,") for word in words)


@pytest.mark.parametrize("sources, defines", [(["agent.c"], []),  # the agent alone, a program of its own
                                              (["init.c", "agent.c"], ["-DAGENT_MAIN=agent_main"])])  # /init
def test_guest_programs_compile_without_warnings(tmp_path, sources, defines):
    command = ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", *defines, "-o", str(tmp_path / "program")]
    subprocess.run([*command, *(str(GUEST_SOURCES / source) for source in sources)], check=True, capture_output=True)


def test_initrd_holds_one_program_for_init_and_agent_and_no_shell_and_no_modules_for_the_own_kernel(guest):
    files = read_newc(guest.initrd.read_bytes())
    # guest/init.c with guest/agent.c linked in, static: the guest starts one program, never a second
    assert files["init"][0] & 0o777 == 0o755 and files["init"][1].startswith(b"\x7fELF")
    assert b"shmguard-guest: ready peer=" in files["init"][1] and b"vfio-pci did not take" in files["init"][1]
    assert files["dev/console"][0] == 0o20600  # character device: init's console before devtmpfs
    assert [name for name, (mode, _) in files.items() if mode & 0o170000 == 0o100000] == ["init"]
    assert "bin/busybox" not in files and "bin/sh" not in files
    assert not any(name.startswith("lib/modules/") for name in files)  # VFIO is built in
    config = (guest.kernel.parent / "config").read_text().splitlines()
    assert {"CONFIG_VFIO_PCI=y", "CONFIG_VFIO_IOMMU_TYPE1=y", "# CONFIG_MODULES is not set"} <= set(config)


def test_initrd_for_debians_kernel_holds_its_modules_in_load_order(tmp_path, monkeypatch):
    monkeypatch.setenv("SHMGUARD_KERNEL_CACHE", str(tmp_path))  # no own kernel here: the fall-back's image
    files = read_newc(build_guest(log=lambda _line: None).initrd.read_bytes())
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


def tiny_elf(payload: bytes) -> bytes:
    """A 64-bit ELF header, one PT_LOAD program header covering the file, then payload."""
    size = 64 + 56 + len(payload)
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    return header + struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, size, size, 0) + payload


def test_decompress_kernel_finds_lz4_xz_and_gzip_payloads():
    elf = tiny_elf(bytes(range(256)) * 64)
    # The kernel's LZ4 is the legacy frame (lz4 -l), as Debian's cloud kernel has it.
    lz4 = subprocess.run(["lz4", "-l", "-c", "-q"], input=elf, capture_output=True, check=True).stdout
    for packed in (lz4, lzma.compress(elf, format=lzma.FORMAT_XZ), gzip.compress(elf)):
        assert decompress_kernel(b"MZ setup code" + b"\x1f\x8b" * 3 + packed + b"\x00size") == elf
    assert decompress_kernel(b"no payload at all") is None


def test_decompress_kernel_refuses_an_elf_cut_short():
    elf = tiny_elf(bytes(range(256)) * 64)
    assert decompress_kernel(b"MZ" + gzip.compress(elf[:-100]) + b"\x00size") is None


# ---- booting it under the supervisor ---------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> Iterator[RunningSupervisor]:
    """`shmguard run` with the built-in guest, once the guest has said it is ready."""
    tmp_path = tmp_path_factory.mktemp("guest-boot")
    supervisor = RunningSupervisor(policy_file(tmp_path, region={"size": SIZE}), guest=True, timeout=BOOT_TIMEOUT)
    started = time.monotonic()
    supervisor.wait_for("guest ready", BOOT_TIMEOUT)
    print(f"supervisor READY=1 to guest ready: {time.monotonic() - started:.2f} s")
    yield supervisor
    assert supervisor.stop() == 0, supervisor.log()


def test_debians_cloud_kernel_still_boots_as_the_fall_back(tmp_path, monkeypatch):
    """No own kernel in its cache: the supervisor boots Debian's kernel with its modules, says so, and it acks."""
    monkeypatch.setenv("SHMGUARD_KERNEL_CACHE", str(tmp_path / "no-kernels"))
    supervisor = RunningSupervisor(policy_file(tmp_path, region={"size": SIZE}), guest=True, timeout=BOOT_TIMEOUT)
    try:
        supervisor.wait_for("guest ready", BOOT_TIMEOUT)
        assert "guest kernel: Debian's linux-image-" in supervisor.log()
        reply = send(supervisor, b"on the cloud kernel", wait=True, timeout=30)
        assert reply["ok"], reply
        assert wait_for_guest_lines(supervisor, 1) == ["received IRQ and full message: on the cloud kernel"]
    finally:
        assert supervisor.stop() == 0, supervisor.log()


def test_guest_names_its_peer_id_on_the_console_and_in_its_ready_reply(builtin):
    guest = status(builtin)["guest"]
    assert guest["handshake"] and guest["ready"] and guest["peer"] is not None
    builtin.wait_for_log(f"guest: shmguard-guest: ready peer={guest['peer']} vectors=2 size={SIZE}\n", 10)
    ready = [r for r in builtin.audit_records() if r["action"] == "guest-ready"]
    assert [r["detail"] for r in ready] == [{"reply": f"ready {guest['peer']}", "peer": guest["peer"]}]


def test_qemu_boots_the_builtin_guest_as_bootable_fast(builtin, guest):
    started = [line for line in builtin.log().splitlines() if "started QEMU pid" in line]
    assert len(started) == 1
    words = started[0].split()
    assert words[words.index("-bios") + 1] == str(guest.firmware) and words[words.index("-M") + 1] == guest.machine
    if "QEMU accelerator: tcg" in builtin.log():  # the guest's TSC is the host's: no calibration against the PIT
        assert any(word.startswith("tsc_early_khz=") for word in words), started[0]


def test_guest_acks_exactly_what_it_printed_on_any_vector(builtin):
    guest = status(builtin)["guest"]
    peer, acks = guest["peer"], guest["acks"]
    already = len(guest_lines(builtin))
    cases = [  # (message, ring target, extra request fields, what the guest shows, how)
        (b"", "guest", {}, b"", "full"),
        (b"on vector one", f"{peer}:1", {}, b"on vector one", "full"),  # any vector carries a message
        # No NUL at all: the guest shows all but the last byte, and acks what it showed, not what was written.
        (b"T" * SIZE, "guest", {"allow_unterminated": True}, b"T" * (SIZE - 1), "truncated"),
        (b"after the flood", "guest", {}, b"after the flood", "full"),  # the padding clears the last byte
    ]
    for number, (message, target, fields, shown, _) in enumerate(cases, start=acks + 1):
        reply = send(builtin, message, ring=target, wait=True, timeout=30, **fields)
        assert reply["ok"], reply
        assert reply["ack"] == f"ack {number} {len(shown)} {zlib.crc32(shown):08x}"
        assert reply["delivered_exactly"] == (shown == message), reply
        print(f"round trip for {len(message)} bytes: {reply['round_trip_ms']:.1f} ms")
    expected = [f"received IRQ and {kind} message: {shown.decode()}" for _, _, _, shown, kind in cases]
    assert wait_for_guest_lines(builtin, already + len(cases))[already:] == expected
    assert status(builtin)["guest"]["acks"] == acks + len(cases)


def test_guest_without_host_prints_but_never_rings(tmp_path, guest):
    # An external guest to the supervisor: the built-in image without shmguard.host, so no handshake either way.
    assert "shmguard.host" not in guest.cmdline
    supervisor = RunningSupervisor(
        policy_file(tmp_path, region={"size": SIZE}), "--guest-kernel", str(guest.kernel),
        "--guest-initrd", str(guest.initrd), "--guest-append", guest.cmdline, guest=True, timeout=BOOT_TIMEOUT,
    )
    try:
        peer = int(supervisor.wait_for_log(r"guest: shmguard-guest: ready peer=(\d+)", BOOT_TIMEOUT).group(1))
        guest_state = status(supervisor)["guest"]
        assert guest_state["peer"] == peer and not guest_state["handshake"] and not guest_state["ready"]
        reply = send(supervisor, b"nobody listens")
        assert reply["ok"] and "ack" not in reply, reply  # nothing waits for an ack that never comes
        assert [(r["peer"], r["vector"], r["guest"], r["held_until_ready"]) for r in reply["rang"]] == [
            (peer, 0, True, False)]
        supervisor.wait_for_log("guest: received IRQ and full message: nobody listens\n", 10)
        time.sleep(0.5)  # an ack would follow the print at once
        guest_state = status(supervisor)["guest"]
        assert guest_state["acks"] == 0 and guest_state["last_reply"] == ""
        log = supervisor.log()
        assert "guest acknowledged" not in log and "host rung" not in log and "guest ready" not in log, log
    finally:
        supervisor.stop()


def wait_for_console_line(qemu: QemuProcess, prefix: str, timeout: float) -> str:
    console: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([qemu.console_fd], [], [], 0.2)
        for line in qemu.read_console():
            console.append(line)
            if line.startswith(prefix):
                return line
    raise AssertionError(f"no console line {prefix!r} within {timeout} s in {console[-5:]}")


def test_guest_without_iommu_says_why_and_stays_up(tmp_path, guest):
    supervisor = RunningSupervisor(policy_file(tmp_path, region={"size": SIZE}))  # serves only: QEMU is ours
    try:
        host = status(supervisor)["host_peer"]
        accel, _ = choose_accel(kernel=guest.kernel)
        command = qemu_command(socket_path=supervisor.socket, vectors=supervisor.policy["server"]["vectors"],
                               guest=guest, host_peer_id=host, accel=accel)
        at = command.index("intel-iommu,intremap=off")
        del command[at - 1 : at + 1]
        with QemuProcess(command) as qemu:
            line = wait_for_console_line(qemu, "shmguard-guest: error:", BOOT_TIMEOUT)
            assert "IOMMU" in line and "intel-iommu" in line
            time.sleep(0.5)
            assert qemu.poll() is None  # the VM stays up so that its console stays readable
            assert qemu.pid in [p.get("pid") for p in status(supervisor)["peers"]]  # and stays joined
            assert status(supervisor)["guest"]["ready"] is False
    finally:
        supervisor.stop()
