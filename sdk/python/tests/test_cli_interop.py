"""The SDK and the ``deltabox`` CLI are two clients of one API: what one makes, the
other sees (against the session's daemon)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import Daemon, deltaboxd_path

from deltabox import Client

pytestmark = pytest.mark.daemon


def cli(daemon: Daemon, *args: str) -> str:
    """Runs ``deltabox --socket <daemon's> args…`` (``$DELTABOX_CLI``, else next to
    deltaboxd) and returns its stdout; fails with its stderr."""
    binary = Path(os.environ.get("DELTABOX_CLI") or deltaboxd_path().with_name("deltabox"))
    assert binary.is_file(), f"{binary} is not built (set DELTABOX_CLI)"
    proc = subprocess.run(
        [str(binary), "--socket", daemon.socket, *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"deltabox {' '.join(args)} exited {proc.returncode}: {proc.stderr}"
    return proc.stdout


def test_cli_sees_what_the_sdk_made_and_back(client: Client, daemon: Daemon) -> None:
    with client.create() as sb:
        sb.exec("echo sdk > /workspace/f")
        node = sb.checkpoint(label="from the sdk")
        listed = json.loads(cli(daemon, "ls", "--json"))
        assert sb.id in [s["id"] for s in listed["sandboxes"]]
        cli_node = cli(daemon, "checkpoint", sb.id, "--label", "from the cli").strip()
        tree = sb.tree()
        assert tree.node(cli_node).parent == node.id
        assert tree.node(cli_node).label == "from the cli"
        cli(daemon, "rollback", sb.id, node.id)
        assert sb.refresh().head == node.id
        assert sb.exec("cat /workspace/f").stdout == "sdk\n"
