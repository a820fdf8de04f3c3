"""The attack battery: real tampering by real uids against a running supervisor, and what came of it.

Each attack runs in a child process that has really dropped to its uid (root, a member of the policy's group,
an outsider) and does what an attacker would: real commands (truncate, dd, chmod, rm, mv, ln) or real syscalls.
With a sealed memfd (no path) the region attacks go through /proc/<supervisor pid>/fd/<n>. Before each attack a
known message is written through the control socket; afterwards the battery checks the region's size, the
message byte for byte, owner/group/mode, the path, the incident in the audit log, that new peers are still
served and, when QEMU is attached, that it still runs.

An attack succeeded when the attacker got further than the policy allows: a change nobody put back or recorded,
or an access that should have been refused. `exit_status` is then non-zero.

The adversaries (`Attack.judge`) act within what the policy admits: a peer that changes the flags of the file
descriptions it was handed, a join the policy refuses, a member that takes every peer slot or control
connection it can, a hole punched through a peer's own fd. The battery then does what reveals the harm (a write,
a ring, a repair, root's own request) while the attacker still holds what it took, and judges the promised
behaviour; `withstood` is what it observes when the supervisor was not turned.

The package, by concern: identities (who attacks and what the kernel lets each uid try), children (the child that
drops uid and what it holds), tampers and adversaries (the attacks), judges (what the battery checks while an
adversary holds its ground), catalogue (every attack), expectations (what should happen), supervisor_link
(control requests and the audit log), battery (running, observing, judging), report and oneshot.
"""

from .adversaries import REFUSAL_NOTICE
from .battery import Battery
from .catalogue import ATTACKS, ATTACKS_BY_NAME, Attack
from .children import Done, Scene, release_child, run_as
from .identities import MEMBER_USER, OUTSIDER_USER, ROLES, Identity, permitted
from .oneshot import run_battery, start_paused_qemu, wait_for_peer
from .report import AttackResult, exit_status, format_table
from .tampers import acl_granting

__all__ = ["ATTACKS", "ATTACKS_BY_NAME", "MEMBER_USER", "OUTSIDER_USER", "REFUSAL_NOTICE", "ROLES", "Attack",
           "AttackResult", "Battery", "Done", "Identity", "Scene", "acl_granting", "exit_status", "format_table",
           "permitted", "release_child", "run_as", "run_battery", "start_paused_qemu", "wait_for_peer"]
