//! Loads, pins, adopts and unloads the tracker's programs and maps with aya.
// (being written: interface first)

use std::path::{Path, PathBuf};

use super::{AttachedProgram, GlobalCounters, InodeRecord, WriteTracker};

/// Errors of the write tracker.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The cgroup is not in the watched set.
    #[error("cgroup {cgroup_id} is not watched")]
    NotWatched {
        /// The cgroup v2 id.
        cgroup_id: u64,
    },
    /// Nothing is pinned where programs were expected.
    #[error("no deltabox programs are pinned under {}: run `cargo xtask build-and-load` or start deltaboxd with loading enabled", pin_dir.display())]
    NotLoaded {
        /// The pin directory.
        pin_dir: PathBuf,
    },
}

/// How [`PinnedTracker::load_or_adopt`] got its programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Loaded and attached now.
    Loaded,
    /// Found pinned and adopted.
    Adopted,
}

/// The tracker over the pinned maps.
pub struct PinnedTracker {}

impl PinnedTracker {
    /// Loads the programs, attaches and pins them under `pin_dir`, replacing any
    /// previous deltabox pins there (no duplicate attachments).
    pub fn load(pin_dir: &Path) -> Result<Self, BpfError> {
        let _ = pin_dir;
        todo!()
    }
    /// Adopts programs and maps already pinned under `pin_dir`.
    pub fn adopt(pin_dir: &Path) -> Result<Self, BpfError> {
        let _ = pin_dir;
        todo!()
    }
    /// Adopts what is pinned, else loads.
    pub fn load_or_adopt(pin_dir: &Path) -> Result<(Self, Origin), BpfError> {
        let _ = pin_dir;
        todo!()
    }
    /// Where this tracker's objects are pinned.
    pub fn pin_dir(&self) -> &Path {
        todo!()
    }
    /// Reader of the programs' aya-log records (a ring buffer: poll its fd for
    /// readability, then `flush()` to emit the records through the `log` crate).
    pub fn logger(&self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, BpfError> {
        todo!()
    }
}

/// Detaches and unpins everything deltabox pinned under `pin_dir`; returns the
/// removed pin paths (empty when nothing was pinned).
pub fn unload(pin_dir: &Path) -> Result<Vec<PathBuf>, BpfError> {
    let _ = pin_dir;
    todo!()
}

impl WriteTracker for PinnedTracker {
    fn attached(&self) -> Result<Vec<AttachedProgram>, BpfError> {
        todo!()
    }
    fn watch(&self, cgroup_id: u64) -> Result<u64, BpfError> {
        let _ = cgroup_id;
        todo!()
    }
    fn unwatch(&self, cgroup_id: u64) -> Result<bool, BpfError> {
        let _ = cgroup_id;
        todo!()
    }
    fn watched(&self) -> Result<Vec<(u64, u64)>, BpfError> {
        todo!()
    }
    fn advance_epoch(&self, cgroup_id: u64) -> Result<u64, BpfError> {
        let _ = cgroup_id;
        todo!()
    }
    fn inode_stats(&self, cgroup_id: Option<u64>) -> Result<Vec<InodeRecord>, BpfError> {
        let _ = cgroup_id;
        todo!()
    }
    fn counters(&self) -> Result<GlobalCounters, BpfError> {
        todo!()
    }
}
