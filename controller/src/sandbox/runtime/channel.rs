//! The daemon's end of a tree's control socket: a reader thread dispatches init's
//! replies by request id, records spawned children's host pids, and keeps exit reports
//! (bounded) so a wait can start before or after the exit arrived.

use std::{
    collections::{HashMap, VecDeque},
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{Condvar, Mutex, MutexGuard},
};

use super::{
    ExitStatus,
    proto::{self, FromInit, ProtoError, ReplyData},
};

/// Exit reports kept for `TreeRuntime::wait_exit` (oldest dropped first).
const MAX_EXITS: usize = 4096;

/// What the reader thread shares with callers.
#[derive(Default)]
pub(crate) struct Mailbox {
    pub(crate) hello: Option<i32>,
    pub(crate) ready: Option<Result<(), String>>,
    pub(crate) replies: HashMap<u64, (Result<ReplyData, String>, Vec<OwnedFd>)>,
    /// Host pids of spawned children by request id (from their `Started` message).
    pub(crate) started: HashMap<u64, i32>,
    pub(crate) exits: HashMap<i32, ExitStatus>,
    pub(crate) exit_order: VecDeque<i32>,
    pub(crate) gone: bool,
}

pub(crate) struct Channel {
    pub(crate) sock: OwnedFd,
    pub(crate) send_lock: Mutex<u64>,
    pub(crate) mailbox: Mutex<Mailbox>,
    pub(crate) cond: Condvar,
}

impl Channel {
    /// The reader thread: dispatches replies by id and keeps exit reports.
    pub(crate) fn read_loop(&self) {
        let mut buf = vec![0; proto::MAX_MSG];
        loop {
            let msg = proto::recv::<FromInit>(self.sock.as_raw_fd(), &mut buf);
            let mut mb = lock(&self.mailbox);
            match msg {
                Ok((FromInit::Hello { init_host_pid }, _, _)) => mb.hello = Some(init_host_pid),
                Ok((FromInit::Ready, _, _)) => mb.ready = Some(Ok(())),
                Ok((FromInit::SetupFailed { error }, _, _)) => mb.ready = Some(Err(error)),
                Ok((FromInit::Started { id }, _, Some(pid))) => {
                    mb.started.insert(id, pid);
                }
                Ok((FromInit::Started { .. }, _, None)) => {}
                Ok((FromInit::Reply { id, result }, fds, _)) => {
                    // A reused ns pid must not inherit an old exit: the new process's
                    // exit always comes after this reply.
                    if let Ok(ReplyData::Spawned(pid) | ReplyData::Anchor(pid)) = &result {
                        mb.exits.remove(pid);
                    }
                    mb.replies.insert(id, (result, fds));
                }
                Ok((FromInit::Exit { ns_pid, status }, _, _)) => {
                    if mb.exits.insert(ns_pid, status).is_none() {
                        mb.exit_order.push_back(ns_pid);
                    }
                    while mb.exit_order.len() > MAX_EXITS {
                        if let Some(old) = mb.exit_order.pop_front() {
                            mb.exits.remove(&old);
                        }
                    }
                }
                Err(ProtoError::Decode(e)) => log::warn!("bad message from init: {e}"),
                Err(_) => {
                    mb.gone = true;
                    self.cond.notify_all();
                    return;
                }
            }
            self.cond.notify_all();
        }
    }
}

/// Locks, ignoring poisoning (a panicked holder leaves consistent maps here).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
