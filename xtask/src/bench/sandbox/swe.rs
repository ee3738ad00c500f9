//! The SWE-like trajectory, run twice in one run, step by step in alternation (so that
//! background load lands on both alike):
//!
//! - **DeltaBox**: a sandbox with a persistent Python session (the project imported, a
//!   history of test results in memory) and a bash session; each step appends a comment
//!   to one source file and runs 176 of the project's tests inside the Python session,
//!   then checkpoints the sandbox; every few steps it rolls back to the node two steps
//!   back, and checks that both the file and the session's memory are that node's.
//! - **baseline** (files only): the same in a second sandbox, but a step ends with
//!   `git add -A && git commit` in the bash session, and a rollback is `git stash -u &&
//!   git checkout <commit>` followed by a restart of the Python interpreter re-running
//!   the set-up (its memory is lost: that is what the baseline cannot restore).

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context as _, Result, ensure};

use super::http::{Api, base64};
use super::ops::{self, Made, Sandbox, Timed};
use super::project::{EDITED, Project, TESTS, TOP};
use super::stats::Samples;
use crate::signals::check_interrupted;
use crate::util::step;

/// Every `ROLLBACK_EVERY` steps, roll back `ROLLBACK_BACK` steps.
pub const ROLLBACK_EVERY: usize = 3;
pub const ROLLBACK_BACK: usize = 2;

/// One system's figures over the trajectory (milliseconds).
#[derive(Debug, Default)]
pub struct Trajectory {
    /// Each checkpoint (baseline: `git add -A && git commit`), client-side and, for
    /// DeltaBox, as the daemon timed it.
    pub checkpoint_client: Samples,
    pub checkpoint_daemon: Samples,
    /// Each rollback (baseline: git, then a fresh interpreter and the set-up).
    pub rollback_client: Samples,
    pub rollback_daemon: Samples,
    /// DeltaBox only: the daemon's breakdown of each (`quiesce_ms`, `files_ms`, …).
    pub checkpoint_parts: BTreeMap<String, Samples>,
    pub rollback_parts: BTreeMap<String, Samples>,
    /// Baseline only: the rollback's two parts, git and the interpreter's restart.
    pub rollback_git: Samples,
    pub rollback_restart: Samples,
    /// The steps' work (edit + tests), client-side.
    pub work_ms: f64,
    /// Steps taken.
    pub steps: usize,
}

impl Trajectory {
    /// Client-side time in checkpoints and rollbacks.
    pub fn state_ms(&self) -> f64 {
        self.checkpoint_client.sum() + self.rollback_client.sum()
    }

    /// Share of the trajectory (work + state management) spent in state management.
    pub fn share(&self) -> f64 {
        self.state_ms() / (self.work_ms + self.state_ms())
    }

    /// The same share with the daemon's own time for the state operations (None when
    /// the daemon timed none).
    pub fn daemon_share(&self) -> Option<f64> {
        let daemon = self.checkpoint_daemon.sum() + self.rollback_daemon.sum();
        (self.checkpoint_daemon.len() > 0).then(|| daemon / (self.work_ms + self.state_ms()))
    }
}

/// Both systems' figures.
pub struct Outcome {
    /// Checkpoints and rollbacks of the sandbox.
    pub deltabox: Trajectory,
    /// git and restarted processes.
    pub baseline: Trajectory,
}

fn project_dir() -> String {
    format!("/workspace/{TOP}")
}

/// The Python session's set-up: the baseline re-runs it after every restart.
fn setup_code() -> String {
    format!(
        "import io, os, re, sys, unittest\n\
         os.chdir({dir:?})\n\
         sys.path.insert(0, os.getcwd())\n\
         import more_itertools\n\
         history = []\n\
         def run_tests(step):\n\
         \x20   for name in [m for m in sys.modules if m == 'more_itertools' or m.startswith(('more_itertools.', 'tests'))]:\n\
         \x20       del sys.modules[name]\n\
         \x20   suite = unittest.defaultTestLoader.loadTestsFromName({TESTS:?})\n\
         \x20   result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(suite)\n\
         \x20   history.append((step, result.testsRun, len(result.failures) + len(result.errors)))\n\
         \x20   return result\n",
        dir = project_dir()
    )
}

/// One step's work: a harmless edit, then the tests (reloading the edited module).
fn step_code(k: usize) -> String {
    format!(
        "with open({EDITED:?}, 'a') as f:\n\
         \x20   f.write('# bench step {k}\\n')\n\
         r = run_tests({k})\n\
         print(r.testsRun, len(r.failures) + len(r.errors))\n"
    )
}

/// Prints the session's history length and the steps recorded in the edited file.
const VERIFY: &str = "print(len(history), ' '.join(re.findall(r'^# bench step (\\d+)$', \
                      open('more_itertools/recipes.py').read(), re.M)))\n";

/// A sandbox on the trajectory, with its two sessions.
struct Side {
    sandbox: Sandbox,
    python: String,
    bash: String,
    /// Steps applied in the current state, in order.
    lineage: Vec<usize>,
    /// For each step checkpointed (0: the set-up), the node id or commit, and the
    /// lineage there.
    saved: Vec<(usize, String, Vec<usize>)>,
    figures: Trajectory,
}

/// Makes a sandbox holding the unpacked project with a Python and a bash session.
fn prepare(api: &Api, made: &mut Made, tarball: &str, git: bool) -> Result<Side> {
    let sandbox = ops::create(api, made)?;
    ops::exec(
        api,
        &sandbox,
        &["sh", "-c", "base64 -d | tar -xzf - -C /workspace"],
        Some(tarball),
    )?;
    let (python, _) = ops::start_session(api, &sandbox, "python")?;
    ops::run(api, &sandbox, &python, &setup_code())?;
    let (bash, _) = ops::start_session(api, &sandbox, "bash")?;
    let mut cd = format!("cd {}", project_dir());
    if git {
        cd.push_str(
            " && printf '__pycache__/\\n' > .gitignore && git init -q \
             && git config user.name bench && git config user.email bench@localhost \
             && git add -A && git commit -q -m setup",
        );
    }
    ops::run(api, &sandbox, &bash, &cd)?;
    Ok(Side {
        sandbox,
        python,
        bash,
        lineage: Vec::new(),
        saved: Vec::new(),
        figures: Trajectory::default(),
    })
}

impl Side {
    /// The step's work, timed into `work_ms`; checks the tests ran and passed.
    fn work(&mut self, api: &Api, k: usize) -> Result<()> {
        let ran = ops::run(api, &self.sandbox, &self.python, &step_code(k))?;
        self.figures.work_ms += ran.timed.client_ms;
        self.figures.steps += 1;
        let mut words = ran.stdout.split_whitespace();
        let (tests, failed) = (words.next(), words.next());
        ensure!(
            tests.is_some_and(|t| t != "0") && failed == Some("0"),
            "step {k} in sandbox {}: unexpected test result {:?}",
            self.sandbox.id,
            ran.stdout
        );
        self.lineage.push(k);
        Ok(())
    }

    /// The saved state `ROLLBACK_BACK` steps back on the current lineage (else the set-up).
    fn target(&self) -> Result<(String, Vec<usize>)> {
        let back = self.lineage.len().saturating_sub(ROLLBACK_BACK);
        let step = if back == 0 { 0 } else { self.lineage[back - 1] };
        self.saved
            .iter()
            .find(|(s, _, _)| *s == step)
            .map(|(_, id, lineage)| (id.clone(), lineage.clone()))
            .with_context(|| format!("no saved state for step {step}"))
    }

    /// Checks the edited file's steps (and, when `history` is given, the session's
    /// history length) against the current lineage.
    fn verify(&self, api: &Api, history: Option<usize>) -> Result<()> {
        let out = ops::run(api, &self.sandbox, &self.python, VERIFY)?.stdout;
        let steps: Vec<String> = self.lineage.iter().map(usize::to_string).collect();
        let expected_file = steps.join(" ");
        let (len, file) = out.trim_end().split_once(' ').unwrap_or((out.trim(), ""));
        ensure!(
            file == expected_file,
            "after rolling back, sandbox {} has the steps [{file}] in {EDITED}, not [{expected_file}]",
            self.sandbox.id
        );
        if let Some(history) = history {
            ensure!(
                len == history.to_string(),
                "after rolling back, the Python session of sandbox {} holds {len} results, not \
                 {history}",
                self.sandbox.id
            );
        }
        Ok(())
    }
}

/// Adds one timed call to the client, daemon and breakdown samples.
fn record(
    timed: &Timed,
    client: &mut Samples,
    daemon: &mut Samples,
    parts: &mut BTreeMap<String, Samples>,
) {
    client.push(timed.client_ms);
    if let Some(d) = timed.daemon_ms {
        daemon.push(d);
    }
    for (name, ms) in &timed.parts {
        parts.entry(name.clone()).or_default().push(*ms);
    }
}

/// DeltaBox: checkpoint after each step, roll back files and processes.
fn deltabox_step(api: &Api, side: &mut Side, k: usize) -> Result<()> {
    side.work(api, k)?;
    let (node, timed) = ops::checkpoint(api, &side.sandbox, &format!("step {k}"))?;
    let f = &mut side.figures;
    record(
        &timed,
        &mut f.checkpoint_client,
        &mut f.checkpoint_daemon,
        &mut f.checkpoint_parts,
    );
    side.saved.push((k, node, side.lineage.clone()));
    if k.is_multiple_of(ROLLBACK_EVERY) {
        let (node, lineage) = side.target()?;
        let (sessions, timed) = ops::rollback(api, &side.sandbox, &node)?;
        let f = &mut side.figures;
        record(
            &timed,
            &mut f.rollback_client,
            &mut f.rollback_daemon,
            &mut f.rollback_parts,
        );
        side.python = ops::session_of(&sessions, "python")?;
        side.bash = ops::session_of(&sessions, "bash")?;
        side.lineage = lineage;
        // The set-up's history was empty; each step since added one result.
        side.verify(api, Some(side.lineage.len()))?;
    }
    Ok(())
}

/// The baseline: git commit after each step; git stash + checkout and a fresh
/// interpreter re-running the set-up to roll back.
fn baseline_step(api: &Api, side: &mut Side, k: usize) -> Result<()> {
    side.work(api, k)?;
    let commit = ops::run(
        api,
        &side.sandbox,
        &side.bash,
        &format!("git add -A && git commit -q -m 'step {k}' && git rev-parse HEAD"),
    )?;
    side.figures.checkpoint_client.push(commit.timed.client_ms);
    let sha = commit.stdout.trim().to_owned();
    ensure!(sha.len() == 40, "git rev-parse printed {:?}", commit.stdout);
    side.saved.push((k, sha, side.lineage.clone()));
    if k.is_multiple_of(ROLLBACK_EVERY) {
        let (sha, lineage) = side.target()?;
        let git = ops::run(
            api,
            &side.sandbox,
            &side.bash,
            &format!("git stash -u -q; git checkout -q --detach {sha}"),
        )?;
        let start = Instant::now();
        ops::stop_session(api, &side.sandbox, &side.python)?;
        let (python, _) = ops::start_session(api, &side.sandbox, "python")?;
        side.python = python;
        ops::run(api, &side.sandbox, &side.python, &setup_code())?;
        let restart_ms = start.elapsed().as_secs_f64() * 1e3;
        side.figures.rollback_git.push(git.timed.client_ms);
        side.figures.rollback_restart.push(restart_ms);
        side.figures
            .rollback_client
            .push(git.timed.client_ms + restart_ms);
        side.lineage = lineage;
        // A fresh interpreter: its history starts empty.
        side.verify(api, Some(0))?;
    }
    Ok(())
}

/// Runs both trajectories of `steps` steps; the sandboxes go into `made`.
pub fn run(api: &Api, made: &mut Made, project: &Project, steps: usize) -> Result<Outcome> {
    step(format!(
        "SWE-like trajectory: two sandboxes with {TOP} in /workspace (a Python and a bash \
         session each)"
    ));
    let bytes = std::fs::read(&project.sdist)
        .with_context(|| format!("cannot read {}", project.sdist.display()))?;
    let tarball = base64(&bytes);
    let mut deltabox = prepare(api, made, &tarball, false)?;
    let mut baseline = prepare(api, made, &tarball, true)?;
    let (root, _) = ops::checkpoint(api, &deltabox.sandbox, "set-up")?;
    deltabox.saved.push((0, root, Vec::new()));
    let head = ops::run(api, &baseline.sandbox, &baseline.bash, "git rev-parse HEAD")?;
    baseline
        .saved
        .push((0, head.stdout.trim().to_owned(), Vec::new()));

    step(format!(
        "{steps} steps on each (edit {EDITED}, run {TESTS}, checkpoint / git commit; every \
         {ROLLBACK_EVERY} steps roll back {ROLLBACK_BACK} steps)"
    ));
    for k in 1..=steps {
        check_interrupted()?;
        deltabox_step(api, &mut deltabox, k)?;
        baseline_step(api, &mut baseline, k)?;
        if k % 10 == 0 || k == steps {
            println!(
                "  step {k}/{steps}: DeltaBox checkpoint {:.2} ms, baseline commit {:.1} ms",
                deltabox
                    .figures
                    .checkpoint_client
                    .summary()
                    .map_or(0.0, |s| s.median),
                baseline
                    .figures
                    .checkpoint_client
                    .summary()
                    .map_or(0.0, |s| s.median),
            );
        }
    }
    Ok(Outcome {
        deltabox: deltabox.figures,
        baseline: baseline.figures,
    })
}
