"""The full doorbell flow, end to end: supervisor + built-in guest, messages, acks, attacks, audit.

`shmguard demo` runs it in a throwaway runtime directory with the strict policy and reports what happened.
`shmguard demo --guests N` boots N built-in guests: the host's messages go to each, and every guest sends to
every other through the region, ringing it directly (the host only asks and reads the reports).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .attack import AttackResult, Battery, format_table
from .audit import verify
from .control import ControlClient, ControlError
from .launcher import SupervisorProcess, ThrowawaySupervisor
from .layout import GuestLayout
from .policy import Policy

MESSAGES = ("hello world", "shmguard: sealed, guarded, audited", "the quick brown fox jumps over the lazy dog")
REGION_SIZE = "4K"  # what the seed's Zephyr x86_64 guest fits; the built-in guest takes any size
BETWEEN_GUESTS = ("hello from guest {source} to guest {target}", "guest {source} rings guest {target} directly")
_PRINTED = re.compile(r"\bguest(?: (\d+))?: (received IRQ .*)")


@dataclass
class Delivery:
    message: str
    seq: int
    acknowledged: bool
    exact: bool
    round_trip_ms: float | None
    printed: bool = False
    guest: int | None = None  # with several guests: which one it went to


@dataclass
class Exchange:
    """A message one guest sent another: acknowledged to the sender, printed by the receiver."""

    source: int
    target: int
    message: str
    acknowledged: bool
    exact: bool
    round_trip_ms: float | None  # measured inside the sending guest
    printed: bool = False

    @property
    def ok(self) -> bool:
        return self.acknowledged and self.exact and self.printed


@dataclass
class DemoReport:
    boot_to_ready_s: float = 0.0
    guests: int = 1
    deliveries: list[Delivery] = field(default_factory=list)
    exchanges: list[Exchange] = field(default_factory=list)
    guest_lines: list[str] = field(default_factory=list)
    attacks: list[AttackResult] = field(default_factory=list)
    audit_summary: str = ""
    audit_ok: bool = False

    @property
    def ok(self) -> bool:
        delivered = all(d.acknowledged and d.exact and d.printed for d in self.deliveries)
        exchanged = all(exchange.ok for exchange in self.exchanges) and (self.guests == 1 or bool(self.exchanges))
        defended = all(attack.defended for attack in self.attacks)
        return bool(self.deliveries) and delivered and exchanged and defended and self.audit_ok


def region_size(guests: int) -> str:
    """4K for one guest (and two); the smallest power of two that holds more."""
    size = 4096
    while guests > 1:
        try:
            GuestLayout.of(size, guests)
            break
        except ValueError:
            size *= 2
    return REGION_SIZE if size == 4096 else str(size)


def run_demo(say: Callable[[str], None], policy_name: str = "strict", attacks: bool = True,
             keep: bool = False, guests: int = 1) -> DemoReport:
    report = DemoReport(guests=guests)
    size = region_size(guests)
    say(f"starting the supervisor ({policy_name} policy, {size} region) with "
        + ("the built-in guest" if guests == 1 else f"{guests} built-in guests"))
    started = time.monotonic()
    run_args = ("--guests", str(guests)) if guests > 1 else ()
    supervisor = ThrowawaySupervisor(policy_name, *run_args, guest=True, prefix="shmguard-demo-", durable=True,
                                     keep=True, timeout=120, region={"size": size})
    policy, workdir = supervisor.policy, supervisor.directory
    try:
        supervisor.wait_for("guest ready" if guests == 1 else f"guests ready: {guests} of {guests}", 240)
        report.boot_to_ready_s = time.monotonic() - started
        say(f"{'guest' if guests == 1 else f'all {guests} guests'} ready {report.boot_to_ready_s:.1f} s after start")
        control = policy.control.socket
        peers = _guest_peers(control) if guests > 1 else [None]
        _round(report, control, list(MESSAGES), BETWEEN_GUESTS, peers, say)
        if attacks:
            report.attacks = _attack(policy, supervisor, say)
            after = f"still here after {len(report.attacks)} attacks"
            _round(report, control, [after], (after + ": guest {source} to guest {target}",), peers, say)
        expected = [f"{'guest' if d.guest is None else f'guest {d.guest}'}: received IRQ and full message: {d.message}"
                    for d in report.deliveries if d.acknowledged]
        expected += [f"guest {e.target}: received IRQ and full message: {e.message}" for e in report.exchanges
                     if e.acknowledged]
        lines = _wait_for_printed(supervisor, expected)
        printed = set(lines)
        report.guest_lines = [line.removeprefix("guest: ") for line in lines]
        for delivery in report.deliveries:
            name = "guest" if delivery.guest is None else f"guest {delivery.guest}"
            delivery.printed = f"{name}: received IRQ and full message: {delivery.message}" in printed
        for exchange in report.exchanges:
            exchange.printed = f"guest {exchange.target}: received IRQ and full message: {exchange.message}" in printed
    finally:
        supervisor.stop()
        result = verify(policy.audit.path)
        report.audit_summary, report.audit_ok = result.summary(), result.ok
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"kept {workdir} (supervisor.log, audit.log)")
    return report


def _guest_peers(control_path: str) -> list[int]:
    return [entry["peer"] for entry in ControlClient(control_path).status()["guest"]["guests"]]


def _round(report: DemoReport, control_path: str, messages: list[str], between: tuple[str, ...],
           peers: list[int | None], say: Callable[[str], None]) -> None:
    """The host's messages to each guest, then (several guests) every guest to every other."""
    for message in messages:
        for guest, peer in enumerate(peers):
            text = message if peer is None else f"{message} (for guest {guest})"
            delivery = _deliver(control_path, text, "guest" if peer is None else str(peer), say)
            delivery.guest = None if peer is None else guest
            report.deliveries.append(delivery)
    for source in range(len(peers) if len(peers) > 1 else 0):
        for target in range(len(peers)):
            if source != target:
                for template in between:
                    report.exchanges.append(_send(control_path, source, target,
                                                  template.format(source=source, target=target), say))


def _deliver(control_path: str, message: str, ring: str, say: Callable[[str], None]) -> Delivery:
    try:
        reply = ControlClient(control_path).write(message.encode(), text=True, ring=ring, wait=True, timeout=60)
    except ControlError as exc:
        say(f"message {message!r}: {exc}")
        return Delivery(message, getattr(exc, "reply", {}).get("seq", 0), False, False, None)
    say(f"wrote {message!r} (audit seq {reply['seq']}); guest acknowledged in {reply['round_trip_ms']:.1f} ms")
    return Delivery(message, reply["seq"], True, reply["delivered_exactly"], reply["round_trip_ms"])


def _send(control_path: str, source: int, target: int, message: str, say: Callable[[str], None]) -> Exchange:
    try:
        reply = ControlClient(control_path, timeout=90).send(source, target, message.encode(), timeout=60)
    except ControlError as exc:
        say(f"guest {source} to guest {target}, {message!r}: {exc}")
        return Exchange(source, target, message, False, False, None)
    say(f"guest {source} sent {message!r} to guest {target}, acknowledged by it in {reply['round_trip_ms']:.3f} ms "
        "(measured inside the sender)")
    return Exchange(source, target, message, True, reply["delivered_exactly"], reply["round_trip_ms"])


def _wait_for_printed(supervisor: ThrowawaySupervisor, expected: list[str], timeout: float = 10.0) -> list[str]:
    """A guest prints each message just after acknowledging it: give the last console lines time to arrive."""
    deadline = time.monotonic() + timeout
    while True:
        lines = _printed(supervisor.log())
        if set(expected) <= set(lines) or time.monotonic() >= deadline:
            return lines
        time.sleep(0.05)


def _printed(log: str) -> list[str]:
    """What the guests printed, each line as "guest: ..." (one guest) or "guest K: ..." (several)."""
    return [f"guest {match.group(1)}: {match.group(2)}" if match.group(1) else f"guest: {match.group(2)}"
            for line in log.splitlines() if (match := _PRINTED.search(line))]


def _attack(policy: Policy, supervisor: SupervisorProcess, say: Callable[[str], None]) -> list:
    say("running the attack battery against the live supervisor and its guest")
    with Battery(policy, supervisor=supervisor.proc) as battery:
        results = battery.run_all()
    failed = [result for result in results if not result.defended]
    if failed:
        say(format_table(failed))
    return results


def format_report(report: DemoReport) -> str:
    lines = ["", "guest console:"] + [f"  {line}" for line in report.guest_lines]
    lines.append("")
    lines.append(f"boot to ready: {report.boot_to_ready_s:.1f} s")
    for d in report.deliveries:
        state = "delivered, printed and acknowledged" if d.acknowledged and d.printed and d.exact else "FAILED"
        lines.append(f"  seq {d.seq}: {d.message!r}: {state}"
                     + (f" ({d.round_trip_ms:.1f} ms)" if d.round_trip_ms is not None else ""))
    if report.exchanges:
        lines.append(f"between guests (the host asks and reads the report; the bytes and doorbells go from guest "
                     f"to guest): {sum(e.ok for e in report.exchanges)} of {len(report.exchanges)} printed and "
                     "acknowledged")
    for e in report.exchanges:
        lines.append(f"  guest {e.source} -> guest {e.target}: {e.message!r}: "
                     + ("printed and acknowledged" if e.ok else "FAILED")
                     + (f" ({e.round_trip_ms:.3f} ms inside the sender)" if e.round_trip_ms is not None else ""))
    if report.attacks:
        defended = sum(1 for a in report.attacks if a.defended)
        lines.append(f"attacks: {defended} of {len(report.attacks)} defended")
    lines.append(f"audit log: {report.audit_summary}")
    lines.append("demo: OK" if report.ok else "demo: FAILED")
    return "\n".join(lines)
