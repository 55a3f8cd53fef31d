//! What the daemon tells the outside: the status socket (`watchdog
//! status`), the optional HTTP listener (`/healthz`, `/metrics`) and the
//! telemetry they read.
//!
//! They run on a thread of their own with its own (single-threaded) tokio
//! runtime, so that a scrape never delays the service loop and a loop that
//! is stuck can still be reported as such. The loop stamps a heartbeat from
//! its own timer and publishes a snapshot of its services with it; a
//! request for the current state is answered by the loop itself when it
//! turns, and from the last snapshot when it does not (within a second).

mod http;
pub mod metrics;
mod socket;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, oneshot};

use crate::status::{Health, HostMemory, Snapshot};

/// How long a request waits for the loop before the last snapshot is used.
const LOOP_ANSWER: Duration = Duration::from_secs(1);

/// Requests within this time of a built snapshot share it: scrapers and
/// `watchdog status` callers, however many, ask the loop and read /proc
/// at most about four times a second.
const SHARED_FOR: Duration = Duration::from_millis(250);

/// How long the services' memory is read for before a snapshot goes out
/// without it (a process in uninterruptible sleep holds its /proc files).
const MEMORY_READ: Duration = Duration::from_secs(2);

/// Requests waiting in the loop's queue at most; more are answered from
/// the last snapshot (the loop is behind).
const QUERY_QUEUE: usize = 8;

/// The environment variable that lets a test block the loop through the
/// status socket (`stall MS`). Never set in production.
pub const STALL_ENV: &str = "WATCHDOG_TEST_STALL_LOOP";

/// The longest stall a test may ask for.
const STALL_MAX: Duration = Duration::from_secs(30);

/// What the outside asks of the loop.
#[derive(Debug)]
pub enum Query {
    /// The services as they are now.
    Snapshot(oneshot::Sender<Snapshot>),
    /// Block the loop this long (tests of the health check only).
    Stall(Duration),
}

/// Shared between the loop (which writes) and the observers (which read).
pub struct Telemetry {
    started: Instant,
    /// A heartbeat older than this is unhealthy.
    threshold: Duration,
    /// When the loop last stamped its heartbeat, in ns since `started`
    /// (`u64::MAX`: never).
    heartbeat_ns: AtomicU64,
    lag_us: AtomicU64,
    lag_max_us: AtomicU64,
    /// How long start-up may take before the first heartbeat (the orphan
    /// sweep's grace included) without being unhealthy.
    startup: Duration,
    /// Why the sensor stopped working, once it has.
    sensor_failure: Mutex<Option<String>>,
    /// The loop's last published snapshot (health and memory filled in
    /// when read).
    published: Mutex<Snapshot>,
    memory: Mutex<Option<HostMemory>>,
    /// Kernel crossing -> exact confirmation.
    pub detection: Histogram,
    /// Kernel crossing -> drain (or memory) signal sent.
    pub crossing_to_signal: Histogram,
    queries: mpsc::Sender<Query>,
    /// The last snapshot built for a request, and when; held while one is
    /// built, so that one is built at a time.
    built: tokio::sync::Mutex<Option<(tokio::time::Instant, Snapshot)>>,
    /// A memory reading has not come back (stuck on a process in
    /// uninterruptible sleep): no other is started meanwhile.
    reading: Arc<AtomicBool>,
    /// Whether `stall` requests are honoured.
    stall_allowed: bool,
    stopping: AtomicBool,
}

/// Buckets of the latency histograms, in seconds: 50 µs (a kernel
/// crossing confirmed) to 10 minutes (a drain after a long `over-for` or
/// `startup-grace`).
const LATENCY_BUCKETS: [f64; 22] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

impl Telemetry {
    /// Telemetry for a daemon whose heartbeat must be younger than
    /// `threshold` once its loop runs, and which may take `startup` to get
    /// there; the receiver is the loop's end of the query channel.
    pub fn new(threshold: Duration, startup: Duration) -> (Arc<Self>, mpsc::Receiver<Query>) {
        let (queries, rx) = mpsc::channel(QUERY_QUEUE);
        let telemetry = Self {
            started: Instant::now(),
            threshold,
            startup: startup.max(threshold),
            heartbeat_ns: AtomicU64::new(u64::MAX),
            lag_us: AtomicU64::new(0),
            lag_max_us: AtomicU64::new(0),
            sensor_failure: Mutex::new(None),
            // Until the loop publishes its own: who is starting.
            published: Mutex::new(Snapshot {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                pid: std::process::id(),
                ..Snapshot::default()
            }),
            memory: Mutex::new(None),
            detection: Histogram::new(LATENCY_BUCKETS),
            crossing_to_signal: Histogram::new(LATENCY_BUCKETS),
            queries,
            built: tokio::sync::Mutex::new(None),
            reading: Arc::new(AtomicBool::new(false)),
            stall_allowed: std::env::var_os(STALL_ENV).is_some_and(|v| v == "1"),
            stopping: AtomicBool::new(false),
        };
        (Arc::new(telemetry), rx)
    }

    /// Called from the loop's own timer: it turns. `lag` is how late the
    /// timer fired; `snapshot` is the services as they are.
    pub fn beat(&self, lag: Duration, snapshot: Snapshot) {
        let at = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.heartbeat_ns.store(at, Ordering::Release);
        let lag = u64::try_from(lag.as_micros()).unwrap_or(u64::MAX);
        self.lag_us.store(lag, Ordering::Relaxed);
        self.lag_max_us.fetch_max(lag, Ordering::Relaxed);
        *lock(&self.published) = snapshot;
    }

    /// The sensor failed for good: the daemon is unhealthy from now on.
    pub fn sensor_failed(&self, reason: &str) {
        *lock(&self.sensor_failure) = Some(reason.to_owned());
    }

    /// The daemon is stopping: requests are no longer sent to the loop.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// The memory monitor's last reading.
    pub fn set_memory(&self, memory: HostMemory) {
        *lock(&self.memory) = Some(memory);
    }

    /// Whether the loop has not stamped its first heartbeat yet.
    fn starting(&self) -> bool {
        self.heartbeat_ns.load(Ordering::Acquire) == u64::MAX
    }

    /// The loop's health now.
    pub fn health(&self) -> Health {
        let beat = self.heartbeat_ns.load(Ordering::Acquire);
        let now = self.started.elapsed();
        let starting = beat == u64::MAX;
        let age = if starting {
            now
        } else {
            now.saturating_sub(Duration::from_nanos(beat))
        };
        let sensor = lock(&self.sensor_failure).clone();
        let problem = if let Some(reason) = sensor {
            Some(format!("the sensor failed: {reason}"))
        } else if starting {
            (age > self.startup).then(|| {
                format!(
                    "start-up has taken {} and the service loop has not begun (allowed: {}, \
                     health-timeout plus orphan-grace)",
                    humantime::format_duration(Duration::from_millis(millis(age))),
                    humantime::format_duration(self.startup)
                )
            })
        } else if age > self.threshold {
            Some(format!(
                "the service loop has not turned for {} (more than health-timeout {})",
                humantime::format_duration(Duration::from_millis(millis(age))),
                humantime::format_duration(self.threshold)
            ))
        } else {
            None
        };
        Health {
            ok: problem.is_none(),
            starting,
            problem,
            heartbeat_age_ms: millis(age),
            loop_lag_us: self.lag_us.load(Ordering::Relaxed),
            loop_lag_max_us: self.lag_max_us.load(Ordering::Relaxed),
            threshold_ms: millis(self.threshold),
        }
    }

    /// The last published snapshot, with health and memory as they are now
    /// (charged memory as of its publication: not read again).
    pub fn last(&self) -> Snapshot {
        let mut snapshot = Snapshot {
            stale: !self.starting(),
            ..lock(&self.published).clone()
        };
        self.complete(&mut snapshot);
        snapshot
    }

    /// Fills in what the loop does not know: health, the host's memory.
    fn complete(&self, snapshot: &mut Snapshot) {
        snapshot.health = self.health();
        snapshot.uptime_ms = millis(self.started.elapsed());
        snapshot.log_lines_lost = crate::cmd::log_lines_lost();
        snapshot.memory = lock(&self.memory).clone();
    }

    /// The current state: asked of the loop, whose answer is completed
    /// with each tree's memory read now (off the loop); the last snapshot
    /// when the loop does not answer in time. Requests close together
    /// share one snapshot, built by one of them.
    pub async fn current(&self) -> Snapshot {
        let mut built = self.built.lock().await;
        let mut snapshot = match &*built {
            Some((at, snapshot)) if at.elapsed() < SHARED_FOR => snapshot.clone(),
            _ => {
                let snapshot = self.build().await;
                *built = Some((tokio::time::Instant::now(), snapshot.clone()));
                snapshot
            }
        };
        drop(built);
        self.complete(&mut snapshot);
        snapshot
    }

    async fn build(&self) -> Snapshot {
        if self.starting() {
            // No loop to ask yet: who is starting, and nothing more.
            return lock(&self.published).clone();
        }
        let (tx, rx) = oneshot::channel();
        let asked = !self.stopping.load(Ordering::Relaxed)
            && self.queries.try_send(Query::Snapshot(tx)).is_ok();
        let answer = if asked {
            tokio::time::timeout(LOOP_ANSWER, rx)
                .await
                .ok()
                .and_then(Result::ok)
        } else {
            None
        };
        let mut snapshot = match answer {
            Some(snapshot) => snapshot,
            // The loop is late: its last snapshot, with memory read now all
            // the same (of the processes that were there when it was
            // taken).
            None => Snapshot {
                stale: true,
                ..lock(&self.published).clone()
            },
        };
        let taken_ago = snapshot.stale.then(|| self.health().heartbeat_age_ms);
        if let Some(ago) = taken_ago {
            // Its times as they are now, not as they were then.
            for service in &mut snapshot.services {
                service.uptime_ms = service.uptime_ms.map(|up| up.saturating_add(ago));
                service.backoff_ms = service.backoff_ms.map(|left| left.saturating_sub(ago));
            }
        }
        let members: Vec<Vec<u32>> = snapshot
            .services
            .iter()
            .map(|s| s.members.clone())
            .collect();
        if self.reading.swap(true, Ordering::AcqRel) {
            tracing::debug!(
                "the services' memory is not read: an earlier reading has not come back"
            );
            return snapshot;
        }
        // Cleared however the reading ends (a panic, a task never run).
        struct Reading(Arc<AtomicBool>);
        impl Drop for Reading {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let reading = Reading(self.reading.clone());
        let read = tokio::task::spawn_blocking(move || {
            let _reading = reading;
            read_memory(&members, taken_ago.map(Duration::from_millis))
        });
        match tokio::time::timeout(MEMORY_READ, read).await {
            Ok(Ok(charged)) => {
                for (service, charged) in snapshot.services.iter_mut().zip(charged) {
                    service.charged_bytes = charged;
                }
            }
            Ok(Err(_)) => {}
            Err(_) => tracing::warn!(
                "reading the services' memory took more than {} (a process in uninterruptible \
                 sleep?): the status goes out without it",
                humantime::format_duration(MEMORY_READ)
            ),
        }
        snapshot
    }

    fn stall(&self, duration: Duration) -> bool {
        self.stall_allowed
            && duration <= STALL_MAX
            && self.queries.try_send(Query::Stall(duration)).is_ok()
    }

    /// Whether the test-only stall switch is on (said at start-up).
    pub fn stall_allowed(&self) -> bool {
        self.stall_allowed
    }
}

/// Each run's charged memory (the same measure as the sensor's
/// confirmations), by the members listed for it. With `taken_ago` (a
/// snapshot that old), a member younger than that is another process that
/// got a listed pid since, and is left out.
fn read_memory(members: &[Vec<u32>], taken_ago: Option<Duration>) -> Vec<Option<u64>> {
    members
        .iter()
        .map(|pids| {
            let pids: Vec<u32> = match taken_ago {
                None => pids.clone(),
                Some(ago) => pids
                    .iter()
                    .copied()
                    .filter(|&pid| {
                        crate::procs::stat(pid)
                            .is_some_and(|s| crate::state::age(s.start_time) >= ago)
                    })
                    .collect(),
            };
            if pids.is_empty() {
                return None;
            }
            let reading = crate::mem::read_tree(&pids);
            (!reading.members.is_empty()).then_some(reading.charged_bytes)
        })
        .collect()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A poisoned lock still holds usable telemetry.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where the observers listen.
#[derive(Clone, Debug, Default)]
pub struct Endpoints {
    /// The state directory, for the status socket.
    pub state_dir: Option<PathBuf>,
    /// The HTTP listener.
    pub listen: Option<SocketAddr>,
}

/// Why an observer could not start.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error(
        "cannot listen on {addr} for /healthz and /metrics: {error}; free the port or set another `listen`"
    )]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot create the status socket {path}: {error}")]
    Socket { path: PathBuf, error: String },
    #[error("cannot start the status thread: {0}")]
    Thread(std::io::Error),
}

/// The running observers; they stop when it is dropped (and with the
/// process).
pub struct Observers {
    /// The listeners' descriptors, kept from children.
    withheld: Vec<std::os::fd::RawFd>,
    socket: Option<PathBuf>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Observers {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        for &fd in &self.withheld {
            crate::runner::release(fd);
        }
        if let Some(path) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds the endpoints (an address in use is an error now, not later) and
/// serves them on a thread of their own.
pub fn start(telemetry: Arc<Telemetry>, endpoints: &Endpoints) -> Result<Observers, ObserveError> {
    let listener = match endpoints.listen {
        Some(addr) => Some(bind_tcp(addr).map_err(|error| ObserveError::Listen { addr, error })?),
        None => None,
    };
    let socket = match &endpoints.state_dir {
        Some(dir) => Some(socket::bind(dir)?),
        None => None,
    };
    let socket_path = socket.as_ref().map(|(_, path)| path.clone());
    use std::os::fd::AsRawFd;
    let withheld: Vec<std::os::fd::RawFd> = listener
        .iter()
        .map(AsRawFd::as_raw_fd)
        .chain(socket.iter().map(|(s, _)| s.as_raw_fd()))
        .collect();
    for &fd in &withheld {
        crate::runner::withhold(fd);
    }
    let (stop, stopped) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("watchdog-status".into())
        .spawn(move || serve(telemetry, listener, socket.map(|(s, _)| s), stopped))
        .map_err(ObserveError::Thread)?;
    Ok(Observers {
        withheld,
        socket: socket_path,
        stop: Some(stop),
        thread: Some(thread),
    })
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn serve(
    telemetry: Arc<Telemetry>,
    listener: Option<std::net::TcpListener>,
    socket: Option<std::os::unix::net::UnixListener>,
    stopped: oneshot::Receiver<()>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the status runtime: no status, /healthz or /metrics");
            return;
        }
    };
    runtime.block_on(async move {
        // One that cannot go on (it says why) leaves the other serving.
        let http = async {
            if let Some(listener) = listener {
                http::serve(telemetry.clone(), listener).await;
            }
            std::future::pending::<()>().await;
        };
        let status = async {
            if let Some(socket) = socket {
                socket::serve(telemetry.clone(), socket).await;
            }
            std::future::pending::<()>().await;
        };
        tokio::select! {
            () = async { tokio::join!(http, status); } => {}
            _ = stopped => {}
        }
    });
    // A reading stuck on a process in uninterruptible sleep must not hold
    // the daemon's exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
}

/// The state directory's status socket.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(crate::status::SOCKET)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The health check follows the heartbeat's age and the sensor, and
    /// remembers the worst lag.
    #[test]
    fn health_follows_the_heartbeat() {
        let (telemetry, _queries) =
            Telemetry::new(Duration::from_millis(200), Duration::from_millis(200));
        assert!(
            telemetry.health().ok,
            "start-up is healthy until the threshold"
        );
        telemetry.beat(Duration::from_micros(1500), Snapshot::default());
        telemetry.beat(Duration::from_micros(300), Snapshot::default());
        let health = telemetry.health();
        assert!(health.ok);
        assert_eq!((health.loop_lag_us, health.loop_lag_max_us), (300, 1500));
        std::thread::sleep(Duration::from_millis(250));
        let health = telemetry.health();
        assert!(!health.ok);
        assert!(health.heartbeat_age_ms >= 250, "{health:?}");
        assert!(
            health
                .problem
                .as_deref()
                .unwrap_or("")
                .contains("has not turned"),
            "{health:?}"
        );
        telemetry.beat(Duration::ZERO, Snapshot::default());
        assert!(telemetry.health().ok);
        telemetry.sensor_failed("the ring buffer is gone");
        let health = telemetry.health();
        assert!(!health.ok);
        assert!(health.problem.unwrap().contains("ring buffer is gone"));
    }

    /// Before the loop's first heartbeat: starting and healthy for the
    /// start-up allowance, then unhealthy; who is starting is told at once.
    #[tokio::test]
    async fn start_up_is_healthy_for_its_allowance() {
        let (telemetry, _queries) =
            Telemetry::new(Duration::from_millis(50), Duration::from_millis(1_500));
        let health = telemetry.health();
        assert!(health.ok && health.starting, "{health:?}");
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            telemetry.health().ok,
            "past health-timeout, within start-up"
        );
        let started = Instant::now();
        let snapshot = telemetry.current().await;
        assert!(started.elapsed() < LOOP_ANSWER, "no loop to wait for yet");
        assert_eq!(snapshot.pid, std::process::id());
        assert_eq!(snapshot.version, env!("CARGO_PKG_VERSION"));
        assert!(!snapshot.stale && snapshot.health.starting);
        std::thread::sleep(Duration::from_millis(1_500));
        let health = telemetry.health();
        assert!(!health.ok, "{health:?}");
        assert!(
            health
                .problem
                .unwrap_or_default()
                .contains("start-up has taken"),
            "{:?}",
            telemetry.health()
        );
        telemetry.beat(Duration::ZERO, Snapshot::default());
        let health = telemetry.health();
        assert!(health.ok && !health.starting, "{health:?}");
    }

    /// Many requests at once ask the loop once and share its answer.
    #[tokio::test(start_paused = true)]
    async fn requests_share_one_snapshot() {
        let (telemetry, mut queries) = Telemetry::new(Duration::from_secs(30), Duration::ZERO);
        telemetry.beat(Duration::ZERO, Snapshot::default());
        let asked = Arc::new(AtomicU64::new(0));
        let loop_side = {
            let asked = asked.clone();
            tokio::spawn(async move {
                while let Some(query) = queries.recv().await {
                    if let Query::Snapshot(reply) = query {
                        asked.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let _ = reply.send(Snapshot {
                            sensor: "procfs".into(),
                            ..Snapshot::default()
                        });
                    }
                }
            })
        };
        let requests: Vec<_> = (0..50)
            .map(|_| {
                let telemetry = telemetry.clone();
                tokio::spawn(async move { telemetry.current().await })
            })
            .collect();
        for request in requests {
            let snapshot = request.await.unwrap_or_default();
            assert_eq!(snapshot.sensor, "procfs");
            assert!(!snapshot.stale);
        }
        assert_eq!(asked.load(Ordering::Relaxed), 1);
        tokio::time::sleep(SHARED_FOR).await;
        let _ = telemetry.current().await;
        assert_eq!(
            asked.load(Ordering::Relaxed),
            2,
            "asked again once it is old"
        );
        loop_side.abort();
    }

    /// A stuck loop's queue does not grow with the requests: past its
    /// bound they are answered from the last snapshot at once.
    #[tokio::test(start_paused = true)]
    async fn a_stuck_loop_queue_is_bounded() {
        let (telemetry, queries) = Telemetry::new(Duration::from_secs(30), Duration::ZERO);
        telemetry.beat(Duration::ZERO, Snapshot::default());
        for _ in 0..(QUERY_QUEUE * 3) {
            let snapshot = telemetry.current().await;
            assert!(snapshot.stale);
            tokio::time::sleep(SHARED_FOR).await;
        }
        assert_eq!(queries.len(), QUERY_QUEUE);
        let started = tokio::time::Instant::now();
        let _ = telemetry.current().await;
        assert!(
            started.elapsed() < LOOP_ANSWER,
            "a full queue is not waited on"
        );
    }

    /// A stale snapshot's uptimes and backoffs are brought up to now.
    #[tokio::test]
    async fn a_stale_snapshot_tells_the_times_of_now() {
        let (telemetry, _queries) = Telemetry::new(Duration::from_secs(30), Duration::ZERO);
        let published = Snapshot {
            services: vec![crate::status::ServiceStatus {
                uptime_ms: Some(5_000),
                backoff_ms: Some(200),
                ..crate::status::ServiceStatus::default()
            }],
            ..Snapshot::default()
        };
        telemetry.beat(Duration::ZERO, published);
        std::thread::sleep(Duration::from_millis(300));
        let snapshot = telemetry.current().await;
        assert!(snapshot.stale);
        let service = &snapshot.services[0];
        assert!(service.uptime_ms >= Some(5_300), "{service:?}");
        assert_eq!(service.backoff_ms, Some(0), "{service:?}");
    }

    /// A loop that does not answer: the last snapshot, after a second.
    #[tokio::test(start_paused = true)]
    async fn a_silent_loop_gets_the_last_snapshot() {
        let (telemetry, _queries) = Telemetry::new(Duration::from_secs(30), Duration::ZERO);
        let published = Snapshot {
            sensor: "procfs".into(),
            services: vec![crate::status::ServiceStatus {
                uptime_ms: Some(5_000),
                ..crate::status::ServiceStatus::default()
            }],
            ..Snapshot::default()
        };
        telemetry.beat(Duration::ZERO, published);
        let started = tokio::time::Instant::now();
        let snapshot = telemetry.current().await;
        assert_eq!(snapshot.sensor, "procfs");
        assert!(snapshot.stale);
        assert_eq!(started.elapsed(), LOOP_ANSWER);
    }
}
