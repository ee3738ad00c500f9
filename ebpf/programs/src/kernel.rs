//! Reads of kernel structs, from the current task to the file behind an fd.
//!
//! Offsets come from BTF via userspace (`KernelOffsets`); every read goes through
//! `bpf_probe_read_kernel`, so a wrong offset yields a failed read, never a fault.

use aya_ebpf::helpers::{
    bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes,
};
use deltabox_common::KernelOffsets;

const S_IFMT: u16 = 0o170000;
const S_IFREG: u16 = 0o100000;

/// The file an fd refers to.
pub struct FdFile {
    /// `struct file *`
    pub file: u64,
    /// Inode number.
    pub ino: u64,
    /// 1 for a regular file (pipes, sockets and ttys are not counted).
    pub is_regular: u32,
}

#[inline(always)]
fn read<T>(addr: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel copies from any kernel address and fails cleanly
    // on a bad one.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

/// Follows `current->files->fdt->fd[fd]->f_inode`.
#[inline(always)]
pub fn regular_file_of_fd(off: &KernelOffsets, fd: u64) -> Option<FdFile> {
    // SAFETY: the helper returns the current task pointer; it is only dereferenced
    // through bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read(task + off.task_files)?;
    let fdt: u64 = read(files + off.files_fdt)?;
    let max_fds: u32 = read(fdt + off.fdt_max_fds)?;
    if fd >= u64::from(max_fds) {
        return None;
    }
    let fd_array: u64 = read(fdt + off.fdt_fd)?;
    let file: u64 = read(fd_array + fd * 8)?;
    if file == 0 {
        return None;
    }
    let inode: u64 = read(file + off.file_inode)?;
    let mode: u16 = read(inode + off.inode_mode)?;
    let ino: u64 = read(inode + off.inode_ino)?;
    Some(FdFile {
        file,
        ino,
        is_regular: u32::from(mode & S_IFMT == S_IFREG),
    })
}

/// The base name of the file's dentry, copied into `buf`.
#[inline(always)]
pub fn file_name<'a>(off: &KernelOffsets, file: u64, buf: &'a mut [u8]) -> Option<&'a [u8]> {
    let dentry: u64 = read(file + off.file_dentry)?;
    let name: u64 = read(dentry + off.dentry_name)?;
    // SAFETY: reads a NUL-terminated kernel string into `buf`, bounded by its length.
    unsafe { bpf_probe_read_kernel_str_bytes(name as *const u8, buf) }.ok()
}
