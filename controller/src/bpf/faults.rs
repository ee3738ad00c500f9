//! The copy-on-write fault counter: per watched cgroup and fault epoch, how many write
//! faults on present pages its processes took and which pages (per process) they hit.
//!
//! After a fork — a checkpoint's or a restore's — every page the process first writes
//! is shared with the template and costs a copy-on-write fault (3–5 µs per 4 KiB page
//! here). The eBPF program `dbx_page_fault` (on `exceptions:page_fault_user`) counts
//! them; the warm-up ([`crate::cr::warmup`]) pre-faults the pages recorded here after
//! the next restore from the same node. Fault epochs are this counter's own: the
//! controller advances them at each checkpoint and rollback of a sandbox.
//!
//! [`CowFaultCounter`] is the one point the rest of the controller reaches these maps
//! through; [`PinnedFaults`] implements it over the maps pinned by [`super::loader`].

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Mutex, MutexGuard},
};

use aya::maps::{HashMap, IterableMap as _, MapData, PerCpuArray};
use deltabox_common::{Counter, FaultKey, FaultPageKey, map_names};
use serde::{Deserialize, Serialize};

use super::batch;
use super::loader::{self, BpfError};
use super::maps::{
    EpochRecords, WatchMap, is_not_found, map_err, open_counters, open_hash, sum_counter,
};

/// The pages one process faulted on in one epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessPages {
    /// Its thread-group id (host pid namespace).
    pub tgid: u32,
    /// Page addresses (4 KiB aligned), sorted.
    pub pages: Vec<u64>,
    /// Faults on those pages (a page written, made read-only again and written is two).
    pub faults: u64,
}

/// Totals since the programs were loaded, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultTotals {
    /// Copy-on-write faults counted in fault-watched cgroups.
    pub cow_faults: u64,
    /// Faulting pages not recorded because the pages map was full.
    pub pages_full: u64,
}

/// What the controller needs from the copy-on-write fault counter.
pub trait CowFaultCounter: Send + Sync {
    /// Starts counting the cgroup's faults; returns its fault epoch (the current one if
    /// it is watched already).
    fn watch(&self, cgroup_id: u64) -> Result<u64, BpfError>;
    /// Stops counting the cgroup and drops its records; false if it was not watched.
    fn unwatch(&self, cgroup_id: u64) -> Result<bool, BpfError>;
    /// Starts a new fault epoch for the cgroup; returns it. Fails if it is not watched.
    /// The older epochs stay readable until [`Self::drop_before`].
    fn advance_epoch(&self, cgroup_id: u64) -> Result<u64, BpfError>;
    /// Faults the cgroup took in `epoch`.
    fn faults(&self, cgroup_id: u64, epoch: u64) -> Result<u64, BpfError>;
    /// The pages the cgroup's processes faulted on in `epoch`, per process, sorted by
    /// tgid (a walk of the whole pages map: not for a latency path).
    fn pages(&self, cgroup_id: u64, epoch: u64) -> Result<Vec<ProcessPages>, BpfError>;
    /// Removes the cgroup's records of the epochs before `epoch` (a walk of the whole
    /// pages map).
    fn drop_before(&self, cgroup_id: u64, epoch: u64) -> Result<(), BpfError>;
    /// Totals since load.
    fn totals(&self) -> Result<FaultTotals, BpfError>;
}

struct Maps {
    watched: WatchMap,
    counts: HashMap<MapData, FaultKey, u64>,
    pages: HashMap<MapData, FaultPageKey, u64>,
    counters: PerCpuArray<MapData, u64>,
}

/// The fault counter over the maps pinned under a pin directory (loaded with the write
/// tracker's programs: [`super::PinnedTracker::load`]).
pub struct PinnedFaults {
    maps: Mutex<Maps>,
}

impl PinnedFaults {
    /// Adopts the fault maps pinned under `pin_dir` (the programs must be loaded).
    pub fn adopt(pin_dir: &Path) -> Result<Self, BpfError> {
        if let Some(missing) = loader::missing_pin(pin_dir) {
            return Err(BpfError::Incomplete {
                pin_dir: pin_dir.into(),
                missing,
            });
        }
        let maps = Maps {
            watched: WatchMap::open(pin_dir, map_names::FAULT_WATCHED)?,
            counts: open_hash(pin_dir, map_names::FAULT_COUNTS)?,
            pages: open_hash(pin_dir, map_names::FAULT_PAGES)?,
            counters: open_counters(pin_dir)?,
        };
        Ok(Self {
            maps: Mutex::new(maps),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Maps> {
        // Each map update is one syscall: a panic cannot leave the maps half-updated.
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Maps {
    /// Every entry of the pages map, read in batches.
    fn all_pages(&self) -> Result<Vec<(FaultPageKey, u64)>, BpfError> {
        batch::lookup_all(self.pages.map()).map_err(|source| BpfError::Batch {
            map: map_names::FAULT_PAGES,
            op: "lookup",
            source,
        })
    }
}

impl EpochRecords for Maps {
    fn watch_map(&mut self) -> &mut WatchMap {
        &mut self.watched
    }

    fn drop_records(&mut self, cgroup_id: u64, keep_from: u64) -> Result<(), BpfError> {
        let stale = |cg: u64, epoch: u64| cg == cgroup_id && epoch < keep_from;
        let counts: Vec<FaultKey> = batch::lookup_all::<FaultKey, u64>(self.counts.map())
            .map_err(|source| BpfError::Batch {
                map: map_names::FAULT_COUNTS,
                op: "lookup",
                source,
            })?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| stale(k.cgroup_id, k.epoch))
            .collect();
        batch::delete(self.counts.map(), &counts).map_err(|source| BpfError::Batch {
            map: map_names::FAULT_COUNTS,
            op: "delete",
            source,
        })?;
        let pages: Vec<FaultPageKey> = self
            .all_pages()?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| stale(k.cgroup_id, k.epoch))
            .collect();
        batch::delete(self.pages.map(), &pages).map_err(|source| BpfError::Batch {
            map: map_names::FAULT_PAGES,
            op: "delete",
            source,
        })?;
        Ok(())
    }
}

impl CowFaultCounter for PinnedFaults {
    fn watch(&self, cgroup_id: u64) -> Result<u64, BpfError> {
        self.lock().watch(cgroup_id)
    }

    fn unwatch(&self, cgroup_id: u64) -> Result<bool, BpfError> {
        self.lock().unwatch(cgroup_id)
    }

    fn advance_epoch(&self, cgroup_id: u64) -> Result<u64, BpfError> {
        self.lock().advance_epoch(cgroup_id)
    }

    fn faults(&self, cgroup_id: u64, epoch: u64) -> Result<u64, BpfError> {
        let maps = self.lock();
        match maps.counts.get(&FaultKey { cgroup_id, epoch }, 0) {
            Ok(n) => Ok(n),
            Err(e) if is_not_found(&e) => Ok(0),
            Err(e) => Err(map_err(map_names::FAULT_COUNTS)(e)),
        }
    }

    fn pages(&self, cgroup_id: u64, epoch: u64) -> Result<Vec<ProcessPages>, BpfError> {
        let entries = self.lock().all_pages()?;
        let mut by_tgid: BTreeMap<u32, ProcessPages> = BTreeMap::new();
        for (key, faults) in entries {
            if key.cgroup_id != cgroup_id || key.epoch != epoch {
                continue;
            }
            let p = by_tgid.entry(key.tgid).or_insert_with(|| ProcessPages {
                tgid: key.tgid,
                ..ProcessPages::default()
            });
            p.pages.push(key.page);
            p.faults += faults;
        }
        let mut out: Vec<ProcessPages> = by_tgid.into_values().collect();
        for p in &mut out {
            p.pages.sort_unstable();
        }
        Ok(out)
    }

    fn drop_before(&self, cgroup_id: u64, epoch: u64) -> Result<(), BpfError> {
        self.lock().drop_records(cgroup_id, epoch)
    }

    fn totals(&self) -> Result<FaultTotals, BpfError> {
        let maps = self.lock();
        Ok(FaultTotals {
            cow_faults: sum_counter(&maps.counters, Counter::CowFaults)?,
            pages_full: sum_counter(&maps.counters, Counter::FaultPagesFull)?,
        })
    }
}
