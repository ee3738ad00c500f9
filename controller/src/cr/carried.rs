//! What a fork carries from a template and a restore into a fresh process
//! ([`super::husk`]) must set: signal handlers and the main thread's alternate signal
//! stack ([`Handlers`], recorded by injection into the new template as it is held, in
//! the same batch as the rest of its hold, into its [`ProcessState`]; by the dump, one
//! call at a time, for a template an older daemon made without them), and the memory
//! layout fields of `mm_struct`
//! ([`MmLayout`]: code, data, heap, stack, argv/environ bounds, the auxiliary vector;
//! read from `/proc` when a dump is written).
//!
//! [`ProcessState`]: super::ProcessState

use serde::{Deserialize, Serialize};

use super::inject::{Batch, InjectError, Injection};
use super::procfs::{self, ProcError};
use super::state::AltStack;
use super::threads::{decode_altstack, encode_altstack};
use super::{CrError, Template};

/// `struct kernel_sigaction` on x86_64: handler, flags, restorer, mask.
const SIGACTION_LEN: usize = 32;
/// `stack_t` on x86_64.
const ALTSTACK_LEN: usize = 24;
/// Where [`set_handlers`] writes each `sigaction` and the `stack_t` it sets, in the
/// fresh process's scratch page.
const AT_SIGACTION: u64 = 0;
const AT_ALTSTACK: u64 = 64;
/// `PR_SET_MM` / `PR_SET_MM_MAP` (`<linux/prctl.h>`).
const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;
/// `sizeof(struct prctl_mm_map)`.
const MM_MAP_LEN: usize = 104;
/// Where the map and the auxiliary vector go in a scratch page.
const AT_MM_MAP: u64 = 0;
const AT_AUXV: u64 = 128;
/// The most auxv bytes the kernel keeps (`sizeof(mm->saved_auxv)` is well below).
const MAX_AUXV: usize = 1024;

/// One signal's disposition (`struct kernel_sigaction`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAction {
    /// The signal.
    pub signal: i32,
    /// `sa_handler` (`SIG_IGN` is 1).
    pub handler: u64,
    /// `sa_flags`.
    pub flags: u64,
    /// `sa_restorer`.
    pub restorer: u64,
    /// `sa_mask`.
    pub mask: u64,
}

impl SigAction {
    fn decode(signal: i32, raw: &[u8]) -> Self {
        let at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[i * 8..i * 8 + 8]);
            u64::from_ne_bytes(b)
        };
        Self {
            signal,
            handler: at(0),
            flags: at(1),
            restorer: at(2),
            mask: at(3),
        }
    }

    fn encode(&self) -> [u8; SIGACTION_LEN] {
        let mut out = [0u8; SIGACTION_LEN];
        for (i, v) in [self.handler, self.flags, self.restorer, self.mask]
            .into_iter()
            .enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
        }
        out
    }
}

/// The memory layout fields of a process's `mm_struct`, as `/proc/<pid>/stat` and
/// `/proc/<pid>/auxv` show them: what `prctl(PR_SET_MM_MAP)` sets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmLayout {
    /// `start_code`.
    pub start_code: u64,
    /// `end_code`.
    pub end_code: u64,
    /// `start_data`.
    pub start_data: u64,
    /// `end_data`.
    pub end_data: u64,
    /// `start_brk`: where the heap begins.
    pub start_brk: u64,
    /// `start_stack`.
    pub start_stack: u64,
    /// `arg_start` (`/proc/<pid>/cmdline` reads the memory from here to `arg_end`).
    pub arg_start: u64,
    /// `arg_end`.
    pub arg_end: u64,
    /// `env_start`.
    pub env_start: u64,
    /// `env_end`.
    pub env_end: u64,
    /// The auxiliary vector, raw (`/proc/<pid>/auxv`).
    pub auxv: Vec<u8>,
}

/// Parses the layout fields of `/proc/<pid>/stat` (26-28 and 45-51; `comm` may hold
/// spaces and parentheses: the fields start after the last `)`).
pub fn parse_mm_layout(stat: &str) -> Option<MmLayout> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3.
    let f = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(MmLayout {
        start_code: f(26)?,
        end_code: f(27)?,
        start_stack: f(28)?,
        start_data: f(45)?,
        end_data: f(46)?,
        start_brk: f(47)?,
        arg_start: f(48)?,
        arg_end: f(49)?,
        env_start: f(50)?,
        env_end: f(51)?,
        auxv: Vec::new(),
    })
}

/// The layout of process `pid` (the reader needs ptrace access to it: the kernel shows
/// zeros otherwise).
pub fn mm_layout(pid: i32) -> Result<MmLayout, ProcError> {
    let path = std::path::PathBuf::from(format!("/proc/{pid}/stat"));
    let text = std::fs::read_to_string(&path).map_err(|source| ProcError::Read {
        path: path.clone(),
        source,
    })?;
    let mut layout = parse_mm_layout(&text).ok_or_else(|| ProcError::Parse {
        path,
        what: "memory layout fields".to_owned(),
    })?;
    let auxv = std::path::PathBuf::from(format!("/proc/{pid}/auxv"));
    layout.auxv = std::fs::read(&auxv).map_err(|source| ProcError::Read { path: auxv, source })?;
    layout.auxv.truncate(MAX_AUXV);
    Ok(layout)
}

/// A process's signal handlers and its main thread's alternate signal stack: what a
/// fork carries from the template and a restore into a fresh process must set. Recorded
/// when the template is made ([`record_handlers`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handlers {
    /// The disposition of every signal that was caught or ignored (the others are
    /// `SIG_DFL`).
    pub actions: Vec<SigAction>,
    /// The main thread's alternate signal stack.
    pub altstack: Option<AltStack>,
}

/// Signals `1..=64` set in a `SigCgt`-style mask, except those no handler can be set
/// for.
fn signals_in(mask: u64) -> impl Iterator<Item = i32> {
    (1..=64)
        .filter(move |s| mask & (1u64 << (s - 1)) != 0)
        .filter(|&s| s != libc::SIGKILL && s != libc::SIGSTOP)
}

impl Template {
    /// Records the template's [`Handlers`] (a fork's dispositions are its process's):
    /// the template is thawed and under ptrace for a few injected syscalls, as for a
    /// restore (one at a time with restores). A checkpoint records them while it holds
    /// the new template; a dump does it only for a template recorded without them (by
    /// an older daemon), ~30 µs per syscall here: 0.1–0.3 ms for a python or bash
    /// session.
    pub fn record_handlers(&self) -> Result<Handlers, CrError> {
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let batched = self.scratch_exec;
        self.injected(|inj, scratch| record_handlers(inj, (scratch, batched)))
    }
}

/// Records the [`Handlers`] of the stopped tracee of `inj` (a template, whose
/// dispositions are its process's) by injected `rt_sigaction` of each signal it catches
/// or ignores and `sigaltstack`; `scratch` is a writable page of it, executable if
/// `batched` (else the calls run one at a time).
pub fn record_handlers(
    inj: &mut Injection<'_>,
    (scratch, batched): (u64, bool),
) -> Result<Handlers, CrError> {
    let mut batch = Batch::new(scratch);
    let slots = queue_handlers(&mut batch, inj.tracee().pid().as_raw())?;
    let (_, data) = inj.run_calls(&batch, batched).map_err(InjectError::from)?;
    Ok(slots.read(&batch, &data))
}

/// Where the calls [`queue_handlers`] adds leave the dispositions.
pub struct HandlerSlots {
    actions: Vec<(i32, u64)>,
    altstack: u64,
}

/// Adds to `batch` the calls that record the [`Handlers`] of process `pid` (stopped):
/// `rt_sigaction` of each signal it catches or ignores (`/proc/<pid>/status`), and
/// `sigaltstack`.
pub fn queue_handlers(batch: &mut Batch, pid: i32) -> Result<HandlerSlots, CrError> {
    let st = procfs::status(pid)?;
    let actions = signals_in(st.caught | st.ignored)
        .map(|signal| {
            let out = batch.space(SIGACTION_LEN);
            batch.call(
                "rt_sigaction",
                libc::SYS_rt_sigaction,
                &[signal as u64, 0, out, 8],
            );
            (signal, out)
        })
        .collect();
    let altstack = batch.space(ALTSTACK_LEN);
    batch.call("sigaltstack", libc::SYS_sigaltstack, &[0, altstack]);
    Ok(HandlerSlots { actions, altstack })
}

impl HandlerSlots {
    /// The handlers, from `data`, the data area of `batch` once its calls ran.
    pub fn read(&self, batch: &Batch, data: &[u8]) -> Handlers {
        let at = |addr: u64, len: usize| &data[batch.offset(addr)..][..len];
        Handlers {
            actions: self
                .actions
                .iter()
                .map(|&(signal, out)| SigAction::decode(signal, at(out, SIGACTION_LEN)))
                .collect(),
            altstack: decode_altstack(at(self.altstack, ALTSTACK_LEN)),
        }
    }
}

/// Sets `handlers` in the stopped tracee of `inj` (a fresh process; `scratch` is a
/// writable page of it): every signal's disposition (those `husk_handled` has that
/// `handlers` lacks go back to `SIG_DFL`) and the alternate signal stack.
pub fn set_handlers(
    inj: &mut Injection<'_>,
    handlers: &Handlers,
    husk_handled: u64,
    scratch: u64,
) -> Result<(), CrError> {
    let mut dfl = husk_handled;
    for action in &handlers.actions {
        dfl &= !(1u64 << (action.signal - 1));
        set_sigaction(inj, action, scratch)?;
    }
    for signal in signals_in(dfl) {
        let action = SigAction {
            signal,
            handler: 0,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        set_sigaction(inj, &action, scratch)?;
    }
    let stack = handlers.altstack.map_or_else(
        || {
            let mut raw = [0u8; 24];
            raw[8..12].copy_from_slice(&2u32.to_ne_bytes()); // SS_DISABLE
            raw
        },
        |alt| encode_altstack(&alt),
    );
    inj.tracee()
        .write_memory(scratch + AT_ALTSTACK, &stack)
        .map_err(InjectError::from)?;
    inj.syscall(
        "sigaltstack",
        libc::SYS_sigaltstack,
        &[scratch + AT_ALTSTACK, 0],
    )?;
    Ok(())
}

fn set_sigaction(inj: &mut Injection<'_>, action: &SigAction, scratch: u64) -> Result<(), CrError> {
    inj.tracee()
        .write_memory(scratch + AT_SIGACTION, &action.encode())
        .map_err(InjectError::from)?;
    inj.syscall(
        "rt_sigaction",
        libc::SYS_rt_sigaction,
        &[action.signal as u64, scratch + AT_SIGACTION, 0, 8],
    )?;
    Ok(())
}

/// `struct prctl_mm_map` for `mm`, with the auxiliary vector at `auxv` and no exe file.
pub fn encode_mm_map(mm: &MmLayout, brk: u64, auxv: u64) -> [u8; MM_MAP_LEN] {
    let mut out = [0u8; MM_MAP_LEN];
    let fields = [
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        brk.max(mm.start_brk),
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
        auxv,
    ];
    for (i, v) in fields.into_iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
    }
    let auxv_len = u32::try_from(mm.auxv.len()).unwrap_or(0);
    out[96..100].copy_from_slice(&auxv_len.to_ne_bytes());
    // exe_fd -1: the exe link is left alone (changing it needs CAP_CHECKPOINT_RESTORE).
    out[100..104].copy_from_slice(&u32::MAX.to_ne_bytes());
    out
}

/// Sets the memory layout fields of the stopped tracee of `inj` to `mm` with
/// `prctl(PR_SET_MM_MAP)` (which needs no capability without an exe file), the heap
/// ending at `brk`; `scratch` is a writable page of it.
pub fn set_mm_map(
    inj: &mut Injection<'_>,
    mm: &MmLayout,
    brk: u64,
    scratch: u64,
) -> Result<(), CrError> {
    let map = encode_mm_map(mm, brk, scratch + AT_AUXV);
    let tracee = inj.tracee();
    tracee
        .write_memory(scratch + AT_MM_MAP, &map)
        .map_err(InjectError::from)?;
    if !mm.auxv.is_empty() {
        tracee
            .write_memory(scratch + AT_AUXV, &mm.auxv)
            .map_err(InjectError::from)?;
    }
    inj.syscall(
        "prctl(PR_SET_MM_MAP)",
        libc::SYS_prctl,
        &[
            PR_SET_MM,
            PR_SET_MM_MAP,
            scratch + AT_MM_MAP,
            MM_MAP_LEN as u64,
            0,
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigactions_round_trip() {
        let a = SigAction {
            signal: libc::SIGINT,
            handler: 0x5555_0000_1234,
            flags: 0x0400_0000,
            restorer: 0x7f00_0000_0042,
            mask: 1 << 3,
        };
        assert_eq!(SigAction::decode(a.signal, &a.encode()), a);
        assert_eq!(
            signals_in(1 << (libc::SIGKILL - 1) | 1 << (libc::SIGINT - 1)).collect::<Vec<_>>(),
            vec![libc::SIGINT]
        );
    }

    #[test]
    fn parses_the_layout_fields_of_stat() {
        // A real line of this machine (cat /proc/self/stat), comm with a space and ')'.
        let line = "1234 (a b) c) R 1 1234 1234 0 -1 4194304 90 0 0 0 0 0 0 0 20 0 1 0 \
                    100 5783552 243 18446744073709551615 93966819254272 93966819274153 \
                    140727188970032 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 93966819290160 \
                    93966819291776 93967484653568 140727188974110 140727188974130 \
                    140727188974130 140727188975595 0\n";
        let mm = parse_mm_layout(line).unwrap();
        assert_eq!(mm.start_code, 93966819254272);
        assert_eq!(mm.end_code, 93966819274153);
        assert_eq!(mm.start_stack, 140727188970032);
        assert_eq!(mm.start_data, 93966819290160);
        assert_eq!(mm.end_data, 93966819291776);
        assert_eq!(mm.start_brk, 93967484653568);
        assert_eq!(mm.arg_start, 140727188974110);
        assert_eq!(mm.env_end, 140727188975595);
        assert!(parse_mm_layout("1 (x) R 1 2").is_none());
    }

    #[test]
    fn the_mm_map_is_laid_out_as_the_kernel_reads_it() {
        let mm = MmLayout {
            start_code: 1,
            start_brk: 0x5000,
            auxv: vec![0; 16],
            ..MmLayout::default()
        };
        let map = encode_mm_map(&mm, 0x1000, 0x9000);
        assert_eq!(&map[..8], &1u64.to_ne_bytes());
        // brk below start_brk is raised to it.
        assert_eq!(&map[40..48], &0x5000u64.to_ne_bytes());
        assert_eq!(&map[88..96], &0x9000u64.to_ne_bytes());
        assert_eq!(&map[96..100], &16u32.to_ne_bytes());
        assert_eq!(&map[100..104], &u32::MAX.to_ne_bytes());
    }
}
