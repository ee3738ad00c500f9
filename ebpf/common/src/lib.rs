//! Types shared by DeltaBox's eBPF programs and userspace through maps.
//!
//! Every type is `#[repr(C)]`, `Copy`, and laid out without padding so both sides
//! agree byte for byte; flags are integers, never `bool`.
#![no_std]

/// Names of the maps, as declared in the eBPF object and pinned under the pin directory.
pub mod map_names {
    /// `HashMap<u64 cgroup id, WatchState>`: the cgroups whose writes are counted.
    pub const WATCHED: &str = "DBX_WATCHED";
    /// `HashMap<InodeKey, InodeStats>`: per (cgroup, inode, epoch) counters.
    pub const INODE_STATS: &str = "DBX_INODE_STATS";
    /// `HashMap<u64 pid_tgid, InodeKey>`: a write syscall between its enter and exit.
    pub const PENDING: &str = "DBX_PENDING";
    /// `PerCpuArray<u64>` indexed by [`Counter`](crate::Counter).
    pub const COUNTERS: &str = "DBX_COUNTERS";
    /// `HashMap<u64 cgroup id, WatchState>`: the cgroups whose copy-on-write faults are
    /// counted, with their fault epoch (apart from the write tracker's).
    pub const FAULT_WATCHED: &str = "DBX_FAULT_WATCHED";
    /// `HashMap<FaultKey, u64>`: write faults on present pages per (cgroup, epoch).
    pub const FAULT_COUNTS: &str = "DBX_FAULT_COUNTS";
    /// `HashMap<FaultPageKey, u64>`: the pages those faults hit, per process.
    pub const FAULT_PAGES: &str = "DBX_FAULT_PAGES";
}

/// Upper bound of watched cgroups.
pub const MAX_WATCHED: u32 = 4096;
/// Upper bound of (cgroup, inode, epoch) entries; past it new inodes are counted in
/// [`Counter::StatsFull`] instead of silently dropped.
pub const MAX_INODE_STATS: u32 = 131_072;
/// Upper bound of write syscalls in flight at once.
pub const MAX_PENDING: u32 = 16_384;
/// Upper bound of (cgroup, epoch) fault counters: userspace drops a cgroup's older
/// epochs, so a few per watched cgroup.
pub const MAX_FAULT_COUNTS: u32 = 4 * MAX_WATCHED;
/// Upper bound of (cgroup, epoch, process, page) entries (512 MiB of 4 KiB pages); past
/// it new pages are counted in [`Counter::FaultPagesFull`] (their faults still count).
pub const MAX_FAULT_PAGES: u32 = 131_072;
/// Bytes of a file's base name kept with its counters (NUL-padded, may be truncated).
pub const NAME_LEN: usize = 64;

/// Value of the watched-cgroups map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchState {
    /// Current epoch: counts are kept per epoch, and userspace advances it at each
    /// checkpoint boundary so the counters restart from zero.
    pub epoch: u64,
}

/// Key of the per-inode counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InodeKey {
    /// cgroup v2 id (the inode number of the cgroup's directory).
    pub cgroup_id: u64,
    /// Inode number of the file written.
    pub ino: u64,
    /// The cgroup's epoch when the write happened.
    pub epoch: u64,
}

/// Value of the per-inode counters. Updated with atomic adds from any CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InodeStats {
    /// write-family syscalls (write, pwrite64, writev, pwritev, pwritev2) on the inode.
    pub writes: u64,
    /// Bytes those syscalls reported written.
    pub bytes: u64,
    /// Page-cache folios the cgroup's tasks turned dirty (`writeback_dirty_folio`).
    pub pages_dirtied: u64,
    /// Base name of the file as seen by the first write syscall, NUL-padded.
    pub name: [u8; NAME_LEN],
}

impl Default for InodeStats {
    fn default() -> Self {
        Self {
            writes: 0,
            bytes: 0,
            pages_dirtied: 0,
            name: [0; NAME_LEN],
        }
    }
}

impl InodeStats {
    /// The recorded base name, up to its first NUL; empty when no write syscall named it.
    pub fn name_bytes(&self) -> &[u8] {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
        &self.name[..end]
    }
}

/// Offsets (bytes) of the kernel struct fields the programs follow from the current
/// task to the inode behind a file descriptor. Read from `/sys/kernel/btf/vmlinux` by
/// userspace at load time and written into the program's read-only data, so the
/// programs are correct on any kernel with BTF, not only the one they were built on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.files`
    pub task_files: u64,
    /// `files_struct.fdt`
    pub files_fdt: u64,
    /// `fdtable.max_fds` (u32)
    pub fdt_max_fds: u64,
    /// `fdtable.fd`
    pub fdt_fd: u64,
    /// `file.f_inode`
    pub file_inode: u64,
    /// `file.f_path` + `path.dentry`
    pub file_dentry: u64,
    /// `dentry.d_name` + `qstr.name`
    pub dentry_name: u64,
    /// `inode.i_mode` (u16)
    pub inode_mode: u64,
    /// `inode.i_ino`
    pub inode_ino: u64,
    /// Offset of `ino` in the `writeback:writeback_dirty_folio` record.
    pub tp_dirty_folio_ino: u64,
    /// Offset of `fd` in the `syscalls:sys_enter_write*` / `sys_enter_pwrite*` records.
    pub tp_enter_fd: u64,
    /// Offset of `ret` in the `syscalls:sys_exit_*` records.
    pub tp_exit_ret: u64,
    /// Offset of `address` in the `exceptions:page_fault_user` record.
    pub tp_fault_address: u64,
    /// Offset of `error_code` in the `exceptions:page_fault_user` record.
    pub tp_fault_error_code: u64,
    /// 1 once userspace filled the offsets; the programs do nothing while it is 0.
    pub valid: u64,
}

/// Key of the copy-on-write fault counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FaultKey {
    /// cgroup v2 id.
    pub cgroup_id: u64,
    /// The cgroup's fault epoch when the fault happened.
    pub epoch: u64,
}

/// Key of the faulting pages.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FaultPageKey {
    /// cgroup v2 id.
    pub cgroup_id: u64,
    /// The cgroup's fault epoch.
    pub epoch: u64,
    /// The faulting address rounded down to its 4 KiB page.
    pub page: u64,
    /// Thread-group id (host pid) of the faulting process: addresses are per process.
    pub tgid: u32,
    /// Zero (explicit padding, so both sides hash the same bytes).
    pub pad: u32,
}

/// Global counters, indexes of the [`map_names::COUNTERS`] per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Write syscalls counted in a watched cgroup.
    WriteSyscalls = 0,
    /// Dirtied folios counted in a watched cgroup.
    DirtiedFolios = 1,
    /// New inode entries refused because [`map_names::INODE_STATS`] was full.
    StatsFull = 2,
    /// Write syscalls whose fd could not be followed to an inode.
    FdUnresolved = 3,
    /// Write faults on present pages (copy-on-write) counted in a fault-watched cgroup.
    CowFaults = 4,
    /// Faulting pages not recorded because [`map_names::FAULT_PAGES`] was full.
    FaultPagesFull = 5,
}

impl Counter {
    /// Number of counters, the length of the per-CPU array.
    pub const COUNT: u32 = 6;
    /// Every counter, in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::WriteSyscalls,
        Counter::DirtiedFolios,
        Counter::StatsFull,
        Counter::FdUnresolved,
        Counter::CowFaults,
        Counter::FaultPagesFull,
    ];
}

#[cfg(feature = "user")]
mod pod {
    use super::{FaultKey, FaultPageKey, InodeKey, InodeStats, KernelOffsets, WatchState};

    // SAFETY: plain #[repr(C)] structs of u64 / u8 fields without padding; every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for WatchState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for InodeKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for InodeStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for KernelOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FaultKey {}
    // SAFETY: as above (the u32 pair fills the last 8 bytes: no padding).
    unsafe impl aya::Pod for FaultPageKey {}
}
