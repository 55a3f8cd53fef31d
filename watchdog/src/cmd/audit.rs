//! `watchdog audit`: stream process exits as JSON lines.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context;
use serde::Serialize;

use crate::{
    cmd::CliError,
    event::{ProcessExit, WallClock, rfc3339},
    exit::StatusFields,
    jsonl::{LineSink, OpenError},
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
    /// Append the lines to FILE (created mode 0640, never through a
    /// symlink; an existing FILE must be owned by this user and not
    /// writable by group or others) instead of writing them to standard
    /// output.
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

/// One `events_lost` line: the kernel could not deliver events (its ring
/// buffer was full, or its watch table had no room for a new process).
#[derive(Debug, Serialize)]
pub struct EventsLostLine {
    pub ts: String,
    pub event: &'static str,
    /// Which kernel counter grew: `ringbuf_full` or `watch_table_full`.
    pub counter: &'static str,
    /// How much it grew since the last line.
    pub count: u64,
    /// Its total since the command started.
    pub total: u64,
}

/// A file refused for its owner or mode (or as a symlink) is the user's
/// to fix: exit code 2, like any other bad option.
impl From<OpenError> for CliError {
    fn from(err: OpenError) -> Self {
        if err.is_usage() {
            Self::Usage(err.to_string())
        } else {
            Self::Failed(err.into())
        }
    }
}

/// Where a command's lines go: `--output FILE`, else standard output.
pub fn output_sink(output: Option<&Path>) -> Result<LineSink, CliError> {
    match output {
        Some(path) => Ok(LineSink::append(path)?),
        None => Ok(LineSink::stdout().context("failed to use standard output")?),
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
    use tracing::{info, warn};

    use super::{AuditArgs, EventsLostLine, ExitLine, output_sink};
    use crate::{
        cmd::CliError,
        event::{WallClock, rfc3339},
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
        if procs::in_child_pid_namespace() {
            return Err(CliError::Usage(
                "watchdog audit traces exits with the kernel programs, which cannot work in a \
                 pid namespace of its own (a container without hostPID): they report host \
                 pids. Run it with hostPID, or on the host"
                    .into(),
            ));
        }
        let sink = output_sink(args.output.as_deref())?;
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
        let mut writer = Writer {
            sink,
            clock: WallClock::new(),
            exits: 0,
            losses: Losses::default(),
        };
        let mut loss_check = tokio::time::interval(Duration::from_secs(1));
        info!(
            scope = if args.all { "all" } else { "tree" },
            output = %writer.sink.path().map_or("stdout".into(), |p| p.display().to_string()),
            "streaming exit events"
        );

        let closed = loop {
            tokio::select! {
                _ = sigterm.recv() => break false,
                _ = sigint.recv() => break false,
                _ = loss_check.tick() => {
                    if !writer.report_losses(probes.losses()) {
                        break true;
                    }
                }
                event = probes.next() => {
                    let event = event.context("failed to read kernel events")?;
                    if !writer.write(&event) {
                        break true;
                    }
                }
            }
        };
        if !closed {
            // Deliver what was already sensed before stopping.
            while let Some(event) = probes.try_next() {
                if !writer.write(&event) {
                    break;
                }
            }
            writer.report_losses(probes.losses());
        }
        let losses = probes.losses();
        info!(
            exits = writer.exits,
            ringbuf_full = losses.ringbuf_full,
            watch_table_full = losses.watch_table_full,
            read_failed = losses.read_failed,
            lines_lost = writer.sink.lost(),
            "stopped"
        );
        Ok(ExitCode::SUCCESS)
    }

    struct Writer {
        sink: LineSink,
        clock: WallClock,
        /// Exit lines written.
        exits: u64,
        /// The kernel's loss counters as last reported.
        losses: Losses,
    }

    impl Writer {
        /// Writes an exit line; `false` when standard output was closed by
        /// its reader (`watchdog audit --all | head`), which ends the run.
        fn write(&mut self, event: &KernelEvent) -> bool {
            let KernelEvent::Exit(exit) = event else {
                return true;
            };
            let line = ExitLine::new(exit, &self.clock, Source::Ebpf);
            match self.sink.write_line(&line) {
                Ok(()) => {
                    self.exits += 1;
                    true
                }
                Err(e) => !self.reader_gone(&e),
            }
        }

        /// Writes an `events_lost` line for each kernel counter that grew:
        /// losses belong in the stream whose gaps they explain, not only on
        /// standard error. `false` when the reader of standard output left.
        fn report_losses(&mut self, now: Losses) -> bool {
            let before = self.losses.named();
            self.losses = now;
            for ((counter, total), (_, before)) in now.named().into_iter().zip(before) {
                if total <= before {
                    continue;
                }
                let count = total - before;
                match counter {
                    "ringbuf_full" => warn!(
                        lost = count,
                        total, "the kernel event buffer was full: exit events were lost"
                    ),
                    "watch_table_full" => warn!(
                        untracked = count,
                        total,
                        "the watch table was full: new processes of the watched tree are not tracked"
                    ),
                    _ => warn!(
                        failed = count,
                        total,
                        "the kernel programs could not read a kernel structure: events were dropped \
                         (run with WATCHDOG_LOG=debug for their messages)"
                    ),
                }
                let line = EventsLostLine {
                    ts: rfc3339(std::time::SystemTime::now()),
                    event: "events_lost",
                    counter,
                    count,
                    total,
                };
                if let Err(e) = self.sink.write_line(&line)
                    && self.reader_gone(&e)
                {
                    return false;
                }
            }
            true
        }

        /// Whether a write failed because standard output's reader left.
        /// Other failures (a full disk) were counted and logged by the sink,
        /// and tracing goes on.
        fn reader_gone(&self, e: &io::Error) -> bool {
            e.kind() == io::ErrorKind::BrokenPipe && self.sink.path().is_none()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::exit::ExitStatus;

    #[test]
    fn events_lost_line_has_the_documented_fields() {
        let line = EventsLostLine {
            ts: rfc3339(SystemTime::now()),
            event: "events_lost",
            counter: "ringbuf_full",
            count: 3,
            total: 10,
        };
        let text = serde_json::to_string(&line).unwrap();
        assert!(
            text.starts_with("{\"ts\":\"")
                && text.ends_with(
                    "\"event\":\"events_lost\",\"counter\":\"ringbuf_full\",\"count\":3,\"total\":10}"
                ),
            "{text}"
        );
    }

    /// A refused output file is a usage error (exit code 2); an I/O failure
    /// is not.
    #[test]
    fn refused_output_files_are_usage_errors() {
        let refused = OpenError::Writable {
            path: "/x".into(),
            mode: 0o666,
        };
        assert!(
            matches!(CliError::from(refused), CliError::Usage(m) if m.contains("chmod go-w /x"))
        );
        let failed = OpenError::Io {
            path: "/x".into(),
            error: std::io::Error::from_raw_os_error(libc::EIO),
        };
        assert!(matches!(CliError::from(failed), CliError::Failed(_)));
    }

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
