"""The asyncio client: :class:`AsyncClient`, :class:`AsyncSandbox`,
:class:`AsyncSession` and :class:`AsyncNode`, the awaitable twins of
:mod:`deltabox.sync` with the same methods, models and errors.

``AsyncNode.branch(n)`` issues its ``n`` branch calls concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import weakref
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx

from . import _api, _handles
from .errors import DeltaBoxError, error_from_response
from .models import (
    BranchOutcome,
    Diff,
    ExecResult,
    GcResult,
    NodeInfo,
    Removed,
    RollbackResult,
    RunResult,
    SandboxInfo,
    SessionInfo,
    Tree,
)

__all__ = ["AsyncClient", "AsyncSandbox", "AsyncSession", "AsyncNode", "default_async_client"]

T = TypeVar("T")


class AsyncClient:
    """An asyncio connection to ``deltaboxd`` over its Unix socket (see
    :class:`deltabox.Client` for the arguments). Use ``async with`` or :meth:`aclose`."""

    def __init__(
        self, socket: str | os.PathLike[str] | None = None, *, timeout: float = _api.DEFAULT_TIMEOUT
    ) -> None:
        self.socket = _api.socket_path(socket)
        self.timeout = timeout
        self._http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=self.socket), **_api.http_options(timeout)
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes the connection pool."""
        await self._http.aclose()

    async def call(self, call: _api.Call[T]) -> T:
        """Sends one request and parses the answer; raises the error's class."""
        try:
            response = await self._http.request(**_api.http_request(call, self.timeout))
        except httpx.HTTPError as err:
            raise _api.transport_error(call, self.socket, err) from err
        return _api.decode(call, response.status_code, response.content)

    async def stream_exec(
        self,
        call: _api.Call[ExecResult],
        on_stdout: _api.OutputCallback | None = None,
        on_stderr: _api.OutputCallback | None = None,
    ) -> ExecResult:
        """Sends an ``exec`` call for its streamed answer (see
        :meth:`deltabox.Client.stream_exec`); a callback may be a plain or an ``async``
        function (what it returns is awaited before the next chunk is read)."""
        reader = _api.ExecStream(call, on_stdout, on_stderr)
        try:
            async with self._http.stream(**_api.http_request(call, self.timeout, stream=True)) as response:
                if not 200 <= response.status_code < 300:
                    raise error_from_response(response.status_code, await response.aread())
                async for data in response.aiter_raw():
                    for returned in reader.feed(data):
                        if inspect.isawaitable(returned):
                            await returned
                # A last line without its newline (the daemon always sends one).
                for returned in reader.feed(b"\n"):
                    if inspect.isawaitable(returned):
                        await returned
        except httpx.HTTPError as err:
            raise _api.transport_error(call, self.socket, err) from err
        return reader.finish()

    async def request(
        self, method: str, path: str, body: Any = None, params: Mapping[str, str] | None = None
    ) -> Any:
        """Any API request (for routes the SDK does not wrap); the answer's JSON."""
        return await self.call(_api.raw(method, path, body, params))

    async def create(
        self,
        *,
        memory: int | str | None = None,
        cpus: float | None = None,
        pids: int | None = None,
        rootfs: str | os.PathLike[str] | None = None,
        auto_checkpoint: bool = False,
    ) -> AsyncSandbox:
        """A new sandbox; see :meth:`AsyncSandbox.create`."""
        call = _api.new_sandbox(
            memory=memory, cpus=cpus, pids=pids, rootfs=rootfs, auto_checkpoint=auto_checkpoint
        )
        return AsyncSandbox(self, await self.call(call))

    async def sandbox(self, sandbox_id: str) -> AsyncSandbox:
        """A handle to an existing sandbox (id or unique prefix)."""
        return AsyncSandbox(self, await self.call(_api.get_sandbox(sandbox_id)))

    async def sandboxes(self) -> list[AsyncSandbox]:
        """Every sandbox of the daemon, oldest first."""
        return [AsyncSandbox(self, info) for info in await self.call(_api.list_sandboxes())]

    async def node(self, node: str | NodeInfo | AsyncNode) -> AsyncNode:
        """A handle to a node (id, unique prefix, or its info)."""
        if isinstance(node, AsyncNode):
            return node
        if isinstance(node, NodeInfo):
            return AsyncNode(self, node)
        tree = await self.call(_api.node_tree(node))
        return AsyncNode(self, tree.node(node))

    async def diff(self, a: str | NodeInfo | AsyncNode, b: str | NodeInfo | AsyncNode) -> Diff:
        """Files added, removed and modified from node ``a`` to node ``b``."""
        return await self.call(_api.diff(_api.node_id(a), _api.node_id(b)))

    async def tree(self, node: str | NodeInfo | AsyncNode) -> Tree:
        """The tree a node belongs to."""
        return await self.call(_api.node_tree(_api.node_id(node)))

    async def gc(self) -> GcResult:
        """Drops layers no node references and trees with nothing left."""
        return await self.call(_api.gc())


# One default client per event loop: an httpx.AsyncClient must not outlive its loop.
_defaults: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, AsyncClient]] = (
    weakref.WeakKeyDictionary()
)


def default_async_client(socket: str | os.PathLike[str] | None = None) -> AsyncClient:
    """The running loop's client for a socket, made on first use (what
    :meth:`AsyncSandbox.create` uses when given no client)."""
    loop = asyncio.get_running_loop()
    path = _api.socket_path(socket)
    per_loop = _defaults.setdefault(loop, {})
    client = per_loop.get(path)
    if client is None:
        client = per_loop[path] = AsyncClient(path)
    return client


class AsyncNode(_handles.NodeBase[AsyncClient]):
    """A checkpoint (see :class:`deltabox.Node`)."""

    async def branch(
        self, n: int = 1, *, max_parallel: int = _api.BRANCH_PARALLELISM
    ) -> list[BranchOutcome[AsyncSandbox]]:
        """``n`` new sandboxes from this node, branched concurrently (up to
        ``max_parallel`` calls in flight), one call each: each outcome holds its sandbox
        or its error, in order."""
        self._check_branch(n, max_parallel)
        limit = asyncio.Semaphore(max_parallel)

        async def one(index: int) -> BranchOutcome[AsyncSandbox]:
            try:
                async with limit:
                    info, ms = await self.client.call(_api.branch_one(self.id))
            except DeltaBoxError as err:
                return BranchOutcome(index, error=err)
            return BranchOutcome(index, AsyncSandbox(self.client, info), branch_ms=ms)

        return list(await asyncio.gather(*(one(i) for i in range(n))))

    async def tree(self) -> Tree:
        """The tree this node belongs to."""
        return await self.client.call(_api.node_tree(self.id))

    async def diff(self, other: str | NodeInfo | AsyncNode) -> Diff:
        """Files changed from this node to ``other``."""
        return await self.client.diff(self, other)

    async def remove(self) -> Removed:
        """Removes this node and its subtree (refused while a sandbox is at one)."""
        return await self.client.call(_api.remove_node(self.id))


class AsyncSession(_handles.SessionBase["AsyncSandbox"]):
    """A persistent interpreter (see :class:`deltabox.Session`)."""

    async def run(self, code: str, *, timeout: float | None = None) -> RunResult:
        """Runs code; waits for it (see :meth:`deltabox.Session.run`)."""
        result = await self.sandbox.client.call(self._run_call(code, timeout))
        return await self.sandbox._checkpointed(result, code)

    async def close(self) -> SessionInfo:
        """Stops the interpreter."""
        return await self.sandbox.client.call(_api.session_stop(self.sandbox.id, self.id))

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(*_handles.SESSION_GONE):
            await self.close()


class AsyncSandbox(_handles.SandboxBase[AsyncClient]):
    """A sandbox (see :class:`deltabox.Sandbox`); ``async with`` removes it."""

    @classmethod
    async def create(
        cls,
        *,
        memory: int | str | None = None,
        cpus: float | None = None,
        pids: int | None = None,
        rootfs: str | os.PathLike[str] | None = None,
        auto_checkpoint: bool = False,
        client: AsyncClient | None = None,
    ) -> AsyncSandbox:
        """Creates a sandbox (arguments as :meth:`deltabox.Sandbox.create`)."""
        return await (client or default_async_client()).create(
            memory=memory, cpus=cpus, pids=pids, rootfs=rootfs, auto_checkpoint=auto_checkpoint
        )

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with _handles.removing(exc):
            await self.remove()

    # These two say what they are in fewer words than Sandbox's (their logic is shared).
    @property
    def tree_id(self) -> str:
        """The id of its checkpoint tree."""
        return self.info.tree

    @property
    def auto_checkpoint(self) -> bool:
        """See :attr:`deltabox.Sandbox.auto_checkpoint`."""
        return self._auto_checkpoint()

    @auto_checkpoint.setter
    def auto_checkpoint(self, value: bool) -> None:
        self._set_auto_checkpoint(value)

    async def refresh(self) -> SandboxInfo:
        """Reloads :attr:`info` from the daemon."""
        self.info = await self.client.call(_api.get_sandbox(self.id))
        return self.info

    async def exec(
        self,
        cmd: str | Sequence[str],
        *,
        timeout: float | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: str | bytes | None = None,
        on_stdout: _api.OutputCallback | None = None,
        on_stderr: _api.OutputCallback | None = None,
    ) -> ExecResult:
        """Runs a one-shot command (see :meth:`deltabox.Sandbox.exec`); with
        ``on_stdout``/``on_stderr`` (plain or ``async`` functions) its output is streamed
        to them."""
        call, what = self._exec_call(cmd, timeout=timeout, cwd=cwd, env=env, stdin=stdin)
        if on_stdout is None and on_stderr is None:
            return await self._checkpointed(await self.client.call(call), what)
        return await self._checkpointed(await self.client.stream_exec(call, on_stdout, on_stderr), what)

    async def _checkpointed(self, result: _api.R, what: str) -> _api.R:
        """``result``, with the checkpoint the SDK takes after ``what`` if it takes one."""
        call = self._auto_checkpoint_call(result, what)
        return result if call is None else _api.with_node(result, await self.client.call(call))

    async def session(self, kind: str = "bash") -> AsyncSession:
        """Starts a persistent ``"bash"`` or ``"python"`` session."""
        return AsyncSession(self, await self.client.call(_api.session_start(self.id, kind)))

    async def sessions(self) -> list[AsyncSession]:
        """Its live sessions."""
        return [AsyncSession(self, s) for s in (await self.refresh()).sessions]

    async def checkpoint(self, label: str | None = None) -> AsyncNode:
        """Checkpoints files and session processes together."""
        return AsyncNode(self.client, await self.client.call(_api.checkpoint(self.id, label)))

    async def rollback(
        self,
        node: str | NodeInfo | AsyncNode,
        *,
        files_only: bool = False,
        processes_only: bool = False,
        warm_up: bool | None = None,
    ) -> RollbackResult:
        """Goes to any node of this sandbox's tree (see :meth:`deltabox.Sandbox.rollback`)."""
        mode = _api.rollback_mode(files_only, processes_only)
        return await self.client.call(_api.rollback(self.id, _api.node_id(node), mode, warm_up))

    async def tree(self) -> Tree:
        """The checkpoint tree this sandbox belongs to."""
        return await self.client.call(_api.sandbox_tree(self.id))

    async def diff(self, a: str | NodeInfo | AsyncNode, b: str | NodeInfo | AsyncNode) -> Diff:
        """Files added, removed and modified from node ``a`` to node ``b``."""
        return await self.client.diff(a, b)

    async def node(self, node: str | NodeInfo | AsyncNode) -> AsyncNode:
        """A handle to a node."""
        return await self.client.node(node)

    async def remove(self) -> Removed:
        """Removes the sandbox (its nodes stay)."""
        return await self.client.call(_api.remove_sandbox(self.id))
