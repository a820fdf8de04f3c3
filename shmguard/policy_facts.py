"""What a control client needs of a policy: its control socket, who may serve it, the region's size and how many
writes one uid may queue. Read without the TOML parser for an unchanged built-in policy.

`shmguard write` is a new process per message, and importing tomllib and the policy module costs more than the
rest of the write. So:
- a policy given by path, one in /etc/shmguard, or a built-in whose file differs in any byte from the text
  recorded in builtin_policies.py is loaded by policy.load_policy, exactly as everywhere else;
- a built-in whose file is that recorded text is read from the record: its user and group names are still
  looked up on this host, in load_policy's order, and a missing one is load_policy's one-line PolicyError.
`python -m shmguard.policy_facts` writes builtin_policies.py again from policies/ (tests/test_lean.py says when).
"""

from __future__ import annotations

import grp
import os
import pwd

from .errors import PolicyError

LOCAL_DIR = "/etc/shmguard"  # policy.LOCAL_DIR: NAME.toml there takes the place of the built-in NAME
# The keys of a policy that name users or groups, in the order policy.parse_policy reads them, and their kind.
IDENTITY_KEYS = (("region", "owner", "user"), ("region", "group", "group"), ("server", "owner", "user"),
                 ("server", "group", "group"), ("server", "peers", "access"), ("control", "writers", "access"),
                 ("control", "ringers", "access"), ("control", "readers", "access"),
                 ("shares", "reserved_for", "users"))


class ClientFacts:
    """The part of a policy a control client uses (answerers: client.answering_uids of the policy)."""

    __slots__ = ("source", "control_socket", "answerers", "region_size", "queued_writes_per_uid")

    def __init__(self, source: str, control_socket: str, answerers: frozenset[int], region_size: int,
                 queued_writes_per_uid: int):
        self.source, self.control_socket, self.answerers = source, control_socket, answerers
        self.region_size, self.queued_writes_per_uid = region_size, queued_writes_per_uid

    def __eq__(self, other) -> bool:
        return isinstance(other, ClientFacts) and all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __repr__(self) -> str:
        return f"ClientFacts({', '.join(f'{n}={getattr(self, n)!r}' for n in self.__slots__)})"


def client_facts(name_or_path: str) -> ClientFacts:
    """The facts of a policy (built-in name or path), or its one-line PolicyError."""
    if "/" not in name_or_path and not name_or_path.endswith(".toml"):
        recorded = _recorded(name_or_path)
        if recorded is not None:
            return recorded
    return loaded_facts(name_or_path)


def loaded_facts(name_or_path: str) -> ClientFacts:
    """The facts as policy.load_policy reads them."""
    from .policy import load_policy

    policy = load_policy(name_or_path)
    return ClientFacts(policy.source, policy.control.socket, answerers(policy.server.owner, policy.hardening.user),
                       policy.region.size, policy.shares.queued_writes_per_uid)


def answerers(owner: int, hardening_user: str) -> frozenset[int]:
    """The uids that may serve a policy's sockets: root, the sockets' owner, and hardening.user when set (a socket
    the guard rebinds after the supervisor dropped to that user is that user's)."""
    uids = {0, owner}
    if hardening_user:
        try:
            uids.add(resolve_uid(hardening_user))
        except ValueError:
            pass  # a user that does not exist serves nothing
    return frozenset(uids)


def builtin_dir() -> str:
    """policy.BUILTIN_DIR, without importlib.resources: the package shmguard.policies is a directory."""
    from . import policies

    return os.path.dirname(policies.__file__)


def _recorded(name: str) -> ClientFacts | None:
    if os.path.lexists(os.path.join(LOCAL_DIR, f"{name}.toml")):
        return None  # a local policy: load_policy checks who owns it before reading it
    from .builtin_policies import RECORDED

    record = RECORDED.get(name)
    if record is None:
        return None
    path = os.path.join(builtin_dir(), f"{name}.toml")
    try:
        with open(path, "rb") as f:
            if f.read() != record["text"].encode():
                return None
    except OSError:
        return None
    return facts_of_record(record, path)


def facts_of_record(record: dict, source: str) -> ClientFacts:
    """The facts of a recorded policy, its names looked up on this host as load_policy would."""
    errors, resolved = [], {}
    for section, key, kind in IDENTITY_KEYS:
        if (section, key) in record["identities"]:
            try:
                resolved[section, key] = _resolve(kind, record["identities"][section, key])
            except ValueError as exc:
                errors.append(f"{source}: {section}.{key}: {exc}")
    if errors:
        more = f" (and {len(errors) - 1} more; run `shmguard policy check {source}`)" if len(errors) > 1 else ""
        raise PolicyError(errors[0] + more)
    return ClientFacts(source, record["control_socket"],
                       answerers(resolved.get(("server", "owner"), 0), record["hardening_user"]),
                       record["region_size"], record["queued_writes_per_uid"])


def _resolve(kind: str, value):
    if kind == "user":
        return resolve_uid(value)
    if kind == "group":
        return resolve_gid(value)
    if kind == "users":
        return tuple(resolve_uid(item) for item in value)
    return tuple(resolve_gid(item[1:]) if item.startswith("@") else resolve_uid(item)
                 for item in value if item != "*")


def resolve_uid(name: str | int) -> int:
    """A user name (or uid) as a uid; ValueError naming it if this host has no such user."""
    if isinstance(name, int):
        return name
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise ValueError(f"user {name!r} does not exist on this host (create it or name another)") from None


def resolve_gid(name: str | int) -> int:
    """A group name (or gid) as a gid; ValueError naming it if this host has no such group."""
    if isinstance(name, int):
        return name
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ValueError(
            f"group {name!r} does not exist on this host (create it with `groupadd --system {name}`)"
        ) from None


# --- the record ----------------------------------------------------------------------------------------------


def record_of(path: str) -> dict:
    """What builtin_policies.py records of a policy file: its text, its names as written, and its facts."""
    import tomllib

    from .policy import load_policy

    with open(path, "rb") as f:
        text = f.read().decode()
    data = tomllib.loads(text)
    policy = load_policy(path)
    identities = {(section, key): _as_written(data[section][key]) for section, key, _ in IDENTITY_KEYS
                  if key in data.get(section, {})}
    return {"text": text, "identities": identities, "hardening_user": policy.hardening.user,
            "control_socket": policy.control.socket, "region_size": policy.region.size,
            "queued_writes_per_uid": policy.shares.queued_writes_per_uid}


def _as_written(value):
    return tuple(value) if isinstance(value, list) else value


def write_records(target: str) -> None:
    from .policy import builtin_names

    records = {name: record_of(os.path.join(builtin_dir(), f"{name}.toml")) for name in builtin_names()}
    lines = ["# ruff: noqa: E501",
             '"""The built-in policies as policy_facts.py reads them: written by `python -m shmguard.policy_facts`',
             'from policies/, never by hand (tests/test_lean.py fails when it is out of date)."""', "",
             "RECORDED = {"]
    for name, record in records.items():
        lines.append(f"    {name!r}: {{")
        for key, value in record.items():
            lines.append(f"        {key!r}: {value!r},")
        lines.append("    },")
    lines.append("}")
    with open(target, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    write_records(os.path.join(os.path.dirname(os.path.abspath(__file__)), "builtin_policies.py"))
