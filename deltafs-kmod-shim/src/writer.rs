//! The background writer of frozen layers' metadata. A freeze hands over the frozen
//! index and its delta (O(1): shared maps and an `Arc`) and returns; this thread turns
//! them into `layer.bin` (see [`persist`](crate::persist)), in freeze order. [`Writer::flush`] waits for
//! everything handed over so far (garbage collection and unmount do; so do tests that
//! count bytes).

use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use crate::index::{Delta, Index};
use crate::persist::{self, DeltaRecord, Manifest, PersistError};
use crate::sync::lock;

/// How long the writer waits before writing a frozen layer (see [`run`]).
const YIELD: std::time::Duration = std::time::Duration::from_millis(1);

/// Work for the writer thread.
pub(crate) enum Job {
    /// Write the metadata of a layer just frozen.
    Frozen {
        dir: PathBuf,
        manifest: Manifest,
        delta: Arc<Delta>,
        index: Index,
    },
    /// Mark a snapshot dropped.
    Dropped { dir: PathBuf },
    /// Answer with the bytes written since the last flush, or the first error since.
    Flush(Sender<Result<u64, PersistError>>),
}

/// Handle on the writer thread; dropping it drains the queue and joins the thread.
pub(crate) struct Writer {
    tx: Mutex<Option<Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Writer {
    /// Starts the thread.
    pub fn start() -> io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("deltafs-writer".to_owned())
            .spawn(move || run(rx))?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a job.
    pub fn send(&self, job: Job) {
        if let Some(tx) = lock(&self.tx).as_ref() {
            // The thread lives as long as the sender: sending cannot fail.
            let _ = tx.send(job);
        }
    }

    /// Waits until every queued job is done; returns the bytes written since the last
    /// flush, or the first error met since.
    pub fn flush(&self) -> Result<u64, PersistError> {
        let (tx, rx) = mpsc::channel();
        self.send(Job::Flush(tx));
        rx.recv().unwrap_or(Ok(0))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        lock(&self.tx).take();
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

fn run(rx: Receiver<Job>) {
    let mut written = 0u64;
    let mut failure: Option<PersistError> = None;
    for job in rx {
        if matches!(job, Job::Frozen { .. }) {
            // Woken by a freeze, this thread would preempt it on a busy machine and
            // serialize the delta before the freeze returns: step aside first.
            thread::sleep(YIELD);
        }
        let result = match job {
            Job::Frozen {
                dir,
                manifest,
                delta,
                index,
            } => fs::create_dir_all(&dir)
                .map_err(|source| PersistError::Io {
                    path: dir.clone(),
                    source,
                })
                .and_then(|()| {
                    let record = DeltaRecord::capture(&delta, &index);
                    persist::write_frozen(&dir, &manifest, &record)
                }),
            Job::Dropped { dir } => persist::mark_dropped(&dir).map(|()| 0),
            Job::Flush(reply) => {
                let _ = reply.send(match failure.take() {
                    Some(e) => Err(e),
                    None => Ok(std::mem::take(&mut written)),
                });
                continue;
            }
        };
        match result {
            Ok(bytes) => written += bytes,
            Err(e) => {
                log::error!("deltafs: {e}");
                failure.get_or_insert(e);
            }
        }
    }
}
