//! The daemon's configuration file (TOML, kebab-case keys, unknown keys
//! refused): `[daemon]`, `[[service]]` and `[[watch]]`. Loading checks
//! everything that can be checked before anything starts; an error names
//! the file, the line and column, the key, and what is expected.

pub mod de;
pub mod options;

use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    cmd::LogFormat,
    hostmem::Threshold,
    sensor::{SamplingOptions, SensorChoice},
    service::ServiceConfig,
};
pub use options::{Naming, OnMemory, Problem, ServiceOptions, WatchOptions};

/// Where the daemon looks for its configuration by default.
pub const DEFAULT_CONFIG: &str = "/etc/watchdog/watchdog.toml";
pub const DEFAULT_STATE_DIR: &str = "/run/watchdog";
/// The shortest `health-timeout`: a few of the loop's heartbeats (one a
/// second), so that a loop that turns is never reported stuck.
pub const MIN_HEALTH_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_AUDIT_LOG: &str = "/var/log/watchdog/audit.jsonl";

/// What to do with the runs a previous instance left alive (it was killed
/// without draining them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Orphans {
    /// Drain them (stop signal, grace, SIGKILL) before starting afresh.
    #[default]
    Terminate,
    /// Supervise them as they are.
    Adopt,
}

/// `[daemon]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct DaemonSection {
    pub state_dir: PathBuf,
    pub audit_log: PathBuf,
    pub audit_fsync: bool,
    pub sensor: SensorChoice,
    #[serde(deserialize_with = "required_duration")]
    pub interval: Duration,
    #[serde(deserialize_with = "required_duration")]
    pub min_interval: Duration,
    #[serde(deserialize_with = "required_duration")]
    pub rescan: Duration,
    pub log_format: Option<LogFormat>,
    pub orphans: Orphans,
    #[serde(deserialize_with = "required_duration")]
    pub orphan_grace: Duration,
    pub cgroups: bool,
    pub oom_score_adj: i32,
    pub mlock: bool,
    pub nice: i32,
    pub realtime: bool,
    /// The HTTP listener for /healthz and /metrics (none when absent).
    #[serde(deserialize_with = "listen_address")]
    pub listen: Option<std::net::SocketAddr>,
    /// Whether `listen` may be an address other hosts can reach.
    pub allow_remote: bool,
    /// /healthz fails when the loop's heartbeat is older than this.
    #[serde(deserialize_with = "required_duration")]
    pub health_timeout: Duration,
    /// Host (or container) memory in use over which a warning is logged.
    pub host_memory_warn: Threshold,
    /// ... and under which the recovery is logged (default: 5 points
    /// under the warning level).
    pub host_memory_recover: Option<Threshold>,
    /// How often the host's memory is sampled (PSI wakes it sooner).
    #[serde(deserialize_with = "required_duration")]
    pub host_memory_interval: Duration,
}

impl Default for DaemonSection {
    fn default() -> Self {
        Self {
            state_dir: DEFAULT_STATE_DIR.into(),
            audit_log: DEFAULT_AUDIT_LOG.into(),
            audit_fsync: false,
            sensor: SensorChoice::Auto,
            interval: Duration::from_secs(1),
            min_interval: Duration::from_millis(50),
            rescan: Duration::from_secs(2),
            log_format: None,
            orphans: Orphans::Terminate,
            orphan_grace: Duration::from_secs(10),
            cgroups: true,
            oom_score_adj: -1000,
            mlock: true,
            nice: -10,
            realtime: false,
            listen: None,
            allow_remote: false,
            health_timeout: Duration::from_secs(30),
            host_memory_warn: Threshold::Percent(90.0),
            host_memory_recover: None,
            host_memory_interval: Duration::from_secs(5),
        }
    }
}

impl DaemonSection {
    pub fn sampling(&self) -> SamplingOptions {
        SamplingOptions {
            interval: self.interval,
            min_interval: self.min_interval,
        }
    }

    /// Where markers go without a `marker-file`.
    pub fn marker_dir(&self) -> PathBuf {
        self.state_dir.join("respawn-recommended")
    }
}

impl DaemonSection {
    /// The recovery level of the host memory warning.
    pub fn host_memory_recovery(&self) -> Threshold {
        self.host_memory_recover
            .unwrap_or_else(|| self.host_memory_warn.default_recovery())
    }
}

fn listen_address<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<std::net::SocketAddr>, D::Error> {
    use serde::de::Error;
    let text = String::deserialize(d).map_err(|_| {
        D::Error::custom("expected an address and port in quotes, such as \"127.0.0.1:9731\"")
    })?;
    text.trim().parse().map(Some).map_err(|_| {
        D::Error::custom(format!(
            "invalid address {text:?}: write an IP address and a port, such as \"127.0.0.1:9731\" or \"[::1]:9731\""
        ))
    })
}

fn required_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    de::duration(d).map(|d| d.unwrap_or_default())
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    daemon: DaemonSection,
    #[serde(default)]
    service: Vec<ServiceOptions>,
    #[serde(default)]
    watch: Vec<WatchOptions>,
}

/// A checked configuration.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub file: Option<PathBuf>,
    pub daemon: DaemonSection,
    /// Services, then watch targets, in file order.
    pub services: Vec<ServiceConfig>,
}

/// Why a configuration file was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the error is about the file as a whole.
    pub line: usize,
    pub column: usize,
    /// Where in the document: `service[1].max-rss`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Reads and checks a configuration file.
pub fn load(path: &Path) -> Result<DaemonConfig, ConfigError> {
    parse(path, &read(path)?)
}

/// Reads only the `[daemon]` section of a configuration file (what
/// `watchdog status` needs: its services' programs may not exist here).
pub fn load_daemon(path: &Path) -> Result<DaemonSection, ConfigError> {
    #[derive(Deserialize)]
    struct DaemonOnly {
        #[serde(default)]
        daemon: DaemonSection,
    }
    let text = read(path)?;
    toml::from_str::<DaemonOnly>(&text)
        .map(|d| d.daemon)
        .map_err(|e| {
            let offset = e.span().map(|s| s.start);
            let (line, column) = offset.map_or((0, 0), |o| line_column(&text, o));
            ConfigError {
                file: path.to_owned(),
                line,
                column,
                key: offset.map(|o| key_at(&text, o)).unwrap_or_default(),
                message: e.message().trim().to_owned(),
            }
        })
}

/// A configuration file's text.
fn read(path: &Path) -> Result<String, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        line: 0,
        column: 0,
        key: String::new(),
        message: match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                "no such file; write one (watchdog run --sample-config > {}) or name another file",
                path.display()
            ),
            _ => format!("cannot read it: {e}"),
        },
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let text = String::from_utf8_lossy(&e.as_bytes()[..valid]).into_owned();
        let (line, column) = line_column(&text, valid);
        ConfigError {
            file: path.to_owned(),
            line,
            column,
            key: String::new(),
            message: "not UTF-8 text; a configuration file is UTF-8".into(),
        }
    })?;
    Ok(text)
}

/// Checks a configuration given as text (`path` names it in errors).
pub fn parse(path: &Path, text: &str) -> Result<DaemonConfig, ConfigError> {
    let at = |offset: Option<usize>, key: String, message: String| {
        let (line, column) = offset.map_or((0, 0), |o| line_column(text, o));
        ConfigError {
            file: path.to_owned(),
            line,
            column,
            key,
            message,
        }
    };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let offset = e.span().map(|s| s.start);
        let key = offset.map(|o| key_at(text, o)).unwrap_or_default();
        at(offset, key, e.message().trim().to_owned())
    })?;
    let mut daemon = raw.daemon;
    let located = |table: &str, index: usize, problem: Problem| {
        let (offset, key) = locate(text, table, index, problem.key);
        at(offset, key, problem.message)
    };
    for (key, value) in [
        ("interval", daemon.interval),
        ("min-interval", daemon.min_interval),
        ("orphan-grace", daemon.orphan_grace),
        ("health-timeout", daemon.health_timeout),
        ("host-memory-interval", daemon.host_memory_interval),
    ] {
        if value.is_zero() {
            let (offset, path) = locate_daemon(text, key);
            return Err(at(offset, path, format!("{key} must be more than 0")));
        }
    }
    if daemon.min_interval > daemon.interval {
        let (offset, key) = locate_daemon(text, "min-interval");
        return Err(at(
            offset,
            key,
            format!(
                "min-interval ({}) is longer than interval ({}); make the minimum the shorter",
                humantime::format_duration(daemon.min_interval),
                humantime::format_duration(daemon.interval)
            ),
        ));
    }
    if daemon.rescan.is_zero() {
        let (offset, key) = locate_daemon(text, "rescan");
        return Err(at(
            offset,
            key,
            "rescan must be more than 0 (for example 2s)".into(),
        ));
    }
    if !(-1000..=1000).contains(&daemon.oom_score_adj) {
        let (offset, key) = locate_daemon(text, "oom-score-adj");
        return Err(at(
            offset,
            key,
            "oom-score-adj must be between -1000 and 1000".into(),
        ));
    }
    if let Some(addr) = daemon.listen
        && !addr.ip().to_canonical().is_loopback()
        && !daemon.allow_remote
    {
        let (offset, key) = locate_daemon(text, "listen");
        return Err(at(
            offset,
            key,
            format!(
                "{addr} can be reached from other hosts, and /metrics tells what runs here: \
                 listen on a loopback address (127.0.0.1:{port}), or set allow-remote = true \
                 to expose it on purpose",
                port = addr.port()
            ),
        ));
    }
    if let Some(addr) = daemon.listen
        && addr.port() == 0
    {
        let (offset, key) = locate_daemon(text, "listen");
        return Err(at(
            offset,
            key,
            format!("{addr} has no port: name one, such as 127.0.0.1:9731"),
        ));
    }
    for (key, value, least) in [
        ("health-timeout", daemon.health_timeout, MIN_HEALTH_TIMEOUT),
        (
            "host-memory-interval",
            daemon.host_memory_interval,
            Duration::from_millis(100),
        ),
    ] {
        if value < least {
            let (offset, path) = locate_daemon(text, key);
            return Err(at(
                offset,
                path,
                format!(
                    "{key} must be at least {} (it is {})",
                    humantime::format_duration(least),
                    humantime::format_duration(value)
                ),
            ));
        }
    }
    let socket = daemon.state_dir.join(crate::status::SOCKET);
    if socket.as_os_str().len() > 107 {
        let (offset, key) = locate_daemon(text, "state-dir");
        return Err(at(
            offset,
            key,
            format!(
                "the status socket {} would be {} bytes long, and a Unix socket's path is at \
                 most 107: use a shorter state-dir",
                socket.display(),
                socket.as_os_str().len()
            ),
        ));
    }
    for (key, level) in [
        ("host-memory-warn", Some(daemon.host_memory_warn)),
        ("host-memory-recover", daemon.host_memory_recover),
    ] {
        if let Some(Threshold::Bytes(b)) = level
            && b < 1 << 20
        {
            let (offset, path) = locate_daemon(text, key);
            return Err(at(
                offset,
                path,
                format!("{key} must be at least 1MiB (or a share, such as \"90%\")"),
            ));
        }
    }
    if let Some(recover) = daemon.host_memory_recover {
        let warn = daemon.host_memory_warn;
        let problem = match (warn, recover) {
            (Threshold::Percent(w), Threshold::Percent(r)) if r >= w => Some(format!(
                "host-memory-recover ({recover}) must be under host-memory-warn ({warn})"
            )),
            (Threshold::Bytes(w), Threshold::Bytes(r)) if r >= w => Some(format!(
                "host-memory-recover ({}) must be under host-memory-warn ({})",
                crate::size::Size(r),
                crate::size::Size(w)
            )),
            (Threshold::Percent(_), Threshold::Bytes(_))
            | (Threshold::Bytes(_), Threshold::Percent(_)) => Some(
                "host-memory-recover must be written like host-memory-warn: both shares \
                 (\"85%\") or both sizes (\"12GiB\")"
                    .to_owned(),
            ),
            _ => None,
        };
        if let Some(message) = problem {
            let (offset, key) = locate_daemon(text, "host-memory-recover");
            return Err(at(offset, key, message));
        }
    }
    // Resolved, so that a file that spells out the default reads the same.
    daemon.host_memory_recover = Some(daemon.host_memory_recovery());
    if !(-20..=19).contains(&daemon.nice) {
        let (offset, key) = locate_daemon(text, "nice");
        return Err(at(offset, key, "nice must be between -20 and 19".into()));
    }
    let marker_dir = daemon.marker_dir();
    let mut services = Vec::new();
    let mut seen: std::collections::HashMap<String, (&str, usize)> = Default::default();
    let checked = raw
        .service
        .iter()
        .enumerate()
        .map(|(i, o)| ("service", i, o.service(Naming::Keys, Some(&marker_dir))))
        .chain(
            raw.watch
                .iter()
                .enumerate()
                .map(|(i, o)| ("watch", i, o.watch(Some(&marker_dir)))),
        );
    for (table, i, result) in checked {
        let config = result.map_err(|p| located(table, i, p))?;
        if let Some((first_table, first)) = seen.insert(config.name.clone(), (table, i)) {
            return Err(located(
                table,
                i,
                Problem {
                    key: "name",
                    message: format!(
                        "the name {:?} is already used by {first_table}[{first}]; names must be unique",
                        config.name
                    ),
                },
            ));
        }
        services.push(config);
    }
    Ok(DaemonConfig {
        file: Some(path.to_owned()),
        daemon,
        services,
    })
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[start..].chars().count() + 1)
}

/// The path of the key on the line of `offset`, from the table header
/// above it: `service[1].max-rss`, `daemon.sensor`.
fn key_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let mut table = String::new();
    let mut counts: std::collections::HashMap<&str, usize> = Default::default();
    let line_end = text[line_start..]
        .find('\n')
        .map_or(text.len(), |i| line_start + i);
    for line in text[..line_end].lines() {
        let line = line.trim();
        if let Some(name) = line
            .strip_prefix("[[")
            .and_then(|l| l.split_once("]]"))
            .map(|(n, _)| n)
        {
            let name = name.trim();
            let n = counts.entry(name).or_default();
            table = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(name) = line
            .strip_prefix('[')
            .filter(|l| !l.starts_with('['))
            .and_then(|l| l.split_once(']'))
            .map(|(n, _)| n)
        {
            table = name.trim().to_owned();
        } else if line.starts_with('[') {
            // A broken header: no table to name.
            table.clear();
        }
    }
    let line = text[line_start..].lines().next().unwrap_or("");
    if line.trim_start().starts_with('[') {
        return table;
    }
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"'))
        .unwrap_or("");
    match (table.is_empty(), key.is_empty()) {
        (_, true) => table,
        (true, false) => key.to_owned(),
        (false, false) => format!("{table}.{key}"),
    }
}

/// Where `table[index].key` is (the entry itself when `key` is empty or
/// absent), and its dotted path.
fn locate(text: &str, table: &str, index: usize, key: &str) -> (Option<usize>, String) {
    use toml::de::{DeTable, DeValue};
    let entry = format!("{table}[{index}]");
    let Ok(doc) = DeTable::parse(text) else {
        return (None, entry);
    };
    let doc = doc.into_inner();
    let Some(DeValue::Array(items)) = doc.get(table).map(|v| v.get_ref()) else {
        return (None, entry);
    };
    let Some(item) = items.get(index) else {
        return (None, entry);
    };
    if let DeValue::Table(fields) = item.get_ref()
        && !key.is_empty()
        && let Some((k, _)) = fields.iter().find(|(k, _)| k.get_ref() == key)
    {
        return (Some(k.span().start), format!("{entry}.{key}"));
    }
    (Some(item.span().start), entry)
}

fn locate_daemon(text: &str, key: &str) -> (Option<usize>, String) {
    use toml::de::{DeTable, DeValue};
    let path = format!("daemon.{key}");
    let Ok(doc) = DeTable::parse(text) else {
        return (None, path);
    };
    let doc = doc.into_inner();
    let Some(DeValue::Table(fields)) = doc.get("daemon").map(|v| v.get_ref()) else {
        return (None, path);
    };
    let offset = fields
        .iter()
        .find(|(k, _)| k.get_ref() == key)
        .map(|(k, _)| k.span().start);
    (offset, path)
}

/// A commented example that `check-config` accepts.
pub const SAMPLE: &str = include_str!("sample.toml");

#[cfg(test)]
mod tests;
