"""Hardening on real processes and real uids: each case runs in a child and is checked from outside."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from shmguard.errors import PolicyError, ShmguardError
from shmguard.hardening import (
    capability_mask,
    capability_names,
    drop_identity,
    lock_memory,
    mapping_address,
    process_security,
    read_proc_status,
)

NOBODY = 65534
STANDARD_CAPS = ("chown", "fowner", "dac_override")

PRELUDE = """
import json, os, signal, sys, threading
import prctl
from shmguard.errors import ShmguardError
from shmguard.hardening import drop_identity, harden, lock_memory
from shmguard.policy import HardeningPolicy

def report(**fields):
    print(json.dumps(fields), flush=True)
"""

# Holds a memfd with a secret and waits until the test closes its stdin.
TARGET = """
secret = os.memfd_create("secret")
os.write(secret, b"the secret")
{setup}
report(pid=os.getpid(), fd=secret, dumpable=bool(prctl.get_dumpable()))
sys.stdin.read()
"""

def python(code: str) -> list[str]:
    return [sys.executable, "-c", PRELUDE + textwrap.dedent(code)]


def run_child(code: str) -> dict:
    """Run code in a fresh interpreter; it must print exactly one JSON line via report()."""
    result = subprocess.run(python(code), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


class Target:
    """A long-lived child set up by `setup`, inspected from the parent while it waits."""

    def __init__(self, setup: str):
        code = TARGET.format(setup=textwrap.dedent(setup))
        self.process = subprocess.Popen(python(code), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        assert line, self.process.stderr.read()
        self.info = json.loads(line)
        self.pid: int = self.info["pid"]

    def status(self) -> dict[str, str]:
        return read_proc_status(self.pid)

    def attack_as_nobody(self) -> str:
        """An unprivileged process of the same uid reads the target's memfd through /proc."""
        attacker = subprocess.run(["cat", f"/proc/{self.pid}/fd/{self.info['fd']}"], user=NOBODY, group=NOBODY,
                                  extra_groups=[], capture_output=True, text=True, timeout=60)
        if attacker.returncode == 0:
            return "stolen:" + attacker.stdout
        assert "Permission denied" in attacker.stderr, attacker.stderr
        return "denied"

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def mask(status: dict[str, str], field: str) -> int:
    return int(status[field], 16)


# ---------------------------------------------------------------- harden()


def test_strict_policy_leaves_no_capabilities_as_root():
    with Target("harden(HardeningPolicy(capabilities=()))") as target:
        status = target.status()
        assert status["Uid"].split() == ["0"] * 4  # still root, but a root without powers
        assert status["NoNewPrivs"] == "1"
        for field in ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"):
            assert mask(status, field) == 0, (field, status[field])
        assert target.info["dumpable"] is False
        assert status["Name"] == "shmguard"


def test_strict_policy_after_dropping_to_nobody():
    with Target("drop_identity('nobody', 'nogroup'); harden(HardeningPolicy())") as target:
        status = target.status()
        assert status["Uid"].split() == [str(NOBODY)] * 4
        assert status["Gid"].split() == [str(NOBODY)] * 4
        assert status["Groups"] == ""
        assert status["NoNewPrivs"] == "1"
        for field in ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"):
            assert mask(status, field) == 0, (field, status[field])
        # A non-dumpable process's private /proc entries belong to root instead of its own uid.
        assert os.stat(f"/proc/{target.pid}/fd").st_uid == 0


def test_same_uid_process_can_take_fds_of_an_unhardened_process():
    # Control: the same nobody process without harden() is open to any other nobody process.
    with Target("drop_identity('nobody', 'nogroup'); prctl.set_dumpable(1)") as target:
        assert target.info["dumpable"] is True
        assert os.stat(f"/proc/{target.pid}/fd").st_uid == NOBODY
        assert target.attack_as_nobody() == "stolen:the secret"


def test_same_uid_process_cannot_take_fds_of_a_hardened_process():
    setup = "drop_identity('nobody', 'nogroup'); prctl.set_dumpable(1); harden(HardeningPolicy())"
    with Target(setup) as target:
        assert target.info["dumpable"] is False
        assert target.attack_as_nobody() == "denied"


@pytest.mark.parametrize("identity", ["root", "nobody"])
def test_standard_policy_keeps_exactly_chown_fowner_dac_override(identity):
    drop = f"drop_identity('nobody', 'nogroup', keep={STANDARD_CAPS!r})" if identity == "nobody" else ""
    setup = f"""
    {drop}
    harden(HardeningPolicy(capabilities={STANDARD_CAPS!r}))
    probe = os.open("/tmp", os.O_TMPFILE | os.O_WRONLY, 0o600)
    os.fchown(probe, 4242, 4242)  # needs CAP_CHOWN
    """
    with Target(setup) as target:
        status = target.status()
        expected = capability_mask(STANDARD_CAPS)
        assert capability_names(status["CapEff"]) == ["chown", "dac_override", "fowner"]
        assert mask(status, "CapEff") == mask(status, "CapPrm") == mask(status, "CapBnd") == expected
        assert mask(status, "CapInh") == mask(status, "CapAmb") == 0
        assert status["NoNewPrivs"] == "1"
        if identity == "nobody":
            assert status["Uid"].split() == [str(NOBODY)] * 4


def test_required_step_failure_is_one_clear_line():
    result = run_child("""
    drop_identity("nobody", "nogroup")
    try:
        harden(HardeningPolicy(capabilities=("chown",), required=True))
    except ShmguardError as exc:
        report(error=str(exc), no_new_privs=prctl.get_no_new_privs())
    """)
    error = result["error"]
    assert "\n" not in error
    assert "'capabilities'" in error and "chown" in error and "65534" in error
    assert result["no_new_privs"] == 1  # the steps before the failure were applied


def test_optional_policy_reports_the_failure_as_a_warning():
    result = run_child("""
    drop_identity("nobody", "nogroup")
    outcome = harden(HardeningPolicy(capabilities=("chown",), required=False))
    report(ok=outcome.ok, warnings=list(outcome.warnings), steps=outcome.describe())
    """)
    assert result["ok"] is False
    assert any("capabilities" in warning and "chown" in warning for warning in result["warnings"])
    assert {step["name"] for step in result["steps"]} >= {"dumpable", "no-new-privs", "verify"}


def test_harden_refuses_a_process_with_threads():
    result = run_child("""
    gate = threading.Event()
    threading.Thread(target=gate.wait, daemon=True).start()
    try:
        harden(HardeningPolicy())
    except ShmguardError as exc:
        report(error=str(exc))
    gate.set()
    """)
    assert "single-thread" in result["error"] and "2 threads" in result["error"]


# ---------------------------------------------------------------- drop_identity()


def test_drop_identity_cannot_be_undone():
    result = run_child("""
    drop_identity("nobody", "nogroup")
    try:
        os.setuid(0)
        regained = True
    except PermissionError:
        regained = False
    report(resuid=os.getresuid(), resgid=os.getresgid(), groups=os.getgroups(), regained=regained)
    """)
    assert result == {"resuid": [NOBODY] * 3, "resgid": [NOBODY] * 3, "groups": [], "regained": False}


def test_drop_identity_refuses_to_keep_setuid():
    result = run_child("""
    try:
        drop_identity("nobody", "nogroup", keep=("setuid",))
    except ShmguardError as exc:
        report(error=str(exc), uid=os.getuid())
    """)
    assert "setuid" in result["error"] and result["uid"] == 0


def test_drop_identity_without_privilege_says_what_to_do():
    result = run_child("""
    drop_identity("nobody", "nogroup")
    try:
        drop_identity("daemon")
    except ShmguardError as exc:
        report(error=str(exc))
    """)
    assert "CAP_SETUID" in result["error"] and "User=" in result["error"]


def test_drop_identity_names_a_missing_user():
    with pytest.raises(ShmguardError, match="no-such-shmguard-user"):
        drop_identity("no-such-shmguard-user")


# ---------------------------------------------------------------- lock_memory()


def vm_locked_kb() -> int:
    return int(read_proc_status()["VmLck"].split()[0])


def test_lock_memory_pins_the_region_and_lets_it_close():
    before = vm_locked_kb()
    region = mmap.mmap(-1, 4 << 20)
    lock_memory(region)
    assert vm_locked_kb() - before >= 4096
    region.close()  # no BufferError: the address lookup released its export
    assert vm_locked_kb() == before


def test_mapping_address_matches_the_mapping():
    region = mmap.mmap(-1, 4096)
    region[:5] = b"hello"
    address = mapping_address(region)
    assert ctypes.string_at(address, 5) == b"hello"
    region.close()


def test_lock_memory_over_the_limit_explains_the_fix():
    result = run_child("""
    import mmap, resource
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 << 10, 64 << 10))
    drop_identity("nobody", "nogroup")  # no CAP_IPC_LOCK any more: the limit applies
    region = mmap.mmap(-1, 1 << 20)
    try:
        lock_memory(region)
    except ShmguardError as exc:
        report(error=str(exc))
    """)
    error = result["error"]
    assert "\n" not in error
    assert "LimitMEMLOCK" in error and "1048576-byte" in error and "65536 bytes" in error


# ---------------------------------------------------------------- child_preexec()

# A subreaper adopts the orphaned sleep, so it can tell how the sleep ended.
ORPHAN_WATCH = """
import json, os, signal, subprocess, sys, time
import prctl
prctl.set_child_subreaper(1)
use_preexec = sys.argv[1] == "with"
middle = subprocess.Popen([sys.executable, "-c", '''
import subprocess, sys
from shmguard.hardening import child_preexec
preexec = child_preexec() if sys.argv[1] == "with" else None
sleep = subprocess.Popen(["sleep", "1000"], preexec_fn=preexec)
print(sleep.pid, flush=True)
sleep.wait()
''', sys.argv[1]], stdout=subprocess.PIPE, text=True)
sleep_pid = int(middle.stdout.readline())
status = open(f"/proc/{sleep_pid}/status").read()
os.kill(middle.pid, signal.SIGKILL)
middle.wait()
deadline = time.monotonic() + 10
outcome = "alive"
while time.monotonic() < deadline:
    pid, wait_status = os.waitpid(sleep_pid, os.WNOHANG)
    if pid:
        outcome = f"signal {os.WTERMSIG(wait_status)}" if os.WIFSIGNALED(wait_status) else "exited"
        break
    time.sleep(0.02)
if outcome == "alive":
    os.kill(sleep_pid, signal.SIGKILL)
    os.waitpid(sleep_pid, 0)
print(json.dumps({"outcome": outcome, "no_new_privs": "NoNewPrivs:\\t1" in status}))
"""


@pytest.mark.parametrize("mode", ["with", "without"])
def test_child_preexec_kills_the_child_with_its_parent(mode):
    result = subprocess.run([sys.executable, "-c", ORPHAN_WATCH, mode], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    if mode == "with":
        assert outcome == {"outcome": f"signal {int(signal.SIGKILL)}", "no_new_privs": True}
    else:  # control: without it the sleep outlives its parent
        assert outcome == {"outcome": "alive", "no_new_privs": False}


def test_child_preexec_dies_when_the_parent_is_already_gone():
    # The closure records its creator's pid; run it in a grandchild, whose parent is someone else.
    result = run_child("""
    from shmguard.hardening import child_preexec
    preexec = child_preexec(signal.SIGTERM)
    child = os.fork()
    if child == 0:
        grandchild = os.fork()
        if grandchild == 0:
            preexec()
            os._exit(0)
        _, status = os.waitpid(grandchild, 0)
        os._exit(os.WTERMSIG(status) if os.WIFSIGNALED(status) else 100)
    _, status = os.waitpid(child, 0)
    report(signal=os.WEXITSTATUS(status))
    """)
    assert result["signal"] == signal.SIGTERM


# ---------------------------------------------------------------- helpers


def test_capability_names_and_masks_round_trip():
    assert capability_names("000000000000000b") == ["chown", "dac_override", "fowner"]
    assert capability_mask(["CAP_CHOWN", "fowner", "dac_override"]) == 0xB
    assert capability_names(1 << 45) == ["cap_45"]
    with pytest.raises(PolicyError, match="unknown capability 'chwon'"):
        capability_mask(["chwon"])


def test_process_security_describes_a_live_process():
    with Target("harden(HardeningPolicy(capabilities=('chown',)))") as target:
        described = process_security(target.pid)
        assert described["no_new_privs"] is True
        assert described["capabilities"]["effective"] == ["chown"]
        assert described["capabilities"]["bounding"] == ["chown"]


def test_read_proc_status_reads_this_process():
    status = read_proc_status()
    assert status["Pid"] == str(os.getpid())
    assert read_proc_status("thread-self")["Pid"] == str(os.getpid())
