//! Deep lineages are re-rooted: once a checkpoint's templates are `--reroot-generations`
//! forks from a fresh process, the daemon re-makes them in the background from the
//! node's dumps — through a shallow template of the tree, or into a fresh process when
//! none is shallow enough — and a rollback to the node then gives back exactly its
//! state (Python memory, bash variables, files) from the shorter lineage.

use std::thread;
use std::time::{Duration, Instant};

use deltabox_tests::memory::{PySandbox, random_buffer};
use deltabox_tests::sandbox::Http;
use deltabox_tests::templates::{templates, tree_node};

/// What a node holds: the python buffer's hash and `x`, bash's `$Y`, a file.
#[derive(Debug, PartialEq, Eq)]
struct State {
    python: String,
    bash: String,
    file: String,
}

fn state(api: &Http, sb: &str, py: &str, sh: &str) -> State {
    State {
        python: api.run(sb, py, "print(h(), x)"),
        bash: api.run(sb, sh, "echo \"$Y\""),
        file: api.sh(sb, "cat /workspace/step"),
    }
}

/// Step `i`: every part of the state changes.
fn step(api: &Http, sb: &str, py: &str, sh: &str, i: u32) {
    api.run(
        sb,
        py,
        &format!("b[{i}:{i} + 64] = os.urandom(64)\nx = {i}"),
    );
    api.run(sb, sh, &format!("Y=bash-{i}"));
    api.sh(sb, &format!("echo step-{i} > /workspace/step"));
}

/// The generations of `node`'s live session templates, as `tree` gives them.
fn generations(api: &Http, sb: &str, node: &str) -> Vec<Option<u64>> {
    tree_node(api, sb, node)["sessions"]
        .as_array()
        .map(|s| s.iter().map(|s| s["generation"].as_u64()).collect())
        .unwrap_or_default()
}

/// Waits until every session template of `node` is live with a generation of at most
/// `most`; returns them.
fn wait_generations(api: &Http, sb: &str, node: &str, most: u64) -> Vec<Option<u64>> {
    let start = Instant::now();
    loop {
        let now = generations(api, sb, node);
        if now.iter().all(|g| g.is_some_and(|g| g <= most)) {
            return now;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "node {node} was not re-rooted to at most {most}: generations {now:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A sandbox with a python session (8 MiB of random bytes) and a bash session.
fn start(test: &str, reroot_at: &str) -> (PySandbox, String) {
    let sb = PySandbox::start(
        test,
        &["--reroot-generations", reroot_at],
        &format!("{}\nx = 0", random_buffer(8)),
    );
    let sh = sb.api.session(&sb.sandbox, "bash");
    step(&sb.api, &sb.sandbox, &sb.session, &sh, 0);
    (sb, sh)
}

/// Through the shallowest template: at 4 generations, the third node of a chain of
/// rollbacks (templates 1, 3, 5 forks deep) is re-made through the first node's
/// templates (1 deep): 3 forks deep, and its state comes back whole.
#[test]
fn a_deep_node_is_re_rooted_through_a_shallow_template() {
    let (
        PySandbox {
            daemon,
            api,
            sandbox: sb,
            tree,
            session: py,
        },
        sh,
    ) = start("reroot", "4");
    let mut nodes = vec![api.checkpoint(&sb, "n0")];
    assert_eq!(generations(&api, &sb, &nodes[0]), [Some(1), Some(1)]);
    for i in 1..=2 {
        api.rollback(&sb, nodes.last().unwrap());
        step(&api, &sb, &py, &sh, i);
        nodes.push(api.checkpoint(&sb, &format!("n{i}")));
    }
    assert_eq!(generations(&api, &sb, &nodes[1]), [Some(3), Some(3)]);
    let expected = state(&api, &sb, &py, &sh);
    // Two forks through n0's templates (generation 1).
    assert_eq!(
        wait_generations(&api, &sb, &nodes[2], 3),
        [Some(3), Some(3)]
    );
    // Shorter than 4: n1 is left alone.
    assert_eq!(generations(&api, &sb, &nodes[1]), [Some(3), Some(3)]);
    // One template per node and session: the deep ones die (right after the swap), no
    // scratch process or sandbox is left.
    let start = Instant::now();
    while templates(&daemon, &tree).len() != 6 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "templates: {:?}",
            templates(&daemon, &tree)
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(api.sandbox_ids(), std::slice::from_ref(&sb));

    step(&api, &sb, &py, &sh, 3);
    assert_ne!(state(&api, &sb, &py, &sh), expected);
    api.rollback(&sb, &nodes[2]);
    assert_eq!(state(&api, &sb, &py, &sh), expected);
    // The session goes on from the re-made template (3 + 2 = 5 deep at its next
    // checkpoint, which is re-rooted in turn).
    step(&api, &sb, &py, &sh, 4);
    let n3 = api.checkpoint(&sb, "n3");
    assert_eq!(api.run(&sb, &py, "print(x)"), "4\n");
    assert_eq!(wait_generations(&api, &sb, &n3, 3), [Some(3), Some(3)]);
}

/// Into a fresh process: at 2 generations no template is shallow enough to fork
/// (below 1), so the node's sessions are restored from their dumps into husks, and the
/// re-made templates are 1 fork deep.
#[test]
fn a_deep_node_with_no_shallow_template_is_re_rooted_into_fresh_processes() {
    let (
        PySandbox {
            daemon: _daemon,
            api,
            sandbox: sb,
            tree: _,
            session: py,
        },
        sh,
    ) = start("reroothusk", "2");
    let n0 = api.checkpoint(&sb, "n0");
    api.rollback(&sb, &n0);
    step(&api, &sb, &py, &sh, 1);
    let n1 = api.checkpoint(&sb, "n1");
    let expected = state(&api, &sb, &py, &sh);
    assert_eq!(wait_generations(&api, &sb, &n1, 1), [Some(1), Some(1)]);
    step(&api, &sb, &py, &sh, 2);
    api.rollback(&sb, &n1);
    assert_eq!(state(&api, &sb, &py, &sh), expected);
    // A fork of the re-made template, then a checkpoint: 3 deep, re-rooted again.
    step(&api, &sb, &py, &sh, 3);
    let n2 = api.checkpoint(&sb, "n2");
    let at_n2 = state(&api, &sb, &py, &sh);
    assert_eq!(wait_generations(&api, &sb, &n2, 1), [Some(1), Some(1)]);
    api.rollback(&sb, &n0);
    api.rollback(&sb, &n2);
    assert_eq!(state(&api, &sb, &py, &sh), at_n2);
}
