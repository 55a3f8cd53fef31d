//! The service actor: one type that owns a service's policy, its current
//! run, its sensor group and its deadlines. Inputs (sensor events, exits,
//! timers, shutdown, and the answers to its own requests) go in; effects
//! (spawn, signal, kill the tree, sensor requests, marker, hook, audit
//! lines) come out. Its next deadline is a function of its state, so no
//! deadline can be dropped by another.
//!
//! [`drive`] is the one loop that runs services: `watchdog supervise` runs
//! one, the daemon many, on a [`Platform`] that performs the effects (the
//! real one is [`host::Host`]; tests use a scripted one with paused time).

pub mod host;

use std::{
    collections::HashMap,
    future::Future,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    exit::{ExitStatus, StatusFields},
    mem::Charged,
    policy::{self, Action, Cause, Event, OomEvidence, Policy, Record},
    runner::{Spec, User},
    sensor::{GroupId, SensorEvent},
};

/// Everything that defines one service or watch target. Two equal
/// configurations run the same way (a reload keeps what did not change).
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    pub target: Target,
    pub policy: policy::Config,
    /// Where and how the memory action `marker` writes its marker.
    pub marker: Option<MarkerSpec>,
    /// A memory hook that runs longer is killed.
    pub hook_timeout: Duration,
}

impl ServiceConfig {
    /// Whether it watches processes it did not start.
    pub fn is_watch(&self) -> bool {
        matches!(self.target, Target::Watch(_))
    }

    /// The user its processes and hooks run as, when not the daemon's.
    pub fn user(&self) -> Option<&User> {
        match &self.target {
            Target::Spawn(spec) => spec.user.as_ref(),
            Target::Watch(_) => None,
        }
    }
}

/// What a run is.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// A process tree the daemon starts.
    Spawn(Spec),
    /// A process tree the daemon did not start, found by a selector.
    Watch(Selector),
}

/// How a watch target finds its process.
#[derive(Clone, Debug, PartialEq)]
pub enum Selector {
    Pid(u32),
    /// The outermost process whose full command line matches (never the
    /// daemon or its ancestors).
    Match(Pattern),
    /// From `from` (the daemon itself when `None`), the first ancestor
    /// whose command line matches.
    AncestorMatch {
        pattern: Pattern,
        from: Option<u32>,
    },
}

/// A compiled regular expression, equal to another with the same source.
#[derive(Clone, Debug)]
pub struct Pattern(pub regex::Regex);

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

/// Where the marker goes and in which form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarkerSpec {
    pub path: PathBuf,
    pub format: MarkerFormat,
    /// Removed after the process has stayed under its limit this long
    /// (`None`: only when it exits).
    pub clear_after: Option<Duration>,
}

/// The marker's form.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum MarkerFormat {
    /// `key=value` lines.
    #[default]
    #[value(name = "key-value")]
    KeyValue,
    /// One JSON object.
    Json,
}

/// A run that was started (or, for a watch target, found).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spawned {
    pub pid: u32,
    /// Its sensor group (watched even without a limit: exits, forks and
    /// OOM kills are sensed too).
    pub group: Option<GroupId>,
    /// Not our child (a watch target): its exit is learned from the
    /// sensor, and nothing it leaves is killed.
    pub foreign: bool,
}

/// What goes into a service.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    Start,
    Shutdown,
    /// Its deadline came.
    Timer,
    /// The answer to [`Effect::Spawn`].
    Spawned(Result<Spawned, String>),
    /// A sensor event about its group.
    Sensor(SensorEvent),
    /// The answer to [`Effect::Measure`].
    Reading {
        charged: u64,
        metric: Charged,
    },
    /// A child of the service (its run, or a hook) was reaped.
    Reaped {
        pid: u32,
        status: ExitStatus,
        peak_rss_bytes: u64,
    },
    /// The run's cgroup saw an OOM kill while it ran (memory.events).
    CgroupOomKill,
    /// The answer to [`Effect::WriteMarker`].
    MarkerWritten(Result<PathBuf, String>),
    /// The answer to [`Effect::RemoveMarker`].
    MarkerRemoved {
        result: Result<PathBuf, String>,
        reason: &'static str,
    },
    /// The answer to [`Effect::RunHook`].
    HookStarted(Result<u32, String>),
}

/// What a service asks for. The platform performs them in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Start a run; answered with [`Input::Spawned`].
    Spawn,
    /// Take over the run a previous instance left (recorded at start-up);
    /// answered with [`Input::Spawned`].
    Adopt,
    /// Send a signal to the run's tree: its process group and every member
    /// of its group that left it (setsid).
    Signal {
        pid: u32,
        group: Option<GroupId>,
        signal: i32,
    },
    /// SIGKILL every process of the run's tree.
    KillTree { pid: u32, group: Option<GroupId> },
    /// The run is over (its main process `pid` reaped): SIGKILL what it
    /// left behind, stop watching it.
    EndRun { pid: u32, group: Option<GroupId> },
    /// Stop watching a watch target's tree; touch nothing.
    Detach { group: Option<GroupId> },
    /// Read the group exactly; answered with [`Input::Reading`].
    Measure { group: GroupId },
    /// Fire when the group reaches `limit` bytes, armed now.
    ArmAt { group: GroupId, limit: u64 },
    /// Fire again once the group has been under its hysteresis level.
    Rearm { group: GroupId },
    /// Write the respawn marker; answered with [`Input::MarkerWritten`].
    WriteMarker {
        path: PathBuf,
        format: MarkerFormat,
        marker: Marker,
    },
    /// Remove the marker; answered with [`Input::MarkerRemoved`].
    RemoveMarker { path: PathBuf, reason: &'static str },
    /// Start the memory hook (as `user`, when set); answered with
    /// [`Input::HookStarted`].
    RunHook {
        argv: Vec<String>,
        env: Vec<(&'static str, String)>,
        user: Option<User>,
    },
    /// SIGKILL a hook that overran its timeout (and its process group).
    KillHook { pid: u32 },
    /// Is the run (one we did not fork) gone? Answered with
    /// [`Input::Reaped`] (status unknown) when it is.
    CheckGone { pid: u32 },
    /// Write an audit line (boxed: it is much larger than the others).
    Audit(Box<AuditLine>),
    /// The service is over.
    Finished(Outcome),
}

/// How supervision of a service ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Stopped (shutdown, or the restart policy says no more after a run
    /// that did not fail).
    Stopped,
    /// The restart policy says no more after a run that failed (a crash,
    /// an OOM kill).
    Failed,
    /// Gave up after too many crashes.
    GaveUp,
    /// The very first start failed: a mistake in the command line.
    CannotStart(String),
}

/// The respawn marker's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Marker {
    pub name: String,
    pub pid: u32,
    pub charged_bytes: u64,
    pub limit_bytes: u64,
    pub metric: Option<Charged>,
    pub reason: &'static str,
}

/// One audit line, without the `ts` and `source` the writer adds
/// (docs/audit-log.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuditLine {
    pub event: Event,
    pub service: String,
    pub pid: u32,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusFields>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub charged_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metric: Option<Charged>,
    pub crash_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_in_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// Hook and marker lines: the hook's pid, how long it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook_pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `events_lost`: which counter, how many new, how many in all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counter: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

impl AuditLine {
    pub(crate) fn new(event: Event, service: &str, pid: u32, crash_count: u32) -> Self {
        Self {
            event,
            service: service.to_owned(),
            pid,
            status: None,
            cause: None,
            uptime_ms: None,
            peak_rss_bytes: None,
            charged_bytes: None,
            limit_bytes: None,
            metric: None,
            crash_count,
            restart_in_ms: None,
            reason: None,
            hook_pid: None,
            duration_ms: None,
            path: None,
            error: None,
            counter: None,
            count: None,
            total: None,
        }
    }
}

/// How often a run we did not fork is looked at while it is stopped.
const GONE_CHECK: Duration = Duration::from_secs(1);

/// A marker that could not be written (a full disk) is tried again after
/// this, then twice as long each time, up to [`MARKER_RETRY_MAX`], while
/// its run stays over its limit.
const MARKER_RETRY_FIRST: Duration = Duration::from_secs(1);
const MARKER_RETRY_MAX: Duration = Duration::from_secs(30);

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl OomEvidence {
    fn as_str(self) -> &'static str {
        match self {
            Self::EbpfMarkVictim => "ebpf_mark_victim",
            Self::CgroupMemoryEventsOomKill => "cgroup_memory_events_oom_kill",
        }
    }
}

/// The live run and what is known of it.
#[derive(Clone, Copy, Debug)]
struct Run {
    pid: u32,
    group: Option<GroupId>,
    foreign: bool,
    oom: Option<OomEvidence>,
}

/// A memory hook that is running.
#[derive(Clone, Copy, Debug)]
struct Hook {
    started: Instant,
    /// Killed for overrunning its timeout.
    killed: bool,
}

/// One service: its policy, its run, its hooks, its deadlines.
pub struct Service {
    cfg: ServiceConfig,
    policy: Policy,
    run: Option<Run>,
    /// The pid the last run had (0: it could not be started), for the
    /// lines written after it is gone.
    last_pid: u32,
    ever_started: bool,
    /// The last crossing's reading, for the marker and the hook.
    last_charged: (u64, Option<Charged>),
    /// Which limit the last enforcement was for (`limit`, `hard_limit`).
    last_reason: &'static str,
    /// Memory hooks running, by pid.
    hooks: HashMap<u32, Hook>,
    /// The marker was written and not removed since.
    marked: bool,
    /// When to remove the marker of a run back under its limit.
    clear_at: Option<Instant>,
    /// When to try again to write a marker that could not be written, and
    /// the wait before that try.
    marker_retry: Option<(Instant, Duration)>,
    /// Being drained because a reload removed or changed it.
    retiring: bool,
    /// Restarts by the cause of the exit before them (kept across a
    /// reload that changes the service).
    restarts: std::collections::BTreeMap<&'static str, u64>,
    /// When to look whether a run we did not fork is gone (see
    /// [`Service::handle`]).
    gone_check: Option<Instant>,
    /// Takes over this pid (a previous instance's run) instead of
    /// starting one.
    adopting: Option<(u32, Duration)>,
    /// A first start that fails ends supervision (`supervise`: a mistake
    /// on the command line); otherwise it is a failed run like any other
    /// (the daemon keeps trying, with backoff).
    first_failure_ends: bool,
    outcome: Option<Outcome>,
}

impl Service {
    pub fn new(cfg: ServiceConfig) -> Self {
        let policy = Policy::new(cfg.policy.clone());
        Self {
            cfg,
            policy,
            run: None,
            last_pid: 0,
            ever_started: false,
            last_charged: (0, None),
            last_reason: "limit",
            hooks: HashMap::new(),
            marked: false,
            clear_at: None,
            marker_retry: None,
            retiring: false,
            restarts: Default::default(),
            gone_check: None,
            adopting: None,
            first_failure_ends: true,
            outcome: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.cfg
    }

    /// Whether supervision of it is over.
    pub fn finished(&self) -> bool {
        self.outcome.is_some()
    }

    /// How supervision of it ended, once it has.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// Memory hooks still running.
    pub fn hooks(&self) -> impl Iterator<Item = u32> + '_ {
        self.hooks.keys().copied()
    }

    /// Ends supervision: hooks still running are killed (nothing would
    /// time them out any more), then `Finished`.
    fn finish(&mut self, outcome: Outcome) -> Vec<Effect> {
        self.outcome = Some(outcome.clone());
        self.marker_retry = None;
        let mut hooks: Vec<u32> = self.hooks.drain().map(|(pid, _)| pid).collect();
        hooks.sort_unstable();
        let mut effects: Vec<Effect> = hooks
            .into_iter()
            .map(|pid| Effect::KillHook { pid })
            .collect();
        effects.push(Effect::Finished(outcome));
        effects
    }

    /// The running run's pid.
    pub fn pid(&self) -> Option<u32> {
        self.run.map(|r| r.pid)
    }

    /// Its run's sensor group.
    pub fn group(&self) -> Option<GroupId> {
        self.run.and_then(|r| r.group)
    }

    /// Whether `group` is its run's sensor group.
    pub fn owns_group(&self, group: GroupId) -> bool {
        self.run.is_some_and(|r| r.group == Some(group))
    }

    /// Whether `pid` is a child of its own (the run, or a hook).
    pub fn owns_child(&self, pid: u32) -> bool {
        self.pid() == Some(pid) || self.hooks.contains_key(&pid)
    }

    /// When it must be fed [`Input::Timer`] next.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.finished() {
            return None;
        }
        let hooks = self
            .hooks
            .values()
            .filter(|h| !h.killed)
            .map(|h| h.started + self.cfg.hook_timeout);
        self.policy
            .next_deadline()
            .into_iter()
            .chain(self.clear_at)
            .chain(self.marker_retry.map(|(at, _)| at))
            .chain(self.gone_check)
            .chain(hooks)
            .min()
    }

    /// Whether the marker is written now.
    pub fn marked(&self) -> bool {
        self.marked
    }

    /// What it is doing, for `watchdog status` and the metrics; the
    /// memory of its tree is read by the caller from `members`.
    pub fn status(&self, now: Instant, members: Vec<u32>) -> crate::status::ServiceStatus {
        use crate::status::{Kind, ServiceStatus, State};
        let (state, uptime, backoff) = match (&self.outcome, self.policy.stage()) {
            (Some(Outcome::GaveUp), _) => (State::GaveUp, None, None),
            (Some(Outcome::Failed | Outcome::CannotStart(_)), _) => (State::Failed, None, None),
            (Some(Outcome::Stopped), _) => (State::Stopped, None, None),
            (None, policy::Stage::Running { since }) => (
                State::Running,
                Some(now.saturating_duration_since(since)),
                None,
            ),
            (None, policy::Stage::Draining { since }) => (
                State::Draining,
                Some(now.saturating_duration_since(since)),
                None,
            ),
            (None, policy::Stage::BackingOff { until }) => (
                State::Backoff,
                None,
                Some(until.saturating_duration_since(now)),
            ),
            (None, policy::Stage::Spawning) if self.cfg.is_watch() => (State::Waiting, None, None),
            (None, _) => (State::Starting, None, None),
        };
        let memory = self.cfg.policy.memory.as_ref();
        ServiceStatus {
            name: self.cfg.name.clone(),
            kind: if self.cfg.is_watch() {
                Kind::Watch
            } else {
                Kind::Service
            },
            state,
            pid: self.pid(),
            processes: u32::try_from(members.len()).unwrap_or(u32::MAX),
            charged_bytes: None,
            limit_bytes: memory.map(|m| m.limit),
            hard_limit_bytes: memory.and_then(|m| m.hard_limit),
            restarts: self
                .restarts
                .iter()
                .map(|(&cause, &n)| (cause.to_owned(), n))
                .collect(),
            crash_count: self.policy.crash_count(),
            last_exit_cause: self.policy.last_cause().map(|c| c.as_str().to_owned()),
            uptime_ms: uptime.map(millis),
            backoff_ms: backoff.map(millis),
            marker: self.marked,
            members,
        }
    }

    /// Feeds one input at `now`; returns what to do, in order.
    pub fn handle(&mut self, input: Input, now: Instant) -> Vec<Effect> {
        let effects = self.handle_input(input, now);
        // A run we did not fork is known to end only from the sensor: once
        // it is asked to stop, its pid is also looked at now and then, so
        // that a missed exit cannot hold a drain (and the daemon's
        // shutdown) forever.
        match self.run {
            Some(run)
                if run.foreign
                    && self.gone_check.is_none()
                    && effects
                        .iter()
                        .any(|e| matches!(e, Effect::Signal { .. } | Effect::KillTree { .. })) =>
            {
                self.gone_check = Some(now + GONE_CHECK);
            }
            None => self.gone_check = None,
            _ => {}
        }
        effects
    }

    fn handle_input(&mut self, input: Input, now: Instant) -> Vec<Effect> {
        if self.finished() {
            // A watch target found its process as it was stopped: let go.
            if let Input::Spawned(Ok(spawned)) = input
                && spawned.foreign
            {
                return vec![Effect::Detach {
                    group: spawned.group,
                }];
            }
            return vec![];
        }
        let actions = match input {
            Input::Start if self.adopting.is_some() => return vec![Effect::Adopt],
            Input::Start => self.policy.handle(policy::Input::Start, now),
            Input::Shutdown => self.policy.handle(policy::Input::Shutdown, now),
            Input::Timer => return self.timer(now),
            Input::Spawned(Ok(spawned)) => {
                self.run = Some(Run {
                    pid: spawned.pid,
                    group: spawned.group,
                    foreign: spawned.foreign,
                    oom: None,
                });
                self.last_pid = spawned.pid;
                self.ever_started = true;
                if let Some((_, age)) = self.adopting.take() {
                    let since = now.checked_sub(age).unwrap_or(now);
                    self.policy.handle(policy::Input::Adopted { since }, now)
                } else {
                    self.policy.handle(policy::Input::Started, now)
                }
            }
            Input::Spawned(Err(error)) if self.adopting.take().is_some() => {
                tracing::warn!(service = %self.cfg.name, error = %error, "starting afresh");
                self.policy.handle(policy::Input::Start, now)
            }
            Input::Spawned(Err(error)) => {
                if !self.ever_started && self.first_failure_ends {
                    return self.finish(Outcome::CannotStart(error));
                }
                tracing::error!(service = %self.cfg.name, error = %error, "failed to start the service");
                // No process: the exit line says pid 0, status 127 as a
                // shell reports a command it cannot run.
                self.last_pid = 0;
                self.policy.handle(
                    policy::Input::Exited {
                        status: ExitStatus::Code(127),
                        oom: None,
                        peak_rss_bytes: None,
                        error: Some(error),
                    },
                    now,
                )
            }
            Input::Sensor(event) => return self.sensor(event, now),
            Input::Reading { charged, metric } => self
                .policy
                .handle(policy::Input::Memory { charged, metric }, now),
            Input::Reaped {
                pid,
                status,
                peak_rss_bytes,
            } => {
                if let Some(hook) = self.hooks.remove(&pid) {
                    return vec![self.hook_exited(pid, status, now - hook.started)];
                }
                return self.run_ended(pid, status, peak_rss_bytes, now);
            }
            Input::CgroupOomKill => {
                if let Some(run) = &mut self.run {
                    run.oom
                        .get_or_insert(OomEvidence::CgroupMemoryEventsOomKill);
                }
                vec![]
            }
            Input::MarkerWritten(result) => {
                let retried = self.marker_retry.is_some();
                match &result {
                    Err(error) if self.cfg.marker.is_some() && self.run.is_some() => {
                        let wait = self.marker_retry.map_or(MARKER_RETRY_FIRST, |(_, wait)| {
                            (wait * 2).min(MARKER_RETRY_MAX)
                        });
                        self.marker_retry = Some((now + wait, wait));
                        if retried {
                            // Said once, when it first failed.
                            tracing::debug!(service = %self.cfg.name, error = %error, "the marker still cannot be written");
                            return vec![];
                        }
                        tracing::warn!(
                            service = %self.cfg.name, error = %error,
                            "cannot write the marker: trying again while the process stays over its limit"
                        );
                    }
                    _ => self.marker_retry = None,
                }
                return vec![self.marker_written(result)];
            }
            Input::MarkerRemoved { result, reason } => {
                let mut line = self.line(Event::MarkerRemoved);
                line.reason = Some(reason);
                match result {
                    Ok(path) => line.path = Some(path.display().to_string()),
                    Err(error) => {
                        line.path = self.marker_path();
                        line.error = Some(error);
                    }
                }
                return vec![Effect::Audit(Box::new(line))];
            }
            Input::HookStarted(Ok(pid)) => {
                self.hooks.insert(
                    pid,
                    Hook {
                        started: now,
                        killed: false,
                    },
                );
                let mut line = self.line(Event::HookStarted);
                line.hook_pid = Some(pid);
                return vec![Effect::Audit(Box::new(line))];
            }
            Input::HookStarted(Err(error)) => {
                let mut line = self.line(Event::HookFailed);
                line.error = Some(error);
                return vec![Effect::Audit(Box::new(line))];
            }
        };
        self.perform(actions)
    }

    /// Its deadlines: the marker's removal, hooks' timeouts, the policy's.
    fn timer(&mut self, now: Instant) -> Vec<Effect> {
        let mut effects = Vec::new();
        if let (Some(at), Some(run)) = (self.gone_check, self.run)
            && at <= now
        {
            self.gone_check = Some(now + GONE_CHECK);
            effects.push(Effect::CheckGone { pid: run.pid });
        }
        if self.clear_at.is_some_and(|at| at <= now) {
            self.clear_at = None;
            effects.extend(self.remove_marker("under_limit"));
        }
        if let Some((at, wait)) = self.marker_retry
            && at <= now
        {
            // Pushed back until the answer comes, which sets it again.
            self.marker_retry = Some((now + MARKER_RETRY_MAX, wait));
            effects.extend(self.marker_effect());
        }
        let timeout = self.cfg.hook_timeout;
        let mut overdue: Vec<u32> = self
            .hooks
            .iter_mut()
            .filter(|(_, h)| !h.killed && h.started + timeout <= now)
            .map(|(&pid, h)| {
                h.killed = true;
                pid
            })
            .collect();
        overdue.sort_unstable();
        for pid in overdue {
            let mut line = self.line(Event::HookTimedOut);
            line.hook_pid = Some(pid);
            line.duration_ms = Some(millis(timeout));
            effects.push(Effect::Audit(Box::new(line)));
            effects.push(Effect::KillHook { pid });
        }
        let actions = self.policy.handle(policy::Input::Timer, now);
        effects.extend(self.perform(actions));
        effects
    }

    /// The run's main process is gone (reaped, or for a watch target,
    /// reported by the sensor).
    fn run_ended(
        &mut self,
        pid: u32,
        status: ExitStatus,
        peak_rss_bytes: u64,
        now: Instant,
    ) -> Vec<Effect> {
        let Some(run) = self.run.filter(|r| r.pid == pid) else {
            return vec![];
        };
        self.run = None;
        self.marker_retry = None;
        let mut effects = vec![if self.cfg.is_watch() {
            Effect::Detach { group: run.group }
        } else {
            Effect::EndRun {
                pid,
                group: run.group,
            }
        }];
        // The OOM verdict needs a SIGKILL: a process that handled
        // the memory pressure and exited otherwise was not killed.
        let oom = run.oom.filter(|_| status.signal() == Some(libc::SIGKILL));
        let actions = self.policy.handle(
            policy::Input::Exited {
                status,
                oom,
                peak_rss_bytes: Some(peak_rss_bytes),
                error: None,
            },
            now,
        );
        effects.extend(self.remove_marker("exited"));
        if let Target::Watch(Selector::Pid(pid)) = self.cfg.target {
            // A pid names one process: a later one with the same number is
            // another, never to be watched (or signalled) in its place.
            let exited: Vec<Action> = actions
                .into_iter()
                .filter(|a| !matches!(a, Action::Spawn))
                .collect();
            effects.extend(self.perform(exited));
            tracing::info!(service = %self.cfg.name, pid, "the watched process exited; nothing left to watch");
            effects.extend(self.finish(Outcome::Stopped));
            return effects;
        }
        effects.extend(self.perform(actions));
        effects
    }

    fn marker_path(&self) -> Option<String> {
        self.cfg
            .marker
            .as_ref()
            .map(|m| m.path.display().to_string())
    }

    /// Removes the marker if it is there.
    fn remove_marker(&mut self, reason: &'static str) -> Option<Effect> {
        self.clear_at = None;
        if !std::mem::take(&mut self.marked) {
            return None;
        }
        self.cfg.marker.as_ref().map(|m| Effect::RemoveMarker {
            path: m.path.clone(),
            reason,
        })
    }

    fn sensor(&mut self, event: SensorEvent, now: Instant) -> Vec<Effect> {
        let actions = match event {
            SensorEvent::Exit { exit, .. }
                if self.run.is_some_and(|r| r.foreign && r.pid == exit.pid) =>
            {
                return self.run_ended(exit.pid, exit.status, exit.peak_rss_bytes, now);
            }
            SensorEvent::OverLimit(crossing) if self.owns_group(crossing.group) => {
                self.clear_at = None;
                self.last_charged = (crossing.charged_bytes, Some(crossing.metric));
                self.policy.handle(
                    policy::Input::Memory {
                        charged: crossing.charged_bytes,
                        metric: crossing.metric,
                    },
                    now,
                )
            }
            SensorEvent::Rearmed { group, .. } if self.owns_group(group) => {
                // Back under: a marker not written is no longer wanted.
                self.marker_retry = None;
                if self.marked {
                    self.clear_at = self
                        .cfg
                        .marker
                        .as_ref()
                        .and_then(|m| m.clear_after)
                        .map(|after| now + after);
                }
                self.policy.handle(policy::Input::BelowLimit, now)
            }
            SensorEvent::OomVictim { pid, group } => {
                if let Some(run) = &mut self.run
                    && (run.pid == pid || group.is_some() && run.group == group)
                {
                    run.oom = Some(OomEvidence::EbpfMarkVictim);
                }
                vec![]
            }
            SensorEvent::Lost {
                counter,
                count,
                total,
            } => {
                let mut line = self.line(Event::EventsLost);
                line.counter = Some(counter);
                line.count = Some(count);
                line.total = Some(total);
                return vec![Effect::Audit(Box::new(line))];
            }
            _ => vec![],
        };
        self.perform(actions)
    }

    /// Turns the policy's actions into effects.
    fn perform(&mut self, actions: Vec<Action>) -> Vec<Effect> {
        let mut effects = Vec::with_capacity(actions.len());
        for action in actions {
            let group = self.run.and_then(|r| r.group);
            match action {
                Action::Spawn => {
                    // A watch target found again is not a restart: the
                    // daemon started nothing.
                    if !self.cfg.is_watch()
                        && let Some(cause) = self.policy.last_cause()
                    {
                        *self.restarts.entry(cause.as_str()).or_default() += 1;
                    }
                    effects.push(Effect::Spawn);
                }
                Action::Signal(signal) => {
                    if let Some(run) = self.run {
                        effects.push(Effect::Signal {
                            pid: run.pid,
                            group: run.group,
                            signal,
                        });
                    }
                }
                Action::KillTree => {
                    if let Some(run) = self.run {
                        effects.push(Effect::KillTree {
                            pid: run.pid,
                            group: run.group,
                        });
                    }
                }
                Action::Measure => {
                    // Nothing to measure without a group: the run is gone.
                    if let Some(group) = group {
                        effects.push(Effect::Measure { group });
                    }
                }
                Action::ArmAt(limit) => {
                    if let Some(group) = group {
                        effects.push(Effect::ArmAt { group, limit });
                    }
                }
                Action::Rearm => {
                    if let Some(group) = group {
                        effects.push(Effect::Rearm { group });
                    }
                }
                Action::Mark => match self.marker_effect() {
                    Some(effect) => effects.push(effect),
                    None => effects.push(self.marker_written(Err("no marker file set".into()))),
                },
                Action::Exec(argv) => effects.push(Effect::RunHook {
                    argv,
                    env: vec![
                        ("WATCHDOG_EVENT", "memory_over_limit".to_owned()),
                        ("WATCHDOG_NAME", self.cfg.name.clone()),
                        ("WATCHDOG_SERVICE", self.cfg.name.clone()),
                        ("WATCHDOG_PID", self.last_pid.to_string()),
                        ("WATCHDOG_CHARGED_BYTES", self.last_charged.0.to_string()),
                        ("WATCHDOG_LIMIT_BYTES", self.limit().to_string()),
                        ("WATCHDOG_CAUSE", self.last_reason.to_owned()),
                    ],
                    user: self.cfg.user().cloned(),
                }),
                Action::Record(record) => {
                    if record.event == Event::MemoryOverLimit {
                        self.last_reason = record.reason.unwrap_or("limit");
                        if let Some(charged) = record.charged_bytes {
                            self.last_charged = (charged, record.metric);
                        }
                    }
                    effects.push(Effect::Audit(Box::new(self.record_line(&record))))
                }
                Action::Done if self.cfg.is_watch() => {
                    if let Some(run) = self.run.take() {
                        effects.push(Effect::Detach { group: run.group });
                    }
                    // Nobody would remove it once the watch is gone.
                    effects.extend(self.remove_marker("stopped"));
                    effects.extend(self.finish(Outcome::Stopped));
                }
                Action::Done => {
                    let outcome = if self.policy.failed() {
                        tracing::error!(service = %self.cfg.name, "the service failed and is not restarted");
                        Outcome::Failed
                    } else {
                        Outcome::Stopped
                    };
                    effects.extend(self.finish(outcome));
                }
                Action::GiveUp => {
                    tracing::error!(service = %self.cfg.name, "gave up: too many crashes");
                    effects.extend(self.finish(Outcome::GaveUp));
                }
            }
        }
        effects
    }

    fn limit(&self) -> u64 {
        self.cfg.policy.memory.as_ref().map_or(0, |m| m.limit)
    }

    /// Writing the marker of the last crossing, when there is a marker file.
    fn marker_effect(&self) -> Option<Effect> {
        self.cfg.marker.as_ref().map(|spec| Effect::WriteMarker {
            path: spec.path.clone(),
            format: spec.format,
            marker: Marker {
                name: self.cfg.name.clone(),
                pid: self.last_pid,
                charged_bytes: self.last_charged.0,
                limit_bytes: self.limit(),
                metric: self.last_charged.1,
                reason: self.last_reason,
            },
        })
    }

    fn line(&self, event: Event) -> AuditLine {
        AuditLine::new(
            event,
            &self.cfg.name,
            self.last_pid,
            self.policy.crash_count(),
        )
    }

    fn record_line(&self, record: &Record) -> AuditLine {
        let mut line = AuditLine::new(
            record.event,
            &self.cfg.name,
            self.last_pid,
            record.crash_count,
        );
        line.status = record.status.map(ExitStatus::fields);
        line.cause = record.cause;
        line.uptime_ms = record.uptime.map(millis);
        line.peak_rss_bytes = record.peak_rss_bytes;
        line.charged_bytes = record.charged_bytes;
        line.limit_bytes = record.limit_bytes;
        line.metric = record.metric;
        line.restart_in_ms = record.restart_in.map(millis);
        // An OOM kill says what the verdict rests on.
        line.reason = match record.reason {
            // Stopped because a reload removed or changed it.
            Some("shutdown") if self.retiring => Some("reload"),
            reason => reason.or(record.oom.map(OomEvidence::as_str)),
        };
        line.error = record.error.clone();
        line
    }

    fn marker_written(&mut self, result: Result<PathBuf, String>) -> Effect {
        self.marked |= result.is_ok();
        let mut line;
        match result {
            Ok(path) => {
                line = self.line(Event::RespawnRecommended);
                line.path = Some(path.display().to_string());
            }
            Err(error) => {
                line = self.line(Event::MarkerFailed);
                line.path = self.marker_path();
                line.error = Some(error);
            }
        }
        line.charged_bytes = Some(self.last_charged.0);
        line.metric = self.last_charged.1;
        line.limit_bytes = Some(self.limit());
        Effect::Audit(Box::new(line))
    }

    fn hook_exited(&self, pid: u32, status: ExitStatus, ran: Duration) -> Effect {
        let mut line = self.line(Event::HookExited);
        line.hook_pid = Some(pid);
        line.status = Some(status.fields());
        line.duration_ms = Some(millis(ran));
        Effect::Audit(Box::new(line))
    }
}

/// Something that happened outside the services, for [`drive`] to route.
#[derive(Debug)]
pub enum Happening {
    Sensor(SensorEvent),
    /// A spawn requested by service `service` finished.
    Spawned {
        service: usize,
        result: Result<Spawned, String>,
    },
    /// A child was reaped.
    Reaped {
        pid: u32,
        status: ExitStatus,
        peak_rss_bytes: u64,
        /// The cgroup's OOM-kill count grew while it ran.
        cgroup_oom_kill: bool,
    },
    /// The sensor failed for good.
    Failed(String),
    /// Someone asks for the services' state.
    Snapshot(tokio::sync::oneshot::Sender<crate::status::Snapshot>),
}

/// What performs the services' effects and reports what happens.
pub trait Platform {
    /// The next thing that happened.
    fn next(&mut self) -> impl Future<Output = Happening>;
    /// Performs one effect of service `index`; some are answered at once.
    fn perform(&mut self, index: usize, service: &Service, effect: Effect) -> Option<Input>;
    /// How often [`Platform::heartbeat`] wants to be called, if at all.
    fn heartbeat_every(&self) -> Option<Duration> {
        None
    }
    /// Called by the loop itself on its heartbeat timer, `lag` after it
    /// was due: proof that the loop turns (the systemd watchdog ping, the
    /// health check), and a summary of the services.
    fn heartbeat(&mut self, _services: &Services, _lag: Duration) {}
    /// The state of the services (the current one of each name) now.
    fn snapshot(&self, services: &Services) -> crate::status::Snapshot {
        let now = clock();
        crate::status::Snapshot {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            services: services
                .current()
                .map(|s| s.status(now, Vec::new()))
                .collect(),
            ..Default::default()
        }
    }
    /// The configuration was reloaded (the audit log is reopened).
    fn reloaded(&mut self) {}
}

/// What the daemon asks of the loop.
#[derive(Debug)]
pub enum Control {
    /// Drain every service and end.
    Shutdown,
    /// Run these services from now on: the ones whose configuration did
    /// not change keep running, changed ones are drained and started
    /// again, removed ones drained, new ones started (`None`: the same
    /// services). `done` is told when the change is under way.
    Reload {
        services: Option<Vec<ServiceConfig>>,
        done: Option<tokio::sync::oneshot::Sender<()>>,
    },
}

/// Why [`drive`] stopped before every service finished.
#[derive(Debug, thiserror::Error)]
#[error("the sensor failed: {0}")]
pub struct DriveError(pub String);

/// The services the loop runs. Indices are stable: a service that ends
/// stays in place (finished), so the platform may key state by index.
#[derive(Default)]
pub struct Services {
    list: Vec<Service>,
    /// Services keep trying after a failed first start (the daemon).
    keep_trying: bool,
    /// Services waiting for their predecessor of the same name to finish
    /// draining: successor index -> predecessor index.
    waiting: HashMap<usize, usize>,
    /// The names in the configuration (after the last reload); `None`:
    /// every name ever run.
    configured: Option<std::collections::HashSet<String>>,
}

impl Services {
    pub fn new(configs: Vec<ServiceConfig>) -> Self {
        Self {
            list: configs.into_iter().map(Service::new).collect(),
            keep_trying: false,
            waiting: HashMap::new(),
            configured: None,
        }
    }

    /// Services that cannot be started at first are retried with backoff,
    /// as crashes, instead of ending at once (the daemon: a program may
    /// appear later, and a mistake must not silently drop a service). Past
    /// `max-crashes` they give up like any crash loop; a reload that
    /// changes them starts them again.
    pub fn keep_trying(mut self) -> Self {
        self.keep_trying = true;
        for service in &mut self.list {
            service.first_failure_ends = false;
        }
        self
    }

    fn push(&mut self, config: ServiceConfig) -> usize {
        let mut service = Service::new(config);
        service.first_failure_ends = !self.keep_trying;
        self.list.push(service);
        self.list.len() - 1
    }

    pub fn all(&self) -> &[Service] {
        &self.list
    }

    /// The service that is current for each name in the configuration, in
    /// the order the names first appeared: the latest of a name, or, while
    /// that one waits for its predecessor to drain, the predecessor. A
    /// service removed by a reload is current until it has drained.
    pub fn current(&self) -> impl Iterator<Item = &Service> {
        let mut latest: HashMap<&str, usize> = HashMap::new();
        let mut first: HashMap<&str, usize> = HashMap::new();
        for (i, s) in self.list.iter().enumerate() {
            latest.insert(s.name(), i);
            first.entry(s.name()).or_insert(i);
        }
        let mut shown: Vec<(usize, usize)> = latest
            .into_iter()
            .filter(|&(name, i)| {
                let s = &self.list[i];
                self.configured
                    .as_ref()
                    .is_none_or(|names| names.contains(name))
                    || !s.finished()
            })
            .map(|(name, i)| (first[name], *self.waiting.get(&i).unwrap_or(&i)))
            .collect();
        shown.sort_unstable();
        shown.into_iter().map(|(_, i)| &self.list[i])
    }

    /// Has the service `name` take over `pid`, running for `age` already,
    /// when it starts; its index.
    pub fn adopt(&mut self, name: &str, pid: u32, age: Duration) -> Option<usize> {
        let index = self
            .list
            .iter()
            .position(|s| s.name() == name && !s.config().is_watch() && s.adopting.is_none())?;
        self.list[index].adopting = Some((pid, age));
        Some(index)
    }

    fn active(&self, name: &str) -> Option<usize> {
        self.list
            .iter()
            .rposition(|s| s.name() == name && !s.finished() && !s.retiring)
    }
}

/// Runs `services` on `platform` until `control` says to shut down and
/// every service has drained, or (with `until_done`) until every service
/// has finished on its own.
pub async fn drive<P: Platform>(
    services: &mut Services,
    platform: &mut P,
    control: &mut tokio::sync::mpsc::UnboundedReceiver<Control>,
    until_done: bool,
) -> Result<(), DriveError> {
    let now = clock();
    let mut stopping = false;
    // Asked to stop during start-up (the orphan sweep, loading the kernel
    // programs): nothing is started only to be drained at once.
    // A run a previous instance left to be adopted is still taken over,
    // so that the stop drains it.
    let early = control.try_recv().ok();
    let stop_early = matches!(early, Some(Control::Shutdown));
    for index in 0..services.list.len() {
        if !stop_early || services.list[index].adopting.is_some() {
            feed(&mut services.list, platform, index, Input::Start, now);
        }
    }
    if let Some(message) = early {
        apply_control(message, services, platform, &mut stopping, now);
    }
    // Why the sensor stopped working, once it has: every service is then
    // drained as for a shutdown, and the loop ends with this error.
    let mut failure: Option<String> = None;
    // Nobody left to send controls: run on as told so far.
    let mut listening = true;
    let mut heartbeat = platform.heartbeat_every().map(|every| {
        let mut timer = tokio::time::interval(every);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer
    });
    platform.heartbeat(services, Duration::ZERO);
    loop {
        let all_finished = services.list.iter().all(Service::finished);
        if all_finished && (stopping || until_done) {
            break;
        }
        let deadline = services
            .list
            .iter()
            .filter_map(Service::next_deadline)
            .min();
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        let beat = async {
            match &mut heartbeat {
                Some(timer) => {
                    let due = timer.tick().await;
                    tokio::time::Instant::now().saturating_duration_since(due)
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            message = control.recv(), if !stopping && listening => {
                let now = clock();
                match message {
                    None => listening = false,
                    Some(message) => apply_control(message, services, platform, &mut stopping, now),
                }
            }
            () = timer => {
                let now = clock();
                for index in 0..services.list.len() {
                    if services.list[index].next_deadline().is_some_and(|at| at <= now) {
                        feed(&mut services.list, platform, index, Input::Timer, now);
                    }
                }
            }
            lag = beat => platform.heartbeat(services, lag),
            happening = platform.next() => {
                let now = clock();
                let list = &mut services.list;
                match happening {
                    Happening::Failed(error) => {
                        if failure.is_none() {
                            tracing::error!(
                                error = %error,
                                "memory can no longer be watched: draining every service, then exiting"
                            );
                            failure = Some(error);
                        }
                        if !stopping {
                            stopping = true;
                            services.waiting.clear();
                            for index in 0..list.len() {
                                feed(list, platform, index, Input::Shutdown, now);
                            }
                        }
                    }
                    // Asked and given up on (the loop was late): no work.
                    Happening::Snapshot(reply) if reply.is_closed() => {}
                    Happening::Snapshot(reply) => {
                        let _ = reply.send(platform.snapshot(services));
                    }
                    Happening::Spawned { service, result } => {
                        feed(list, platform, service, Input::Spawned(result), now);
                    }
                    Happening::Reaped { pid, status, peak_rss_bytes, cgroup_oom_kill } => {
                        if let Some(index) = list.iter().position(|s| !s.finished() && s.owns_child(pid)) {
                            if cgroup_oom_kill {
                                feed(list, platform, index, Input::CgroupOomKill, now);
                            }
                            let input = Input::Reaped { pid, status, peak_rss_bytes };
                            feed(list, platform, index, input, now);
                        }
                    }
                    Happening::Sensor(event) => route(list, platform, event, now),
                }
            }
        }
        start_successors(services, platform, clock());
    }
    match failure {
        Some(error) => Err(DriveError(error)),
        None => Ok(()),
    }
}

/// Carries out what the daemon was told (by a signal).
fn apply_control<P: Platform>(
    message: Control,
    services: &mut Services,
    platform: &mut P,
    stopping: &mut bool,
    now: Instant,
) {
    match message {
        Control::Shutdown => {
            *stopping = true;
            services.waiting.clear();
            for index in 0..services.list.len() {
                feed(&mut services.list, platform, index, Input::Shutdown, now);
            }
        }
        Control::Reload {
            services: configs,
            done,
        } => {
            if let Some(configs) = configs {
                reload(services, platform, configs, now);
            }
            platform.reloaded();
            if let Some(done) = done {
                let _ = done.send(());
            }
        }
    }
}

/// Applies a new set of service configurations.
fn reload<P: Platform>(
    services: &mut Services,
    platform: &mut P,
    configs: Vec<ServiceConfig>,
    now: Instant,
) {
    let names: std::collections::HashSet<String> = configs.iter().map(|c| c.name.clone()).collect();
    services.configured = Some(names.clone());
    // Removed: drained, not replaced.
    for index in 0..services.list.len() {
        let service = &services.list[index];
        if !service.finished() && !service.retiring && !names.contains(service.name()) {
            tracing::info!(service = %service.name(), "removed from the configuration: stopping it");
            services.list[index].retiring = true;
            feed(&mut services.list, platform, index, Input::Shutdown, now);
        }
    }
    for config in configs {
        // Unchanged and over (a one-shot that ran, a pid watch whose process
        // is gone, a service that gave up): it stays over. A reload (also
        // the one log rotation sends) must not run it again.
        let latest = services.list.iter().rposition(|s| s.name() == config.name);
        if latest.is_some_and(|i| {
            let s = &services.list[i];
            s.finished() && !s.retiring && s.config() == &config
        }) {
            continue;
        }
        match services.active(&config.name) {
            Some(index) if services.list[index].config() == &config => {}
            // Changed again before it started: it never runs; the newest
            // waits for the same predecessor.
            Some(index) if services.waiting.contains_key(&index) => {
                let pred = services.waiting.remove(&index).unwrap_or(index);
                services.list[index].outcome = Some(Outcome::Stopped);
                let restarts = services.list[index].restarts.clone();
                let successor = services.push(config);
                services.list[successor].restarts = restarts;
                services.waiting.insert(successor, pred);
            }
            Some(index) => {
                tracing::info!(service = %config.name, "changed: restarting it");
                services.list[index].retiring = true;
                feed(&mut services.list, platform, index, Input::Shutdown, now);
                let restarts = services.list[index].restarts.clone();
                let successor = services.push(config);
                services.list[successor].restarts = restarts;
                services.waiting.insert(successor, index);
            }
            None => {
                // A successor already waiting for this name is replaced.
                let name = config.name.clone();
                services.waiting.retain(|&s, _| {
                    services.list[s].name() != name || {
                        services.list[s].outcome = Some(Outcome::Stopped);
                        false
                    }
                });
                tracing::info!(service = %name, "added: starting it");
                // A name that ran before keeps its counts.
                let restarts = services
                    .list
                    .iter()
                    .rfind(|s| s.name() == name)
                    .map(|s| s.restarts.clone())
                    .unwrap_or_default();
                let index = services.push(config);
                services.list[index].restarts = restarts;
                let pred = services
                    .list
                    .iter()
                    .enumerate()
                    .rposition(|(i, s)| i != index && s.name() == name && !s.finished());
                match pred {
                    Some(pred) => {
                        services.waiting.insert(index, pred);
                    }
                    None => feed(&mut services.list, platform, index, Input::Start, now),
                }
            }
        }
    }
}

/// Starts the services whose predecessor of the same name has finished.
fn start_successors<P: Platform>(services: &mut Services, platform: &mut P, now: Instant) {
    let ready: Vec<usize> = services
        .waiting
        .iter()
        .filter(|&(_, &pred)| services.list[pred].finished())
        .map(|(&s, _)| s)
        .collect();
    for index in ready {
        services.waiting.remove(&index);
        feed(&mut services.list, platform, index, Input::Start, now);
    }
}

/// Hands a sensor event to the services it concerns.
fn route<P: Platform>(
    services: &mut [Service],
    platform: &mut P,
    event: SensorEvent,
    now: Instant,
) {
    let group = match &event {
        SensorEvent::OverLimit(_) | SensorEvent::Rearmed { .. } | SensorEvent::Exit { .. } => {
            event.group()
        }
        SensorEvent::OomVictim { pid, group } => {
            let owner = services
                .iter()
                .position(|s| s.pid() == Some(*pid) || group.is_some_and(|g| s.owns_group(g)));
            if let Some(index) = owner {
                feed(services, platform, index, Input::Sensor(event), now);
            }
            return;
        }
        // Every service's record shows the loss.
        SensorEvent::Lost { .. } => {
            for index in 0..services.len() {
                feed(services, platform, index, Input::Sensor(event.clone()), now);
            }
            return;
        }
        _ => None,
    };
    if let Some(index) = group.and_then(|g| services.iter().position(|s| s.owns_group(g))) {
        feed(services, platform, index, Input::Sensor(event), now);
    }
}

/// Feeds one input to service `index` and performs its effects; answers
/// that come back at once are fed before the effects that follow.
fn feed<P: Platform>(
    services: &mut [Service],
    platform: &mut P,
    index: usize,
    input: Input,
    now: Instant,
) {
    let service = &mut services[index];
    let mut queue: std::collections::VecDeque<Effect> = service.handle(input, now).into();
    while let Some(effect) = queue.pop_front() {
        if let Some(answer) = platform.perform(index, service, effect) {
            for effect in service.handle(answer, now).into_iter().rev() {
                queue.push_front(effect);
            }
        }
    }
}

/// The time services are fed: tokio's clock, so that tests can pause it.
fn clock() -> Instant {
    tokio::time::Instant::now().into_std()
}

#[cfg(test)]
mod tests;
