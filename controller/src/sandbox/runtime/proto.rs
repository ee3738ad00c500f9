//! The protocol between the daemon and a tree's init: serde_json messages, one per
//! `SOCK_SEQPACKET` datagram, file descriptors alongside with `SCM_RIGHTS`.
//!
//! Each request carries an id and gets exactly one [`FromInit::Reply`]; init also sends
//! unsolicited [`FromInit::Exit`] reports for every child it reaps.

use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{FromRawFd as _, OwnedFd, RawFd},
    path::PathBuf,
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

use super::ExitStatus;

/// The largest datagram either side sends (argv + env of a spawn fit easily).
pub(crate) const MAX_MSG: usize = 256 * 1024;
/// The most fds one message carries.
const MAX_FDS: usize = 16;

/// A request to init.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Request {
    /// A sandbox's view is mounted at `/sb/<sandbox>`: set it up and start its anchor.
    /// fds: the sandbox's cgroup v2 dir, the tree's templates dir, then `limit_dirs`
    /// cgroup v1 dirs (the limit hierarchies when cgroup2 lacks the controllers).
    AddSandbox {
        /// The sandbox name.
        sandbox: String,
        /// How many cgroup v1 directory fds follow the first two.
        limit_dirs: usize,
    },
    /// Run a command in a sandbox. fds: stdin read end (if `stdin`), stdout and stderr
    /// write ends.
    Spawn {
        /// The sandbox name.
        sandbox: String,
        /// The command line.
        argv: Vec<String>,
        /// The whole environment.
        env: Vec<(String, String)>,
        /// The working directory inside the sandbox.
        cwd: PathBuf,
        /// Whether a stdin pipe is passed.
        stdin: bool,
    },
    /// Undo `AddSandbox` (the daemon already killed the sandbox's processes).
    RemoveSandbox {
        /// The sandbox name.
        sandbox: String,
    },
    /// The sandboxes init knows, with their anchors (for a re-adopting daemon).
    ListSandboxes,
    /// The tree's anchor (started on the first request): a process with a sandbox's
    /// capabilities whose root is the tree's root, so that any process of the tree can
    /// name that root as `/proc/<pid>/root` (DeltaCR moves templates there, out of a
    /// sandbox view that dies with the daemon that serves it).
    TreeAnchor,
    /// Start a *holder*: a process with a sandbox's capabilities, at the tree's root,
    /// holding the attached fds at 3, 4, … so that any process of the tree can open
    /// them as `/proc/<holder>/fd/<n>` (how the daemon hands files to templates).
    Hold,
    /// Start a *husk* in a sandbox: a process that joins the sandbox's `work/` cgroup
    /// and limit cgroups, leads its own session, has `/dev/null` as stdio, is chrooted
    /// into the sandbox's root with a sandbox's capabilities, and sleeps: DeltaCR turns
    /// it into a process restored from its dump (`cr::husk`). It runs no code of the
    /// sandbox. Reply: `Spawned`, its pidfd attached.
    Husk {
        /// The sandbox name.
        sandbox: String,
    },
    /// Kill a holder started by `Hold`.
    Release {
        /// The holder's ns pid.
        pid: i32,
    },
    /// Liveness check.
    Ping,
}

/// A request with its id.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RequestMsg {
    /// Matches the reply.
    pub id: u64,
    /// What is asked.
    pub req: Request,
}

/// A successful reply's content.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ReplyData {
    /// Done.
    Done,
    /// The sandbox's anchor runs with this ns pid.
    Anchor(i32),
    /// The command runs with this ns pid; its pidfd is attached.
    Spawned(i32),
    /// The sandboxes and their anchors' ns pids.
    Sandboxes(Vec<(String, i32)>),
}

/// A message from init (or from its host-side shim: `Hello`).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum FromInit {
    /// From the host-side shim: the host pid of the tree's pid 1.
    Hello {
        /// Host pid of pid 1.
        init_host_pid: i32,
    },
    /// Init finished setting up its namespaces and serves requests.
    Ready,
    /// From a spawned child itself, before its exec: the daemon learns the child's
    /// host pid from the message's `SCM_CREDENTIALS` (translated by the kernel).
    Started {
        /// The spawn request's id.
        id: u64,
    },
    /// Init could not set up; it exits.
    SetupFailed {
        /// What failed.
        error: String,
    },
    /// The answer to request `id`.
    Reply {
        /// The request's id.
        id: u64,
        /// Its outcome: data, or an error naming the problem.
        result: Result<ReplyData, String>,
    },
    /// A child of init was reaped.
    Exit {
        /// Its pid in the tree's namespace.
        ns_pid: i32,
        /// How it ended.
        status: ExitStatus,
    },
}

/// Why a message could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The socket call failed.
    #[error("control socket: {0}")]
    Socket(#[from] nix::Error),
    /// The peer closed the socket.
    #[error("control socket closed by the peer")]
    Closed,
    /// The datagram is not a valid message.
    #[error("bad message on the control socket: {0}")]
    Decode(#[from] serde_json::Error),
    /// The message was cut (longer than the receive buffer).
    #[error("message on the control socket longer than {MAX_MSG} bytes")]
    Truncated,
}

/// Sends `msg` with `fds` as one datagram.
pub(crate) fn send<T: Serialize>(sock: RawFd, msg: &T, fds: &[RawFd]) -> Result<(), ProtoError> {
    let bytes = serde_json::to_vec(msg)?;
    let iov = [IoSlice::new(&bytes)];
    let cmsgs = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsgs };
    sendmsg::<()>(sock, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// A received message, its fds, and the sender's pid in the receiver's pid namespace
/// (when the socket has `SO_PASSCRED`).
pub(crate) type Received<T> = (T, Vec<OwnedFd>, Option<i32>);

/// Receives one datagram: its message, the fds that came with it, the sender's pid.
pub(crate) fn recv<T: for<'de> Deserialize<'de>>(
    sock: RawFd,
    buf: &mut [u8],
) -> Result<Received<T>, ProtoError> {
    let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_FDS], nix::sys::socket::UnixCredentials);
    let mut sender = None;
    let (len, fds, truncated) = {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = loop {
            match recvmsg::<()>(
                sock,
                &mut iov,
                Some(&mut cmsg_buf),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(nix::Error::EINTR) => continue,
                other => break other?,
            }
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            match c {
                ControlMessageOwned::ScmRights(raw) => {
                    // SAFETY: SCM_RIGHTS just installed these fds in this process;
                    // each is owned exactly once here.
                    fds.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
                ControlMessageOwned::ScmCredentials(cred) => sender = Some(cred.pid()),
                _ => {}
            }
        }
        (
            msg.bytes,
            fds,
            msg.flags
                .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC),
        )
    };
    if truncated {
        return Err(ProtoError::Truncated);
    }
    if len == 0 {
        return Err(ProtoError::Closed);
    }
    Ok((serde_json::from_slice(&buf[..len])?, fds, sender))
}
