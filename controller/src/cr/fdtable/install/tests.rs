//! The plan run against a model of the kernel's fd table: every fd lands where the
//! table says, with its own flags, every prediction holds, and the controller's ends
//! are parked off the table's numbers.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt as _;

use proptest::prelude::*;

use super::*;

/// What an fd of the model refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Obj {
    File(PathBuf),
    /// The read end of pipe N.
    Read(usize),
    /// The write end of pipe N.
    Write(usize),
    /// Whatever the fork inherited.
    Stale,
}

#[derive(Clone, Debug)]
struct Open {
    obj: Obj,
    cloexec: bool,
    nonblock: bool,
    offset: u64,
}

/// The kernel as the batch sees it: lowest free fd first.
#[derive(Default)]
struct Kernel {
    fds: BTreeMap<i32, Open>,
    pipes: usize,
    cwd: Option<PathBuf>,
}

impl Kernel {
    fn install(&mut self, obj: Obj, cloexec: bool) -> i32 {
        let fd = (0..).find(|fd| !self.fds.contains_key(fd)).unwrap();
        let open = Open {
            obj,
            cloexec,
            nonblock: false,
            offset: 0,
        };
        self.fds.insert(fd, open);
        fd
    }

    /// Runs `batch` as [`crate::cr::inject::batch::LOOP`] does; the index of the call
    /// that failed otherwise.
    fn run(&mut self, batch: &Batch) -> Result<(Vec<u64>, Vec<u8>), usize> {
        let mut data = batch.bytes().to_vec();
        let at = |addr: u64| batch.offset(addr);
        let mut results = Vec::new();
        for (i, c) in batch.calls().iter().enumerate() {
            let a = c.args;
            let fd = a[0] as i32;
            let ebadf = -i64::from(libc::EBADF);
            let r: i64 = match c.nr {
                libc::SYS_close_range => {
                    self.fds
                        .retain(|&f, _| !(a[0]..=a[1]).contains(&(f as u64)));
                    0
                }
                libc::SYS_pipe2 => {
                    let cloexec = a[1] & libc::O_CLOEXEC as u64 != 0;
                    self.pipes += 1;
                    let r = self.install(Obj::Read(self.pipes), cloexec);
                    let w = self.install(Obj::Write(self.pipes), cloexec);
                    let o = at(a[0]);
                    data[o..o + 4].copy_from_slice(&r.to_ne_bytes());
                    data[o + 4..o + 8].copy_from_slice(&w.to_ne_bytes());
                    0
                }
                libc::SYS_openat => {
                    assert_eq!(a[0] as i32, libc::AT_FDCWD);
                    let path = cstr(&data, at(a[1]));
                    assert_eq!(a[2] & (libc::O_CREAT | libc::O_TRUNC) as u64, 0);
                    let cloexec = a[2] & libc::O_CLOEXEC as u64 != 0;
                    self.install(Obj::File(path), cloexec).into()
                }
                libc::SYS_lseek => match self.fds.get_mut(&fd) {
                    Some(o) => {
                        o.offset = a[1];
                        a[1] as i64
                    }
                    None => ebadf,
                },
                libc::SYS_dup3 => match self.fds.get(&fd).cloned() {
                    Some(mut o) if a[0] != a[1] => {
                        o.cloexec = a[2] & libc::O_CLOEXEC as u64 != 0;
                        self.fds.insert(a[1] as i32, o);
                        a[1] as i64
                    }
                    _ => -i64::from(libc::EINVAL),
                },
                libc::SYS_close => self.fds.remove(&fd).map_or(ebadf, |_| 0),
                libc::SYS_fcntl => {
                    assert_eq!(a[1] as i32, libc::F_SETFL);
                    match self.fds.get_mut(&fd) {
                        Some(o) => {
                            o.nonblock = a[2] & libc::O_NONBLOCK as u64 != 0;
                            0
                        }
                        None => ebadf,
                    }
                }
                libc::SYS_chdir => {
                    self.cwd = Some(cstr(&data, at(a[0])));
                    0
                }
                nr => panic!("unexpected syscall {nr} ({})", c.name),
            };
            if r < 0 && r != -i64::from(c.tolerated) {
                return Err(i);
            }
            results.push(r as u64);
        }
        Ok((results, data))
    }
}

fn cstr(data: &[u8], at: usize) -> PathBuf {
    let end = data[at..].iter().position(|&b| b == 0).unwrap();
    PathBuf::from(std::ffi::OsStr::from_bytes(&data[at..at + end]))
}

fn pipe_path(fd: i32) -> PathBuf {
    PathBuf::from(format!("/proc/1/fd/{}", 100 + fd))
}

/// Plans `table`, runs it on a model fork (holding stale fds) and checks the result.
fn rebuild(table: &[FdEntry]) {
    let reopened: Vec<_> = table
        .iter()
        .map(|e| match &e.kind {
            FdKind::Path { path, offset } => Some((path.clone(), *offset)),
            FdKind::Pipe => Some((pipe_path(e.fd), 0)),
            FdKind::Stdio => None,
        })
        .collect();
    let cwd = Path::new("/workspace/src");
    let p = plan(table, &reopened, cwd, Batch::new(0x7f00_0000_0000));
    let mut kernel = Kernel::default();
    for stale in [0, 3, 9] {
        kernel.fds.insert(stale, open(Obj::Stale));
    }
    let (results, data) = kernel.run(&p.batch).expect("a planned call failed");
    check(1, &p, &results, &data).expect("an fd other than the planned one");
    assert_eq!(kernel.cwd.as_deref(), Some(cwd));

    let targets: BTreeSet<i32> = table.iter().map(|e| e.fd).collect();
    for &(fd, parked) in &p.ours {
        assert!(!targets.contains(&parked), "ours parked on fd {parked}");
        let (theirs, ours) = (&kernel.fds[&fd].obj, &kernel.fds[&parked].obj);
        match (fd, theirs, ours) {
            (0, Obj::Read(a), Obj::Write(b)) | (1 | 2, Obj::Write(a), Obj::Read(b)) => {
                assert_eq!(a, b, "fd {fd} and its controller end are different pipes")
            }
            _ => panic!("fd {fd}: {theirs:?} with the controller's end {ours:?}"),
        }
        kernel.fds.remove(&parked);
    }
    for e in table {
        let o = &kernel.fds[&e.fd];
        assert_eq!(
            o.cloexec,
            e.flags & libc::O_CLOEXEC as u32 != 0,
            "fd {}",
            e.fd
        );
        match &e.kind {
            FdKind::Stdio => {
                let nonblock = e.flags & libc::O_NONBLOCK as u32 != 0;
                assert_eq!(o.nonblock, nonblock, "fd {}", e.fd);
            }
            FdKind::Path { path, offset } => {
                assert_eq!(o.obj, Obj::File(path.clone()), "fd {}", e.fd);
                assert_eq!(o.offset, *offset, "fd {}", e.fd);
            }
            FdKind::Pipe => assert_eq!(o.obj, Obj::File(pipe_path(e.fd))),
        }
    }
    let left: BTreeSet<i32> = kernel.fds.keys().copied().collect();
    assert_eq!(left, targets, "fds beyond the table's (parked ends taken)");
}

fn open(obj: Obj) -> Open {
    Open {
        obj,
        cloexec: false,
        nonblock: false,
        offset: 0,
    }
}

fn entry(fd: i32, kind: FdKind, flags: i32) -> FdEntry {
    FdEntry {
        fd,
        flags: flags as u32,
        kind,
        pipe: None,
    }
}

fn file(path: &str, offset: u64) -> FdKind {
    FdKind::Path {
        path: PathBuf::from(path),
        offset,
    }
}

#[test]
fn a_python_session_gets_its_stdio_and_files_back() {
    let cloexec = libc::O_CLOEXEC;
    rebuild(&[
        entry(0, FdKind::Stdio, libc::O_RDONLY),
        entry(1, FdKind::Stdio, libc::O_WRONLY),
        entry(2, FdKind::Stdio, libc::O_WRONLY | libc::O_NONBLOCK),
        entry(
            3,
            file("/workspace/data.csv", 4096),
            libc::O_RDONLY | cloexec,
        ),
        entry(7, file("/dev/null", 0), libc::O_RDWR),
        entry(5, FdKind::Pipe, libc::O_WRONLY | cloexec),
    ]);
}

#[test]
fn stdio_alone_and_out_of_order() {
    rebuild(&[
        entry(2, FdKind::Stdio, libc::O_WRONLY),
        entry(1, FdKind::Stdio, libc::O_WRONLY | libc::O_CLOEXEC),
    ]);
    rebuild(&[entry(0, FdKind::Stdio, libc::O_RDONLY)]);
    rebuild(&[]);
}

proptest! {
    #[test]
    fn any_table_is_rebuilt_as_planned(
        fds in proptest::collection::btree_map(
            0..16i32,
            (0..3u8, any::<bool>(), any::<bool>(), 0..3u64),
            0..10,
        ),
        reversed in any::<bool>(),
    ) {
        let mut table: Vec<FdEntry> = fds
            .into_iter()
            .map(|(fd, (kind, cloexec, nonblock, offset))| {
                let kind = match kind {
                    0 if fd <= 2 => FdKind::Stdio,
                    1 => FdKind::Pipe,
                    _ => file(&format!("/f{fd}"), offset * 1000),
                };
                let mut flags = libc::O_RDWR;
                if cloexec {
                    flags |= libc::O_CLOEXEC;
                }
                if nonblock {
                    flags |= libc::O_NONBLOCK;
                }
                entry(fd, kind, flags)
            })
            .collect();
        if reversed {
            table.reverse();
        }
        rebuild(&table);
    }
}
