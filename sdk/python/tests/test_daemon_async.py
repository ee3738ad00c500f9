"""The asyncio client against a real deltaboxd: the same calls as test_daemon.py,
awaited, and branches made concurrently."""

from __future__ import annotations

import asyncio

import pytest
from conftest import Daemon

import deltabox
from deltabox import AsyncClient, AsyncSandbox

pytestmark = pytest.mark.daemon


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_async_every_call(daemon: Daemon) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.socket, timeout=120) as client:
            async with await AsyncSandbox.create(memory="512M", pids=256, client=client) as sb:
                assert sb.info.limits.memory_bytes == 512 << 20
                assert (await sb.exec("echo hi")).stdout == "hi\n"
                assert (await sb.exec(["pwd"], cwd="/tmp")).stdout == "/tmp\n"
                assert sb.id in [s.id for s in await client.sandboxes()]
                assert (await client.sandbox(sb.id[:-4])) == sb
                py = await sb.session("python")
                await py.run("x = 41")
                await sb.exec("echo one > /workspace/f")
                node = await sb.checkpoint(label="one")
                await py.run("x = 0")
                await sb.exec("echo two > /workspace/f")
                diff = await sb.diff(node, (await sb.checkpoint(label="two")).id)
                assert "/workspace/f" in diff.paths("modified")
                result = await sb.rollback(node)
                assert result.node == node.id
                assert (await py.run("print(x)")).stdout == "41\n"
                assert (await sb.exec("cat /workspace/f")).stdout == "one\n"
                await sb.exec("echo three > /workspace/f")
                await sb.rollback(node, files_only=True)
                assert (await sb.exec("cat /workspace/f")).stdout == "one\n"
                tree = await sb.tree()
                assert {"one", "two"} <= {n.label for n in tree.nodes}
                assert (await node.tree()).tree == tree.tree
                assert (await client.node(node.id)).id == node.id
                async with await sb.session("bash") as bash:
                    assert (await bash.run("echo $((6*7))")).stdout == "42\n"
                assert [s.id for s in await sb.sessions()] == [py.id]
                sb.auto_checkpoint = True
                auto = (await sb.exec("true")).node
                assert auto is not None and auto.parent == node.id
                with pytest.raises(deltabox.UnknownNode):
                    await sb.rollback("00000000-0000-7000-8000-000000000000")
            with pytest.raises(deltabox.UnknownSandbox):
                await client.sandbox(sb.id)
            assert isinstance(await client.gc(), deltabox.GcResult)

    run(main())


def test_async_branches_run_concurrently(daemon: Daemon) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.socket, timeout=120) as client:
            async with await client.create() as sb:
                py = await sb.session("python")
                await py.run("import os; x = 41")
                node = await sb.checkpoint(label="fan-out")
                outcomes = await node.branch(4)
                try:
                    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
                    branches = [o.unwrap() for o in outcomes]

                    async def work(i: int, b: AsyncSandbox) -> str:
                        (session,) = await b.sessions()
                        return (await session.run(f"x += {i}; print(x)")).stdout

                    outs = await asyncio.gather(*(work(i, b) for i, b in enumerate(branches)))
                    assert outs == [f"{41 + i}\n" for i in range(4)]
                    assert (await py.run("print(x)")).stdout == "41\n"
                finally:
                    for o in outcomes:
                        if o.sandbox is not None:
                            await o.sandbox.remove()

    run(main())


def test_async_default_client(daemon: Daemon, socket_env: str) -> None:
    async def main() -> None:
        async with await AsyncSandbox.create() as sb:
            assert sb.client.socket == socket_env
            assert (await sb.exec("echo ok")).stdout == "ok\n"

    run(main())
