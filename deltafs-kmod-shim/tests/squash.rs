//! `Store::squash`: merging chains of dropped snapshots keeps every remaining snapshot's
//! and view's contents identical (checked against a model of the tree kept beside DeltaFS),
//! before and after a restart, and gives back the superseded backing files. Needs root.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::Fixture;
use deltafs::{FreezeOpts, SnapshotId, View};

/// What a path holds, as the model and the mount show it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    Dir(u32),
    File(Vec<u8>, u32),
    Symlink(String),
}

type Tree = BTreeMap<String, Entry>;

/// Everything under `root` (the base's own directories left out), by relative path.
fn read_tree(root: &Path) -> Tree {
    fn walk(root: &Path, dir: &Path, tree: &mut Tree) {
        for entry in fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            if rel == "etc" || rel == "usr" || rel == "big" {
                continue;
            }
            let meta = fs::symlink_metadata(&path)
                .unwrap_or_else(|e| panic!("{rel} is listed but cannot be looked up: {e}"));
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).unwrap();
                tree.insert(rel, Entry::Symlink(target.to_str().unwrap().to_owned()));
            } else if meta.is_dir() {
                tree.insert(rel, Entry::Dir(mode));
                walk(root, &path, tree);
            } else {
                tree.insert(rel, Entry::File(fs::read(&path).unwrap(), mode));
            }
        }
    }
    let mut tree = Tree::new();
    walk(root, root, &mut tree);
    tree
}

/// A small deterministic generator (xorshift), so a failing seed can be rerun.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One random change, made on the mount and on the model alike.
fn random_op(rng: &mut Rng, m: &Path, model: &mut Tree, step: usize) {
    let dirs: Vec<String> = model
        .iter()
        .filter(|(_, e)| matches!(e, Entry::Dir(_)))
        .map(|(p, _)| p.clone())
        .collect();
    let files: Vec<String> = model
        .iter()
        .filter(|(_, e)| matches!(e, Entry::File(..)))
        .map(|(p, _)| p.clone())
        .collect();
    let in_dir = |rng: &mut Rng, name: String| match dirs.len() {
        0 => name,
        n => match rng.below(n + 1) {
            i if i < n => format!("{}/{name}", dirs[i]),
            _ => name,
        },
    };
    match rng.below(8) {
        // Rewrite or create a file (a new backing file in this epoch).
        0 | 1 => {
            let path = if files.is_empty() || rng.below(2) == 0 {
                in_dir(rng, format!("f{step}"))
            } else {
                files[rng.below(files.len())].clone()
            };
            let data = format!("{step}:{}", rng.next()).repeat(1 + rng.below(50));
            fs::write(m.join(&path), &data).unwrap();
            let mode = match model.get(&path) {
                Some(Entry::File(_, mode)) => *mode,
                _ => 0o644,
            };
            model.insert(path, Entry::File(data.into_bytes(), mode));
        }
        2 if !files.is_empty() => {
            let path = &files[rng.below(files.len())];
            fs::remove_file(m.join(path)).unwrap();
            model.remove(path);
        }
        3 if !files.is_empty() => {
            let from = files[rng.below(files.len())].clone();
            let to = in_dir(rng, format!("r{step}"));
            fs::rename(m.join(&from), m.join(&to)).unwrap();
            let entry = model.remove(&from).unwrap();
            model.insert(to, entry);
        }
        4 if !files.is_empty() => {
            let path = files[rng.below(files.len())].clone();
            let mode = [0o600, 0o644, 0o755][rng.below(3)];
            fs::set_permissions(m.join(&path), fs::Permissions::from_mode(mode)).unwrap();
            if let Some(Entry::File(_, old)) = model.get_mut(&path) {
                *old = mode;
            }
        }
        5 => {
            let path = in_dir(rng, format!("d{step}"));
            fs::create_dir(m.join(&path)).unwrap();
            fs::set_permissions(m.join(&path), fs::Permissions::from_mode(0o755)).unwrap();
            model.insert(path, Entry::Dir(0o755));
        }
        6 => {
            let path = in_dir(rng, format!("l{step}"));
            let target = format!("t{}", rng.below(100));
            std::os::unix::fs::symlink(&target, m.join(&path)).unwrap();
            model.insert(path, Entry::Symlink(target));
        }
        _ => {
            // Append to a file.
            if let Some(path) = files.get(rng.below(files.len().max(1))) {
                use std::io::Write;
                let mut f = fs::OpenOptions::new()
                    .append(true)
                    .open(m.join(path))
                    .unwrap();
                f.write_all(b"+").unwrap();
                if let Some(Entry::File(data, _)) = model.get_mut(path) {
                    data.push(b'+');
                }
            }
        }
    }
}

/// Mounts each snapshot in `expected` and compares it with its model.
fn check_snapshots(fx: &Fixture, expected: &HashMap<SnapshotId, Tree>, what: &str) {
    for (i, (id, tree)) in expected.iter().enumerate() {
        let view = fx.mount(&format!("check-{i}"), Some(*id));
        let found = read_tree(view.mountpoint());
        if &found != tree {
            let differ: Vec<&String> = found
                .keys()
                .chain(tree.keys())
                .filter(|path| found.get(*path) != tree.get(*path))
                .collect();
            panic!("{what}: snapshot {id} differs from its model at {differ:?}");
        }
        view.unmount().unwrap();
    }
}

fn freeze(view: &View) -> SnapshotId {
    view.freeze(&FreezeOpts::default()).unwrap().id
}

#[test]
fn squash_merges_dropped_chains_and_keeps_every_view_identical() {
    require_root!();
    let seeds: u64 = std::env::var("SQUASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    for seed in 1..=seeds {
        run_seed(seed);
    }
}

fn run_seed(seed: u64) {
    let mut fx = Fixture::new();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
    let live = fx.mount("live", None);
    let m = live.mountpoint().to_owned();
    let mut model = read_tree(&m);
    // Kept snapshots and their models; every snapshot taken, in order.
    let mut kept: HashMap<SnapshotId, Tree> = HashMap::new();
    let mut taken: Vec<SnapshotId> = Vec::new();
    let mut merged_total = 0;
    let mut files_removed = 0;
    for step in 0..120 {
        random_op(&mut rng, &m, &mut model, step);
        if step % 4 == 3 {
            let id = freeze(&live);
            assert_eq!(read_tree(&m), model, "seed {seed} step {step}: live view");
            kept.insert(id, model.clone());
            taken.push(id);
            // Most snapshots are dropped again (what a tree search does with the nodes
            // it abandons), a few stay.
            if taken.len() > 1 && rng.below(4) != 0 {
                let victim = taken[taken.len() - 2];
                if kept.remove(&victim).is_some() {
                    fx.store().drop_snapshot(victim).unwrap();
                }
            }
        }
        if step % 30 == 29 {
            // Roll back to a kept snapshot now and then: branches in the tree.
            let ids: Vec<SnapshotId> = kept.keys().copied().collect();
            let target = ids[rng.below(ids.len())];
            live.switch(target).unwrap();
            model = kept[&target].clone();
            assert_eq!(
                read_tree(&m),
                model,
                "seed {seed}: after switch to {target}"
            );
        }
        if step % 20 == 19 {
            fx.store().gc().unwrap();
            let ids: Vec<SnapshotId> = fx.store().snapshots().iter().map(|s| s.id).collect();
            let target = ids[rng.below(ids.len())];
            let report = fx.store().squash(target).unwrap();
            merged_total += report.merged.len();
            files_removed += report.files_removed;
            for merged in &report.merged {
                assert!(!kept.contains_key(merged), "squash merged kept {merged}");
            }
            assert_eq!(read_tree(&m), model, "seed {seed}: live view after squash");
            check_snapshots(&fx, &kept, &format!("seed {seed} step {step} after squash"));
        }
    }
    // Squash everything that can be, then check again, also after a restart.
    fx.store().gc().unwrap();
    for id in kept.keys() {
        let report = fx.store().squash(*id).unwrap();
        merged_total += report.merged.len();
        files_removed += report.files_removed;
    }
    assert!(merged_total > 0, "seed {seed}: nothing was ever squashed");
    check_snapshots(&fx, &kept, &format!("seed {seed} at the end"));
    assert_eq!(read_tree(&m), model, "seed {seed}: live view at the end");
    live.unmount().unwrap();
    fx.store().gc().unwrap();
    fx.reopen();
    check_snapshots(&fx, &kept, &format!("seed {seed} after a restart"));
    eprintln!(
        "seed {seed}: {} snapshots taken, {} kept, {merged_total} merged by squash, \
         {files_removed} superseded files removed",
        taken.len(),
        kept.len()
    );
}

/// A file rewritten in six epochs, the middle four snapshots dropped: squashing the top
/// merges them, removes their four superseded copies (and their directories), and both
/// remaining snapshots show what they showed, also after a restart.
#[test]
fn squash_removes_superseded_files_and_shortens_the_chain() {
    require_root!();
    let mut fx = Fixture::new();
    let (view, m) = fx.live();
    fs::write(m.join("keep"), b"kept from the first epoch").unwrap();
    let mut ids = Vec::new();
    for epoch in 0..6 {
        fs::write(m.join("a"), format!("version {epoch}").repeat(10_000)).unwrap();
        ids.push(freeze(&view));
    }
    let (first, top) = (ids[0], ids[5]);
    // A view stacked on an ancestor pins it: nothing above it merges past it.
    let pin = fx.mount("pin", Some(ids[3]));
    for id in &ids[1..5] {
        fx.store().drop_snapshot(*id).unwrap();
    }
    fx.store().flush().unwrap();
    let before = fx.store().disk_usage();

    let report = fx.store().squash(top).unwrap();
    assert_eq!(report.merged, vec![ids[4]], "{report:?}");
    pin.unmount().unwrap();

    let report = fx.store().squash(top).unwrap();
    assert_eq!(report.merged, vec![ids[3], ids[2], ids[1]], "{report:?}");
    assert_eq!(report.parent, Some(first));
    assert!(report.files_removed >= 1, "{report:?}");
    let again = fx.store().squash(top).unwrap();
    assert!(again.merged.is_empty(), "{again:?}");
    let listed: Vec<SnapshotId> = fx.store().snapshots().iter().map(|s| s.id).collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.contains(&first) && listed.contains(&top));
    fx.store().gc().unwrap();
    let after = fx.store().disk_usage();
    assert!(
        after + 4 * 90_000 <= before,
        "disk usage {before} -> {after}: the superseded copies were not freed"
    );

    assert_eq!(
        fs::read(m.join("a")).unwrap(),
        b"version 5".repeat(10_000),
        "the live view changed"
    );
    view.switch(first).unwrap();
    assert_eq!(fs::read(m.join("a")).unwrap(), b"version 0".repeat(10_000));
    view.switch(top).unwrap();
    assert_eq!(fs::read(m.join("a")).unwrap(), b"version 5".repeat(10_000));
    assert_eq!(
        fs::read(m.join("keep")).unwrap(),
        b"kept from the first epoch"
    );
    view.unmount().unwrap();

    fx.reopen();
    let after_restart = fx.mount("after", Some(top));
    let m = after_restart.mountpoint();
    assert_eq!(fs::read(m.join("a")).unwrap(), b"version 5".repeat(10_000));
    after_restart.switch(first).unwrap();
    assert_eq!(fs::read(m.join("a")).unwrap(), b"version 0".repeat(10_000));
    after_restart.unmount().unwrap();
    assert_eq!(fx.store().snapshots().len(), 2);
}
