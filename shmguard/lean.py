"""The `shmguard` command's entry point: `write`, `ring`, `status` and `run` without click, everything else through it.

A script writes a message with a new process each time, so what a write imports is paid per message, and a boot
to ready waits for what `run` imports. For those four commands this module parses the arguments itself, for the
forms it knows exactly as click does (the table in tests/test_lean.py holds the two parsers to the same result).
The first three talk to the supervisor through control_client with policy_facts: C modules and small shmguard
ones, no click, json, socket or tomllib; `run` is shmguard/run_command.py. Anything else (--help, an unknown or
malformed option, a repeated --qemu-arg, any other command) goes to the click CLI (cli.py) unchanged, so help,
usage errors and their exit status are click's own. The checks are the same on both paths: who serves the
socket, the sizes (by the supervisor), the reply; a user-caused error is one line and a non-zero exit.
"""

from __future__ import annotations

import os
import sys

from .errors import ShmguardError

WRITE_VALUES = {"-m": "message", "--message": "message", "-f": "file_path", "--file": "file_path",
                "--offset": "offset", "--ring": "ring", "--timeout": "timeout", "--policy": "policy_name",
                "--control-socket": "control_path"}
WRITE_FLAGS = {"--stdin": "from_stdin", "--lines": "lines", "--no-wait": "no_wait",
               "--allow-unterminated": "allow_unterminated", "--json": "as_json"}
WRITE_DEFAULTS = {"message": None, "file_path": None, "from_stdin": False, "lines": False, "offset": 0, "ring": None,
                  "no_wait": False, "timeout": 60.0, "allow_unterminated": False, "policy_name": "strict",
                  "control_path": None, "as_json": False}
# `run`: every option but the repeatable --qemu-arg, which goes to click (this parser keeps the last of a repeat).
RUN_VALUES = {"--policy": "policy_name", "--size": "size", "--vectors": "vectors", "--socket": "socket_path",
              "--control-socket": "control_path", "--audit-log": "audit_log", "--guests": "guests",
              "--guest-kernel": "guest_kernel", "--guest-initrd": "guest_initrd", "--guest-append": "guest_append"}
RUN_FLAGS = {"--no-guest": "no_guest", "--fd-store": "fd_store", "-v": "verbose", "--verbose": "verbose"}
RUN_DEFAULTS = {"policy_name": "strict", "size": None, "vectors": None, "socket_path": None, "control_path": None,
                "audit_log": None, "no_guest": False, "guests": 1, "guest_kernel": None, "guest_initrd": None,
                "guest_append": "console=ttyS0", "qemu_args": (), "fd_store": False, "verbose": False}
CONTROL_VALUES = {"--policy": "policy_name", "--control-socket": "control_path"}
CONTROL_DEFAULTS = {"policy_name": "strict", "control_path": None}


def main(argv: list[str] | None = None) -> int | None:
    """`shmguard ARGS`: a lean command when ARGS is one this module parses whole, else the click CLI."""
    args = sys.argv[1:] if argv is None else argv
    lean = None if "_SHMGUARD_COMPLETE" in os.environ else parse(args)
    if lean is None:
        from .cli import main as click_main

        return click_main(args, prog_name="shmguard")
    command, params = lean
    try:
        return COMMANDS[command](**params)
    except ShmguardError as exc:
        return fail(str(exc), exc.exit_code)
    except OSError as exc:  # the last resort for a system error the library did not put into words
        where = f"{exc.filename}: " if exc.filename else ""
        return fail(f"{where}{exc.strerror or exc}", 1)
    except KeyboardInterrupt:
        return 130


def fail(message: str, status: int) -> int:
    sys.stderr.write(f"shmguard: error: {message}\n")
    return status


# --- parsing, as click does for the forms it accepts -----------------------------------------------------------


def parse(args: list[str]) -> tuple[str, dict] | None:
    """(command, its parameters as the click command receives them), or None for the click CLI to handle."""
    if not args:
        return None
    command, rest = args[0], args[1:]
    if command == "write":
        params = parse_options(rest, WRITE_VALUES, WRITE_FLAGS, WRITE_DEFAULTS, 0)
        return None if params is None or not _converted(params) else ("write", params)
    if command == "ring":
        params = parse_options(rest, CONTROL_VALUES, {}, CONTROL_DEFAULTS, 1)
        return None if params is None else ("ring", params)
    if command == "status":
        params = parse_options(rest, CONTROL_VALUES, {"--json": "as_json"}, {**CONTROL_DEFAULTS, "as_json": False}, 0)
        return None if params is None else ("status", params)
    if command == "run":
        params = parse_options(rest, RUN_VALUES, RUN_FLAGS, RUN_DEFAULTS, 0)
        return None if params is None or not _run_converted(params) else ("run", params)
    return None


def parse_options(args: list[str], values: dict, flags: dict, defaults: dict, positionals: int) -> dict | None:
    """Options as click's parser reads them: `--name VALUE`, `--name=VALUE`, `-xVALUE`, `-x VALUE` (a value is the
    next argument whatever it looks like), the last of a repeated option, `--` ending the options. None for
    anything else (help, an unknown option, a flag given a value, a missing value, the wrong number of arguments)."""
    params, given, index = dict(defaults), [], 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            given += args[index:]
            break
        if arg[:1] != "-" or arg == "-":
            given.append(arg)
            continue
        if arg.startswith("--"):
            name, equals, value = arg.partition("=")
            explicit = bool(equals)
        else:  # a short option, its value attached or next
            name, value = arg[:2], arg[2:]
            explicit = bool(value)
        if name in values:
            if not explicit:
                if index >= len(args):
                    return None
                value, index = args[index], index + 1
            params[values[name]] = value
        elif name in flags and not explicit:
            params[flags[name]] = True
        else:
            return None
    if len(given) != positionals:
        return None
    if positionals:
        params["target"] = given[0]
    return params


def _converted(params: dict) -> bool:
    """Convert --offset and --timeout as click's types do; False where click would refuse (it says why)."""
    try:
        params["offset"] = int(params["offset"])
        timeout = float(params["timeout"])
    except ValueError:
        return False
    if not 0 < timeout <= 3600:  # click.FloatRange(0, 3600, min_open=True); NaN goes to click as well
        return False
    params["timeout"] = timeout
    file_path = params["file_path"]
    return not (file_path and os.path.isdir(file_path))  # click.Path(dir_okay=False)


def _run_converted(params: dict) -> bool:
    """Convert and check `run`'s options as click's types do; False where click would refuse (it says why)."""
    from .layout import MAX_GUESTS

    try:
        if params["vectors"] is not None:
            params["vectors"] = int(params["vectors"])
        params["guests"] = int(params["guests"])
    except ValueError:
        return False
    if not 1 <= params["guests"] <= MAX_GUESTS:  # click.IntRange(1, MAX_GUESTS)
        return False
    # click.Path(exists=True, dir_okay=False): there, not a directory, readable
    return all(path is None or (os.path.exists(path) and not os.path.isdir(path) and os.access(path, os.R_OK))
               for path in (params["guest_kernel"], params["guest_initrd"]))


# --- the commands ----------------------------------------------------------------------------------------------


def control_client(policy_name: str, control_path: str | None, timeout: float | None = 30.0):
    """The supervisor's control client, talking only to a server the policy trusts (the policy is read even with
    --control-socket: it says who that is)."""
    from .control_client import ControlClient
    from .policy_facts import client_facts

    facts = client_facts(policy_name)
    return ControlClient(control_path or facts.control_socket, answerers=facts.answerers, timeout=timeout), facts


def write(message, file_path, from_stdin, lines, offset, ring, no_wait, timeout, allow_unterminated, policy_name,
          control_path, as_json) -> int:
    if timeout != timeout:  # click.FloatRange lets NaN through
        raise ShmguardError(f"--timeout {timeout}: give a number of seconds above 0 and at most 3600")
    if lines:
        message_bytes(message, file_path, from_stdin, lines)
        from .lines import write_lines

        client, facts = control_client(policy_name, control_path, timeout=timeout + 30)
        return write_lines(client, facts.region_size, sys.stdin.buffer, offset=offset, ring=ring,
                           wait=bool(ring) and not no_wait, timeout=timeout, allow_unterminated=allow_unterminated,
                           as_json=as_json)
    data = message_bytes(message, file_path, from_stdin, lines)
    client, _ = control_client(policy_name, control_path, timeout=timeout + 30)
    reply = client.write(data, offset, text=message is not None, ring=ring, wait=bool(ring) and not no_wait,
                         timeout=timeout, allow_unterminated=allow_unterminated)
    emit(reply, as_json, format_write(reply))
    return 0


def ring(target, policy_name, control_path) -> int:
    client, _ = control_client(policy_name, control_path)
    reply = client.ring(target)
    sys.stdout.write("".join(f"rang peer {rang['peer']} vector {rang['vector']}\n" for rang in reply["rang"]))
    return 0


def status(policy_name, control_path, as_json) -> int:
    from . import health

    client, _ = control_client(policy_name, control_path)
    reply = client.status()
    reply.pop("ok", None)
    problems = health.problems(reply)
    reply["health"] = {"healthy": not problems, "problems": problems}
    emit(reply, as_json, health.summary(reply) + "\n" + format_status(reply))
    return 1 if problems else 0


def run(**params) -> int:
    from .run_command import run as run_supervisor

    return run_supervisor(**params)


COMMANDS = {"write": write, "ring": ring, "status": status, "run": run}


def message_bytes(message, file_path, from_stdin, lines=False) -> bytes | None:
    """The bytes of -m, -f or --stdin (None for --lines, which reads them later); exactly one must be given."""
    chosen = [name for name, given in (("-m", message is not None), ("-f", file_path), ("--stdin", from_stdin),
                                       ("--lines", lines)) if given]
    if len(chosen) != 1:
        raise ShmguardError("give exactly one of -m TEXT, -f FILE, --stdin or --lines")
    if lines:
        return None
    if message is not None:
        return os.fsencode(message)  # the argument's bytes exactly, even when they are not UTF-8
    if from_stdin:
        return sys.stdin.buffer.read()
    try:
        with open(file_path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ShmguardError(f"{file_path}: cannot read: {exc.strerror}") from None


# --- output ----------------------------------------------------------------------------------------------------


def emit(data, as_json: bool, text: str) -> None:
    if as_json:
        import json

        text = json.dumps(data, indent=2, sort_keys=True)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def format_write(reply: dict) -> str:
    lines = [f"wrote {reply['length']} bytes at offset {reply['offset']} (audit seq {reply['seq']}, "
             f"sha256 {reply['sha256'][:16]}…)"]
    for ring in reply.get("rang", []):
        held = " (held until the guest was ready)" if ring["held_until_ready"] else ""
        lines.append(f"rang peer {ring['peer']} vector {ring['vector']}{held}")
    if "ack" in reply:
        exact = "exactly" if reply["delivered_exactly"] else "WITH A DIFFERENT CHECKSUM"
        lines.append(f"guest acknowledged in {reply['round_trip_ms']:.1f} ms, delivered {exact}: {reply['ack']}")
    return "\n".join(lines)


def format_status(data: dict) -> str:
    import json

    region = data["region"]
    lines = [f"policy {data['policy']}; region {region['backend']} {region['size']} bytes"
             + (f" at {region['path']}" if region.get("path") else "")
             + (f", seals {','.join(region['seals'])}" if region["seals"] else ", not sealed"),
             f"socket {data['socket']}; host peer {data['host_peer']}"]
    for peer in data["peers"]:
        who = "host (this supervisor)" if peer.get("local") else f"pid {peer['pid']} uid {peer['uid']} {peer['exe']}"
        lines.append(f"  peer {peer['id']}: {peer['vectors']} vectors, {who}")
    guest = data["guest"]
    if guest.get("guests"):
        for entry in guest["guests"]:
            lines.append(f"guest {entry['guest']}: peer {entry['peer']}, {entry['state']}, {entry['sent']} sent"
                         + (f", QEMU pid {entry['qemu_pid']}" if entry.get("qemu_pid") else ""))
        lines.append(f"messages between guests: up to {guest['guests'][0].get('text', '?')} bytes")
    else:
        lines.append(f"guest: peer {guest['peer']}, {'ready' if guest['ready'] else 'not ready'}, "
                     f"{guest['acks']} acks")
    if "guard" in data:
        lines.append(f"guard: {json.dumps(data['guard'], sort_keys=True)}")
    lines.append(f"audit: {data['audit']['path']}, last seq {data['audit']['last_seq']}")
    return "\n".join(lines)
