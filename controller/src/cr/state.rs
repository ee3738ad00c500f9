//! What a checkpoint records about a process besides its memory: explicit, versioned
//! data ([`ProcessState`]), so that the incremental dump that will make templates a
//! cache can serialise it and a restore can be driven from it alone.
//!
//! Fork carries memory, registers of the forking thread, signal handlers and mask,
//! cwd, umask, rlimits, credentials, namespaces and cgroup into the template; the
//! state below is what a restore sets explicitly (registers, XSAVE area, fds, cwd) or
//! what fork does not carry and is only recorded for now (pending signals), plus what
//! the dump needs. A fork carries one thread, the one that called it: the others are
//! recorded one by one ([`ThreadState`]) and recreated by each restore
//! ([`super::threads`]).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::carried::Handlers;
use super::fdtable::FdEntry;
use super::inject::SyscallSite;
use super::procfs::{Rlimit, Status};
use super::ptrace::{Regs, RobustList, RseqConfig, XState};
use super::shared::SharedMapping;

/// Version of [`ProcessState`]'s serialised form. 2 added the threads
/// ([`ProcessState::main_thread`], [`ProcessState::threads`]); a version-1 record reads
/// as a single-threaded process whose per-thread extras were not recorded. 3 added
/// [`ProcessState::shared_maps`] (earlier records had none: they were refused). 4 added
/// [`ProcessState::handlers`] (`None` in earlier records).
pub const STATE_VERSION: u32 = 4;

macro_rules! registers {
    ($($field:ident),* $(,)?) => {
        /// The general-purpose registers of x86_64 (`struct user_regs_struct`), with
        /// names, for serialisation.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
        pub struct Registers {
            $(
                #[allow(missing_docs)]
                pub $field: u64,
            )*
        }

        impl From<&Regs> for Registers {
            fn from(r: &Regs) -> Self {
                Self { $($field: r.$field,)* }
            }
        }

        impl From<&Registers> for Regs {
            fn from(r: &Registers) -> Self {
                Regs { $($field: r.$field,)* }
            }
        }
    };
}

registers!(
    r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax, rip, cs,
    eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs,
);

/// The recorded state of one checkpointed process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessState {
    /// [`STATE_VERSION`] when written.
    pub version: u32,
    /// The pid it had at the checkpoint.
    pub pid: i32,
    /// Its name.
    pub comm: String,
    /// Its registers as the interrupt found them (before the restart fix-up).
    pub regs: Registers,
    /// Its XSAVE area (x87/SSE/AVX registers).
    pub xstate: XState,
    /// The syscall the checkpoint interrupted (restarted on restore), if any.
    pub interrupted_syscall: Option<i64>,
    /// Where injected syscalls run (its vdso).
    pub syscall_site: SyscallSite,
    /// Its fd table, with offsets and flags.
    pub fds: Vec<FdEntry>,
    /// Its working directory.
    pub cwd: PathBuf,
    /// umask, parent pid and signal state (mask, ignored, caught, pending) from
    /// `/proc/<pid>/status`. Pending signals are not restored.
    pub status: Status,
    /// Its resource limits.
    pub rlimits: Vec<Rlimit>,
    /// Its cgroup v2 path, relative to the cgroup2 mount.
    pub cgroup: PathBuf,
    /// What the main thread (the one forked) had that a fork does not carry.
    #[serde(default)]
    pub main_thread: ThreadExtras,
    /// Every other thread, in `/proc/<pid>/task` order.
    #[serde(default)]
    pub threads: Vec<ThreadState>,
    /// Its writable shared file mappings, mapped again by path on restore.
    #[serde(default)]
    pub shared_maps: Vec<SharedMapping>,
    /// Its signal handlers and the main thread's alternate signal stack, which a fork
    /// carries and a restore into a fresh process sets ([`super::husk`]). Recorded when
    /// the template's dump is written (`None` in a template's own state, and in dumps of
    /// older controllers).
    #[serde(default)]
    pub handlers: Option<Handlers>,
}

impl ProcessState {
    /// Whether `other` records the same checkpoint: equal but for
    /// [`ProcessState::handlers`], which a dump adds to its template's state.
    pub fn same_checkpoint(&self, other: &Self) -> bool {
        let strip = |s: &Self| Self {
            handlers: None,
            ..s.clone()
        };
        strip(self) == strip(other)
    }
}

/// A thread's alternate signal stack (`sigaltstack(2)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AltStack {
    /// `ss_sp`.
    pub sp: u64,
    /// `ss_size`.
    pub size: u64,
    /// `ss_flags` that a `sigaltstack` call can set again (`SS_AUTODISARM`).
    pub flags: u32,
}

/// Per-thread state besides registers and signals that neither a fork (for the main
/// thread) nor a `clone` of a thread carries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadExtras {
    /// Its `clear_child_tid` address (`set_tid_address(2)`; glibc's `&pd->tid`, where
    /// `pthread_join` waits and `pthread_kill` reads the thread's tid). 0: none.
    #[serde(default)]
    pub tid_address: u64,
    /// Its robust-futex list.
    #[serde(default)]
    pub robust_list: RobustList,
    /// Its rseq registration.
    #[serde(default)]
    pub rseq: Option<RseqConfig>,
    /// Its alternate signal stack (recorded for threads other than the main one, whose
    /// fork copies it).
    #[serde(default)]
    pub altstack: Option<AltStack>,
}

/// The recorded state of a thread other than the main one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadState {
    /// Its tid at the checkpoint (a restore gives it a new one).
    pub tid: i32,
    /// Its name (`/proc/<pid>/task/<tid>/comm`).
    pub comm: String,
    /// Its registers as the interrupt found them (before the restart fix-up); TLS is
    /// `fs_base`.
    pub regs: Registers,
    /// Its XSAVE area.
    pub xstate: XState,
    /// Its signal mask.
    pub sigmask: u64,
    /// Signals pending for the thread itself (`SigPnd`, plus those that arrived while
    /// it was held); sent to it again with `tgkill` on restore.
    pub sig_pending: u64,
    /// The syscall the checkpoint interrupted, if any.
    pub interrupted_syscall: Option<i64>,
    /// For a thread interrupted in `restart_syscall`: the syscall it restarts, when
    /// recognised (a restore cannot carry the thread's `restart_block`).
    #[serde(default)]
    pub restarted_syscall: Option<i64>,
    /// The rest.
    pub extras: ThreadExtras,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record written before threads were recorded (version 1) reads as a
    /// single-threaded process with no per-thread extras.
    #[test]
    fn a_version_1_record_reads_as_single_threaded() {
        // SAFETY: user_regs_struct is plain integers; all-zero is a valid value.
        let regs: Regs = unsafe { std::mem::zeroed() };
        let state = ProcessState {
            version: STATE_VERSION,
            pid: 7,
            comm: "python3".to_owned(),
            regs: Registers::from(&regs),
            xstate: XState(vec![1, 2, 3]),
            interrupted_syscall: None,
            syscall_site: SyscallSite(0x1000),
            fds: Vec::new(),
            cwd: PathBuf::from("/"),
            status: Status::default(),
            rlimits: Vec::new(),
            cgroup: PathBuf::from("/a"),
            main_thread: ThreadExtras {
                tid_address: 0x10,
                ..ThreadExtras::default()
            },
            threads: Vec::new(),
            shared_maps: Vec::new(),
            handlers: None,
        };
        let mut v1 = serde_json::to_value(&state).unwrap();
        let obj = v1.as_object_mut().unwrap();
        obj.remove("main_thread");
        obj.remove("threads");
        obj.insert("version".to_owned(), serde_json::json!(1));
        let read: ProcessState = serde_json::from_value(v1).unwrap();
        assert_eq!(read.version, 1);
        assert!(read.threads.is_empty());
        assert_eq!(read.main_thread, ThreadExtras::default());
        assert_eq!(read.comm, "python3");
    }
}
