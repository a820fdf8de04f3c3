"""PeerTable on its own: events in, sends out, no socket (the h11 way).

Handles are strings ("v2.0" is peer 2's vector 0, "shm" the region) and credentials are opaque words: the table
only passes them on. A send is written (to, word, fd); a peer leaving the table is ("gone", id).
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from shmguard.limits import PEER_IDS
from shmguard.peers import Gone, PeerIds, PeerTable, Send
from shmguard.shares import Share

pytestmark = pytest.mark.pure

ROOT, MEMBER, OTHER = 0, 1000, 1001
SHM = "shm"


def vectors(peer_id: int, count: int) -> tuple[str, ...]:
    return tuple(f"v{peer_id}.{k}" for k in range(count))


def new_table(slots: int = 8, slots_per_uid: int = 8, slots_reserved: int = 0, ids: int = PEER_IDS,
              ids_per_uid: int = PEER_IDS) -> PeerTable:
    share = Share("peer slots", slots, slots_per_uid, slots_reserved, frozenset({ROOT}))
    return PeerTable(SHM, share, PeerIds(ids, Share("peer ids", ids, ids_per_uid, 0, frozenset({ROOT}))))


def wire(actions) -> list[tuple]:
    return [("gone", a.peer.id) if isinstance(a, Gone) else (a.to, a.value, a.fd) for a in actions]


def local_peer(table: PeerTable, count: int) -> int:
    """The supervisor's own peer: no slot, no greeting, nobody told (it reads nothing from the wire)."""
    peer_id, reason = table.reserve(ROOT, None)
    assert reason is None
    assert table.join(peer_id, vectors(peer_id, count)) == []
    return peer_id


def join(table: PeerTable, count: int, uid: int = MEMBER) -> tuple[int, list[tuple], list[tuple]]:
    """A remote peer joins as the server drives it: reserve, greeting (flushed), announcements."""
    peer_id, reason = table.reserve(uid, f"cred of uid {uid}")
    assert reason is None, reason
    greeting = wire(table.join(peer_id, vectors(peer_id, count)))
    return peer_id, greeting, wire(table.announce(peer_id))


def reference_greeting(new_id: int, connected: list[int], count: int) -> list[tuple]:
    """docs/protocol.md §1, step by step: version, own id, -1 with the shm, every connected peer's vectors in
    join order, then its own vectors."""
    steps = [(new_id, 0, None), (new_id, new_id, None), (new_id, -1, SHM)]
    steps += [(new_id, peer, f"v{peer}.{k}") for peer in connected for k in range(count)]
    return steps + [(new_id, new_id, f"v{new_id}.{k}") for k in range(count)]


# --- greetings and announcements: peers 1..3 after the supervisor's own peer 0 -------------------------------

GREETINGS_AT_1_VECTOR = [
    # (peer, its greeting, what the others are sent)
    (1, [(1, 0, None), (1, 1, None), (1, -1, SHM), (1, 0, "v0.0"), (1, 1, "v1.0")],
     []),
    (2, [(2, 0, None), (2, 2, None), (2, -1, SHM), (2, 0, "v0.0"), (2, 1, "v1.0"), (2, 2, "v2.0")],
     [(1, 2, "v2.0")]),
    (3, [(3, 0, None), (3, 3, None), (3, -1, SHM), (3, 0, "v0.0"), (3, 1, "v1.0"), (3, 2, "v2.0"), (3, 3, "v3.0")],
     [(1, 3, "v3.0"), (2, 3, "v3.0")]),
]

GREETINGS_AT_2_VECTORS = [
    (1, [(1, 0, None), (1, 1, None), (1, -1, SHM), (1, 0, "v0.0"), (1, 0, "v0.1"), (1, 1, "v1.0"), (1, 1, "v1.1")],
     []),
    (2, [(2, 0, None), (2, 2, None), (2, -1, SHM), (2, 0, "v0.0"), (2, 0, "v0.1"), (2, 1, "v1.0"), (2, 1, "v1.1"),
         (2, 2, "v2.0"), (2, 2, "v2.1")],
     [(1, 2, "v2.0"), (1, 2, "v2.1")]),
    (3, [(3, 0, None), (3, 3, None), (3, -1, SHM), (3, 0, "v0.0"), (3, 0, "v0.1"), (3, 1, "v1.0"), (3, 1, "v1.1"),
         (3, 2, "v2.0"), (3, 2, "v2.1"), (3, 3, "v3.0"), (3, 3, "v3.1")],
     [(1, 3, "v3.0"), (1, 3, "v3.1"), (2, 3, "v3.0"), (2, 3, "v3.1")]),
]

GREETINGS_AT_64_VECTORS = [
    (peer, reference_greeting(peer, list(range(peer)), 64),
     [(other, peer, f"v{peer}.{k}") for other in range(1, peer) for k in range(64)])
    for peer in (1, 2, 3)
]


@pytest.mark.parametrize("count, expected", [(1, GREETINGS_AT_1_VECTOR), (2, GREETINGS_AT_2_VECTORS),
                                             (64, GREETINGS_AT_64_VECTORS)], ids=["1 vector", "2", "64"])
def test_greetings_and_announcements_in_the_order_of_the_reference(count, expected):
    table = new_table()
    local_peer(table, count)
    for peer_id, greeting, announcements in expected:
        assert join(table, count) == (peer_id, greeting, announcements)
    assert len(GREETINGS_AT_64_VECTORS[2][1]) == 3 + 4 * 64


def test_the_literal_tables_are_the_reference_order():
    for count, table in ((1, GREETINGS_AT_1_VECTOR), (2, GREETINGS_AT_2_VECTORS)):
        for peer_id, greeting, _ in table:
            assert greeting == reference_greeting(peer_id, list(range(peer_id)), count)


# --- leaves ---------------------------------------------------------------------------------------------------

def connected(count: int = 1, remote: int = 3) -> PeerTable:
    """Peer 0 (the supervisor's own) and remote peers 1..remote, all announced."""
    table = new_table()
    local_peer(table, count)
    for _ in range(remote):
        join(table, count)
    return table


LEAVES = [
    # (who leaves, what the table says, in order)
    (2, [("gone", 2), (1, 2, None), (3, 2, None)]),
    (1, [("gone", 1), (2, 1, None), (3, 1, None)]),
    (3, [("gone", 3), (1, 3, None), (2, 3, None)]),
]


@pytest.mark.parametrize("leaver, expected", LEAVES)
def test_a_leave_is_its_bare_id_to_every_remaining_remote_peer(leaver, expected):
    table = connected(count=2)
    assert wire(table.leave(leaver, "disconnected")) == expected
    assert leaver not in table.peers and table.slots.held_by(MEMBER) == 2


def test_the_gone_action_carries_the_peer_and_the_reason():
    table = connected()
    gone = table.leave(2, "sent data (clients never send)")[0]
    assert (gone.peer.id, gone.peer.vectors, gone.peer.uid, gone.reason) == (2, ("v2.0",), MEMBER,
                                                                              "sent data (clients never send)")


def test_shutdown_tells_everyone_every_other_leave_then_all_are_gone():
    table = connected()
    assert wire(table.shutdown()) == [
        (1, 0, None), (1, 2, None), (1, 3, None),
        (2, 0, None), (2, 1, None), (2, 3, None),
        (3, 0, None), (3, 1, None), (3, 2, None),
        ("gone", 0), ("gone", 1), ("gone", 2), ("gone", 3),
    ]
    assert table.peers == {} and table.slots.in_use == 0


# --- the server's part, played with lists: a failed send comes back in as a leave -----------------------------

class Wire:
    """The server's loop over the table's actions, with a list for each socket: sends are queued per peer, then
    each peer's queue is flushed in order; a peer in `broken` fails its flush, which comes back as a leave."""

    def __init__(self, table: PeerTable, broken=()):
        self.table, self.broken = table, set(broken)
        self.heard: dict[int, list[tuple]] = defaultdict(list)
        self.queues: dict[int, list[tuple]] = {}
        self.gone: list[int] = []

    def carry_out(self, actions) -> None:
        for action in actions:
            if isinstance(action, Gone):
                self.queues.pop(action.peer.id, None)  # its connection closes with whatever it had queued
                self.gone.append(action.peer.id)
            else:
                self.queues.setdefault(action.to, []).append((action.value, action.fd))

    def flush(self, peer_id: int) -> bool:
        messages = self.queues.pop(peer_id, [])
        if peer_id in self.broken:
            return False
        self.heard[peer_id] += messages
        return True

    def settle(self) -> None:
        while self.queues:
            peer_id = next(iter(self.queues))
            if not self.flush(peer_id):
                self.carry_out(self.table.leave(peer_id, "send failed: Broken pipe"))

    def join(self, count: int = 1) -> int:
        peer_id, _ = self.table.reserve(MEMBER, "cred")
        self.carry_out(self.table.join(peer_id, vectors(peer_id, count)))
        if not self.flush(peer_id):  # the greeting goes out before anyone is told
            self.carry_out(self.table.leave(peer_id, "gone before its greeting was sent: Broken pipe"))
        else:
            self.carry_out(self.table.announce(peer_id))
        self.settle()
        return peer_id


def test_a_failed_send_becomes_a_leave_that_the_others_hear():
    table = connected()
    server = Wire(table, broken={1})  # peer 1 stopped reading and is gone: its next send fails
    assert server.join() == 4
    assert server.gone == [1]
    assert server.heard[2] == [(4, "v4.0"), (1, None)]  # the join of 4, then the leave of 1
    assert server.heard[3] == [(4, "v4.0"), (1, None)]
    assert server.heard[4] == [(0, None), (4, None), (-1, SHM), (0, "v0.0"), (1, "v1.0"), (2, "v2.0"),
                               (3, "v3.0"), (4, "v4.0"), (1, None)]  # greeted with 1, then told it left
    assert list(table.peers) == [0, 2, 3, 4]


def test_a_failed_leave_announcement_is_one_more_leave():
    table = connected()
    server = Wire(table, broken={3})
    server.carry_out(table.leave(1, "disconnected"))
    server.settle()
    assert server.gone == [1, 3]
    assert server.heard[2] == [(1, None), (3, None)]
    assert list(table.peers) == [0, 2]


def test_a_newcomer_gone_before_its_greeting_is_never_announced():
    table = connected()
    server = Wire(table, broken={4})
    assert server.join() == 4
    assert server.gone == [4] and dict(server.heard) == {}  # nobody heard of 4, not even its leave
    server.broken.clear()
    assert server.join() == 5
    assert server.heard[5] == [(value, fd) for _, value, fd in reference_greeting(5, [0, 1, 2, 3], 1)]  # no 4
    assert server.heard[1] == [(5, "v5.0")]


def test_an_unannounced_leave_sends_nothing():
    table = connected()
    peer_id, _ = table.reserve(MEMBER, "cred")
    table.join(peer_id, vectors(peer_id, 1))
    assert wire(table.leave(peer_id, "gone before its greeting was sent: Broken pipe")) == [("gone", 4)]


# --- ids ------------------------------------------------------------------------------------------------------

def test_ids_are_monotonic_and_a_departed_id_stays_out_while_a_connected_peer_remembers_it():
    table = new_table(ids=4)
    local_peer(table, 1)
    watcher, _, _ = join(table, 1)
    for expected in (2, 3):
        peer_id, _, _ = join(table, 1)
        assert peer_id == expected
        table.leave(peer_id, "disconnected")
    assert table.reserve(MEMBER, "cred") == (None, "no peer id is free (every departed id is still remembered "
                                                   "by a connected peer)")
    table.leave(watcher, "disconnected")
    assert [join(table, 1)[0] for _ in range(2)] == [2, 3]  # nobody remembers them now: oldest departed first


def test_the_supervisors_own_peer_remembers_no_leave():
    table = new_table(ids=3)
    local_peer(table, 1)
    first, _, _ = join(table, 1)
    table.leave(first, "disconnected")
    assert join(table, 1)[0] == 2
    table.leave(2, "disconnected")
    assert join(table, 1)[0] == 1  # only peer 0 is connected, and it keeps no state per peer id


def test_a_newcomer_gone_before_its_greeting_keeps_its_id_out_like_any_leave():
    table = new_table(ids=3)
    local_peer(table, 1)
    join(table, 1)
    peer_id, _ = table.reserve(MEMBER, "cred")
    table.join(peer_id, vectors(peer_id, 1))
    table.leave(peer_id, "gone before its greeting was sent: Broken pipe")
    assert table.reserve(MEMBER, "cred")[0] is None  # peer 1 joined before that leave


def test_a_cancelled_reservation_gives_its_id_and_slot_back_at_once():
    table = new_table(ids=2)
    local_peer(table, 1)
    peer_id, _ = table.reserve(MEMBER, "cred")  # then its eventfds cannot be made, or its record is refused
    table.cancel(peer_id)
    assert table.slots.in_use == 0 and table.ids.share.held_by(MEMBER) == 0
    assert join(table, 1)[0] == peer_id  # nobody ever heard of it


def test_reserving_twice_without_joining_hands_out_two_ids():
    table = new_table()
    assert [table.reserve(MEMBER, "a")[0], table.reserve(MEMBER, "b")[0]] == [0, 1]


# --- shares ---------------------------------------------------------------------------------------------------

def test_a_uid_past_its_share_of_slots_is_refused_and_nothing_is_taken():
    table = new_table(slots=8, slots_per_uid=2, slots_reserved=1)
    local_peer(table, 1)
    join(table, 1), join(table, 1)
    ids_before = table.ids.snapshot()
    assert table.reserve(MEMBER, "cred") == (None, "uid 1000 holds 2 of its share of 2 peer slots")
    assert table.ids.snapshot() == ids_before and table.slots.held_by(MEMBER) == 2
    assert join(table, 1, uid=OTHER)[0] == 3  # another uid has its own share


def test_the_last_slots_are_kept_for_root():
    table = new_table(slots=3, slots_per_uid=3, slots_reserved=1)
    join(table, 1), join(table, 1)
    assert table.reserve(OTHER, "cred")[1] == ("the 2 peer slots open to every uid are in use "
                                               "(the last 1 are kept for uids [0])")
    assert join(table, 1, uid=ROOT)[0] == 2
    assert table.reserve(ROOT, "cred") == (None, "all 3 peer slots are in use")


def test_departed_ids_count_against_their_uid_and_a_refused_id_gives_the_slot_back():
    table = new_table(ids_per_uid=3)
    local_peer(table, 1)
    join(table, 1, uid=OTHER)  # a long-lived peer that remembers every leave after it
    for _ in range(2):
        peer_id, _, _ = join(table, 1)
        table.leave(peer_id, "disconnected")
    join(table, 1)
    peer_id, reason = table.reserve(MEMBER, "cred")
    assert peer_id is None
    assert reason == "uid 1000 holds 3 of its share of 3 peer ids (departed ids count until no connected peer " \
                     "remembers them)"
    assert table.slots.held_by(MEMBER) == 1  # only the one connected
    assert join(table, 1, uid=ROOT)[0] == 5


# --- plain data, for a successor --------------------------------------------------------------------------------

def busy_table() -> PeerTable:
    table = new_table(ids=8, slots_per_uid=3, ids_per_uid=6)
    local_peer(table, 2)
    join(table, 2), join(table, 2, uid=OTHER)
    table.leave(1, "disconnected")
    join(table, 2)
    return table


def test_a_snapshot_is_plain_data_and_a_successor_carries_on_exactly():
    table = busy_table()
    data = json.loads(json.dumps(table.snapshot()))
    successor = PeerTable.from_snapshot(data)
    assert successor.snapshot() == table.snapshot()

    def events(peers: PeerTable) -> list:
        return [join(peers, 2), wire(peers.leave(2, "disconnected")), join(peers, 2, uid=OTHER),
                wire(peers.shutdown())]

    assert events(successor) == events(table)  # the same events give the same sends
    assert successor.snapshot() == table.snapshot()


def test_a_snapshot_turns_handles_and_credentials_into_plain_data():
    table = new_table()
    table.shm = ("fd", 7)
    peer_id, _ = table.reserve(MEMBER, ("cred", MEMBER))
    table.join(peer_id, (("fd", 8),))
    data = table.snapshot(encode=lambda value: value[1])
    assert (data["shm"], data["peers"][0]["vectors"], data["peers"][0]["cred"]) == (7, [8], MEMBER)
    restored = PeerTable.from_snapshot(data, decode=lambda value: ("fd", value))
    assert restored.peers[peer_id].vectors == (("fd", 8),) and restored.shm == ("fd", 7)


def test_a_join_waiting_for_its_record_is_in_a_snapshot_as_if_cancelled():
    """A successor never hears of a join that was held for its record's fsync: its id and slot are free there."""
    table, cancelled = busy_table(), busy_table()
    waiting = [table.reserve(MEMBER, "cred")[0], table.reserve(ROOT, "cred")[0], table.reserve(ROOT, None)[0]]
    for peer_id in [cancelled.reserve(MEMBER, "cred")[0], cancelled.reserve(ROOT, "cred")[0],
                    cancelled.reserve(ROOT, None)[0]]:
        cancelled.cancel(peer_id)
    assert table.snapshot() == cancelled.snapshot()
    successor = PeerTable.from_snapshot(json.loads(json.dumps(table.snapshot())))
    assert successor.slots.held_by(MEMBER) == cancelled.slots.held_by(MEMBER)
    assert successor.ids.share.held_by(MEMBER) == cancelled.ids.share.held_by(MEMBER)
    assert successor.snapshot() == cancelled.snapshot()
    for peer_id in waiting:
        table.cancel(peer_id)
    assert table.snapshot() == cancelled.snapshot()


def test_sends_are_values():
    assert Send(1, 2, "v2.0") == Send(1, 2, "v2.0") and Send(1, 2) != Send(1, 2, "v2.0")
