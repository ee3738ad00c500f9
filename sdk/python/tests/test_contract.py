"""The SDK's routes and bodies against the daemon's contract files (no daemon):
``controller/api/openapi.yaml`` and ``client/src/sandbox_types/``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deltabox import _api
from deltabox.models import Limits

REPO = Path(__file__).resolve().parents[3]
OPENAPI = REPO / "controller" / "api" / "openapi.yaml"
TYPES = REPO / "client" / "src" / "sandbox_types"


def openapi_routes() -> dict[str, set[str]]:
    """Path template → its methods, read from the OpenAPI file's ``paths``."""
    routes: dict[str, set[str]] = {}
    current = None
    for line in OPENAPI.read_text().splitlines():
        if m := re.match(r"^  (/\S*):\s*$", line):
            current = m.group(1)
            routes[current] = set()
        elif current and (m := re.match(r"^    (get|post|put|delete|patch):\s*$", line)):
            routes[current].add(m.group(1).upper())
        elif line and not line.startswith(" "):
            current = None
    return routes


def sdk_calls() -> list[_api.Call[object]]:
    return [
        _api.create_sandbox(Limits(), None, False),
        _api.list_sandboxes(),
        _api.get_sandbox("SB"),
        _api.remove_sandbox("SB"),
        _api.exec_command("SB", ["true"], timeout=None, cwd=None, env=None, stdin=None, base_timeout=1),
        _api.session_start("SB", "bash"),
        _api.session_run("SB", "SESSION", "true", None, 1),
        _api.session_stop("SB", "SESSION"),
        _api.checkpoint("SB", None),
        _api.rollback("SB", "NODE", "all"),
        _api.branch_one("NODE"),
        _api.sandbox_tree("SB"),
        _api.node_tree("NODE"),
        _api.diff("A", "B"),
        _api.remove_node("NODE"),
        _api.gc(),
    ]


@pytest.mark.parametrize("call", sdk_calls(), ids=lambda c: f"{c.method} {c.path}")
def test_every_sdk_route_is_in_the_openapi_contract(call: _api.Call[object]) -> None:
    routes = openapi_routes()
    assert routes, f"no paths found in {OPENAPI}"
    for template, methods in routes.items():
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, call.path):
            assert call.method in methods, f"{template} has {methods}, the SDK sends {call.method}"
            return
    pytest.fail(f"{call.method} {call.path} matches no path of {OPENAPI}")


def rust_fields(struct: str) -> set[str]:
    files = sorted(TYPES.glob("*.rs"))
    assert files, f"no Rust files in {TYPES}"
    text = "\n".join(f.read_text() for f in files)
    body = re.search(rf"pub struct {struct} \{{(.*?)\n\}}", text, re.S)
    assert body, f"struct {struct} not found in {TYPES}"
    return set(re.findall(r"pub (\w+):", body.group(1)))


@pytest.mark.parametrize(
    ("struct", "body"),
    [
        ("CreateSandbox", _api.create_sandbox(Limits(1, 1.0, 1), "/r", True).body),
        ("LimitsSpec", Limits(1, 1.0, 1).to_json()),
        (
            "ExecRequest",
            _api.exec_command("s", ["a"], timeout=1, cwd="/", env={"A": "1"}, stdin="x", base_timeout=1).body,
        ),
        ("SessionStart", _api.session_start("s", "bash").body),
        ("SessionRun", _api.session_run("s", "t", "c", 1, 1).body),
        ("CheckpointRequest", _api.checkpoint("s", "l").body),
        ("RollbackRequest", _api.rollback("s", "n", "all").body),
        ("BranchRequest", _api.branch_one("n").body),
    ],
)
def test_request_bodies_use_the_rust_field_names(struct: str, body: dict[str, object]) -> None:
    """The request structs deny unknown fields: the SDK must send only theirs."""
    assert set(body) <= rust_fields(struct), set(body) - rust_fields(struct)


def test_diff_query_fields() -> None:
    call = _api.diff("a", "b")
    assert call.params is not None and set(call.params) == rust_fields("DiffQuery")
