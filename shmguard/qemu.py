"""QEMU for shmguard: the command line, a supervised process with its serial console, and KVM-or-TCG."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from shmguard.errors import ShmguardError
from shmguard.guest import FAST_BOOT_PARAMS, QBOOT, GuestImage, build_guest, default_cache_dir
from shmguard.layout import HOST_PEER_PARAM
from shmguard.linux import procfs
from shmguard.linux.hardening import child_preexec

QEMU = "qemu-system-x86_64"
MAX_PARTIAL_LINE = 8 << 20  # a whole 4 MiB message printed on one line fits, with room to spare
PROBE_TIMEOUT = 5.0  # a working KVM boots the probe kernel to its panic in about a second
_ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-~])")


def qemu_command(
    *,
    socket_path: str,
    vectors: int,
    guest: GuestImage | None,
    host_peer_id: int | None,
    accel: str,
    memory: str = "256M",
    monitor_path: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """A q35 VM with an IOMMU (for vfio-pci in the guest) and an ivshmem-doorbell device on socket_path.

    Without a guest the CPU never starts (-S): the device still joins the server as a plain peer, and
    the firmware never reaches "no bootable device", which would reboot and so end QEMU (-no-reboot).
    """
    if guest is None and host_peer_id is not None:
        raise ValueError("host_peer_id is a guest kernel parameter: it needs a guest")
    command = [QEMU, "-M", "q35" if guest is None else guest.machine, "-accel", accel, "-m", memory]
    # -nodefaults drops the NIC, its option ROM and the VGA; the serial console goes to stdout.
    command += ["-nodefaults", "-nographic", "-serial", "stdio", "-no-reboot"]
    command += ["-device", "intel-iommu,intremap=off"]
    command += ["-chardev", f"socket,path={socket_path},id=ivs"]
    command += ["-device", f"ivshmem-doorbell,chardev=ivs,vectors={vectors}"]
    if guest is None:
        command.append("-S")
    else:
        command += guest_args(guest, host_peer_id)
    if monitor_path is not None:
        command += ["-monitor", f"unix:{monitor_path},server=on,wait=off"]
    return command + list(extra_args)


def guest_args(guest: GuestImage, host_peer_id: int | None) -> list[str]:
    cmdline = guest.cmdline if host_peer_id is None else f"{guest.cmdline} {HOST_PEER_PARAM}={host_peer_id}"
    args = [] if guest.firmware is None else ["-bios", str(guest.firmware)]
    args += ["-kernel", str(guest.kernel)]
    if guest.initrd is not None:
        args += ["-initrd", str(guest.initrd)]
    return args + ["-append", cmdline]


class QemuProcess:
    """A QEMU child that dies with its parent; its console is a non-blocking pipe read line by line."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        try:
            self._process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                preexec_fn=child_preexec(),  # dies with the supervisor; no new privileges
                process_group=0,  # a Ctrl-C meant for the supervisor must not reach QEMU directly
            )
        except FileNotFoundError:
            raise ShmguardError(f"{self.argv[0]} not found: apt-get install qemu-system-x86") from None
        assert self._process.stdout is not None
        self._console = self._process.stdout
        self.console_fd = self._console.fileno()
        os.set_blocking(self.console_fd, False)
        self._partial: list[bytes] = []
        self._partial_size = 0
        self.console_eof = False  # once true, console_fd stays readable forever: unregister it

    @classmethod
    def adopt(cls, pid: int, console_fd: int, argv: Sequence[str]) -> QemuProcess:
        """The QEMU child a predecessor started (exec keeps children: it is still ours), its console pipe."""
        process = cls.__new__(cls)
        process.argv = list(argv)
        process._process = AdoptedChild(pid)
        process._console = os.fdopen(console_fd, "rb", buffering=0)
        process.console_fd = console_fd
        os.set_blocking(console_fd, False)
        process._partial, process._partial_size, process.console_eof = [], 0, False
        return process

    @property
    def pid(self) -> int:
        return self._process.pid

    def read_console(self) -> list[str]:
        """The complete lines read so far (without \\r and ANSI escapes); a partial line waits for its end,
        unless it outgrows MAX_PARTIAL_LINE: a guest that never prints a newline must not fill our memory."""
        data = self._read_available()
        if b"\n" not in data and not self.console_eof:
            if data:
                self._partial.append(data)  # joined only once its line ends: a 4 MiB line arrives in pieces
                self._partial_size += len(data)
            if self._partial_size <= MAX_PARTIAL_LINE:
                return []
            data, self._partial, self._partial_size = b"".join(self._partial) + b"\n", [], 0
        *lines, rest = b"".join([*self._partial, data]).split(b"\n")
        self._partial, self._partial_size = [rest], len(rest)
        if self.console_eof and rest:
            lines.append(rest)
            self._partial = []
        return [clean_console_line(line) for line in lines]

    def _read_available(self) -> bytes:
        chunks = []
        while not self.console_eof:
            try:
                chunk = os.read(self.console_fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""  # the pipe was closed
            if not chunk:
                self.console_eof = True
            chunks.append(chunk)
        return b"".join(chunks)

    def poll(self) -> int | None:
        return self._process.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self._process.wait(timeout)

    def terminate(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after timeout; returns the exit status. The console stays readable."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                return self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
        return self._process.wait()

    def close(self) -> None:
        """Kills QEMU if it still runs and closes the console pipe (unregister console_fd first)."""
        self.terminate()
        self._console.close()

    def __enter__(self) -> QemuProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AdoptedChild:
    """What QemuProcess needs of subprocess.Popen, for a child this process did not start in this image."""

    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1  # reaped elsewhere: gone all the same
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.01)
        return self.returncode

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)


def clean_console_line(raw: bytes) -> str:
    return _ANSI_ESCAPE.sub("", raw.decode("utf-8", errors="replace")).replace("\r", "")


def monitor_command(monitor_path: str, command: str, timeout: float = 5.0) -> str:
    """Runs one human-monitor command over QEMU's unix socket and returns its output."""
    deadline = time.monotonic() + timeout
    with _connect_monitor(monitor_path, deadline) as monitor:
        _read_until(monitor, b"(qemu) ", deadline)
        monitor.sendall(command.encode() + b"\n")
        reply = _read_until(monitor, b"(qemu) ", deadline)
    # The monitor echoes the command with line-editing escapes; its output starts after that line.
    output = reply.split(b"\r\n", 1)[1] if b"\r\n" in reply else b""
    output = output.removesuffix(b"(qemu) ")
    return "\n".join(clean_console_line(line) for line in output.split(b"\n")).strip("\n")


def _connect_monitor(monitor_path: str, deadline: float) -> socket.socket:
    while True:  # QEMU creates the socket a moment after it starts
        monitor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            monitor.connect(monitor_path)
            return monitor
        except (FileNotFoundError, ConnectionRefusedError) as error:
            monitor.close()
            if time.monotonic() >= deadline:
                raise ShmguardError(f"QEMU monitor {monitor_path} does not answer: {error.strerror}") from None
            time.sleep(0.02)


def _read_until(monitor: socket.socket, marker: bytes, deadline: float) -> bytes:
    data = b""
    while marker not in data:
        monitor.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = monitor.recv(65536)
        except TimeoutError:
            raise ShmguardError("QEMU monitor did not answer in time") from None
        if not chunk:
            raise ShmguardError("QEMU monitor closed the connection")
        data += chunk
    return data


# ---- KVM or TCG ----------------------------------------------------------------------------------


def choose_accel(probe_cache: Path | None = None, kernel: Path | None = None) -> tuple[str, str]:
    """("kvm" | "tcg", reason). KVM only once it has booted a kernel here; the verdict holds per host boot."""
    cache_file = probe_cache or default_cache_dir() / "accel-probe.json"
    boot_id = procfs.boot_id()
    try:
        cached = json.loads(cache_file.read_text())
        if boot_id != "unknown" and cached.get("boot_id") == boot_id:
            return cached["accel"], cached["reason"]
    except (OSError, ValueError, KeyError):
        pass
    accel, reason = _probe_kvm(kernel)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps({"boot_id": boot_id, "accel": accel, "reason": reason}))
    except OSError:
        pass  # an unwritable cache only costs a probe next time
    return accel, reason


def _probe_kvm(kernel: Path | None) -> tuple[str, str]:
    if not os.path.exists("/dev/kvm"):
        return "tcg", "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "/dev/kvm is not accessible to this user"
    if not cpu_has_virtualization():
        # /dev/kvm without vmx/svm (nested virtualisation) fails only after a 5 s probe: ask the CPU first.
        return "tcg", "the CPU has no vmx or svm flag (/proc/cpuinfo)"
    if kernel is None:
        try:
            kernel = build_guest(log=lambda _line: None).kernel
        except ShmguardError as error:
            return "tcg", f"no kernel to probe KVM with ({error})"
    return probe_boot(kernel)


def tcg_tsc_hint(cpuinfo: str = "/proc/cpuinfo") -> str:
    """`tsc_early_khz=N` for a guest under TCG, whose TSC runs at the host's rate: the guest then skips calibrating
    it against the PIT, which fails under TCG after ~0.1 s and falls back to the HPET. The kernel still refines
    the figure against the HPET a second later, so a host whose `cpu MHz` is not its TSC rate costs nothing
    but a second of imprecise guest time. "" when the host does not say."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return ""
    found = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.MULTILINE)
    khz = round(float(found.group(1)) * 1000) if found else 0
    return f"tsc_early_khz={khz}" if khz > 0 else ""


def cpu_has_virtualization(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU advertises Intel VT-x (vmx) or AMD-V (svm), or when cpuinfo cannot be read."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return True  # let the probe decide
    flags = {word for line in text.splitlines() if line.startswith("flags") for word in line.split(":", 1)[-1].split()}
    return bool(flags & {"vmx", "svm"})


def probe_boot(kernel: Path, accel: str = "kvm", timeout: float = PROBE_TIMEOUT) -> tuple[str, str]:
    """Boots kernel without a root fs: reaching its panic (then reboot = exit) proves the accelerator."""
    command = [QEMU, "-M", "q35", "-accel", accel, "-m", "128M", "-nodefaults", "-display", "none"]
    command += ["-bios", str(QBOOT)] if QBOOT.is_file() else []  # the built-in guest's quick start, as it boots
    command += ["-serial", "stdio", "-no-reboot", "-kernel", str(kernel)]
    command += ["-append", f"console=ttyS0 quiet panic=-1 {FAST_BOOT_PARAMS}"]
    with QemuProcess(command) as qemu:
        try:
            status = qemu.wait(timeout)
        except subprocess.TimeoutExpired:
            qemu.terminate(1.0)
            return "tcg", f"{accel} did not boot a kernel within {timeout:.0f} s (nested virtualisation?)"
        console = qemu.read_console()
    if status == 0 and any("Kernel panic" in line for line in console):
        return accel, f"{accel} booted a kernel"
    errors = [line for line in console if "KVM" in line or "qemu-system" in line] or console or ["no output"]
    return "tcg", f"{accel} failed to boot a kernel: {errors[-1].strip()}"
