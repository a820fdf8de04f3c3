"""The ivshmem and control sockets appear with the policy's owner, group and mode, never more open."""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from inotify_simple import INotify
from inotify_simple import flags as F

from helpers import SHMGUARD, RunningSupervisor, policy_file


def test_sockets_are_never_more_open_than_the_policy(tmp_path):
    policy = policy_file(tmp_path)
    supervisor_dir = Path(tempfile.mkdtemp(prefix="shmguard-test-", dir="/tmp"))
    watcher = INotify()
    watcher.add_watch(supervisor_dir, F.CREATE | F.ATTRIB | F.MOVED_TO)
    socket_path, control_path = supervisor_dir / "ivshmem.sock", supervisor_dir / "control.sock"
    run = subprocess.Popen([*SHMGUARD, "run", "--no-guest", "--policy", str(policy), "--socket", str(socket_path),
                            "--control-socket", str(control_path)], stderr=subprocess.DEVNULL)
    seen: dict[str, set[int]] = {}
    try:
        while not (socket_path.exists() and control_path.exists()):
            for event in watcher.read(timeout=200):
                try:  # look at every entry the moment it appears or changes
                    st = os.lstat(supervisor_dir / event.name)
                except FileNotFoundError:
                    continue
                seen.setdefault(event.name, set()).add(stat.S_IMODE(st.st_mode))
            assert run.poll() is None, "the supervisor exited"
        ivshmem = grp.getgrnam("ivshmem").gr_gid
        for path in (socket_path, control_path):
            st = os.lstat(path)
            assert stat.S_ISSOCK(st.st_mode) and (st.st_uid, st.st_gid) == (0, ivshmem)
            assert stat.S_IMODE(st.st_mode) == 0o660
        assert seen, "no socket was seen being created"
        for name, modes in seen.items():
            assert all(mode & ~0o660 == 0 for mode in modes), (name, [oct(m) for m in modes])
    finally:
        run.terminate()
        run.wait(30)
        watcher.close()
        shutil.rmtree(supervisor_dir, ignore_errors=True)


def test_a_stale_socket_is_replaced_and_anything_else_is_refused(tmp_path):
    policy = policy_file(tmp_path)
    first = RunningSupervisor(policy)
    try:
        second = subprocess.run([*SHMGUARD, "run", "--no-guest", "--policy", str(policy), "--audit-log",
                                 str(tmp_path / "second.log")], capture_output=True, text=True, timeout=60)
        assert second.returncode != 0 and "another server is listening there" in second.stderr
        same_log = subprocess.run([*SHMGUARD, "run", "--no-guest", "--policy", str(policy)], capture_output=True,
                                  text=True, timeout=60)
        assert "is in use by another supervisor" in same_log.stderr  # one log, one supervisor
    finally:
        first.proc.kill()  # leaves both sockets behind, with nobody listening
        first.proc.wait()
    restarted = RunningSupervisor(policy)  # stale sockets are replaced
    restarted.stop()  # which also removes the socket directory
    squatted = Path(restarted.socket)
    squatted.parent.mkdir(mode=0o755)
    squatted.write_text("not a socket")
    try:
        refused = subprocess.run([*SHMGUARD, "run", "--no-guest", "--policy", str(policy)], capture_output=True,
                                 text=True, timeout=60)
        assert refused.returncode != 0 and "exists and is not a socket" in refused.stderr
        assert squatted.read_text() == "not a socket"  # left as it was
    finally:
        shutil.rmtree(squatted.parent, ignore_errors=True)


def test_the_socket_is_born_closed_before_its_owner_and_mode_are_set(tmp_path, monkeypatch):
    """Observed at the one moment that matters: after bind(), before chown/chmod. A spy, not a fake:
    the real chown runs after it has looked."""
    from shmguard import server

    born_modes = []
    real_chown = os.chown

    def look_then_chown(path, uid, gid, **kwargs):
        born_modes.append(stat.S_IMODE(os.stat(path).st_mode))  # path is /proc/self/fd/N: stat the socket itself
        return real_chown(path, uid, gid, **kwargs)

    monkeypatch.setattr(os, "chown", look_then_chown)
    old_umask = os.umask(0)  # the most open umask a caller could have left behind
    try:
        bound = server.bind_socket(str(tmp_path / "born.sock"), 0, 0, 0o660)
    finally:
        os.umask(old_umask)
    assert born_modes == [0]  # mode 0000 between bind and chmod, whatever the umask was
    assert stat.S_IMODE(os.lstat(tmp_path / "born.sock").st_mode) == 0o660
    bound.remove()
