//! Threads: stopping every thread of a process for a checkpoint, recording what a fork
//! does not carry, and recreating the threads in a restored process.
//!
//! A fork copies one thread, the one that calls it. So a checkpoint stops every thread
//! ([`seize_all`]), forks the thread-group leader, and records the others one by one
//! ([`record_thread`]): registers (TLS is `fs_base`), XSAVE area, signal mask and
//! pending signals, and what no fork or `clone` carries — the `clear_child_tid` address
//! (glibc's `&pd->tid`, read by an injected `prctl(PR_GET_TID_ADDRESS)`), the
//! robust-futex list, the rseq registration, the alternate signal stack, the name.
//!
//! A restore forks the template (one thread, the leader's), then [`recreate`] injects a
//! raw `clone` per other thread into it — `CLONE_SETTLS` with the thread's `fs_base`,
//! `CLONE_PARENT_SETTID | CLONE_CHILD_CLEARTID` at its `&pd->tid`, so that the new tid
//! is where glibc looks for it — and gives each new thread, auto-attached and stopped
//! before its first instruction, its registers, XSAVE area, signal mask, robust list,
//! rseq registration, alternate stack and name. Threads get new tids: the tree's pid
//! namespace is shared by its branches, where the old tids may be taken.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use super::CrError;
use super::inject::{
    ERESTART_RESTARTBLOCK, ERESTARTNOHAND, Injection, SyscallSite, interrupted_syscall, resume_regs,
};
use super::procfs;
use super::ptrace::{Options, PtraceError, Regs, Tracee};
use super::state::{AltStack, Registers, ThreadExtras, ThreadState};
use super::template::signal_bits;

/// Where in the scratch page the per-thread injections put their results: one `u64`
/// (`PR_GET_TID_ADDRESS`) at 0, a `stack_t` (24 bytes) at 8, a name at 64.
const AT_TID_ADDRESS: u64 = 0;
const AT_ALTSTACK: u64 = 8;
const AT_NAME: u64 = 64;

/// `SS_DISABLE` and `SS_AUTODISARM` (`<signal.h>`).
const SS_DISABLE: u32 = 2;
const SS_AUTODISARM: u32 = 1 << 31;

/// Every thread of a process, each seized and in a ptrace-stop.
#[derive(Debug)]
pub struct Seized {
    /// The thread-group leader (the thread that will fork), with the caller's options.
    pub leader: Tracee,
    /// The other threads, ascending tid, seized without fork or clone tracing.
    pub others: Vec<Tracee>,
}

/// How long a thread that ptrace refused (it is exiting) may take to be gone.
const EXIT_WAIT: Duration = Duration::from_secs(1);

/// Whether thread `tid` of `pid` has exited or does within [`EXIT_WAIT`]: gone, or a
/// zombie or dead task. `PTRACE_SEIZE` refuses a task that is exiting; it is waited
/// for, not left out at once, because its exit is not complete before the kernel has
/// cleared its `clear_child_tid` (glibc's `pd->tid`, where a `pthread_join` waits): a
/// fork before that would give every restore a thread that never ends.
fn thread_gone(pid: i32, tid: i32) -> bool {
    let deadline = Instant::now() + EXIT_WAIT;
    loop {
        if matches!(procfs::task_state(pid, tid), None | Some('Z' | 'X' | 'x')) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Seizes and stops every thread of `pid`, a process whose leader is alive, and gives
/// the leader `options`.
///
/// Threads can create threads until they are stopped, so this lists `/proc/<pid>/task`,
/// seizes and interrupts every thread not seen yet, waits until each has stopped, and
/// lists again until no new thread appears: once every listed thread is stopped, none
/// can create another, and a thread a `clone` created is listed before the `clone`
/// returns. Threads are seized without `PTRACE_O_TRACECLONE` (and fork tracing), so
/// that one created meanwhile is not auto-attached unseen; the leader gets `options`
/// once everything is stopped. A thread that exits meanwhile is left out.
pub fn seize_all(pid: Pid, options: Options) -> Result<Seized, CrError> {
    let raw = pid.as_raw();
    let quiet = options
        - (Options::PTRACE_O_TRACECLONE
            | Options::PTRACE_O_TRACEFORK
            | Options::PTRACE_O_TRACEVFORK);
    let mut leader = Tracee::seize(pid, quiet)?;
    leader.interrupt()?;
    let mut seen: HashSet<i32> = HashSet::from([raw]);
    let mut others: Vec<Tracee> = Vec::new();
    let mut waiting: Vec<Tracee> = Vec::new();
    let mut first = true;
    loop {
        for tid in procfs::tids(raw)? {
            if !seen.insert(tid) {
                continue;
            }
            match Tracee::seize(Pid::from_raw(tid), quiet) {
                Ok(t) => match t.interrupt() {
                    Ok(()) => waiting.push(t),
                    Err(_) if thread_gone(raw, tid) => {}
                    Err(e) => return Err(e.into()),
                },
                Err(_) if thread_gone(raw, tid) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if first {
            leader.wait_for_stop()?;
            first = false;
        }
        if waiting.is_empty() {
            break;
        }
        for mut t in waiting.drain(..) {
            match t.wait_for_stop() {
                Ok(_) => others.push(t),
                Err(e) if e.is_gone() => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    others.sort_by_key(|t| t.pid().as_raw());
    leader.set_options(options)?;
    Ok(Seized { leader, others })
}

/// Reads what thread `tracee` of `pid` (stopped, not the leader) has that a `clone`
/// does not carry; `scratch` is a writable page in the process for injected syscalls'
/// results. The thread is left in a ptrace-stop with its own registers (restart fix-up
/// applied unless signals it received meanwhile are to be re-sent), `PTRACE_O_EXITKILL`
/// still set (it is in the last injected step's `SIGTRAP` stop, which a controller
/// crash would deliver; the detach resumes it with no signal); the signals that arrived while it was held stay deferred on it, and are
/// counted as pending in the record.
pub fn record_thread(
    pid: i32,
    tracee: &mut Tracee,
    site: SyscallSite,
    scratch: u64,
) -> Result<ThreadState, CrError> {
    let tid = tracee.pid().as_raw();
    let xstate = tracee.xstate()?;
    let sigmask = tracee.sigmask()?;
    let rseq = tracee.rseq()?;
    let robust_list = tracee.robust_list()?;
    let status = procfs::task_status(pid, tid)?;
    let comm = procfs::task_comm(pid, tid)?;
    let (regs, tid_address, altstack) = {
        let mut inj = Injection::begin(tracee, site)?;
        let regs = *inj.saved();
        inj.syscall(
            "prctl(PR_GET_TID_ADDRESS)",
            libc::SYS_prctl,
            &[libc::PR_GET_TID_ADDRESS as u64, scratch + AT_TID_ADDRESS],
        )?;
        inj.syscall(
            "sigaltstack",
            libc::SYS_sigaltstack,
            &[0, scratch + AT_ALTSTACK],
        )?;
        let mut buf = [0u8; 32];
        inj.tracee()
            .read_memory(scratch, &mut buf)
            .map_err(super::inject::InjectError::from)?;
        let follow = inj.tracee().has_deferred_signals();
        inj.finish(follow)?;
        (regs, u64_at(&buf, 0), decode_altstack(&buf[8..32]))
    };
    let restarted_syscall = if regs.orig_rax as i64 == libc::SYS_restart_syscall {
        // The 24 bytes before the `syscall` instruction (rip is past it).
        let mut code = [0u8; 24];
        tracee
            .read_memory(regs.rip.wrapping_sub(26), &mut code)
            .ok()
            .and_then(|()| restartblock_syscall_before(&code))
    } else {
        None
    };
    let deferred = tracee.take_deferred_signals();
    let sig_pending = status.sig_pending | signal_bits(&deferred);
    for sig in deferred {
        tracee.defer_signal(sig);
    }
    Ok(ThreadState {
        tid,
        comm,
        regs: Registers::from(&regs),
        xstate,
        sigmask,
        sig_pending,
        interrupted_syscall: interrupted_syscall(&regs),
        restarted_syscall,
        extras: ThreadExtras {
            tid_address,
            robust_list,
            rseq,
            altstack,
        },
    })
}

/// The extras of the leader (stopped, in an injection whose `scratch` page is
/// writable): its `clear_child_tid` address, robust list and rseq registration. Its
/// alternate signal stack is not recorded: the fork copies it.
pub fn record_leader(inj: &mut Injection<'_>, scratch: u64) -> Result<ThreadExtras, CrError> {
    let tracee = inj.tracee();
    let rseq = tracee.rseq()?;
    let robust_list = tracee.robust_list()?;
    inj.syscall(
        "prctl(PR_GET_TID_ADDRESS)",
        libc::SYS_prctl,
        &[libc::PR_GET_TID_ADDRESS as u64, scratch + AT_TID_ADDRESS],
    )?;
    let mut buf = [0u8; 8];
    inj.tracee()
        .read_memory(scratch + AT_TID_ADDRESS, &mut buf)
        .map_err(super::inject::InjectError::from)?;
    Ok(ThreadExtras {
        tid_address: u64_at(&buf, 0),
        robust_list,
        rseq,
        altstack: None,
    })
}

/// Re-sends to each thread, with `tgkill`, the signals it received while held.
pub fn requeue_thread_signals(pid: i32, threads: &mut [Tracee]) {
    for t in threads {
        for sig in t.take_deferred_signals() {
            tgkill(pid, t.pid().as_raw(), sig);
        }
    }
}

fn tgkill(pid: i32, tid: i32, sig: i32) {
    // SAFETY: tgkill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) };
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_ne_bytes(b)
}

/// Decodes a `stack_t` (`ss_sp` u64, `ss_flags` i32 + padding, `ss_size` u64); `None`
/// when disabled. `SS_ONSTACK` (the thread runs on it now) is not a flag one can set.
pub fn decode_altstack(raw: &[u8]) -> Option<AltStack> {
    let sp = u64_at(raw, 0);
    let flags = u32::from_ne_bytes([raw[8], raw[9], raw[10], raw[11]]);
    let size = u64_at(raw, 16);
    (flags & SS_DISABLE == 0).then_some(AltStack {
        sp,
        size,
        flags: flags & SS_AUTODISARM,
    })
}

/// Encodes `alt` as a `stack_t`.
pub fn encode_altstack(alt: &AltStack) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[..8].copy_from_slice(&alt.sp.to_ne_bytes());
    out[8..12].copy_from_slice(&alt.flags.to_ne_bytes());
    out[16..].copy_from_slice(&alt.size.to_ne_bytes());
    out
}

/// Sets the leader's extras in the restored main thread `inj` (new tid `tid`): writes
/// the new tid where glibc keeps it and registers it as `clear_child_tid` again, sets
/// the robust list, and registers rseq if the fork did not carry it.
pub fn restore_leader(inj: &mut Injection<'_>, extras: &ThreadExtras) -> Result<(), CrError> {
    let tid = inj.tracee().pid().as_raw();
    if extras.tid_address != 0 {
        inj.tracee()
            .write_memory(extras.tid_address, &tid.to_ne_bytes())
            .map_err(super::inject::InjectError::from)?;
        inj.syscall(
            "set_tid_address",
            libc::SYS_set_tid_address,
            &[extras.tid_address],
        )?;
    }
    set_robust_and_rseq(inj, extras)
}

fn set_robust_and_rseq(inj: &mut Injection<'_>, extras: &ThreadExtras) -> Result<(), CrError> {
    let robust = extras.robust_list;
    if robust.head != 0 {
        inj.syscall(
            "set_robust_list",
            libc::SYS_set_robust_list,
            &[robust.head, robust.len],
        )?;
    }
    if let Some(rseq) = extras.rseq {
        let now = inj.tracee().rseq()?;
        if now != Some(rseq) {
            inj.syscall(
                "rseq",
                libc::SYS_rseq,
                &[rseq.addr, u64::from(rseq.len), 0, u64::from(rseq.signature)],
            )?;
        }
    }
    Ok(())
}

/// Recreates `threads` in the restored process whose main thread is in `main` (an
/// injection, `PTRACE_O_TRACECLONE` set; `scratch` a writable page of it). Returns
/// them auto-attached, in a ptrace-stop with their registers, XSAVE area, signal mask
/// and extras set, and their pending signals queued: detaching them lets them run.
pub fn recreate(
    main: &mut Injection<'_>,
    threads: &[ThreadState],
    site: SyscallSite,
    scratch: u64,
) -> Result<Vec<Tracee>, CrError> {
    let pid = main.tracee().pid().as_raw();
    let mut out = Vec::with_capacity(threads.len());
    for th in threads {
        let mut t = main.clone_thread(th.regs.fs_base, th.extras.tid_address)?;
        let regs = Regs::from(&th.regs);
        let deliverable = th.sig_pending & !th.sigmask != 0;
        {
            let mut inj = Injection::begin(&mut t, site)?;
            set_robust_and_rseq(&mut inj, &th.extras)?;
            if let Some(alt) = &th.extras.altstack {
                inj.tracee()
                    .write_memory(scratch + AT_ALTSTACK, &encode_altstack(alt))
                    .map_err(super::inject::InjectError::from)?;
                inj.syscall(
                    "sigaltstack",
                    libc::SYS_sigaltstack,
                    &[scratch + AT_ALTSTACK, 0],
                )?;
            }
            let mut name = th.comm.as_bytes().to_vec();
            name.truncate(15);
            name.push(0);
            inj.tracee()
                .write_memory(scratch + AT_NAME, &name)
                .map_err(super::inject::InjectError::from)?;
            inj.syscall(
                "prctl(PR_SET_NAME)",
                libc::SYS_prctl,
                &[libc::PR_SET_NAME as u64, scratch + AT_NAME],
            )?;
            let follow = deliverable || inj.tracee().has_deferred_signals();
            inj.finish_with(&resume_regs_new_thread(&regs, follow, th.restarted_syscall))?;
        }
        t.set_xstate(&th.xstate)?;
        t.set_sigmask(th.sigmask)?;
        let tid = t.pid().as_raw();
        for sig in (1..=64).filter(|s| th.sig_pending & (1u64 << (s - 1)) != 0) {
            tgkill(pid, tid, sig);
        }
        for sig in t.take_deferred_signals() {
            tgkill(pid, tid, sig);
        }
        out.push(t);
    }
    Ok(out)
}

/// The syscalls that restart through `restart_syscall(2)` (`-ERESTART_RESTARTBLOCK`)
/// and can be issued again with their original arguments: `poll`, `nanosleep`,
/// `futex`, `clock_nanosleep`.
const RESTARTBLOCK_SYSCALLS: [i64; 4] = [
    libc::SYS_poll,
    libc::SYS_nanosleep,
    libc::SYS_futex,
    libc::SYS_clock_nanosleep,
];

/// The syscall number that `code`, the bytes right before a `syscall` instruction,
/// loads into `eax` (`b8 imm32`, `mov $nr, %eax`, within those bytes), if it is one of
/// the syscalls that restart through `restart_syscall`. A thread interrupted in
/// `restart_syscall` has lost its syscall number (the kernel replaced it), not its
/// arguments; libc loads the number just before the instruction.
pub fn restartblock_syscall_before(code: &[u8]) -> Option<i64> {
    (0..code.len().saturating_sub(4)).rev().find_map(|i| {
        if code[i] != 0xb8 {
            return None;
        }
        let nr = i64::from(u32::from_le_bytes([
            code[i + 1],
            code[i + 2],
            code[i + 3],
            code[i + 4],
        ]));
        RESTARTBLOCK_SYSCALLS.contains(&nr).then_some(nr)
    })
}

/// [`resume_regs`] for a thread recreated by `clone` (not a fork): its
/// `restart_block`, which `restart_syscall(2)` reads, is not the one the checkpointed
/// thread had (a `clone` copies the creating thread's). So a syscall interrupted with
/// `-ERESTART_RESTARTBLOCK` (a relative `nanosleep`, a `futex` wait or `poll` with a
/// timeout) is issued again with its original arguments, which are still in the
/// registers: its timeout starts again from the restore. A thread interrupted in
/// `restart_syscall` itself issues `restarted` (the syscall it restarts, see
/// [`restartblock_syscall_before`]) again; when that is unknown, the syscall returns
/// `EINTR`, as it would after a signal handler.
///
/// With `signal_follows` (a deliverable signal is sent to the thread before it runs)
/// the registers go back as they were, for the kernel's own restart-or-`EINTR`
/// decision, except that `-ERESTART_RESTARTBLOCK` becomes `-ERESTARTNOHAND`: the same
/// `EINTR` when a handler runs, the original syscall again when none does.
pub fn resume_regs_new_thread(saved: &Regs, signal_follows: bool, restarted: Option<i64>) -> Regs {
    let restartblock =
        (saved.orig_rax as i64) >= 0 && (saved.rax as i64).wrapping_neg() == ERESTART_RESTARTBLOCK;
    if !restartblock {
        return if signal_follows {
            *saved
        } else {
            resume_regs(saved)
        };
    }
    let nr = if saved.orig_rax as i64 == libc::SYS_restart_syscall {
        restarted
    } else {
        Some(saved.orig_rax as i64)
    };
    let mut regs = *saved;
    match nr {
        None => {
            regs.rax = (-i64::from(libc::EINTR)) as u64;
            regs.orig_rax = u64::MAX;
        }
        Some(nr) if signal_follows => {
            regs.rax = (-ERESTARTNOHAND) as u64;
            regs.orig_rax = nr as u64;
        }
        Some(nr) => {
            regs.rax = nr as u64;
            regs.orig_rax = u64::MAX;
            regs.rip = saved.rip.wrapping_sub(2);
        }
    }
    regs
}

/// Detaches every thread of `threads`; the first error is returned after all were
/// tried.
pub fn detach_all(threads: Vec<Tracee>) -> Result<(), PtraceError> {
    let mut first = Ok(());
    for t in threads {
        if let Err(e) = t.detach(0)
            && first.is_ok()
        {
            first = Err(e);
        }
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cr::inject::{ERESTARTSYS, resume_regs, test_regs as regs};

    #[test]
    fn a_new_thread_issues_a_restartblock_syscall_again() {
        let mut r = regs();
        r.orig_rax = libc::SYS_nanosleep as u64;
        r.rax = (-ERESTART_RESTARTBLOCK) as u64;
        let out = resume_regs_new_thread(&r, false, None);
        assert_eq!(out.rip, 0x1000 - 2);
        assert_eq!(out.rax, libc::SYS_nanosleep as u64);
        assert_eq!(out.orig_rax, u64::MAX);
        let out = resume_regs_new_thread(&r, true, None);
        assert_eq!(out.rip, 0x1000);
        assert_eq!(out.rax, (-ERESTARTNOHAND) as u64);
        assert_eq!(out.orig_rax, libc::SYS_nanosleep as u64);
        // Other restarts are those of a fork child.
        r.orig_rax = libc::SYS_futex as u64;
        r.rax = (-ERESTARTSYS) as u64;
        assert_eq!(resume_regs_new_thread(&r, false, None), resume_regs(&r));
        assert_eq!(resume_regs_new_thread(&r, true, None), r);
        // Outside a syscall nothing changes but orig_rax.
        let r = regs();
        assert_eq!(resume_regs_new_thread(&r, false, None), resume_regs(&r));
    }

    #[test]
    fn a_new_thread_in_restart_syscall_issues_the_restarted_syscall_or_gets_eintr() {
        let mut r = regs();
        r.orig_rax = libc::SYS_restart_syscall as u64;
        r.rax = (-ERESTART_RESTARTBLOCK) as u64;
        let nr = Some(libc::SYS_clock_nanosleep);
        let out = resume_regs_new_thread(&r, false, nr);
        assert_eq!(out.rip, 0x1000 - 2);
        assert_eq!(out.rax, libc::SYS_clock_nanosleep as u64);
        let out = resume_regs_new_thread(&r, true, nr);
        assert_eq!(out.rip, 0x1000);
        assert_eq!(out.orig_rax, libc::SYS_clock_nanosleep as u64);
        for follow in [false, true] {
            let out = resume_regs_new_thread(&r, follow, None);
            assert_eq!(out.rip, 0x1000);
            assert_eq!(out.rax as i64, -i64::from(libc::EINTR));
            assert_eq!(out.orig_rax, u64::MAX);
        }
    }

    #[test]
    fn finds_the_syscall_number_loaded_before_the_instruction() {
        // mov $0xe6,%eax (clock_nanosleep), right before the syscall.
        assert_eq!(
            restartblock_syscall_before(&[0x48, 0x89, 0xc7, 0xb8, 0xe6, 0, 0, 0]),
            Some(libc::SYS_clock_nanosleep)
        );
        // mov $0xca,%eax; xor $0x80,%sil (futex, glibc's lll_futex_wake).
        assert_eq!(
            restartblock_syscall_before(&[0xb8, 0xca, 0, 0, 0, 0x40, 0x80, 0xf6, 0x80]),
            Some(libc::SYS_futex)
        );
        // mov $0x0,%eax (read) does not restart through restart_syscall.
        assert_eq!(restartblock_syscall_before(&[0xb8, 0, 0, 0, 0]), None);
        assert_eq!(restartblock_syscall_before(&[0xb8, 0xe6]), None);
    }

    #[test]
    fn altstacks_round_trip_and_disabled_is_none() {
        let alt = AltStack {
            sp: 0x7f00_0000_1000,
            size: 0x8000,
            flags: SS_AUTODISARM,
        };
        assert_eq!(decode_altstack(&encode_altstack(&alt)), Some(alt));
        let mut raw = encode_altstack(&alt);
        raw[8..12].copy_from_slice(&SS_DISABLE.to_ne_bytes());
        assert_eq!(decode_altstack(&raw), None);
        // SS_ONSTACK (1) is reported, not restorable.
        raw[8..12].copy_from_slice(&1u32.to_ne_bytes());
        assert_eq!(decode_altstack(&raw).map(|a| a.flags), Some(0));
    }
}
