//! `deltabox-init RUN_DIR`: the init of one tree of sandboxes, started by `deltaboxd`
//! in the tree's new namespaces with its control socket at fd 3. All logic is in
//! `deltabox_controller::sandbox::runtime` (see `docs/sandbox-runtime.md`).

use std::path::PathBuf;

fn main() {
    let Some(run_dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: deltabox-init RUN_DIR (started by deltaboxd, control socket at fd 3)");
        std::process::exit(2);
    };
    std::process::exit(deltabox_controller::sandbox::runtime::init_main(&run_dir));
}
