"""What a control client needs of a policy: its control socket, who may serve it, the region's size and how many
writes one uid may queue. Read without the TOML parser for an unchanged built-in policy, and for a policy file
this user has read before.

`shmguard write` is a new process per message, and importing tomllib and the policy module costs more than the
rest of the write. So:
- a built-in whose file is the text recorded in builtin_policies.py is read from the record: its user and group
  names are still looked up on this host, in load_policy's order, and a missing one is load_policy's one-line
  PolicyError;
- a policy file (one in /etc/shmguard, checked as load_policy checks it, or a path) whose text is the very text
  this user's FactsCache kept for that path, by this same parser, is read from that entry, the same way;
- anything else is loaded by policy.load_policy, exactly as everywhere else (and a policy file's facts are kept).
`python -m shmguard.policy_facts` writes builtin_policies.py again from policies/ (tests/test_lean.py says when).
"""

from __future__ import annotations

import grp
import os
import pwd

from .errors import PolicyError, ShmguardError

LOCAL_DIR = "/etc/shmguard"  # policy.LOCAL_DIR: NAME.toml there takes the place of the built-in NAME
PARSER_FILES = ("policy.py", "policy_facts.py", "limits.py", "values.py")  # what a FactsCache entry was made by
MAX_ENTRY_BYTES = 1 << 20  # a kept record longer than this is not one of ours
MAX_ENTRIES = 64  # policy files a user's FactsCache keeps, the most recently loaded
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
    located = _located_file(name_or_path)
    if located is None:
        return loaded_facts(name_or_path)  # a built-in whose file changed, or nothing there: load_policy says
    path, text = located
    cache = FactsCache.of_this_user()
    record = cache.record(path) if cache else None
    if record is not None and record["text"] == text:
        return facts_of_record(record, record["source"])
    from .policy import load_policy

    policy = load_policy(name_or_path)
    if (cache is not None and os.path.abspath(policy.source) == os.path.abspath(path)
            and _located_file(name_or_path) == located):  # the text load_policy read: the same before and after
        cache.keep(path, {**_record(text, policy), "source": policy.source})
    return _facts_of(policy)


def _located_file(name_or_path: str) -> tuple[str, str] | None:
    """(path, text) of a policy file that load_policy would read: /etc/shmguard/NAME.toml (checked as load_policy
    checks it) or a path given; None for anything else, which load_policy then reads or refuses itself."""
    if "/" not in name_or_path and not name_or_path.endswith(".toml"):
        path = local_policy(name_or_path, LOCAL_DIR)
        if path is None:
            return None
    elif os.path.isfile(name_or_path):
        path = name_or_path
    else:
        return None
    try:
        with open(path, "rb") as f:
            return path, f.read().decode()
    except (OSError, UnicodeDecodeError):
        return None  # load_policy's own error line


def local_policy(name: str, local_dir: str) -> str | None:
    """local_dir/NAME.toml if it is there, checked (trusted_local): it takes the built-in NAME's place; else None."""
    path = os.path.join(local_dir, f"{name}.toml")
    return trusted_local(path) if os.path.lexists(path) else None


def trusted_local(path: str) -> str:
    """/etc/shmguard/NAME.toml replaces a built-in by name alone, so it must be root's and writable by nobody else
    (nor any directory on the way to it): one that someone else could have planted is refused, never read."""
    import stat

    from .paths import check_directory_chain, file_kind

    try:
        check_directory_chain(os.path.dirname(path), {0})
    except ShmguardError as exc:
        raise PolicyError(str(exc)) from None
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise PolicyError(f"{path}: refusing a policy that is not a regular file owned by root and writable by "
                          f"root alone (it is {file_kind(st.st_mode)}, uid {st.st_uid}, mode "
                          f"0{stat.S_IMODE(st.st_mode):o}): fix it with chown root: and chmod go-w")
    return path


class FactsCache:
    """What load_policy made of a policy file, kept per user so that a client need not import the policy module
    (30-40 ms) for a file it has read before. An entry is the record builtin_policies.py keeps of a built-in: it is
    used only for the very same text at the very same path, its names are looked up again each time, and it is
    trusted only where only this user (or root) can have written it: a directory chain make_directory accepts for
    this uid, and a file of this uid that nobody else may write. The parser's own files (PARSER_FILES: device,
    inode, size, time) are its key: another parser, an upgrade say, reads every file afresh."""

    def __init__(self, directory: str, key: str):
        self.directory, self.key, self.uid = directory, key, os.geteuid()

    @classmethod
    def of_this_user(cls) -> FactsCache | None:
        try:
            home = os.environ.get("XDG_CACHE_HOME") or os.path.join(pwd.getpwuid(os.geteuid()).pw_dir, ".cache")
            here = os.path.dirname(os.path.abspath(__file__))
            parser = [os.stat(os.path.join(here, name)) for name in PARSER_FILES]
        except (KeyError, OSError):
            return None
        key = " ".join(f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}" for st in parser)
        return cls(os.path.join(home, "shmguard", "policy-facts"), key)

    def _file(self, path: str) -> str | None:
        """The entry's file: the absolute path itself as one name (no hash module to import), if it fits one."""
        name = os.path.abspath(path).replace("%", "%25").replace("/", "%2F") + ".json"
        return os.path.join(self.directory, name) if len(name.encode()) <= 255 else None

    def record(self, path: str) -> dict | None:
        """The record kept for path, if there is a trustworthy one made by this parser; else None."""
        from .control_client import decode_reply
        from .paths import check_directory_chain, file_problem

        file = self._file(path)
        if file is None:
            return None
        try:
            check_directory_chain(self.directory, {self.uid})
            fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (OSError, ShmguardError):
            return None
        try:
            if file_problem(os.fstat(fd), frozenset({self.uid})) is not None:
                return None
            with os.fdopen(fd, "rb", closefd=False) as f:
                kept = decode_reply(f.read(MAX_ENTRY_BYTES), file)
            record = kept["record"]
            if kept["key"] != self.key or kept["path"] != os.path.abspath(path) or not _well_formed(record):
                return None
            record["identities"] = {(section, key): tuple(value) if isinstance(value, list) else value
                                    for section, key, value in record["identities"]}
            return record
        except (OSError, ShmguardError, KeyError, TypeError, ValueError):
            return None  # unreadable or not ours in shape: load it afresh, and write it again
        finally:
            os.close(fd)

    def keep(self, path: str, record: dict) -> None:
        """Write the record for next time; a cache that cannot be written is no cache, never an error."""
        import json
        import time

        from .paths import make_directory

        file = self._file(path)
        if file is None:
            return
        identities = [[section, key, value] for (section, key), value in record["identities"].items()]
        entry = {"key": self.key, "path": os.path.abspath(path), "record": {**record, "identities": identities}}
        temporary = os.path.join(self.directory, f".{os.getpid()}.{time.monotonic_ns()}.tmp")  # the directory is ours
        try:
            make_directory(self.directory, 0o700, {self.uid})
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(entry).encode())
            os.rename(temporary, file)
            self._forget_oldest()
        except (OSError, ShmguardError):
            try:
                os.unlink(temporary)
            except OSError:
                pass

    def _forget_oldest(self) -> None:
        """At most MAX_ENTRIES: one per policy file read, so a user who reads many (a test suite) keeps the newest."""
        names = os.listdir(self.directory)
        if len(names) <= MAX_ENTRIES:
            return
        aged = sorted((os.lstat(os.path.join(self.directory, name)).st_mtime_ns, name) for name in names)
        for _, name in aged[:len(names) - MAX_ENTRIES]:
            os.unlink(os.path.join(self.directory, name))


def _well_formed(record) -> bool:
    """A kept record has the shape _record gives it (JSON has lists for its tuples)."""
    return (isinstance(record, dict) and all(isinstance(record.get(name), str) for name in _TEXT_FIELDS)
            and all(type(record.get(name)) is int for name in ("region_size", "queued_writes_per_uid"))
            and isinstance(record.get("identities"), list)
            and all(isinstance(entry, list) and len(entry) == 3 and (entry[0], entry[1]) in _IDENTITY_NAMES
                    and (type(entry[2]) in (str, int) or isinstance(entry[2], list)
                         and all(isinstance(item, str) for item in entry[2]))
                    for entry in record["identities"]))


_TEXT_FIELDS = ("text", "source", "hardening_user", "control_socket")
_IDENTITY_NAMES = frozenset((section, key) for section, key, _ in IDENTITY_KEYS)


def loaded_facts(name_or_path: str) -> ClientFacts:
    """The facts as policy.load_policy reads them."""
    from .policy import load_policy

    return _facts_of(load_policy(name_or_path))


def _facts_of(policy) -> ClientFacts:
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
    from .policy import load_policy

    with open(path, "rb") as f:
        text = f.read().decode()
    return _record(text, load_policy(path))


def _record(text: str, policy) -> dict:
    """The record of a policy's text and of what load_policy made of it (FactsCache keeps the same)."""
    import tomllib

    data = tomllib.loads(text)
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
