//! [`TreeDb`]: the checkpoint tree's records in one redb file.
//!
//! Every write is one redb write transaction committed with `Durability::Immediate`
//! (redb fsyncs before `commit` returns), so a record the daemon has acknowledged
//! survives a SIGKILL of the daemon or a power cut. Indexes (parent → children,
//! tree → nodes) are written in the same transaction as the node they index.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use redb::{
    Database, Durability, MultimapTableDefinition, ReadableMultimapTable, ReadableTable,
    TableDefinition, WriteTransaction,
};
use serde::de::DeserializeOwned;

use super::error::TreeDbError;
use super::file::{DbFile, OpenError};
use super::ids::{self, NodeId, PrefixMatch, SandboxId, TreeId};
use super::records::{self, NodePlace, NodeRecord, RecordError, SandboxRecord, TreeRecord};

/// The layout of tables and indexes this build reads and writes (records carry their
/// own version, see [`records::RECORD_VERSION`]).
pub const SCHEMA_VERSION: u32 = 1;

const META: TableDefinition<&str, u32> = TableDefinition::new("meta");
const TREES: TableDefinition<&str, &str> = TableDefinition::new("trees");
const SANDBOXES: TableDefinition<&str, &str> = TableDefinition::new("sandboxes");
const NODES: TableDefinition<&str, &str> = TableDefinition::new("nodes");
/// parent node → child node.
const CHILDREN: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("children");
/// tree → node.
const TREE_NODES: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("tree_nodes");

/// redb's page cache; the tree's metadata is small.
const CACHE_BYTES: usize = 16 << 20;

/// One write of a [`TreeDb::commit`] batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Insert or replace a sandbox.
    PutSandbox(SandboxRecord),
    /// Insert or replace a node (its parent and tree never change).
    PutNode(NodeRecord),
    /// Delete a node; its children stay and become orphans. No-op if absent.
    DeleteNode(NodeId),
    /// Delete a sandbox. No-op if absent.
    DeleteSandbox(SandboxId),
    /// Insert or replace a tree.
    PutTree(TreeRecord),
    /// Delete a tree record (not its nodes). No-op if absent.
    DeleteTree(TreeId),
}

/// The checkpoint tree's database: trees, sandboxes and nodes. `Send + Sync`; writes
/// are serialised by redb, reads run concurrently on snapshots.
pub struct TreeDb {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for TreeDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TreeDb").field("path", &self.path).finish()
    }
}

type Result<T> = std::result::Result<T, TreeDbError>;

impl TreeDb {
    /// Opens the database at `path`, creating it (and its tables) if absent. Fails with
    /// [`TreeDbError::Locked`] if another handle has it open (redb takes an exclusive
    /// `flock`, released when that process dies, even by SIGKILL), and with
    /// [`TreeDbError::Corrupt`] if the file is not a redb database. A file left by a
    /// killed process is repaired by redb on open; committed transactions are kept.
    pub fn open(path: &Path) -> Result<Self> {
        let file = DbFile::open(path).map_err(|e| match e {
            OpenError::Locked => TreeDbError::Locked {
                path: path.to_owned(),
            },
            OpenError::Io(source) => TreeDbError::Open {
                path: path.to_owned(),
                source: Box::new(redb::DatabaseError::Storage(redb::StorageError::Io(source))),
            },
        })?;
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create_with_backend(file)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => TreeDbError::Locked {
                    path: path.to_owned(),
                },
                redb::DatabaseError::Storage(redb::StorageError::Corrupted(detail)) => {
                    TreeDbError::Corrupt {
                        path: path.to_owned(),
                        detail,
                    }
                }
                // redb reports a bad magic number or header as InvalidData.
                redb::DatabaseError::Storage(redb::StorageError::Io(io))
                    if io.kind() == std::io::ErrorKind::InvalidData =>
                {
                    TreeDbError::Corrupt {
                        path: path.to_owned(),
                        detail: io.to_string(),
                    }
                }
                source => TreeDbError::Open {
                    path: path.to_owned(),
                    source: Box::new(source),
                },
            })?;
        let this = Self {
            db,
            path: path.to_owned(),
        };
        this.init_schema()?;
        Ok(this)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn init_schema(&self) -> Result<()> {
        let txn = self.begin_write()?;
        let found = {
            let mut meta = txn.open_table(META).map_err(self.err("open meta"))?;
            let found = meta
                .get("schema")
                .map_err(self.err("read schema"))?
                .map(|v| v.value());
            if found.is_none() {
                meta.insert("schema", SCHEMA_VERSION)
                    .map_err(self.err("write schema"))?;
            }
            for t in [TREES, SANDBOXES, NODES] {
                txn.open_table(t).map_err(self.err("create table"))?;
            }
            for t in [CHILDREN, TREE_NODES] {
                txn.open_multimap_table(t)
                    .map_err(self.err("create table"))?;
            }
            found
        };
        match found {
            Some(found) if found != SCHEMA_VERSION => Err(TreeDbError::Schema {
                path: self.path.clone(),
                found,
            }),
            _ => txn.commit().map_err(self.err("commit schema")),
        }
    }

    /// Inserts or replaces a tree.
    pub fn put_tree(&self, t: &TreeRecord) -> Result<()> {
        self.commit(&[Op::PutTree(t.clone())])
    }

    /// Every tree, in creation order.
    pub fn trees(&self) -> Result<Vec<TreeRecord>> {
        let mut v: Vec<TreeRecord> = self.all(TREES, "trees")?;
        v.sort_by_key(|t| (t.created_ms, t.id));
        Ok(v)
    }

    /// Deletes a tree record (its nodes and sandboxes are deleted separately).
    pub fn delete_tree(&self, id: &TreeId) -> Result<()> {
        self.commit(&[Op::DeleteTree(*id)])
    }

    /// Inserts or replaces a sandbox; its head, if any, must be a stored node of its tree.
    pub fn put_sandbox(&self, s: &SandboxRecord) -> Result<()> {
        self.commit(&[Op::PutSandbox(s.clone())])
    }

    /// The sandbox `id`, if stored.
    pub fn sandbox(&self, id: &SandboxId) -> Result<Option<SandboxRecord>> {
        let txn = self.db.begin_read().map_err(self.err("begin read"))?;
        let t = txn
            .open_table(SANDBOXES)
            .map_err(self.err("open sandboxes"))?;
        self.get(&t, "sandboxes", &id.to_string())
    }

    /// Every sandbox, in creation order.
    pub fn sandboxes(&self) -> Result<Vec<SandboxRecord>> {
        let mut v: Vec<SandboxRecord> = self.all(SANDBOXES, "sandboxes")?;
        v.sort_by_key(|s| (s.created_ms, s.id));
        Ok(v)
    }

    /// Deletes a sandbox.
    pub fn delete_sandbox(&self, id: &SandboxId) -> Result<()> {
        self.commit(&[Op::DeleteSandbox(*id)])
    }

    /// Inserts or replaces a node; a new node's parent must be stored, in the same tree.
    pub fn put_node(&self, n: &NodeRecord) -> Result<()> {
        self.commit(&[Op::PutNode(n.clone())])
    }

    /// The node `id`, if stored.
    pub fn node(&self, id: &NodeId) -> Result<Option<NodeRecord>> {
        let txn = self.db.begin_read().map_err(self.err("begin read"))?;
        let t = txn.open_table(NODES).map_err(self.err("open nodes"))?;
        self.get(&t, "nodes", &id.to_string())
    }

    /// Every node of `tree`, in creation order.
    pub fn nodes(&self, tree: &TreeId) -> Result<Vec<NodeRecord>> {
        self.indexed(TREE_NODES, &tree.to_string())
    }

    /// The children of node `id`, in creation order.
    pub fn children(&self, id: &NodeId) -> Result<Vec<NodeRecord>> {
        self.indexed(CHILDREN, &id.to_string())
    }

    /// Node `id` and all its descendants, depth first (each node before its children,
    /// siblings in creation order); empty if `id` is not stored.
    pub fn subtree(&self, id: &NodeId) -> Result<Vec<NodeRecord>> {
        let txn = self.db.begin_read().map_err(self.err("begin read"))?;
        let nodes = txn.open_table(NODES).map_err(self.err("open nodes"))?;
        let children = txn
            .open_multimap_table(CHILDREN)
            .map_err(self.err("open children"))?;
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut stack: Vec<NodeRecord> = self
            .get(&nodes, "nodes", &id.to_string())?
            .into_iter()
            .collect();
        while let Some(n) = stack.pop() {
            if !seen.insert(n.id) {
                continue;
            }
            let mut kids = self.lookup(&nodes, &children, &n.id.to_string())?;
            kids.reverse(); // popped in creation order
            stack.extend(kids);
            out.push(n);
        }
        Ok(out)
    }

    /// Deletes nodes in one transaction; their children stay, as orphans.
    pub fn delete_nodes(&self, ids: &[NodeId]) -> Result<()> {
        let ops: Vec<Op> = ids.iter().map(|id| Op::DeleteNode(*id)).collect();
        self.commit(&ops)
    }

    /// Applies `ops` in order in ONE transaction, durable when this returns `Ok`. If any
    /// op is invalid (see [`TreeDbError`]) nothing is written. Parents and heads are
    /// checked against the state after the whole batch, so a batch may put a node and
    /// a sandbox whose head it is in either order.
    pub fn commit(&self, ops: &[Op]) -> Result<()> {
        let txn = self.begin_write()?;
        match self.apply(&txn, ops) {
            Ok(()) => txn.commit().map_err(self.err("commit")),
            Err(e) => {
                // Nothing of the batch reaches the file.
                if let Err(abort) = txn.abort() {
                    tracing::warn!("tree database {}: abort: {abort}", self.path.display());
                }
                Err(e)
            }
        }
    }

    /// The sandbox whose id is `prefix` or starts with it (see [`ids::match_prefix`]).
    pub fn resolve_sandbox(&self, prefix: &str) -> Result<SandboxId> {
        if let Some(id) = self.whole_id(SANDBOXES, prefix)? {
            return Ok(id);
        }
        let mut all: Vec<SandboxId> = self.keys(SANDBOXES, "sandboxes")?;
        all.sort();
        resolve(SandboxId::KIND, prefix, all)
    }

    /// The node whose id is `prefix` or starts with it (see [`ids::match_prefix`]).
    pub fn resolve_node(&self, prefix: &str) -> Result<NodeId> {
        if let Some(id) = self.whole_id(NODES, prefix)? {
            return Ok(id);
        }
        let mut all: Vec<NodeId> = self.keys(NODES, "nodes")?;
        all.sort();
        resolve(NodeId::KIND, prefix, all)
    }

    fn begin_write(&self) -> Result<WriteTransaction> {
        let mut txn = self.db.begin_write().map_err(self.err("begin write"))?;
        // Written to the kernel before commit returns, not fsynced: see `file.rs`.
        txn.set_durability(Durability::Eventual);
        Ok(txn)
    }

    fn apply(&self, txn: &WriteTransaction, ops: &[Op]) -> Result<()> {
        let mut trees = txn.open_table(TREES).map_err(self.err("open trees"))?;
        let mut sandboxes = txn
            .open_table(SANDBOXES)
            .map_err(self.err("open sandboxes"))?;
        let mut nodes = txn.open_table(NODES).map_err(self.err("open nodes"))?;
        let mut children = txn
            .open_multimap_table(CHILDREN)
            .map_err(self.err("open children"))?;
        let mut tree_nodes = txn
            .open_multimap_table(TREE_NODES)
            .map_err(self.err("open tree_nodes"))?;
        let mut new_nodes = Vec::new();
        let mut put_sandboxes = Vec::new();
        for op in ops {
            match op {
                Op::PutTree(t) => {
                    let v = encode(&t, || format!("tree {}", t.id))?;
                    trees
                        .insert(t.id.to_string().as_str(), v.as_str())
                        .map_err(self.err("write tree"))?;
                }
                Op::DeleteTree(id) => {
                    trees
                        .remove(id.to_string().as_str())
                        .map_err(self.err("delete tree"))?;
                }
                Op::PutSandbox(s) => {
                    let v = encode(&s, || format!("sandbox {}", s.id))?;
                    sandboxes
                        .insert(s.id.to_string().as_str(), v.as_str())
                        .map_err(self.err("write sandbox"))?;
                    put_sandboxes.push(s.id);
                }
                Op::DeleteSandbox(id) => {
                    sandboxes
                        .remove(id.to_string().as_str())
                        .map_err(self.err("delete sandbox"))?;
                }
                Op::PutNode(n) => {
                    if !n.checkpoint_ms.is_finite() {
                        return Err(TreeDbError::NotFinite {
                            node: n.id,
                            value: n.checkpoint_ms,
                        });
                    }
                    if n.parent == Some(n.id) {
                        return Err(TreeDbError::SelfParent { node: n.id });
                    }
                    let key = n.id.to_string();
                    let old: Option<NodePlace> = self.get(&nodes, "nodes", &key)?;
                    match old {
                        Some(old) if old.parent != n.parent || old.tree != n.tree => {
                            return Err(TreeDbError::NodeMoved {
                                node: n.id,
                                old_parent: old.parent,
                                old_tree: old.tree,
                            });
                        }
                        // Same parent and tree: the indexes already hold it (and an
                        // orphan must not get a dangling parent entry back).
                        Some(_) => {}
                        None => {
                            if let Some(p) = n.parent {
                                children
                                    .insert(p.to_string().as_str(), key.as_str())
                                    .map_err(self.err("index children"))?;
                            }
                            tree_nodes
                                .insert(n.tree.to_string().as_str(), key.as_str())
                                .map_err(self.err("index tree nodes"))?;
                            new_nodes.push(n.id);
                        }
                    }
                    let v = encode(&n, || format!("node {}", n.id))?;
                    nodes
                        .insert(key.as_str(), v.as_str())
                        .map_err(self.err("write node"))?;
                }
                Op::DeleteNode(id) => {
                    let key = id.to_string();
                    let old: Option<NodePlace> = self.get(&nodes, "nodes", &key)?;
                    if let Some(old) = old {
                        nodes
                            .remove(key.as_str())
                            .map_err(self.err("delete node"))?;
                        if let Some(p) = old.parent {
                            children
                                .remove(p.to_string().as_str(), key.as_str())
                                .map_err(self.err("unindex children"))?;
                        }
                        tree_nodes
                            .remove(old.tree.to_string().as_str(), key.as_str())
                            .map_err(self.err("unindex tree nodes"))?;
                        children
                            .remove_all(key.as_str())
                            .map_err(self.err("unindex children"))?;
                    }
                }
            }
        }
        // Check the batch's end state: parents and heads must exist, in the same tree.
        for id in new_nodes {
            let Some(n) = self.get::<NodePlace>(&nodes, "nodes", &id.to_string())? else {
                continue; // deleted later in the batch
            };
            let Some(parent) = n.parent else { continue };
            match self.get::<NodePlace>(&nodes, "nodes", &parent.to_string())? {
                None => return Err(TreeDbError::UnknownParent { node: id, parent }),
                Some(p) if p.tree != n.tree => {
                    return Err(TreeDbError::ParentInOtherTree {
                        node: id,
                        tree: n.tree,
                        parent,
                        parent_tree: p.tree,
                    });
                }
                Some(_) => {}
            }
        }
        for id in put_sandboxes {
            let key = id.to_string();
            let Some(s) = self.get::<SandboxRecord>(&sandboxes, "sandboxes", &key)? else {
                continue;
            };
            let Some(head) = s.head else { continue };
            match self.get::<NodePlace>(&nodes, "nodes", &head.to_string())? {
                None => return Err(TreeDbError::UnknownHead { sandbox: id, head }),
                Some(h) if h.tree != s.tree => {
                    return Err(TreeDbError::HeadInOtherTree {
                        sandbox: id,
                        tree: s.tree,
                        head,
                        head_tree: h.tree,
                    });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn err<E: Into<redb::Error>>(&self, op: &'static str) -> impl FnOnce(E) -> TreeDbError + '_ {
        move |e| TreeDbError::Db {
            path: self.path.clone(),
            op,
            source: Box::new(e.into()),
        }
    }

    fn get<T: DeserializeOwned>(
        &self,
        t: &impl ReadableTable<&'static str, &'static str>,
        table: &'static str,
        key: &str,
    ) -> Result<Option<T>> {
        let Some(v) = t.get(key).map_err(self.err("read"))? else {
            return Ok(None);
        };
        records::decode(v.value())
            .map(Some)
            .map_err(|source| TreeDbError::Decode {
                path: self.path.clone(),
                table,
                key: key.to_owned(),
                source,
            })
    }

    fn all<T: DeserializeOwned>(
        &self,
        def: TableDefinition<&str, &str>,
        table: &'static str,
    ) -> Result<Vec<T>> {
        let txn = self.db.begin_read().map_err(self.err("begin read"))?;
        let t = txn.open_table(def).map_err(self.err("open table"))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(self.err("scan"))? {
            let (k, v) = entry.map_err(self.err("scan"))?;
            out.push(
                records::decode(v.value()).map_err(|source| TreeDbError::Decode {
                    path: self.path.clone(),
                    table,
                    key: k.value().to_owned(),
                    source,
                })?,
            );
        }
        Ok(out)
    }

    /// `prefix` as an id of table `def` when it is a whole id (32 hex digits, hyphens
    /// and case aside) stored there: one lookup instead of a scan of every key (a
    /// rollback names its node by its whole id, and a tree may hold thousands). A whole
    /// id matches no other id's short form (those are shorter), so the answer is the
    /// scan's.
    fn whole_id<T>(&self, def: TableDefinition<&str, &str>, prefix: &str) -> Result<Option<T>>
    where
        T: std::str::FromStr + std::fmt::Display,
    {
        let Some(p) = ids::normalise_prefix(prefix) else {
            return Ok(None);
        };
        let Some(id) = (p.len() == 32).then(|| p.parse::<T>().ok()).flatten() else {
            return Ok(None);
        };
        let txn = self.db.begin_read().map_err(self.err("begin read"))?;
        let t = txn.open_table(def).map_err(self.err("open table"))?;
        let stored = t
            .get(id.to_string().as_str())
            .map_err(self.err("read"))?
            .is_some();
        Ok(stored.then_some(id))
    }

    fn keys<T: std::str::FromStr<Err = ids::ParseIdError>>(
        &self,
        def: TableDefinition<&str, &str>,
        table: &'static str,
    ) -> Result<Vec<T>> {
        let txn = self.db.begin_read().map_err(self.err("begin read"))?;
        let t = txn.open_table(def).map_err(self.err("open table"))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(self.err("scan"))? {
            let (k, _) = entry.map_err(self.err("scan"))?;
            let key = k.value();
            out.push(key.parse().map_err(|e| TreeDbError::Decode {
                path: self.path.clone(),
                table,
                key: key.to_owned(),
                source: RecordError::Malformed(serde::de::Error::custom(e)),
            })?);
        }
        Ok(out)
    }

    /// The nodes an index lists under `key`, in creation order.
    fn indexed(
        &self,
        def: MultimapTableDefinition<&str, &str>,
        key: &str,
    ) -> Result<Vec<NodeRecord>> {
        let txn = self.db.begin_read().map_err(self.err("begin read"))?;
        let nodes = txn.open_table(NODES).map_err(self.err("open nodes"))?;
        let index = txn
            .open_multimap_table(def)
            .map_err(self.err("open index"))?;
        self.lookup(&nodes, &index, key)
    }

    fn lookup(
        &self,
        nodes: &impl ReadableTable<&'static str, &'static str>,
        index: &impl ReadableMultimapTable<&'static str, &'static str>,
        key: &str,
    ) -> Result<Vec<NodeRecord>> {
        let mut out = Vec::new();
        for id in index.get(key).map_err(self.err("read index"))? {
            let id = id.map_err(self.err("read index"))?;
            // The index and the nodes are written in one transaction; a miss here would
            // be a bug, and showing the other nodes beats failing the listing.
            match self.get::<NodeRecord>(nodes, "nodes", id.value())? {
                Some(n) => out.push(n),
                None => tracing::warn!(
                    "tree database {}: index entry {key} -> {} names no node",
                    self.path.display(),
                    id.value()
                ),
            }
        }
        out.sort_by_key(|n| (n.created_ms, n.id));
        Ok(out)
    }
}

fn encode<T: serde::Serialize>(r: &T, what: impl FnOnce() -> String) -> Result<String> {
    records::encode(r).map_err(|source| TreeDbError::Encode {
        what: what(),
        source,
    })
}

fn resolve<T: Copy + Into<uuid::Uuid> + std::fmt::Display>(
    kind: &'static str,
    prefix: &str,
    all: Vec<T>,
) -> Result<T> {
    if ids::normalise_prefix(prefix).is_none() {
        return Err(TreeDbError::BadPrefix {
            kind,
            prefix: prefix.to_owned(),
        });
    }
    match ids::match_prefix(prefix, all) {
        PrefixMatch::One(id) => Ok(id),
        PrefixMatch::None => Err(TreeDbError::UnknownId {
            kind,
            prefix: prefix.to_owned(),
        }),
        PrefixMatch::Many(c) => Err(TreeDbError::Ambiguous {
            kind,
            prefix: prefix.to_owned(),
            candidates: c.iter().map(ToString::to_string).collect(),
        }),
    }
}
