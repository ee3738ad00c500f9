//! The kernel offsets the programs need, read at load time: struct member offsets
//! from kernel BTF and tracepoint record offsets from tracefs `format` files. This is
//! the userspace half of CO-RE for programs written in Rust, which cannot emit
//! relocations for kernel structs.

use std::{
    fs,
    path::{Path, PathBuf},
};

use btf_rs::{Btf, Type};
use deltabox_common::KernelOffsets;

/// Where the running kernel publishes its BTF.
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Errors while reading offsets.
#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    /// The kernel's BTF could not be read.
    #[error("cannot read kernel BTF at {path}: {message} (the kernel needs CONFIG_DEBUG_INFO_BTF)")]
    Btf {
        /// BTF file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A struct or member is not in the kernel's BTF.
    #[error("kernel BTF has no {what}")]
    MissingMember {
        /// `struct.member` that was looked for.
        what: String,
    },
    /// tracefs is not mounted.
    #[error(
        "tracefs is not mounted (mount -t tracefs tracefs /sys/kernel/tracing, or run `cargo xtask setup`)"
    )]
    NoTracefs,
    /// A tracepoint's format could not be read or lacks the field.
    #[error("tracepoint {tracepoint}: {message}")]
    Tracepoint {
        /// `category/name`.
        tracepoint: String,
        /// What went wrong.
        message: String,
    },
}

/// The tracepoint of user page faults (x86).
const FAULT_TRACEPOINT: &str = "exceptions/page_fault_user";

/// Reads every offset of [`KernelOffsets`] from the running kernel.
pub fn kernel_offsets() -> Result<KernelOffsets, OffsetsError> {
    let btf_path = Path::new(KERNEL_BTF);
    let btf = Btf::from_file(btf_path).map_err(|e| OffsetsError::Btf {
        path: btf_path.into(),
        message: e.to_string(),
    })?;
    let tracefs = tracefs_dir()?;
    let member = |s: &str, path: &[&str]| member_offset(&btf, s, path);
    Ok(KernelOffsets {
        task_files: member("task_struct", &["files"])?,
        files_fdt: member("files_struct", &["fdt"])?,
        fdt_max_fds: member("fdtable", &["max_fds"])?,
        fdt_fd: member("fdtable", &["fd"])?,
        file_inode: member("file", &["f_inode"])?,
        file_dentry: member("file", &["f_path", "dentry"])?,
        dentry_name: member("dentry", &["d_name", "name"])?,
        inode_mode: member("inode", &["i_mode"])?,
        inode_ino: member("inode", &["i_ino"])?,
        tp_dirty_folio_ino: field_offset(&tracefs, "writeback/writeback_dirty_folio", "ino")?,
        tp_enter_fd: field_offset(&tracefs, "syscalls/sys_enter_write", "fd")?,
        tp_exit_ret: field_offset(&tracefs, "syscalls/sys_exit_write", "ret")?,
        tp_fault_address: field_offset(&tracefs, FAULT_TRACEPOINT, "address")?,
        tp_fault_error_code: field_offset(&tracefs, FAULT_TRACEPOINT, "error_code")?,
        valid: 1,
    })
}

/// The tracefs mount point, from `/proc/self/mounts`.
pub fn tracefs_dir() -> Result<PathBuf, OffsetsError> {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "tracefs").then(|| PathBuf::from(dir))
        })
        .find(|dir| dir.join("events").is_dir())
        .ok_or(OffsetsError::NoTracefs)
}

/// Byte offset of `path` (a chain of member names, each inside the previous member's
/// type) from the start of `struct name`. Anonymous struct/union members are searched
/// through, as C does.
fn member_offset(btf: &Btf, name: &str, path: &[&str]) -> Result<u64, OffsetsError> {
    let missing = || OffsetsError::MissingMember {
        what: format!("struct {name}.{}", path.join(".")),
    };
    let mut ty = btf
        .resolve_types_by_name(name)
        .map_err(|_| missing())?
        .into_iter()
        .find(|t| matches!(t, Type::Struct(s) if !s.members.is_empty()))
        .ok_or_else(missing)?;
    let mut bits = 0u64;
    for member in path {
        let (off, member_ty) = find_member(btf, &ty, member).ok_or_else(missing)?;
        bits += off;
        ty = member_ty;
    }
    if !bits.is_multiple_of(8) {
        return Err(missing());
    }
    Ok(bits / 8)
}

/// (bit offset, type) of `wanted` in the struct or union `ty`, looking inside anonymous
/// members.
fn find_member(btf: &Btf, ty: &Type, wanted: &str) -> Option<(u64, Type)> {
    let members = match ty {
        Type::Struct(s) | Type::Union(s) => &s.members,
        _ => return None,
    };
    for m in members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let member_ty = strip_modifiers(btf, btf.resolve_chained_type(m).ok()?)?;
        if name == wanted {
            return Some((u64::from(m.bit_offset()), member_ty));
        }
        if name.is_empty()
            && let Some((inner, t)) = find_member(btf, &member_ty, wanted)
        {
            return Some((u64::from(m.bit_offset()) + inner, t));
        }
    }
    None
}

/// Follows typedefs and qualifiers to the underlying type.
fn strip_modifiers(btf: &Btf, mut ty: Type) -> Option<Type> {
    for _ in 0..16 {
        ty = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t).ok()?,
            Type::Const(t) => btf.resolve_chained_type(t).ok()?,
            Type::Volatile(t) => btf.resolve_chained_type(t).ok()?,
            Type::Restrict(t) => btf.resolve_chained_type(t).ok()?,
            Type::TypeTag(t) => btf.resolve_chained_type(t).ok()?,
            _ => return Some(ty),
        };
    }
    None
}

/// Offset of `field` in the records of `tracepoint` (`category/name`).
pub fn field_offset(tracefs: &Path, tracepoint: &str, field: &str) -> Result<u64, OffsetsError> {
    let path = tracefs.join("events").join(tracepoint).join("format");
    let err = |message: String| OffsetsError::Tracepoint {
        tracepoint: tracepoint.replace('/', ":"),
        message,
    };
    let format = fs::read_to_string(&path)
        .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    parse_field_offset(&format, field)
        .ok_or_else(|| err(format!("no field `{field}` in {}", path.display())))
}

/// Parses `field:<decl> <name>[<n>];\toffset:<off>;…` lines of a tracepoint format.
fn parse_field_offset(format: &str, field: &str) -> Option<u64> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';');
        let decl = parts.next()?.strip_prefix("field:")?;
        let name = decl.split_whitespace().last()?;
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        parts.find_map(|p| p.trim().strip_prefix("offset:")?.parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIRTY_FOLIO: &str = "name: writeback_dirty_folio\nID: 1009\nformat:\n\
        \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
        \tfield:char name[32];\toffset:8;\tsize:32;\tsigned:0;\n\
        \tfield:ino_t ino;\toffset:40;\tsize:8;\tsigned:0;\n\
        \tfield:unsigned long index;\toffset:48;\tsize:8;\tsigned:0;\n";

    #[test]
    fn parses_tracepoint_fields() {
        assert_eq!(parse_field_offset(DIRTY_FOLIO, "ino"), Some(40));
        assert_eq!(parse_field_offset(DIRTY_FOLIO, "index"), Some(48));
        assert_eq!(parse_field_offset(DIRTY_FOLIO, "name"), Some(8));
        assert_eq!(parse_field_offset(DIRTY_FOLIO, "missing"), None);
    }

    #[test]
    fn kernel_btf_offsets_are_plausible() {
        // Every kernel this project supports has BTF; reading it needs no privilege.
        let btf = Btf::from_file(KERNEL_BTF).expect("kernel BTF");
        let files = member_offset(&btf, "task_struct", &["files"]).unwrap();
        assert!(files > 0 && files < 16384, "task_struct.files at {files}");
        // struct path { struct vfsmount *mnt; struct dentry *dentry; }
        let f_path = member_offset(&btf, "file", &["f_path"]).unwrap();
        assert_eq!(
            member_offset(&btf, "file", &["f_path", "dentry"]).unwrap(),
            f_path + 8
        );
        assert!(member_offset(&btf, "file", &["no_such_member"]).is_err());
        assert!(member_offset(&btf, "no_such_struct", &["x"]).is_err());
    }
}
