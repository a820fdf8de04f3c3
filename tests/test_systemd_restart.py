"""The shipped unit under Debian's systemd 252 as PID 1 (systemd-nspawn): `systemctl restart`, `kill -9` of the main
pid and `systemctl reload`, each while a QEMU that is not shmguard's child (it runs outside the container, as libvirt's
would run outside the unit) is attached; after each, the same guest prints a new message.

The container runs the steps in a oneshot unit and meets the host through files in a shared directory: the host starts
QEMU once the unit serves, the container writes the messages, the host reads QEMU's console.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from test_systemd_container import TEST_UNIT, WHEEL, committed_tree, debootstrap_tree

from shmguard.guest import build_guest
from shmguard.qemu import choose_accel, qemu_command

MESSAGES = ("before restart", "after restart", "after kill -9", "after reload")

INSIDE = r"""#!/bin/bash
out=/mnt/out
step() { local name=$1; shift; "$@" >"$out/$name" 2>&1; echo $? >"$out/$name.rc"; }
policy=/etc/shmguard/vm.toml
send() { shmguard write --policy $policy -m "$1" --ring guest --timeout 60; }
main_pid() { systemctl show -p MainPID --value shmguard@vm.service; }
served() {  # until the unit is active under a main pid other than $1 and answers
    for _ in $(seq 600); do
        pid=$(main_pid)
        if [ "$pid" != 0 ] && [ "$pid" != "$1" ] && shmguard status --json --policy $policy >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}
step install bash /mnt/work/tree/scripts/install-systemd --source /mnt/work/dist/@WHEEL@ --wheelhouse /mnt/work/wheels
mkdir -p "$out/sock" && chown shmguard:ivshmem "$out/sock" && chmod 0755 "$out/sock"
/opt/shmguard/bin/python - <<'EOF'
from pathlib import Path
from shmguard.policy import relocated_policy_text
Path("/etc/shmguard/vm.toml").write_text(relocated_policy_text(
    "strict", socket_dir=Path("/mnt/out/sock"), audit_log=Path("/var/log/shmguard/vm/audit.log"),
    server={"owner": "shmguard"}, region={"size": "64K"}))
EOF
# The sockets are where the host's QEMU reaches them: a directory the unit may write.
mkdir -p /etc/systemd/system/shmguard@vm.service.d
printf '[Service]\nReadWritePaths=/mnt/out/sock\n' >/etc/systemd/system/shmguard@vm.service.d/sockets.conf
systemctl daemon-reload
step start systemctl start shmguard@vm.service
if [ "$(cat "$out/start.rc")" != 0 ]; then  # nothing to attach to: say why and stop
    journalctl --no-pager -o cat -u shmguard@vm.service >"$out/journal" 2>&1
    touch "$out/serving" "$out/done"
    systemctl poweroff --no-block
    exit 0
fi
shmguard status --json --policy $policy >"$out/status-start.json" 2>&1
touch "$out/serving"
for _ in $(seq 1800); do [ -e "$out/qemu-started" ] && break; sleep 0.1; done
for _ in $(seq 1800); do
    shmguard status --json --policy $policy 2>/dev/null | grep -q '"ready": true' && break
    sleep 0.1
done
step write-1 send "@M0@"
pid=$(main_pid)
step restart systemctl restart shmguard@vm.service
step served-restart served "$pid"
step write-2 send "@M1@"
pid=$(main_pid)
step kill systemctl kill --signal=KILL --kill-who=main shmguard@vm.service
step served-kill served "$pid"
step write-3 send "@M2@"
pid=$(main_pid)
step reload systemctl reload shmguard@vm.service
main_pid >"$out/pid-after-reload"
echo "$pid" >"$out/pid-before-reload"
step write-4 send "@M3@"
step status-end shmguard status --json --policy $policy
step stop systemctl stop shmguard@vm.service
step verify shmguard audit verify /var/log/shmguard/vm/audit.log
cp /var/log/shmguard/vm/audit.log "$out/audit.log"
step journal journalctl --no-pager -o cat -u shmguard@vm.service
touch "$out/done"
systemctl poweroff --no-block
"""


def inside_script() -> str:
    script = INSIDE.replace("@WHEEL@", WHEEL)
    for index, message in enumerate(MESSAGES):
        script = script.replace(f"@M{index}@", message)
    return script


def wait_for(path: Path, container: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert container.poll() is None, f"the container stopped before {path.name}: {container.stdout.read()}"
        assert time.monotonic() < deadline, f"no {path.name} within {timeout} s"
        time.sleep(0.2)


def seen(out: Path, step: str) -> tuple[int, str]:
    return int((out / f"{step}.rc").read_text()), (out / step).read_text()


def test_restart_kill_and_reload_under_systemd_keep_the_same_qemu_served(tmp_path):
    tree = debootstrap_tree()
    work = tmp_path / "work"
    committed_tree(work / "tree")
    for command in ([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", work / "dist", work / "tree"],
                    [sys.executable, "-m", "pip", "wheel", "-q", "-w", work / "wheels", work / "dist" / WHEEL]):
        built = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600)
        assert built.returncode == 0, built.stderr
    (work / "inside.sh").write_text(inside_script())
    (work / "shmguard-test.service").write_text(TEST_UNIT)
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o755)
    image = build_guest()
    accel, _ = choose_accel(kernel=image.kernel)
    container = subprocess.Popen(
        ["systemd-nspawn", "--register=no", "--keep-unit", "--capability=CAP_IPC_LOCK", "--quiet",
         "--console=read-only", "-D", str(tree), "--volatile=overlay", f"--bind-ro={work}:/mnt/work",
         f"--bind={out}:/mnt/out", f"--bind-ro={work}/shmguard-test.service:/etc/systemd/system/shmguard-test.service",
         "--boot", "systemd.wants=shmguard-test.service"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    console = tmp_path / "qemu-console.log"
    qemu = None
    try:
        wait_for(out / "serving", container, 600)
        if seen(out, "start")[0] != 0:
            wait_for(out / "done", container, 60)
            raise AssertionError(f"the unit did not start: {seen(out, 'start')[1]}\n{(out / 'journal').read_text()}")
        host_peer = json.loads((out / "status-start.json").read_text())["host_peer"]
        command = qemu_command(socket_path=str(out / "sock" / "ivshmem.sock"), vectors=2, guest=image,
                               host_peer_id=host_peer, accel=accel)
        with console.open("wb") as output:  # its own process on the host: not the unit's, not shmguard's child
            qemu = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
        (out / "qemu-started").touch()
        wait_for(out / "done", container, 900)
        container.wait(120)
        journal = seen(out, "journal")[1]
        for step in ("write-1", "restart", "served-restart", "write-2", "kill", "served-kill", "write-3", "reload",
                     "write-4", "stop", "verify"):
            status, output = seen(out, step)
            assert status == 0, f"{step}: {output}\n--- journal\n{journal[-4000:]}"
        printed = re.findall(r"received IRQ and full message: (.*)", console.read_text(errors="replace"))
        assert [line.strip() for line in printed] == list(MESSAGES), "each message once, by the same guest"
        assert (out / "pid-before-reload").read_text() == (out / "pid-after-reload").read_text(), \
            "a reload keeps the main pid"
        records = [json.loads(line) for line in (out / "audit.log").read_text().splitlines()]
        takeovers = [r["detail"] for r in records if r["action"] == "take-over"]
        assert [t["from"] for t in takeovers] == ["fd store", "fd store", "reload"], takeovers
        assert [t["clean"] for t in takeovers] == [True, False, True], takeovers
        leaves = [r for r in records if r["action"] == "peer-leave"]
        assert not leaves, f"the guest's QEMU never left, not even at the stop (systemd closes it): {leaves}"
        assert takeovers[1]["peers"] == takeovers[0]["peers"] == takeovers[2]["peers"], takeovers
    finally:
        if qemu is not None:
            qemu.terminate()
            qemu.wait(30)
        if container.poll() is None:
            container.kill()
            container.wait(30)
