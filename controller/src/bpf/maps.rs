//! What the write tracker ([`super::tracker`]) and the fault counter ([`super::faults`])
//! share over their pinned maps: opening them, the watch map that gives each watched
//! cgroup its current epoch, and the watch/unwatch/advance logic over records keyed by
//! (cgroup, epoch).
//!
//! Both keep their records under keys that carry the epoch, so advancing an epoch is
//! one update of the watch map; older records stay readable until dropped.

use std::path::Path;

use aya::{
    Pod,
    maps::{HashMap, Map, MapData, MapError, PerCpuArray},
};
use deltabox_common::{Counter, WatchState, map_names};

use super::loader::{self, BpfError};

/// The error of a map operation on `map`.
pub(super) fn map_err(map: &'static str) -> impl FnOnce(MapError) -> BpfError {
    move |source| BpfError::Map { map, source }
}

/// Lookups report a missing key as `KeyNotFound`, deletes as a raw ENOENT.
pub(super) fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

fn open_pinned(pin_dir: &Path, name: &'static str) -> Result<MapData, BpfError> {
    MapData::from_pin(loader::maps_dir(pin_dir).join(name)).map_err(map_err(name))
}

/// The hash map `name` pinned under `pin_dir`.
pub(super) fn open_hash<K: Pod, V: Pod>(
    pin_dir: &Path,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, BpfError> {
    HashMap::try_from(Map::HashMap(open_pinned(pin_dir, name)?)).map_err(map_err(name))
}

/// The per-CPU counters array pinned under `pin_dir` (shared by all programs).
pub(super) fn open_counters(pin_dir: &Path) -> Result<PerCpuArray<MapData, u64>, BpfError> {
    let data = open_pinned(pin_dir, map_names::COUNTERS)?;
    PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err(map_names::COUNTERS))
}

/// Counter `c` summed over CPUs.
pub(super) fn sum_counter(
    counters: &PerCpuArray<MapData, u64>,
    c: Counter,
) -> Result<u64, BpfError> {
    let values = counters
        .get(&(c as u32), 0)
        .map_err(map_err(map_names::COUNTERS))?;
    Ok(values.iter().sum())
}

/// A watch map: the watched cgroup ids, each with its current epoch. The programs
/// count only cgroups present here, under the epoch they find.
pub(super) struct WatchMap {
    map: HashMap<MapData, u64, WatchState>,
    name: &'static str,
}

impl WatchMap {
    /// The watch map `name` pinned under `pin_dir`.
    pub(super) fn open(pin_dir: &Path, name: &'static str) -> Result<Self, BpfError> {
        Ok(Self {
            map: open_hash(pin_dir, name)?,
            name,
        })
    }

    /// The cgroup's current epoch; `None` if it is not watched.
    pub(super) fn epoch_of(&self, cgroup_id: u64) -> Result<Option<u64>, BpfError> {
        match self.map.get(&cgroup_id, 0) {
            Ok(state) => Ok(Some(state.epoch)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err(self.name)(e)),
        }
    }

    /// Every watched cgroup id with its current epoch, in map order.
    pub(super) fn all(&self) -> Result<Vec<(u64, u64)>, BpfError> {
        self.map
            .iter()
            .map(|r| r.map(|(id, s)| (id, s.epoch)))
            .collect::<Result<_, _>>()
            .map_err(map_err(self.name))
    }

    fn set(&mut self, cgroup_id: u64, epoch: u64) -> Result<(), BpfError> {
        self.map
            .insert(cgroup_id, WatchState { epoch }, 0)
            .map_err(map_err(self.name))
    }

    /// Removes the cgroup; false if it was not watched.
    fn remove(&mut self, cgroup_id: u64) -> Result<bool, BpfError> {
        match self.map.remove(&cgroup_id) {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(map_err(self.name)(e)),
        }
    }
}

/// Maps holding records keyed by (cgroup, epoch) next to a [`WatchMap`]: the watch,
/// unwatch and epoch logic is the same for every such set of maps, only how records
/// are dropped differs.
pub(super) trait EpochRecords {
    /// The watch map.
    fn watch_map(&mut self) -> &mut WatchMap;

    /// Removes the records of `cgroup_id` whose epoch is below `keep_from`.
    fn drop_records(&mut self, cgroup_id: u64, keep_from: u64) -> Result<(), BpfError>;

    /// Starts counting the cgroup; returns its epoch (the current one if it is watched
    /// already).
    fn watch(&mut self, cgroup_id: u64) -> Result<u64, BpfError> {
        if let Some(epoch) = self.watch_map().epoch_of(cgroup_id)? {
            return Ok(epoch);
        }
        // Records an earlier watch left (e.g. a daemon killed mid-unwatch) must not
        // show up as this watch's.
        self.drop_records(cgroup_id, u64::MAX)?;
        self.watch_map().set(cgroup_id, 0)?;
        Ok(0)
    }

    /// Stops counting the cgroup and drops all its records; false if it was not
    /// watched.
    fn unwatch(&mut self, cgroup_id: u64) -> Result<bool, BpfError> {
        let was = self.watch_map().remove(cgroup_id)?;
        self.drop_records(cgroup_id, u64::MAX)?;
        Ok(was)
    }

    /// Starts the cgroup's next epoch; returns it. Fails if it is not watched.
    fn advance_epoch(&mut self, cgroup_id: u64) -> Result<u64, BpfError> {
        let epoch = self
            .watch_map()
            .epoch_of(cgroup_id)?
            .ok_or(BpfError::NotWatched { cgroup_id })?
            + 1;
        self.watch_map().set(cgroup_id, epoch)?;
        Ok(epoch)
    }

    /// Removes the records of the cgroup's epochs before its current one; nothing if
    /// it is not watched.
    fn drop_stale(&mut self, cgroup_id: u64) -> Result<(), BpfError> {
        let Some(epoch) = self.watch_map().epoch_of(cgroup_id)? else {
            return Ok(());
        };
        self.drop_records(cgroup_id, epoch)
    }
}
