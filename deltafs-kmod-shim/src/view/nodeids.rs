//! FUSE node ids of a view.
//!
//! A node id is the inode number, except for a file that had open handles when a switch
//! changed it: the kernel binds a passthrough backing file (and its page cache) to a node
//! id, so the open handles keep the old id (now *retired*, answering from the state they
//! were opened in) and the inode gets a fresh id for everything after the switch. To make
//! the kernel look the file up again, the entries handed out for the old id are
//! recorded (for regular files) and invalidated at the switch.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::sync::Arc;

use super::open::OpenEntry;
use crate::ids::Ino;
use crate::node::Node;

/// A node id kept for handles opened before a switch changed their file.
pub(crate) struct Retired {
    /// Its node in the state the handles were opened in.
    pub node: Arc<Node>,
    /// The open handles' shared state, until the last one is released.
    pub open: Option<OpenEntry>,
    /// The kernel forgot the id: it goes when its last handle does.
    pub forgotten: bool,
}

/// What a node id names now.
pub(crate) enum Resolved {
    /// An inode of the current index.
    Live(Ino),
    /// A retired id.
    Retired,
}

/// The node-id table of a view.
#[derive(Default)]
pub(crate) struct NodeIds {
    /// Inodes whose node id is not their number.
    remapped: HashMap<Ino, u64>,
    /// The reverse: node ids that are not inode numbers but name a current inode.
    aliases: HashMap<u64, Ino>,
    /// Retired node ids.
    pub retired: HashMap<u64, Retired>,
    /// Entries `(parent node id, name)` handed out for the node ids of regular files.
    names: HashMap<u64, HashSet<(u64, OsString)>>,
}

impl NodeIds {
    /// The node id of `ino`.
    pub fn nid(&self, ino: Ino) -> u64 {
        self.remapped.get(&ino).copied().unwrap_or(ino)
    }

    /// What node id `nid` names.
    pub fn resolve(&self, nid: u64) -> Resolved {
        if self.retired.contains_key(&nid) {
            Resolved::Retired
        } else {
            Resolved::Live(self.aliases.get(&nid).copied().unwrap_or(nid))
        }
    }

    /// Records that the kernel may have a dentry `parent/name` for `nid`.
    pub fn record_name(&mut self, nid: u64, parent: u64, name: &OsString) {
        let names = self.names.entry(nid).or_default();
        if !names.contains(&(parent, name.clone())) {
            names.insert((parent, name.clone()));
        }
    }

    /// The kernel dropped its inode for `nid`.
    pub fn forget(&mut self, nid: u64) {
        self.names.remove(&nid);
        if let Some(retired) = self.retired.get_mut(&nid) {
            if retired.open.is_none() {
                self.retired.remove(&nid);
            } else {
                retired.forgotten = true;
            }
        }
    }

    /// The last handle on retired id `nid` was released.
    pub fn released(&mut self, nid: u64) {
        if let Some(retired) = self.retired.get_mut(&nid) {
            retired.open = None;
            if retired.forgotten {
                self.retired.remove(&nid);
            }
        }
    }

    /// Retires the current node id of `ino` (keeping `node` and `open` for its handles)
    /// and gives `ino` the node id `new_nid`. Returns the old id and the entries handed
    /// out for it, which the caller invalidates in the kernel.
    pub fn retire(
        &mut self,
        ino: Ino,
        node: Arc<Node>,
        open: Option<OpenEntry>,
        new_nid: u64,
    ) -> (u64, HashSet<(u64, OsString)>) {
        let old = self.nid(ino);
        self.aliases.remove(&old);
        self.retired.insert(
            old,
            Retired {
                node,
                open,
                forgotten: false,
            },
        );
        self.remapped.insert(ino, new_nid);
        self.aliases.insert(new_nid, ino);
        (old, self.names.remove(&old).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::Kind;

    #[test]
    fn retiring_gives_a_new_id_and_returns_the_old_names() {
        let mut ids = NodeIds::default();
        assert_eq!(ids.nid(7), 7);
        ids.record_name(7, 1, &OsString::from("a"));
        ids.record_name(7, 1, &OsString::from("a"));
        let node = Arc::new(Node::new(Kind::File, 0o644, 0, 0));
        let (old, names) = ids.retire(7, node, None, 1000);
        assert_eq!(old, 7);
        assert_eq!(names.len(), 1);
        assert_eq!(ids.nid(7), 1000);
        assert!(matches!(ids.resolve(7), Resolved::Retired));
        assert!(matches!(ids.resolve(1000), Resolved::Live(7)));
        // The kernel forgets the old id: it goes away (no handle is open on it).
        ids.forget(7);
        assert!(ids.retired.is_empty());
        // Retiring again moves on from the alias.
        let node = Arc::new(Node::new(Kind::File, 0o644, 0, 0));
        let (old, _) = ids.retire(7, node, None, 2000);
        assert_eq!(old, 1000);
        assert!(matches!(ids.resolve(1000), Resolved::Retired));
        assert!(matches!(ids.resolve(2000), Resolved::Live(7)));
    }
}
