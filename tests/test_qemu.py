"""shmguard.qemu against a real QEMU joined to the real supervisor: command line, process handling, console,
monitor, KVM-or-TCG."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import RunningSupervisor, policy_file
from shmguard.errors import ShmguardError
from shmguard.guest import GuestImage, build_guest
from shmguard.linux import procfs
from shmguard.qemu import (
    QemuProcess,
    choose_accel,
    clean_console_line,
    cpu_has_virtualization,
    monitor_command,
    probe_boot,
    qemu_command,
    tcg_tsc_hint,
)

REPO = Path(__file__).resolve().parent.parent
BOOT_ID = procfs.boot_id()  # the form choose_accel caches


@pytest.fixture(scope="module")
def supervisor(tmp_path_factory):
    """The real server: `shmguard run --no-guest`, which QEMU joins as a plain peer."""
    running = RunningSupervisor(policy_file(tmp_path_factory.mktemp("qemu"), region={"size": 4096}))
    yield running
    assert running.stop() == 0, running.log()


def peers_by_pid(supervisor: RunningSupervisor) -> dict[int, dict]:
    status = supervisor.client().status()
    return {peer["pid"]: peer for peer in status["peers"] if "pid" in peer}


def wait_for_peer(supervisor: RunningSupervisor, pid: int, present: bool = True, timeout: float = 10.0) -> dict:
    """The supervisor's view of peer `pid` once it has joined (or {} once it has left)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        peer = peers_by_pid(supervisor).get(pid)
        if (peer is not None) == present:
            return peer or {}
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} {'never joined' if present else 'never left'}:\n{supervisor.log_tail()}")


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    return build_guest(log=lambda _line: None)


def sh(script: str) -> QemuProcess:
    """QemuProcess runs any argv: a shell stands in for QEMU where only the process handling matters."""
    return QemuProcess(["sh", "-c", script])


def read_lines_until_eof(process: QemuProcess, timeout: float = 10.0) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while not process.console_eof and time.monotonic() < deadline:
        select.select([process.console_fd], [], [], 0.5)
        lines += process.read_console()
    return lines


# ---- the command line ----------------------------------------------------------------------------


def test_command_without_guest_parks_the_cpu_and_keeps_the_device():
    command = qemu_command(socket_path="/run/s.sock", vectors=4, guest=None, host_peer_id=None, accel="tcg")
    assert command[0] == "qemu-system-x86_64"
    assert " ".join(command).startswith("qemu-system-x86_64 -M q35 -accel tcg -m 256M")
    assert "-S" in command and "-kernel" not in command and "-no-reboot" in command
    assert command[command.index("-chardev") + 1] == "socket,path=/run/s.sock,id=ivs"
    assert "ivshmem-doorbell,chardev=ivs,vectors=4" in command
    assert "intel-iommu,intremap=off" in command


def test_command_with_guest_boots_it_and_names_the_host():
    guest = GuestImage(Path("/k/vmlinux"), Path("/k/initrd.cpio"), "console=ttyS0 quiet")
    command = qemu_command(
        socket_path="/s", vectors=2, guest=guest, host_peer_id=7, accel="kvm", memory="128M",
        monitor_path="/m.sock", extra_args=["-smp", "2"],
    )
    assert command[command.index("-kernel") + 1] == "/k/vmlinux"
    assert command[command.index("-initrd") + 1] == "/k/initrd.cpio"
    assert command[command.index("-append") + 1] == "console=ttyS0 quiet shmguard.host=7"
    assert command[command.index("-monitor") + 1] == "unix:/m.sock,server=on,wait=off"
    assert command[command.index("-accel") + 1] == "kvm" and command[command.index("-m") + 1] == "128M"
    assert command[-2:] == ["-smp", "2"] and "-S" not in command


def test_command_boots_the_guest_with_its_firmware_if_it_has_one():
    guest = GuestImage(Path("/k/vmlinux"), None, "console=ttyS0", Path("/fw/qboot.rom"))
    command = qemu_command(socket_path="/s", vectors=2, guest=guest, host_peer_id=None, accel="tcg")
    assert command[command.index("-bios") + 1] == "/fw/qboot.rom"
    assert command[command.index("-M") + 1] == "q35"  # a guest image says when it needs less of the machine
    lean = GuestImage(Path("/k/vmlinux"), None, "", machine="q35,sata=off")
    assert qemu_command(socket_path="/s", vectors=2, guest=lean, host_peer_id=None, accel="tcg")[1:3] == [
        "-M", "q35,sata=off"]
    assert "-bios" not in qemu_command(socket_path="/s", vectors=2, guest=GuestImage(Path("/k"), None, ""),
                                       host_peer_id=None, accel="tcg")
    assert "-bios" not in qemu_command(socket_path="/s", vectors=2, guest=None, host_peer_id=None, accel="tcg")


def test_command_without_host_leaves_the_guest_printing_only():
    guest = GuestImage(Path("/k/vmlinuz"), None, "console=ttyS0")
    command = qemu_command(socket_path="/s", vectors=2, guest=guest, host_peer_id=None, accel="tcg")
    assert command[command.index("-append") + 1] == "console=ttyS0" and "-initrd" not in command


def test_command_refuses_a_host_id_without_a_guest():
    with pytest.raises(ValueError):
        qemu_command(socket_path="/s", vectors=2, guest=None, host_peer_id=0, accel="tcg")


# ---- a real QEMU -----------------------------------------------------------------------------------


def test_qemu_without_guest_joins_the_supervisor_and_shows_the_device(supervisor, tmp_path):
    monitor = str(tmp_path / "monitor.sock")
    command = qemu_command(
        socket_path=supervisor.socket, vectors=2, guest=None, host_peer_id=None, accel="tcg", monitor_path=monitor,
    )
    with QemuProcess(command) as qemu:
        peer = wait_for_peer(supervisor, qemu.pid)
        assert peer["vectors"] == 2 and peer["uid"] == os.getuid()
        assert "1af4:1110" in monitor_command(monitor, "info pci")
        assert qemu.poll() is None
        assert qemu.read_console() == []  # nothing runs, so nothing prints; and reading never blocks
        assert qemu.terminate() == 0  # QEMU exits cleanly on SIGTERM
    assert qemu.poll() == 0
    wait_for_peer(supervisor, qemu.pid, present=False)
    records = [r for r in supervisor.audit_records() if (r["actor"] or {}).get("pid") == qemu.pid]
    assert [(r["action"], r["detail"]["peer"]) for r in records] == [("peer-join", peer["id"]),
                                                                     ("peer-leave", peer["id"])]


def test_qemu_stderr_reaches_the_console(tmp_path):
    missing_socket = str(tmp_path / "nobody-listens.sock")
    command = qemu_command(socket_path=missing_socket, vectors=2, guest=None, host_peer_id=None, accel="tcg")
    with QemuProcess(command) as qemu:
        lines = read_lines_until_eof(qemu)
        assert qemu.wait(10) != 0
    assert any("nobody-listens.sock" in line for line in lines), lines


def test_qemu_dies_with_its_parent(supervisor):
    command = qemu_command(socket_path=supervisor.socket, vectors=2, guest=None, host_peer_id=None, accel="tcg")
    parent_code = (
        "import sys, time; from shmguard.qemu import QemuProcess\n"
        f"qemu = QemuProcess({command!r}); print(qemu.pid, flush=True); time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, cwd=REPO)
    try:
        qemu_pid = int(parent.stdout.readline())
        wait_for_peer(supervisor, qemu_pid)  # QEMU is up and has joined the supervisor
        parent.kill()
        parent.wait()
        assert wait_until_gone(qemu_pid, 10), "QEMU outlived its parent"
        wait_for_peer(supervisor, qemu_pid, present=False)  # and the supervisor saw it leave
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


def wait_until_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):  # killed, waiting for its new parent to reap it
            return True
        time.sleep(0.05)
    return False


def test_missing_qemu_is_one_clear_error():
    with pytest.raises(ShmguardError, match="apt-get install qemu-system-x86"):
        QemuProcess(["/nonexistent/qemu-system-x86_64"])


# ---- console and process handling ------------------------------------------------------------------


def test_console_lines_are_clean_and_partial_lines_wait():
    with sh(r"printf 'SeaBIOS\r\n\033c\033[?7l\033[2Jready\r\nhal'; sleep 0.5; printf 'f\nrest'") as process:
        select.select([process.console_fd], [], [], 5)
        time.sleep(0.1)
        assert process.read_console() == ["SeaBIOS", "ready"]
        lines = read_lines_until_eof(process)
    assert lines == ["half", "rest"]  # a last line without its end is delivered at EOF


def test_console_read_never_blocks():
    with sh("sleep 5") as process:
        started = time.monotonic()
        assert process.read_console() == []
        assert time.monotonic() - started < 0.5
        assert process.poll() is None


def test_clean_console_line_keeps_text_and_drops_escapes():
    assert clean_console_line(b"\x1b[0mreceived IRQ and full message: a\tb\r") == "received IRQ and full message: a\tb"
    assert clean_console_line(b"caf\xc3\xa9 \xff") == "café \ufffd"


def test_terminate_escalates_to_sigkill():
    with sh("trap '' TERM; echo armed; sleep 30") as process:
        assert select.select([process.console_fd], [], [], 5)[0]
        assert process.read_console() == ["armed"]
        started = time.monotonic()
        assert process.terminate(timeout=0.3) == -signal.SIGKILL
        assert time.monotonic() - started < 3


def test_monitor_that_never_answers_is_one_clear_error(tmp_path):
    with pytest.raises(ShmguardError, match="does not answer"):
        monitor_command(str(tmp_path / "absent.sock"), "info pci", timeout=0.3)


# ---- KVM or TCG ------------------------------------------------------------------------------------


def test_choose_accel_keeps_the_verdict_of_this_boot(tmp_path):
    cache = tmp_path / "accel.json"
    cache.write_text(json.dumps({"boot_id": BOOT_ID, "accel": "kvm", "reason": "proved earlier"}))
    started = time.monotonic()
    assert choose_accel(cache) == ("kvm", "proved earlier")
    assert time.monotonic() - started < 0.5


def test_choose_accel_probes_again_after_a_reboot(tmp_path, guest):
    cache = tmp_path / "accel.json"
    cache.write_text(json.dumps({"boot_id": "an-earlier-boot", "accel": "kvm", "reason": "stale"}))
    started = time.monotonic()
    accel, reason = choose_accel(cache, kernel=guest.kernel)
    assert time.monotonic() - started < 10  # never hangs: the probe has a short deadline
    assert accel in ("kvm", "tcg") and reason and reason != "stale"
    assert json.loads(cache.read_text()) == {"boot_id": BOOT_ID, "accel": accel, "reason": reason}
    if not os.path.exists("/dev/kvm"):
        assert (accel, reason) == ("tcg", "/dev/kvm does not exist")


@pytest.mark.parametrize(("flags", "expected"), [
    ("fpu vme sse2 vmx ept", True), ("fpu svm npt", True), ("fpu vme sse2 hypervisor", False)])
def test_cpu_virtualization_is_read_from_the_flags(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: a vmx-free name svm\nflags\t\t: {flags}\n\n")
    assert cpu_has_virtualization(str(cpuinfo)) is expected
    assert cpu_has_virtualization(str(tmp_path / "absent")) is True  # unreadable: the probe decides


def test_tcg_tsc_hint_is_the_hosts_clock_in_khz(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu MHz\t\t: 2445.422\nflags\t\t: fpu\n")
    assert tcg_tsc_hint(str(cpuinfo)) == "tsc_early_khz=2445422"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu\n")
    assert tcg_tsc_hint(str(cpuinfo)) == "" and tcg_tsc_hint(str(tmp_path / "absent")) == ""


def test_no_kvm_probe_on_a_cpu_without_vmx_or_svm(tmp_path):
    # The kernel does not exist: had the probe run, its reason would say that KVM failed to boot it.
    accel, reason = choose_accel(tmp_path / "accel.json", kernel=tmp_path / "never-booted")
    if os.access("/dev/kvm", os.R_OK | os.W_OK) and not cpu_has_virtualization():
        assert (accel, reason) == ("tcg", "the CPU has no vmx or svm flag (/proc/cpuinfo)")
    else:
        assert accel in ("kvm", "tcg") and reason


def test_probe_recognises_a_kernel_that_boots(guest):
    # TCG always works, so it shows what success looks like to the probe that KVM must pass; emulated, on a busy
    # machine, it may need longer than a working KVM is given.
    assert probe_boot(guest.kernel, accel="tcg", timeout=120) == ("tcg", "tcg booted a kernel")


def test_probe_rejects_what_is_not_a_kernel(tmp_path):
    not_a_kernel = tmp_path / "vmlinux"
    not_a_kernel.write_bytes(b"\x7fELF" + b"\0" * 60)
    accel, reason = probe_boot(not_a_kernel, accel="tcg")
    assert accel == "tcg" and reason.startswith("tcg failed to boot a kernel")
