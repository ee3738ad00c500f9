//! Format version 1: `delta.json` (the delta) and `layer.json` (the manifest, written
//! last: its presence marks the layer frozen), serde JSON, names and bytes as strings when
//! UTF-8. Stores written before version 2 hold it: this build reads it, and writes it only
//! through [`write_frozen`] (kept so that tests can make an old store).

use std::fs;
use std::path::Path;

use serde::Deserialize;

use super::{DeltaRecord, Manifest, PersistError, write_atomic};

/// The manifest's file name.
pub const MANIFEST: &str = "layer.json";

/// The delta's file name.
pub const DELTA: &str = "delta.json";

/// The version number these files carry.
pub const VERSION: u32 = 1;

/// Writes a frozen layer's metadata into `dir` in format version 1 (delta first, manifest
/// last), as builds before version 2 did. Returns the bytes written.
pub fn write_frozen(
    dir: &Path,
    manifest: &Manifest,
    record: &DeltaRecord,
) -> Result<u64, PersistError> {
    let delta_path = dir.join(DELTA);
    let manifest_path = dir.join(MANIFEST);
    let manifest = Manifest {
        version: VERSION,
        ..manifest.clone()
    };
    let record = DeltaRecord {
        version: VERSION,
        ..record.clone()
    };
    let delta = serde_json::to_vec(&record).map_err(|source| PersistError::Parse {
        path: delta_path.clone(),
        source,
    })?;
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(|source| PersistError::Parse {
        path: manifest_path.clone(),
        source,
    })?;
    Ok(write_atomic(&delta_path, &delta)? + write_atomic(&manifest_path, &manifest_bytes)?)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, PersistError> {
    let data = fs::read(path).map_err(|source| PersistError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&data).map_err(|source| PersistError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Reads `layer.json` in `dir`; `None` when there is none.
pub fn read_manifest(dir: &Path) -> Result<Option<Manifest>, PersistError> {
    let path = dir.join(MANIFEST);
    if !path.exists() {
        return Ok(None);
    }
    let manifest: Manifest = read_json(&path)?;
    if manifest.version != VERSION {
        return Err(PersistError::Version {
            path,
            found: manifest.version,
        });
    }
    Ok(Some(manifest))
}

/// Reads `delta.json` in `dir`.
pub fn read_delta(dir: &Path) -> Result<DeltaRecord, PersistError> {
    let path = dir.join(DELTA);
    let record: DeltaRecord = read_json(&path)?;
    if record.version != VERSION {
        return Err(PersistError::Version {
            path,
            found: record.version,
        });
    }
    Ok(record)
}
