"""tools/qemu_contrib.py: QEMU's own contrib ivshmem-server, built from Debian's source package, really serves a
raw ivshmem peer and a real qemu-system-x86_64 -device ivshmem-doorbell. It is the baseline of bench/bench_join.py
and of the guest-to-guest benchmark; a build that cannot be done fails here (never skips)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rawpeer import RawPeer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import qemu_contrib  # noqa: E402

VECTORS = 2


@pytest.fixture(scope="module")
def server_binary() -> Path:
    return qemu_contrib.ivshmem_server()  # raises (the test fails) when it cannot be built


@pytest.fixture
def contrib_server(server_binary, tmp_path):
    socket_path = tmp_path / "ivshmem.sock"
    process = subprocess.Popen([str(server_binary), "-F", "-S", str(socket_path), "-m", str(tmp_path),
                                "-l", "1M", "-n", str(VECTORS)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while not socket_path.exists():
        assert process.poll() is None, process.stdout.read().decode(errors="replace")
        assert time.monotonic() < deadline, "the contrib server never created its socket"
        time.sleep(0.02)
    yield str(socket_path)
    process.terminate()
    assert process.wait(10) is not None


def kinds(messages: list) -> list:
    """The contrib server's region is a deleted file in its -m directory: RawPeer names it by path."""
    return [(value, "shm" if kind is not None and kind.endswith("(deleted)") else kind) for value, kind in messages]


def greeting(own: int, others: list[int]) -> list:
    return ([(0, None), (own, None), (-1, "shm")] + [(other, "eventfd") for other in others for _ in range(VECTORS)]
            + [(own, "eventfd")] * VECTORS)


def test_the_second_call_is_the_cached_binary(server_binary):
    started = time.monotonic()
    assert qemu_contrib.ivshmem_server() == server_binary
    assert time.monotonic() - started < 5, "the second call rebuilt instead of using the cache"
    assert server_binary.parent.name.startswith("qemu-contrib-")
    assert os.access(qemu_contrib.ivshmem_client(), os.X_OK)
    source = (server_binary.parent / "SOURCE.json").read_text()
    assert qemu_contrib.source_version() in source


def test_the_command_prints_the_path(server_binary):
    out = subprocess.run([sys.executable, qemu_contrib.__file__], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(server_binary)


def test_it_speaks_ivshmem_to_raw_peers(contrib_server):
    first = RawPeer(contrib_server)
    assert kinds(first.read(3 + VECTORS)) == greeting(0, [])
    second = RawPeer(contrib_server)
    assert kinds(second.read(3 + 2 * VECTORS)) == greeting(1, [0])
    assert first.read(VECTORS) == [(1, "eventfd")] * VECTORS
    size = os.fstat(first.fds[0]).st_size
    assert size == 1 << 20
    second.close()
    assert first.read(1) == [(1, None)]
    first.close()


def test_it_serves_a_real_qemu_ivshmem_doorbell(contrib_server, tmp_path):
    watcher = RawPeer(contrib_server)
    watcher.read(3 + VECTORS)
    command = ["qemu-system-x86_64", "-M", "q35", "-S", "-display", "none", "-nodefaults",
               "-chardev", f"socket,path={contrib_server},id=ivs",
               "-device", f"ivshmem-doorbell,chardev=ivs,vectors={VECTORS}"]
    log = tmp_path / "qemu.log"
    with log.open("wb") as output:
        qemu = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    try:
        assert watcher.read(VECTORS, timeout=30) == [(1, "eventfd")] * VECTORS, log.read_text()
        time.sleep(0.5)  # QEMU has its greeting: it must still be running, not aborted
        assert qemu.poll() is None, log.read_text()
    finally:
        qemu.terminate()
        qemu.wait(10)
    assert watcher.read(1, timeout=10) == [(1, None)]  # QEMU gone: its leave reaches the others
    watcher.close()
