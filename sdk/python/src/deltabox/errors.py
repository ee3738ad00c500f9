"""Exceptions: one class per stable error ``kind`` of the daemon's API.

Every error the daemon answers is JSON ``{"error": "<message>", "kind": "<kind>"}``
with an HTTP status; :func:`error_from_response` turns it into the class registered
for that kind (:data:`KINDS`). A kind this SDK does not know yet still raises a
:class:`DeltaBoxError` carrying the kind, so newer daemons never break older SDKs.

Intermediate bases group kinds a caller usually handles together:
:class:`NotFound` (an id that matches nothing), :class:`InvalidArgument` (the request
itself is wrong), :class:`Conflict` (the tree's state forbids it) and
:class:`RestoreFailed` (processes could not be checkpointed or restored).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

__all__ = [
    "DeltaBoxError",
    "NotFound",
    "InvalidArgument",
    "Conflict",
    "RestoreFailed",
    "UnknownSandbox",
    "UnknownNode",
    "UnknownSession",
    "AmbiguousId",
    "NodeOfAnotherTree",
    "NodeNotRestorable",
    "InvalidRequest",
    "NodeInUse",
    "Busy",
    "LimitsExceeded",
    "DiskFull",
    "SessionFailed",
    "ProcessNotRestorable",
    "InternalError",
    "InvalidBody",
    "InvalidQuery",
    "InvalidPath",
    "RouteNotFound",
    "MethodNotAllowed",
    "BodyTooLarge",
    "SandboxesDisabled",
    "InvalidCgroupPath",
    "CgroupNotFound",
    "NotACgroup",
    "NotWatched",
    "BpfNotLoaded",
    "BpfError",
    "CgroupIo",
    "DaemonUnreachable",
    "ClientTimeout",
    "ProtocolError",
    "KINDS",
    "error_from_response",
]


class DeltaBoxError(Exception):
    """Base of every error the SDK raises.

    Attributes:
        kind: the API's stable machine-readable kind (``unknown_node`` …), or one of the
            SDK's own: ``unreachable``, ``client_timeout``, ``protocol``.
        status: the HTTP status (0 when no answer came).
        message: the daemon's message, naming the ids and paths involved.
    """

    #: The kind this class stands for (subclasses set it; the base takes any).
    KIND: ClassVar[str | None] = None

    def __init__(self, message: str, *, kind: str | None = None, status: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.kind: str = kind or self.KIND or "unknown"
        self.status = status

    def __str__(self) -> str:
        return f"{self.message} [{self.kind}]"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(message={self.message!r}, kind={self.kind!r}, status={self.status})"


class NotFound(DeltaBoxError):
    """An id (or prefix) matches no sandbox, node, session or route."""


class InvalidArgument(DeltaBoxError):
    """The request is wrong in itself (bad values, ambiguous prefix, oversized body)."""


class Conflict(DeltaBoxError):
    """The state of the tree forbids the request (another tree, a node in use)."""


class RestoreFailed(DeltaBoxError):
    """A process could not be checkpointed or restored, or a session died."""


# --- sandbox kinds (controller/src/sandbox/error.rs, SandboxError::KINDS) ------------


class UnknownSandbox(NotFound):
    """No sandbox has this id or prefix (404)."""

    KIND = "unknown_sandbox"


class UnknownNode(NotFound):
    """No node has this id or prefix (404)."""

    KIND = "unknown_node"


class UnknownSession(NotFound):
    """The sandbox has no session with this id or prefix (404)."""

    KIND = "unknown_session"


class AmbiguousId(InvalidArgument):
    """A prefix matches several ids (400); the message lists them."""

    KIND = "ambiguous_id"


class NodeOfAnotherTree(Conflict):
    """A sandbox was asked to go to a node of another tree (409): branch from it instead."""

    KIND = "node_of_another_tree"


class NodeNotRestorable(RestoreFailed):
    """The node's processes can no longer be restored: its templates are gone (422)."""

    KIND = "node_not_restorable"


class InvalidRequest(InvalidArgument):
    """Well-formed JSON asking for something invalid (400): a bad count, kind, limit."""

    KIND = "invalid_request"


class NodeInUse(Conflict):
    """The node (or its subtree) is the head of a live sandbox (409)."""

    KIND = "node_in_use"


class Busy(Conflict):
    """Another operation on the sandbox did not end within the daemon's wait (409): the
    message names it and how long it has run; retry later."""

    KIND = "busy"


class LimitsExceeded(RestoreFailed):
    """A limit of the sandbox stopped the operation (422): the memory limit (the OOM
    killer killed the session, which is gone) or the pids limit (a rollback's or
    branch's processes could not be forked)."""

    KIND = "limits_exceeded"


class DiskFull(DeltaBoxError):
    """The sandbox's store is out of space (507)."""

    KIND = "disk_full"


class SessionFailed(RestoreFailed):
    """A session exited or stopped answering (422)."""

    KIND = "session_failed"


class ProcessNotRestorable(RestoreFailed):
    """A process of the sandbox cannot be checkpointed or restored (422)."""

    KIND = "process_not_restorable"


class InternalError(DeltaBoxError):
    """Anything else that failed in the daemon (500)."""

    KIND = "internal"


# --- API kinds (controller/src/api/mod.rs, ErrorKind) ---------------------------------


class InvalidBody(InvalidArgument):
    """The JSON body is malformed or has unknown fields (400)."""

    KIND = "invalid_body"


class InvalidQuery(InvalidArgument):
    """The query string is malformed or misses a parameter (400)."""

    KIND = "invalid_query"


class InvalidPath(InvalidArgument):
    """A path parameter is not valid UTF-8 (400)."""

    KIND = "invalid_path"


class RouteNotFound(NotFound):
    """No such route (404): the daemon may be older than this SDK."""

    KIND = "route_not_found"


class MethodNotAllowed(DeltaBoxError):
    """The route exists, not with this method (405)."""

    KIND = "method_not_allowed"


class BodyTooLarge(InvalidArgument):
    """The request body is larger than the daemon reads (16 MiB) (413)."""

    KIND = "body_too_large"


class SandboxesDisabled(DeltaBoxError):
    """The daemon runs without sandbox support (503)."""

    KIND = "sandboxes_disabled"


class InvalidCgroupPath(InvalidArgument):
    """Cgroup API: the path is empty or outside the cgroup2 mount."""

    KIND = "invalid_cgroup_path"


class CgroupNotFound(NotFound):
    """Cgroup API: no directory at the path."""

    KIND = "cgroup_not_found"


class NotACgroup(NotFound):
    """Cgroup API: the path is not a cgroup v2 directory."""

    KIND = "not_a_cgroup"


class NotWatched(NotFound):
    """Cgroup API: the cgroup is not watched."""

    KIND = "not_watched"


class BpfNotLoaded(Conflict):
    """Cgroup API: the eBPF programs are no longer pinned."""

    KIND = "bpf_not_loaded"


class BpfError(DeltaBoxError):
    """Cgroup API: an eBPF map operation failed."""

    KIND = "bpf"


class CgroupIo(DeltaBoxError):
    """Cgroup API: reading the cgroup filesystem failed."""

    KIND = "cgroup_io"


# --- the SDK's own ---------------------------------------------------------------------


class DaemonUnreachable(DeltaBoxError):
    """The daemon's socket does not exist or refuses connections."""

    KIND = "unreachable"


class ClientTimeout(DeltaBoxError):
    """No answer within the client's timeout (the daemon may still finish the call)."""

    KIND = "client_timeout"


class ProtocolError(DeltaBoxError):
    """The daemon answered something that is not the API's JSON."""

    KIND = "protocol"


def _classes() -> dict[str, type[DeltaBoxError]]:
    table: dict[str, type[DeltaBoxError]] = {}
    pending: list[type[DeltaBoxError]] = [DeltaBoxError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.KIND is not None:
            table[cls.KIND] = cls
    return table


#: Every API kind (and the SDK's own) → its exception class.
KINDS: dict[str, type[DeltaBoxError]] = _classes()


def error_from_response(status: int, body: bytes) -> DeltaBoxError:
    """The exception for an error answer: the class of its ``kind``, or the base.

    A body that is not the API's error JSON (a proxy's page, a truncated answer) gives a
    :class:`ProtocolError` that quotes it.
    """
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("error"), str):
        text = body[:200].decode("utf-8", "replace")
        return ProtocolError(
            f"daemon answered HTTP {status} without an API error body: {text!r}", status=status
        )
    message: str = parsed["error"]
    kind = parsed.get("kind")
    kind = kind if isinstance(kind, str) else "unknown"
    cls = KINDS.get(kind, DeltaBoxError)
    return cls(message, kind=kind, status=status)
