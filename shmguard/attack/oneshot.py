"""`shmguard attack` in one call: a running or a throwaway supervisor, optionally a paused QEMU that must survive.
"""

from __future__ import annotations

import os
import time

from ..control import StatusRequest
from ..errors import ShmguardError
from ..launcher import ThrowawaySupervisor
from ..policy import Policy, load_policy
from .battery import Battery
from .identities import MEMBER_USER, OUTSIDER_USER, ROLES
from .report import AttackResult


def run_battery(policy_path: str, *, start_supervisor: bool, attacks: list[str] | None = None,
                roles: tuple[str, ...] = ROLES, extras: bool = True, with_qemu: bool = False,
                member_user: str = MEMBER_USER, outsider_user: str = OUTSIDER_USER) -> list[AttackResult]:
    """Attack the supervisor serving policy_path, or (start_supervisor) a throwaway one with that policy whose
    paths are moved into a private directory; with_qemu attaches a paused QEMU that must survive every attack."""
    throwaway = ThrowawaySupervisor(policy_path, prefix="shmguard-attack-") if start_supervisor else None
    try:
        target = throwaway.policy_path if throwaway else policy_path
        qemu = start_paused_qemu(load_policy(str(target))) if with_qemu else None
        try:
            with Battery(str(target), member_user=member_user, outsider_user=outsider_user, qemu=qemu,
                         supervisor=throwaway.process if throwaway else None) as battery:
                if qemu is not None:
                    wait_for_peer(battery, qemu.pid)
                return battery.run_all(attacks, roles, extras)
        finally:
            if qemu is not None:
                qemu.close()
    finally:
        if throwaway is not None:
            throwaway.stop()


def start_paused_qemu(policy: Policy):
    """A QEMU whose CPU never starts (-S) but whose ivshmem-doorbell joins and maps the region."""
    from ..qemu import QemuProcess, qemu_command

    return QemuProcess(qemu_command(socket_path=policy.server.socket, vectors=policy.server.vectors, guest=None,
                                    host_peer_id=None, accel="tcg", memory="128M"))


def wait_for_peer(battery: Battery, pid: int, timeout: float = 30.0) -> None:
    """Until QEMU (pid) has joined and mapped the region. The supervisor counts a peer joined once its greeting is
    sent, before QEMU has read it: a shrink that lands before QEMU's own fstat of the region makes QEMU fail its
    device's start (the window SECURITY.md gives the file backend), which is not what the attacks here try."""
    deadline = time.monotonic() + timeout
    joined = False
    while time.monotonic() < deadline:
        if not joined:
            peers = battery.link.control(StatusRequest()).get("peers", [])
            joined = any(peer.get("pid") == pid for peer in peers)
        if joined and maps_file(pid, battery.region):
            return
        if battery.qemu is not None and battery.qemu.poll() is not None:
            raise ShmguardError(f"QEMU exited with status {battery.qemu.poll()} before joining")
        time.sleep(0.05)
    raise ShmguardError(f"QEMU (pid {pid}) did not join the ivshmem server and map the region within {timeout:g} s")


def maps_file(pid: int, path: str) -> bool:
    """Does process pid have the file at path (its device and inode) mapped, by /proc/PID/maps?"""
    st = os.stat(path)
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) >= 5 and fields[4] == str(st.st_ino):
                    major, minor = (int(part, 16) for part in fields[3].split(":"))
                    if os.makedev(major, minor) == st.st_dev:
                        return True
    except FileNotFoundError:
        pass  # gone: the caller's poll says so
    return False
