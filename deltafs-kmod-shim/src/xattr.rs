//! Reading a base file's extended attributes (`llistxattr`, `lgetxattr`: the link
//! itself, never its target), so that the base's `security.capability`, SELinux labels
//! and `user.*` attributes show through DeltaFS as they are on the host.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::node::Bytes;

/// The extended attributes of `path` (not following a symlink): `user.*`, `security.*`,
/// `trusted.*` and of `system.*` only the POSIX ACLs (`system.posix_acl_access`,
/// `system.posix_acl_default`, which DeltaFS serves as ext4 does; other `system.*` names
/// are a filesystem's own). Empty where the filesystem has none or does not support them.
pub fn read_all(path: &Path) -> io::Result<BTreeMap<Bytes, Bytes>> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let names = match with_buffer(|buf| {
        // SAFETY: `c_path` is NUL-terminated; the kernel writes at most `buf.len()` bytes
        // into `buf`, which lives for the call.
        unsafe { libc::llistxattr(c_path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
    }) {
        Ok(names) => names,
        Err(e) if unsupported(&e) => return Ok(BTreeMap::new()),
        Err(e) => return Err(e),
    };
    let mut xattrs = BTreeMap::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if name.starts_with(b"system.") && name != crate::acl::ACCESS && name != crate::acl::DEFAULT
        {
            continue;
        }
        let c_name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        let value = with_buffer(|buf| {
            // SAFETY: both strings are NUL-terminated; the kernel writes at most
            // `buf.len()` bytes into `buf`, which lives for the call.
            unsafe {
                libc::lgetxattr(
                    c_path.as_ptr(),
                    c_name.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            }
        });
        match value {
            Ok(value) => {
                xattrs.insert(Bytes(name.to_vec()), Bytes(value));
            }
            // Removed meanwhile, or not readable by us: as if absent.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) || unsupported(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(xattrs)
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EACCES) | Some(libc::EPERM)
    )
}

/// Calls `call` with a buffer, growing it while the answer does not fit (`ERANGE`: the
/// attributes changed between asking their size and reading them).
fn with_buffer(call: impl Fn(&mut [u8]) -> isize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        let n = call(&mut buf);
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || buf.len() >= 1 << 20 {
            return Err(e);
        }
        let size = call(&mut []);
        let wanted = if size > 0 { size as usize } else { 0 };
        buf.resize(wanted.max(buf.len() * 2), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_attributes_are_read_and_missing_ones_are_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(read_all(&file).unwrap().is_empty());
        let c_path = CString::new(file.as_os_str().as_bytes()).unwrap();
        let value = vec![7u8; 1000];
        // SAFETY: NUL-terminated strings and a value buffer that lives for the call.
        let rc = unsafe {
            libc::setxattr(
                c_path.as_ptr(),
                c"user.big".as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc != 0 {
            eprintln!(
                "skipped: {} has no user xattrs ({})",
                dir.path().display(),
                io::Error::last_os_error()
            );
            return;
        }
        let read = read_all(&file).unwrap();
        assert_eq!(read.get(&Bytes(b"user.big".to_vec())), Some(&Bytes(value)));
    }
}
