//! An in-memory [`WriteTracker`] and [`CowFaultCounter`] for tests that need no root
//! and no kernel.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::bpf::{
    AttachedProgram, BpfError, CowFaultCounter, FaultTotals, GlobalCounters, InodeRecord,
    ProcessPages, WriteTracker,
};

/// Watched cgroups with their epochs, per-inode records, and an optional failure.
#[derive(Default)]
pub(crate) struct FakeTracker {
    state: Mutex<FakeState>,
}

#[derive(Default)]
struct FakeState {
    epochs: BTreeMap<u64, u64>,
    records: Vec<InodeRecord>,
    counters: GlobalCounters,
    /// When set, every call fails with `NotLoaded` for this pin dir.
    unloaded: Option<PathBuf>,
}

impl FakeTracker {
    /// Adds a counted write of `bytes` to `ino` in the cgroup's current epoch.
    pub(crate) fn record_write(&self, cgroup_id: u64, ino: u64, name: &str, bytes: u64) {
        let mut s = self.state.lock().unwrap();
        let epoch = s.epochs.get(&cgroup_id).copied().unwrap_or(0);
        s.counters.write_syscalls += 1;
        s.counters.dirtied_folios += bytes.div_ceil(4096);
        s.counters.fd_unresolved += 1;
        s.counters.stats_full += 1;
        let existing = s
            .records
            .iter_mut()
            .find(|r| r.cgroup_id == cgroup_id && r.ino == ino && r.epoch == epoch);
        match existing {
            Some(r) => {
                r.writes += 1;
                r.bytes += bytes;
                r.pages_dirtied += bytes.div_ceil(4096);
            }
            None => s.records.push(InodeRecord {
                cgroup_id,
                ino,
                epoch,
                name: name.to_owned(),
                writes: 1,
                bytes,
                pages_dirtied: bytes.div_ceil(4096),
            }),
        }
    }

    /// Makes every later call fail as if the pins were removed.
    pub(crate) fn unload(&self) {
        self.state.lock().unwrap().unloaded = Some(PathBuf::from("/sys/fs/bpf/fake"));
    }

    fn check(&self) -> Result<std::sync::MutexGuard<'_, FakeState>, BpfError> {
        let s = self.state.lock().unwrap();
        match &s.unloaded {
            Some(pin_dir) => Err(BpfError::NotLoaded {
                pin_dir: pin_dir.clone(),
            }),
            None => Ok(s),
        }
    }
}

impl WriteTracker for FakeTracker {
    fn attached(&self) -> Result<Vec<AttachedProgram>, BpfError> {
        let _state = self.check()?;
        Ok(vec![AttachedProgram {
            name: "deltabox_write".into(),
            tracepoint: "syscalls:sys_enter_write".into(),
            program_id: 41,
            link_id: 7,
            pinned_at: PathBuf::from("/sys/fs/bpf/fake/links/deltabox_write"),
        }])
    }

    fn watch(&self, cgroup_id: u64) -> Result<u64, BpfError> {
        Ok(*self.check()?.epochs.entry(cgroup_id).or_insert(1))
    }

    fn unwatch(&self, cgroup_id: u64) -> Result<bool, BpfError> {
        let mut s = self.check()?;
        s.records.retain(|r| r.cgroup_id != cgroup_id);
        Ok(s.epochs.remove(&cgroup_id).is_some())
    }

    fn watched(&self) -> Result<Vec<(u64, u64)>, BpfError> {
        Ok(self.check()?.epochs.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn advance_epoch(&self, cgroup_id: u64) -> Result<u64, BpfError> {
        let mut s = self.check()?;
        let epoch = s
            .epochs
            .get_mut(&cgroup_id)
            .ok_or(BpfError::NotWatched { cgroup_id })?;
        *epoch += 1;
        let epoch = *epoch;
        s.records
            .retain(|r| r.cgroup_id != cgroup_id || r.epoch == epoch);
        Ok(epoch)
    }

    fn inode_stats(&self, cgroup_id: Option<u64>) -> Result<Vec<InodeRecord>, BpfError> {
        let s = self.check()?;
        Ok(s.records
            .iter()
            .filter(|r| cgroup_id.is_none_or(|id| r.cgroup_id == id))
            .filter(|r| s.epochs.get(&r.cgroup_id) == Some(&r.epoch))
            .rev()
            .cloned()
            .collect())
    }

    fn counters(&self) -> Result<GlobalCounters, BpfError> {
        Ok(self.check()?.counters)
    }
}

/// An in-memory [`CowFaultCounter`]: fault epochs per cgroup and the faults recorded
/// with [`FakeFaults::record_faults`] (no pages: nothing to warm up).
#[derive(Default)]
pub(crate) struct FakeFaults {
    state: Mutex<FakeFaultState>,
}

#[derive(Default)]
struct FakeFaultState {
    epochs: BTreeMap<u64, u64>,
    faults: BTreeMap<(u64, u64), u64>,
    total: u64,
}

impl FakeFaults {
    /// Adds `n` faults to the cgroup's current fault epoch (if it is watched).
    pub(crate) fn record_faults(&self, cgroup_id: u64, n: u64) {
        let mut s = self.state.lock().unwrap();
        if let Some(&epoch) = s.epochs.get(&cgroup_id) {
            *s.faults.entry((cgroup_id, epoch)).or_default() += n;
            s.total += n;
        }
    }
}

impl CowFaultCounter for FakeFaults {
    fn watch(&self, cgroup_id: u64) -> Result<u64, BpfError> {
        Ok(*self
            .state
            .lock()
            .unwrap()
            .epochs
            .entry(cgroup_id)
            .or_default())
    }

    fn unwatch(&self, cgroup_id: u64) -> Result<bool, BpfError> {
        let mut s = self.state.lock().unwrap();
        s.faults.retain(|(cg, _), _| *cg != cgroup_id);
        Ok(s.epochs.remove(&cgroup_id).is_some())
    }

    fn advance_epoch(&self, cgroup_id: u64) -> Result<u64, BpfError> {
        let mut s = self.state.lock().unwrap();
        let epoch = s
            .epochs
            .get_mut(&cgroup_id)
            .ok_or(BpfError::NotWatched { cgroup_id })?;
        *epoch += 1;
        Ok(*epoch)
    }

    fn faults(&self, cgroup_id: u64, epoch: u64) -> Result<u64, BpfError> {
        let s = self.state.lock().unwrap();
        Ok(s.faults.get(&(cgroup_id, epoch)).copied().unwrap_or(0))
    }

    fn pages(&self, _cgroup_id: u64, _epoch: u64) -> Result<Vec<ProcessPages>, BpfError> {
        Ok(Vec::new())
    }

    fn drop_before(&self, cgroup_id: u64, epoch: u64) -> Result<(), BpfError> {
        let mut s = self.state.lock().unwrap();
        s.faults
            .retain(|(cg, e), _| *cg != cgroup_id || *e >= epoch);
        Ok(())
    }

    fn totals(&self) -> Result<FaultTotals, BpfError> {
        Ok(FaultTotals {
            cow_faults: self.state.lock().unwrap().total,
            pages_full: 0,
        })
    }
}
