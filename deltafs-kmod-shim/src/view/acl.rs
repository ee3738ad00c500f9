//! POSIX ACLs of a view's nodes. With `FUSE_POSIX_ACL` the kernel checks permissions
//! against the ACLs itself (it asks for them with `GETXATTR` and caches them until a
//! change through the mount or an invalidation), validates what `setfacl` sets and checks
//! that the caller may, and leaves to the filesystem what ext4 does with them: the mode
//! follows an access ACL, a chmod rewrites the ACL, a new node inherits its directory's
//! default ACL (and the umask applies only without one). ACLs are xattrs of the node
//! ([`crate::acl::ACCESS`], [`crate::acl::DEFAULT`]): they live in the index, persist,
//! copy up, freeze, switch and branch like any other attribute.

use std::fs;

use fuser::Errno;

use super::ops::Caller;
use super::state::{FsResult, IntoErrno, ViewState};
use crate::acl::{self, Acl};
use crate::ids::Ino;
use crate::node::{Bytes, Kind, Node, Time};

/// `CAP_FSETID`, the capability to keep set-group-ID (`linux/capability.h`).
const CAP_FSETID: u32 = 4;

/// Whether `name` is one of the two ACL xattrs.
pub(super) fn is_acl(name: &[u8]) -> bool {
    name == acl::ACCESS || name == acl::DEFAULT
}

fn key(name: &[u8]) -> Bytes {
    Bytes(name.to_vec())
}

impl ViewState {
    /// `SETXATTR` of an ACL, as ext4's `set_acl`: an access ACL sets the mode's
    /// permission bits (the mask standing for the group class) and is stored only when
    /// the mode cannot express it; set-group-ID is cleared when the caller is neither in
    /// the file's group nor has `CAP_FSETID` (`posix_acl_update_mode`). A default ACL is
    /// stored as it is (the kernel allows one only on directories).
    pub(super) fn set_acl(
        &mut self,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        caller: Caller,
    ) -> FsResult<()> {
        let parsed = Acl::parse(value).map_err(|_| Errno::EINVAL)?;
        let node = self.node(ino)?;
        let now = Time::now();
        if name == acl::DEFAULT {
            if node.kind != Kind::Dir {
                return Err(Errno::EACCES);
            }
            self.txn()
                .update(ino, |node| {
                    node.xattrs.insert(key(name), Bytes(value.to_vec()));
                    node.ctime = now;
                })
                .map_err(IntoErrno::errno)?;
            return Ok(());
        }
        let (bits, equivalent) = parsed.equiv_mode();
        let kill_sgid =
            u32::from(node.perm) & libc::S_ISGID != 0 && !in_group_or_capable(caller, node.gid);
        self.txn()
            .update(ino, |node| {
                node.perm = (node.perm & !0o777) | bits;
                if kill_sgid {
                    node.perm &= !(libc::S_ISGID as u16);
                }
                if equivalent {
                    node.xattrs.remove(&key(name));
                } else {
                    node.xattrs.insert(key(name), Bytes(parsed.encode()));
                }
                node.ctime = now;
            })
            .map_err(IntoErrno::errno)?;
        Ok(())
    }
}

/// A new node's mode and ACLs from its directory `dir`, as ext4's `posix_acl_create`:
/// with a default ACL on `dir` the mode is limited by it (not by the umask), the node
/// gets the masked copy as its access ACL when the mode cannot express it, and a new
/// directory inherits the default ACL itself; without one the umask applies.
pub(super) fn inherit(dir: &Node, node: &mut Node, umask: u32) {
    let default = dir.xattrs.get(&key(acl::DEFAULT));
    let Some(Ok(mut access)) = default.map(|d| Acl::parse(&d.0)) else {
        node.perm &= !((umask & 0o777) as u16);
        return;
    };
    let mut perm = node.perm;
    if access.create_masq(&mut perm) {
        node.xattrs.insert(key(acl::ACCESS), Bytes(access.encode()));
    }
    node.perm = perm;
    if node.kind == Kind::Dir
        && let Some(default) = default
    {
        node.xattrs.insert(key(acl::DEFAULT), default.clone());
    }
}

/// After a chmod of `node` (its `perm` already set): its access ACL, if any, takes the
/// new owner, group (its mask) and other bits, as ext4's `posix_acl_chmod`. A symlink
/// has none. A value that does not parse is left as it is: the daemon stores only what
/// the kernel validated or a base filesystem holds.
pub(super) fn chmod(node: &mut Node) {
    if node.kind == Kind::Symlink {
        return;
    }
    let Some(value) = node.xattrs.get_mut(&key(acl::ACCESS)) else {
        return;
    };
    if let Ok(mut parsed) = Acl::parse(&value.0) {
        parsed.chmod(node.perm & 0o777);
        value.0 = parsed.encode();
    }
}

/// Whether the caller is in group `gid` (its file-system group or a supplementary one)
/// or has `CAP_FSETID` (the kernel's `in_group_or_capable`). fuser 0.18 hides the flag
/// the kernel computes for this (`FUSE_SETXATTR_ACL_KILL_SGID` needs
/// `FUSE_SETXATTR_EXT`, whose longer request fuser cannot read), so it is read from
/// `/proc/<pid>/status`; a capability held in a user namespace counts as held (the
/// kernel also asks that the file's owner be mapped there). If the process is gone,
/// uid 0 stands for the capability.
fn in_group_or_capable(caller: Caller, gid: u32) -> bool {
    if caller.gid == gid {
        return true;
    }
    let status = match caller.pid {
        0 => None,
        pid => fs::read_to_string(format!("/proc/{pid}/status")).ok(),
    };
    let Some(status) = status else {
        return caller.uid == 0;
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
    };
    let in_group = field("Groups:")
        .is_some_and(|groups| groups.split_whitespace().any(|g| g.parse() == Ok(gid)));
    let cap_fsetid = field("CapEff:")
        .and_then(|caps| u64::from_str_radix(caps, 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_FSETID) != 0);
    in_group || cap_fsetid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_in_its_own_groups() {
        let me = Caller {
            uid: nix::unistd::getuid().as_raw(),
            gid: u32::MAX - 7,
            pid: std::process::id(),
        };
        let groups = nix::unistd::getgroups().unwrap();
        if let Some(g) = groups.first() {
            assert!(in_group_or_capable(me, g.as_raw()));
        }
        let gone = Caller { pid: 0, ..me };
        assert_eq!(in_group_or_capable(gone, 12345), me.uid == 0);
    }
}
