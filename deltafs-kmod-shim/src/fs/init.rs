//! What the daemon negotiates with the kernel at `INIT`.

use std::io;

use fuser::{InitFlags, KernelConfig};

/// Asks the kernel for what DeltaFS needs (passthrough, POSIX ACLs with the umask left to
/// the daemon, one level of stacking) and for what it uses when offered.
pub(super) fn negotiate(config: &mut KernelConfig) -> io::Result<()> {
    let required = [
        (InitFlags::FUSE_PASSTHROUGH, "FUSE passthrough"),
        // With it the kernel checks ACLs itself and sends `system.posix_acl_*` as
        // xattrs; the daemon keeps the mode and the ACL in step, as ext4 does.
        (InitFlags::FUSE_POSIX_ACL, "POSIX ACLs (FUSE_POSIX_ACL)"),
        // The VFS leaves the umask to a filesystem with ACLs; without this flag FUSE
        // would apply it anyway, even where a parent's default ACL replaces it.
        (InitFlags::FUSE_DONT_MASK, "FUSE_DONT_MASK"),
    ];
    for (flag, what) in required {
        config.add_capabilities(flag).map_err(|_| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                format!("the kernel does not offer {what}"),
            )
        })?;
    }
    config
        .set_max_stack_depth(1)
        .map_err(|max| io::Error::other(format!("max_stack_depth 1 refused (max {max})")))?;
    // Optional: each is used when the kernel offers it.
    for flag in [
        InitFlags::FUSE_ATOMIC_O_TRUNC,
        InitFlags::FUSE_DO_READDIRPLUS,
        InitFlags::FUSE_READDIRPLUS_AUTO,
        InitFlags::FUSE_CACHE_SYMLINKS,
        InitFlags::FUSE_PARALLEL_DIROPS,
        // Clearing set-user/group-ID is ours (`SetAttr::kills_suidgid`), which lets the
        // kernel mark inodes `S_NOSEC`: a write then asks for `security.capability` once
        // per inode, not once per `write` (tar: ~5 round trips per file), and a chown
        // skips its `GETATTR`.
        InitFlags::FUSE_HANDLE_KILLPRIV_V2,
    ] {
        let _ = config.add_capabilities(flag);
    }
    Ok(())
}
