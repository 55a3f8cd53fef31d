//! The daemon: one process that supervises many services and watches
//! processes it did not start, from one configuration. `watchdog run` runs
//! it from a file; `watchdog supervise` runs it with one service given on
//! the command line. Start-up shields the daemon (oom_score_adj, locked
//! memory, priority), takes the state directory's lock, deals with the runs
//! a killed predecessor left, opens the sensor and the services' cgroups;
//! then the one service loop runs until SIGTERM / SIGINT (SIGHUP reloads).

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use anyhow::Context;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    auditlog::AuditLog,
    cgroup::Containment,
    cmd::CliError,
    config::{self, DaemonConfig, DaemonSection, Orphans},
    notify::Notifier,
    protect::{self, Protection},
    runner,
    sensor::{Sensor, SensorChoice},
    service::{self, Control, Outcome, Services, host::Host},
    state::{self, StateDir, Swept},
};

/// How the daemon was started.
#[derive(Clone, Debug)]
pub enum Mode {
    /// `watchdog run`: until told to stop; SIGHUP reloads `file` (with the
    /// command line's overrides applied again).
    Daemon { file: PathBuf, overrides: Overrides },
    /// `watchdog supervise`: until its one service ends; SIGHUP reopens the
    /// audit log. Whether a state directory and an audit file were given.
    Supervise { state_dir: bool, audit_log: bool },
}

/// Command-line settings that win over the file's.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub state_dir: Option<PathBuf>,
    pub audit_log: Option<PathBuf>,
    pub sensor: Option<crate::sensor::SensorChoice>,
}

impl Overrides {
    pub fn apply(&self, daemon: &mut DaemonSection) {
        if let Some(dir) = &self.state_dir {
            daemon.state_dir.clone_from(dir);
        }
        if let Some(log) = &self.audit_log {
            daemon.audit_log.clone_from(log);
        }
        if let Some(sensor) = self.sensor {
            daemon.sensor = sensor;
        }
    }
}

/// Loads a configuration file with the overrides applied, its markers
/// under the (possibly overridden) state directory.
pub fn load(file: &Path, overrides: &Overrides) -> Result<DaemonConfig, config::ConfigError> {
    let mut config = config::load(file)?;
    let mut daemon = config.daemon.clone();
    overrides.apply(&mut daemon);
    conform(&mut config, &daemon);
    Ok(config)
}

/// Makes the services follow `daemon` (the file's section with the
/// overrides, or on reload the running one): markers without a
/// `marker-file` under its marker directory, runs outliving a killed
/// daemon only when it adopts them.
fn conform(config: &mut DaemonConfig, daemon: &DaemonSection) {
    let (old, new) = (config.daemon.marker_dir(), daemon.marker_dir());
    for service in &mut config.services {
        if let Some(marker) = &mut service.marker
            && let Ok(name) = marker.path.strip_prefix(&old)
        {
            marker.path = new.join(name);
        }
        if let service::Target::Spawn(spec) = &mut service.target {
            spec.outlive_supervisor = daemon.orphans == Orphans::Adopt;
        }
    }
    config.daemon = daemon.clone();
}

/// Runs the daemon until it is told to stop (or, supervising one service,
/// until that ends).
pub async fn run(config: DaemonConfig, mode: Mode) -> Result<ExitCode, CliError> {
    let daemon = config.daemon.clone();
    let is_daemon = matches!(mode, Mode::Daemon { .. });
    let notifier = crate::notify::shared();
    // Signals are caught from the start: a SIGTERM during start-up (the
    // orphan sweep, loading the kernel programs) stops the daemon cleanly
    // once its loop runs, instead of killing it half-started.
    let (control, mut controls) = mpsc::unbounded_channel();
    let signals = listen(mode.clone(), daemon.clone(), control, notifier.clone())
        .context("failed to handle signals")?;

    let with_state = match mode {
        Mode::Daemon { .. } => true,
        Mode::Supervise { state_dir, .. } => state_dir,
    };
    let state = if with_state {
        Some(StateDir::open(&daemon.state_dir).map_err(|e| CliError::Usage(e.to_string()))?)
    } else {
        None
    };
    // Held until the daemon exits: a second instance on the same state
    // directory refuses to start.
    let _lock = match &state {
        Some(state) => Some(state.lock().map_err(|e| CliError::Failed(e.into()))?),
        None => None,
    };
    // The status socket and the HTTP listener answer from here on: start-up
    // (its orphan sweep waits up to orphan-grace) is healthy for
    // health-timeout plus orphan-grace, then a heartbeat older than
    // health-timeout makes /healthz fail.
    let (telemetry, queries) = crate::observe::Telemetry::new(
        daemon.health_timeout,
        daemon
            .health_timeout
            .saturating_add(daemon.orphan_grace)
            .saturating_add(std::time::Duration::from_secs(1)),
    );
    let _observers = crate::observe::start(
        telemetry.clone(),
        &crate::observe::Endpoints {
            state_dir: state.as_ref().map(|s| s.path().to_owned()),
            listen: daemon.listen,
        },
    )
    .map_err(|e| match e {
        crate::observe::ObserveError::Socket { .. } => CliError::Usage(e.to_string()),
        e => CliError::Failed(e.into()),
    })?;
    match daemon.listen {
        Some(addr) if !addr.ip().to_canonical().is_loopback() => warn!(
            address = %addr,
            "serving /healthz and /metrics where other hosts can reach them (allow-remote = true)"
        ),
        Some(addr) => info!(address = %addr, "serving /healthz and /metrics"),
        None => {}
    }
    if telemetry.stall_allowed() {
        warn!(
            "{} is set: the status socket's owner can block the service loop (for tests only)",
            crate::observe::STALL_ENV
        );
    }
    // Telemetry only, on a thread of its own: it never blocks the loop.
    let memory_monitor = {
        let telemetry = telemetry.clone();
        match crate::hostmem::spawn(
            daemon.host_memory_warn,
            daemon.host_memory_recovery(),
            daemon.host_memory_interval,
            move |memory| telemetry.set_memory(memory),
        ) {
            Ok(monitor) => Some(monitor),
            Err(e) => {
                warn!(error = %e, "cannot watch the host's memory");
                None
            }
        }
    };
    if is_daemon {
        let markers = daemon.marker_dir();
        std::fs::create_dir_all(&markers)
            .with_context(|| format!("cannot create the marker directory {}", markers.display()))?;
    }

    let audit = match mode {
        Mode::Supervise {
            audit_log: false, ..
        } => {
            let audit = AuditLog::default_stdout().context("failed to use standard output")?;
            if audit.is_on() {
                // Standard output carries whole audit lines and nothing
                // else: the service's goes to standard error (unless JSON
                // logs forward it already).
                crate::output::set(crate::output::ChildOutput::StdoutToStderr);
                if crate::output::mode() == crate::output::ChildOutput::StdoutToStderr {
                    info!(
                        "standard output carries the audit lines: the service's own standard \
                         output goes to standard error (pass --audit-log FILE to keep it)"
                    );
                }
            }
            audit
        }
        _ => {
            if is_daemon && let Some(dir) = daemon.audit_log.parent() {
                create_private_dir(dir)?;
            }
            // A refused file (a symlink, not ours, writable by others) is
            // a usage error: exit 2.
            AuditLog::file(&daemon.audit_log, daemon.audit_fsync)?
        }
    };

    let mut choice = daemon.sensor;
    if crate::procs::in_child_pid_namespace() {
        // The kernel programs name processes by the host's pids, which this
        // namespace does not show.
        if choice == SensorChoice::Ebpf {
            let (asked, instead) = if is_daemon {
                ("sensor = \"ebpf\"", "sensor = \"sampling\"")
            } else {
                ("--sensor ebpf", "--sensor sampling")
            };
            return Err(CliError::Usage(format!(
                "{asked} cannot work in a pid namespace of its own (a container without \
                 hostPID): the kernel programs report host pids. Run with hostPID, or use \
                 {instead}"
            )));
        }
        warn!(
            "running in a pid namespace of its own (a container without hostPID): only this \
             namespace's processes can be supervised or watched, watch targets on the host \
             cannot be found, and memory is sampled (the kernel programs report host pids); \
             run with hostPID to watch the host"
        );
        choice = SensorChoice::Sampling;
    }
    let sensor = Sensor::open(choice, daemon.sampling()).context("cannot watch memory")?;
    let source = sensor.source();
    runner::become_subreaper();
    let mut host = Host::new(sensor, audit).context("failed to set up the supervisor")?;
    host.set_rescan(daemon.rescan);
    host.set_notifier(notifier.clone());
    // Nobody to read the heartbeat (supervise without a state directory):
    // the loop does not stamp it.
    if state.is_some() || daemon.listen.is_some() {
        host.set_telemetry(telemetry.clone(), queries);
    }

    // What a killed predecessor left running.
    let mut adopt = Vec::new();
    if let Some(state) = &state {
        let records = state.runs();
        if !records.is_empty() {
            match daemon.orphans {
                Orphans::Terminate => {
                    info!(
                        runs = records.len(),
                        "terminating the runs a previous instance left"
                    );
                    let swept = state::sweep(state, records, daemon.orphan_grace, 256).await;
                    for (record, outcome) in swept {
                        host.orphan_swept(&record, &outcome);
                    }
                }
                Orphans::Adopt => adopt = records,
            }
        }
    }

    if daemon.cgroups {
        // The pid alone is not unique: daemons in pid namespaces of their
        // own are all pid 1 and may share a cgroup parent.
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() ^ (d.as_secs() as u32));
        match Containment::open(&format!("watchdog-{}-{nonce:08x}", std::process::id())) {
            Ok(containment) => {
                // In a pid namespace of its own, another instance's pid does not
                // show: its empty cgroups are not ours to judge.
                let stale = if crate::procs::in_child_pid_namespace() {
                    0
                } else {
                    containment.remove_stale()
                };
                if stale > 0 {
                    info!(
                        removed = stale,
                        "removed the empty cgroups of instances that were killed"
                    );
                }
                info!(base = %containment.base().display(), "each service runs in a cgroup of its own");
                host.set_containment(containment);
            }
            Err(reason) => warn!(
                reason = %reason,
                "cannot create cgroups for the services; using process groups and the kernel's \
                 fork tracking instead (a process that calls setsid may escape a drain)"
            ),
        }
    }
    if let Some(state) = state {
        host.set_state(state);
    }

    // Last, once the kernel programs are loaded: locked memory cannot be
    // given back, so what start-up allocated for a moment (BTF, program
    // loading) is returned first.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
    let applied: Vec<String> = protect::apply(&Protection {
        oom_score_adj: daemon.oom_score_adj,
        mlock: daemon.mlock,
        nice: daemon.nice,
        realtime: daemon.realtime,
    })
    .iter()
    .map(ToString::to_string)
    .collect();
    info!(protection = %applied.join("; "), "shielding the daemon from what it watches");

    let mut services = Services::new(config.services);
    if is_daemon {
        services = services.keep_trying();
    }
    for record in adopt {
        host.adopt(&mut services, record);
    }
    info!(
        services = services.all().iter().filter(|s| !s.config().is_watch()).count(),
        watches = services.all().iter().filter(|s| s.config().is_watch()).count(),
        source = %source,
        "started"
    );
    let driven = service::drive(&mut services, &mut host, &mut controls, !is_daemon).await;
    telemetry.stopping();
    if let Some(monitor) = memory_monitor {
        let _ = monitor.stop();
    }
    signals.abort();
    notifier.stopping();
    let hooks: Vec<u32> = services.all().iter().flat_map(|s| s.hooks()).collect();
    runner::kill_descendants(50, &hooks);
    let stats = host.sensor().stats();
    info!(
        lost_audit_lines = host.audit().lost(),
        lost_log_lines = crate::cmd::log_lines_lost(),
        lost_events = stats.lost_events,
        unconfirmed_crossings = stats.unconfirmed_crossings,
        "stopped"
    );
    host.close();
    // The services' last lines, when the daemon reads them.
    crate::output::finish(std::time::Duration::from_millis(500));
    driven.map_err(|e| CliError::Failed(e.into()))?;
    if is_daemon {
        return Ok(ExitCode::SUCCESS);
    }
    let service = &services.all()[0];
    match service.outcome() {
        Some(Outcome::CannotStart(error)) => {
            let spec = match &service.config().target {
                service::Target::Spawn(spec) => Some(spec),
                service::Target::Watch(_) => None,
            };
            let argv0 = spec.map(|s| s.argv[0].clone()).unwrap_or_default();
            Err(CliError::Usage(match spec.and_then(|s| s.cwd.as_ref()) {
                Some(dir) => format!("failed to start {argv0:?} in {}: {error}", dir.display()),
                None => format!("failed to start {argv0:?}: {error}"),
            }))
        }
        Some(Outcome::GaveUp | Outcome::Failed) => Ok(ExitCode::FAILURE),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// Creates the audit log's directory (mode 0750) when missing.
fn create_private_dir(dir: &Path) -> Result<(), CliError> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
        .with_context(|| format!("cannot create the audit log directory {}", dir.display()))
        .map_err(CliError::Failed)
}

/// Turns signals into the loop's controls: SIGTERM / SIGINT stop, SIGHUP
/// reloads (the daemon) or reopens the audit log (supervise).
fn listen(
    mode: Mode,
    running: DaemonSection,
    control: mpsc::UnboundedSender<Control>,
    notifier: Arc<Notifier>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = sigterm.recv() => {}
                _ = sigint.recv() => {}
                _ = sighup.recv() => {
                    reload(&mode, &running, &control, &notifier).await;
                    continue;
                }
            }
            info!("stopping: draining every service");
            notifier.stopping();
            let _ = control.send(Control::Shutdown);
            return;
        }
    }))
}

async fn reload(
    mode: &Mode,
    running: &DaemonSection,
    control: &mpsc::UnboundedSender<Control>,
    notifier: &Notifier,
) {
    let Mode::Daemon { file, overrides } = mode else {
        // supervise: the same service; the audit log is reopened.
        let _ = control.send(Control::Reload {
            services: None,
            done: None,
        });
        return;
    };
    notifier.reloading();
    match load(file, overrides) {
        Ok(mut config) => {
            info!(file = %file.display(), "reloading the configuration");
            if config.daemon != *running {
                warn!(
                    "the [daemon] section changed: it applies when the daemon restarts; \
                     services and watch targets are reloaded now"
                );
                conform(&mut config, running);
            }
            let (done, applied) = tokio::sync::oneshot::channel();
            let _ = control.send(Control::Reload {
                services: Some(config.services),
                done: Some(done),
            });
            let _ = applied.await;
        }
        Err(e) => error!(
            error = %e,
            "the new configuration is refused; the running one stays in force"
        ),
    }
    notifier.ready();
}

impl Swept {
    /// The audit line's `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Gone => "gone",
            Self::PidReused => "pid_reused",
            Self::Terminated { killed: false, .. } => "terminated",
            Self::Terminated { killed: true, .. } => "killed",
            Self::Failed(_) => "failed",
        }
    }
}
