"""shmguard under Debian's systemd 252 as PID 1, for real: a systemd-nspawn container booted from a debootstrap tree
(cached outside the checkout, keyed by what it is made from), scripts/install-systemd run inside it, the unit and a
template instance started, READY and STATUS seen in `systemctl status`, an orderly stop.

One boot does everything: a oneshot unit inside the container runs the steps, writes what it saw to a directory
shared with the host, and powers the container off; the assertions read those files.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shmguard import units

ROOT = Path(__file__).resolve().parents[1]
SUITE, VARIANT, MIRROR = "bookworm", "minbase", "http://deb.debian.org/debian"
PACKAGES = ("systemd", "python3-venv")  # systemd as PID 1; python3 -m venv for /opt/shmguard
CACHE = Path("/var/cache/shmguard-tests")
WHEEL = "shmguard-0.1.0-py3-none-any.whl"

INSIDE = r"""#!/bin/bash
# Runs inside the container as a oneshot unit; every step leaves its output in /mnt/out.
out=/mnt/out
step() { local name=$1; shift; "$@" >"$out/$name" 2>&1; echo $? >"$out/$name.rc"; }
wheel=/mnt/work/dist/@WHEEL@
# root's PATH starts with a python3 of its own (a pyenv shim, say): the units could not reach it (ProtectHome=yes).
mkdir -p /root/bin && printf '#!/bin/sh\necho "the python3 on PATH was run" >&2\nexit 97\n' >/root/bin/python3
chmod +x /root/bin/python3
step install-1 env PATH="/root/bin:$PATH" bash /mnt/work/tree/scripts/install-systemd --source "$wheel" \
    --wheelhouse /mnt/work/wheels
step interpreter readlink -f /opt/shmguard/bin/python
step install-2 bash /opt/shmguard/share/shmguard/scripts/install-systemd --wheelhouse /mnt/work/wheels
step program readlink -f /usr/local/bin/shmguard
step start-main systemctl start shmguard.service
step status-main systemctl status --no-pager --lines=0 shmguard.service
# A template instance whose policy follows shmguard@.service's comments, and one that does not.
/opt/shmguard/bin/python - <<'EOF'
from pathlib import Path
from shmguard.policy import relocated_policy_text
Path("/etc/shmguard/demo.toml").write_text(relocated_policy_text(
    "strict", socket_dir=Path("/run/shmguard/demo"), audit_log=Path("/var/log/shmguard/demo/audit.log"),
    server={"owner": "shmguard"}))
Path("/etc/shmguard/nomlock.toml").write_text(relocated_policy_text(
    "strict", socket_dir=Path("/run/shmguard/nomlock"), audit_log=Path("/var/log/shmguard/nomlock/audit.log"),
    server={"owner": "shmguard"}))
Path("/etc/shmguard/rootowned.toml").write_text(relocated_policy_text(
    "strict", socket_dir=Path("/run/shmguard/rootowned"), audit_log=Path("/var/log/shmguard/rootowned/audit.log")))
EOF
step check-demo shmguard policy check --unit shmguard@demo.service /etc/shmguard/demo.toml
step check-rootowned shmguard policy check --unit shmguard@rootowned.service /etc/shmguard/rootowned.toml
step start-demo systemctl start shmguard@demo.service
step status-demo systemctl status --no-pager --lines=0 shmguard@demo.service
step cli-status-demo shmguard status --policy /etc/shmguard/demo.toml
step start-rootowned systemctl start shmguard@rootowned.service
# mlock refused by a seccomp filter (as systemd-nspawn does without CAP_IPC_LOCK): the error must say so.
mkdir -p /etc/systemd/system/shmguard@nomlock.service.d
printf '[Service]\nSystemCallFilter=~@memlock\nRestart=no\n' >/etc/systemd/system/shmguard@nomlock.service.d/filter.conf
systemctl daemon-reload
step start-nomlock systemctl start shmguard@nomlock.service
step stop systemctl stop shmguard@demo.service shmguard.service
step show-main systemctl show -p ActiveState,Result,ExecMainStatus shmguard.service shmguard@demo.service
for unit in shmguard shmguard@demo shmguard@rootowned shmguard@nomlock; do
    step "journal-$unit" journalctl --no-pager -o cat -u "$unit.service"
done
touch "$out/done"
systemctl poweroff --no-block
"""

TEST_UNIT = """[Unit]
Description=shmguard's container test
After=basic.target
[Service]
Type=oneshot
ExecStart=/bin/bash /mnt/work/inside.sh
"""


def debootstrap_tree() -> Path:
    """The container's tree, made once per (suite, variant, packages, mirror, debootstrap version)."""
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "debootstrap"], capture_output=True,
                             text=True).stdout
    assert version, "debootstrap is missing: apt-get install debootstrap (scripts/bootstrap does)"
    assert shutil.which("systemd-nspawn"), "systemd-nspawn is missing: apt-get install systemd-container"
    key = hashlib.sha256(repr((SUITE, VARIANT, PACKAGES, MIRROR, version)).encode()).hexdigest()[:16]
    tree = CACHE / f"nspawn-{SUITE}-{key}"
    if (tree / "usr/lib/systemd/systemd").exists():
        return tree
    staging = CACHE / f".staging-{key}"
    shutil.rmtree(staging, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["debootstrap", f"--variant={VARIANT}", f"--include={','.join(PACKAGES)}", SUITE,
                             str(staging), MIRROR], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for old in CACHE.glob(f"nspawn-{SUITE}-*"):  # made from something else
        shutil.rmtree(old, ignore_errors=True)
    staging.rename(tree)
    return tree


def committed_tree(destination: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)


@pytest.fixture(scope="module")
def container(tmp_path_factory) -> Path:
    tree = debootstrap_tree()
    work = tmp_path_factory.mktemp("container")
    committed_tree(work / "tree")
    run = lambda *command: subprocess.run([str(c) for c in command], capture_output=True, text=True,  # noqa: E731
                                          timeout=600)
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", work / "dist", work / "tree")
    assert built.returncode == 0, built.stderr
    deps = run(sys.executable, "-m", "pip", "wheel", "-q", "-w", work / "wheels", work / "dist" / WHEEL)
    assert deps.returncode == 0, deps.stderr
    (work / "inside.sh").write_text(INSIDE.replace("@WHEEL@", WHEEL))
    (work / "shmguard-test.service").write_text(TEST_UNIT)
    out = work / "out"
    out.mkdir()
    booted = subprocess.run(
        ["systemd-nspawn", "--register=no", "--keep-unit", "--capability=CAP_IPC_LOCK", "--quiet",
         "--console=read-only", "-D", str(tree), "--volatile=overlay", f"--bind-ro={work}:/mnt/work",
         f"--bind={out}:/mnt/out", f"--bind-ro={work}/shmguard-test.service:/etc/systemd/system/shmguard-test.service",
         "--boot", "systemd.wants=shmguard-test.service"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert (out / "done").exists(), f"the container stopped early (exit {booted.returncode}):\n" + \
        booted.stdout[-3000:] + booted.stderr[-3000:] + "".join(
            f"\n--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(out.iterdir()))
    return out


def seen(out: Path, step: str) -> tuple[int, str]:
    return int((out / f"{step}.rc").read_text()), (out / step).read_text()


def test_install_systemd_installs_shmguard_where_the_units_run_it_and_again_nothing(container):
    status, output = seen(container, "install-1")
    assert status == 0, output
    assert "installed shmguard from /mnt/work/dist/" in output and "installed /usr/local/bin/shmguard" in output
    status, again = seen(container, "install-2")  # the installed copy of the script: its own package, as it is
    assert status == 0, again
    assert "installed shmguard" not in again and "/usr/local/bin/shmguard ->" not in again, again
    assert seen(container, "program")[1].strip() == "/opt/shmguard/bin/shmguard"
    interpreter = seen(container, "interpreter")[1].strip()
    assert interpreter.startswith("/usr/bin/python3"), f"the units run {interpreter}, not Debian's python3"


def test_the_unit_is_ready_with_its_status(container):
    assert seen(container, "start-main")[0] == 0, seen(container, "journal-shmguard")[1]
    status = seen(container, "status-main")[1]
    assert "Active: active (running)" in status, status
    assert 'Status: "serving /run/shmguard/ivshmem.sock"' in status, status


def test_a_template_instance_is_ready_and_answers(container):
    assert seen(container, "check-demo") == (0, "/etc/shmguard/demo.toml: OK for shmguard@demo.service\n")
    assert seen(container, "start-demo")[0] == 0, seen(container, "journal-shmguard@demo")[1]
    status = seen(container, "status-demo")[1]
    assert "Active: active (running)" in status and 'Status: "serving /run/shmguard/demo/ivshmem.sock"' in status
    status_code, cli = seen(container, "cli-status-demo")
    assert status_code == 0 and "socket /run/shmguard/demo/ivshmem.sock" in cli, cli


def test_a_policy_the_instance_cannot_serve_is_refused_with_the_reason(container):
    status, check = seen(container, "check-rootowned")
    assert status == 2
    assert "server.owner: shmguard@rootowned.service runs as shmguard, which cannot give a file to root" in check
    assert seen(container, "start-rootowned")[0] != 0
    journal = seen(container, "journal-shmguard@rootowned")[1]
    assert "/etc/shmguard/rootowned.toml: server.owner: shmguard@rootowned.service runs as shmguard" in journal
    assert "shmguard@rootowned.service: Control process exited, code=exited, status=2" in journal
    assert "serving /run/shmguard/rootowned" not in journal and "shmguard: error" not in journal  # never ran


def test_the_units_stop_in_order(container):
    assert seen(container, "stop")[0] == 0
    shown = seen(container, "show-main")[1].split("\n\n")
    for unit in shown:
        assert "ActiveState=inactive" in unit and "Result=success" in unit and "ExecMainStatus=0" in unit, shown
    for unit, log in (("shmguard", "/var/log/shmguard/audit.log"),
                      ("shmguard@demo", "/var/log/shmguard/demo/audit.log")):
        journal = seen(container, f"journal-{unit}")[1]
        assert re.search(rf"audit log {log} ends at seq \d+", journal) and "Deactivated successfully" in journal


def test_the_unit_checks_name_what_the_units_say():
    for name in ("shmguard.service", "shmguard@.service"):
        unit = (ROOT / "systemd" / name).read_text()
        assert f"User={units.UNIT_USER}\n" in unit and f"Group={units.UNIT_GROUP}\n" in unit
        assert f"LimitMEMLOCK={units.LIMIT_MEMLOCK >> 20}M\n" in unit
        assert "ExecStartPre=/usr/local/bin/shmguard policy check --unit %n " in unit
    assert units.unit_dirs("shmguard@demo.service") == ("/run/shmguard/demo", "/var/log/shmguard/demo")


def test_an_mlock_refused_by_a_filter_names_the_filter(container):
    assert seen(container, "start-nomlock")[0] != 0
    journal = seen(container, "journal-shmguard@nomlock")[1]
    assert "the limit allows it, so a seccomp filter refused mlock" in journal, journal
