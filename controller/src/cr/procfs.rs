//! What `/proc/<pid>` (and `prlimit(2)`, the one syscall that reads another process's
//! limits) says about a process: threads, status fields, mappings, open fds, cwd,
//! cgroup. Parsers are pure functions over the file text, tested without a process.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors of reading `/proc`.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// A file or link could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file did not have the expected format.
    #[error("cannot parse {what} in {}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The field or line.
        what: String,
    },
    /// `prlimit` failed.
    #[error("prlimit of resource {resource} of pid {pid}")]
    Prlimit {
        /// The process.
        pid: i32,
        /// `RLIMIT_*`.
        resource: u32,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn proc_path(pid: i32, rest: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{rest}"))
}

fn read(path: &Path) -> Result<String, ProcError> {
    fs::read_to_string(path).map_err(|source| ProcError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_link(path: &Path) -> Result<OsString, ProcError> {
    fs::read_link(path)
        .map(PathBuf::into_os_string)
        .map_err(|source| ProcError::Read {
            path: path.to_path_buf(),
            source,
        })
}

/// The process's `comm` (its name, as `ps` shows it).
pub fn comm(pid: i32) -> Result<String, ProcError> {
    Ok(read(&proc_path(pid, "comm"))?.trim_end().to_owned())
}

/// `comm`, or `?` when it cannot be read (for error messages).
pub fn comm_or_unknown(pid: i32) -> String {
    comm(pid).unwrap_or_else(|_| "?".to_owned())
}

/// The number of threads (entries of `/proc/<pid>/task`).
pub fn thread_count(pid: i32) -> Result<usize, ProcError> {
    let path = proc_path(pid, "task");
    let dir = fs::read_dir(&path).map_err(|source| ProcError::Read {
        path: path.clone(),
        source,
    })?;
    Ok(dir.filter(|e| e.is_ok()).count())
}

/// The thread ids of `pid` (entries of `/proc/<pid>/task`), in ascending order (the
/// thread-group leader, whose tid is `pid`, first).
pub fn tids(pid: i32) -> Result<Vec<i32>, ProcError> {
    let path = proc_path(pid, "task");
    let dir = fs::read_dir(&path).map_err(|source| ProcError::Read {
        path: path.clone(),
        source,
    })?;
    let mut tids: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    tids.sort_unstable();
    Ok(tids)
}

/// The `comm` of thread `tid` of `pid`.
pub fn task_comm(pid: i32, tid: i32) -> Result<String, ProcError> {
    Ok(read(&proc_path(pid, &format!("task/{tid}/comm")))?
        .trim_end()
        .to_owned())
}

/// `/proc/<pid>/task/<tid>/status`: the thread's own signal mask and pending signals.
pub fn task_status(pid: i32, tid: i32) -> Result<Status, ProcError> {
    let path = proc_path(pid, &format!("task/{tid}/status"));
    parse_status(&read(&path)?).map_err(|what| ProcError::Parse { path, what })
}

/// The scheduler state of thread `tid` of `pid` (`None`: it is gone).
pub fn task_state(pid: i32, tid: i32) -> Option<char> {
    let text = fs::read_to_string(proc_path(pid, &format!("task/{tid}/stat"))).ok()?;
    parse_stat(&text).map(|st| st.state)
}

/// Fields of `/proc/<pid>/status` that DeltaCR records.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// `Umask`.
    pub umask: u32,
    /// `PPid`.
    pub ppid: i32,
    /// `SigPnd`: signals pending for the thread.
    pub sig_pending: u64,
    /// `ShdPnd`: signals pending for the process.
    pub shared_pending: u64,
    /// `SigBlk`: the signal mask.
    pub blocked: u64,
    /// `SigIgn`: signals whose disposition is `SIG_IGN`.
    pub ignored: u64,
    /// `SigCgt`: signals with a handler.
    pub caught: u64,
}

/// Reads `/proc/<pid>/status`.
pub fn status(pid: i32) -> Result<Status, ProcError> {
    let path = proc_path(pid, "status");
    parse_status(&read(&path)?).map_err(|what| ProcError::Parse { path, what })
}

/// Parses the text of `/proc/<pid>/status`.
pub fn parse_status(text: &str) -> Result<Status, String> {
    let mut st = Status::default();
    let mut seen = 0u32;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let hex = |v: &str| u64::from_str_radix(v, 16).map_err(|_| format!("{key}: {v}"));
        match key {
            "Umask" => {
                st.umask = u32::from_str_radix(value, 8).map_err(|_| format!("Umask: {value}"))?;
                seen |= 1;
            }
            "PPid" => {
                st.ppid = value.parse().map_err(|_| format!("PPid: {value}"))?;
                seen |= 2;
            }
            "SigPnd" => st.sig_pending = hex(value)?,
            "ShdPnd" => st.shared_pending = hex(value)?,
            "SigBlk" => {
                st.blocked = hex(value)?;
                seen |= 4;
            }
            "SigIgn" => st.ignored = hex(value)?,
            "SigCgt" => st.caught = hex(value)?,
            _ => {}
        }
    }
    if seen != 7 {
        return Err("Umask, PPid or SigBlk missing".to_owned());
    }
    Ok(st)
}

/// Fields of `/proc/<pid>/stat`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    /// Scheduler state: `R`, `S`, `D`, `T` (stopped), `t` (tracing stop), `Z`, …
    pub state: char,
    /// Process group.
    pub pgrp: i32,
    /// Session.
    pub session: i32,
    /// User-mode CPU time, in clock ticks.
    pub utime: u64,
    /// Kernel-mode CPU time, in clock ticks.
    pub stime: u64,
}

/// Reads `/proc/<pid>/stat`.
pub fn stat(pid: i32) -> Result<Stat, ProcError> {
    let path = proc_path(pid, "stat");
    parse_stat(&read(&path)?).ok_or_else(|| ProcError::Parse {
        path,
        what: "stat line".to_owned(),
    })
}

/// Parses the text of `/proc/<pid>/stat` (`comm` may hold spaces and parentheses: the
/// fields start after the last `)`).
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15.
    Some(Stat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        session: fields.get(3)?.parse().ok()?,
        utime: fields.get(11)?.parse().ok()?,
        stime: fields.get(12)?.parse().ok()?,
    })
}

/// One line of `/proc/<pid>/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// `rwxp` / `rw-s` …
    pub perms: [u8; 4],
    /// Offset into the file.
    pub offset: u64,
    /// Inode number of the file (0 for anonymous memory).
    pub inode: u64,
    /// The path or pseudo-path (`[vdso]`, `[heap]`), empty for anonymous memory.
    pub name: String,
}

impl Mapping {
    /// Its `PROT_*` bits.
    pub fn prot(&self) -> i32 {
        prot_of(&self.perms)
    }

    /// A writable shared mapping: its pages are shared with every fork, so writes after a
    /// checkpoint would reach the template.
    pub fn is_shared_writable(&self) -> bool {
        self.perms[1] == b'w' && self.perms[3] == b's'
    }
}

/// The `PROT_*` bits of a maps permission field (`r-xp`, …).
pub fn prot_of(perms: &[u8]) -> i32 {
    let mut prot = libc::PROT_NONE;
    if perms.first() == Some(&b'r') {
        prot |= libc::PROT_READ;
    }
    if perms.get(1) == Some(&b'w') {
        prot |= libc::PROT_WRITE;
    }
    if perms.get(2) == Some(&b'x') {
        prot |= libc::PROT_EXEC;
    }
    prot
}

/// Reads `/proc/<pid>/maps`.
pub fn maps(pid: i32) -> Result<Vec<Mapping>, ProcError> {
    let path = proc_path(pid, "maps");
    parse_maps(&read(&path)?).map_err(|what| ProcError::Parse { path, what })
}

/// Parses the text of `/proc/<pid>/maps`.
pub fn parse_maps(text: &str) -> Result<Vec<Mapping>, String> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let bad = || format!("maps line {line:?}");
            let mut it = line.splitn(6, ' ');
            let range = it.next().ok_or_else(bad)?;
            let perms = it.next().ok_or_else(bad)?;
            let (start, end) = range.split_once('-').ok_or_else(bad)?;
            let start = u64::from_str_radix(start, 16).map_err(|_| bad())?;
            let end = u64::from_str_radix(end, 16).map_err(|_| bad())?;
            let perms: [u8; 4] = perms.as_bytes().try_into().map_err(|_| bad())?;
            let offset = it.next().ok_or_else(bad)?;
            let offset = u64::from_str_radix(offset, 16).map_err(|_| bad())?;
            let _dev = it.next().ok_or_else(bad)?;
            let inode = it.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
            // The name after padding.
            let name = it.next().map(str::trim_start).unwrap_or("").to_owned();
            Ok(Mapping {
                start,
                end,
                perms,
                offset,
                inode,
                name,
            })
        })
        .collect()
}

/// The `[vdso]` range in `maps`.
pub fn vdso(maps: &[Mapping]) -> Option<(u64, u64)> {
    maps.iter()
        .find(|m| m.name == "[vdso]")
        .map(|m| (m.start, m.end))
}

/// The open fds and what their `/proc/<pid>/fd` links say, sorted by fd.
pub fn fds(pid: i32) -> Result<Vec<(i32, OsString)>, ProcError> {
    let path = proc_path(pid, "fd");
    let dir = fs::read_dir(&path).map_err(|source| ProcError::Read {
        path: path.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in dir {
        let entry = entry.map_err(|source| ProcError::Read {
            path: path.clone(),
            source,
        })?;
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        match fs::read_link(entry.path()) {
            Ok(target) => out.push((fd, target.into_os_string())),
            // Closed between readdir and readlink.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ProcError::Read {
                    path: entry.path(),
                    source,
                });
            }
        }
    }
    out.sort_by_key(|(fd, _)| *fd);
    Ok(out)
}

/// `pos` and `flags` of `/proc/<pid>/fdinfo/<fd>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdInfo {
    /// The file offset.
    pub pos: u64,
    /// The open flags, `O_CLOEXEC` included when the fd has it.
    pub flags: u32,
}

/// Reads `/proc/<pid>/fdinfo/<fd>`.
pub fn fdinfo(pid: i32, fd: i32) -> Result<FdInfo, ProcError> {
    let path = proc_path(pid, &format!("fdinfo/{fd}"));
    parse_fdinfo(&read(&path)?).ok_or_else(|| ProcError::Parse {
        path,
        what: "pos or flags".to_owned(),
    })
}

/// Parses the text of `/proc/<pid>/fdinfo/<fd>`.
pub fn parse_fdinfo(text: &str) -> Option<FdInfo> {
    let mut pos = None;
    let mut flags = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("pos:") {
            pos = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("flags:") {
            flags = u32::from_str_radix(v.trim(), 8).ok();
        }
    }
    Some(FdInfo {
        pos: pos?,
        flags: flags?,
    })
}

/// The working directory.
pub fn cwd(pid: i32) -> Result<PathBuf, ProcError> {
    read_link(&proc_path(pid, "cwd")).map(PathBuf::from)
}

/// The process's cgroup v2 path, relative to the cgroup2 mount (`/` is the root).
pub fn cgroup_v2(pid: i32) -> Result<PathBuf, ProcError> {
    let path = proc_path(pid, "cgroup");
    let text = read(&path)?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(PathBuf::from)
        .ok_or_else(|| ProcError::Parse {
            path,
            what: "0:: line".to_owned(),
        })
}

/// One resource limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// `RLIMIT_*`.
    pub resource: u32,
    /// Soft limit (`u64::MAX` = unlimited).
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// `RLIMIT_CPU` (0) .. `RLIMIT_RTTIME` (15): Linux's limits since 2.6.25 (libc's
/// `RLIMIT_NLIMITS` is deprecated as unstable across OS versions).
const RLIMIT_COUNT: u32 = 16;

/// Every resource limit of `pid` (`RLIMIT_CPU` .. `RLIMIT_RTTIME`).
pub fn rlimits(pid: i32) -> Result<Vec<Rlimit>, ProcError> {
    (0..RLIMIT_COUNT)
        .map(|resource| {
            let mut old = libc::rlimit64 {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: `old` is a valid, writable rlimit64; a null new limit reads only.
            let ret = unsafe { libc::prlimit64(pid, resource, std::ptr::null(), &mut old) };
            if ret != 0 {
                return Err(ProcError::Prlimit {
                    pid,
                    resource,
                    source: io::Error::last_os_error(),
                });
            }
            Ok(Rlimit {
                resource,
                soft: old.rlim_cur,
                hard: old.rlim_max,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status() {
        let text = "Name:\tpython3\nUmask:\t0027\nState:\tS (sleeping)\nTgid:\t10\nPPid:\t1\n\
SigQ:\t0/1000\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000100\n\
SigBlk:\t0000000000010000\nSigIgn:\t0000000001001000\nSigCgt:\t0000000180000002\n";
        let st = parse_status(text).unwrap();
        assert_eq!(st.umask, 0o027);
        assert_eq!(st.ppid, 1);
        assert_eq!(st.shared_pending, 0x100);
        assert_eq!(st.blocked, 0x10000);
        assert_eq!(st.ignored, 0x1001000);
        assert_eq!(st.caught, 0x180000002);
        assert!(parse_status("Name:\tx\n").is_err());
    }

    #[test]
    fn parses_stat_with_odd_comm() {
        let text = "42 (a) b (c) T 1 42 42 0 -1 4194560 1 0 0 0 7 3 0 0 20 0 1 0 5 0 0";
        let st = parse_stat(text).unwrap();
        assert_eq!(st.state, 'T');
        assert_eq!(st.pgrp, 42);
        assert_eq!(st.session, 42);
        assert_eq!((st.utime, st.stime), (7, 3));
    }

    #[test]
    fn parses_maps() {
        let text = "\
55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000001000 rw-s 00000000 00:05 1234                       /dev/zero (deleted)
7ffd1b5f0000-7ffd1b5f2000 r-xp 00000000 00:00 0                          [vdso]
7f1000000000-7f1000001000 r--p 00000000 00:00 0 
00400000-0041f000 r-xp 0001f000 00:2b 4611686018427635610                /sb/x/usr/bin/python3.11
";
        let maps = parse_maps(text).unwrap();
        assert_eq!(maps.len(), 5);
        assert_eq!(
            (maps[4].offset, maps[4].inode),
            (0x1f000, 4611686018427635610)
        );
        assert_eq!(maps[4].name, "/sb/x/usr/bin/python3.11");
        assert_eq!((maps[1].offset, maps[1].inode), (0, 1234));
        assert_eq!(maps[0].name, "[heap]");
        assert!(!maps[0].is_shared_writable());
        assert!(maps[1].is_shared_writable());
        assert_eq!(maps[1].name, "/dev/zero (deleted)");
        assert_eq!(vdso(&maps), Some((0x7ffd1b5f0000, 0x7ffd1b5f2000)));
        assert_eq!(maps[3].name, "");
    }

    #[test]
    fn prot_follows_the_permission_letters() {
        assert_eq!(prot_of(b"r-xp"), libc::PROT_READ | libc::PROT_EXEC);
        assert_eq!(prot_of(b"rw-p"), libc::PROT_READ | libc::PROT_WRITE);
        assert_eq!(prot_of(b"---p"), libc::PROT_NONE);
    }

    #[test]
    fn parses_fdinfo() {
        let text = "pos:\t4096\nflags:\t02100002\nmnt_id:\t25\nino:\t1234\n";
        let info = parse_fdinfo(text).unwrap();
        assert_eq!(info.pos, 4096);
        assert_eq!(info.flags, 0o2100002);
        assert!(parse_fdinfo("pos:\t1\n").is_none());
    }
}
