//! POSIX ACLs as the kernel hands them to a FUSE filesystem (`FUSE_POSIX_ACL`): the
//! values of `system.posix_acl_access` / `system.posix_acl_default` in the kernel's
//! xattr format, and the rules ext4 applies with them (the kernel's `fs/posix_acl.c`),
//! which with FUSE are the filesystem's to apply:
//! - setting an access ACL sets the mode's permission bits from it, and an ACL that the
//!   mode alone expresses is not stored ([`Acl::equiv_mode`]);
//! - a chmod rewrites the owner, group-or-mask and other entries ([`Acl::chmod`]);
//! - a new file or directory takes its parent's default ACL, masked by the mode it was
//!   created with, instead of the umask ([`Acl::create_masq`]).
//!
//! Pure data: no I/O. The view applies these in `view/acl.rs`.

/// The xattr holding a file's access ACL.
pub const ACCESS: &[u8] = b"system.posix_acl_access";
/// The xattr holding a directory's default ACL (inherited by what is created in it).
pub const DEFAULT: &[u8] = b"system.posix_acl_default";

/// The only version of the xattr format (`POSIX_ACL_XATTR_VERSION`).
const VERSION: u32 = 2;
/// Bytes of the header (the version) and of one entry (tag, perm, id).
const HEADER: usize = 4;
const ENTRY: usize = 8;

/// Entry tags (`ACL_USER_OBJ` …).
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// Why an ACL value could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    /// Not a header plus whole entries.
    #[error("ACL xattr of {0} bytes is not a 4-byte header plus 8-byte entries")]
    Length(usize),
    /// Another version than 2.
    #[error("ACL xattr version {0}, expected 2")]
    Version(u32),
    /// An unknown tag.
    #[error("ACL entry {index} has unknown tag {tag:#x}")]
    Tag {
        /// The entry's position.
        index: usize,
        /// Its tag.
        tag: u16,
    },
    /// An entry the rules below need is missing (owner, group or other).
    #[error("ACL has no {0} entry")]
    Missing(&'static str),
}

/// One entry: a tag, its permission bits (rwx) and, for named users and groups, the id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    tag: u16,
    perm: u16,
    id: u32,
}

/// A POSIX ACL in the kernel's xattr format, entries in the order given (the kernel
/// validated and sorted them before sending).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    entries: Vec<Entry>,
}

impl Acl {
    /// Reads an xattr value.
    pub fn parse(value: &[u8]) -> Result<Self, AclError> {
        if value.len() < HEADER || !(value.len() - HEADER).is_multiple_of(ENTRY) {
            return Err(AclError::Length(value.len()));
        }
        let version = u32::from_le_bytes(value[..HEADER].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(AclError::Version(version));
        }
        let entries = value[HEADER..]
            .chunks_exact(ENTRY)
            .enumerate()
            .map(|(index, e)| {
                let tag = u16::from_le_bytes([e[0], e[1]]);
                if ![USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER].contains(&tag) {
                    return Err(AclError::Tag { index, tag });
                }
                Ok(Entry {
                    tag,
                    perm: u16::from_le_bytes([e[2], e[3]]) & 0o7,
                    id: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (tag, name) in [(USER_OBJ, "owner"), (GROUP_OBJ, "group"), (OTHER, "other")] {
            if !entries.iter().any(|e| e.tag == tag) {
                return Err(AclError::Missing(name));
            }
        }
        Ok(Self { entries })
    }

    /// The xattr value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + ENTRY * self.entries.len());
        out.extend_from_slice(&VERSION.to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.tag.to_le_bytes());
            out.extend_from_slice(&e.perm.to_le_bytes());
            out.extend_from_slice(&e.id.to_le_bytes());
        }
        out
    }

    fn find(&self, tag: u16) -> Option<usize> {
        self.entries.iter().position(|e| e.tag == tag)
    }

    /// The permission bits (`0o777`) the ACL gives the mode (the mask stands for the
    /// group class), and whether the mode alone expresses it (no named entries, no
    /// mask): then ext4 stores no ACL (`posix_acl_equiv_mode`).
    pub fn equiv_mode(&self) -> (u16, bool) {
        let mut mode = 0;
        let mut equivalent = true;
        let mut mask = None;
        for e in &self.entries {
            match e.tag {
                USER_OBJ => mode |= e.perm << 6,
                GROUP_OBJ => mode |= e.perm << 3,
                OTHER => mode |= e.perm,
                MASK => {
                    mask = Some(e.perm);
                    equivalent = false;
                }
                _ => equivalent = false,
            }
        }
        if let Some(mask) = mask {
            mode = (mode & !0o070) | (mask << 3);
        }
        (mode, equivalent)
    }

    /// A chmod to `perm`: owner, other, and the mask (or the owning group when there is
    /// no mask) take the new bits; named entries keep theirs (`__posix_acl_chmod`).
    pub fn chmod(&mut self, perm: u16) {
        let group = self.find(MASK).or_else(|| self.find(GROUP_OBJ));
        for (i, e) in self.entries.iter_mut().enumerate() {
            match e.tag {
                USER_OBJ => e.perm = (perm >> 6) & 0o7,
                OTHER => e.perm = perm & 0o7,
                _ if Some(i) == group => e.perm = (perm >> 3) & 0o7,
                _ => {}
            }
        }
    }

    /// A new file's access ACL from its parent's default ACL (`self`, a clone of it) and
    /// the mode it was created with: each class is limited to the mode's bits and the
    /// mode to the ACL's (`posix_acl_create_masq`). Returns whether the result needs
    /// storing (it has named entries or a mask); `perm` holds the new permission bits.
    pub fn create_masq(&mut self, perm: &mut u16) -> bool {
        let mut needed = false;
        let (mut group, mut mask) = (None, None);
        for (i, e) in self.entries.iter_mut().enumerate() {
            match e.tag {
                USER_OBJ => {
                    e.perm &= (*perm >> 6) & 0o7;
                    *perm &= (e.perm << 6) | !0o700;
                }
                OTHER => {
                    e.perm &= *perm & 0o7;
                    *perm &= e.perm | !0o007;
                }
                GROUP_OBJ => group = Some(i),
                MASK => {
                    mask = Some(i);
                    needed = true;
                }
                _ => needed = true,
            }
        }
        if let Some(i) = mask.or(group) {
            let e = &mut self.entries[i];
            e.perm &= (*perm >> 3) & 0o7;
            *perm &= (e.perm << 3) | !0o070;
        }
        needed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNDEFINED: u32 = u32::MAX;

    fn acl(entries: &[(u16, u16, u32)]) -> Acl {
        Acl {
            entries: entries
                .iter()
                .map(|&(tag, perm, id)| Entry { tag, perm, id })
                .collect(),
        }
    }

    /// `u::rw-,u:65534:rw-,g::r--,m::rw-,o::---`: what `setfacl -m u:nobody:rw` makes of
    /// a 0644 file.
    fn with_nobody() -> Acl {
        acl(&[
            (USER_OBJ, 6, UNDEFINED),
            (USER, 6, 65534),
            (GROUP_OBJ, 4, UNDEFINED),
            (MASK, 6, UNDEFINED),
            (OTHER, 0, UNDEFINED),
        ])
    }

    #[test]
    fn round_trips_and_rejects_damage() {
        let a = with_nobody();
        let bytes = a.encode();
        assert_eq!(bytes.len(), 4 + 5 * 8);
        assert_eq!(Acl::parse(&bytes).unwrap(), a);
        assert_eq!(Acl::parse(&bytes[..7]), Err(AclError::Length(7)));
        let mut v1 = bytes.clone();
        v1[0] = 1;
        assert_eq!(Acl::parse(&v1), Err(AclError::Version(1)));
        let mut bad_tag = bytes.clone();
        bad_tag[4] = 0x40;
        assert_eq!(
            Acl::parse(&bad_tag),
            Err(AclError::Tag {
                index: 0,
                tag: 0x40
            })
        );
        let no_other = acl(&[(USER_OBJ, 6, UNDEFINED), (GROUP_OBJ, 4, UNDEFINED)]);
        assert_eq!(
            Acl::parse(&no_other.encode()),
            Err(AclError::Missing("other"))
        );
    }

    #[test]
    fn equivalent_mode_uses_the_mask_for_the_group_class() {
        assert_eq!(with_nobody().equiv_mode(), (0o660, false));
        let minimal = acl(&[
            (USER_OBJ, 7, UNDEFINED),
            (GROUP_OBJ, 5, UNDEFINED),
            (OTHER, 1, UNDEFINED),
        ]);
        assert_eq!(minimal.equiv_mode(), (0o751, true));
    }

    #[test]
    fn chmod_sets_the_mask_not_the_group_entry() {
        let mut a = with_nobody();
        a.chmod(0o750);
        assert_eq!(a.entries[0].perm, 7);
        assert_eq!(a.entries[1].perm, 6, "named entries keep their bits");
        assert_eq!(a.entries[2].perm, 4, "the owning group keeps its bits");
        assert_eq!(a.entries[3].perm, 5, "the mask takes the group bits");
        assert_eq!(a.entries[4].perm, 0);
        let mut minimal = acl(&[
            (USER_OBJ, 7, UNDEFINED),
            (GROUP_OBJ, 5, UNDEFINED),
            (OTHER, 1, UNDEFINED),
        ]);
        minimal.chmod(0o604);
        assert_eq!(minimal.equiv_mode(), (0o604, true));
    }

    #[test]
    fn create_masq_limits_both_ways() {
        // A default ACL `u::rwx,u:65534:rwx,g::r-x,m::rwx,o::r-x`, a file made 0666.
        let mut a = acl(&[
            (USER_OBJ, 7, UNDEFINED),
            (USER, 7, 65534),
            (GROUP_OBJ, 5, UNDEFINED),
            (MASK, 7, UNDEFINED),
            (OTHER, 5, UNDEFINED),
        ]);
        let mut perm = 0o666;
        assert!(a.create_masq(&mut perm));
        assert_eq!(perm, 0o664);
        assert_eq!(a.entries[0].perm, 6);
        assert_eq!(
            a.entries[1].perm, 7,
            "named entries are limited by the mask only"
        );
        assert_eq!(a.entries[3].perm, 6);
        assert_eq!(a.entries[4].perm, 4);
        // Without named entries or mask: nothing to store, the mode says it all.
        let mut minimal = acl(&[
            (USER_OBJ, 7, UNDEFINED),
            (GROUP_OBJ, 0, UNDEFINED),
            (OTHER, 0, UNDEFINED),
        ]);
        let mut perm = 0o4777;
        assert!(!minimal.create_masq(&mut perm));
        assert_eq!(perm, 0o4700, "bits outside rwx are kept");
    }
}
