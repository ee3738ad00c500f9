//! What DeltaFS did, counted with atomics: FUSE requests by kind (count and the time
//! the daemon took to answer), copy-ups (how, and the bytes they wrote), freezes,
//! switches, and what each freeze made the store write. One [`Stats`] per store, shared
//! by its views; read with [`crate::Store::stats`] and
//! [`crate::Store::written_by_snapshot`].
//!
//! Only requests that reach the daemon are counted: reads and writes through a
//! passthrough open go from the kernel to the backing file and never show up here (the
//! eBPF write tracker counts those). `read` and `write` are the daemon-served ones: a
//! frozen file open for reading, and writes to an inode that already had a
//! daemon-served open.
//!
//! **Timing cost.** Reading the clock twice (`Instant::now()`, then `elapsed()`) costs
//! ~50 ns on this VM (clocksource tsc, vDSO), while the cheapest request costs ~15–35 µs
//! end to end through FUSE and ~3–20 µs in the daemon (`tests/stats.rs`,
//! `measure_the_cost_of_timing`, release build): under 0.5 % of a request as the
//! application sees it, under 2 % of the daemon's own work. So every request is timed
//! ([`TIME_EVERY`] is 1); on a machine with a slow clock, raise it to time one request in
//! N (the histogram is then a uniform sample, its `count` the timed requests).

use std::collections::HashMap;
use std::fs::File;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use std::sync::Weak;

use crate::ids::{LayerId, SnapshotId};
use crate::layer::CopyStats;
use crate::store::{StoreError, StoreShared};
use crate::sync::lock;

/// One request in this many of each kind is timed (1: all of them; see the module's
/// documentation for why).
pub const TIME_EVERY: u64 = 1;

/// Upper bounds, in nanoseconds, of the latency histogram's buckets (plus one above the
/// last: +Inf). Microseconds apart at the low end: a request the index answers takes a
/// few µs in the daemon; a copy-up or an `fsync`, milliseconds.
pub const LATENCY_BOUNDS_NS: [u64; 14] = [
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    100_000_000,
];

const BUCKETS: usize = LATENCY_BOUNDS_NS.len() + 1;

/// The kinds of FUSE request counted: a small fixed set (Prometheus labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// `LOOKUP`.
    Lookup,
    /// `GETATTR` (and `ACCESS`, which answers from the same attributes).
    Getattr,
    /// `OPEN` and `OPENDIR`.
    Open,
    /// `READ` of a daemon-served handle.
    Read,
    /// `WRITE` of a daemon-served handle.
    Write,
    /// `CREATE`, `MKDIR`, `MKNOD`, `SYMLINK`, `LINK`.
    Create,
    /// `UNLINK`, `RMDIR`.
    Unlink,
    /// `RENAME`.
    Rename,
    /// `READDIR`, `READDIRPLUS`.
    Readdir,
    /// `SETATTR` (chmod, chown, truncate, utimens).
    Setattr,
    /// `FSYNC`, `FSYNCDIR`.
    Fsync,
    /// Everything else (`RELEASE`, `READLINK`, xattrs, `STATFS`, `FALLOCATE`, `LSEEK`, ...).
    Other,
}

impl OpKind {
    /// Every kind, in the order [`StatsSnapshot::ops`] lists them.
    pub const ALL: [Self; 12] = [
        Self::Lookup,
        Self::Getattr,
        Self::Open,
        Self::Read,
        Self::Write,
        Self::Create,
        Self::Unlink,
        Self::Rename,
        Self::Readdir,
        Self::Setattr,
        Self::Fsync,
        Self::Other,
    ];

    /// Its label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lookup => "lookup",
            Self::Getattr => "getattr",
            Self::Open => "open",
            Self::Read => "read",
            Self::Write => "write",
            Self::Create => "create",
            Self::Unlink => "unlink",
            Self::Rename => "rename",
            Self::Readdir => "readdir",
            Self::Setattr => "setattr",
            Self::Fsync => "fsync",
            Self::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Default)]
struct OpCounters {
    count: AtomicU64,
    timed: AtomicU64,
    sum_ns: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

/// What a freeze and the epoch it closed made the store write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotWrites {
    /// Bytes copy-ups into the frozen layer wrote during its epoch (0 for reflinks).
    pub copy_up_bytes: u64,
    /// Copy-ups into the frozen layer during its epoch.
    pub copy_ups: u64,
    /// Bytes the freeze copied for files kept live (0 for reflinks).
    pub freeze_copy_bytes: u64,
    /// Files the freeze cloned for the snapshot (kept live; a store that cannot clone
    /// copies them instead, counted in `freeze_copy_bytes`).
    pub freeze_clones: u64,
    /// Bytes of the snapshot's metadata file (`layer.bin`; `layer.json` + `delta.json` in a
    /// store of format version 1) once written.
    pub metadata_bytes: u64,
}

impl SnapshotWrites {
    /// Everything this snapshot made the store write, bytes.
    pub fn total_bytes(&self) -> u64 {
        self.copy_up_bytes + self.freeze_copy_bytes + self.metadata_bytes
    }
}

/// The counters of one store (see the module's documentation).
#[derive(Default)]
pub struct Stats {
    ops: [OpCounters; 12],
    copy_ups_reflink: AtomicU64,
    copy_ups_copy: AtomicU64,
    copy_ups_chunked: AtomicU64,
    copy_ups_empty: AtomicU64,
    copy_up_bytes: AtomicU64,
    chunk_copy_bytes: AtomicU64,
    completions: AtomicU64,
    copy_up_cloned_bytes: AtomicU64,
    freezes: AtomicU64,
    freeze_copy_bytes: AtomicU64,
    switches: AtomicU64,
    /// Copy-ups of each writable layer's epoch so far: (count, bytes written).
    epochs: Mutex<HashMap<LayerId, (u64, u64)>>,
    /// What each freeze of this process wrote, but its metadata (read from disk).
    frozen: Mutex<HashMap<SnapshotId, SnapshotWrites>>,
}

/// Counts one request; times it (one in [`TIME_EVERY`]) until dropped.
pub struct OpTimer<'a> {
    counters: &'a OpCounters,
    start: Option<Instant>,
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        let Some(start) = self.start else {
            return;
        };
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BOUNDS_NS
            .iter()
            .position(|&bound| ns <= bound)
            .unwrap_or(LATENCY_BOUNDS_NS.len());
        self.counters.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.counters.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.counters.timed.fetch_add(1, Ordering::Relaxed);
    }
}

impl Stats {
    /// Counts a request of kind `kind`; keep the timer until it is answered.
    pub fn op(&self, kind: OpKind) -> OpTimer<'_> {
        let counters = &self.ops[kind.index()];
        let n = counters.count.fetch_add(1, Ordering::Relaxed);
        OpTimer {
            counters,
            start: n.is_multiple_of(TIME_EVERY).then(Instant::now),
        }
    }

    /// Counts a copy-up into writable layer `layer`: `copied` as the copy reported it,
    /// `file` the new backing file (its size is what a reflink shared). `None`: an
    /// `O_TRUNC` copy-up, which copies nothing.
    pub fn copied_up(&self, layer: LayerId, copied: Option<(&CopyStats, &File)>) {
        let bytes = match copied {
            None => {
                self.copy_ups_empty.fetch_add(1, Ordering::Relaxed);
                0
            }
            Some((stats, file)) => {
                if stats.cloned > 0 {
                    self.copy_ups_reflink.fetch_add(1, Ordering::Relaxed);
                    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                    self.copy_up_cloned_bytes.fetch_add(len, Ordering::Relaxed);
                } else {
                    self.copy_ups_copy.fetch_add(1, Ordering::Relaxed);
                    if stats.chunked > 0 {
                        self.copy_ups_chunked.fetch_add(1, Ordering::Relaxed);
                    }
                }
                self.copy_up_bytes
                    .fetch_add(stats.bytes_copied, Ordering::Relaxed);
                stats.bytes_copied
            }
        };
        let mut epochs = lock(&self.epochs);
        let epoch = epochs.entry(layer).or_default();
        epoch.0 += 1;
        epoch.1 += bytes;
    }

    /// Counts `bytes` a write into a partial file of writable layer `layer` copied up
    /// from below before writing (chunks it did not cover whole), `completed` when that
    /// completed the file. Part of the epoch's copy-up bytes.
    pub fn chunks_copied(&self, layer: LayerId, bytes: u64, completed: bool) {
        self.copy_up_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.chunk_copy_bytes.fetch_add(bytes, Ordering::Relaxed);
        if completed {
            self.completions.fetch_add(1, Ordering::Relaxed);
        }
        lock(&self.epochs).entry(layer).or_default().1 += bytes;
    }

    /// Counts a freeze of writable layer `layer` into snapshot `id`, whose kept-live
    /// files were copied as `copies` says.
    pub fn frozen(&self, layer: LayerId, id: SnapshotId, copies: &CopyStats) {
        self.freezes.fetch_add(1, Ordering::Relaxed);
        self.freeze_copy_bytes
            .fetch_add(copies.bytes_copied, Ordering::Relaxed);
        let (copy_ups, copy_up_bytes) = lock(&self.epochs).remove(&layer).unwrap_or_default();
        lock(&self.frozen).insert(
            id,
            SnapshotWrites {
                copy_up_bytes,
                copy_ups,
                freeze_copy_bytes: copies.bytes_copied,
                freeze_clones: copies.cloned,
                metadata_bytes: 0,
            },
        );
    }

    /// Counts a switch that abandoned writable layer `old` (its epoch ends unfrozen).
    pub fn switched(&self, old: LayerId) {
        self.switches.fetch_add(1, Ordering::Relaxed);
        lock(&self.epochs).remove(&old);
    }

    /// What the freeze that made `id` wrote (metadata left at 0), if this process made it.
    pub fn frozen_writes(&self, id: SnapshotId) -> Option<SnapshotWrites> {
        lock(&self.frozen).get(&id).copied()
    }

    /// Forgets the snapshots not in `keep` (after a gc).
    pub fn retain_snapshots(&self, keep: impl Fn(&SnapshotId) -> bool) {
        lock(&self.frozen).retain(|id, _| keep(id));
    }

    /// The counters now; `view_layers` is filled by the store.
    pub fn snapshot(&self, view_layers: Vec<u64>) -> StatsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            ops: OpKind::ALL
                .iter()
                .map(|&kind| {
                    let c = &self.ops[kind.index()];
                    OpStats {
                        kind,
                        count: get(&c.count),
                        timed: get(&c.timed),
                        sum_ns: get(&c.sum_ns),
                        buckets: c.buckets.iter().map(get).collect(),
                    }
                })
                .collect(),
            copy_ups_reflink: get(&self.copy_ups_reflink),
            copy_ups_copy: get(&self.copy_ups_copy),
            copy_ups_chunked: get(&self.copy_ups_chunked),
            copy_ups_empty: get(&self.copy_ups_empty),
            copy_up_bytes: get(&self.copy_up_bytes),
            chunk_copy_bytes: get(&self.chunk_copy_bytes),
            partial_completions: get(&self.completions),
            copy_up_cloned_bytes: get(&self.copy_up_cloned_bytes),
            freezes: get(&self.freezes),
            freeze_copy_bytes: get(&self.freeze_copy_bytes),
            switches: get(&self.switches),
            view_layers,
        }
    }
}

/// One kind of request's counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpStats {
    /// The kind.
    pub kind: OpKind,
    /// Requests answered (all of them).
    pub count: u64,
    /// Requests timed (one in [`TIME_EVERY`]: all of them by default).
    pub timed: u64,
    /// Sum of the timed requests' durations, ns.
    pub sum_ns: u64,
    /// Timed requests per bucket of [`LATENCY_BOUNDS_NS`] (not cumulative), the last
    /// one above every bound.
    pub buckets: Vec<u64>,
}

/// The counters of a store at one instant ([`crate::Store::stats`]). All counts since
/// the store was opened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Per request kind, in [`OpKind::ALL`]'s order.
    pub ops: Vec<OpStats>,
    /// Copy-ups made by a reflink (`FICLONE`): no data written.
    pub copy_ups_reflink: u64,
    /// Copy-ups made by copying data (the store cannot clone), chunked ones included.
    pub copy_ups_copy: u64,
    /// Of `copy_ups_copy`, those made chunk by chunk ([`crate::chunks`]): the copy-up
    /// copied nothing, writes copy the chunks they touch.
    pub copy_ups_chunked: u64,
    /// Copy-ups of a file about to be truncated to 0 (`O_TRUNC`): nothing copied.
    pub copy_ups_empty: u64,
    /// Bytes copy-ups wrote (reflinks write none), the chunks copied by writes into
    /// chunk-granular copies included.
    pub copy_up_bytes: u64,
    /// Of `copy_up_bytes`, those writes into chunk-granular copies copied from below
    /// (chunks they did not cover whole, and completions).
    pub chunk_copy_bytes: u64,
    /// Chunk-granular copies completed (the rest copied, served passthrough from their
    /// next first open).
    pub partial_completions: u64,
    /// Bytes reflink copy-ups shared instead of writing (the cloned files' sizes).
    pub copy_up_cloned_bytes: u64,
    /// Freezes.
    pub freezes: u64,
    /// Bytes freezes copied for files kept live (0 where they clone).
    pub freeze_copy_bytes: u64,
    /// Switches.
    pub switches: u64,
    /// For each mounted view, the layers of its chain: its writable layer plus every
    /// frozen layer it is stacked on (the base not counted). Lookups do not walk them
    /// (one index probe per name whatever the depth); disk and restart replay do.
    pub view_layers: Vec<u64>,
}

impl StatsSnapshot {
    /// The counts of one kind of request.
    pub fn op(&self, kind: OpKind) -> &OpStats {
        &self.ops[kind.index()]
    }

    /// All copy-ups.
    pub fn copy_ups(&self) -> u64 {
        self.copy_ups_reflink + self.copy_ups_copy + self.copy_ups_empty
    }
}

/// [`crate::Store::stats`]: the counters, and each mounted view's chain length.
pub(crate) fn snapshot(store: &StoreShared) -> StatsSnapshot {
    let mut view_layers = Vec::new();
    {
        let state = lock(&store.state);
        for view in state.views.iter().filter_map(Weak::upgrade) {
            let (_, parent) = view.layers_in_use();
            let mut layers = 1;
            let mut cur = parent;
            while let Some(id) = cur {
                layers += 1;
                cur = state.snapshots.get(&id).and_then(|s| s.parent);
            }
            view_layers.push(layers);
        }
    }
    store.stats.snapshot(view_layers)
}

/// [`crate::Store::written_by_snapshot`].
pub(crate) fn written_by_snapshot(
    store: &StoreShared,
    id: SnapshotId,
) -> Result<Option<SnapshotWrites>, StoreError> {
    let Some(mut writes) = store.stats.frozen_writes(id) else {
        return Ok(None);
    };
    store.writer.flush()?;
    let dir = store.layers.dir(id.layer());
    writes.metadata_bytes = crate::persist::METADATA_FILES
        .iter()
        .filter_map(|name| std::fs::metadata(dir.join(name)).ok())
        .map(|m| m.len())
        .sum();
    Ok(Some(writes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_are_all_counted_and_one_in_n_timed() {
        let stats = Stats::default();
        for _ in 0..(3 * TIME_EVERY) {
            drop(stats.op(OpKind::Write));
        }
        drop(stats.op(OpKind::Lookup));
        let snap = stats.snapshot(vec![3]);
        let write = snap.op(OpKind::Write);
        assert_eq!(write.count, 3 * TIME_EVERY);
        assert_eq!(write.timed, 3);
        assert_eq!(write.buckets.iter().sum::<u64>(), 3);
        assert_eq!(snap.op(OpKind::Lookup).count, 1);
        assert_eq!(snap.op(OpKind::Lookup).timed, 1);
        assert_eq!(snap.op(OpKind::Getattr).count, 0);
        assert_eq!(snap.view_layers, [3]);
    }

    #[test]
    fn slow_requests_land_in_high_buckets() {
        let stats = Stats::default();
        {
            let _t = stats.op(OpKind::Fsync);
            std::thread::sleep(std::time::Duration::from_millis(3));
        }
        let snap = stats.snapshot(Vec::new());
        let fsync = snap.op(OpKind::Fsync);
        // 3 ms or more: above the 2.5 ms bound (index 9).
        assert_eq!(fsync.buckets[..10].iter().sum::<u64>(), 0, "{fsync:?}");
        assert!(fsync.sum_ns >= 3_000_000);
    }

    #[test]
    fn a_freeze_takes_its_epochs_copy_ups() {
        let stats = Stats::default();
        let (a, b) = (LayerId::generate(), LayerId::generate());
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("f")).unwrap();
        file.set_len(1 << 20).unwrap();
        let copied = CopyStats {
            bytes_copied: 1 << 20,
            ..CopyStats::default()
        };
        stats.copied_up(a, Some((&copied, &file)));
        stats.copied_up(a, None);
        stats.copied_up(b, Some((&copied, &file)));
        let id = SnapshotId::of_layer(a);
        stats.frozen(a, id, &CopyStats::default());
        let w = stats.frozen_writes(id).unwrap();
        assert_eq!((w.copy_ups, w.copy_up_bytes), (2, 1 << 20));
        assert_eq!(w.total_bytes(), 1 << 20);
        stats.switched(b);
        let snap = stats.snapshot(Vec::new());
        assert_eq!(
            (snap.copy_ups_copy, snap.copy_ups_empty, snap.copy_ups()),
            (2, 1, 3)
        );
        assert_eq!(snap.copy_up_bytes, 2 << 20);
        assert_eq!((snap.freezes, snap.switches), (1, 1));
        assert!(lock(&stats.epochs).is_empty());
    }
}
