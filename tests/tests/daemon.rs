//! `watchdog run` and `watchdog check-config`: the daemon from a
//! configuration file: bad files, several services, reload, watch targets
//! and their markers, orphans after a crash, the instance lock, privilege
//! drop and systemd notifications.

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use watchdog_tests::{
    TempDir, is_root, privileged, run_watchdog, sensors, wait_until, watchdog_bin,
};

const HELPER: &str = env!("CARGO_BIN_EXE_wd-helper");

/// A running daemon on a configuration file of its own.
struct Daemon {
    child: Child,
    dir: TempDir,
    config: PathBuf,
}

impl Daemon {
    /// Writes `body` after a `[daemon]` section pointing into a temp dir,
    /// and starts the daemon on it.
    fn start(sensor: &str, body: &str) -> Self {
        let dir = TempDir::new("daemon");
        let config = write_config(dir.path(), sensor, "", body);
        let child = Self::spawn(&config, &[]);
        Self { child, dir, config }
    }

    fn spawn(config: &Path, env: &[(&str, &str)]) -> Child {
        Self::spawn_to(config, env, Stdio::inherit())
    }

    /// Starts the daemon with its standard error to `stderr`.
    fn spawn_to(config: &Path, env: &[(&str, &str)], stderr: impl Into<Stdio>) -> Child {
        Command::new(watchdog_bin())
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("WATCHDOG_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap()
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn lines(&self) -> Vec<Value> {
        audit_lines(&self.dir.path().join("audit.jsonl"))
    }

    /// Waits for an audit line matching `pred`; returns every line so far.
    fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.lines();
            if lines.iter().any(&pred) {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {timeout:?}; log: {:#?}",
                lines
                    .iter()
                    .map(|l| format!("{} {} {}", l["event"], l["service"], l["pid"]))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn started(&self, service: &str, timeout: Duration) -> u32 {
        let lines = self.wait_for(&format!("{service} started"), timeout, |l| {
            l["event"] == "started" && l["service"] == service
        });
        lines
            .iter()
            .rev()
            .find(|l| l["event"] == "started" && l["service"] == service)
            .and_then(|l| l["pid"].as_u64())
            .unwrap() as u32
    }

    fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        wait_exit(&mut self.child, Duration::from_secs(20))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn daemon_section(dir: &Path, sensor: &str) -> String {
    daemon_section_with(dir, sensor, "")
}

/// `dir/watchdog.toml`: a `[daemon]` section pointing into `dir`, with
/// `keys` (lines of its own) first, then `body`.
fn write_config(dir: &Path, sensor: &str, keys: &str, body: &str) -> PathBuf {
    let config = dir.join("watchdog.toml");
    std::fs::write(&config, daemon_section_with(dir, sensor, keys) + body).unwrap();
    config
}

fn daemon_section_with(dir: &Path, sensor: &str, keys: &str) -> String {
    format!(
        "[daemon]\n{keys}state-dir = {:?}\naudit-log = {:?}\nsensor = {sensor:?}\ninterval = \"100ms\"\nmin-interval = \"20ms\"\nrescan = \"200ms\"\norphan-grace = \"2s\"\n\n",
        dir.join("state").display().to_string(),
        dir.join("audit.jsonl").display().to_string()
    )
}

fn audit_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("torn line ({e}): {l:?}")))
        .collect()
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
}

fn service(name: &str, steps: &str, extra: &str) -> String {
    let argv: Vec<String> = std::iter::once(HELPER.to_owned())
        .chain(steps.split_whitespace().map(str::to_owned))
        .collect();
    format!("[[service]]\nname = {name:?}\ncommand = {argv:?}\ngrace = \"2s\"\n{extra}\n")
}

/// Each kind of bad file is refused with exit 2 and its own message,
/// naming the file, line, column and key; nothing is started.
#[test]
fn bad_configuration_files_are_refused_with_their_location() {
    let dir = TempDir::new("badconf");
    let cases: &[(&str, &str)] = &[
        (
            "[[service]]\ncommand = [\"/bin/true\"]\nmax-rs = \"1GiB\"\n",
            ":3:1: service[0].max-rs: unknown field `max-rs`",
        ),
        (
            "[[service]]\ncommand = [\"/bin/true\"]\nmax-rss = \"1XB\"\n",
            ":3:11: service[0].max-rss: invalid size \"1XB\"",
        ),
        (
            "[[service]]\ncommand = [\"/bin/true\"]\ngrace = \"soon\"\n",
            ":3:9: service[0].grace: invalid duration \"soon\"",
        ),
        (
            "[[service]]\nname = \"a\"\n",
            ":1:1: service[0]: missing field `command`",
        ),
        (
            "[[service]]\nname = \"a\"\ncommand = [\"/bin/true\"]\n[[service]]\nname = \"a\"\ncommand = [\"/bin/true\"]\n",
            ":5:1: service[1].name: the name \"a\" is already used",
        ),
        (
            "[[watch]]\nname = \"w\"\nlimit = \"1GiB\"\n",
            ":1:1: watch[0]: watch \"w\" needs exactly one of pid, match or ancestor-match",
        ),
        (
            "[[watch]]\nname = \"w\"\nmatch = \"x\"\nlimit = \"0\"\n",
            ":4:1: watch[0].limit: limit must be more than 0",
        ),
    ];
    for (text, needle) in cases {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, text).unwrap();
        let path = file.to_str().unwrap();
        let (code, err) = run_watchdog(&["check-config", path], Duration::from_secs(10));
        assert_eq!(code, Some(2), "{text:?}: {err}");
        assert!(err.contains(&format!("{path}{needle}")), "{text:?}: {err}");
        let state = dir.path().join("state");
        let (code, err) = run_watchdog(
            &[
                "run",
                "--config",
                path,
                "--state-dir",
                state.to_str().unwrap(),
            ],
            Duration::from_secs(10),
        );
        assert_eq!(code, Some(2), "run {text:?}: {err}");
        assert!(err.contains(needle), "run {text:?}: {err}");
        assert!(!state.exists(), "run {text:?} started something");
    }
    let (code, err) = run_watchdog(
        &["run", "--config", "/nonexistent/watchdog.toml"],
        Duration::from_secs(10),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--sample-config"), "{err}");
}

/// `run --sample-config` prints an example that `check-config` accepts.
#[test]
fn the_sample_configuration_is_valid() {
    let out = Command::new(watchdog_bin())
        .args(["run", "--sample-config"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let dir = TempDir::new("sample");
    let file = dir.path().join("sample.toml");
    std::fs::write(&file, &out.stdout).unwrap();
    let checked = Command::new(watchdog_bin())
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(
        text.contains("[[service]]") && text.contains("max-crashes = 5"),
        "{text}"
    );
}

/// Two services, one leaking: only the leaker is drained and respawned.
#[test]
fn only_the_leaking_service_is_drained() {
    for sensor in sensors("only_the_leaking_service_is_drained") {
        let mut daemon = Daemon::start(
            sensor,
            &(service("leaker", "leak 64 10 sleep 60000", "max-rss = \"24MiB\"")
                + &service("steady", "alloc 4 sleep 60000", "max-rss = \"64MiB\"")),
        );
        let steady = daemon.started("steady", Duration::from_secs(10));
        let first = daemon.started("leaker", Duration::from_secs(10));
        daemon.wait_for("the leaker's drain", Duration::from_secs(20), |l| {
            l["event"] == "exited" && l["service"] == "leaker" && l["cause"] == "memory_drain"
        });
        daemon.wait_for("the leaker's respawn", Duration::from_secs(10), |l| {
            l["event"] == "started"
                && l["service"] == "leaker"
                && l["pid"].as_u64() != Some(u64::from(first))
        });
        assert!(
            daemon
                .lines()
                .iter()
                .filter(|l| l["service"] == "steady")
                .all(|l| l["event"] == "started"),
            "{sensor}: the steady service was touched"
        );
        assert!(alive(steady), "{sensor}: steady is gone");
        assert!(daemon.stop().success());
        assert!(!alive(steady));
        let lines = daemon.lines();
        assert!(
            lines.iter().any(|l| l["service"] == "steady"
                && l["event"] == "exited"
                && l["cause"] == "shutdown"),
            "{sensor}: no shutdown line for steady"
        );
    }
}

/// SIGHUP applies a changed file: the changed service restarts, the
/// unchanged one keeps running; an invalid file keeps the old
/// configuration running.
#[test]
fn reload_restarts_only_what_changed() {
    let mut daemon = Daemon::start(
        "sampling",
        &(service("same", "sleep 60000", "") + &service("changed", "sleep 60000", "")),
    );
    let same = daemon.started("same", Duration::from_secs(10));
    let changed = daemon.started("changed", Duration::from_secs(10));
    let text = std::fs::read_to_string(&daemon.config).unwrap();
    let edited = text.replacen(
        "name = \"changed\"\n",
        "name = \"changed\"\nenv = { MODE = \"new\" }\n",
        1,
    );
    assert_ne!(text, edited);
    std::fs::write(&daemon.config, &edited).unwrap();
    daemon.signal(libc::SIGHUP);
    daemon.wait_for(
        "the changed service's restart",
        Duration::from_secs(10),
        |l| {
            l["event"] == "started"
                && l["service"] == "changed"
                && l["pid"].as_u64() != Some(u64::from(changed))
        },
    );
    wait_until("the old run gone", Duration::from_secs(5), || {
        !alive(changed)
    });
    assert!(alive(same), "the unchanged service was restarted");
    let restarted_same = daemon
        .lines()
        .iter()
        .filter(|l| l["service"] == "same" && l["event"] == "started")
        .count();
    assert_eq!(restarted_same, 1);
    // An invalid file: refused, the running configuration stays.
    std::fs::write(&daemon.config, edited.clone() + "[[service]]\nbogus = 1\n").unwrap();
    daemon.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        matches!(daemon.child.try_wait(), Ok(None)),
        "the daemon exited"
    );
    assert!(alive(same));
    let now_changed = daemon.started("changed", Duration::from_secs(1));
    assert!(alive(now_changed));
    assert!(daemon.stop().success());
}

/// A process the daemon did not start, matched by a word of its command
/// line, crosses its limit: the marker appears with its content and the
/// process lives on; when it exits, the marker is removed.
#[test]
fn a_watched_process_gets_a_marker_and_loses_it_on_exit() {
    for sensor in sensors("a_watched_process_gets_a_marker_and_loses_it_on_exit") {
        let dir = TempDir::new("watched");
        let word = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let mut target = Command::new(HELPER)
            .args([
                "tag", &word, "sleep", "700", "alloc", "48", "sleep", "60000",
            ])
            .spawn()
            .unwrap();
        let mut daemon = Daemon::start(
            sensor,
            &format!("[[watch]]\nname = \"session\"\nmatch = {word:?}\nlimit = \"32MiB\"\n"),
        );
        let marker = daemon.state().join("respawn-recommended/session");
        wait_until("the marker", Duration::from_secs(15), || marker.exists());
        let text = std::fs::read_to_string(&marker).unwrap();
        let fields: std::collections::HashMap<&str, &str> =
            text.lines().filter_map(|l| l.split_once('=')).collect();
        assert_eq!(fields["pid"], target.id().to_string(), "{text}");
        assert_eq!(fields["name"], "session");
        assert_eq!(fields["limit_bytes"], (32u64 << 20).to_string());
        assert!(
            fields["charged_bytes"].parse::<u64>().unwrap() >= 32 << 20,
            "{text}"
        );
        assert_eq!(fields["reason"], "limit");
        assert!(
            !fields["metric"].is_empty() && fields["timestamp"].ends_with('Z'),
            "{text}"
        );
        assert!(
            alive(target.id()),
            "{sensor}: the watched process was touched"
        );
        daemon.wait_for("respawn_recommended", Duration::from_secs(5), |l| {
            l["event"] == "respawn_recommended" && l["service"] == "session"
        });
        target.kill().unwrap();
        target.wait().unwrap();
        wait_until("the marker removed", Duration::from_secs(10), || {
            !marker.exists()
        });
        daemon.wait_for("marker_removed", Duration::from_secs(5), |l| {
            l["event"] == "marker_removed" && l["reason"] == "exited"
        });
        assert!(daemon.stop().success());
    }
}

/// `ancestor-match` finds the first ancestor of the daemon whose command
/// line matches.
#[test]
fn ancestor_match_finds_the_launching_session() {
    let dir = TempDir::new("ancestor");
    let word = format!(
        "session-{}",
        dir.path().file_name().unwrap().to_string_lossy()
    );
    let config = dir.path().join("watchdog.toml");
    std::fs::write(
        &config,
        daemon_section(dir.path(), "sampling")
            + &format!(
                "[[watch]]\nname = \"outer\"\nancestor-match = {word:?}\nlimit = \"8GiB\"\n"
            ),
    )
    .unwrap();
    // sh -c '... # WORD' is the session; it waits for the daemon, so it
    // stays its parent.
    let script = format!(
        "{} run --config {} ; exit 0 # {word}",
        watchdog_bin().display(),
        config.display()
    );
    let mut session = Command::new("sh").args(["-c", &script]).spawn().unwrap();
    let log = dir.path().join("audit.jsonl");
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        if let Some(line) = audit_lines(&log).iter().find(|l| l["event"] == "started") {
            break line["pid"].as_u64().unwrap() as u32;
        }
        assert!(Instant::now() < deadline, "the watch found nothing");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(pid, session.id());
    // Stop the daemon (the session's child).
    let daemon = std::fs::read_to_string(dir.path().join("state/watchdog.pid")).unwrap();
    let daemon: i32 = daemon.trim().parse().unwrap();
    // SAFETY: a signal to the daemon we started through sh.
    unsafe { libc::kill(daemon, libc::SIGTERM) };
    assert!(wait_exit(&mut session, Duration::from_secs(10)).success());
}

/// A second daemon on the same state directory exits non-zero, naming the
/// pid that holds it.
#[test]
fn a_second_daemon_on_the_same_state_dir_is_refused() {
    let mut daemon = Daemon::start("sampling", &service("one", "sleep 60000", ""));
    daemon.started("one", Duration::from_secs(10));
    let (code, err) = run_watchdog(
        &["run", "--config", daemon.config.to_str().unwrap()],
        Duration::from_secs(10),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("pid {}", daemon.child.id())), "{err}");
    assert!(daemon.stop().success());
}

/// SIGKILL of the daemon with two services running, one with a grandchild
/// that called setsid: the next start terminates what is left, leaves a
/// process that merely reused a recorded pid alone, and says so in the
/// audit log.
#[test]
fn orphans_of_a_killed_daemon_are_terminated() {
    if !privileged("orphans_of_a_killed_daemon_are_terminated") {
        return;
    }
    let mut daemon = Daemon::start(
        "ebpf",
        &(service("plain", "sleep 60000", "")
            + &service("forker", "spawn-session 2 PIDFILE sleep 60000", "")),
    );
    let pidfile = daemon.dir.path().join("session.pid");
    let config = std::fs::read_to_string(&daemon.config)
        .unwrap()
        .replace("PIDFILE", pidfile.to_str().unwrap());
    std::fs::write(&daemon.config, &config).unwrap();
    // Restart on the file with the real pid file path.
    let _ = daemon.child.kill();
    let _ = daemon.child.wait();
    std::fs::remove_file(daemon.dir.path().join("audit.jsonl")).ok();
    daemon.child = Daemon::spawn(&daemon.config, &[]);
    daemon.started("plain", Duration::from_secs(10));
    daemon.started("forker", Duration::from_secs(10));
    wait_until("the session's pid file", Duration::from_secs(10), || {
        pidfile.exists()
    });
    let grandchild: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(grandchild));
    // A record whose pid is now someone else's: never touched.
    let mut bystander = Command::new("sleep").arg("60").spawn().unwrap();
    let record = serde_json::json!({
        "service": "ghost", "pid": bystander.id(), "start_time": 1,
        "cgroup": null, "daemon_pid": 1, "started_at": "2026-01-01T00:00:00Z"
    });
    std::fs::write(daemon.state().join("runs/ghost.json"), record.to_string()).unwrap();
    let _ = daemon.child.kill();
    let _ = daemon.child.wait();
    assert!(
        alive(grandchild),
        "the setsid grandchild died with the daemon"
    );
    daemon.child = Daemon::spawn(&daemon.config, &[]);
    daemon.wait_for("the orphan's termination", Duration::from_secs(15), |l| {
        l["event"] == "orphan_terminated" && l["service"] == "forker" && l["reason"] == "terminated"
    });
    wait_until("the grandchild gone", Duration::from_secs(5), || {
        !alive(grandchild)
    });
    // Its own line, in whatever order the records were swept.
    daemon.wait_for(
        "the ghost's pid_reused line",
        Duration::from_secs(15),
        |l| {
            l["event"] == "orphan_terminated"
                && l["service"] == "ghost"
                && l["reason"] == "pid_reused"
        },
    );
    assert!(
        alive(bystander.id()),
        "a process that reused a pid was touched"
    );
    bystander.kill().unwrap();
    bystander.wait().unwrap();
    // Both services run again under the new instance.
    daemon.wait_for("a new plain run", Duration::from_secs(10), |l| {
        l["event"] == "started" && l["service"] == "plain"
    });
    assert!(daemon.stop().success());
}

/// A service with `user = "nobody"` runs as nobody, and so does its hook.
#[test]
fn services_and_their_hooks_run_as_their_user() {
    if !is_root() {
        eprintln!("skipped services_and_their_hooks_run_as_their_user: needs root to change users");
        assert!(!watchdog_tests::in_ci(), "CI=true requires root");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("user");
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
    let helper = dir.path().join("wd-helper");
    watchdog_tests::copy_executable(Path::new(HELPER), &helper);
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let hook_file = out.join("hook.env");
    let body = format!(
        "[[service]]\nname = \"unpriv\"\nuser = \"nobody\"\ncommand = [{h:?}, \"alloc\", \"40\", \"sleep\", \"60000\"]\n\
         max-rss = \"32MiB\"\non-memory = \"exec\"\nhook = [{h:?}, \"write-env\", {f:?}]\n",
        h = helper.display().to_string(),
        f = hook_file.display().to_string()
    );
    let mut daemon = Daemon::start("sampling", &body);
    let pid = daemon.started("unpriv", Duration::from_secs(10));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid.split_whitespace().skip(1).all(|u| u == "65534"),
        "{uid}"
    );
    wait_until("the hook's file", Duration::from_secs(15), || {
        hook_file.exists()
    });
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&hook_file).unwrap().uid(),
        65534,
        "the hook ran as root"
    );
    let text = std::fs::read_to_string(&hook_file).unwrap();
    for want in [
        "WATCHDOG_EVENT=memory_over_limit",
        "WATCHDOG_NAME=unpriv",
        "WATCHDOG_CAUSE=limit",
    ] {
        assert!(text.contains(want), "{want} not in {text}");
    }
    assert!(daemon.stop().success());
}

/// Under systemd: READY=1 once services are started, WATCHDOG=1 pings from
/// the loop, RELOADING=1 then READY=1 around a reload, STOPPING=1.
#[test]
fn systemd_is_told_ready_reloading_and_stopping() {
    let dir = TempDir::new("notify");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let config = dir.path().join("watchdog.toml");
    std::fs::write(
        &config,
        daemon_section(dir.path(), "sampling") + &service("svc", "sleep 60000", ""),
    )
    .unwrap();
    let mut child = Daemon::spawn(
        &config,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut seen: Vec<String> = Vec::new();
    let mut buf = [0u8; 4096];
    let mut next = |seen: &mut Vec<String>| {
        let n = socket.recv(&mut buf).expect("a notification");
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        seen.extend(text.lines().map(str::to_owned));
        text
    };
    let wait =
        |seen: &mut Vec<String>, next: &mut dyn FnMut(&mut Vec<String>) -> String, want: &str| {
            for _ in 0..200 {
                if seen.iter().any(|l| l == want) {
                    return;
                }
                next(seen);
            }
            panic!("no {want} in {seen:?}");
        };
    wait(&mut seen, &mut next, "READY=1");
    // Pings keep coming from the loop.
    seen.clear();
    wait(&mut seen, &mut next, "WATCHDOG=1");
    seen.clear();
    wait(&mut seen, &mut next, "WATCHDOG=1");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    seen.clear();
    wait(&mut seen, &mut next, "RELOADING=1");
    let reloading = seen.iter().position(|l| l == "RELOADING=1").unwrap();
    wait(&mut seen, &mut next, "READY=1");
    let ready = seen.iter().rposition(|l| l == "READY=1").unwrap();
    assert!(reloading < ready, "{seen:?}");
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    seen.clear();
    wait(&mut seen, &mut next, "STOPPING=1");
    assert!(wait_exit(&mut child, Duration::from_secs(15)).success());
    // The services did not inherit the socket.
    assert!(seen.iter().all(|l| !l.is_empty()));
}

/// With `orphans = "adopt"`, a run survives a SIGKILL of the daemon and the
/// next instance takes it over (same pid), then drains it on shutdown.
#[test]
fn orphans_can_be_adopted() {
    for sensor in sensors("orphans_can_be_adopted") {
        let mut daemon = Daemon::start(sensor, &service("kept", "sleep 60000", ""));
        let text = std::fs::read_to_string(&daemon.config).unwrap();
        std::fs::write(
            &daemon.config,
            text.replace("[daemon]\n", "[daemon]\norphans = \"adopt\"\n"),
        )
        .unwrap();
        // Restart on the adopting file before anything runs.
        let _ = daemon.child.kill();
        let _ = daemon.child.wait();
        std::fs::remove_dir_all(daemon.state()).ok();
        std::fs::remove_file(daemon.dir.path().join("audit.jsonl")).ok();
        daemon.child = Daemon::spawn(&daemon.config, &[]);
        let pid = daemon.started("kept", Duration::from_secs(10));
        let _ = daemon.child.kill();
        let _ = daemon.child.wait();
        std::thread::sleep(Duration::from_millis(200));
        assert!(alive(pid), "{sensor}: the run died with the daemon");
        daemon.child = Daemon::spawn(&daemon.config, &[]);
        daemon.wait_for("the adoption", Duration::from_secs(10), |l| {
            l["event"] == "adopted"
                && l["service"] == "kept"
                && l["pid"].as_u64() == Some(u64::from(pid))
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(alive(pid), "{sensor}: the adopted run was killed");
        let starts = daemon
            .lines()
            .iter()
            .filter(|l| l["event"] == "started" && l["service"] == "kept")
            .count();
        assert_eq!(starts, 1, "{sensor}: a second run was started");
        assert!(daemon.stop().success());
        wait_until("the adopted run drained", Duration::from_secs(5), || {
            !alive(pid)
        });
        daemon.wait_for("its exit", Duration::from_secs(5), |l| {
            l["event"] == "exited" && l["service"] == "kept" && l["cause"] == "shutdown"
        });
        // A run that ended while no daemon ran: the service starts afresh.
        let audit = daemon.dir.path().join("audit.jsonl");
        std::fs::remove_file(&audit).unwrap();
        daemon.child = Daemon::spawn(&daemon.config, &[]);
        let second = daemon.started("kept", Duration::from_secs(10));
        let _ = daemon.child.kill();
        let _ = daemon.child.wait();
        // SAFETY: killing the run we just saw start.
        unsafe { libc::kill(second as i32, libc::SIGKILL) };
        wait_until("the run gone", Duration::from_secs(5), || !alive(second));
        std::fs::remove_file(&audit).unwrap();
        daemon.child = Daemon::spawn(&daemon.config, &[]);
        daemon.wait_for(
            "a fresh start after a dead record",
            Duration::from_secs(10),
            |l| {
                l["event"] == "started"
                    && l["service"] == "kept"
                    && l["pid"]
                        .as_u64()
                        .is_some_and(|p| p != u64::from(pid) && p != u64::from(second))
            },
        );
        assert!(
            daemon
                .lines()
                .iter()
                .any(|l| l["event"] == "orphan_terminated" && l["reason"] == "gone"),
            "{sensor}: the dead record is not in the audit log"
        );
        assert!(daemon.stop().success());
    }
}

/// SIGKILL of the daemon while a service restarts in a tight loop (children
/// caught between fork and exec) leaves nothing holding the instance lock:
/// the next start runs.
#[test]
fn a_killed_daemon_can_be_started_again_at_once() {
    for round in 0..5 {
        let mut daemon = Daemon::start(
            "sampling",
            &(service("looping", "exit 0", "clean-budget = 100000")
                + &service("looping2", "exit 0", "clean-budget = 100000")),
        );
        // Quiet: thousands of restarts.
        let _ = daemon.child.kill();
        let _ = daemon.child.wait();
        daemon.child = Daemon::spawn(&daemon.config, &[("WATCHDOG_LOG", "warn")]);
        daemon.wait_for("a few restarts", Duration::from_secs(10), |l| {
            l["event"] == "started" && l["crash_count"] == 0 && l["service"] == "looping2"
        });
        std::thread::sleep(Duration::from_millis(100 * round));
        let _ = daemon.child.kill();
        let _ = daemon.child.wait();
        let before = daemon.lines().len();
        daemon.child = Daemon::spawn(&daemon.config, &[("WATCHDOG_LOG", "warn")]);
        // Running: it starts the services again (a start still under way
        // could meet SIGTERM before its handler is in place).
        wait_until(
            &format!("round {round}: the second instance running its services"),
            Duration::from_secs(20),
            || {
                assert!(
                    matches!(daemon.child.try_wait(), Ok(None)),
                    "round {round}: the second start was refused"
                );
                daemon.lines()[before.min(daemon.lines().len())..]
                    .iter()
                    .any(|l| l["event"] == "started")
            },
        );
        assert!(daemon.stop().success());
        // Nothing of either instance is left.
        let config = daemon.config.display().to_string();
        wait_until(
            "no process of the daemon left",
            Duration::from_secs(5),
            || {
                std::fs::read_dir("/proc").unwrap().flatten().all(|e| {
                    let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                    !String::from_utf8_lossy(&cmd).contains(&config)
                })
            },
        );
    }
}

/// A loopback port free now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on the daemon's listener: the status code and the body.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get_with(port, path, "")
}

/// `GET path` with more header lines (each ending in CRLF).
fn http_get_with(port: u16, path: &str, headers: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: localhost\r\n{headers}\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

/// One request on the status socket; the reply.
fn ask(state: &Path, request: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(state.join("status.sock")).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply
}

/// /healthz answers 503 while the loop is blocked past health-timeout
/// (blocked on purpose through the status socket, which only a daemon
/// started for tests honours) and 200 again once it turns.
#[test]
fn healthz_fails_while_the_loop_is_blocked() {
    let port = free_port();
    let dir = TempDir::new("healthz");
    let config = write_config(
        dir.path(),
        "sampling",
        &format!("listen = \"127.0.0.1:{port}\"\nhealth-timeout = \"3s\"\n"),
        &service("steady", "sleep 60000", ""),
    );
    let child = Daemon::spawn(&config, &[("WATCHDOG_TEST_STALL_LOOP", "1")]);
    let mut daemon = Daemon { child, dir, config };
    daemon.started("steady", Duration::from_secs(10));
    let health = || http_get(port, "/healthz");
    // Its services as of the last heartbeat (at most a second old).
    wait_until(
        "/healthz 200 with steady running",
        Duration::from_secs(10),
        || health().is_some_and(|(code, body)| code == 200 && body.contains("\"running\"")),
    );
    let (_, body) = health().unwrap();
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["services"][0]["name"], "steady", "{body}");
    assert_eq!(body["services"][0]["state"], "running", "{body}");

    // Idle clients (a hung script, a slow scraper, or a user holding
    // connections open on purpose) do not hold up the others: more than
    // the 512 connections the listener keeps open at once (the oldest idle
    // ones make room).
    let idle_tcp: Vec<std::net::TcpStream> = (0..530)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let idle_unix: Vec<std::os::unix::net::UnixStream> = (0..40)
        .map(|_| {
            std::os::unix::net::UnixStream::connect(daemon.state().join("status.sock")).unwrap()
        })
        .collect();
    let asked = Instant::now();
    assert_eq!(health().map(|(code, _)| code), Some(200));
    let state_arg = daemon.state().to_str().unwrap().to_owned();
    let (code, out) = status_command(&["status", "--state-dir", &state_arg]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "idle clients held up /healthz and status for {:?}",
        asked.elapsed()
    );
    drop((idle_tcp, idle_unix));

    assert!(ask(&daemon.state(), "stall 9000\n").contains("stalling"));
    wait_until("/healthz 503", Duration::from_secs(6), || {
        health().is_some_and(|(code, _)| code == 503)
    });
    let (_, body) = health().unwrap();
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], "unhealthy", "{body}");
    assert!(
        body["problem"].as_str().unwrap().contains("has not turned"),
        "{body}"
    );
    // The status socket still answers, from the last snapshot; `watchdog
    // status` says so with exit 3.
    let status: Value = serde_json::from_str(&ask(&daemon.state(), "status\n")).unwrap();
    assert_eq!(status["health"]["ok"], false, "{status}");
    assert_eq!(status["stale"], true, "{status}");
    assert!(
        status["services"][0]["charged_bytes"].as_u64().is_some(),
        "no memory read while the loop is stuck: {status}"
    );
    let (code, out) = status_command(&["status", "--state-dir", &state_arg]);
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("has not turned"), "{out}");
    wait_until("/healthz 200 again", Duration::from_secs(12), || {
        health().is_some_and(|(code, _)| code == 200)
    });
    let (_, body) = health().unwrap();
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(
        body["loop_lag_max_us"].as_u64().unwrap() >= 8_000_000,
        "the stall is not in the lag: {body}"
    );
    assert!(daemon.stop().success());
    assert!(
        !daemon.state().join("status.sock").exists(),
        "the socket outlived the daemon"
    );

    // Without the test switch, nobody can block the loop.
    let mut daemon = Daemon::start("sampling", &service("steady", "sleep 60000", ""));
    daemon.started("steady", Duration::from_secs(10));
    assert!(ask(&daemon.state(), "stall 4000\n").contains("refused"));
    assert!(daemon.stop().success());
}

/// A process killed and reaped however the test ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The metric families an OpenMetrics exposition declares, by name, with
/// their type; panics on what the format does not allow: a sample of no
/// declared family, a sample name its type does not have (a counter's
/// `_total`, a histogram's `_bucket`/`_sum`/`_count`, an info's `_info`),
/// a family declared twice, or no `# EOF` at the end.
fn openmetrics_families(text: &str) -> std::collections::HashMap<String, String> {
    let mut families = std::collections::HashMap::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "no # EOF at the end:\n{text}");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect(line);
            assert!(
                families.insert(name.to_owned(), kind.to_owned()).is_none(),
                "{name} declared twice"
            );
            continue;
        }
        if line.starts_with('#') {
            assert!(
                line.starts_with("# HELP ") || line.starts_with("# UNIT "),
                "{line}"
            );
            continue;
        }
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        let suffixes: &[&str] = match families
            .iter()
            .filter(|(family, _)| name.starts_with(family.as_str()))
            .max_by_key(|(family, _)| family.len())
            .map(|(family, kind)| (name.strip_prefix(family.as_str()).unwrap(), kind.as_str()))
        {
            Some((suffix, "counter")) => {
                assert!(matches!(suffix, "_total" | "_created"), "{line}");
                continue;
            }
            Some((suffix, "histogram")) => {
                assert!(
                    matches!(suffix, "_bucket" | "_sum" | "_count" | "_created"),
                    "{line}"
                );
                continue;
            }
            Some((suffix, "info")) => {
                assert_eq!(suffix, "_info", "{line}");
                continue;
            }
            Some((suffix, _)) => {
                assert_eq!(suffix, "", "{line}");
                continue;
            }
            None => &[],
        };
        panic!("{line:?}: a sample of no declared family {suffixes:?}");
    }
    families
}

/// After a drain, /metrics (read by an independent Prometheus text
/// parser, and checked against the OpenMetrics rules) has the services'
/// and the watch target's series with their labels, types and values, the
/// restart counted by its cause, the latency histograms and the loss
/// counters; `watchdog status --json` matches the daemon's state and the
/// table renders without a terminal.
#[test]
fn metrics_and_status_after_a_drain() {
    for sensor in sensors("metrics_and_status_after_a_drain") {
        let port = free_port();
        let dir = TempDir::new("metrics");
        let word = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let target = Reaped(
            Command::new(HELPER)
                .args(["tag", &word, "alloc", "40", "sleep", "60000"])
                .spawn()
                .unwrap(),
        );
        let config = write_config(
            dir.path(),
            sensor,
            &format!("listen = \"127.0.0.1:{port}\"\n"),
            &(service("leaker", "leak 64 10 sleep 60000", "max-rss = \"24MiB\"")
                + &service("steady", "alloc 8 sleep 60000", "max-rss = \"64MiB\"")
                + &format!("[[watch]]\nname = \"session\"\nmatch = {word:?}\nlimit = \"32MiB\"\n")),
        );
        let child = Daemon::spawn(&config, &[]);
        let mut daemon = Daemon { child, dir, config };
        let steady = daemon.started("steady", Duration::from_secs(10));
        let first = daemon.started("leaker", Duration::from_secs(10));
        daemon.wait_for("the leaker's respawn", Duration::from_secs(20), |l| {
            l["event"] == "started"
                && l["service"] == "leaker"
                && l["pid"].as_u64() != Some(u64::from(first))
        });
        daemon.wait_for("the session's marker", Duration::from_secs(15), |l| {
            l["event"] == "respawn_recommended" && l["service"] == "session"
        });
        // OpenMetrics, as Prometheus asks for it.
        let (code, text) = http_get_with(
            port,
            "/metrics",
            "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n",
        )
        .expect("/metrics");
        assert_eq!(code, 200, "{text}");
        let families = openmetrics_families(&text);
        for (family, kind) in [
            ("watchdog_build", "info"),
            ("watchdog_sensor", "gauge"),
            ("watchdog_healthy", "gauge"),
            ("watchdog_service_state", "gauge"),
            ("watchdog_service_charged_bytes", "gauge"),
            ("watchdog_service_limit_bytes", "gauge"),
            ("watchdog_service_restarts", "counter"),
            ("watchdog_service_consecutive_crashes", "gauge"),
            ("watchdog_service_backoff_seconds", "gauge"),
            ("watchdog_service_uptime_seconds", "gauge"),
            ("watchdog_service_marker", "gauge"),
            ("watchdog_detection_latency_seconds", "histogram"),
            ("watchdog_crossing_to_signal_seconds", "histogram"),
            ("watchdog_kernel_events_lost", "counter"),
            ("watchdog_unconfirmed_crossings", "counter"),
            ("watchdog_audit_lines_lost", "counter"),
            ("watchdog_memory_used_bytes", "gauge"),
            ("watchdog_memory_total_bytes", "gauge"),
            ("watchdog_host_memory_available_bytes", "gauge"),
        ] {
            assert_eq!(
                families.get(family).map(String::as_str),
                Some(kind),
                "{sensor}: {family}\n{text}"
            );
        }
        let drains = daemon
            .lines()
            .iter()
            .filter(|l| {
                l["event"] == "exited" && l["service"] == "leaker" && l["cause"] == "memory_drain"
            })
            .count() as f64;
        // The Prometheus text format otherwise, where the parser knows
        // each family's type by its samples' names.
        let (code, text) = http_get(port, "/metrics").expect("/metrics");
        assert_eq!(code, 200, "{text}");
        assert!(!text.contains("# EOF"), "{text}");
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .unwrap_or_else(|e| panic!("{sensor}: /metrics does not parse: {e}\n{text}"));
        let typed = |name: &str| {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == name)
                .map(|s| std::mem::discriminant(&s.value))
        };
        assert_eq!(
            typed("watchdog_service_restarts_total"),
            Some(std::mem::discriminant(&prometheus_parse::Value::Counter(
                0.0
            ))),
            "{text}"
        );
        assert_eq!(
            typed("watchdog_service_charged_bytes"),
            Some(std::mem::discriminant(&prometheus_parse::Value::Gauge(0.0))),
            "{text}"
        );
        let value = |name: &str, labels: &[(&str, &str)]| -> Option<f64> {
            scrape
                .samples
                .iter()
                .find(|s| {
                    s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
                })
                .map(|s| match &s.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => *v,
                    other => panic!("{name}: unexpected {other:?}"),
                })
        };
        let leaker = [("service", "leaker"), ("kind", "service")];
        let steady_l = [("service", "steady"), ("kind", "service")];
        let restarts = value(
            "watchdog_service_restarts_total",
            &[("service", "leaker"), ("cause", "memory_drain")],
        )
        .unwrap_or_else(|| panic!("{sensor}: no restart counted by cause\n{text}"));
        assert!(
            restarts >= 1.0 && restarts <= drains,
            "{sensor}: {restarts} restarts, {drains} drains"
        );
        assert_eq!(
            value("watchdog_service_limit_bytes", &leaker),
            Some(f64::from(24u32 << 20))
        );
        let charged = value("watchdog_service_charged_bytes", &steady_l).expect("charged");
        assert!(
            (f64::from(8u32 << 20)..f64::from(16u32 << 20)).contains(&charged),
            "{sensor}: steady charged {charged}"
        );
        assert_eq!(
            value(
                "watchdog_service_state",
                &[("service", "steady"), ("state", "running")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                "watchdog_service_state",
                &[("service", "steady"), ("state", "draining")]
            ),
            Some(0.0)
        );
        assert_eq!(
            value("watchdog_service_consecutive_crashes", &steady_l),
            Some(0.0)
        );
        let mode = if sensor == "ebpf" { "ebpf" } else { "procfs" };
        assert_eq!(value("watchdog_sensor", &[("mode", mode)]), Some(1.0));
        assert_eq!(value("watchdog_healthy", &[]), Some(1.0));
        assert_eq!(
            value(
                "watchdog_kernel_events_lost_total",
                &[("counter", "ringbuf_full")]
            ),
            Some(0.0)
        );
        for histogram in [
            "watchdog_detection_latency_seconds",
            "watchdog_crossing_to_signal_seconds",
        ] {
            let count = value(&format!("{histogram}_count"), &[]).unwrap_or(0.0);
            assert!(count >= 1.0, "{sensor}: {histogram} is empty\n{text}");
        }
        assert!(
            value("watchdog_memory_total_bytes", &[]).is_some_and(|v| v > 0.0),
            "{sensor}: no host memory\n{text}"
        );
        // Every cause is a series from the start.
        assert_eq!(
            value(
                "watchdog_service_restarts_total",
                &[("service", "steady"), ("cause", "crash")]
            ),
            Some(0.0),
            "{text}"
        );
        assert_eq!(
            value("watchdog_service_backoff_seconds", &steady_l),
            Some(0.0)
        );
        let up = value("watchdog_service_uptime_seconds", &steady_l).expect("uptime");
        assert!(up > 0.0 && up < 120.0, "{sensor}: steady up {up} s");
        assert_eq!(
            value(
                "watchdog_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            Some(1.0)
        );
        // The watch target: its charged memory (40 MiB held, over its
        // 32 MiB limit) and its marker.
        let session = [("service", "session"), ("kind", "watch")];
        let watched = value("watchdog_service_charged_bytes", &session).expect("watch charged");
        assert!(
            watched >= f64::from(32u32 << 20),
            "{sensor}: session charged {watched}"
        );
        assert_eq!(value("watchdog_service_marker", &session), Some(1.0));
        assert_eq!(
            value(
                "watchdog_service_state",
                &[("service", "session"), ("state", "running")]
            ),
            Some(1.0)
        );

        // watchdog status: the same state, as JSON and as a table.
        let state = daemon.state();
        let mode = std::fs::metadata(state.join("status.sock"))
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .unwrap();
        assert_eq!(mode, 0o600, "the status socket is {mode:o}");
        let state_arg = state.to_str().unwrap();
        let (code, out) = status_command(&["status", "--state-dir", state_arg, "--json"]);
        assert_eq!(code, Some(0), "{out}");
        let status: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(status["pid"], daemon.child.id(), "{status}");
        assert_eq!(status["sensor"], mode_name(sensor));
        assert_eq!(status["stale"], false, "{status}");
        let services = status["services"].as_array().unwrap();
        let by_name = |name: &str| services.iter().find(|s| s["name"] == name).unwrap();
        assert_eq!(by_name("steady")["pid"], steady, "{status}");
        assert_eq!(by_name("steady")["state"], "running", "{status}");
        assert!(alive(steady));
        let leaker_pid = by_name("leaker")["pid"].as_u64();
        if let Some(pid) = leaker_pid
            && by_name("leaker")["state"] == "running"
            && !alive(pid as u32)
        {
            // Running when the status was taken and drained since (it
            // cycles in well under a second): the daemon says so too.
            daemon.wait_for("the leaker's exit", Duration::from_secs(10), |l| {
                l["event"] == "exited" && l["pid"] == pid
            });
        }
        assert!(
            by_name("leaker")["restarts"]["memory_drain"].as_u64() >= Some(1),
            "{status}"
        );
        assert_eq!(by_name("leaker")["limit_bytes"], 24 << 20);
        let (code, table) = status_command(&["status", "--state-dir", state_arg]);
        assert_eq!(code, Some(0), "{table}");
        assert!(
            !table.contains('\x1b'),
            "colour without a terminal:\n{table}"
        );
        assert!(
            table.contains("steady") && table.contains("leaker"),
            "{table}"
        );
        for line in table.lines() {
            assert!(line.chars().count() <= 80, "too wide: {line:?}");
        }
        assert!(
            table.contains("\nWATCH ") && table.contains("written"),
            "{table}"
        );
        assert_eq!(by_name("session")["kind"], "watch", "{status}");
        assert_eq!(by_name("session")["pid"], target.0.id(), "{status}");
        assert_eq!(by_name("session")["marker"], true, "{status}");
        assert!(daemon.stop().success());
        drop(target);
        let (code, out) = status_command(&["status", "--state-dir", state_arg]);
        assert_eq!(code, Some(1), "{out}");
        assert!(out.contains("status.sock"), "{out}");
    }
}

fn mode_name(sensor: &str) -> &'static str {
    if sensor == "ebpf" { "ebpf" } else { "procfs" }
}

/// Runs `watchdog ARGS`: its exit code and its standard output and error.
fn status_command(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(watchdog_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

/// A listener other hosts could reach is refused unless allowed.
#[test]
fn a_remote_listener_needs_allow_remote() {
    let dir = TempDir::new("remote");
    let config = write_config(
        dir.path(),
        "sampling",
        "listen = \"0.0.0.0:9731\"\n",
        &service("steady", "sleep 60000", ""),
    );
    let (code, err) = run_watchdog(
        &["run", "--config", config.to_str().unwrap()],
        Duration::from_secs(10),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("daemon.listen") && err.contains("allow-remote = true"),
        "{err}"
    );
    assert!(!dir.path().join("state").exists(), "it started anyway");
    // check-config on a file listening on `addr`: its exit code and words.
    let check = |addr: &str| {
        let keys = format!("listen = {addr:?}\n");
        write_config(
            dir.path(),
            "sampling",
            &keys,
            &service("steady", "sleep 60000", ""),
        );
        run_watchdog(
            &["check-config", config.to_str().unwrap()],
            Duration::from_secs(10),
        )
    };
    // Every address that is not loopback, IPv6 too.
    for addr in ["[::]:9731", "192.0.2.1:9731", "[::ffff:10.0.0.1]:9731"] {
        let (code, err) = check(addr);
        assert_eq!(code, Some(2), "{addr}: {err}");
        assert!(err.contains("allow-remote = true"), "{addr}: {err}");
    }
    for addr in ["[::1]:9731", "127.0.0.2:9731", "[::ffff:127.0.0.1]:9731"] {
        let (code, err) = check(addr);
        assert_eq!(code, Some(0), "{addr} is loopback: {err}");
    }
}

/// With `log-format = "json"` every line the daemon writes to standard
/// error is one JSON object, its decisions with their fields (service,
/// pid, charged_bytes, limit_bytes, cause); so are a refused file's error
/// (by the file's own choice) and a refused command line's; a listener
/// other hosts can reach, allowed, is served with a warning.
#[test]
fn logs_are_json_when_asked() {
    let dir = TempDir::new("jsonlogs");
    let port = free_port();
    let config = write_config(
        dir.path(),
        "sampling",
        &format!("log-format = \"json\"\nlisten = \"0.0.0.0:{port}\"\nallow-remote = true\n"),
        &(service("leaker", "leak 64 10 sleep 60000", "max-rss = \"24MiB\"")
            // A service that writes to both streams, leaving a line
            // unfinished for a while: its lines become records of their own.
            + "[[service]]\nname = \"chatty\"\ncommand = [\"/bin/sh\", \"-c\", \"printf 'progress: 50%%' >&2; echo out-line; sleep 0.3; echo ' done' >&2; exec sleep 60000\"]\n"),
    );
    let stderr_path = dir.path().join("stderr.log");
    let child = Daemon::spawn_to(&config, &[], std::fs::File::create(&stderr_path).unwrap());
    let mut daemon = Daemon { child, dir, config };
    let first = daemon.started("leaker", Duration::from_secs(10));
    let chatty = daemon.started("chatty", Duration::from_secs(10));
    daemon.wait_for("the leaker's drain", Duration::from_secs(20), |l| {
        l["event"] == "exited" && l["pid"] == first && l["cause"] == "memory_drain"
    });
    assert_eq!(http_get(port, "/healthz").map(|(code, _)| code), Some(200));
    wait_until("chatty's lines", Duration::from_secs(10), || {
        std::fs::read_to_string(&stderr_path).is_ok_and(|t| t.contains(" done"))
    });
    assert!(daemon.stop().success());
    let text = std::fs::read_to_string(&stderr_path).unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    let find = |pred: &dyn Fn(&Value) -> bool| records.iter().find(|r| pred(r)).cloned();
    let remote = find(&|r| {
        r["level"] == "WARN"
            && r["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("where other hosts can reach them"))
    })
    .unwrap_or_else(|| panic!("no warning of a remote listener:\n{text}"));
    assert_eq!(remote["fields"]["address"], format!("0.0.0.0:{port}"));
    let exited = find(&|r| r["fields"]["message"] == "exited" && r["fields"]["pid"] == first)
        .unwrap_or_else(|| panic!("no exit record:\n{text}"));
    let output: Vec<(String, String)> = records
        .iter()
        .filter(|r| r["target"] == "watchdog::output" && r["fields"]["service"] == "chatty")
        .map(|r| {
            assert_eq!(r["fields"]["pid"], chatty, "{r}");
            (
                r["fields"]["stream"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                r["fields"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    assert!(
        output.contains(&("stderr".into(), "progress: 50% done".into()))
            && output.contains(&("stdout".into(), "out-line".into())),
        "{output:?}\n{text}"
    );
    let fields = &exited["fields"];
    assert_eq!(fields["service"], "leaker", "{exited}");
    assert_eq!(fields["cause"], "memory_drain", "{exited}");
    assert_eq!(fields["limit_bytes"], 24 << 20, "{exited}");
    assert!(
        fields["charged_bytes"].as_u64() >= Some(24 << 20),
        "{exited}"
    );

    // A file refused as a whole: its own log-format still covers why.
    let bad = daemon.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[daemon]\nlog-format = \"json\"\nlisten = \"0.0.0.0:9731\"\n",
    )
    .unwrap();
    let (code, err) = run_watchdog(
        &["run", "--config", bad.to_str().unwrap()],
        Duration::from_secs(10),
    );
    assert_eq!(code, Some(2), "{err}");
    let record: Value = serde_json::from_str(err.trim())
        .unwrap_or_else(|e| panic!("not one JSON record ({e}): {err:?}"));
    assert_eq!(record["level"], "ERROR", "{record}");
    assert!(
        record["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("allow-remote")),
        "{record}"
    );
    // A command line refused, with --log-format json.
    let (code, err) = run_watchdog(
        &["run", "--log-format", "json", "--no-such-option"],
        Duration::from_secs(10),
    );
    assert_eq!(code, Some(2), "{err}");
    let record: Value = serde_json::from_str(err.trim())
        .unwrap_or_else(|e| panic!("not one JSON record ({e}): {err:?}"));
    assert!(
        record["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("--no-such-option")),
        "{record}"
    );
}

/// The daemon names the form of each kernel program in one info line at
/// start-up, and `watchdog status` reports the same forms; the exit
/// program forced to its pre-6.16 form is reported as such, with why.
#[test]
fn the_kernel_program_forms_are_told() {
    if !privileged("the_kernel_program_forms_are_told") {
        return;
    }
    // What `watchdog version --verbose` finds by loading the programs.
    let (code, version) = status_command(&["version", "--verbose"]);
    assert_eq!(code, Some(0), "{version}");
    let expected = version
        .lines()
        .find_map(|l| l.strip_prefix("kernel programs: "))
        .unwrap_or_else(|| panic!("no forms in version --verbose: {version}"))
        .to_owned();
    for forced in [false, true] {
        let dir = TempDir::new("forms");
        let config = write_config(
            dir.path(),
            "ebpf",
            "",
            &service("steady", "sleep 60000", "max-rss = \"64MiB\""),
        );
        let stderr = dir.path().join("stderr.log");
        let env: &[(&str, &str)] = if forced {
            &[("WATCHDOG_FORCE_LEGACY_EXIT", "1")]
        } else {
            &[]
        };
        let child = Daemon::spawn_to(&config, env, std::fs::File::create(&stderr).unwrap());
        let mut daemon = Daemon { child, dir, config };
        daemon.started("steady", Duration::from_secs(10));
        let log = std::fs::read_to_string(&stderr).unwrap();
        let told: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("kernel programs attached"))
            .collect();
        assert_eq!(told.len(), 1, "one line names the forms: {log}");
        let line = told[0];
        assert!(line.contains(" INFO "), "{line}");
        let forms = line
            .split_once("kernel programs attached: ")
            .unwrap()
            .1
            .trim_end();
        for program in ["rss_stat=", "sched_process_exit=", "mark_victim="] {
            assert!(forms.contains(program), "{program} in {line}");
        }
        // Before 6.16 the legacy form is the only one, for its own reason.
        let legacy = if expected.contains("sched_process_exit=legacy") {
            "legacy (no group_dead argument before 6.16)"
        } else {
            "legacy (forced by WATCHDOG_FORCE_LEGACY_EXIT=1)"
        };
        if forced {
            assert!(
                forms.contains(&format!("sched_process_exit={legacy}")),
                "{line}"
            );
        } else {
            assert_eq!(forms, expected, "the daemon and version --verbose agree");
        }

        let state = daemon.state().display().to_string();
        let (code, out) = status_command(&["status", "--state-dir", &state, "--json"]);
        assert_eq!(code, Some(0), "{out}");
        let status: Value = serde_json::from_str(&out).unwrap();
        let programs = status["kernel_programs"]
            .as_object()
            .unwrap_or_else(|| panic!("no kernel_programs: {status}"));
        let from_status = ["rss_stat", "sched_process_exit", "mark_victim"]
            .map(|p| format!("{p}={}", programs[p].as_str().unwrap()))
            .join(", ");
        assert_eq!(from_status, forms, "status --json and the log agree");
        if forced {
            assert_eq!(programs["sched_process_exit"], legacy);
        }
        let (code, table) = status_command(&["status", "--state-dir", &state]);
        assert_eq!(code, Some(0), "{table}");
        let short = table
            .lines()
            .find(|l| l.starts_with("kernel programs: "))
            .unwrap_or_else(|| panic!("no forms line: {table}"));
        assert!(short.len() <= 80, "{short}");
        let exit_form = if forced { "legacy" } else { "" };
        assert!(
            short.contains(&format!("sched_process_exit={exit_form}")),
            "{short}"
        );
        assert!(daemon.stop().success());
    }
}

/// A memory cgroup of the test's own with a limit, under the test's own
/// memory cgroup (v1) or the root (v2); removed with whatever the daemon
/// made in it.
struct MemoryCgroup {
    dir: PathBuf,
    procs: PathBuf,
}

impl MemoryCgroup {
    /// `None`, saying why, where no memory controller can be used here.
    fn new(name: &str, limit: u64) -> Option<Self> {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let v1 = own.lines().find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then(|| Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/')))
        });
        let v2_root = std::fs::read_to_string("/sys/fs/cgroup/cgroup.subtree_control")
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        let (dir, limit_file) = match v1 {
            Some(base) => (base.join(name), "memory.limit_in_bytes"),
            None if v2_root => (Path::new("/sys/fs/cgroup").join(name), "memory.max"),
            None => {
                println!("no memory cgroup controller to limit the daemon with");
                return None;
            }
        };
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        std::fs::write(dir.join(limit_file), limit.to_string()).unwrap();
        Some(Self {
            procs: dir.join("cgroup.procs"),
            dir,
        })
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        fn remove(dir: &Path) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        remove(&entry.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        remove(&self.dir);
    }
}

/// The host memory monitor, on a daemon in a cgroup limited to 512 MiB
/// (warning at 50%, recovery at 25%): a service that takes 320 MiB and
/// gives it back causes one warning and one recovery line, with their
/// fields, and no repeat; the status reports the cgroup's scope.
#[test]
fn the_memory_monitor_warns_and_recovers_once() {
    if !privileged("the_memory_monitor_warns_and_recovers_once") {
        return;
    }
    let dir = TempDir::new("hostmem");
    let name = dir
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let limit: u64 = 512 << 20;
    let Some(cgroup) = MemoryCgroup::new(&name, limit) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have a memory cgroup controller"
        );
        return;
    };
    let config = write_config(
        dir.path(),
        "sampling",
        "host-memory-warn = \"50%\"\nhost-memory-recover = \"25%\"\nhost-memory-interval = \"100ms\"\n",
        &service(
            "hog",
            "sleep 1000 alloc 320 sleep 2000 free sleep 600000",
            "",
        ),
    );
    let stderr_path = dir.path().join("stderr.log");
    // Joins the cgroup, then becomes the daemon.
    let child = Command::new("sh")
        .args([
            "-c",
            "echo $$ > \"$0\" && exec \"$@\"",
            cgroup.procs.to_str().unwrap(),
            watchdog_bin().to_str().unwrap(),
            "run",
            "--log-format",
            "json",
            "--config",
            config.to_str().unwrap(),
        ])
        .env("WATCHDOG_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let mut daemon = Daemon { child, dir, config };
    let records = || -> Vec<Value> {
        std::fs::read_to_string(&stderr_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let said = |records: &[Value], text: &str| -> Vec<Value> {
        records
            .iter()
            .filter(|r| {
                r["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(text))
            })
            .cloned()
            .collect()
    };
    daemon.started("hog", Duration::from_secs(10));
    let status: Value = serde_json::from_str(&ask(&daemon.state(), "status\n")).unwrap();
    assert_eq!(status["memory"]["scope"], "cgroup", "{status}");
    assert_eq!(status["memory"]["total_bytes"], limit, "{status}");
    wait_until("the recovery line", Duration::from_secs(20), || {
        !said(&records(), "memory recovered").is_empty()
    });
    // Nothing more while it stays under.
    std::thread::sleep(Duration::from_secs(1));
    assert!(daemon.stop().success());
    let records = records();
    let warned = said(&records, "memory is running short");
    let recovered = said(&records, "memory recovered");
    assert_eq!(
        (warned.len(), recovered.len()),
        (1, 1),
        "{warned:#?} {recovered:#?}"
    );
    let warning = &warned[0];
    assert_eq!(warning["level"], "WARN");
    assert_eq!(warning["fields"]["scope"], "cgroup", "{warning}");
    assert_eq!(warning["fields"]["total_bytes"], limit, "{warning}");
    assert_eq!(warning["fields"]["warn_bytes"], limit / 2, "{warning}");
    assert!(
        warning["fields"]["used_bytes"].as_u64() >= Some(limit / 2),
        "{warning}"
    );
    let recovery = &recovered[0];
    assert_eq!(recovery["level"], "INFO");
    assert!(
        recovery["fields"]["used_bytes"].as_u64() <= Some(limit / 4),
        "{recovery}"
    );
    drop(daemon);
    drop(cgroup);
}

/// With JSON logs and a reader of standard error that stalls, a service
/// that writes and restarts fast keeps being restarted, and the daemon's
/// descriptors stay flat: the stall costs log records (counted and said),
/// not the reading of the services' pipes. Every record read in the end
/// is whole.
#[test]
fn a_stalled_log_reader_costs_records_not_services() {
    let dir = TempDir::new("stalledlog");
    let config = write_config(
        dir.path(),
        "sampling",
        "log-format = \"json\"\n",
        "[[service]]\nname = \"chatty\"\ncommand = [\"/bin/sh\", \"-c\", \"echo hello; echo err >&2; exit 1\"]\nbackoff-floor = \"1ms\"\nbackoff-cap = \"5ms\"\nmax-crashes = 1000000\n",
    );
    // Standard error into a pipe nobody reads until the end.
    let child = Daemon::spawn_to(&config, &[], Stdio::piped());
    let mut daemon = Daemon { child, dir, config };
    let fds = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let pid = daemon.child.id();
    // The fewest descriptors seen over half a second: a start in progress
    // holds a few more for a moment; ended runs' pipes kept open would
    // raise the floor by two for each.
    let floor = || {
        (0..10)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(50));
                fds(pid)
            })
            .min()
            .unwrap_or(0)
    };
    daemon.started("chatty", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1));
    let (early_fds, early_runs) = (floor(), daemon.lines().len());
    std::thread::sleep(Duration::from_secs(3));
    let (late_fds, late_runs) = (floor(), daemon.lines().len());
    assert!(
        late_runs >= early_runs + 60,
        "restarts stalled with the log: {early_runs} then {late_runs} audit lines"
    );
    assert!(
        late_fds <= early_fds + 12,
        "descriptors grew from {early_fds} to {late_fds} in 3.5 s"
    );
    let mut stderr = daemon.child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
        text
    });
    assert!(daemon.stop().success());
    let text = reader.join().unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not whole ({e}): {l:?}")))
        .collect();
    let stopped = records
        .iter()
        .find(|r| r["fields"]["message"] == "stopped")
        .unwrap_or_else(|| panic!("no stopped record in {} records", records.len()));
    assert!(
        stopped["fields"]["lost_log_lines"].as_u64().is_some(),
        "{stopped}"
    );
}
