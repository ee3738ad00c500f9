//! Per-thread state that a fork or a `clone` of a thread does not carry, read and set
//! through ptrace (and `get_robust_list(2)`, which takes the same ptrace access
//! check): the signal mask, the rseq registration, the robust-futex list head.

use std::io;

use serde::{Deserialize, Serialize};

use super::{Options, PtraceError, Tracee, request_error};

/// `struct ptrace_rseq_configuration` (`<linux/ptrace.h>`).
#[repr(C)]
#[derive(Default)]
struct RawRseqConfig {
    rseq_abi_pointer: u64,
    rseq_abi_size: u32,
    signature: u32,
    flags: u32,
    pad: u32,
}

/// A thread's rseq registration (`rseq(2)`): what to pass to `rseq` to register it
/// again in a thread that has none (a `clone` with `CLONE_VM` starts without one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RseqConfig {
    /// Address of the thread's `struct rseq`.
    pub addr: u64,
    /// Its registered length.
    pub len: u32,
    /// The abort signature.
    pub signature: u32,
}

/// A thread's robust-futex list head (`set_robust_list(2)`); glibc registers
/// `&pd->robust_head` in every thread, and a fork child starts without one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RobustList {
    /// The head's address (0: none).
    pub head: u64,
    /// Its length.
    pub len: u64,
}

impl Tracee {
    /// Replaces the ptrace options (a task seized without fork tracing gets it once
    /// every thread is stopped and cannot create tasks any more).
    pub fn set_options(&mut self, options: Options) -> Result<(), PtraceError> {
        nix::sys::ptrace::setoptions(self.pid, options)
            .map_err(request_error("PTRACE_SETOPTIONS", self.pid))?;
        self.options = options;
        Ok(())
    }

    /// The options in force.
    pub fn options(&self) -> Options {
        self.options
    }

    /// `PTRACE_GETSIGMASK`: the thread's blocked signals (bit `n - 1` for signal `n`).
    pub fn sigmask(&self) -> Result<u64, PtraceError> {
        let mut mask: u64 = 0;
        // SAFETY: the kernel writes `addr` (8) bytes, one kernel sigset_t, at `data`,
        // which points to `mask`, a u64 that lives across the call.
        let ret = unsafe {
            libc::ptrace(
                libc::PTRACE_GETSIGMASK,
                self.pid.as_raw(),
                std::mem::size_of::<u64>() as *mut libc::c_void,
                (&raw mut mask).cast::<libc::c_void>(),
            )
        };
        self.check(ret, "PTRACE_GETSIGMASK")?;
        Ok(mask)
    }

    /// `PTRACE_SETSIGMASK`: sets the thread's blocked signals (the kernel never blocks
    /// `SIGKILL` or `SIGSTOP`, whatever the mask says).
    pub fn set_sigmask(&self, mask: u64) -> Result<(), PtraceError> {
        let mut mask = mask;
        // SAFETY: the kernel reads `addr` (8) bytes at `data`, which points to `mask`,
        // a u64 that lives across the call.
        let ret = unsafe {
            libc::ptrace(
                libc::PTRACE_SETSIGMASK,
                self.pid.as_raw(),
                std::mem::size_of::<u64>() as *mut libc::c_void,
                (&raw mut mask).cast::<libc::c_void>(),
            )
        };
        self.check(ret, "PTRACE_SETSIGMASK")
    }

    /// `PTRACE_GET_RSEQ_CONFIGURATION`: the thread's rseq registration, if any.
    pub fn rseq(&self) -> Result<Option<RseqConfig>, PtraceError> {
        let mut raw = RawRseqConfig::default();
        // SAFETY: the kernel writes at most `addr` bytes (the struct's size) at `data`,
        // which points to `raw`, a repr(C) struct of that size living across the call.
        let ret = unsafe {
            libc::ptrace(
                libc::PTRACE_GET_RSEQ_CONFIGURATION,
                self.pid.as_raw(),
                std::mem::size_of::<RawRseqConfig>() as *mut libc::c_void,
                (&raw mut raw).cast::<libc::c_void>(),
            )
        };
        self.check(ret, "PTRACE_GET_RSEQ_CONFIGURATION")?;
        Ok((raw.rseq_abi_pointer != 0).then_some(RseqConfig {
            addr: raw.rseq_abi_pointer,
            len: raw.rseq_abi_size,
            signature: raw.signature,
        }))
    }

    /// `get_robust_list(2)` of the thread.
    pub fn robust_list(&self) -> Result<RobustList, PtraceError> {
        let mut head: u64 = 0;
        let mut len: libc::size_t = 0;
        // SAFETY: the kernel writes one pointer at the second argument and one size_t at
        // the third, `head` and `len`, both living across the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_get_robust_list,
                self.pid.as_raw(),
                &raw mut head,
                &raw mut len,
            )
        };
        if ret < 0 {
            return Err(PtraceError::Request {
                request: "get_robust_list",
                pid: self.pid.as_raw(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(RobustList {
            head,
            len: len as u64,
        })
    }

    fn check(&self, ret: libc::c_long, request: &'static str) -> Result<(), PtraceError> {
        if ret < 0 {
            return Err(PtraceError::Request {
                request,
                pid: self.pid.as_raw(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}
