"""shmguard under libvirt: the handshake does not depend on who started QEMU, `guest domain-xml` prints a domain
that libvirt defines and boots as printed, and a QEMU the policy refuses fails at once instead of spinning.

The libvirt test starts Debian's own daemons (virtlogd -d, libvirtd -d: local UNIX sockets, no systemd) and stops
them again; /dev/kvm gets the usual 0660 root:kvm for the run (without udev it is root-only, and every start would
cost libvirt ~70 s of capability probing) and is put back afterwards.
"""

from __future__ import annotations

import grp
import json
import mmap
import os
import pwd
import shutil
import subprocess
import threading
import time
import uuid
import zlib
from pathlib import Path

import pytest

from helpers import RunningSupervisor, policy_file
from shmguard import layout
from shmguard.client import IvshmemClient
from shmguard.control import RingRequest, WriteRequest
from shmguard.launcher import SHMGUARD

SIZE = 4096


class FakeBuiltinGuest:
    """A peer that speaks the built-in guest's handshake: `ready <id>` on vector 0, `ack n len crc` on vector 1."""

    def __init__(self, socket_path: str):
        self.client = IvshmemClient(socket_path, vectors=2).connect()
        self.region = mmap.mmap(self.client.shm_fd, SIZE)
        self.host = min(self.client.peers)
        self.handled = 0

    def reply(self, line: str, vector: int) -> None:
        start = layout.reply_offset(SIZE)
        self.region[start:SIZE] = line.encode().ljust(layout.REPLY_SIZE, b"\0")
        self.client.notify(self.host, vector)

    def say_ready(self) -> None:
        self.reply(f"ready {self.client.own_id}", layout.READY_VECTOR)

    def acknowledge_next(self, timeout: float = 10) -> bytes:
        assert self.client.wait([0], timeout) == 0, "the host never rang"
        text = bytes(self.region[:layout.reply_offset(SIZE)]).split(b"\0", 1)[0]
        self.handled += 1
        self.reply(f"ack {self.handled} {len(text)} {zlib.crc32(text):08x}", layout.ACK_VECTOR)
        return text

    def close(self) -> None:
        self.region.close()
        self.client.close()


def write_in_background(supervisor: RunningSupervisor, text: bytes, ring: str) -> tuple[threading.Thread, list]:
    replies: list[dict] = []
    write = WriteRequest(text, text=True, ring=ring, wait=True, timeout=20)
    thread = threading.Thread(target=lambda: replies.append(supervisor.client(30).ask(write)))
    thread.start()
    return thread, replies


def test_a_guest_that_says_ready_is_the_guest_whoever_started_its_qemu(tmp_path):
    supervisor = RunningSupervisor(policy_file(tmp_path, region={"size": SIZE}))  # --no-guest: QEMU is not ours
    try:
        first = FakeBuiltinGuest(supervisor.socket)
        before = supervisor.client().status()["guest"]
        assert (before["peer"], before["handshake"], before["ready"]) == (first.client.own_id, False, False)
        first.say_ready()
        supervisor.wait_for_log(rf"guest ready: ready {first.client.own_id}")
        guest = supervisor.client().status()["guest"]
        assert (guest["peer"], guest["handshake"], guest["ready"]) == (first.client.own_id, True, True)

        thread, replies = write_in_background(supervisor, b"hello libvirt", "guest")
        assert first.acknowledge_next() == b"hello libvirt"
        thread.join(30)
        assert replies[0]["ok"] and replies[0]["delivered_exactly"], replies  # write --ring guest waited for it

        second = FakeBuiltinGuest(supervisor.socket)
        second.say_ready()
        supervisor.wait_for_log(rf"guest ready: ready {second.client.own_id} \(one of several")
        refused = supervisor.client().ask(RingRequest("guest"))
        assert not refused["ok"] and "several guests are ready" in refused["error"]
        assert f"--ring {first.client.own_id}" in refused["error"]
        thread, replies = write_in_background(supervisor, b"for the second", str(second.client.own_id))
        assert second.acknowledge_next() == b"for the second"
        thread.join(30)
        assert replies[0]["ok"] and replies[0]["delivered_exactly"], replies

        second.close()  # one guest left again: it is the guest once more
        time.sleep(0.2)
        assert supervisor.client().status()["guest"]["peer"] == first.client.own_id
        healthy = supervisor.cli("status", "--policy", str(supervisor.policy_path))
        assert healthy.stdout.startswith(f"healthy: policy {supervisor.policy_path.stem}, 1 peer, guest peer ")
        first.close()
        time.sleep(0.2)  # the guest is gone: a monitoring check says so, and fails
        gone = supervisor.cli("status", "--policy", str(supervisor.policy_path), check=False)
        assert gone.returncode == 1 and gone.stdout.startswith("UNHEALTHY: the guest is not connected\n"), gone

        restarted = FakeBuiltinGuest(supervisor.socket)  # as after `virsh destroy && virsh start`: a new QEMU
        thread, replies = write_in_background(supervisor, b"after the restart", "guest")
        time.sleep(0.3)  # the write is recorded by now; its ring must wait for the new guest's "ready"
        assert restarted.client.wait([0], 0.5) is None, "rung before it said it was ready: the ring would be lost"
        restarted.say_ready()
        assert restarted.acknowledge_next() == b"after the restart"
        thread.join(30)
        assert replies[0]["ok"] and replies[0]["rang"][0]["held_until_ready"], replies
        restarted.close()
    finally:
        assert supervisor.stop() == 0, supervisor.log()
    assert "Traceback" not in supervisor.log()


# ---- libvirt for real ------------------------------------------------------------------------------------------

VIRSH = ["virsh", "--quiet", "-c", "qemu:///system"]
DAEMONS = (("virtlogd", Path("/run/virtlogd.pid")), ("libvirtd", Path("/run/libvirtd.pid")))


def _running(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().split()[0])
        return pid if Path(f"/proc/{pid}").exists() else None
    except (OSError, ValueError, IndexError):
        return None


def virsh(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*VIRSH, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def libvirt():
    """Debian's libvirtd and virtlogd, started here unless already running, and stopped again if started here."""
    missing = [tool for tool in ("virsh", "virtlogd", "libvirtd") if shutil.which(tool) is None]
    assert not missing, f"missing {missing}: apt-get install libvirt-daemon-system (scripts/bootstrap does)"
    assert "ivshmem" in [g.gr_name for g in grp.getgrall() if "libvirt-qemu" in g.gr_mem], \
        "libvirt-qemu is not in the ivshmem group: usermod -aG ivshmem libvirt-qemu (scripts/bootstrap does)"
    kvm = os.stat("/dev/kvm") if os.path.exists("/dev/kvm") else None
    if kvm is not None:  # the usual udev rule: without it libvirt re-probes QEMU's capabilities on every start
        os.chown("/dev/kvm", 0, grp.getgrnam("kvm").gr_gid)
        os.chmod("/dev/kvm", 0o660)
    started = []
    try:
        for daemon, pidfile in DAEMONS:
            if _running(pidfile) is None:
                subprocess.run([daemon, "-d"], check=True, timeout=30)
                started.append(pidfile)
        deadline = time.monotonic() + 30
        while virsh("version").returncode != 0:
            assert time.monotonic() < deadline, f"libvirtd does not answer: {virsh('version').stderr}"
            time.sleep(0.1)
        yield
    finally:
        for pidfile in reversed(started):
            if (pid := _running(pidfile)) is not None:
                os.kill(pid, 15)
                for _ in range(100):
                    if _running(pidfile) is None:
                        break
                    time.sleep(0.05)
        if kvm is not None:
            os.chown("/dev/kvm", kvm.st_uid, kvm.st_gid)
            os.chmod("/dev/kvm", kvm.st_mode & 0o7777)


class DefinedDomain:
    """A domain from `shmguard guest domain-xml`, defined with virsh; destroyed, undefined and cleaned up after."""

    def __init__(self, policy_path: Path):
        self.name = f"shmguard-test-{uuid.uuid4().hex[:8]}"
        self.serial_log = Path(f"/var/log/libvirt/qemu/{self.name}-serial.log")
        result = subprocess.run([*SHMGUARD, "guest", "domain-xml", "--name", self.name, "--policy", str(policy_path)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        self.xml = result.stdout
        xml_path = policy_path.with_name(f"{self.name}.xml")
        xml_path.write_text(self.xml)
        defined = virsh("define", str(xml_path))
        assert defined.returncode == 0, defined.stderr

    def start(self) -> subprocess.CompletedProcess:
        return virsh("start", self.name)

    def state(self) -> str:
        return virsh("domstate", self.name).stdout.strip()

    def serial(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def remove(self) -> None:
        virsh("destroy", self.name)
        virsh("undefine", self.name)
        shutil.rmtree(f"/var/lib/libvirt/boot/{self.name}", ignore_errors=True)
        self.serial_log.unlink(missing_ok=True)
        Path(f"/var/log/libvirt/qemu/{self.name}.log").unlink(missing_ok=True)  # libvirt's own log of the domain


def test_the_domain_xml_boots_under_libvirt_and_acknowledges_a_write(libvirt, tmp_path):
    supervisor = RunningSupervisor(policy_file(tmp_path, region={"size": 65536}))  # --no-guest, like the unit
    domain = DefinedDomain(supervisor.policy_path)
    try:
        assert "<iommu model='intel'>" in domain.xml and "shmguard.host=0" in domain.xml
        started = domain.start()
        assert started.returncode == 0, started.stderr
        qemu = supervisor.wait_for_log(r"peer (\d+) joined: pid=(\d+) uid=(\d+)")
        assert int(qemu.group(3)) == pwd.getpwnam("libvirt-qemu").pw_uid
        supervisor.wait_for_log(rf"guest ready: ready {qemu.group(1)}\n", 120)
        write = supervisor.cli("write", "-m", "hello from libvirt", "--ring", "guest", "--timeout", "30",
                               "--policy", str(supervisor.policy_path))
        assert "delivered exactly" in write.stdout, write.stdout
        deadline = time.monotonic() + 10
        while "received IRQ and full message: hello from libvirt" not in domain.serial():
            assert time.monotonic() < deadline, domain.serial()
            time.sleep(0.1)
        status = json.loads(supervisor.cli("status", "--json", "--policy", str(supervisor.policy_path)).stdout)
        assert (status["guest"]["peer"], status["guest"]["ready"], status["guest"]["acks"]) == (
            int(qemu.group(1)), True, 1)
    finally:
        domain.remove()
        assert supervisor.stop() == 0, supervisor.log()


def test_a_qemu_the_policy_refuses_fails_to_start_at_once(libvirt, tmp_path):
    # libvirt's QEMU (uid libvirt-qemu) reaches the socket through the ivshmem group, but the policy admits root only.
    supervisor = RunningSupervisor(policy_file(tmp_path, region={"size": 65536}, server={"peers": ["root"]}))
    domain = DefinedDomain(supervisor.policy_path)
    try:
        started = domain.start()  # QEMU spinning in device realize would hang here until the timeout fails the test
        assert started.returncode != 0
        assert "server sent version -1, expecting 0" in started.stderr, started.stderr
        assert domain.state() == "shut off"
        refused = [r for r in supervisor.audit_records() if r["action"] == "refused"]
        assert refused and refused[-1]["actor"]["uid"] == pwd.getpwnam("libvirt-qemu").pw_uid, refused
    finally:
        domain.remove()
        assert supervisor.stop() == 0, supervisor.log()
