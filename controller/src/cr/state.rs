//! What a checkpoint records about a process besides its memory: explicit, versioned
//! data ([`ProcessState`]), so that the incremental dump that will make templates a
//! cache can serialise it and a restore can be driven from it alone.
//!
//! Fork carries memory, registers of the forking thread, signal handlers and mask,
//! cwd, umask, rlimits, credentials, namespaces and cgroup into the template; the
//! state below is what a restore sets explicitly (registers, XSAVE area, fds, cwd) or
//! what fork does not carry and is only recorded for now (pending signals), plus what
//! the dump needs.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::fdtable::FdEntry;
use super::inject::SyscallSite;
use super::procfs::{Rlimit, Status};
use super::ptrace::{Regs, XState};

/// Version of [`ProcessState`]'s serialised form.
pub const STATE_VERSION: u32 = 1;

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
}
