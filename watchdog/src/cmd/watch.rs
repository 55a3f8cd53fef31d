//! `watchdog watch`: watch running process trees against a memory limit
//! and report crossings, re-arms and exits as JSON lines.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    cmd::CliError,
    cmd::ExitLine,
    event::{WallClock, monotonic_now, rfc3339},
    jsonl::LineSink,
    procs,
    sensor::{GroupId, Limits, SensorArgs, SensorEvent},
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
    /// descendants as one group.
    #[arg(long = "match", value_name = "REGEX")]
    pub pattern: Option<String>,
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
    /// Append the lines to FILE instead of standard output.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

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
    let roots = resolve_roots(&args)?;
    let mut sink = match &args.output {
        Some(path) => LineSink::append(path)
            .with_context(|| format!("failed to open {} for appending", path.display()))?,
        None => LineSink::stdout().context("failed to use standard output")?,
    };
    let mut sensor = args.sensor.open().context("cannot watch memory")?;
    let source = sensor.source();
    let limits = Limits {
        limit,
        hysteresis,
        step: args.step.map_or(0, Size::bytes),
    };
    let mut groups: Vec<(GroupId, u32)> = Vec::new();
    for root in roots {
        match sensor.watch_tree(root, limits) {
            Ok(group) => groups.push((group, root)),
            Err(crate::sensor::SensorError::NoProcess(pid)) => {
                warn!(pid, "process exited before it could be watched");
            }
            Err(err) => return Err(CliError::Failed(err.into())),
        }
    }
    if groups.is_empty() {
        return Err(CliError::Usage("every process to watch has exited".into()));
    }
    let mut sigterm = signal(SignalKind::terminate()).context("failed to handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("failed to handle SIGINT")?;
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
                        info!("every watched process exited");
                        break;
                    }
                }
                written
            }
            SensorEvent::Fork { .. } | SensorEvent::OomVictim { .. } | SensorEvent::Lost { .. } => {
                Ok(())
            }
        };
        if let Err(e) = written {
            if e.kind() == std::io::ErrorKind::BrokenPipe && sink.path().is_none() {
                return Ok(ExitCode::SUCCESS);
            }
            warn!(error = %e, "failed to write an event line; it is lost");
        }
    }
    let stats = sensor.stats();
    info!(
        unconfirmed_crossings = stats.unconfirmed_crossings,
        rechecks = stats.rechecks,
        resyncs = stats.resyncs,
        lost_events = stats.lost_events,
        samples = stats.samples,
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

fn resolve_roots(args: &WatchArgs) -> Result<Vec<u32>, CliError> {
    if let Some(pattern) = &args.pattern {
        return Ok(procs::outermost(&crate::cmd::matching(pattern)?));
    }
    for &pid in &args.pids {
        if pid == 0 || !procs::exists(pid) {
            return Err(CliError::Usage(format!(
                "no process with pid {pid}: pass the pid of a running process to --pid"
            )));
        }
    }
    Ok(args.pids.clone())
}
