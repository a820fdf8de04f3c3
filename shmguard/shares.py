"""Shares: one accountant for every resource the supervisor holds for others (pure, no I/O).

A resource has a total, a share that any one uid may hold, and a reserve: the last `reserved` units of
the total that only the policy's `shares.reserved_for` users (root, QEMU's user) may take. So a member
who takes all it may still leaves room for root, and its units come back when it lets them go.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Share:
    name: str  # what is counted, for the refusal: "peer slots", "control connections", ...
    total: int
    per_uid: int
    reserved: int
    reserved_for: frozenset[int]
    used: Counter[int] = field(default_factory=Counter)
    in_use: int = 0

    def refusal(self, uid: int, amount: int = 1) -> str | None:
        """Why uid may not take `amount` more now, or None."""
        if self.in_use + amount > self.total:
            return f"all {self.total} {self.name} are in use"
        if uid in self.reserved_for:
            return None
        if self.used[uid] + amount > self.per_uid:
            return f"uid {uid} holds {self.used[uid]} of its share of {self.per_uid} {self.name}"
        if self.in_use + amount > self.total - self.reserved:
            return (f"the {self.total - self.reserved} {self.name} open to every uid are in use "
                    f"(the last {self.reserved} are kept for uids {sorted(self.reserved_for)})")
        return None

    def take(self, uid: int, amount: int = 1) -> str | None:
        """Take `amount` for uid; returns why not (and takes nothing) if it may not."""
        reason = self.refusal(uid, amount)
        if reason is None:
            self.used[uid] += amount
            self.in_use += amount
        return reason

    def owe(self, uid: int, amount: int) -> None:
        """Take `amount` even past the bounds: what is owed already (a reply being sent) is held, and only keeps
        the uid from taking more until it is given back."""
        self.used[uid] += amount
        self.in_use += amount

    def room(self, uid: int) -> int:
        """How much uid may take now: refusal(uid, n) is None for every n up to it."""
        free = self.total - self.in_use
        if uid not in self.reserved_for:
            free = min(free - self.reserved, self.per_uid - self.held_by(uid))
        return max(0, free)

    def give(self, uid: int, amount: int = 1) -> None:
        if amount > self.used[uid]:
            raise AssertionError(f"{self.name}: uid {uid} gives back {amount} but holds {self.used[uid]}")
        self.used[uid] -= amount
        self.in_use -= amount
        if not self.used[uid]:
            del self.used[uid]  # a uid that left holds nothing, not even a counter

    def held_by(self, uid: int) -> int:
        return self.used.get(uid, 0)

    def describe(self) -> dict:
        return {"total": self.total, "per_uid": self.per_uid, "reserved": self.reserved, "in_use": self.in_use,
                "by_uid": {str(uid): count for uid, count in sorted(self.used.items())}}
