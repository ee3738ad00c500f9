//! Syscall injection: making a stopped tracee run one syscall of DeltaCR's choosing.
//!
//! An [`Injection`] saves the tracee's registers, then for each syscall sets `rax` (and
//! `orig_rax = -1`, so the kernel applies no restart logic of its own), the arguments,
//! and `rip` = a `syscall` instruction (`0f 05`) found in the tracee's `[vdso]`
//! ([`SyscallSite`]); `PTRACE_SINGLESTEP` runs that one instruction — the whole syscall,
//! through a `PTRACE_EVENT_CLONE` for `clone3` — and the kernel reports the step with a
//! `SIGTRAP` at the syscall's exit, where `rax` is the result: one stop per syscall (the
//! step's `SIGTRAP` is never delivered). Only the one `syscall` instruction runs in user
//! mode. [`Injection::finish`] gives the registers back with the restart fix-up of
//! [`resume_regs`] when the tracee had been stopped inside a syscall. Calls that need
//! no result of one another between them can go as a [`Batch`] instead: a few
//! instructions in an executable scratch page run them all for one stop ([`batch`]).
//!
//! Signals that arrive meanwhile are suppressed and deferred on the [`Tracee`]; whoever
//! owns the tracee re-sends them ([`requeue_signals`]) or, for templates, drops them.
//!
//! A tracee whose registers are the injection's must never be detached: an injection
//! sets `PTRACE_O_EXITKILL`, so that if the controller dies the kernel kills it (and the
//! children it forks meanwhile, which inherit the option) instead.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::unistd::Pid;

use super::ptrace::{Regs, Resume, Stop, Tracee};

mod batch;
mod error;

pub use batch::{Batch, BatchError, Call};
pub use error::InjectError;

/// `-ERESTARTSYS` and friends (`include/linux/errno.h`): a syscall interrupted by a
/// signal or a ptrace stop returns one of these to the kernel's exit path, which then
/// either restarts it or turns it into `EINTR`. User space never sees them.
pub const ERESTARTSYS: i64 = 512;
/// Restart whatever the signal handler's `SA_RESTART` says.
pub const ERESTARTNOINTR: i64 = 513;
/// Restart unless a handler runs.
pub const ERESTARTNOHAND: i64 = 514;
/// Restart through `restart_syscall(2)` with the task's saved `restart_block`
/// (relative `nanosleep`, `poll` with a timeout, …).
pub const ERESTART_RESTARTBLOCK: i64 = 516;

/// `CLONE_INTO_CGROUP` (`<linux/sched.h>`), a `clone3`-only flag.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// The `clone3` flags of every fork DeltaCR injects. The child is a sibling of the
/// tracee (`CLONE_PARENT`), so the tracee never sees it in `wait()` nor gets a
/// `SIGCHLD` for it; and it is born in its cgroup (`CLONE_INTO_CGROUP`): writing a pid
/// to `cgroup.procs` waits for an RCU grace period here (14–22 ms measured once
/// migrations are 50 ms apart; DESIGN.md, `favordynmods` is off), a fork into a cgroup
/// does not. The kernel reports it as `PTRACE_EVENT_CLONE` (`exit_signal` must be 0
/// with `CLONE_PARENT`; the child inherits the tracee's).
pub const CLONE_FLAGS: u64 = libc::CLONE_PARENT as u64 | CLONE_INTO_CGROUP;

/// The `clone` flags of a thread recreated in a restored process: those of glibc's
/// `pthread_create` (which adds `CLONE_PARENT_SETTID | CLONE_CHILD_CLEARTID` with
/// `&pd->tid`, as [`Injection::clone_thread`] does), exit signal 0.
pub const THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS) as u64;

/// Size of `struct clone_args` up to its `cgroup` field (`CLONE_ARGS_SIZE_VER2`).
const CLONE_ARGS_SIZE: u64 = 88;

/// Bytes of the scratch page an injected `clone3` uses: `struct clone_args` at 0, the
/// cgroup directory's path at [`SCRATCH_PATH_AT`].
pub const SCRATCH_LEN: u64 = 4096;

/// Where the path goes in the scratch page.
const SCRATCH_PATH_AT: u64 = 128;

/// The registers a task must resume with so that it continues exactly where it was
/// stopped, when no signal is delivered first.
///
/// A task stopped inside a syscall (`orig_rax >= 0`) that the stop interrupted has
/// `rax` = `-ERESTART*`: the kernel would rewind `rip` over the 2-byte `syscall`
/// instruction and reload `rax` on its way out, but only on a signal-handling path
/// that a task resumed from injected registers (or a fresh fork child) does not take.
/// So this does it: `rip -= 2` and `rax = orig_rax` (or `restart_syscall` for
/// `-ERESTART_RESTARTBLOCK`). `orig_rax` becomes -1 so that no restart logic runs twice.
pub fn resume_regs(saved: &Regs) -> Regs {
    let mut regs = *saved;
    regs.orig_rax = u64::MAX;
    if (saved.orig_rax as i64) < 0 {
        return regs;
    }
    match (saved.rax as i64).wrapping_neg() {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
            regs.rax = saved.orig_rax;
            regs.rip = saved.rip.wrapping_sub(2);
        }
        ERESTART_RESTARTBLOCK => {
            regs.rax = libc::SYS_restart_syscall as u64;
            regs.rip = saved.rip.wrapping_sub(2);
        }
        _ => {}
    }
    regs
}

/// Whether `saved` stopped inside a syscall that will be restarted on resume.
pub fn interrupted_syscall(saved: &Regs) -> Option<i64> {
    let nr = saved.orig_rax as i64;
    let err = (saved.rax as i64).wrapping_neg();
    (nr >= 0
        && matches!(
            err,
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK
        ))
    .then_some(nr)
}

/// Length of the `syscall` instruction: where the step after it stops.
const SYSCALL_INSN_LEN: u64 = 2;

/// Offset of the first `syscall` instruction (`0f 05`) in `code`.
pub fn find_syscall_instruction(code: &[u8]) -> Option<usize> {
    code.windows(2).position(|w| w == [0x0f, 0x05])
}

/// The address of a `syscall` instruction in a process's `[vdso]`. The vdso is mapped
/// at the same address in every fork of the process, so one site serves the process,
/// its templates and their children.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SyscallSite(pub u64);

impl SyscallSite {
    /// Finds the instruction in the vdso mapped at `vdso` (start, end) of `tracee`.
    pub fn find(tracee: &Tracee, vdso: Option<(u64, u64)>) -> Result<Self, InjectError> {
        let pid = tracee.pid().as_raw();
        let (start, end) = vdso.ok_or(InjectError::NoVdso { pid })?;
        let len = usize::try_from(end.saturating_sub(start)).unwrap_or(0);
        let mut code = vec![0u8; len];
        tracee.read_memory(start, &mut code)?;
        let offset =
            find_syscall_instruction(&code).ok_or(InjectError::NoSyscallInstruction { pid })?;
        Ok(Self(start + offset as u64))
    }
}

/// A decoded syscall return value: `Err(errno)` for -4095..=-1.
pub fn syscall_result(rax: i64) -> Result<u64, i32> {
    if (-4095..0).contains(&rax) {
        Err(i32::try_from(-rax).unwrap_or(libc::EINVAL))
    } else {
        Ok(rax as u64)
    }
}

/// Syscalls run one after the other in a stopped tracee, its registers saved at the
/// start and given back by [`Injection::finish`] (or, best effort, on drop).
pub struct Injection<'t> {
    tracee: &'t mut Tracee,
    site: SyscallSite,
    saved: Regs,
    /// The tracee holds injection registers that must be replaced before it runs.
    dirty: bool,
}

impl<'t> Injection<'t> {
    /// Saves the registers of `tracee`, which must be in a ptrace-stop, and sets
    /// `PTRACE_O_EXITKILL` on it ([`Tracee::set_exit_kill`]): from now until its owner
    /// clears it, a controller crash kills the tracee rather than let it run injection
    /// registers.
    pub fn begin(tracee: &'t mut Tracee, site: SyscallSite) -> Result<Self, InjectError> {
        let saved = tracee.regs()?;
        if saved.cs != 0x33 {
            return Err(InjectError::NotX86_64 {
                pid: tracee.pid().as_raw(),
                cs: saved.cs,
            });
        }
        tracee.set_exit_kill(true)?;
        Ok(Self {
            tracee,
            site,
            saved,
            dirty: false,
        })
    }

    /// The registers saved at [`Injection::begin`].
    pub fn saved(&self) -> &Regs {
        &self.saved
    }

    /// The tracee.
    pub fn tracee(&self) -> &Tracee {
        self.tracee
    }

    /// Runs the next syscalls from `site` instead (a restore into a fresh process moves
    /// the vdso that held the first one, [`super::husk`]).
    pub fn set_site(&mut self, site: SyscallSite) {
        self.site = site;
    }

    /// Where the syscalls run.
    pub fn site(&self) -> SyscallSite {
        self.site
    }

    /// Runs syscall `nr` with up to six arguments; returns `rax` as the kernel left it
    /// (a negative errno on failure) and the child of a fork event, if any.
    fn run(&mut self, nr: i64, args: &[u64]) -> Result<(i64, Option<Pid>), InjectError> {
        let mut regs = self.saved;
        regs.rax = nr as u64;
        regs.orig_rax = u64::MAX;
        regs.rip = self.site.0;
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9) =
            (a[0], a[1], a[2], a[3], a[4], a[5]);
        self.tracee.set_regs(&regs)?;
        self.dirty = true;
        // One stop per syscall: single-stepping the `syscall` instruction runs the
        // whole syscall and reports a kernel SIGTRAP at its exit (PTRACE_SYSCALL
        // would stop at the entry and at the exit: twice the round trips).
        let mut child = None;
        self.tracee.resume(Resume::Step, 0)?;
        let done = loop {
            match self.tracee.wait()? {
                Stop::Signal(libc::SIGTRAP) => {
                    // The step's trap, or a SIGTRAP sent by a process (which may stand
                    // for both: the kernel does not queue a second SIGTRAP for a
                    // thread while one is pending). Where the tracee stands says
                    // whether the syscall ran.
                    let now = self.tracee.regs()?;
                    let user = self.tracee.signal_code()? <= 0;
                    if user {
                        self.tracee.defer_signal(libc::SIGTRAP);
                    }
                    if now.rip == self.site.0 + SYSCALL_INSN_LEN {
                        if now.orig_rax as i64 != nr {
                            return Err(InjectError::WrongEntry {
                                pid: self.tracee.pid().as_raw(),
                                expected: nr,
                                seen: now.orig_rax as i64,
                            });
                        }
                        break now;
                    }
                    if !user || now.rip != self.site.0 {
                        return Err(InjectError::Strayed {
                            pid: self.tracee.pid().as_raw(),
                            rip: now.rip,
                            site: self.site.0,
                        });
                    }
                }
                Stop::NewChild { child: c, .. } => child = Some(c),
                Stop::Signal(sig) => self.tracee.defer_signal(sig),
                // A stale interrupt or group-stop report, or an event we did not ask
                // for: the tracee is still headed for the syscall.
                Stop::Syscall | Stop::Interrupt | Stop::Group(_) | Stop::Event(_) => {}
            }
            self.tracee.resume(Resume::Step, 0)?;
        };
        Ok((done.rax as i64, child))
    }

    /// Runs syscall `nr` (`name` for errors) and returns its non-negative result.
    pub fn syscall(
        &mut self,
        name: &'static str,
        nr: i64,
        args: &[u64],
    ) -> Result<u64, InjectError> {
        let (rax, _) = self.run(nr, args)?;
        syscall_result(rax).map_err(|errno| InjectError::Syscall {
            pid: self.tracee.pid().as_raw(),
            name,
            source: io::Error::from_raw_os_error(errno),
        })
    }

    /// Injects `clone3` with [`CLONE_FLAGS`], the child born in the cgroup directory
    /// `cgroup`, and returns the child, auto-attached and in its attach stop: it has
    /// not run a single instruction. `scratch` is a writable page of the tracee
    /// ([`SCRATCH_LEN`] bytes) for the path and `struct clone_args`; the cgroup is
    /// opened in the tracee for the call and closed again (the child inherits that fd
    /// and the page).
    pub fn clone_into_cgroup(
        &mut self,
        scratch: u64,
        cgroup: &Path,
    ) -> Result<Tracee, InjectError> {
        let pid = self.tracee.pid().as_raw();
        let mut path = cgroup.as_os_str().as_bytes().to_vec();
        path.push(0);
        if path.len() as u64 > SCRATCH_LEN - SCRATCH_PATH_AT {
            return Err(InjectError::PathTooLong {
                pid,
                path: cgroup.to_path_buf(),
            });
        }
        self.tracee.write_memory(scratch + SCRATCH_PATH_AT, &path)?;
        let flags = (libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64;
        let at_fdcwd = libc::AT_FDCWD as u64;
        let dirfd = self.syscall(
            "openat",
            libc::SYS_openat,
            &[at_fdcwd, scratch + SCRATCH_PATH_AT, flags, 0],
        )?;
        // flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls,
        // set_tid, set_tid_size, cgroup.
        let args: [u64; 11] = [CLONE_FLAGS, 0, 0, 0, 0, 0, 0, 0, 0, 0, dirfd];
        let bytes: Vec<u8> = args.iter().flat_map(|a| a.to_ne_bytes()).collect();
        self.tracee.write_memory(scratch, &bytes)?;
        let cloned = self.run(libc::SYS_clone3, &[scratch, CLONE_ARGS_SIZE]);
        let closed = self.syscall("close", libc::SYS_close, &[dirfd]);
        let (rax, child) = cloned?;
        let child = Tracee::auto_attached(new_task(pid, "clone3", rax, child)?, self.tracee);
        closed?;
        attach_stop(pid, child)
    }

    /// Injects a raw `clone` that creates a thread in the tracee's process with TLS
    /// `tls` and, when `tid_address` is not 0, `CLONE_PARENT_SETTID` and
    /// `CLONE_CHILD_CLEARTID` there (glibc's `&pd->tid`: the new tid is written there,
    /// so `pthread_join` and `pthread_kill` find the thread, and cleared when it exits).
    /// Returns the thread, auto-attached and in its attach stop, its registers still the
    /// `clone`'s return (it has not run an instruction; the caller replaces them). The
    /// tracee needs `PTRACE_O_TRACECLONE`.
    pub fn clone_thread(&mut self, tls: u64, tid_address: u64) -> Result<Tracee, InjectError> {
        let pid = self.tracee.pid().as_raw();
        let mut flags = THREAD_FLAGS;
        if tid_address != 0 {
            flags |= (libc::CLONE_PARENT_SETTID | libc::CLONE_CHILD_CLEARTID) as u64;
        }
        // x86_64: clone(flags, stack, parent_tid, child_tid, tls). Stack 0: the
        // caller's stack pointer, never used, since the thread's registers are replaced
        // before it runs.
        let (rax, child) = self.run(libc::SYS_clone, &[flags, 0, tid_address, tid_address, tls])?;
        let child = new_task(pid, "clone", rax, child)?;
        attach_stop(pid, Tracee::auto_attached(child, self.tracee))
    }

    /// Maps `len` bytes of private anonymous read-write memory in the tracee.
    pub fn mmap_scratch(&mut self, len: u64) -> Result<u64, InjectError> {
        self.mmap_private(0, len, libc::PROT_READ | libc::PROT_WRITE, 0)
    }

    /// Maps `len` bytes of private anonymous memory in the tracee that it can also
    /// execute: a scratch page that runs batches ([`Batch`]).
    pub fn mmap_scratch_exec(&mut self, len: u64) -> Result<u64, InjectError> {
        self.mmap_private(
            0,
            len,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            0,
        )
    }

    /// Injects `mmap(addr, len, prot, MAP_PRIVATE | MAP_ANONYMOUS | flags, -1, 0)`.
    fn mmap_private(
        &mut self,
        addr: u64,
        len: u64,
        prot: i32,
        flags: i32,
    ) -> Result<u64, InjectError> {
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags) as u64;
        self.syscall(
            "mmap",
            libc::SYS_mmap,
            &[addr, len, prot as u64, flags, u64::MAX, 0],
        )
    }

    /// Maps `len` bytes of private anonymous memory in the tracee at `addr`, which must
    /// be free (`MAP_FIXED_NOREPLACE`: `EEXIST` otherwise, nothing replaced): readable,
    /// writable and executable, to run batches ([`Batch`]).
    pub fn mmap_scratch_at(&mut self, addr: u64, len: u64) -> Result<(), InjectError> {
        let prot = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
        self.mmap_private(addr, len, prot, libc::MAP_FIXED_NOREPLACE)
            .map(drop)
    }

    /// Gives the tracee its saved registers back, ready to resume where it stopped.
    ///
    /// With `signals_follow` false, an interrupted syscall is set up for restart here
    /// ([`resume_regs`]). With it true (the owner will re-send deferred signals with
    /// [`requeue_signals`] before resuming), the registers go back exactly and the
    /// kernel restarts the syscall or fails it with `EINTR`, as the handler's
    /// `SA_RESTART` says, when it delivers the signal.
    pub fn finish(mut self, signals_follow: bool) -> Result<(), InjectError> {
        let regs = if signals_follow {
            self.saved
        } else {
            resume_regs(&self.saved)
        };
        self.tracee.set_regs(&regs)?;
        self.dirty = false;
        Ok(())
    }

    /// Gives the tracee `regs` instead of the saved registers (a restored process gets
    /// the checkpoint's).
    pub fn finish_with(mut self, regs: &Regs) -> Result<(), InjectError> {
        self.tracee.set_regs(regs)?;
        self.dirty = false;
        Ok(())
    }
}

impl Drop for Injection<'_> {
    fn drop(&mut self) {
        if self.dirty {
            // An error left the tracee with injection registers: put its own back so that
            // a detach does not run it in the vdso. Fails only if it is gone.
            let _ = self.tracee.set_regs(&resume_regs(&self.saved));
        }
    }
}

/// The new task of an injected `clone` or `clone3` (`name`) into `pid` that returned
/// `rax` and reported `child` in its fork event; the syscall's error, or
/// [`InjectError::NoForkEvent`] for a success without an event.
fn new_task(
    pid: i32,
    name: &'static str,
    rax: i64,
    child: Option<Pid>,
) -> Result<Pid, InjectError> {
    if let Err(errno) = syscall_result(rax) {
        return Err(InjectError::Syscall {
            pid,
            name,
            source: io::Error::from_raw_os_error(errno),
        });
    }
    child.ok_or(InjectError::NoForkEvent { pid, ret: rax })
}

/// Waits for the attach stop of `child`, a new task of `pid`, auto-attached: the first
/// thing it reports, before it ran an instruction. Anything else kills it.
fn attach_stop(pid: i32, mut child: Tracee) -> Result<Tracee, InjectError> {
    match child.wait() {
        Ok(Stop::Interrupt) => Ok(child),
        Ok(stop) => {
            let child_pid = child.pid().as_raw();
            child.kill();
            Err(InjectError::ChildStop {
                pid,
                child: child_pid,
                stop,
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Re-sends, with `kill(2)`, the signals a tracee received while DeltaCR held it, so
/// that it handles them once resumed (their `siginfo` becomes that of a `kill` by the
/// controller).
pub fn requeue_signals(tracee: &mut Tracee) {
    for sig in tracee.take_deferred_signals() {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        unsafe { libc::kill(tracee.pid().as_raw(), sig) };
    }
}

/// Registers for unit tests: user code at 0x1000, `rax` 7, not in a syscall.
#[cfg(test)]
pub(crate) fn test_regs() -> Regs {
    // SAFETY: user_regs_struct is plain integers; all-zero is a valid value.
    let mut r: Regs = unsafe { std::mem::zeroed() };
    r.rip = 0x1000;
    r.orig_rax = u64::MAX;
    r.rax = 7;
    r
}

#[cfg(test)]
mod tests {
    use super::test_regs as regs;
    use super::*;

    #[test]
    fn resume_regs_leaves_user_code_alone() {
        let r = regs();
        assert_eq!(resume_regs(&r).rip, 0x1000);
        assert_eq!(resume_regs(&r).rax, 7);
        // A value that looks like -ERESTARTSYS outside a syscall is user data.
        let mut r = regs();
        r.rax = (-ERESTARTSYS) as u64;
        assert_eq!(resume_regs(&r).rax, (-ERESTARTSYS) as u64);
        assert_eq!(resume_regs(&r).rip, 0x1000);
        assert_eq!(interrupted_syscall(&r), None);
    }

    #[test]
    fn resume_regs_restarts_an_interrupted_read() {
        for code in [ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND] {
            let mut r = regs();
            r.orig_rax = libc::SYS_read as u64;
            r.rax = (-code) as u64;
            let out = resume_regs(&r);
            assert_eq!(out.rip, 0x1000 - 2);
            assert_eq!(out.rax, libc::SYS_read as u64);
            assert_eq!(out.orig_rax, u64::MAX);
            assert_eq!(interrupted_syscall(&r), Some(libc::SYS_read));
            // Applying it twice changes nothing more.
            assert_eq!(resume_regs(&out).rip, out.rip);
        }
    }

    #[test]
    fn resume_regs_restarts_a_nanosleep_through_restart_syscall() {
        let mut r = regs();
        r.orig_rax = libc::SYS_nanosleep as u64;
        r.rax = (-ERESTART_RESTARTBLOCK) as u64;
        let out = resume_regs(&r);
        assert_eq!(out.rip, 0x1000 - 2);
        assert_eq!(out.rax, libc::SYS_restart_syscall as u64);
    }

    #[test]
    fn resume_regs_keeps_a_finished_syscall_result() {
        let mut r = regs();
        r.orig_rax = libc::SYS_read as u64;
        r.rax = (-i64::from(libc::EAGAIN)) as u64;
        let out = resume_regs(&r);
        assert_eq!(out.rip, 0x1000);
        assert_eq!(out.rax, r.rax);
        assert_eq!(interrupted_syscall(&r), None);
    }

    #[test]
    fn finds_syscall_instruction() {
        assert_eq!(find_syscall_instruction(&[0x90, 0x0f, 0x05, 0xc3]), Some(1));
        assert_eq!(find_syscall_instruction(&[0x0f, 0x0f, 0x05]), Some(1));
        assert_eq!(find_syscall_instruction(&[0x05, 0x0f]), None);
        assert_eq!(find_syscall_instruction(&[]), None);
    }

    #[test]
    fn decodes_syscall_results() {
        assert_eq!(syscall_result(3), Ok(3));
        assert_eq!(syscall_result(-2), Err(libc::ENOENT));
        assert_eq!(syscall_result(-4095), Err(4095));
        // mmap addresses in the upper half are results, not errors.
        assert_eq!(syscall_result(-4096), Ok((-4096i64) as u64));
    }
}
