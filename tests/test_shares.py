"""The accountants of every resource held for others: pure, so their tests are tables."""

from __future__ import annotations

import pytest

from shmguard.errors import ControlError
from shmguard.guest_session import QueuedWrite, WriteQueue
from shmguard.policy import SharesPolicy
from shmguard.server import PeerIds
from shmguard.shares import Share

pytestmark = pytest.mark.pure
ROOT, MEMBER, OTHER = 0, 1000, 1001


def share(total=4, per_uid=2, reserved=1) -> Share:
    return Share("things", total, per_uid, reserved, frozenset({ROOT}))


@pytest.mark.parametrize("takes, expected", [
    ([MEMBER, MEMBER], [None, None]),
    ([MEMBER, MEMBER, MEMBER], [None, None, "uid 1000 holds 2 of its share of 2 things"]),
    ([MEMBER, MEMBER, OTHER, OTHER], [None, None, None, "the 3 things open to every uid are in use (the last 1 "
                                                       "are kept for uids [0])"]),
    ([MEMBER, MEMBER, OTHER, ROOT], [None, None, None, None]),  # root takes the reserve
    ([ROOT, ROOT, ROOT, ROOT, ROOT], [None, None, None, None, "all 4 things are in use"]),
])
def test_a_share_bounds_each_uid_and_keeps_the_reserve(takes, expected):
    things = share()
    assert [things.take(uid) for uid in takes] == expected


def test_what_is_given_back_can_be_taken_again_and_leaves_no_trace():
    things = share()
    assert things.take(MEMBER) is None and things.take(MEMBER) is None
    things.give(MEMBER)
    assert things.take(MEMBER) is None
    things.give(MEMBER)
    things.give(MEMBER)
    assert things.used == {} and things.in_use == 0
    with pytest.raises(AssertionError):
        things.give(MEMBER)  # never more than was taken


def test_departed_ids_stay_charged_to_their_uid_while_remembered():
    ids = PeerIds(share=Share("peer ids", 100, 3, 10, frozenset({ROOT})))
    assert ids.take(ROOT, None) == (0, None)  # a watcher that will remember every leave
    watcher_joined, counter = 0, 1
    for _ in range(3):
        peer_id, why = ids.take(MEMBER, watcher_joined)
        assert why is None
        counter += 1
        ids.release(peer_id, counter, MEMBER)
    peer_id, why = ids.take(MEMBER, watcher_joined)
    assert peer_id is None and "holds 3 of its share of 3 peer ids" in why
    assert ids.take(OTHER, watcher_joined)[1] is None  # other uids are untouched
    assert ids.take(MEMBER, None)[1] is None  # the watcher left: nobody remembers, the charges are given back


def test_an_id_never_announced_is_free_at_once_and_uncharged():
    ids = PeerIds(limit=2, share=Share("peer ids", 2, 1, 0, frozenset()))
    first, _ = ids.take(MEMBER, None)
    ids.unused(first, MEMBER)
    assert ids.share.held_by(MEMBER) == 0
    assert ids.take(MEMBER, None)[0] == 1  # fresh ids first, monotonic
    assert ids.take(OTHER, None)[0] == first


def queued_write(uid: int, size: int = 10) -> QueuedWrite:
    return QueuedWrite(token=object(), plan=None, uid=uid, size=size)


def test_queued_writes_are_bounded_per_uid_in_count_and_bytes_with_room_for_root():
    # the reserve is one uid's share: of 4 queued writes, 2 are open to every uid and 2 kept for root
    shares = SharesPolicy(queued_writes=4, queued_writes_per_uid=2, buffer_bytes=100, buffer_bytes_per_uid=50)
    queue = WriteQueue(shares)
    queue.push(queued_write(MEMBER))
    queue.push(queued_write(MEMBER))
    with pytest.raises(ControlError, match="uid 1000 holds 2 of its share of 2 queued writes"):
        queue.push(queued_write(MEMBER))
    with pytest.raises(ControlError, match="open to every uid are in use"):  # the last is root's
        queue.push(queued_write(OTHER))
    queue.push(queued_write(ROOT))
    queue.push(queued_write(ROOT))
    assert len(queue) == 4
    assert queue.pop().uid == MEMBER and queue.count.held_by(MEMBER) == 1
    by_bytes = WriteQueue(SharesPolicy(buffer_bytes=100, buffer_bytes_per_uid=50))
    by_bytes.push(queued_write(MEMBER, size=40))
    with pytest.raises(ControlError, match="bytes of queued writes"):
        by_bytes.push(queued_write(MEMBER, size=11))  # 40 of its 50 bytes are queued already


def test_room_is_exactly_what_may_be_taken_and_what_is_owed_is_held_past_the_bound():
    things = share(total=10, per_uid=4, reserved=3)
    assert things.room(MEMBER) == 4 and things.refusal(MEMBER, 4) is None and things.refusal(MEMBER, 5)
    things.take(OTHER, 4)
    assert things.room(MEMBER) == 3  # 10 - 3 reserved - 4 taken
    assert things.room(ROOT) == 6
    things.owe(MEMBER, 6)  # a reply already owed: held, though past the share
    assert things.room(MEMBER) == 0 and things.held_by(MEMBER) == 6
    things.give(MEMBER, 6)
    assert things.room(MEMBER) == 3
