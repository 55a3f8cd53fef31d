//! `watchdog status`: asks the running daemon, over its status socket, what
//! it is doing, and prints the answer as a table (or as JSON).
//!
//! The protocol: connect to `<state-dir>/status.sock`, write the line
//! `status`, read one JSON document until end of file: a [`Snapshot`], or
//! `{"error": "..."}` when the daemon cannot answer.

use std::{
    fmt::Write as _,
    io::{ErrorKind, IsTerminal, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::anyhow;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    cmd::CliError,
    config,
    size::Size,
    status::{self, Kind, ServiceStatus, Snapshot, State},
};

/// Arguments of `watchdog status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The daemon's configuration file: its [daemon] state-dir holds the
    /// socket [default: /etc/watchdog/watchdog.toml when it exists, else
    /// the state directory /run/watchdog].
    #[arg(long, value_name = "FILE", conflicts_with = "state_dir")]
    pub config: Option<PathBuf>,
    /// The daemon's state directory (the one holding status.sock), for a
    /// daemon started with --state-dir.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Print the daemon's snapshot as JSON (every field, pretty-printed).
    /// Either way the exit code is 0 when the daemon is healthy, 3 when it
    /// answers that it is not, 1 when it does not answer.
    #[arg(long)]
    pub json: bool,
}

/// How long connecting, asking and reading the answer may take in all.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The largest answer read: a snapshot of thousands of services is far
/// smaller; anything bigger is not a daemon's answer.
const MAX_ANSWER: u64 = 64 << 20;

/// The longest socket path `connect` takes (`sun_path` less its NUL).
#[cfg(target_os = "linux")]
const MAX_SOCKET_PATH: usize = 107;
#[cfg(not(target_os = "linux"))]
const MAX_SOCKET_PATH: usize = 103;

/// The exit code when the daemon answers that it is unhealthy.
pub const UNHEALTHY: u8 = 3;

/// The width the table fits in.
const WIDTH: usize = 80;

pub async fn run(args: StatusArgs) -> Result<ExitCode, CliError> {
    let dir = state_dir(&args)?;
    let socket = dir.join(status::SOCKET);
    let snapshot = query(&socket, TIMEOUT).await?;
    let text = if args.json {
        let mut json = serde_json::to_string_pretty(&snapshot)
            .map_err(|e| anyhow!("cannot write the snapshot as JSON: {e}"))?;
        json.push('\n');
        json
    } else {
        let colour = std::io::stdout().is_terminal()
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
            && std::env::var_os("TERM").is_none_or(|t| t != "dumb");
        render(&snapshot, colour)
    };
    // A daemon that answers but is unhealthy: exit 3, for probes and
    // scripts (1 is no answer at all).
    let code = if snapshot.health.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(UNHEALTHY)
    };
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(code),
        // `watchdog status | head`: the reader has what it wanted.
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(code),
        Err(e) => Err(anyhow!("cannot write to standard output: {e}").into()),
    }
}

/// The state directory holding the socket: named, or the configuration
/// file's (the default file's when it exists), or the default one.
fn state_dir(args: &StatusArgs) -> Result<PathBuf, CliError> {
    if let Some(dir) = &args.state_dir {
        return Ok(dir.clone());
    }
    let (file, named) = match &args.config {
        Some(file) => (file.clone(), true),
        None => (PathBuf::from(config::DEFAULT_CONFIG), false),
    };
    if !named && !file.exists() {
        return Ok(PathBuf::from(config::DEFAULT_STATE_DIR));
    }
    match config::load_daemon(&file) {
        Ok(daemon) => Ok(daemon.state_dir),
        Err(e) if named => Err(CliError::Usage(e.to_string())),
        Err(e) => Err(CliError::Usage(format!(
            "{e} (the default configuration file; name the daemon's state \
             directory with --state-dir instead)"
        ))),
    }
}

/// Asks the daemon at `socket` for its snapshot, within `timeout`.
pub async fn query(socket: &Path, timeout: Duration) -> Result<Snapshot, CliError> {
    let length = socket.as_os_str().len();
    if length > MAX_SOCKET_PATH {
        return Err(CliError::Usage(format!(
            "the socket path {} is {length} bytes long; a Unix socket path \
             has at most {MAX_SOCKET_PATH}: give the daemon a shorter state-dir",
            socket.display()
        )));
    }
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| connect_error(socket, &e))?;
        // A daemon that answers without reading (an error, at once) may
        // have closed its end already: its answer is still to be read.
        let asked = stream.write_all(b"status\n").await;
        if let Err(e) = &asked
            && !matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset)
        {
            return Err(anyhow!(
                "cannot ask the daemon at {}: {e}",
                socket.display()
            ));
        }
        let mut answer = Vec::new();
        let read = (&mut stream)
            .take(MAX_ANSWER + 1)
            .read_to_end(&mut answer)
            .await;
        match read {
            Ok(_) => {}
            // Closing with our request unread resets the connection after
            // the answer: what was read is checked as JSON below.
            Err(e) if e.kind() == ErrorKind::ConnectionReset && !answer.is_empty() => {}
            Err(e) => {
                return Err(anyhow!(
                    "cannot read the daemon's answer at {}: {e}",
                    socket.display()
                ));
            }
        }
        if let (Err(e), true) = (asked, answer.is_empty()) {
            return Err(anyhow!(
                "cannot ask the daemon at {}: {e}",
                socket.display()
            ));
        }
        if answer.len() as u64 > MAX_ANSWER {
            return Err(anyhow!(
                "the answer at {} is larger than {}: not a status snapshot",
                socket.display(),
                Size(MAX_ANSWER)
            ));
        }
        Ok(answer)
    };
    let answer = match tokio::time::timeout(timeout, exchange).await {
        Ok(answer) => answer?,
        Err(_) => {
            return Err(anyhow!(
                "the daemon did not answer within {} at {}",
                human_secs(timeout),
                socket.display()
            )
            .into());
        }
    };
    parse_answer(&answer).map_err(CliError::Failed)
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// What a failed connection means, in words naming the socket.
fn connect_error(socket: &Path, e: &std::io::Error) -> anyhow::Error {
    let path = socket.display();
    let dir = socket.parent().unwrap_or(Path::new("")).display();
    match e.kind() {
        ErrorKind::NotFound => anyhow!(
            "no daemon answers at {path} (no such socket): is `watchdog run` \
             running with state-dir {dir}? Name another with --state-dir or --config"
        ),
        ErrorKind::PermissionDenied => anyhow!(
            "cannot connect to {path}: permission denied; the status socket \
             is readable by its owner only: run `watchdog status` as the user \
             the daemon runs as, or as root"
        ),
        ErrorKind::ConnectionRefused if !is_socket(socket) => anyhow!(
            "{path} is not a socket: the daemon makes it there when it starts \
             (it refuses to start while something else has that name); remove it"
        ),
        ErrorKind::ConnectionRefused => anyhow!(
            "nothing listens at {path}: the daemon is not running (the socket \
             is left from an earlier run)"
        ),
        _ => anyhow!("cannot connect to {path}: {e}"),
    }
}

/// The daemon's answer: a snapshot, or the error it reported.
fn parse_answer(answer: &[u8]) -> anyhow::Result<Snapshot> {
    if answer.iter().all(u8::is_ascii_whitespace) {
        return Err(anyhow!(
            "the daemon closed the connection without an answer"
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(answer)
        .map_err(|e| anyhow!("the daemon's answer is not JSON: {e}"))?;
    if let Some(error) = value.get("error")
        && value.get("version").is_none()
    {
        let message = error
            .as_str()
            .map_or_else(|| error.to_string(), str::to_owned);
        return Err(anyhow!("the daemon cannot answer: {}", clean(&message)));
    }
    serde_json::from_value(value).map_err(|e| {
        anyhow!("the daemon's answer is not a status snapshot (another version of watchdog?): {e}")
    })
}

/// The snapshot as a table for a terminal of 80 columns.
pub fn render(snapshot: &Snapshot, colour: bool) -> String {
    let paint = Painter(colour);
    let mut lines: Vec<String> = Vec::new();
    let health = &snapshot.health;
    if !health.ok {
        let problem = health.problem.as_deref().map_or_else(
            || {
                format!(
                    "the heartbeat is {} old (limit {})",
                    human_ms(health.heartbeat_age_ms),
                    human_ms(health.threshold_ms)
                )
            },
            clean,
        );
        for line in wrap(&format!("UNHEALTHY: {problem}"), WIDTH) {
            lines.push(paint.paint(&line, RED_BOLD));
        }
    }
    let verdict = match (health.ok, health.starting) {
        (false, _) => "unhealthy",
        (true, true) => "starting",
        (true, false) => "healthy",
    };
    let header = if health.starting {
        // No sensor chosen and no loop turning yet.
        format!(
            "watchdog {}, pid {}, up {}: {verdict}",
            clean(&snapshot.version),
            snapshot.pid,
            human_ms(snapshot.uptime_ms),
        )
    } else {
        format!(
            "watchdog {}, pid {}, up {}, sensor {}, loop lag {}: {verdict}",
            clean(&snapshot.version),
            snapshot.pid,
            human_ms(snapshot.uptime_ms),
            clean(&snapshot.sensor),
            lag(health.loop_lag_us),
        )
    };
    let mut header = wrap(&header, WIDTH);
    if let Some(last) = header.last_mut()
        && let Some(head) = last.strip_suffix(verdict)
    {
        let style = if health.ok { GREEN } else { RED_BOLD };
        *last = format!("{head}{}", paint.paint(verdict, style));
    }
    lines.extend(header);
    if let Some(programs) = &snapshot.kernel_programs {
        lines.extend(wrap(&programs_line(programs), WIDTH));
    }
    if snapshot.stale {
        let note = format!(
            "the service loop did not answer within 1 s: services as of its last heartbeat, {} ago",
            human_ms(health.heartbeat_age_ms)
        );
        warning(&mut lines, &note, paint);
    }
    if let Some(memory) = &snapshot.memory {
        lines.extend(memory_line(memory, paint));
    }
    let lost: Vec<String> = snapshot
        .lost_events
        .iter()
        .filter(|&(_, &n)| n > 0)
        .map(|(counter, n)| format!("{n} {}", clean(counter)))
        .collect();
    if !lost.is_empty() {
        let text = format!("kernel events lost since start: {}", lost.join(", "));
        warning(&mut lines, &text, paint);
    }
    if snapshot.audit_lines_lost > 0 {
        let n = snapshot.audit_lines_lost;
        let text = format!(
            "audit log: {n} line{} could not be written (is its disk full?)",
            plural(n)
        );
        warning(&mut lines, &text, paint);
    }
    if snapshot.log_lines_lost > 0 {
        let n = snapshot.log_lines_lost;
        let text = format!(
            "log: {n} record{} dropped (standard error not read fast enough)",
            plural(n)
        );
        warning(&mut lines, &text, paint);
    }
    if snapshot.unconfirmed_crossings > 0 {
        lines.push(format!(
            "kernel crossings not confirmed by exact readings: {}",
            snapshot.unconfirmed_crossings
        ));
    }
    lines.push(String::new());
    let services: Vec<&ServiceStatus> = snapshot
        .services
        .iter()
        .filter(|s| s.kind == Kind::Service)
        .collect();
    let watches: Vec<&ServiceStatus> = snapshot
        .services
        .iter()
        .filter(|s| s.kind == Kind::Watch)
        .collect();
    if snapshot.services.is_empty() {
        lines.push("no services".to_owned());
    }
    if !services.is_empty() {
        lines.push(row_header("SERVICE", "RESTARTS"));
        for service in services {
            lines.extend(row(service, &restarts(service), paint));
        }
    }
    if !watches.is_empty() {
        if lines.last().is_some_and(|l| !l.is_empty()) {
            lines.push(String::new());
        }
        lines.push(row_header("WATCH", "MARKER"));
        for watch in watches {
            let marker = if watch.marker { "written" } else { "-" };
            lines.extend(row(watch, &[marker.to_owned()], paint));
        }
    }
    let mut out = String::new();
    for line in lines {
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

// The table's columns: name, pid (right-aligned), state, memory / limit, bar,
// the last exit's cause, and a last column (restarts by cause, or a watch's
// marker) in what is left, continued on lines of its own when it is longer.
const NAME: usize = 14;
const PID: usize = 7;
const STATE: usize = 14;
const MEMORY: usize = 11;
/// `[####]` and the over-limit mark `+`.
const BAR: usize = 7;
const CELLS: usize = 4;
/// The last exit's cause in a word (`drain`, `crash`, `clean`, ...).
const EXIT: usize = 5;
/// Where the last column starts.
const LAST: usize = NAME + 1 + PID + 1 + STATE + 1 + MEMORY + 1 + BAR + 1 + EXIT + 1;

fn row_header(title: &str, last: &str) -> String {
    format!(
        "{title:<NAME$} {:>PID$} {:<STATE$} {:<width$} {:<EXIT$} {last}",
        "PID",
        "STATE",
        "MEMORY/LIMIT",
        "EXIT",
        width = MEMORY + 1 + BAR
    )
}

/// A service's row, and the lines its last column continues on.
fn row(service: &ServiceStatus, last: &[String], paint: Painter) -> Vec<String> {
    let name = fit_middle(&clean(&service.name), NAME);
    let pid = service
        .pid
        .map_or_else(|| "-".to_owned(), |p| p.to_string());
    let state = fit(&state_text(service), STATE);
    let state = pad_painted(&state, STATE, paint, state_style(service.state));
    let (memory, bar) = memory_cells(service, paint);
    let exit = service
        .last_exit_cause
        .as_deref()
        .map_or_else(|| "-".to_owned(), short_cause);
    let exit = fit(&exit, EXIT);
    // A pid wider than its column (not on Linux) takes from the last one.
    let first = WIDTH - LAST - pid.len().saturating_sub(PID).min(8);
    let mut last = wrap_items(last, WIDTH - LAST).into_iter();
    let head = last.next().unwrap_or_default();
    let head = if head.chars().count() > first {
        // Only a pid wider than its column gets here: keep the row whole.
        fit(&head, first)
    } else {
        head
    };
    let mut lines = vec![format!(
        "{name:<NAME$} {pid:>PID$} {state} {memory:<MEMORY$} {bar} {exit:<EXIT$} {head}"
    )];
    lines.extend(last.map(|more| format!("{:LAST$}{more}", "")));
    lines
}

/// `text` wrapped to the width, in the warning colour.
fn warning(lines: &mut Vec<String>, text: &str, paint: Painter) {
    lines.extend(wrap(text, WIDTH).iter().map(|l| paint.paint(l, YELLOW)));
}

/// The state, with how long it has lasted (or is left, in backoff).
fn state_text(service: &ServiceStatus) -> String {
    let state = service.state.as_str();
    match (service.state, service.uptime_ms, service.backoff_ms) {
        (State::Running | State::Draining, Some(up), _) => format!("{state} {}", human_ms(up)),
        (State::Backoff, _, Some(left)) => format!("{state} {}", human_ms(left)),
        _ => state.to_owned(),
    }
}

fn state_style(state: State) -> &'static str {
    match state {
        State::Failed | State::GaveUp => RED_BOLD,
        State::Draining | State::Backoff => YELLOW,
        State::Running => GREEN,
        State::Starting | State::Waiting | State::Stopped => "",
    }
}

/// `48.0M/64.0M` and its bar `[####..]` (`+` after it when over the
/// limit), each padded to its column.
fn memory_cells(service: &ServiceStatus, paint: Painter) -> (String, String) {
    let charged = service
        .charged_bytes
        .map_or_else(|| "-".to_owned(), short_size);
    let (Some(limit), Some(used)) = (service.limit_bytes, service.charged_bytes) else {
        let text = match service.limit_bytes {
            Some(limit) => format!("{charged}/{}", short_size(limit)),
            None => charged,
        };
        return (fit(&text, MEMORY), " ".repeat(BAR));
    };
    let text = fit(&format!("{charged}/{}", short_size(limit)), MEMORY);
    let (bar, ratio) = bar(used, limit);
    let style = if ratio >= 0.9 {
        RED_BOLD
    } else if ratio >= 0.75 {
        YELLOW
    } else {
        ""
    };
    (text, pad_painted(&bar, BAR, paint, style))
}

/// The bar of `used` against `limit`, and their ratio.
fn bar(used: u64, limit: u64) -> (String, f64) {
    let ratio = if limit == 0 {
        if used == 0 { 0.0 } else { f64::INFINITY }
    } else {
        used as f64 / limit as f64
    };
    let filled = (ratio * CELLS as f64).round().clamp(0.0, CELLS as f64) as usize;
    let mut bar = format!("[{}{}]", "#".repeat(filled), ".".repeat(CELLS - filled));
    if used > limit {
        bar.push('+');
    }
    (bar, ratio)
}

/// Restarts by cause, the most frequent first: `3 drain`, `1 crash`.
fn restarts(service: &ServiceStatus) -> Vec<String> {
    let mut counts: Vec<(&String, &u64)> =
        service.restarts.iter().filter(|&(_, &n)| n > 0).collect();
    if counts.is_empty() {
        return vec!["-".to_owned()];
    }
    counts.sort_by(|a, b| b.1.cmp(a.1));
    counts
        .iter()
        .map(|(cause, n)| format!("{n} {}", short_cause(cause)))
        .collect()
}

/// An exit cause (the audit log's name) in a word.
fn short_cause(cause: &str) -> String {
    match cause {
        "clean_exit" => "clean".to_owned(),
        "memory_drain" => "drain".to_owned(),
        "memory_kill" => "kill".to_owned(),
        "oom_kill" => "oom".to_owned(),
        "shutdown" => "stop".to_owned(),
        other => clean(other),
    }
}

fn memory_line(memory: &status::HostMemory, paint: Painter) -> Vec<String> {
    let scope = if memory.scope == "cgroup" {
        "container"
    } else {
        "host"
    };
    let percent = if memory.total_bytes == 0 {
        0
    } else {
        (memory.used_bytes as f64 * 100.0 / memory.total_bytes as f64).round() as u64
    };
    let mut text = format!(
        "{scope} memory {} / {} ({percent}%)",
        Size(memory.used_bytes),
        Size(memory.total_bytes)
    );
    if let Some(pressure) = memory.pressure_some_avg10 {
        let _ = write!(text, ", pressure {pressure:.1}%");
    }
    if memory.warning {
        let _ = write!(text, ": WARNING, over {}", Size(memory.warn_bytes));
    }
    let lines = wrap(&text, WIDTH);
    if memory.warning {
        lines.iter().map(|l| paint.paint(l, YELLOW)).collect()
    } else {
        lines
    }
}

/// A size in at most 5 characters: `512B`, `9.5K`, `48.0M`, `256M`, `1.5G`.
fn short_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut scaled = bytes as f64;
    let mut unit = 0;
    while scaled >= 1023.5 && unit < UNITS.len() - 1 {
        scaled /= 1024.0;
        unit += 1;
    }
    if scaled < 99.95 {
        format!("{scaled:.1}{}", UNITS[unit])
    } else {
        format!("{scaled:.0}{}", UNITS[unit])
    }
}

/// A duration in its two largest units: `0s`, `3s`, `1m 20s`, `2h 3m`,
/// `4d 1h`; under 10 seconds with tenths (`1.2s`).
fn human_ms(ms: u64) -> String {
    if ms < 10_000 {
        let tenths = (ms + 50) / 100;
        return if tenths.is_multiple_of(10) {
            format!("{}s", tenths / 10)
        } else {
            format!("{}.{}s", tenths / 10, tenths % 10)
        };
    }
    let secs = ms / 1000;
    let (big, small, units) = if secs < 60 {
        (secs, 0, ("s", ""))
    } else if secs < 3600 {
        (secs / 60, secs % 60, ("m", "s"))
    } else if secs < 86_400 {
        (secs / 3600, secs / 60 % 60, ("h", "m"))
    } else {
        (secs / 86_400, secs / 3600 % 24, ("d", "h"))
    };
    if small == 0 {
        format!("{big}{}", units.0)
    } else {
        format!("{big}{} {small}{}", units.0, units.1)
    }
}

/// A timeout: `5 s`, `200 ms`.
fn human_secs(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// Event-loop lag: `0.1 ms`, `12 ms`, `1.5 s`.
fn lag(us: u64) -> String {
    if us < 10_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else if us < 1_000_000 {
        format!("{} ms", (us + 500) / 1000)
    } else {
        format!("{:.1} s", us as f64 / 1_000_000.0)
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Text from the daemon with control characters (escape sequences) made
/// harmless.
/// `kernel programs: rss_stat=btf, sched_process_exit=group_dead,
/// mark_victim=task`: each program's form without the reason for a
/// fallback (which `--json` has), the known programs first.
fn programs_line(programs: &std::collections::BTreeMap<String, String>) -> String {
    let order = |name: &str| {
        ["rss_stat", "sched_process_exit", "mark_victim"]
            .iter()
            .position(|known| *known == name)
            .unwrap_or(usize::MAX)
    };
    let mut named: Vec<(&String, &String)> = programs.iter().collect();
    named.sort_by_key(|(name, _)| order(name));
    let forms: Vec<String> = named
        .into_iter()
        .map(|(name, form)| {
            let short = form
                .split_once(' ')
                .map_or(form.as_str(), |(short, _)| short);
            format!("{}={}", clean(name), clean(short))
        })
        .collect();
    format!("kernel programs: {}", forms.join(", "))
}

fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// `text` cut to `width` characters, an ellipsis marking the cut.
fn fit(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// `text` cut in the middle to `width` characters, so that names that
/// differ at their end (`worker-eu-1`, `worker-eu-2`) stay apart.
fn fit_middle(text: &str, width: usize) -> String {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= width || width < 3 {
        return fit(text, width);
    }
    let head = (width - 1) / 2;
    let tail = width - 1 - head;
    let mut cut: String = chars[..head].iter().collect();
    cut.push('…');
    cut.extend(&chars[chars.len() - tail..]);
    cut
}

/// `text` painted, then padded with spaces to `width` characters.
fn pad_painted(text: &str, width: usize, paint: Painter, style: &str) -> String {
    let count = text.chars().count();
    format!(
        "{}{}",
        paint.paint(text, style),
        " ".repeat(width.saturating_sub(count))
    )
}

/// `text` in lines of at most `width` characters, broken at spaces (words
/// longer than a line are cut).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        let mut word: Vec<char> = word.chars().collect();
        let used = line.chars().count();
        if used > 0 && used + 1 + word.len() <= width {
            line.push(' ');
            line.extend(&word);
            continue;
        }
        if used > 0 {
            lines.push(std::mem::take(&mut line));
        }
        while word.len() > width {
            lines.push(word.drain(..width).collect());
        }
        line.extend(word);
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

/// `items` joined by `, ` in lines of at most `width` characters, an item
/// never split across lines (one longer than a line is cut).
fn wrap_items(items: &[String], width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for (i, item) in items.iter().enumerate() {
        let item = if i + 1 < items.len() {
            format!("{},", clean(item))
        } else {
            clean(item)
        };
        let used = line.chars().count();
        if used > 0 && used + 1 + item.chars().count() <= width {
            line.push(' ');
            line.push_str(&item);
            continue;
        }
        if used > 0 {
            lines.push(std::mem::take(&mut line));
        }
        line = fit(&item, width);
    }
    lines.push(line);
    lines
}

const RED_BOLD: &str = "1;31";
const YELLOW: &str = "33";
const GREEN: &str = "32";

/// Colours text with an SGR style, or leaves it be.
#[derive(Clone, Copy)]
struct Painter(bool);

impl Painter {
    fn paint(self, text: &str, style: &str) -> String {
        if self.0 && !style.is_empty() && !text.trim().is_empty() {
            format!("\x1b[{style}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use clap::Parser;

    use super::*;
    use crate::status::{Health, HostMemory};

    const MIB: u64 = 1 << 20;

    fn service(name: &str, state: State) -> ServiceStatus {
        ServiceStatus {
            name: name.to_owned(),
            kind: Kind::Service,
            state,
            ..ServiceStatus::default()
        }
    }

    fn sample() -> Snapshot {
        let mut leaky = service("leaky", State::Running);
        leaky.pid = Some(41237);
        leaky.charged_bytes = Some(48 * MIB);
        leaky.limit_bytes = Some(64 * MIB);
        leaky.uptime_ms = Some(3_000);
        leaky.restarts = BTreeMap::from([("memory_drain".into(), 3), ("crash".into(), 1)]);
        leaky.last_exit_cause = Some("memory_drain".into());
        let mut steady = service("steady", State::Running);
        steady.pid = Some(41201);
        steady.charged_bytes = Some(12 * MIB + 300 * 1024);
        steady.limit_bytes = Some(256 * MIB);
        steady.uptime_ms = Some(80_000);
        let mut draining = service("a-rather-long-service-name", State::Draining);
        draining.pid = Some(4_194_303);
        draining.charged_bytes = Some(70 * MIB);
        draining.limit_bytes = Some(64 * MIB);
        draining.uptime_ms = Some(1_500);
        draining.restarts = BTreeMap::from([
            ("memory_drain".into(), 12),
            ("crash".into(), 7),
            ("oom_kill".into(), 2),
            ("memory_kill".into(), 1),
        ]);
        let mut backoff = service("crashy", State::Backoff);
        backoff.backoff_ms = Some(1_200);
        backoff.restarts = BTreeMap::from([("crash".into(), 2)]);
        backoff.last_exit_cause = Some("crash".into());
        let mut gave_up = service("fourteen-chars", State::GaveUp);
        gave_up.restarts = BTreeMap::from([("crash".into(), 5)]);
        gave_up.last_exit_cause = Some("crash".into());
        let mut unlimited = service("nolimit", State::Running);
        unlimited.pid = Some(5);
        unlimited.charged_bytes = Some(3 * (1 << 30) / 2);
        unlimited.uptime_ms = Some(2 * 86_400_000 + 3 * 3_600_000);
        let stopped = ServiceStatus {
            last_exit_cause: Some("clean_exit".into()),
            ..service("oneshot", State::Stopped)
        };
        let mut session = service("session", State::Running);
        session.kind = Kind::Watch;
        session.pid = Some(40012);
        session.charged_bytes = Some(7 << 30);
        session.limit_bytes = Some(8 << 30);
        session.uptime_ms = Some(2 * 3_600_000 + 3 * 60_000);
        session.marker = true;
        let mut waiting = service("editor", State::Waiting);
        waiting.kind = Kind::Watch;
        waiting.limit_bytes = Some(2 << 30);
        Snapshot {
            version: "0.1.0".into(),
            pid: 1234,
            sensor: "ebpf".into(),
            kernel_programs: Some(BTreeMap::from([
                ("rss_stat".into(), "btf".into()),
                ("sched_process_exit".into(), "group_dead".into()),
                ("mark_victim".into(), "task".into()),
            ])),
            uptime_ms: 2 * 3_600_000 + 3 * 60_000,
            health: Health {
                ok: true,
                starting: false,
                problem: None,
                heartbeat_age_ms: 100,
                loop_lag_us: 120,
                loop_lag_max_us: 3_400,
                threshold_ms: 5_000,
            },
            lost_events: BTreeMap::new(),
            unconfirmed_crossings: 0,
            audit_lines_lost: 0,
            log_lines_lost: 0,
            memory: Some(HostMemory {
                scope: "host".into(),
                used_bytes: 5_583_457_484,
                total_bytes: 8_375_186_227,
                available_bytes: 2_791_728_743,
                warn_bytes: 7 << 30,
                recover_bytes: 6 << 30,
                ..HostMemory::default()
            }),
            services: vec![
                leaky, session, steady, draining, backoff, gave_up, unlimited, stopped, waiting,
            ],
            stale: false,
        }
    }

    fn assert_fits(text: &str) {
        for line in text.lines() {
            assert!(
                line.chars().count() <= WIDTH,
                "{} columns: {line:?}",
                line.chars().count()
            );
        }
    }

    #[test]
    fn renders_services_and_watch_targets_in_80_columns() {
        let text = render(&sample(), false);
        assert_fits(&text);
        assert!(!text.contains('\x1b'), "{text}");
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some("watchdog 0.1.0, pid 1234, up 2h 3m, sensor ebpf, loop lag 0.1 ms: healthy")
        );
        assert_eq!(
            lines.next(),
            Some("kernel programs: rss_stat=btf, sched_process_exit=group_dead, mark_victim=task")
        );
        assert!(
            text.contains("host memory 5.2 GiB / 7.8 GiB (67%)"),
            "{text}"
        );
        // Each row in its columns; the restarts of the long one go on in the
        // last column's lines.
        let table: Vec<&str> = text
            .split_once("\n\n")
            .map_or("", |(_, t)| t)
            .lines()
            .collect();
        let expected = [
            "SERVICE            PID STATE          MEMORY/LIMIT        EXIT  RESTARTS",
            "leaky            41237 running 3s     48.0M/64.0M [###.]  drain 3 drain, 1 crash",
            "steady           41201 running 1m 20s 12.3M/256M  [....]  -     -",
            "a-rath…ce-name 4194303 draining 1.5s  70.0M/64.0M [####]+ -     12 drain,",
            "                                                                7 crash, 2 oom,",
            "                                                                1 kill",
            "crashy               - backoff 1.2s   -                   crash 2 crash",
            "fourteen-chars       - gave_up        -                   crash 5 crash",
            "nolimit              5 running 2d 3h  1.5G                -     -",
            "oneshot              - stopped        -                   clean -",
            "",
            "WATCH              PID STATE          MEMORY/LIMIT        EXIT  MARKER",
            "session          40012 running 2h 3m  7.0G/8.0G   [####]  -     written",
            "editor               - waiting        -/2.0G              -     -",
        ];
        assert_eq!(table, expected, "{text}");
    }

    #[test]
    fn colour_only_when_asked() {
        let plain = render(&sample(), false);
        assert!(!plain.contains('\x1b'));
        let coloured = render(&sample(), true);
        assert!(coloured.contains("\x1b[1;31mgave_up"), "{coloured}");
        assert!(coloured.contains("\x1b[33mdraining"), "{coloured}");
        // The bar of a service over 90% of its limit is red.
        assert!(coloured.contains("\x1b[1;31m[####]+"), "{coloured}");
        // Colour changes no column: without the escapes it is the same.
        let stripped = coloured
            .split('\x1b')
            .enumerate()
            .map(|(i, part)| {
                if i == 0 {
                    part
                } else {
                    part.split_once('m').map_or(part, |(_, rest)| rest)
                }
            })
            .collect::<String>();
        assert_eq!(stripped, plain);
    }

    #[test]
    fn a_starting_daemon_says_so() {
        let snapshot = Snapshot {
            version: "0.1.0".into(),
            pid: 77,
            uptime_ms: 2_000,
            health: Health {
                ok: true,
                starting: true,
                ..Health::default()
            },
            ..Snapshot::default()
        };
        let text = render(&snapshot, false);
        assert_eq!(
            text.lines().next(),
            Some("watchdog 0.1.0, pid 77, up 2s: starting"),
            "{text}"
        );
        assert!(text.contains("no services"), "{text}");
    }

    #[test]
    fn long_names_keep_their_ends() {
        let a = fit_middle("payments-worker-eu-1", NAME);
        let b = fit_middle("payments-worker-eu-2", NAME);
        assert_eq!(a, "paymen…er-eu-1");
        assert_ne!(a, b);
        assert_eq!(a.chars().count(), NAME);
        assert_eq!(fit_middle("short", NAME), "short");
        assert_eq!(fit_middle("fourteen-chars", NAME), "fourteen-chars");
    }

    #[test]
    fn bars() {
        assert_eq!(bar(0, 100).0, "[....]");
        assert_eq!(bar(50, 100).0, "[##..]");
        assert_eq!(bar(100, 100).0, "[####]");
        assert_eq!(bar(101, 100).0, "[####]+");
        assert_eq!(bar(1000, 100).0, "[####]+");
        assert_eq!(bar(0, 0).0, "[....]");
        assert_eq!(bar(1, 0).0, "[####]+");
        assert_eq!(bar(u64::MAX, 1).0, "[####]+");
    }

    #[test]
    fn no_limit_no_bar() {
        let mut s = service("free", State::Running);
        s.charged_bytes = Some(12 * MIB);
        let (memory, bar) = memory_cells(&s, Painter(false));
        assert_eq!(memory, "12.0M");
        assert!(bar.trim().is_empty());
        s.charged_bytes = None;
        assert_eq!(memory_cells(&s, Painter(false)).0, "-");
    }

    #[test]
    fn unhealthy_says_why_first() {
        let mut snapshot = sample();
        snapshot.health.ok = false;
        snapshot.health.problem = Some("the heartbeat is 12 s old".into());
        let text = render(&snapshot, false);
        assert_fits(&text);
        assert_eq!(
            text.lines().next(),
            Some("UNHEALTHY: the heartbeat is 12 s old")
        );
        assert!(text.contains(": unhealthy\n"), "{text}");
        snapshot.health.problem = None;
        snapshot.health.heartbeat_age_ms = 12_000;
        let text = render(&snapshot, false);
        assert_eq!(
            text.lines().next(),
            Some("UNHEALTHY: the heartbeat is 12s old (limit 5s)")
        );
        // A long problem is wrapped, never wider than the table.
        snapshot.health.problem = Some("word ".repeat(40) + &"x".repeat(200));
        let text = render(&snapshot, true);
        assert!(text.starts_with("\x1b[1;31mUNHEALTHY: word"));
        assert_fits(&render(&snapshot, false));
    }

    #[test]
    fn losses_and_warnings_are_said() {
        let mut snapshot = sample();
        snapshot.lost_events =
            BTreeMap::from([("ringbuf_full".into(), 3), ("watch_table_full".into(), 0)]);
        snapshot.audit_lines_lost = 1;
        if let Some(memory) = &mut snapshot.memory {
            memory.scope = "cgroup".into();
            memory.warning = true;
            memory.pressure_some_avg10 = Some(2.25);
        }
        let text = render(&snapshot, false);
        assert_fits(&text);
        assert!(
            text.contains("kernel events lost since start: 3 ringbuf_full\n"),
            "{text}"
        );
        assert!(!text.contains("watch_table_full"), "{text}");
        assert!(
            text.contains("audit log: 1 line could not be written"),
            "{text}"
        );
        assert!(
            text.contains("container memory 5.2 GiB / 7.8 GiB (67%), pressure 2.2%: WARNING"),
            "{text}"
        );
        let clean = render(&sample(), false);
        assert!(!clean.contains("lost"), "{clean}");
        assert!(!clean.contains("WARNING"), "{clean}");
    }

    #[test]
    fn empty_service_list() {
        let snapshot = Snapshot {
            services: Vec::new(),
            memory: None,
            ..sample()
        };
        let text = render(&snapshot, false);
        assert!(text.ends_with("\nno services\n"), "{text}");
        assert!(!text.contains("SERVICE"), "{text}");
    }

    #[test]
    fn hostile_names_cannot_reach_the_terminal() {
        let mut snapshot = sample();
        snapshot.services[0].name = "\x1b]0;pwned\x07evil".into();
        snapshot.health.ok = false;
        snapshot.health.problem = Some("bad\x1b[2J".into());
        let text = render(&snapshot, false);
        assert!(!text.contains('\x1b'), "{text}");
        assert_fits(&text);
    }

    #[test]
    fn short_sizes_and_durations() {
        assert_eq!(short_size(0), "0B");
        assert_eq!(short_size(1023), "1023B");
        assert_eq!(short_size(1024), "1.0K");
        assert_eq!(short_size(48 * MIB), "48.0M");
        assert_eq!(short_size(256 * MIB), "256M");
        assert_eq!(short_size(1023 * MIB), "1023M");
        assert_eq!(short_size(1024 * MIB - 1), "1.0G");
        assert_eq!(short_size(u64::MAX), "16777216T");
        assert_eq!(human_ms(0), "0s");
        assert_eq!(human_ms(1_234), "1.2s");
        assert_eq!(human_ms(9_990), "10s");
        assert_eq!(human_ms(59_000), "59s");
        assert_eq!(human_ms(60_000), "1m");
        assert_eq!(human_ms(80_000), "1m 20s");
        assert_eq!(human_ms(7_380_000), "2h 3m");
        assert_eq!(human_ms(90_000_000), "1d 1h");
        assert_eq!(lag(120), "0.1 ms");
        assert_eq!(lag(25_400), "25 ms");
        assert_eq!(lag(1_500_000), "1.5 s");
    }

    #[test]
    fn answers() {
        let snapshot = sample();
        let json = serde_json::to_vec(&snapshot).unwrap_or_default();
        assert_eq!(parse_answer(&json).ok(), Some(snapshot));
        let err = parse_answer(br#"{"error":"the loop is stuck"}"#)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("the daemon cannot answer: the loop is stuck")
        );
        assert!(parse_answer(b"").is_err());
        assert!(parse_answer(b"not json").is_err());
        assert!(parse_answer(br#"{"version":"9"}"#).is_err());
    }

    #[test]
    fn config_and_state_dir_conflict() {
        let parse = |args: &[&str]| crate::cmd::Cli::try_parse_from(args);
        let err = parse(&["watchdog", "status", "--config", "a", "--state-dir", "b"]).err();
        assert_eq!(err.map(|e| e.exit_code()), Some(2));
        assert!(parse(&["watchdog", "status", "--state-dir", "b", "--json"]).is_ok());
        assert!(parse(&["watchdog", "status"]).is_ok());
    }

    /// A directory of its own under the temporary directory.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wd-st-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).ok();
        dir
    }

    fn message(result: Result<Snapshot, CliError>) -> String {
        match result {
            Ok(_) => "an answer".to_owned(),
            Err(CliError::Usage(m)) => format!("usage: {m}"),
            Err(CliError::Failed(e)) => format!("{e:#}"),
        }
    }

    #[tokio::test]
    async fn talks_to_a_daemon() {
        let dir = scratch("talk");
        let socket = dir.join(status::SOCKET);
        let missing = message(query(&socket, TIMEOUT).await);
        assert!(missing.starts_with("no daemon answers at"), "{missing}");
        assert!(missing.contains(&dir.display().to_string()), "{missing}");

        let listener = std::os::unix::net::UnixListener::bind(&socket).ok();
        drop(listener);
        let refused = message(query(&socket, TIMEOUT).await);
        assert!(refused.starts_with("nothing listens at"), "{refused}");
        let _ = std::fs::remove_file(&socket);

        let listener = tokio::net::UnixListener::bind(&socket).ok();
        let snapshot = sample();
        let reply = serde_json::to_vec(&snapshot).unwrap_or_default();
        let server = async {
            let Some(listener) = listener else { return };
            for answer in [reply, br#"{"error":"busy"}"#.to_vec(), Vec::new()] {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut line = [0; 7];
                if stream.read_exact(&mut line).await.is_err() || &line != b"status\n" {
                    return;
                }
                if answer.is_empty() {
                    // Never answers: holds the connection until the
                    // client gives up.
                    let _ = stream.read(&mut [0; 1]).await;
                    return;
                }
                let _ = stream.write_all(&answer).await;
            }
        };
        let client = async {
            let first = query(&socket, TIMEOUT).await.ok();
            let second = message(query(&socket, TIMEOUT).await);
            let third = message(query(&socket, Duration::from_millis(200)).await);
            (first, second, third)
        };
        let ((), (first, second, third)) = tokio::join!(server, client);
        assert_eq!(first, Some(snapshot));
        assert_eq!(second, "the daemon cannot answer: busy");
        assert!(
            third.starts_with("the daemon did not answer within 200 ms"),
            "{third}"
        );
        let _ = std::fs::remove_dir_all(&dir);

        let long = PathBuf::from("/".to_owned() + &"d".repeat(120)).join(status::SOCKET);
        let too_long = message(query(&long, TIMEOUT).await);
        assert!(too_long.starts_with("usage: the socket path"), "{too_long}");
    }

    /// A loop that did not answer is said, under the header.
    #[test]
    fn a_stale_snapshot_is_said() {
        let mut snapshot = sample();
        snapshot.health.heartbeat_age_ms = 4_200;
        snapshot.stale = true;
        let text = render(&snapshot, false);
        assert!(text.contains("did not answer within 1 s"), "{text}");
        assert_fits(&text);
        snapshot.stale = false;
        assert!(!render(&snapshot, false).contains("did not answer"));
    }

    /// Fallbacks show as their form only (the reasons are in --json); a
    /// sampling daemon has no such line.
    #[test]
    fn kernel_program_forms_are_one_line_under_the_header() {
        let mut snapshot = sample();
        snapshot.kernel_programs = Some(BTreeMap::from([
            (
                "rss_stat".into(),
                "raw (BTF form refused by the verifier: Type 'atomic_long_t' is not a struct)"
                    .into(),
            ),
            (
                "sched_process_exit".into(),
                "legacy (forced by WATCHDOG_FORCE_LEGACY_EXIT=1)".into(),
            ),
            (
                "mark_victim".into(),
                "none (no mark_victim tracepoint)".into(),
            ),
        ]));
        let text = render(&snapshot, false);
        assert_fits(&text);
        assert_eq!(
            text.lines().nth(1),
            Some("kernel programs: rss_stat=raw, sched_process_exit=legacy, mark_victim=none")
        );
        let json = serde_json::to_value(&snapshot).unwrap();
        assert_eq!(
            json["kernel_programs"]["sched_process_exit"],
            "legacy (forced by WATCHDOG_FORCE_LEGACY_EXIT=1)"
        );
        snapshot.kernel_programs = None;
        snapshot.sensor = "procfs".into();
        let text = render(&snapshot, false);
        assert!(!text.contains("kernel programs"), "{text}");
        let json = serde_json::to_value(&snapshot).unwrap();
        assert!(json.get("kernel_programs").is_none(), "{json}");
        let back: Snapshot = serde_json::from_value(json).unwrap();
        assert_eq!(back.kernel_programs, None);
    }
}
