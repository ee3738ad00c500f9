//! Rebuild the programs when bpf-linker changes (it is part of the toolchain that
//! produces the object, but cargo does not know about it).

fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
