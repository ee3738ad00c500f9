//! Batched injection: many syscalls in a stopped tracee for one ptrace round trip.
//!
//! Each syscall [`Injection::syscall`] injects costs a register write, a resume, a wait
//! and two reads of the tracee's state: ~30 µs here, most of it the two context switches
//! (docs/deltacr.md, "Batched injection"). A [`Batch`] instead writes its calls as a
//! table into the tracee's scratch page, with [`LOOP`], a few instructions that make
//! each call, store its result beside it and stop at the first that fails, and end on
//! an `int3`; the tracee runs them under `PTRACE_CONT` and stops once. The scratch page
//! must be executable ([`Injection::mmap_scratch`] maps it so); one that is not (a
//! template an older daemon made) runs the same calls one at a time
//! ([`Injection::run_each`]).

use std::io;

use super::{InjectError, Injection, SCRATCH_LEN, syscall_result};
use crate::cr::ptrace::{Resume, Stop};

/// The loop the tracee runs, with `rbx` = the first entry of the table and `r15` = the
/// number of entries. Each entry is eight words: the syscall number, six arguments,
/// and the result slot, which holds the one error the call may return without ending
/// the batch (0: none) until the loop stores the result there; it stops (the `int3`)
/// after the last entry or at the first other negative result, leaving `r15` at the
/// entries not done.
///
/// ```text
///  0: mov rax, [rbx]        ; 48 8b 03
///     mov rdi, [rbx+8]      ; 48 8b 7b 08
///     mov rsi, [rbx+16]     ; 48 8b 73 10
///     mov rdx, [rbx+24]     ; 48 8b 53 18
///     mov r10, [rbx+32]     ; 4c 8b 53 20
///     mov r8,  [rbx+40]     ; 4c 8b 43 28
///     mov r9,  [rbx+48]     ; 4c 8b 4b 30
///     syscall               ; 0f 05
///     cmp rax, [rbx+56]     ; 48 3b 43 38   the tolerated error?
///     mov [rbx+56], rax     ; 48 89 43 38   (leaves the flags)
///     je next               ; 74 05
///     test rax, rax         ; 48 85 c0
///     js end                ; 78 09
/// next: add rbx, 64         ; 48 83 c3 40
///     dec r15               ; 49 ff cf
///     jnz 0                 ; 75 cb
/// end: int3                 ; cc
/// ```
pub const LOOP: [u8; 54] = [
    0x48, 0x8b, 0x03, 0x48, 0x8b, 0x7b, 0x08, 0x48, 0x8b, 0x73, 0x10, 0x48, 0x8b, 0x53, 0x18, 0x4c,
    0x8b, 0x53, 0x20, 0x4c, 0x8b, 0x43, 0x28, 0x4c, 0x8b, 0x4b, 0x30, 0x0f, 0x05, 0x48, 0x3b, 0x43,
    0x38, 0x48, 0x89, 0x43, 0x38, 0x74, 0x05, 0x48, 0x85, 0xc0, 0x78, 0x09, 0x48, 0x83, 0xc3, 0x40,
    0x49, 0xff, 0xcf, 0x75, 0xcb, 0xcc,
];

/// Bytes of one table entry.
const ENTRY_LEN: u64 = 64;

/// One syscall of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    /// Its name, for errors.
    pub name: &'static str,
    /// The syscall number.
    pub nr: i64,
    /// The arguments (unused ones 0).
    pub args: [u64; 6],
    /// The errno it may fail with without ending the batch (0: none).
    pub tolerated: i32,
}

/// Syscalls to run in a tracee, and the bytes they read or write, which go at the start
/// of its scratch page (the table and [`LOOP`] go after them).
#[derive(Debug)]
pub struct Batch {
    scratch: u64,
    len: u64,
    data: Vec<u8>,
    calls: Vec<Call>,
}

/// A batch that did not run to its end.
#[derive(Debug)]
pub struct BatchError {
    /// The call that failed (its index in the batch), if one did: `None` when the
    /// injection itself failed.
    pub index: Option<usize>,
    /// Why.
    pub error: InjectError,
}

impl From<InjectError> for BatchError {
    fn from(error: InjectError) -> Self {
        Self { index: None, error }
    }
}

impl From<crate::cr::ptrace::PtraceError> for BatchError {
    fn from(e: crate::cr::ptrace::PtraceError) -> Self {
        InjectError::from(e).into()
    }
}

impl From<BatchError> for InjectError {
    fn from(e: BatchError) -> Self {
        e.error
    }
}

/// What a batch returned: each call's result (a negative errno for a tolerated
/// failure) and the data area as the calls left it.
pub type Ran = (Vec<u64>, Vec<u8>);

impl Batch {
    /// An empty batch for the scratch page at `scratch` ([`SCRATCH_LEN`] bytes).
    pub fn new(scratch: u64) -> Self {
        Self::sized(scratch, SCRATCH_LEN)
    }

    /// An empty batch for a scratch area of `len` bytes at `scratch`.
    pub fn sized(scratch: u64, len: u64) -> Self {
        Self {
            scratch,
            len,
            data: Vec::new(),
            calls: Vec::new(),
        }
    }

    /// Places `bytes` in the data area (8-byte aligned); returns their address in the
    /// tracee.
    pub fn data(&mut self, bytes: &[u8]) -> u64 {
        let at = self.data.len().next_multiple_of(8);
        self.data.resize(at, 0);
        self.data.extend_from_slice(bytes);
        self.scratch + at as u64
    }

    /// Places `path`, NUL-terminated, in the data area; returns its address in the
    /// tracee.
    pub fn path(&mut self, path: &std::path::Path) -> u64 {
        use std::os::unix::ffi::OsStrExt as _;
        let mut bytes = path.as_os_str().as_bytes().to_vec();
        bytes.push(0);
        self.data(&bytes)
    }

    /// Reserves `len` zeroed bytes of the data area for a call to write; returns their
    /// address in the tracee.
    pub fn space(&mut self, len: usize) -> u64 {
        self.data(&vec![0; len])
    }

    /// Adds syscall `nr` (`name` for errors) with up to six arguments; returns its
    /// index.
    pub fn call(&mut self, name: &'static str, nr: i64, args: &[u64]) -> usize {
        self.call_tolerating(name, nr, args, 0)
    }

    /// Adds syscall `nr` like [`Self::call`], which may fail with `errno` without
    /// ending the batch (its result is then `-errno`).
    pub fn call_tolerating(
        &mut self,
        name: &'static str,
        nr: i64,
        args: &[u64],
        errno: i32,
    ) -> usize {
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        self.calls.push(Call {
            name,
            nr,
            args: a,
            tolerated: errno,
        });
        self.calls.len() - 1
    }

    /// Its calls, in order.
    pub fn calls(&self) -> &[Call] {
        &self.calls
    }

    /// Its data area as written into the tracee before the calls run.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// The address of its scratch area.
    pub fn scratch(&self) -> u64 {
        self.scratch
    }

    /// The length of its scratch area.
    pub fn area(&self) -> u64 {
        self.len
    }

    /// Bytes it needs to run in one stop: the data, the table, [`LOOP`].
    pub fn room(&self) -> u64 {
        self.data.len().next_multiple_of(8) as u64
            + self.calls.len() as u64 * ENTRY_LEN
            + LOOP.len() as u64
    }

    /// How many calls it holds.
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    /// Whether it holds no call.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// The offset in the scratch page of the byte at `addr` (an address [`Self::data`]
    /// or [`Self::space`] returned).
    pub fn offset(&self, addr: u64) -> usize {
        (addr - self.scratch) as usize
    }

    /// How many entries fit after the data and before [`LOOP`], per run.
    fn per_run(&self) -> Result<usize, InjectError> {
        let data = self.data.len().next_multiple_of(8) as u64;
        let free = self.len.saturating_sub(data + LOOP.len() as u64);
        match free / ENTRY_LEN {
            0 => Err(InjectError::BatchTooBig {
                data: self.data.len(),
            }),
            n => Ok(n as usize),
        }
    }
}

impl Injection<'_> {
    /// Runs every call of `batch` from the tracee's (executable) scratch page, as few
    /// stops as the page's room for the table allows (one, for the batches DeltaCR
    /// makes); returns their results and the data area as the calls left it. The
    /// first call that fails (but for an error it tolerates) ends the batch with its
    /// error.
    pub fn run_batch(&mut self, batch: &Batch) -> Result<Ran, InjectError> {
        Ok(self.run_calls(batch, true)?)
    }

    /// Runs every call of `batch` one at a time ([`Injection::syscall`]): for a scratch
    /// page that is not executable. Same results as [`Self::run_batch`].
    pub fn run_each(&mut self, batch: &Batch) -> Result<Ran, InjectError> {
        Ok(self.run_calls(batch, false)?)
    }

    /// [`Self::run_batch`] (`batched`) or [`Self::run_each`], saying which call failed.
    pub fn run_calls(&mut self, batch: &Batch, batched: bool) -> Result<Ran, BatchError> {
        if !batch.data.is_empty() {
            self.tracee.write_memory(batch.scratch, &batch.data)?;
        }
        let results = if batched {
            self.run_table(batch)?
        } else {
            let mut results = Vec::with_capacity(batch.calls.len());
            for (index, c) in batch.calls.iter().enumerate() {
                let (rax, _) = self.run(c.nr, &c.args)?;
                match syscall_result(rax) {
                    Ok(_) => {}
                    Err(errno) if errno == c.tolerated => {}
                    Err(_) => {
                        return Err(BatchError {
                            index: Some(index),
                            error: self.failed(c, rax),
                        });
                    }
                }
                results.push(rax as u64);
            }
            results
        };
        let mut data = vec![0u8; batch.data.len()];
        if !data.is_empty() {
            self.tracee.read_memory(batch.scratch, &mut data)?;
        }
        Ok((results, data))
    }

    /// Writes the table of `batch` (in chunks that fit) and runs [`LOOP`] over it.
    fn run_table(&mut self, batch: &Batch) -> Result<Vec<u64>, BatchError> {
        let table = batch.scratch + batch.data.len().next_multiple_of(8) as u64;
        let mut results = Vec::with_capacity(batch.calls.len());
        for chunk in batch.calls.chunks(batch.per_run()?) {
            let mut bytes = Vec::with_capacity(chunk.len() * ENTRY_LEN as usize + LOOP.len());
            for c in chunk {
                bytes.extend_from_slice(&c.nr.to_ne_bytes());
                for a in c.args {
                    bytes.extend_from_slice(&a.to_ne_bytes());
                }
                bytes.extend_from_slice(&(-i64::from(c.tolerated)).to_ne_bytes());
            }
            bytes.extend_from_slice(&LOOP);
            self.tracee.write_memory(table, &bytes)?;
            let code = table + chunk.len() as u64 * ENTRY_LEN;
            let left = self.run_loop(code, table, chunk.len() as u64)?;
            let done = chunk.len() - left as usize;
            let mut raw = vec![0u8; chunk.len() * ENTRY_LEN as usize];
            self.tracee.read_memory(table, &mut raw)?;
            for (i, c) in chunk.iter().enumerate() {
                let at = i * ENTRY_LEN as usize + 56;
                let rax = i64::from_ne_bytes(raw[at..at + 8].try_into().unwrap_or_default());
                if i == done {
                    return Err(BatchError {
                        index: Some(results.len()),
                        error: self.failed(c, rax),
                    });
                }
                results.push(rax as u64);
            }
        }
        Ok(results)
    }

    fn failed(&self, call: &Call, rax: i64) -> InjectError {
        let errno = syscall_result(rax).err().unwrap_or(libc::EIO);
        InjectError::Syscall {
            pid: self.tracee.pid().as_raw(),
            name: call.name,
            source: io::Error::from_raw_os_error(errno),
        }
    }

    /// Runs [`LOOP`] at `code` over the `count` entries at `table` until its `int3`;
    /// returns the entries not done (`r15`).
    fn run_loop(&mut self, code: u64, table: u64, count: u64) -> Result<u64, InjectError> {
        let mut regs = self.saved;
        regs.rip = code;
        regs.rbx = table;
        regs.r15 = count;
        // No restart of a syscall the tracee was stopped in.
        regs.orig_rax = u64::MAX;
        self.tracee.set_regs(&regs)?;
        self.dirty = true;
        let end = code + LOOP.len() as u64;
        self.tracee.resume(Resume::Cont, 0)?;
        loop {
            match self.tracee.wait()? {
                Stop::Signal(sig) => {
                    let user = self.tracee.signal_code()? <= 0;
                    if user {
                        // Sent by a process: the tracee's, deferred as for a syscall.
                        self.tracee.defer_signal(sig);
                    } else {
                        let now = self.tracee.regs()?;
                        if sig == libc::SIGTRAP && now.rip == end {
                            return Ok(now.r15);
                        }
                        // A fault in the loop: never delivered (it would run the
                        // tracee's handler, or kill it, over injected registers).
                        return Err(InjectError::BatchFault {
                            pid: self.tracee.pid().as_raw(),
                            signal: sig,
                            rip: now.rip,
                        });
                    }
                }
                // A stale interrupt or group-stop report, or an event not asked for.
                Stop::Syscall
                | Stop::Interrupt
                | Stop::Group(_)
                | Stop::Event(_)
                | Stop::NewChild { .. } => {}
            }
            self.tracee.resume(Resume::Cont, 0)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_aligned_and_the_table_fits_after_it() {
        let mut b = Batch::new(0x1000);
        assert_eq!(b.data(b"abc"), 0x1000);
        assert_eq!(b.space(32), 0x1008);
        assert_eq!(b.offset(0x1008), 8);
        b.call("getpid", libc::SYS_getpid, &[]);
        assert_eq!(b.calls[0].args, [0; 6]);
        // (4096 - 40 - 54) / 64
        assert_eq!(b.per_run().unwrap(), 62);
        b.space(4000);
        assert!(matches!(b.per_run(), Err(InjectError::BatchTooBig { .. })));
    }
}
