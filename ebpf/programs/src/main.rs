//! DeltaBox's eBPF programs: per (cgroup, inode) write and page-dirtying counters.
//!
//! Three programs, each attached to one or more tracepoints by userspace:
//! - `dbx_write_enter` on `syscalls:sys_enter_{write,pwrite64,writev,pwritev,pwritev2}`
//!   follows the fd to its inode and counts the call;
//! - `dbx_write_exit` on the matching `sys_exit_*` adds the bytes the call returned;
//! - `dbx_dirty_folio` on `writeback:writeback_dirty_folio` counts dirtied folios;
//! - `dbx_page_fault` on `exceptions:page_fault_user` counts copy-on-write faults and
//!   records the pages they hit (`faults.rs`), in cgroups of `DBX_FAULT_WATCHED`.
//!
//! Only tasks whose cgroup v2 id is in `DBX_WATCHED` are counted, under the cgroup's
//! current epoch. Struct and record offsets come from userspace (`DBX_OFFSETS`), read
//! from kernel BTF and tracefs at load time.
//!
//! Built for the host (`cargo clippy --workspace`), the crate is an empty binary.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// `atomic-cas` is false for the BPF target, so core's AtomicU64 has no fetch_add; the
// intrinsic lowers to the BPF atomic add instruction.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod faults;
#[cfg(target_arch = "bpf")]
mod kernel;
#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!(
        "deltabox-ebpf holds eBPF programs: build it for bpfel-unknown-none (cargo xtask build)"
    );
    std::process::exit(2);
}
