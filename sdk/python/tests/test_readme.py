"""The README's quickstart runs as written, against the session's daemon."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.daemon
README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs(socket_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = README.read_text()
    block = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S)
    assert block, "README.md has no python quickstart block"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 12, "the quickstart is meant to be about ten lines"
    exec(compile(code, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert out.count("v1\n") == 3  # each branch saw the node's file
