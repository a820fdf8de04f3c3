"""The interactive client: the command set of QEMU's ivshmem-client, reading lines from a stream."""

from __future__ import annotations

from collections.abc import Callable
from typing import TextIO

from .client import IvshmemClient
from .errors import ProtocolError

HELP = """dump: dump peers (including us)
int <peer> <vector>: notify one vector on a peer
int <peer> all: notify all vectors of a peer
int all: notify all vectors of all peers (excepting us)
help: this help"""


def dump(client: IvshmemClient) -> str:
    lines = [f"our_id = {client.own_id}"]
    lines += [f"  vector {v} is enabled (fd={fd})" for v, fd in enumerate(client.own_vectors)]
    for peer_id, fds in sorted(client.peers.items()):
        lines.append(f"peer_id = {peer_id}")
        lines += [f"  vector {v} is enabled (fd={fd})" for v, fd in enumerate(fds)]
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()  # "²".isdigit() is true, int("²") is not


def run_command(client: IvshmemClient, line: str) -> str:
    words = line.split()
    if not words:
        return ""
    if words == ["help"]:
        return HELP
    if words == ["dump"]:
        client.update()
        return dump(client)
    if words == ["int", "all"]:
        return f"notified {client.notify_all()} vectors"
    if len(words) == 3 and words[0] == "int" and _is_number(words[1]):
        if words[2] != "all" and not _is_number(words[2]):
            return f"invalid vector {words[2]!r} (a number or 'all')"
        vector = None if words[2] == "all" else int(words[2])
        return f"notified {client.notify(int(words[1]), vector)} vector(s) of peer {words[1]}"
    return f"unknown command {line.strip()!r}; type help"


def run_interactive(client: IvshmemClient, stream: TextIO, echo: Callable[[str], None]) -> None:
    """Read commands until EOF; a bad command prints one line and the session goes on."""
    echo(HELP)
    echo(f"joined as peer {client.own_id}")
    for line in stream:
        try:
            output = run_command(client, line)
        except ProtocolError as exc:
            output = f"error: {exc}"
        if output:
            echo(output)
