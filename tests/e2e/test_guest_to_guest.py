"""Two built-in guests under real QEMU talk through the region and ring each other directly (`run --guests 2`):
the host only writes the command and reads the report. Then the same guests under QEMU's own contrib
ivshmem-server, with a plain peer as their host, exchange the same messages: shmguard adds nothing to the path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

from helpers import SHMGUARD, RunningSupervisor, policy_file
from shmguard.audit import verify
from shmguard.control import ControlError, SendRequest
from shmguard.guest_vm import slot_command
from shmguard.plain_host import PlainHost, wait_listening

ROOT = Path(__file__).resolve().parents[2]
SIZE = 4096
EACH_WAY = 100


def printed(log: str, guest: int | None = None) -> list[str]:
    """What a guest printed of the messages it received, in order (guest None: a console of its own)."""
    marker = ("" if guest is None else f"guest {guest}: ") + "received IRQ and full message: "
    return [line.split(marker, 1)[1] for line in log.splitlines() if marker in line]


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def sends(supervisor, source: int, target: int, texts: list[str]) -> list[dict]:
    client = supervisor.client(timeout=90)
    return [client.send(source, target, text.encode(), timeout=60) for text in texts]


def guests_of(supervisor) -> list[dict]:
    return supervisor.client().status()["guest"]["guests"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("guest-to-guest")
    supervisor = RunningSupervisor(policy_file(tmp_path, region={"size": SIZE}, qemu={"on_exit": "stay"}),
                                   "--guests", "2", guest=True, timeout=120)
    try:
        supervisor.wait_for("guests ready: 2 of 2", 240)
    except BaseException:
        supervisor.stop()
        raise
    yield supervisor
    assert supervisor.stop() == 0, supervisor.log_tail()


def test_a_hundred_messages_each_way_are_printed_once_by_the_receiver_and_acked_to_the_sender(pair):
    before = {k: len(printed(pair.log(), k)) for k in (0, 1)}
    texts = {k: [f"guest {k} to guest {1 - k}, message {n:03d}" + "." * (n % 40) for n in range(EACH_WAY)]
             for k in (0, 1)}
    replies: dict[int, list[dict]] = {}
    errors: list[BaseException] = []

    def direction(k: int) -> None:
        try:
            replies[k] = sends(pair, k, 1 - k, texts[k])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=direction, args=(k,)) for k in (0, 1)]  # both ways at once
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert not errors, errors
    peers = {entry["guest"]: entry["peer"] for entry in guests_of(pair)}
    for k in (0, 1):
        assert len(replies[k]) == EACH_WAY
        for text, reply in zip(texts[k], replies[k], strict=True):
            assert reply["delivered_exactly"], reply
            assert (reply["from_peer"], reply["to_peer"]) == (peers[k], peers[1 - k])
            assert reply["length"] == len(text) and reply["report"].split()[5] == f"{zlib.crc32(text.encode()):08x}"
            assert reply["round_trip_ms"] > 0  # measured inside the sending guest
    for k in (0, 1):  # each printed by its receiver, once, in order
        receiver = 1 - k
        wait_until(lambda r=receiver: len(printed(pair.log(), r)) >= before[r] + EACH_WAY, 30, "every line")
        assert printed(pair.log(), receiver)[before[receiver]:] == texts[k]
    reports = [r for r in pair.audit_records() if r["action"] == "guest-report"]
    assert sum(r["detail"]["result"] == "acknowledged" for r in reports) >= 2 * EACH_WAY
    commands = [r for r in pair.audit_records() if r["action"] == "write" and "command_for_guest" in r["detail"]]
    assert len(commands) >= 2 * EACH_WAY
    assert verify(pair.audit).ok


def test_status_lists_each_guest_with_its_peer_id_and_state(pair):
    result = pair.cli("status", "--policy", str(pair.policy_path))
    entries = guests_of(pair)
    assert [entry["state"] for entry in entries] == ["ready", "ready"]
    for entry in entries:
        assert f"guest {entry['guest']}: peer {entry['peer']}, ready" in result.stdout


def test_shmguard_send_reports_the_round_trip_and_refusals_are_one_line_and_change_nothing(pair):
    result = pair.cli("send", "--from", "1", "--to", "0", "-m", "through the CLI", "--policy", str(pair.policy_path))
    assert "acknowledged exactly" in result.stdout and "inside the guest" in result.stdout
    wait_until(lambda: "through the CLI" in printed(pair.log(), 0), 30, "printed by guest 0")
    log_before = Path(pair.audit).read_bytes()
    for args, reason in ((["--from", "0", "--to", "0", "-m", "me"], "two different guests"),
                         (["--from", "0", "--to", "1", "-m", "x" * 4000], "at most"),
                         (["--from", "0", "--to", "5", "-m", "x"], "two different guests")):
        refused = pair.cli("send", *args, "--policy", str(pair.policy_path), check=False)
        assert refused.returncode != 0 and reason in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    assert Path(pair.audit).read_bytes() == log_before


def test_a_send_to_a_guest_that_does_not_answer_times_out_and_the_sender_is_not_stuck(pair):
    victim = guests_of(pair)[1]["qemu_pid"]
    os.kill(victim, signal.SIGSTOP)  # guest 1 stops answering, its peer stays connected
    try:
        refused = pair.client(timeout=60).ask(SendRequest(0, 1, b"into the void", timeout=3))
        assert not refused["ok"] and refused["error"] == "guest 0 did not report within 3 s", refused
    finally:
        os.kill(victim, signal.SIGCONT)
    reply = pair.client(timeout=90).send(0, 1, b"after the pause", timeout=60)
    assert reply["delivered_exactly"], reply
    wait_until(lambda: "after the pause" in printed(pair.log(), 1), 30, "printed by guest 1")
    assert printed(pair.log(), 1).count("after the pause") == 1


def test_a_guest_killed_mid_stream_is_told_to_the_other_which_goes_on_and_its_successor_gets_a_new_id(pair,
                                                                                                      tmp_path):
    entries = guests_of(pair)
    old = {entry["guest"]: entry["peer"] for entry in entries}
    victim_pid = entries[1]["qemu_pid"]
    outcomes: list[str] = []

    def stream() -> None:  # guest 0 sends to guest 1 until that fails
        client = pair.client(timeout=90)
        for n in range(1000):
            try:
                client.send(0, 1, f"stream {n}".encode(), timeout=60)
                outcomes.append("ok")
            except ControlError as exc:
                outcomes.append(str(exc))
                return

    sender = threading.Thread(target=stream)
    sender.start()
    wait_until(lambda: outcomes.count("ok") >= 10, 120, "ten messages before the kill")
    os.kill(victim_pid, signal.SIGKILL)
    sender.join(120)
    assert not sender.is_alive()
    assert "left before acknowledging" in outcomes[-1] or "is not ready" in outcomes[-1], outcomes[-1]
    # guest 0 is told, and keeps working with the host
    wait_until(lambda: f"guest 0: shmguard-guest: peer {old[1]} (guest 1) left" in pair.log(), 30, "guest 0 told")
    reply = pair.client(timeout=90).write(b"host to guest 0 alone", text=True, ring=str(old[0]), wait=True,
                                          timeout=60)
    assert reply["delivered_exactly"]
    wait_until(lambda: "host to guest 0 alone" in printed(pair.log(), 0), 30, "printed by guest 0")
    refused = pair.client().ask(SendRequest(0, 1, b"nobody there"))
    assert not refused["ok"] and "guest 1 is not ready" in refused["error"], refused
    assert guests_of(pair)[1]["state"] == "empty"
    unhealthy = pair.cli("status", "--policy", str(pair.policy_path), check=False)
    assert unhealthy.returncode == 1 and unhealthy.stdout.startswith("UNHEALTHY: guest 1 is empty"), unhealthy.stdout
    # a guest started in its place, by hand: it takes slot 1 once it says ready, with an id never handed out before
    status = pair.client().status()
    console = tmp_path / "successor.log"
    argv = slot_command(pair.socket, 2, status["host_peer"], 2, 1)
    with console.open("wb") as out:
        successor = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        new = wait_until(lambda: (guests_of(pair)[1]["peer"] if guests_of(pair)[1]["state"] == "ready" else None),
                         240, "the successor ready")
        joined = [r["detail"].get("peer") for r in pair.audit_records() if r["action"] == "peer-join"]
        assert new not in old.values() and joined.count(new) == 1, (new, old, joined)
        wait_until(lambda: f"guest 0: shmguard-guest: peer {new} is guest 1" in pair.log(), 30, "guest 0 told")
        texts = {k: [f"resumed {k} to {1 - k} #{n}" for n in range(10)] for k in (0, 1)}
        before0 = len(printed(pair.log(), 0))
        for n in range(10):
            for k in (0, 1):
                reply = pair.client(timeout=90).send(k, 1 - k, texts[k][n].encode(), timeout=60)
                assert reply["delivered_exactly"] and reply["to_peer"] == (new if k == 0 else old[0]), reply
        wait_until(lambda: len(printed(pair.log(), 0)) >= before0 + 10, 30, "printed by guest 0")  # acked first
        assert printed(pair.log(), 0)[before0:] == texts[1]
        wait_until(lambda: printed(console.read_text(errors="replace"))[-1:] == texts[0][-1:], 30, "successor")
        assert printed(console.read_text(errors="replace")) == texts[0]  # nothing stale from its predecessor
        healthy = pair.cli("status", "--policy", str(pair.policy_path))
        assert healthy.stdout.startswith("healthy: ") and "2 guests ready" in healthy.stdout.splitlines()[0]
    finally:
        successor.kill()
        successor.wait()
    assert verify(pair.audit).ok


def test_the_same_guests_exchange_the_same_messages_through_qemus_own_contrib_server(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import qemu_contrib
    except ImportError:
        pytest.fail("tools/qemu_contrib.py (QEMU's contrib ivshmem-server built from Debian's source) is missing")
    server_binary = qemu_contrib.ivshmem_server()
    socket_path = tmp_path / "contrib.sock"
    server = subprocess.Popen([str(server_binary), "-F", "-S", str(socket_path), "-m", "/dev/shm", "-l", str(SIZE),
                               "-n", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    guests: list[subprocess.Popen] = []
    consoles = [tmp_path / f"guest{k}.log" for k in (0, 1)]
    try:
        wait_listening(str(socket_path), 10)
        with PlainHost(str(socket_path), guests=2) as host:  # joins first: the guests' host
            for k in (0, 1):
                with consoles[k].open("wb") as out:
                    guests.append(subprocess.Popen(slot_command(str(socket_path), 2, host.id, 2, k),
                                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT))
            host.wait_ready(240)
            texts = {k: [f"guest {k} to guest {1 - k}, message {n:03d}" for n in range(EACH_WAY)] for k in (0, 1)}
            for n in range(EACH_WAY):
                for k in (0, 1):
                    sent = host.send(k, 1 - k, texts[k][n].encode())
                    assert sent.exact and sent.report.peer == host.peers[1 - k], sent
        for k in (0, 1):
            wait_until(lambda r=k: len(printed(consoles[r].read_text(errors="replace"))) >= EACH_WAY, 30, "lines")
            assert printed(consoles[k].read_text(errors="replace")) == texts[1 - k]
    finally:
        for process in (*guests, server):
            process.kill()
            process.wait()


@pytest.mark.parametrize("args, error", [
    (["--guests", "3"], "a region of 4096 bytes is too small for 3 guests (each slot needs 832 bytes, in half the "
                        "region): use --size 8192 or more"),
    (["--guests", "2", "--no-guest"], "--guests 2 boots built-in guests: drop --no-guest and --guest-kernel"),
])
def test_run_refuses_what_cannot_be_booted_in_one_line_before_anything_exists(tmp_path, args, error):
    result = subprocess.run([*SHMGUARD, "run", "--policy", str(policy_file(tmp_path, region={"size": SIZE})), *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"shmguard: error: {error}"]
    assert not (tmp_path / "audit.log").exists()


def test_send_to_a_supervisor_without_several_guests_is_refused_in_one_line_and_recorded_nowhere(tmp_path):
    supervisor = RunningSupervisor(policy_file(tmp_path))
    try:
        log_before = Path(supervisor.audit).read_bytes()
        refused = supervisor.cli("send", "--from", "0", "--to", "1", "-m", "hi", "--policy",
                                 str(supervisor.policy_path), check=False)
        assert refused.returncode != 0
        assert refused.stderr.strip().splitlines() == [
            "shmguard: error: this supervisor runs one guest: guests send to each other under "
            "`shmguard run --guests 2` (or more)"]
        assert Path(supervisor.audit).read_bytes() == log_before
    finally:
        supervisor.stop()
