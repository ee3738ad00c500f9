//! Periods, the metric by warm-up, and the learned store, over the fake counter.

use super::worker::{Learned, MAX_LEARNED_SETS};
use super::*;
use crate::api::fake::FakeFaults;
use crate::api::sandbox_types::RollbackTimings;

fn rolled(mode: RollbackMode) -> RollbackResult {
    RollbackResult {
        sandbox: "sb1".into(),
        node: "n1".into(),
        mode,
        sessions: Vec::new(),
        timings: RollbackTimings::default(),
        standby_sessions: 0,
        warm_up: false,
    }
}

#[test]
fn faults_after_rollbacks_are_counted_by_warm_up() {
    let faults = Arc::new(FakeFaults::default());
    let metrics = Metrics::new().unwrap();
    let cow = CowTracking::new(faults.clone(), metrics.clone(), false);
    cow.track("sb1", 7, &[]);
    // Before any rollback: the sandbox's figure, not the metric.
    faults.record_faults(7, 5);
    assert_eq!(cow.figures("sb1").unwrap().cow_faults, 5);
    assert!(!cow.rolled_back(&rolled(RollbackMode::All), None));
    faults.record_faults(7, 3);
    assert_eq!(cow.figures("sb1").unwrap().cow_faults, 3);
    // A files-only rollback leaves the processes, and the period, alone.
    assert!(!cow.rolled_back(&rolled(RollbackMode::FilesOnly), Some(true)));
    assert_eq!(cow.figures("sb1").unwrap().cow_faults, 3);
    assert!(cow.rolled_back(&rolled(RollbackMode::ProcessesOnly), Some(true)));
    cow.wait_warm_up("sb");
    faults.record_faults(7, 2);
    assert_eq!(cow.figures("sb1").unwrap().cow_faults, 2);
    cow.checkpointed("sb1", "n2");
    cow.wait_idle();
    let counted = |label: &str| metrics.cow_faults_total.with_label_values(&[label]).get();
    assert_eq!((counted("false"), counted("true")), (3, 2));
    assert_eq!(metrics.warm_up_seconds.get_sample_count(), 1);
    // The daemon's default applies when the request does not say.
    let warm = CowTracking::new(faults.clone(), metrics.clone(), true);
    warm.track("sb1", 8, &[]);
    assert!(warm.rolled_back(&rolled(RollbackMode::All), None));
    warm.wait_idle();
    assert_eq!(metrics.warm_up_seconds.get_sample_count(), 2);
    cow.untrack("sb1");
    assert!(cow.figures("sb1").is_none());
}

#[test]
fn learned_sets_are_bounded_oldest_first() {
    let mut l = Learned::default();
    let key = |n: usize| (format!("node{n}"), "s".to_owned());
    for n in 0..MAX_LEARNED_SETS + 2 {
        l.insert(key(n), vec![0x1000]);
    }
    assert_eq!(l.sets.len(), MAX_LEARNED_SETS);
    assert!(!l.sets.contains_key(&key(0)) && !l.sets.contains_key(&key(1)));
    assert_eq!(l.pages, MAX_LEARNED_SETS);
    // Replacing a set counts its pages once.
    l.insert(key(5), vec![1, 2, 3]);
    assert_eq!(l.pages, MAX_LEARNED_SETS + 2);
    assert_eq!(l.order.back(), Some(&key(5)));
}
