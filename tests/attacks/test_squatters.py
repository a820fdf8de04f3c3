"""The CLI checks who answers (issue 9, class 6): a local user binds a socket path while no supervisor holds it.

The squatter (`nobody`) binds and listens in a child dropped to its uid and hands the listening socket back over
SCM_RIGHTS: SO_PEERCRED of a listener is fixed at listen() time, so whoever connects sees the squatter's uid,
while this test (as the squatter's accomplice) accepts and records every byte the victim sends.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers import MEMBER_USER, OUTSIDER_USER, as_user, policy_file
from shmguard.launcher import SHMGUARD
from shmguard.policy import load_policy

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "write_shared_memory.sh"
POLICIES = ("strict", "standard", "zephyr")


def _listen_and_hand_back(path: str, back: socket.socket) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    socket.send_fds(back, [b"l"], [sock.fileno()])


class Squatter:
    """A listener at `path` bound by `user`; it accepts every connection, answers with `answer` and keeps
    every byte it is sent."""

    def __init__(self, user: str, path: str, answer: bytes = b""):
        here, there = socket.socketpair()
        try:
            as_user(user, _listen_and_hand_back, path, there)
            _, fds, _, _ = socket.recv_fds(here, 1, 1)
        finally:
            here.close()
            there.close()
        self.path, self.answer = path, answer
        self.listener = socket.socket(fileno=fds[0])
        self.connections = 0
        self.received = b""
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while True:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                if self._stop:
                    return  # nothing left in the backlog
                continue
            self.connections += 1
            with conn:
                conn.settimeout(10)
                try:
                    conn.sendall(self.answer)
                except OSError:
                    pass  # the victim already left; what it sent first is still readable
                try:
                    while chunk := conn.recv(1 << 16):
                        self.received += chunk
                except (TimeoutError, ConnectionResetError):
                    pass

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=30)
        self.listener.close()
        os.unlink(self.path)


@pytest.fixture(params=POLICIES)
def unattended(request, tmp_path):
    """A policy whose supervisor is not running, its socket directory as open as /tmp (sticky, 1777)."""
    path = policy_file(tmp_path, base=request.param, region={"size": 4096})
    policy = load_policy(str(path))
    os.chmod(os.path.dirname(policy.control.socket), 0o1777)
    return path, policy


def shmguard(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*SHMGUARD, *args], capture_output=True, text=True, timeout=60, env=env)


def write_script(policy_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, SHMGUARD_POLICY=str(policy_path), SHMGUARD=str(Path(sys.executable).parent / "shmguard"))
    return subprocess.run(["sh", str(SCRIPT), "-s", "4096", "-m", "secret"], capture_output=True, text=True,
                          env=env, timeout=60)


def assert_refused_naming(result: subprocess.CompletedProcess, uid: int) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result
    assert len(lines) == 1, result.stderr
    assert f"uid {uid} " in lines[0] and "refused" in lines[0] and "Traceback" not in lines[0], lines[0]


def test_control_commands_refuse_a_squatter_and_send_it_nothing(unattended):
    policy_path, policy = unattended
    squatter_uid = pwd.getpwnam(OUTSIDER_USER).pw_uid
    fake_reply = b'{"ok": true, "seq": 1, "sha256": "00", "offset": 0, "length": 2, "rang": []}\n'
    squatter = Squatter(OUTSIDER_USER, policy.control.socket, fake_reply)
    try:
        for result in (
            shmguard("write", "-m", "hi", "--control-socket", policy.control.socket),
            shmguard("write", "-m", "hi", "--policy", str(policy_path)),
            shmguard("ring", "guest", "--policy", str(policy_path)),
            shmguard("status", "--policy", str(policy_path)),
            write_script(policy_path),
        ):
            assert_refused_naming(result, squatter_uid)
            assert "wrote" not in result.stdout
    finally:
        squatter.close()
    assert squatter.connections >= 5  # each command did connect, and then sent nothing
    assert squatter.received == b""


def test_peer_commands_refuse_a_squatter_before_reading_its_greeting(unattended):
    policy_path, policy = unattended
    squatter_uid = pwd.getpwnam(OUTSIDER_USER).pw_uid
    squatter = Squatter(OUTSIDER_USER, policy.server.socket, bytes(8))  # a greeting begins: version 0
    try:
        for result in (
            shmguard("peers", "--policy", str(policy_path)),
            shmguard("peers", "--socket", policy.server.socket),
            shmguard("notify", "0", "0", "--policy", str(policy_path)),
        ):
            assert_refused_naming(result, squatter_uid)
    finally:
        squatter.close()
    assert squatter.connections >= 3 and squatter.received == b""


def test_the_user_the_supervisor_drops_to_is_believed(tmp_path):
    # The counter-test: a socket the supervisor rebinds after dropping to hardening.user is that user's.
    path = policy_file(tmp_path, region={"size": 4096}, hardening={"user": MEMBER_USER, "group": "ivshmem"})
    policy = load_policy(str(path))
    os.chmod(os.path.dirname(policy.control.socket), 0o1777)
    squatter = Squatter(MEMBER_USER, policy.control.socket, b'{"ok": false, "error": "answered by the user"}\n')
    try:
        result = shmguard("status", "--policy", str(path))
    finally:
        squatter.close()
    assert result.returncode != 0 and "answered by the user" in result.stderr, result
    assert b'"op": "status"' in squatter.received
