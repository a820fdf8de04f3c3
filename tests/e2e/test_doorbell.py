"""The full doorbell flow against real QEMU and the built-in guest, driven through `shmguard` itself."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from helpers import SHMGUARD, RunningSupervisor, policy_file, rss_kib
from shmguard.client import IvshmemClient
from shmguard.control import DEFAULT_WAIT_SECONDS, WriteRequest, encode

ROOT = Path(__file__).resolve().parents[2]
SIZE = 4096


def send(supervisor, text: bytes, **fields) -> dict:
    return supervisor.client(timeout=90).ask(WriteRequest(text, text=True, ring="guest", wait=True, timeout=60,
                                                         **fields))


def guest_lines(supervisor) -> list[str]:
    return [line.split("guest: ", 1)[1] for line in supervisor.log().splitlines() if "guest: received IRQ" in line]


@pytest.fixture(scope="module")
def booted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("doorbell")
    supervisor = RunningSupervisor(policy_file(tmp_path, region={"size": SIZE}), guest=True, timeout=120)
    supervisor.wait_for("guest ready", 120)
    yield supervisor
    assert supervisor.stop() == 0, supervisor.log()


def test_a_hundred_messages_delivered_acknowledged_and_printed_in_order(booted):
    already = len(guest_lines(booted))
    sent = []
    for n in range(100):
        text = f"message {n:03d}: " + "x" * (n % 50)
        reply = send(booted, text.encode())
        assert reply["ok"], reply
        assert reply["delivered_exactly"], reply
        ack = reply["ack"].split()
        assert int(ack[2]) == len(text) and int(ack[3], 16) == zlib.crc32(text.encode())
        sent.append(text)
    deadline = time.monotonic() + 10
    while len(guest_lines(booted)) < already + 100 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert guest_lines(booted)[already:] == [f"received IRQ and full message: {text}" for text in sent]


def test_acknowledged_writes_leave_no_timeout_behind(booted):
    """A write that waits for its ack holds one timeout, up to the longest the policy allows, and gives it back with
    the ack: 4000 of them, each with that longest timeout, leave the supervisor's memory where it was (VmRSS). Each
    one used to stay in the loop's heap until its time was up (60 s of writes: about 1 MiB per 4000)."""
    def flood(count: int) -> None:
        with booted.client(timeout=90).connect() as connection:
            for n in range(count):
                connection.send(encode(WriteRequest(f"flood {n}".encode(), text=True, ring="guest", wait=True,
                                                    timeout=DEFAULT_WAIT_SECONDS)))
                reply = connection.receive()
                assert reply["ok"] and reply["delivered_exactly"], reply
    flood(500)  # the log, the audit log and the allocator's pools at their working size
    before = rss_kib(booted.proc.pid)
    flood(4000)
    assert rss_kib(booted.proc.pid) - before < 512


def test_a_message_filling_the_region_without_nul_is_printed_as_truncated(booted):
    text = b"T" * SIZE
    reply = send(booted, text, allow_unterminated=True)
    assert reply["ok"], reply
    deadline = time.monotonic() + 30
    while not any("truncated message" in line for line in guest_lines(booted)) and time.monotonic() < deadline:
        time.sleep(0.1)
    truncated = [line for line in guest_lines(booted) if "truncated message" in line]
    assert truncated and truncated[-1].startswith("received IRQ and truncated message: TTTT")
    reply = send(booted, b"after the full one")  # the padding clears the last byte again
    assert reply["ok"] and reply["delivered_exactly"]


def test_truncation_attempts_during_a_doorbell_stream_fail_and_the_stream_goes_on(booted):
    fd_dir = f"/proc/{booted.proc.pid}/fd"
    memfd = next(f"{fd_dir}/{n}" for n in os.listdir(fd_dir) if os.readlink(f"{fd_dir}/{n}").startswith("/memfd:"))
    for n in range(20):
        attack = subprocess.run(["truncate", "-s", str(n * 100), memfd], capture_output=True, text=True)
        assert attack.returncode != 0 and "Operation not permitted" in attack.stderr
        reply = send(booted, f"stream {n}".encode())
        assert reply["ok"] and reply["delivered_exactly"], reply
    assert os.stat(memfd).st_size == SIZE


def test_shmguard_write_and_notify_reach_the_guest(booted):
    result = subprocess.run([*SHMGUARD, "write", "-m", "hello world", "--ring", "guest",
                             "--policy", str(booted.policy_path)], capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    assert "guest acknowledged in" in result.stdout and "delivered exactly" in result.stdout
    status = booted.client().status()
    guest_peer = status["guest"]["peer"]
    before = len(guest_lines(booted))
    subprocess.run([*SHMGUARD, "notify", str(guest_peer), "1", "--socket", booted.socket], check=True, timeout=30)
    deadline = time.monotonic() + 10
    while len(guest_lines(booted)) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert guest_lines(booted)[-1] == "received IRQ and full message: hello world"


def test_a_write_issued_the_moment_qemu_starts_is_still_delivered(tmp_path):
    supervisor = RunningSupervisor(policy_file(tmp_path, region={"size": SIZE}), guest=True, timeout=120)
    try:
        # READY=1 comes before the guest has booted: this ring must be held until the guest is ready.
        result = subprocess.run([*SHMGUARD, "write", "-m", "early bird", "--ring", "guest",
                                 "--policy", str(supervisor.policy_path)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr + supervisor.log()
        assert "held until the guest was ready" in result.stdout and "delivered exactly" in result.stdout
        printed, deadline = "received IRQ and full message: early bird", time.monotonic() + 10
        while printed not in guest_lines(supervisor) and time.monotonic() < deadline:
            time.sleep(0.05)  # the guest prints just after it acknowledges
        assert printed in guest_lines(supervisor)
    finally:
        supervisor.stop()


@pytest.mark.parametrize("on_exit", ["stay", "exit"])
def test_qemu_killed_from_outside_is_reported_and_recorded(tmp_path, on_exit):
    supervisor = RunningSupervisor(policy_file(tmp_path, region={"size": SIZE}, qemu={"on_exit": on_exit}),
                                   guest=True, timeout=120)
    try:
        supervisor.wait_for("guest ready", 120)
        qemu_pid = int(supervisor.wait_for_log(r"started QEMU pid (\d+)").group(1))
        os.kill(qemu_pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while "QEMU pid" not in supervisor.log().split("started QEMU")[-1] and time.monotonic() < deadline:
            time.sleep(0.1)
        if on_exit == "exit":
            assert supervisor.proc.wait(20) == 3
        else:
            time.sleep(0.5)
            assert supervisor.proc.poll() is None  # still serving
            with IvshmemClient(supervisor.socket, vectors=2) as peer:
                assert peer.shm_size == SIZE
            # a ring for a guest whose QEMU is gone is refused at once, never held forever
            reply = send(supervisor, b"anyone there?")
            assert reply["ok"] is False and "no guest is connected" in reply["error"], reply
        exits = [r for r in supervisor.audit_records() if r["action"] == "qemu-exit"]
        assert exits and exits[0]["detail"]["pid"] == qemu_pid and exits[0]["detail"]["status"] == -signal.SIGKILL
        assert f"QEMU pid {qemu_pid} exited" in supervisor.log()
    finally:
        supervisor.stop()


def test_the_readme_main_command_as_written_succeeds():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```(?:sh|bash|shell)?\n(.*?)```", readme, re.DOTALL)
    main_command = next(line.strip() for block in commands for line in block.splitlines() if "demo" in line)
    result = subprocess.run(["bash", "-c", main_command], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "demo: OK" in result.stdout
