"""Succession: a supervisor hands everything to the process that follows it (handover.py has the format).

- Reload: `Reload` checks that the installed shmguard will take the state (a child runs it with the state and
  the policy as it is now, and says yes or why not: the old process goes on serving if not), holds new control
  requests until the write in flight is acknowledged, then execs it in place with the fds.
- Crash recovery under systemd: `StoreKeeper` keeps the fds in systemd's fd store as they come and go, and the
  state in two memfds written in turn, so a process started after `kill -9` finds both in LISTEN_FDS.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable

from . import handover
from .control_server import Request
from .errors import ShmguardError
from .linux import sdnotify
from .linux.fdstore import FdStore
from .linux.hardening import drop_exec_capabilities, keep_across_exec

log = logging.getLogger("shmguard")

CHECK_ENV = "SHMGUARD_HANDOVER_CHECK"  # the successor only checks the state it is shown (fd of a memfd), then exits
CHECK_SECONDS = 60.0  # the installed shmguard starting and reading the policy; a first run compiles its bytecode
QUIESCE_POLL = 0.01


def successor_argv() -> list[str]:
    """The command line this process was started with, from the interpreter on: an exec of it runs whatever
    shmguard is installed now (`python -m shmguard ...` and the `shmguard` script alike)."""
    return [sys.executable, *sys.orig_argv[1:]]


def fixed_settings(policy, guest_builtin: bool | None) -> dict:
    """What a running supervisor cannot change under its peers: a successor whose policy differs refuses."""
    return {"region.backend": policy.region.backend, "region.size": policy.region.size,
            "region.path": policy.region.path if policy.region.backend == "file" else None,
            "server.socket": policy.server.socket, "server.vectors": policy.server.vectors,
            "control.socket": policy.control.socket, "audit.path": str(policy.audit.path),
            "hardening.user": policy.hardening.user, "guest": guest_builtin}


class Reload:
    """One reload: check, quiesce, exec. One that ends without an exec tells Succession.reload_ended why."""

    def __init__(self, succession: Succession, request=None):
        self.succession, self.request = succession, request
        self.loop = succession.sup.loop
        self.child: subprocess.Popen | None = None
        self.state_fd = -1
        self.deadline = 0.0
        self._output = b""  # the check's last words

    def begin(self) -> None:
        # The check is shown what it decides on (the version, the settings that cannot change), no fd.
        self.state_fd = handover.state_memfd({"version": handover.STATE_VERSION,
                                                 "fixed": self.succession.fixed_settings()})
        env = dict(os.environ, **{CHECK_ENV: str(self.state_fd)})
        env.pop("NOTIFY_SOCKET", None)  # the check must not tell systemd anything
        try:
            self.child = subprocess.Popen(successor_argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, env=env, pass_fds=(self.state_fd,))
        except OSError as exc:
            self._end(f"cannot start {successor_argv()[0]}: {exc.strerror}")
            return
        self.deadline = time.monotonic() + CHECK_SECONDS
        os.set_blocking(self.child.stdout.fileno(), False)
        self.loop.add_reader(self.child.stdout.fileno(), self._on_check_output)
        self.loop.call_later(CHECK_SECONDS, self._check_overdue)

    def _on_check_output(self) -> None:
        try:
            chunk = os.read(self.child.stdout.fileno(), 65536)
        except BlockingIOError:
            return
        if chunk:
            self._output = (self._output + chunk)[-4096:]
            return
        self.loop.remove_reader(self.child.stdout.fileno())
        self.child.stdout.close()
        status = self.child.wait()
        lines = [line for line in self._output.decode(errors="replace").splitlines() if line.strip()]
        if status != 0:
            reason = lines[-1].removeprefix("shmguard: error: ") if lines else f"exited with status {status}"
            self._end(f"the successor refused to take over: {reason}")
            return
        self.succession.sup.control.hold(True)
        self.deadline = time.monotonic() + self.succession.quiesce_seconds()
        self._wait_for_quiet()

    def _check_overdue(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.kill()  # its EOF ends the check as a refusal

    def _wait_for_quiet(self) -> None:
        succession, control = self.succession, self.succession.sup.control
        if not succession.is_quiet():
            if time.monotonic() < self.deadline:
                self.loop.call_later(QUIESCE_POLL, self._wait_for_quiet)
                return
            control.hold(False)
            self._end("a write is still waiting for the guest's acknowledgement; try again")
            return
        try:
            succession.hand_over(self.request)  # returns only if the exec failed
        except ShmguardError as exc:
            control.hold(False)
            self._end(str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must end the reload, never leave it half done
            log.exception("reload failed")
            control.hold(False)
            self._end(f"internal error ({exc}); see the supervisor's log")

    def _end(self, error: str) -> None:
        if self.state_fd >= 0:
            os.close(self.state_fd)
            self.state_fd = -1
        self.succession.reload_ended(self.request, error)


def check_and_exit(policy, guest_builtin: bool | None, state_fd: int) -> None:
    """The successor's side of the check: one line and exit 1 if it would refuse the state, exit 0 if not."""
    state = handover.read_state_fd(state_fd)
    if state is None:
        print("shmguard: error: the state to take over is unreadable", file=sys.stderr)
        sys.exit(1)
    problems = handover.problems(state, fixed_settings(policy, guest_builtin))
    if problems:
        print(f"shmguard: error: {'; '.join(problems)}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)


def exec_successor(state: dict, fds: dict[str, int], before_exec: Callable[[], None]) -> ShmguardError:
    """Exec the installed shmguard in place with `fds` (named in SHMGUARD_HANDOVER) and the state; returns
    the error (the fds made close-on-exec again) only if the exec failed."""
    state_fd = handover.state_memfd(state)
    named = {**fds, "state": state_fd}
    for fd in named.values():
        os.set_inheritable(fd, True)
    env = dict(os.environ, **{handover.HANDOVER_ENV: handover.handover_environment(named)})
    argv = successor_argv()
    before_exec()
    try:
        os.execve(argv[0], argv, env)
    except OSError as exc:
        error = ShmguardError(f"cannot exec {argv[0]}: {exc.strerror}")
    for fd in fds.values():
        os.set_inheritable(fd, False)
    os.close(state_fd)
    return error


class Succession:
    """The supervisor's side of a hand-over: reload in place, and the fd store kept current under systemd."""

    def __init__(self, supervisor, fd_store: bool):
        self.sup = supervisor
        self.fd_store = fd_store  # asked for (--fd-store, or $FDSTORE)
        self.store: StoreKeeper | None = None  # kept once the supervisor serves (start_store)
        self.reloading: Reload | None = None

    def start_store(self, inherited: dict[str, int] | None = None, generation: int = 0) -> None:
        """Under systemd with FileDescriptorStoreMax=: every fd a successor needs goes into the fd store."""
        if not self.fd_store:
            return
        self.store = StoreKeeper(FdStore(), self.sup.loop, self.crash_state)
        if inherited:
            self.store.adopt_slots(inherited, generation)
        fds: dict[str, int] = {"region": self.sup.region.fd}
        self.sup.server.snapshot(fds)
        self.sup.control.listener.snapshot(fds, "control-listener")
        self.store.keep(fds)
        self.sup.server.on_fds = lambda added, gone: (self.store.keep(added), self.store.forget(gone))
        self.sup.add_stop_hook(self.store.close)

    def reload(self, request: Request | None = None) -> None:
        if self.reloading is not None:
            if request is not None:
                request.fail("a reload is in progress already")
            return
        sdnotify.reloading("reloading: checking the installed shmguard")
        self.reloading = Reload(self, request)
        self.reloading.begin()

    def reload_ended(self, request: Request | None, error: str) -> None:
        """A reload that did not happen: said once, recorded, and the old process goes on serving."""
        self.reloading = None
        log.error("reload refused: %s; still serving", error)
        self.sup.note("reload", result="refused", detail={"reason": error})
        self.sup.say_ready()
        if request is not None:
            request.fail(f"reload refused: {error}")

    def fixed_settings(self) -> dict:
        return fixed_settings(self.sup.policy, self.sup.guest_options.builtin if self.sup.guest_options else None)

    def quiesce_seconds(self) -> float:
        """The longest a write in flight may wait for its acknowledgement, and a second more."""
        return float(self.sup.policy.shares.wait_seconds) + 1.0

    def is_quiet(self) -> bool:
        """No write in flight or queued: nothing the successor would have to finish."""
        return not self.sup.guest.busy()

    def snapshot(self) -> tuple[dict, dict[str, int]]:
        """Everything a successor exec'd in place needs, as plain data, and the fds it names."""
        sup = self.sup
        state, fds = self._serving_state()
        fds["audit"] = sup.audit.fileno()
        live_qemu = sup.qemu is not None and not sup.qemu.exited()
        state.update({"audit": {"path": str(sup.audit.path), "seq": sup.audit.last_seq},
                      "control": sup.control.snapshot(fds, self.reloading and self.reloading.request),
                      "qemu": sup.qemu.snapshot(fds) if live_qemu else None,
                      "qemus": [vm.snapshot(fds, f"qemu-console-{k}") for k, vm in enumerate(sup.qemus)
                                if not vm.exited()],
                      "guard": sup.guard.snapshot(fds), "exit_code": sup.exit_code})
        return state, fds

    def crash_state(self) -> dict:
        """What the fd store's state memfds hold: enough to go on serving the same peers after a crash."""
        state, fds = self._serving_state()
        state["control"] = {"listener": self.sup.control.listener.snapshot(fds, "control-listener"),
                            "connections": []}
        state["clean"] = self.sup.stopping
        return state

    def _serving_state(self) -> tuple[dict, dict[str, int]]:
        """The region and the peers: what both ways to a successor hand over."""
        sup, fds = self.sup, {"region": self.sup.region.fd}
        region = {"backend": sup.region.backend, "size": sup.region.size, "path": sup.region.path}
        return {"version": handover.STATE_VERSION, "fixed": self.fixed_settings(), "pid": os.getpid(),
                "region": region, "server": sup.server.snapshot(fds), "host_peer": sup.host.id,
                "guest": sup.guest.plain()}, fds

    def hand_over(self, request: Request | None) -> None:
        """Record the hand-over, then exec; raises ShmguardError (everything as it was) if the exec failed."""
        self.sup.recorder.flush()  # replies held for their records' fsync go out now, into what is handed over
        state, fds = self.snapshot()
        self.sup.record("reload", detail={"successor": successor_argv()[:3], "version": state["version"],
                                      "peers": sorted(self.sup.server.peers), "qemu": state["qemu"] and
                                      state["qemu"]["pid"]})
        log.info("handing over to the installed shmguard (%d fds, state version %d)", len(fds), state["version"])

        def before_exec() -> None:  # nothing here stops serving: an exec that fails leaves all as it was
            self.sup.guard.record_pending()
            keep_across_exec(self.sup.policy.hardening.capabilities)
            for handler in logging.getLogger().handlers:
                handler.flush()

        error = exec_successor(state, fds, before_exec)
        drop_exec_capabilities()
        os.close(fds.pop("known-good"))
        raise error

    def keeping_fds(self) -> bool:
        """Under systemd's fd store the peers and sockets outlive this process: a stop leaves them to systemd (which
        closes them on `systemctl stop`, and hands them to the next process on a restart)."""
        return self.store is not None


class StoreKeeper:
    """The fd store kept current: every fd a successor needs under its name, the state in two memfds in turn."""

    def __init__(self, store: FdStore, loop, state: Callable[[], dict]):
        self.store, self.loop, self.state = store, loop, state
        self.names: set[str] = set()
        self.slots = [os.memfd_create(name, os.MFD_CLOEXEC) for name in handover.STATE_SLOTS]
        self.generation = 0
        self._due = False
        for name, fd in zip(handover.STATE_SLOTS, self.slots, strict=True):
            self.store.remove(name)  # a predecessor's slots (after a crash, a restart or a reload) go
            self.store.store(name, fd)

    def adopt_slots(self, inherited: dict[str, int], generation: int) -> None:
        """After a crash the store handed back the old slots too: ours replaced them; the count goes on."""
        for name in handover.STATE_SLOTS:
            if name in inherited:
                os.close(inherited.pop(name))
        self.generation = generation

    def keep(self, fds: dict[str, int]) -> None:
        for name, fd in fds.items():
            if name not in self.names and self.store.store(name, fd):
                self.names.add(name)
        self.changed()

    def forget(self, names) -> None:
        for name in names:
            if name in self.names:
                self.store.remove(name)
                self.names.discard(name)
        self.changed()

    def changed(self) -> None:
        """The state is written once per turn of the loop however many changes it saw."""
        if not self._due:
            self._due = True
            self.loop.call_later(0, self.write_now)

    def write_now(self) -> None:
        self._due = False
        self.generation += 1
        handover.write_state(self.slots[self.generation % 2], self.state(), self.generation)

    def close(self) -> None:
        for fd in self.slots:
            os.close(fd)
        self.slots = []
