//! The nodes' dumps on disk (`<data_dir>/dumps/<node>-<session>/`, and
//! `<node>-pid<pid>/` for a node's other processes, written by DeltaCR's dump worker):
//! removed with their nodes, and swept by `gc` when their node is gone.
//!
//! A dump may read pages from its parent node's dump, never the other way round, and a
//! node is only ever removed with its whole subtree: so deleting the dumps of removed
//! nodes never breaks a dump that stays.

use std::collections::HashSet;
use std::fs;

use super::{SandboxManager, db_err};
use crate::sandbox::error::SandboxError;
use crate::tree::ids::NodeId;

/// Length of a node id in a dump's name (a hyphenated UUID).
const NODE_ID_LEN: usize = 36;

impl SandboxManager {
    /// Deletes the dumps of `nodes`; returns how many dump directories went.
    pub(super) fn delete_dumps(&self, nodes: &[NodeId]) -> usize {
        let nodes: HashSet<String> = nodes.iter().map(ToString::to_string).collect();
        self.remove_dumps(|node| nodes.contains(node))
    }

    /// Deletes the dumps whose node is not in the database any more (removed while its
    /// dump was being written, or by a daemon that did not delete dumps).
    pub(super) fn sweep_dumps(&self) -> Result<usize, SandboxError> {
        let mut known = HashSet::new();
        for tree in self.db.trees().map_err(db_err)? {
            for node in self.db.nodes(&tree.id).map_err(db_err)? {
                known.insert(node.id.to_string());
            }
        }
        Ok(self.remove_dumps(|node| !known.contains(node)))
    }

    /// Removes each complete dump directory whose node id `doomed` says goes.
    fn remove_dumps(&self, doomed: impl Fn(&str) -> bool) -> usize {
        let root = self.dumps_root();
        let Ok(entries) = fs::read_dir(&root) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(node) = node_of(&name.to_string_lossy()) else {
                continue;
            };
            if doomed(&node) {
                match fs::remove_dir_all(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(e) => tracing::warn!(dump = %entry.path().display(), "removing it: {e}"),
                }
            }
        }
        removed
    }
}

/// The node id of dump directory `name` (`<node>-<session>`); `None` for anything else
/// (a dump still being written, `.tmp-…`, is the worker's).
fn node_of(name: &str) -> Option<String> {
    let node = name.get(..NODE_ID_LEN)?;
    let rest = name.get(NODE_ID_LEN..)?;
    (rest.starts_with('-') && node.parse::<NodeId>().is_ok()).then(|| node.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_names_give_their_node() {
        let node = NodeId::new().to_string();
        let session = NodeId::new().to_string();
        assert_eq!(node_of(&format!("{node}-{session}")), Some(node.clone()));
        // A node's other process's dump goes with its node too.
        let process = crate::cr::dump::process_dump_name(&node, 4242);
        assert_eq!(process, format!("{node}-pid4242"));
        assert_eq!(node_of(&process), Some(node.clone()));
        assert_eq!(node_of(&format!(".tmp-{node}-{session}")), None);
        assert_eq!(node_of("short"), None);
        assert_eq!(node_of(&format!("{node}x{session}")), None);
    }
}
