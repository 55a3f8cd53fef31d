//! A service's options, the same for `watchdog supervise` (flags) and a
//! `[[service]]` of the configuration file (kebab-case keys), and a watch
//! target's (`[[watch]]`). Each turns into a [`ServiceConfig`] here, after
//! every check that can be made before anything starts; a refusal names the
//! option (`--max-rss` on the command line, `max-rss` in the file).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::de;
use crate::{
    cmd::supervise::{parse_env, parse_signal},
    policy::{Config, MemoryAction, MemoryPolicy, RestartPolicy},
    runner::{Spec, User},
    service::{MarkerFormat, MarkerSpec, Pattern, Selector, ServiceConfig, Target},
    size::Size,
};

/// Defaults, documented in `--help`, the sample configuration and the
/// README.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_CRASHES: u32 = 5;
pub const DEFAULT_BACKOFF_FLOOR: Duration = Duration::from_secs(1);
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(60);
pub const DEFAULT_STABLE_AFTER: Duration = Duration::from_secs(300);
pub const DEFAULT_CLEAN_BUDGET: u32 = 10;
pub const DEFAULT_CLEAN_WINDOW: Duration = Duration::from_secs(60);

/// A refusal: which option, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The option's kebab-case name (`max-rss`); empty for the whole entry.
    pub key: &'static str,
    pub message: String,
}

/// How options are named in messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// `--max-rss`.
    Flags,
    /// `max-rss`.
    Keys,
}

impl Naming {
    fn name(self, key: &str) -> String {
        match self {
            Self::Flags => format!("--{key}"),
            Self::Keys => key.to_owned(),
        }
    }
}

fn problem<T>(key: &'static str, message: String) -> Result<T, Problem> {
    Err(Problem { key, message })
}

/// What to do over the memory limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnMemory {
    /// Drain, then start again.
    Restart,
    /// Send the drain signal only.
    Signal,
    /// Write the respawn-recommended marker.
    Marker,
    /// Run the hook.
    Exec,
}

/// One service's options.
#[derive(Clone, Debug, Default, clap::Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServiceOptions {
    /// The service's name in the audit log: letters, digits, '.', '_',
    /// '-' [default: the command's file name].
    #[arg(long)]
    pub name: Option<String>,
    /// Memory limit of the service's process tree (RssAnon + RssShmem;
    /// trees of several processes count each shared page once).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub max_rss: Option<Size>,
    /// Only act when the tree stays over --max-rss this long.
    #[arg(long, value_name = "DURATION", value_parser = de::parse_duration, requires = "max_rss", allow_hyphen_values = true)]
    #[serde(default, deserialize_with = "de::duration")]
    pub over_for: Option<Duration>,
    /// No --max-rss enforcement during the first moments of each run.
    #[arg(long, value_name = "DURATION", value_parser = de::parse_duration, requires = "max_rss", allow_hyphen_values = true)]
    #[serde(default, deserialize_with = "de::duration")]
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
    /// Time between the drain signal and SIGKILL of the whole tree
    /// [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = de::parse_duration, allow_hyphen_values = true)]
    #[serde(default, deserialize_with = "de::duration")]
    pub grace: Option<Duration>,
    /// The signal that asks the service to drain when it is over its
    /// memory limit (name or number) [default: SIGTERM].
    #[arg(long, value_name = "SIGNAL", value_parser = parse_signal, allow_hyphen_values = true)]
    #[serde(default, deserialize_with = "de::signal")]
    pub drain_signal: Option<i32>,
    /// The signal that asks the service to stop when the supervisor stops
    /// or the service is removed [default: the drain signal].
    #[arg(long, value_name = "SIGNAL", value_parser = parse_signal, allow_hyphen_values = true)]
    #[serde(default, deserialize_with = "de::signal")]
    pub stop_signal: Option<i32>,
    /// What to do over --max-rss: restart (drain, then start again),
    /// signal (send the drain signal only), marker (write the marker), or
    /// exec (run --hook) [default: restart].
    #[arg(long, value_enum, requires = "max_rss")]
    pub on_memory: Option<OnMemory>,
    /// Where `--on-memory marker` writes its respawn-recommended marker.
    #[arg(long, value_name = "FILE")]
    pub marker_file: Option<PathBuf>,
    /// The marker's form: key-value lines or one JSON object
    /// [default: key-value].
    #[arg(long, value_enum)]
    pub marker_format: Option<MarkerFormat>,
    /// Remove the marker once the service has stayed under its limit this
    /// long [default: only when the run exits].
    #[arg(long, value_name = "DURATION", value_parser = de::parse_duration)]
    #[serde(default, deserialize_with = "de::duration")]
    pub marker_clear_after: Option<Duration>,
    /// The program `--on-memory exec` runs (directly, never through a
    /// shell, as the service's user), with WATCHDOG_EVENT, WATCHDOG_NAME,
    /// WATCHDOG_PID, WATCHDOG_CHARGED_BYTES, WATCHDOG_LIMIT_BYTES and
    /// WATCHDOG_CAUSE in its environment. In the file: an argv list.
    #[arg(long, value_name = "PROGRAM", num_args = 1)]
    #[serde(default, deserialize_with = "de::argv")]
    pub hook: Option<Vec<String>>,
    /// An argument for the hook (repeatable).
    #[arg(
        long,
        value_name = "ARG",
        allow_hyphen_values = true,
        requires = "hook"
    )]
    #[serde(skip)]
    pub hook_arg: Vec<String>,
    /// A hook still running after this long is killed [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = de::parse_duration)]
    #[serde(default, deserialize_with = "de::duration")]
    pub hook_timeout: Option<Duration>,
    /// When to start the service again after it exits [default: always].
    #[arg(long, value_enum)]
    pub restart: Option<RestartPolicy>,
    /// Give up after this many crashes in a row [default: 5].
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub max_crashes: Option<u32>,
    /// The first (and shortest) wait before a restart after a crash
    /// [default: 1s].
    #[arg(long, value_name = "DURATION", value_parser = de::parse_duration, allow_hyphen_values = true)]
    #[serde(default, deserialize_with = "de::duration")]
    pub backoff_floor: Option<Duration>,
    /// The longest wait before a restart; the wait doubles up to it
    /// [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = de::parse_duration, allow_hyphen_values = true)]
    #[serde(default, deserialize_with = "de::duration")]
    pub backoff_cap: Option<Duration>,
    /// A run this long starts the crash count afresh [default: 5m].
    #[arg(long, value_name = "DURATION", value_parser = de::parse_duration, allow_hyphen_values = true)]
    #[serde(default, deserialize_with = "de::duration")]
    pub stable_after: Option<Duration>,
    /// Immediate restarts after clean exits allowed per --clean-window
    /// [default: 10].
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub clean_budget: Option<u32>,
    /// The window --clean-budget counts restarts in [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = de::parse_duration, allow_hyphen_values = true)]
    #[serde(default, deserialize_with = "de::duration")]
    pub clean_window: Option<Duration>,
    /// An exit code that counts as a clean exit, not a crash (repeatable)
    /// [default: 0].
    #[arg(
        long = "success-exit-code",
        value_name = "CODE",
        allow_hyphen_values = true
    )]
    #[serde(default, deserialize_with = "de::codes")]
    pub success_exit_codes: Vec<i32>,
    /// Run the service (and its hook) as this user and its groups.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// With --user: this group as the primary one instead of the user's.
    #[arg(long, value_name = "GROUP", requires = "user")]
    pub group: Option<String>,
    /// Working directory of the service.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<PathBuf>,
    /// Extra environment for the service (repeatable; in the file, a
    /// table).
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_env)]
    #[serde(default, deserialize_with = "de::env")]
    pub env: Vec<(String, String)>,
    /// The service's oom_score_adj, -1000 to 1000 (the supervisor shields
    /// itself with -1000) [default: 0].
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub oom_score_adj: Option<i32>,
    /// The command and its arguments (run directly, never through a shell).
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// A service or watch name: it names files (the marker, the run record,
/// the cgroup), so it is kept to a safe alphabet.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("the name {name:?} must be 1 to 64 characters long"));
    }
    if name == "." || name == ".." || name.starts_with('-') {
        return Err(format!("the name {name:?} is not allowed"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "the name {name:?} has {c:?}; use letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

impl ServiceOptions {
    /// The name it runs under: `name`, or the command's file name.
    pub fn effective_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            let program = self.command.first().map_or("", String::as_str);
            Path::new(program)
                .file_name()
                .map_or_else(|| program.to_owned(), |n| n.to_string_lossy().into_owned())
        })
    }

    /// The service these options describe, or the option that cannot work
    /// and why. `marker_dir` is where a marker goes without `marker-file`
    /// (the daemon's state directory), if anywhere.
    pub fn service(
        &self,
        naming: Naming,
        marker_dir: Option<&Path>,
    ) -> Result<ServiceConfig, Problem> {
        let n = |key: &str| naming.name(key);
        let name = self.effective_name();
        check_name(&name).map_err(|message| Problem {
            key: "name",
            message: format!("{}: {message}", n("name")),
        })?;
        if self
            .command
            .iter()
            .chain(self.hook.iter().flatten())
            .any(|a| a.contains('\0'))
        {
            return problem(
                "command",
                format!(
                    "{} has a NUL character, which no argument can hold",
                    n("command")
                ),
            );
        }
        if self.command.first().is_none_or(|p| p.is_empty()) {
            return problem(
                "command",
                format!("{} must name the program to run", n("command")),
            );
        }
        if let Some(code) = self
            .success_exit_codes
            .iter()
            .find(|c| !(0..=255).contains(*c))
        {
            return problem(
                "success-exit-codes",
                format!(
                    "{} {code}: an exit code is 0 to 255",
                    n("success-exit-codes")
                ),
            );
        }
        if self.group.is_some() && self.user.is_none() {
            return problem(
                "group",
                format!("{} needs {}: the user to run as", n("group"), n("user")),
            );
        }
        let max_crashes = self.max_crashes.unwrap_or(DEFAULT_MAX_CRASHES);
        if max_crashes == 0 {
            return problem(
                "max-crashes",
                format!("{} must be at least 1", n("max-crashes")),
            );
        }
        let backoff_floor = self.backoff_floor.unwrap_or(DEFAULT_BACKOFF_FLOOR);
        let backoff_cap = self.backoff_cap.unwrap_or(DEFAULT_BACKOFF_CAP);
        if backoff_floor > backoff_cap {
            return problem(
                "backoff-floor",
                format!(
                    "{} ({}) is longer than {} ({}); make the floor the shorter",
                    n("backoff-floor"),
                    humantime::format_duration(backoff_floor),
                    n("backoff-cap"),
                    humantime::format_duration(backoff_cap)
                ),
            );
        }
        let drain_signal = self.drain_signal.unwrap_or(libc::SIGTERM);
        for (key, signal) in [
            ("drain-signal", Some(drain_signal)),
            ("stop-signal", self.stop_signal),
        ] {
            if let Some(sig @ (libc::SIGCHLD | libc::SIGCONT | libc::SIGURG | libc::SIGWINCH)) =
                signal
            {
                return problem(
                    key,
                    format!(
                        "{} {}: ignored by default, so nothing would stop until the grace runs out; \
                         use SIGTERM, SIGINT, SIGQUIT or the signal the service handles",
                        n(key),
                        crate::exit::signal_name(sig).unwrap_or("this signal")
                    ),
                );
            }
            if signal == Some(libc::SIGSTOP) {
                return problem(
                    key,
                    format!(
                        "{} SIGSTOP would freeze the service, not stop it; use SIGTERM, \
                         SIGINT, SIGQUIT or the signal the service drains on",
                        n(key)
                    ),
                );
            }
        }
        if let Some(adj) = self.oom_score_adj
            && !(-1000..=1000).contains(&adj)
        {
            return problem(
                "oom-score-adj",
                format!(
                    "{} {adj} is out of range (-1000 to 1000)",
                    n("oom-score-adj")
                ),
            );
        }
        if self.hook_timeout.is_some_and(|t| t.is_zero()) {
            return problem(
                "hook-timeout",
                format!("{} must be more than 0", n("hook-timeout")),
            );
        }
        let on_memory = self.on_memory.unwrap_or(OnMemory::Restart);
        for (key, set) in [
            ("over-for", self.over_for.is_some()),
            ("startup-grace", self.startup_grace.is_some()),
            ("hard-limit", self.hard_limit.is_some()),
            ("on-memory", self.on_memory.is_some()),
        ] {
            if set && self.max_rss.is_none() {
                return problem(
                    key,
                    format!("{} needs {}: set the memory limit", n(key), n("max-rss")),
                );
            }
        }
        if self.hook.is_some() && on_memory != OnMemory::Exec {
            return problem(
                "hook",
                format!("{} is only used with {} exec", n("hook"), n("on-memory")),
            );
        }
        if (self.marker_file.is_some()
            || self.marker_format.is_some()
            || self.marker_clear_after.is_some())
            && on_memory != OnMemory::Marker
        {
            let key = if self.marker_file.is_some() {
                "marker-file"
            } else if self.marker_format.is_some() {
                "marker-format"
            } else {
                "marker-clear-after"
            };
            return problem(
                key,
                format!("{} is only used with {} marker", n(key), n("on-memory")),
            );
        }
        if let Some(cwd) = &self.cwd {
            if !cwd.exists() {
                return problem(
                    "cwd",
                    format!(
                        "{} {}: no such directory; pass an existing directory",
                        n("cwd"),
                        cwd.display()
                    ),
                );
            }
            if !cwd.is_dir() {
                return problem(
                    "cwd",
                    format!("{} {}: not a directory", n("cwd"), cwd.display()),
                );
            }
        }
        check_program(naming, "command", &self.command[0], self.cwd.as_deref())?;
        let grace = self.grace.unwrap_or(DEFAULT_GRACE);
        let mut marker = None;
        let memory = match self.max_rss {
            None => None,
            Some(limit) if limit.bytes() == 0 => {
                return problem("max-rss", format!("{} must be more than 0", n("max-rss")));
            }
            Some(limit) => {
                if let Some(hard) = self.hard_limit
                    && hard.bytes() < limit.bytes()
                {
                    return problem(
                        "hard-limit",
                        format!(
                            "{} ({hard}) is under {} ({limit}); the hard limit must be at least the soft one",
                            n("hard-limit"),
                            n("max-rss")
                        ),
                    );
                }
                let action = match on_memory {
                    OnMemory::Restart => MemoryAction::Restart,
                    OnMemory::Signal => MemoryAction::Signal,
                    OnMemory::Marker => {
                        marker = Some(self.marker(&name, naming, marker_dir)?);
                        MemoryAction::Marker
                    }
                    OnMemory::Exec => MemoryAction::Exec(self.hook_argv(naming)?),
                };
                Some(MemoryPolicy {
                    limit: limit.bytes(),
                    over_for: self.over_for,
                    startup_grace: self.startup_grace,
                    hard_limit: self.hard_limit.map(Size::bytes),
                    drain_signal,
                    grace,
                    action,
                })
            }
        };
        let user = match &self.user {
            Some(user_name) => {
                let mut user = User::lookup(user_name).map_err(|e| Problem {
                    key: "user",
                    message: format!("{} {user_name}: {e}", n("user")),
                })?;
                if let Some(group) = &self.group {
                    user = user.with_group(group).map_err(|e| Problem {
                        key: "group",
                        message: format!("{} {group}: {e}", n("group")),
                    })?;
                }
                Some(user)
            }
            None => None,
        };
        Ok(ServiceConfig {
            name,
            target: Target::Spawn(Spec {
                argv: self.command.clone(),
                env: self.env.clone(),
                cwd: self.cwd.clone(),
                user,
                oom_score_adj: self.oom_score_adj.unwrap_or(0),
                outlive_supervisor: false,
            }),
            policy: Config {
                restart: self.restart.unwrap_or_default(),
                max_crashes,
                backoff_floor,
                backoff_cap,
                stable_after: self.stable_after.unwrap_or(DEFAULT_STABLE_AFTER),
                clean_budget: self.clean_budget.unwrap_or(DEFAULT_CLEAN_BUDGET),
                clean_window: self.clean_window.unwrap_or(DEFAULT_CLEAN_WINDOW),
                success_codes: if self.success_exit_codes.is_empty() {
                    vec![0]
                } else {
                    self.success_exit_codes.clone()
                },
                shutdown_grace: grace,
                stop_signal: self.stop_signal.unwrap_or(drain_signal),
                memory,
                watch: false,
                jitter_seed: u64::from(std::process::id()) ^ 0x9e37_79b9_7f4a_7c15,
            },
            marker,
            hook_timeout: self.hook_timeout.unwrap_or(DEFAULT_HOOK_TIMEOUT),
        })
    }

    fn marker(
        &self,
        name: &str,
        naming: Naming,
        marker_dir: Option<&Path>,
    ) -> Result<MarkerSpec, Problem> {
        marker_spec(
            name,
            self.marker_file.as_deref(),
            self.marker_format,
            self.marker_clear_after,
            naming,
            marker_dir,
        )
    }

    fn hook_argv(&self, naming: Naming) -> Result<Vec<String>, Problem> {
        let Some(hook) = &self.hook else {
            return problem(
                "hook",
                format!(
                    "{} exec needs {}: the program to run",
                    naming.name("on-memory"),
                    naming.name("hook")
                ),
            );
        };
        check_executable(naming, &hook[0])?;
        Ok(hook.iter().chain(&self.hook_arg).cloned().collect())
    }
}

/// What a watch target does over its limit. It never kills unless told to
/// (`signal` with SIGKILL).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WatchAction {
    #[default]
    Marker,
    Signal,
    Exec,
}

/// A `[[watch]]`: processes the daemon did not start.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct WatchOptions {
    pub name: String,
    /// This process and its descendants.
    pub pid: Option<u32>,
    /// The outermost process whose full command line matches this regex.
    #[serde(rename = "match")]
    pub pattern: Option<String>,
    /// The first ancestor of `ancestor-of` (the daemon by default) whose
    /// command line matches this regex.
    pub ancestor_match: Option<String>,
    pub ancestor_of: Option<u32>,
    pub limit: Option<Size>,
    #[serde(default, deserialize_with = "de::duration")]
    pub over_for: Option<Duration>,
    pub hard_limit: Option<Size>,
    pub action: Option<WatchAction>,
    /// The signal of `action = "signal"` [default: SIGTERM].
    #[serde(default, deserialize_with = "de::signal")]
    pub signal: Option<i32>,
    pub marker_file: Option<PathBuf>,
    pub marker_format: Option<MarkerFormat>,
    #[serde(default, deserialize_with = "de::duration")]
    pub marker_clear_after: Option<Duration>,
    #[serde(default, deserialize_with = "de::argv")]
    pub hook: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de::duration")]
    pub hook_timeout: Option<Duration>,
}

impl WatchOptions {
    /// The watch target these options describe, or the key that cannot
    /// work and why.
    pub fn watch(&self, marker_dir: Option<&Path>) -> Result<ServiceConfig, Problem> {
        let naming = Naming::Keys;
        check_name(&self.name).map_err(|message| Problem {
            key: "name",
            message: format!("name: {message}"),
        })?;
        let regex = |key: &'static str, text: &str| {
            regex::Regex::new(text).map(Pattern).map_err(|e| Problem {
                key,
                message: format!("{key}: invalid regular expression: {e}"),
            })
        };
        let selectors = [
            self.pid.is_some(),
            self.pattern.is_some(),
            self.ancestor_match.is_some(),
        ]
        .into_iter()
        .filter(|&set| set)
        .count();
        if selectors != 1 {
            return problem(
                "",
                format!(
                    "watch {:?} needs exactly one of pid, match or ancestor-match to say which process it watches{}",
                    self.name,
                    if selectors > 1 {
                        " (it has several)"
                    } else {
                        ""
                    }
                ),
            );
        }
        if self.ancestor_of.is_some() && self.ancestor_match.is_none() {
            return problem(
                "ancestor-of",
                "ancestor-of is only used with ancestor-match".into(),
            );
        }
        let selector = if let Some(pid) = self.pid {
            if pid == 0 {
                return problem("pid", "pid must be more than 0".into());
            }
            Selector::Pid(pid)
        } else if let Some(text) = &self.pattern {
            Selector::Match(regex("match", text)?)
        } else {
            Selector::AncestorMatch {
                pattern: regex(
                    "ancestor-match",
                    self.ancestor_match.as_deref().unwrap_or(""),
                )?,
                from: self.ancestor_of,
            }
        };
        let limit = match self.limit {
            None => {
                return problem(
                    "limit",
                    "limit is missing: the memory limit to watch for, e.g. limit = \"8GiB\"".into(),
                );
            }
            Some(l) if l.bytes() == 0 => {
                return problem("limit", "limit must be more than 0".into());
            }
            Some(l) => l,
        };
        if let Some(hard) = self.hard_limit
            && hard.bytes() < limit.bytes()
        {
            return problem(
                "hard-limit",
                format!(
                    "hard-limit ({hard}) is under limit ({limit}); the hard limit must be at least the soft one"
                ),
            );
        }
        if self.hook_timeout.is_some_and(|t| t.is_zero()) {
            return problem("hook-timeout", "hook-timeout must be more than 0".into());
        }
        let action = self.action.unwrap_or_default();
        if self.signal.is_some() && action != WatchAction::Signal {
            return problem(
                "signal",
                "signal is only used with action = \"signal\"".into(),
            );
        }
        if self.hook.is_some() && action != WatchAction::Exec {
            return problem("hook", "hook is only used with action = \"exec\"".into());
        }
        if (self.marker_file.is_some() || self.marker_format.is_some())
            && action != WatchAction::Marker
        {
            let key = if self.marker_file.is_some() {
                "marker-file"
            } else {
                "marker-format"
            };
            return problem(key, format!("{key} is only used with action = \"marker\""));
        }
        let mut marker = None;
        let action = match action {
            WatchAction::Marker => {
                marker = Some(marker_spec(
                    &self.name,
                    self.marker_file.as_deref(),
                    self.marker_format,
                    self.marker_clear_after,
                    naming,
                    marker_dir,
                )?);
                MemoryAction::Marker
            }
            WatchAction::Signal => {
                if self.signal == Some(libc::SIGSTOP) {
                    return problem("signal", "signal SIGSTOP would freeze the process; use SIGTERM or the signal it handles".into());
                }
                MemoryAction::Signal
            }
            WatchAction::Exec => {
                let Some(hook) = &self.hook else {
                    return problem(
                        "hook",
                        "action = \"exec\" needs hook: the program to run, as a list".into(),
                    );
                };
                check_executable(naming, &hook[0])?;
                MemoryAction::Exec(hook.clone())
            }
        };
        Ok(ServiceConfig {
            name: self.name.clone(),
            target: Target::Watch(selector),
            policy: Config {
                restart: RestartPolicy::Always,
                max_crashes: u32::MAX,
                memory: Some(MemoryPolicy {
                    limit: limit.bytes(),
                    over_for: self.over_for,
                    startup_grace: None,
                    hard_limit: self.hard_limit.map(Size::bytes),
                    drain_signal: self.signal.unwrap_or(libc::SIGTERM),
                    grace: DEFAULT_GRACE,
                    action,
                }),
                watch: true,
                ..Config::default()
            },
            marker,
            hook_timeout: self.hook_timeout.unwrap_or(DEFAULT_HOOK_TIMEOUT),
        })
    }
}

/// Where a marker goes: `marker-file`, else `<marker_dir>/<name>`; its
/// directory must exist (or be creatable under the state directory) and be
/// writable.
fn marker_spec(
    name: &str,
    file: Option<&Path>,
    format: Option<MarkerFormat>,
    clear_after: Option<Duration>,
    naming: Naming,
    marker_dir: Option<&Path>,
) -> Result<MarkerSpec, Problem> {
    let key = naming.name("marker-file");
    let path = match (file, marker_dir) {
        (Some(path), _) => {
            check_marker_dir(&key, path)?;
            path.to_owned()
        }
        // The daemon creates its marker directory when it starts.
        (None, Some(dir)) => dir.join(name),
        (None, None) => {
            return problem(
                "marker-file",
                format!("{key} is missing: where the marker is written"),
            );
        }
    };
    if clear_after.is_some_and(|d| d.is_zero()) {
        return problem(
            "marker-clear-after",
            format!("{} must be more than 0", naming.name("marker-clear-after")),
        );
    }
    Ok(MarkerSpec {
        path,
        format: format.unwrap_or_default(),
        clear_after,
    })
}

/// A marker's directory must exist and be writable by us.
fn check_marker_dir(key: &str, path: &Path) -> Result<(), Problem> {
    if path.is_dir() {
        return problem(
            "marker-file",
            format!(
                "{key} {}: a directory; name the marker file itself",
                path.display()
            ),
        );
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return problem(
            "marker-file",
            format!(
                "{key} {}: the directory {} does not exist; create it or choose another path",
                path.display(),
                dir.display()
            ),
        );
    }
    if !access(dir, libc::W_OK | libc::X_OK) {
        return problem(
            "marker-file",
            format!(
                "{key} {}: the directory {} is not writable by this user",
                path.display(),
                dir.display()
            ),
        );
    }
    Ok(())
}

/// `program` must be an executable file (looked up in PATH when it has no
/// slash, as it will be at run time).
pub fn check_executable(naming: Naming, program: &str) -> Result<(), Problem> {
    check_program(naming, "hook", program, None)
}

/// `program`, given by `key`, must be an executable file (looked up in PATH
/// when it has no slash, as it will be at run time).
fn check_program(
    naming: Naming,
    key: &'static str,
    program: &str,
    cwd: Option<&Path>,
) -> Result<(), Problem> {
    let name = match (naming, key) {
        (Naming::Flags, "command") => "the command".to_owned(),
        _ => naming.name(key),
    };
    let found = if program.contains('/') {
        // A relative path is taken from the working directory the program
        // starts in.
        Some(cwd.map_or_else(|| PathBuf::from(program), |dir| dir.join(program)))
    } else {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(program))
                .find(|candidate| candidate.is_file())
        })
    };
    match found {
        None => problem(
            key,
            format!("{name} {program}: no such program; give a path or a program in PATH"),
        ),
        Some(path) if !path.exists() => {
            problem(key, format!("{name} {}: no such program", path.display()))
        }
        Some(path) if !path.is_file() => {
            problem(key, format!("{name} {}: not a file", path.display()))
        }
        Some(path) if !access(&path, libc::X_OK) => problem(
            key,
            format!("{name} {}: not executable; chmod +x it", path.display()),
        ),
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
