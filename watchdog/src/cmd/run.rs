//! `watchdog run`: the daemon, from a configuration file; and
//! `watchdog check-config`: check a file and print what it means.

use std::{path::PathBuf, process::ExitCode};

use crate::{
    cmd::CliError,
    config::{self, DaemonConfig},
    daemon::{self, Mode, Overrides},
    sensor::SensorChoice,
    service::{Selector, Target},
};

/// Arguments of `watchdog run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The configuration file.
    #[arg(long, value_name = "FILE", default_value = config::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Print a commented example configuration and exit.
    #[arg(long)]
    pub sample_config: bool,
    /// Overrides `state-dir` of the file.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Overrides `audit-log` of the file.
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Overrides `sensor` of the file.
    #[arg(long, value_enum)]
    pub sensor: Option<SensorChoice>,
}

impl RunArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            state_dir: self.state_dir.clone(),
            audit_log: self.audit_log.clone(),
            sensor: self.sensor,
        }
    }
}

/// Arguments of `watchdog check-config`.
#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {
    /// The configuration file.
    #[arg(value_name = "FILE", default_value = config::DEFAULT_CONFIG)]
    pub file: PathBuf,
}

/// Loads the file `run` would run, or the usage error naming what is wrong.
pub fn load(args: &RunArgs) -> Result<DaemonConfig, CliError> {
    daemon::load(&args.config, &args.overrides()).map_err(|e| CliError::Usage(e.to_string()))
}

/// The log format a configuration file asks for, made out of the file
/// alone (`[daemon] log-format`), for telling why it was refused as a
/// whole; `None` when it cannot be.
pub fn log_format_of(file: &std::path::Path) -> Option<super::LogFormat> {
    let text = std::fs::read_to_string(file).ok()?;
    let table: toml::Table = text.parse().ok()?;
    match table.get("daemon")?.get("log-format")?.as_str()? {
        "json" => Some(super::LogFormat::Json),
        "text" => Some(super::LogFormat::Text),
        _ => None,
    }
}

pub async fn run(args: RunArgs, config: DaemonConfig) -> Result<ExitCode, CliError> {
    let mode = Mode::Daemon {
        file: args.config.clone(),
        overrides: args.overrides(),
    };
    daemon::run(config, mode).await
}

pub fn check(args: &CheckConfigArgs) -> Result<ExitCode, CliError> {
    let config = config::load(&args.file).map_err(|e| CliError::Usage(e.to_string()))?;
    print!("{}", effective(&config));
    Ok(ExitCode::SUCCESS)
}

/// A string as TOML writes it (escapes included).
fn q(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// A list of strings as TOML writes it.
fn qs(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| q(i)).collect();
    format!("[{}]", quoted.join(", "))
}

/// A size, exactly: in the largest binary unit that divides it.
fn exact(bytes: u64) -> String {
    let text = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")]
        .into_iter()
        .find(|&(shift, _)| bytes >= 1 << shift && bytes.is_multiple_of(1 << shift))
        .map_or_else(
            || format!("{bytes}B"),
            |(shift, unit)| format!("{}{unit}", bytes >> shift),
        );
    q(&text)
}

/// A threshold as the file writes it (sizes exact, in bytes).
fn threshold(t: crate::hostmem::Threshold) -> String {
    match t {
        crate::hostmem::Threshold::Percent(p) => format!("{p}%"),
        crate::hostmem::Threshold::Bytes(b) => format!("{b}B"),
    }
}

/// The configuration as it will run, every default filled in.
fn effective(config: &DaemonConfig) -> String {
    use std::fmt::Write;
    let d = &config.daemon;
    let dur = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# {}: valid",
        config
            .file
            .as_ref()
            .map_or(String::new(), |f| f.display().to_string())
    );
    let _ = writeln!(out, "[daemon]");
    let _ = writeln!(out, "state-dir = {}", q(&d.state_dir.display().to_string()));
    let _ = writeln!(out, "audit-log = {}", q(&d.audit_log.display().to_string()));
    let _ = writeln!(out, "audit-fsync = {}", d.audit_fsync);
    let _ = writeln!(
        out,
        "sensor = {:?}",
        format!("{:?}", d.sensor).to_lowercase()
    );
    let _ = writeln!(out, "interval = {:?}", dur(d.interval));
    let _ = writeln!(out, "min-interval = {:?}", dur(d.min_interval));
    let _ = writeln!(out, "rescan = {:?}", dur(d.rescan));
    let _ = writeln!(
        out,
        "orphans = {:?}",
        format!("{:?}", d.orphans).to_lowercase()
    );
    let _ = writeln!(out, "orphan-grace = {:?}", dur(d.orphan_grace));
    let _ = writeln!(out, "cgroups = {}", d.cgroups);
    let _ = writeln!(out, "oom-score-adj = {}", d.oom_score_adj);
    let _ = writeln!(out, "mlock = {}", d.mlock);
    let _ = writeln!(out, "nice = {}", d.nice);
    let _ = writeln!(out, "realtime = {}", d.realtime);
    if let Some(addr) = d.listen {
        let _ = writeln!(out, "listen = {:?}", addr.to_string());
    }
    let _ = writeln!(out, "allow-remote = {}", d.allow_remote);
    if let Some(format) = d.log_format {
        let _ = writeln!(
            out,
            "log-format = {:?}",
            format!("{format:?}").to_lowercase()
        );
    }
    let _ = writeln!(out, "health-timeout = {:?}", dur(d.health_timeout));
    let _ = writeln!(
        out,
        "host-memory-warn = {:?}",
        threshold(d.host_memory_warn)
    );
    let _ = writeln!(
        out,
        "host-memory-recover = {:?}",
        threshold(d.host_memory_recovery())
    );
    let _ = writeln!(
        out,
        "host-memory-interval = {:?}",
        dur(d.host_memory_interval)
    );
    for service in &config.services {
        let p = &service.policy;
        match &service.target {
            Target::Spawn(spec) => {
                let _ = writeln!(out, "\n[[service]]");
                let _ = writeln!(out, "name = {:?}", service.name);
                let _ = writeln!(out, "command = {}", qs(&spec.argv));
                if let Some(user) = &spec.user {
                    let _ = writeln!(
                        out,
                        "user = {}  # uid {} gid {}",
                        q(&user.name),
                        user.uid,
                        user.gid
                    );
                }
                if let Some(cwd) = &spec.cwd {
                    let _ = writeln!(out, "cwd = {}", q(&cwd.display().to_string()));
                }
                for (k, v) in &spec.env {
                    let _ = writeln!(out, "env.{} = {}", q(k), q(v));
                }
                let _ = writeln!(out, "oom-score-adj = {}", spec.oom_score_adj);
                let _ = writeln!(
                    out,
                    "restart = {:?}",
                    format!("{:?}", p.restart).to_lowercase()
                );
                let _ = writeln!(out, "max-crashes = {}", p.max_crashes);
                let _ = writeln!(out, "backoff-floor = {:?}", dur(p.backoff_floor));
                let _ = writeln!(out, "backoff-cap = {:?}", dur(p.backoff_cap));
                let _ = writeln!(out, "stable-after = {:?}", dur(p.stable_after));
                let _ = writeln!(out, "clean-budget = {}", p.clean_budget);
                let _ = writeln!(out, "clean-window = {:?}", dur(p.clean_window));
                let _ = writeln!(out, "success-exit-codes = {:?}", p.success_codes);
                let _ = writeln!(out, "grace = {:?}", dur(p.shutdown_grace));
                let _ = writeln!(
                    out,
                    "stop-signal = {:?}",
                    crate::exit::signal_name(p.stop_signal).unwrap_or("?")
                );
            }
            Target::Watch(selector) => {
                let _ = writeln!(out, "\n[[watch]]");
                let _ = writeln!(out, "name = {:?}", service.name);
                match selector {
                    Selector::Pid(pid) => {
                        let _ = writeln!(out, "pid = {pid}");
                    }
                    Selector::Match(pattern) => {
                        let _ = writeln!(out, "match = {}", q(pattern.0.as_str()));
                    }
                    Selector::AncestorMatch { pattern, from } => {
                        let _ = writeln!(out, "ancestor-match = {}", q(pattern.0.as_str()));
                        if let Some(from) = from {
                            let _ = writeln!(out, "ancestor-of = {from}");
                        }
                    }
                }
            }
        }
        if let Some(mem) = &p.memory {
            let key = if service.is_watch() {
                "limit"
            } else {
                "max-rss"
            };
            let _ = writeln!(out, "{key} = {}", exact(mem.limit));
            if let Some(over) = mem.over_for {
                let _ = writeln!(out, "over-for = {:?}", dur(over));
            }
            if let Some(grace) = mem.startup_grace {
                let _ = writeln!(out, "startup-grace = {:?}", dur(grace));
            }
            if let Some(hard) = mem.hard_limit {
                let _ = writeln!(out, "hard-limit = {}", exact(hard));
            }
            let action = match &mem.action {
                crate::policy::MemoryAction::Restart => "restart",
                crate::policy::MemoryAction::Signal => "signal",
                crate::policy::MemoryAction::Marker => "marker",
                crate::policy::MemoryAction::Exec(_) => "exec",
            };
            let key = if service.is_watch() {
                "action"
            } else {
                "on-memory"
            };
            let _ = writeln!(out, "{key} = {action:?}");
            let signal = crate::exit::signal_name(mem.drain_signal).unwrap_or("?");
            if !service.is_watch() {
                let _ = writeln!(out, "drain-signal = {signal:?}");
            } else if action == "signal" {
                let _ = writeln!(out, "signal = {signal:?}");
            }
            if let crate::policy::MemoryAction::Exec(argv) = &mem.action {
                let _ = writeln!(out, "hook = {}", qs(argv));
                let _ = writeln!(out, "hook-timeout = {:?}", dur(service.hook_timeout));
            }
        }
        if let Some(marker) = &service.marker {
            let path = marker.path.display().to_string();
            if marker.path == config.daemon.marker_dir().join(&service.name) {
                // The default: its directory is created when the daemon starts.
                let _ = writeln!(out, "# marker-file = {}", q(&path));
            } else {
                let _ = writeln!(out, "marker-file = {}", q(&path));
            }
            let _ = writeln!(
                out,
                "marker-format = {:?}",
                match marker.format {
                    crate::service::MarkerFormat::KeyValue => "key-value",
                    crate::service::MarkerFormat::Json => "json",
                }
            );
            if let Some(after) = marker.clear_after {
                let _ = writeln!(out, "marker-clear-after = {:?}", dur(after));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// What `check-config` prints is itself a configuration it accepts,
    /// and means the same.
    #[test]
    fn the_effective_configuration_reads_back_the_same() {
        let full = "[daemon]\nsensor = \"sampling\"\norphans = \"adopt\"\n\
            [[service]]\nname = \"a\"\ncommand = [\"/bin/sleep\", \"1\"]\ncwd = \"/tmp\"\n\
            env = { A = \"1 2\", B = \"x\\\"y\" }\nuser = \"nobody\"\nsuccess-exit-codes = [0, 143]\n\
            max-rss = \"1GiB\"\nhard-limit = \"2GiB\"\nover-for = \"1s\"\non-memory = \"exec\"\n\
            hook = [\"/bin/true\", \"--x\"]\nhook-timeout = \"5s\"\nstop-signal = \"SIGINT\"\n\
            [[watch]]\nname = \"w\"\nancestor-match = \"sh\"\nancestor-of = 1\nlimit = \"1GiB\"\n\
            action = \"signal\"\nsignal = \"SIGUSR1\"\n\
            [[service]]\nname = \"odd\"\ncommand = [\"/bin/true\", \"a\\u0001b\", \"q\\\"\\\\\"]\n\
            env = { \"A.B\" = \"v\", \"C D\" = \"\\u0007\" }\nmax-rss = \"3.3333MiB\"\n\
            hard-limit = \"1000000000B\"\n";
        for text in [config::SAMPLE, full] {
            round_trip(text);
        }
    }

    fn round_trip(text: &str) {
        let sample = config::parse(Path::new("sample.toml"), text).unwrap();
        let printed = effective(&sample);
        let again = config::parse(Path::new("printed.toml"), &printed)
            .unwrap_or_else(|e| panic!("{e}\n{printed}"));
        assert_eq!(again.daemon, sample.daemon);
        assert_eq!(again.services.len(), sample.services.len());
        for (a, b) in again.services.iter().zip(&sample.services) {
            let (mut a, mut b) = (a.clone(), b.clone());
            a.policy.jitter_seed = 0;
            b.policy.jitter_seed = 0;
            assert_eq!(a, b);
        }
    }
}
