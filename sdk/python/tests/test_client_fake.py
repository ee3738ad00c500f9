"""Unit tests of the SDK's client logic against a scripted fake daemon on a Unix
socket (fake_daemon.py): what it sends, how every error kind maps to its exception,
partial branch failure, client-side auto-checkpoint. The real daemon: test_daemon*.py.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import samples
from fake_daemon import FakeDaemon, Request, running_fake

import deltabox
from deltabox import errors

REPO = Path(__file__).resolve().parents[3]
SB = samples.sandbox()["id"]
NODE = samples.node()["id"]


@pytest.fixture
def fake() -> Iterator[FakeDaemon]:
    with running_fake() as fake:
        yield fake


@pytest.fixture
def client(fake: FakeDaemon) -> Iterator[deltabox.Client]:
    with deltabox.Client(fake.socket, timeout=10) as client:
        yield client


def rust_kinds() -> list[str]:
    """Every kind the daemon can answer, read from its sources (the contract)."""
    sandbox = (REPO / "controller/src/sandbox/error.rs").read_text()
    block = re.search(r"const KINDS: \[&'static str; \d+\] = \[(.*?)\];", sandbox, re.S)
    assert block, "SandboxError::KINDS not found in controller/src/sandbox/error.rs"
    kinds = re.findall(r'"([a-z_]+)"', block.group(1))
    api = (REPO / "controller/src/api/mod.rs").read_text()
    as_str = re.search(r"pub fn as_str\(self\) -> &'static str \{(.*?)\n    \}", api, re.S)
    assert as_str, "ErrorKind::as_str not found in controller/src/api/mod.rs"
    kinds += re.findall(r'=> "([a-z_]+)"', as_str.group(1))
    return sorted(set(kinds))


def test_every_daemon_kind_has_its_exception() -> None:
    kinds = rust_kinds()
    assert len(kinds) >= 20, kinds
    missing = [k for k in kinds if k not in errors.KINDS]
    assert not missing, f"kinds without an exception class: {missing}"


@pytest.mark.parametrize("kind", rust_kinds())
def test_each_kind_raises_its_class(fake: FakeDaemon, client: deltabox.Client, kind: str) -> None:
    fake.on("GET", f"/v1/sandboxes/{SB}", (418, {"error": f"the message of {kind}", "kind": kind}))
    with pytest.raises(errors.DeltaBoxError) as caught:
        client.sandbox(SB)
    err = caught.value
    assert type(err) is errors.KINDS[kind]
    assert (err.kind, err.status, err.message) == (kind, 418, f"the message of {kind}")
    assert kind in str(err)


def test_bases_group_kinds() -> None:
    assert issubclass(errors.UnknownSandbox, errors.NotFound)
    assert issubclass(errors.UnknownNode, errors.NotFound)
    assert issubclass(errors.AmbiguousId, errors.InvalidArgument)
    assert issubclass(errors.NodeOfAnotherTree, errors.Conflict)
    assert issubclass(errors.NodeInUse, errors.Conflict)
    assert issubclass(errors.ProcessNotRestorable, errors.RestoreFailed)


def test_unknown_kind_keeps_its_kind(fake: FakeDaemon, client: deltabox.Client) -> None:
    fake.on("GET", f"/v1/sandboxes/{SB}", (409, {"error": "a newer daemon", "kind": "brand_new"}))
    with pytest.raises(errors.DeltaBoxError) as caught:
        client.sandbox(SB)
    assert type(caught.value) is errors.DeltaBoxError and caught.value.kind == "brand_new"


def test_non_json_answer_is_a_protocol_error(fake: FakeDaemon, client: deltabox.Client) -> None:
    fake.on("GET", f"/v1/sandboxes/{SB}", (502, b"<html>bad gateway</html>"))
    with pytest.raises(errors.ProtocolError, match="bad gateway"):
        client.sandbox(SB)
    fake.on("GET", f"/v1/sandboxes/{SB}", (200, {"id": SB}))
    with pytest.raises(errors.ProtocolError, match="'tree'"):
        client.sandbox(SB)


def test_missing_socket_is_unreachable(tmp_path: Path) -> None:
    with (
        deltabox.Client(tmp_path / "none.sock") as client,
        pytest.raises(errors.DaemonUnreachable, match=r"none\.sock"),
    ):
        client.sandboxes()


def test_client_timeout(fake: FakeDaemon) -> None:
    import time

    def slow(_r: Request) -> tuple[int, object]:
        time.sleep(1.0)
        return 200, {"sandboxes": []}

    fake.on("GET", "/v1/sandboxes", slow)
    with deltabox.Client(fake.socket, timeout=0.2) as client, pytest.raises(errors.ClientTimeout):
        client.sandboxes()


def test_socket_from_environment(fake: FakeDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTABOX_SOCKET", fake.socket)
    assert deltabox.Client().socket == fake.socket


def script_sandbox(fake: FakeDaemon) -> None:
    fake.on("POST", "/v1/sandboxes", (201, samples.sandbox()))
    fake.on("DELETE", f"/v1/sandboxes/{SB}", (200, {"nodes": [], "sandboxes": [SB]}))
    fake.on("POST", f"/v1/sandboxes/{SB}/exec", (200, samples.exec_result()))
    fake.on(
        "POST",
        f"/v1/sandboxes/{SB}/checkpoint",
        lambda r: (201, samples.node(label=(r.body or {}).get("label"))),
    )
    fake.on("POST", f"/v1/sandboxes/{SB}/sessions", (201, samples.session()))
    fake.on("POST", f"/v1/sandboxes/{SB}/sessions/s1/run", (200, samples.run_result()))
    fake.on("DELETE", f"/v1/sandboxes/{SB}/sessions/s1", (200, samples.session()))
    fake.on(
        "POST",
        f"/v1/sandboxes/{SB}/rollback",
        lambda r: (
            200,
            {"sandbox": SB, "node": r.body["node"], "mode": r.body["mode"], "sessions": [], "timings": {}},
        ),
    )


def test_requests_have_the_api_shape(fake: FakeDaemon, client: deltabox.Client) -> None:
    script_sandbox(fake)
    with deltabox.Sandbox.create(memory="1G", cpus=0.5, pids=64, rootfs="/srv/root", client=client) as sb:
        sb.exec("echo hi", timeout=2.5, cwd="/tmp", env={"A": "1"}, stdin=b"in")
        sb.exec(["ls", "-l"])
        node = sb.checkpoint(label="first")
        sb.rollback(node, files_only=True)
        sb.rollback(node.id)
        assert not sb.rollback(node, warm_up=True).warm_up
        with sb.session("python") as py:
            py.run("x = 1", timeout=1)
    assert fake.sent("POST", "/v1/sandboxes")[0].body == {
        "limits": {"memory_bytes": 1 << 30, "cpus": 0.5, "pids": 64},
        "auto_checkpoint": False,
        "rootfs": "/srv/root",
    }
    first, second = (r.body for r in fake.sent("POST", f"/v1/sandboxes/{SB}/exec"))
    assert first == {
        "argv": ["bash", "-c", "echo hi"],
        "env": {"A": "1"},
        "cwd": "/tmp",
        "stdin": "in",
        "timeout_ms": 2500,
    }
    assert second == {"argv": ["ls", "-l"]}
    assert fake.sent("POST", f"/v1/sandboxes/{SB}/checkpoint")[0].body == {"label": "first"}
    modes = [r.body for r in fake.sent("POST", f"/v1/sandboxes/{SB}/rollback")]
    assert modes == [
        {"node": NODE, "mode": "files_only"},
        {"node": NODE, "mode": "all"},
        {"node": NODE, "mode": "all", "warm_up": True},
    ]
    assert fake.sent("POST", f"/v1/sandboxes/{SB}/sessions")[0].body == {"kind": "python"}
    assert fake.sent("POST", f"/v1/sandboxes/{SB}/sessions/s1/run")[0].body == {
        "code": "x = 1",
        "timeout_ms": 1000,
    }
    assert len(fake.sent("DELETE", f"/v1/sandboxes/{SB}/sessions/s1")) == 1
    assert len(fake.sent("DELETE", f"/v1/sandboxes/{SB}")) == 1


def test_context_manager_tolerates_an_already_removed_sandbox(
    fake: FakeDaemon, client: deltabox.Client
) -> None:
    script_sandbox(fake)
    fake.on("DELETE", f"/v1/sandboxes/{SB}", (404, {"error": "unknown sandbox", "kind": "unknown_sandbox"}))
    with deltabox.Sandbox.create(client=client):
        pass


def test_diff_query(fake: FakeDaemon, client: deltabox.Client) -> None:
    fake.on("GET", "/v1/diff", lambda r: (200, {"from": r.query["from"], "to": r.query["to"], "changes": []}))
    diff = client.diff("n1", samples_node_info())
    assert (diff.from_, diff.to) == ("n1", NODE)


def samples_node_info() -> deltabox.NodeInfo:
    return deltabox.NodeInfo.from_json(samples.node())


def branch_script(fake: FakeDaemon, fail_every: int) -> None:
    """Every ``fail_every``-th branch call fails with node_not_restorable."""
    counter = {"n": 0}

    def branch(r: Request) -> tuple[int, object]:
        assert r.body == {"count": 1}
        with fake.lock:
            counter["n"] += 1
            n = counter["n"]
        if n % fail_every == 0:
            return 422, {"error": f"branch {n} failed", "kind": "node_not_restorable"}
        return 201, {"node": NODE, "sandboxes": [samples.sandbox(f"branch-{n}")], "branch_ms": [float(n)]}

    fake.on("POST", f"/v1/nodes/{NODE}/branch", branch)


def test_branch_partial_failure_sync(fake: FakeDaemon, client: deltabox.Client) -> None:
    branch_script(fake, fail_every=2)
    outcomes = client.node(samples_node_info()).branch(4)
    assert [o.index for o in outcomes] == [0, 1, 2, 3]
    ok = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    assert len(ok) == 2 and len(failed) == 2
    assert all(isinstance(o.unwrap(), deltabox.Sandbox) for o in ok)
    for o in failed:
        assert isinstance(o.error, errors.NodeNotRestorable)
        with pytest.raises(errors.NodeNotRestorable):
            o.unwrap()
    assert len(fake.sent("POST", f"/v1/nodes/{NODE}/branch")) == 4


def test_branch_partial_failure_async(fake: FakeDaemon) -> None:
    branch_script(fake, fail_every=3)

    async def main() -> list[deltabox.BranchOutcome[deltabox.AsyncSandbox]]:
        async with deltabox.AsyncClient(fake.socket) as client:
            node = await client.node(samples_node_info())
            return await node.branch(6)

    outcomes = asyncio.run(main())
    assert sum(o.ok for o in outcomes) == 4
    assert sum(isinstance(o.error, errors.NodeNotRestorable) for o in outcomes) == 2


def test_client_side_auto_checkpoint(fake: FakeDaemon, client: deltabox.Client) -> None:
    script_sandbox(fake)
    sb = client.create()
    assert not sb.auto_checkpoint
    assert sb.exec("true").node is None
    sb.auto_checkpoint = True
    result = sb.exec("make test")
    assert result.node is not None and result.node.label == "make test"
    run = sb.session("python").run("x = 1")
    assert run.node is not None and run.node.label == "x = 1"
    assert len(fake.sent("POST", f"/v1/sandboxes/{SB}/checkpoint")) == 2
    sb.auto_checkpoint = False
    sb.exec("true")
    assert len(fake.sent("POST", f"/v1/sandboxes/{SB}/checkpoint")) == 2


def test_server_side_auto_checkpoint_cannot_be_turned_off(fake: FakeDaemon, client: deltabox.Client) -> None:
    fake.on("POST", "/v1/sandboxes", (201, samples.sandbox(auto_checkpoint=True)))
    fake.on(
        "POST", f"/v1/sandboxes/{SB}/exec", (200, samples.exec_result(node=samples.node(label="by daemon")))
    )
    sb = client.create(auto_checkpoint=True)
    assert fake.sent("POST", "/v1/sandboxes")[0].body["auto_checkpoint"] is True
    assert sb.auto_checkpoint
    node = sb.exec("true").node
    assert node is not None and node.label == "by daemon"
    assert not fake.sent("POST", f"/v1/sandboxes/{SB}/checkpoint")
    with pytest.raises(ValueError, match="cannot turn it off"):
        sb.auto_checkpoint = False


def test_async_parity_of_shapes(fake: FakeDaemon) -> None:
    script_sandbox(fake)

    async def main() -> None:
        async with deltabox.AsyncClient(fake.socket) as client:
            async with await deltabox.AsyncSandbox.create(memory="1G", client=client) as sb:
                await sb.exec("echo hi", timeout=2.5)
                node = await sb.checkpoint(label="first")
                await sb.rollback(node, processes_only=True)
                async with await sb.session("python") as py:
                    assert (await py.run("x")).stdout == "41\n"

    asyncio.run(main())
    assert fake.sent("POST", f"/v1/sandboxes/{SB}/exec")[0].body == {
        "argv": ["bash", "-c", "echo hi"],
        "timeout_ms": 2500,
    }
    assert fake.sent("POST", f"/v1/sandboxes/{SB}/rollback")[0].body == {
        "node": NODE,
        "mode": "processes_only",
    }
    assert len(fake.sent("DELETE", f"/v1/sandboxes/{SB}")) == 1


def test_sync_and_async_have_the_same_methods() -> None:
    pairs = [
        (deltabox.Client, deltabox.AsyncClient),
        (deltabox.Sandbox, deltabox.AsyncSandbox),
        (deltabox.Session, deltabox.AsyncSession),
        (deltabox.Node, deltabox.AsyncNode),
    ]
    for sync_cls, async_cls in pairs:
        sync_api = {m for m in dir(sync_cls) if not m.startswith("_")}
        async_api = {m for m in dir(async_cls) if not m.startswith("_")}
        if sync_cls is deltabox.Client:  # httpx's naming: close / aclose
            sync_api.remove("close")
            async_api.remove("aclose")
        assert sync_api == async_api, (sync_cls.__name__, sync_api ^ async_api)


def test_branch_one_at_a_time(fake: FakeDaemon, client: deltabox.Client) -> None:
    branch_script(fake, fail_every=3)
    outcomes = client.node(samples_node_info()).branch(3, max_parallel=1)
    # sequential: the third call is the one that fails
    assert [o.ok for o in outcomes] == [True, True, False]
    assert [o.unwrap().id for o in outcomes[:2]] == ["branch-1", "branch-2"]
    with pytest.raises(ValueError, match="max_parallel"):
        client.node(samples_node_info()).branch(2, max_parallel=0)
    with pytest.raises(ValueError, match="count"):
        client.node(samples_node_info()).branch(0)
