"""What the blocking and the asyncio handles share: everything that does no I/O.

:class:`deltabox.Node` and :class:`deltabox.AsyncNode` (and the sandboxes, the sessions)
subclass these bases, parameterised by their client (or sandbox) class; they add only
the calls, blocking in :mod:`deltabox.sync`, awaited in :mod:`deltabox.aio`. So the
two families cannot drift apart in their properties, checks and bookkeeping.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from . import _api
from .errors import DeltaBoxError, UnknownSandbox, UnknownSession
from .models import ExecResult, NodeInfo, RunResult, SandboxInfo, SessionInfo


class _Client(Protocol):
    """What the handles read of their client (both clients have it)."""

    timeout: float


C = TypeVar("C", bound=_Client)


class _Handle:
    """A handle of one family: the public class it is (``Node``, ``AsyncSandbox``…) names
    it in its repr and decides equality, so a user's subclass still compares equal to
    (and reads like) the handles it extends."""

    _family: ClassVar[type[Any]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The first subclass outside this module is the public class; its own
        # subclasses inherit it.
        if cls.__module__ != __name__ and not hasattr(cls, "_family"):
            cls._family = cls


class _Identified(_Handle):
    """A handle equal to the handles of its family with the same id."""

    @property
    def id(self) -> str:
        """The id (each handle says of what)."""
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return isinstance(other, self._family) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)


class NodeBase(_Identified, Generic[C]):
    """A checkpoint, on a client of type ``C``."""

    def __init__(self, client: C, info: NodeInfo) -> None:
        self.client = client
        self.info = info

    def __repr__(self) -> str:
        return f"{self._family.__name__}(id={self.id!r}, label={self.label!r})"

    @property
    def id(self) -> str:
        """The node's id."""
        return self.info.id

    @property
    def label(self) -> str | None:
        """Its label."""
        return self.info.label

    @property
    def parent(self) -> str | None:
        """Its parent node's id."""
        return self.info.parent

    @staticmethod
    def _check_branch(n: int, max_parallel: int) -> None:
        """Refuses what ``branch`` cannot do, before any call."""
        if n < 1:
            raise ValueError(f"branch count must be at least 1, not {n}")
        if max_parallel < 1:
            raise ValueError(f"max_parallel must be at least 1, not {max_parallel}")


class SandboxBase(_Identified, Generic[C]):
    """A sandbox, on a client of type ``C``."""

    def __init__(self, client: C, info: SandboxInfo) -> None:
        self.client = client
        self.info = info
        # Set when the SDK, not the daemon, checkpoints after each call.
        self._client_auto = False

    def __repr__(self) -> str:
        return f"{self._family.__name__}(id={self.info.id!r}, tree={self.info.tree!r})"

    @property
    def id(self) -> str:
        """The sandbox's id."""
        return self.info.id

    @property
    def tree_id(self) -> str:
        """The id of its checkpoint tree (shared with its branches)."""
        return self.info.tree

    @property
    def auto_checkpoint(self) -> bool:
        """Whether every ``exec`` and ``session.run`` ends in a checkpoint (the result's
        ``node``). Setting it to True on a sandbox created without it makes the SDK take
        that checkpoint right after each call; a sandbox created with it keeps it (the
        API cannot turn it off, so setting False raises ValueError)."""
        return self._auto_checkpoint()

    @auto_checkpoint.setter
    def auto_checkpoint(self, value: bool) -> None:
        self._set_auto_checkpoint(value)

    # The property's logic, for the subclasses that document it in their own words.
    def _auto_checkpoint(self) -> bool:
        return self.info.auto_checkpoint or self._client_auto

    def _set_auto_checkpoint(self, value: bool) -> None:
        if not value and self.info.auto_checkpoint:
            raise ValueError(
                f"sandbox {self.id} was created with auto_checkpoint=True and the daemon cannot turn it off"
            )
        self._client_auto = bool(value) and not self.info.auto_checkpoint

    def _exec_call(
        self,
        cmd: str | Sequence[str],
        *,
        timeout: float | None,
        cwd: str | None,
        env: Mapping[str, str] | None,
        stdin: str | bytes | None,
    ) -> tuple[_api.Call[ExecResult], str]:
        """The ``exec`` call of ``cmd`` and what labels its auto-checkpoint."""
        argv = _api.argv_of(cmd)
        call = _api.exec_command(
            self.id,
            argv,
            timeout=timeout,
            cwd=cwd,
            env=env,
            stdin=stdin,
            base_timeout=self.client.timeout,
        )
        return call, cmd if isinstance(cmd, str) else " ".join(argv)

    def _auto_checkpoint_call(self, result: ExecResult | RunResult, what: str) -> _api.Call[NodeInfo] | None:
        """The checkpoint the SDK takes after ``what`` (client-side auto-checkpoint),
        or None when it takes none (not asked, or the daemon took one)."""
        if self._client_auto and result.node is None:
            return _api.checkpoint(self.id, _api.auto_label(what))
        return None


SB = TypeVar("SB", bound=SandboxBase[Any])


class SessionBase(_Handle, Generic[SB]):
    """A persistent interpreter in a sandbox of type ``SB``."""

    def __init__(self, sandbox: SB, info: SessionInfo) -> None:
        self.sandbox = sandbox
        self.info = info

    def __repr__(self) -> str:
        return f"{self._family.__name__}(id={self.id!r}, kind={self.kind!r}, sandbox={self.sandbox.id!r})"

    @property
    def id(self) -> str:
        """The session's id (kept across rollbacks and branches)."""
        return self.info.id

    @property
    def kind(self) -> str:
        """``bash`` or ``python``."""
        return self.info.kind

    def _run_call(self, code: str, timeout: float | None) -> _api.Call[RunResult]:
        """The ``run`` call of ``code``."""
        sb = self.sandbox
        return _api.session_run(sb.id, self.id, code, timeout, sb.client.timeout)


#: What leaving a session's block ignores when closing it: it is gone already (a
#: rollback to before it started, or the sandbox removed).
SESSION_GONE = (UnknownSession, UnknownSandbox)


@contextlib.contextmanager
def removing(exc: BaseException | None) -> Iterator[None]:
    """Around the removal of a sandbox that leaves its block: a sandbox gone already is
    fine, and a failed removal does not hide ``exc``, the block's own exception (it
    matters more than a failed clean-up)."""
    try:
        yield
    except UnknownSandbox:
        pass
    except DeltaBoxError:
        if exc is None:
            raise
