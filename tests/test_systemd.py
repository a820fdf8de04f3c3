"""Production packaging: sd_notify against a real socket, the units' sandbox, sysusers/tmpfiles, installer."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_DIR = REPO / "systemd"
INSTALLER = REPO / "scripts" / "install-systemd"
MAX_EXPOSURE = 2.0

NOTIFY_CHILD = """
import sys
from shmguard.linux import sdnotify
sent = {"ready": sdnotify.ready, "stopping": sdnotify.stopping, "status": sdnotify.status}[sys.argv[1]](sys.argv[2])
print(sent)
"""


# ---------------------------------------------------------------- sd_notify


def notify_from_child(address: str, call: str, text: str) -> tuple[str, str]:
    """Run sdnotify.<call>(text) in a child whose NOTIFY_SOCKET is `address`; return (its result, stdout)."""
    env = {key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"}
    if address:
        env["NOTIFY_SOCKET"] = address
    child = subprocess.run([sys.executable, "-c", NOTIFY_CHILD, call, text], env=env, capture_output=True,
                           text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    return child.stdout.strip(), child.stderr


def datagram_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(10)
    return sock


def test_ready_reaches_a_path_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    with datagram_socket(path) as manager:
        sent, _ = notify_from_child(path, "ready", "serving 4M region\non /run/shmguard")
        assert sent == "True"
        assert manager.recv(4096) == b"READY=1\nSTATUS=serving 4M region on /run/shmguard"


def test_stopping_reaches_an_abstract_socket():
    name = f"shmguard-test-notify-{os.getpid()}"
    with datagram_socket("\0" + name) as manager:
        sent, _ = notify_from_child("@" + name, "stopping", "")
        assert sent == "True"
        assert manager.recv(4096) == b"STOPPING=1"


def test_status_alone_is_one_field(tmp_path):
    path = str(tmp_path / "notify.sock")
    with datagram_socket(path) as manager:
        notify_from_child(path, "status", "3 peers")
        assert manager.recv(4096) == b"STATUS=3 peers"


def test_notify_without_systemd_returns_false(tmp_path):
    assert notify_from_child("", "ready", "")[0] == "False"
    assert notify_from_child(str(tmp_path / "nobody-listens.sock"), "ready", "")[0] == "False"
    assert notify_from_child("vsock:2:1234", "ready", "")[0] == "False"


# ---------------------------------------------------------------- unit sandbox


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    assert found, "systemd-analyze is required (Debian: apt-get install systemd)"
    return found


def exposure(unit: Path) -> float:
    result = subprocess.run([systemd_analyze(), "security", "--offline=yes", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Unknown" not in result.stderr and "Failed" not in result.stderr, result.stderr
    match = re.search(r"Overall exposure level for (\S+): (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:]
    print(f"\n{match.group(1)}: exposure {match.group(2)} (limit {MAX_EXPOSURE})")
    return float(match.group(2))


def test_service_exposure_is_low():
    assert exposure(SYSTEMD_DIR / "shmguard.service") <= MAX_EXPOSURE


def test_template_instance_exposure_is_low(tmp_path):
    instance = tmp_path / "shmguard@test.service"
    shutil.copy(SYSTEMD_DIR / "shmguard@.service", instance)
    assert exposure(instance) <= MAX_EXPOSURE


@pytest.mark.parametrize("unit", ["shmguard.service", "shmguard@.service"])
def test_units_keep_what_shmguard_needs(unit):
    settings = (SYSTEMD_DIR / unit).read_text()
    for line in ("Type=notify", "NotifyAccess=main", "User=shmguard", "Group=ivshmem", "UMask=0077",
                 "RestrictAddressFamilies=AF_UNIX", "CapabilityBoundingSet=\n", "AmbientCapabilities=\n",
                 "LimitMEMLOCK=", "--no-guest"):
        assert line in settings, line
    for forbidden in ("PrivateTmp=yes", "PrivateUsers=yes"):
        assert forbidden not in settings
    directory = "shmguard/%i" if "@" in unit else "shmguard\n"
    assert f"RuntimeDirectory={directory}" in settings


# ---------------------------------------------------------------- MemoryDenyWriteExecute=yes, emulated


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


LD, JEQ, JSET, AND, RET = 0x20, 0x15, 0x45, 0x54, 0x06
DENY, ALLOW = 0x00050001, 0x7FFF0000  # SECCOMP_RET_ERRNO|EPERM, SECCOMP_RET_ALLOW
# systemd's rule on x86_64: refuse mmap with PROT_WRITE|PROT_EXEC, mprotect/pkey_mprotect with PROT_EXEC,
# shmat with SHM_EXEC. Each jump skips jt/jf instructions; 14 is DENY, 15 is ALLOW.
MDWE_PROGRAM = [
    (LD, 0, 0, 4), (JEQ, 0, 13, 0xC000003E),  # arch == x86_64, else allow
    (LD, 0, 0, 0),  # syscall number
    (JEQ, 3, 0, 9), (JEQ, 5, 0, 10), (JEQ, 4, 0, 329), (JEQ, 5, 8, 30),  # mmap, mprotect, pkey_mprotect, shmat
    (LD, 0, 0, 32), (AND, 0, 0, 6), (JEQ, 4, 5, 6),  # mmap: prot & (W|X) == W|X
    (LD, 0, 0, 32), (JSET, 2, 3, 4),  # mprotect: prot & X
    (LD, 0, 0, 32), (JSET, 0, 1, 0o100000),  # shmat: shmflg & SHM_EXEC
    (RET, 0, 0, DENY), (RET, 0, 0, ALLOW),
]


def deny_write_execute() -> None:
    """preexec_fn: the seccomp filter MemoryDenyWriteExecute=yes installs, for the exec'd program."""
    libc = ctypes.CDLL(None, use_errno=True)
    program = (SockFilter * len(MDWE_PROGRAM))(*(SockFilter(*op) for op in MDWE_PROGRAM))
    fprog = SockFprog(len(MDWE_PROGRAM), program)
    if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0):  # NO_NEW_PRIVS, SECCOMP
        os._exit(99)


UNDER_MDWE = """
import ctypes, importlib, mmap, pkgutil
import shmguard
for module in pkgutil.iter_modules(shmguard.__path__):
    if not module.name.startswith("__"):  # __main__ would run the CLI
        importlib.import_module("shmguard." + module.name)
from shmguard.hardening import harden, lock_memory
from shmguard.policy import load_policy
region = mmap.mmap(-1, 4096)
lock_memory(region)
harden(load_policy("strict").hardening)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("W+X mapped")
except PermissionError:
    print("W+X refused")
print(ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 42)())
"""


def test_cpython_and_shmguard_run_under_memory_deny_write_execute():
    result = subprocess.run([sys.executable, "-c", UNDER_MDWE], preexec_fn=deny_write_execute,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["W+X", "refused", "42"]  # the filter was live, ctypes still works


# The start-up sequence of the supervisor under shmguard.service, without systemd: a private /proc like
# ProtectProc=invisible + ProcSubset=pid, the MemoryDenyWriteExecute filter, LimitMEMLOCK=64M, and an
# unprivileged user with an empty bounding set (what User= and CapabilityBoundingSet= give).
SERVICE_LIKE = """
import mmap, os, resource
from shmguard.hardening import drop_identity, harden, lock_memory, read_proc_status
from shmguard.policy import load_policy
policy = load_policy("strict")
limit = min(64 << 20, resource.getrlimit(resource.RLIMIT_MEMLOCK)[1])  # 64M, or what this host allows
resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))
region = mmap.mmap(-1, policy.region.size)
drop_identity("nobody", "nogroup")
lock_memory(region)
outcome = harden(policy.hardening)
status = read_proc_status()
print(outcome.ok, status["VmLck"].split()[0], status["NoNewPrivs"], status["CapBnd"], os.path.exists("/proc/sys"))
"""


def test_strict_startup_sequence_in_a_service_like_sandbox():
    mount_proc = 'mount -t proc -o subset=pid,hidepid=invisible proc /proc && exec "$0" -c "$1"'
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", mount_proc,
                             sys.executable, SERVICE_LIKE], preexec_fn=deny_write_execute,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "4096", "1", "0000000000000000", "False"]


def qemu_tcg_under_mdwe(accel: str) -> subprocess.CompletedProcess | None:
    """Start QEMU paused under the filter; None if it was still running after 5 s (accepted its accelerator)."""
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu, "qemu-system-x86_64 is required (Debian: apt-get install qemu-system-x86)"
    command = [qemu, "-accel", accel, "-M", "q35", "-m", "64", "-S", "-display", "none", "-monitor", "none",
               "-serial", "none", "-nodefaults"]
    process = subprocess.Popen(command, preexec_fn=deny_write_execute, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return None
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def test_qemu_tcg_needs_split_wx_under_memory_deny_write_execute():
    # What the comment in shmguard.service promises to anyone who lets the unit launch QEMU.
    refused = qemu_tcg_under_mdwe("tcg")
    assert refused is not None and refused.returncode != 0
    assert "mprotect" in refused.stderr and "not permitted" in refused.stderr
    assert qemu_tcg_under_mdwe("tcg,split-wx=on") is None


# ---------------------------------------------------------------- sysusers.d, tmpfiles.d


def test_sysusers_creates_shmguard_in_group_ivshmem(tmp_path):
    sysusers = shutil.which("systemd-sysusers")
    assert sysusers, "systemd-sysusers is required"
    (tmp_path / "etc").mkdir()  # an empty root: the files hold only what shmguard.conf declares
    subprocess.run([sysusers, f"--root={tmp_path}", str(SYSTEMD_DIR / "sysusers.d" / "shmguard.conf")],
                   check=True, capture_output=True, timeout=60)
    groups = {line.split(":")[0]: line.split(":")[2] for line in (tmp_path / "etc/group").read_text().split()}
    users = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    assert users["shmguard"][3] == groups["ivshmem"]  # primary group ivshmem
    assert users["shmguard"][6].endswith("nologin")
    assert int(users["shmguard"][2]) < 1000  # a system user: logind's RemoveIPC= leaves it alone

    tmpfiles = shutil.which("systemd-tmpfiles")
    assert tmpfiles, "systemd-tmpfiles is required"
    subprocess.run([tmpfiles, f"--root={tmp_path}", "--create", str(SYSTEMD_DIR / "tmpfiles.d" / "shmguard.conf")],
                   check=True, capture_output=True, timeout=60)
    runtime = (tmp_path / "run/shmguard").stat()
    assert (runtime.st_mode & 0o7777, runtime.st_uid, runtime.st_gid) == (
        0o710, int(users["shmguard"][2]), int(groups["ivshmem"]))
    assert (tmp_path / "var/log/shmguard").stat().st_mode & 0o7777 == 0o700
    assert (tmp_path / "etc/shmguard").is_dir()


# ---------------------------------------------------------------- installer

INSTALLED = {
    "usr/local/lib/systemd/system/shmguard.service": "shmguard.service",
    "usr/local/lib/systemd/system/shmguard@.service": "shmguard@.service",
    "usr/local/lib/sysusers.d/shmguard.conf": "sysusers.d/shmguard.conf",
    "usr/local/lib/tmpfiles.d/shmguard.conf": "tmpfiles.d/shmguard.conf",
}


def test_install_systemd_into_a_prefix(tmp_path):
    result = subprocess.run([str(INSTALLER), "--prefix", str(tmp_path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    for target, source in INSTALLED.items():
        installed = tmp_path / target
        assert installed.read_bytes() == (SYSTEMD_DIR / source).read_bytes(), target
        assert installed.stat().st_mode & 0o777 == 0o644
    assert "nothing activated" in result.stdout


def test_install_systemd_without_systemd_as_pid1_copies_and_says_so():
    # The real default prefix, in a private mount namespace where /usr/local/lib is a fresh tmpfs and
    # /run/systemd is hidden, so that even on a systemd host nothing is activated for real.
    script = (f"if [ -d /run/systemd ]; then mount -t tmpfs tmpfs /run/systemd; fi && "
              f"mount -t tmpfs tmpfs /usr/local/lib && {INSTALLER} --units-only && ls -R /usr/local/lib")
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "systemd is not PID 1" in result.stdout
    for name in ("shmguard.service", "shmguard@.service", "shmguard.conf"):
        assert name in result.stdout


def test_install_systemd_rejects_unknown_arguments():
    result = subprocess.run([str(INSTALLER), "--bogus"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--bogus" in result.stderr
