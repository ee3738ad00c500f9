"""``exec`` with ``on_stdout``/``on_stderr`` against a real deltaboxd: output reaches
the callbacks while the command runs, the result is the same as the collected one,
errors before and after the start, and the asyncio twin."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import deltabox
from deltabox import AsyncClient, AsyncSandbox, Client
from deltabox._api import NDJSON, ExecStream, exec_command

pytestmark = pytest.mark.daemon

SCRIPT = "echo one; sleep 0.3; echo err >&2; sleep 2; echo two; exit 3"


def test_callbacks_get_output_while_the_command_runs(client: Client) -> None:
    with client.create() as sb:
        got: list[tuple[str, str, float]] = []
        start = time.monotonic()
        result = sb.exec(
            SCRIPT,
            on_stdout=lambda text: got.append(("out", text, time.monotonic() - start)),
            on_stderr=lambda text: got.append(("err", text, time.monotonic() - start)),
        )
        ended = time.monotonic() - start
        assert [(s, t) for s, t, _ in got] == [("out", "one\n"), ("err", "err\n"), ("out", "two\n")]
        # The first chunk came while the command still had two seconds to sleep.
        assert got[0][2] < 1.5, got
        assert ended - got[0][2] > 1.8, (got, ended)
        assert (result.stdout, result.stderr, result.exit_code) == ("one\ntwo\n", "err\n", 3)
        assert not result.timed_out and not result.truncated and result.node is None
        # The same as the collected exec.
        collected = sb.exec(SCRIPT)
        assert (collected.stdout, collected.stderr, collected.exit_code) == (
            result.stdout,
            result.stderr,
            result.exit_code,
        )


def test_one_callback_is_enough_and_the_result_keeps_both_streams(client: Client) -> None:
    with client.create(auto_checkpoint=True) as sb:
        chunks: list[str] = []
        result = sb.exec("printf 'a\\377b\\n'; echo oops >&2", on_stdout=chunks.append)
        assert "".join(chunks) == "a\ufffdb\n"
        assert result.stdout == "a\ufffdb\n" and result.stderr == "oops\n"
        assert result.node is not None  # the exit event carries the auto-checkpoint
        assert result.node.id in {n.id for n in sb.tree().nodes}


def test_a_timeout_is_in_the_result(client: Client) -> None:
    with client.create() as sb:
        chunks: list[str] = []
        result = sb.exec("echo started; sleep 30", timeout=0.5, on_stdout=chunks.append)
        assert chunks == ["started\n"]
        assert result.timed_out and not result.ok


def test_errors_before_and_after_the_start(client: Client) -> None:
    with client.create() as sb:
        with pytest.raises(deltabox.InvalidRequest):
            sb.exec([""], on_stdout=print)
        # Removed while the command runs: the stream ends with an error event.
        first = threading.Event()

        def remove_soon() -> None:
            first.wait(30)
            sb.remove()  # not `client.sandbox(id)`: a GET waits for the sandbox's lock

        remover = threading.Thread(target=remove_soon)
        remover.start()
        try:
            with pytest.raises(deltabox.UnknownSandbox) as raised:
                sb.exec("echo started; sleep 60", on_stdout=lambda _: first.set())
        finally:
            first.set()
            remover.join(60)
        assert sb.id in str(raised.value)
    with pytest.raises(deltabox.UnknownSandbox):
        sb.exec("true", on_stdout=print)


def test_a_callback_that_raises_stops_the_reading(client: Client) -> None:
    with client.create() as sb:

        def boom(_: str) -> None:
            raise RuntimeError("no more")

        with pytest.raises(RuntimeError, match="no more"):
            sb.exec("echo one; sleep 1; echo two", on_stdout=boom)
        # The sandbox still serves.
        assert sb.exec("echo ok").stdout == "ok\n"


def test_the_raw_stream_is_ndjson(client: Client) -> None:
    with client.create() as sb:
        call = exec_command(
            sb.id, ["echo", "hi"], timeout=None, cwd=None, env=None, stdin=None, base_timeout=60
        )
        with client._http.stream("POST", call.path, json=call.body, headers={"Accept": NDJSON}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == NDJSON
            reader = ExecStream(call, None, None)
            for data in response.iter_raw():
                reader.feed(data)
        assert reader.finish().stdout == "hi\n"


def test_async_callbacks(client: Client) -> None:
    socket = client.socket

    async def main() -> None:
        async with AsyncClient(socket, timeout=120) as aclient:
            async with await AsyncSandbox.create(client=aclient) as sb:
                got: list[tuple[str, float]] = []
                start = time.monotonic()
                result = await sb.exec(
                    "echo one; sleep 2; echo two",
                    on_stdout=lambda text: got.append((text, time.monotonic() - start)),
                )
                assert [t for t, _ in got] == ["one\n", "two\n"]
                assert got[0][1] < 1.5 and got[1][1] - got[0][1] > 1.5, got
                assert result.stdout == "one\ntwo\n" and result.exit_code == 0
                errors: list[str] = []

                async def on_stderr(text: str) -> None:
                    await asyncio.sleep(0.01)
                    errors.append(text)

                failed = await sb.exec("echo bad >&2; exit 4", on_stderr=on_stderr)
                assert errors == ["bad\n"] and failed.exit_code == 4

    asyncio.run(main())
