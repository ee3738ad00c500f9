//! Errors of syscall injection.

use std::io;

use crate::cr::ptrace::{PtraceError, Stop};

/// Errors of syscall injection.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// A ptrace request or wait failed.
    #[error(transparent)]
    Ptrace(#[from] PtraceError),
    /// The tracee has no `[vdso]` mapping.
    #[error("pid {pid} has no [vdso] mapping to run injected syscalls from")]
    NoVdso {
        /// The tracee.
        pid: i32,
    },
    /// The tracee's `[vdso]` holds no `syscall` instruction.
    #[error("no syscall instruction in the [vdso] of pid {pid}")]
    NoSyscallInstruction {
        /// The tracee.
        pid: i32,
    },
    /// The tracee is not a 64-bit x86 process.
    #[error("pid {pid} is not a 64-bit process (cs {cs:#x}); DeltaCR handles x86_64 only")]
    NotX86_64 {
        /// The tracee.
        pid: i32,
        /// Its code segment selector.
        cs: u64,
    },
    /// The injected syscall returned an error.
    #[error("{name} injected into pid {pid} failed")]
    Syscall {
        /// The tracee.
        pid: i32,
        /// The syscall, e.g. `openat`.
        name: &'static str,
        /// The errno it returned.
        #[source]
        source: io::Error,
    },
    /// The tracee ran another syscall than the one injected (or stopped elsewhere).
    #[error("pid {pid} ran syscall {seen} instead of the injected {expected}")]
    WrongEntry {
        /// The tracee.
        pid: i32,
        /// The injected syscall number.
        expected: i64,
        /// What `orig_rax` said when the step stopped.
        seen: i64,
    },
    /// The single-step of an injected syscall stopped neither before nor right after
    /// the `syscall` instruction.
    #[error("pid {pid} stopped at {rip:#x} stepping the syscall instruction at {site:#x}")]
    Strayed {
        /// The tracee.
        pid: i32,
        /// Where it stopped.
        rip: u64,
        /// The `syscall` instruction.
        site: u64,
    },
    /// A batch's data leaves no room in the scratch page for its table.
    #[error("{data} bytes of batch data leave no room for the call table in the scratch page")]
    BatchTooBig {
        /// Bytes of data.
        data: usize,
    },
    /// The loop of a batch faulted.
    #[error("the injected syscall loop faulted in pid {pid}: signal {signal} at {rip:#x}")]
    BatchFault {
        /// The tracee.
        pid: i32,
        /// The signal.
        signal: i32,
        /// Where.
        rip: u64,
    },
    /// A path does not fit in the scratch page.
    #[error("path {path:?} is too long to pass to pid {pid}")]
    PathTooLong {
        /// The tracee.
        pid: i32,
        /// The path.
        path: std::path::PathBuf,
    },
    /// An injected `clone3` succeeded without a `PTRACE_EVENT_CLONE`.
    #[error("clone3 injected into pid {pid} returned {ret} without a clone event")]
    NoForkEvent {
        /// The tracee.
        pid: i32,
        /// What it returned.
        ret: i64,
    },
    /// The new child did not stop in its attach stop first.
    #[error("new child {child} of pid {pid} reported {stop:?} before its attach stop")]
    ChildStop {
        /// The tracee that forked.
        pid: i32,
        /// The child.
        child: i32,
        /// What the child reported.
        stop: Stop,
    },
}
