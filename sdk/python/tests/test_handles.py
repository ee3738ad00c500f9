"""The handles' shared, I/O-free behaviour (deltabox._handles), on both families: reprs,
equality, the auto-checkpoint flag and the clean-up rules of leaving a block. No daemon:
the clients are made on a socket nobody listens on and these paths make no call."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import samples

import deltabox
from deltabox import _handles, errors
from deltabox.models import NodeInfo, SandboxInfo, SessionInfo


def infos() -> tuple[NodeInfo, SandboxInfo, SessionInfo]:
    return (
        NodeInfo.from_json(samples.node("n-1", label="start")),
        SandboxInfo.from_json(samples.sandbox()),
        SessionInfo.from_json(samples.session()),
    )


def test_reprs_name_the_public_class(tmp_path: Path) -> None:
    node, sandbox, session = infos()
    client = deltabox.Client(tmp_path / "none.sock")
    aclient = deltabox.AsyncClient(tmp_path / "none.sock")
    sb = deltabox.Sandbox(client, sandbox)
    asb = deltabox.AsyncSandbox(aclient, sandbox)
    assert repr(deltabox.Node(client, node)) == "Node(id='n-1', label='start')"
    assert repr(deltabox.AsyncNode(aclient, node)) == "AsyncNode(id='n-1', label='start')"
    assert repr(sb) == f"Sandbox(id={sandbox.id!r}, tree={sandbox.tree!r})"
    assert repr(asb) == f"AsyncSandbox(id={sandbox.id!r}, tree={sandbox.tree!r})"
    assert repr(deltabox.Session(sb, session)) == (
        f"Session(id={session.id!r}, kind={session.kind!r}, sandbox={sandbox.id!r})"
    )
    assert repr(deltabox.AsyncSession(asb, session)).startswith(f"AsyncSession(id={session.id!r}, ")

    class MyNode(deltabox.Node):
        pass

    assert repr(MyNode(client, node)) == "Node(id='n-1', label='start')"


def test_equality_is_by_id_within_a_family(tmp_path: Path) -> None:
    node, sandbox, session = infos()
    client = deltabox.Client(tmp_path / "none.sock")
    aclient = deltabox.AsyncClient(tmp_path / "none.sock")
    other = NodeInfo.from_json(samples.node("n-2"))

    class MyNode(deltabox.Node):
        pass

    a, b, mine = deltabox.Node(client, node), deltabox.Node(client, node), MyNode(client, node)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a == mine and mine == a  # a subclass stays equal to the class it extends
    assert a != deltabox.Node(client, other)
    assert a != deltabox.AsyncNode(aclient, node)  # the other family's handle is another thing
    assert a != node.id
    assert deltabox.Sandbox(client, sandbox) == deltabox.Sandbox(client, sandbox)
    assert deltabox.Sandbox(client, sandbox) != deltabox.AsyncSandbox(aclient, sandbox)
    sb = deltabox.Sandbox(client, sandbox)
    # Sessions compare by identity, as before.
    assert deltabox.Session(sb, session) != deltabox.Session(sb, session)


def test_auto_checkpoint_flag(tmp_path: Path) -> None:
    client = deltabox.Client(tmp_path / "none.sock")
    aclient = deltabox.AsyncClient(tmp_path / "none.sock")

    def both(info: SandboxInfo) -> list[_handles.SandboxBase[Any]]:
        return [deltabox.Sandbox(client, info), deltabox.AsyncSandbox(aclient, info)]

    for plain in both(SandboxInfo.from_json(samples.sandbox())):
        assert not plain.auto_checkpoint
        plain.auto_checkpoint = True
        assert plain.auto_checkpoint and plain._client_auto
        plain.auto_checkpoint = False
        assert not plain.auto_checkpoint
    for daemon_side in both(SandboxInfo.from_json(samples.sandbox(auto_checkpoint=True))):
        assert daemon_side.auto_checkpoint and not daemon_side._client_auto
        daemon_side.auto_checkpoint = True  # already on: the SDK takes no checkpoint of its own
        assert not daemon_side._client_auto
        with pytest.raises(ValueError, match="cannot turn it off"):
            daemon_side.auto_checkpoint = False


def test_the_async_properties_keep_their_docstrings() -> None:
    assert deltabox.AsyncSandbox.tree_id.__doc__ == "The id of its checkpoint tree."
    assert deltabox.AsyncSandbox.auto_checkpoint.__doc__ == "See :attr:`deltabox.Sandbox.auto_checkpoint`."
    assert (deltabox.Sandbox.tree_id.__doc__ or "").startswith("The id of its checkpoint tree (shared")


def test_leaving_a_sandbox_block() -> None:
    with _handles.removing(None):
        raise errors.UnknownSandbox("gone already")
    with pytest.raises(errors.Busy):
        with _handles.removing(None):
            raise errors.Busy("a failed removal with nothing else to report")
    block_error = RuntimeError("the block's own")
    with _handles.removing(block_error):
        raise errors.Busy("hidden: the block's exception matters more")
    with pytest.raises(KeyError):
        with _handles.removing(block_error):
            raise KeyError("not a DeltaBoxError: never swallowed")


def test_branch_arguments_are_checked_before_any_call(tmp_path: Path) -> None:
    node, _, _ = infos()
    anode = deltabox.AsyncNode(deltabox.AsyncClient(tmp_path / "none.sock"), node)
    with pytest.raises(ValueError, match="branch count must be at least 1, not 0"):
        asyncio.run(anode.branch(0))
    with pytest.raises(ValueError, match="max_parallel must be at least 1, not 0"):
        asyncio.run(anode.branch(2, max_parallel=0))
