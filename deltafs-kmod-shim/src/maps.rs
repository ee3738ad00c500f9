//! `/proc/<pid>/maps`: which files processes have mapped shared and writable. A passthrough
//! mapping shows the backing file's device and inode, so a freeze can tell which backing
//! files a mapping may still write to after its fd was closed.

use std::collections::HashSet;
use std::fs;
use std::io;

/// Failures reading `/proc`.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// Reading a process's maps failed (other than the process being gone).
    #[error("cannot read /proc/{pid}/maps")]
    Read {
        /// The process.
        pid: u32,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// `(st_dev, st_ino)` of every file mapped shared and writable by one of `pids`. Processes
/// that are gone are skipped; one whose maps cannot be read is an error.
pub fn shared_writable(
    pids: impl IntoIterator<Item = u32>,
) -> Result<HashSet<(u64, u64)>, MapsError> {
    let mut found = HashSet::new();
    for pid in pids {
        if let Some(text) = read_maps(pid)? {
            found.extend(text.lines().filter_map(parse_line));
        }
    }
    Ok(found)
}

/// Like [`shared_writable`] over every process, skipping those whose maps this process
/// may not read (other user namespaces).
pub fn shared_writable_all() -> HashSet<(u64, u64)> {
    let mut found = HashSet::new();
    for pid in all_pids() {
        if let Ok(Some(text)) = read_maps(pid) {
            found.extend(text.lines().filter_map(parse_line));
        }
    }
    found
}

fn read_maps(pid: u32) -> Result<Option<String>, MapsError> {
    match fs::read_to_string(format!("/proc/{pid}/maps")) {
        Ok(text) => Ok(Some(text)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => Ok(None),
        Err(source) => Err(MapsError::Read { pid, source }),
    }
}

/// Every process's pid.
pub fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `(dev, ino)` of a maps line whose mapping is shared and writable.
fn parse_line(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split_ascii_whitespace();
    let _range = fields.next()?;
    let perms = fields.next()?.as_bytes();
    let _offset = fields.next()?;
    let dev = fields.next()?;
    let ino: u64 = fields.next()?.parse().ok()?;
    if perms.len() != 4 || perms[1] != b'w' || perms[3] != b's' || ino == 0 {
        return None;
    }
    let (major, minor) = dev.split_once(':')?;
    let major = u32::from_str_radix(major, 16).ok()?;
    let minor = u32::from_str_radix(minor, 16).ok()?;
    Some((libc::makedev(major, minor), ino))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_shared_writable_file_mappings_count() {
        let line = "7f00-7f10 rw-s 00000000 fd:01 1234 /store/layers/x/f1";
        assert_eq!(parse_line(line), Some((libc::makedev(0xfd, 1), 1234)));
        assert_eq!(parse_line("7f00-7f10 rw-p 00000000 fd:01 1234 /x"), None);
        assert_eq!(parse_line("7f00-7f10 r--s 00000000 fd:01 1234 /x"), None);
        assert_eq!(parse_line("7f00-7f10 rw-s 00000000 00:00 0 [anon]"), None);
        assert_eq!(parse_line("garbage"), None);
    }
}
