//! Copy-on-write fault counting: `dbx_page_fault` on `exceptions:page_fault_user`.
//!
//! A user fault whose x86 error code has bit 0 (the page was present: a protection
//! violation) and bit 1 (a write) set is a write to a present, write-protected page:
//! after a fork (a checkpoint or a restore) that is a copy-on-write break, the 3-5 µs
//! page copy the warm-up moves off the critical path. Only tasks whose cgroup is in
//! `DBX_FAULT_WATCHED` count, under that cgroup's fault epoch; each fault is added to
//! `DBX_FAULT_COUNTS` and its page recorded, per process, in `DBX_FAULT_PAGES`.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid},
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
};
use deltabox_common::{
    Counter, FaultKey, FaultPageKey, MAX_FAULT_COUNTS, MAX_FAULT_PAGES, MAX_WATCHED, WatchState,
};

use crate::programs::{EEXIST, add, bump, offsets};

/// x86 page-fault error code: the page was present (a protection violation).
const PF_PROT: u64 = 1;
/// x86 page-fault error code: the access was a write.
const PF_WRITE: u64 = 2;
/// 4 KiB pages.
const PAGE_MASK: u64 = !0xfff;

#[map(name = "DBX_FAULT_WATCHED")]
static FAULT_WATCHED: HashMap<u64, WatchState> = HashMap::with_max_entries(MAX_WATCHED, 0);

#[map(name = "DBX_FAULT_COUNTS")]
static FAULT_COUNTS: HashMap<FaultKey, u64> = HashMap::with_max_entries(MAX_FAULT_COUNTS, 0);

#[map(name = "DBX_FAULT_PAGES")]
static FAULT_PAGES: HashMap<FaultPageKey, u64> = HashMap::with_max_entries(MAX_FAULT_PAGES, 0);

/// Adds `n` to the value of `key` in `map`, creating it; false if the map is full.
#[inline(always)]
fn count<K>(map: &HashMap<K, u64>, key: &K) -> bool {
    if let Some(ptr) = map.get_ptr_mut(key) {
        add(ptr, 1);
        return true;
    }
    // BPF_NOEXIST: another CPU may have created it meanwhile; then add to that one.
    match map.insert(key, 1, BPF_NOEXIST as u64) {
        Ok(()) => true,
        Err(err) if err == -EEXIST => match map.get_ptr_mut(key) {
            Some(ptr) => {
                add(ptr, 1);
                true
            }
            None => false,
        },
        Err(_) => false,
    }
}

#[tracepoint]
pub fn dbx_page_fault(ctx: TracePointContext) -> u32 {
    let off = offsets();
    if off.valid == 0 {
        return 0;
    }
    // SAFETY: tp_fault_error_code was read from this tracepoint's format file.
    let Ok(error_code) = (unsafe { ctx.read_at::<u64>(off.tp_fault_error_code as usize) }) else {
        return 0;
    };
    if error_code & (PF_PROT | PF_WRITE) != PF_PROT | PF_WRITE {
        return 0;
    }
    // SAFETY: the helper only reads the current task's cgroup.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is copied out at once (map values are RCU-protected).
    let Some(epoch) = (unsafe { FAULT_WATCHED.get(cgroup_id) }).map(|w| w.epoch) else {
        return 0;
    };
    // SAFETY: tp_fault_address was read from this tracepoint's format file.
    let Ok(address) = (unsafe { ctx.read_at::<u64>(off.tp_fault_address as usize) }) else {
        return 0;
    };
    bump(Counter::CowFaults);
    // The counts map holds a few epochs per watched cgroup: it is not expected to fill.
    let _ = count(&FAULT_COUNTS, &FaultKey { cgroup_id, epoch });
    let page = FaultPageKey {
        cgroup_id,
        epoch,
        page: address & PAGE_MASK,
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        pad: 0,
    };
    if !count(&FAULT_PAGES, &page) {
        bump(Counter::FaultPagesFull);
    }
    0
}
