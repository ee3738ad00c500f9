//! cgroup v2 for set-up's freeze/kill check and the demo's workload: find the cgroup2
//! mount, create a child cgroup, start a process inside it, freeze, thaw, kill, remove.

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// Where the kernel lists this process's mounts, with their filesystem types.
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// The cgroup2 mount point, from `/proc/self/mountinfo` (it is `/sys/fs/cgroup` on most
/// machines and `/sys/fs/cgroup/unified` on hybrid ones like the target machine).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo =
        fs::read_to_string(MOUNTINFO).with_context(|| format!("cannot read {MOUNTINFO}"))?;
    find_cgroup2_mount(&mountinfo)
        .with_context(|| format!("no cgroup2 filesystem is mounted (none in {MOUNTINFO})"))
}

/// The mount point of the first cgroup2 mount of the whole hierarchy (root `/`) in
/// mountinfo text.
pub fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let entry = MountInfoEntry::parse(line)?;
        (entry.fstype == "cgroup2" && entry.root == "/").then(|| PathBuf::from(entry.mount_point))
    })
}

/// The fields of one `/proc/<pid>/mountinfo` line that we use.
#[derive(Debug, PartialEq, Eq)]
pub struct MountInfoEntry {
    /// Root of the mount within its filesystem.
    pub root: String,
    /// Mount point, with the kernel's octal escapes decoded.
    pub mount_point: String,
    /// Filesystem type.
    pub fstype: String,
}

impl MountInfoEntry {
    /// Parses `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw`: five fixed
    /// fields, optional fields up to `-`, then the type.
    pub fn parse(line: &str) -> Option<Self> {
        let mut fields = line.split(' ');
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        let mut rest = fields.skip_while(|field| *field != "-");
        rest.next()?;
        let fstype = rest.next()?;
        Some(Self {
            root: unescape(root),
            mount_point: unescape(mount_point),
            fstype: fstype.to_owned(),
        })
    }
}

/// Decodes the `\040`-style octal escapes the kernel uses for space, tab, newline and `\`
/// in mount paths.
pub fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match octal {
            Some(digits) => {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                out.push(value as u8);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A child cgroup this process created. Dropping it thaws it, kills what is left in it,
/// and removes it, best effort; [`Cgroup::remove`] does the same and reports failure.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    removed: bool,
}

impl Cgroup {
    /// Creates `parent/name`.
    pub fn create(parent: &Path, name: &str) -> Result<Self> {
        let path = parent.join(name);
        fs::create_dir(&path)
            .with_context(|| format!("cannot create cgroup {}", path.display()))?;
        Ok(Self {
            path,
            removed: false,
        })
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup's id: the inode number of its directory, as `bpf_get_current_cgroup_id()`
    /// returns it.
    pub fn id(&self) -> Result<u64> {
        let meta = fs::metadata(&self.path)
            .with_context(|| format!("cannot stat cgroup {}", self.path.display()))?;
        Ok(meta.ino())
    }

    /// Spawns `cmd` inside this cgroup: the child writes itself into `cgroup.procs` before
    /// it executes, so not one instruction of the program runs outside the cgroup.
    pub fn spawn(&self, cmd: &mut Command) -> Result<Child> {
        let procs_path = self.path.join("cgroup.procs");
        let procs = File::options()
            .write(true)
            .open(&procs_path)
            .with_context(|| format!("cannot open {}", procs_path.display()))?;
        let hook = move || {
            // One write(2) of "0" (the calling process): async-signal-safe, no allocation.
            (&procs).write_all(b"0")
        };
        // SAFETY: the hook runs in the forked child before exec and only calls write(2)
        // on a descriptor opened (close-on-exec) before the fork; it touches no lock and
        // allocates nothing, so it is safe even if the parent has other threads.
        unsafe { cmd.pre_exec(hook) };
        cmd.spawn().with_context(|| {
            format!(
                "cannot start {:?} in cgroup {}",
                cmd.get_program(),
                self.path.display()
            )
        })
    }

    /// Freezes (`true`) or thaws the cgroup and waits until `cgroup.events` says so.
    pub fn set_frozen(&self, frozen: bool, timeout: Duration) -> Result<()> {
        self.write("cgroup.freeze", if frozen { "1" } else { "0" })?;
        let want = if frozen { "1" } else { "0" };
        self.wait_for(timeout, "frozen", |cg| {
            Ok(cg.event("frozen")?.as_deref() == Some(want))
        })
    }

    /// Sends SIGKILL to every process in the cgroup (`cgroup.kill`) and waits until it is
    /// empty.
    pub fn kill_all(&self, timeout: Duration) -> Result<()> {
        self.write("cgroup.kill", "1")?;
        self.wait_for(timeout, "empty", |cg| {
            Ok(cg.event("populated")?.as_deref() == Some("0"))
        })
    }

    /// Removes the cgroup after emptying it, reporting failure.
    pub fn remove(mut self) -> Result<()> {
        self.removed = true;
        self.teardown()
    }

    fn teardown(&self) -> Result<()> {
        if !self.path.exists() {
            return Ok(());
        }
        // A frozen cgroup still dies to SIGKILL, but thawing first is cheaper for the kernel.
        let _ = self.write("cgroup.freeze", "0");
        self.kill_all(Duration::from_secs(5))?;
        // rmdir can race the last exiting task's release: retry briefly on EBUSY.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot remove cgroup {}", self.path.display()));
                }
            }
        }
    }

    /// The value of `key` in `cgroup.events` (`populated`, `frozen`).
    fn event(&self, key: &str) -> Result<Option<String>> {
        let path = self.path.join("cgroup.events");
        let events =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        Ok(parse_events(&events, key))
    }

    fn write(&self, file: &str, value: &str) -> Result<()> {
        let path = self.path.join(file);
        fs::write(&path, value)
            .with_context(|| format!("cannot write {value:?} to {}", path.display()))
    }

    fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&Self) -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !done(self)? {
            if Instant::now() >= deadline {
                bail!(
                    "cgroup {} is not {what} after {timeout:?}",
                    self.path.display()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if !self.removed
            && let Err(err) = self.teardown()
        {
            eprintln!("warning: {err:#}");
        }
    }
}

/// The value of `key` in `cgroup.events` text (`populated 1\nfrozen 0\n`).
pub fn parse_events(events: &str, key: &str) -> Option<String> {
    events.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_HYBRID: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 30 0:38 /some/sub /mnt/cg2\\040bind rw,relatime - cgroup2 cgroup2 rw
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:5 master:2 - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn finds_the_cgroup2_mount_of_the_whole_hierarchy() {
        assert_eq!(
            find_cgroup2_mount(MOUNTINFO_HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            find_cgroup2_mount("22 1 254:0 / / rw - ext4 /dev/vda rw\n"),
            None
        );
        assert_eq!(
            find_cgroup2_mount("25 22 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn parses_optional_fields_and_escapes() {
        let entry = MountInfoEntry::parse(MOUNTINFO_HYBRID.lines().nth(3).unwrap()).unwrap();
        assert_eq!(
            entry,
            MountInfoEntry {
                root: "/some/sub".to_owned(),
                mount_point: "/mnt/cg2 bind".to_owned(),
                fstype: "cgroup2".to_owned(),
            }
        );
        assert_eq!(MountInfoEntry::parse("garbage"), None);
        assert_eq!(MountInfoEntry::parse("1 2 3:4 / /x rw no-separator"), None);
    }

    #[test]
    fn unescapes_octal_only() {
        assert_eq!(unescape(r"a\040b\011c\134d"), "a b\tc\\d");
        assert_eq!(unescape(r"trailing\04"), r"trailing\04");
        assert_eq!(unescape(r"not\999octal"), r"not\999octal");
    }

    #[test]
    fn reads_cgroup_events() {
        let events = "populated 1\nfrozen 0\n";
        assert_eq!(parse_events(events, "frozen").as_deref(), Some("0"));
        assert_eq!(parse_events(events, "populated").as_deref(), Some("1"));
        assert_eq!(parse_events(events, "missing"), None);
    }
}
