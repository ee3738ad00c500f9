//! Kernel features DeltaBox relies on: root, BTF, the tracepoints the write tracker
//! attaches to, cgroup v2 freeze and kill, `/dev/fuse`, and FUSE passthrough (run through
//! the `deltafs-probe` binary).

use std::fs::{self, File};
use std::io::Read as _;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::unistd::geteuid;

use super::{Check, Failure, Outcome, mounts};
use crate::cgroup::{Cgroup, cgroup2_mount};
use crate::util::{ChildGuard, cargo, output_with_timeout, profile_dir, run_cmd, target_dir};

/// `CAP_SYS_ADMIN`'s bit in the capability sets.
const CAP_SYS_ADMIN: u32 = 21;

const BTF: &str = "/sys/kernel/btf/vmlinux";

/// Syscalls whose `sys_enter_*` and `sys_exit_*` tracepoints the write tracker uses.
const WRITE_SYSCALLS: &[&str] = &["write", "pwrite64", "writev", "pwritev", "pwritev2"];

pub fn check_root() -> Check {
    let euid = geteuid();
    if !euid.is_root() {
        return Err(Failure::new(
            format!("running as euid {euid}: DeltaBox mounts, loads eBPF and manages cgroups"),
            "run as root (e.g. `sudo -E env PATH=$PATH cargo xtask setup`)",
        ));
    }
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    match effective_caps(&status) {
        Some(caps) if caps & (1 << CAP_SYS_ADMIN) != 0 => {
            Ok(Outcome::Ok("euid 0 with CAP_SYS_ADMIN".to_owned()))
        }
        Some(_) => Err(Failure::new(
            "euid 0 but without CAP_SYS_ADMIN",
            "run in a privileged container or VM (root with all capabilities)",
        )),
        None => Err(Failure::new(
            "cannot read CapEff from /proc/self/status",
            "mount /proc",
        )),
    }
}

/// The effective capability set from `/proc/self/status` text.
fn effective_caps(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

pub fn check_btf() -> Check {
    let fix = "the kernel needs CONFIG_DEBUG_INFO_BTF=y (the eBPF programs read kernel structs \
               with CO-RE)";
    let mut magic = [0u8; 2];
    File::open(BTF)
        .and_then(|mut file| file.read_exact(&mut magic))
        .map_err(|e| Failure::new(format!("cannot read {BTF}: {e}"), fix))?;
    // BTF's magic is 0xeB9F, stored in the machine's byte order.
    if u16::from_ne_bytes(magic) != 0xeb9f {
        return Err(Failure::new(
            format!("{BTF} does not start with the BTF magic"),
            fix,
        ));
    }
    Ok(Outcome::Ok(BTF.to_owned()))
}

/// `group/name` of every tracepoint the write tracker attaches to.
fn required_tracepoints() -> Vec<String> {
    let mut tracepoints = vec!["writeback/writeback_dirty_folio".to_owned()];
    for phase in ["enter", "exit"] {
        for syscall in WRITE_SYSCALLS {
            tracepoints.push(format!("syscalls/sys_{phase}_{syscall}"));
        }
    }
    tracepoints
}

pub fn check_tracepoints() -> Check {
    let Some(tracefs) = mounts::tracefs_dir() else {
        return Err(Failure::new(
            "tracefs is not mounted",
            format!("mount it: `mount -t tracefs tracefs {}`", mounts::TRACEFS),
        ));
    };
    let events = tracefs.join("events");
    let mut missing = Vec::new();
    let mut formats = Vec::new();
    for tracepoint in required_tracepoints() {
        match fs::read_to_string(events.join(&tracepoint).join("format")) {
            Ok(format) if !format.is_empty() => formats.push((tracepoint, format)),
            _ => missing.push(tracepoint.replace('/', ":")),
        }
    }
    if !missing.is_empty() {
        return Err(Failure::new(
            format!(
                "no format under {} for {}",
                events.display(),
                missing.join(", ")
            ),
            "syscalls:* need CONFIG_FTRACE_SYSCALLS=y; writeback:* need CONFIG_TRACEPOINTS \
             (any kernel with ftrace)",
        ));
    }
    let ino = formats
        .iter()
        .find(|(tracepoint, _)| tracepoint.starts_with("writeback/"))
        .and_then(|(_, format)| field_offset(format, "ino"));
    let Some(ino) = ino else {
        return Err(Failure::new(
            "writeback:writeback_dirty_folio has no `ino` field",
            "use a kernel whose writeback_dirty_folio tracepoint records the inode (Linux 5.18+)",
        ));
    };
    Ok(Outcome::Ok(format!(
        "writeback:writeback_dirty_folio (ino at offset {ino}), \
         syscalls:sys_{{enter,exit}}_{{{}}}",
        WRITE_SYSCALLS.join(",")
    )))
}

/// The offset of `field` in a tracepoint's `format` text
/// (`field:ino_t ino;\toffset:40;\tsize:8;\tsigned:0;`).
fn field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';').map(str::trim);
        let declaration = parts.next()?.strip_prefix("field:")?;
        let name = declaration.rsplit([' ', '*']).next()?;
        if name != field {
            return None;
        }
        parts.find_map(|part| part.strip_prefix("offset:")?.parse().ok())
    })
}

pub fn check_cgroup() -> Check {
    let fix = "mount cgroup v2 (`mount -t cgroup2 none /sys/fs/cgroup`) on Linux 5.14 or later \
               (cgroup.kill)";
    let mount = cgroup2_mount().map_err(|err| Failure::from_error(&err, fix))?;
    check_freeze_and_kill(&mount).map_err(|err| Failure::from_error(&err, fix))?;
    Ok(Outcome::Ok(format!(
        "{}: freeze, thaw and kill work",
        mount.display()
    )))
}

/// In a temporary child cgroup holding a `sleep`: freeze it and read back `frozen 1`,
/// thaw it, kill it with `cgroup.kill`, remove it. The guards clean up on any failure.
fn check_freeze_and_kill(mount: &Path) -> anyhow::Result<()> {
    use anyhow::{Context as _, bail};

    let cgroup = Cgroup::create(mount, &format!("deltabox-setup-{}", std::process::id()))?;
    for file in ["cgroup.freeze", "cgroup.kill"] {
        if !cgroup.path().join(file).exists() {
            bail!(
                "{} has no {file} (freeze needs Linux 5.2, kill 5.14)",
                cgroup.path().display()
            );
        }
    }
    let mut sleeper = ChildGuard::new(cgroup.spawn(Command::new("sleep").arg("60"))?);
    let timeout = Duration::from_secs(2);
    cgroup.set_frozen(true, timeout).context("freezing")?;
    cgroup.set_frozen(false, timeout).context("thawing")?;
    cgroup.kill_all(timeout).context("cgroup.kill")?;
    let status = sleeper.wait()?;
    if status.code().is_some() {
        bail!(
            "the process in {} was not killed: {status}",
            cgroup.path().display()
        );
    }
    cgroup.remove()
}

pub fn check_dev_fuse() -> Check {
    let fix = "the kernel needs CONFIG_FUSE_FS=y; if it has it, create the node: \
               `mknod /dev/fuse c 10 229`";
    let meta =
        fs::metadata("/dev/fuse").map_err(|e| Failure::new(format!("/dev/fuse: {e}"), fix))?;
    if !meta.file_type().is_char_device() {
        return Err(Failure::new("/dev/fuse is not a character device", fix));
    }
    File::options()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| Failure::new(format!("cannot open /dev/fuse: {e}"), fix))?;
    Ok(Outcome::Ok("character device, opens read-write".to_owned()))
}

/// Builds and runs `deltafs-probe`, which mounts a one-file FUSE filesystem whose open is
/// passthrough and checks that reads bypass the daemon.
pub fn check_passthrough() -> Check {
    let fix_build = "fix the build of deltafs-kmod-shim (see cargo's errors above)";
    run_cmd(cargo().args([
        "build",
        "--quiet",
        "-p",
        "deltafs",
        "--bin",
        "deltafs-probe",
    ]))
    .map_err(|err| Failure::from_error(&err, fix_build))?;
    let binary = profile_dir(false)
        .map_err(|err| Failure::from_error(&err, fix_build))?
        .join("deltafs-probe");
    // The probe's files go under target/, on the disk, not on a tmpfs /tmp.
    let dir = target_dir().map_err(|err| Failure::from_error(&err, fix_build))?;
    let mut probe = Command::new(&binary);
    probe.arg("--dir").arg(dir).args(["--timeout-secs", "10"]);
    let out = output_with_timeout(&mut probe, Duration::from_secs(30))
        .map_err(|err| Failure::from_error(&err, "rerun; if it hangs again, report it"))?;
    if out.status.success() {
        let line = String::from_utf8_lossy(&out.stdout);
        let line = line.trim();
        let detail = line
            .strip_prefix("FUSE passthrough works: ")
            .unwrap_or(line);
        return Ok(Outcome::Ok(detail.to_owned()));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let (message, fix) = split_probe_failure(&stderr);
    Err(Failure::new(message, fix))
}

/// `deltafs-probe: <message>\n  fix: <hint>` → (message, hint).
fn split_probe_failure(stderr: &str) -> (String, String) {
    let mut message = Vec::new();
    let mut fix = None;
    for line in stderr.lines() {
        match line.trim().strip_prefix("fix: ") {
            Some(hint) => fix = Some(hint.to_owned()),
            None => message.push(line.trim().trim_start_matches("deltafs-probe: ")),
        }
    }
    (
        message.join("; "),
        fix.unwrap_or_else(|| "see docs/setup.md, FUSE passthrough".to_owned()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIRTY_FOLIO_FORMAT: &str = "\
name: writeback_dirty_folio
ID: 1234
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:char name[32];\toffset:8;\tsize:32;\tsigned:0;
\tfield:ino_t ino;\toffset:40;\tsize:8;\tsigned:0;
\tfield:unsigned long index;\toffset:48;\tsize:8;\tsigned:0;

print fmt: \"bdi %s: ino=%lu index=%lu\", REC->name, (unsigned long)REC->ino, REC->index
";

    #[test]
    fn reads_field_offsets_from_a_format() {
        assert_eq!(field_offset(DIRTY_FOLIO_FORMAT, "ino"), Some(40));
        assert_eq!(field_offset(DIRTY_FOLIO_FORMAT, "index"), Some(48));
        assert_eq!(field_offset(DIRTY_FOLIO_FORMAT, "name[32]"), Some(8));
        assert_eq!(field_offset(DIRTY_FOLIO_FORMAT, "inode"), None);
    }

    #[test]
    fn lists_enter_and_exit_of_every_write_syscall() {
        let tracepoints = required_tracepoints();
        assert_eq!(tracepoints.len(), 1 + 2 * WRITE_SYSCALLS.len());
        assert!(tracepoints.contains(&"syscalls/sys_exit_pwritev2".to_owned()));
        assert!(tracepoints.contains(&"writeback/writeback_dirty_folio".to_owned()));
    }

    #[test]
    fn reads_effective_capabilities() {
        let status = "Name:\txtask\nCapInh:\t0000000000000000\nCapEff:\t000001fffeffffff\n";
        let caps = effective_caps(status).unwrap();
        assert_ne!(caps & (1 << CAP_SYS_ADMIN), 0);
        assert_eq!(effective_caps("CapEff:\t0000000000000000\n"), Some(0));
        assert_eq!(effective_caps("Name:\tx\n"), None);
    }

    #[test]
    fn splits_the_probe_message_from_its_fix() {
        let stderr = "deltafs-probe: the kernel does not offer FUSE passthrough (FUSE ABI 7.31)\n  \
                      fix: use Linux 6.9\n";
        let (message, fix) = split_probe_failure(stderr);
        assert_eq!(
            message,
            "the kernel does not offer FUSE passthrough (FUSE ABI 7.31)"
        );
        assert_eq!(fix, "use Linux 6.9");
    }
}
