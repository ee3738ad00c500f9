//! The conformance suites `cargo xtask conformance` runs, installed from crates.io with
//! `cargo install --locked`: `pjdfstest` (the Rust rewrite of the POSIX file system test
//! suite) and `fsx` (the Rust port of the file system exerciser). An installed crate is
//! left alone, whatever its version; `cargo install --list` says which version it is.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use super::{Check, Failure, Outcome};
use crate::util::{output, run_cmd, step};

/// A crate whose binary of the same name set-up installs.
struct Suite {
    krate: &'static str,
    /// What it is, for the progress line.
    what: &'static str,
}

const PJDFSTEST: Suite = Suite {
    krate: "pjdfstest",
    what: "POSIX file system conformance suite",
};

const FSX: Suite = Suite {
    krate: "fsx",
    what: "file system exerciser",
};

pub fn ensure_pjdfstest() -> Check {
    ensure(&PJDFSTEST)
}

pub fn ensure_fsx() -> Check {
    ensure(&FSX)
}

fn ensure(suite: &Suite) -> Check {
    ensure_inner(suite).map_err(|err| {
        Failure::from_error(
            &err,
            format!(
                "run `cargo install --locked {}` by hand and read its errors (it needs \
                 crates.io, gcc and, for pjdfstest, libacl1-dev)",
                suite.krate
            ),
        )
    })
}

fn ensure_inner(suite: &Suite) -> Result<Outcome> {
    if let Some(version) = installed_version(suite.krate)? {
        let path = which::which(suite.krate).with_context(|| {
            format!(
                "cargo lists {} {version} as installed but `{}` is not on PATH (add \
                 ~/.cargo/bin to PATH)",
                suite.krate, suite.krate
            )
        })?;
        return Ok(Outcome::Ok(format!("{version} at {}", path.display())));
    }
    step(format!(
        "cargo install --locked {} ({}, a few minutes)",
        suite.krate, suite.what
    ));
    let mut install = Command::new("cargo");
    install
        .args(["install", "--locked", suite.krate])
        // An outer `cargo run` sets these for its own build.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    run_cmd(&mut install)?;
    let Some(version) = installed_version(suite.krate)? else {
        bail!(
            "`cargo install {}` succeeded but `cargo install --list` does not list it",
            suite.krate
        );
    };
    let path = which::which(suite.krate)
        .with_context(|| format!("`{}` is installed but not on PATH", suite.krate))?;
    Ok(Outcome::Installed(format!(
        "{version} at {}",
        path.display()
    )))
}

/// The version `cargo install --list` shows for `krate` (`v0.2.2`), if it is installed.
pub fn installed_version(krate: &str) -> Result<Option<String>> {
    let list = output(Command::new("cargo").args(["install", "--list"]))?;
    Ok(listed_version(&list, krate))
}

/// `pjdfstest v0.2.2:` lines of `cargo install --list` output; binaries are indented
/// below them.
fn listed_version(list: &str, krate: &str) -> Option<String> {
    list.lines().find_map(|line| {
        let (name, rest) = line.split_once(' ')?;
        if name != krate || line.starts_with(char::is_whitespace) {
            return None;
        }
        let version = rest.trim_end_matches(':').split_whitespace().next()?;
        Some(version.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_versions_from_cargo_install_list() {
        let list = "bpf-linker v0.13.0:\n    bpf-linker\nfsx v0.3.2:\n    fsx\n\
                    pjdfstest v0.2.2 (https://github.com/saidsay-so/pjdfstest#1a2b3c4d):\n    \
                    pjdfstest\n";
        assert_eq!(listed_version(list, "fsx").as_deref(), Some("v0.3.2"));
        assert_eq!(listed_version(list, "pjdfstest").as_deref(), Some("v0.2.2"));
        assert_eq!(listed_version(list, "bpf"), None);
        assert_eq!(listed_version("    fsx\n", "fsx"), None);
    }
}
