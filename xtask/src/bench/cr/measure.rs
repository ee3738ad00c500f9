//! The measurements of `bench cr`, with the DeltaCR library: checkpoint and rollback
//! rounds per memory size and page kind, the templates' memory, the full-copy baseline,
//! and the fallback restore from dumps.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use deltabox_controller::cr::dump::{self, Dump, DumpOptions};
use deltabox_controller::cr::{self, Template};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

use super::memory;
use super::procs::{BASH_STEP, BenchEnv, PYTHON, Proc};
use super::report::{Config, Fallback, size};
use crate::signals::check_interrupted;
use crate::util::step;

/// Pages the python process writes between two operations.
pub const WRITES: u32 = 16;

/// What to measure.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Memory sizes, MiB.
    pub sizes: Vec<u64>,
    /// Rounds (one checkpoint and one rollback each) per size and page kind.
    pub ops: usize,
    /// Pause before each operation.
    pub gap: Duration,
    /// Full copies per size and page kind.
    pub copies: usize,
    /// MiB the fallback's process holds.
    pub fallback_mib: u64,
    /// Deltas of the fallback, MiB.
    pub deltas: Vec<u64>,
    /// Restores per delta.
    pub fallback_reps: usize,
    /// MiB at the start of the buffer that the rounds' writes stay in (0: all of it).
    pub hot_mib: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs `a` here and `b` on another thread, as the daemon checkpoints the sessions of
/// a sandbox: one thread each (a ptrace tracee is bound to its tracer thread).
fn both<A: Send, B: Send>(a: impl FnOnce() -> A + Send, b: impl FnOnce() -> B + Send) -> (A, B) {
    thread::scope(|scope| {
        let other = scope.spawn(b);
        let first = a();
        let second = other
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (first, second)
    })
}

/// SIGKILLs `proc` and reaps it (it is our child: spawned, or restored with
/// `CLONE_PARENT`).
fn kill_proc(proc: Proc) {
    let pid = Pid::from_raw(proc.pid);
    let _ = kill(pid, Signal::SIGKILL);
    let _ = waitpid(pid, Some(WaitPidFlag::__WALL));
}

/// The number after `ok ` in a reply.
fn counter(reply: &str) -> Result<u64> {
    reply
        .strip_prefix("ok ")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("unexpected reply {reply:?}"))
}

fn start_python(env: &BenchEnv, mib: u64, thp: bool, hot_mib: u64) -> Result<Proc> {
    let (mib_arg, hot_arg) = (mib.to_string(), hot_mib.to_string());
    let mut py = env.spawn(
        "python3",
        &[
            "-u",
            "-I",
            "-c",
            PYTHON,
            &mib_arg,
            if thp { "1" } else { "0" },
            &hot_arg,
        ],
    )?;
    let ready = py.line()?;
    ensure!(
        ready == "ready",
        "python3 (pid {}) said {ready:?} instead of ready",
        py.pid
    );
    Ok(py)
}

/// Checkpoint and rollback rounds, memory cost and the full copy for one size and
/// page kind.
pub fn config(env: &BenchEnv, plan: &Plan, mib: u64, thp: bool) -> Result<Config> {
    let pages = if thp { "THP" } else { "4 KiB pages" };
    step(format!(
        "{} with {pages}: {} checkpoints and rollbacks, then the full copy",
        size(mib),
        plan.ops
    ));
    let mut sh = env.spawn("bash", &["--norc", "--noprofile"])?;
    let mut py = start_python(env, mib, thp, plan.hot_mib)?;
    sh.ask("x=0; echo $x")?;
    let huge_kib = memory::huge_kib(py.pid)?;
    if thp && huge_kib < mib * 1024 / 2 {
        bail!(
            "python3 (pid {}) has {huge_kib} KiB of AnonHugePages for {mib} MiB after \
             MADV_HUGEPAGE: is /sys/kernel/mm/transparent_hugepage/enabled `never`?",
            py.pid
        );
    }
    println!(
        "  python3 pid {}, bash pid {}, AnonHugePages {huge_kib} KiB",
        py.pid, sh.pid
    );
    let mut c = Config {
        mib,
        thp,
        huge_kib,
        ..Config::default()
    };
    let (ck_opts, rs_opts) = (env.checkpoint_opts(), env.restore_opts());
    let mut previous: Vec<Template> = Vec::new();
    let report_every = (plan.ops / 4).max(1);
    for round in 0..=plan.ops {
        check_interrupted()?;
        let at_checkpoint = counter(&py.ask(&format!("w {WRITES}"))?)?;
        let x = sh.ask(BASH_STEP)?;
        thread::sleep(plan.gap);
        py.wait_idle()?;
        sh.wait_idle()?;
        let (py_pid, sh_pid) = (Pid::from_raw(py.pid), Pid::from_raw(sh.pid));
        let started = Instant::now();
        let (tp, tb) = both(
            || cr::checkpoint(py_pid, &ck_opts),
            || cr::checkpoint(sh_pid, &ck_opts),
        );
        let checkpoint = started.elapsed();
        let tp = tp.with_context(|| format!("checkpoint of python3 (pid {py_pid})"))?;
        env.track(tp.pid().as_raw());
        let tb = tb.with_context(|| format!("checkpoint of bash (pid {sh_pid})"))?;
        env.track(tb.pid().as_raw());

        // After the checkpoint the processes write again: the old copies of what they
        // write are the new templates' own.
        counter(&py.ask(&format!("w {WRITES}"))?)?;
        sh.ask(BASH_STEP)?;
        let own = memory::private_kib(tp.pid().as_raw())? + memory::private_kib(tb.pid().as_raw())?;
        let pte =
            memory::page_table_kib(tp.pid().as_raw())? + memory::page_table_kib(tb.pid().as_raw())?;
        thread::sleep(plan.gap);
        py.wait_idle()?;
        sh.wait_idle()?;
        let started = Instant::now();
        let (rp, rb) = both(
            || cr::rollback(&tp, py_pid, &rs_opts),
            || cr::rollback(&tb, sh_pid, &rs_opts),
        );
        let rollback = started.elapsed();
        let rp = rp.with_context(|| format!("rollback of python3 to template {}", tp.pid()))?;
        let rb = rb.with_context(|| format!("rollback of bash to template {}", tb.pid()))?;
        let (fork, py_pause) = (rp.timings.fork, tp.timings().paused);
        py = env.adopt("python3", rp)?;
        sh = env.adopt("bash", rb)?;
        // A real rollback: both are back at the checkpoint's state.
        let now = py.ask("n")?;
        ensure!(
            now == at_checkpoint.to_string(),
            "python3 (pid {}) restored with counter {now}, the checkpoint had {at_checkpoint}",
            py.pid
        );
        let x_now = sh.ask("echo $x")?;
        ensure!(
            x_now == x,
            "bash (pid {}) restored with x={x_now}, the checkpoint had {x}",
            sh.pid
        );
        for old in previous.drain(..) {
            old.destroy().context("destroying a template")?;
        }
        previous = vec![tp, tb];
        if round == 0 {
            continue; // warm-up
        }
        c.checkpoint.push(ms(checkpoint));
        c.pause.push(ms(py_pause));
        c.rollback.push(ms(rollback));
        c.fork.push(ms(fork));
        c.own_kib.push(own as f64);
        c.pte_kib.push(pte as f64);
        if round % report_every == 0 {
            println!(
                "  round {round}/{}: checkpoint {:.2} ms, rollback {:.2} ms",
                plan.ops,
                ms(checkpoint),
                ms(rollback)
            );
        }
    }
    for old in previous.drain(..) {
        old.destroy().context("destroying a template")?;
    }
    c.huge_kib_end = memory::huge_kib(py.pid)?;
    // A 4 GiB copy and its fsync take tens of seconds and write 4 GiB to the shared
    // disk: one is enough there.
    let copies = if mib >= 4096 { 1 } else { plan.copies };
    for _ in 0..copies {
        check_interrupted()?;
        py.wait_idle()?;
        sh.wait_idle()?;
        let copy = memory::full_copy(&[py.pid, sh.pid], &env.dir().join("full-copy"))?;
        c.full_copy.push(ms(copy.copy));
        c.full_fsync.push(ms(copy.fsync));
        c.full_copy_mib = copy.bytes as f64 / f64::from(1 << 20);
    }
    kill_proc(py);
    kill_proc(sh);
    Ok(c)
}

/// The fallback restore: see the report's description.
pub fn fallback(env: &BenchEnv, plan: &Plan) -> Result<Vec<Fallback>> {
    step(format!(
        "fallback restore: a {} process, deltas of {:?} MiB, {} restores each",
        size(plan.fallback_mib),
        plan.deltas,
        plan.fallback_reps
    ));
    let dumps = env.dir().join("dumps");
    std::fs::create_dir_all(&dumps)
        .with_context(|| format!("cannot create {}", dumps.display()))?;
    let mut py = start_python(env, plan.fallback_mib, false, 0)?;
    let (ck_opts, rs_opts) = (env.checkpoint_opts(), env.restore_opts());
    py.wait_idle()?;
    let base = cr::checkpoint(Pid::from_raw(py.pid), &ck_opts)
        .with_context(|| format!("checkpoint of python3 (pid {})", py.pid))?;
    env.track(base.pid().as_raw());
    let dump_opts = |name: &str, parent: Option<&str>| DumpOptions {
        root: dumps.clone(),
        name: name.to_owned(),
        parent: parent.map(str::to_owned),
        root_prefix: None,
    };
    dump::dump_template(&base, &dump_opts("base", None)).context("dumping the base template")?;
    let base_dump = Dump::open(&dumps, "base")?;
    let mut out = Vec::new();
    for &delta in &plan.deltas {
        check_interrupted()?;
        let at_node = counter(&py.ask(&format!("d {delta}"))?)?;
        let sum = py.ask(&format!("c {delta}"))?;
        py.wait_idle()?;
        let node = cr::checkpoint(Pid::from_raw(py.pid), &ck_opts)
            .with_context(|| format!("checkpoint of python3 (pid {})", py.pid))?;
        env.track(node.pid().as_raw());
        let name = format!("delta-{delta}");
        let stats = dump::dump_template(&node, &dump_opts(&name, Some("base")))
            .with_context(|| format!("dumping the node of {delta} MiB of delta"))?;
        node.destroy().context("destroying the node's template")?;
        let node_dump = Dump::open(&dumps, &name)?;
        let mut f = Fallback {
            delta_mib: delta,
            dumped_mib: (stats.written * 4096) as f64 / f64::from(1 << 20),
            ..Fallback::default()
        };
        for _ in 0..plan.fallback_reps {
            check_interrupted()?;
            kill_proc(py);
            let restored = base
                .restore_from_dump(&node_dump, Some(&base_dump), &rs_opts)
                .with_context(|| format!("fallback restore of {delta} MiB of delta"))?;
            f.total.push(ms(restored.timings.total));
            f.memory.push(ms(restored.timings.memory));
            py = env.adopt("python3", restored)?;
            let now = py.ask("n")?;
            let sum_now = py.ask(&format!("c {delta}"))?;
            ensure!(
                now == at_node.to_string() && sum_now == sum,
                "python3 (pid {}) restored from the dump with counter {now} and checksum \
                 {sum_now}, the node had {at_node} and {sum}",
                py.pid
            );
        }
        println!(
            "  {delta} MiB of delta ({:.1} MiB dumped): median {:.1} ms",
            f.dumped_mib,
            f.total.summary().map_or(f64::NAN, |s| s.median)
        );
        out.push(f);
    }
    base.destroy().context("destroying the base template")?;
    kill_proc(py);
    let _ = std::fs::remove_dir_all(&dumps);
    Ok(out)
}
