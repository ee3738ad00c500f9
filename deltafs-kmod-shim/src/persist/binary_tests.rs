//! Unit tests of the binary layer format.

use super::*;
use crate::ids::{BASE_INO_FLAG, SnapshotId};

fn time(sec: i64, nsec: u32) -> Time {
    Time { sec, nsec }
}

fn sample() -> (Manifest, DeltaRecord) {
    let own = LayerId::generate();
    let other = LayerId::generate();
    let manifest = Manifest {
        version: super::super::FORMAT_VERSION,
        id: own,
        parent: Some(SnapshotId::of_layer(other)),
        base: Bytes(b"/var/lib/base".to_vec()),
        next_ino: 123_456,
        absorbed: vec![LayerId::generate(), LayerId::generate()],
    };
    let mut nodes = Vec::new();
    for (i, kind) in KINDS.iter().enumerate() {
        let mut node = Node::new(*kind, 0o7755, 1000 + i as u32, 70_000);
        node.ctime = time(1_800_000_000 + i as i64, 999_999_999);
        node.mtime = if i % 2 == 0 {
            node.ctime
        } else {
            time(-5, 250)
        };
        node.atime = match i % 3 {
            0 => node.ctime,
            1 => node.mtime,
            _ => time(0, 0),
        };
        node.nlink = 70_000;
        node.rdev = if i == 5 { 0x0801 } else { 0 };
        node.parent = if *kind == Kind::Dir {
            BASE_INO_FLAG | 7
        } else {
            0
        };
        node.target = (*kind == Kind::Symlink).then(|| Bytes(vec![0xff, b'/', 0]));
        if i == 0 {
            node.xattrs
                .insert(Bytes(b"user.a".to_vec()), Bytes(vec![0xfe; 300]));
            node.xattrs
                .insert(Bytes(b"user.b".to_vec()), Bytes(Vec::new()));
        }
        node.data = match i {
            0 => Some(DataRef::Layer {
                layer: own,
                file: 1 << 40,
            }),
            1 => Some(DataRef::Base(Bytes(b"usr/lib".to_vec()))),
            2 => Some(DataRef::Layer {
                layer: other,
                file: 3,
            }),
            _ => None,
        };
        nodes.push((10 + i as u64, Some(node)));
    }
    nodes.push((BASE_INO_FLAG | (5 << 48) | 99, None));
    nodes.push((u64::MAX, None));
    let entries = vec![
        (1, Bytes(b"a".to_vec()), Some(10)),
        (1, Bytes(b"b".to_vec()), None),
        (11, Bytes(vec![0x80; 255]), Some(BASE_INO_FLAG | 3)),
    ];
    let record = DeltaRecord {
        version: super::super::FORMAT_VERSION,
        nodes,
        entries,
    };
    (manifest, record)
}

#[test]
fn every_field_round_trips() {
    let (manifest, record) = sample();
    let data = encode(&manifest, &record);
    let path = Path::new("layer.bin");
    assert_eq!(decode(path, &data).unwrap(), (manifest.clone(), record));
    assert_eq!(decode_manifest(path, &data).unwrap(), manifest);
    let no_parent = Manifest {
        parent: None,
        ..manifest
    };
    let empty = DeltaRecord {
        version: super::super::FORMAT_VERSION,
        ..DeltaRecord::default()
    };
    let data = encode(&no_parent, &empty);
    assert_eq!(decode(path, &data).unwrap(), (no_parent, empty));

    // Version 2 (no absorbed layers) still reads.
    let (manifest, record) = sample();
    let data = encode_version(&manifest, &record, 2);
    let (read_manifest, read_record) = decode(path, &data).unwrap();
    assert_eq!(read_manifest.version, 2);
    assert!(read_manifest.absorbed.is_empty());
    assert_eq!(read_manifest.base, manifest.base);
    assert_eq!(read_record.nodes, record.nodes);
    assert_eq!(read_record.entries, record.entries);
}

#[test]
fn damaged_files_are_errors_not_panics() {
    let (manifest, record) = sample();
    let data = encode(&manifest, &record);
    let path = Path::new("layer.bin");
    for len in 0..data.len() {
        assert!(decode(path, &data[..len]).is_err(), "prefix of {len} bytes");
    }
    let mut longer = data.clone();
    longer.push(0);
    assert!(matches!(
        decode(path, &longer),
        Err(PersistError::Decode { .. })
    ));
    let mut version = data.clone();
    version[4] = 9;
    assert!(matches!(
        decode(path, &version),
        Err(PersistError::Version { found: 9, .. })
    ));
    // Flipping any byte never panics (it may still decode to something).
    for i in 0..data.len() {
        let mut flipped = data.clone();
        flipped[i] ^= 0xa5;
        let _ = decode(path, &flipped);
    }
}

/// What a checkpoint of 100 rewritten files writes: each file's node (new backing
/// file in the frozen layer, new times), nothing else.
#[test]
fn a_hundred_changed_files_take_under_4_kib() {
    let own = LayerId::generate();
    let manifest = Manifest {
        version: super::super::FORMAT_VERSION,
        id: own,
        parent: Some(SnapshotId::of_layer(LayerId::generate())),
        base: Bytes(b"/tmp/deltabox-demo-eJAQe6/run/base".to_vec()),
        next_ino: 10_200,
        absorbed: Vec::new(),
    };
    let nodes = (0..100u64)
        .map(|i| {
            let mut node = Node::new(Kind::File, 0o644, 0, 0);
            node.ctime = time(1_795_351_214, 103_192_890 + i as u32 * 7919);
            node.mtime = node.ctime;
            node.atime = time(1_795_351_100, 5_000_000);
            node.data = Some(DataRef::Layer {
                layer: own,
                file: 200 + i,
            });
            (10_000 + i * 97, Some(node))
        })
        .collect();
    let record = DeltaRecord {
        version: super::super::FORMAT_VERSION,
        nodes,
        entries: Vec::new(),
    };
    let data = encode(&manifest, &record);
    assert!(data.len() <= 4096, "{} bytes", data.len());
    eprintln!("100 changed files: {} bytes", data.len());
}

/// A node copied up chunk by chunk keeps its whole chain: held ranges (one to the end
/// of the file included), files below in this layer, another layer and the base.
#[test]
fn chunk_records_round_trip() {
    let own = LayerId::generate();
    let other = LayerId::generate();
    let third = LayerId::generate();
    let manifest = Manifest {
        version: super::super::FORMAT_VERSION,
        id: own,
        parent: Some(SnapshotId::of_layer(other)),
        base: Bytes(b"/base".to_vec()),
        next_ino: 99,
        absorbed: Vec::new(),
    };
    let bottom = crate::chunks::Partial {
        below: DataRef::Base(Bytes(b"big".to_vec())),
        lower: None,
        held: vec![(0, 1), (1 << 40, u64::MAX)],
    };
    let middle = crate::chunks::Partial {
        below: DataRef::Layer {
            layer: third,
            file: 7,
        },
        lower: Some(std::sync::Arc::new(bottom)),
        held: vec![(128 << 10, 256 << 10)],
    };
    let top = crate::chunks::Partial {
        below: DataRef::Layer {
            layer: other,
            file: 3,
        },
        lower: Some(std::sync::Arc::new(middle)),
        held: Vec::new(),
    };
    let mut node = Node::new(Kind::File, 0o644, 0, 0);
    node.data = Some(DataRef::Layer {
        layer: own,
        file: 4,
    });
    node.partial = Some(std::sync::Arc::new(top));
    let mut own_below = Node::new(Kind::File, 0o600, 1, 1);
    own_below.data = Some(DataRef::Layer {
        layer: own,
        file: 5,
    });
    own_below.partial = Some(std::sync::Arc::new(crate::chunks::Partial {
        below: DataRef::Layer {
            layer: own,
            file: 2,
        },
        lower: None,
        held: vec![(5, 10)],
    }));
    let record = DeltaRecord {
        version: super::super::FORMAT_VERSION,
        nodes: vec![(10, Some(node)), (11, Some(own_below))],
        entries: Vec::new(),
    };
    let data = encode(&manifest, &record);
    let path = Path::new("layer.bin");
    assert_eq!(
        decode(path, &data).unwrap(),
        (manifest.clone(), record.clone())
    );
    for len in 0..data.len() {
        assert!(decode(path, &data[..len]).is_err(), "prefix of {len} bytes");
    }
    for i in 0..data.len() {
        let mut flipped = data.clone();
        flipped[i] ^= 0xa5;
        let _ = decode(path, &flipped);
    }
    // A version-3 file cannot carry a record.
    let mut old = data.clone();
    old[4] = 3;
    assert!(decode(path, &old).is_err());
}
