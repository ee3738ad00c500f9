"""``node.branch(n)`` where some branches fail and the rest succeed, on a real daemon.

The failure is a real limit: the daemon's sandbox cgroup (``--sandbox-cgroup``, the
parent of every tree and sandbox cgroup) gets a ``pids.max`` with room for only two
more branches' processes, so the daemon cannot fork the session template and init's
children for the later branches and answers those calls with an error; the SDK
branches one sandbox per call, so the first ones still come back as sandboxes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon

import deltabox
from deltabox import Client

pytestmark = pytest.mark.daemon


def pids_current(cgroup: Path) -> int:
    return int((cgroup / "pids.current").read_text())


@pytest.fixture
def pids_limit(daemon: Daemon) -> Iterator[Path]:
    """The daemon cgroup's ``pids.max``, reset to ``max`` after the test."""
    path = daemon.cgroup / "pids.max"
    assert path.exists(), (
        f"{path} does not exist: the pids controller is not enabled for {daemon.cgroup} "
        "(enable it in the parent's cgroup.subtree_control)"
    )
    try:
        yield path
    finally:
        path.write_text("max")


def test_branch_some_fail_the_rest_succeed(client: Client, daemon: Daemon, pids_limit: Path) -> None:
    with client.create() as sb:
        py = sb.session("python")
        py.run("x = 41")
        node = sb.checkpoint(label="fan-out")
        before = pids_current(daemon.cgroup)
        with node.branch(1)[0].unwrap() as probe:
            cost = pids_current(daemon.cgroup) - before  # processes one branch keeps
            assert cost >= 1, f"a branch with a python session added {cost} processes"
            pids_limit.write_text(str(pids_current(daemon.cgroup) + 2 * cost))
            outcomes = node.branch(6)
            pids_limit.write_text("max")
            try:
                ok = [o for o in outcomes if o.ok]
                failed = [o for o in outcomes if not o.ok]
                assert ok, f"every branch failed: {[str(o.error) for o in failed]}"
                assert failed, "no branch met the pids limit"
                assert len(ok) <= 2
                for o in failed:
                    assert isinstance(o.error, deltabox.DeltaBoxError)
                    assert o.error.kind not in ("unreachable", "client_timeout", "protocol"), o.error
                    with pytest.raises(deltabox.DeltaBoxError):
                        o.unwrap()
                for o in ok:
                    b = o.unwrap()
                    (session,) = b.sessions()
                    assert session.run("print(x)").stdout == "41\n"
                # the failures left the node usable: a branch works again without the limit
                with node.branch(1)[0].unwrap() as again:
                    assert again.exec("echo fine").stdout == "fine\n"
                assert probe.exec("echo probe").stdout == "probe\n"
            finally:
                for o in outcomes:
                    if o.sandbox is not None:
                        o.sandbox.remove()
