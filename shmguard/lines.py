"""`shmguard write --lines`: standard input, one message per line, each an audited text write, over one control
connection with the requests pipelined.

A line is its bytes up to the newline (a last line without one counts). A line this client can tell is wrong (a
NUL inside it; longer than the policy's region leaves room for from --offset) stops the run before it is sent;
a line the supervisor refuses stops the sending of further lines, the replies still owed are read, and the run
ends non-zero with one line naming the first line that failed. The summary says exactly which lines were written
(each once: nothing is sent twice), and which were not.
"""

from __future__ import annotations

import sys

from .control_client import ControlClient, Pipeline, write_body
from .errors import ControlError, ShmguardError

WINDOW = 256  # writes sent ahead of their replies: enough that the supervisor serves the next batch while the
# fsync of the last one runs (with 64 it waited for each fsync with nothing to do)
WAITING_WINDOW = 2  # writes waiting for the guest's ack: one acknowledged, one queued behind it (shares.queued_writes)


class Outcome:
    """What became of each line."""

    def __init__(self) -> None:
        self.read = 0  # lines read from standard input
        self.written: dict[int, int] = {}  # line number -> audit seq, for every line in the region
        self.failed: dict[int, str] = {}  # line number -> why (a written line may also have failed: no ack)
        self.unknown: list[int] = []  # sent, but the connection ended before its reply
        self.unknown_reason = ""
        self.stopped: tuple[int, str] | None = None  # the line this client refused to send, and why
        self.acks = self.exact = self.rang = 0

    def add(self, number: int, reply: dict) -> None:
        if "seq" in reply:
            self.written[number] = reply["seq"]
        self.rang += len(reply.get("rang", ()))
        if "ack" in reply:
            self.acks += 1
            self.exact += bool(reply.get("delivered_exactly"))
        if not reply.get("ok"):
            self.failed[number] = str(reply.get("error", "the supervisor refused the request"))

    @property
    def ok(self) -> bool:
        return not (self.failed or self.unknown or self.stopped)

    def first_failure(self) -> str | None:
        """The one line that names the first line that failed, or None."""
        problems = [(number, error) for number, error in self.failed.items()]
        if self.unknown:
            problems.append((self.unknown[0], self.unknown_reason))
        if self.stopped:
            problems.append(self.stopped)
        if not problems:
            return None
        number, error = min(problems)
        written = f"written: {ranges(self.written) or 'none'}"
        return f"line {number}: {error} ({written})"

    def describe(self) -> dict:
        seqs = sorted(self.written.values())
        return {"lines_read": self.read, "written": len(self.written), "written_lines": ranges(self.written),
                "first_seq": seqs[0] if seqs else None, "last_seq": seqs[-1] if seqs else None,
                "failed": [{"line": number, "error": error, "written": number in self.written}
                           for number, error in sorted(self.failed.items())],
                "unknown_lines": ranges(self.unknown), "not_sent_from": self.stopped[0] if self.stopped else None,
                "rang": self.rang, "acknowledged": self.acks, "delivered_exactly": self.exact}

    def summary(self, offset: int) -> str:
        seqs = sorted(self.written.values())
        text = f"wrote {len(self.written)} of {self.read} line{'s' if self.read != 1 else ''} at offset {offset}"
        if seqs:
            text += f" (audit seq {seqs[0]}..{seqs[-1]})" if len(seqs) > 1 else f" (audit seq {seqs[0]})"
        lines = [text]
        if not self.ok:
            lines.append(f"written: {ranges(self.written) or 'none'}")
            for number, error in sorted(self.failed.items()):
                state = "written, then failed" if number in self.written else "not written"
                lines.append(f"line {number}: {state}: {error}")
            if self.unknown:
                lines.append(f"lines {ranges(self.unknown)}: sent, outcome unknown ({self.unknown_reason}); "
                             "see `shmguard audit show`")
            if self.stopped:
                lines.append(f"line {self.stopped[0]}: not sent: {self.stopped[1]}; no later line was sent")
        if self.rang:
            lines.append(f"{self.rang} ring{'s' if self.rang != 1 else ''}")
        if self.acks:
            lines.append(f"the guest acknowledged {self.acks}, {self.exact} delivered exactly")
        return "\n".join(lines)


def ranges(numbers) -> str:
    """1-4,6,9-10"""
    ordered, spans = sorted(numbers), []
    for number in ordered:
        if spans and spans[-1][1] == number - 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def line_problem(line: bytes, offset: int, region_size: int, allow_unterminated: bool) -> str | None:
    """Why this client will not send a line, or None (the supervisor checks everything again)."""
    nul = line.find(b"\0")
    if nul >= 0:
        return f"a NUL at byte {nul}: a text message ends at its first NUL"
    room = region_size - offset
    if 0 < room and len(line) > room - (0 if allow_unterminated else 1):
        most = room if allow_unterminated else room - 1
        return (f"{len(line)} bytes, and the policy's {region_size}-byte region holds at most {most} from offset "
                f"{offset}" + ("" if allow_unterminated else " with the NUL after them"))
    return None


def read_lines(stream):
    """Each line's bytes without its newline; a last line with no newline counts."""
    for line in stream:
        yield line[:-1] if line.endswith(b"\n") else line


def write_lines(client: ControlClient, region_size: int, stream, *, offset: int = 0, ring: str | None = None,
                wait: bool = False, timeout: float = 60.0, allow_unterminated: bool = False,
                as_json: bool = False) -> int:
    """Write every line of stream; print the summary; the exit status (0: every line written and answered)."""
    outcome = Outcome()
    reply_seconds = client.reply_seconds(write_body(b"", offset, True, ring, wait, timeout))
    window = WAITING_WINDOW if wait else WINDOW
    pipeline = Pipeline(client.connect(reply_seconds), window)
    try:
        for number, line in enumerate(read_lines(stream), 1):
            outcome.read = number
            if (problem := line_problem(line, offset, region_size, allow_unterminated)) is not None:
                outcome.stopped = (number, problem)
                break
            if pipeline.idle_and_closed():  # the supervisor closes a connection idle for control.idle_seconds
                _collect(pipeline, outcome)
                pipeline.connection.close()
                pipeline = Pipeline(client.connect(reply_seconds), window)
            pipeline.send(number, write_body(line, offset, True, ring, wait, timeout, allow_unterminated))
            _collect(pipeline, outcome)
            if outcome.failed:
                break
        pipeline.finish()
        _collect(pipeline, outcome)
    except ControlError as exc:
        _collect(pipeline, outcome)
        outcome.unknown = sorted(pipeline.unanswered.values())
        outcome.unknown_reason = str(exc)
        if not outcome.unknown:
            raise
    finally:
        pipeline.connection.close()
    return _report(outcome, offset, as_json)


def _collect(pipeline: Pipeline, outcome: Outcome) -> None:
    for number, reply in pipeline.take():
        outcome.add(number, reply)


def _report(outcome: Outcome, offset: int, as_json: bool) -> int:
    if as_json:
        import json

        sys.stdout.write(json.dumps(outcome.describe(), indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(outcome.summary(offset) + "\n")
    sys.stdout.flush()
    failure = outcome.first_failure()
    if failure is None:
        return 0
    raise ShmguardError(failure)
