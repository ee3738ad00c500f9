"""DeltaBox: sandboxes for AI agents whose files and live processes checkpoint, roll
back to any ancestor and branch in milliseconds.

Quickstart::

    from deltabox import Sandbox

    with Sandbox.create(memory="2G", cpus=1) as sb:
        py = sb.session("python")
        py.run("x = 41")
        node = sb.checkpoint(label="x=41")
        py.run("x += 1")
        sb.rollback(node)
        assert py.run("print(x)").stdout == "41\\n"

:mod:`deltabox.sync` holds the blocking client, :mod:`deltabox.aio` the asyncio one;
both share :mod:`deltabox.models` and :mod:`deltabox.errors`.
"""

from ._api import DEFAULT_SOCKET
from .aio import AsyncClient, AsyncNode, AsyncSandbox, AsyncSession, default_async_client
from .errors import *  # noqa: F403 (the exceptions are part of the top-level API)
from .errors import __all__ as _errors_all
from .models import *  # noqa: F403
from .models import __all__ as _models_all
from .sync import Client, Node, Sandbox, Session, default_client

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SOCKET",
    "Client",
    "Sandbox",
    "Session",
    "Node",
    "default_client",
    "AsyncClient",
    "AsyncSandbox",
    "AsyncSession",
    "AsyncNode",
    "default_async_client",
    *_errors_all,
    *_models_all,
]
