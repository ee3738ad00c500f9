//! `deltafs`: the DeltaFS daemon for harnesses and benchmarks.
//!
//! ```text
//! deltafs mount --store DIR --base DIR MOUNTPOINT [--from SNAPSHOT]
//!               [--chunk BYTES] [--chunked-min BYTES] [--no-complete-at-half]
//! ```
//!
//! The chunk options set how copy-ups that cannot clone are made (`deltafs::ChunkPolicy`;
//! defaults 131072, 131073, completion at half).
//!
//! Mounts a view in the foreground, prints `mounted <MOUNTPOINT>` when it is ready, then
//! reads one command per line on stdin and answers one line each:
//!
//! | command | answer |
//! |---|---|
//! | `freeze [--pids P,P…\|--all-processes]` | `frozen <id>` |
//! | `switch <id>` | `switched <id>` |
//! | `branch <id> <mountpoint>` | `branched <mountpoint>` (a second view, same process) |
//! | `unmount <mountpoint>` | `unmounted <mountpoint>` (a branch) |
//! | `drop <id>` | `dropped <id>` |
//! | `squash <id>` | `squashed <id> merged <n> files <n>`: ancestors merged into it, superseded backing files removed |
//! | `sync` | `synced <bytes>`: snapshot metadata is on disk; bytes written since the last `sync` |
//! | `copyups` | `copyups reflink=<n> copy=<n> chunked=<n> empty=<n> bytes=<n> chunk_bytes=<n> completions=<n>` |
//! | `gc` | `gc removed <n> kept <n>` |
//! | `quit` | unmounts everything, prints `unmounted`, exits 0 |
//!
//! A failed command answers `error <message>` and the daemon goes on. SIGTERM, SIGINT,
//! SIGHUP and the end of stdin unmount cleanly like `quit`. Details of each freeze and
//! switch go to stderr.
//!
//! Exit codes: 0 after a clean unmount, 1 when the store cannot be opened or the view
//! cannot be mounted or unmounted, 2 on bad arguments. Needs root (`CAP_SYS_ADMIN`).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use deltafs::{FreezeOpts, MappedFiles, SnapshotId, Store, View};
use nix::sys::signal::{SigSet, Signal};

#[derive(Parser)]
#[command(
    name = "deltafs",
    about = "DeltaFS: layered copy-on-write FUSE filesystem"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount a view and serve control commands on stdin.
    Mount {
        /// Store directory (layers and their metadata).
        #[arg(long)]
        store: PathBuf,
        /// Base tree shown read-only under the layers.
        #[arg(long)]
        base: PathBuf,
        /// Start from this snapshot instead of the bare base.
        #[arg(long)]
        from: Option<SnapshotId>,
        /// Where to mount.
        mountpoint: PathBuf,
        /// Chunk size of chunk-granular copy-ups (bytes).
        #[arg(long, default_value_t = deltafs::chunks::CHUNK)]
        chunk: u64,
        /// Files of this size or more are copied up chunk by chunk where the store
        /// cannot clone (smaller ones whole).
        #[arg(long, default_value_t = deltafs::chunks::CHUNKED_MIN)]
        chunked_min: u64,
        /// Keep chunk-granular copies partial until they exceed the range limit (do not
        /// complete them once they hold half of their bytes).
        #[arg(long)]
        no_complete_at_half: bool,
    },
}

enum Event {
    Line(String),
    Quit,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deltafs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let Command::Mount {
        store,
        base,
        from,
        mountpoint,
        chunk,
        chunked_min,
        no_complete_at_half,
    } = cli.command;
    if chunk == 0 {
        bail!("--chunk must be at least 1 byte");
    }
    let policy = deltafs::ChunkPolicy {
        chunk,
        min_size: chunked_min,
        complete_at_half: !no_complete_at_half,
    };
    // Signals are taken synchronously by one thread; block them before any thread starts
    // so that every thread inherits the mask.
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(signal);
    }
    signals.thread_block().context("cannot block signals")?;
    init_log();

    let store = Store::open_with(&store, policy)
        .with_context(|| format!("cannot open store {}", store.display()))?;
    let view = store
        .mount(&base, &mountpoint, from)
        .with_context(|| format!("cannot mount {}", mountpoint.display()))?;

    let (tx, rx) = mpsc::channel();
    let signal_tx = tx.clone();
    thread::spawn(move || {
        if let Ok(signal) = signals.wait() {
            eprintln!("deltafs: {signal}, unmounting");
        }
        let _ = signal_tx.send(Event::Quit);
    });
    thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(Event::Line(line)).is_err() {
                return;
            }
        }
        let _ = tx.send(Event::Quit);
    });

    let mut out = std::io::stdout().lock();
    writeln!(out, "mounted {}", mountpoint.display())?;
    out.flush()?;
    let mut branches: Vec<View> = Vec::new();
    for event in rx {
        let line = match event {
            Event::Quit => break,
            Event::Line(line) => line,
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.is_empty() {
            continue;
        }
        if words == ["quit"] {
            break;
        }
        let answer = command(&store, &view, &mut branches, &base, &words)
            .unwrap_or_else(|e| format!("error {e:#}").replace('\n', " "));
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    for branch in branches {
        let mountpoint = branch.mountpoint().to_owned();
        branch
            .unmount()
            .with_context(|| format!("cannot unmount {}", mountpoint.display()))?;
    }
    view.unmount()
        .with_context(|| format!("cannot unmount {}", mountpoint.display()))?;
    writeln!(out, "unmounted")?;
    out.flush()?;
    Ok(())
}

fn command(
    store: &Store,
    view: &View,
    branches: &mut Vec<View>,
    base: &Path,
    words: &[&str],
) -> Result<String> {
    match words {
        ["freeze", rest @ ..] => {
            let mapped = match rest {
                [] => MappedFiles::Conservative,
                ["--all-processes"] => MappedFiles::AllProcesses,
                ["--pids", pids] => MappedFiles::Pids(
                    pids.split(',')
                        .map(|p| p.parse().with_context(|| format!("invalid pid {p:?}")))
                        .collect::<Result<_>>()?,
                ),
                _ => bail!("usage: freeze [--pids P,P…|--all-processes]"),
            };
            let report = view.freeze(&FreezeOpts { mapped })?;
            eprintln!(
                "deltafs: froze {} in {:?}: {} changes, {} files kept live ({} cloned, {} bytes \
                 copied)",
                report.id,
                report.elapsed,
                report.changes,
                report.kept_live,
                report.copies.cloned,
                report.copies.bytes_copied
            );
            Ok(format!("frozen {}", report.id))
        }
        ["switch", id] => {
            let report = view.switch(id.parse()?)?;
            eprintln!(
                "deltafs: switched to {} in {:?}: {} candidates, {} inodes and {} entries \
                 invalidated, {} open files kept their state",
                report.id,
                report.elapsed,
                report.candidates,
                report.inodes_invalidated,
                report.entries_invalidated,
                report.retired
            );
            Ok(format!("switched {}", report.id))
        }
        ["branch", id, mountpoint] => {
            let branch = store.mount(base, Path::new(mountpoint), Some(id.parse()?))?;
            branches.push(branch);
            Ok(format!("branched {mountpoint}"))
        }
        ["unmount", mountpoint] => {
            let i = branches
                .iter()
                .position(|b| b.mountpoint() == Path::new(mountpoint))
                .with_context(|| format!("no branch mounted at {mountpoint}"))?;
            branches.remove(i).unmount()?;
            Ok(format!("unmounted {mountpoint}"))
        }
        ["drop", id] => {
            store.drop_snapshot(id.parse()?)?;
            Ok(format!("dropped {id}"))
        }
        ["squash", id] => {
            let report = store.squash(id.parse()?)?;
            eprintln!(
                "deltafs: squashed {} into {} in {:?}: parent now {:?}, {} changes, {} files \
                 ({} bytes) and {} layers removed",
                report
                    .merged
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                report.id,
                report.elapsed,
                report.parent,
                report.changes,
                report.files_removed,
                report.bytes_removed,
                report.layers_removed
            );
            Ok(format!(
                "squashed {id} merged {} files {}",
                report.merged.len(),
                report.files_removed
            ))
        }
        ["sync"] => Ok(format!("synced {}", store.flush()?)),
        ["copyups"] => {
            let s = store.stats();
            Ok(format!(
                "copyups reflink={} copy={} chunked={} empty={} bytes={} chunk_bytes={} \
                 completions={}",
                s.copy_ups_reflink,
                s.copy_ups_copy,
                s.copy_ups_chunked,
                s.copy_ups_empty,
                s.copy_up_bytes,
                s.chunk_copy_bytes,
                s.partial_completions
            ))
        }
        ["stats"] => {
            // One word per request kind: `<kind>=<count>/<mean µs of the timed ones>`.
            let stats = store.stats();
            let ops: Vec<String> = stats
                .ops
                .iter()
                .map(|op| {
                    let mean_us = op.sum_ns as f64 / op.timed.max(1) as f64 / 1000.0;
                    format!("{}={}/{mean_us:.1}", op.kind.as_str(), op.count)
                })
                .collect();
            Ok(format!("stats {}", ops.join(" ")))
        }
        ["gc"] => {
            let report = store.gc()?;
            Ok(format!(
                "gc removed {} kept {}",
                report.removed.len(),
                report.kept
            ))
        }
        _ => bail!("unknown command {:?}", words.join(" ")),
    }
}

/// Logs to stderr: warnings by default, or the level `DELTAFS_LOG` names (`debug` shows
/// every FUSE request, as fuser logs them), each line with the wall-clock time in µs.
fn init_log() {
    let level = std::env::var("DELTAFS_LOG")
        .ok()
        .and_then(|level| level.parse().ok())
        .unwrap_or(log::LevelFilter::Warn);
    if log::set_logger(&StderrLog).is_ok() {
        log::set_max_level(level);
    }
}

struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            eprintln!(
                "{}.{:06} {} {}: {}",
                now.as_secs(),
                now.subsec_micros(),
                record.level(),
                record.target(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}
