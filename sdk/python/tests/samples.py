"""Bodies shaped as client/src/sandbox_types/ serialises them, for unit tests."""

from __future__ import annotations

from typing import Any

TREE = "0193a0c0-0000-7000-8000-00000000aaaa"


def sandbox(ident: str = "0193a0c0-1111-7000-8000-000000000001", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": ident,
        "tree": TREE,
        "created_ms": 1_760_000_000_000,
        "limits": {"memory_bytes": 2 << 30, "cpus": 1.0},
        "auto_checkpoint": False,
        "sessions": [],
        "state": "running",
    }
    body.update(over)
    return body


def node(ident: str = "0193a0c0-2222-7000-8000-000000000001", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": ident,
        "tree": TREE,
        "sandbox": "0193a0c0-1111-7000-8000-000000000001",
        "created_ms": 1_760_000_000_100,
        "bytes": 4096,
        "sessions": [{"session": "s1", "kind": "python", "template": "live"}],
        "timings": {
            "total_ms": 3.5,
            "quiesce_ms": 0.1,
            "files_ms": 0.2,
            "processes_ms": 3.0,
            "record_ms": 0.2,
        },
    }
    body.update(over)
    return body


def exec_result(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "exit_code": 0,
        "stdout": "hi\n",
        "stderr": "",
        "timed_out": False,
        "truncated": False,
        "duration_ms": 1.5,
    }
    body.update(over)
    return body


def run_result(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "stdout": "41\n",
        "stderr": "",
        "status": 0,
        "timed_out": False,
        "truncated": False,
        "duration_ms": 0.7,
    }
    body.update(over)
    return body


def session(ident: str = "s1", kind: str = "python") -> dict[str, Any]:
    return {"id": ident, "kind": kind, "pid": 4242, "started_ms": 1_760_000_000_050}
