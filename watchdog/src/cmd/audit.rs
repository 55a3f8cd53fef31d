//! `watchdog audit`: stream process exits as JSON lines.

use std::{path::PathBuf, process::ExitCode};

use serde::Serialize;

use crate::{
    cmd::CliError,
    event::{ProcessExit, WallClock, rfc3339},
    exit::StatusFields,
    sensor::Source,
};

/// Arguments of `watchdog audit`.
#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("scope").required(true).multiple(false).args(["all", "pid"]))]
pub struct AuditArgs {
    /// Report the exit of every process on the host.
    #[arg(long)]
    pub all: bool,
    /// Report the exits of this process and all of its descendants, present
    /// and future.
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    /// Append the lines to FILE (created mode 0640, never through a symlink)
    /// instead of writing them to standard output.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// One `exited` line of the audit log (docs/audit-log.md).
#[derive(Debug, Serialize)]
pub struct ExitLine<'a> {
    pub ts: String,
    pub event: &'static str,
    pub pid: u32,
    pub ppid: u32,
    pub comm: &'a str,
    #[serde(flatten)]
    pub status: StatusFields,
    pub peak_rss_bytes: u64,
    /// CLOCK_MONOTONIC nanoseconds of the exit, for ordering and latency.
    pub monotonic_ns: u64,
    pub source: Source,
}

impl<'a> ExitLine<'a> {
    pub fn new(exit: &'a ProcessExit, clock: &WallClock, source: Source) -> Self {
        Self {
            ts: rfc3339(clock.at(exit.monotonic_ns)),
            event: "exited",
            pid: exit.pid,
            ppid: exit.ppid,
            comm: &exit.comm,
            status: exit.status.fields(),
            peak_rss_bytes: exit.peak_rss_bytes,
            monotonic_ns: exit.monotonic_ns,
            source,
        }
    }
}

#[cfg(target_os = "linux")]
pub async fn run(args: AuditArgs) -> Result<ExitCode, CliError> {
    linux::run(args).await
}

#[cfg(not(target_os = "linux"))]
pub async fn run(_args: AuditArgs) -> Result<ExitCode, CliError> {
    Err(CliError::Failed(anyhow::anyhow!(
        "watchdog audit traces exits with eBPF, which needs Linux; \
         it is not available on this system"
    )))
}

#[cfg(target_os = "linux")]
mod linux {
    use std::{io, process::ExitCode, time::Duration};

    use anyhow::Context;
    use tokio::signal::unix::{SignalKind, signal};
    use tracing::{error, info, warn};

    use super::{AuditArgs, ExitLine};
    use crate::{
        cmd::CliError,
        event::WallClock,
        jsonl::LineSink,
        kernel::{Charge, KernelEvent, Losses, ProbeOptions, Probes},
        procs,
        sensor::Source,
    };

    pub async fn run(args: AuditArgs) -> Result<ExitCode, CliError> {
        if let Some(pid) = args.pid {
            match procs::tgid(pid) {
                Some(tgid) if tgid == pid && pid != 0 => {}
                Some(tgid) => {
                    return Err(CliError::Usage(format!(
                        "pid {pid} is a thread of process {tgid}: pass --pid {tgid}"
                    )));
                }
                None => {
                    return Err(CliError::Usage(format!(
                        "no process with pid {pid}: pass the pid of a running process to --pid"
                    )));
                }
            }
        }
        let sink = match &args.output {
            Some(path) => LineSink::append(path)
                .with_context(|| format!("failed to open {} for appending", path.display()))?,
            None => LineSink::stdout().context("failed to use standard output")?,
        };
        let mut probes = Probes::load(ProbeOptions {
            watch_all: args.all,
        })
        .context("cannot trace process exits")?;
        if let Some(root) = args.pid {
            let members = probes
                .watch_tree(root, None, |_| Charge::default())
                .context("cannot watch the process tree")?;
            if !members.contains(&root) {
                return Err(CliError::Usage(format!(
                    "process {root} exited before it could be watched"
                )));
            }
            info!(
                pid = root,
                processes = members.len(),
                "watching process tree"
            );
        }

        let mut sigterm = signal(SignalKind::terminate()).context("failed to handle SIGTERM")?;
        let mut sigint = signal(SignalKind::interrupt()).context("failed to handle SIGINT")?;
        let clock = WallClock::new();
        let mut writer = Writer {
            sink,
            clock,
            failing: false,
        };
        let mut losses = Losses::default();
        let mut loss_check = tokio::time::interval(Duration::from_secs(1));
        info!(
            scope = if args.all { "all" } else { "tree" },
            output = %writer.sink.path().map_or("stdout".into(), |p| p.display().to_string()),
            "streaming exit events"
        );

        loop {
            tokio::select! {
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
                _ = loss_check.tick() => report_losses(&probes, &mut losses),
                event = probes.next() => {
                    let event = event.context("failed to read kernel events")?;
                    if !writer.write(&event)? {
                        return Ok(ExitCode::SUCCESS);
                    }
                }
            }
        }
        // Deliver what was already sensed before stopping.
        while let Some(event) = probes.try_next() {
            if !writer.write(&event)? {
                break;
            }
        }
        report_losses(&probes, &mut losses);
        info!("stopped");
        Ok(ExitCode::SUCCESS)
    }

    struct Writer {
        sink: LineSink,
        clock: WallClock,
        /// Whether the last write failed (to log a failure once, not per line).
        failing: bool,
    }

    impl Writer {
        /// Writes an exit line; `Ok(false)` when standard output was closed
        /// by its reader (`watchdog audit --all | head`), which ends the run.
        fn write(&mut self, event: &KernelEvent) -> Result<bool, CliError> {
            let KernelEvent::Exit(exit) = event else {
                return Ok(true);
            };
            match self
                .sink
                .write_line(&ExitLine::new(exit, &self.clock, Source::Ebpf))
            {
                Ok(()) => {
                    if self.failing {
                        info!("writing exit events again");
                        self.failing = false;
                    }
                    Ok(true)
                }
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe && self.sink.path().is_none() => {
                    Ok(false)
                }
                Err(e) => {
                    // A full disk or a vanished directory must not stop the
                    // tracing: say so, keep going, and recover when it can.
                    if !self.failing {
                        error!(error = %e, pid = exit.pid, "failed to write an exit event; it is lost");
                        self.failing = true;
                    }
                    Ok(true)
                }
            }
        }
    }

    fn report_losses(probes: &Probes, seen: &mut Losses) {
        let now = probes.losses();
        if now.ringbuf_full > seen.ringbuf_full {
            warn!(
                lost = now.ringbuf_full - seen.ringbuf_full,
                total = now.ringbuf_full,
                "the kernel event buffer was full: exit events were lost"
            );
        }
        if now.watch_table_full > seen.watch_table_full {
            warn!(
                untracked = now.watch_table_full - seen.watch_table_full,
                "the watch table was full: new processes of the watched tree are not tracked"
            );
        }
        *seen = now;
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::exit::ExitStatus;

    #[test]
    fn exit_line_has_the_documented_fields() {
        let clock = WallClock::new();
        let exit = ProcessExit {
            pid: 42,
            ppid: 1,
            comm: "sh".into(),
            status: ExitStatus::Signal {
                signal: 9,
                core_dumped: false,
            },
            peak_rss_bytes: 4096,
            monotonic_ns: 5,
            group: 0,
        };
        let text = serde_json::to_string(&ExitLine::new(&exit, &clock, Source::Ebpf)).unwrap();
        let order = [
            "ts",
            "event",
            "pid",
            "ppid",
            "comm",
            "signal",
            "signal_name",
            "core_dumped",
            "peak_rss_bytes",
            "monotonic_ns",
            "source",
        ];
        let at: Vec<usize> = order
            .iter()
            .map(|k| {
                text.find(&format!("\"{k}\":"))
                    .unwrap_or_else(|| panic!("{k} in {text}"))
            })
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "field order: {text}");
        assert!(!text.contains("exit_code"), "signal xor exit_code: {text}");
        let line: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(line["event"], "exited");
        assert_eq!(line["signal_name"], "SIGKILL");
        let ts = line["ts"].as_str().unwrap();
        let parsed = humantime::parse_rfc3339(ts).unwrap();
        assert!(parsed <= SystemTime::now() + Duration::from_secs(1));
        assert!(ts.ends_with('Z'));
    }
}
