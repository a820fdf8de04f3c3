"""A control client reads a policy file it has read before from its own cache: the facts load_policy made of that
very text, its names looked up again, and only from a cache nobody else can have written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shmguard import policy
from shmguard.errors import PolicyError
from shmguard.policy_facts import FactsCache, client_facts, loaded_facts

pytestmark = pytest.mark.pure
STRICT = (policy.BUILTIN_DIR / "strict.toml").read_text()


@pytest.fixture
def cache_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "cache"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


def entries(home: Path) -> list[Path]:
    directory = home / "shmguard" / "policy-facts"
    return sorted(directory.iterdir()) if directory.exists() else []


def a_policy(tmp_path: Path, name: str = "mine.toml", text: str = STRICT, **replace: str) -> str:
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name", policy.builtin_names())
def test_a_files_facts_from_the_cache_are_load_policys(tmp_path, cache_home, name):
    path = a_policy(tmp_path, text=(policy.BUILTIN_DIR / f"{name}.toml").read_text())
    first = client_facts(path)
    assert len(entries(cache_home)) == 1, "the first read keeps what it loaded"
    assert client_facts(path) == first == loaded_facts(path)


def test_a_cached_file_is_read_without_the_policy_module(tmp_path, cache_home):
    path = a_policy(tmp_path)
    code = ("import sys; from shmguard.policy_facts import client_facts; facts = client_facts(sys.argv[1]); "
            "print(facts.control_socket, 'shmguard.policy' in sys.modules)")
    runs = [subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert runs == ["/run/shmguard/control.sock True\n", "/run/shmguard/control.sock False\n"]


def test_a_changed_file_is_loaded_again_and_kept_again(tmp_path, cache_home):
    path = a_policy(tmp_path)
    client_facts(path)
    a_policy(tmp_path, **{"/run/shmguard/control.sock": "/run/shmguard/other.sock"})
    assert client_facts(path).control_socket == "/run/shmguard/other.sock"
    assert client_facts(path) == loaded_facts(path)


def poisoned(home: Path) -> Path:
    """The one entry, rewritten to name another control socket: what an attacker who could write it would do."""
    (entry,) = entries(home)
    kept = json.loads(entry.read_text())
    kept["record"]["control_socket"] = "/tmp/attacker.sock"
    entry.write_text(json.dumps(kept))
    return entry


@pytest.mark.parametrize("make_untrusted", [
    pytest.param(lambda entry, home: entry.chmod(0o666), id="entry-writable-by-others"),
    pytest.param(lambda entry, home: os.chown(entry, 65534, -1), id="entry-of-another-uid"),
    pytest.param(lambda entry, home: entry.parent.chmod(0o777), id="directory-writable-by-others"),
    pytest.param(lambda entry, home: os.chown(entry.parent, 65534, -1), id="directory-of-another-uid"),
    pytest.param(lambda entry, home: (entry.rename(home / "elsewhere"), entry.symlink_to(home / "elsewhere")),
                 id="entry-a-symlink"),
])
def test_an_entry_someone_else_could_have_written_is_never_used(tmp_path, cache_home, make_untrusted):
    path = a_policy(tmp_path)
    client_facts(path)
    entry = poisoned(cache_home)
    assert client_facts(path).control_socket == "/tmp/attacker.sock", "this user's own entry is used as it is"
    make_untrusted(entry, cache_home)
    assert client_facts(path).control_socket == "/run/shmguard/control.sock"


def test_an_entry_for_other_text_another_path_or_another_parser_is_not_used(tmp_path, cache_home, monkeypatch):
    path = a_policy(tmp_path)
    client_facts(path)
    entry = poisoned(cache_home)
    kept = json.loads(entry.read_text())
    for field, value in (("key", "another parser"), ("path", "/elsewhere/mine.toml")):
        entry.write_text(json.dumps({**kept, field: value}))
        assert client_facts(path).control_socket == "/run/shmguard/control.sock", field
    entry.write_text(json.dumps({**kept, "record": {**kept["record"], "text": STRICT + "\n"}}))
    assert client_facts(path).control_socket == "/run/shmguard/control.sock", "text"


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"key": 1}', b"\xff" * 10,
                                     b'{"key": "k", "path": "/x", "record": {"text": 1}}'])
def test_a_damaged_entry_is_loaded_afresh_and_written_again(tmp_path, cache_home, content):
    path = a_policy(tmp_path)
    client_facts(path)
    (entry,) = entries(cache_home)
    entry.write_bytes(content)
    assert client_facts(path) == loaded_facts(path)
    assert json.loads(entry.read_text())["record"]["text"] == STRICT


def test_names_are_looked_up_again_and_a_gone_group_is_load_policys_error(tmp_path, cache_home):
    group = "shmguard-cache-test"
    subprocess.run(["groupadd", "--system", group], check=True)
    try:
        path = a_policy(tmp_path, **{'group = "ivshmem"': f'group = "{group}"'})
        client_facts(path)
    finally:
        subprocess.run(["groupdel", group], check=True)
    with pytest.raises(PolicyError) as loaded:
        policy.load_policy(path)
    with pytest.raises(PolicyError) as cached:
        client_facts(path)
    assert str(cached.value) == str(loaded.value) and group in str(loaded.value)


def test_a_cache_that_cannot_be_written_is_no_cache(tmp_path, monkeypatch):
    untrusted = tmp_path / "open"
    untrusted.mkdir(mode=0o777)
    untrusted.chmod(0o777)
    monkeypatch.setenv("XDG_CACHE_HOME", str(untrusted))
    path = a_policy(tmp_path)
    assert client_facts(path) == loaded_facts(path)
    assert list(untrusted.iterdir()) == [], "nothing is made where others may write"
    assert FactsCache.of_this_user().record(path) is None


def test_the_cache_keeps_the_newest_entries_only(tmp_path, cache_home, monkeypatch):
    monkeypatch.setattr("shmguard.policy_facts.MAX_ENTRIES", 3)
    paths = [a_policy(tmp_path, f"p{n}.toml") for n in range(5)]
    for path in paths:
        client_facts(path)
    kept = [json.loads(entry.read_text())["path"] for entry in entries(cache_home)]
    assert sorted(kept) == sorted(paths[2:])
