"""Errors a user can cause. Each carries one line that says what, where and what to do."""


class ShmguardError(Exception):
    """Base class: the CLI prints str(error) on one line and exits non-zero."""

    exit_code = 1


class PolicyError(ShmguardError):
    exit_code = 2


class RegionError(ShmguardError):
    pass


class ProtocolError(ShmguardError):
    """The other side of an ivshmem socket broke the protocol."""


class ControlError(ShmguardError):
    """A control request was refused or could not be delivered."""
