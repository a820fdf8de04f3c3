"""The guest handshake as tables: each step is (event, who is connected, the actions expected). No socket, no root."""

from __future__ import annotations

import dataclasses
import re
import typing
import zlib

import pytest

from shmguard.errors import ControlError
from shmguard.guest_session import (
    PENDING_GUEST,
    QEMU_GONE_BEFORE_ACK,
    QEMU_GONE_BEFORE_TURN,
    Event,
    ExchangeEvent,
    Fail,
    GuestExchange,
    GuestSession,
    Hold,
    HostRung,
    Log,
    Notify,
    Nudged,
    PassOn,
    PeerLeft,
    Peers,
    QemuExited,
    Queue,
    Record,
    RefreshGuard,
    Reply,
    Ring,
    RingRequested,
    ScheduleNudge,
    ScheduleTimeout,
    SendFailed,
    SendRequested,
    SlotPeers,
    SlotsRead,
    TimedOut,
    WriteCommand,
    WriteFailed,
    WriteNow,
    WritePeers,
    WriteRequested,
    Written,
)
from shmguard.layout import command_bytes, peers_line
from shmguard.policy import SharesPolicy

pytestmark = pytest.mark.pure

ROOT, MEMBER, OTHER = 0, 1000, 1001
CRC = zlib.crc32(b"hi")
ACK = f"ack 1 2 {CRC:08x}"
BOOTING = Peers((), None, qemu_started=True)  # our QEMU started, not connected yet
OURS = Peers((5,), ours=5, qemu_started=True)
OURS_AND_STRANGER = Peers((5, 6), ours=5, qemu_started=True)
STRANGER_ONLY = Peers((6,), None, qemu_started=True)
EXITED = Peers((), None, qemu_started=True, qemu_exited=True)
NOBODY = Peers()
ONE = Peers((5,))
TWO = Peers((5, 6))
LATER = Peers((7,))


def builtin(shares: SharesPolicy | None = None) -> GuestSession:
    """The built-in guest under a QEMU this supervisor boots: the handshake is on from the start."""
    return GuestSession(shares or SharesPolicy(), serving_only=False, handshake=True)


def serving(shares: SharesPolicy | None = None) -> GuestSession:
    """--no-guest: no handshake until a built-in guest says it is ready."""
    return GuestSession(shares or SharesPolicy(), serving_only=True, handshake=False)


def seq(n: int) -> tuple:
    return (("seq", n),)


def ready_actions(peer: int, *rings: Ring) -> list:
    return [RefreshGuard(), Log("info", f"guest ready: ready {peer}"),
            Record("guest-ready", (("reply", f"ready {peer}"), ("peer", peer))), Notify("guest ready"), *rings]


def acked(token, reply: tuple, rtt_ms: float, exactly: bool = True) -> Reply:
    return Reply(token, (*reply, ("ack", ACK), ("round_trip_ms", rtt_ms), ("delivered_exactly", exactly)))


ACK_ACTIONS = [Log("info", f"guest acknowledged: {ACK}"), RefreshGuard(reply_only=True)]  # after the reply
READY_5 = (HostRung(0, "ready 5", 1.0), OURS, ready_actions(5))


def in_flight(token: str = "a", timeout: float = 5.0, started: float = 10.0) -> list:
    """Steps that put write `token` in flight: requested, carried out, waiting for its ack."""
    return [(WriteRequested(token, f"plan-{token}", MEMBER, True, 2), OURS, [WriteNow(token, f"plan-{token}")]),
            (Written(token, seq(1), CRC, True, timeout, started), OURS, [ScheduleTimeout(token, timeout)])]


SCENARIOS = {
    "rings for the guest are held until it is ready, each (peer, vector) once, and delivered then": (builtin, [
        (RingRequested(PENDING_GUEST, 0), BOOTING, [Hold(PENDING_GUEST, 0)]),
        (RingRequested(PENDING_GUEST, 0), BOOTING, [Hold(PENDING_GUEST, 0)]),
        (RingRequested(PENDING_GUEST, 1), BOOTING, [Hold(PENDING_GUEST, 1)]),
        (RingRequested(5, 1), OURS, [Hold(5, 1)]),  # connected, not ready yet: still held
        # kept once per (peer, vector) as asked: the ring held for "the guest" and the one for peer 5 are both rung
        (HostRung(0, "ready 5", 1.0), OURS, ready_actions(5, Ring(5, 0, held=True), Ring(5, 1, held=True),
                                                          Ring(5, 1, held=True))),
        (RingRequested(5, 0), OURS, [Ring(5, 0)]),  # ready: rung at once, nothing held any more
        # said again: nothing delivered twice, and nothing recorded (a peer ringing in a loop would fill the log)
        (HostRung(0, "ready 5", 2.0), OURS, [Log("debug", "guest said ready again: ready 5")]),
    ]),
    "a ring for a peer that is not the guest is never held": (builtin, [
        (RingRequested(6, 0), OURS_AND_STRANGER, [Ring(6, 0)]),
    ]),
    "serving only, with no handshake, rings go at once": (serving, [
        (RingRequested(5, 0), ONE, [Ring(5, 0)]),
        (WriteRequested("a", "plan-a", MEMBER, False, 2), ONE, [WriteNow("a", "plan-a")]),
        (Written("a", seq(1), CRC, False, 60.0, 1.0), ONE, [Reply("a", seq(1))]),
    ]),
    "a waited write while one is in flight is queued; the ack answers the right one and starts the next": (builtin, [
        READY_5, *in_flight("a"),
        (WriteRequested("b", "plan-b", MEMBER, True, 2), OURS, [Queue("b", 1)]),
        (WriteRequested("c", "plan-c", MEMBER, False, 2), OURS, [WriteNow("c", "plan-c")]),  # not waited: not queued
        (Written("c", seq(2), CRC, False, 5.0, 10.2), OURS, [Reply("c", seq(2))]),
        (HostRung(1, ACK, 10.5), OURS, [acked("a", seq(1), 500.0), *ACK_ACTIONS, WriteNow("b", "plan-b")]),
        (Written("b", seq(3), CRC, True, 5.0, 11.0), OURS, [ScheduleTimeout("b", 5.0)]),
        (TimedOut("a"), OURS, []),  # answered already: its deadline does nothing to the write in flight now
        (HostRung(1, ACK, 11.25), OURS, [acked("b", seq(3), 250.0), *ACK_ACTIONS]),
        (TimedOut("b"), OURS, []),
    ]),
    "an ack whose checksum differs says the message was not delivered exactly": (builtin, [
        READY_5,
        (WriteRequested("a", "plan-a", MEMBER, True, 2), OURS, [WriteNow("a", "plan-a")]),
        (Written("a", seq(1), CRC ^ 1, True, 5.0, 10.0), OURS, [ScheduleTimeout("a", 5.0)]),
        (HostRung(1, ACK, 10.0), OURS, [acked("a", seq(1), 0.0, exactly=False), *ACK_ACTIONS]),
    ]),
    "a forged ack with no write waiting answers nobody": (builtin, [
        (HostRung(1, ACK, 1.0), BOOTING, [Log("debug", f"host rung on vector 1 (reply area: {ACK!r})")]),
        READY_5,
        # counted, the guard's copy refreshed, no reply, and only a debug line: anyone may forge one
        (HostRung(1, ACK, 2.0), OURS, [Log("debug", f"guest acknowledged: {ACK}"), RefreshGuard(reply_only=True)]),
        (HostRung(0, ACK, 3.0), OURS, [Log("debug", f"host rung on vector 0 (reply area: {ACK!r})")]),
        (HostRung(1, "ready 5", 4.0), OURS, [Log("debug", "host rung on vector 1 (reply area: 'ready 5')")]),
    ]),
    "a stranger's ready is not the guest's": (builtin, [
        (HostRung(0, "ready 9", 1.0), OURS, [Log("debug", "host rung on vector 0 (reply area: 'ready 9')")]),
        (HostRung(0, "ready 6", 1.0), OURS_AND_STRANGER, [
            Log("info", "guest ready: ready 6 (one of several guests: ring it by its id)"),
            Record("guest-ready", (("reply", "ready 6"), ("peer", 6)))]),
        (RingRequested(6, 0), OURS_AND_STRANGER, [Ring(6, 0)]),  # ready itself: rung by its id at once
        (RingRequested(5, 0), OURS_AND_STRANGER, [Hold(5, 0)]),  # ours is still not ready
    ]),
    "the ack timeout fails the write in flight and starts the next": (builtin, [
        READY_5, *in_flight("a", timeout=2.0),
        (WriteRequested("b", "plan-b", MEMBER, True, 2), OURS, [Queue("b", 1)]),
        (TimedOut("a"), OURS, [Fail("a", "the guest did not acknowledge within 2 s (the write itself is recorded "
                                    "as seq 1)", seq(1)), WriteNow("b", "plan-b")]),
        (TimedOut("a"), OURS, []),
        (Written("b", seq(2), CRC, True, 2.0, 13.0), OURS, [ScheduleTimeout("b", 2.0)]),
        (HostRung(1, ACK, 13.5), OURS, [acked("b", seq(2), 500.0), *ACK_ACTIONS]),
    ]),
    "a queued write that fails when its turn comes is answered, and the next starts": (builtin, [
        READY_5, *in_flight("a"),
        (WriteRequested("b", "plan-b", MEMBER, True, 2), OURS, [Queue("b", 1)]),
        (WriteRequested("c", "plan-c", ROOT, True, 2), OURS, [Queue("c", 2)]),
        (TimedOut("a"), OURS, [Fail("a", "the guest did not acknowledge within 5 s (the write itself is recorded "
                                    "as seq 1)", seq(1)), WriteNow("b", "plan-b")]),
        (WriteFailed("b", "audit log full"), OURS, [Fail("b", "audit log full"), WriteNow("c", "plan-c")]),
        (WriteFailed("c", "audit log full"), OURS, [Fail("c", "audit log full")]),
    ]),
    "QEMU exits with a write in flight and writes queued: each fails, nothing more is held": (builtin, [
        READY_5, *in_flight("a"),
        (WriteRequested("b", "plan-b", MEMBER, True, 2), OURS, [Queue("b", 1)]),
        (WriteRequested("c", "plan-c", OTHER, True, 2), OURS, [Queue("c", 2)]),
        (QemuExited(), EXITED, [Fail("a", QEMU_GONE_BEFORE_ACK, seq(1)), Fail("b", QEMU_GONE_BEFORE_TURN),
                                Fail("c", QEMU_GONE_BEFORE_TURN)]),
        (TimedOut("a"), EXITED, []),
        (HostRung(1, ACK, 20.0), EXITED, [Log("debug", f"host rung on vector 1 (reply area: {ACK!r})")]),
        (QemuExited(), EXITED, []),
    ]),
    "several ready guests: each is rung by its id": (serving, [
        (HostRung(0, "ready 5", 1.0), TWO, ready_actions(5)),  # the only one ready yet: it is the guest
        (HostRung(0, "ready 6", 2.0), TWO, [  # now neither is "the guest"
            Log("info", "guest ready: ready 6 (one of several guests: ring it by its id)"),
            Record("guest-ready", (("reply", "ready 6"), ("peer", 6)))]),
        (RingRequested(5, 0), TWO, [Ring(5, 0)]),
        (RingRequested(6, 1), TWO, [Ring(6, 1)]),
    ]),
    "a guest that leaves and comes back: rings wait for the new one": (serving, [
        (HostRung(0, "ready 5", 1.0), ONE, ready_actions(5)),
        (PeerLeft(5), NOBODY, []),
        (RingRequested(PENDING_GUEST, 0), NOBODY, [Hold(PENDING_GUEST, 0)]),
        (HostRung(0, "ready 7", 2.0), LATER, ready_actions(7, Ring(7, 0, held=True))),
        (PeerLeft(5), LATER, []),  # someone else left: the guest is still ready
        (RingRequested(7, 0), LATER, [Ring(7, 0)]),
    ]),
    "queued writes are bounded per uid, in count and bytes, with the reserve kept for root": (
        lambda: builtin(SharesPolicy(queued_writes=4, queued_writes_per_uid=2, buffer_bytes=100,
                                     buffer_bytes_per_uid=50)), [
            READY_5, *in_flight("a"),
            (WriteRequested("b", "plan", MEMBER, True, 2), OURS, [Queue("b", 1)]),
            (WriteRequested("c", "plan", MEMBER, True, 2), OURS, [Queue("c", 2)]),
            (WriteRequested("d", "plan", MEMBER, True, 2), OURS, [Fail("d", (
                "write not queued: uid 1000 holds 2 of its share of 2 queued writes (policy [shares]); try again "
                "once the guest has acknowledged the writes before it"))]),
            (WriteRequested("e", "plan", OTHER, True, 2), OURS, [Fail("e", (
                "write not queued: the 2 queued writes open to every uid are in use (the last 2 are kept for uids "
                "[0]) (policy [shares]); try again once the guest has acknowledged the writes before it"))]),
            (TimedOut("a"), OURS, [Fail("a", "the guest did not acknowledge within 5 s (the write itself is "
                                             "recorded as seq 1)", seq(1)), WriteNow("b", "plan")]),
            (Written("b", seq(2), CRC, True, 5.0, 16.0), OURS, [ScheduleTimeout("b", 5.0)]),
            (WriteRequested("g", "plan", MEMBER, True, 2), OURS, [Queue("g", 2)]),  # b's turn gave its place back
            (WriteRequested("f", "plan", ROOT, True, 60), OURS, [Queue("f", 3)]),  # root may take the reserve
            (WriteRequested("h", "plan", OTHER, True, 2), OURS, [Fail("h", (
                "write not queued: the 2 queued writes open to every uid are in use (the last 2 are kept for uids "
                "[0]) (policy [shares]); try again once the guest has acknowledged the writes before it"))]),
        ]),
}


def play(session: GuestSession, steps) -> list:
    return [session.handle(event, peers) for event, peers, _ in steps]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_each_event_gives_exactly_the_actions_in_the_table(name):
    make, steps = SCENARIOS[name]
    assert play(make(), steps) == [expected for _, _, expected in steps]


def test_the_tables_cover_every_event():
    used = {type(event) for _, steps in SCENARIOS.values() for event, _, _ in steps}
    assert used == set(typing.get_args(Event))


@pytest.mark.parametrize("make, peers, expected", [
    (builtin, BOOTING, PENDING_GUEST),  # our QEMU has not connected: held for it
    (builtin, OURS, 5),
    (builtin, OURS_AND_STRANGER, 5),
    (builtin, STRANGER_ONLY, PENDING_GUEST),  # a stranger is never "the guest" of a QEMU we booted
    (serving, ONE, 5),  # serving only, the only peer
])
def test_ring_guest_means_our_qemu_or_the_one_peer(make, peers, expected):
    assert make().guest_target(peers) == expected


@pytest.mark.parametrize("make, steps, peers, error", [
    (builtin, [], EXITED, re.escape("no guest is connected (ring a peer id instead; see `shmguard status`)")),
    (serving, [], NOBODY, "no guest is connected"),  # no handshake: nothing to wait for
    (serving, [], TWO, "no guest is connected"),
    (serving, [(HostRung(0, "ready 5", 1.0), TWO), (HostRung(0, "ready 6", 1.0), TWO)], TWO,
     r"several guests are ready \(peers 5, 6\): ring one by its id, e.g. --ring 5"),
])
def test_ring_guest_is_refused_by_name_when_it_cannot_be_meant(make, steps, peers, error):
    session = make()
    for event, seen in steps:
        session.handle(event, seen)
    with pytest.raises(ControlError, match=error):
        session.guest_target(peers)


def test_exit_of_qemu_ends_readiness_and_rings_for_it_are_refused():
    session = builtin()
    session.handle(*READY_5[:2])
    assert session.ready
    session.handle(QemuExited(), EXITED)
    assert not session.ready and session.waiter is None and len(session.queue) == 0
    with pytest.raises(ControlError, match="no guest is connected"):
        session.guest_target(EXITED)


def test_status_counts_acks_and_keeps_the_last_reply():
    session = builtin()
    play(session, [READY_5, *in_flight("a"), (HostRung(1, ACK, 11.0), OURS, None),
                   (HostRung(1, ACK, 12.0), OURS, None)])
    assert (session.acks, session.last_reply, session.ready_guests(OURS_AND_STRANGER)) == (2, ACK, [5])


def test_a_successor_takes_over_the_state_and_goes_on_exactly_as_the_original():
    steps = [(RingRequested(PENDING_GUEST, 1), BOOTING, None), READY_5, *in_flight("a"),
             (WriteRequested("b", "plan-b", MEMBER, True, 2), OURS, None),
             (RingRequested(PENDING_GUEST, 0), BOOTING, None)]
    original = builtin()
    play(original, steps)
    state = original.snapshot()
    assert dataclasses.asdict(state)["queued"] == ({"token": "b", "plan": "plan-b", "uid": MEMBER, "size": 2},)
    successor = GuestSession.from_snapshot(state, SharesPolicy())
    assert successor.snapshot() == state
    assert successor.queue.count.held_by(MEMBER) == 1 and successor.queue.bytes.held_by(MEMBER) == 2
    rest = [(HostRung(1, ACK, 10.5), OURS, None), (Written("b", seq(2), CRC, True, 5.0, 11.0), OURS, None),
            (QemuExited(), EXITED, None)]
    assert play(successor, rest) == play(original, rest)
    assert successor.snapshot() == original.snapshot()


def test_guests_that_left_are_forgotten_at_the_next_ready_so_the_state_stays_bounded():
    session = serving()
    play(session, [(HostRung(0, "ready 5", 1.0), ONE, None), (PeerLeft(5), NOBODY, None),
                   (HostRung(0, "ready 7", 2.0), LATER, None)])
    assert session.snapshot().joined == (7,)


# --- several guests (`run --guests 2`): slots, sends between guests, leaves ------------------------------------

BOTH = SlotPeers((5, 6), (5, 6))  # our QEMUs for slots 0 and 1 are peers 5 and 6
ONLY_0 = SlotPeers((5,), (5, None))  # slot 1's QEMU has exited
SUCCESSOR = SlotPeers((5, 9), (5, None))  # and peer 9, started by someone else, is there
STRANGER = SlotPeers((5, 6, 7), (5, 6))
HI_CRC = zlib.crc32(b"hi")
SENT_LINE = f"sent 1 6 1 2 {HI_CRC:08x} 1500"
SEND_FIELDS = (("from", 0), ("from_peer", 5), ("to", 1), ("to_peer", 6), ("command", 1))


def pair() -> GuestExchange:
    return GuestExchange.new(2)


def said(replies=("", ""), reports=("", ""), now: float = 1.0) -> SlotsRead:
    return SlotsRead(tuple(replies), tuple(reports), now)


def told(generation: int, guests: dict[int, int]) -> list:
    return [WritePeers(k, peer, peers_line(generation, guests)) for k, peer in sorted(guests.items())]


BOTH_READY = [
    (said(("ready 5", "")), BOTH, [Log("info", "guest 0 ready: peer 5"), PassOn(0, "ready 5"), *told(1, {0: 5}),
                                   Notify("guests ready: 1 of 2")]),
    (said(("ready 5", "ready 6")), BOTH, [Log("info", "guest 1 ready: peer 6"), PassOn(0, "ready 6"),
                                          *told(2, {0: 5, 1: 6}), Notify("guests ready: 2 of 2")]),
]
SENDING = [*BOTH_READY, (SendRequested("s", 0, 1, b"hi", 5.0, 10.0), BOTH, [
    ScheduleTimeout("s", 5.0), ScheduleNudge("s", 1.0), WriteCommand("s", 0, 5, command_bytes(1, 6, 1, b"hi"))])]

REPORTED = [  # the sender's report of SENT_LINE, read at 10.25 s: the send it answers
    RefreshGuard(),
    Record("guest-report", (("guest", 0), ("command", 1), ("to", 1), ("to_peer", 6), ("report", SENT_LINE),
                            ("result", "acknowledged"))),
    Log("info", f"guest 0 sent to guest 1: {SENT_LINE}"),
    Reply("s", (*SEND_FIELDS, ("report", SENT_LINE), ("seq", 1), ("length", 2), ("delivered_exactly", True),
                ("round_trip_ms", 1.5), ("host_round_trip_ms", 250.0)))]

EXCHANGE_SCENARIOS = {
    "guests say ready in their own slots and each is told who is there; the same lines again change nothing": [
        *BOTH_READY,
        (said(("ready 5", "ready 6")), BOTH, []),
        (said((ACK, "ready 6")), BOTH, [PassOn(1, ACK)]),  # the host's message acked: the GuestSession's part
        (said((ACK, "junk")), BOTH, [Log("debug", "guest 1 reply area: 'junk'")]),
    ],
    "a send is a command in the sender's slot; the sender's report answers it, and nothing else does": [
        *SENDING,
        (SendRequested("t", 0, 1, b"again", 5.0, 10.1), BOTH, [
            Fail("t", "guest 0 is still sending command 1: try again once it has reported")]),
        (said(("ready 5", "ready 6"), ("", f"sent 1 5 1 2 {HI_CRC:08x} 9")), BOTH, [
            Log("debug", f"guest 1 report: 'sent 1 5 1 2 {HI_CRC:08x} 9'")]),  # not the sender's line
        (said(("ready 5", "ready 6"), (SENT_LINE, f"sent 1 5 1 2 {HI_CRC:08x} 9"), now=10.25), BOTH, REPORTED),
        (TimedOut("s"), BOTH, []),  # answered already
        (Nudged("s"), BOTH, []),  # so is its nudge
    ],
    "a line the guest was rewriting when the host read it (None) changes nothing; the whole line then answers": [
        *SENDING,
        (said(("ready 5", None), (None, "")), BOTH, []),
        (said(("ready 5", "ready 6"), (SENT_LINE, ""), now=10.25), BOTH, REPORTED),
    ],
    "a send unreported when its nudge is due rings its sender again (an interrupt can be lost under load)": [
        *SENDING,
        (Nudged("s"), BOTH, [Log("debug", "guest 0 has not reported command 1 yet: rung again"), Ring(5, 1),
                             ScheduleNudge("s", 1.0)]),
        (Nudged("elsewhere"), BOTH, []),
    ],
    "a send the guest could not make fails with its reason; a later one is numbered on": [
        *SENDING,
        (said(("ready 5", "ready 6"), ("lost 1 6 busy", "")), BOTH, [
            Record("guest-report", (("guest", 0), ("command", 1), ("to", 1), ("to_peer", 6),
                                    ("report", "lost 1 6 busy"), ("result", "lost"))),
            Fail("s", "guest 0 could not send command 1: busy", (*SEND_FIELDS, ("report", "lost 1 6 busy")))]),
        (SendRequested("u", 1, 0, b"back", 5.0, 11.0), BOTH, [
            ScheduleTimeout("u", 5.0), ScheduleNudge("u", 1.0),
            WriteCommand("u", 1, 6, command_bytes(2, 5, 0, b"back"))]),
    ],
    "sends are refused, writing nothing, between guests that do not exist or are not ready": [
        (SendRequested("a", 0, 1, b"hi", 5.0, 1.0), BOTH, [Fail("a", "guest 0 is not ready (see `shmguard status`)")]),
        BOTH_READY[0],
        (SendRequested("b", 0, 1, b"hi", 5.0, 1.0), BOTH, [Fail("b", "guest 1 is not ready (see `shmguard status`)")]),
        (SendRequested("c", 0, 0, b"hi", 5.0, 1.0), BOTH, [
            Fail("c", "--from 0 --to 0: two different guests of 0..1")]),
        (SendRequested("d", 0, 2, b"hi", 5.0, 1.0), BOTH, [
            Fail("d", "--from 0 --to 2: two different guests of 0..1")]),
    ],
    "a guest that leaves: the other is told first, then the send to it fails; a successor takes the slot": [
        *SENDING,
        (PeerLeft(6), ONLY_0, [*told(3, {0: 5}), Log("info", "guest 1 (peer 6) left; the other guests are told"),
                               Fail("s", "guest 1 (peer 6) left before acknowledging guest 0's message")]),
        (said(("ready 5", "ready 6"), ("lost 1 6 peer left", "")), ONLY_0, [  # late: answered already
            Log("debug", "guest 0 report: 'lost 1 6 peer left'")]),
        (SendRequested("v", 0, 1, b"hi", 5.0, 12.0), ONLY_0, [
            Fail("v", "guest 1 is not ready (see `shmguard status`)")]),
        (said(("ready 5", "ready 9"), ("lost 1 6 peer left", "")), SUCCESSOR, [
            Log("info", "guest 1 ready: peer 9"), PassOn(0, "ready 9"), *told(4, {0: 5, 1: 9}),
            Notify("guests ready: 2 of 2")]),
        (PeerLeft(77), SUCCESSOR, []),  # not a guest
    ],
    "the sender leaving fails its own send": [
        *SENDING,
        (PeerLeft(5), SlotPeers((6,), (None, 6)), [
            *told(3, {1: 6}), Log("info", "guest 0 (peer 5) left; the other guests are told"),
            Fail("s", "guest 0 (peer 5) left before it reported")]),
    ],
    "a send not reported in time fails, and a command that could not be written too": [
        *SENDING,
        (TimedOut("s"), BOTH, [Fail("s", "guest 0 did not report within 5 s")]),
        (SendRequested("w", 0, 1, b"hi", 5.0, 20.0), BOTH, [
            ScheduleTimeout("w", 5.0), ScheduleNudge("w", 1.0),
            WriteCommand("w", 0, 5, command_bytes(2, 6, 1, b"hi"))]),
        (SendFailed("w", "audit log full"), BOTH, [Fail("w", "audit log full")]),
    ],
    "a peer cannot take the slot of a QEMU this supervisor runs, nor say ready for a peer that is not there": [
        (said(("", "ready 7")), STRANGER, [
            Log("warning", "peer 7 says it is ready as guest 1, whose QEMU this supervisor runs: ignored")]),
        (said(("ready 8", "ready 7")), STRANGER, [Log("debug", "guest 0 reply area: 'ready 8'")]),
        (said(("ready 8", "ready 6")), STRANGER, [Log("info", "guest 1 ready: peer 6"), PassOn(0, "ready 6"),
                                                  *told(1, {1: 6}), Notify("guests ready: 1 of 2")]),
    ],
}


@pytest.mark.parametrize("name", list(EXCHANGE_SCENARIOS))
def test_each_exchange_event_gives_exactly_the_actions_in_the_table(name):
    steps = EXCHANGE_SCENARIOS[name]
    exchange = pair()
    assert [exchange.handle(event, peers) for event, peers, _ in steps] == [expected for _, _, expected in steps]


def test_the_exchange_tables_cover_every_exchange_event():
    used = {type(event) for steps in EXCHANGE_SCENARIOS.values() for event, _, _ in steps}
    assert used == {*typing.get_args(ExchangeEvent), PeerLeft, TimedOut}


def test_status_lists_each_guest_with_its_peer_and_state():
    exchange = pair()
    for event, peers, _ in SENDING:
        exchange.handle(event, peers)
    assert exchange.describe((5, 6)) == [
        {"guest": 0, "peer": 5, "state": "sending", "sent": 0, "sending_to": 1},
        {"guest": 1, "peer": 6, "state": "ready", "sent": 0, "sending_to": None}]
    assert pair().describe((PENDING_GUEST, None))[0]["state"] == "booting"
    assert pair().describe((PENDING_GUEST, None))[1]["state"] == "empty"


def test_a_successor_takes_over_the_slots_with_the_session_and_goes_on_exactly_as_the_original():
    original = GuestSession(SharesPolicy(), serving_only=False, handshake=True, exchange=pair())
    for event, peers, _ in SENDING:
        original.exchange.handle(event, peers)
    state = original.snapshot()
    assert dataclasses.asdict(state)["exchange"]["slots"][0]["sending"]["command"] == 1  # plain data
    successor = GuestSession.from_snapshot(state, SharesPolicy())
    assert successor.snapshot() == state
    rest = [(said(("ready 5", "ready 6"), (SENT_LINE, ""), now=10.25), BOTH), (PeerLeft(6), ONLY_0),
            (SendRequested("x", 0, 1, b"hi", 5.0, 11.0), ONLY_0)]
    assert [successor.exchange.handle(*step) for step in rest] == [original.exchange.handle(*step) for step in rest]
    assert successor.snapshot() == original.snapshot()


def test_with_several_guests_a_write_waiting_for_one_that_left_fails_at_once_and_the_next_goes():
    session = GuestSession(SharesPolicy(), serving_only=False, handshake=True, exchange=pair())
    rang = (("seq", 1), ("rang", [{"peer": 6, "vector": 0}]))
    peers = Peers((5, 6))
    assert session.handle(WriteRequested("a", "plan-a", MEMBER, True, 2), peers) == [WriteNow("a", "plan-a")]
    assert session.handle(Written("a", rang, CRC, True, 5.0, 1.0), peers) == [ScheduleTimeout("a", 5.0)]
    assert session.handle(WriteRequested("b", "plan-b", MEMBER, True, 2), peers) == [Queue("b", 1)]
    assert session.handle(PeerLeft(5), Peers((6,))) == []  # not the one it waits for
    assert session.handle(PeerLeft(6), Peers()) == [Fail("a", "guest peer 6 left before it acknowledged", rang),
                                                    WriteNow("b", "plan-b")]
