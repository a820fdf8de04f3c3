"""Whether a running supervisor is healthy, from its status reply: the first line of `shmguard status`.

Pure: a status dict in, problems out. An empty list is healthy. Fields an older supervisor lacks are not problems.
"""

from __future__ import annotations

SEALS = {"grow", "shrink", "seal"}


def problems(status: dict) -> list[str]:
    found = []
    region = status.get("region", {})
    if region.get("backend") == "memfd" and not SEALS <= set(region.get("seals", ())):
        seals = ",".join(region.get("seals", ())) or "none"
        found.append(f"the region is not sealed against resizing (seals: {seals})")
    audit = status.get("audit", {})
    if audit.get("writable") is False:
        trouble = audit.get("trouble") or {}
        found.append(f"the audit log {audit.get('path')} cannot be written ({trouble.get('error', 'unknown error')}; "
                     f"since {trouble.get('since', '?')})")
    guest = status.get("guest", {})
    if guest.get("guests"):  # several built-in guests (run --guests N): each slot has its own
        found += [f"guest {entry['guest']} is {entry['state']}" for entry in guest["guests"]
                  if entry.get("state") in ("empty", "booting")]
    elif guest.get("handshake") and guest.get("peer") is None:
        if not guest.get("ready_guests"):  # several ready guests are rung by id: none is "the" guest
            found.append("the guest is not connected")
    elif guest.get("handshake") and not guest.get("ready"):
        found.append(f"the guest (peer {guest.get('peer')}) has not said it is ready")
    return found


def summary(status: dict) -> str:
    """One line: "healthy: ..." or "UNHEALTHY: problem; problem"."""
    found = problems(status)
    if found:
        return "UNHEALTHY: " + "; ".join(found)
    peers = [p for p in status.get("peers", []) if not p.get("local")]
    guest = status.get("guest", {})
    parts = [f"policy {status.get('policy')}", f"{len(peers)} peer{'s' if len(peers) != 1 else ''}"]
    if guest.get("guests"):
        parts.append(f"{len(guest['guests'])} guests ready")
    elif guest.get("ready"):
        parts.append(f"guest peer {guest.get('peer')} ready")
    parts.append(f"audit seq {status.get('audit', {}).get('last_seq')}")
    incidents = status.get("guard", {}).get("incidents")
    if incidents:
        parts.append(f"{incidents} guard incident{'s' if incidents != 1 else ''} handled")
    return "healthy: " + ", ".join(parts)
