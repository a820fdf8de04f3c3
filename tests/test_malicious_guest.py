"""A guest (or any peer) that lies in the reply area and floods the host's doorbells changes nothing."""

from __future__ import annotations

import mmap
import os

from helpers import RunningSupervisor, policy_file
from shmguard import layout
from shmguard.audit import verify
from shmguard.client import IvshmemClient
from shmguard.control import StatusRequest, WriteRequest

SIZE = 4096
LIES = [b"\xff" * layout.REPLY_SIZE, b"ready 999\0", b"ack\0", b"ack x y zz\0", b"ack 1 2 3 4 5 6\0",
        b"ready\0", "réady ☃".encode() + b"\0", b"ack 1\nshmguard: CRITICAL: forged\0", b"\0" * layout.REPLY_SIZE]


def test_garbage_replies_and_doorbell_floods(tmp_path):
    supervisor = RunningSupervisor(policy_file(tmp_path, region={"size": SIZE}))
    try:
        with IvshmemClient(supervisor.socket, vectors=2) as guest:
            region = mmap.mmap(guest.shm_fd, SIZE)
            host = min(guest.peers)  # the supervisor's own peer
            for lie in LIES:
                region[layout.reply_offset(SIZE):layout.reply_offset(SIZE) + len(lie)] = lie
                for _ in range(2000):
                    guest.notify(host, 0)
                    guest.notify(host, 1)
            region.close()
            status = supervisor.client().ask(StatusRequest())
            assert status["ok"]
            # a stranger's "ready" is not the guest's: no guest is ready, none was started
            assert status["guest"]["ready"] is False
            assert supervisor.proc.poll() is None
            reply = supervisor.client().ask(WriteRequest(b"hi", text=True))
            assert reply["ok"]
        assert verify(supervisor.audit).ok
    finally:
        assert supervisor.stop() == 0, supervisor.log()
    assert "Traceback" not in supervisor.log()
    assert not any(line.startswith("shmguard: CRITICAL") for line in supervisor.log().splitlines())
    assert os.path.exists(supervisor.audit)
