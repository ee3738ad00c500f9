//! A bpf pin directory of one test, unloaded when dropped.

use std::path::{Path, PathBuf};

use deltabox_controller::bpf::{self, PinnedTracker};

/// Programs loaded and pinned under `/sys/fs/bpf/<unique name>`; dropping it detaches
/// and unpins them.
pub struct TestPins {
    dir: PathBuf,
}

impl TestPins {
    /// A pin directory for `test`; nothing is loaded yet.
    pub fn new(test: &str) -> Self {
        let dir = PathBuf::from("/sys/fs/bpf").join(crate::unique(test));
        let _ = bpf::unload(&dir);
        Self { dir }
    }

    /// The pin directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Loads and pins the programs here and returns a tracker over them.
    pub fn load(&self) -> PinnedTracker {
        PinnedTracker::load(&self.dir)
            .unwrap_or_else(|e| panic!("load into {}: {e}", self.dir.display()))
    }
}

impl Drop for TestPins {
    fn drop(&mut self) {
        if let Err(e) = bpf::unload(&self.dir) {
            eprintln!("warning: unload {}: {e}", self.dir.display());
        }
    }
}
