"""The examples, run in their short mode against the session's daemon; each checks
its own outcome and exits non-zero when the check fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Daemon

pytestmark = pytest.mark.daemon
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["tree_search.py", "rl_rollouts.py", "best_of_n.py"])
def test_example(daemon: Daemon, name: str) -> None:
    env = {**os.environ, "DELTABOX_SOCKET": daemon.socket}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--short"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
