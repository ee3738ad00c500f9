//! Builds the eBPF programs (`ebpf/programs`) with the nightly and bpf-linker, so a
//! plain `cargo build` of the controller embeds a fresh object.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let root = Path::new(&manifest_dir)
        .parent()
        .context("controller has no parent directory")?;
    let programs = root.join("ebpf/programs");
    println!(
        "cargo:rerun-if-changed={}",
        root.join("ebpf/common/src").display()
    );
    check_toolchain()?;
    let programs = programs
        .to_str()
        .context("non-UTF-8 path of ebpf/programs")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "deltabox-ebpf",
            root_dir: programs,
            no_default_features: false,
            features: &[],
        }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the eBPF programs failed")
}

/// Fails early, with the fix, when the eBPF toolchain is missing.
fn check_toolchain() -> anyhow::Result<()> {
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !matches!(linker, Ok(ref out) if out.status.success()) {
        bail!("bpf-linker is not installed or does not run: run `cargo xtask setup` first");
    }
    let src = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output();
    match src {
        Ok(out) if String::from_utf8_lossy(&out.stdout).contains("rust-src") => Ok(()),
        _ => bail!("the nightly toolchain with rust-src is missing: run `cargo xtask setup` first"),
    }
}
