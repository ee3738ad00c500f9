//! ptrace(2), wrapped once.
//!
//! [`Tracee`] owns one traced task from `PTRACE_SEIZE` (or from its automatic attach as
//! the child of a traced `fork`) to `PTRACE_DETACH`: stopping it, waiting for its stops
//! (decoded into [`Stop`]), its registers and XSAVE area, and its memory. Everything
//! DeltaCR does to another process goes through here; syscall injection on top of it is
//! [`super::inject`].
//!
//! The kernel accepts ptrace requests for a tracee only from the thread that attached
//! it, so a [`Tracee`] is neither `Send` nor `Sync`: the compiler keeps it on its thread.
//! DeltaCR holds a tracee only for the length of one operation and detaches it before
//! returning; what outlives an operation (a template) is a pid and a pidfd, not a
//! `Tracee`.

use std::io::{self, IoSlice, IoSliceMut};
use std::marker::PhantomData;

use nix::sys::ptrace as nix_ptrace;
use nix::sys::uio::{RemoteIoVec, process_vm_readv, process_vm_writev};
use nix::unistd::Pid;

pub use nix::sys::ptrace::Options;
pub use stop::{Stop, WaitReport, decode_status};
pub use task::{RobustList, RseqConfig};
pub use xstate::XState;

use stop::classify;

mod stop;
mod task;
mod xstate;

/// The general-purpose registers, as `PTRACE_GETREGS` returns them.
pub type Regs = libc::user_regs_struct;

/// `NT_X86_XSTATE` (`<elf.h>`): the XSAVE-area register set. libc does not export it.
const NT_X86_XSTATE: usize = 0x202;

/// Room for the largest XSAVE area (AMX tile data makes it about 11 KiB); the kernel
/// reports the real size, which is what [`XState`] keeps.
const XSTATE_BUF: usize = 16 * 1024;

/// The options DeltaCR seizes with: syscall stops marked `SIGTRAP | 0x80`; the
/// children of `fork` and `clone` auto-attached (stopped before they run); and the
/// tracee's seccomp filters suspended while it is traced, so that a filter that
/// forbids (or kills on) `clone3`, `openat`, … does not stop the injected syscalls (it
/// applies again once the task is detached; templates and restored processes inherit
/// it). `PTRACE_O_SUSPEND_SECCOMP` needs `CAP_SYS_ADMIN`; nix does not name it.
pub fn cr_options() -> Options {
    Options::PTRACE_O_TRACESYSGOOD
        | Options::PTRACE_O_TRACEFORK
        | Options::PTRACE_O_TRACECLONE
        | Options::from_bits_retain(libc::PTRACE_O_SUSPEND_SECCOMP)
}

/// Errors of ptrace requests and of waiting for a tracee.
#[derive(Debug, thiserror::Error)]
pub enum PtraceError {
    /// A ptrace request failed.
    #[error("ptrace {request} on pid {pid}")]
    Request {
        /// The request, e.g. `PTRACE_SEIZE`.
        request: &'static str,
        /// The tracee.
        pid: i32,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// `waitpid` failed.
    #[error("waitpid on pid {pid}")]
    Wait {
        /// The tracee.
        pid: i32,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The tracee exited while it was traced.
    #[error("pid {pid} exited with status {status} while traced")]
    Exited {
        /// The tracee.
        pid: i32,
        /// Its exit status.
        status: i32,
    },
    /// The tracee was killed while it was traced.
    #[error("pid {pid} was killed by signal {signal} while traced")]
    Killed {
        /// The tracee.
        pid: i32,
        /// The signal that killed it.
        signal: i32,
    },
    /// The tracee stopped for another reason than the one the caller waited for.
    #[error("pid {pid} reported {stop:?} while DeltaCR waited for {expected}")]
    Unexpected {
        /// The tracee.
        pid: i32,
        /// What it reported.
        stop: Stop,
        /// What was expected.
        expected: &'static str,
    },
    /// Reading or writing the tracee's memory failed or was short.
    #[error("{op} of {len} bytes at {addr:#x} in pid {pid}")]
    Memory {
        /// `process_vm_readv` or `process_vm_writev`.
        op: &'static str,
        /// The tracee.
        pid: i32,
        /// Start address in the tracee.
        addr: u64,
        /// Bytes asked for.
        len: usize,
        /// Why (a short transfer is `UnexpectedEof`).
        #[source]
        source: io::Error,
    },
}

impl PtraceError {
    /// Whether the error says the tracee no longer exists (or is no longer ours).
    pub fn is_gone(&self) -> bool {
        match self {
            Self::Exited { .. } | Self::Killed { .. } => true,
            Self::Request { source, .. } | Self::Wait { source, .. } => {
                source.raw_os_error() == Some(libc::ESRCH)
                    || source.raw_os_error() == Some(libc::ECHILD)
            }
            _ => false,
        }
    }
}

/// How to resume a tracee.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// `PTRACE_CONT`: run until the next signal or event.
    Cont,
    /// `PTRACE_SYSCALL`: run until the next syscall entry or exit (or signal/event).
    Syscall,
    /// `PTRACE_SINGLESTEP`: run one instruction (a `syscall` instruction: the whole
    /// syscall), then stop with a kernel `SIGTRAP` (or earlier at a signal/event).
    Step,
}

/// One traced task, attached until [`Tracee::detach`] (or drop, which detaches).
pub struct Tracee {
    pid: Pid,
    attached: bool,
    /// Signals that arrived (as signal-delivery-stops) while DeltaCR held the tracee;
    /// they were suppressed and are given back by the owner of the tracee.
    deferred: Vec<i32>,
    /// Dropping it kills it instead of detaching: a fork child that has not been given
    /// its registers would run from the middle of the vdso.
    kill_on_drop: bool,
    /// The ptrace options in force (inherited by auto-attached children).
    options: Options,
    /// ptrace requests are accepted only from the attaching thread.
    _same_thread: PhantomData<*const ()>,
}

impl std::fmt::Debug for Tracee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracee")
            .field("pid", &self.pid)
            .field("attached", &self.attached)
            .field("deferred", &self.deferred)
            .field("kill_on_drop", &self.kill_on_drop)
            .finish()
    }
}

fn request_error(request: &'static str, pid: Pid) -> impl FnOnce(nix::Error) -> PtraceError {
    move |errno| PtraceError::Request {
        request,
        pid: pid.as_raw(),
        source: io::Error::from(errno),
    }
}

impl Tracee {
    /// `PTRACE_SEIZE`s `pid` (a running or stopped task) with `options`; the task keeps
    /// running until [`Tracee::interrupt`].
    pub fn seize(pid: Pid, options: Options) -> Result<Self, PtraceError> {
        nix_ptrace::seize(pid, options).map_err(request_error("PTRACE_SEIZE", pid))?;
        Ok(Self::attached(pid, options))
    }

    /// Seizes `pid` and waits until it is in a ptrace-stop: [`Stop::Group`] if it was
    /// (or got) group-stopped, else [`Stop::Interrupt`]. Signals that arrive meanwhile
    /// are deferred.
    pub fn seize_stopped(pid: Pid, options: Options) -> Result<(Self, Stop), PtraceError> {
        let mut tracee = Self::seize(pid, options)?;
        tracee.interrupt()?;
        let stop = tracee.wait_for_stop()?;
        Ok((tracee, stop))
    }

    /// The tracee of a task that is already attached to this thread: the child of a
    /// traced `fork`, reported by [`Stop::NewChild`], with the options of `parent`
    /// (`PTRACE_O_EXITKILL` included). It is killed if dropped before
    /// [`Tracee::detach`].
    pub(crate) fn auto_attached(pid: Pid, parent: &Tracee) -> Self {
        let mut tracee = Self::attached(pid, parent.options);
        tracee.kill_on_drop = true;
        tracee
    }

    fn attached(pid: Pid, options: Options) -> Self {
        Self {
            pid,
            attached: true,
            deferred: Vec::new(),
            kill_on_drop: false,
            options,
            _same_thread: PhantomData,
        }
    }

    /// The traced task.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Sets or clears `PTRACE_O_EXITKILL`: whether the kernel SIGKILLs the tracee if
    /// this process dies. DeltaCR sets it while a tracee's registers are not its own
    /// (an injection), so that a controller crash never detaches a task that would run
    /// from the middle of the vdso; children born meanwhile inherit it.
    pub fn set_exit_kill(&mut self, on: bool) -> Result<(), PtraceError> {
        let options = if on {
            self.options | Options::PTRACE_O_EXITKILL
        } else {
            self.options - Options::PTRACE_O_EXITKILL
        };
        if options != self.options {
            nix_ptrace::setoptions(self.pid, options)
                .map_err(request_error("PTRACE_SETOPTIONS", self.pid))?;
            self.options = options;
        }
        Ok(())
    }

    /// `PTRACE_INTERRUPT`: the tracee stops at once (a blocking syscall is interrupted
    /// and will be restarted) and reports [`Stop::Interrupt`] or [`Stop::Group`].
    pub fn interrupt(&self) -> Result<(), PtraceError> {
        nix_ptrace::interrupt(self.pid).map_err(request_error("PTRACE_INTERRUPT", self.pid))
    }

    /// Waits for the tracee's next report. An exit or death is an error.
    pub fn wait(&mut self) -> Result<Stop, PtraceError> {
        let pid = self.pid;
        let mut status: libc::c_int = 0;
        loop {
            // SAFETY: `status` is a valid, writable c_int for the whole call; waitpid has
            // no other memory effects.
            let ret = unsafe { libc::waitpid(pid.as_raw(), &mut status, libc::__WALL) };
            if ret == pid.as_raw() {
                break;
            }
            let source = io::Error::last_os_error();
            if ret < 0 && source.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(PtraceError::Wait {
                pid: pid.as_raw(),
                source,
            });
        }
        match decode_status(status) {
            WaitReport::Exited(status) => {
                self.attached = false;
                Err(PtraceError::Exited {
                    pid: pid.as_raw(),
                    status,
                })
            }
            WaitReport::Killed(signal) => {
                self.attached = false;
                Err(PtraceError::Killed {
                    pid: pid.as_raw(),
                    signal,
                })
            }
            WaitReport::Continued => self.wait(),
            WaitReport::Stopped { signal, event } => match classify(signal, event) {
                Stop::NewChild { event, .. } => {
                    let msg = self.event_msg()?;
                    let child = i32::try_from(msg).map_err(|_| PtraceError::Request {
                        request: "PTRACE_GETEVENTMSG",
                        pid: pid.as_raw(),
                        source: io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("child pid {msg} out of range"),
                        ),
                    })?;
                    Ok(Stop::NewChild {
                        event,
                        child: Pid::from_raw(child),
                    })
                }
                stop => Ok(stop),
            },
        }
    }

    /// Waits until the tracee is in an interrupt or group-stop, deferring the signals
    /// that arrive first (see [`Tracee::take_deferred_signals`]).
    pub fn wait_for_stop(&mut self) -> Result<Stop, PtraceError> {
        loop {
            match self.wait()? {
                stop @ (Stop::Interrupt | Stop::Group(_)) => return Ok(stop),
                Stop::Signal(sig) => {
                    self.deferred.push(sig);
                    self.resume(Resume::Cont, 0)?;
                }
                // A stale event stop from before the interrupt: let the interrupt trap come.
                _ => self.resume(Resume::Cont, 0)?,
            }
        }
    }

    /// Resumes the tracee, delivering `signal` (0 for none).
    pub fn resume(&self, how: Resume, signal: i32) -> Result<(), PtraceError> {
        let (request, name) = match how {
            Resume::Cont => (libc::PTRACE_CONT, "PTRACE_CONT"),
            Resume::Syscall => (libc::PTRACE_SYSCALL, "PTRACE_SYSCALL"),
            Resume::Step => (libc::PTRACE_SINGLESTEP, "PTRACE_SINGLESTEP"),
        };
        // The signal is a plain integer (real-time signals included), which nix's
        // `Signal` enum cannot carry: raw request.
        let data = usize::try_from(signal).unwrap_or(0);
        // SAFETY: PTRACE_CONT, PTRACE_SYSCALL and PTRACE_SINGLESTEP read no memory of ours: addr is ignored
        // and data is a signal number passed by value.
        let ret = unsafe {
            libc::ptrace(
                request,
                self.pid.as_raw(),
                std::ptr::null_mut::<libc::c_void>(),
                data as *mut libc::c_void,
            )
        };
        if ret < 0 {
            return Err(PtraceError::Request {
                request: name,
                pid: self.pid.as_raw(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The general-purpose registers.
    pub fn regs(&self) -> Result<Regs, PtraceError> {
        nix_ptrace::getregs(self.pid).map_err(request_error("PTRACE_GETREGS", self.pid))
    }

    /// Sets the general-purpose registers.
    pub fn set_regs(&self, regs: &Regs) -> Result<(), PtraceError> {
        nix_ptrace::setregs(self.pid, *regs).map_err(request_error("PTRACE_SETREGS", self.pid))
    }

    /// The XSAVE area (FPU, SSE, AVX, … registers).
    pub fn xstate(&self) -> Result<XState, PtraceError> {
        let mut buf = vec![0u8; XSTATE_BUF];
        let len = self.xstate_regset(
            libc::PTRACE_GETREGSET,
            "PTRACE_GETREGSET NT_X86_XSTATE",
            &mut buf,
        )?;
        buf.truncate(len);
        Ok(XState(buf))
    }

    /// Sets the XSAVE area; `xstate` must be a whole area from [`Tracee::xstate`] on
    /// this machine (the kernel checks its size and header).
    pub fn set_xstate(&self, xstate: &XState) -> Result<(), PtraceError> {
        let mut buf = xstate.0.clone();
        self.xstate_regset(
            libc::PTRACE_SETREGSET,
            "PTRACE_SETREGSET NT_X86_XSTATE",
            &mut buf,
        )
        .map(drop)
    }

    /// `PTRACE_GETREGSET` / `PTRACE_SETREGSET` of `NT_X86_XSTATE` over `buf`; returns the
    /// length the kernel left in the iovec (the area's size for a get).
    fn xstate_regset(
        &self,
        request: libc::c_uint,
        name: &'static str,
        buf: &mut [u8],
    ) -> Result<usize, PtraceError> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: the kernel reads or writes at most `iov.iov_len` bytes at
        // `iov.iov_base`, which is `buf`'s allocation of that length, and may update
        // `iov.iov_len`; both live until the call returns.
        let ret = unsafe {
            libc::ptrace(
                request,
                self.pid.as_raw(),
                NT_X86_XSTATE as *mut libc::c_void,
                (&raw mut iov).cast::<libc::c_void>(),
            )
        };
        if ret < 0 {
            return Err(PtraceError::Request {
                request: name,
                pid: self.pid.as_raw(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(iov.iov_len)
    }

    /// `PTRACE_GETSIGINFO`'s `si_code` for the signal of the current
    /// signal-delivery-stop: positive when the kernel raised it (a trap), zero or
    /// negative when a process sent it (`kill`, `tgkill`, `sigqueue`).
    pub fn signal_code(&self) -> Result<i32, PtraceError> {
        let info = nix_ptrace::getsiginfo(self.pid)
            .map_err(request_error("PTRACE_GETSIGINFO", self.pid))?;
        Ok(info.si_code)
    }

    /// `PTRACE_GETEVENTMSG`: after a fork event, the child's pid.
    pub fn event_msg(&self) -> Result<u64, PtraceError> {
        let msg = nix_ptrace::getevent(self.pid)
            .map_err(request_error("PTRACE_GETEVENTMSG", self.pid))?;
        // The kernel stores an unsigned long; nix hands it back as c_long.
        Ok(msg as u64)
    }

    /// Reads `buf.len()` bytes of the tracee's memory at `addr`.
    pub fn read_memory(&self, addr: u64, buf: &mut [u8]) -> Result<(), PtraceError> {
        let len = buf.len();
        self.vm_io("process_vm_readv", addr, len, |remote| {
            process_vm_readv(self.pid, &mut [IoSliceMut::new(buf)], remote)
        })
    }

    /// Writes `data` into the tracee's memory at `addr` (writable pages only).
    pub fn write_memory(&self, addr: u64, data: &[u8]) -> Result<(), PtraceError> {
        self.vm_io("process_vm_writev", addr, data.len(), |remote| {
            process_vm_writev(self.pid, &[IoSlice::new(data)], remote)
        })
    }

    /// One `process_vm_readv`/`writev` (`op`, done by `transfer`) of `len` bytes at `addr`;
    /// a short transfer (an unmapped page on the way) is an error.
    fn vm_io(
        &self,
        op: &'static str,
        addr: u64,
        len: usize,
        transfer: impl FnOnce(&[RemoteIoVec]) -> nix::Result<usize>,
    ) -> Result<(), PtraceError> {
        let err = |source| PtraceError::Memory {
            op,
            pid: self.pid.as_raw(),
            addr,
            len,
            source,
        };
        let remote = [RemoteIoVec {
            base: usize::try_from(addr).map_err(|_| err(io::ErrorKind::InvalidInput.into()))?,
            len,
        }];
        let done = transfer(&remote).map_err(|e| err(e.into()))?;
        if done != len {
            return Err(err(io::ErrorKind::UnexpectedEof.into()));
        }
        Ok(())
    }

    /// Records a signal the tracee received while held, to be given back later.
    pub fn defer_signal(&mut self, signal: i32) {
        self.deferred.push(signal);
    }

    /// Whether signals were suppressed while the tracee was held.
    pub fn has_deferred_signals(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// The signals suppressed while the tracee was held, oldest first.
    pub fn take_deferred_signals(&mut self) -> Vec<i32> {
        std::mem::take(&mut self.deferred)
    }

    /// `PTRACE_DETACH` from a ptrace-stop, delivering `signal` (0 for none) if the tracee
    /// is in a signal-delivery-stop. A task in group-stop when detached stays stopped.
    pub fn detach(mut self, signal: i32) -> Result<(), PtraceError> {
        self.attached = false;
        raw_detach(self.pid, signal).map_err(|source| PtraceError::Request {
            request: "PTRACE_DETACH",
            pid: self.pid.as_raw(),
            source,
        })
    }

    /// SIGKILLs the tracee and collects its death report, so that neither a traced zombie
    /// nor a pending report is left behind.
    pub fn kill(mut self) {
        self.kill_in_place();
    }

    fn kill_in_place(&mut self) {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        unsafe { libc::kill(self.pid.as_raw(), libc::SIGKILL) };
        // Reports already queued (stops) come first; the death report ends the loop
        // (`wait` clears `attached` on it) and so does an error.
        while self.attached {
            if self.wait().is_err() {
                break;
            }
        }
        self.attached = false;
    }
}

fn raw_detach(pid: Pid, signal: i32) -> Result<(), io::Error> {
    let data = usize::try_from(signal).unwrap_or(0);
    // SAFETY: PTRACE_DETACH reads no memory of ours: addr is ignored and data is a
    // signal number passed by value.
    let ret = unsafe {
        libc::ptrace(
            libc::PTRACE_DETACH,
            pid.as_raw(),
            std::ptr::null_mut::<libc::c_void>(),
            data as *mut libc::c_void,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Tracee {
    fn drop(&mut self) {
        if self.attached && self.kill_on_drop {
            self.kill_in_place();
        } else if self.attached {
            // Best effort: fails with ESRCH unless the tracee is in a ptrace-stop, which is
            // where every DeltaCR operation leaves the tracees it has not detached.
            let _ = raw_detach(self.pid, 0);
        }
    }
}
