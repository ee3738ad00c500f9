"""``node.branch(n)`` where some branches fail and the rest succeed, on a real daemon.

The failure is a real limit: the tree's pids cgroup gets a ``pids.max`` with room for
the processes of two more branches. A branch forks its session processes from the
node's templates, which are in the tree; once the tree is full that fork fails, the
daemon answers that branch call with an error, and — because the SDK branches one
sandbox per call — the branches made before still come back as sandboxes.

Where the pids limit lives (docs/sandbox-runtime.md, "Cgroups"): in the tree's cgroup
v2 directory (``<--sandbox-cgroup>/…/<tree>``, the parent of ``sb-<sandbox>``) when
cgroup2 has the pids controller, else at the same relative path in the v1 pids
hierarchy under the daemon's own v1 cgroup (this machine).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CGROUP_ROOT, Daemon

import deltabox
from deltabox import Client

pytestmark = pytest.mark.daemon
V1_PIDS = Path("/sys/fs/cgroup/pids")


def settled(current: Path) -> int:
    """``pids.current`` once it has not changed for 0.5 s (at most 20 s)."""
    last, since, deadline = int(current.read_text()), time.monotonic(), time.monotonic() + 20
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = int(current.read_text())
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 0.5:
            break
    return last


def tree_pids_dir(daemon: Daemon, sandbox_id: str) -> Path:
    """The cgroup directory whose ``pids.max`` bounds every process of the sandbox's
    tree."""
    found = [p for p in daemon.cgroup.rglob(f"sb-{sandbox_id}") if p.is_dir()]
    assert len(found) == 1, f"no single sb-{sandbox_id} under {daemon.cgroup}: {found}"
    tree_v2 = found[0].parent
    if (tree_v2 / "pids.max").exists():
        return tree_v2
    own = [
        line.split(":", 2)[2].strip()
        for line in Path(f"/proc/{daemon.pid}/cgroup").read_text().splitlines()
        if line.split(":")[1] == "pids"
    ]
    assert own, f"deltaboxd (pid {daemon.pid}) has no pids cgroup, v2 or v1"
    tree_v1 = V1_PIDS / own[0].lstrip("/") / tree_v2.relative_to(CGROUP_ROOT)
    assert (tree_v1 / "pids.max").exists(), f"neither {tree_v2} nor {tree_v1} has a pids.max"
    return tree_v1


@pytest.fixture
def limited() -> Iterator[list[Path]]:
    """pids.max files the test sets; put back to ``max`` afterwards."""
    touched: list[Path] = []
    try:
        yield touched
    finally:
        for path in touched:
            path.write_text("max")


def test_branch_some_fail_the_rest_succeed(client: Client, daemon: Daemon, limited: list[Path]) -> None:
    with client.create(pids=4096) as sb:
        py = sb.session("python")
        py.run("x = 41")
        node = sb.checkpoint(label="fan-out")
        tree = tree_pids_dir(daemon, sb.id)
        current = tree / "pids.current"
        # The checkpoint's standby forks (docs/deltacr.md, "Standby forks") count in the
        # tree's pids too, and come in the background: measured once settled.
        before = settled(current)
        with node.branch(1)[0].unwrap() as probe:
            cost = int(current.read_text()) - before  # processes one branch keeps
            assert cost >= 1, f"a branch with a python session added {cost} processes to {tree}"
            limited.append(tree / "pids.max")
            (tree / "pids.max").write_text(str(int(current.read_text()) + 2 * cost))
            # One call at a time, so which branches meet the limit is deterministic.
            outcomes = node.branch(5, max_parallel=1)
            (tree / "pids.max").write_text("max")
            try:
                ok = [o for o in outcomes if o.ok]
                failed = [o for o in outcomes if not o.ok]
                errors = [f"{o.index}: {o.error!r}" for o in failed]
                print(f"limit {tree}: {len(ok)} branches made; failed: {errors}")
                assert ok, f"every branch failed: {errors}"
                assert failed, f"no branch met the limit of {tree}"
                assert [o.index for o in ok] == list(range(len(ok))) and len(ok) <= 2, errors
                for o in failed:
                    # the fork of the node's template was refused by the pids limit
                    assert isinstance(o.error, deltabox.LimitsExceeded), o.error
                    assert o.error.status >= 400 and o.error.kind not in ("unreachable", "protocol"), o.error
                    with pytest.raises(deltabox.DeltaBoxError):
                        o.unwrap()
                for o in ok:
                    (session,) = o.unwrap().sessions()
                    assert session.run("print(x)").stdout == "41\n"
                # the failures left the node usable: a branch works again without the limit
                with node.branch(1)[0].unwrap() as again:
                    assert again.exec("echo fine").stdout == "fine\n"
                assert probe.exec("echo probe").stdout == "probe\n"
            finally:
                for o in outcomes:
                    if o.sandbox is not None:
                        o.sandbox.remove()


def test_branch_outcomes_keep_their_order_concurrently(client: Client) -> None:
    with client.create() as sb:
        node = sb.checkpoint()
        outcomes = node.branch(3, max_parallel=3)
        try:
            assert [o.index for o in outcomes] == [0, 1, 2]
            assert all(o.ok for o in outcomes), [o.error for o in outcomes]
            assert len({o.unwrap().id for o in outcomes}) == 3
        finally:
            for o in outcomes:
                if o.sandbox is not None:
                    o.sandbox.remove()
