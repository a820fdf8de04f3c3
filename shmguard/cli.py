"""The `shmguard` command: parses, calls the library, prints text or --json. Nothing else lives here."""

from __future__ import annotations

import functools
import json
import sys

import click

from . import lean
from .errors import ShmguardError
from .layout import MAX_GUESTS
from .limits import MAX_PEER_ID, MAX_VECTORS, MIN_SIZE
from .policy import builtin_names, check_policy, load_policy

WAIT_TIMEOUT, WAIT_ERROR = 124, 125  # as timeout(1) uses them
POLICY_HELP = f"Built-in policy ({', '.join(builtin_names())}) or path to a policy TOML file."


def user_errors(func=None, *, exit_code: int | None = None):
    """Errors a user can cause end in one line on stderr and a non-zero exit, never a traceback.
    exit_code replaces the error's own, for a command whose exit status means something else."""
    if func is None:
        return functools.partial(user_errors, exit_code=exit_code)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ShmguardError as exc:
            click.echo(f"shmguard: error: {exc}", err=True)
            sys.exit(exit_code or exc.exit_code)
        except OSError as exc:  # the last resort for a system error the library did not put into words
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"shmguard: error: {where}{exc.strerror or exc}", err=True)
            sys.exit(exit_code or 1)
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper


def emit(data, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text)


def policy_option(func):
    return click.option("--policy", "policy_name", default="strict", show_default=True, help=POLICY_HELP)(func)


def socket_option(func):
    return click.option("--socket", "socket_path", help="ivshmem socket path (default: the policy's).")(func)


def resolve_socket(policy_name: str, socket_path: str | None) -> str:
    return socket_path or load_policy(policy_name).server.socket


def _print_version(ctx: click.Context, _param, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        from .version import version_text

        click.echo(version_text())
        ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version (with the commit, run from a checkout) and exit.")
def main() -> None:
    """shmguard: a production supervisor for QEMU inter-VM shared memory (ivshmem).

    It owns the region (by default a sealed memfd that nobody can resize; a /dev/shm path is guarded and
    repaired), serves it to QEMU over an authenticated ivshmem socket, and writes only audited,
    size-respecting messages.
    """


# --- run ------------------------------------------------------------------------------------------------


@main.command()
@policy_option
@click.option("--size", help=f"Region size: a power of two >= {MIN_SIZE} (4096, 4K, 4M, 1G).")
@click.option("--vectors", type=int, help=f"Interrupt vectors per peer (1..{MAX_VECTORS}).")
@socket_option
@click.option("--control-socket", "control_path", help="Control socket path (default: the policy's).")
@click.option("--audit-log", help="Audit log path (default: the policy's).")
@click.option("--no-guest", is_flag=True, help="Serve peers only; boot no guest.")
@click.option("--guests", type=click.IntRange(1, MAX_GUESTS), default=1, show_default=True,
              help="Built-in guests to boot; with 2 or more each gets a slot and they send to each other "
              "(`shmguard send`).")
@click.option("--guest-kernel", type=click.Path(exists=True, dir_okay=False), help="Boot this kernel instead of "
              "the built-in guest (e.g. a Zephyr build); it gets no ready/ack handshake.")
@click.option("--guest-initrd", type=click.Path(exists=True, dir_okay=False), help="Initrd for --guest-kernel.")
@click.option("--guest-append", default="console=ttyS0", show_default=True, help="Kernel command line for "
              "--guest-kernel.")
@click.option("--qemu-arg", "qemu_args", multiple=True, help="Extra QEMU argument (repeatable).")
@click.option("--fd-store", is_flag=True, help="Keep the region, sockets, peers and state in systemd's fd store "
              "(the unit needs FileDescriptorStoreMax=): a process restarted after a crash goes on serving the same "
              "peers. The shipped units set it.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
@user_errors
def run(policy_name, size, vectors, socket_path, control_path, audit_log, no_guest, guests, guest_kernel,
        guest_initrd, guest_append, qemu_args, fd_store, verbose):
    """Run the supervisor in the foreground, logging to stderr, until SIGTERM or SIGINT.

    By default it also boots the built-in guest under QEMU (KVM once it has proved it can boot, TCG
    otherwise), streams the guest's console into the log and reports when the guest is ready.
    SIGHUP (or `shmguard reload`) hands everything over to the installed shmguard in place: peers see nothing.
    """
    from .run_command import run as run_supervisor  # `shmguard run` as lean.py runs it, without click

    sys.exit(run_supervisor(policy_name, size, vectors, socket_path, control_path, audit_log, no_guest, guests,
                            guest_kernel, guest_initrd, guest_append, qemu_args, fd_store, verbose))


# --- policy ---------------------------------------------------------------------------------------------


@main.group()
def policy() -> None:
    """Show or check policies."""


@policy.command("show")
@click.argument("name", default="strict")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@user_errors
def policy_show(name, as_json):
    """Print the effective policy NAME (built-in name or path)."""
    data = load_policy(name).describe()
    emit(data, as_json, _format_policy(data))


def _format_policy(data: dict) -> str:
    lines = [f"policy {data['name']} ({data['source']})"]
    for section, values in data.items():
        if isinstance(values, dict):
            lines.append(f"[{section}]")
            lines.extend(f"  {key} = {value}" for key, value in values.items())
    return "\n".join(lines)


@policy.command("check")
@click.argument("path")
@click.option("--unit", help="Also check that this unit (shmguard.service, shmguard@NAME.service) can serve it: "
              "its user, its writable directories, no capabilities.")
@user_errors
def policy_check(path, unit):
    """Check a policy file; print every error with file, key and reason."""
    errors = check_policy(path)
    if unit and not errors:
        from .units import in_sandbox_writable, unit_dirs, unit_problems

        try:
            unit_dirs(unit)
        except ValueError as exc:
            raise ShmguardError(f"--unit: {exc}") from None
        errors = unit_problems(load_policy(path), unit, in_sandbox_writable)
    for error in errors:
        click.echo(error, err=True)
    if errors:
        sys.exit(2)
    click.echo(f"{path}: OK" + (f" for {unit}" if unit else ""))


# --- peers and doorbells --------------------------------------------------------------------------------


def join_options(func):
    """How a command joins as a peer: the server's vector count (checked if given) and a time limit."""
    func = click.option("--vectors", "expected_vectors", type=click.IntRange(1, MAX_VECTORS),
                        help="Vectors the server must give each peer (refuse more or fewer).")(func)
    return click.option("--join-timeout", default=5.0, show_default=True,
                        help="Seconds for the whole greeting.")(func)


def _connected_client(policy_name, socket_path, expected_vectors=None, join_timeout=5.0):
    """Joined as a peer, once the server proved to be one the policy trusts (the policy is loaded even with
    --socket: it says who that is)."""
    from .client import IvshmemClient, answering_uids

    policy = load_policy(policy_name)
    return IvshmemClient(socket_path or policy.server.socket, vectors=expected_vectors, timeout=join_timeout,
                         answerers=answering_uids(policy)).connect()


@main.command()
@policy_option
@socket_option
@join_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@user_errors
def peers(policy_name, socket_path, expected_vectors, join_timeout, as_json):
    """List the peers connected to an ivshmem server (joins briefly as a peer to see them)."""
    with _connected_client(policy_name, socket_path, expected_vectors, join_timeout) as client:
        data = client.describe()
    lines = [f"own id {data['own_id']} (this query), {data['own_vectors']} vectors, shm {data['shm_size']} bytes"]
    lines += [f"peer {peer_id}: {count} vectors" for peer_id, count in data["peers"].items()]
    emit(data, as_json, "\n".join(lines))


def parse_vector(text: str) -> int | None:
    if text == "all":
        return None
    if not (text.isascii() and text.isdigit()):
        raise ShmguardError(f"vector {text!r} must be a number or 'all'")
    return int(text)


@main.command()
@click.argument("peer", type=int)
@click.argument("vector")
@policy_option
@socket_option
@join_options
@user_errors
def notify(peer, vector, policy_name, socket_path, expected_vectors, join_timeout):
    """Ring PEER on VECTOR (a number or 'all')."""
    target = parse_vector(vector)
    with _connected_client(policy_name, socket_path, expected_vectors, join_timeout) as client:
        count = client.notify(peer, target)
    click.echo(f"rang peer {peer} on {count} vector{'s' if count != 1 else ''}")


@main.command()
@click.option("--vector", "vectors", type=int, multiple=True, help="Only these vectors (repeatable).")
@click.option("--timeout", type=float, help="Give up after this many seconds (exit 124).")
@policy_option
@socket_option
@join_options
@user_errors(exit_code=WAIT_ERROR)  # not 1, which would read as "rung on vector 1"
def wait(vectors, timeout, policy_name, socket_path, expected_vectors, join_timeout):
    """Join as a peer and wait until rung; print the vector.

    The exit status says what happened: the vector that was rung (0 to 63), 124 on timeout, 125 on error.
    """
    with _connected_client(policy_name, socket_path, expected_vectors, join_timeout) as client:
        click.echo(f"peer {client.own_id} waiting", err=True)
        vector = client.wait(list(vectors) or None, timeout)
    if vector is None:
        click.echo("timeout", err=True)
        sys.exit(WAIT_TIMEOUT)
    click.echo(f"vector {vector}")
    sys.exit(vector)


@main.command()
@policy_option
@socket_option
@join_options
@user_errors
def client(policy_name, socket_path, expected_vectors, join_timeout):
    """Interactive client with the commands of QEMU's ivshmem-client (dump, int, help)."""
    from .interactive import run_interactive

    with _connected_client(policy_name, socket_path, expected_vectors, join_timeout) as ivshmem:
        run_interactive(ivshmem, sys.stdin, click.echo)


# --- writes, rings and status through the control socket ------------------------------------------------


def control_option(func):
    return click.option("--control-socket", "control_path", help="Control socket path (default: the policy's).")(func)


def control_client(policy_name: str, control_path: str | None, timeout: float | None = 30.0):
    """The supervisor's control client, talking only to a server the policy trusts (the policy is loaded even with
    --control-socket: it says who that is); a refused request raises with the supervisor's one line."""
    return lean.control_client(policy_name, control_path, timeout)[0]


# write, ring and status are lean.py's: `shmguard write ...` runs them without importing click, and these
# commands (for --help, and for what lean.py leaves to click) call the very same functions.


@main.command()
@click.option("-m", "--message", help="Text to write; NUL padding follows it to the end of the region.")
@click.option("-f", "--file", "file_path", type=click.Path(dir_okay=False), help="Write this file's bytes as is.")
@click.option("--stdin", "from_stdin", is_flag=True, help="Write standard input's bytes as is.")
@click.option("--lines", is_flag=True, help="Write each line of standard input as a text message of its own, over "
              "one connection, pipelined; print a summary. A line with a NUL or too long for the policy's region is "
              "not sent; the run stops at the first line that fails and names it.")
@click.option("--offset", default=0, type=int, show_default=True, help="Where in the region to write.")
@click.option("--ring", help="After the write is recorded, ring 'guest', 'all', PEER or PEER:VECTOR "
              "(with --lines: after each line).")
@click.option("--no-wait", is_flag=True, help="Do not wait for the guest's acknowledgement.")
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(0, 3600, min_open=True),
              help="Seconds to wait for the acknowledgement.")
@click.option("--allow-unterminated", is_flag=True, help="Let a -m message (or a --lines line) fill its room with no "
              "NUL after it.")
@policy_option
@control_option
@click.option("--json", "as_json", is_flag=True, help="Print the supervisor's reply (with --lines: the summary) "
              "as JSON.")
@user_errors
def write(message, file_path, from_stdin, lines, offset, ring, no_wait, timeout, allow_unterminated, policy_name,
          control_path, as_json):
    """Write a message into the region through the supervisor: bounded, never resizing, audited."""
    sys.exit(lean.write(message, file_path, from_stdin, lines, offset, ring, no_wait, timeout, allow_unterminated,
                        policy_name, control_path, as_json))


@main.command()
@click.argument("target")
@policy_option
@control_option
@user_errors
def ring(target, policy_name, control_path):
    """Ring TARGET through the supervisor: 'guest', 'all', PEER or PEER:VECTOR (audited)."""
    sys.exit(lean.ring(target, policy_name, control_path))


@main.command()
@policy_option
@control_option
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="Seconds to wait for the successor to serve.")
@user_errors
def reload(policy_name, control_path, timeout):
    """Upgrade in place: the running supervisor execs the installed shmguard, which re-reads the policy and takes
    over its peers, sockets, region, audit log and QEMU. Peers see nothing. Exits 0 once the successor serves;
    a reload that cannot apply (a bad policy, a new region size) is refused and the old process goes on."""
    reply = control_client(policy_name, control_path, timeout=timeout).reload()
    lost = f"; not recovered: {'; '.join(reply['lost'])}" if reply.get("lost") else ""
    click.echo(f"reloaded: pid {reply['pid']} serves peers {reply['peers']}{lost}")


@main.command()
@click.option("--from", "source", required=True, type=click.IntRange(0, MAX_GUESTS - 1),
              help="The guest that sends (its number in `shmguard status`).")
@click.option("--to", "target", required=True, type=click.IntRange(0, MAX_GUESTS - 1), help="The guest it sends to.")
@click.option("-m", "--message", required=True, help="The text (no NUL; at most the bytes `status` gives).")
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(0, 3600, min_open=True),
              help="Seconds to wait for the sender's report.")
@policy_option
@control_option
@click.option("--json", "as_json", is_flag=True, help="Print the supervisor's reply as JSON.")
@user_errors
def send(source, target, message, timeout, policy_name, control_path, as_json):
    """Ask one built-in guest to send a message to another (`shmguard run --guests 2`) and wait for its report.

    The host writes the command (with the text) into the sender's slot and reads its report; the sender writes
    into the receiver's inbox and rings it through its own doorbell register, and the receiver acks to the sender
    directly: that message and both doorbells go from guest to guest, never through the supervisor.
    """
    import os

    reply = control_client(policy_name, control_path, timeout=timeout + 30).send(source, target,
                                                                                 os.fsencode(message), timeout)
    exact = "exactly" if reply["delivered_exactly"] else "WITH A DIFFERENT CHECKSUM"
    emit(reply, as_json, f"guest {reply['from']} (peer {reply['from_peer']}) sent {reply['length']} bytes to guest "
                         f"{reply['to']} (peer {reply['to_peer']}), acknowledged {exact}: round trip "
                         f"{reply['round_trip_ms']:.3f} ms inside the guest ({reply['host_round_trip_ms']:.1f} ms "
                         "as the host saw it)")


@main.command()
@policy_option
@control_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@user_errors
def status(policy_name, control_path, as_json):
    """Show the running supervisor: region, peers, guest, guard and audit state.

    The first line says whether everything is healthy; the exit status is 0 only if it is (a monitoring check).
    """
    sys.exit(lean.status(policy_name, control_path, as_json))


@main.command()
@policy_option
@click.option("--running", is_flag=True, help="Attack the supervisor already serving the policy "
              "(default: a throwaway one it starts and stops).")
@click.option("--qemu", "with_qemu", is_flag=True, help="Attach a paused QEMU that must survive every attack.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@user_errors
def attack(policy_name, running, with_qemu, as_json):
    """Attack a supervisor as root, a group member and an outsider; exit 1 if any attack succeeds.

    Prints each attack, the uid it ran as, the expected defence, what was observed (blocked, repaired,
    refused, withstood or FAILED) and the time to repair. Tampers from outside come first, then the
    adversaries the policy admits: peers and members that turn what they were given against the supervisor.
    """
    from .attack import exit_status, format_table, run_battery

    results = run_battery(policy_name, start_supervisor=not running, with_qemu=with_qemu)
    emit([result.describe() for result in results], as_json, format_table(results))
    sys.exit(exit_status(results))


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell):
    """Print the shell completion script for SHELL.

    For bash, add `eval "$(shmguard completion bash)"` to ~/.bashrc (zsh: ~/.zshrc; fish: `shmguard completion
    fish | source`)."""
    from click.shell_completion import get_completion_class

    click.echo(get_completion_class(shell)(main, {}, "shmguard", "_SHMGUARD_COMPLETE").source())


# --- the audit log ---------------------------------------------------------------------------------------


@main.group()
def audit() -> None:
    """Verify or show the audit log."""


def _audit_path(path: str | None, policy_name: str) -> str:
    return path or load_policy(policy_name).audit.path


@audit.command("verify")
@click.argument("path", required=False)
@policy_option
@user_errors
def audit_verify(path, policy_name):
    """Check the hash chain of PATH (default: the policy's log); print OK or the first bad line."""
    from .audit import verify

    result = verify(_audit_path(path, policy_name))
    click.echo(result.summary(), err=not result.ok)
    if not result.ok:
        sys.exit(1)


@audit.command("show")
@click.option("--since", type=int, help="Only records after this sequence number.")
@click.option("--path", help="Audit log path (default: the policy's).")
@policy_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@user_errors
def audit_show(since, path, policy_name, as_json):
    """Print the audit log's records."""
    from .audit import format_record, read_records

    for record in read_records(_audit_path(path, policy_name), since):
        click.echo(json.dumps(record, sort_keys=True) if as_json else format_record(record))


# --- the built-in guest and the demo ----------------------------------------------------------------------


@main.group()
def guest() -> None:
    """The built-in guest: a Debian kernel plus a small vfio-pci agent."""


@guest.command("build")
@click.option("--quiet", is_flag=True, help="Print nothing unless something fails (or the own kernel cannot be built).")
@user_errors
def guest_build(quiet):
    """Build (or reuse the cached) guest image and its own kernel; prints which kernel, the initrd and command line."""
    from .guest import build_guest

    def say(line: str) -> None:  # --quiet still says why the guest's own kernel could not be built
        if not quiet or line.startswith("guest: cannot"):
            click.echo(line, err=True)

    image = build_guest(log=say, build=True)
    if not quiet:
        click.echo(f"kernel  {image.kernel}\n        {image.kernel_name}")
        click.echo(f"initrd  {image.initrd}\ncmdline {image.cmdline}")


@guest.command("domain-xml")
@click.option("--name", default="shmguard-guest", show_default=True, help="The libvirt domain's name.")
@policy_option
@socket_option
@click.option("--host-peer", type=click.IntRange(0, MAX_PEER_ID), help="The supervisor's own peer id (default: asked "
              "of the running supervisor, else 0, the id a supervisor takes when it starts).")
@click.option("--image-dir", type=click.Path(file_okay=False), default="/var/lib/libvirt/boot", show_default=True,
              help="Where the guest image is copied to (libvirt chowns it to its QEMU user while the VM runs).")
@click.option("--serial-log", type=click.Path(dir_okay=False), help="The guest's console "
              "(default: /var/log/libvirt/qemu/NAME-serial.log).")
@user_errors
def guest_domain_xml(name, policy_name, socket_path, host_peer, image_dir, serial_log):
    """Print a libvirt domain that boots the built-in guest on the policy's socket: `virsh define` it as printed."""
    from pathlib import Path

    from .domain import Domain, check_name, domain_xml, install_image
    from .guest import build_guest
    from .qemu import choose_accel

    policy = load_policy(policy_name)
    check_name(name)
    if host_peer is None:
        try:
            host_peer = control_client(policy_name, None, timeout=5).status()["host_peer"]
        except (ShmguardError, OSError):
            host_peer = 0
            click.echo(f"shmguard: no supervisor answers at {policy.control.socket}: shmguard.host=0, the id a "
                       "supervisor takes when it starts", err=True)
    image = install_image(build_guest(log=lambda line: click.echo(line, err=True)), name, Path(image_dir))
    accel, _ = choose_accel(kernel=image.kernel)
    click.echo(domain_xml(Domain(name, socket_path or policy.server.socket, policy.server.vectors, host_peer,
                                 image.kernel, image.initrd, image.cmdline, policy.qemu.memory,
                                 Path(serial_log) if serial_log else None, kvm=accel == "kvm")), nl=False)


@main.command()
@policy_option
@click.option("--no-attacks", is_flag=True, help="Skip the attack battery.")
@click.option("--keep", is_flag=True, help="Keep the demo's directory (logs, audit log).")
@click.option("--guests", type=click.IntRange(1, MAX_GUESTS), default=1, show_default=True,
              help="With 2 or more: the guests also send to each other, every one to every other.")
@user_errors
def demo(policy_name, no_attacks, keep, guests):
    """Run the whole doorbell flow with the built-in guest; exit 0 only if every message was delivered
    (with --guests N, also every message between guests, printed and acknowledged both ways)."""
    from .demo import format_report, run_demo

    report = run_demo(click.echo, policy_name, attacks=not no_attacks, keep=keep, guests=guests)
    click.echo(format_report(report))
    sys.exit(0 if report.ok else 1)
