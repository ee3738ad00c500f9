"""Every SDK call against a real deltaboxd (the session fixture in conftest.py)."""

from __future__ import annotations

import pytest

import deltabox
from deltabox import Client, Sandbox

pytestmark = pytest.mark.daemon


def test_create_exec_remove(client: Client) -> None:
    with Sandbox.create(memory="512M", cpus=1, pids=256, client=client) as sb:
        assert sb.info.limits == deltabox.Limits(512 << 20, 1.0, 256)
        assert sb.info.state == "running" and not sb.auto_checkpoint
        hello = sb.exec("echo hi; echo err >&2; exit 3")
        assert (hello.stdout, hello.stderr, hello.exit_code) == ("hi\n", "err\n", 3)
        assert not hello.ok and not hello.timed_out and hello.node is None
        assert sb.exec(["printf", "%s|", "a b", "c"]).stdout == "a b|c|"
        assert sb.exec("pwd").stdout == "/workspace\n"
        assert sb.exec("pwd", cwd="/tmp").stdout == "/tmp\n"
        assert sb.exec('echo "$GREETING"', env={"GREETING": "bonjour"}).stdout == "bonjour\n"
        assert sb.exec("tr a-z A-Z", stdin="shout\n").stdout == "SHOUT\n"
        slow = sb.exec("sleep 30", timeout=0.5)
        assert slow.timed_out and not slow.ok and slow.duration_ms < 20_000
        sandbox_id = sb.id
    with pytest.raises(deltabox.UnknownSandbox):
        client.sandbox(sandbox_id)


def test_list_get_and_prefix(client: Client) -> None:
    with client.create() as sb:
        assert sb.id in [s.id for s in client.sandboxes()]
        same = client.sandbox(sb.id[:-4])
        assert same == sb and same.info.tree == sb.tree_id
        assert sb.refresh().id == sb.id


def test_sessions_keep_state(client: Client) -> None:
    with client.create() as sb:
        py = sb.session("python")
        assert py.kind == "python"
        assert py.run("x = 40\nx += 1").ok
        assert py.run("print(x)").stdout == "41\n"
        assert py.run("raise ValueError('boom')").status == 1
        assert py.run("import sys; sys.exit(7)").status == 7
        bash = sb.session("bash")
        bash.run("cd /tmp && export V=7")
        assert bash.run('echo "$PWD $V"').stdout == "/tmp 7\n"
        assert bash.run("false").status == 1
        interrupted = py.run("import time; time.sleep(30)", timeout=0.5)
        assert interrupted.timed_out
        assert py.run("print(x)").stdout == "41\n"  # the session survived the interrupt
        assert {s.id for s in sb.sessions()} == {py.id, bash.id}
        closed = bash.close()
        assert closed.id == bash.id
        with pytest.raises(deltabox.UnknownSession):
            bash.run("true")
        assert [s.id for s in sb.sessions()] == [py.id]


def test_checkpoint_and_rollback_restore_files_and_processes(client: Client) -> None:
    with client.create() as sb:
        py = sb.session("python")
        py.run("x = 41")
        sb.exec("echo one > /workspace/f")
        node = sb.checkpoint(label="x=41")
        assert node.label == "x=41" and node.info.sandbox == sb.id
        assert [s.session for s in node.info.sessions] == [py.id]
        py.run("x = 99")
        sb.exec("echo two > /workspace/f; touch /workspace/new")
        result = sb.rollback(node)
        assert result.node == node.id and result.mode == "all"
        assert [s.id for s in result.sessions] == [py.id]
        assert py.run("print(x)").stdout == "41\n"
        assert sb.exec("cat /workspace/f; ls /workspace").stdout == "one\nf\n"
        assert sb.refresh().head == node.id


def test_rollback_to_any_ancestor_and_back(client: Client) -> None:
    with client.create() as sb:
        py = sb.session("python")
        nodes = []
        for i in range(3):
            py.run(f"x = {i}")
            sb.exec(f"echo {i} > /workspace/f")
            nodes.append(sb.checkpoint(label=f"step {i}"))
        assert [n.parent for n in nodes[1:]] == [nodes[0].id, nodes[1].id]
        sb.rollback(nodes[0])
        assert py.run("print(x)").stdout == "0\n"
        sb.rollback(nodes[2].id)  # forward again, by id
        assert py.run("print(x)").stdout == "2\n"
        assert sb.exec("cat /workspace/f").stdout == "2\n"
        for _ in range(3):  # the same node, again and again
            py.run("x = 'changed'")
            sb.rollback(nodes[1])
            assert py.run("print(x)").stdout == "1\n"


def test_partial_rollback(client: Client) -> None:
    with client.create() as sb:
        py = sb.session("python")
        py.run("x = 'old'")
        sb.exec("echo old > /workspace/f")
        node = sb.checkpoint()
        py.run("x = 'new'")
        sb.exec("echo new > /workspace/f")
        assert sb.rollback(node, files_only=True).mode == "files_only"
        assert sb.exec("cat /workspace/f").stdout == "old\n"
        assert py.run("print(x)").stdout == "new\n"  # processes kept running
        sb.exec("echo newer > /workspace/f")
        assert sb.rollback(node, processes_only=True).mode == "processes_only"
        assert py.run("print(x)").stdout == "old\n"
        assert sb.exec("cat /workspace/f").stdout == "newer\n"  # files kept
        with pytest.raises(ValueError):
            sb.rollback(node, files_only=True, processes_only=True)


def test_branch_gives_isolated_copies(client: Client) -> None:
    with client.create() as sb:
        py = sb.session("python")
        py.run("x = 41")
        sb.exec("echo base > /workspace/f")
        node = sb.checkpoint(label="base")
        outcomes = node.branch(3)
        try:
            assert [o.ok for o in outcomes] == [True] * 3, [o.error for o in outcomes]
            branches = [o.unwrap() for o in outcomes]
            assert len({b.id for b in branches}) == 3
            for i, b in enumerate(branches):
                assert b.tree_id == sb.tree_id and b.info.branched_from == node.id
                assert b.exec("cat /workspace/f").stdout == "base\n"
                (bpy,) = b.sessions()
                assert bpy.run(f"x += {i}; print(x)").stdout == f"{41 + i}\n"
                b.exec(f"echo {i} > /workspace/f")
            for i, b in enumerate(branches):
                assert b.exec("cat /workspace/f").stdout == f"{i}\n"  # nobody saw the others
            assert sb.exec("cat /workspace/f").stdout == "base\n"
            assert py.run("print(x)").stdout == "41\n"
            heads = {h.sandbox for h in sb.tree().sandboxes}
            assert heads >= {sb.id, *(b.id for b in branches)}
        finally:
            for o in outcomes:
                if o.sandbox is not None:
                    o.sandbox.remove()


def test_tree_and_diff(client: Client) -> None:
    with client.create() as sb:
        sb.exec("mkdir /workspace/d && echo a > /workspace/keep && echo b > /workspace/gone")
        first = sb.checkpoint(label="first")
        sb.exec("echo changed > /workspace/keep && rm /workspace/gone && echo c > /workspace/d/new")
        second = sb.checkpoint(label="second")
        tree = sb.tree()
        assert tree.tree == sb.tree_id
        assert [n.id for n in tree.nodes][-2:] == [first.id, second.id]
        assert tree.node(second.id).parent == first.id
        assert tree.head_of(sb.id) == second.id
        assert "first" in tree.text and "second" in tree.text and str(tree) == tree.text
        assert node_tree_ids(second.tree()) == node_tree_ids(tree)
        assert node_tree_ids(client.tree(first)) == node_tree_ids(tree)
        diff = sb.diff(first, second)
        assert (diff.from_, diff.to) == (first.id, second.id)
        changes = {(c.path, c.change, c.file_type) for c in diff.changes}
        assert ("/workspace/keep", "modified", "file") in changes
        assert ("/workspace/gone", "removed", "file") in changes
        assert ("/workspace/d/new", "added", "file") in changes
        assert diff.paths() == sorted(diff.paths())
        assert first.diff(second).changes == diff.changes
        assert client.node(second.id[:-3]).id == second.id


def node_tree_ids(tree: deltabox.Tree) -> list[str]:
    return [n.id for n in tree.nodes]


def test_auto_checkpoint_on_the_daemon(client: Client) -> None:
    with client.create(auto_checkpoint=True) as sb:
        assert sb.auto_checkpoint and sb.info.auto_checkpoint
        first = sb.exec("echo 1 > /workspace/f").node
        second = sb.session("python").run("y = 2").node
        assert first is not None and second is not None
        assert second.parent == first.id
        sb.exec("echo 3 > /workspace/f")
        sb.rollback(first)
        assert sb.exec("cat /workspace/f").stdout == "1\n"
        with pytest.raises(ValueError):
            sb.auto_checkpoint = False


def test_auto_checkpoint_set_after_create(client: Client) -> None:
    with client.create() as sb:
        assert sb.exec("true").node is None
        sb.auto_checkpoint = True
        a = sb.exec("echo a > /workspace/f").node
        b = sb.exec("echo b > /workspace/f").node
        assert a is not None and b is not None and b.parent == a.id
        assert a.label == "echo a > /workspace/f"
        sb.rollback(a)
        assert sb.exec("cat /workspace/f").stdout == "a\n"


def test_remove_node_and_gc(client: Client) -> None:
    with client.create() as sb:
        base = sb.checkpoint(label="base")
        sb.exec("head -c 1000000 /dev/urandom > /workspace/blob")
        top = sb.checkpoint(label="top")
        with pytest.raises(deltabox.NodeInUse):
            top.remove()
        sb.rollback(base)
        removed = top.remove()
        assert removed.nodes == [top.id]
        with pytest.raises(deltabox.UnknownNode):
            client.tree(top)
        gc = client.gc()
        assert gc.layers_removed >= 1
    assert isinstance(client.gc(), deltabox.GcResult)


def test_default_client_from_environment(socket_env: str) -> None:
    with Sandbox.create() as sb:
        assert sb.client.socket == socket_env
        assert sb.exec("echo ok").stdout == "ok\n"


def test_nodes_outlive_their_sandbox(client: Client) -> None:
    """Removing a sandbox keeps its nodes: a branch (or another sandbox of the tree)
    can still go to them, sessions included."""
    with client.create() as sb:
        py = sb.session("python")
        py.run("x = 1")
        root = sb.checkpoint(label="root")
        (outcome,) = root.branch(1)
        branch = outcome.unwrap()
        (session,) = branch.sessions()
        session.run("x = 2")
        branch.exec("echo 2 > /workspace/f")
        child = branch.checkpoint(label="taken in the branch")
        branch.remove()
        (again,) = child.branch(1)
        with again.unwrap() as revived:
            (session,) = revived.sessions()
            assert session.run("print(x)").stdout == "2\n"
            assert revived.exec("cat /workspace/f").stdout == "2\n"
        sb.rollback(child)
        assert py.run("print(x)").stdout == "2\n"
