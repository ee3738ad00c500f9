//! POSIX ACLs through a mounted view, against ext4: `setfacl`/`getfacl` (package `acl`,
//! installed by `cargo xtask setup`) run the same sequence on both and must print the
//! same; the kernel enforces them (a process as `nobody` may write, as `daemon` may
//! not); default ACLs are inherited; ACLs live in the index, so they freeze, switch,
//! branch, survive a restart and a copy-up, and a rollback to before a `setfacl` undoes
//! it — also in the kernel's cache of them.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::common::{self, Fixture};
use crate::require_root;

/// Runs `script` with `/bin/sh` in `dir` (as root) and returns its output; fails the test
/// on a non-zero exit.
fn sh(dir: &Path, script: &str) -> String {
    let out = Command::new("/bin/sh")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run /bin/sh: {e}"));
    assert!(
        out.status.success(),
        "`{script}` in {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Whether `script` succeeds as user and group `id` (no supplementary groups).
fn succeeds_as(id: u32, script: &str) -> bool {
    Command::new("/bin/sh")
        .args(["-c", script])
        .uid(id)
        .gid(id)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

const NOBODY: u32 = 65534;
const DAEMON: u32 = 1;

/// `getfacl` of `paths` (relative to `dir`, not following symlinks), in that order.
fn getfacl(dir: &Path, paths: &[&str]) -> String {
    sh(dir, &format!("getfacl -P {}", paths.join(" ")))
}

/// Fails with a hint when the `acl` tools are missing (never a silent skip).
fn require_acl_tools() {
    for tool in ["setfacl", "getfacl"] {
        let found = Command::new(tool).arg("--version").output().is_ok();
        assert!(
            found,
            "{tool} is missing: run `cargo xtask setup` (package acl)"
        );
    }
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// The fixture's `live` view, its mount point and the scratch directory holding it
/// traversable by others (the tests run commands as `nobody` and `daemon` in it).
fn live_for_others(fx: &Fixture) -> (deltafs::View, PathBuf) {
    let (view, m) = fx.live();
    chmod(m.parent().unwrap(), 0o755);
    chmod(&m, 0o755);
    (view, m)
}

/// A directory on ext4: in the temporary directory when that is ext4 (as here), else on
/// a loop-mounted 32 MiB ext4 image. The scratch guard detaches the mount (which frees
/// the loop device) and removes everything on drop, also when the test fails.
struct Ext4 {
    dir: PathBuf,
    _scratch: common::TempDir,
}

impl Ext4 {
    fn new() -> Self {
        const EXT4_SUPER_MAGIC: i64 = 0xEF53;
        let scratch = common::TempDir::new_in(&std::env::temp_dir(), "acl-ext4-");
        let dir = scratch.path().join("fs");
        fs::create_dir(&dir).unwrap();
        let fs_type = nix::sys::statfs::statfs(scratch.path())
            .unwrap()
            .filesystem_type();
        if fs_type.0 as i64 != EXT4_SUPER_MAGIC {
            let image = scratch.path().join("ext4.img");
            fs::File::create(&image).unwrap().set_len(32 << 20).unwrap();
            sh(
                scratch.path(),
                "mkfs.ext4 -q -F ext4.img && mount -o loop ext4.img fs",
            );
        }
        Self {
            dir,
            _scratch: scratch,
        }
    }
}

/// The sequence compared: named entries, a mask, default ACLs inherited by files,
/// directories and a FIFO (the umask ignored under a default ACL, applied without
/// one), chmod rewriting the mask, an ACL the mode expresses (not stored), removals.
const SEQUENCE: &str = "umask 022
touch f && setfacl -m u:nobody:rw,g:daemon:r f
mkdir d && setfacl -d -m u:nobody:rwx,g:daemon:rx d && setfacl -m m::rx d
touch d/file && mkdir d/sub d/keep && mkfifo d/fifo && touch d/sub/deep
umask 077 && touch d/masked && mkdir plain && touch plain/u && umask 022
chmod 640 f && chmod 2775 d/sub && chmod 600 d/file
setfacl -x u:nobody f
touch eq && setfacl -m u::rwx,g::rx,o::- eq
touch gone && setfacl -m u:daemon:rwx gone && setfacl -b gone
setfacl -k d/sub && setfacl -x g:daemon d/sub/deep
ln -s f link";

const PATHS: &[&str] = &[
    ".",
    "f",
    "d",
    "d/file",
    "d/sub",
    "d/keep",
    "d/fifo",
    "d/sub/deep",
    "d/masked",
    "plain",
    "plain/u",
    "eq",
    "gone",
    "link",
];

/// Runs [`SEQUENCE`] in `dir`; returns its [`listing`].
fn listing_after_sequence(dir: &Path) -> String {
    sh(dir, SEQUENCE);
    listing(dir)
}

/// What the sequence leaves, as `getfacl` and `stat` print it.
fn listing(dir: &Path) -> String {
    let modes = sh(dir, &format!("stat -c '%A %U %G %n' {}", PATHS.join(" ")));
    format!("{}\n{modes}", getfacl(dir, PATHS))
}

#[test]
fn getfacl_prints_what_ext4_prints() {
    require_root!();
    require_acl_tools();
    let ext4 = Ext4::new();
    let expected = listing_after_sequence(&ext4.dir);

    let fx = Fixture::new();
    let (view, m) = fx.live();
    assert_eq!(listing_after_sequence(&m), expected);
    // The inheritance happened (not two identical failures).
    let deep = getfacl(&m, &["d/sub/deep"]);
    assert!(deep.contains("user:nobody:rwx"), "{deep}");
    assert!(getfacl(&m, &["d/keep"]).contains("default:user:nobody:rwx"));
    assert!(!getfacl(&m, &["d/sub"]).contains("default:"), "setfacl -k");
    assert!(
        sh(&m, "stat -c %a d/masked").starts_with("664"),
        "umask 077 ignored"
    );
    assert!(
        sh(&m, "stat -c %a plain/u").starts_with("600"),
        "umask 077 applied"
    );
    // A branch over a checkpoint of it shows the same.
    let id = view.freeze(&Default::default()).unwrap().id;
    let branch = fx.mount("branch", Some(id));
    assert_eq!(listing(branch.mountpoint()), expected);
    branch.unmount().unwrap();
    view.unmount().unwrap();
}

/// `setfacl -m u:nobody:rw` on a 0644 file of root's: the kernel lets `nobody` write
/// (the ACL's entry) and not `daemon` (other); a default ACL lets `nobody` write a file
/// created in the directory afterwards. Fails when the daemon does not store the ACL,
/// or the kernel does not ask for it.
#[test]
fn the_kernel_enforces_acls() {
    require_root!();
    require_acl_tools();
    let fx = Fixture::new();
    let (view, m) = live_for_others(&fx);
    let f = m.join("f");
    fs::write(&f, b"root\n").unwrap();
    chmod(&f, 0o644);
    let append = format!("echo more >> {}", f.display());
    assert!(!succeeds_as(NOBODY, &append), "nobody wrote before the ACL");
    sh(&m, "setfacl -m u:nobody:rw f");
    assert!(succeeds_as(NOBODY, &append), "the ACL lets nobody write");
    assert!(!succeeds_as(DAEMON, &append), "daemon is not in the ACL");
    assert_eq!(fs::read(&f).unwrap(), b"root\nmore\n");

    sh(
        &m,
        "mkdir d && setfacl -d -m u:nobody:rw d && setfacl -m u:nobody:rwx d",
    );
    sh(&m, "umask 022 && echo x > d/new");
    let inherited = format!("echo y >> {}", m.join("d/new").display());
    assert!(
        succeeds_as(NOBODY, &inherited),
        "the default ACL is inherited"
    );
    assert!(!succeeds_as(DAEMON, &inherited));
    view.unmount().unwrap();
}

/// Setting an ACL by the file's owner who is not in its group (and lacks `CAP_FSETID`)
/// clears set-group-ID, as on ext4; by root it stays. Fails when the daemon ignores who
/// asks (fuser hides the kernel's flag for it).
#[test]
fn an_acl_set_by_a_non_member_clears_set_group_id() {
    require_root!();
    require_acl_tools();
    let ext4 = Ext4::new();
    let fx = Fixture::new();
    let (view, m) = fx.live();
    let mut modes = Vec::new();
    for dir in [ext4.dir.as_path(), m.as_path()] {
        chmod(dir, 0o777);
        // Its parent must be traversable by others.
        chmod(dir.parent().unwrap(), 0o755);
        sh(
            dir,
            "touch g r && chown nobody:daemon g r && chmod 2775 g r",
        );
        let set = format!("setfacl -m u:daemon:r {}", dir.join("g").display());
        assert!(succeeds_as(NOBODY, &set), "nobody owns g");
        sh(dir, "setfacl -m u:daemon:r r");
        modes.push(sh(dir, "stat -c '%a %n' g r"));
    }
    assert_eq!(modes[1], modes[0]);
    assert_eq!(modes[0], "775 g\n2775 r\n");
    view.unmount().unwrap();
}

/// ACLs are part of a checkpoint: a rollback to before a `setfacl` removes it (from
/// `getfacl` and from what the kernel enforces: its cached ACL is invalidated), a
/// rollback to after it brings it back, and a restarted daemon mounts them from disk.
#[test]
fn acls_follow_freeze_switch_and_restart() {
    require_root!();
    require_acl_tools();
    let mut fx = Fixture::new();
    let (view, m) = live_for_others(&fx);
    sh(&m, "umask 022 && echo a > f && mkdir d");
    let before = view.freeze(&Default::default()).unwrap().id;
    let append = format!("echo n >> {}", m.join("f").display());
    assert!(!succeeds_as(NOBODY, &append));

    sh(
        &m,
        "setfacl -m u:nobody:rw f && setfacl -d -m g:daemon:rwx d",
    );
    assert!(
        succeeds_as(NOBODY, &append),
        "the kernel caches the new ACL"
    );
    let with_acl = getfacl(&m, &["f", "d"]);
    assert!(with_acl.contains("user:nobody:rw-"), "{with_acl}");
    let after = view.freeze(&Default::default()).unwrap().id;

    view.switch(before).unwrap();
    let rolled_back = getfacl(&m, &["f", "d"]);
    assert!(!rolled_back.contains("nobody"), "{rolled_back}");
    assert!(!rolled_back.contains("default:"), "{rolled_back}");
    assert!(
        !succeeds_as(NOBODY, &append),
        "the kernel still enforced the ACL of the state rolled back from"
    );
    assert_eq!(sh(&m, "stat -c %a f"), "644\n");

    view.switch(after).unwrap();
    assert_eq!(getfacl(&m, &["f", "d"]), with_acl);
    assert!(succeeds_as(NOBODY, &append));
    view.unmount().unwrap();

    fx.reopen();
    let restarted = fx.mount("again", Some(after));
    assert_eq!(getfacl(restarted.mountpoint(), &["f", "d"]), with_acl);
    restarted.unmount().unwrap();
}

/// A handle opened before a switch that changed its file keeps the state it was opened
/// in (a retired node id): the kernel asks that node for its ACL too, and gets it (not
/// `ESTALE`). Read through `/proc/<pid>/fd/<fd>` (followed: it is a link), which resolves
/// to that inode.
#[test]
fn a_handle_from_before_a_switch_keeps_its_acl() {
    use std::os::fd::AsRawFd;
    require_root!();
    require_acl_tools();
    let fx = Fixture::new();
    let (view, m) = fx.live();
    sh(&m, "echo a > f && setfacl -m u:nobody:r f");
    let id = view.freeze(&Default::default()).unwrap().id;
    let old = fs::File::open(m.join("f")).unwrap();
    sh(&m, "setfacl -m u:daemon:rw f");
    let report = view.switch(id).unwrap();
    assert_eq!(report.retired, 1, "{report:?}");
    let through_fd = format!("/proc/{}/fd/{}", std::process::id(), old.as_raw_fd());
    let acl = sh(&m, &format!("getfacl {through_fd}"));
    assert!(acl.contains("user:daemon:rw-"), "{acl}");
    let now = getfacl(&m, &["f"]);
    assert!(
        now.contains("user:nobody:r--") && !now.contains("daemon"),
        "{now}"
    );
    drop(old);
    view.unmount().unwrap();
}

/// A base file's ACL (read from the base with its other xattrs) shows through, stays
/// after a copy-up, follows a chmod in the view, and never changes the base.
#[test]
fn base_acls_show_through_and_copy_up() {
    require_root!();
    require_acl_tools();
    let fx = Fixture::new();
    sh(
        &fx.base,
        "setfacl -m u:nobody:rw etc/hostname && setfacl -d -m u:daemon:r usr",
    );
    let in_base = getfacl(&fx.base, &["etc/hostname", "usr"]);
    let (view, m) = fx.live();
    assert_eq!(getfacl(&m, &["etc/hostname", "usr"]), in_base);
    let before = view.freeze(&Default::default()).unwrap().id;

    fs::write(m.join("etc/hostname"), b"changed\n").unwrap(); // a copy-up
    assert_eq!(getfacl(&m, &["etc/hostname", "usr"]), in_base);
    sh(&m, "chmod 600 etc/hostname && touch usr/new");
    let changed = getfacl(&m, &["etc/hostname", "usr/new"]);
    assert!(changed.contains("mask::---"), "{changed}");
    assert!(changed.contains("user:daemon:r--"), "{changed}");
    assert_eq!(getfacl(&fx.base, &["etc/hostname", "usr"]), in_base);
    assert!(!fx.base.join("usr/new").exists());

    view.switch(before).unwrap();
    assert_eq!(getfacl(&m, &["etc/hostname", "usr"]), in_base);
    view.unmount().unwrap();
}
