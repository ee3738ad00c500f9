//! Loading, adopting and unloading the programs: one attachment per tracepoint however
//! often they are loaded, nothing pinned or attached after an unload.

use std::{collections::BTreeSet, fs, path::Path, thread, time::Duration};

use aya::programs::{ProgramInfo, loaded_links, loaded_programs};
use deltabox_controller::bpf::{
    self, BpfError, Origin, PinnedTracker, WriteTracker,
    loader::{ATTACHMENTS, PROGRAMS},
};
use deltabox_tests::{pins::TestPins, require_root};

fn program_ids(pin_dir: &Path) -> BTreeSet<u32> {
    PROGRAMS
        .iter()
        .map(|p| {
            ProgramInfo::from_pin(pin_dir.join("progs").join(p))
                .unwrap()
                .id()
        })
        .collect()
}

fn links_of(ids: &BTreeSet<u32>) -> usize {
    loaded_links()
        .filter_map(Result::ok)
        .filter(|l| ids.contains(&l.program_id()))
        .count()
}

/// Programs are freed after an RCU grace period once their last reference goes.
fn wait_until_gone(ids: &BTreeSet<u32>) {
    for _ in 0..200 {
        let alive = loaded_programs()
            .filter_map(Result::ok)
            .any(|p| ids.contains(&p.id()));
        if !alive {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
    panic!("programs {ids:?} still loaded after unload");
}

#[test]
fn load_twice_unload_load_again() {
    require_root();
    let pins = TestPins::new("reload");
    let dir = pins.dir();

    let first = pins.load();
    let ids1 = program_ids(dir);
    assert_eq!(ids1.len(), PROGRAMS.len());
    assert_eq!(links_of(&ids1), ATTACHMENTS.len());
    assert_eq!(first.attached().unwrap().len(), ATTACHMENTS.len());
    drop(first);

    // Loading again replaces: the old programs are detached, no duplicate links.
    let second = pins.load();
    let ids2 = program_ids(dir);
    assert!(ids1.is_disjoint(&ids2));
    wait_until_gone(&ids1);
    assert_eq!(links_of(&ids1), 0);
    assert_eq!(links_of(&ids2), ATTACHMENTS.len());
    drop(second);

    let removed = bpf::unload(dir).unwrap();
    assert_eq!(
        removed.len(),
        ATTACHMENTS.len() + PROGRAMS.len() + bpf::loader::PINNED_MAPS.len()
    );
    assert!(!dir.exists(), "pin dir left behind");
    wait_until_gone(&ids2);
    assert!(
        bpf::unload(dir).unwrap().is_empty(),
        "second unload found pins"
    );

    let third = pins.load();
    assert_eq!(links_of(&program_ids(dir)), ATTACHMENTS.len());
    drop(third);
}

#[test]
fn adopt_finds_what_load_pinned() {
    require_root();
    let pins = TestPins::new("adopt");
    let dir = pins.dir();
    assert!(matches!(
        PinnedTracker::adopt(dir),
        Err(BpfError::NotLoaded { .. })
    ));

    let loaded = pins.load();
    loaded.watch(42).unwrap();
    let ids = program_ids(dir);
    let (adopted, origin) = PinnedTracker::load_or_adopt(dir).unwrap();
    assert_eq!(origin, Origin::Adopted);
    assert_eq!(program_ids(dir), ids, "adopting reloaded the programs");
    // Same maps: the watch made through the first tracker is visible.
    assert_eq!(adopted.watched().unwrap(), vec![(42, 0)]);

    // A pin directory missing a piece is reported, and load_or_adopt repairs it.
    fs::remove_file(dir.join("links/syscalls:sys_enter_write")).unwrap();
    let err = PinnedTracker::adopt(dir)
        .err()
        .expect("adopt of an incomplete dir");
    assert!(err.to_string().contains("sys_enter_write"), "{err}");
    let (_, origin) = PinnedTracker::load_or_adopt(dir).unwrap();
    assert_eq!(origin, Origin::Loaded);
    assert_eq!(links_of(&program_ids(dir)), ATTACHMENTS.len());
}
