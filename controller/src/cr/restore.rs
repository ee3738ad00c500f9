//! Restore, rollback and branch: fork a template again and make the child the process
//! as it was at the checkpoint.
//!
//! [`Template::restore`] seizes the template (it re-traps into a ptrace-stop from its
//! group-stop), thaws its cgroup — a thaw does not wake a task in a ptrace-stop —
//! injects `clone3(CLONE_PARENT | CLONE_INTO_CGROUP)`, freezes the cgroup again and
//! detaches the template, which falls back into group-stop. The child, born in the
//! session's cgroup and stopped before it ran an instruction, gets its own fd table
//! ([`fdtable::install`]) and working directory, the checkpoint's registers (with the
//! restart fix-up, so an interrupted `read` or `nanosleep` is restarted) and XSAVE
//! area, its other threads recreated ([`threads::recreate`]), and is detached: it
//! resumes exactly where the checkpoint was, its memory
//! shared copy-on-write with the template. Signals pending at the checkpoint are sent
//! to it again. Each call gives a new, independent process: a branch.
//!
//! [`rollback`] kills the current process and restores in its place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use super::dump::Dump;
use super::fdtable::{self, StdioPipes};
use super::hold::group_stop;
use super::inject::{Batch, InjectError, Injection, SCRATCH_LEN, resume_regs};
use super::pidfd::{Pidfd, PidfdError};
use super::ptrace::{Regs, Stop, Tracee, cr_options};
use super::template::Template;
use super::threads;
use super::{CrError, KILL_TIMEOUT};

/// Where a restored process goes.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// The cgroup v2 directory (absolute, or relative to the cgroup2 mount) the process
    /// joins; `None`: the one it was in at the checkpoint.
    pub cgroup: Option<PathBuf>,
    /// The path under which the *template* reaches that cgroup (the injected `openat`
    /// resolves it in the template's mount namespace and root: a sandbox passes
    /// `/proc/<anchor>/fd/3/work`); `None`: the controller's path.
    pub cgroup_seen: Option<PathBuf>,
    /// A directory, as the template names it, that the restored process `chroot`s to
    /// before its files are reopened (a branch into another sandbox passes
    /// `/proc/<anchor>/root`); the recorded paths must then be relative to that root
    /// ([`super::CheckpointOptions::root_prefix`]). `None`: the template's root.
    pub chroot: Option<PathBuf>,
    /// Make the restored process a session and process-group leader (`setsid`), as a
    /// sandbox's sessions are (the template is one already, so its children are not).
    pub setsid: bool,
    /// Per pipe inode of the checkpoint ([`super::fdtable::FdEntry::pipe`]), the path,
    /// as the restored process names it, of a fresh pipe that stands for it (a
    /// `/proc/<pid>/fd/<n>` of a process holding it): each pipe fd of the process is
    /// opened there with its recorded access mode. Needed for every pipe the process
    /// had beyond a session's stdio ([`super::pipes`]).
    pub pipes: HashMap<u64, PathBuf>,
}

/// How long a restore took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreTimings {
    /// Waiting, after the restore, for the process that was running to be dead
    /// (rollback only; its exit overlaps the restore).
    pub kill: Duration,
    /// Seizing the template, the injected fork, and letting the template go.
    pub fork: Duration,
    /// Making the child's memory a dump's (fallback restores only).
    pub memory: Duration,
    /// Fixing the child up to be the checkpoint's process: root, session, registers,
    /// threads recreated, shared mappings, the fd table with its own open file
    /// descriptions and fresh stdio pipes (`memory` excluded).
    pub fixup: Duration,
    /// Letting it go: its xstate, signal mask and pending signals, then the detach.
    pub resume: Duration,
    /// The whole call.
    pub total: Duration,
}

impl RestoreTimings {
    /// Adds `other`'s phases to these (a rollback's figures sum its processes').
    pub fn add(&mut self, other: &Self) {
        self.kill += other.kill;
        self.fork += other.fork;
        self.memory += other.memory;
        self.fixup += other.fixup;
        self.resume += other.resume;
        self.total += other.total;
    }
}

/// A restored process, running. Dropping the handle does not kill it.
#[derive(Debug)]
pub struct Restored {
    pidfd: Pidfd,
    /// The controller's ends of its stdin, stdout and stderr.
    pub stdio: StdioPipes,
    /// How long the restore took.
    pub timings: RestoreTimings,
    /// Its generation: the forked template's plus one, 0 in a husk (its memory is new).
    /// Pass it on as [`super::CheckpointOptions::generation`].
    pub generation: u32,
}

impl Restored {
    pub(super) fn new(
        pidfd: Pidfd,
        stdio: StdioPipes,
        timings: RestoreTimings,
        generation: u32,
    ) -> Self {
        Self {
            pidfd,
            stdio,
            timings,
            generation,
        }
    }

    /// The process.
    pub fn pid(&self) -> Pid {
        self.pidfd.pid()
    }

    /// Its pidfd.
    pub fn pidfd(&self) -> &Pidfd {
        &self.pidfd
    }

    /// SIGKILLs it and waits until it is dead (reaping it if it is a child of ours).
    pub fn kill(&self) -> Result<(), CrError> {
        Ok(self.pidfd.kill_and_wait(KILL_TIMEOUT)?)
    }
}

/// Bits of a `SigPnd`-style mask as signal numbers.
fn signals_of(mask: u64) -> Vec<i32> {
    (1..=64).filter(|s| mask & (1u64 << (s - 1)) != 0).collect()
}

impl Template {
    /// Forks the template into a new process that resumes where the checkpoint was
    /// (a branch; [`rollback`] kills the current process first).
    pub fn restore(&self, opts: &RestoreOptions) -> Result<Restored, CrError> {
        self.fork_child(opts)?.finish_as(opts, None)
    }

    /// The fallback restore: forks this template (of an ancestor node, or another of the
    /// same program run) and makes the child the process `dump` recorded — its memory
    /// ([`super::dump::apply::apply_memory`]), then registers, threads, fds, signal mask
    /// and umask as a normal restore does. `base` is this template's own dump, if it
    /// has one (it spares reading the child's pages to compare them).
    pub fn restore_from_dump(
        &self,
        dump: &Dump,
        base: Option<&Dump>,
        opts: &RestoreOptions,
    ) -> Result<Restored, CrError> {
        self.fork_child(opts)?.finish_as(opts, Some((dump, base)))
    }

    /// The first half of [`Self::restore`]: forks the template into the cgroup of
    /// `opts` and holds the child in its attach stop, where it has run nothing. A
    /// rollback forks while the processes it killed are still exiting, and finishes
    /// ([`Forked::finish`]) once they are gone and the files are switched. Another
    /// restore of this template waits only for this one's fork (ptrace allows one
    /// tracer): the child is a process of its own from then on, which a standby fork
    /// (held until a rollback wants it) relies on.
    pub fn fork_child(&self, opts: &RestoreOptions) -> Result<Forked<'_>, CrError> {
        let start = Instant::now();
        let one_at_a_time = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let dest = match &opts.cgroup {
            Some(path) if path.is_absolute() => path.clone(),
            Some(path) => self.cgroup_root.join(path),
            None => self.cgroup_root.join(
                self.state
                    .cgroup
                    .strip_prefix("/")
                    .unwrap_or(&self.state.cgroup),
            ),
        };
        let dest = opts.cgroup_seen.clone().unwrap_or(dest);
        let child = self.fork_template(&dest)?;
        drop(one_at_a_time);
        Ok(Forked {
            template: self,
            child,
            start,
            fork: start.elapsed(),
            ahead: None,
        })
    }

    /// Injects a fork into the template, under ptrace and thawed only meanwhile, and
    /// returns the child, born in the cgroup `dest`, in its attach stop.
    fn fork_template(&self, dest: &Path) -> Result<Tracee, CrError> {
        self.injected(|inj, scratch| Ok(inj.clone_into_cgroup(scratch, dest)?))
    }

    /// Runs `f` with syscalls injected into the template (and its scratch page), under
    /// ptrace and thawed only meanwhile; the template's registers are given back
    /// unchanged and it is put back in group-stop and frozen, whatever happened. The
    /// caller holds `self.lock`.
    pub(super) fn injected<T>(
        &self,
        f: impl FnOnce(&mut Injection<'_>, u64) -> Result<T, CrError>,
    ) -> Result<T, CrError> {
        let (mut template, first) = Tracee::seize_stopped(self.pid(), cr_options())?;
        // Killed, not detached, if the controller dies from here to the detach: it is
        // about to be thawed and to hold injection registers.
        template.set_exit_kill(true)?;
        self.cgroup.thaw()?;
        let done = (|| {
            let out = {
                let mut inj = Injection::begin(&mut template, self.state.syscall_site)?;
                let out = f(&mut inj, self.scratch)?;
                // The template's registers are the checkpoint's with the fix-up applied
                // (`orig_rax` -1): given back unchanged.
                inj.finish(false)?;
                out
            };
            // A SIGCONT (from inside the sandbox, say) ended its group-stop; the frozen
            // cgroup held it meanwhile. Stop it again before letting it go.
            if !matches!(first, Stop::Group(_)) {
                group_stop(&mut template)?;
            }
            Ok::<_, CrError>(out)
        })();
        // Frozen again before the template is let go, whatever happened.
        let refrozen = self.cgroup.freeze();
        template.take_deferred_signals();
        let detached = template.detach(0);
        let out = done?;
        refrozen?;
        detached?;
        Ok(out)
    }
}

/// A restore half-done by [`Template::fork_child`]: the template forked, the child held
/// in its attach stop. Dropped unfinished, the child is killed.
pub struct Forked<'a> {
    template: &'a Template,
    child: Tracee,
    start: Instant,
    fork: Duration,
    /// What [`Forked::prepare`] did, if it ran.
    ahead: Option<Ahead>,
}

/// The part of a fix-up done ahead ([`Forked::prepare`]): for which root and session,
/// and the threads it recreated (stopped until the fix-up ends).
struct Ahead {
    chroot: Option<PathBuf>,
    setsid: bool,
    threads: Vec<Tracee>,
}

impl Forked<'_> {
    /// The child (host pid), stopped: it may be moved to another cgroup before
    /// [`Self::finish`].
    pub fn pid(&self) -> Pid {
        self.child.pid()
    }

    /// Marks the fork as made ahead of the restore it serves (a standby fork): the
    /// timings of [`Self::finish`] then start now and count no fork.
    pub fn made_ahead(&mut self) {
        self.start = Instant::now();
        self.fork = Duration::ZERO;
    }

    /// Does, ahead of [`Self::finish`], the part of the fix-up that depends neither on
    /// the files nor on the processes the restore replaces: the root (`chroot`, if
    /// given), a session of its own (`setsid`), the main thread's kernel-held addresses
    /// and the other threads (recreated, stopped until the finish). For a standby fork,
    /// so that the rollback it serves does only the rest. [`Self::finish`] then refuses
    /// options with another root or session.
    pub fn prepare(&mut self, chroot: Option<&Path>, setsid: bool) -> Result<(), CrError> {
        let state = &self.template.state;
        let mut inj = Injection::begin(&mut self.child, state.syscall_site)?;
        root_and_session(&mut inj, self.template.scratch, chroot, setsid)?;
        threads::restore_leader(&mut inj, &state.main_thread)?;
        let threads = threads::recreate(
            &mut inj,
            &state.threads,
            state.syscall_site,
            self.template.scratch,
        )?;
        // The child's registers are still the template's: given back.
        inj.finish(false)?;
        self.ahead = Some(Ahead {
            chroot: chroot.map(Path::to_path_buf),
            setsid,
            threads,
        });
        Ok(())
    }

    /// The second half of [`Template::restore`]: makes the child the checkpointed
    /// process (root, registers, threads, shared mappings, fd table, signals) and lets
    /// it run.
    pub fn finish(self, opts: &RestoreOptions) -> Result<Restored, CrError> {
        self.finish_as(opts, None)
    }

    fn finish_as(
        self,
        opts: &RestoreOptions,
        from_dump: Option<(&Dump, Option<&Dump>)>,
    ) -> Result<Restored, CrError> {
        let Forked {
            template,
            mut child,
            start,
            fork,
            ahead,
        } = self;
        if let Some(a) = &ahead
            && (from_dump.is_some() || a.chroot != opts.chroot || a.setsid != opts.setsid)
        {
            return Err(CrError::PreparedForOther {
                pid: child.pid().as_raw(),
            });
        }
        let site = template.state.syscall_site;
        let state = from_dump.map_or(&template.state, |(dump, _)| dump.state());

        let pidfd = Pidfd::open(child.pid())?;
        let regs = Regs::from(&state.regs);
        let st = &state.status;
        let pending = signals_of(st.sig_pending | st.shared_pending);
        let new_threads;
        let mut memory = Duration::ZERO;
        let fixing = Instant::now();
        let stdio = {
            let mut inj = Injection::begin(&mut child, site)?;
            if ahead.is_none() {
                let root = opts.chroot.as_deref();
                root_and_session(&mut inj, template.scratch, root, opts.setsid)?;
            }
            // A dump's scratch page is executable (`mmap_scratch_at`); a template's is
            // unless an older daemon made it.
            let batched = from_dump.is_some() || template.scratch_exec;
            let scratch = match from_dump {
                Some((dump, base)) => {
                    let t = Instant::now();
                    let (scratch, _) = super::dump::apply::apply_memory(&mut inj, dump, base)?;
                    // The template's own scratch page is the template's, not the
                    // process's: gone unless the dump has memory there.
                    inj.syscall("umask", libc::SYS_umask, &[u64::from(st.umask)])?;
                    memory = t.elapsed();
                    scratch
                }
                None => template.scratch,
            };
            new_threads = match ahead {
                Some(a) => a.threads,
                None => {
                    threads::restore_leader(&mut inj, &state.main_thread)?;
                    // Before the fd table is rebuilt, which unmaps the scratch page; the
                    // threads share the table (CLONE_FILES) and the root (CLONE_FS) and
                    // stay stopped until the end.
                    threads::recreate(&mut inj, &state.threads, site, scratch)?
                }
            };
            // The root is set (chroot above): each file is this view's.
            super::shared::map_again(&mut inj, &state.shared_maps, scratch)?;
            let stdio = fdtable::install(
                &mut inj,
                &pidfd,
                &state.fds,
                &state.cwd,
                (scratch, batched),
                &opts.pipes,
            )?;
            // With a signal that will be delivered (not blocked), the kernel makes the
            // restart decision (SA_RESTART or EINTR) from the exact registers; with none,
            // no handler runs and the fix-up restarts the syscall here.
            let deliverable = pending.iter().any(|&s| st.blocked & (1u64 << (s - 1)) == 0)
                || inj.tracee().has_deferred_signals();
            inj.finish_with(&if deliverable {
                regs
            } else {
                resume_regs(&regs)
            })?;
            stdio
        };
        let fixup = fixing.elapsed().saturating_sub(memory);
        let resuming = Instant::now();
        child.set_xstate(&state.xstate)?;
        if from_dump.is_some() {
            // A fork carries the template's mask; this one is another checkpoint's.
            child.set_sigmask(st.blocked)?;
        }
        for sig in pending.into_iter().chain(child.take_deferred_signals()) {
            // SAFETY: kill(2) takes plain integers and touches no memory of ours.
            unsafe { libc::kill(child.pid().as_raw(), sig) };
        }
        threads::detach_all(new_threads)?;
        child.detach(0)?;
        Ok(Restored {
            pidfd,
            stdio,
            timings: RestoreTimings {
                kill: Duration::ZERO,
                fork,
                memory,
                fixup,
                resume: resuming.elapsed(),
                total: start.elapsed(),
            },
            generation: template.generation.saturating_add(1),
        })
    }
}

/// Puts the stopped tracee of `inj` in `root` ([`chroot`]), if given, and a session of
/// its own (`setsid`), if asked.
fn root_and_session(
    inj: &mut Injection<'_>,
    scratch: u64,
    root: Option<&Path>,
    setsid: bool,
) -> Result<(), CrError> {
    if let Some(root) = root {
        chroot(inj, scratch, root)?;
    }
    if setsid {
        inj.syscall("setsid", libc::SYS_setsid, &[])?;
    }
    Ok(())
}

/// Injects `chroot(root)` (the scratch page holds the path) and `chdir("/")`, one
/// syscall at a time (the scratch page need not be executable).
pub(super) fn chroot(inj: &mut Injection<'_>, scratch: u64, root: &Path) -> Result<(), CrError> {
    let mut batch = Batch::new(scratch);
    queue_chroot(&mut batch, inj.tracee().pid().as_raw(), root)?;
    inj.run_each(&batch)?;
    Ok(())
}

/// Adds `chroot(root)` and `chdir("/")` to `batch` (for pid `pid`).
pub(super) fn queue_chroot(batch: &mut Batch, pid: i32, root: &Path) -> Result<(), CrError> {
    // The path, its NUL and the 8-byte slot of "/\0" within the page.
    if root.as_os_str().len() as u64 + 9 > SCRATCH_LEN {
        return Err(InjectError::PathTooLong {
            pid,
            path: root.to_path_buf(),
        }
        .into());
    }
    let root = batch.path(root);
    let slash = batch.data(b"/\0");
    batch.call("chroot", libc::SYS_chroot, &[root]);
    batch.call("chdir", libc::SYS_chdir, &[slash]);
    Ok(())
}

/// Rolls back: kills `current` (the process running now, if it still exists) and
/// restores `template` in its place.
///
/// `current` gets its SIGKILL first: from then on it cannot return to user mode. Its
/// exit (unmapping its memory, which takes 16 ms for 256 MiB of 4 KiB pages here)
/// overlaps the restore, and the call returns once it is dead.
pub fn rollback(
    template: &Template,
    current: Pid,
    opts: &RestoreOptions,
) -> Result<Restored, CrError> {
    let start = Instant::now();
    let victim = match Pidfd::open(current) {
        Ok(victim) => Some(victim),
        Err(PidfdError::Syscall { source, .. }) if source.raw_os_error() == Some(libc::ESRCH) => {
            None
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(victim) = &victim {
        match victim.send_signal(libc::SIGKILL) {
            Err(PidfdError::Syscall { source, .. })
                if source.raw_os_error() != Some(libc::ESRCH) =>
            {
                return Err(PidfdError::Syscall {
                    op: "pidfd_send_signal",
                    pid: current.as_raw(),
                    source,
                }
                .into());
            }
            _ => {}
        }
    }
    let restored = template.restore(opts);
    let waited = Instant::now();
    if let Some(victim) = victim {
        victim.kill_and_wait(KILL_TIMEOUT)?;
    }
    let mut restored = restored?;
    restored.timings.kill = waited.elapsed();
    restored.timings.total = start.elapsed();
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_masks_decode() {
        assert_eq!(signals_of(0x201), vec![libc::SIGHUP, libc::SIGUSR1]);
        assert!(signals_of(0).is_empty());
        assert_eq!(signals_of(1 << 63), vec![64]);
    }
}
