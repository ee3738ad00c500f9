//! POSIX semantics through a mounted view: files, directories, symlinks, hard links,
//! renames (with `RENAME_NOREPLACE` / `RENAME_EXCHANGE`), special files, attributes,
//! xattrs, POSIX ACLs (module `acl`), unlink while open, readdir, and the base staying
//! untouched. Needs root.

#[path = "semantics/acl.rs"]
mod acl;
mod common;

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use common::Fixture;

fn renameat2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        from,
        nix::fcntl::AT_FDCWD,
        to,
        nix::fcntl::RenameFlags::from_bits_truncate(flags),
    )
    .map_err(Into::into)
}

#[test]
fn files_directories_and_symlinks_behave_as_on_ext4() {
    require_root!();
    let fx = Fixture::new();
    let view = fx.mount("m", None);
    let m = view.mountpoint();

    // The base shows through and stays untouched by writes.
    assert_eq!(fs::read(m.join("etc/hostname")).unwrap(), b"base-host\n");
    fs::write(m.join("etc/hostname"), b"sandbox\n").unwrap();
    assert_eq!(fs::read(m.join("etc/hostname")).unwrap(), b"sandbox\n");
    assert_eq!(
        fs::read(fx.base.join("etc/hostname")).unwrap(),
        b"base-host\n"
    );

    // Create, append, truncate, read back.
    fs::create_dir_all(m.join("work/src")).unwrap();
    let path = m.join("work/src/main.rs");
    fs::write(&path, b"fn main() {}\n").unwrap();
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(b"// end\n").unwrap();
    drop(f);
    assert_eq!(fs::read_to_string(&path).unwrap(), "fn main() {}\n// end\n");
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(4).unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"fn m");

    // O_EXCL on an existing name.
    let err = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST));

    // Symlinks.
    std::os::unix::fs::symlink("src/main.rs", m.join("work/link")).unwrap();
    assert_eq!(
        fs::read_link(m.join("work/link")).unwrap(),
        Path::new("src/main.rs")
    );
    assert_eq!(fs::read(m.join("work/link")).unwrap(), b"fn m");
    assert!(
        fs::symlink_metadata(m.join("work/link"))
            .unwrap()
            .file_type()
            .is_symlink()
    );

    // Modes, owners, times.
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o640);
    nix::unistd::chown(&path, Some(1000.into()), Some(1000.into())).unwrap();
    let meta = fs::metadata(&path).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
    let then = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
    fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(then)
        .unwrap();
    assert_eq!(fs::metadata(&path).unwrap().mtime(), 1_000_000_000);
    // A base file's mtime can be set without copying it up, and survives the copy-up.
    let tool = m.join("usr/bin/tool");
    fs::File::open(&tool)
        .unwrap()
        .set_modified(then)
        .unwrap_or_else(|_| {
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                &tool,
                &nix::sys::time::TimeSpec::UTIME_OMIT,
                &nix::sys::time::TimeSpec::new(1_000_000_000, 0),
                nix::sys::stat::UtimensatFlags::FollowSymlink,
            )
            .unwrap()
        });
    assert_eq!(fs::metadata(&tool).unwrap().mtime(), 1_000_000_000);

    // Directory link counts, rmdir of a non-empty directory.
    let work = fs::metadata(m.join("work")).unwrap();
    assert_eq!(work.nlink(), 3);
    let err = fs::remove_dir(m.join("work")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY));

    // Readdir lists exactly the names.
    let mut names: Vec<_> = fs::read_dir(m.join("work"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["link", "src"]);

    // Special files.
    nix::unistd::mkfifo(
        &m.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    assert!(fs::metadata(m.join("fifo")).unwrap().file_type().is_fifo());
    nix::sys::stat::mknod(
        &m.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    let meta = fs::metadata(m.join("null")).unwrap();
    assert!(meta.file_type().is_char_device());
    assert_eq!(meta.rdev(), nix::sys::stat::makedev(1, 3));

    // statfs answers.
    nix::sys::statvfs::statvfs(m).unwrap();
    view.unmount().unwrap();
}

#[test]
fn hard_links_renames_and_unlink_while_open() {
    require_root!();
    let fx = Fixture::new();
    let view = fx.mount("m", None);
    let m = view.mountpoint();

    // A hard link to a base file: both names are one inode, also after a copy-up.
    fs::hard_link(m.join("etc/hostname"), m.join("hn")).unwrap();
    let a = fs::metadata(m.join("etc/hostname")).unwrap();
    let b = fs::metadata(m.join("hn")).unwrap();
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    fs::write(m.join("hn"), b"linked\n").unwrap();
    assert_eq!(fs::read(m.join("etc/hostname")).unwrap(), b"linked\n");
    assert_eq!(
        fs::metadata(m.join("etc/hostname")).unwrap().ino(),
        fs::metadata(m.join("hn")).unwrap().ino()
    );

    // Renames: plain, over a file, NOREPLACE, EXCHANGE, directories across parents.
    fs::write(m.join("x"), b"x").unwrap();
    fs::write(m.join("y"), b"y").unwrap();
    let err = renameat2(&m.join("x"), &m.join("y"), libc::RENAME_NOREPLACE).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    renameat2(&m.join("x"), &m.join("y"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(m.join("x")).unwrap(), b"y");
    assert_eq!(fs::read(m.join("y")).unwrap(), b"x");
    fs::rename(m.join("x"), m.join("y")).unwrap();
    assert_eq!(fs::read(m.join("y")).unwrap(), b"y");
    assert!(!m.join("x").exists());
    fs::create_dir_all(m.join("d1/sub")).unwrap();
    fs::create_dir(m.join("d2")).unwrap();
    fs::write(m.join("d1/sub/f"), b"f").unwrap();
    fs::rename(m.join("d1/sub"), m.join("d2/sub")).unwrap();
    assert_eq!(fs::read(m.join("d2/sub/f")).unwrap(), b"f");
    assert_eq!(fs::metadata(m.join("d1")).unwrap().nlink(), 2);
    assert_eq!(fs::metadata(m.join("d2")).unwrap().nlink(), 3);
    let err = fs::rename(m.join("d2"), m.join("d2/sub/inside")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    // A base directory renamed keeps its content.
    fs::rename(m.join("usr"), m.join("usr2")).unwrap();
    assert_eq!(
        fs::read(m.join("usr2/bin/tool")).unwrap(),
        b"#!/bin/sh\necho tool\n"
    );

    // Unlink while open: the data stays readable and writable through the fd.
    let mut f = common::create_rw(&m.join("tmp"));
    f.write_all(b"still here").unwrap();
    fs::remove_file(m.join("tmp")).unwrap();
    assert!(!m.join("tmp").exists());
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut back = String::new();
    f.read_to_string(&mut back).unwrap();
    assert_eq!(back, "still here");
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    drop(f);
    view.unmount().unwrap();
}

#[test]
fn xattrs_and_large_directories() {
    require_root!();
    let fx = Fixture::new();
    let view = fx.mount("m", None);
    let m = view.mountpoint();
    let path = CString::new(m.join("etc/hostname").as_os_str().as_bytes()).unwrap();
    let name = CString::new("user.deltafs").unwrap();
    let set = xattr::set(&path, &name, b"v1");
    assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
    assert_eq!(xattr::get(&path, &name), Some(b"v1".to_vec()));
    assert!(xattr::list(&path).contains(&"user.deltafs".to_owned()));

    // 3 000 entries: readdir returns each exactly once.
    let dir = m.join("many");
    fs::create_dir(&dir).unwrap();
    for i in 0..3000 {
        fs::write(dir.join(format!("f{i:05}")), b"").unwrap();
    }
    let mut names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 3000);
    view.unmount().unwrap();
}

/// A base file's extended attributes show through (also `security.*` and `trusted.*`,
/// read as root), stay across a copy-up, and changes to them stay in DeltaFS.
#[test]
fn base_xattrs_show_through_and_stay_in_the_base() {
    require_root!();
    let fx = Fixture::new();
    let base_file = CString::new(fx.base.join("etc/hostname").as_os_str().as_bytes()).unwrap();
    let user = CString::new("user.origin").unwrap();
    let trusted = CString::new("trusted.mark").unwrap();
    if xattr::set(&base_file, &user, b"host") != 0 {
        eprintln!(
            "skipped: the base at {} has no user xattrs ({})",
            fx.base.display(),
            std::io::Error::last_os_error()
        );
        return;
    }
    assert_eq!(xattr::set(&base_file, &trusted, b"t"), 0);
    let base_dir = CString::new(fx.base.join("usr").as_os_str().as_bytes()).unwrap();
    assert_eq!(xattr::set(&base_dir, &user, b"dir"), 0);

    let view = fx.mount("m", None);
    let m = view.mountpoint();
    let path = CString::new(m.join("etc/hostname").as_os_str().as_bytes()).unwrap();
    let dir = CString::new(m.join("usr").as_os_str().as_bytes()).unwrap();
    assert_eq!(xattr::get(&path, &user), Some(b"host".to_vec()));
    assert_eq!(xattr::get(&path, &trusted), Some(b"t".to_vec()));
    assert_eq!(xattr::get(&dir, &user), Some(b"dir".to_vec()));
    let listed = xattr::list(&path);
    assert!(listed.contains(&"user.origin".to_owned()), "{listed:?}");
    let before = view.freeze(&Default::default()).unwrap().id;

    // A copy-up keeps them; changes stay in DeltaFS.
    fs::write(m.join("etc/hostname"), b"changed\n").unwrap();
    assert_eq!(xattr::get(&path, &user), Some(b"host".to_vec()));
    assert_eq!(xattr::set(&path, &user, b"sandbox"), 0);
    assert_eq!(xattr::get(&path, &user), Some(b"sandbox".to_vec()));
    assert_eq!(xattr::get(&base_file, &user), Some(b"host".to_vec()));
    view.switch(before).unwrap();
    assert_eq!(xattr::get(&path, &user), Some(b"host".to_vec()));
    view.unmount().unwrap();
}

/// Thin wrappers over the xattr syscalls (not in `nix`).
mod xattr {
    use std::ffi::CString;

    pub fn set(path: &CString, name: &CString, value: &[u8]) -> i32 {
        // SAFETY: NUL-terminated strings and a slice with its length; the kernel only
        // reads them for the duration of the call.
        unsafe {
            libc::setxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        }
    }

    pub fn get(path: &CString, name: &CString) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 256];
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
        let n = unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        (n >= 0).then(|| {
            buf.truncate(n as usize);
            buf
        })
    }

    pub fn list(path: &CString) -> Vec<String> {
        let mut buf = vec![0u8; 1024];
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        assert!(n >= 0, "{}", std::io::Error::last_os_error());
        buf[..n as usize]
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    }
}

/// The kernel keeps a file's attributes for an hour, but writes through a `MAP_SHARED`
/// mapping change its mtime behind the kernel's back: `stat` must show the new mtime
/// within about a second (the janitor's check), both while the mapping and its fd are
/// open and after both are gone. Fails when replies give the long TTL and nothing
/// watches mapped files.
#[test]
fn mapped_writes_show_in_stat() {
    require_root!();
    let fx = Fixture::new();
    let view = fx.mount("live", None);
    let path = view.mountpoint().join("mapped");
    let mtime = |path: &Path| {
        let meta = fs::metadata(path).unwrap();
        (meta.mtime(), meta.mtime_nsec())
    };
    // Becomes true within 3 s, polling `stat` (which the kernel answers from its cache).
    let soon = |what: &str, changed: &dyn Fn() -> bool| {
        let start = std::time::Instant::now();
        while !changed() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(3),
                "{what}: stat still shows the old mtime after 3 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let file = common::create_rw(&path);
    file.set_len(8192).unwrap();
    file.sync_all().unwrap();
    let mut map = common::mmap::SharedMap::new(&file, 8192);
    let before = mtime(&path);
    std::thread::sleep(std::time::Duration::from_millis(30));
    map.write(0, b"through the mapping");
    soon("mapping and fd open", &|| mtime(&path) != before);

    let before = mtime(&path);
    drop(file);
    std::thread::sleep(std::time::Duration::from_millis(30));
    map.write(4096, b"after close");
    soon("mapping open, fd closed", &|| mtime(&path) != before);
    drop(map);
    assert_eq!(&fs::read(&path).unwrap()[4096..4107], b"after close");
    view.unmount().unwrap();
}

/// Set-user-ID and set-group-ID are cleared as ext4 clears them, by the daemon
/// (`FUSE_HANDLE_KILLPRIV_V2`): a write or a truncate by an unprivileged caller, any
/// chown; not a write by root. Fails when the daemon ignores the kernel's requests to
/// clear them (every mode stays 6777).
#[test]
fn set_id_bits_are_cleared_like_ext4() {
    use std::os::unix::process::CommandExt;
    require_root!();
    let fx = Fixture::new();
    let view = fx.mount("live", None);
    let m = view.mountpoint();
    fs::set_permissions(m, fs::Permissions::from_mode(0o777)).unwrap();
    let fresh = |name: &str, mode: u32| {
        let path = m.join(name);
        fs::write(&path, b"x").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    };
    let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o7777;
    let as_nobody = |script: &str| {
        let status = std::process::Command::new("/bin/sh")
            .args(["-c", script])
            .uid(65534)
            .gid(65534)
            .status()
            .unwrap();
        assert!(status.success(), "{script} failed as nobody");
    };

    let written = fresh("written", 0o6777);
    as_nobody(&format!("echo y >> {}", written.display()));
    assert_eq!(mode(&written), 0o777, "a write by nobody");

    let truncated = fresh("truncated", 0o6777);
    as_nobody(&format!("truncate -s 0 {}", truncated.display()));
    assert_eq!(mode(&truncated), 0o777, "a truncate by nobody");

    let chowned = fresh("chowned", 0o6777);
    std::os::unix::fs::chown(&chowned, Some(1), None).unwrap();
    assert_eq!(mode(&chowned), 0o777, "a chown by root");

    let by_root = fresh("by-root", 0o6777);
    OpenOptions::new()
        .append(true)
        .open(&by_root)
        .unwrap()
        .write_all(b"y")
        .unwrap();
    assert_eq!(mode(&by_root), 0o6777, "a write by root keeps them");
    view.unmount().unwrap();
}
