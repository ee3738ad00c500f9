//! Debian packages, checked with `dpkg-query` and installed with `apt-get` only when some
//! are missing (and only then is `apt-get update` run).

use std::collections::HashSet;
use std::process::Command;

use super::{Check, Failure, Outcome};
use crate::util::{raw_output, run_cmd, step};

/// The packages and why DeltaBox needs each (docs/setup.md says the same).
const PACKAGES: &[(&str, &str)] = &[
    (
        "fuse3",
        "fusermount3, to mount and unmount FUSE filesystems without root",
    ),
    (
        "pkg-config",
        "finding system libraries for crates that build native code",
    ),
    ("iproute2", "ip, for sandbox network namespaces"),
    (
        "xfsprogs",
        "mkfs.xfs, for reflink-capable loop images under DeltaFS layers",
    ),
    (
        "btrfs-progs",
        "mkfs.btrfs, for reflink-capable loop images under DeltaFS layers",
    ),
    ("e2fsprogs", "mkfs.ext4, for ext4 loop images in tests"),
    (
        "acl",
        "setfacl and getfacl, for the POSIX ACL tests of DeltaFS (compared with ext4's)",
    ),
    (
        "gcc",
        "the C compiler and linker driver rustc links host binaries with",
    ),
    (
        "libc6-dev",
        "the C library and start files host binaries link against",
    ),
    (
        "prometheus",
        "a real Prometheus server that tests scrape deltaboxd with and run every dashboard query through",
    ),
];

pub fn ensure_packages() -> Check {
    let names: Vec<&str> = PACKAGES.iter().map(|(name, _)| *name).collect();
    let missing = missing_packages(&names)?;
    if missing.is_empty() {
        return Ok(Outcome::Ok(names.join(", ")));
    }
    if which::which("apt-get").is_err() {
        return Err(Failure::new(
            format!("missing packages {} and no apt-get", missing.join(", ")),
            "install them with the system's package manager",
        ));
    }
    let fix = format!(
        "run `apt-get update && apt-get install {}` and read its errors",
        missing.join(" ")
    );
    step(format!("apt-get install {}", missing.join(" ")));
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        cmd
    };
    run_cmd(&mut apt(&["update", "-qq"])).map_err(|err| Failure::from_error(&err, &fix))?;
    let mut install = apt(&["install", "-y", "-qq", "--no-install-recommends"]);
    install.args(&missing);
    run_cmd(&mut install).map_err(|err| Failure::from_error(&err, &fix))?;
    let still_missing = missing_packages(&names)?;
    if !still_missing.is_empty() {
        return Err(Failure::new(
            format!(
                "still not installed after apt-get: {}",
                still_missing.join(", ")
            ),
            fix,
        ));
    }
    Ok(Outcome::Installed(missing.join(", ")))
}

/// The names among `names` that dpkg does not list as installed.
fn missing_packages<'a>(names: &[&'a str]) -> Result<Vec<&'a str>, Failure> {
    let mut query = Command::new("dpkg-query");
    query
        .args(["-W", "-f=${Package}\t${db:Status-Abbrev}\n"])
        .args(names);
    // dpkg-query exits 1 when some name is unknown to it, and still lists the rest.
    let out = raw_output(&mut query).map_err(|err| {
        Failure::from_error(
            &err,
            "set-up installs packages on Debian with dpkg and apt-get; elsewhere install \
             the packages docs/setup.md lists by hand",
        )
    })?;
    let listing = String::from_utf8_lossy(&out.stdout);
    let installed = installed_packages(&listing);
    Ok(names
        .iter()
        .copied()
        .filter(|name| !installed.contains(name))
        .collect())
}

/// Packages marked `ii` (desired install, installed) in `dpkg-query -W -f='${Package}\t
/// ${db:Status-Abbrev}\n'` output. Multi-arch names (`libc6-dev:amd64`) count as the name.
fn installed_packages(listing: &str) -> HashSet<&str> {
    listing
        .lines()
        .filter_map(|line| {
            let (name, status) = line.split_once('\t')?;
            let name = name.split(':').next()?;
            status.starts_with("ii").then_some(name)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ii_counts_as_installed() {
        let listing = "fuse3\tun \ngcc\tii \nlibc6-dev:amd64\tii \nxfsprogs\trc \n";
        let installed = installed_packages(listing);
        assert!(installed.contains("gcc"));
        assert!(installed.contains("libc6-dev"));
        assert!(!installed.contains("fuse3"));
        assert!(!installed.contains("xfsprogs"));
    }

    #[test]
    fn every_package_says_why() {
        for (name, why) in PACKAGES {
            assert!(!name.is_empty() && !why.is_empty());
        }
    }
}
