"""The reader of a streamed ``exec`` (no daemon): lines split anywhere between reads,
text and base64 chunks, the exit and error events, a stream cut short."""

from __future__ import annotations

import json

import pytest

import deltabox
from deltabox import _api


def call() -> _api.Call[deltabox.ExecResult]:
    return _api.exec_command("SB", ["true"], timeout=None, cwd=None, env=None, stdin=None, base_timeout=1)


def lines(*events: dict[str, object]) -> bytes:
    return b"".join(json.dumps(e).encode() + b"\n" for e in events)


EXIT = {"type": "exit", "exit_code": 2, "timed_out": False, "truncated": True, "duration_ms": 3.5}


def test_chunks_split_anywhere_reach_the_callbacks_in_order() -> None:
    got: list[tuple[str, str]] = []
    reader = _api.ExecStream(call(), lambda t: got.append(("out", t)), lambda t: got.append(("err", t)))
    data = lines(
        {"type": "stdout", "data": "one\n"},
        {"type": "stderr", "data": "warn\n"},
        {"type": "stdout", "data_b64": "/2I="},  # b"\xffb"
        {"type": "future_event", "whatever": 1},
        EXIT,
    )
    for i in range(0, len(data), 7):
        reader.feed(data[i : i + 7])
    result = reader.finish()
    assert got == [("out", "one\n"), ("err", "warn\n"), ("out", "\ufffdb")]
    assert (result.stdout, result.stderr) == ("one\n\ufffdb", "warn\n")
    assert (result.exit_code, result.truncated, result.duration_ms) == (2, True, 3.5)


def test_an_error_event_raises_its_class() -> None:
    reader = _api.ExecStream(call(), None, None)
    reader.feed(lines({"type": "stdout", "data": "started\n"}))
    error = {"type": "error", "code": "unknown_sandbox", "message": 'unknown sandbox "SB"', "status": 404}
    with pytest.raises(deltabox.UnknownSandbox) as raised:
        reader.feed(lines(error))
    assert raised.value.status == 404 and "SB" in str(raised.value)


def test_a_stream_without_its_last_event_is_a_protocol_error() -> None:
    reader = _api.ExecStream(call(), None, None)
    reader.feed(lines({"type": "stdout", "data": "x"}))
    with pytest.raises(deltabox.ProtocolError, match="ended before its exit event"):
        reader.finish()
    bad = _api.ExecStream(call(), None, None)
    with pytest.raises(deltabox.ProtocolError, match="not base64"):
        bad.feed(lines({"type": "stdout", "data_b64": "!!"}))
    with pytest.raises(deltabox.ProtocolError, match="cannot parse"):
        bad.feed(b"not json\n")
