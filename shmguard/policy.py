"""Policy: what the region, the sockets, the guard and the supervisor must look like.

Policies are TOML files: the built-in ones live in policies/ (installed as shmguard.policies), a local one in
/etc/shmguard/NAME.toml takes a built-in's place, and a user's can be any path.
Every error names the file, the key and the reason, so `shmguard policy check` can print them all.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from dataclasses import field
from pathlib import Path

from .errors import PolicyError
from .limits import MAX_VECTORS, MIN_SIZE, PEER_IDS
from .policy_facts import builtin_dir, local_policy, resolve_gid, resolve_uid
from .values import Value, value

# policies/ at the top of the repository, installed as shmguard.policies (a directory, never a zip). Its __file__,
# not importlib.resources, which costs a command that reads a policy more to import than the policy module itself.
BUILTIN_DIR = Path(builtin_dir())
LOCAL_DIR = Path("/etc/shmguard")  # NAME.toml here takes the place of the built-in NAME
RESPONSES = ("block", "repair", "alert")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _bytes(value: str | int, what: str, examples: str) -> int:
    """4096, "4K", "16M", "1G": a whole number of bytes with an optional binary unit."""
    if isinstance(value, bool):
        raise ValueError(f"{what}{value!r} is not a number")
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", str(value), re.IGNORECASE)
    if not match:
        raise ValueError(f"{what}{value!r} is not a number of bytes (examples: {examples})")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def parse_size(text: str | int, maximum: int | None = None) -> int:
    """Parse 4096, 4K, 4M, 1G; the result must be a power of two of at least MIN_SIZE bytes (QEMU aborts otherwise)."""
    value = _bytes(text, "size ", "4096, 4K, 4M, 1G")
    if value < MIN_SIZE:
        raise ValueError(f"size {text!r} is below the minimum of {MIN_SIZE} bytes")
    if value & (value - 1):
        raise ValueError(f"size {text!r} ({value} bytes) is not a power of two, which QEMU requires")
    if maximum is not None and value > maximum:
        raise ValueError(f"size {text!r} ({value} bytes) exceeds the policy maximum of {maximum} bytes")
    return value


def parse_mode(text: str | int) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        if text & ~0o777:  # `mode = 660` in TOML is decimal 660, which is 0o1224
            raise ValueError(f"mode {text} is a decimal number ({text:#o} in octal); write \"0{text}\" or 0o{text}")
        value = text
    elif isinstance(text, str) and re.fullmatch(r"0?o?[0-7]{3,4}", text):
        value = int(text.lstrip("0o") or "0", 8)
    else:
        raise ValueError(f"mode {text!r} is not an octal mode such as \"0660\"")
    if value & ~0o777:
        raise ValueError(f"mode {text!r} may not set setuid, setgid or sticky bits")
    return value


@value
class Access(Value):
    """Who may do something: uids, or processes holding one of the groups (primary or supplementary).
    '*' admits anyone."""

    uids: tuple[int, ...] = ()
    gids: tuple[int, ...] = ()
    anyone: bool = False

    def admits(self, uid: int, gid: int, groups: tuple[int, ...] = ()) -> bool:
        """groups: the process's own supplementary groups (SO_PEERGROUPS), not the group database's idea."""
        if self.anyone or uid in self.uids or gid in self.gids:
            return True
        return not set(groups).isdisjoint(self.gids)

    def describe(self) -> dict:
        if self.anyone:
            return {"anyone": True}
        return {"uids": list(self.uids), "gids": list(self.gids)}


@value
class RegionPolicy(Value):
    backend: str = "memfd"
    path: str = "/dev/shm/ivshmem"
    size: int = 4 << 20
    max_size: int = 1 << 30
    owner: int = 0
    group: int = 0
    mode: int = 0o660
    mlock: bool = True


@value
class ServerPolicy(Value):
    socket: str = "/run/shmguard/ivshmem.sock"
    owner: int = 0
    group: int = 0
    mode: int = 0o660
    vectors: int = 2
    max_peers: int = 64
    max_queue: int = 8192  # queued messages per peer before it is disconnected
    peers: Access = field(default_factory=Access)


@value
class ControlPolicy(Value):
    socket: str = "/run/shmguard/control.sock"
    mode: int = 0o660
    writers: Access = field(default_factory=Access)
    ringers: Access = field(default_factory=Access)
    readers: Access = field(default_factory=Access)
    idle_seconds: int = 60  # a connection that sends nothing this long is closed: idle ones would lock others out


@value
class SharesPolicy(Value):
    """Every resource the supervisor holds for others: at most a total, at most a share per uid, and the last
    `*_reserved` of each only for the `reserved_for` users (root, and QEMU's user where it is not root)."""

    reserved_for: tuple[int, ...] = (0,)
    peers_per_uid: int = 16  # peer slots (of server.max_peers) one uid may hold
    peers_reserved: int = 8
    ids_per_uid: int = 4096  # peer ids one uid keeps out of use: its peers, and its departed ids still remembered
    ids_reserved: int = 1024
    connections: int = 64  # control connections
    connections_per_uid: int = 8
    connections_reserved: int = 8
    buffer_bytes: int = 64 << 20  # request and reply bytes held for control clients
    buffer_bytes_per_uid: int = 16 << 20
    queued_writes: int = 32  # writes waiting behind the one whose acknowledgement is awaited
    queued_writes_per_uid: int = 4
    request_seconds: int = 10  # a request must arrive whole, and a reply be read, within this
    wait_seconds: int = 60  # the longest a write may hold the one in-flight slot waiting for its acknowledgement


@value
class GuardPolicy(Value):
    on_resize: str = "block"
    on_attributes: str = "repair"
    on_unlink: str = "repair"
    on_socket: str = "repair"
    scan_ms: int = 100  # how often the region's allocation is looked at: some tampers make no event at all


@value
class AuditPolicy(Value):
    path: str = "/var/log/shmguard/audit.log"
    durable: bool = True


@value
class HardeningPolicy(Value):
    required: bool = True
    no_new_privs: bool = True
    dumpable: bool = False
    capabilities: tuple[str, ...] = ()
    user: str = ""
    group: str = ""


@value
class QemuPolicy(Value):
    on_exit: str = "stay"  # "stay": keep serving peers; "exit": stop the supervisor
    memory: str = "256M"


@value
class Policy(Value):
    name: str
    source: str
    region: RegionPolicy
    server: ServerPolicy
    control: ControlPolicy
    guard: GuardPolicy
    audit: AuditPolicy
    hardening: HardeningPolicy
    qemu: QemuPolicy
    shares: SharesPolicy = field(default_factory=SharesPolicy)

    def with_overrides(self, *, size=None, vectors=None, socket=None, control_socket=None, audit_log=None) -> Policy:
        """Apply command-line overrides; each is validated like the policy file itself."""
        region, server, control, audit = self.region, self.server, self.control, self.audit
        if size is not None:
            region = dataclasses.replace(region, size=_option("--size", parse_size, size, region.max_size))
        if vectors is not None:
            server = dataclasses.replace(server, vectors=_option("--vectors", _check_vectors, vectors))
        if socket is not None:
            server = dataclasses.replace(server, socket=str(socket))
        if control_socket is not None:
            control = dataclasses.replace(control, socket=str(control_socket))
        if audit_log is not None:
            audit = dataclasses.replace(audit, path=str(audit_log))
        return dataclasses.replace(self, region=region, server=server, control=control, audit=audit)

    def describe(self) -> dict:
        """The effective policy as plain data, for `policy show`."""
        def plain(value):
            if isinstance(value, Access):
                return value.describe()
            if dataclasses.is_dataclass(value):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, tuple):
                return list(value)
            return value

        data = plain(self)
        for section, key in (("region", "mode"), ("server", "mode"), ("control", "mode")):
            data[section][key] = f"0{data[section][key]:o}"
        return data


def _option(name: str, convert, *args):
    """Convert a command-line value; a bad one is one PolicyError line naming the option, not a traceback."""
    try:
        return convert(*args)
    except ValueError as exc:
        raise PolicyError(f"{name}: {exc}") from None


def _check_vectors(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VECTORS:
        raise ValueError(f"vectors {value!r} must be a whole number from 1 to {MAX_VECTORS}")
    return value


class _Reader:
    """Reads one TOML table, converting values and collecting every error with its key."""

    def __init__(self, source: str, data: dict, errors: list[str]):
        self.source, self.data, self.errors = source, data, errors

    def section(self, name: str) -> _Section:
        table = self.data.get(name, {})
        if not isinstance(table, dict):
            self.errors.append(f"{self.source}: [{name}]: must be a table")
            table = {}
        return _Section(self, name, table)

    def check_unknown(self, known: set[str]) -> None:
        for key in self.data:
            if key not in known and key != "description":
                self.errors.append(f"{self.source}: [{key}]: unknown section (known: {', '.join(sorted(known))})")


class _Section:
    def __init__(self, reader: _Reader, name: str, table: dict):
        self.reader, self.name, self.table, self.used = reader, name, table, set()

    def get(self, key: str, default, convert=None):
        self.used.add(key)
        if key not in self.table:
            return default
        value = self.table[key]
        try:
            if convert is not None:
                return convert(value)
            if type(value) is not type(default):
                raise ValueError(f"expected {type(default).__name__}, got {value!r}")
            return value
        except ValueError as exc:
            self.reader.errors.append(f"{self.reader.source}: {self.name}.{key}: {exc}")
            return default

    def done(self) -> None:
        for key in self.table:
            if key not in self.used:
                known = ", ".join(sorted(self.used))
                self.reader.errors.append(f"{self.reader.source}: {self.name}.{key}: unknown key (known: {known})")


def _choice(*allowed):
    def convert(value):
        if value not in allowed:
            raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
        return value

    return convert


def _access(value) -> Access:
    if not isinstance(value, list):
        raise ValueError("must be a list of users (\"root\", 0), \"@group\" entries, or \"*\"")
    uids, gids, anyone = [], [], False
    for item in value:
        if item == "*":
            anyone = True
        elif isinstance(item, str) and item.startswith("@"):
            gids.append(resolve_gid(item[1:]))
        elif isinstance(item, (str, int)) and not isinstance(item, bool):
            uids.append(resolve_uid(item))
        else:
            raise ValueError(f"entry {item!r} is not a user, \"@group\" or \"*\"")
    return Access(tuple(uids), tuple(gids), anyone)


def _identity(kind):
    def convert(value):
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(f"expected a {kind} name or number, got {value!r}")
        return resolve_uid(value) if kind == "user" else resolve_gid(value)

    return convert


def _string_list(value) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of strings")
    return tuple(value)


def parse_policy(text: str, source: str, name: str) -> tuple[Policy | None, list[str]]:
    """Parse policy TOML; returns the policy (None if invalid) and every error found."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return None, [f"{source}: not valid TOML: {exc}"]
    errors: list[str] = []
    reader = _Reader(source, data, errors)
    reader.check_unknown({"region", "server", "control", "guard", "audit", "hardening", "qemu", "shares"})
    user, group = _identity("user"), _identity("group")

    s = reader.section("region")
    max_size = s.get("max_size", 1 << 30, lambda v: parse_size(v))
    region = RegionPolicy(
        backend=s.get("backend", "memfd", _choice("memfd", "file")),
        path=s.get("path", "/dev/shm/ivshmem"),
        size=s.get("size", 4 << 20, lambda v: parse_size(v, max_size)),
        max_size=max_size,
        owner=s.get("owner", 0, user),
        group=s.get("group", 0, group),
        mode=s.get("mode", 0o660, parse_mode),
        mlock=s.get("mlock", True),
    )
    s.done()
    if region.backend == "file" and not region.path.startswith("/"):
        errors.append(f"{source}: region.path: {region.path!r} must be an absolute path")

    s = reader.section("server")
    server = ServerPolicy(
        socket=s.get("socket", "/run/shmguard/ivshmem.sock"),
        owner=s.get("owner", 0, user),
        group=s.get("group", 0, group),
        mode=s.get("mode", 0o660, parse_mode),
        vectors=s.get("vectors", 2, _check_vectors),
        max_peers=s.get("max_peers", 64, _positive("max_peers", PEER_IDS)),
        max_queue=s.get("max_queue", 8192, _positive("max_queue", 1 << 20)),
        peers=s.get("peers", Access(), _access),
    )
    s.done()
    largest_greeting = 3 + server.vectors * (server.max_peers + 1)  # the host's own peer counts too
    if server.max_queue < largest_greeting:
        errors.append(f"{source}: server.max_queue: {server.max_queue} is smaller than the largest greeting "
                      f"(3 + vectors x (max_peers + 1) = {largest_greeting} messages); raise it or lower max_peers")

    s = reader.section("control")
    control = ControlPolicy(
        socket=s.get("socket", "/run/shmguard/control.sock"),
        mode=s.get("mode", 0o660, parse_mode),
        writers=s.get("writers", Access(), _access),
        ringers=s.get("ringers", Access(), _access),
        readers=s.get("readers", Access(), _access),
        idle_seconds=s.get("idle_seconds", 60, _positive("idle_seconds", 86400)),
    )
    s.done()

    s = reader.section("guard")
    response = _choice(*RESPONSES)
    guard = GuardPolicy(
        on_resize=s.get("on_resize", "block", response),
        on_attributes=s.get("on_attributes", "repair", response),
        on_unlink=s.get("on_unlink", "repair", response),
        on_socket=s.get("on_socket", "repair", response),
        scan_ms=s.get("scan_ms", 100, _positive("scan_ms", 60000)),
    )
    s.done()
    if guard.on_resize == "block" and region.backend != "memfd":
        errors.append(f"{source}: guard.on_resize: \"block\" needs region.backend = \"memfd\" "
                      "(a file in /dev/shm cannot be sealed); use \"repair\"")

    s = reader.section("audit")
    audit = AuditPolicy(path=s.get("path", "/var/log/shmguard/audit.log"), durable=s.get("durable", True))
    s.done()

    s = reader.section("hardening")
    hardening = HardeningPolicy(
        required=s.get("required", True),
        no_new_privs=s.get("no_new_privs", True),
        dumpable=s.get("dumpable", False),
        capabilities=s.get("capabilities", (), _string_list),
        user=s.get("user", ""),
        group=s.get("group", ""),
    )
    s.done()

    s = reader.section("qemu")
    qemu = QemuPolicy(on_exit=s.get("on_exit", "stay", _choice("stay", "exit")), memory=s.get("memory", "256M"))
    s.done()

    shares = _read_shares(reader.section("shares"), server, source, errors)

    if errors:
        return None, errors
    return Policy(name, source, region, server, control, guard, audit, hardening, qemu, shares), []


def _read_shares(s: _Section, server: ServerPolicy, source: str, errors: list[str]) -> SharesPolicy:
    """[shares]: every default is SharesPolicy's; each reserve must leave room for everyone else."""
    default = SharesPolicy()
    count = _positive("a count", 1 << 20)
    size = lambda v: _byte_count(v, 1 << 40)  # noqa: E731
    values = {name: s.get(name, getattr(default, name), convert) for name, convert in (
        ("reserved_for", _users), ("peers_per_uid", count), ("peers_reserved", _count_or_zero),
        ("ids_per_uid", _positive("ids_per_uid", PEER_IDS)), ("ids_reserved", _count_or_zero),
        ("connections", count), ("connections_per_uid", count), ("connections_reserved", _count_or_zero),
        ("buffer_bytes", size), ("buffer_bytes_per_uid", size), ("queued_writes", count),
        ("queued_writes_per_uid", count), ("request_seconds", _positive("request_seconds", 3600)),
        ("wait_seconds", _positive("wait_seconds", 3600)))}
    s.done()
    shares = SharesPolicy(**values)
    for reserved, total, total_key in (("peers_reserved", server.max_peers, "server.max_peers"),
                                       ("ids_reserved", PEER_IDS, f"the {PEER_IDS} peer ids"),
                                       ("connections_reserved", shares.connections, "shares.connections")):
        if getattr(shares, reserved) >= total:
            errors.append(f"{source}: shares.{reserved}: {getattr(shares, reserved)} leaves nothing of {total_key} "
                          f"({total}) for anyone but shares.reserved_for; lower it")
    for part, whole in (("buffer_bytes_per_uid", "buffer_bytes"), ("queued_writes_per_uid", "queued_writes"),
                        ("connections_per_uid", "connections")):
        if getattr(shares, part) > getattr(shares, whole):
            errors.append(f"{source}: shares.{part}: {getattr(shares, part)} is more than shares.{whole} "
                          f"({getattr(shares, whole)})")
    return shares


def _count_or_zero(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1 << 20:
        raise ValueError(f"must be a whole number from 0 to {1 << 20}")
    return value


def _byte_count(value, limit: int) -> int:
    """A number of bytes: 65536, "64K", "16M" (any whole number, not only powers of two)."""
    number = _bytes(value, "", "65536, 64K, 16M")
    if not 1 <= number <= limit:
        raise ValueError(f"{value!r} must be from 1 byte to {limit} bytes")
    return number


def _users(value) -> tuple[int, ...]:
    """Users only (names or uids): a reserve open to a group would be open to every member."""
    if not isinstance(value, list):
        raise ValueError("must be a list of users (\"root\", \"libvirt-qemu\", 0)")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (str, int)) or (isinstance(item, str) and (
                item.startswith("@") or item == "*")):
            raise ValueError(f"entry {item!r} is not a user (a reserve cannot be given to a group or to everyone)")
    return tuple(dict.fromkeys(resolve_uid(item) for item in value))


def _positive(key: str, limit: int):
    def convert(value):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"must be a whole number from 1 to {limit}")
        return value

    return convert


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def locate(name_or_path: str) -> Path:
    """A policy name (/etc/shmguard/NAME.toml first, then the built-in NAME) or a path to a TOML file."""
    if "/" not in name_or_path and not name_or_path.endswith(".toml"):
        local = local_policy(name_or_path, str(LOCAL_DIR))
        if local is not None:
            return Path(local)
        path = BUILTIN_DIR / f"{name_or_path}.toml"
        if path.is_file():
            return path
        raise PolicyError(f"no built-in policy {name_or_path!r} and no {LOCAL_DIR}/{name_or_path}.toml (built-in: "
                          f"{', '.join(builtin_names())}; or give a path to a .toml file)")
    path = Path(name_or_path)
    if not path.is_file():
        raise PolicyError(f"{name_or_path}: policy file not found")
    return path


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode()
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path}: not a TOML policy: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy: {exc.strerror}") from None


def check_policy(name_or_path: str) -> list[str]:
    """Every error in a policy, empty if it is valid."""
    path = locate(name_or_path)
    return parse_policy(_read(path), str(path), path.stem)[1]


def load_policy(name_or_path: str) -> Policy:
    path = locate(name_or_path)
    policy, errors = parse_policy(_read(path), str(path), path.stem)
    if errors:
        more = f" (and {len(errors) - 1} more; run `shmguard policy check {path}`)" if len(errors) > 1 else ""
        raise PolicyError(errors[0] + more)
    return policy


def policy_toml(data: dict) -> str:
    """TOML text for a policy's data: top-level keys, then one [table] per section, each followed by a blank line.

    Values are booleans, numbers, strings and lists of them, all a policy holds."""
    scalars = "".join(f"{key} = {_toml_value(value)}\n" for key, value in data.items() if not isinstance(value, dict))
    tables = "".join(f"[{name}]\n" + "".join(f"{key} = {_toml_value(value)}\n" for key, value in table.items()) + "\n"
                     for name, table in data.items() if isinstance(table, dict))
    return scalars + ("\n" if scalars and tables else "") + tables


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise TypeError(f"{value!r} has no TOML form in a policy")


def relocated_policy_text(source: str, *, socket_dir: Path, audit_log: Path, region_path: str | None = None,
                          durable: bool = False, **sections: dict) -> str:
    """A policy (built-in name or file) as TOML with its sockets, audit log and region file moved, sections merged
    over it; for tests, benchmarks and throwaway supervisors.

    The sockets become socket_dir/ivshmem.sock and socket_dir/control.sock; the audit log is audit_log, durable
    only if asked (a throwaway log needs no fsync); a file-backed region moves to region_path when one is given (a
    memfd has no path). Each keyword then updates its section, so it can override any of these."""
    path = locate(source)
    try:
        data = tomllib.loads(_read(path))
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML: {exc}") from None
    data.pop("description", None)
    data.setdefault("server", {})["socket"] = str(Path(socket_dir) / "ivshmem.sock")
    data.setdefault("control", {})["socket"] = str(Path(socket_dir) / "control.sock")
    data.setdefault("audit", {}).update(path=str(audit_log), durable=durable)
    region = data.setdefault("region", {})
    if region_path is not None and region.get("backend", "memfd") == "file":
        region["path"] = region_path
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return policy_toml(data)
