//! End to end through a real `deltaboxd`, once through the CLI and once through the
//! Rust client crate (`deltabox-client`, as a Rust agent uses it): create → session state (python and bash) → checkpoint ×3 → rollback to
//! the first → files, Python variables, bash variables and cwd are the first node's →
//! branch ×4 from the second → each branch starts at the second node and diverges on
//! its own, and the original sandbox is untouched.

use deltabox_client::Client;
use deltabox_client::sandbox_types::{
    BranchRequest, CheckpointRequest, CreateSandbox, ExecRequest, ExecResult, RollbackMode,
    RollbackRequest, SessionRun, SessionRunResult, SessionStart,
};
use deltabox_tests::cli;
use deltabox_tests::daemon::TestDaemon;
use deltabox_tests::require_root;
use serde_json::Value;

/// What the scenario needs from a way of talking to the daemon.
trait Driver {
    fn create(&self) -> String;
    fn session(&self, sandbox: &str, kind: &str) -> String;
    fn run(&self, sandbox: &str, session: &str, code: &str) -> SessionRunResult;
    fn exec(&self, sandbox: &str, argv: &[&str]) -> ExecResult;
    fn checkpoint(&self, sandbox: &str, label: &str) -> String;
    fn rollback(&self, sandbox: &str, node: &str);
    fn branch(&self, node: &str, count: u32) -> Vec<String>;
    /// The session ids of a sandbox, by kind.
    fn sessions(&self, sandbox: &str) -> Vec<(String, String)>;
}

struct Cli<'a>(&'a TestDaemon);

impl Cli<'_> {
    fn json(&self, args: &[&str]) -> Value {
        cli::json(self.0, args)
    }
}

impl Driver for Cli<'_> {
    fn create(&self) -> String {
        self.json(&["create"])["id"].as_str().unwrap().to_owned()
    }
    fn session(&self, sandbox: &str, kind: &str) -> String {
        cli::session(self.0, sandbox, kind)
    }
    fn run(&self, sandbox: &str, session: &str, code: &str) -> SessionRunResult {
        serde_json::from_value(self.json(&["session", "run", sandbox, session, code])).unwrap()
    }
    fn exec(&self, sandbox: &str, argv: &[&str]) -> ExecResult {
        let mut args = vec!["exec", sandbox, "--"];
        args.extend_from_slice(argv);
        serde_json::from_value(self.json(&args)).unwrap()
    }
    fn checkpoint(&self, sandbox: &str, label: &str) -> String {
        self.json(&["checkpoint", sandbox, "--label", label])["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }
    fn rollback(&self, sandbox: &str, node: &str) {
        let out = self.json(&["rollback", sandbox, node]);
        assert_eq!(out["node"], node);
    }
    fn branch(&self, node: &str, count: u32) -> Vec<String> {
        let out = self.json(&["branch", node, "--count", &count.to_string()]);
        out["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect()
    }
    fn sessions(&self, sandbox: &str) -> Vec<(String, String)> {
        let out = self.json(&["status", sandbox]);
        out["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["kind"].as_str().unwrap().to_owned(),
                    s["id"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }
}

struct Api {
    client: Client,
    rt: tokio::runtime::Runtime,
}

impl Api {
    fn new(daemon: &TestDaemon) -> Self {
        Self {
            client: Client::new(daemon.socket()),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }
}

impl Driver for Api {
    fn create(&self) -> String {
        let sb = self
            .rt
            .block_on(self.client.create_sandbox(&CreateSandbox::default()));
        sb.unwrap().id
    }
    fn session(&self, sandbox: &str, kind: &str) -> String {
        let req = SessionStart {
            kind: kind.to_owned(),
        };
        self.rt
            .block_on(self.client.session_start(sandbox, &req))
            .unwrap()
            .id
    }
    fn run(&self, sandbox: &str, session: &str, code: &str) -> SessionRunResult {
        let req = SessionRun {
            code: code.to_owned(),
            timeout_ms: None,
        };
        self.rt
            .block_on(self.client.session_run(sandbox, session, &req))
            .unwrap()
    }
    fn exec(&self, sandbox: &str, argv: &[&str]) -> ExecResult {
        let req = ExecRequest {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            ..ExecRequest::default()
        };
        self.rt.block_on(self.client.exec(sandbox, &req)).unwrap()
    }
    fn checkpoint(&self, sandbox: &str, label: &str) -> String {
        let req = CheckpointRequest {
            label: Some(label.to_owned()),
        };
        self.rt
            .block_on(self.client.checkpoint(sandbox, &req))
            .unwrap()
            .id
    }
    fn rollback(&self, sandbox: &str, node: &str) {
        let req = RollbackRequest {
            node: node.to_owned(),
            mode: RollbackMode::All,
            warm_up: None,
        };
        let out = self
            .rt
            .block_on(self.client.rollback(sandbox, &req))
            .unwrap();
        assert_eq!(out.node, node);
    }
    fn branch(&self, node: &str, count: u32) -> Vec<String> {
        let out = self
            .rt
            .block_on(self.client.branch(node, &BranchRequest { count }))
            .unwrap();
        out.sandboxes.into_iter().map(|s| s.id).collect()
    }
    fn sessions(&self, sandbox: &str) -> Vec<(String, String)> {
        let sb = self.rt.block_on(self.client.sandbox(sandbox)).unwrap();
        sb.sessions.into_iter().map(|s| (s.kind, s.id)).collect()
    }
}

fn session_of(d: &dyn Driver, sandbox: &str, kind: &str) -> String {
    d.sessions(sandbox)
        .into_iter()
        .find(|(k, _)| k == kind)
        .unwrap_or_else(|| panic!("sandbox {sandbox} has no {kind} session"))
        .1
}

/// Sets the state of step `i`: a Python variable, a file, a bash variable and cwd.
fn set_step(d: &dyn Driver, sb: &str, py: &str, sh: &str, i: u32) {
    let out = d.run(
        sb,
        py,
        &format!("x = {i}\nhistory = globals().get('history', []) + [{i}]\nopen('/workspace/state.txt', 'w').write('{i}')"),
    );
    assert_eq!(out.status, 0, "{out:?}");
    let out = d.run(
        sb,
        sh,
        &format!("mkdir -p /tmp/d{i} && cd /tmp/d{i} && V={i}"),
    );
    assert_eq!(out.status, 0, "{out:?}");
}

/// Asserts the state of step `i` (as `set_step` left it, `history` up to `i`).
fn assert_step(d: &dyn Driver, sb: &str, i: u32) {
    let py = session_of(d, sb, "python");
    let sh = session_of(d, sb, "bash");
    let out = d.run(
        sb,
        &py,
        "print(x, history, open('/workspace/state.txt').read())",
    );
    let history: Vec<String> = (1..=i).map(|n| n.to_string()).collect();
    assert_eq!(
        out.stdout,
        format!("{i} [{}] {i}\n", history.join(", ")),
        "python state of sandbox {sb}"
    );
    let out = d.run(sb, &sh, "echo \"$V $PWD\"");
    assert_eq!(out.stdout, format!("{i} /tmp/d{i}\n"), "bash state of {sb}");
    let out = d.exec(sb, &["cat", "/workspace/state.txt"]);
    assert_eq!(
        out.stdout,
        i.to_string(),
        "file seen by a new process in {sb}"
    );
}

fn scenario(d: &dyn Driver) {
    let sb = d.create();
    let py = d.session(&sb, "python");
    let sh = d.session(&sb, "bash");
    let mut nodes = Vec::new();
    for i in 1..=3 {
        set_step(d, &sb, &py, &sh, i);
        nodes.push(d.checkpoint(&sb, &format!("step {i}")));
    }
    assert_step(d, &sb, 3);

    d.rollback(&sb, &nodes[0]);
    assert_step(d, &sb, 1);

    let branches = d.branch(&nodes[1], 4);
    assert_eq!(branches.len(), 4);
    for b in &branches {
        assert_step(d, b, 2);
    }
    // Each branch writes its own state; none sees another's, nor the original's.
    for (j, b) in branches.iter().enumerate() {
        let py = session_of(d, b, "python");
        let out = d.run(
            b,
            &py,
            &format!(
                "x = {}\nopen('/workspace/state.txt', 'w').write(str(x))",
                100 + j
            ),
        );
        assert_eq!(out.status, 0, "{out:?}");
    }
    for (j, b) in branches.iter().enumerate() {
        let py = session_of(d, b, "python");
        let out = d.run(b, &py, "print(x, open('/workspace/state.txt').read())");
        assert_eq!(out.stdout, format!("{0} {0}\n", 100 + j), "branch {b}");
    }
    assert_step(d, &sb, 1);
}

#[test]
fn checkpoint_rollback_and_branch_through_the_cli() {
    require_root();
    let daemon = TestDaemon::start("e2e-cli", &[]);
    scenario(&Cli(&daemon));
}

#[test]
fn checkpoint_rollback_and_branch_through_the_api() {
    require_root();
    let daemon = TestDaemon::start("e2e-api", &[]);
    scenario(&Api::new(&daemon));
}
