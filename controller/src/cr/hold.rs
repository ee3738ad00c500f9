//! Holding a new template: steps 1 to 3 of [`super::template`]'s list — one batch of
//! injected calls (handlers recorded, root, shared-mapping placeholders, empty fd table,
//! own session), the checkpoint's registers and XSAVE area, group-stop, frozen cgroup.

use std::path::Path;

use super::CrError;
use super::freezer::TemplateCgroup;
use super::inject::{Batch, Injection, SyscallSite, resume_regs};
use super::ptrace::{Resume, Stop, Tracee};
use super::shared::SharedMapping;

/// Turns the fresh fork `child`, born in `cgroup`, into a template: its signal
/// handlers recorded (returned), empty fd table, own session, the checkpoint's
/// registers, group-stop, frozen cgroup; with `root` (a directory), first a `chroot`
/// there; its writable shared file mappings `shared`
/// replaced by placeholders ([`super::shared`]). `scratch` is its scratch page. Leaves
/// it in a ptrace-stop.
#[allow(clippy::too_many_arguments)]
pub(super) fn hold(
    child: &mut Tracee,
    site: SyscallSite,
    regs: &libc::user_regs_struct,
    xstate: &super::ptrace::XState,
    cgroup: &TemplateCgroup,
    scratch: u64,
    root: Option<&Path>,
    shared: &[SharedMapping],
) -> Result<super::carried::Handlers, CrError> {
    let handlers = {
        let pid = child.pid().as_raw();
        let mut inj = Injection::begin(child, site)?;
        // A fork carries the process's dispositions; a restore into a fresh process
        // needs them. Recorded here, before the checkpoint is acknowledged: recorded
        // later (by the dump), the template would be thawed under ptrace with
        // PTRACE_O_EXITKILL after the answer, and a controller killed meanwhile would
        // take an acknowledged node's template with it (sandbox_restart's
        // revived_sessions_outlive_the_page_cache_of_dead_views saw it about once in
        // ten runs). All of it is one batch: one stop instead of one per syscall
        // (~10 for python, ~20 for bash).
        let mut batch = Batch::new(scratch);
        let slots = super::carried::queue_handlers(&mut batch, pid)?;
        if let Some(root) = root {
            super::restore::queue_chroot(&mut batch, pid, root)?;
        }
        super::shared::queue_unmap(&mut batch, shared);
        batch.call(
            "close_range",
            libc::SYS_close_range,
            &[0, u64::from(u32::MAX), 0],
        );
        batch.call("setsid", libc::SYS_setsid, &[]);
        let (_, data) = inj.run_batch(&batch)?;
        let handlers = slots.read(&batch, &data);
        inj.finish_with(&resume_regs(regs))?;
        handlers
    };
    child.set_xstate(xstate)?;

    group_stop(child)?;
    cgroup.freeze()?;
    // Signals to a template are not part of the checkpoint.
    child.take_deferred_signals();
    Ok(handlers)
}

/// Puts the tracee (in a ptrace-stop) in group-stop and leaves it in the group-stop
/// report. `SIGSTOP` is pending from the `kill()` on, so every resume below only runs
/// the kernel's signal loop, which reports a signal or a stop before any return to
/// user mode.
pub(super) fn group_stop(tracee: &mut Tracee) -> Result<(), CrError> {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(tracee.pid().as_raw(), libc::SIGSTOP) };
    tracee.resume(Resume::Cont, 0)?;
    loop {
        match tracee.wait()? {
            Stop::Signal(libc::SIGSTOP) => tracee.resume(Resume::Cont, libc::SIGSTOP)?,
            Stop::Group(_) => return Ok(()),
            // Another signal sent to the template, or a stale trap: not the template's
            // business; SIGSTOP is still pending and comes next.
            Stop::Signal(_) | Stop::Interrupt => tracee.resume(Resume::Cont, 0)?,
            stop => {
                return Err(CrError::TemplateStop {
                    pid: tracee.pid().as_raw(),
                    stop,
                });
            }
        }
    }
}
