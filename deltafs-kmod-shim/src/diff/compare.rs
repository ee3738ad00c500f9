//! The comparison of two snapshots' indexes: entries that name another inode, then
//! inodes whose node changed, each reported at its path (found upwards, see the parent
//! module).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::sync::Arc;

use super::{Change, ChangeKind, Changed, FileType};
use crate::base::BaseTree;
use crate::ids::{BASE_INO_FLAG, Ino, ROOT_INO, SnapshotId};
use crate::index::{Delta, Index};
use crate::node::{Bytes, DataRef, Kind, Node};
use crate::store::StoreError;

/// The side of a diff: the older snapshot or the newer one.
const FROM: usize = 0;
const TO: usize = 1;

/// One snapshot's index (a private clone: reading base directories into it changes no
/// one else's) and the paths of its directories found so far.
struct Side {
    index: Index,
    dir_paths: HashMap<Ino, Option<Vec<u8>>>,
}

impl Side {
    fn new(index: Index) -> Self {
        Self {
            index,
            dir_paths: HashMap::new(),
        }
    }
}

/// A comparison in progress: both sides and the changes found.
pub(super) struct Differ {
    sides: [Side; 2],
    base: Arc<BaseTree>,
    out: Vec<Change>,
    /// Paths reported from entries: a file found there is not reported again.
    reported: HashSet<Vec<u8>>,
}

/// The inode and name of one directory entry.
type Name = (Ino, OsString);

impl Differ {
    /// A comparison from index `from` to index `to`, both over `base`.
    pub(super) fn new(from: Index, to: Index, base: Arc<BaseTree>) -> Self {
        Self {
            sides: [Side::new(from), Side::new(to)],
            base,
            out: Vec::new(),
            reported: HashSet::new(),
        }
    }

    /// The changes found (unsorted).
    pub(super) fn into_changes(self) -> Vec<Change> {
        self.out
    }

    /// Step 1: entries that name another inode (or none) in the two snapshots.
    pub(super) fn entries(&mut self, candidates: &Delta) {
        let mut entries: Vec<_> = candidates.entries.iter().collect();
        entries.sort();
        for (dir, name) in entries {
            let (old, new) = (self.entry(FROM, *dir, name), self.entry(TO, *dir, name));
            if old == new {
                continue;
            }
            let old = old.and_then(|ino| self.sides[FROM].index.node(ino).cloned());
            let new = new.and_then(|ino| self.sides[TO].index.node(ino).cloned());
            match (old, new) {
                (Some(old), Some(new)) if old.kind == new.kind && old.kind != Kind::Dir => {
                    // Another inode of the same type under the name (a rename over it).
                    let mut changed = Changed::between(&old, &new);
                    changed.content |= new.kind == Kind::File;
                    if changed.any() {
                        self.push(TO, *dir, name, ChangeKind::Modified, new.kind, changed);
                    }
                }
                (old, new) => {
                    if let Some(old) = old {
                        let kind = ChangeKind::Removed;
                        self.push(FROM, *dir, name, kind, old.kind, Changed::default());
                    }
                    if let Some(new) = new {
                        let kind = ChangeKind::Added;
                        self.push(TO, *dir, name, kind, new.kind, Changed::default());
                    }
                }
            }
        }
    }

    /// Step 2: inodes whose node changed, reported under their names in `to`.
    pub(super) fn nodes(
        &mut self,
        candidates: &Delta,
        older: &[SnapshotId],
        mut older_delta: impl FnMut(SnapshotId) -> Result<Arc<Delta>, StoreError>,
    ) -> Result<(), StoreError> {
        let mut inos: Vec<Ino> = candidates.nodes.iter().copied().collect();
        inos.sort_unstable();
        // Non-directories to find names for: node in `from` (if already known), in `to`.
        let mut pending: BTreeMap<Ino, (Option<Arc<Node>>, Arc<Node>)> = BTreeMap::new();
        for ino in inos {
            let Some(new) = self.node(TO, ino) else {
                continue;
            };
            let old = self.node(FROM, ino);
            if let Some(old) = &old
                && (Arc::ptr_eq(old, &new) || !Changed::between(old, &new).any())
            {
                continue;
            }
            if new.kind == Kind::Dir {
                // Not in `from`: added, which its entry reports.
                let Some(old) = old else { continue };
                match self.dir_path(TO, ino) {
                    Some(path) if !self.reported.contains(&path) => {
                        let path = if path.is_empty() { b"/".to_vec() } else { path };
                        self.out.push(Change {
                            path: PathBuf::from(OsString::from_vec(path)),
                            kind: ChangeKind::Modified,
                            file_type: FileType::Dir,
                            changed: Changed::between(&old, &new),
                        });
                    }
                    Some(_) => {}
                    None => log::warn!("deltafs: diff: no path for changed directory {ino}"),
                }
                continue;
            }
            // A layer inode missing from `from` was created after it: its entry reports
            // it. A base inode may just not have been read into `from` yet.
            if old.is_some() || ino & BASE_INO_FLAG != 0 {
                pending.insert(ino, (old, new));
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        let names = self.names(&pending, candidates, older, &mut older_delta)?;
        for (ino, (old, new)) in pending {
            let Some(found) = names.get(&ino).filter(|n| !n.is_empty()) else {
                log::warn!("deltafs: diff: no name found for changed inode {ino}");
                continue;
            };
            for (dir, name) in found {
                let Some(path) = self.entry_path(TO, *dir, name) else {
                    continue;
                };
                if self.reported.contains(&path) {
                    continue;
                }
                let old = match &old {
                    Some(old) => Arc::clone(old),
                    // Not read into `from`: it is the one `from` has under this name, if any.
                    None => match self.entry(FROM, *dir, name) {
                        Some(i) if i == ino => match self.node(FROM, ino) {
                            Some(old) => old,
                            None => continue,
                        },
                        _ => continue,
                    },
                };
                let changed = Changed::between(&old, &new);
                if changed.any() {
                    self.out.push(Change {
                        path: PathBuf::from(OsString::from_vec(path)),
                        kind: ChangeKind::Modified,
                        file_type: new.kind.into(),
                        changed,
                    });
                }
            }
        }
        Ok(())
    }

    /// The names in `to` of the pending inodes, up to each one's link count.
    fn names(
        &mut self,
        pending: &BTreeMap<Ino, (Option<Arc<Node>>, Arc<Node>)>,
        candidates: &Delta,
        older: &[SnapshotId],
        older_delta: &mut impl FnMut(SnapshotId) -> Result<Arc<Delta>, StoreError>,
    ) -> Result<HashMap<Ino, Vec<Name>>, StoreError> {
        let mut names: HashMap<Ino, Vec<Name>> = HashMap::new();
        let missing = |names: &HashMap<Ino, Vec<Name>>, ino: Ino, node: &Node| {
            names.get(&ino).map_or(0, Vec::len) < node.nlink.max(1) as usize
        };
        let add = |names: &mut HashMap<Ino, Vec<Name>>, ino: Ino, name: Name| {
            let found = names.entry(ino).or_default();
            if !found.contains(&name) {
                found.push(name);
            }
        };
        // Entries changed between the two snapshots.
        let mut entries: Vec<_> = candidates.entries.iter().collect();
        entries.sort();
        for (dir, name) in entries {
            if let Some(ino) = self.entry(TO, *dir, name)
                && pending.contains_key(&ino)
            {
                add(&mut names, ino, (*dir, name.clone()));
            }
        }
        // The base path (a base file not yet copied up, in either snapshot), and the
        // directory this process first read the base file from.
        for (&ino, (old, new)) in pending {
            for node in old.iter().chain(std::iter::once(new)) {
                if !missing(&names, ino, new) {
                    break;
                }
                if let Some(DataRef::Base(rel)) = &node.data
                    && let Some(found) = self.base_name(rel, ino)
                {
                    add(&mut names, ino, found);
                }
            }
            if missing(&names, ino, new)
                && let Some(dir) = self.base.parent_of(ino)
            {
                for name in self.names_in(TO, dir, ino) {
                    add(&mut names, ino, (dir, name));
                }
            }
        }
        // The deltas that made the names, newest first.
        for &id in older {
            if !pending
                .iter()
                .any(|(&ino, (_, new))| missing(&names, ino, new))
            {
                break;
            }
            let delta = older_delta(id)?;
            let mut entries: Vec<_> = delta.entries.iter().collect();
            entries.sort();
            for (dir, name) in entries {
                if let Some(ino) = self.entry(TO, *dir, name)
                    && let Some((_, new)) = pending.get(&ino)
                    && missing(&names, ino, new)
                {
                    add(&mut names, ino, (*dir, name.clone()));
                }
            }
        }
        Ok(names)
    }

    /// The entry naming `ino` at base path `rel` in `to`, if it still names it.
    fn base_name(&mut self, rel: &Bytes, ino: Ino) -> Option<Name> {
        let rel = &rel.0;
        let (dir_rel, name) = match rel.iter().rposition(|&c| c == b'/') {
            Some(slash) => (&rel[..slash], &rel[slash + 1..]),
            None => (&rel[..0], &rel[..]),
        };
        let dir = self.resolve(TO, dir_rel)?;
        let name = OsStr::from_bytes(name);
        (self.entry(TO, dir, name) == Some(ino)).then(|| (dir, name.to_owned()))
    }

    /// Records a change of the entry `name` of `dir`, at its path in `side`.
    fn push(
        &mut self,
        side: usize,
        dir: Ino,
        name: &OsStr,
        kind: ChangeKind,
        file: Kind,
        changed: Changed,
    ) {
        let Some(path) = self.entry_path(side, dir, name) else {
            log::warn!("deltafs: diff: no path for directory {dir} (entry {name:?})");
            return;
        };
        self.reported.insert(path.clone());
        self.out.push(Change {
            path: PathBuf::from(OsString::from_vec(path)),
            kind,
            file_type: file.into(),
            changed,
        });
    }

    /// The node of `ino` in `side`. A base inode the side never read (an index rebuilt
    /// from disk reads only what its deltas touch) is found through the base path the
    /// other side's node records, which reads the base directories on that path only.
    fn node(&mut self, side: usize, ino: Ino) -> Option<Arc<Node>> {
        let base = Arc::clone(&self.base);
        if let Some(node) = self.sides[side].index.ensure_node(ino, &base) {
            return Some(node);
        }
        if ino & BASE_INO_FLAG == 0 {
            return None;
        }
        let hint = self.sides[1 - side].index.node(ino).cloned()?;
        let Some(DataRef::Base(rel)) = &hint.data else {
            return None;
        };
        self.resolve(side, &rel.0)?;
        self.sides[side].index.ensure_node(ino, &base)
    }

    /// The inode at path `rel` (relative, `/`-separated) in `side`.
    fn resolve(&mut self, side: usize, rel: &[u8]) -> Option<Ino> {
        let mut cur = ROOT_INO;
        for part in rel.split(|&c| c == b'/').filter(|p| !p.is_empty()) {
            cur = self.entry(side, cur, OsStr::from_bytes(part))?;
        }
        Some(cur)
    }

    /// What `name` in directory `dir` names in `side`.
    fn entry(&mut self, side: usize, dir: Ino, name: &OsStr) -> Option<Ino> {
        let base = Arc::clone(&self.base);
        if self.sides[side].index.node(dir).is_none() {
            self.node(side, dir)?;
        }
        let entries = self.sides[side].index.ensure_dir(dir, &base).ok()?;
        entries.get(name).copied()
    }

    /// The names of `ino` in directory `dir` of `side` (a scan of that one directory).
    fn names_in(&mut self, side: usize, dir: Ino, ino: Ino) -> Vec<OsString> {
        let base = Arc::clone(&self.base);
        if self.node(side, dir).is_none() {
            return Vec::new();
        }
        match self.sides[side].index.ensure_dir(dir, &base) {
            Ok(entries) => entries
                .iter()
                .filter(|(_, i)| **i == ino)
                .map(|(name, _)| name.clone())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// `/path/of/dir/name` in `side`.
    fn entry_path(&mut self, side: usize, dir: Ino, name: &OsStr) -> Option<Vec<u8>> {
        let mut path = self.dir_path(side, dir)?;
        path.push(b'/');
        path.extend_from_slice(name.as_bytes());
        Some(path)
    }

    /// The path of directory `dir` in `side` (empty for the root), by its parents.
    fn dir_path(&mut self, side: usize, dir: Ino) -> Option<Vec<u8>> {
        if dir == ROOT_INO {
            return Some(Vec::new());
        }
        if let Some(path) = self.sides[side].dir_paths.get(&dir) {
            return path.clone();
        }
        let path = self.find_dir_path(side, dir);
        self.sides[side].dir_paths.insert(dir, path.clone());
        path
    }

    fn find_dir_path(&mut self, side: usize, dir: Ino) -> Option<Vec<u8>> {
        let node = self.node(side, dir)?;
        if node.kind != Kind::Dir {
            return None;
        }
        // A base directory still where the base has it: its base path, no scan.
        if let Some(DataRef::Base(rel)) = &node.data
            && !rel.0.is_empty()
            && self.resolve(side, &rel.0) == Some(dir)
        {
            let mut path = vec![b'/'];
            path.extend_from_slice(&rel.0);
            return Some(path);
        }
        let parent = node.parent;
        if parent == 0 || parent == dir {
            return None;
        }
        let name = self.names_in(side, parent, dir).into_iter().next()?;
        self.entry_path(side, parent, &name)
    }
}
