"""`shmguard run` without click: the supervisor's start is what a boot to ready waits on, and click is ~25 ms of
its imports. shmguard/lean.py parses the forms of `run` it knows exactly as click does (tests/test_lean.py holds
the two parsers to the same result) and calls run() here; cli.py's `run` (its --help, and every other form) calls
the same function."""

from __future__ import annotations

import logging
import os
import sys

from .errors import ShmguardError


def run(policy_name, size, vectors, socket_path, control_path, audit_log, no_guest, guests, guest_kernel,
        guest_initrd, guest_append, qemu_args, fd_store, verbose) -> int:
    """The supervisor in the foreground until it stops; returns its exit status."""
    from . import handover, succession
    from .guest_vm import GuestOptions
    from .policy import load_policy
    from .supervisor import Supervisor

    setup_logging(verbose)
    policy = load_policy(policy_name).with_overrides(size=size, vectors=vectors, socket=socket_path,
                                                    control_socket=control_path, audit_log=audit_log)
    if no_guest and (guest_kernel or guest_initrd or qemu_args):
        raise ShmguardError("--no-guest boots nothing: drop --guest-kernel, --guest-initrd and --qemu-arg")
    if guest_initrd and not guest_kernel:
        raise ShmguardError("--guest-initrd needs --guest-kernel")
    if guests > 1 and (no_guest or guest_kernel):
        raise ShmguardError(f"--guests {guests} boots built-in guests: drop --no-guest and --guest-kernel")
    guest = None if no_guest else GuestOptions(guest_kernel, guest_initrd, guest_append, tuple(qemu_args), guests)
    if succession.CHECK_ENV in os.environ:  # a running supervisor asks whether this shmguard would take over
        succession.check_and_exit(policy, guest.builtin if guest else None, int(os.environ[succession.CHECK_ENV]))
    inherited = handover.inherited()
    supervisor = Supervisor(policy, guest, fd_store=fd_store or "FDSTORE" in os.environ)
    try:
        supervisor.start(inherited)
    except BaseException:
        supervisor.stop()
        raise
    return supervisor.run()


def setup_logging(verbose: bool) -> None:
    # The format names no caller, thread or process: not looking them up for every record (the logging HOWTO's
    # "Optimization") is about a tenth of the bytecodes of a write the guest acknowledges.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="shmguard: %(levelname)s: %(message)s")
