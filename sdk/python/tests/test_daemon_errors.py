"""Each error kind the daemon can be made to answer, through the SDK call that meets
it, raises its exception (against a real deltaboxd).

Kinds no client request can provoke on a healthy daemon — ``disk_full``, ``internal``,
``node_not_restorable`` (its templates must be lost) — are mapped in the unit test
test_client_fake.py, which checks every kind the daemon's sources define.
``sandboxes_disabled`` comes from a second daemon started with ``--no-sandboxes``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import deltabox
from deltabox import Client, Sandbox

pytestmark = pytest.mark.daemon
MISSING = "00000000-0000-7000-8000-000000000000"


@pytest.fixture
def sb(client: Client) -> Iterator[Sandbox]:
    with client.create() as sandbox:
        yield sandbox


def test_unknown_sandbox(client: Client) -> None:
    with pytest.raises(deltabox.UnknownSandbox) as caught:
        client.sandbox(MISSING)
    assert caught.value.status == 404 and MISSING in caught.value.message


def test_unknown_node(sb: Sandbox) -> None:
    with pytest.raises(deltabox.UnknownNode) as caught:
        sb.rollback(MISSING)
    assert caught.value.kind == "unknown_node" and caught.value.status == 404
    ghost = deltabox.Node(sb.client, deltabox.NodeInfo.from_json(ghost_node()))
    (outcome,) = ghost.branch(1)
    assert isinstance(outcome.error, deltabox.UnknownNode)
    with pytest.raises(deltabox.UnknownNode):
        sb.diff(MISSING, MISSING)


def test_unknown_node_tree(client: Client) -> None:
    """``GET /v1/nodes/{node}/tree`` (what ``client.node(id)`` and ``node.tree()`` call)
    of a node that does not exist."""
    with pytest.raises(deltabox.UnknownNode):
        client.node(MISSING)


def ghost_node() -> dict[str, object]:
    return {"id": MISSING, "tree": MISSING, "sandbox": MISSING, "created_ms": 0, "bytes": 0}


def test_unknown_session(sb: Sandbox) -> None:
    ghost = deltabox.Session(sb, deltabox.SessionInfo(MISSING, "python", 0, 0))
    with pytest.raises(deltabox.UnknownSession):
        ghost.run("1")


def test_ambiguous_id(client: Client) -> None:
    with client.create() as a, client.create() as b:
        prefix = os.path.commonprefix([a.id, b.id])  # noqa: RUF071 (character prefixes are what ids match)
        assert prefix, "two UUIDv7 ids made a moment apart share their time prefix"
        with pytest.raises(deltabox.AmbiguousId) as caught:
            client.sandbox(prefix)
        assert a.id in caught.value.message and b.id in caught.value.message


def test_node_of_another_tree(client: Client, sb: Sandbox) -> None:
    with client.create() as other:
        node = other.checkpoint()
        with pytest.raises(deltabox.NodeOfAnotherTree) as caught:
            sb.rollback(node)
        assert caught.value.status == 409


def test_invalid_request(sb: Sandbox) -> None:
    with pytest.raises(deltabox.InvalidRequest):
        sb.session("cobol")
    with pytest.raises(deltabox.InvalidRequest):
        sb.client.request("POST", f"/v1/nodes/{sb.checkpoint().id}/branch", {"count": 0})


def test_node_in_use(sb: Sandbox) -> None:
    node = sb.checkpoint()
    with pytest.raises(deltabox.NodeInUse) as caught:
        node.remove()
    assert sb.id in caught.value.message


def test_session_failed(sb: Sandbox) -> None:
    py = sb.session("python")
    with pytest.raises(deltabox.SessionFailed):
        py.run("import os; os._exit(3)")
        py.run("print(1)")  # if the exit itself was reported as a result


def test_process_not_restorable(sb: Sandbox) -> None:
    """A session holding a socket: DeltaCR cannot restore one (pipes it can), so it
    refuses to checkpoint the session and names the process."""
    py = sb.session("python")
    py.run("import socket\ns = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)")
    with pytest.raises(deltabox.ProcessNotRestorable) as caught:
        sb.checkpoint()
    assert caught.value.status == 422


def test_invalid_body(client: Client) -> None:
    with pytest.raises(deltabox.InvalidBody):
        client.request("POST", "/v1/sandboxes", {"limits": {"memory_bytes": "lots"}})


def test_invalid_query(client: Client) -> None:
    with pytest.raises(deltabox.InvalidQuery):
        client.request("GET", "/v1/diff", params={"from": MISSING})


def test_route_not_found_and_method_not_allowed(client: Client) -> None:
    with pytest.raises(deltabox.RouteNotFound):
        client.request("GET", "/v1/no-such-route")
    with pytest.raises(deltabox.MethodNotAllowed):
        client.request("PUT", "/v1/sandboxes")


def test_body_too_large(sb: Sandbox) -> None:
    with pytest.raises(deltabox.BodyTooLarge) as caught:
        sb.exec("wc -c", stdin="x" * (17 << 20))
    assert caught.value.status == 413


def test_unreachable() -> None:
    with Client("/run/deltabox-sdk-no-such-daemon.sock") as nobody, pytest.raises(deltabox.DaemonUnreachable):
        nobody.sandboxes()


def test_sandboxes_disabled(daemon: object) -> None:
    """A second daemon started with ``--no-sandboxes`` answers every sandbox route 503."""
    from conftest import running_daemon

    with running_daemon(sandboxes=False) as plain, Client(plain.socket) as client:
        with pytest.raises(deltabox.SandboxesDisabled) as caught:
            client.sandboxes()
        assert caught.value.status == 503
        with pytest.raises(deltabox.SandboxesDisabled):
            client.create()
