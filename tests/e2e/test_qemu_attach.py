"""Debian's QEMU attaches its ivshmem-doorbell to `shmguard run --no-guest`, on both backends.

The guest never runs (-S): what is checked is what QEMU itself made of the greeting (the PCI device and
the size of its shared-memory BAR) and what the supervisor knows of QEMU.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from helpers import RunningSupervisor, policy_file
from shmguard.qemu import monitor_command

IVSHMEM_DOORBELL = "1af4:1110"
BAR = re.compile(r"BAR(\d): .* at (0x[0-9a-f]+) \[(0x[0-9a-f]+)\]")


class AttachedQemu:
    """qemu-system-x86_64 with an ivshmem-doorbell on the supervisor's socket and a monitor socket."""

    def __init__(self, socket_path: str, vectors: int, tmp_path: Path):
        self.monitor = str(tmp_path / "monitor.sock")
        self.log = tmp_path / "qemu.log"
        command = ["qemu-system-x86_64", "-M", "q35", "-S", "-m", "128M", "-display", "none", "-nodefaults",
                   "-chardev", f"socket,path={socket_path},id=ivs",
                   "-device", f"ivshmem-doorbell,chardev=ivs,vectors={vectors}",
                   "-monitor", f"unix:{self.monitor},server=on,wait=off"]
        with self.log.open("wb") as output:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)

    def bar_sizes(self) -> dict[int, int]:
        """The BAR sizes of the ivshmem-doorbell device, from the monitor's `info pci`."""
        lines = monitor_command(self.monitor, "info pci").splitlines()
        start = next(n for n, line in enumerate(lines) if IVSHMEM_DOORBELL in line)
        sizes = {}
        for line in lines[start + 1:]:
            if "Bus " in line:
                break
            if match := BAR.search(line):
                first, last = int(match.group(2), 16), int(match.group(3), 16)
                # unassigned BARs (the firmware never ran) are shown at 2^64 - 1: the size is still last - first + 1
                sizes[int(match.group(1))] = (last - first + 1) % (1 << 64)
        return sizes

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def wait_for_peer(supervisor: RunningSupervisor, pid: int, timeout: float = 30) -> dict:
    """The supervisor's own view of the peer with this pid, once it has joined."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = json.loads(supervisor.cli("status", "--json", "--policy", str(supervisor.policy_path)).stdout)
        for peer in status["peers"]:
            if peer.get("pid") == pid:
                return peer
        time.sleep(0.1)
    raise AssertionError(f"QEMU (pid {pid}) never joined; supervisor log:\n{supervisor.log_tail()}")


@pytest.fixture
def attach(tmp_path):
    running = []

    def attach(base: str, size: str, vectors: int, **region) -> tuple[RunningSupervisor, AttachedQemu]:
        policy = policy_file(tmp_path, base=base, region={"size": size, **region}, server={"vectors": vectors})
        supervisor = RunningSupervisor(policy)
        running.append(supervisor)
        qemu = AttachedQemu(supervisor.socket, vectors, tmp_path)
        running.append(qemu)
        return supervisor, qemu

    yield attach
    for thing in reversed(running):
        if isinstance(thing, AttachedQemu):
            thing.close()
        else:
            assert thing.stop() == 0, thing.log_tail()


@pytest.mark.parametrize("base, size, vectors, region", [
    ("strict", "4M", 2, {}),  # sealed memfd
    ("standard", "4M", 2, {}),  # file in /dev/shm
    ("strict", "4K", 2, {}),  # the Zephyr sample's size
    ("strict", "4M", 64, {}),
    ("standard", "4M", 64, {}),
    ("strict", "1G", 64, {"mlock": False}),  # QEMU never touches it; locking 1G would commit 1G of RAM
])
def test_qemu_attaches_and_sees_the_region_as_bar2(attach, base, size, vectors, region):
    supervisor, qemu = attach(base, size, vectors, **region)
    peer = wait_for_peer(supervisor, qemu.proc.pid)
    assert peer["vectors"] == vectors
    expected = {"4K": 4096, "4M": 4 << 20, "1G": 1 << 30}[size]
    assert qemu.bar_sizes()[2] == expected
    assert qemu.proc.poll() is None, qemu.log.read_text()
    assert "ivshmem" not in qemu.log.read_text()  # QEMU complained about nothing in the greeting


def test_the_supervisor_log_names_qemu_by_pid_and_executable(attach):
    supervisor, qemu = attach("strict", "4M", 2)
    peer = wait_for_peer(supervisor, qemu.proc.pid)
    joined = [line for line in supervisor.log().splitlines() if f"peer {peer['id']} joined" in line]
    assert joined and f"pid={qemu.proc.pid}" in joined[0], joined
    # QEMU runs as root with every capability; the hardened supervisor must still say which program it is
    assert "qemu-system-x86" in joined[0], joined[0]  # the path of its exe, or its 15-character comm
