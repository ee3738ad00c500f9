"""The API's bodies as dataclasses, shared by the sync and the asyncio client.

They mirror ``client/src/sandbox_types/``. Parsing ignores fields this SDK
does not know, so a newer daemon that adds fields keeps working with it; a field this
SDK needs that is missing raises :class:`~deltabox.errors.ProtocolError`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from .errors import DeltaBoxError, ProtocolError

__all__ = [
    "Limits",
    "SessionInfo",
    "BusyInfo",
    "SandboxInfo",
    "NodeSessionInfo",
    "NodeProcessInfo",
    "CheckpointTimings",
    "NodeInfo",
    "ExecResult",
    "RunResult",
    "RollbackMode",
    "RollbackTimings",
    "RollbackResult",
    "SandboxHead",
    "Tree",
    "DiffEntry",
    "Diff",
    "Removed",
    "GcResult",
    "BranchOutcome",
    "parse_memory",
]

Json = dict[str, Any]
RollbackMode = Literal["all", "files_only", "processes_only"]
S = TypeVar("S")
T = TypeVar("T")


def _get(obj: Json, key: str, what: str) -> Any:
    try:
        return obj[key]
    except (KeyError, TypeError):
        raise ProtocolError(f"the daemon's {what} has no field {key!r}: {obj!r:.200}") from None


# What the parsers below share: each takes fields by the API's names, which are the
# dataclasses' names, so that ``cls(**...)`` builds the object.
def _required(obj: Json, what: str, *keys: str) -> Json:
    """The fields the API always sends (ProtocolError naming the first one missing)."""
    return {key: _get(obj, key, what) for key in keys}


def _optional(obj: Json, *keys: str) -> Json:
    """Fields that may be missing (None then)."""
    return {key: obj.get(key) for key in keys}


def _numbers(obj: Json, number: Callable[[Any], T], *keys: str) -> list[T]:
    """Numeric fields, in order, each 0 when missing."""
    return [number(obj.get(key, number(0))) for key in keys]


def _list(parse: Callable[[Json], T], obj: Json, key: str) -> list[T]:
    """A list of objects (empty when missing or null)."""
    return [parse(item) for item in obj.get(key) or []]


def _nested(parse: Callable[[Json], T], obj: Json, key: str) -> T | None:
    """An object that may be missing or null (None then)."""
    value = obj.get(key)
    return parse(value) if value else None


def _ran(obj: Json) -> Json:
    """The fields ``ExecResult`` and ``RunResult`` share but the output."""
    return {
        "timed_out": bool(obj.get("timed_out", False)),
        "truncated": bool(obj.get("truncated", False)),
        "duration_ms": float(obj.get("duration_ms", 0.0)),
        "node": _nested(NodeInfo.from_json, obj, "node"),
    }


_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memory(value: int | str) -> int:
    """Bytes from ``2G``, ``512M``, ``1.5GiB``, ``4096`` or an int.

    Units are binary (``1G`` = 2**30 bytes), as cgroups and ``free`` count them.
    """
    if isinstance(value, bool):
        raise ValueError(f"memory must be bytes or a size like '2G', not {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"memory must be positive, not {value}")
        return value
    match = _MEMORY.match(value)
    if not match:
        raise ValueError(f"memory {value!r} is not a size like '2G', '512M' or bytes")
    number, unit, _suffix = match.groups()
    size = int(float(number) * _UNITS[unit.lower()])
    if size <= 0:
        raise ValueError(f"memory must be positive, not {value!r}")
    return size


@dataclass(frozen=True)
class Limits:
    """Resource limits of a sandbox (cgroup v2 ``memory.max``, ``cpu.max``, ``pids.max``)."""

    memory_bytes: int | None = None
    cpus: float | None = None
    pids: int | None = None

    @classmethod
    def from_json(cls, obj: Json) -> Limits:
        """Parses the API's ``LimitsSpec``."""
        return cls(obj.get("memory_bytes"), obj.get("cpus"), obj.get("pids"))

    def to_json(self) -> Json:
        """The API's ``LimitsSpec`` (unset limits omitted)."""
        out: Json = {}
        if self.memory_bytes is not None:
            out["memory_bytes"] = self.memory_bytes
        if self.cpus is not None:
            out["cpus"] = self.cpus
        if self.pids is not None:
            out["pids"] = self.pids
        return out


@dataclass(frozen=True)
class SessionInfo:
    """A live session of a sandbox."""

    id: str
    kind: str
    pid: int
    started_ms: int

    @classmethod
    def from_json(cls, obj: Json) -> SessionInfo:
        """Parses the API's ``SessionInfo``."""
        return cls(**_required(obj, "session", "id", "kind", "pid", "started_ms"))


@dataclass(frozen=True)
class BusyInfo:
    """The operation in progress on a sandbox (a status never waits for it to end)."""

    operation: str
    for_ms: int

    @classmethod
    def from_json(cls, obj: Json) -> BusyInfo:
        """Parses the API's ``BusyInfo``."""
        return cls(**_required(obj, "busy", "operation", "for_ms"))


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox as the daemon reports it."""

    id: str
    tree: str
    created_ms: int
    limits: Limits
    auto_checkpoint: bool
    sessions: list[SessionInfo]
    state: str
    rootfs: str | None = None
    head: str | None = None
    branched_from: str | None = None
    #: Set while an operation runs there; the rest is the sandbox as it found it.
    busy: BusyInfo | None = None

    @classmethod
    def from_json(cls, obj: Json) -> SandboxInfo:
        """Parses the API's ``SandboxInfo``."""
        return cls(
            **_required(obj, "sandbox", "id", "tree", "created_ms"),
            limits=Limits.from_json(obj.get("limits") or {}),
            auto_checkpoint=bool(obj.get("auto_checkpoint", False)),
            sessions=_list(SessionInfo.from_json, obj, "sessions"),
            state=obj.get("state", "running"),
            **_optional(obj, "rootfs", "head", "branched_from"),
            busy=_nested(BusyInfo.from_json, obj, "busy"),
        )


@dataclass(frozen=True)
class NodeSessionInfo:
    """A session's part of a node: ``template`` is ``live`` while a template holds it;
    ``generation`` (while live) counts the forks between that template and a fresh
    process (each rollback adds two; the daemon re-roots deep ones)."""

    session: str
    kind: str
    template: str
    generation: int | None = None

    @classmethod
    def from_json(cls, obj: Json) -> NodeSessionInfo:
        """Parses the API's ``NodeSessionInfo``."""
        generation = obj.get("generation")
        return cls(
            **_required(obj, "node session", "session", "kind"),
            template=obj.get("template", "none"),
            generation=generation if isinstance(generation, int) else None,
        )


@dataclass(frozen=True)
class NodeProcessInfo:
    """A process of the sandbox other than its sessions (a background job, a session's
    child) in a node: ``template`` is ``live`` while a template holds it, else ``none``
    (such processes are not dumped: the node can no longer restore them)."""

    pid: int
    comm: str
    template: str

    @classmethod
    def from_json(cls, obj: Json) -> NodeProcessInfo:
        """Parses the API's ``NodeProcessInfo``."""
        return cls(**_required(obj, "node process", "pid", "comm"), template=obj.get("template", "none"))


@dataclass(frozen=True)
class CheckpointTimings:
    """Where a checkpoint's time went (milliseconds)."""

    total_ms: float = 0.0
    quiesce_ms: float = 0.0
    files_ms: float = 0.0
    processes_ms: float = 0.0
    record_ms: float = 0.0

    @classmethod
    def from_json(cls, obj: Json) -> CheckpointTimings:
        """Parses the API's ``CheckpointTimings``."""
        return cls(*_numbers(obj, float, "total_ms", "quiesce_ms", "files_ms", "processes_ms", "record_ms"))


@dataclass(frozen=True)
class NodeInfo:
    """A node of a checkpoint tree: the files and processes of a sandbox at one moment."""

    id: str
    tree: str
    sandbox: str
    created_ms: int
    bytes: int
    sessions: list[NodeSessionInfo]
    timings: CheckpointTimings
    parent: str | None = None
    label: str | None = None
    processes: list[NodeProcessInfo] = field(default_factory=list)

    @classmethod
    def from_json(cls, obj: Json) -> NodeInfo:
        """Parses the API's ``NodeInfo``."""
        return cls(
            **_required(obj, "node", "id", "tree", "sandbox", "created_ms"),
            bytes=obj.get("bytes", 0),
            sessions=_list(NodeSessionInfo.from_json, obj, "sessions"),
            timings=CheckpointTimings.from_json(obj.get("timings") or {}),
            **_optional(obj, "parent", "label"),
            processes=_list(NodeProcessInfo.from_json, obj, "processes"),
        )


@dataclass(frozen=True)
class ExecResult:
    """What a one-shot command did. ``node`` is the checkpoint taken after it
    (auto-checkpoint), else None."""

    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool
    duration_ms: float
    signal: int | None = None
    node: NodeInfo | None = None

    @property
    def ok(self) -> bool:
        """It exited 0 (not killed, not timed out)."""
        return self.exit_code == 0 and not self.timed_out

    @classmethod
    def from_json(cls, obj: Json) -> ExecResult:
        """Parses the API's ``ExecResult``."""
        return cls(
            exit_code=obj.get("exit_code"),
            **_required(obj, "exec result", "stdout", "stderr"),
            **_ran(obj),
            signal=obj.get("signal"),
        )


@dataclass(frozen=True)
class RunResult:
    """What code run in a session did.

    ``status``: bash: ``$?`` of its last command; python: 0, 1 for an uncaught exception,
    130 when interrupted by the timeout, or the ``SystemExit`` code.
    """

    stdout: str
    stderr: str
    status: int
    timed_out: bool
    truncated: bool
    duration_ms: float
    node: NodeInfo | None = None

    @property
    def ok(self) -> bool:
        """Status 0 and not interrupted."""
        return self.status == 0 and not self.timed_out

    @classmethod
    def from_json(cls, obj: Json) -> RunResult:
        """Parses the API's ``SessionRunResult``."""
        return cls(**_required(obj, "session run result", "stdout", "stderr", "status"), **_ran(obj))


@dataclass(frozen=True)
class RollbackTimings:
    """Where a rollback's time went (milliseconds)."""

    total_ms: float = 0.0
    kill_ms: float = 0.0
    files_ms: float = 0.0
    processes_ms: float = 0.0
    #: Summed over the restored sessions: the injected fork of each template.
    fork_ms: float = 0.0
    #: Summed over sessions restored from a dump: their memory made the dump's.
    fallback_ms: float = 0.0
    #: Summed over the sessions: fd table, stdio, threads, registers.
    fixup_ms: float = 0.0
    #: Summed over the sessions: signals, detach.
    resume_ms: float = 0.0

    @classmethod
    def from_json(cls, obj: Json) -> RollbackTimings:
        """Parses the API's ``RollbackTimings``."""
        return cls(
            *_numbers(
                obj,
                float,
                "total_ms",
                "kill_ms",
                "files_ms",
                "processes_ms",
                "fork_ms",
                "fallback_ms",
                "fixup_ms",
                "resume_ms",
            )
        )


@dataclass(frozen=True)
class RollbackResult:
    """Where a rollback left the sandbox: its node, mode and sessions now."""

    sandbox: str
    node: str
    mode: RollbackMode
    sessions: list[SessionInfo]
    timings: RollbackTimings
    #: Whether a warm-up of the sessions was started (it runs after the answer).
    warm_up: bool = False
    #: How many sessions came from standby forks (forked ahead of the rollback).
    standby_sessions: int = 0

    @classmethod
    def from_json(cls, obj: Json) -> RollbackResult:
        """Parses the API's ``RollbackResult``."""
        return cls(
            **_required(obj, "rollback result", "sandbox", "node"),
            mode=obj.get("mode", "all"),
            sessions=_list(SessionInfo.from_json, obj, "sessions"),
            timings=RollbackTimings.from_json(obj.get("timings") or {}),
            warm_up=bool(obj.get("warm_up", False)),
            standby_sessions=int(obj.get("standby_sessions", 0)),
        )


@dataclass(frozen=True)
class SandboxHead:
    """A sandbox of a tree and the node it is at."""

    sandbox: str
    head: str | None = None

    @classmethod
    def from_json(cls, obj: Json) -> SandboxHead:
        """Parses the API's ``SandboxHead``."""
        return cls(_get(obj, "sandbox", "tree sandbox"), obj.get("head"))


@dataclass(frozen=True)
class Tree:
    """A checkpoint tree: its nodes (oldest first), its sandboxes, and ``text``, the tree
    drawn as ``deltabox tree`` prints it (also what ``str(tree)`` gives)."""

    tree: str
    nodes: list[NodeInfo]
    sandboxes: list[SandboxHead]
    text: str

    def __str__(self) -> str:
        return self.text

    def node(self, id_or_prefix: str) -> NodeInfo:
        """The node with this id or unique prefix (KeyError if none or several)."""
        found = [n for n in self.nodes if n.id.startswith(id_or_prefix)]
        if len(found) != 1:
            raise KeyError(f"{len(found)} nodes of tree {self.tree} match {id_or_prefix!r}")
        return found[0]

    def children(self, node_id: str | None) -> list[NodeInfo]:
        """The nodes whose parent is ``node_id`` (None: the roots)."""
        return [n for n in self.nodes if n.parent == node_id]

    def head_of(self, sandbox_id: str) -> str | None:
        """The node a sandbox of this tree is at."""
        for head in self.sandboxes:
            if head.sandbox == sandbox_id:
                return head.head
        raise KeyError(f"sandbox {sandbox_id} is not in tree {self.tree}")

    @classmethod
    def from_json(cls, obj: Json) -> Tree:
        """Parses the API's ``TreeView``."""
        return cls(
            tree=_get(obj, "tree", "tree"),
            nodes=_list(NodeInfo.from_json, obj, "nodes"),
            sandboxes=_list(SandboxHead.from_json, obj, "sandboxes"),
            text=obj.get("text", ""),
        )


@dataclass(frozen=True)
class DiffEntry:
    """One path that differs: ``change`` is ``added``, ``removed`` or ``modified``;
    ``file_type`` is ``file``, ``dir``, ``symlink`` or ``other``."""

    path: str
    change: str
    file_type: str

    @classmethod
    def from_json(cls, obj: Json) -> DiffEntry:
        """Parses the API's ``DiffEntry``."""
        return cls(**_required(obj, "diff entry", "path", "change"), file_type=obj.get("file_type", "other"))


@dataclass(frozen=True)
class Diff:
    """The files that differ from node ``from_`` to node ``to``, sorted by path."""

    from_: str
    to: str
    changes: list[DiffEntry] = field(default_factory=list)

    def paths(self, change: str | None = None) -> list[str]:
        """The paths, optionally only those with this change (``added`` …)."""
        return [c.path for c in self.changes if change is None or c.change == change]

    @classmethod
    def from_json(cls, obj: Json) -> Diff:
        """Parses the API's ``DiffResult``."""
        return cls(
            from_=_get(obj, "from", "diff"),
            to=_get(obj, "to", "diff"),
            changes=_list(DiffEntry.from_json, obj, "changes"),
        )


@dataclass(frozen=True)
class Removed:
    """What a removal took away: node ids and sandbox ids."""

    nodes: list[str]
    sandboxes: list[str]

    @classmethod
    def from_json(cls, obj: Json) -> Removed:
        """Parses the API's ``Removed``."""
        return cls(list(obj.get("nodes") or []), list(obj.get("sandboxes") or []))


@dataclass(frozen=True)
class GcResult:
    """What garbage collection freed."""

    layers_removed: int = 0
    trees_removed: int = 0
    dumps_removed: int = 0
    layers_squashed: int = 0
    squash_bytes_freed: int = 0
    squash_deferred: int = 0

    @classmethod
    def from_json(cls, obj: Json) -> GcResult:
        """Parses the API's ``GcResult``."""
        return cls(
            *_numbers(
                obj,
                int,
                "layers_removed",
                "trees_removed",
                "dumps_removed",
                "layers_squashed",
                "squash_bytes_freed",
                "squash_deferred",
            )
        )


@dataclass
class BranchOutcome(Generic[S]):
    """One branch of :meth:`Node.branch`: its new sandbox, or the error that stopped it.

    One failed branch does not sink the others: check ``ok`` (or call :meth:`unwrap`)
    on each.
    """

    index: int
    sandbox: S | None = None
    error: DeltaBoxError | None = None
    branch_ms: float | None = None

    @property
    def ok(self) -> bool:
        """The branch made its sandbox."""
        return self.sandbox is not None

    def unwrap(self) -> S:
        """The sandbox, or raise the branch's error."""
        if self.sandbox is None:
            assert self.error is not None
            raise self.error
        return self.sandbox
