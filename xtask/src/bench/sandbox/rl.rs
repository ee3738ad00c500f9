//! The RL-like micro-benchmark: a sandbox whose Python session holds an environment (a
//! step counter, an observation buffer, a log file in `/workspace`). Many short steps;
//! every `EPISODE` steps a reset (rollback to the node taken right after the set-up);
//! every `FANOUT_EVERY` steps a fan-out: checkpoint, branch N sandboxes from that node,
//! one step in each, remove them. Every step checks that the counter in memory and the
//! log on disk agree with what the rollbacks and branches should have left.

use std::time::Instant;

use anyhow::{Result, ensure};

use super::http::Api;
use super::ops::{self, Made, Sandbox};
use super::stats::Samples;
use crate::signals::check_interrupted;
use crate::util::step;

/// Steps per episode (a reset after each).
pub const EPISODE: usize = 4;
/// A fan-out after every this many steps.
pub const FANOUT_EVERY: usize = 50;

const SETUP: &str = "\
import os, random
os.makedirs('/workspace/env', exist_ok=True)
random.seed(0)
env = {'t': 0, 'obs': [0.0] * 4096}
open('/workspace/env/log', 'w').close()
def step():
    env['t'] += 1
    env['obs'][env['t'] % 4096] = random.random()
    with open('/workspace/env/log', 'a') as f:
        f.write(f\"{env['t']}\\n\")
    print(env['t'], sum(1 for _ in open('/workspace/env/log')))
";

/// The micro-benchmark's figures (milliseconds).
#[derive(Debug, Default)]
pub struct Figures {
    /// Steps taken in the main sandbox.
    pub steps: usize,
    /// Each step's session run, client-side.
    pub step_client: Samples,
    /// Each reset (rollback), client-side and as the daemon timed it.
    pub reset_client: Samples,
    pub reset_daemon: Samples,
    /// The checkpoint before each fan-out, client-side and daemon-side.
    pub checkpoint_client: Samples,
    pub checkpoint_daemon: Samples,
    /// One branch call of `fanout` sandboxes, client-side.
    pub branch_client: Samples,
    /// Per branched sandbox, as the daemon timed it.
    pub branch_daemon: Samples,
    /// The step run in each branched sandbox.
    pub branch_step_client: Samples,
    /// Removing each branched sandbox.
    pub remove_client: Samples,
    /// Sandboxes per fan-out.
    pub fanout: usize,
    /// The whole loop.
    pub wall_ms: f64,
}

impl Figures {
    /// Resets back to back: resets per second of time spent resetting (client-side).
    pub fn resets_per_sec(&self) -> f64 {
        self.reset_client.len() as f64 / (self.reset_client.sum() / 1e3)
    }

    /// Steps per second over the whole loop, resets and fan-outs included.
    pub fn steps_per_sec(&self) -> f64 {
        self.steps as f64 / (self.wall_ms / 1e3)
    }

    /// Share of the loop's time spent in resets, checkpoints, branches and removals.
    pub fn share(&self) -> f64 {
        let state = self.reset_client.sum()
            + self.checkpoint_client.sum()
            + self.branch_client.sum()
            + self.remove_client.sum();
        state / self.wall_ms
    }
}

/// Runs one step in `session`; checks the counter and the log both read `expected`.
fn one_step(api: &Api, sandbox: &Sandbox, session: &str, expected: usize) -> Result<f64> {
    let ran = ops::run(api, sandbox, session, "step()")?;
    let want = format!("{expected} {expected}");
    ensure!(
        ran.stdout.trim() == want,
        "sandbox {}: the step printed {:?}, expected {want:?} (counter in memory, lines in \
         the log)",
        sandbox.id,
        ran.stdout.trim()
    );
    Ok(ran.timed.client_ms)
}

/// Runs `steps` steps with resets and fan-outs of `fanout` sandboxes; the sandboxes go
/// into `made`.
pub fn run(api: &Api, made: &mut Made, steps: usize, fanout: usize) -> Result<Figures> {
    step(format!(
        "RL-like micro-benchmark: {steps} steps, a reset every {EPISODE}, a fan-out to \
         {fanout} sandboxes every {FANOUT_EVERY}"
    ));
    let sandbox = ops::create(api, made)?;
    let (mut session, _) = ops::start_session(api, &sandbox, "python")?;
    ops::run(api, &sandbox, &session, SETUP)?;
    let (reset_node, _) = ops::checkpoint(api, &sandbox, "reset")?;

    let mut figures = Figures {
        fanout,
        ..Figures::default()
    };
    let mut t = 0;
    let start = Instant::now();
    for i in 1..=steps {
        check_interrupted()?;
        t += 1;
        figures
            .step_client
            .push(one_step(api, &sandbox, &session, t)?);
        figures.steps += 1;
        if i.is_multiple_of(FANOUT_EVERY) {
            fan_out(api, made, &sandbox, t, &mut figures)?;
        }
        if i.is_multiple_of(EPISODE) {
            let (sessions, timed) = ops::rollback(api, &sandbox, &reset_node)?;
            figures.reset_client.push(timed.client_ms);
            if let Some(d) = timed.daemon_ms {
                figures.reset_daemon.push(d);
            }
            session = ops::session_of(&sessions, "python")?;
            t = 0;
        }
    }
    figures.wall_ms = start.elapsed().as_secs_f64() * 1e3;
    Ok(figures)
}

/// Checkpoint, branch `figures.fanout` sandboxes, one step in each, remove them.
fn fan_out(
    api: &Api,
    made: &mut Made,
    sandbox: &Sandbox,
    t: usize,
    figures: &mut Figures,
) -> Result<()> {
    let (node, timed) = ops::checkpoint(api, sandbox, &format!("fan-out at t={t}"))?;
    figures.checkpoint_client.push(timed.client_ms);
    if let Some(d) = timed.daemon_ms {
        figures.checkpoint_daemon.push(d);
    }
    let branched = ops::branch(api, &node, figures.fanout, made)?;
    figures.branch_client.push(branched.client_ms);
    for d in &branched.daemon_ms {
        figures.branch_daemon.push(*d);
    }
    for (child, sessions) in &branched.sandboxes {
        let session = ops::session_of(sessions, "python")?;
        figures
            .branch_step_client
            .push(one_step(api, child, &session, t + 1)?);
    }
    for (child, _) in &branched.sandboxes {
        figures.remove_client.push(ops::remove(api, &child.id)?);
        made.forget(&child.id);
    }
    Ok(())
}
