"""Upgrade in place: `shmguard reload` hands everything to a new shmguard process image and no peer notices.

Real QEMU with the built-in guest (shmguard's child, and one started on its own as libvirt would), two host
peers ringing each other on every vector while each reload runs, 20 reloads in a row.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

import shmguard
from helpers import MEMBER_USER, SHMGUARD, RunningSupervisor, as_user, policy_file
from shmguard.audit import read_records, verify
from shmguard.client import IvshmemClient
from shmguard.control import ControlClient, ReloadRequest, WriteRequest
from shmguard.guest import build_guest
from shmguard.qemu import choose_accel, qemu_command

RELOADS = 20
VECTORS = 2


def guest_lines(text: str) -> list[str]:
    return [line.split("received IRQ and full message: ", 1)[1] for line in text.splitlines()
            if "received IRQ and full message: " in line]


def send(supervisor: RunningSupervisor, text: str) -> dict:
    reply = supervisor.client(timeout=120).ask(WriteRequest(text.encode(), text=True, ring="guest", wait=True,
                                                           timeout=60))
    assert reply["ok"] and reply["delivered_exactly"], reply
    return reply


def ring_both_ways(a: IvshmemClient, b: IvshmemClient) -> int:
    """Each host peer rings the other on every vector; every ring arrives, once."""
    rung = 0
    for sender, receiver in ((a, b), (b, a)):
        for vector in range(VECTORS):
            sender.notify(receiver.own_id, vector)
            assert receiver.wait([vector], timeout=10) == vector, f"ring on vector {vector} lost"
            rung += 1
    return rung


def reload_while_ringing(supervisor: RunningSupervisor, a: IvshmemClient, b: IvshmemClient, number: int,
                         sent: list[str]) -> int:
    """`shmguard reload` runs while the peers ring each other and a writer sends messages (held while the hand-over
    is prepared, answered by whichever process serves them); it exits 0 once the successor serves."""
    drain_notifications(supervisor)
    reload = subprocess.Popen([*SHMGUARD, "reload", "--policy", str(supervisor.policy_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writer = subprocess.Popen([*SHMGUARD, "write", "--policy", str(supervisor.policy_path), "--lines", "--ring",
                               "guest"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    during = [f"during reload {number:02d} message {k}" for k in range(3)]
    writer.stdin.write("".join(f"{text}\n" for text in during))
    writer.stdin.close()
    rung = 0
    while reload.poll() is None or writer.poll() is None:
        rung += ring_both_ways(a, b)
    werr = writer.stderr.read()
    writer.wait()
    assert writer.returncode == 0, f"the writer failed: {werr}\n{supervisor.log_tail()}"
    sent.extend(during)
    out, err = reload.communicate()
    assert reload.returncode == 0, f"reload failed: {err}\n{supervisor.log_tail()}"
    assert out.startswith("reloaded: pid "), out
    return rung


def drain_notifications(supervisor: RunningSupervisor) -> None:
    """Read what the supervisor told its notify socket (RELOADING=1, READY=1, ...), as systemd would."""
    supervisor.notify.setblocking(False)
    try:
        while supervisor.notify.recv(4096):
            pass
    except BlockingIOError:
        pass
    finally:
        supervisor.notify.setblocking(True)


def status(supervisor: RunningSupervisor) -> dict:
    return json.loads(supervisor.cli("status", "--json", "--policy", str(supervisor.policy_path), check=False).stdout)


def peers_seen(client: IvshmemClient) -> dict:
    client.update()  # a leave or a new greeting would show here
    return client.describe()


def run_reloads(supervisor: RunningSupervisor, console, guest_pid: int) -> None:
    a = IvshmemClient(supervisor.socket).connect()
    b = IvshmemClient(supervisor.socket).connect()
    deadline = time.monotonic() + 10
    while b.own_id not in a.peers and time.monotonic() < deadline:  # b's announcement may still be on its way
        a.wait([], timeout=0.05)
    try:
        before = status(supervisor)
        seen_a, seen_b = peers_seen(a), peers_seen(b)
        sent, rung = [], 0
        for n in range(RELOADS):
            text = f"before reload {n:02d}"
            send(supervisor, text)
            sent.append(text)
            rung += reload_while_ringing(supervisor, a, b, n, sent)
            rung += ring_both_ways(a, b)
            after = status(supervisor)
            assert after["host_peer"] == before["host_peer"]
            assert [p["id"] for p in after["peers"]] == [p["id"] for p in before["peers"]]
            assert guest_pid in [p.get("pid") for p in after["peers"]], "the guest's QEMU left"
            assert peers_seen(a) == seen_a and peers_seen(b) == seen_b, "a peer saw a leave or a join"
        send(supervisor, "after the last reload")
        sent.append("after the last reload")
        deadline = time.monotonic() + 30
        while len(guest_lines(console())) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert guest_lines(console()) == sent, "every message printed once, in order"
        assert rung >= RELOADS * 2 * VECTORS * 2
    finally:
        a.close()
        b.close()
    result = verify(supervisor.audit)
    assert result.ok, result.summary()
    actions = [record["action"] for record in read_records(supervisor.audit)]
    assert actions.count("reload") == RELOADS and actions.count("take-over") == RELOADS
    assert actions.count("write") == len(sent), "every message recorded once"
    during = actions[actions.index("reload"):len(actions) - actions[::-1].index("take-over")]
    assert "peer-leave" not in during and "peer-join" not in during, "nobody left or joined during the reloads"


def test_twenty_reloads_with_the_builtin_guest_keep_qemu_peers_and_rings(tmp_path):
    supervisor = RunningSupervisor(policy_file(tmp_path, region={"size": "64K"}), guest=True, timeout=180)
    try:
        supervisor.wait_for("guest ready", 180)
        guest = status(supervisor)["guest"]["peer"]
        guest_pid = next(p["pid"] for p in status(supervisor)["peers"] if p["id"] == guest)
        run_reloads(supervisor, supervisor.log, guest_pid)
        assert _parent(guest_pid) == supervisor.proc.pid, "the same pid is still QEMU's parent"
    finally:
        assert supervisor.stop() == 0, supervisor.log_tail()


def test_twenty_reloads_with_a_qemu_shmguard_did_not_start(tmp_path):
    supervisor = RunningSupervisor(policy_file(tmp_path, region={"size": "64K"}), timeout=60)
    console = tmp_path / "qemu-console.log"
    image = build_guest()
    accel, _ = choose_accel(kernel=image.kernel)
    command = qemu_command(socket_path=supervisor.socket, vectors=VECTORS, guest=image,
                           host_peer_id=status(supervisor)["host_peer"], accel=accel)
    with console.open("wb") as output:  # as libvirt runs it: its own process, not shmguard's child
        qemu = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    try:
        _wait_until(lambda: status(supervisor)["guest"]["ready"], 180, "the guest never said ready")
        run_reloads(supervisor, lambda: console.read_text(errors="replace"), qemu.pid)
        assert qemu.poll() is None, "QEMU survived every reload"
    finally:
        qemu.terminate()
        qemu.wait(30)
        assert supervisor.stop() == 0, supervisor.log_tail()


@pytest.mark.parametrize("change, expected", [
    ({"region": {"size": "128K"}}, "region.size cannot change"),
    ({"server": {"vectors": 4}}, "server.vectors cannot change"),
    ("bad toml [", "not valid TOML"),
])
def test_a_reload_that_cannot_apply_leaves_the_old_process_serving(tmp_path, change, expected):
    policy = policy_file(tmp_path, region={"size": "64K"})
    supervisor = RunningSupervisor(policy)
    try:
        peer = IvshmemClient(supervisor.socket).connect()
        original = policy.read_text()
        if isinstance(change, str):
            policy.write_text(original + "\n" + change)
        else:
            policy.write_text(_with_paths_of(policy_file(tmp_path, **{"region": {"size": "64K"}, **change}),
                                             original))
        result = supervisor.cli("reload", "--policy", str(supervisor.policy_path), check=False)
        assert result.returncode != 0
        assert expected in result.stderr and result.stderr.count("\n") == 1, result.stderr
        supervisor.proc.send_signal(signal.SIGHUP)  # the same refusal, asked by systemd's ExecReload=
        supervisor.wait_for_log(rf"reload refused: .*{re.escape(expected)}")
        policy.write_text(original)
        assert supervisor.proc.poll() is None
        assert status(supervisor)["peers"][-1]["id"] == peer.own_id, "the old process goes on serving"
        records = list(read_records(supervisor.audit))
        assert records[-1]["action"] == "reload" and records[-1]["result"] == "refused"
        peer.close()
    finally:
        supervisor.stop()


def _with_paths_of(changed: Path, original: str) -> str:
    """The changed policy's text with the original's paths (sockets, log, region file)."""
    want, have = tomllib.loads(original), tomllib.loads(changed.read_text())
    text = changed.read_text()
    for section, key in (("server", "socket"), ("control", "socket"), ("audit", "path"), ("region", "path")):
        if key in have.get(section, {}) and key in want.get(section, {}):
            text = text.replace(f'"{have[section][key]}"', f'"{want[section][key]}"')
    return text


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _wait_until(predicate, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (KeyError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(message)


def release(directory: Path, state_version: int | None = None) -> Path:
    """A copy of this shmguard package as another release would install it (optionally speaking another state
    version: the fault of a release that does not understand the running one's state)."""
    package = directory / "shmguard"
    shutil.copytree(Path(shmguard.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    if state_version is not None:
        handover = package / "handover.py"
        handover.write_text(handover.read_text().replace("STATE_VERSION = 1\n", f"STATE_VERSION = {state_version}\n"))
    return package


@pytest.mark.parametrize("running_version, refused", [(1, False), (2, True)])
def test_an_upgrade_in_place_runs_the_newly_installed_code_or_leaves_the_old_serving(tmp_path, monkeypatch,
                                                                                    running_version, refused):
    """`python -m shmguard` run from a directory whose `shmguard` is a link to the installed release; the link is
    switched to another release, as an upgrade would, and the running supervisor reloads."""
    old, new = release(tmp_path / "old", running_version), release(tmp_path / "new")
    installed = tmp_path / "installed"
    installed.mkdir()
    (installed / "shmguard").symlink_to(old)
    monkeypatch.chdir(installed)  # python -m puts the working directory first on the module path
    supervisor = RunningSupervisor(policy_file(tmp_path))
    try:
        peer = IvshmemClient(supervisor.socket).connect()
        (installed / "shmguard").unlink()
        (installed / "shmguard").symlink_to(new)
        result = supervisor.cli("reload", "--policy", str(supervisor.policy_path), check=False)
        records = list(read_records(supervisor.audit))
        if refused:
            assert result.returncode != 0
            assert "state version 2; this shmguard takes version 1 only" in result.stderr, result.stderr
            assert records[-1]["action"] == "reload" and records[-1]["result"] == "refused"
        else:
            assert result.returncode == 0, result.stderr
            assert records[-1]["action"] == "take-over" and records[-1]["detail"]["package"] == str(new)
        assert peers_seen(peer)["own_id"] == peer.own_id and supervisor.proc.poll() is None
        assert status(supervisor)["peers"][-1]["id"] == peer.own_id, "the same peer, served on"
        peer.close()
    finally:
        supervisor.stop()


def member_asks_for_a_reload(control: str) -> dict:
    return ControlClient(control, timeout=30).ask(ReloadRequest())


def test_a_group_member_may_write_but_not_reload(tmp_path):
    """Reloading execs a program: root and the supervisor's own uid only, whatever the policy lets members do."""
    supervisor = RunningSupervisor(policy_file(tmp_path))
    try:
        reply = as_user(MEMBER_USER, member_asks_for_a_reload, supervisor.control)
        assert not reply["ok"] and "may not reload" in reply["error"], reply
        records = list(read_records(supervisor.audit))
        assert records[-1]["action"] == "refused" and records[-1]["detail"]["op"] == "reload"
        assert not any(r["action"] in ("reload", "take-over") for r in records)
        assert status(supervisor)["host_peer"] == 0 and supervisor.proc.poll() is None
    finally:
        supervisor.stop()


def test_reloads_asked_at_once_run_one_at_a_time(tmp_path):
    supervisor = RunningSupervisor(policy_file(tmp_path))
    try:
        asked = [subprocess.Popen([*SHMGUARD, "reload", "--policy", str(supervisor.policy_path)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
        results = [(p.wait(120), p.stderr.read()) for p in asked]
        done = [code for code, _ in results if code == 0]
        refused = [err for code, err in results if code != 0]
        assert done and all("a reload is in progress already" in err for err in refused), results
        actions = [r["action"] for r in read_records(supervisor.audit)]
        assert actions.count("reload") == actions.count("take-over") == len(done)
    finally:
        supervisor.stop()
