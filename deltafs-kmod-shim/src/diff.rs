//! What changed between two snapshots of one base ([`Change`]), and the disk bytes a
//! snapshot's own layer holds ([`layer_bytes`]).
//!
//! A diff never walks the tree. The inodes and `(directory, name)` entries that can differ
//! between two snapshots are the union of the deltas on the path between them through
//! their common ancestor (as for a switch); only those are compared, in each snapshot's
//! index. Paths are found upwards: a directory's through its `parent` inode, a changed
//! file's through the entries that name it — first those in the deltas between the two
//! snapshots, then its base path, then the deltas of the common ancestor's chain, newest
//! first, until its link count of names is found. Base directories are read only along
//! those paths. `docs/deltafs.md` ("Diff and bytes") states what is reported.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::base::BaseTree;
use crate::ids::{BASE_INO_FLAG, Ino, ROOT_INO, SnapshotId};
use crate::index::{Delta, Index};
use crate::layer::Layers;
use crate::node::{Bytes, DataRef, Kind, Node};
use crate::store::{StoreError, StoreState};

/// Failures of diffs and layer measurements.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// The two snapshots are over different base trees: their inodes are unrelated.
    #[error(
        "cannot diff snapshot {from} (base {from_base}) with snapshot {to} (base {to_base}): \
         they are over different bases"
    )]
    DifferentBases {
        /// The snapshot diffed from.
        from: SnapshotId,
        /// Its base.
        from_base: PathBuf,
        /// The snapshot diffed to.
        to: SnapshotId,
        /// Its base.
        to_base: PathBuf,
    },
    /// A layer directory or one of its files could not be measured.
    #[error("cannot measure {path}")]
    Measure {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// How a path differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// The path exists only in the older snapshot (`from`). Sorts before `Added`, so a
    /// path whose file type changed lists its removal first.
    Removed,
    /// The path exists only in the newer snapshot (`to`).
    Added,
    /// The path exists in both and what it names changed (see [`Changed`]).
    Modified,
}

/// The type of the file a change is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileType {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// FIFO, socket or device node.
    Other,
}

impl From<Kind> for FileType {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::File => Self::File,
            Kind::Dir => Self::Dir,
            Kind::Symlink => Self::Symlink,
            _ => Self::Other,
        }
    }
}

/// What a [`ChangeKind::Modified`] change changed (all false for added and removed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Changed {
    /// The data: another backing file (a write copies up; identity, not bytes, is
    /// compared), another file under the name, or a device number.
    pub content: bool,
    /// Permission bits.
    pub mode: bool,
    /// Owner or group.
    pub owner: bool,
    /// A symlink's target.
    pub target: bool,
    /// Extended attributes.
    pub xattrs: bool,
}

impl Changed {
    /// What differs from `old` to `new`; times and link counts are not compared, nor a
    /// directory's entries (they are reported as their own paths).
    pub fn between(old: &Node, new: &Node) -> Self {
        Self {
            content: new.kind != Kind::Dir && (old.data != new.data || old.rdev != new.rdev),
            mode: old.perm != new.perm,
            owner: old.uid != new.uid || old.gid != new.gid,
            target: old.target != new.target,
            xattrs: old.xattrs != new.xattrs,
        }
    }

    /// True when anything is flagged.
    pub fn any(&self) -> bool {
        self.content || self.mode || self.owner || self.target || self.xattrs
    }
}

/// One path that differs between two snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub struct Change {
    /// The path from the view's root, starting with `/` (`/workspace/a.py`; `/` is the
    /// root itself). Serialized as a string when UTF-8, else as an array of bytes.
    #[serde(with = "path_bytes")]
    pub path: PathBuf,
    /// Added, removed or modified.
    pub kind: ChangeKind,
    /// The file's type (in `to`, or in `from` for a removal).
    pub file_type: FileType,
    /// For a modification, what changed.
    #[serde(default)]
    pub changed: Changed,
}

mod path_bytes {
    use std::ffi::OsString;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::path::{Path, PathBuf};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::node::Bytes;

    pub fn serialize<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
        Bytes(path.as_os_str().as_bytes().to_vec()).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        Ok(PathBuf::from(OsString::from_vec(Bytes::deserialize(d)?.0)))
    }
}

/// Disk bytes a layer directory holds: the allocated blocks (`st_blocks * 512`) of its
/// backing files and metadata files and of the directory itself. A layer that was never
/// created (an epoch that wrote nothing, before its metadata is written) holds 0.
/// Extents a file shares with another through a reflink count in full here.
pub fn layer_bytes(dir: &Path) -> Result<u64, DiffError> {
    use std::os::unix::fs::MetadataExt;
    let measure_err = |path: &Path| {
        let path = path.to_owned();
        move |source| DiffError::Measure { path, source }
    };
    let meta = match fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(measure_err(dir)(e)),
    };
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for entry in fs::read_dir(dir).map_err(measure_err(dir))? {
            let entry = entry.map_err(measure_err(dir))?;
            // A temporary metadata file may be renamed away meanwhile: skip it.
            match layer_bytes(&entry.path()) {
                Ok(bytes) => total += bytes,
                Err(DiffError::Measure { source, .. })
                    if source.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(total)
}

/// What a diff needs, taken under the store's lock (then released: the comparison reads
/// base directories and old deltas, and must not stall freezes meanwhile).
pub(crate) struct Plan {
    from: Index,
    to: Index,
    base: Arc<BaseTree>,
    /// The union of the deltas between the two snapshots.
    candidates: Delta,
    /// The common ancestor and its ancestors, newest first: where the names of files
    /// changed in place between the two snapshots were made.
    older: Vec<SnapshotId>,
}

impl Plan {
    /// The indexes of `from` (or the bare base) and `to`, and the deltas between them.
    pub(crate) fn gather(
        state: &mut StoreState,
        layers: &Layers,
        from: Option<SnapshotId>,
        to: SnapshotId,
    ) -> Result<Self, StoreError> {
        let base_path = state
            .snapshots
            .get(&to)
            .ok_or(StoreError::UnknownSnapshot(to))?
            .base
            .clone();
        if let Some(from) = from {
            let from_base = &state
                .snapshots
                .get(&from)
                .ok_or(StoreError::UnknownSnapshot(from))?
                .base;
            if *from_base != base_path {
                return Err(DiffError::DifferentBases {
                    from,
                    from_base: from_base.clone(),
                    to,
                    to_base: base_path,
                }
                .into());
            }
        }
        let to_index = state.index_of(layers, to, &base_path)?;
        let base = state.base(&base_path)?;
        let from_index = match from {
            Some(from) => state.index_of(layers, from, &base_path)?,
            None => Index::new(base.root_node()),
        };
        let parent = |state: &StoreState, id: SnapshotId| {
            state
                .snapshots
                .get(&id)
                .map(|s| s.parent)
                .ok_or(StoreError::UnknownSnapshot(id))
        };
        let mut from_chain = Vec::new();
        let mut cur = from;
        while let Some(id) = cur {
            from_chain.push(id);
            cur = parent(state, id)?;
        }
        let from_set: HashSet<SnapshotId> = from_chain.iter().copied().collect();
        let mut candidates = Delta::default();
        let mut common = None;
        let mut cur = Some(to);
        while let Some(id) = cur {
            if from_set.contains(&id) {
                common = Some(id);
                break;
            }
            candidates.extend(&*state.delta_of(layers, id)?);
            cur = parent(state, id)?;
        }
        for id in from_chain {
            if Some(id) == common {
                break;
            }
            candidates.extend(&*state.delta_of(layers, id)?);
        }
        let mut older = Vec::new();
        let mut cur = common;
        while let Some(id) = cur {
            older.push(id);
            cur = parent(state, id)?;
        }
        Ok(Self {
            from: from_index,
            to: to_index,
            base,
            candidates,
            older,
        })
    }

    /// The changes, sorted by path (bytewise). `older_delta` gives the delta of an
    /// ancestor snapshot (it takes the store's lock, and may read `delta.json`).
    pub(crate) fn changes(
        self,
        older_delta: impl FnMut(SnapshotId) -> Result<Arc<Delta>, StoreError>,
    ) -> Result<Vec<Change>, StoreError> {
        if self.candidates.is_empty() {
            return Ok(Vec::new());
        }
        let mut differ = Differ {
            sides: [Side::new(self.from), Side::new(self.to)],
            base: self.base,
            out: Vec::new(),
            reported: HashSet::new(),
        };
        differ.entries(&self.candidates);
        differ.nodes(&self.candidates, &self.older, older_delta)?;
        let mut out = differ.out;
        out.sort_by(|a, b| {
            (a.path.as_os_str().as_bytes(), a.kind).cmp(&(b.path.as_os_str().as_bytes(), b.kind))
        });
        out.dedup();
        Ok(out)
    }
}

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

struct Differ {
    sides: [Side; 2],
    base: Arc<BaseTree>,
    out: Vec<Change>,
    /// Paths reported from entries: a file found there is not reported again.
    reported: HashSet<Vec<u8>>,
}

/// The inode and name of one directory entry.
type Name = (Ino, OsString);

impl Differ {
    /// Step 1: entries that name another inode (or none) in the two snapshots.
    fn entries(&mut self, candidates: &Delta) {
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
    fn nodes(
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
