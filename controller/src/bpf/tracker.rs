//! [`PinnedTracker`]: the [`WriteTracker`] over the pinned maps.

use std::{
    collections::HashMap as StdHashMap,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
};

use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::{ProgramInfo, links::PinnedLink},
};
use deltabox_common::{Counter, InodeKey, InodeStats, map_names};

use super::{
    AttachedProgram, GlobalCounters, InodeRecord, WriteTracker,
    loader::{self, ATTACHMENTS, BpfError, LoadOptions},
    maps::{EpochRecords, WatchMap, is_not_found, map_err, open_counters, open_hash, sum_counter},
};

pub use deltabox_client::types::Origin;

struct Maps {
    watched: WatchMap,
    stats: HashMap<MapData, InodeKey, InodeStats>,
    counters: PerCpuArray<MapData, u64>,
}

/// The write tracker over the maps pinned under a pin directory.
pub struct PinnedTracker {
    pin_dir: PathBuf,
    // One lock for all maps: epoch changes read `watched` and rewrite `stats`.
    maps: Mutex<Maps>,
}

impl PinnedTracker {
    /// Loads the programs, attaches and pins them under `pin_dir`, replacing any
    /// previous deltabox pins there (no duplicate attachments).
    pub fn load(pin_dir: &Path) -> Result<Self, BpfError> {
        Self::load_with(pin_dir, LoadOptions::default())
    }

    /// [`load`](Self::load) with non-default options.
    pub fn load_with(pin_dir: &Path, options: LoadOptions) -> Result<Self, BpfError> {
        loader::load_and_pin(pin_dir, options)?;
        Self::adopt(pin_dir)
    }

    /// Adopts programs and maps already pinned under `pin_dir`.
    pub fn adopt(pin_dir: &Path) -> Result<Self, BpfError> {
        if !pin_dir.exists() {
            return Err(BpfError::NotLoaded {
                pin_dir: pin_dir.into(),
            });
        }
        if let Some(missing) = loader::missing_pin(pin_dir) {
            return Err(BpfError::Incomplete {
                pin_dir: pin_dir.into(),
                missing,
            });
        }
        let maps = Maps {
            watched: WatchMap::open(pin_dir, map_names::WATCHED)?,
            stats: open_hash(pin_dir, map_names::INODE_STATS)?,
            counters: open_counters(pin_dir)?,
        };
        Ok(Self {
            pin_dir: pin_dir.into(),
            maps: Mutex::new(maps),
        })
    }

    /// Adopts what is pinned, else loads. An incomplete pin directory is reloaded.
    pub fn load_or_adopt(pin_dir: &Path) -> Result<(Self, Origin), BpfError> {
        match Self::adopt(pin_dir) {
            Ok(tracker) => Ok((tracker, Origin::Adopted)),
            Err(BpfError::NotLoaded { .. } | BpfError::Incomplete { .. }) => {
                Ok((Self::load(pin_dir)?, Origin::Loaded))
            }
            Err(e) => Err(e),
        }
    }

    /// Where this tracker's objects are pinned.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Reader of the programs' aya-log records (a ring buffer: poll its fd for
    /// readability, then `flush()` to emit the records through the `log` crate).
    pub fn logger(&self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, BpfError> {
        self.logger_with(log::logger())
    }

    /// [`logger`](Self::logger) emitting into `logger` instead of the global one.
    pub fn logger_with<L: log::Log>(&self, logger: L) -> Result<aya_log::EbpfLogger<L>, BpfError> {
        let program = loader::PROGRAMS[0];
        let info = ProgramInfo::from_pin(loader::progs_dir(&self.pin_dir).join(program)).map_err(
            |source| BpfError::Program {
                program: program.into(),
                source,
            },
        )?;
        Ok(aya_log::EbpfLogger::init_from_id_with_logger(
            info.id(),
            logger,
        )?)
    }

    fn lock(&self) -> MutexGuard<'_, Maps> {
        // A panic while holding the lock cannot leave the kernel maps inconsistent
        // (each update is one syscall), so a poisoned lock is still usable.
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl EpochRecords for Maps {
    fn watch_map(&mut self) -> &mut WatchMap {
        &mut self.watched
    }

    /// Removes the counters of `cgroup_id` whose epoch is below `keep_from`.
    fn drop_records(&mut self, cgroup_id: u64, keep_from: u64) -> Result<(), BpfError> {
        let stale: Vec<InodeKey> = self
            .stats
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.cgroup_id == cgroup_id && k.epoch < keep_from)
            .collect();
        for key in stale {
            match self.stats.remove(&key) {
                Err(e) if !is_not_found(&e) => return Err(map_err(map_names::INODE_STATS)(e)),
                _ => {}
            }
        }
        Ok(())
    }
}

impl WriteTracker for PinnedTracker {
    fn attached(&self) -> Result<Vec<AttachedProgram>, BpfError> {
        ATTACHMENTS
            .iter()
            .map(|&(program, category, name)| {
                let file = loader::link_file(category, name);
                let path = loader::links_dir(&self.pin_dir).join(&file);
                let link_err = |source| BpfError::Link {
                    what: file.clone(),
                    source,
                };
                let link = PinnedLink::from_pin(&path).map_err(link_err)?;
                let info = aya::programs::links::FdLink::from(link)
                    .info()
                    .map_err(link_err)?;
                Ok(AttachedProgram {
                    name: program.into(),
                    tracepoint: format!("{category}:{name}"),
                    program_id: info.program_id(),
                    link_id: info.id(),
                    pinned_at: path,
                })
            })
            .collect()
    }

    fn watch(&self, cgroup_id: u64) -> Result<u64, BpfError> {
        self.lock().watch(cgroup_id)
    }

    fn unwatch(&self, cgroup_id: u64) -> Result<bool, BpfError> {
        self.lock().unwatch(cgroup_id)
    }

    fn watched(&self) -> Result<Vec<(u64, u64)>, BpfError> {
        let mut out = self.lock().watched.all()?;
        out.sort_unstable();
        Ok(out)
    }

    fn advance_epoch(&self, cgroup_id: u64) -> Result<u64, BpfError> {
        self.lock().advance_epoch(cgroup_id)
    }

    fn drop_stale_stats(&self, cgroup_id: u64) -> Result<(), BpfError> {
        self.lock().drop_stale(cgroup_id)
    }

    fn inode_stats(&self, cgroup_id: Option<u64>) -> Result<Vec<InodeRecord>, BpfError> {
        let maps = self.lock();
        let epochs: StdHashMap<u64, u64> = match cgroup_id {
            Some(id) => {
                let epoch = maps
                    .watched
                    .epoch_of(id)?
                    .ok_or(BpfError::NotWatched { cgroup_id: id })?;
                StdHashMap::from([(id, epoch)])
            }
            None => maps.watched.all()?.into_iter().collect(),
        };
        let mut out = Vec::new();
        for entry in maps.stats.iter() {
            let (key, stats) = match entry {
                Ok(kv) => kv,
                // Deleted by the kernel side between key and value lookup.
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(map_err(map_names::INODE_STATS)(e)),
            };
            if epochs.get(&key.cgroup_id) != Some(&key.epoch) {
                continue;
            }
            out.push(InodeRecord {
                cgroup_id: key.cgroup_id,
                ino: key.ino,
                epoch: key.epoch,
                name: String::from_utf8_lossy(stats.name_bytes()).into_owned(),
                writes: stats.writes,
                bytes: stats.bytes,
                pages_dirtied: stats.pages_dirtied,
            });
        }
        out.sort_by_key(|r| (r.cgroup_id, r.ino));
        Ok(out)
    }

    fn counters(&self) -> Result<GlobalCounters, BpfError> {
        let maps = self.lock();
        let sum = |c: Counter| sum_counter(&maps.counters, c);
        Ok(GlobalCounters {
            write_syscalls: sum(Counter::WriteSyscalls)?,
            dirtied_folios: sum(Counter::DirtiedFolios)?,
            stats_full: sum(Counter::StatsFull)?,
            fd_unresolved: sum(Counter::FdUnresolved)?,
        })
    }
}
