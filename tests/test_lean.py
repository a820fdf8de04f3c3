"""The lean entry point (shmguard/lean.py) next to the click CLI: the same parameters for every form it parses,
click for every form it does not, the same errors and exit statuses; the built-in policy record up to date; the
client's JSON the json module's. Pure: no supervisor (the commands that reach one are in test_write_lines.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import click
import pytest

from shmguard import cli, lean, policy
from shmguard.builtin_policies import RECORDED
from shmguard.control import WriteRequest, encode, request_echo
from shmguard.control_client import decode_reply, encode_body
from shmguard.errors import ControlError, PolicyError
from shmguard.policy_facts import builtin_dir, client_facts, facts_of_record, loaded_facts, record_of

pytestmark = pytest.mark.pure

COMMANDS = {"write": cli.write, "ring": cli.ring, "status": cli.status, "run": cli.run}


def click_params(args: list[str]) -> dict | None:
    """What the click command receives for these arguments, or None if click refuses them (or shows help)."""
    command = COMMANDS.get(args[0]) if args else None
    if command is None:
        return None
    try:
        with command.make_context(args[0], list(args[1:])) as ctx:
            return ctx.params
    except (click.exceptions.Exit, click.UsageError, click.BadParameter):
        return None


PARSED = [
    ["write", "-m", "hello"],
    ["write", "-mhello"],
    ["write", "-m="],
    ["write", "--message", "hi", "--message", "again"],
    ["write", "--message=a=b"],
    ["write", "--message="],
    ["write", "-m", "--help"],  # a value is the next argument, whatever it looks like
    ["write", "-m", "--"],
    ["write", "-m", "-"],
    ["write", "-m", "x", "--offset", " 12 "],
    ["write", "-m", "x", "--offset=-1"],
    ["write", "-m", "x", "--offset", "1_000"],
    ["write", "-m", "x", "--offset", "9" * 30],
    ["write", "-f", "/etc/hostname", "--ring", "guest", "--no-wait", "--timeout", "0.5"],
    ["write", "-f/nonexistent"],
    ["write", "--file", ""],
    ["write", "--stdin", "--allow-unterminated", "--json", "--policy", "zephyr", "--control-socket", "/tmp/c"],
    ["write", "--lines", "--ring", "3:1", "--timeout", "3600"],
    ["write", "--lines", "--timeout", "1e-9"],
    ["write", "--policy=strict", "--", ],
    ["write"],
    ["ring", "guest"],
    ["ring", "--policy", "compat", "3:1"],
    ["ring", "--", "-1"],
    ["ring", "all", "--control-socket=/tmp/x"],
    ["status"],
    ["status", "--json", "--policy", "standard"],
    ["run"],
    ["run", "--policy", "/etc/shmguard/x.toml", "--no-guest", "-v"],
    ["run", "--policy=compat", "--size", "4M", "--vectors", " 4 ", "--socket", "/tmp/s", "--control-socket=/tmp/c",
     "--audit-log", "/tmp/a.log", "--fd-store", "--verbose"],
    ["run", "--guests", "16", "--vectors", "2"],
    ["run", "--guests=2", "--guests", "1"],
    ["run", "--guest-kernel", "/etc/hostname", "--guest-initrd=/etc/hostname", "--guest-append", "console=ttyS0 x"],
    ["run", "--guest-append="],
    ["run", "--size", "--no-guest"],  # a value is the next argument, whatever it looks like
    ["run", "--vectors", "1_000"],
]

LEFT_TO_CLICK = [
    [], ["--version"], ["--help"], ["policy", "show"], ["reload"], ["write", "--help"], ["write", "-h"],
    ["write", "-m"], ["write", "--message"], ["write", "-x"], ["write", "--mess", "x"], ["write", "--json=1"],
    ["write", "extra"], ["write", "-m", "x", "--", "extra"], ["write", "--offset", "1.5"], ["write", "--offset", ""],
    ["write", "--timeout", "0"], ["write", "--timeout", "3600.5"], ["write", "--timeout", "nan"],
    ["write", "--timeout", "inf"], ["write", "--timeout", "soon"], ["write", "-f", "/tmp"], ["write", "-hm", "x"],
    ["ring"], ["ring", "a", "b"], ["ring", "--json", "guest"], ["status", "extra"], ["status", "--help"],
    ["status", "--policy"], ["Write", "-m", "x"],
    ["run", "--help"], ["run", "-h"], ["run", "extra"], ["run", "--vectors", "x"],
    ["run", "--vectors", "1.5"], ["run", "--vectors="], ["run", "--guests", "0"], ["run", "--guests", "17"],
    ["run", "--guests", "two"], ["run", "--guest-kernel", "/nonexistent"], ["run", "--guest-kernel", "/tmp"],
    ["run", "--guest-initrd", ""], ["run", "--no-guest=1"], ["run", "--size"], ["run", "--fd"],
]
# Forms click takes that lean.py leaves to it all the same: the repeatable --qemu-arg, stacked short flags.
LEFT_TO_CLICK_WHICH_TAKES_THEM = [["run", "--qemu-arg", "-S"], ["run", "--qemu-arg=-S", "--qemu-arg", "-s"],
                                  ["run", "-vv"]]


@pytest.mark.parametrize("args", PARSED)
def test_what_lean_parses_click_parses_the_same(args):
    parsed = lean.parse(args)
    assert parsed is not None and parsed[0] == args[0]
    assert parsed[1] == click_params(args)


@pytest.mark.parametrize("args", LEFT_TO_CLICK)
def test_what_lean_leaves_to_click(args):
    assert lean.parse(args) is None


@pytest.mark.parametrize("args", LEFT_TO_CLICK_WHICH_TAKES_THEM)
def test_what_lean_leaves_to_click_click_takes(args):
    assert lean.parse(args) is None and click_params(args) is not None


@pytest.mark.parametrize("args", [a for a in LEFT_TO_CLICK if a and a[0] in COMMANDS and "-h" not in a[1:2]
                                  and "--help" not in a and "nan" not in a])
def test_what_lean_leaves_to_click_click_refuses(args):
    assert click_params(args) is None


# --- the same errors and exit statuses on both paths ---------------------------------------------------------


def run_lean(args: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmguard", *args], input=stdin, capture_output=True, timeout=60)


def run_click(args: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess:
    code = "import sys; from shmguard.cli import main; main(sys.argv[1:], prog_name='shmguard')"
    return subprocess.run([sys.executable, "-c", code, *args], input=stdin, capture_output=True, timeout=60)


def test_errors_are_the_same_on_both_paths(tmp_path):
    missing = str(tmp_path / "no-such.sock")
    bad_policy = tmp_path / "bad.toml"
    bad_policy.write_text("[region]\nsize = 3\n")
    listener_dir = tmp_path / "stale"
    listener_dir.mkdir()
    stale = listener_dir / "control.sock"
    import socket

    bound = socket.socket(socket.AF_UNIX)
    bound.bind(str(stale))  # bound, never listening: connect is refused
    table = [
        (["write", "-m", "x", "--control-socket", missing], 1, "no control socket"),
        (["write", "--lines", "--control-socket", missing], 1, "no control socket"),
        (["write", "-m", "x", "--stdin"], 1, "give exactly one of -m TEXT, -f FILE, --stdin or --lines"),
        (["write", "--lines", "-m", "x"], 1, "give exactly one of"),
        (["write"], 1, "give exactly one of"),
        (["write", "-f", str(tmp_path / "absent")], 1, "cannot read"),
        (["write", "-m", "x", "--policy", "nonesuch"], 2, "no built-in policy 'nonesuch'"),
        (["write", "-m", "x", "--policy", str(bad_policy)], 2, "region.size"),
        (["write", "-m", "x", "--policy", str(tmp_path / "absent.toml")], 2, "policy file not found"),
        (["write", "-m", "x", "--control-socket", str(stale)], 1, "nothing is listening"),
        (["ring", "guest", "--control-socket", missing], 1, "no control socket"),
        (["status", "--control-socket", missing, "--json"], 1, "no control socket"),
        (["write", "--offset", "x"], 2, "Invalid value for '--offset'"),
        (["write", "--timeout", "nan", "-m", "x", "--control-socket", missing], 1, "--timeout nan: give a number"),
        (["run", "--policy", "nonesuch"], 2, "no built-in policy 'nonesuch'"),
        (["run", "--policy", str(bad_policy), "--no-guest"], 2, "region.size"),
        (["run", "--guest-initrd", "/etc/hostname"], 1, "--guest-initrd needs --guest-kernel"),
        (["run", "--no-guest", "--guest-kernel", "/etc/hostname"], 1, "--no-guest boots nothing"),
        (["run", "--guests", "2", "--no-guest"], 1, "--guests 2 boots built-in guests"),
        (["run", "--guests", "0"], 2, "Invalid value for '--guests'"),
    ]
    try:
        for args, status, words in table:
            ours, theirs = run_lean(args), run_click(args)
            assert (ours.returncode, ours.stdout, ours.stderr) == (theirs.returncode, theirs.stdout,
                                                                    theirs.stderr), args
            assert ours.returncode == status and words.encode() in ours.stderr, (args, ours.stderr)
            if status == 1 or "policy" in words:
                assert ours.stderr.count(b"\n") == 1 and b"Traceback" not in ours.stderr, args
    finally:
        bound.close()


def test_help_is_clicks():
    ours, theirs = run_lean(["write", "--help"]), run_click(["write", "--help"])
    assert ours.returncode == theirs.returncode == 0 and ours.stdout == theirs.stdout
    assert b"--lines" in ours.stdout


def test_a_write_imports_neither_click_nor_json_nor_tomllib(tmp_path):
    code = ("import sys; before = set(sys.modules); from shmguard import lean; lean.main(sys.argv[1:]); "
            "print(sorted(m for m in ('click', 'json', 'tomllib', 'socket', 'dataclasses', 'typing', 're') "
            "if m in sys.modules and m not in before))")
    result = subprocess.run([sys.executable, "-c", code, "write", "-m", "x", "--control-socket",
                             str(tmp_path / "none.sock")], capture_output=True, text=True, timeout=60)
    assert "no control socket" in result.stderr
    assert result.stdout.strip() == "[]"


def test_run_imports_no_click(tmp_path):
    code = ("import sys; from shmguard import lean; status = lean.main(sys.argv[1:]); "
            "print(status, 'click' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, "run", "--policy", str(tmp_path / "absent.toml")],
                            capture_output=True, text=True, timeout=60)
    assert "policy file not found" in result.stderr
    assert result.stdout.split() == ["2", "False"]


# --- the record of the built-in policies -------------------------------------------------------------------


def test_the_record_of_the_built_in_policies_is_up_to_date():
    names = policy.builtin_names()
    current = {name: record_of(os.path.join(builtin_dir(), f"{name}.toml")) for name in names}
    assert RECORDED == current, "policies/ changed: run `python -m shmguard.policy_facts` and commit the result"


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_recorded_facts_are_the_loaded_facts(name):
    assert builtin_dir() == str(policy.BUILTIN_DIR)
    assert client_facts(name) == loaded_facts(name)


def test_a_missing_group_is_the_same_error_from_the_record(tmp_path):
    text = (policy.BUILTIN_DIR / "strict.toml").read_text()
    missing = tmp_path / "strict.toml"
    missing.write_text(text.replace('owner = "root"', 'owner = "no-such-user-x"', 1).replace("ivshmem",
                                                                                           "no-such-group-x"))
    with pytest.raises(PolicyError) as loaded:
        policy.load_policy(str(missing))
    good = tmp_path / "good.toml"
    good.write_text(text)
    record = record_of(str(good))
    record["identities"] = {key: (value.replace("ivshmem", "no-such-group-x") if isinstance(value, str) else
                                  tuple(v.replace("ivshmem", "no-such-group-x") for v in value))
                            for key, value in record["identities"].items()}
    record["identities"]["server", "owner"] = "no-such-user-x"
    with pytest.raises(PolicyError) as recorded:
        facts_of_record(record, str(missing))
    assert str(recorded.value) == str(loaded.value)
    assert "server.owner: user 'no-such-user-x'" in str(loaded.value) and "more; run" in str(loaded.value)


# --- the client's JSON ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("request_", [
    WriteRequest(b""), WriteRequest(b"\0\xff" * 100, 4096, True, "guest", True, 0.5, True),
    WriteRequest(b"x", ring="caf\xe9 \udcff \"quoted\" \\ \n"), WriteRequest(b"x", timeout=30),
])
def test_requests_are_what_json_dumps_makes(request_):
    assert encode(request_) == json.dumps(request_.to_body()).encode() + b"\n"
    assert encode_body({**request_.to_body(), "id": 7}) == json.dumps({**request_.to_body(), "id": 7}).encode() + b"\n"


@pytest.mark.parametrize("reply", [
    {"ok": True, "seq": 3, "rang": [{"peer": 1, "vector": 0, "held_until_ready": False}], "round_trip_ms": 0.25},
    {"ok": False, "error": "caf\u00e9 \u2603 \"x\"", "id": 2 ** 63 - 1},
])
def test_replies_are_what_json_loads_reads(reply):
    assert decode_reply(json.dumps(reply, sort_keys=True).encode(), "s") == reply


@pytest.mark.parametrize("line, words", [(b"not json", "not JSON"), (b'{"ok": true} x', "not JSON"),
                                         (b"[1]", "not a JSON object"), (b'{"a": NaN}', "not JSON"),
                                         (b"\xff", "not JSON"), (b"[" * 100000, "not JSON")])
def test_a_reply_that_is_not_a_json_object_is_one_error(line, words):
    with pytest.raises(ControlError, match=words):
        decode_reply(line, "s")


@pytest.mark.parametrize("value, echoed", [
    (0, True), (7, True), (2 ** 63 - 1, True), (2 ** 63, False), (-1, False), (True, False), (1.0, False),
    ("7", False), ("x" * 100000, False), ([1] * 1000, False), ({"a": 1}, False), (None, False),
])
def test_only_a_bounded_whole_number_id_is_echoed(value, echoed):
    assert request_echo({"op": "status", "id": value}) == ({"id": value} if echoed else {})
    assert request_echo({"op": "status"}) == {}


def test_a_socket_someone_else_serves_is_refused_before_anything_is_sent():
    """A local user binds the policy's control socket while no supervisor holds it: nothing is sent to it."""
    import shutil
    import tempfile
    from pathlib import Path

    squat_dir = Path(tempfile.mkdtemp(prefix="shmguard-test-squat-", dir="/tmp"))
    squat_dir.chmod(0o777)
    path = squat_dir / "control.sock"
    code = ("import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(); "
            "print('ready', flush=True); c, _ = s.accept(); print(len(c.recv(65536)), flush=True)")
    for args in (["write", "-m", "secret"], ["write", "--lines"], ["ring", "guest"], ["status"]):
        squatter = subprocess.Popen(["/usr/bin/python3", "-c", code, str(path)], user="nobody", stdout=subprocess.PIPE,
                                    text=True)
        try:
            assert squatter.stdout.readline() == "ready\n"
            ours = run_lean([*args, "--control-socket", str(path)], stdin=b"secret\n")
            assert squatter.stdout.readline() == "0\n"  # it read nothing: the client closed without sending
        finally:
            squatter.kill()
            squatter.wait()
            path.unlink(missing_ok=True)
        assert ours.returncode == 1 and b"refused: the socket is served by uid 65534 (nobody" in ours.stderr, args
        assert ours.stderr.count(b"\n") == 1 and ours.stdout == b""
    shutil.rmtree(squat_dir)
