"""What should happen when an identity tries an attack against a policy: refused by the kernel or the server,
blocked by the seals, or what the guard's response for that kind of tamper says (repaired, alerted, ...).
"""

from __future__ import annotations

from ..hardening import capability_names, read_proc_status
from ..policy import Policy
from .catalogue import Attack
from .identities import Identity, permitted

OUTCOMES = {"repair": "repaired", "alert": "alerted", "block": "blocked"}


def expected(attack: Attack, identity: Identity, policy: Policy, region: str, memfd: bool,
             supervisor_pid: int) -> str:
    if not permitted(attack.needs, identity, policy, region, memfd):
        return "refused"
    if attack.adversary:
        return _expected_of_adversary(attack, identity, policy, memfd)
    if attack.legit:
        return "allowed" if _admitted(attack, identity, policy) else "refused"
    guard = policy.guard
    if attack.kind == "resize":
        return "blocked" if memfd else OUTCOMES[guard.on_resize]
    if attack.kind == "hole":  # seals do not stop a punched hole; the guard puts the contents back
        return "alerted" if guard.on_resize == "alert" else "repaired"
    response = {"attributes": guard.on_attributes, "socket-attributes": guard.on_attributes,
                "path": guard.on_unlink, "socket": guard.on_socket}[attack.kind]
    if attack.needs == "root" and response == "repair" and not _supervisor_may(supervisor_pid, "chown"):
        return "failed"  # a file given away can only be taken back with CAP_CHOWN
    return OUTCOMES[response]


def _expected_of_adversary(attack: Attack, identity: Identity, policy: Policy, memfd: bool) -> str:
    if attack.needs == "connect" and not policy.server.peers.admits(identity.uid, identity.gid, identity.groups):
        return "refused"  # by the server, with the version -1 notice
    if attack.kind == "hole-preallocated" and memfd:
        return "blocked"  # the seals refuse to grow the allocation past the end
    if attack.kind.startswith("hole"):
        return "alerted" if policy.guard.on_resize == "alert" else "repaired"
    return "withstood"


def _supervisor_may(supervisor_pid: int, capability: str) -> bool:
    return capability in capability_names(read_proc_status(supervisor_pid).get("CapEff", "0"))


def _admitted(attack: Attack, identity: Identity, policy: Policy) -> bool:
    # The server admits by the groups the process really holds (SO_PEERGROUPS), supplementary ones included.
    return attack.kind != "connect" or policy.server.peers.admits(identity.uid, identity.gid, identity.groups)
