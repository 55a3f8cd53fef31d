//! `watchdog watch`: watch running process trees against a memory limit
//! and report crossings, re-arms and exits as JSON lines. With `--match`,
//! processes that start later with a matching command line are watched too.

use std::{collections::HashSet, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    cmd::CliError,
    cmd::ExitLine,
    cmd::audit::output_sink,
    event::{WallClock, monotonic_now, rfc3339},
    procs,
    sensor::{GroupId, Limits, Sensor, SensorArgs, SensorError, SensorEvent},
    size::Size,
};

/// Arguments of `watchdog watch`.
#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("target").required(true).multiple(false).args(["pids", "pattern"]))]
pub struct WatchArgs {
    /// Watch this process and its descendants as one group (repeatable:
    /// one group each).
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Watch every process whose full command line matches, each with its
    /// descendants as one group; processes that start later and match are
    /// watched too, so this runs until SIGINT or SIGTERM. Never matches
    /// this watchdog or the processes it runs under.
    #[arg(long = "match", value_name = "REGEX")]
    pub pattern: Option<String>,
    /// With --match: how often to look for new matching processes
    /// [default: 2s].
    #[arg(long, value_name = "DURATION", value_parser = crate::config::de::parse_duration)]
    pub rescan: Option<Duration>,
    /// The memory limit of each group (512MiB, 2GiB, 8192MB).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub limit: Size,
    /// After a crossing, report again only once the group has been below
    /// `limit - hysteresis` [default: 5% of the limit].
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub hysteresis: Option<Size>,
    /// Also report each change of a group's total by at least this much.
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub step: Option<Size>,
    #[command(flatten)]
    pub sensor: SensorArgs,
    /// Append the lines to FILE (created mode 0640, never through a
    /// symlink; an existing FILE must be owned by this user and not
    /// writable by group or others) instead of writing them to standard
    /// output.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Run the event loop SCHED_FIFO (priority 1), above every normal
    /// task, as the daemon's `realtime = true` does: reports stay on time
    /// while every CPU is busy. Needs CAP_SYS_NICE; refused, it says so and
    /// runs at nice -10.
    #[arg(long)]
    pub realtime: bool,
}

/// How often `--match` looks for new processes: soon enough for a process
/// that lives for minutes, rare enough that reading every command line in
/// /proc costs nothing noticeable.
const DEFAULT_RESCAN: Duration = Duration::from_secs(2);

#[derive(Serialize)]
struct MemoryLine {
    ts: String,
    event: &'static str,
    /// The group's root process.
    pid: u32,
    group: u32,
    charged_bytes: u64,
    limit_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    members: Option<usize>,
    /// The process whose growth crossed the limit, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    trigger_pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sensed_monotonic_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    confirmed_monotonic_ns: Option<u64>,
    source: crate::sensor::Source,
}

pub async fn run(args: WatchArgs) -> Result<ExitCode, CliError> {
    let limit = args.limit.bytes();
    if limit == 0 {
        return Err(CliError::Usage("--limit must be more than 0".into()));
    }
    let hysteresis = args.hysteresis.map_or(limit / 20, Size::bytes);
    if hysteresis >= limit {
        return Err(CliError::Usage(format!(
            "--hysteresis ({}) must be less than --limit ({})",
            Size(hysteresis),
            args.limit
        )));
    }
    if args.rescan.is_some() && args.pattern.is_none() {
        return Err(CliError::Usage(
            "--rescan looks for new processes matching --match; \
             it does nothing with --pid: drop it"
                .into(),
        ));
    }
    let rescan_every = args.rescan.unwrap_or(DEFAULT_RESCAN);
    if rescan_every.is_zero() {
        return Err(CliError::Usage(
            "--rescan must be more than 0 (for example 2s)".into(),
        ));
    }
    let pattern = match &args.pattern {
        Some(p) => Some(
            regex::Regex::new(p)
                .map_err(|e| CliError::Usage(format!("invalid --match pattern: {e}")))?,
        ),
        None => None,
    };
    let roots = match &pattern {
        Some(regex) => procs::outermost(&matched_pids(regex)),
        None => checked_pids(&args.pids)?,
    };
    let mut sink = output_sink(args.output.as_deref())?;
    args.sensor.check().map_err(CliError::Usage)?;
    let mut sensor = match args.sensor.open() {
        Ok(sensor) => sensor,
        Err(e @ SensorError::PidNamespace) => return Err(CliError::Usage(e.to_string())),
        Err(e) => return Err(anyhow::Error::new(e).context("cannot watch memory").into()),
    };
    // The daemon's event-loop priority: a crossing is reported on time
    // while every CPU is busy (refused without CAP_SYS_NICE, and said so).
    match crate::protect::priority(crate::protect::Protection::default().nice) {
        crate::protect::Applied::Done(done) => {
            tracing::debug!(priority = %done, "event loop priority")
        }
        other => tracing::info!(priority = %other, "event loop priority left as it is"),
    }
    if args.realtime {
        match crate::protect::realtime() {
            crate::protect::Applied::Done(done) => {
                tracing::info!(priority = %done, "event loop priority")
            }
            other => tracing::warn!(priority = %other, "--realtime refused"),
        }
    }
    let source = sensor.source();
    let limits = Limits {
        limit,
        hysteresis,
        step: args.step.map_or(0, Size::bytes),
    };
    let mut groups: Vec<(GroupId, u32)> = Vec::new();
    for root in roots {
        if let Some(group) = watch(&mut sensor, root, limits)? {
            groups.push((group, root));
        }
    }
    if groups.is_empty() {
        match &args.pattern {
            Some(p) => info!(pattern = %p, "no process matches yet; waiting for one"),
            None => return Err(CliError::Usage("every process to watch has exited".into())),
        }
    }
    let mut sigterm = signal(SignalKind::terminate()).context("failed to handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("failed to handle SIGINT")?;
    let mut rescan = tokio::time::interval(rescan_every);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is now, and the scan just above covered it.
    rescan.tick().await;
    let clock = WallClock::new();
    info!(
        groups = groups.len(),
        limit = %args.limit,
        source = %source,
        "watching memory"
    );

    loop {
        let event = tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = rescan.tick(), if pattern.is_some() => {
                if let Some(regex) = &pattern {
                    watch_new_matches(&mut sensor, &mut groups, regex, limits)?;
                }
                continue;
            }
            event = sensor.next() => event.context("the sensor failed")?,
        };
        let now = rfc3339(clock.at(monotonic_now().as_nanos() as u64));
        let written = match event {
            SensorEvent::OverLimit(c) => {
                let line = MemoryLine {
                    ts: now,
                    event: "memory_over_limit",
                    pid: root_of(&groups, c.group).unwrap_or_default(),
                    group: c.group.0,
                    charged_bytes: c.charged_bytes,
                    limit_bytes: c.limit_bytes,
                    members: Some(c.members),
                    trigger_pid: c.pid,
                    sensed_monotonic_ns: Some(c.sensed_ns),
                    confirmed_monotonic_ns: Some(c.confirmed_ns),
                    source,
                };
                let written = sink.write_line(&line);
                // Reporting is all `watch` does: listen for the next one
                // once the group has been back under the hysteresis level.
                sensor.rearm(c.group).context("cannot re-arm")?;
                written
            }
            SensorEvent::Rearmed {
                group,
                charged_bytes,
            }
            | SensorEvent::Changed {
                group,
                charged_bytes,
            } => {
                let kind = if matches!(event, SensorEvent::Rearmed { .. }) {
                    "memory_rearmed"
                } else {
                    "memory_changed"
                };
                sink.write_line(&MemoryLine {
                    ts: now,
                    event: kind,
                    pid: root_of(&groups, group).unwrap_or_default(),
                    group: group.0,
                    charged_bytes,
                    limit_bytes: limit,
                    members: None,
                    trigger_pid: None,
                    sensed_monotonic_ns: None,
                    confirmed_monotonic_ns: None,
                    source,
                })
            }
            SensorEvent::Exit { exit, group } => {
                let written = sink.write_line(&ExitLine::new(&exit, &clock, source));
                if let Some(group) = group
                    && sensor.members(group).is_empty()
                {
                    info!(
                        pid = root_of(&groups, group),
                        "every process of the group exited"
                    );
                    sensor.remove_group(group);
                    groups.retain(|(g, _)| *g != group);
                    if groups.is_empty() {
                        if pattern.is_none() {
                            info!("every watched process exited");
                            break;
                        }
                        info!("every watched process exited; waiting for new matches");
                    }
                }
                written
            }
            SensorEvent::Fork { .. } | SensorEvent::OomVictim { .. } | SensorEvent::Lost { .. } => {
                Ok(())
            }
        };
        // Other failures (a full disk) were counted and logged by the sink,
        // and are reported in the output once writing works again.
        if let Err(e) = written
            && e.kind() == std::io::ErrorKind::BrokenPipe
            && sink.path().is_none()
        {
            return Ok(ExitCode::SUCCESS);
        }
    }
    let stats = sensor.stats();
    info!(
        unconfirmed_crossings = stats.unconfirmed_crossings,
        rechecks = stats.rechecks,
        resyncs = stats.resyncs,
        lost_events = stats.lost_events,
        samples = stats.samples,
        lines_lost = sink.lost(),
        "stopped"
    );
    Ok(ExitCode::SUCCESS)
}

fn root_of(groups: &[(GroupId, u32)], group: GroupId) -> Option<u32> {
    groups
        .iter()
        .find(|(g, _)| *g == group)
        .map(|&(_, root)| root)
}

/// Watches `root` and its descendants as a new group; `None` when it
/// exited before it could be watched.
fn watch(sensor: &mut Sensor, root: u32, limits: Limits) -> Result<Option<GroupId>, CliError> {
    match sensor.watch_tree(root, limits) {
        Ok(group) => Ok(Some(group)),
        // A process that exits between the scan and the watch is normal.
        Err(SensorError::NoProcess(pid)) => {
            warn!(pid, "process exited before it could be watched");
            Ok(None)
        }
        Err(err) => Err(CliError::Failed(err.into())),
    }
}

/// The pids whose command line matches now (never this process or its
/// ancestors).
fn matched_pids(regex: &regex::Regex) -> Vec<u32> {
    procs::matching(regex)
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

/// Watches the outermost matching processes that no group holds yet: those
/// that started (or came to match, by exec) since the last scan.
fn watch_new_matches(
    sensor: &mut Sensor,
    groups: &mut Vec<(GroupId, u32)>,
    regex: &regex::Regex,
    limits: Limits,
) -> Result<(), CliError> {
    let matched = matched_pids(regex);
    if matched.is_empty() {
        return Ok(());
    }
    let held: HashSet<u32> = groups
        .iter()
        .flat_map(|&(group, root)| {
            let mut members = sensor.members(group);
            members.push(root);
            members
        })
        .collect();
    for root in procs::outermost(&matched) {
        if held.contains(&root) {
            continue;
        }
        if let Some(group) = watch(sensor, root, limits)? {
            info!(
                pid = root,
                group = group.0,
                command = procs::cmdline(root).unwrap_or_default(),
                "watching a new matching process"
            );
            groups.push((group, root));
        }
    }
    Ok(())
}

fn checked_pids(pids: &[u32]) -> Result<Vec<u32>, CliError> {
    for &pid in pids {
        if pid == 0 || !procs::exists(pid) {
            return Err(CliError::Usage(format!(
                "no process with pid {pid}: pass the pid of a running process to --pid"
            )));
        }
    }
    Ok(pids.to_vec())
}
