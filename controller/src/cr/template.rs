//! Checkpoint: fork a stopped process into a frozen template.
//!
//! [`checkpoint`] interrupts the process with ptrace, records its registers, XSAVE
//! area, fd table and signal state, injects `clone3(CLONE_PARENT | CLONE_INTO_CGROUP)`
//! (see [`super::inject::CLONE_FLAGS`]) and lets
//! the process go: it is paused only for that. The child, auto-attached and stopped
//! before it ran an instruction, becomes the [`Template`]:
//!
//! 1. its fd table is emptied (`close_range`) so that it holds no open file of the
//!    process, and it gets a session of its own (`setsid`) so that the death of the
//!    process cannot send the orphaned-process-group `SIGHUP` + `SIGCONT` to it;
//! 2. it is given the checkpoint's registers (restart fix-up applied) and XSAVE area:
//!    the template *is* the checkpoint, self-contained;
//! 3. it is put in group-stop (`SIGSTOP`, passed through its signal-delivery-stop),
//!    and the cgroup of its own that it was born in (`clone3(CLONE_INTO_CGROUP)`) is
//!    frozen;
//! 4. it is detached: the kernel turns the group-stop back into a plain stop.
//!
//! From then on three things each keep it from running: the group-stop (undone only by
//! `SIGCONT`), the frozen cgroup (undone only by a thaw), and, while DeltaCR holds it,
//! the ptrace-stop. No step above returns it to user mode: every resume happens with a
//! signal or trap pending, which the kernel handles before the return to user mode.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::unistd::Pid;

use super::fdtable;
use super::freezer::TemplateCgroup;
use super::inject::{Injection, SCRATCH_LEN, SyscallSite, interrupted_syscall, requeue_signals};
use super::pidfd::Pidfd;
use super::procfs;
use super::ptrace::cr_options;
use super::shared::SharedMapping;
use super::state::{ProcessState, Registers, STATE_VERSION};
use super::threads;
use super::{CrError, KILL_TIMEOUT};
use crate::cgroup::CgroupFs;

/// Where templates go, and how the process names things.
#[derive(Clone, Debug, Default)]
pub struct CheckpointOptions {
    /// The cgroup (absolute, or relative to the cgroup2 mount) under which each
    /// template gets a frozen cgroup of its own.
    pub template_cgroups: PathBuf,
    /// The path under which the *process* reaches `template_cgroups` (the injected
    /// `openat` resolves it in the process's mount namespace and root, where the cgroup2
    /// mount may not be visible: a sandbox passes `/proc/<anchor>/fd/4`); `None`: the
    /// same path as the controller's.
    pub template_cgroups_seen: Option<PathBuf>,
    /// The process's root as the controller reads paths in `/proc/<pid>/{cwd,fd}` (a
    /// chrooted sandbox process shows `/sb/<id>/workspace`): stripped from the recorded
    /// cwd and file paths, so the state holds paths relative to the process's own root
    /// and a restore can reopen them in another root. A path outside it is refused.
    pub root_prefix: Option<PathBuf>,
    /// A directory, as the process names it, the template `chroot`s to while it is
    /// made (a sandbox passes its tree's root, `/proc/<tree anchor>/root`): the
    /// template then resolves the paths of later restores there, even once the root
    /// the process had is gone (a view that died with its daemon). Restores should
    /// then give [`super::RestoreOptions::chroot`].
    pub template_root: Option<PathBuf>,
    /// The process is not a session: its fds 0–2 are recorded like any other fd (a
    /// background job's stdout is the session's stdout pipe, restored as that pipe),
    /// not as the controller's stdio pipes.
    pub inherited_stdio: bool,
    /// The process's generation ([`Template::generation`]): 0 for a process DeltaCR did
    /// not restore, else its [`super::Restored::generation`]. The template is one more.
    pub generation: u32,
}

/// How long a checkpoint took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckpointTimings {
    /// From the process's interrupt to its release.
    pub paused: Duration,
    /// The whole call, template set-up included.
    pub total: Duration,
}

/// A frozen fork of a process at a checkpoint: it never runs, and every restore forks
/// it again. Dropping it kills it and removes its cgroup.
#[derive(Debug)]
pub struct Template {
    pub(super) pidfd: Pidfd,
    pub(super) cgroup: TemplateCgroup,
    pub(super) cgroup_root: PathBuf,
    pub(super) state: ProcessState,
    /// A page of the template's own (not the checkpoint's) memory, where each restore
    /// passes `struct clone_args` and a cgroup path; restored processes unmap it.
    pub(super) scratch: u64,
    /// Whether the scratch page is executable, so that batches run there ([`Batch`]):
    /// an older daemon's is not.
    pub(super) scratch_exec: bool,
    pub(super) timings: CheckpointTimings,
    /// Forks between the template and a process that shares no memory with older ones.
    pub(super) generation: u32,
    /// One fork (or other injection) at a time: ptrace allows one tracer.
    pub(super) lock: Mutex<()>,
}

impl Template {
    /// The template process.
    pub fn pid(&self) -> Pid {
        self.pidfd.pid()
    }

    /// What was recorded at the checkpoint.
    pub fn state(&self) -> &ProcessState {
        &self.state
    }

    /// The template's own frozen cgroup.
    pub fn cgroup_path(&self) -> &Path {
        self.cgroup.path()
    }

    /// Whether the template process still exists (it can be killed from inside its
    /// sandbox's pid namespace, or from the host).
    pub fn is_alive(&self) -> bool {
        !self.pidfd.wait_exit(Duration::ZERO).unwrap_or(true)
    }

    /// Bytes of memory only this template (and `forks` standby forks of it, which
    /// never ran) maps: what destroying them frees ([`super::owned`]). Walks its page
    /// map: call it off the answer path.
    pub fn owned_bytes(&self, forks: usize) -> Result<u64, super::owned::OwnedError> {
        super::owned::owned_bytes(self.pid().as_raw(), forks)
    }

    /// How long the checkpoint took.
    pub fn timings(&self) -> CheckpointTimings {
        self.timings
    }

    /// How many forks separate the template from a process that shares no memory with
    /// older ones (a fresh program, or one restored into a husk): its checkpointed
    /// process's generation plus one. The kernel links each fork's memory areas to every
    /// ancestor's `anon_vma` while their templates live, so forking a template costs more
    /// the higher this is (docs/deltacr.md, "Re-rooting deep lineages").
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The address of the template's scratch page (kept with the state, so that a
    /// restarted controller can [`Template::adopt`] it).
    pub fn scratch(&self) -> u64 {
        self.scratch
    }

    /// Takes over a template a previous controller made: process `pid`, held in the
    /// frozen cgroup `cgroup` (absolute), with the recorded `state`, `scratch` page and
    /// `generation`.
    /// Refused unless `pid` is a stopped process in exactly that cgroup (a pid reused
    /// by another process after the template died is not taken for it).
    pub fn adopt(
        pid: Pid,
        cgroup: PathBuf,
        state: ProcessState,
        scratch: u64,
        generation: u32,
    ) -> Result<Self, CrError> {
        let raw = pid.as_raw();
        let cgroup_root = CgroupFs::host()
            .map_err(super::freezer::FreezerError::from)?
            .root()
            .to_path_buf();
        // Open first: the checks below then concern the process the pidfd names.
        let pidfd = Pidfd::open(pid)?;
        let own = cgroup_root.join(
            procfs::cgroup_v2(raw)?
                .strip_prefix("/")
                .unwrap_or(Path::new("")),
        );
        let state_char = procfs::stat(raw)?.state;
        let stopped = matches!(state_char, 'T' | 't');
        if own != cgroup || !stopped {
            return Err(CrError::NotATemplate {
                pid: raw,
                cgroup,
                found: own,
            });
        }
        let template = TemplateCgroup::adopt(cgroup);
        if !template.is_frozen() {
            template.freeze()?;
        }
        // Daemons before batched injection mapped it without PROT_EXEC.
        let scratch_exec = procfs::maps(raw)?
            .iter()
            .any(|m| (m.start..m.end).contains(&scratch) && m.perms[2] == b'x');
        Ok(Self {
            pidfd,
            cgroup: template,
            cgroup_root,
            state,
            scratch,
            scratch_exec,
            timings: CheckpointTimings::default(),
            generation,
            lock: Mutex::new(()),
        })
    }

    /// Kills the template and removes its cgroup.
    pub fn destroy(mut self) -> Result<(), CrError> {
        self.pidfd.kill_and_wait(KILL_TIMEOUT)?;
        self.cgroup.remove()?;
        Ok(())
    }
}

impl Drop for Template {
    fn drop(&mut self) {
        // After `destroy` this finds the template gone; otherwise it kills it, and the
        // cgroup's own drop removes the cgroup.
        let _ = self.pidfd.kill_and_wait(KILL_TIMEOUT);
    }
}

fn template_name(pid: i32) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("tpl-{pid}-{nanos:x}-{seq}")
}

/// A process whose thread-group leader has exited (`pthread_exit` in `main`) cannot be
/// forked: the fork is injected into the leader.
fn refuse_dead_leader(pid: i32) -> Result<(), CrError> {
    if matches!(procfs::stat(pid)?.state, 'Z' | 'X' | 'x') {
        return Err(CrError::LeaderExited {
            pid,
            comm: procfs::comm_or_unknown(pid),
            threads: procfs::thread_count(pid)?,
        });
    }
    Ok(())
}

/// A task in a frozen cgroup traps before every return to user mode: an injected
/// syscall would never run. DeltaCR quiesces by ptrace, not by freezing the session.
/// The requested state (`cgroup.freeze` of the cgroup or of an ancestor) is what
/// counts: `cgroup.events` says `frozen 1` only once every task has reached the trap.
fn refuse_frozen(pid: i32, root: &Path, cgroup: &Path) -> Result<(), CrError> {
    let own = root.join(cgroup.strip_prefix("/").unwrap_or(cgroup));
    let mut dir = own.as_path();
    while dir.starts_with(root) && dir != root {
        let freeze = std::fs::read_to_string(dir.join("cgroup.freeze")).unwrap_or_default();
        if freeze.trim() == "1" {
            return Err(CrError::Frozen {
                pid,
                comm: procfs::comm_or_unknown(pid),
                cgroup: dir.to_path_buf(),
            });
        }
        let Some(parent) = dir.parent() else { break };
        dir = parent;
    }
    Ok(())
}

/// `path` (as the controller reads it in `/proc`) relative to the process's root
/// `prefix`, as an absolute path in that root.
pub(super) fn under_root(pid: i32, prefix: &Path, path: &Path) -> Result<PathBuf, CrError> {
    match path.strip_prefix(prefix) {
        Ok(rest) => Ok(Path::new("/").join(rest)),
        Err(_) => Err(CrError::OutsideRoot {
            pid,
            comm: procfs::comm_or_unknown(pid),
            path: path.to_path_buf(),
            root: prefix.to_path_buf(),
        }),
    }
}

/// Bitmask (bit `n - 1` for signal `n`) of `signals`.
pub(super) fn signal_bits(signals: &[i32]) -> u64 {
    signals
        .iter()
        .filter(|&&s| (1..=64).contains(&s))
        .fold(0, |acc, &s| acc | 1u64 << (s - 1))
}

/// A process stopped by ptrace (all its threads) for a checkpoint, not forked yet
/// ([`seize`]). Dropping it lets the process go. It belongs to the thread that seized
/// it (ptrace's tracer is a thread).
#[derive(Debug)]
pub struct Seizing {
    pid: Pid,
    start: Instant,
    paused_at: Instant,
    /// Its `[vdso]` (start, end).
    vdso: Option<(u64, u64)>,
    shared: Vec<SharedMapping>,
    seized: threads::Seized,
}

impl Seizing {
    /// The process.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Forks the process into its template and lets it go (see [`checkpoint`]).
    pub fn fork(self, opts: &CheckpointOptions) -> Result<Template, CrError> {
        fork_seized(self, opts, None)
    }
}

/// Checkpoints the process `pid`, all its threads, into a new [`Template`]:
/// [`seize`] then [`Seizing::fork`].
///
/// Refused, before the process is touched, with an error naming it: a writable shared
/// mapping, an fd DeltaCR cannot reopen, a frozen cgroup, an exited thread-group
/// leader.
pub fn checkpoint(pid: Pid, opts: &CheckpointOptions) -> Result<Template, CrError> {
    let raw = pid.as_raw();
    let cgroup_root = CgroupFs::host()
        .map_err(super::freezer::FreezerError::from)?
        .root()
        .to_path_buf();
    let own_cgroup = procfs::cgroup_v2(raw)?;
    refuse_frozen(raw, &cgroup_root, &own_cgroup)?;
    // Checked a moment ago, not frozen since: the fork need not check again.
    fork_seized(seize(pid, opts)?, opts, Some(own_cgroup))
}

/// Stops the process `pid` and all its threads, after the checks of [`checkpoint`]
/// (except the frozen cgroup: a process in a frozen cgroup can be seized, and a
/// sandbox seizes its processes while their cgroup is frozen, so that all of them are
/// taken at the same instant; it must be thawed before [`Seizing::fork`]).
pub fn seize(pid: Pid, opts: &CheckpointOptions) -> Result<Seizing, CrError> {
    let start = Instant::now();
    let raw = pid.as_raw();
    refuse_dead_leader(raw)?;
    // Two or three queries rather than all of /proc/<pid>/maps (~0.1 ms for python).
    let maps = super::procmap::ProcMaps::open(raw)?;
    let writable_shared = maps.all_with(super::procmap::SHARED | super::procmap::WRITABLE)?;
    let shared = super::shared::record(raw, &writable_shared, opts.root_prefix.as_deref())?;
    let vdso = match maps.vdso()? {
        Some(vdso) => Some(vdso),
        // Moved since the exec: looked for by name.
        None => procfs::vdso(&procfs::maps(raw)?),
    };
    fdtable::check_supported(raw, !opts.inherited_stdio)?;
    let seized = threads::seize_all(pid, cr_options())?;
    Ok(Seizing {
        pid,
        start,
        paused_at: Instant::now(),
        vdso,
        shared,
        seized,
    })
}

/// Forks the seized process into its template; `checked`: its cgroup, already checked
/// not to be frozen.
fn fork_seized(
    seizing: Seizing,
    opts: &CheckpointOptions,
    checked: Option<PathBuf>,
) -> Result<Template, CrError> {
    let Seizing {
        pid,
        start,
        paused_at,
        vdso,
        shared,
        seized: threads::Seized {
            leader: mut tracee,
            mut others,
        },
    } = seizing;
    let raw = pid.as_raw();
    let comm = procfs::comm(raw)?;
    let cgroup_root = CgroupFs::host()
        .map_err(super::freezer::FreezerError::from)?
        .root()
        .to_path_buf();
    let own_cgroup = match checked {
        Some(own) => own,
        None => {
            let own = procfs::cgroup_v2(raw)?;
            refuse_frozen(raw, &cgroup_root, &own)?;
            own
        }
    };
    let name = template_name(raw);
    let cgroup = TemplateCgroup::create(&opts.template_cgroups, &name)?;
    let cgroup_seen = match &opts.template_cgroups_seen {
        Some(seen) => seen.join(&name),
        None => cgroup.path().to_path_buf(),
    };

    // The pause: from the seize to the detach. Every thread is stopped.
    let site = SyscallSite::find(&tracee, vdso)?;
    let xstate = tracee.xstate()?;
    let ((mut child, scratch), regs, fds, cwd, mut status, main_thread, thread_states) = {
        let mut inj = Injection::begin(&mut tracee, site)?;
        let regs = *inj.saved();
        let fds = fdtable::record(raw, !opts.inherited_stdio)?;
        let cwd = procfs::cwd(raw)?;
        let status = procfs::status(raw)?;
        // The template is born in its own cgroup; the scratch page (struct clone_args,
        // the cgroup's path; the other threads' records) is the process's only for the
        // call, the template keeps it for the clone3 of every restore.
        let scratch = inj.mmap_scratch_exec(SCRATCH_LEN)?;
        let recorded = (|| {
            let main_thread = threads::record_leader(&mut inj, scratch)?;
            let states = others
                .iter_mut()
                .map(|t| threads::record_thread(raw, t, site, scratch))
                .collect::<Result<Vec<_>, CrError>>()?;
            Ok::<_, CrError>((main_thread, states))
        })();
        let recorded = recorded.and_then(|r| {
            let child = inj.clone_into_cgroup(scratch, &cgroup_seen)?;
            Ok((r, child))
        });
        let unmapped = inj.syscall("munmap", libc::SYS_munmap, &[scratch, SCRATCH_LEN]);
        let ((main_thread, states), child) = recorded?;
        let child = (child, scratch);
        unmapped?;
        let signals_follow = inj.tracee().has_deferred_signals();
        inj.finish(signals_follow)?;
        (child, regs, fds, cwd, status, main_thread, states)
    };
    // Its registers are its own again, but it is still in the signal-delivery-stop of
    // the last injected step, whose SIGTRAP a controller crash would deliver (it killed
    // the process in cr_crash): PTRACE_O_EXITKILL stays until the detach, which
    // resumes it with no signal.
    threads::requeue_thread_signals(raw, &mut others);
    threads::detach_all(others)?;
    // Signals that arrived during the pause are the process's: it gets them back, and
    // the checkpoint records them as pending.
    let deferred = tracee.take_deferred_signals();
    status.sig_pending |= signal_bits(&deferred);
    for sig in deferred {
        tracee.defer_signal(sig);
    }
    requeue_signals(&mut tracee);
    tracee.detach(0)?;
    let paused = paused_at.elapsed();

    let pidfd = Pidfd::open(child.pid())?;
    let handlers = super::hold::hold(
        &mut child,
        site,
        &regs,
        &xstate,
        &cgroup,
        scratch,
        opts.template_root.as_deref(),
        &shared,
    )?;
    let tpid = child.pid().as_raw();
    child.detach(0)?;

    let mut fds = fds;
    let mut cwd = cwd;
    if let Some(prefix) = &opts.root_prefix {
        cwd = under_root(raw, prefix, &cwd)?;
        for entry in &mut fds {
            if let fdtable::FdKind::Path { path, .. } = &mut entry.kind {
                *path = under_root(raw, prefix, path)?;
            }
        }
    }
    let state = ProcessState {
        version: STATE_VERSION,
        pid: raw,
        comm,
        regs: Registers::from(&regs),
        xstate,
        interrupted_syscall: interrupted_syscall(&regs),
        syscall_site: site,
        fds,
        cwd,
        status,
        rlimits: procfs::rlimits(tpid)?,
        cgroup: own_cgroup,
        main_thread,
        threads: thread_states,
        shared_maps: shared,
        handlers: Some(handlers),
    };
    Ok(Template {
        pidfd,
        cgroup,
        cgroup_root,
        state,
        scratch,
        scratch_exec: true,
        timings: CheckpointTimings {
            paused,
            total: start.elapsed(),
        },
        generation: opts.generation.saturating_add(1),
        lock: Mutex::new(()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_bits_match_proc_status() {
        // SigPnd shows SIGHUP (1) as bit 0, SIGUSR1 (10) as bit 9.
        assert_eq!(signal_bits(&[libc::SIGHUP, libc::SIGUSR1]), 0x201);
        assert_eq!(signal_bits(&[0, 65]), 0);
    }

    #[test]
    fn paths_are_made_relative_to_the_root() {
        let root = Path::new("/sb/abc");
        assert_eq!(
            under_root(1, root, Path::new("/sb/abc/workspace/a")).unwrap(),
            Path::new("/workspace/a")
        );
        assert_eq!(under_root(1, root, root).unwrap(), Path::new("/"));
        assert!(matches!(
            under_root(1, root, Path::new("/sb/abcd/x")),
            Err(CrError::OutsideRoot { .. })
        ));
    }

    #[test]
    fn template_names_are_unique() {
        assert_ne!(template_name(1), template_name(1));
    }
}
