//! `watchdog supervise -- CMD ARGS...`: run one service in the foreground,
//! keep it under its memory budget, restart it by the policy, and write
//! every decision to the audit log.

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context;
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

use crate::{
    auditlog::AuditLog,
    cmd::CliError,
    event::rfc3339,
    exit::{ExitStatus, StatusFields},
    mem,
    policy::{
        Action, Cause, Config, Input, MemoryAction, MemoryPolicy, Policy, Record, RestartPolicy,
    },
    runner::{self, Run, RunExit, Spec, User},
    sensor::{GroupId, Limits, SensorArgs, SensorEvent, Source},
    size::Size,
};

/// Arguments of `watchdog supervise`.
#[derive(Debug, clap::Args)]
pub struct SuperviseArgs {
    /// The service's name in the audit log [default: the command's name].
    #[arg(long)]
    pub name: Option<String>,
    /// Memory limit of the service's process tree (RssAnon + RssShmem).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub max_rss: Option<Size>,
    /// Only act when the tree stays over --max-rss this long.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub over_for: Option<Duration>,
    /// No --max-rss enforcement during the first moments of each run.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub startup_grace: Option<Duration>,
    /// A limit enforced at once, whatever --over-for or --startup-grace say.
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub hard_limit: Option<Size>,
    /// Time between the drain signal and SIGKILL of the whole tree.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "10s")]
    pub grace: Duration,
    /// The signal that asks the service to drain (number or name).
    #[arg(long, value_name = "SIGNAL", default_value = "SIGTERM", value_parser = parse_signal)]
    pub drain_signal: i32,
    /// What to do over the limit: restart (drain, then start again),
    /// signal (send the drain signal only), marker (write --marker-file),
    /// or exec (run --hook).
    #[arg(long, value_enum, default_value_t = OnMemory::Restart)]
    pub on_memory: OnMemory,
    /// Where `--on-memory marker` writes its respawn-recommended marker.
    #[arg(long, value_name = "FILE")]
    pub marker_file: Option<PathBuf>,
    /// The program `--on-memory exec` runs (directly, never through a
    /// shell), with WATCHDOG_SERVICE, WATCHDOG_PID, WATCHDOG_CHARGED_BYTES
    /// and WATCHDOG_LIMIT_BYTES in its environment.
    #[arg(long, value_name = "PROGRAM")]
    pub hook: Option<String>,
    /// An argument for the hook (repeatable).
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub hook_arg: Vec<String>,
    #[arg(long, value_enum, default_value_t = RestartPolicy::Always)]
    pub restart: RestartPolicy,
    /// Give up after this many crashes in a row (exit 1).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub max_crashes: u32,
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "1s")]
    pub backoff_floor: Duration,
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "60s")]
    pub backoff_cap: Duration,
    /// A run this long starts the crash count afresh.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "5m")]
    pub stable_after: Duration,
    /// Immediate restarts after clean exits allowed per --clean-window.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub clean_budget: u32,
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "60s")]
    pub clean_window: Duration,
    /// Append the audit log (JSON lines) here [default: standard output,
    /// unless it is a terminal].
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Make each audit line durable (fdatasync) before acting on it.
    #[arg(long)]
    pub audit_fsync: bool,
    /// Run the service as this user (and its groups).
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// With --user: this group as the primary one instead of the user's.
    #[arg(long, value_name = "GROUP", requires = "user")]
    pub group: Option<String>,
    /// Working directory of the service.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<PathBuf>,
    /// Extra environment for the service (repeatable).
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    #[command(flatten)]
    pub sensor: SensorArgs,
    /// The command and its arguments (run directly, never through a shell).
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnMemory {
    Restart,
    Signal,
    Marker,
    Exec,
}

fn parse_signal(s: &str) -> Result<i32, String> {
    if let Ok(n) = s.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(format!("signal {n} is out of range (1-64)"))
        };
    }
    let name = s.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    (1..32)
        .find(|&n| crate::exit::signal_name(n).is_some_and(|full| &full[3..] == name))
        .ok_or_else(|| format!("unknown signal {s:?}; use a name like SIGTERM or a number"))
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// One audit line of the supervisor (docs/audit-log.md).
#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    event: &'static str,
    service: &'a str,
    pid: u32,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    status: Option<StatusFields>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cause: Option<Cause>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uptime_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    peak_rss_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    charged_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit_bytes: Option<u64>,
    crash_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    restart_in_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    source: Source,
}

/// The live run and what is known of it.
struct Current {
    run: Run,
    group: Option<GroupId>,
}

pub async fn run(args: SuperviseArgs) -> Result<ExitCode, CliError> {
    let service = args.name.clone().unwrap_or_else(|| {
        std::path::Path::new(&args.command[0])
            .file_name()
            .map_or_else(
                || args.command[0].clone(),
                |n| n.to_string_lossy().into_owned(),
            )
    });
    if args.max_crashes == 0 {
        return Err(CliError::Usage("--max-crashes must be at least 1".into()));
    }
    if args.on_memory == OnMemory::Marker && args.marker_file.is_none() {
        return Err(CliError::Usage(
            "--on-memory marker needs --marker-file FILE".into(),
        ));
    }
    let user = match &args.user {
        Some(name) => {
            let mut user = User::lookup(name).map_err(|e| CliError::Usage(e.to_string()))?;
            if let Some(group) = &args.group {
                user = user
                    .with_group(group)
                    .map_err(|e| CliError::Usage(e.to_string()))?;
            }
            Some(user)
        }
        None => None,
    };
    let memory = args.max_rss.map(|limit| MemoryPolicy {
        limit: limit.bytes(),
        over_for: args.over_for,
        startup_grace: args.startup_grace,
        hard_limit: args.hard_limit.map(Size::bytes),
        drain_signal: args.drain_signal,
        grace: args.grace,
        action: match args.on_memory {
            OnMemory::Restart => MemoryAction::Restart,
            OnMemory::Signal => MemoryAction::Signal,
            OnMemory::Marker => MemoryAction::Marker,
            OnMemory::Exec => {
                MemoryAction::Exec(args.hook.iter().chain(&args.hook_arg).cloned().collect())
            }
        },
    });
    if memory.is_none() && args.hard_limit.is_some() {
        return Err(CliError::Usage("--hard-limit needs --max-rss".into()));
    }
    // The sensor fires at the lower of the two limits.
    let limits = memory.as_ref().map(|m| {
        let limit = m.hard_limit.map_or(m.limit, |h| h.min(m.limit));
        Limits::new(limit)
    });
    let cfg = Config {
        restart: args.restart,
        max_crashes: args.max_crashes,
        backoff_floor: args.backoff_floor,
        backoff_cap: args.backoff_cap,
        stable_after: args.stable_after,
        clean_budget: args.clean_budget,
        clean_window: args.clean_window,
        shutdown_grace: args.grace,
        memory,
        jitter_seed: u64::from(std::process::id()) ^ 0x9e37_79b9_7f4a_7c15,
        ..Config::default()
    };
    let mut audit = match &args.audit_log {
        Some(path) => AuditLog::file(path, args.audit_fsync)
            .with_context(|| format!("failed to open the audit log {}", path.display()))?,
        None => AuditLog::default_stdout().context("failed to use standard output")?,
    };
    let spec = Spec {
        argv: args.command.clone(),
        env: args.env.clone(),
        cwd: args.cwd.clone(),
        user,
    };
    let mut sensor = args.sensor.open().context("cannot watch memory")?;
    let source = sensor.source();
    runner::become_subreaper();
    let mut sigterm = signal(SignalKind::terminate()).context("failed to handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("failed to handle SIGINT")?;
    let mut sighup = signal(SignalKind::hangup()).context("failed to handle SIGHUP")?;
    let clock = crate::event::WallClock::new();

    // The cgroup's OOM-kill count now, to tell a kernel OOM kill from any
    // other SIGKILL later.
    let mut oom_seen = oom_kill_count();
    let mut oom_victims = std::collections::HashSet::new();
    // Memory hooks started and not yet reaped (spared when a run's tree is
    // killed), and the charge the last memory record reported.
    let mut hooks: Vec<u32> = Vec::new();
    let mut last_charged = 0;
    let mut policy = Policy::new(cfg);
    let mut current: Option<Current> = None;
    let mut last_pid = 0;
    let mut ever_started = false;
    let mut wake: Option<Instant> = None;
    let mut pending = policy.handle(Input::Start, Instant::now());
    info!(service = %service, source = %source, "supervising");

    loop {
        // Perform what the policy decided, in order.
        let mut exit_code = None;
        let mut queue: std::collections::VecDeque<Action> = std::mem::take(&mut pending).into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Spawn => {
                    let group_slot = &mut None;
                    let started = runner::spawn(&spec, |pid| {
                        // Watched even without a limit: its exits, forks and
                        // OOM kills are sensed too.
                        *group_slot = Some(
                            sensor
                                .watch_tree(pid, limits.unwrap_or_default())
                                .map_err(|e| std::io::Error::other(e.to_string()))?,
                        );
                        Ok(())
                    })
                    .await;
                    if started.is_err()
                        && let Some(group) = group_slot.take()
                    {
                        // Registered, then exec failed: nothing to watch.
                        sensor.remove_group(group);
                    }
                    match started {
                        Ok(run) => {
                            last_pid = run.pid;
                            ever_started = true;
                            current = Some(Current {
                                run,
                                group: *group_slot,
                            });
                            // Its consequences come before anything queued
                            // after the spawn.
                            for next in policy
                                .handle(Input::Started, Instant::now())
                                .into_iter()
                                .rev()
                            {
                                queue.push_front(next);
                            }
                        }
                        // The first start failing is a mistake in the command
                        // line; a later one (the program replaced during a
                        // deploy) is a failed run, for the policy to judge.
                        Err(e) if !ever_started => {
                            return Err(CliError::Usage(format!(
                                "failed to start {:?}: {e}",
                                spec.argv[0]
                            )));
                        }
                        Err(e) => {
                            error!(error = %e, command = ?spec.argv, "failed to start the service");
                            // No process: the exit line says pid 0.
                            last_pid = 0;
                            let failed = Input::Exited {
                                status: ExitStatus::Code(127),
                                oom_killed: false,
                            };
                            for next in policy.handle(failed, Instant::now()).into_iter().rev() {
                                queue.push_front(next);
                            }
                        }
                    }
                }
                Action::Signal(sig) => {
                    if let Some(c) = &current {
                        runner::signal_group(c.run.pid, sig);
                    }
                }
                Action::KillTree => {
                    let running = current.as_ref().map(|c| c.run.pid);
                    if let Some(pid) = running {
                        runner::signal_group(pid, libc::SIGKILL);
                    }
                    runner::kill_descendants(50, running, &hooks);
                }
                Action::WakeAt(at) => wake = Some(wake.map_or(at, |w| w.min(at))),
                Action::Mark => {
                    if let Some(path) = &args.marker_file {
                        write_marker(path, &service, last_pid);
                    }
                }
                Action::Exec(argv) => {
                    let env = [
                        ("WATCHDOG_SERVICE", service.clone()),
                        ("WATCHDOG_PID", last_pid.to_string()),
                        ("WATCHDOG_CHARGED_BYTES", last_charged.to_string()),
                        (
                            "WATCHDOG_LIMIT_BYTES",
                            limits.map_or(0, |l| l.limit).to_string(),
                        ),
                    ];
                    match runner::start_hook(&argv, &env) {
                        Ok(pid) => hooks.push(pid),
                        Err(e) => {
                            error!(hook = ?argv, error = %e, "failed to start the memory hook")
                        }
                    }
                }
                Action::Record(record) => {
                    if let Some(charged) = record.charged_bytes {
                        last_charged = charged;
                    }
                    let line = line(&record, &service, last_pid, &clock, source, None);
                    audit.write(&line);
                }
                Action::Done => exit_code = Some(ExitCode::SUCCESS),
                Action::GiveUp => {
                    error!(service = %service, "gave up: too many crashes");
                    exit_code = Some(ExitCode::FAILURE);
                }
            }
        }
        if let Some(code) = exit_code {
            runner::kill_descendants(50, None, &hooks);
            info!(service = %service, lost_audit_lines = audit.lost(), "stopped");
            return Ok(code);
        }

        // Orphans of the service reparented to us (subreaper) and already
        // exited: reap them, whatever the run is doing.
        runner::reap_orphans(current.as_ref().map(|c| c.run.pid));
        hooks.retain(|&pid| crate::procs::exists(pid));
        let exit_wait = async {
            match current.as_mut() {
                Some(c) => (&mut c.run.exit).await.ok(),
                None => std::future::pending().await,
            }
        };
        let timer = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            exit = exit_wait => {
                let RunExit { status, peak_rss_bytes } = exit.unwrap_or(RunExit {
                    status: ExitStatus::Unknown,
                    peak_rss_bytes: 0,
                });
                let ended = current.take();
                if let Some(group) = ended.as_ref().and_then(|c| c.group) {
                    sensor.remove_group(group);
                }
                // Whatever the run left behind goes with it.
                runner::kill_descendants(50, None, &hooks);
                let oom_now = oom_kill_count();
                let killed = status.signal() == Some(libc::SIGKILL);
                let run_pid = ended.as_ref().map(|c| c.run.pid);
                // The kernel programs saw the OOM killer choose it; else the
                // cgroup's count of OOM kills grew meanwhile.
                let oom_evidence = if killed && run_pid.is_some_and(|p| oom_victims.contains(&p)) {
                    Some("ebpf_mark_victim")
                } else if killed
                    && matches!((oom_now, oom_seen), (Some(now), Some(before)) if now > before)
                {
                    Some("cgroup_memory_events_oom_kill")
                } else {
                    None
                };
                oom_seen = oom_now;
                oom_victims.clear();
                let oom_killed = oom_evidence.is_some();
                let now = Instant::now();
                let actions = policy.handle(Input::Exited { status, oom_killed }, now);
                // The exit line carries what only the runner measured.
                for action in actions {
                    match action {
                        Action::Record(mut record) if record.event == "exited" => {
                            if record.cause == Some(Cause::OomKill) {
                                // Say what the verdict rests on.
                                record.reason = oom_evidence;
                            }
                            let line = line(&record, &service, last_pid, &clock, source, Some(peak_rss_bytes));
                            audit.write(&line);
                        }
                        other => pending.push(other),
                    }
                }
            }
            () = timer => {
                wake = None;
                let now = Instant::now();
                // A fresh exact reading first, for over_for / startup grace.
                if let Some(group) = current.as_ref().and_then(|c| c.group) {
                    let charged = mem::read_group(sensor.members(group), mem::Metric::Charged).charged_bytes;
                    let limit = limits.map_or(u64::MAX, |l| l.limit);
                    let input = if charged >= limit { Input::Memory { charged } } else { Input::BelowLimit };
                    pending.extend(policy.handle(input, now));
                }
                pending.extend(policy.handle(Input::Timer, now));
            }
            event = sensor.next() => {
                match event.context("the sensor failed")? {
                    SensorEvent::OverLimit(c) if current.as_ref().and_then(|r| r.group) == Some(c.group) => {
                        pending.extend(policy.handle(Input::Memory { charged: c.charged_bytes }, Instant::now()));
                        // Hear about it again once it has been back under
                        // the hysteresis level (for signal / marker, or a
                        // deferred decision).
                        let _ = sensor.rearm(c.group);
                    }
                    SensorEvent::OomVictim { pid, .. } => {
                        oom_victims.insert(pid);
                    }
                    SensorEvent::Rearmed { group, .. } if current.as_ref().and_then(|r| r.group) == Some(group) => {
                        pending.extend(policy.handle(Input::BelowLimit, Instant::now()));
                    }
                    _ => {}
                }
            }
            _ = sigterm.recv() => pending.extend(policy.handle(Input::Shutdown, Instant::now())),
            _ = sigint.recv() => pending.extend(policy.handle(Input::Shutdown, Instant::now())),
            _ = sighup.recv() => audit.reopen(),
        }
    }
}

fn line<'a>(
    record: &Record,
    service: &'a str,
    pid: u32,
    clock: &crate::event::WallClock,
    source: Source,
    peak_rss_bytes: Option<u64>,
) -> Line<'a> {
    Line {
        ts: rfc3339(clock.at(crate::event::monotonic_now().as_nanos() as u64)),
        event: record.event,
        service,
        pid,
        status: record.status.map(ExitStatus::fields),
        cause: record.cause,
        uptime_ms: record.uptime.map(|d| d.as_millis() as u64),
        peak_rss_bytes,
        charged_bytes: record.charged_bytes,
        limit_bytes: record.limit_bytes,
        crash_count: record.crash_count,
        restart_in_ms: record.restart_in.map(|d| d.as_millis() as u64),
        reason: record.reason,
        source,
    }
}

/// `oom_kill` of memory.events for this process's cgroup (v2).
fn oom_kill_count() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let file = format!("{root}{path}/memory.events");
        if let Ok(text) = std::fs::read_to_string(&file) {
            return text
                .lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|v| v.trim().parse().ok());
        }
    }
    None
}

/// Writes the respawn-recommended marker atomically: a temporary file in
/// the same directory, then a rename over the marker (rename replaces a
/// symlink at the path rather than following it).
fn write_marker(path: &std::path::Path, service: &str, pid: u32) {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let body = serde_json::json!({
        "service": service,
        "pid": pid,
        "reason": "memory_over_limit",
        "ts": rfc3339(std::time::SystemTime::now()),
    });
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(format!("{body}\n").as_bytes())?;
            f.sync_data()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        error!(path = %path.display(), error = %e, "failed to write the respawn marker");
    }
}
