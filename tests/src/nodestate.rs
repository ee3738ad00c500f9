//! A node's state as the tests compare it: a python session's buffer hash and `x`, a
//! bash session's `$Y` and cwd, and a file, with a step that changes all of them.

use crate::sandbox::Http;

/// What a node holds: the python buffer's hash and `x` (the session set up with
/// [`crate::memory::random_buffer`] and `x`), bash's `$Y` and cwd, `/workspace/step`.
#[derive(Debug, PartialEq, Eq)]
pub struct State {
    /// `print(h(), x)` in the python session.
    pub python: String,
    /// `$Y` and `$PWD` in the bash session.
    pub bash: String,
    /// The file.
    pub file: String,
}

/// The state of sandbox `sb` with python session `py` and bash session `sh`.
pub fn state(api: &Http, sb: &str, py: &str, sh: &str) -> State {
    State {
        python: api.run(sb, py, "print(h(), x)"),
        bash: api.run(sb, sh, "echo \"$Y\" \"$PWD\""),
        file: api.sh(sb, "cat /workspace/step"),
    }
}

/// Step `i`: every part of the state changes.
pub fn step(api: &Http, sb: &str, py: &str, sh: &str, i: u32) {
    api.run(
        sb,
        py,
        &format!("b[{i}:{i} + 64] = os.urandom(64)\nx = {i}"),
    );
    api.run(
        sb,
        sh,
        &format!("Y=bash-{i}; mkdir -p /tmp/d{i}; cd /tmp/d{i}"),
    );
    api.sh(sb, &format!("echo step-{i} > /workspace/step"));
}

/// Steps 1 to `n`, each checkpointed (labels `n1`…): the nodes and their states.
pub fn checkpointed_steps(
    api: &Http,
    sb: &str,
    py: &str,
    sh: &str,
    n: u32,
) -> (Vec<String>, Vec<State>) {
    let mut nodes = Vec::new();
    let mut states = Vec::new();
    for i in 1..=n {
        step(api, sb, py, sh, i);
        states.push(state(api, sb, py, sh));
        nodes.push(api.checkpoint(sb, &format!("n{i}")));
    }
    (nodes, states)
}
