//! The daemon: configuration, start-up checks, and the run loop that serves the API on
//! a Unix socket and `/metrics` on loopback TCP until SIGTERM or SIGINT.
//!
//! Start-up order matters: the socket is claimed before any eBPF work, so a second
//! daemon fails on the socket and never replaces the pins the first one is using.

pub mod socket;

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::api::server::{api_router, metrics_router};
use crate::api::service::{ApiService, DaemonInfo, ServedSandboxes};
use crate::bpf::{
    AttachedProgram, BpfError, CowFaultCounter, Origin, PinnedFaults, PinnedTracker, WriteTracker,
};
use crate::cgroup::{CgroupError, CgroupFs};
use crate::metrics::{Metrics, MetricsError};
use crate::sandbox::{ManagerConfig, SandboxError, SandboxManager};

pub use socket::{ApiSocket, SocketFile};

/// Default metrics address.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9477";

/// How long in-flight requests may take to finish after a stop signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Errors of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Not running as root.
    #[error("deltaboxd must run as root (it loads eBPF programs and reads cgroups)")]
    NotRoot,
    /// A live process accepts connections on the socket path.
    #[error(
        "{} is in use by another process ({}): stop it or pass another --socket",
        path.display(),
        pid.map_or_else(|| "pid unknown".to_owned(), |p| format!("pid {p}"))
    )]
    SocketInUse {
        /// The socket path.
        path: PathBuf,
        /// The owner's pid, from `SO_PEERCRED`.
        pid: Option<i32>,
    },
    /// Something that is not a socket is at the socket path.
    #[error("{} exists and is not a socket: remove it or pass another --socket", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The socket's directory could not be created.
    #[error("cannot create socket directory {}", path.display())]
    SocketDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Checking or removing what is at the socket path failed.
    #[error("cannot check the existing socket {}", path.display())]
    SocketProbe {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Binding the socket failed.
    #[error("cannot bind the API socket {}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The metrics address does not parse.
    #[error("invalid metrics address {addr:?}: expected IP:PORT, such as 127.0.0.1:9477")]
    InvalidMetricsAddr {
        /// What was given.
        addr: String,
    },
    /// The metrics address is not loopback.
    #[error(
        "metrics address {addr} is not a loopback address: /metrics is unauthenticated, \
         bind it to 127.0.0.1 or [::1] (and let a local agent forward it)"
    )]
    MetricsNotLoopback {
        /// The address.
        addr: SocketAddr,
    },
    /// The API's TCP address does not parse.
    #[error("invalid API TCP address {addr:?}: expected IP:PORT, such as 127.0.0.1:9478")]
    InvalidApiTcpAddr {
        /// What was given.
        addr: String,
    },
    /// The API's TCP address is not loopback.
    #[error(
        "API TCP address {addr} is not a loopback address: the API is unauthenticated, \
         bind it to 127.0.0.1 or [::1]"
    )]
    ApiTcpNotLoopback {
        /// The address.
        addr: SocketAddr,
    },
    /// Binding the API's TCP address failed.
    #[error("cannot listen on API TCP address {addr}")]
    ApiTcpBind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Binding the metrics address failed.
    #[error("cannot listen on metrics address {addr}")]
    MetricsBind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Loading or adopting the programs failed.
    #[error("cannot {action} the eBPF programs under {}", pin_dir.display())]
    Bpf {
        /// `load`, `adopt`, `load or adopt`, `unload`.
        action: &'static str,
        /// The pin directory.
        pin_dir: PathBuf,
        /// Why (boxed: aya's errors are large and this travels in every `Result`).
        #[source]
        source: Box<BpfError>,
    },
    /// The cgroup2 mount could not be found.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The metrics could not be set up.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// Installing the signal handlers failed.
    #[error("cannot install the SIGTERM/SIGINT handlers")]
    Signals(#[source] io::Error),
    /// The sandbox manager (DeltaFS store, tree database) could not be opened.
    #[error("cannot open the sandbox store under {}", data_dir.display())]
    Sandboxes {
        /// `--data-dir`.
        data_dir: PathBuf,
        /// Why.
        #[source]
        source: SandboxError,
    },
}

impl DaemonError {
    /// The process exit code for this error (sysexits.h values), documented in
    /// `docs/cli.md`.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NotRoot => 77,
            Self::SocketInUse { .. } => 75,
            Self::InvalidMetricsAddr { .. }
            | Self::MetricsNotLoopback { .. }
            | Self::InvalidApiTcpAddr { .. }
            | Self::ApiTcpNotLoopback { .. } => 64,
            Self::Bpf { .. } | Self::Cgroup(_) | Self::Sandboxes { .. } => 69,
            Self::NotASocket { .. }
            | Self::SocketDir { .. }
            | Self::SocketProbe { .. }
            | Self::Bind { .. }
            | Self::MetricsBind { .. }
            | Self::ApiTcpBind { .. } => 73,
            Self::Metrics(_) | Self::Signals(_) => 70,
        }
    }
}

/// What `deltaboxd serve` was asked to do.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The API's Unix socket.
    pub socket: PathBuf,
    /// Loopback address of `/metrics`.
    pub metrics_addr: SocketAddr,
    /// Loopback address where the API is served over TCP too (off when `None`).
    pub api_tcp: Option<SocketAddr>,
    /// Pin directory of the eBPF objects.
    pub pin_dir: PathBuf,
    /// Only adopt pinned programs; never load.
    pub adopt_only: bool,
    /// Unload the programs at exit instead of leaving them pinned.
    pub unload_on_exit: bool,
    /// Where sandboxes keep their state; `None`: no sandboxes (their routes answer 503).
    pub sandboxes: Option<ManagerConfig>,
    /// Whether rollbacks warm up unless their request says otherwise.
    pub warm_up: bool,
}

/// Fails unless the effective uid is 0.
pub fn require_root() -> Result<(), DaemonError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(DaemonError::NotRoot)
    }
}

/// Parses a metrics address and checks that it is loopback (`localhost:PORT` is
/// taken as `127.0.0.1:PORT`).
pub fn parse_metrics_addr(text: &str) -> Result<SocketAddr, DaemonError> {
    let addr = parse_addr(text).ok_or_else(|| DaemonError::InvalidMetricsAddr {
        addr: text.to_owned(),
    })?;
    if !addr.ip().is_loopback() {
        return Err(DaemonError::MetricsNotLoopback { addr });
    }
    Ok(addr)
}

/// Parses the API's TCP address and checks that it is loopback, as
/// [`parse_metrics_addr`] does.
pub fn parse_api_tcp_addr(text: &str) -> Result<SocketAddr, DaemonError> {
    let addr = parse_addr(text).ok_or_else(|| DaemonError::InvalidApiTcpAddr {
        addr: text.to_owned(),
    })?;
    if !addr.ip().is_loopback() {
        return Err(DaemonError::ApiTcpNotLoopback { addr });
    }
    Ok(addr)
}

/// `IP:PORT`, or `localhost:PORT` for `127.0.0.1:PORT`.
fn parse_addr(text: &str) -> Option<SocketAddr> {
    match text.strip_prefix("localhost:") {
        Some(port) => Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            port.parse().ok()?,
        )),
        None => text.parse().ok(),
    }
}

/// Resolves on SIGTERM or SIGINT with the signal's name. The handlers are installed
/// when this is called, not when the future is first polled.
pub fn stop_signal() -> Result<impl Future<Output = &'static str>, DaemonError> {
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

/// `deltaboxd serve`: claims the socket, loads or adopts the programs, serves until
/// SIGTERM or SIGINT, then removes the socket and leaves the programs pinned (or
/// unloads them with `unload_on_exit`).
pub async fn run(config: ServeConfig) -> Result<(), DaemonError> {
    require_root()?;
    let stop = stop_signal()?;
    let cgroups = CgroupFs::from_mountinfo()?;
    let socket = ApiSocket::claim(&config.socket)?;
    let metrics_listener = TcpListener::bind(config.metrics_addr)
        .await
        .map_err(|source| DaemonError::MetricsBind {
            addr: config.metrics_addr,
            source,
        })?;
    let api_tcp = match config.api_tcp {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::ApiTcpBind { addr, source })?,
        ),
        None => None,
    };

    let pin_dir = config.pin_dir.as_path();
    let (tracker, origin) = if config.adopt_only {
        let tracker = PinnedTracker::adopt(pin_dir).map_err(bpf_error("adopt", pin_dir))?;
        (tracker, Origin::Adopted)
    } else {
        PinnedTracker::load_or_adopt(pin_dir).map_err(bpf_error("load or adopt", pin_dir))?
    };
    let origin_name = match origin {
        Origin::Loaded => "loaded",
        Origin::Adopted => "adopted",
    };
    tracing::info!(pin_dir = %pin_dir.display(), origin = origin_name, "eBPF programs ready");
    let log_task = match tracker.logger() {
        Ok(logger) => Some(tokio::spawn(forward_bpf_logs(logger))),
        Err(err) => {
            tracing::warn!(error = %err, "eBPF log records will not be forwarded");
            None
        }
    };

    let manager = match config.sandboxes.clone() {
        Some(cfg) => {
            let data_dir = cfg.data_dir.clone();
            let opened = tokio::task::spawn_blocking(move || SandboxManager::open(cfg))
                .await
                .map_err(|e| DaemonError::Sandboxes {
                    data_dir: data_dir.clone(),
                    source: SandboxError::internal("opening the sandbox manager", e),
                })?;
            let manager = opened.map_err(|source| DaemonError::Sandboxes { data_dir, source })?;
            tracing::info!(data_dir = %manager.config().data_dir.display(), "sandboxes ready");
            let manager = Arc::new(manager);
            if let Err(e) = manager.start_rerooting() {
                tracing::warn!("deep lineages will not be re-rooted: {e}");
            }
            Some(manager)
        }
        None => None,
    };

    let tracker: Arc<dyn WriteTracker> = Arc::new(tracker);
    // Loaded with the write tracker: a daemon without them still serves the rest.
    let cow = match PinnedFaults::adopt(pin_dir) {
        Ok(faults) => Some(CowConfig {
            faults: Arc::new(faults),
            warm_up: config.warm_up,
        }),
        Err(e) => {
            tracing::warn!(error = %e, "copy-on-write faults are not counted, no warm-up");
            None
        }
    };
    let result = serve(
        socket,
        metrics_listener,
        api_tcp,
        tracker,
        cgroups,
        origin,
        pin_dir,
        manager.clone().map(|m| m as Arc<dyn ServedSandboxes>),
        cow,
        stop,
    )
    .await;
    if let Some(manager) = manager {
        // The last reference: its drop tears every sandbox and tree down (processes,
        // views, cgroups), blocking work. Another holder would drop it later, on a
        // thread the process's exit may cut short.
        let others = Arc::strong_count(&manager) - 1;
        if others > 0 {
            tracing::warn!(others, "the sandbox manager is still referenced at exit");
        }
        let _ = tokio::task::spawn_blocking(move || drop(manager)).await;
    }
    if let Some(task) = log_task {
        task.abort();
    }
    if config.unload_on_exit {
        let unpinned = crate::bpf::unload(pin_dir).map_err(bpf_error("unload", pin_dir))?;
        tracing::info!(count = unpinned.len(), pin_dir = %pin_dir.display(), "eBPF programs unloaded");
    } else {
        tracing::info!(pin_dir = %pin_dir.display(), "eBPF programs left pinned");
    }
    result
}

/// The copy-on-write fault counter and the warm-up default of [`serve`].
pub struct CowConfig {
    /// The counter.
    pub faults: Arc<dyn CowFaultCounter>,
    /// Whether rollbacks warm up unless their request says otherwise.
    pub warm_up: bool,
}

/// Serves the API on `socket` and `/metrics` on `metrics_listener` over `tracker`
/// until `stop` resolves; then stops accepting, removes the socket file, and waits a
/// little for requests in flight.
// Each argument is an independent piece the caller made (tests make fakes of some).
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    socket: ApiSocket,
    metrics_listener: TcpListener,
    api_tcp: Option<TcpListener>,
    tracker: Arc<dyn WriteTracker>,
    cgroups: CgroupFs,
    origin: Origin,
    pin_dir: &Path,
    sandboxes: Option<Arc<dyn ServedSandboxes>>,
    cow: Option<CowConfig>,
    stop: impl Future<Output = &'static str>,
) -> Result<(), DaemonError> {
    let metrics_addr =
        metrics_listener
            .local_addr()
            .map_err(|source| DaemonError::MetricsBind {
                addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
                source,
            })?;
    let info = DaemonInfo {
        socket: socket.path().to_path_buf(),
        metrics_addr: metrics_addr.to_string(),
        pin_dir: pin_dir.to_path_buf(),
        origin,
        started: Instant::now(),
    };
    let mut service = ApiService::new(tracker, cgroups, Metrics::new()?, info);
    if let Some(cow) = cow {
        service = service.with_cow_faults(cow.faults, cow.warm_up);
    }
    if let Some(ops) = sandboxes {
        service = service.with_sandboxes(ops);
    }
    let service = Arc::new(service);
    let (listener, socket_file) = socket.into_tokio()?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        // An error means the sender is gone: stop as well.
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let api = tokio::spawn(
        axum::serve(listener, api_router(service.clone()))
            .with_graceful_shutdown(stopped(stop_rx.clone()))
            .into_future(),
    );
    let api_tcp = match api_tcp {
        Some(tcp) => {
            let addr = tcp.local_addr().ok();
            let task = tokio::spawn(
                axum::serve(tcp, api_router(service.clone()))
                    .with_graceful_shutdown(stopped(stop_rx.clone()))
                    .into_future(),
            );
            tracing::info!(addr = ?addr, "API also served over TCP (loopback)");
            Some(task)
        }
        None => None,
    };
    let metrics = tokio::spawn(
        axum::serve(metrics_listener, metrics_router(service))
            .with_graceful_shutdown(stopped(stop_rx))
            .into_future(),
    );
    println!(
        "listening on {} (API) and http://{metrics_addr}/metrics (metrics), pid {}",
        socket_file.path().display(),
        std::process::id()
    );
    tracing::info!(socket = %socket_file.path().display(), %metrics_addr, "listening");

    let signal = stop.await;
    tracing::info!(signal, "stopping");
    let _ = stop_tx.send(true);
    socket_file.remove();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let tasks = [
            ("api", Some(api)),
            ("api over tcp", api_tcp),
            ("metrics", Some(metrics)),
        ];
        for (name, task) in tasks
            .into_iter()
            .filter_map(|(name, task)| Some((name, task?)))
        {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::error!(server = name, error = %err, "server failed"),
                Err(err) => tracing::error!(server = name, error = %err, "server task failed"),
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            grace_secs = SHUTDOWN_GRACE.as_secs(),
            "requests still in flight after the grace period: dropped"
        );
    }
    Ok(())
}

/// `deltaboxd load`: loads, attaches and pins the programs; returns what is attached.
pub fn load(pin_dir: &Path) -> Result<Vec<AttachedProgram>, DaemonError> {
    require_root()?;
    let tracker = PinnedTracker::load(pin_dir).map_err(bpf_error("load", pin_dir))?;
    tracker.attached().map_err(bpf_error("list", pin_dir))
}

/// `deltaboxd unload`: detaches and unpins everything; returns the removed pins.
pub fn unload(pin_dir: &Path) -> Result<Vec<PathBuf>, DaemonError> {
    require_root()?;
    crate::bpf::unload(pin_dir).map_err(bpf_error("unload", pin_dir))
}

fn bpf_error(action: &'static str, pin_dir: &Path) -> impl Fn(BpfError) -> DaemonError {
    let pin_dir = pin_dir.to_path_buf();
    move |source| DaemonError::Bpf {
        action,
        pin_dir: pin_dir.clone(),
        source: Box::new(source),
    }
}

/// Forwards the programs' aya-log records into `log` (and so into `tracing`) as the
/// ring buffer fills: aya's logger emits nothing until `flush()`.
async fn forward_bpf_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the fd is the logger's ring-buffer map, owned by the logger for its whole
    // life (`flush()` reads the buffer, it never replaces or closes the fd), and the
    // logger is moved into the AsyncFd, so the fd stays open and the same while it is
    // registered.
    let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(err) => {
            tracing::warn!(error = %err, "cannot poll the eBPF log ring buffer");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(guard) => guard,
            Err(err) => {
                tracing::warn!(error = %err, "eBPF log ring buffer failed");
                return;
            }
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests;
