//! Restoring a process from its dump into a fresh process, a *husk*, when no template
//! of the same program run is alive to fork (a tree whose init died, a reboot).
//!
//! The caller starts the husk where the restored process must live (its namespaces,
//! root, cgroups, credentials: a sandbox starts a fork of its tree's init there, which
//! runs no code of the sandbox), single-threaded. [`restore_into_husk`] seizes it and,
//! by injected syscalls and writes to `/proc/<pid>/mem`, makes it the dumped process:
//!
//! 1. its rseq registration is dropped (the kernel would write into memory about to go);
//! 2. a scratch page at an address free in both address spaces;
//! 3. `[vvar]`, `[vvar_vclock]` and `[vdso]` move (`mremap`) to the dump's vdso address,
//!    keeping their relative layout (the kernel's vdso `mremap` hook updates
//!    `mm->context.vdso`); the husk's vdso must be the dump's (same size; same bytes,
//!    when the dump recorded their hash): the program holds pointers into it. Injected
//!    syscalls then run from the moved vdso;
//! 4. every other mapping of the husk is unmapped; every mapping of the dump is made
//!    (anonymous, or its file reopened in the husk's root), and every dumped page is
//!    written (there is no base: all of them but the zero pages of anonymous memory);
//! 5. `prctl(PR_SET_MM_MAP)` sets the memory layout fields (code, data, heap start and
//!    end, stack, argv and environment bounds, auxiliary vector) from the dump;
//! 6. what a fork would have carried: signal handlers, the alternate signal stack,
//!    umask, name, resource limits;
//! 7. then as every restore: the main thread's robust list, `clear_child_tid` and rseq,
//!    the other threads, writable shared file mappings, the fd table and cwd, the
//!    registers and XSAVE area, the signal mask and pending signals.
//!
//! What differs from the dumped process: its pid (and its threads' tids), its parent
//! (whatever started the husk), its `/proc/<pid>/exe` (the husk's binary: changing it
//! needs `CAP_CHECKPOINT_RESTORE`, which sandbox processes lack), its start time and
//! CPU times, and what no dump records (personality, `prctl` flags, seccomp filters,
//! timers): the husk's.

mod layout;

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

pub use layout::{Move, free_gap, special_moves, unmap_ranges};

use super::dump::apply::{heap_extent, in_range, map_vma};
use super::dump::pages::write_pages;
use super::dump::write::vdso_hash;
use super::dump::{Dump, DumpError};
use super::fdtable::{self, StdioPipes};
use super::inject::{Injection, SCRATCH_LEN, SyscallSite, resume_regs};
use super::pidfd::Pidfd;
use super::procfs;
use super::ptrace::{Regs, Tracee, cr_options};
use super::restore::{RestoreOptions, RestoreTimings, Restored};
use super::{CrError, carried, threads};

/// `RSEQ_FLAG_UNREGISTER` (`<linux/rseq.h>`).
const RSEQ_FLAG_UNREGISTER: u64 = 1;

/// Errors of a restore into a husk, naming the husk and the dump.
#[derive(Debug, thiserror::Error)]
pub enum HuskError {
    /// The husk has more than one thread.
    #[error("husk pid {pid} has {threads} threads: a husk must be single-threaded")]
    Threads {
        /// The husk.
        pid: i32,
        /// Its thread count.
        threads: usize,
    },
    /// The husk or the dump has no `[vdso]`.
    #[error("husk pid {pid} or the dump {dump} has no [vdso]")]
    NoVdso {
        /// The husk.
        pid: i32,
        /// The dump's directory.
        dump: String,
    },
    /// The husk's vdso is not the dump's (another kernel).
    #[error(
        "husk pid {pid} has another [vdso] than the dump {dump} ({why}): the dumped \
         program holds pointers into its vdso, restore it on the kernel it ran on"
    )]
    VdsoChanged {
        /// The husk.
        pid: i32,
        /// The dump's directory.
        dump: String,
        /// Size or content.
        why: String,
    },
    /// The dump lacks what a restore into a fresh process needs.
    #[error(
        "the dump {dump} records no {what} (written by an older controller): it can be \
         restored by forking a template of the same program run only"
    )]
    Incomplete {
        /// The dump's directory.
        dump: String,
        /// What is missing.
        what: &'static str,
    },
    /// No room for the scratch page or the vdso's way through.
    #[error("husk pid {pid}: no free address range of {len} bytes")]
    NoRoom {
        /// The husk.
        pid: i32,
        /// Bytes needed.
        len: u64,
    },
}

/// Makes the process `husk` (running or stopped, single-threaded, in the namespaces,
/// root and cgroups the restored process must have, owned by the caller) the process
/// `dump` recorded, and lets it run (see the module's comment). `opts.chroot`,
/// `opts.setsid` and `opts.pipes` apply as for any restore; `opts.cgroup` does not
/// (the caller placed the husk). On error the husk is killed: its memory may be half
/// replaced.
pub fn restore_into_husk(
    husk: Pid,
    dump: &Dump,
    opts: &RestoreOptions,
) -> Result<Restored, CrError> {
    let start = Instant::now();
    let pid = husk.as_raw();
    let pidfd = Pidfd::open(husk)?;
    let threads = procfs::thread_count(pid)?;
    if threads != 1 {
        return Err(HuskError::Threads { pid, threads }.into());
    }
    let (mut tracee, _) = Tracee::seize_stopped(husk, cr_options())?;
    let seized = start.elapsed();
    match make_dumped(&mut tracee, &pidfd, dump, opts) {
        Ok((stdio, new_threads, memory)) => {
            let fixup = start.elapsed().saturating_sub(seized + memory);
            let resuming = Instant::now();
            let state = dump.state();
            let st = &state.status;
            let pending: Vec<i32> = (1..=64)
                .filter(|s| (st.sig_pending | st.shared_pending) & (1u64 << (s - 1)) != 0)
                .collect();
            let resumed = (|| {
                tracee.set_xstate(&state.xstate)?;
                tracee.set_sigmask(st.blocked)?;
                Ok::<_, CrError>(())
            })();
            if let Err(e) = resumed {
                tracee.kill();
                return Err(e);
            }
            for sig in pending.into_iter().chain(tracee.take_deferred_signals()) {
                // Through the pidfd: the husk is ours until it dies.
                let _ = pidfd.send_signal(sig);
            }
            threads::detach_all(new_threads)?;
            tracee.detach(0)?;
            Ok(Restored::new(
                pidfd,
                stdio,
                RestoreTimings {
                    kill: Duration::ZERO,
                    fork: seized,
                    memory,
                    fixup,
                    resume: resuming.elapsed(),
                    total: start.elapsed(),
                },
                // Every mapping is new: no memory shared with any older process.
                0,
            ))
        }
        Err(e) => {
            tracee.kill();
            Err(e)
        }
    }
}

/// Steps 1–7 of the module's comment on the seized husk, up to its registers; returns
/// the controller's stdio ends, the recreated threads (stopped) and the time the
/// memory took.
fn make_dumped(
    tracee: &mut Tracee,
    pidfd: &Pidfd,
    dump: &Dump,
    opts: &RestoreOptions,
) -> Result<(StdioPipes, Vec<Tracee>, Duration), CrError> {
    let pid = tracee.pid().as_raw();
    let m = dump.manifest();
    let state = dump.state();
    let dir = dump.dir().display().to_string();
    let incomplete = |what| HuskError::Incomplete {
        dump: dir.clone(),
        what,
    };
    let handlers = state
        .handlers
        .as_ref()
        .ok_or_else(|| incomplete("signal handlers"))?;
    let mm = m.mm.as_ref().ok_or_else(|| incomplete("memory layout"))?;
    let no_vdso = || HuskError::NoVdso {
        pid,
        dump: dir.clone(),
    };
    let dumped_vdso = m.vdso.ok_or_else(no_vdso)?;
    let husk_status = procfs::status(pid)?;
    let husk_limits = procfs::rlimits(pid)?;
    let maps = procfs::maps(pid)?;
    let vdso = procfs::vdso(&maps).ok_or_else(no_vdso)?;
    let changed = |why: String| HuskError::VdsoChanged {
        pid,
        dump: dir.clone(),
        why,
    };
    if vdso.1 - vdso.0 != dumped_vdso.1 - dumped_vdso.0 {
        return Err(changed(format!(
            "{} bytes, the dump's {}",
            vdso.1 - vdso.0,
            dumped_vdso.1 - dumped_vdso.0
        ))
        .into());
    }
    if let Some(hash) = m.vdso_hash
        && vdso_hash(pid, vdso.0, vdso.1) != Some(hash)
    {
        return Err(changed("its bytes differ".to_owned()).into());
    }
    let site = SyscallSite::find(tracee, Some(vdso))?;
    let mut inj = Injection::begin(tracee, site)?;
    let memory_start = Instant::now();

    // 1. No rseq: the kernel writes the cpu id there on every return to user mode.
    if let Some(rseq) = inj.tracee().rseq()? {
        inj.syscall(
            "rseq",
            libc::SYS_rseq,
            &[
                rseq.addr,
                u64::from(rseq.len),
                RSEQ_FLAG_UNREGISTER,
                u64::from(rseq.signature),
            ],
        )?;
    }

    // 2. Scratch room, clear of the husk, the dump, and where the specials go.
    let specials: Vec<(u64, u64)> = maps
        .iter()
        .filter(|m| layout::moves_with_vdso(&m.name))
        .map(|m| (m.start, m.end))
        .collect();
    let targets = specials
        .iter()
        .map(|&(s, e)| (s + dumped_vdso.0 - vdso.0, e + dumped_vdso.0 - vdso.0));
    let taken: Vec<(u64, u64)> = maps
        .iter()
        .map(|m| (m.start, m.end))
        .chain(m.vmas.iter().map(|v| (v.start, v.end)))
        .chain(targets)
        .collect();
    let scratch = free_gap(taken.clone(), SCRATCH_LEN).ok_or(HuskError::NoRoom {
        pid,
        len: SCRATCH_LEN,
    })?;
    inj.mmap_scratch_at(scratch, SCRATCH_LEN)?;
    if let Some(root) = &opts.chroot {
        super::restore::chroot(&mut inj, scratch, root)?;
    }
    if opts.setsid && procfs::stat(pid)?.session != pid {
        inj.syscall("setsid", libc::SYS_setsid, &[])?;
    }

    // 3. The specials to the dump's place; syscalls follow the vdso.
    let block = specials.iter().map(|s| s.1).max().unwrap_or(0)
        - specials.iter().map(|s| s.0).min().unwrap_or(0);
    let mut taken = taken;
    taken.push((scratch, scratch + SCRATCH_LEN));
    let via = free_gap(taken, block).ok_or(HuskError::NoRoom { pid, len: block })?;
    for mv in special_moves(&specials, vdso.0, dumped_vdso.0, via) {
        inj.syscall(
            "mremap",
            libc::SYS_mremap,
            &[
                mv.from,
                mv.len,
                mv.len,
                (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                mv.to,
            ],
        )?;
        let at = inj.site().0;
        if (mv.from..mv.from + mv.len).contains(&at) {
            inj.set_site(SyscallSite(at - mv.from + mv.to));
        }
    }

    // 4. The husk's memory goes, the dump's comes.
    for (start, end) in unmap_ranges(&procfs::maps(pid)?, (scratch, scratch + SCRATCH_LEN)) {
        inj.syscall("munmap", libc::SYS_munmap, &[start, end - start])?;
    }
    for vma in &m.vmas {
        map_vma(&mut inj, scratch, vma)?;
    }
    let pages = dump.sorted_pages();
    let mut writes = Vec::with_capacity(pages.len());
    for vma in m.vmas.iter().filter(|v| !v.is_shared()) {
        writes.extend(
            in_range(&pages, vma.start, vma.end)
                .iter()
                .filter(|(_, p)| !(p.at.is_none() && vma.is_anonymous())),
        );
    }
    let mem = OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .map_err(|source| DumpError::Memory {
            pid,
            what: "open /proc/<pid>/mem".into(),
            source,
        })?;
    write_pages(pid, &mem, dump, &writes)?;

    // 5. The layout: the heap ends where the dump's does.
    let brk = heap_extent(&m.vmas).map_or(mm.start_brk, |(_, end)| end);
    carried::set_mm_map(&mut inj, mm, brk, scratch)?;
    let memory = memory_start.elapsed();

    // 6. What a fork carries.
    carried::set_handlers(
        &mut inj,
        handlers,
        husk_status.caught | husk_status.ignored,
        scratch,
    )?;
    inj.syscall("umask", libc::SYS_umask, &[u64::from(state.status.umask)])?;
    let mut name = state.comm.as_bytes()[..state.comm.len().min(15)].to_vec();
    name.push(0);
    inj.tracee()
        .write_memory(scratch, &name)
        .map_err(super::inject::InjectError::from)?;
    inj.syscall(
        "prctl(PR_SET_NAME)",
        libc::SYS_prctl,
        &[libc::PR_SET_NAME as u64, scratch],
    )?;
    let had: HashSet<_> = husk_limits
        .iter()
        .map(|l| (l.resource, l.soft, l.hard))
        .collect();
    for limit in state
        .rlimits
        .iter()
        .filter(|l| !had.contains(&(l.resource, l.soft, l.hard)))
    {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&limit.soft.to_ne_bytes());
        raw[8..].copy_from_slice(&limit.hard.to_ne_bytes());
        inj.tracee()
            .write_memory(scratch, &raw)
            .map_err(super::inject::InjectError::from)?;
        inj.syscall(
            "prlimit64",
            libc::SYS_prlimit64,
            &[0, u64::from(limit.resource), scratch, 0],
        )?;
    }

    // 7. As every restore. The husk's own robust list and tid address point into memory
    // that is gone: replaced, or cleared.
    if state.main_thread.robust_list.head == 0 {
        inj.syscall("set_robust_list", libc::SYS_set_robust_list, &[0, 24])?;
    }
    if state.main_thread.tid_address == 0 {
        inj.syscall("set_tid_address", libc::SYS_set_tid_address, &[0])?;
    }
    threads::restore_leader(&mut inj, &state.main_thread)?;
    let site = inj.site();
    let new_threads = threads::recreate(&mut inj, &state.threads, site, scratch)?;
    super::shared::map_again(&mut inj, &state.shared_maps, scratch)?;
    let stdio = fdtable::install(
        &mut inj,
        pidfd,
        &state.fds,
        &state.cwd,
        (scratch, true),
        &opts.pipes,
    )?;
    let regs = Regs::from(&state.regs);
    let st = &state.status;
    let deliverable = (1..=64).any(|s: u64| {
        (st.sig_pending | st.shared_pending) & (1 << (s - 1)) != 0
            && st.blocked & (1 << (s - 1)) == 0
    }) || inj.tracee().has_deferred_signals();
    inj.finish_with(&if deliverable {
        regs
    } else {
        resume_regs(&regs)
    })?;
    Ok((stdio, new_threads, memory))
}
