//! `watchdog supervise -- CMD ARGS...`: run one service in the foreground,
//! keep it under its memory budget, restart it by the policy, and write
//! every decision to the audit log. It is the daemon ([`crate::daemon`])
//! with one service given on the command line; this module turns options
//! into its configuration and refuses, before anything starts, what cannot
//! work.

use std::{path::PathBuf, process::ExitCode};

use crate::{
    cmd::CliError,
    config::{DaemonConfig, DaemonSection, Naming, ServiceOptions},
    daemon,
    sensor::SensorArgs,
    service::ServiceConfig,
};

/// Arguments of `watchdog supervise`.
#[derive(Debug, clap::Args)]
pub struct SuperviseArgs {
    #[command(flatten)]
    pub service: ServiceOptions,
    /// Append the audit log (JSON lines) here [default: standard output,
    /// unless it is a terminal].
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Make each audit line durable (fdatasync) before acting on it.
    #[arg(long)]
    pub audit_fsync: bool,
    /// Keep the instance lock and the record of the run here, so that a
    /// later start finds and terminates a run this one left behind
    /// [default: none].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    #[command(flatten)]
    pub sensor: SensorArgs,
}

/// Parses a signal given by number or name (`SIGTERM`, `term`, `15`).
pub fn parse_signal(s: &str) -> Result<i32, String> {
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

/// Parses `KEY=VALUE`.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

impl SuperviseArgs {
    /// The service these options describe, or the usage error that says
    /// which option cannot work and why. Checks everything that can be
    /// checked before the first start.
    pub fn service(&self) -> Result<ServiceConfig, CliError> {
        self.sensor.check().map_err(CliError::Usage)?;
        self.service
            .service(Naming::Flags, None)
            .map_err(|p| CliError::Usage(p.message))
    }
}

/// `supervise` is the daemon with one service given on the command line:
/// it ends when the service does.
pub async fn run(args: SuperviseArgs) -> Result<ExitCode, CliError> {
    let service = args.service()?;
    let daemon = DaemonSection {
        state_dir: args.state_dir.clone().unwrap_or_default(),
        audit_log: args.audit_log.clone().unwrap_or_default(),
        audit_fsync: args.audit_fsync,
        sensor: args.sensor.sensor,
        interval: args.sensor.interval,
        min_interval: args.sensor.min_interval,
        ..DaemonSection::default()
    };
    let config = DaemonConfig {
        file: None,
        daemon,
        services: vec![service],
    };
    daemon::run(
        config,
        daemon::Mode::Supervise {
            state_dir: args.state_dir.is_some(),
            audit_log: args.audit_log.is_some(),
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SuperviseArgs,
    }

    fn parse(args: &[&str]) -> Result<ServiceConfig, String> {
        let cli = Cli::try_parse_from(["supervise"].iter().chain(args).chain(&["--", "/bin/true"]))
            .map_err(|e| e.to_string())?;
        cli.args.service().map_err(|e| match e {
            CliError::Usage(msg) => msg,
            CliError::Failed(e) => panic!("not a usage error: {e}"),
        })
    }

    #[test]
    fn every_option_has_help() {
        for arg in Cli::command().get_arguments() {
            assert!(arg.get_help().is_some(), "--{} has no help", arg.get_id());
        }
    }

    /// Options that cannot work are refused before anything starts, each
    /// with a message naming the option.
    #[test]
    fn refuses_what_cannot_work() {
        let dir = std::env::temp_dir().join(format!("watchdog-sv-opts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_exec = dir.join("hook.txt");
        std::fs::write(&not_exec, "").unwrap();
        let missing_dir = dir.join("missing/marker");
        let cases: &[(&[&str], &str)] = &[
            (&["--max-rss", "0"], "--max-rss"),
            (&["--max-rss", "1MiB", "--on-memory", "exec"], "--hook"),
            (
                &[
                    "--max-rss",
                    "1MiB",
                    "--on-memory",
                    "exec",
                    "--hook",
                    "/nonexistent/hook",
                ],
                "--hook /nonexistent/hook",
            ),
            (
                &[
                    "--max-rss",
                    "1MiB",
                    "--on-memory",
                    "exec",
                    "--hook",
                    not_exec.to_str().unwrap(),
                ],
                "not executable",
            ),
            (
                &[
                    "--max-rss",
                    "1MiB",
                    "--on-memory",
                    "marker",
                    "--marker-file",
                    missing_dir.to_str().unwrap(),
                ],
                "does not exist",
            ),
            (
                &["--max-rss", "1MiB", "--on-memory", "marker"],
                "--marker-file",
            ),
            (
                &["--backoff-floor", "10s", "--backoff-cap", "1s"],
                "--backoff-floor",
            ),
            (
                &["--max-rss", "2MiB", "--hard-limit", "1MiB"],
                "--hard-limit",
            ),
            (
                &["--min-interval", "2s", "--interval", "1s"],
                "--min-interval",
            ),
            (&["--over-for", "1s"], "--max-rss"),
            (&["--on-memory", "signal"], "--max-rss"),
            (&["--startup-grace", "1s"], "--max-rss"),
            (&["--hard-limit", "1MiB"], "--max-rss"),
            (&["--max-rss", "1MiB", "--hook", "/bin/true"], "--hook"),
            (
                &["--max-rss", "1MiB", "--marker-file", "/tmp/x"],
                "--marker-file",
            ),
            (&["--hook-arg", "x"], "--hook"),
            (&["--cwd", "/nonexistent/dir"], "/nonexistent/dir"),
            (&["--cwd", "/etc/hostname"], "not a directory"),
            (&["--grace", "-1s"], "--grace"),
            (&["--max-crashes", "-1"], "--max-crashes"),
            (&["--drain-signal", "-1"], "--drain-signal"),
            (&["--drain-signal", "SIGSTOP"], "--drain-signal"),
            (&["--name", ""], "--name"),
            (&["--interval", "0s"], "--interval"),
            (
                &[
                    "--max-rss",
                    "1MiB",
                    "--on-memory",
                    "marker",
                    "--marker-file",
                    "/tmp",
                ],
                "a directory",
            ),
        ];
        for (args, needle) in cases {
            let err = parse(args).expect_err(&format!("{args:?} accepted"));
            assert!(
                err.contains(needle),
                "{args:?}: {err:?} does not name {needle}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
        // What works still does.
        let ok = parse(&[
            "--max-rss",
            "2MiB",
            "--hard-limit",
            "4MiB",
            "--over-for",
            "1s",
        ])
        .unwrap();
        let memory = ok.policy.memory.unwrap();
        assert_eq!(memory.hard_limit, Some(4 << 20));
        assert_eq!(memory.action, crate::policy::MemoryAction::Restart);
    }
}
