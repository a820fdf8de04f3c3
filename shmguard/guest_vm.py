"""GuestVM: the QEMU child that runs the guest (the built-in one or yours), its console in the log, its exit."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

from . import layout
from .errors import ShmguardError
from .guest import GuestImage, build_guest
from .loop import EventLoop
from .policy import Policy
from .qemu import QemuProcess, choose_accel, qemu_command, tcg_tsc_hint
from .values import Value, value

log = logging.getLogger("shmguard")


@value
class GuestOptions(Value):
    """Which guest to boot under QEMU; kernel None means the built-in guest."""

    kernel: str | None = None
    initrd: str | None = None
    append: str = ""
    qemu_args: tuple[str, ...] = ()
    count: int = 1  # built-in guests to boot; with 2 or more each gets a slot (layout.GuestLayout)

    @property
    def builtin(self) -> bool:
        return self.kernel is None

    def guest_layout(self, size: int) -> layout.GuestLayout | None:
        """The slots of several built-in guests in a region of `size` bytes; raises ShmguardError if they do not
        fit, or for several guests that are not the built-in one."""
        if self.count == 1:
            return None
        if not self.builtin:
            raise ShmguardError("--guests boots several built-in guests: drop --guest-kernel")
        try:
            return layout.GuestLayout.of(size, self.count)
        except ValueError as exc:
            raise ShmguardError(str(exc)) from None

def slot_params(guests: int, slot: int) -> str:
    """The kernel parameters that tell built-in guest `slot` of `guests` where its slot is."""
    return f"{layout.GUESTS_PARAM}={guests} {layout.SLOT_PARAM}={slot}"


def guest_command(options: GuestOptions, policy: Policy, host_peer_id: int, slot: int | None = None) -> list[str]:
    """The QEMU command line for the guest (`slot` of several): the image built (apt-get, gcc: before hardening),
    the accelerator chosen (KVM only once it has booted a kernel here); the built-in guest under TCG is told the
    host's TSC rate."""
    if slot is not None:
        return slot_command(policy.server.socket, policy.server.vectors, host_peer_id, options.count, slot,
                            policy.qemu.memory, options.qemu_args)
    image = build_guest(log=log.info) if options.builtin else GuestImage(
        Path(options.kernel), Path(options.initrd) if options.initrd else None, options.append)
    if options.builtin:
        log.info("guest kernel: %s", image.kernel_name)
    accel, reason = choose_accel(kernel=image.kernel)
    log.info("QEMU accelerator: %s (%s)", accel, reason)
    if options.builtin and accel == "tcg" and (hint := tcg_tsc_hint()):
        image = dataclasses.replace(image, cmdline=f"{image.cmdline} {hint}")
    return qemu_command(socket_path=policy.server.socket, vectors=policy.server.vectors, guest=image,
                        host_peer_id=host_peer_id if options.builtin else None, accel=accel,
                        memory=policy.qemu.memory, extra_args=options.qemu_args)


def slot_command(socket_path: str, vectors: int, host_peer_id: int, guests: int, slot: int, memory: str = "256M",
                 extra_args: tuple[str, ...] = ()) -> list[str]:
    """QEMU for built-in guest `slot` of `guests` on any ivshmem server at socket_path (shmguard's, or QEMU's own
    contrib server with a plain peer as the host): the guest's slot and the host's peer id on its command line."""
    image = build_guest(log=log.info)
    image = dataclasses.replace(image, cmdline=f"{image.cmdline} {slot_params(guests, slot)}")
    log.info("guest kernel: %s", image.kernel_name)
    accel, reason = choose_accel(kernel=image.kernel)
    log.info("QEMU accelerator: %s (%s)", accel, reason)
    if accel == "tcg" and (hint := tcg_tsc_hint()):
        image = dataclasses.replace(image, cmdline=f"{image.cmdline} {hint}")
    return qemu_command(socket_path=socket_path, vectors=vectors, guest=image, host_peer_id=host_peer_id,
                        accel=accel, memory=memory, extra_args=extra_args)


class GuestVM:
    """QEMU started after hardening (it inherits no capability the supervisor dropped); on_exit(pid, status) is
    called once, from the loop, when its console pipe closes."""

    def __init__(self, loop: EventLoop, argv: list[str], on_exit: Callable[[int, int], None], name: str = "guest",
                 process: QemuProcess | None = None):
        self.loop, self.on_exit, self.name = loop, on_exit, name  # its console lines are logged as "NAME: ..."
        self.process = process or QemuProcess(argv)
        if process is None:
            log.info("started QEMU pid %d: %s", self.process.pid, " ".join(argv))
        self.loop.add_reader(self.process.console_fd, self._on_console)

    def snapshot(self, fds: dict[str, int], fd_name: str = "qemu-console") -> dict:
        fds[fd_name] = self.process.console_fd
        return {"pid": self.process.pid, "argv": self.process.argv, "name": self.name, "console": fd_name}

    @classmethod
    def adopt(cls, loop: EventLoop, state: dict, console_fd: int, on_exit: Callable[[int, int], None]) -> GuestVM:
        """The QEMU a predecessor started, still this process's child; its console goes on into the log."""
        process = QemuProcess.adopt(state["pid"], console_fd, state["argv"])
        log.info("took over QEMU pid %d", process.pid)
        return cls(loop, process.argv, on_exit, state.get("name", "guest"), process)

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> bool:
        """A ring held for a guest whose QEMU is gone would wait for ever: QEMU never comes back."""
        return self.process.poll() is not None

    def _on_console(self) -> None:
        for line in self.process.read_console():
            if line.strip():
                log.info("%s: %s", self.name, line)
        if self.process.console_eof:  # the pipe closes when QEMU exits (or closes its stdout: then it is ended)
            self.loop.remove_reader(self.process.console_fd)
            self.on_exit(self.process.pid, self.process.terminate(timeout=2.0))

    def close(self) -> None:
        if not self.process.console_eof:
            self.loop.remove_reader(self.process.console_fd)
        self.process.close()


def start_guests(loop: EventLoop, argvs: list[list[str]], on_exit: Callable[[int, int], None]) -> list[GuestVM]:
    """Several built-in guests, one QEMU each; guest k's console lines are logged as "guest k: ..."."""
    return [GuestVM(loop, argv, on_exit, name=f"guest {k}") for k, argv in enumerate(argvs)]
