"""The full doorbell flow, end to end: supervisor + built-in guest, messages, acks, attacks, audit.

`shmguard demo` runs it in a throwaway runtime directory with the strict policy and reports what happened.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .attack import AttackResult, Battery, format_table
from .audit import verify
from .control import ControlClient, ControlError
from .launcher import SupervisorProcess, ThrowawaySupervisor
from .policy import Policy

MESSAGES = ("hello world", "shmguard: sealed, guarded, audited", "the quick brown fox jumps over the lazy dog")
REGION_SIZE = "4K"  # what the seed's Zephyr x86_64 guest fits; the built-in guest takes any size


@dataclass
class Delivery:
    message: str
    seq: int
    acknowledged: bool
    exact: bool
    round_trip_ms: float | None
    printed: bool = False


@dataclass
class DemoReport:
    boot_to_ready_s: float = 0.0
    deliveries: list[Delivery] = field(default_factory=list)
    guest_lines: list[str] = field(default_factory=list)
    attacks: list[AttackResult] = field(default_factory=list)
    audit_summary: str = ""
    audit_ok: bool = False

    @property
    def ok(self) -> bool:
        delivered = all(d.acknowledged and d.exact and d.printed for d in self.deliveries)
        defended = all(attack.defended for attack in self.attacks)
        return bool(self.deliveries) and delivered and defended and self.audit_ok


def run_demo(say: Callable[[str], None], policy_name: str = "strict", attacks: bool = True,
             keep: bool = False) -> DemoReport:
    report = DemoReport()
    say(f"starting the supervisor ({policy_name} policy, {REGION_SIZE} region) with the built-in guest")
    started = time.monotonic()
    supervisor = ThrowawaySupervisor(policy_name, guest=True, prefix="shmguard-demo-", durable=True, keep=True,
                                     timeout=120, region={"size": REGION_SIZE})
    policy, workdir = supervisor.policy, supervisor.directory
    try:
        supervisor.wait_for("guest ready", 180)
        report.boot_to_ready_s = time.monotonic() - started
        say(f"guest ready {report.boot_to_ready_s:.1f} s after start")
        messages = list(MESSAGES)
        for message in messages:
            report.deliveries.append(_deliver(policy.control.socket, message, say))
        if attacks:
            report.attacks = _attack(policy, supervisor, say)
            messages.append(f"still here after {len(report.attacks)} attacks")
            report.deliveries.append(_deliver(policy.control.socket, messages[-1], say))
        report.guest_lines = _wait_for_guest_lines(supervisor, messages)
        for delivery in report.deliveries:
            delivery.printed = f"received IRQ and full message: {delivery.message}" in report.guest_lines
    finally:
        supervisor.stop()
        result = verify(policy.audit.path)
        report.audit_summary, report.audit_ok = result.summary(), result.ok
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"kept {workdir} (supervisor.log, audit.log)")
    return report


def _deliver(control_path: str, message: str, say: Callable[[str], None]) -> Delivery:
    try:
        reply = ControlClient(control_path).write(message.encode(), text=True, ring="guest", wait=True, timeout=60)
    except ControlError as exc:
        say(f"message {message!r}: {exc}")
        return Delivery(message, getattr(exc, "reply", {}).get("seq", 0), False, False, None)
    say(f"wrote {message!r} (audit seq {reply['seq']}); guest acknowledged in {reply['round_trip_ms']:.1f} ms")
    return Delivery(message, reply["seq"], True, reply["delivered_exactly"], reply["round_trip_ms"])


def _wait_for_guest_lines(supervisor: ThrowawaySupervisor, messages: list[str], timeout: float = 10.0) -> list[str]:
    """The guest prints each message just after acknowledging it: give the last console lines time to arrive."""
    deadline = time.monotonic() + timeout
    while True:
        lines = _guest_lines(supervisor.log())
        if all(f"received IRQ and full message: {m}" in lines for m in messages) or time.monotonic() >= deadline:
            return lines
        time.sleep(0.05)


def _guest_lines(log: str) -> list[str]:
    marker = "guest: "
    return [line.split(marker, 1)[1] for line in log.splitlines() if marker in line and "received IRQ" in line]


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
    if report.attacks:
        defended = sum(1 for a in report.attacks if a.defended)
        lines.append(f"attacks: {defended} of {len(report.attacks)} defended")
    lines.append(f"audit log: {report.audit_summary}")
    lines.append("demo: OK" if report.ok else "demo: FAILED")
    return "\n".join(lines)
