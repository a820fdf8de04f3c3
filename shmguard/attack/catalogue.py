"""Every attack the battery knows: what it does, what the kernel checks first, who tries it, and (for an
adversary) its judge and undo.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .adversaries import (
    peer_blocks_eventfds,
    peer_punches_hole,
    peer_sets_append,
    take_control_connections,
    take_peer_slots,
)
from .children import Done, Scene, command
from .identities import OUTSIDER_USER, ROLES
from .judges import (
    Verdict,
    judge_append,
    judge_control_connections,
    judge_eventfds,
    judge_hole,
    judge_peer_slots,
    judge_refusal,
    undo_append,
    undo_eventfds,
    undo_hole,
)
from .tampers import (
    acl_grant,
    burst,
    chgrp,
    connect,
    ftruncate_held,
    hardlink_truncate,
    mv_away,
    open_for_write,
    punch_hole,
    rename_over,
    replace_socket,
    seed_dd,
    shrink_regrow,
    symlink_replace,
    truncate_during_writes,
)

if TYPE_CHECKING:
    from .battery import Battery

Judge = Callable[["Battery", Scene, Done, int, str], Verdict]  # (battery, scene, done, audit offset, expected)


@dataclass(frozen=True)
class Attack:
    name: str
    description: str
    kind: str  # resize | hole | attributes | path | socket | socket-attributes | connect | open
    needs: str  # the permission the kernel checks first (see identities.permitted)
    action: Callable[[Scene], Done]
    roles: tuple[str, ...] = ROLES
    extra: bool = False  # beyond the listed attacks: what a demanding attacker also tries
    legit: bool = False  # an access the policy allows to whoever the kernel lets through
    group_only: bool = False  # the outsider holds the socket's group as a supplementary group only
    fs_group_only: bool = False  # the socket's group as the fsgid only: past the socket's mode, not the policy
    judge: Judge | None = None  # an adversary inside the policy: what the battery checks while it holds its ground
    undo: Callable[[Battery, Scene, Done], None] | None = None  # puts back what it left in the supervisor's own fds

    @property
    def adversary(self) -> bool:
        return self.judge is not None


ATTACKS: tuple[Attack, ...] = (
    Attack("truncate-zero", "truncate -s 0", "resize", "write",
           lambda s: command(["truncate", "-s", "0", s.region])),
    Attack("truncate-half", "truncate -s SIZE/2", "resize", "write",
           lambda s: command(["truncate", "-s", str(s.size // 2), s.region])),
    Attack("grow-double", "truncate -s SIZE*2", "resize", "write",
           lambda s: command(["truncate", "-s", str(s.size * 2), s.region])),
    Attack("echo-redirect", "echo hello > REGION", "resize", "write",
           lambda s: command(["sh", "-c", 'echo hello > "$1"', "sh", s.region])),
    Attack("seed-dd", "write_shared_memory.sh: dd if=msg of=REGION bs=SIZE count=1", "resize", "write", seed_dd),
    Attack("ftruncate-held-fd", "ftruncate(0) through an fd opened earlier", "resize", "write", ftruncate_held),
    Attack("chmod-0666", "chmod 0666", "attributes", "own",
           lambda s: command(["chmod", "0666", s.region])),
    Attack("chgrp", "chgrp to another group", "attributes", "chgrp", chgrp),
    Attack("chown", "chown nobody", "attributes", "root", lambda s: command(["chown", OUTSIDER_USER, s.region])),
    Attack("rm", "rm -f REGION", "path", "unlink", lambda s: command(["rm", "-f", s.region])),
    Attack("mv-away", "mv REGION elsewhere", "path", "unlink", mv_away),
    Attack("symlink-replace", "ln -sfn decoy REGION", "path", "unlink", symlink_replace),
    Attack("socket-remove", "rm -f the ivshmem socket", "socket", "unlink-socket",
           lambda s: command(["rm", "-f", s.socket])),
    Attack("socket-replace", "replace the ivshmem socket with a listener of one's own", "socket",
           "unlink-socket", replace_socket),
    Attack("control-socket-remove", "rm -f the control socket", "socket", "unlink-control",
           lambda s: command(["rm", "-f", s.control])),
    Attack("connect", "join the ivshmem server as a peer", "connect", "connect", connect, legit=True),
    Attack("open-for-write", "open(REGION, O_WRONLY)", "open", "write", open_for_write, legit=True),
    # --- what a demanding attacker tries next ---------------------------------------------------------
    Attack("hardlink-truncate", "ln REGION link; ftruncate(link, 0)", "resize", "link", hardlink_truncate,
           extra=True),
    Attack("rename-over", "mv a same-size file of one's own over REGION", "path", "unlink", rename_over,
           extra=True),
    Attack("chmod-setid", "chmod u+s,g+s,+x (executable, set-id)", "attributes", "own",
           lambda s: command(["chmod", "u+s,g+s,+x", s.region]), extra=True),
    Attack("acl-grant", "setfacl -m u:nobody:rw (mode bits unchanged)", "attributes", "own", acl_grant,
           extra=True),
    Attack("punch-hole", "fallocate PUNCH_HOLE: zeroes without a size change", "hole", "write", punch_hole,
           extra=True),
    Attack("shrink-regrow", "ftruncate 0 then back to SIZE at once", "resize", "write", shrink_regrow,
           extra=True),
    Attack("truncate-burst", "100 truncations in a row", "resize", "write", burst, extra=True),
    Attack("truncate-during-write", "200 truncations racing 20 audited writes", "resize", "write",
           truncate_during_writes, extra=True),
    Attack("socket-chmod", "chmod 0777 the ivshmem socket", "socket-attributes", "own-socket",
           lambda s: command(["chmod", "0777", s.socket]), extra=True),
    Attack("connect-group-only", "join holding the socket's group only as a supplementary group (a member: admitted)",
           "connect", "connect", connect, roles=("outsider",), extra=True, legit=True, group_only=True),
    # --- adversaries inside the policy: a peer or member turning what it was given against the supervisor ----
    Attack("peer-append-region", "a peer sets O_APPEND on its region fd; then an audited write and a repair",
           "descriptions", "connect", peer_sets_append, judge=judge_append, undo=undo_append),
    Attack("peer-blocking-eventfds", "a peer makes the host's eventfds blocking and drains them, and its own "
           "blocking and full; then a ring of it and a status", "descriptions", "connect", peer_blocks_eventfds,
           judge=judge_eventfds, undo=undo_eventfds),
    Attack("refused-peer-told", "joins until one is refused (the outsider passes the socket by its fsgid only): "
           "the version -1 notice, EOF, the reason in the log", "refusal", "connect", take_peer_slots,
           roles=("member", "outsider"), fs_group_only=True, judge=judge_refusal),
    Attack("peer-slots-hog", "a member holds every peer slot it can get; a root peer still joins", "shares",
           "connect", take_peer_slots, roles=("member", "outsider"), judge=judge_peer_slots),
    Attack("control-connections-hog", "a member holds every control connection it can (a byte every 2 s); root's "
           "status still works", "shares", "connect-control", take_control_connections,
           roles=("member", "outsider"), judge=judge_control_connections),
    Attack("peer-punch-hole", "a peer punches a hole through its own region fd", "hole", "connect",
           lambda s: peer_punches_hole(s, preallocate=False), judge=judge_hole, undo=undo_hole),
    Attack("peer-preallocated-punch-hole", "a peer allocates past the end (KEEP_SIZE), then punches a hole through "
           "its own fd", "hole-preallocated", "connect", lambda s: peer_punches_hole(s, preallocate=True),
           judge=judge_hole, undo=undo_hole),
)
ATTACKS_BY_NAME = {attack.name: attack for attack in ATTACKS}
