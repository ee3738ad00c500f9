//! The `deltabox` CLI with `--json`, pointed at a test daemon: a failed command fails
//! the test with its stderr and the daemon's log.

use serde_json::Value;

use crate::daemon::TestDaemon;
use crate::sandbox::id_of;

/// `deltabox --json ARGS` (the flag goes before a `--`), parsed; fails unless it
/// succeeded.
pub fn json(daemon: &TestDaemon, args: &[&str]) -> Value {
    let mut full: Vec<&str> = args.to_vec();
    let at = full.iter().position(|a| *a == "--").unwrap_or(full.len());
    full.insert(at, "--json");
    let out = daemon.cli(&full);
    assert!(
        out.status.success(),
        "deltabox {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("deltabox {args:?}: not JSON ({e}): {out:?}"))
}

/// `deltabox session run SANDBOX SESSION CODE`: its stdout; fails unless the code
/// exited 0.
pub fn run(daemon: &TestDaemon, sandbox: &str, session: &str, code: &str) -> String {
    let out = json(daemon, &["session", "run", sandbox, session, code]);
    assert_eq!(out["status"], 0, "{out}");
    out["stdout"]
        .as_str()
        .unwrap_or_else(|| panic!("no stdout in {out}"))
        .to_owned()
}

/// `deltabox session start SANDBOX --kind KIND`: the new session's id.
pub fn session(daemon: &TestDaemon, sandbox: &str, kind: &str) -> String {
    id_of(&json(
        daemon,
        &["session", "start", sandbox, "--kind", kind],
    ))
}
