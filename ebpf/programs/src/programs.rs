//! The programs and their maps.
//!
//! Helpers are `#[inline(always)]`: as BPF-to-BPF calls, an `Option<&[u8]>` argument
//! passed as `None` leaves a register the verifier rejects as uninitialised.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use crate::kernel;
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid},
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::TracePointContext,
};
use aya_log_ebpf::warn;
use deltabox_common::{
    Counter, InodeKey, InodeStats, KernelOffsets, MAX_INODE_STATS, MAX_PENDING, MAX_WATCHED,
    WatchState,
};

pub(crate) const EEXIST: i32 = 17;

/// Filled by userspace before load; all zero (`valid == 0`) means "do nothing".
#[unsafe(no_mangle)]
static DBX_OFFSETS: KernelOffsets = KernelOffsets {
    task_files: 0,
    files_fdt: 0,
    fdt_max_fds: 0,
    fdt_fd: 0,
    file_inode: 0,
    file_dentry: 0,
    dentry_name: 0,
    inode_mode: 0,
    inode_ino: 0,
    tp_dirty_folio_ino: 0,
    tp_enter_fd: 0,
    tp_exit_ret: 0,
    tp_fault_address: 0,
    tp_fault_error_code: 0,
    valid: 0,
};

#[map(name = "DBX_WATCHED")]
static WATCHED: HashMap<u64, WatchState> = HashMap::with_max_entries(MAX_WATCHED, 0);

#[map(name = "DBX_INODE_STATS")]
static INODE_STATS: HashMap<InodeKey, InodeStats> = HashMap::with_max_entries(MAX_INODE_STATS, 0);

#[map(name = "DBX_PENDING")]
static PENDING: HashMap<u64, InodeKey> = HashMap::with_max_entries(MAX_PENDING, 0);

#[map(name = "DBX_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[inline(always)]
pub(crate) fn offsets() -> KernelOffsets {
    // SAFETY: DBX_OFFSETS is read-only data; the volatile read stops the compiler from
    // folding the all-zero initialiser that userspace overrides at load time.
    unsafe { core::ptr::read_volatile(&DBX_OFFSETS) }
}

#[inline(always)]
pub(crate) fn bump(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot of this CPU; a tracepoint program is not preempted by
        // another program on the same CPU between the read and the write.
        unsafe { *slot += 1 };
    }
}

/// The key under which the current task's writes to `ino` count, if its cgroup is watched.
#[inline(always)]
fn watched_key(ino: u64) -> Option<InodeKey> {
    // SAFETY: the helper only reads the current task's cgroup.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is copied out at once; a concurrent delete cannot free it
    // while this program runs (maps values are RCU-protected).
    let state = unsafe { WATCHED.get(cgroup_id) }?;
    Some(InodeKey {
        cgroup_id,
        ino,
        epoch: state.epoch,
    })
}

/// The counters of `key`, created (with `name`) if absent.
#[inline(always)]
fn stats_of(
    ctx: &TracePointContext,
    key: &InodeKey,
    name: Option<&[u8]>,
) -> Option<*mut InodeStats> {
    if let Some(ptr) = INODE_STATS.get_ptr_mut(key) {
        return Some(ptr);
    }
    let mut fresh = InodeStats::default();
    if let Some(name) = name {
        let n = name.len().min(fresh.name.len());
        fresh.name[..n].copy_from_slice(&name[..n]);
    }
    // BPF_NOEXIST: another CPU may have created it meanwhile; then use that one.
    if let Err(err) = INODE_STATS.insert(key, fresh, BPF_NOEXIST as u64)
        && err != -EEXIST
    {
        bump(Counter::StatsFull);
        warn!(
            ctx,
            "inode stats map full: cgroup {} inode {} not counted", key.cgroup_id, key.ino
        );
        return None;
    }
    INODE_STATS.get_ptr_mut(key)
}

#[inline(always)]
pub(crate) fn add(field: *mut u64, n: u64) {
    // SAFETY: `field` points into a live map value; other CPUs update it concurrently,
    // hence the atomic add.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, n) };
}

#[tracepoint]
pub fn dbx_write_enter(ctx: TracePointContext) -> u32 {
    let off = offsets();
    if off.valid == 0 {
        return 0;
    }
    // SAFETY: tp_enter_fd was read from this tracepoint's format file.
    let Ok(fd) = (unsafe { ctx.read_at::<u64>(off.tp_enter_fd as usize) }) else {
        return 0;
    };
    // Cheap cgroup check first: most writes on the machine are not watched.
    let Some(_) = watched_key(0) else {
        return 0;
    };
    let Some(file) = kernel::regular_file_of_fd(&off, fd) else {
        bump(Counter::FdUnresolved);
        return 0;
    };
    if file.is_regular == 0 {
        return 0;
    }
    let Some(key) = watched_key(file.ino) else {
        return 0;
    };
    let mut name_buf = [0u8; deltabox_common::NAME_LEN];
    let name = kernel::file_name(&off, file.file, &mut name_buf);
    let Some(stats) = stats_of(&ctx, &key, name) else {
        return 0;
    };
    // SAFETY: `stats` is a live map value; the field pointer stays inside it.
    add(unsafe { &raw mut (*stats).writes }, 1);
    bump(Counter::WriteSyscalls);
    // Overwrites a stale entry of a task that died between enter and exit.
    let _ = PENDING.insert(bpf_get_current_pid_tgid(), key, 0);
    0
}

#[tracepoint]
pub fn dbx_write_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let Some(key) = (unsafe { PENDING.get(pid_tgid) }).copied() else {
        return 0;
    };
    let _ = PENDING.remove(pid_tgid);
    let off = offsets();
    // SAFETY: tp_exit_ret was read from this tracepoint's format file.
    let Ok(ret) = (unsafe { ctx.read_at::<i64>(off.tp_exit_ret as usize) }) else {
        return 0;
    };
    if ret > 0
        && let Some(stats) = INODE_STATS.get_ptr_mut(key)
    {
        // SAFETY: `stats` is a live map value; the field pointer stays inside it.
        add(unsafe { &raw mut (*stats).bytes }, ret as u64);
    }
    0
}

#[tracepoint]
pub fn dbx_dirty_folio(ctx: TracePointContext) -> u32 {
    let off = offsets();
    if off.valid == 0 {
        return 0;
    }
    // SAFETY: tp_dirty_folio_ino was read from this tracepoint's format file.
    let Ok(ino) = (unsafe { ctx.read_at::<u64>(off.tp_dirty_folio_ino as usize) }) else {
        return 0;
    };
    let Some(key) = watched_key(ino) else {
        return 0;
    };
    let Some(stats) = stats_of(&ctx, &key, None) else {
        return 0;
    };
    // SAFETY: `stats` is a live map value; the field pointer stays inside it.
    add(unsafe { &raw mut (*stats).pages_dirtied }, 1);
    bump(Counter::DirtiedFolios);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
