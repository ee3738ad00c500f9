//! The demo's main act: a small tree search on a real sandbox.
//!
//! A buggy Python project (three defects) is written into `/workspace/calc` of a
//! sandbox from a persistent Python session that also holds state in memory. Three
//! worker sandboxes are branched from the first checkpoint. At each step the main
//! sandbox checkpoints; each worker rolls back to that node, applies one candidate
//! edit and runs the project's tests; the best candidate is applied in the main
//! sandbox, the failures are simply rolled back at the next step. At the end the main
//! sandbox rolls back to an earlier node and the demo checks that its Python variables
//! and files are exactly what they were there.

use std::time::Instant;

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use super::daemon::Cli;
use crate::signals::check_interrupted;
use crate::util::step;

/// The project: three functions, one defect each.
const CALC: &str = "\
def add(a, b):
    return a - b

def mul(a, b):
    return a * b + 1

def mean(xs):
    return sum(xs) / (len(xs) + 1)
";

/// Its tests: prints `passed N/3`, exits 0 when all pass. Run with `python3 -B`: an edit
/// of the same size within the same second as the cached bytecode's source would
/// otherwise run the stale `__pycache__` (its check is mtime and size).
const TESTS: &str = "\
import sys
sys.path.insert(0, '/workspace/calc')
import calc
checks = [calc.add(2, 3) == 5, calc.mul(4, 5) == 20, calc.mean([1, 2, 3]) == 2]
print(f'passed {sum(checks)}/{len(checks)}')
sys.exit(0 if all(checks) else 1)
";

/// Per step: the faulty line and the candidate replacements the search tries.
const STEPS: [(&str, [&str; 3]); 3] = [
    (
        "return a - b",
        ["return b - a", "return a + b", "return abs(a - b)"],
    ),
    (
        "return a * b + 1",
        ["return a * b - 1", "return a ** b", "return a * b"],
    ),
    (
        "return sum(xs) / (len(xs) + 1)",
        [
            "return sum(xs) / len(xs)",
            "return sum(xs) // (len(xs) + 1)",
            "return max(xs) / len(xs)",
        ],
    ),
];

/// What the Python session prints to fingerprint its state: variables and files.
const FINGERPRINT: &str = "import hashlib\n\
print(len(attempts), attempts[-1:] , sum(cache.values()) % 1000003, \
hashlib.sha256(open('/workspace/calc/calc.py','rb').read()).hexdigest()[:16])";

/// One timed state operation.
struct Timed {
    what: String,
    /// As the daemon measured it (the operation itself).
    daemon_ms: Option<f64>,
    /// As this client saw it (a `deltabox` process and the API round trip included).
    client_ms: f64,
}

/// Drives the search through the CLI.
struct Search<'a> {
    cli: &'a Cli,
    timings: Vec<Timed>,
    nodes_explored: usize,
}

impl Search<'_> {
    fn timed(&mut self, what: String, args: &[&str]) -> Result<Value> {
        let start = Instant::now();
        let out = self.cli.value(args)?;
        let client_ms = start.elapsed().as_secs_f64() * 1e3;
        // Checkpoint and rollback report their own time; a branch one per sandbox.
        let daemon_ms = out["timings"]["total_ms"].as_f64().or_else(|| {
            out["branch_ms"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).sum())
        });
        self.timings.push(Timed {
            what,
            daemon_ms,
            client_ms,
        });
        Ok(out)
    }

    fn run(&self, sandbox: &str, session: &str, code: &str) -> Result<Value> {
        let out = self
            .cli
            .value(&["session", "run", sandbox, session, code])?;
        ensure!(
            out["status"] == 0,
            "session code failed in {sandbox}: {}{}",
            out["stdout"].as_str().unwrap_or(""),
            out["stderr"].as_str().unwrap_or("")
        );
        Ok(out)
    }

    fn tests(&self, sandbox: &str) -> Result<u32> {
        let out = self.cli.value(&[
            "exec",
            sandbox,
            "--",
            "python3",
            "-B",
            "/workspace/calc/test_calc.py",
        ])?;
        let text = out["stdout"].as_str().unwrap_or("");
        text.trim()
            .strip_prefix("passed ")
            .and_then(|t| t.split('/').next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("unexpected test output in {sandbox}: {text:?}"))
    }

    fn checkpoint(&mut self, sandbox: &str, label: &str) -> Result<String> {
        let node = self.timed(
            format!("checkpoint {label:?}"),
            &["checkpoint", sandbox, "--label", label],
        )?;
        self.nodes_explored += 1;
        id(&node)
    }
}

fn id(value: &Value) -> Result<String> {
    value["id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no id in {value}"))
}

fn edit_code(old: &str, new: &str) -> String {
    format!(
        "src = open('/workspace/calc/calc.py').read()\n\
         open('/workspace/calc/calc.py', 'w').write(src.replace({old:?}, {new:?}))\n\
         attempts.append({new:?})"
    )
}

/// Runs the search; returns the sandboxes it made (for removal).
pub fn run(cli: &Cli, made: &mut Vec<String>) -> Result<()> {
    let total = Instant::now();
    let mut search = Search {
        cli,
        timings: Vec::new(),
        nodes_explored: 0,
    };

    step("creating a sandbox (embedded default: host /usr and /etc read-only, empty /workspace)");
    let main = id(&search.timed("create".into(), &["create"])?)?;
    made.push(main.clone());
    let py = id(&cli.value(&["session", "start", &main, "--kind", "python"])?)?;
    println!("  sandbox {main}, python session {py}");

    step("building state: variables in the session's memory, the project in /workspace/calc");
    search.run(
        &main,
        &py,
        &format!(
            "import os\nattempts = []\ncache = {{i: i * i for i in range(200_000)}}\n\
             os.makedirs('/workspace/calc', exist_ok=True)\n\
             open('/workspace/calc/calc.py', 'w').write({CALC:?})\n\
             open('/workspace/calc/test_calc.py', 'w').write({TESTS:?})"
        ),
    )?;
    let mut passed = search.tests(&main)?;
    println!("  tests: passed {passed}/3");
    let root = search.checkpoint(&main, "buggy project")?;

    step("branching 3 worker sandboxes from that node (each a candidate evaluator)");
    let branched = search.timed("branch x3".into(), &["branch", &root, "--count", "3"])?;
    let workers: Vec<String> = branched["sandboxes"]
        .as_array()
        .context("branch returned no sandboxes")?
        .iter()
        .map(id)
        .collect::<Result<_>>()?;
    made.extend(workers.iter().cloned());
    let worker_py: Vec<String> = workers
        .iter()
        .map(|w| {
            let info = cli.value(&["status", w])?;
            info["sessions"][0]["id"]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("worker {w} has no session"))
        })
        .collect::<Result<_>>()?;

    let mut fingerprints = Vec::new();
    for (k, (old, candidates)) in STEPS.iter().enumerate() {
        check_interrupted()?;
        let node = if k == 0 {
            root.clone()
        } else {
            search.checkpoint(&main, &format!("step {k}: passed {passed}/3"))?
        };
        let fp = search.run(&main, &py, FINGERPRINT)?["stdout"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        fingerprints.push((node.clone(), fp));
        step(format!("step {}: 3 candidates for `{old}`", k + 1));
        let mut scores = Vec::new();
        for (j, candidate) in candidates.iter().enumerate() {
            let w = &workers[j];
            if k > 0 {
                search.timed(
                    format!("rollback worker {j} to step {k}"),
                    &["rollback", w, &node],
                )?;
            }
            search.run(w, &worker_py[j], &edit_code(old, candidate))?;
            let score = search.tests(w)?;
            search.nodes_explored += 1;
            println!("  worker {j}: `{candidate}` -> passed {score}/3");
            scores.push(score);
        }
        let (best, &score) = scores
            .iter()
            .enumerate()
            .max_by_key(|(_, s)| **s)
            .context("no candidate")?;
        if score <= passed {
            bail!("no candidate improved on {passed}/3 at step {}", k + 1);
        }
        search.run(&main, &py, &edit_code(old, candidates[best]))?;
        passed = search.tests(&main)?;
        println!(
            "  kept `{}` (worker {best}); main sandbox now passes {passed}/3; the other \
             workers roll back at the next step",
            candidates[best]
        );
    }
    ensure!(passed == 3, "the search ended at {passed}/3");
    let fixed = search.checkpoint(&main, "fixed: passed 3/3")?;

    step("rolling the main sandbox back to step 1 and checking its state is exactly that node's");
    let (early, expected) = &fingerprints[1];
    search.timed(
        "rollback main to step 1".into(),
        &["rollback", &main, early],
    )?;
    let got = search.run(&main, &py, FINGERPRINT)?["stdout"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    println!("  at the node:    {}", expected.trim());
    println!("  after rollback: {}", got.trim());
    ensure!(
        &got == expected,
        "the restored session differs from the node: {got:?} != {expected:?}"
    );
    let tests_then = search.tests(&main)?;
    println!(
        "  identical (variables, the attempt log, a 200 000-entry dict, calc.py's hash); tests pass {tests_then}/3 as they did then"
    );
    search.timed(
        "rollback main to fixed".into(),
        &["rollback", &main, &fixed],
    )?;
    ensure!(
        search.tests(&main)? == 3,
        "rolling forward again lost the fix"
    );

    step("the checkpoint tree");
    let tree = cli.value(&["tree", &main])?;
    print!("{}", tree["text"].as_str().unwrap_or(""));
    println!();

    step("latency of each state operation");
    println!("  {:<36} {:>10} {:>10}", "operation", "daemon", "client");
    for t in &search.timings {
        let daemon = t
            .daemon_ms
            .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1} ms"));
        println!("  {:<36} {:>10} {:>7.1} ms", t.what, daemon, t.client_ms);
    }
    println!(
        "  (daemon: the operation as deltaboxd timed it; client: plus a `deltabox` process \
         and the API round trip)"
    );
    let daemon_ms: f64 = search.timings.iter().filter_map(|t| t.daemon_ms).sum();
    let client_ms: f64 = search.timings.iter().map(|t| t.client_ms).sum();
    let total_ms = total.elapsed().as_secs_f64() * 1e3;
    println!(
        "  nodes explored {}; total {:.0} ms; state management {:.0} ms in the daemon \
         ({:.1} %), {:.0} ms as the client saw it ({:.1} %)",
        search.nodes_explored,
        total_ms,
        daemon_ms,
        100.0 * daemon_ms / total_ms,
        client_ms,
        100.0 * client_ms / total_ms
    );
    Ok(())
}
