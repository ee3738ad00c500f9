"""The API's calls as data: method, path, body, timeout and how to parse the answer.

The sync and the asyncio clients only differ in how they send a :class:`Call`; every
route, body and timeout is decided here once, so the two cannot drift apart.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from .errors import ClientTimeout, DaemonUnreachable, DeltaBoxError, ProtocolError, error_from_response
from .models import (
    Diff,
    ExecResult,
    GcResult,
    Limits,
    NodeInfo,
    Removed,
    RollbackMode,
    RollbackResult,
    RunResult,
    SandboxInfo,
    SessionInfo,
    Tree,
    parse_memory,
)

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
Json = dict[str, Any]

#: The daemon's socket when neither ``socket=`` nor ``$DELTABOX_SOCKET`` names one
#: (``DEFAULT_SOCKET`` in ``client/src/lib.rs``).
DEFAULT_SOCKET = "/run/deltabox/api.sock"
#: How long the daemon lets a command or session run when no timeout is given (s).
DAEMON_DEFAULT_RUN_TIMEOUT = 600.0
#: Added to a command's own timeout for the HTTP read timeout: the daemon needs time to
#: kill the command, collect its output and maybe checkpoint after it.
RUN_TIMEOUT_MARGIN = 60.0
#: Default read timeout of every other call (a checkpoint or branch of a large
#: sandbox on a loaded machine can take a while; a wedged daemon is still noticed).
DEFAULT_TIMEOUT = 300.0
#: Most branch calls ``node.branch(n)`` has in flight at once, by default.
BRANCH_PARALLELISM = 8
#: How long a client waits to connect to the socket (s).
CONNECT_TIMEOUT = 10.0


def socket_path(socket: str | os.PathLike[str] | None) -> str:
    """The socket to use: the argument, else ``$DELTABOX_SOCKET``, else the default."""
    if socket is not None:
        return os.fspath(socket)
    return os.environ.get("DELTABOX_SOCKET") or DEFAULT_SOCKET


def _seg(value: str) -> str:
    if not value:
        raise ValueError("an id must not be empty")
    return quote(value, safe="")


def node_id(node: Any) -> str:
    """The id of a node given as a handle, a :class:`NodeInfo` or a string."""
    if isinstance(node, str):
        return node
    ident = getattr(node, "id", None)
    if isinstance(ident, str):
        return ident
    raise TypeError(f"expected a Node, NodeInfo or node id, not {type(node).__name__}")


def argv_of(cmd: str | Sequence[str]) -> list[str]:
    """A command's argv: a string runs in ``bash -c`` (pipes, globs, ``&&`` work); a
    list runs as it is, without a shell."""
    if isinstance(cmd, str):
        return ["bash", "-c", cmd]
    argv = [str(a) for a in cmd]
    if not argv:
        raise ValueError("the command is empty")
    return argv


def run_timeout(timeout: float | None, base: float) -> float:
    """The HTTP read timeout of a call that runs code for up to ``timeout`` seconds:
    never shorter than the code's own timeout plus the daemon's margin."""
    own = DAEMON_DEFAULT_RUN_TIMEOUT if timeout is None else timeout
    return max(base, own + RUN_TIMEOUT_MARGIN)


def http_timeout(default: float, call: Call[Any] | None = None) -> httpx.Timeout:
    """httpx's timeout for a call: its own read timeout, else ``default`` (the
    client's); :data:`CONNECT_TIMEOUT` to connect."""
    read = call.timeout if call is not None and call.timeout is not None else default
    return httpx.Timeout(read, connect=CONNECT_TIMEOUT)


def http_options(timeout: float) -> dict[str, Any]:
    """The arguments of an httpx client for the daemon, but its transport (on the
    socket, blocking or asyncio)."""
    return {"base_url": "http://deltaboxd", "timeout": http_timeout(timeout)}


def http_request(call: Call[Any], default_timeout: float, *, stream: bool = False) -> dict[str, Any]:
    """The arguments of httpx's ``request`` for a call (``stream``: of its ``stream``,
    asking ``exec`` for its streamed answer)."""
    args: dict[str, Any] = {
        "method": call.method,
        "url": call.path,
        "json": call.body,
        "params": call.params,
        "timeout": http_timeout(default_timeout, call),
    }
    if stream:
        args["headers"] = {"Accept": NDJSON}
    return args


def millis(timeout: float | None) -> int | None:
    """Seconds (the SDK's unit) to the API's milliseconds."""
    if timeout is None:
        return None
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, not {timeout}")
    return max(1, round(timeout * 1000))


@dataclass(frozen=True)
class Call(Generic[T_co]):
    """One request and the parser of its answer."""

    method: str
    path: str
    parse: Callable[[Any], T_co]
    body: Any = None
    params: Mapping[str, str] | None = None
    #: Read timeout in seconds (None: the client's default).
    timeout: float | None = None


def create_sandbox(limits: Limits, rootfs: str | None, auto_checkpoint: bool) -> Call[SandboxInfo]:
    """``POST /v1/sandboxes``."""
    body: Json = {"limits": limits.to_json(), "auto_checkpoint": auto_checkpoint}
    if rootfs is not None:
        body["rootfs"] = os.fspath(rootfs)
    return Call("POST", "/v1/sandboxes", SandboxInfo.from_json, body)


def new_sandbox(
    *,
    memory: int | str | None,
    cpus: float | None,
    pids: int | None,
    rootfs: str | os.PathLike[str] | None,
    auto_checkpoint: bool,
) -> Call[SandboxInfo]:
    """:func:`create_sandbox` from the arguments of ``create`` (a memory size parsed)."""
    limits = Limits(None if memory is None else parse_memory(memory), cpus, pids)
    return create_sandbox(limits, None if rootfs is None else os.fspath(rootfs), auto_checkpoint)


def list_sandboxes() -> Call[list[SandboxInfo]]:
    """``GET /v1/sandboxes``."""
    return Call("GET", "/v1/sandboxes", lambda o: [SandboxInfo.from_json(s) for s in o["sandboxes"]])


def get_sandbox(sandbox: str) -> Call[SandboxInfo]:
    """``GET /v1/sandboxes/{id}``."""
    return Call("GET", f"/v1/sandboxes/{_seg(sandbox)}", SandboxInfo.from_json)


def remove_sandbox(sandbox: str) -> Call[Removed]:
    """``DELETE /v1/sandboxes/{id}``."""
    return Call("DELETE", f"/v1/sandboxes/{_seg(sandbox)}", Removed.from_json)


def exec_command(
    sandbox: str,
    argv: list[str],
    *,
    timeout: float | None,
    cwd: str | None,
    env: Mapping[str, str] | None,
    stdin: str | bytes | None,
    base_timeout: float,
) -> Call[ExecResult]:
    """``POST /v1/sandboxes/{id}/exec``."""
    body: Json = {"argv": argv}
    if env:
        body["env"] = {str(k): str(v) for k, v in env.items()}
    if cwd is not None:
        body["cwd"] = cwd
    if stdin is not None:
        body["stdin"] = stdin.decode() if isinstance(stdin, bytes) else stdin
    return _running(f"/v1/sandboxes/{_seg(sandbox)}/exec", ExecResult.from_json, body, timeout, base_timeout)


def _running(
    path: str, parse: Callable[[Any], T], body: Json, timeout: float | None, base_timeout: float
) -> Call[T]:
    """A ``POST`` that runs code for up to ``timeout`` seconds: the body says so (the
    daemon's default when None) and the read timeout waits for it."""
    if timeout is not None:
        body["timeout_ms"] = millis(timeout)
    return Call("POST", path, parse, body, timeout=run_timeout(timeout, base_timeout))


#: The ``Accept`` header that asks ``exec`` for its streamed answer: one JSON event
#: per line (``stdout``/``stderr`` chunks as they come, then ``exit`` or ``error``).
NDJSON = "application/x-ndjson"

#: A callback that takes output text as it arrives.
OutputCallback = Callable[[str], object]


class ExecStream:
    """Reads the events of a streamed ``exec``: hands each chunk of output to its
    callback and gathers the result the collected ``exec`` would have answered.

    Chunks come as the command writes: ``data`` when UTF-8 text (a character split
    between two reads is kept whole), else ``data_b64``; the callbacks get text,
    undecodable bytes replaced by U+FFFD (the result's ``stdout``/``stderr`` too,
    decoded once at the end).
    """

    def __init__(
        self, call: Call[Any], on_stdout: OutputCallback | None, on_stderr: OutputCallback | None
    ) -> None:
        self.call = call
        self.callbacks = (on_stdout, on_stderr)
        self.output = (bytearray(), bytearray())
        self.pending = b""
        self.result: ExecResult | None = None

    def feed(self, data: bytes) -> list[object]:
        """Takes the next bytes of the answer; handles every whole line in them and
        returns what the callbacks returned (the asyncio client awaits awaitables)."""
        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        returned: list[object] = []
        for line in lines:
            if line.strip():
                returned.extend(self.event(line))
        return returned

    def event(self, line: bytes) -> list[object]:
        """Handles one event line; returns what its callback returned, if one ran."""
        if self.result is not None:
            raise ProtocolError(f"{self.call.method} {self.call.path}: an event after the last one")
        try:
            event = json.loads(line)
            kind = event["type"]
        except (ValueError, KeyError, TypeError) as err:
            text = line[:200].decode("utf-8", "replace")
            raise ProtocolError(f"cannot parse an exec event ({err}): {text!r}", status=200) from err
        if kind in ("stdout", "stderr"):
            index = 0 if kind == "stdout" else 1
            if isinstance(event.get("data"), str):
                raw: bytes = event["data"].encode()
            else:
                try:
                    raw = base64.b64decode(event.get("data_b64", ""), validate=True)
                except (ValueError, TypeError) as err:
                    raise ProtocolError(f"an exec event's data_b64 is not base64: {err}", status=200) from err
            self.output[index].extend(raw)
            callback = self.callbacks[index]
            if callback is not None and raw:
                return [callback(raw.decode("utf-8", "replace"))]
        elif kind == "exit":
            fields = dict(event)
            fields["stdout"] = self.output[0].decode("utf-8", "replace")
            fields["stderr"] = self.output[1].decode("utf-8", "replace")
            try:
                self.result = ExecResult.from_json(fields)
            except (ValueError, KeyError, TypeError) as err:
                raise ProtocolError(
                    f"cannot parse the exit event ({err}): {line[:200]!r}", status=200
                ) from err
        elif kind == "error":
            body = json.dumps({"error": event.get("message", ""), "kind": event.get("code", "unknown")})
            raise error_from_response(int(event.get("status", 500)), body.encode())
        # Other types: added by a newer daemon, ignored.
        return []

    def finish(self) -> ExecResult:
        """The result, once the answer has ended."""
        if self.pending.strip():
            self.event(self.pending)
            self.pending = b""
        if self.result is None:
            raise ProtocolError(
                f"{self.call.method} {self.call.path}: the stream ended before its exit event", status=200
            )
        return self.result


def session_start(sandbox: str, kind: str) -> Call[SessionInfo]:
    """``POST /v1/sandboxes/{id}/sessions``."""
    return Call("POST", f"/v1/sandboxes/{_seg(sandbox)}/sessions", SessionInfo.from_json, {"kind": kind})


def session_run(
    sandbox: str, session: str, code: str, timeout: float | None, base_timeout: float
) -> Call[RunResult]:
    """``POST /v1/sandboxes/{id}/sessions/{session}/run``."""
    path = f"/v1/sandboxes/{_seg(sandbox)}/sessions/{_seg(session)}/run"
    return _running(path, RunResult.from_json, {"code": code}, timeout, base_timeout)


def session_stop(sandbox: str, session: str) -> Call[SessionInfo]:
    """``DELETE /v1/sandboxes/{id}/sessions/{session}``."""
    return Call("DELETE", f"/v1/sandboxes/{_seg(sandbox)}/sessions/{_seg(session)}", SessionInfo.from_json)


def checkpoint(sandbox: str, label: str | None) -> Call[NodeInfo]:
    """``POST /v1/sandboxes/{id}/checkpoint``."""
    body: Json = {} if label is None else {"label": label}
    return Call("POST", f"/v1/sandboxes/{_seg(sandbox)}/checkpoint", NodeInfo.from_json, body)


def rollback_mode(files_only: bool, processes_only: bool) -> RollbackMode:
    """The API's mode for the SDK's two flags."""
    if files_only and processes_only:
        raise ValueError("files_only and processes_only exclude each other (neither: both halves)")
    if files_only:
        return "files_only"
    if processes_only:
        return "processes_only"
    return "all"


def rollback(
    sandbox: str, node: str, mode: RollbackMode, warm_up: bool | None = None
) -> Call[RollbackResult]:
    """``POST /v1/sandboxes/{id}/rollback`` (``warm_up`` None: the daemon's default)."""
    body: Json = {"node": node, "mode": mode}
    if warm_up is not None:
        body["warm_up"] = warm_up
    return Call(
        "POST",
        f"/v1/sandboxes/{_seg(sandbox)}/rollback",
        RollbackResult.from_json,
        body,
    )


def branch_one(node: str) -> Call[tuple[SandboxInfo, float | None]]:
    """``POST /v1/nodes/{node}/branch`` with ``count`` 1: the SDK branches one sandbox
    per call so that one failure does not sink the other branches."""

    def parse(obj: Any) -> tuple[SandboxInfo, float | None]:
        sandboxes = obj["sandboxes"]
        if len(sandboxes) != 1:
            raise KeyError(f"asked for 1 branch, got {len(sandboxes)}")
        times = obj.get("branch_ms") or [None]
        return SandboxInfo.from_json(sandboxes[0]), times[0]

    return Call("POST", f"/v1/nodes/{_seg(node)}/branch", parse, {"count": 1})


def sandbox_tree(sandbox: str) -> Call[Tree]:
    """``GET /v1/sandboxes/{id}/tree``."""
    return Call("GET", f"/v1/sandboxes/{_seg(sandbox)}/tree", Tree.from_json)


def node_tree(node: str) -> Call[Tree]:
    """``GET /v1/nodes/{node}/tree``."""
    return Call("GET", f"/v1/nodes/{_seg(node)}/tree", Tree.from_json)


def diff(from_node: str, to_node: str) -> Call[Diff]:
    """``GET /v1/diff?from=…&to=…``."""
    return Call("GET", "/v1/diff", Diff.from_json, params={"from": from_node, "to": to_node})


def remove_node(node: str) -> Call[Removed]:
    """``DELETE /v1/nodes/{node}``."""
    return Call("DELETE", f"/v1/nodes/{_seg(node)}", Removed.from_json)


def gc() -> Call[GcResult]:
    """``POST /v1/gc``."""
    return Call("POST", "/v1/gc", GcResult.from_json, {})


def raw(method: str, path: str, body: Any = None, params: Mapping[str, str] | None = None) -> Call[Any]:
    """Any request; the answer's JSON as it is (for routes the SDK does not wrap)."""
    return Call(method, path, lambda o: o, body, params)


def auto_label(what: str) -> str:
    """The label of a checkpoint the SDK takes after a command (client-side
    auto-checkpoint): the command, cut to 80 characters."""
    text = " ".join(what.split())
    return text if len(text) <= 80 else text[:77] + "..."


def decode(call: Call[T], status: int, content: bytes) -> T:
    """The parsed answer of a 2xx, else the error the answer names."""
    if not 200 <= status < 300:
        raise error_from_response(status, content)
    try:
        obj = json.loads(content) if content else None
        return call.parse(obj)
    except (ValueError, KeyError, TypeError, IndexError) as err:
        text = content[:200].decode("utf-8", "replace")
        raise ProtocolError(
            f"cannot parse the answer to {call.method} {call.path} ({err}): {text!r}", status=status
        ) from err


def transport_error(call: Call[Any], socket: str, err: Exception) -> DeltaBoxError:
    """The SDK's error for an httpx failure before any answer came."""
    where = f"{call.method} {call.path} on {socket}"
    if isinstance(err, httpx.TimeoutException):
        return ClientTimeout(f"no answer to {where} within {call.timeout or 'the client timeout'} s: {err}")
    if isinstance(err, (httpx.ConnectError, FileNotFoundError, ConnectionRefusedError)):
        return DaemonUnreachable(f"cannot reach deltaboxd at {socket} (is it running?): {err}")
    if isinstance(err, httpx.RemoteProtocolError):
        return ProtocolError(f"{where}: the daemon broke the HTTP exchange: {err}")
    return DaemonUnreachable(f"{where}: {type(err).__name__}: {err}")


R = TypeVar("R", ExecResult, RunResult)


def with_node(result: R, node: NodeInfo) -> R:
    """The result with the checkpoint the SDK took after it (client-side auto-checkpoint)."""
    return dataclasses.replace(result, node=node)
