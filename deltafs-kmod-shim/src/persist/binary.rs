//! Format versions 2 to 4: one file, `layer.bin`, holding a frozen layer's manifest and then
//! its delta, in a compact binary encoding (version 1 was two JSON files at ~290 bytes per
//! changed node; this is ~20). A checkpoint's write amplification is this file.
//!
//! ```text
//! file     = "DFSL" version:u8 manifest delta
//! manifest = id:[16] has_parent:u8 [parent:[16]] next_ino:varint base:bytes
//!            absorbed:varint [id:[16]]*     (version 3 only; version 2 has none)
//! delta    = layers:varint [id:[16]]*  nodes:varint node*  groups:varint group*
//! node     = ino:varint-ino tag:u8 (tag != 0: flags:u8 perm uid gid nlink:varint
//!            ctime [mtime] [atime] [rdev] [size] [parent:varint-ino] [target:bytes]
//!            [xattrs: count:varint (bytes bytes)*] [data] [partial])
//! partial  = count:varint (gap:varint len:varint)* ref has_lower:u8 [partial]
//! ref      = 1 bytes | 2 file:varint | 3 layer:varint file:varint   (as `data`)
//! group    = dir:varint-ino count:varint (name:bytes target:varint-ino-or-0)*
//! time     = sec: zigzag varint, the difference from the previous time's seconds in
//!            the file (0 before the first) ; nsec: u32 little-endian
//! bytes    = len:varint data
//! ```
//!
//! `varint` is unsigned LEB128. Inode numbers are written rotated left by 2 bits, so a
//! base inode (bit 62 set, see [`BASE_INO_FLAG`](crate::ids::BASE_INO_FLAG)) of the base's
//! own device costs what a small number does. `tag`: 0 for a removed node, else the kind
//! (1–7) in bits 0–2, `mtime_from_data` in bit 3, the data reference in bits 4–5 (0 none,
//! 1 a base path `bytes`, 2 a file of this layer `file:varint`, 3 a file of another
//! layer `layer:varint` (index in the table) `file:varint`), bit 6 (version 4) a
//! chunk-granular copy-up's record follows ([`crate::chunks::Partial`]: its held ranges,
//! each as the gap from the previous range's end and its length, 0 for "to the end";
//! the file below; that file's own record if it has one). `flags`: bit 0 mtime equals
//! ctime (not written), bit 1 atime equals ctime, bit 2 atime equals mtime, bits 3–7 which
//! of rdev, size, parent, target, xattrs follow. Entries are sorted by directory then
//! name and grouped by directory. The file must be consumed exactly.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::{DeltaRecord, Manifest, PersistError};
use crate::ids::{Ino, LayerId};
use crate::node::{Bytes, DataRef, Kind, Node, Time};

/// The file's first bytes.
pub(super) const MAGIC: &[u8; 4] = b"DFSL";

/// The version byte this module writes (4: nodes may carry a chunk record).
pub(super) const VERSION: u8 = 4;

/// The oldest version byte this module reads.
const OLDEST: u8 = 2;

/// What to read of a file to decode its manifest, unless it absorbed many layers (its
/// base path is at most `PATH_MAX`; each absorbed layer takes 16 bytes): the reader
/// reads the whole file when this is not enough.
pub(super) const MANIFEST_MAX: usize = 64 + 4096 + 16 * 64;

const KINDS: [Kind; 7] = [
    Kind::File,
    Kind::Dir,
    Kind::Symlink,
    Kind::Fifo,
    Kind::Socket,
    Kind::CharDev,
    Kind::BlockDev,
];

const MTIME_IS_CTIME: u8 = 1;
const ATIME_IS_CTIME: u8 = 1 << 1;
const ATIME_IS_MTIME: u8 = 1 << 2;
const HAS_RDEV: u8 = 1 << 3;
const HAS_SIZE: u8 = 1 << 4;
const HAS_PARENT: u8 = 1 << 5;
const HAS_TARGET: u8 = 1 << 6;
const HAS_XATTRS: u8 = 1 << 7;

const DATA_NONE: u8 = 0;
const DATA_BASE: u8 = 1;
const DATA_OWN: u8 = 2;
const DATA_OTHER: u8 = 3;

/// Tag bit: a chunk record follows the data reference (version 4).
const HAS_PARTIAL: u8 = 1 << 6;

/// Encodes a frozen layer's metadata file.
pub(super) fn encode(manifest: &Manifest, record: &DeltaRecord) -> Vec<u8> {
    encode_version(manifest, record, VERSION)
}

/// [`encode`] in format `version` (2 drops the absorbed layers).
fn encode_version(manifest: &Manifest, record: &DeltaRecord, version: u8) -> Vec<u8> {
    let mut out = Encoder::default();
    out.buf.extend_from_slice(MAGIC);
    out.buf.push(version);
    out.buf.extend_from_slice(&manifest.id.to_bytes());
    match manifest.parent {
        Some(parent) => {
            out.buf.push(1);
            out.buf.extend_from_slice(&parent.layer().to_bytes());
        }
        None => out.buf.push(0),
    }
    out.varint(manifest.next_ino);
    out.bytes(&manifest.base.0);
    if version >= 3 {
        out.varint(manifest.absorbed.len() as u64);
        for layer in &manifest.absorbed {
            out.buf.extend_from_slice(&layer.to_bytes());
        }
    }

    // Other layers the nodes' data lives in, by first use.
    let mut layers: Vec<LayerId> = Vec::new();
    for (_, node) in &record.nodes {
        let Some(node) = node else { continue };
        let chain = node.partial.iter().flat_map(|p| p.files());
        for data in node.data.iter().chain(chain) {
            if let DataRef::Layer { layer, .. } = data
                && *layer != manifest.id
                && !layers.contains(layer)
            {
                layers.push(*layer);
            }
        }
    }
    out.varint(layers.len() as u64);
    for layer in &layers {
        out.buf.extend_from_slice(&layer.to_bytes());
    }
    out.varint(record.nodes.len() as u64);
    for (ino, node) in &record.nodes {
        out.ino(*ino);
        match node {
            None => out.buf.push(0),
            Some(node) => out.node(node, manifest.id, &layers),
        }
    }
    let groups = record.entries.chunk_by(|a, b| a.0 == b.0);
    out.varint(groups.clone().count() as u64);
    for group in groups {
        out.ino(group[0].0);
        out.varint(group.len() as u64);
        for (_, name, target) in group {
            out.bytes(&name.0);
            // Inode 0 is never allocated: 0 stands for "removed".
            out.varint(target.map_or(0, |ino| ino.rotate_left(2)));
        }
    }
    out.buf
}

/// Decodes the manifest at the start of `data` (all of the file, or at least its first
/// [`MANIFEST_MAX`] bytes).
pub(super) fn decode_manifest(path: &Path, data: &[u8]) -> Result<Manifest, PersistError> {
    let mut input = Decoder::new(path, data);
    let version = input.header()?;
    input.manifest(version)
}

/// Decodes a whole metadata file.
pub(super) fn decode(path: &Path, data: &[u8]) -> Result<(Manifest, DeltaRecord), PersistError> {
    let mut input = Decoder::new(path, data);
    let version = input.header()?;
    let manifest = input.manifest(version)?;
    let layer_count = input.count()?;
    let layers = (0..layer_count)
        .map(|_| input.layer_id())
        .collect::<Result<Vec<_>, _>>()?;
    let node_count = input.count()?;
    let mut nodes = Vec::with_capacity(node_count);
    for _ in 0..node_count {
        let ino = input.ino()?;
        let node = input.node(manifest.id, &layers, version)?;
        nodes.push((ino, node));
    }
    let group_count = input.count()?;
    let mut entries = Vec::new();
    for _ in 0..group_count {
        let dir = input.ino()?;
        for _ in 0..input.count()? {
            let name = Bytes(input.bytes()?);
            let target = match input.varint()? {
                0 => None,
                rotated => Some(rotated.rotate_right(2)),
            };
            entries.push((dir, name, target));
        }
    }
    if input.pos != data.len() {
        return Err(input.error("bytes after the end of the delta"));
    }
    let record = DeltaRecord {
        version: version.into(),
        nodes,
        entries,
    };
    Ok((manifest, record))
}

#[derive(Default)]
struct Encoder {
    buf: Vec<u8>,
    /// Seconds of the last time written.
    last_sec: i64,
}

impl Encoder {
    fn varint(&mut self, mut n: u64) {
        while n >= 0x80 {
            self.buf.push((n as u8) | 0x80);
            n >>= 7;
        }
        self.buf.push(n as u8);
    }

    fn ino(&mut self, ino: Ino) {
        self.varint(ino.rotate_left(2));
    }

    fn bytes(&mut self, data: &[u8]) {
        self.varint(data.len() as u64);
        self.buf.extend_from_slice(data);
    }

    fn time(&mut self, time: Time) {
        let diff = time.sec.wrapping_sub(self.last_sec);
        self.varint(((diff << 1) ^ (diff >> 63)) as u64);
        self.buf.extend_from_slice(&time.nsec.to_le_bytes());
        self.last_sec = time.sec;
    }

    fn node(&mut self, node: &Node, own: LayerId, layers: &[LayerId]) {
        let kind = KINDS.iter().position(|k| *k == node.kind).unwrap_or(0) as u8 + 1;
        let data = node.data.as_ref().map_or(DATA_NONE, |d| data_kind(d, own));
        let partial = if node.partial.is_some() {
            HAS_PARTIAL
        } else {
            0
        };
        self.buf
            .push(kind | (u8::from(node.mtime_from_data) << 3) | (data << 4) | partial);
        let mut flags = 0;
        if node.mtime == node.ctime {
            flags |= MTIME_IS_CTIME;
        }
        if node.atime == node.ctime {
            flags |= ATIME_IS_CTIME;
        } else if node.atime == node.mtime {
            flags |= ATIME_IS_MTIME;
        }
        for (present, flag) in [
            (node.rdev != 0, HAS_RDEV),
            (node.size != 0, HAS_SIZE),
            (node.parent != 0, HAS_PARENT),
            (node.target.is_some(), HAS_TARGET),
            (!node.xattrs.is_empty(), HAS_XATTRS),
        ] {
            if present {
                flags |= flag;
            }
        }
        self.buf.push(flags);
        self.varint(node.perm.into());
        self.varint(node.uid.into());
        self.varint(node.gid.into());
        self.varint(node.nlink.into());
        self.time(node.ctime);
        if flags & MTIME_IS_CTIME == 0 {
            self.time(node.mtime);
        }
        if flags & (ATIME_IS_CTIME | ATIME_IS_MTIME) == 0 {
            self.time(node.atime);
        }
        if node.rdev != 0 {
            self.varint(node.rdev);
        }
        if node.size != 0 {
            self.varint(node.size);
        }
        if node.parent != 0 {
            self.ino(node.parent);
        }
        if let Some(target) = &node.target {
            self.bytes(&target.0);
        }
        if !node.xattrs.is_empty() {
            self.varint(node.xattrs.len() as u64);
            for (name, value) in &node.xattrs {
                self.bytes(&name.0);
                self.bytes(&value.0);
            }
        }
        if let Some(data) = &node.data {
            self.data_ref(data, own, layers);
        }
        if let Some(partial) = &node.partial {
            self.partial(partial, own, layers);
        }
    }

    /// A data reference's payload (its kind is written by the caller).
    fn data_ref(&mut self, data: &DataRef, own: LayerId, layers: &[LayerId]) {
        match data {
            DataRef::Base(path) => self.bytes(&path.0),
            DataRef::Layer { layer, file } => {
                if *layer != own {
                    let index = layers.iter().position(|l| l == layer).unwrap_or(0);
                    self.varint(index as u64);
                }
                self.varint(*file);
            }
        }
    }
}

/// The two-bit kind of a data reference (`DATA_*`).
fn data_kind(data: &DataRef, own: LayerId) -> u8 {
    match data {
        DataRef::Base(_) => DATA_BASE,
        DataRef::Layer { layer, .. } if *layer == own => DATA_OWN,
        DataRef::Layer { .. } => DATA_OTHER,
    }
}

struct Decoder<'a> {
    path: &'a Path,
    data: &'a [u8],
    pos: usize,
    last_sec: i64,
}

impl<'a> Decoder<'a> {
    fn new(path: &'a Path, data: &'a [u8]) -> Self {
        Self {
            path,
            data,
            pos: 0,
            last_sec: 0,
        }
    }

    fn error(&self, what: &'static str) -> PersistError {
        PersistError::Decode {
            path: self.path.to_owned(),
            offset: self.pos,
            what,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PersistError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.data.len())
            .ok_or_else(|| self.error("truncated"))?;
        let slice = &self.data[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn byte(&mut self) -> Result<u8, PersistError> {
        Ok(self.take(1)?[0])
    }

    fn varint(&mut self) -> Result<u64, PersistError> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            n |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(self.error("varint longer than 64 bits"))
    }

    fn small<T: TryFrom<u64>>(&mut self, what: &'static str) -> Result<T, PersistError> {
        let n = self.varint()?;
        T::try_from(n).map_err(|_| self.error(what))
    }

    /// A count of items that each take at least one byte (so a corrupt count cannot
    /// make the reader allocate more than the file holds).
    fn count(&mut self) -> Result<usize, PersistError> {
        let n: usize = self.small("count out of range")?;
        if n > self.data.len() - self.pos {
            return Err(self.error("count larger than the file"));
        }
        Ok(n)
    }

    fn ino(&mut self) -> Result<Ino, PersistError> {
        Ok(self.varint()?.rotate_right(2))
    }

    fn bytes(&mut self) -> Result<Vec<u8>, PersistError> {
        let len = self.count()?;
        Ok(self.take(len)?.to_vec())
    }

    fn layer_id(&mut self) -> Result<LayerId, PersistError> {
        let bytes: [u8; 16] = self
            .take(16)?
            .try_into()
            .map_err(|_| self.error("truncated"))?;
        Ok(LayerId::from_bytes(bytes))
    }

    fn time(&mut self) -> Result<Time, PersistError> {
        let zigzag = self.varint()?;
        let diff = ((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64);
        let nsec = u32::from_le_bytes(
            self.take(4)?
                .try_into()
                .map_err(|_| self.error("truncated"))?,
        );
        if nsec >= 1_000_000_000 {
            return Err(self.error("nanoseconds out of range"));
        }
        let sec = self.last_sec.wrapping_add(diff);
        self.last_sec = sec;
        Ok(Time { sec, nsec })
    }

    /// Checks the magic; returns the version.
    fn header(&mut self) -> Result<u8, PersistError> {
        if self.take(MAGIC.len())? != MAGIC {
            return Err(self.error("not a DeltaFS layer file (bad magic)"));
        }
        let version = self.byte()?;
        if !(OLDEST..=VERSION).contains(&version) {
            return Err(PersistError::Version {
                path: self.path.to_owned(),
                found: version.into(),
            });
        }
        Ok(version)
    }

    fn manifest(&mut self, version: u8) -> Result<Manifest, PersistError> {
        let id = self.layer_id()?;
        let parent = match self.byte()? {
            0 => None,
            1 => Some(crate::ids::SnapshotId::of_layer(self.layer_id()?)),
            _ => return Err(self.error("bad parent flag")),
        };
        let next_ino = self.varint()?;
        let base = Bytes(self.bytes()?);
        let absorbed = if version >= 3 {
            let count = self.count()?;
            (0..count)
                .map(|_| self.layer_id())
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        Ok(Manifest {
            version: version.into(),
            id,
            parent,
            base,
            next_ino,
            absorbed,
        })
    }

    fn node(
        &mut self,
        own: LayerId,
        layers: &[LayerId],
        version: u8,
    ) -> Result<Option<Node>, PersistError> {
        let tag = self.byte()?;
        if tag == 0 {
            return Ok(None);
        }
        let kind = *KINDS
            .get(usize::from(tag & 7).wrapping_sub(1))
            .ok_or_else(|| self.error("bad file kind"))?;
        let flags = self.byte()?;
        let perm = self.small("permission bits out of range")?;
        let uid = self.small("uid out of range")?;
        let gid = self.small("gid out of range")?;
        let nlink = self.small("link count out of range")?;
        let ctime = self.time()?;
        let mtime = if flags & MTIME_IS_CTIME != 0 {
            ctime
        } else {
            self.time()?
        };
        let atime = if flags & ATIME_IS_CTIME != 0 {
            ctime
        } else if flags & ATIME_IS_MTIME != 0 {
            mtime
        } else {
            self.time()?
        };
        let rdev = if flags & HAS_RDEV != 0 {
            self.varint()?
        } else {
            0
        };
        let size = if flags & HAS_SIZE != 0 {
            self.varint()?
        } else {
            0
        };
        let parent = if flags & HAS_PARENT != 0 {
            self.ino()?
        } else {
            0
        };
        let target = if flags & HAS_TARGET != 0 {
            Some(Bytes(self.bytes()?))
        } else {
            None
        };
        let mut xattrs = BTreeMap::new();
        if flags & HAS_XATTRS != 0 {
            for _ in 0..self.count()? {
                let name = Bytes(self.bytes()?);
                xattrs.insert(name, Bytes(self.bytes()?));
            }
        }
        let data = match (tag >> 4) & 3 {
            DATA_NONE => None,
            kind => Some(self.data_ref(kind, own, layers)?),
        };
        if tag & 0x80 != 0 || (tag & HAS_PARTIAL != 0 && version < 4) {
            return Err(self.error("unknown bits in a node's tag"));
        }
        let partial = if tag & HAS_PARTIAL != 0 {
            if kind != Kind::File {
                return Err(self.error("a chunk record on a node that is no regular file"));
            }
            Some(Arc::new(self.partial(own, layers, 0)?))
        } else {
            None
        };
        Ok(Some(Node {
            kind,
            perm,
            uid,
            gid,
            nlink,
            rdev,
            size,
            atime,
            mtime,
            ctime,
            mtime_from_data: tag & 8 != 0,
            parent,
            target,
            xattrs,
            data,
            partial,
        }))
    }

    /// A data reference of kind `kind` (`DATA_BASE`, `DATA_OWN` or `DATA_OTHER`).
    fn data_ref(
        &mut self,
        kind: u8,
        own: LayerId,
        layers: &[LayerId],
    ) -> Result<DataRef, PersistError> {
        Ok(match kind {
            DATA_BASE => DataRef::Base(Bytes(self.bytes()?)),
            DATA_OWN => DataRef::Layer {
                layer: own,
                file: self.varint()?,
            },
            DATA_OTHER => {
                let index: usize = self.small("layer index out of range")?;
                let layer = *layers
                    .get(index)
                    .ok_or_else(|| self.error("layer index out of range"))?;
                DataRef::Layer {
                    layer,
                    file: self.varint()?,
                }
            }
            _ => return Err(self.error("bad data reference kind")),
        })
    }
}

#[path = "binary_partial.rs"]
mod partial;

#[cfg(test)]
#[path = "binary_tests.rs"]
mod tests;
