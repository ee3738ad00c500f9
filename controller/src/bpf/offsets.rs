//! Kernel offsets from BTF and tracefs.
