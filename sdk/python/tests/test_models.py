"""Unit tests of the models and the request builders (no daemon)."""

from __future__ import annotations

import pytest
import samples

from deltabox import _api
from deltabox.errors import ProtocolError
from deltabox.models import (
    Diff,
    ExecResult,
    NodeInfo,
    RollbackResult,
    RunResult,
    SandboxInfo,
    Tree,
    parse_memory,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2G", 2 << 30),
        ("2g", 2 << 30),
        ("2GiB", 2 << 30),
        ("512M", 512 << 20),
        ("1.5G", 3 << 29),
        ("64k", 64 << 10),
        ("4096", 4096),
        (" 1T ", 1 << 40),
        (123, 123),
    ],
)
def test_parse_memory(text: int | str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["", "G", "2X", "-1G", "0", 0, -5, "2 GB extra", True])
def test_parse_memory_refuses(bad: object) -> None:
    with pytest.raises(ValueError, match="memory"):
        parse_memory(bad)  # type: ignore[arg-type]


def test_sandbox_info_parses_and_ignores_unknown_fields() -> None:
    body = samples.sandbox(head="n1", sessions=[samples.session()], future_field={"x": 1})
    info = SandboxInfo.from_json(body)
    assert info.head == "n1"
    assert info.limits.memory_bytes == 2 << 30
    assert info.limits.pids is None
    assert info.sessions[0].kind == "python"
    assert info.rootfs is None and info.branched_from is None


def test_missing_required_field_is_a_protocol_error() -> None:
    body = samples.sandbox()
    del body["tree"]
    with pytest.raises(ProtocolError, match="'tree'"):
        SandboxInfo.from_json(body)


def test_node_and_results() -> None:
    node = NodeInfo.from_json(samples.node(label="start", parent=None))
    assert node.label == "start" and node.parent is None
    assert node.timings.processes_ms == 3.0
    assert node.sessions[0].template == "live"
    result = ExecResult.from_json(samples.exec_result(node=samples.node()))
    assert result.ok and result.node is not None and result.node.id == node.id
    killed = ExecResult.from_json(samples.exec_result(exit_code=None, signal=9, timed_out=True))
    assert not killed.ok and killed.signal == 9
    run = RunResult.from_json(samples.run_result(status=1))
    assert not run.ok and run.node is None


def test_node_processes() -> None:
    assert NodeInfo.from_json(samples.node()).processes == []
    listed = {**samples.node(), "processes": [{"pid": 42, "comm": "sleep", "template": "live"}]}
    (job,) = NodeInfo.from_json(listed).processes
    assert (job.pid, job.comm, job.template) == (42, "sleep", "live")


def test_tree_helpers() -> None:
    a = samples.node("aaaa-1")
    b = samples.node("bbbb-1", parent="aaaa-1")
    c = samples.node("bbbb-2", parent="aaaa-1")
    tree = Tree.from_json(
        {
            "tree": samples.TREE,
            "nodes": [a, b, c],
            "sandboxes": [{"sandbox": "sb1", "head": "bbbb-2"}, {"sandbox": "sb2"}],
            "text": "aaaa\n├─ bbbb-1\n└─ bbbb-2\n",
        }
    )
    assert str(tree).startswith("aaaa")
    assert [n.id for n in tree.children(None)] == ["aaaa-1"]
    assert [n.id for n in tree.children("aaaa-1")] == ["bbbb-1", "bbbb-2"]
    assert tree.node("aaaa").id == "aaaa-1"
    with pytest.raises(KeyError):
        tree.node("bbbb")  # ambiguous
    assert tree.head_of("sb1") == "bbbb-2"
    assert tree.head_of("sb2") is None


def test_diff_and_rollback() -> None:
    diff = Diff.from_json(
        {
            "from": "n1",
            "to": "n2",
            "changes": [
                {"path": "/workspace/a", "change": "added", "file_type": "file"},
                {"path": "/workspace/b", "change": "removed", "file_type": "dir"},
            ],
        }
    )
    assert diff.from_ == "n1"
    assert diff.paths("added") == ["/workspace/a"]
    assert diff.paths() == ["/workspace/a", "/workspace/b"]
    rb = RollbackResult.from_json(
        {"sandbox": "sb", "node": "n1", "mode": "files_only", "sessions": [samples.session()], "timings": {}}
    )
    assert rb.mode == "files_only" and rb.sessions[0].id == "s1"
    assert rb.standby_sessions == 0
    rb = RollbackResult.from_json(
        {"sandbox": "sb", "node": "n1", "mode": "all", "sessions": [], "timings": {}, "standby_sessions": 2}
    )
    assert rb.standby_sessions == 2


def test_argv_of() -> None:
    assert _api.argv_of("echo hi | wc -c") == ["bash", "-c", "echo hi | wc -c"]
    assert _api.argv_of(["ls", "-l"]) == ["ls", "-l"]
    with pytest.raises(ValueError):
        _api.argv_of([])


def test_rollback_mode() -> None:
    assert _api.rollback_mode(False, False) == "all"
    assert _api.rollback_mode(True, False) == "files_only"
    assert _api.rollback_mode(False, True) == "processes_only"
    with pytest.raises(ValueError, match="exclude"):
        _api.rollback_mode(True, True)


def test_http_timeout_never_shorter_than_the_calls_own() -> None:
    base = 30.0
    default = _api.exec_command(
        "sb", ["true"], timeout=None, cwd=None, env=None, stdin=None, base_timeout=base
    )
    assert default.timeout is not None and default.timeout > _api.DAEMON_DEFAULT_RUN_TIMEOUT
    long = _api.exec_command("sb", ["true"], timeout=3600, cwd=None, env=None, stdin=None, base_timeout=base)
    assert long.timeout is not None and long.timeout > 3600
    assert long.body["timeout_ms"] == 3_600_000
    short = _api.session_run("sb", "s", "1", 0.5, base)
    assert short.timeout == 0.5 + _api.RUN_TIMEOUT_MARGIN and short.body["timeout_ms"] == 500
    assert _api.checkpoint("sb", None).timeout is None  # the client's default
    with pytest.raises(ValueError):
        _api.session_run("sb", "s", "1", 0, base)


def test_ids_are_path_encoded() -> None:
    assert _api.get_sandbox("a/b").path == "/v1/sandboxes/a%2Fb"
    with pytest.raises(ValueError):
        _api.get_sandbox("")


def test_a_node_session_s_generation_is_read_when_live() -> None:
    node = samples.node()
    node["sessions"] = [
        {"session": "s1", "kind": "python", "template": "live", "generation": 3},
        {"session": "s2", "kind": "bash", "template": "dumped"},
    ]
    live, dumped = NodeInfo.from_json(node).sessions
    assert (live.template, live.generation) == ("live", 3)
    assert (dumped.template, dumped.generation) == ("dumped", None)
