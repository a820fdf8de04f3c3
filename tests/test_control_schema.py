"""The control protocol's schema: request lines and objects to typed requests or the exact one-line error, and
every typed request through to_body and back unchanged. No socket, no supervisor."""

from __future__ import annotations

import json
import pickle

import pytest

from shmguard.control import (
    ControlRefused,
    ReloadRequest,
    RingRequest,
    StatusRequest,
    WriteRequest,
    encode,
    parse,
    parse_line,
)

pytestmark = pytest.mark.pure

OBJECT = "a request is a JSON object with a string \"op\""
TIMEOUT = "must be a number of seconds above 0 and at most 60 (policy shares.wait_seconds)"


@pytest.mark.parametrize("line, expected", [
    (b"[" * 5000, "nested too deeply"),
    (b"[1,2]", OBJECT),
    (b'"write"', OBJECT),
    (b'{"op": 1}', OBJECT),
    (b'{"data": "aGk="}', OBJECT),
    (b'{"op": "status"}', {"op": "status"}),
])
def test_lines_to_request_objects(line, expected):
    assert parse_line(line) == expected


def test_a_line_that_is_not_json_says_so():
    assert parse_line(b"not json").startswith("not JSON: ")


@pytest.mark.parametrize("body, expected", [
    ({"op": "status"}, StatusRequest()),
    ({"op": "status", "pad": "x" * 100}, StatusRequest()),
    ({"op": "reload"}, ReloadRequest()),
    ({"op": "explode"}, "unknown op 'explode' (known: reload, ring, send, status, write)"),
    ({"op": "ring", "target": "guest"}, RingRequest("guest")),
    ({"op": "ring", "target": "3:1"}, RingRequest("3:1")),
    ({"op": "ring", "target": 3}, RingRequest("3")),  # checked as text by the supervisor, as it always was
    ({"op": "ring"}, RingRequest("None")),  # refused by the supervisor: 'None' is not a target
    ({"op": "write", "data": "aGk="}, WriteRequest(b"hi")),
    ({"op": "write", "data": "", "offset": 7}, WriteRequest(b"", 7)),
    ({"op": "write", "data": "aGk=", "text": 1, "ring": "guest", "wait": True, "timeout": 5,
      "allow_unterminated": "yes"}, WriteRequest(b"hi", 0, True, "guest", True, 5.0, True)),
    ({"op": "write", "data": "aGk=", "ring": "", "wait": 0, "text": None}, WriteRequest(b"hi")),
    ({"op": "write", "data": "aGk=", "ring": 0}, WriteRequest(b"hi")),
    ({"op": "write", "data": "aGk=", "timeout": 60}, WriteRequest(b"hi", timeout=60.0)),
    ({"op": "write"}, "a write needs \"data\": the bytes in base64"),
    ({"op": "write", "data": 5}, "a write needs \"data\": the bytes in base64"),
    ({"op": "write", "data": "***"}, "\"data\" is not valid base64"),
    # not ASCII: a refusal like any other, not an exception out of the parser (it left the request unanswered)
    ({"op": "write", "data": "aGk\u00e9"}, "\"data\" is not valid base64"),
    ({"op": "send", "from": 0, "to": 1, "data": "\u2028"}, "\"data\" is not valid base64"),
    ({"op": "write", "data": "aGk=\n"}, "\"data\" is not valid base64"),
    ({"op": "write", "data": "aG k="}, "\"data\" is not valid base64"),
    ({"op": "write", "data": "", "offset": "zero"}, "offset 'zero' must be a whole number"),
    ({"op": "write", "data": "", "offset": True}, "offset True must be a whole number"),
    ({"op": "write", "data": "", "offset": 1.5}, "offset 1.5 must be a whole number"),
    ({"op": "write", "data": "", "offset": float("inf")}, "offset inf must be a whole number"),
    ({"op": "write", "data": "aGk=", "timeout": "x"}, f"timeout 'x' {TIMEOUT}"),
    ({"op": "write", "data": "aGk=", "timeout": float("nan")}, f"timeout nan {TIMEOUT}"),
    ({"op": "write", "data": "aGk=", "timeout": float("inf")}, f"timeout inf {TIMEOUT}"),
    ({"op": "write", "data": "aGk=", "timeout": -1}, f"timeout -1 {TIMEOUT}"),
    ({"op": "write", "data": "aGk=", "timeout": 0}, f"timeout 0 {TIMEOUT}"),
    ({"op": "write", "data": "aGk=", "timeout": 61}, f"timeout 61 {TIMEOUT}"),
    ({"op": "write", "data": "aGk=", "timeout": True}, f"timeout True {TIMEOUT}"),
    ({"op": "write", "data": "***", "offset": "zero", "timeout": -1}, "\"data\" is not valid base64"),  # first
    ({"op": "write", "data": "", "offset": "zero", "timeout": -1}, "offset 'zero' must be a whole number"),
])
def test_request_objects_to_typed_requests_or_the_error(body, expected):
    assert parse(body) == expected


def test_the_timeout_bound_is_the_policys():
    assert parse({"op": "write", "data": "", "timeout": 600}, wait_seconds=3600) == WriteRequest(b"", timeout=600.0)
    assert parse({"op": "write", "data": "", "timeout": 6}, wait_seconds=5) == (
        "timeout 6 must be a number of seconds above 0 and at most 5 (policy shares.wait_seconds)")


@pytest.mark.parametrize("request_", [
    StatusRequest(),
    ReloadRequest(),
    RingRequest("guest"),
    RingRequest("all"),
    RingRequest("12:3"),
    WriteRequest(b""),
    WriteRequest(bytes(range(256)) * 3, 4096),
    WriteRequest(b"hello", text=True, ring="guest", wait=True, timeout=0.5, allow_unterminated=True),
    WriteRequest(b"\0\xff", 1, ring="all"),
])
def test_encode_then_parse_is_the_same_request(request_):
    line = encode(request_)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    body = parse_line(line[:-1])
    assert body == request_.to_body() and body["op"] == request_.OP
    assert parse(body) == request_


def test_a_refusal_keeps_the_supervisors_line_and_reply_when_pickled():
    reply = {"ok": False, "error": "the guest did not acknowledge within 1 s", "seq": 4}
    refused = pickle.loads(pickle.dumps(ControlRefused(reply)))
    assert str(refused) == reply["error"] and refused.reply == reply
    assert json.loads(json.dumps(refused.reply)) == reply


@pytest.mark.parametrize("line", [
    b'{"op": "write", "data": "aGk=", "id": 7}', b'{"op":"write","x":NaN,"y":-Infinity}', b'{"op": "a"}  \t',
    b'{"op": "a"} x', b'{"op": "\xff"}', b'{"op": "\\ud800"}', b'{"op": "a", "op": "b"}', b'{' * 5000,
    b'{"a":' * 5000 + b'1' + b'}' * 5000, b'{"op": "a"', b'{\x00"op": 1}', b'\xef\xbb\xbf{"op": "a"}',
    '{"op": "é"}'.encode("utf-16"), b' {"op": "a"}', b'{"op": 1e999}', b'{"op": "a", "n": 12345678901234567890}',
])
def test_a_line_parses_as_json_loads_has_it(line):
    """parse_line's fast path for the common line: the object json.loads makes, or json.loads' own refusal."""
    try:
        expected = json.loads(line)
    except RecursionError:
        expected = "nested too deeply"
    except ValueError as exc:
        expected = f"not JSON: {exc}"
    else:
        if not isinstance(expected, dict) or not isinstance(expected.get("op"), str):
            expected = OBJECT
    got = parse_line(line)
    assert repr(got) == repr(expected)


@pytest.mark.parametrize("message", [
    {"ok": True, "seq": 5, "sha256": "ab" * 32, "offset": 0, "length": 11, "rang": [], "id": 3},
    {"ok": False, "error": "é\n\"\u2028", "rang": [{"peer": 1, "vector": 0, "held_until_ready": False}],
     "f": 1.5, "n": None, "nan": float("nan"), "big": 1 << 70},
])
def test_a_reply_is_encoded_as_json_dumps_has_it(message):
    from shmguard.control_server import _encode

    assert _encode(message) == json.dumps(message, sort_keys=True).encode() + b"\n"
