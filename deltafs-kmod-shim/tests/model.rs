//! Model-based property test: random file operations, with random freezes, switches and
//! branches and file descriptors held across them, applied both to a DeltaFS view and
//! to a reference: a plain directory on the host filesystem, read into an in-memory tree
//! at each checkpoint and written back out at each rollback. After every step the two
//! agree on the result of the operation (errno) and on contents, modes, symlink targets,
//! FIFOs,
//! link counts, hard-link groups and directory listings; a branch mounted from a
//! checkpoint shows exactly that checkpoint's tree. Needs root.
//!
//! A file descriptor held across a rollback keeps the state it was opened in, except
//! when the rollback goes to the latest checkpoint and the file did not change since it
//! (ctime): then it stays connected to the view (as DeltaFS does, see `docs/deltafs.md`).
//!
//! `PROPTEST_CASES` sets the number of cases (default 24). The same model runs on the
//! default store and on a plain store without reflink whose copy-ups are chunk-granular
//! with 8-byte chunks and no completion at half (so the model's small files span many
//! chunks and stay partial: held ranges, chains and flattening all happen).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{Fixture, TempDir};
use deltafs::{FreezeOpts, SnapshotId, View};
use proptest::prelude::*;

/// The names operations pick from (some exist in the base, some under others).
const PATHS: &[&str] = &[
    "a",
    "b",
    "d",
    "d/a",
    "d/b",
    "d/e",
    "d/e/a",
    "etc",
    "etc/hostname",
    "usr/bin/tool",
    "usr/bin",
];

#[derive(Debug, Clone)]
enum Op {
    Write {
        path: usize,
        offset: u8,
        data: Vec<u8>,
    },
    Truncate {
        path: usize,
        len: u16,
    },
    Append {
        path: usize,
        data: Vec<u8>,
    },
    Overwrite {
        path: usize,
        data: Vec<u8>,
    },
    Mkfifo {
        path: usize,
    },
    Mkdir {
        path: usize,
    },
    Unlink {
        path: usize,
    },
    Rmdir {
        path: usize,
    },
    Rename {
        from: usize,
        to: usize,
        flags: u32,
    },
    Link {
        from: usize,
        to: usize,
    },
    Symlink {
        path: usize,
        target: usize,
    },
    Chmod {
        path: usize,
        mode: u32,
    },
    Hold {
        path: usize,
    },
    WriteHeld {
        slot: usize,
        offset: u8,
        data: Vec<u8>,
    },
    Release {
        slot: usize,
    },
    Freeze,
    Switch {
        to: usize,
    },
    Branch {
        from: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let path = 0..PATHS.len();
    let data = proptest::collection::vec(any::<u8>(), 0..48);
    prop_oneof![
        6 => (path.clone(), any::<u8>(), data.clone())
            .prop_map(|(path, offset, data)| Op::Write { path, offset, data }),
        2 => (path.clone(), 0..300u16).prop_map(|(path, len)| Op::Truncate { path, len }),
        2 => (path.clone(), data.clone()).prop_map(|(path, data)| Op::Append { path, data }),
        2 => (path.clone(), data.clone()).prop_map(|(path, data)| Op::Overwrite { path, data }),
        1 => path.clone().prop_map(|path| Op::Mkfifo { path }),
        3 => path.clone().prop_map(|path| Op::Mkdir { path }),
        2 => path.clone().prop_map(|path| Op::Unlink { path }),
        1 => path.clone().prop_map(|path| Op::Rmdir { path }),
        3 => (path.clone(), path.clone(), prop_oneof![Just(0), Just(libc::RENAME_NOREPLACE), Just(libc::RENAME_EXCHANGE)])
            .prop_map(|(from, to, flags)| Op::Rename { from, to, flags }),
        1 => (path.clone(), path.clone()).prop_map(|(from, to)| Op::Link { from, to }),
        1 => (path.clone(), path.clone()).prop_map(|(path, target)| Op::Symlink { path, target }),
        1 => (path.clone(), prop_oneof![Just(0o600u32), Just(0o644), Just(0o755), Just(0o4711)])
            .prop_map(|(path, mode)| Op::Chmod { path, mode }),
        1 => path.prop_map(|path| Op::Hold { path }),
        2 => (0..2usize, any::<u8>(), data).prop_map(|(slot, offset, data)| Op::WriteHeld { slot, offset, data }),
        1 => (0..2usize).prop_map(|slot| Op::Release { slot }),
        2 => Just(Op::Freeze),
        2 => (0..8usize).prop_map(|to| Op::Switch { to }),
        1 => (0..8usize).prop_map(|from| Op::Branch { from }),
    ]
}

/// A file tree as the comparison sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir {
        mode: u32,
    },
    Fifo {
        mode: u32,
        nlink: u64,
    },
    File {
        mode: u32,
        nlink: u64,
        /// `st_size`, which a stale kernel entry can get wrong while reads are right.
        size: u64,
        data: Vec<u8>,
    },
    Symlink {
        nlink: u64,
        target: PathBuf,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Tree {
    entries: BTreeMap<PathBuf, Entry>,
    /// Names sharing an inode, for each inode with several.
    links: Vec<Vec<PathBuf>>,
}

fn read_tree(root: &Path) -> Tree {
    fn walk(root: &Path, rel: &Path, tree: &mut Tree, inodes: &mut HashMap<u64, Vec<PathBuf>>) {
        let mut names: Vec<_> = fs::read_dir(root.join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for name in names {
            let rel = rel.join(name);
            let path = root.join(&rel);
            let meta = fs::symlink_metadata(&path).unwrap();
            let mode = meta.mode() & 0o7777;
            let nlink = meta.nlink();
            if !meta.is_dir() {
                // Any non-directory can have hard links: `link` does not follow a
                // symlink, and a FIFO links like a file.
                inodes.entry(meta.ino()).or_default().push(rel.clone());
            }
            let entry = if meta.is_dir() {
                walk(root, &rel, tree, inodes);
                Entry::Dir { mode }
            } else if meta.file_type().is_fifo() {
                Entry::Fifo { mode, nlink }
            } else if meta.file_type().is_symlink() {
                Entry::Symlink {
                    nlink,
                    target: fs::read_link(&path).unwrap(),
                }
            } else {
                Entry::File {
                    mode,
                    nlink,
                    size: meta.len(),
                    data: fs::read(&path).unwrap(),
                }
            };
            tree.entries.insert(rel, entry);
        }
    }
    let mut tree = Tree::default();
    let mut inodes = HashMap::new();
    walk(root, Path::new(""), &mut tree, &mut inodes);
    tree.links = inodes
        .into_values()
        .filter(|names| names.len() > 1)
        .collect();
    for names in &mut tree.links {
        names.sort();
    }
    tree.links.sort();
    tree
}

/// `lstat` of each of [`PATHS`] under `root`: the file type and mode, and for a
/// non-directory its size and link count (a directory's vary by filesystem), or the errno.
fn stat_paths(root: &Path) -> Vec<Result<(u32, u64, u64), i32>> {
    PATHS
        .iter()
        .map(|path| {
            let meta = fs::symlink_metadata(root.join(path))
                .map_err(|e| e.raw_os_error().unwrap_or(-1))?;
            Ok(if meta.is_dir() {
                (meta.mode(), 0, 0)
            } else {
                (meta.mode(), meta.len(), meta.nlink())
            })
        })
        .collect()
}

/// What differs between two trees, briefly (a file's data as its length and the first
/// offset that differs: the base's 1 MiB file would flood the output).
fn differences(left: &Tree, right: &Tree) -> String {
    let brief = |entry: Option<&Entry>| match entry {
        Some(Entry::File {
            mode,
            nlink,
            size,
            data,
        }) => format!(
            "File {{ mode: {mode:o}, nlink: {nlink}, size: {size}, {} bytes: {:?} }}",
            data.len(),
            String::from_utf8_lossy(&data[..data.len().min(64)])
        ),
        other => format!("{other:?}"),
    };
    let mut out = Vec::new();
    let names: std::collections::BTreeSet<_> =
        left.entries.keys().chain(right.entries.keys()).collect();
    for name in names {
        let (l, r) = (left.entries.get(name), right.entries.get(name));
        if l == r {
            continue;
        }
        let mut line = format!("{}: {} | {}", name.display(), brief(l), brief(r));
        if let (Some(Entry::File { data: l, .. }), Some(Entry::File { data: r, .. })) = (l, r) {
            let at = l.iter().zip(r).position(|(a, b)| a != b);
            line += &format!(" (first different byte at {at:?})");
        }
        out.push(line);
    }
    if left.links != right.links {
        out.push(format!("links: {:?} | {:?}", left.links, right.links));
    }
    out.join("; ")
}

/// Writes `tree` into the empty directory `root`.
fn write_tree(tree: &Tree, root: &Path) {
    let mut linked: HashMap<&Path, &Path> = HashMap::new();
    for names in &tree.links {
        for name in &names[1..] {
            linked.insert(name, &names[0]);
        }
    }
    for (rel, entry) in &tree.entries {
        let path = root.join(rel);
        // Hard links of FIFOs and symlinks too: a rollback that broke them made a rename
        // between two of the names a move in the reference and a no-op in the view
        // (`Mkfifo, Link, Freeze, Switch, Rename`).
        if let Some(first) = linked.get(rel.as_path())
            && fs::symlink_metadata(root.join(first)).is_ok()
        {
            fs::hard_link(root.join(first), &path).unwrap();
            continue;
        }
        match entry {
            Entry::Dir { .. } => fs::create_dir(&path).unwrap(),
            Entry::Symlink { target, .. } => std::os::unix::fs::symlink(target, &path).unwrap(),
            Entry::Fifo { .. } => {
                nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap()
            }
            Entry::File { data, .. } => fs::write(&path, data).unwrap(),
        }
    }
    for (rel, entry) in tree.entries.iter().rev() {
        if let Entry::Dir { mode } | Entry::File { mode, .. } | Entry::Fifo { mode, .. } = entry {
            fs::set_permissions(root.join(rel), fs::Permissions::from_mode(*mode)).unwrap();
        }
    }
}

fn errno(result: std::io::Result<()>) -> Result<(), i32> {
    result.map_err(|e| e.raw_os_error().unwrap_or(-1))
}

/// Options with `O_NONBLOCK`: opening a FIFO the ops made must not wait for a reader
/// (`ENXIO` on both sides instead); regular files ignore the flag.
fn options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.custom_flags(libc::O_NONBLOCK);
    options
}

/// Applies a file operation under `root`; `held` are this side's held fds.
fn apply(root: &Path, op: &Op, held: &mut [Option<File>; 2]) -> Result<(), i32> {
    let p = |i: &usize| root.join(PATHS[*i]);
    match op {
        Op::Write { path, offset, data } => errno((|| {
            let f = options()
                .write(true)
                .create(true)
                .truncate(false)
                .open(p(path))?;
            f.write_all_at(data, u64::from(*offset))
        })()),
        Op::Append { path, data } => errno((|| {
            let mut f = options().append(true).create(true).open(p(path))?;
            std::io::Write::write_all(&mut f, data)
        })()),
        Op::Overwrite { path, data } => errno((|| {
            let mut f = options()
                .write(true)
                .create(true)
                .truncate(true)
                .open(p(path))?;
            std::io::Write::write_all(&mut f, data)
        })()),
        Op::Mkfifo { path } => errno(
            nix::unistd::mkfifo(&p(path), nix::sys::stat::Mode::from_bits_truncate(0o640))
                .map_err(Into::into),
        ),
        Op::Truncate { path, len } => errno((|| {
            options()
                .write(true)
                .open(p(path))?
                .set_len(u64::from(*len))
        })()),
        Op::Mkdir { path } => errno(fs::create_dir(p(path))),
        Op::Unlink { path } => errno(fs::remove_file(p(path))),
        Op::Rmdir { path } => errno(fs::remove_dir(p(path))),
        Op::Rename { from, to, flags } => errno(
            nix::fcntl::renameat2(
                nix::fcntl::AT_FDCWD,
                &p(from),
                nix::fcntl::AT_FDCWD,
                &p(to),
                nix::fcntl::RenameFlags::from_bits_truncate(*flags),
            )
            .map_err(Into::into),
        ),
        Op::Link { from, to } => errno(fs::hard_link(p(from), p(to))),
        Op::Symlink { path, target } => errno(std::os::unix::fs::symlink(PATHS[*target], p(path))),
        Op::Chmod { path, mode } => errno(fs::set_permissions(
            p(path),
            fs::Permissions::from_mode(*mode),
        )),
        // A FIFO is not held: its pipe lives with the kernel's inode, which DeltaFS keeps
        // across a rollback that leaves the FIFO unchanged (a held end stays attached),
        // while the reference recreates it (`Mkfifo, Freeze, Hold, Switch, Truncate`
        // differed: `EINVAL`, a reader present, against `ENXIO`).
        Op::Hold { path }
            if fs::symlink_metadata(p(path)).is_ok_and(|m| m.file_type().is_fifo()) =>
        {
            Ok(())
        }
        Op::Hold { path } => {
            let slot = held.iter().position(Option::is_none).unwrap_or(0);
            match options().read(true).write(true).open(p(path)) {
                Ok(f) => {
                    held[slot] = Some(f);
                    Ok(())
                }
                Err(e) => errno(Err(e)),
            }
        }
        Op::WriteHeld { slot, offset, data } => match &held[*slot] {
            Some(f) => errno(f.write_all_at(data, u64::from(*offset))),
            None => Ok(()),
        },
        Op::Release { slot } => {
            held[*slot] = None;
            Ok(())
        }
        Op::Freeze | Op::Switch { .. } | Op::Branch { .. } => unreachable!(),
    }
}

/// The inode of the existing regular file `op` opens for writing under `root`, if any.
fn writing_open(root: &Path, op: &Op) -> Option<u64> {
    let path = match op {
        Op::Write { path, .. }
        | Op::Append { path, .. }
        | Op::Overwrite { path, .. }
        | Op::Truncate { path, .. }
        | Op::Hold { path } => path,
        _ => return None,
    };
    // Following symlinks, as the open does.
    let meta = fs::metadata(root.join(PATHS[*path])).ok()?;
    meta.is_file().then(|| meta.ino())
}

struct Run<'a> {
    fx: &'a Fixture,
    view: View,
    scratch: TempDir,
    reference: PathBuf,
    generation: usize,
    checkpoints: Vec<(SnapshotId, Tree)>,
    held: [Option<File>; 2],
    held_ref: [Option<File>; 2],
    /// For each held file at the last freeze (none after a switch): the checkpoint, the
    /// reference file's ctime then, and a name it has in the checkpoint.
    kept: [Option<Kept>; 2],
}

/// A held file at a freeze: the checkpoint's index, the file's ctime, a name it has.
type Kept = (usize, (i64, i64), PathBuf);

fn ctime(file: &File) -> (i64, i64) {
    let meta = file.metadata().unwrap();
    (meta.ctime(), meta.ctime_nsec())
}

/// A name of inode `ino` under `root`, if it has one.
fn name_of(root: &Path, ino: u64) -> Option<PathBuf> {
    let tree = read_tree(root);
    tree.entries
        .keys()
        .find(|rel| fs::symlink_metadata(root.join(rel)).is_ok_and(|m| m.ino() == ino))
        .cloned()
}

impl Run<'_> {
    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Freeze => {
                let id = self.view.freeze(&FreezeOpts::default()).unwrap().id;
                self.checkpoints.push((id, read_tree(&self.reference)));
                let index = self.checkpoints.len() - 1;
                for (kept, held) in self.kept.iter_mut().zip(&self.held_ref) {
                    *kept = held.as_ref().and_then(|file| {
                        let ino = file.metadata().unwrap().ino();
                        let name = name_of(&self.reference, ino)?;
                        Some((index, ctime(file), name))
                    });
                }
            }
            Op::Switch { to } => {
                if self.checkpoints.is_empty() {
                    return Ok(());
                }
                let index = to % self.checkpoints.len();
                let (id, tree) = self.checkpoints[index].clone();
                self.view.switch(id).unwrap();
                // Held fds keep their files; the reference starts over in a new
                // directory, so the old fds write to files nothing shows any more...
                self.generation += 1;
                self.reference = self.scratch.path().join(format!("ref{}", self.generation));
                fs::create_dir(&self.reference).unwrap();
                write_tree(&tree, &self.reference);
                // ...except a file unchanged since the last freeze, when that freeze's
                // checkpoint is the target: it still is what the checkpoint holds, and
                // its fd stays connected to the view.
                for (kept, held) in self.kept.iter_mut().zip(self.held_ref.iter_mut()) {
                    if let (Some((at, then, name)), Some(file)) = (kept.take(), held.as_ref())
                        && at == index
                        && ctime(file) == then
                    {
                        *held = Some(
                            options()
                                .read(true)
                                .write(true)
                                .open(self.reference.join(name))
                                .unwrap(),
                        );
                    }
                }
            }
            Op::Branch { from } => {
                if self.checkpoints.is_empty() {
                    return Ok(());
                }
                let (id, tree) = &self.checkpoints[from % self.checkpoints.len()];
                let branch = self
                    .fx
                    .mount(&format!("branch{}", self.generation), Some(*id));
                let seen = read_tree(branch.mountpoint());
                branch.unmount().unwrap();
                prop_assert_eq!(&seen, tree, "branch from {}", id);
            }
            op => {
                let opened = writing_open(&self.reference, op);
                let real = apply(self.view.mountpoint(), op, &mut self.held);
                let expected = apply(&self.reference, op, &mut self.held_ref);
                prop_assert_eq!(real, expected, "result of {:?}", op);
                // An open for writing since the freeze: the file's handles no longer all
                // predate the checkpoint, and a rollback disconnects them all (as DeltaFS
                // does: one node id per file).
                if let (Some(ino), Ok(())) = (opened, expected) {
                    for (kept, held) in self.kept.iter_mut().zip(&self.held_ref) {
                        if held
                            .as_ref()
                            .is_some_and(|f| f.metadata().unwrap().ino() == ino)
                        {
                            *kept = None;
                        }
                    }
                }
            }
        }
        // Each name by path first, before a listing refreshes the kernel's entries
        // (`READDIRPLUS`): a stale entry shows only so.
        let real = stat_paths(self.view.mountpoint());
        let expected = stat_paths(&self.reference);
        prop_assert_eq!(real, expected, "lstat of each name after {:?}", op);
        let real = read_tree(self.view.mountpoint());
        let expected = read_tree(&self.reference);
        prop_assert!(
            real == expected,
            "after {:?}: view (left) and reference (right) differ: {}",
            op,
            differences(&real, &expected)
        );
        Ok(())
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    run_on(Fixture::new(), ops)
}

/// The chunk policy of the plain-store variant.
fn tiny_chunks() -> deltafs::ChunkPolicy {
    deltafs::ChunkPolicy {
        chunk: 8,
        min_size: 0,
        complete_at_half: false,
    }
}

fn run_on(fx: Fixture, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let scratch = TempDir::new_in(&std::env::temp_dir(), "deltafs-model-");
    let reference = scratch.path().join("ref0");
    fs::create_dir(&reference).unwrap();
    // Hard links and a FIFO the base has (one base inode under two names: the view keeps
    // them one inode through copy-up, freeze and switch).
    fs::hard_link(fx.base.join("etc/hostname"), fx.base.join("etc/hosts")).unwrap();
    nix::unistd::mkfifo(
        &fx.base.join("usr/pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    fs::hard_link(fx.base.join("usr/pipe"), fx.base.join("usr/bin/pipe")).unwrap();
    write_tree(&read_tree(&fx.base), &reference);
    let mut run = Run {
        view: fx.mount("live", None),
        fx: &fx,
        scratch,
        reference,
        generation: 0,
        checkpoints: Vec::new(),
        held: [None, None],
        held_ref: [None, None],
        kept: [None, None],
    };
    for op in &ops {
        run.step(op)?;
    }
    run.held = [None, None];
    let Run { view, .. } = run;
    view.unmount().unwrap();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(24),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn a_view_behaves_like_plain_directories_copied_at_each_checkpoint(
        ops in proptest::collection::vec(op(), 1..40)
    ) {
        logged(&ops, || run(ops.clone()))?;
    }

    #[test]
    fn chunk_granular_copies_behave_like_plain_directories_too(
        ops in proptest::collection::vec(op(), 1..40)
    ) {
        logged(&ops, || run_on(Fixture::plain(tiny_chunks()), ops.clone()))?;
    }
}

/// Runs one case of `ops` (unless the test cannot run here: it says why) and appends a
/// failing case (the whole sequence, before any shrinking, and the failure) to the file
/// `DELTAFS_MODEL_LOG` names, if set: a rare failure stays on record even when
/// shrinking does not reproduce it.
fn logged(
    ops: &[Op],
    run: impl FnOnce() -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError> {
    if let Some(why) = common::skip_reason() {
        eprintln!("skipped: {why}");
        return Ok(());
    }
    let result = run();
    if let (Err(e), Ok(log)) = (&result, std::env::var("DELTAFS_MODEL_LOG")) {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        std::io::Write::write_all(&mut file, format!("{ops:?}\n{e}\n\n").as_bytes()).unwrap();
    }
    result
}

/// The sequences the generator rarely produces, run as they are.
#[test]
fn a_held_file_across_a_rollback_to_the_last_checkpoint() {
    require_root!();
    let write = |data: &[u8]| Op::Write {
        path: 0,
        offset: 0,
        data: data.to_vec(),
    };
    let held = |data: &[u8]| Op::WriteHeld {
        slot: 0,
        offset: 2,
        data: data.to_vec(),
    };
    for ops in [
        // Unchanged between the checkpoint and the rollback.
        vec![
            write(b"aaaa"),
            Op::Hold { path: 0 },
            Op::Freeze,
            Op::Switch { to: 0 },
            held(b"XY"),
        ],
        // Changed through the held fd in between.
        vec![
            write(b"aaaa"),
            Op::Hold { path: 0 },
            Op::Freeze,
            held(b"XY"),
            Op::Switch { to: 0 },
            held(b"ZZ"),
        ],
        // Changed through the path in between.
        vec![
            write(b"aaaa"),
            Op::Hold { path: 0 },
            Op::Freeze,
            write(b"b"),
            Op::Switch { to: 0 },
            held(b"ZZ"),
        ],
        // An older checkpoint.
        vec![
            write(b"aaaa"),
            Op::Hold { path: 0 },
            Op::Freeze,
            Op::Freeze,
            Op::Switch { to: 0 },
            held(b"ZZ"),
        ],
        // Opened for writing after the checkpoint, unchanged: disconnected, whether or
        // not the freeze kept the file live (it did when the truncate's `RELEASE` was
        // still pending: the held write then showed in the view, 1 case in ~150).
        vec![
            Op::Truncate { path: 9, len: 189 },
            Op::Freeze,
            Op::Hold { path: 9 },
            Op::Switch { to: 0 },
            Op::WriteHeld {
                slot: 0,
                offset: 72,
                data: b"held".to_vec(),
            },
        ],
        // Held at the checkpoint, opened for writing again after it: both disconnected.
        vec![
            write(b"aaaa"),
            Op::Hold { path: 0 },
            Op::Freeze,
            Op::Write {
                path: 0,
                offset: 0,
                data: Vec::new(),
            },
            Op::Switch { to: 0 },
            held(b"ZZ"),
        ],
        // Two names of one FIFO across a rollback: a rename from one to the other does
        // nothing (the reference once made two FIFOs of them, and moved one).
        vec![
            Op::Mkfifo { path: 0 },
            Op::Link { from: 0, to: 1 },
            Op::Freeze,
            Op::Switch { to: 0 },
            Op::Rename {
                from: 0,
                to: 1,
                flags: 0,
            },
        ],
        // The same with a symlink (`link` does not follow it) and a chmod of a FIFO name.
        vec![
            Op::Symlink { path: 0, target: 7 },
            Op::Link { from: 0, to: 1 },
            Op::Mkfifo { path: 2 },
            Op::Unlink { path: 9 },
            Op::Link { from: 2, to: 9 },
            Op::Freeze,
            Op::Switch { to: 0 },
            Op::Rename {
                from: 1,
                to: 0,
                flags: 0,
            },
            Op::Chmod {
                path: 2,
                mode: 0o600,
            },
        ],
        // A FIFO across a rollback (not held: see `apply`).
        vec![
            Op::Mkfifo { path: 1 },
            Op::Freeze,
            Op::Hold { path: 1 },
            Op::Switch { to: 0 },
            Op::Truncate { path: 1, len: 0 },
        ],
    ] {
        run(ops.clone()).unwrap_or_else(|e| panic!("{ops:?}: {e}"));
        run_on(Fixture::plain(tiny_chunks()), ops.clone())
            .unwrap_or_else(|e| panic!("chunked: {ops:?}: {e}"));
    }
}
