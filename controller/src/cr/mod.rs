//! DeltaCR: process checkpoint and rollback by template fork (docs/deltacr.md).
//!
//! A checkpoint ([`checkpoint`]) forks a stopped process, by a ptrace-injected
//! `clone`, into a [`Template`]: a frozen copy that shares the process's memory
//! copy-on-write and never runs. A restore ([`Template::restore`]; [`rollback`] kills
//! the current process first) forks the template again and turns the child into the
//! process as it was at the checkpoint — registers, XSAVE area, fds reopened at their
//! offsets, stdio on fresh controller pipes — as many times as wanted, each child
//! independent (a branch).
//!
//! One module per kernel interface or job:
//!
//! - [`ptrace`] — the one wrapper of ptrace(2) ([`ptrace::Tracee`]).
//! - [`inject`] — syscall injection and the syscall-restart fix-up.
//! - [`procfs`] — what `/proc/<pid>` says.
//! - [`pidfd`] — pidfds.
//! - [`freezer`] — the frozen cgroup of a template.
//! - [`fdtable`] — recording and rebuilding fd tables.
//! - [`pipes`] — pipes between processes: unread bytes recorded, fresh pipes on restore.
//! - [`state`] — the recorded, versioned process state.
//! - [`template`] — checkpoint; [`restore`] — restore, rollback, branch.
//! - [`threads`] — stopping, recording and recreating the threads of a process.
//! - [`shared`] — writable shared file mappings, mapped again by path on restore.
//! - [`dump`] — incremental dumps of templates, and the fallback restore from them.
//! - [`husk`] — restoring a dump into a fresh process when no template is left;
//!   [`carried`] — what a fork carries that such a restore sets (signal handlers, the
//!   memory layout).
//! - [`owned`] — the memory a template alone owns (the template pool's byte bound).
//! - [`warmup`] — pre-faulting a restored process's expected writes.
//! - [`sched`] — scheduling policies: background work at `SCHED_IDLE`.
//!
//! x86_64 only (registers, syscall numbers, the `syscall` instruction). Every thread of
//! a process is checkpointed and recreated; threads get new tids.

#[cfg(not(target_arch = "x86_64"))]
compile_error!("DeltaCR (controller/src/cr) supports x86_64 only");

pub mod carried;
pub mod dump;
pub mod fdtable;
pub mod freezer;
mod hold;
pub mod husk;
pub mod inject;
pub mod owned;
pub mod pidfd;
pub mod pipes;
pub mod procfs;
pub mod procmap;
pub mod ptrace;
pub mod rebind;
pub mod restore;
pub mod sched;
pub mod shared;
pub mod state;
pub mod template;
pub mod threads;
pub mod warmup;

use std::time::Duration;

pub use rebind::Rebind;
pub use restore::{Forked, RestoreOptions, RestoreTimings, Restored, rollback};
pub use state::ProcessState;
pub use template::{CheckpointOptions, CheckpointTimings, Seizing, Template, checkpoint, seize};

/// How long DeltaCR waits for a SIGKILLed process to die.
pub(crate) const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of checkpoint and restore.
#[derive(Debug, thiserror::Error)]
pub enum CrError {
    /// A restore's fix-up was prepared ahead ([`Forked::prepare`]) for another root or
    /// session than the restore asks for.
    #[error(
        "pid {pid}: its fix-up was prepared for another root or session than this \
         restore's"
    )]
    PreparedForOther {
        /// The forked child.
        pid: i32,
    },
    /// The thread-group leader has exited while other threads run: the fork is
    /// injected into the leader.
    #[error(
        "pid {pid} ({comm}): its main thread has exited ({threads} threads left), and \
         DeltaCR forks a process through its main thread"
    )]
    LeaderExited {
        /// The process.
        pid: i32,
        /// Its name.
        comm: String,
        /// How many tasks it has.
        threads: usize,
    },
    /// The process has a writable shared mapping that is not a file reachable by path
    /// (shared anonymous memory, SysV shm, a memfd, a deleted file).
    #[error(
        "pid {pid} ({comm}) has a writable shared mapping {start:#x}-{end:#x} {name:?}: \
         DeltaCR restores writable shared mappings of files by path only"
    )]
    SharedWritableMapping {
        /// The process.
        pid: i32,
        /// Its name.
        comm: String,
        /// First address.
        start: u64,
        /// End address.
        end: u64,
        /// Its path or pseudo-path.
        name: String,
    },
    /// The process is in a frozen cgroup, where an injected syscall cannot run.
    #[error(
        "pid {pid} ({comm}) is in the frozen cgroup {}: thaw it before a checkpoint \
         (DeltaCR stops the process itself)",
        cgroup.display()
    )]
    Frozen {
        /// The process.
        pid: i32,
        /// Its name.
        comm: String,
        /// Its cgroup directory.
        cgroup: std::path::PathBuf,
    },
    /// A recorded path is outside the root the process was said to be in.
    #[error(
        "pid {pid} ({comm}) has {} open outside its root {}: DeltaCR cannot reopen it \
         in a restored process",
        path.display(),
        root.display()
    )]
    OutsideRoot {
        /// The process.
        pid: i32,
        /// Its name.
        comm: String,
        /// The path, as the controller read it.
        path: std::path::PathBuf,
        /// The root prefix.
        root: std::path::PathBuf,
    },
    /// A recorded template is not (or no longer) the stopped process in its cgroup.
    #[error(
        "pid {pid} is not a template held in {} (it is in {}, or not stopped): the \
         template is gone",
        cgroup.display(),
        found.display()
    )]
    NotATemplate {
        /// The recorded pid.
        pid: i32,
        /// The recorded cgroup.
        cgroup: std::path::PathBuf,
        /// Where the process is.
        found: std::path::PathBuf,
    },
    /// The new template did not reach group-stop.
    #[error("template pid {pid} reported {stop:?} instead of its group-stop")]
    TemplateStop {
        /// The template.
        pid: i32,
        /// What it reported.
        stop: ptrace::Stop,
    },
    /// A ptrace request or wait failed.
    #[error(transparent)]
    Ptrace(#[from] ptrace::PtraceError),
    /// Syscall injection failed.
    #[error(transparent)]
    Inject(#[from] inject::InjectError),
    /// Reading `/proc` failed.
    #[error(transparent)]
    Proc(#[from] procfs::ProcError),
    /// Recording or rebuilding the fd table failed (or an fd is not restorable).
    #[error(transparent)]
    Fd(#[from] fdtable::FdError),
    /// A template cgroup operation failed.
    #[error(transparent)]
    Freezer(#[from] freezer::FreezerError),
    /// A pidfd operation failed.
    #[error(transparent)]
    Pidfd(#[from] pidfd::PidfdError),
    /// Rebinding a template's file mappings failed.
    #[error(transparent)]
    Rebind(#[from] rebind::RebindError),
    /// A writable shared file mapping could not be made again in a restored process.
    #[error("restored pid {pid}: mapping {} again, shared: {source}", path.display())]
    SharedRemap {
        /// The restored process.
        pid: i32,
        /// The file.
        path: std::path::PathBuf,
        /// The failed syscall.
        #[source]
        source: inject::InjectError,
    },
    /// Recording a pipe's unread bytes, or making a fresh pipe, failed.
    #[error(transparent)]
    Pipe(#[from] pipes::PipeError),
    /// Writing a dump, or restoring from one, failed.
    #[error(transparent)]
    Dump(#[from] dump::DumpError),
    /// A restore into a fresh process was refused.
    #[error(transparent)]
    Husk(#[from] husk::HuskError),
}
