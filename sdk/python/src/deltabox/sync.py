"""The blocking client: :class:`Client` (one connection pool to ``deltaboxd``) and the
handles :class:`Sandbox`, :class:`Session` and :class:`Node` built on it.

The asyncio twins in :mod:`deltabox.aio` have the same methods, awaited.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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

__all__ = ["Client", "Sandbox", "Session", "Node", "default_client"]

T = TypeVar("T")
BRANCH_PARALLELISM = _api.BRANCH_PARALLELISM


class Client:
    """A connection to ``deltaboxd`` over its Unix socket.

    Args:
        socket: the daemon's socket (default ``$DELTABOX_SOCKET``, else
            ``/run/deltabox/api.sock``).
        timeout: read timeout of calls that run no user code, in seconds. Calls that do
            (``exec``, ``session.run``) wait for their own timeout plus a margin, never
            less.

    Thread-safe; use it as a context manager or call :meth:`close`.
    """

    def __init__(
        self, socket: str | os.PathLike[str] | None = None, *, timeout: float = _api.DEFAULT_TIMEOUT
    ) -> None:
        self.socket = _api.socket_path(socket)
        self.timeout = timeout
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=self.socket), **_api.http_options(timeout)
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connection pool (handles made with this client stop working)."""
        self._http.close()

    def call(self, call: _api.Call[T]) -> T:
        """Sends one request and parses the answer; raises the error's class."""
        try:
            response = self._http.request(**_api.http_request(call, self.timeout))
        except httpx.HTTPError as err:
            raise _api.transport_error(call, self.socket, err) from err
        return _api.decode(call, response.status_code, response.content)

    def stream_exec(
        self,
        call: _api.Call[ExecResult],
        on_stdout: _api.OutputCallback | None = None,
        on_stderr: _api.OutputCallback | None = None,
    ) -> ExecResult:
        """Sends an ``exec`` call for its streamed answer: output goes to the callbacks
        as the command writes it; returns the same result as :meth:`call` would.

        An exception raised by a callback stops the reading and propagates; the command
        goes on in the sandbox, its further output dropped.
        """
        reader = _api.ExecStream(call, on_stdout, on_stderr)
        try:
            with self._http.stream(**_api.http_request(call, self.timeout, stream=True)) as response:
                if not 200 <= response.status_code < 300:
                    raise error_from_response(response.status_code, response.read())
                for data in response.iter_raw():
                    reader.feed(data)
        except httpx.HTTPError as err:
            raise _api.transport_error(call, self.socket, err) from err
        return reader.finish()

    def request(
        self, method: str, path: str, body: Any = None, params: Mapping[str, str] | None = None
    ) -> Any:
        """Any API request (for routes the SDK does not wrap); the answer's JSON."""
        return self.call(_api.raw(method, path, body, params))

    # --- handles ------------------------------------------------------------------

    def create(
        self,
        *,
        memory: int | str | None = None,
        cpus: float | None = None,
        pids: int | None = None,
        rootfs: str | os.PathLike[str] | None = None,
        auto_checkpoint: bool = False,
    ) -> Sandbox:
        """A new sandbox (and a new tree for it); see :meth:`Sandbox.create`."""
        call = _api.new_sandbox(
            memory=memory, cpus=cpus, pids=pids, rootfs=rootfs, auto_checkpoint=auto_checkpoint
        )
        return Sandbox(self, self.call(call))

    def sandbox(self, sandbox_id: str) -> Sandbox:
        """A handle to an existing sandbox (id or unique prefix)."""
        return Sandbox(self, self.call(_api.get_sandbox(sandbox_id)))

    def sandboxes(self) -> list[Sandbox]:
        """Every sandbox of the daemon, oldest first."""
        return [Sandbox(self, info) for info in self.call(_api.list_sandboxes())]

    def node(self, node: str | NodeInfo | Node) -> Node:
        """A handle to a node (id, unique prefix, or its info)."""
        if isinstance(node, Node):
            return node
        if isinstance(node, NodeInfo):
            return Node(self, node)
        tree = self.call(_api.node_tree(node))
        return Node(self, tree.node(node))

    def diff(self, a: str | NodeInfo | Node, b: str | NodeInfo | Node) -> Diff:
        """Files added, removed and modified from node ``a`` to node ``b``."""
        return self.call(_api.diff(_api.node_id(a), _api.node_id(b)))

    def tree(self, node: str | NodeInfo | Node) -> Tree:
        """The tree a node belongs to."""
        return self.call(_api.node_tree(_api.node_id(node)))

    def gc(self) -> GcResult:
        """Drops layers no node references and trees with nothing left."""
        return self.call(_api.gc())


_default_lock = threading.Lock()
_defaults: dict[str, Client] = {}


def default_client(socket: str | os.PathLike[str] | None = None) -> Client:
    """The process-wide client for a socket, made on first use (what
    :meth:`Sandbox.create` uses when given no client)."""
    path = _api.socket_path(socket)
    with _default_lock:
        client = _defaults.get(path)
        if client is None:
            client = _defaults[path] = Client(path)
        return client


class Node(_handles.NodeBase[Client]):
    """A checkpoint: the files and processes of a sandbox at one moment. Roll a
    sandbox of its tree back to it, or branch new sandboxes from it."""

    def branch(self, n: int = 1, *, max_parallel: int = BRANCH_PARALLELISM) -> list[BranchOutcome[Sandbox]]:
        """``n`` new sandboxes from this node, each with this node's files and processes.

        One call per branch, up to ``max_parallel`` at once (1: one after the other):
        each outcome holds its sandbox or the error that stopped it, in order. Remove
        the sandboxes when done (they are context managers).
        """
        self._check_branch(n, max_parallel)

        def one(index: int) -> BranchOutcome[Sandbox]:
            try:
                info, ms = self.client.call(_api.branch_one(self.id))
            except DeltaBoxError as err:
                return BranchOutcome(index, error=err)
            return BranchOutcome(index, Sandbox(self.client, info), branch_ms=ms)

        if n == 1 or max_parallel == 1:
            return [one(i) for i in range(n)]
        with ThreadPoolExecutor(max_workers=min(n, max_parallel)) as pool:
            return list(pool.map(one, range(n)))

    def tree(self) -> Tree:
        """The tree this node belongs to."""
        return self.client.call(_api.node_tree(self.id))

    def diff(self, other: str | NodeInfo | Node) -> Diff:
        """Files changed from this node to ``other``."""
        return self.client.diff(self, other)

    def remove(self) -> Removed:
        """Removes this node and its subtree (refused while a sandbox is at one)."""
        return self.client.call(_api.remove_node(self.id))


class Session(_handles.SessionBase["Sandbox"]):
    """A persistent ``bash`` or ``python`` interpreter in a sandbox: variables, cwd and
    imports survive between :meth:`run` calls, and checkpoints capture them."""

    def run(self, code: str, *, timeout: float | None = None) -> RunResult:
        """Runs code; waits for it. ``timeout`` (s) interrupts the code, not the session
        (default: the daemon's 600 s)."""
        return self.sandbox._checkpointed(self.sandbox.client.call(self._run_call(code, timeout)), code)

    def close(self) -> SessionInfo:
        """Stops the interpreter."""
        return self.sandbox.client.call(_api.session_stop(self.sandbox.id, self.id))

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(*_handles.SESSION_GONE):
            self.close()


class Sandbox(_handles.SandboxBase[Client]):
    """An isolated Linux environment whose files and processes checkpoint, roll back and
    branch. Use it as a context manager: leaving the block removes it."""

    @classmethod
    def create(
        cls,
        *,
        memory: int | str | None = None,
        cpus: float | None = None,
        pids: int | None = None,
        rootfs: str | os.PathLike[str] | None = None,
        auto_checkpoint: bool = False,
        client: Client | None = None,
    ) -> Sandbox:
        """Creates a sandbox.

        Args:
            memory: memory limit, bytes or a size (``"2G"``, ``"512M"``; binary units);
                no swap beyond it.
            cpus: CPU bandwidth (``1.5`` = one and a half cores).
            pids: most processes at once.
            rootfs: a root tree to layer over (a debootstrap, an unpacked image); default
                the embedded one: the host's system directories read-only with empty
                ``/root``, ``/tmp``, ``/home``, ``/workspace``.
            auto_checkpoint: end every ``exec`` and ``session.run`` with a checkpoint.
            client: the client to use (default :func:`default_client`).
        """
        return (client or default_client()).create(
            memory=memory, cpus=cpus, pids=pids, rootfs=rootfs, auto_checkpoint=auto_checkpoint
        )

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with _handles.removing(exc):
            self.remove()

    def refresh(self) -> SandboxInfo:
        """Reloads :attr:`info` (head, sessions, state) from the daemon."""
        self.info = self.client.call(_api.get_sandbox(self.id))
        return self.info

    def exec(
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
        """Runs a one-shot command and waits for it.

        With ``on_stdout`` or ``on_stderr``, its output is streamed: each callback gets
        the text as the command writes it (e.g. ``on_stdout=print``), and the result
        still has all of it.

        Args:
            cmd: a string runs in ``bash -c`` (so pipes and ``&&`` work); a list runs as
                it is, ``argv[0]`` searched in ``PATH``.
            timeout: seconds before its process group is killed (default: the daemon's
                600 s); the result says ``timed_out``.
            cwd: its working directory (default ``/workspace``).
            env: extra environment variables.
            stdin: its standard input (default: none).
            on_stdout: called with each chunk of its stdout, as it comes.
            on_stderr: called with each chunk of its stderr, as it comes.
        """
        call, what = self._exec_call(cmd, timeout=timeout, cwd=cwd, env=env, stdin=stdin)
        if on_stdout is None and on_stderr is None:
            return self._checkpointed(self.client.call(call), what)
        return self._checkpointed(self.client.stream_exec(call, on_stdout, on_stderr), what)

    def _checkpointed(self, result: _api.R, what: str) -> _api.R:
        """``result``, with the checkpoint the SDK takes after ``what`` if it takes one."""
        call = self._auto_checkpoint_call(result, what)
        return result if call is None else _api.with_node(result, self.client.call(call))

    def session(self, kind: str = "bash") -> Session:
        """Starts a persistent ``"bash"`` or ``"python"`` session."""
        return Session(self, self.client.call(_api.session_start(self.id, kind)))

    def sessions(self) -> list[Session]:
        """Its live sessions."""
        return [Session(self, s) for s in self.refresh().sessions]

    def checkpoint(self, label: str | None = None) -> Node:
        """Checkpoints files and session processes together; the new node's parent is
        the node the sandbox was at."""
        return Node(self.client, self.client.call(_api.checkpoint(self.id, label)))

    def rollback(
        self,
        node: str | NodeInfo | Node,
        *,
        files_only: bool = False,
        processes_only: bool = False,
        warm_up: bool | None = None,
    ) -> RollbackResult:
        """Goes back (or over) to any node of this sandbox's tree.

        By default both halves: files, and sessions restored exactly as they were
        (sessions started since are gone). ``files_only`` keeps the running processes;
        ``processes_only`` keeps the files as they are. ``warm_up`` (None: the daemon's
        ``--warm-up`` default) pre-faults, after the answer, the pages the sessions
        wrote after this node last time; the sandbox's next operation waits for it.
        """
        mode = _api.rollback_mode(files_only, processes_only)
        return self.client.call(_api.rollback(self.id, _api.node_id(node), mode, warm_up))

    def tree(self) -> Tree:
        """The checkpoint tree this sandbox belongs to."""
        return self.client.call(_api.sandbox_tree(self.id))

    def diff(self, a: str | NodeInfo | Node, b: str | NodeInfo | Node) -> Diff:
        """Files added, removed and modified from node ``a`` to node ``b``."""
        return self.client.diff(a, b)

    def node(self, node: str | NodeInfo | Node) -> Node:
        """A handle to a node (e.g. ``result.node`` of an auto-checkpointed command)."""
        return self.client.node(node)

    def remove(self) -> Removed:
        """Removes the sandbox: its processes, root view and cgroups (its nodes stay,
        so branches and other sandboxes of the tree can still use them)."""
        return self.client.call(_api.remove_sandbox(self.id))
