//! `watchdog supervise -- CMD ARGS...`: run one service in the foreground,
//! keep it under its memory budget, restart it by the policy, and write
//! every decision to the audit log. The service actor does the work
//! ([`crate::service`]); this module turns options into its configuration
//! and refuses, before anything starts, what cannot work.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

use crate::{
    auditlog::AuditLog,
    cmd::CliError,
    policy::{Config, MemoryAction, MemoryPolicy, RestartPolicy},
    runner::{self, Spec, User},
    sensor::SensorArgs,
    service::{self, Outcome, Service, ServiceConfig, host::Host},
    size::Size,
};

/// Arguments of `watchdog supervise`.
#[derive(Debug, clap::Args)]
pub struct SuperviseArgs {
    /// The service's name in the audit log [default: the command's name].
    #[arg(long)]
    pub name: Option<String>,
    /// Memory limit of the service's process tree (RssAnon + RssShmem;
    /// trees of several processes count each shared page once).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub max_rss: Option<Size>,
    /// Only act when the tree stays over --max-rss this long.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, requires = "max_rss", allow_hyphen_values = true)]
    pub over_for: Option<Duration>,
    /// No --max-rss enforcement during the first moments of each run.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, requires = "max_rss", allow_hyphen_values = true)]
    pub startup_grace: Option<Duration>,
    /// A limit enforced at once, whatever --over-for or --startup-grace say
    /// (at least --max-rss).
    #[arg(
        long,
        value_name = "SIZE",
        allow_hyphen_values = true,
        requires = "max_rss"
    )]
    pub hard_limit: Option<Size>,
    /// Time between the drain signal and SIGKILL of the whole tree.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "10s", allow_hyphen_values = true)]
    pub grace: Duration,
    /// The signal that asks the service to drain (number or name).
    #[arg(long, value_name = "SIGNAL", default_value = "SIGTERM", value_parser = parse_signal, allow_hyphen_values = true)]
    pub drain_signal: i32,
    /// What to do over --max-rss: restart (drain, then start again),
    /// signal (send the drain signal only), marker (write --marker-file),
    /// or exec (run --hook) [default: restart].
    #[arg(long, value_enum, requires = "max_rss")]
    pub on_memory: Option<OnMemory>,
    /// Where `--on-memory marker` writes its respawn-recommended marker.
    #[arg(long, value_name = "FILE", required_if_eq("on_memory", "marker"))]
    pub marker_file: Option<PathBuf>,
    /// The program `--on-memory exec` runs (directly, never through a
    /// shell), with WATCHDOG_SERVICE, WATCHDOG_PID, WATCHDOG_CHARGED_BYTES
    /// and WATCHDOG_LIMIT_BYTES in its environment.
    #[arg(long, value_name = "PROGRAM", required_if_eq("on_memory", "exec"))]
    pub hook: Option<String>,
    /// An argument for the hook (repeatable).
    #[arg(
        long,
        value_name = "ARG",
        allow_hyphen_values = true,
        requires = "hook"
    )]
    pub hook_arg: Vec<String>,
    /// When to start the service again after it exits.
    #[arg(long, value_enum, default_value_t = RestartPolicy::Always)]
    pub restart: RestartPolicy,
    /// Give up after this many crashes in a row (exit 1).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 5,
        allow_hyphen_values = true
    )]
    pub max_crashes: u32,
    /// The first (and shortest) wait before a restart after a crash.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "1s", allow_hyphen_values = true)]
    pub backoff_floor: Duration,
    /// The longest wait before a restart; the wait doubles up to it.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "60s", allow_hyphen_values = true)]
    pub backoff_cap: Duration,
    /// A run this long starts the crash count afresh.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "5m", allow_hyphen_values = true)]
    pub stable_after: Duration,
    /// Immediate restarts after clean exits allowed per --clean-window.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 10,
        allow_hyphen_values = true
    )]
    pub clean_budget: u32,
    /// The window --clean-budget counts restarts in.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "60s", allow_hyphen_values = true)]
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

impl SuperviseArgs {
    /// The service these options describe, or the usage error that says
    /// which option cannot work and why. Checks everything that can be
    /// checked before the first start.
    pub fn service(&self) -> Result<ServiceConfig, CliError> {
        let usage = |msg: String| Err(CliError::Usage(msg));
        let name = self.name.clone().unwrap_or_else(|| {
            Path::new(&self.command[0]).file_name().map_or_else(
                || self.command[0].clone(),
                |n| n.to_string_lossy().into_owned(),
            )
        });
        if self.max_crashes == 0 {
            return usage("--max-crashes must be at least 1".into());
        }
        if self.backoff_floor > self.backoff_cap {
            return usage(format!(
                "--backoff-floor ({}) is longer than --backoff-cap ({}); make the floor the shorter",
                humantime::format_duration(self.backoff_floor),
                humantime::format_duration(self.backoff_cap)
            ));
        }
        self.sensor.check().map_err(CliError::Usage)?;
        if name.is_empty() {
            return usage("--name must not be empty".into());
        }
        if self.drain_signal == libc::SIGSTOP {
            return usage(
                "--drain-signal SIGSTOP would freeze the service, not drain it; use SIGTERM, \
                 SIGINT, SIGQUIT or the signal the service drains on"
                    .into(),
            );
        }
        let on_memory = self.on_memory.unwrap_or(OnMemory::Restart);
        if self.hook.is_some() && on_memory != OnMemory::Exec {
            return usage("--hook is only used with --on-memory exec".into());
        }
        if self.marker_file.is_some() && on_memory != OnMemory::Marker {
            return usage("--marker-file is only used with --on-memory marker".into());
        }
        if let Some(cwd) = &self.cwd {
            if !cwd.exists() {
                return usage(format!(
                    "--cwd {}: no such directory; pass an existing directory",
                    cwd.display()
                ));
            }
            if !cwd.is_dir() {
                return usage(format!("--cwd {}: not a directory", cwd.display()));
            }
        }
        let memory = match self.max_rss {
            None => None,
            Some(limit) if limit.bytes() == 0 => {
                return usage("--max-rss must be more than 0".into());
            }
            Some(limit) => {
                if let Some(hard) = self.hard_limit
                    && hard.bytes() < limit.bytes()
                {
                    return usage(format!(
                        "--hard-limit ({hard}) is under --max-rss ({limit}); the hard limit must be at least the soft one"
                    ));
                }
                let action = match on_memory {
                    OnMemory::Restart => MemoryAction::Restart,
                    OnMemory::Signal => MemoryAction::Signal,
                    OnMemory::Marker => {
                        if let Some(path) = &self.marker_file {
                            check_marker_dir(path)?;
                        }
                        MemoryAction::Marker
                    }
                    OnMemory::Exec => {
                        let hook = self.hook.as_deref().unwrap_or_default();
                        check_executable("--hook", hook)?;
                        MemoryAction::Exec(
                            std::iter::once(hook.to_owned())
                                .chain(self.hook_arg.iter().cloned())
                                .collect(),
                        )
                    }
                };
                Some(MemoryPolicy {
                    limit: limit.bytes(),
                    over_for: self.over_for,
                    startup_grace: self.startup_grace,
                    hard_limit: self.hard_limit.map(Size::bytes),
                    drain_signal: self.drain_signal,
                    grace: self.grace,
                    action,
                })
            }
        };
        let user = match &self.user {
            Some(name) => {
                let mut user = User::lookup(name).map_err(|e| CliError::Usage(e.to_string()))?;
                if let Some(group) = &self.group {
                    user = user
                        .with_group(group)
                        .map_err(|e| CliError::Usage(e.to_string()))?;
                }
                Some(user)
            }
            None => None,
        };
        Ok(ServiceConfig {
            name,
            spec: Spec {
                argv: self.command.clone(),
                env: self.env.clone(),
                cwd: self.cwd.clone(),
                user,
            },
            policy: Config {
                restart: self.restart,
                max_crashes: self.max_crashes,
                backoff_floor: self.backoff_floor,
                backoff_cap: self.backoff_cap,
                stable_after: self.stable_after,
                clean_budget: self.clean_budget,
                clean_window: self.clean_window,
                shutdown_grace: self.grace,
                stop_signal: self.drain_signal,
                memory,
                jitter_seed: u64::from(std::process::id()) ^ 0x9e37_79b9_7f4a_7c15,
                ..Config::default()
            },
            marker_file: self.marker_file.clone(),
        })
    }
}

/// A marker's directory must exist and be writable by us.
fn check_marker_dir(path: &Path) -> Result<(), CliError> {
    if path.is_dir() {
        return Err(CliError::Usage(format!(
            "--marker-file {}: a directory; name the marker file itself",
            path.display()
        )));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(CliError::Usage(format!(
            "--marker-file {}: the directory {} does not exist; create it or choose another path",
            path.display(),
            dir.display()
        )));
    }
    if !access(dir, libc::W_OK | libc::X_OK) {
        return Err(CliError::Usage(format!(
            "--marker-file {}: the directory {} is not writable by this user",
            path.display(),
            dir.display()
        )));
    }
    Ok(())
}

/// `program` must be an executable file (looked up in PATH when it has no
/// slash, as it will be at run time).
fn check_executable(option: &str, program: &str) -> Result<(), CliError> {
    let found = if program.contains('/') {
        Some(PathBuf::from(program))
    } else {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(program))
                .find(|candidate| candidate.is_file())
        })
    };
    match found {
        None => Err(CliError::Usage(format!(
            "{option} {program}: no such program; give a path or a program in PATH"
        ))),
        Some(path) if !path.is_file() => Err(CliError::Usage(format!(
            "{option} {}: not a file",
            path.display()
        ))),
        Some(path) if !access(&path, libc::X_OK) => Err(CliError::Usage(format!(
            "{option} {}: not executable; chmod +x it",
            path.display()
        ))),
        Some(_) => Ok(()),
    }
}

fn access(path: &Path, mode: libc::c_int) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid C string.
    unsafe { libc::access(c.as_ptr(), mode) == 0 }
}

pub async fn run(args: SuperviseArgs) -> Result<ExitCode, CliError> {
    let config = args.service()?;
    let audit = match &args.audit_log {
        // A refused file (a symlink, not ours, writable by others) is a
        // usage error: exit 2.
        Some(path) => AuditLog::file(path, args.audit_fsync)?,
        None => AuditLog::default_stdout().context("failed to use standard output")?,
    };
    let sensor = args.sensor.open().context("cannot watch memory")?;
    let source = sensor.source();
    runner::become_subreaper();
    let mut sigterm = signal(SignalKind::terminate()).context("failed to handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("failed to handle SIGINT")?;
    let mut host = Host::new(sensor, audit).context("failed to set up the supervisor")?;
    let name = config.name.clone();
    let argv0 = config.spec.argv[0].clone();
    let cwd = config.spec.cwd.clone();
    info!(service = %name, source = %source, "supervising");
    let mut services = [Service::new(config)];
    let shutdown = async {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
    };
    let driven = service::drive(&mut services, &mut host, shutdown).await;
    let hooks: Vec<u32> = services[0].hooks().collect();
    runner::kill_descendants(50, &hooks);
    let stats = host.sensor().stats();
    info!(
        service = %name,
        lost_audit_lines = host.audit().lost(),
        lost_events = stats.lost_events,
        unconfirmed_crossings = stats.unconfirmed_crossings,
        "stopped"
    );
    driven.map_err(|e| CliError::Failed(e.into()))?;
    match services[0].outcome() {
        Some(Outcome::CannotStart(error)) => Err(CliError::Usage(match &cwd {
            Some(dir) => format!("failed to start {argv0:?} in {}: {error}", dir.display()),
            None => format!("failed to start {argv0:?}: {error}"),
        })),
        Some(Outcome::GaveUp | Outcome::Failed) => Ok(ExitCode::FAILURE),
        _ => Ok(ExitCode::SUCCESS),
    }
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
        assert_eq!(memory.action, MemoryAction::Restart);
    }
}
