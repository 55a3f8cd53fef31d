//! The respawn policy: a pure state machine. Inputs (what happened) and the
//! time go in, actions (what to do, what to record) come out; no processes,
//! no clocks, no sleeps, so every rule is tested with a table. When it next
//! needs to be woken is a function of its state ([`Policy::next_deadline`]),
//! never a request that a caller could drop.
//!
//! The rules, from the incidents the product learns from:
//! - A memory drain is not a crash, and neither is a clean exit: neither
//!   changes the crash count, and neither resets it, so a worker that
//!   alternates crash / clean / crash still trips `max_crashes`.
//! - Crashes back off exponentially (with jitter, between a floor and a
//!   cap); a run that lasted `stable_after` starts the count afresh.
//! - Clean restarts are immediate within a budget (10 per 60 s); past it, a
//!   `health_warn` and backoff instead of a silent tight loop.
//! - A hard limit is never deferred; a soft one may be, by `over_for` and
//!   `startup_grace`, and while it is, the sensor watches the hard limit.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{exit::ExitStatus, mem::Charged};

/// When to restart a service that exited.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// After every exit (clean ones within the budget).
    #[default]
    Always,
    /// After crashes and memory restarts, not after clean exits.
    OnFailure,
    /// Never; the service ends with its first exit.
    Never,
}

/// What to do when a service is over its memory limit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum MemoryAction {
    /// Drain it (signal, grace, SIGKILL of the tree) and start it again.
    #[default]
    Restart,
    /// Send the drain signal and nothing more.
    Signal,
    /// Write a respawn-recommended marker and touch nothing.
    Marker,
    /// Run a hook command (argv, never a shell).
    Exec(Vec<String>),
}

/// Memory enforcement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryPolicy {
    /// The soft limit, in bytes.
    pub limit: u64,
    /// The service must stay over the limit this long; a dip cancels.
    pub over_for: Option<Duration>,
    /// No soft enforcement during the first moments of a run.
    pub startup_grace: Option<Duration>,
    /// Enforced at once, grace periods or not (at least `limit`).
    pub hard_limit: Option<u64>,
    pub drain_signal: i32,
    /// Between the drain signal and SIGKILL of the whole tree.
    pub grace: Duration,
    pub action: MemoryAction,
}

impl MemoryPolicy {
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            over_for: None,
            startup_grace: None,
            hard_limit: None,
            drain_signal: libc::SIGTERM,
            grace: Duration::from_secs(10),
            action: MemoryAction::Restart,
        }
    }
}

/// How often a deferred decision is looked at again, at most and at least.
const LOOK_MIN: Duration = Duration::from_millis(50);
const LOOK_MAX: Duration = Duration::from_secs(1);

/// The policy's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub restart: RestartPolicy,
    /// Give up at this many crashes in a row (counting only crashes).
    pub max_crashes: u32,
    pub backoff_floor: Duration,
    pub backoff_cap: Duration,
    /// A run this long resets the crash count when it ends in a crash.
    pub stable_after: Duration,
    /// Immediate clean restarts allowed per `clean_window`.
    pub clean_budget: u32,
    pub clean_window: Duration,
    /// Exit codes that count as a clean exit.
    pub success_codes: Vec<i32>,
    /// Grace for the drain on shutdown.
    pub shutdown_grace: Duration,
    /// The signal that asks the service to stop on shutdown.
    pub stop_signal: i32,
    pub memory: Option<MemoryPolicy>,
    /// A watch target (a process the daemon did not start): an exit is
    /// recorded but never counted, and the target is looked for again at
    /// once instead of restarted.
    pub watch: bool,
    /// Seed of the backoff jitter (fixed in tests).
    pub jitter_seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            restart: RestartPolicy::Always,
            max_crashes: 5,
            backoff_floor: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
            stable_after: Duration::from_secs(300),
            clean_budget: 10,
            clean_window: Duration::from_secs(60),
            success_codes: vec![0],
            shutdown_grace: Duration::from_secs(10),
            stop_signal: libc::SIGTERM,
            memory: None,
            watch: false,
            jitter_seed: 0x5eed,
        }
    }
}

/// Why a run ended (the audit log's `cause`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// A success code, not requested by us.
    CleanExit,
    /// A failure code, or a signal we did not send.
    Crash,
    /// We sent the drain signal for memory and it exited within grace.
    MemoryDrain,
    /// We escalated to SIGKILL after grace.
    MemoryKill,
    /// The kernel's OOM killer.
    OomKill,
    /// The supervisor is stopping.
    Shutdown,
}

impl Cause {
    /// The audit log's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CleanExit => "clean_exit",
            Self::Crash => "crash",
            Self::MemoryDrain => "memory_drain",
            Self::MemoryKill => "memory_kill",
            Self::OomKill => "oom_kill",
            Self::Shutdown => "shutdown",
        }
    }
}

/// The audit log's `event` values (docs/audit-log.md): the policy's own,
/// and those the service actor records about what it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    Started,
    MemoryOverLimit,
    DrainStarted,
    EscalatedKill,
    Exited,
    RestartScheduled,
    HealthWarn,
    MaxCrashesExceeded,
    /// The marker was written.
    RespawnRecommended,
    /// The marker could not be written.
    MarkerFailed,
    /// The memory hook was started.
    HookStarted,
    /// The memory hook could not be started.
    HookFailed,
    /// The memory hook ended (its status and duration).
    HookExited,
    /// The memory hook overran its timeout and was killed.
    HookTimedOut,
    /// The marker was removed (the process exited, or stayed under its
    /// limit long enough).
    MarkerRemoved,
    /// A run of a previous daemon instance was taken over.
    Adopted,
    /// A run of a previous daemon instance was terminated at start-up.
    OrphanTerminated,
    /// The sensor lost events (the kernel's ring buffer was full, ...).
    EventsLost,
}

/// What the kernel's OOM killer verdict rests on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OomEvidence {
    /// The kernel programs saw the OOM killer choose the process.
    EbpfMarkVictim,
    /// The cgroup's memory.events oom_kill count grew during the run.
    CgroupMemoryEventsOomKill,
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// Start supervising (spawn the first run).
    Start,
    /// The run was spawned (or, for a watch target, found).
    Started,
    /// A run left by a previous daemon instance was taken over: running
    /// since `since`.
    Adopted { since: Instant },
    /// An exact reading of the run's memory: a confirmed crossing, or the
    /// answer to [`Action::Measure`].
    Memory { charged: u64, metric: Charged },
    /// The run's memory fell back under the limit's hysteresis level.
    BelowLimit,
    /// [`Policy::next_deadline`] has come.
    Timer,
    /// The run exited (or could not be started: `status` 127, no process).
    Exited {
        status: ExitStatus,
        oom: Option<OomEvidence>,
        /// The run's peak resident set, as the reaper measured it.
        peak_rss_bytes: Option<u64>,
        /// Why the run could not be started, when it could not.
        error: Option<String>,
    },
    /// Stop supervising: drain the run and end.
    Shutdown,
}

/// What to do. The caller performs them in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start a new run.
    Spawn,
    /// Send this signal to the run's process tree.
    Signal(i32),
    /// SIGKILL every process of the run's tree.
    KillTree,
    /// Read the run's memory exactly and feed it back as [`Input::Memory`].
    Measure,
    /// Have the sensor fire when the run reaches this many bytes, armed
    /// now (at once if it is already there).
    ArmAt(u64),
    /// Have the sensor fire again once the run has been back under the
    /// limit's hysteresis level.
    Rearm,
    /// Write the respawn-recommended marker.
    Mark,
    /// Run the memory hook.
    Exec(Vec<String>),
    /// Write this audit line.
    Record(Record),
    /// Supervision is over (shutdown done, or the restart policy says so).
    Done,
    /// Supervision gave up (`max_crashes` reached).
    GiveUp,
}

/// The policy's part of an audit line; the caller adds `ts`, `service`,
/// `pid` and `source`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub event: Event,
    pub cause: Option<Cause>,
    pub status: Option<ExitStatus>,
    pub uptime: Option<Duration>,
    pub peak_rss_bytes: Option<u64>,
    pub charged_bytes: Option<u64>,
    pub limit_bytes: Option<u64>,
    /// Which measure `charged_bytes` is.
    pub metric: Option<Charged>,
    pub crash_count: u32,
    pub restart_in: Option<Duration>,
    pub reason: Option<&'static str>,
    pub oom: Option<OomEvidence>,
    /// Why a run could not be started.
    pub error: Option<String>,
}

impl Record {
    pub fn new(event: Event, crash_count: u32) -> Self {
        Self {
            event,
            cause: None,
            status: None,
            uptime: None,
            peak_rss_bytes: None,
            charged_bytes: None,
            limit_bytes: None,
            metric: None,
            crash_count,
            restart_in: None,
            reason: None,
            oom: None,
            error: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Not started yet.
    Idle,
    /// Spawn requested, not yet reported.
    Spawning,
    Running {
        since: Instant,
    },
    /// A drain signal was sent; SIGKILL at `deadline` unless it exits.
    Draining {
        since: Instant,
        deadline: Instant,
        killed: bool,
        memory: bool,
    },
    /// Waiting to spawn again.
    BackingOff {
        until: Instant,
    },
    Over,
}

/// Where a service is in its life ([`Policy::stage`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Idle,
    Spawning,
    /// Running since then.
    Running {
        since: Instant,
    },
    /// Draining; its run started then.
    Draining {
        since: Instant,
    },
    /// Starts again then.
    BackingOff {
        until: Instant,
    },
    Over,
}

/// The state machine of one service.
pub struct Policy {
    cfg: Config,
    phase: Phase,
    crash_count: u32,
    /// Times of recent immediate clean restarts.
    clean_restarts: VecDeque<Instant>,
    /// Budget overruns in a row, for their backoff.
    overruns: u32,
    /// When the run went over the soft limit and the decision was
    /// deferred (by `over_for` or the startup grace).
    over_since: Option<Instant>,
    /// While a decision is deferred: when to look again (a dip under the
    /// limit at any look cancels it), and whether a look is under way.
    look_at: Option<Instant>,
    looking: bool,
    /// The reading that triggered enforcement.
    trigger: Option<(u64, Charged)>,
    /// When the memory signal was sent to this run (`MemoryAction::Signal`):
    /// an exit within the grace after it is the signal's doing, not a crash.
    signalled: Option<Instant>,
    /// Why the last run ended.
    last_cause: Option<Cause>,
    shutting_down: bool,
    rng: u64,
}

impl Policy {
    pub fn new(cfg: Config) -> Self {
        let rng = cfg.jitter_seed | 1;
        Self {
            cfg,
            phase: Phase::Idle,
            crash_count: 0,
            clean_restarts: VecDeque::new(),
            overruns: 0,
            over_since: None,
            look_at: None,
            looking: false,
            trigger: None,
            signalled: None,
            last_cause: None,
            shutting_down: false,
            rng,
        }
    }

    pub fn crash_count(&self) -> u32 {
        self.crash_count
    }

    /// Why the last run ended.
    pub fn last_cause(&self) -> Option<Cause> {
        self.last_cause
    }

    /// Where the service is in its life, for status reports.
    pub fn stage(&self) -> Stage {
        match self.phase {
            Phase::Idle => Stage::Idle,
            Phase::Spawning => Stage::Spawning,
            Phase::Running { since } => Stage::Running { since },
            Phase::Draining { since, .. } => Stage::Draining { since },
            Phase::BackingOff { until } => Stage::BackingOff { until },
            Phase::Over => Stage::Over,
        }
    }

    /// Whether the last run failed (a crash or an OOM kill): supervision
    /// that ends there ends in failure.
    pub fn failed(&self) -> bool {
        // Stopping on request is not a failure, whatever came before.
        !self.shutting_down && matches!(self.last_cause, Some(Cause::Crash | Cause::OomKill))
    }

    /// When [`Input::Timer`] must be fed next, from the state alone: the
    /// end of a drain's grace, of a backoff, or of a deferred decision.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Draining {
                deadline,
                killed: false,
                ..
            } => Some(deadline),
            Phase::BackingOff { until } => Some(until),
            // A reading was asked for: its answer, not the clock, is next.
            Phase::Running { .. } if self.looking => None,
            Phase::Running { since } => self.over_since.map(|over| {
                let due = self.due(since, over);
                self.look_at.map_or(due, |look| look.min(due))
            }),
            _ => None,
        }
    }

    /// When a soft-limit crossing first seen at `over_since` is acted on:
    /// the later of the end of the startup grace and of the sustained
    /// window.
    fn due(&self, since: Instant, over_since: Instant) -> Instant {
        let mut due = over_since;
        if let Some(mem) = &self.cfg.memory {
            if let Some(grace) = mem.startup_grace {
                due = due.max(since + grace);
            }
            if let Some(over_for) = mem.over_for {
                due = due.max(over_since + over_for);
            }
        }
        due
    }

    /// Feeds one input; returns what to do.
    pub fn handle(&mut self, input: Input, now: Instant) -> Vec<Action> {
        match input {
            Input::Start => match self.phase {
                Phase::Idle => {
                    self.phase = Phase::Spawning;
                    vec![Action::Spawn]
                }
                _ => vec![],
            },
            Input::Started => self.started(now),
            Input::Adopted { since } => match self.phase {
                Phase::Idle => {
                    self.phase = Phase::Running { since };
                    vec![Action::Record(Record::new(Event::Adopted, 0))]
                }
                _ => vec![],
            },
            Input::Memory { charged, metric } => self.memory(charged, metric, now),
            Input::BelowLimit => {
                self.over_since = None;
                vec![]
            }
            Input::Timer => self.timer(now),
            Input::Exited {
                status,
                oom,
                peak_rss_bytes,
                error,
            } => self.exited(status, oom, peak_rss_bytes, error, now),
            Input::Shutdown => self.shutdown(now),
        }
    }

    fn started(&mut self, now: Instant) -> Vec<Action> {
        if self.phase != Phase::Spawning {
            return vec![];
        }
        self.phase = Phase::Running { since: now };
        self.over_since = None;
        self.look_at = None;
        self.looking = false;
        self.trigger = None;
        self.signalled = None;
        let mut actions = vec![Action::Record(Record::new(
            Event::Started,
            self.crash_count,
        ))];
        if self.shutting_down {
            // Asked to stop while the run was being started: what was
            // started is drained like any other run.
            actions.extend(self.stop_run(now));
        }
        actions
    }

    fn memory(&mut self, charged: u64, metric: Charged, now: Instant) -> Vec<Action> {
        let Phase::Running { since } = self.phase else {
            return vec![];
        };
        self.looking = false;
        self.look_at = None;
        let Some(mem) = self.cfg.memory.clone() else {
            return vec![];
        };
        let hard = mem.hard_limit.is_some_and(|h| charged >= h);
        if !hard {
            if charged < mem.limit {
                // Back under: a deferred decision is cancelled, and the
                // sensor, left disarmed (or watching the hard limit)
                // meanwhile, must hear the next crossing of the soft one.
                return match self.over_since.take() {
                    Some(_) => vec![Action::ArmAt(mem.limit)],
                    None => vec![],
                };
            }
            let first = self.over_since.is_none();
            let over_since = *self.over_since.get_or_insert(now);
            let due = self.due(since, over_since);
            if now < due {
                // Deferred: looked at again a few times before it is due,
                // so that a dip under the limit cancels it (the sensor is
                // not armed at the soft limit meanwhile); and the hard
                // limit must still be heard.
                let step = ((due - over_since) / 5).clamp(LOOK_MIN, LOOK_MAX);
                self.look_at = Some((now + step).min(due));
                return match mem.hard_limit {
                    Some(hard) if first => vec![Action::ArmAt(hard)],
                    _ => vec![],
                };
            }
        }
        self.over_since = None;
        self.enforce(&mem, charged, metric, hard, now)
    }

    fn enforce(
        &mut self,
        mem: &MemoryPolicy,
        charged: u64,
        metric: Charged,
        hard: bool,
        now: Instant,
    ) -> Vec<Action> {
        let mut over = Record::new(Event::MemoryOverLimit, self.crash_count);
        over.charged_bytes = Some(charged);
        over.metric = Some(metric);
        over.limit_bytes = Some(if hard {
            mem.hard_limit.unwrap_or(mem.limit)
        } else {
            mem.limit
        });
        over.reason = Some(if hard { "hard_limit" } else { "limit" });
        let mut actions = vec![Action::Record(over)];
        match &mem.action {
            MemoryAction::Restart => {
                self.trigger = Some((charged, metric));
                let Phase::Running { since } = self.phase else {
                    return actions;
                };
                self.phase = Phase::Draining {
                    since,
                    deadline: now + mem.grace,
                    killed: false,
                    memory: true,
                };
                let mut drain = Record::new(Event::DrainStarted, self.crash_count);
                drain.charged_bytes = Some(charged);
                drain.metric = Some(metric);
                actions.extend([Action::Record(drain), Action::Signal(mem.drain_signal)]);
            }
            MemoryAction::Signal => {
                self.trigger = Some((charged, metric));
                self.signalled = Some(now);
                let mut drain = Record::new(Event::DrainStarted, self.crash_count);
                drain.charged_bytes = Some(charged);
                drain.metric = Some(metric);
                drain.reason = Some("signal");
                actions.extend([
                    Action::Record(drain),
                    Action::Signal(mem.drain_signal),
                    Action::Rearm,
                ]);
            }
            MemoryAction::Marker => actions.extend([Action::Mark, Action::Rearm]),
            MemoryAction::Exec(argv) => {
                actions.extend([Action::Exec(argv.clone()), Action::Rearm]);
            }
        }
        actions
    }

    fn timer(&mut self, now: Instant) -> Vec<Action> {
        match self.phase {
            Phase::Draining {
                since,
                deadline,
                killed: false,
                memory,
            } if now >= deadline => {
                self.phase = Phase::Draining {
                    since,
                    deadline,
                    killed: true,
                    memory,
                };
                vec![
                    Action::Record(Record::new(Event::EscalatedKill, self.crash_count)),
                    Action::KillTree,
                ]
            }
            Phase::BackingOff { until } if now >= until => {
                self.phase = Phase::Spawning;
                vec![Action::Spawn]
            }
            // A deferred decision is due, or due a look: on a fresh reading.
            Phase::Running { since }
                if !self.looking
                    && self.over_since.is_some_and(|o| {
                        now >= self.due(since, o) || self.look_at.is_some_and(|l| now >= l)
                    }) =>
            {
                self.looking = true;
                vec![Action::Measure]
            }
            _ => vec![],
        }
    }

    /// Sends the stop signal to the running run and starts its grace.
    fn stop_run(&mut self, now: Instant) -> Vec<Action> {
        let Phase::Running { since } = self.phase else {
            return vec![];
        };
        self.over_since = None;
        self.phase = Phase::Draining {
            since,
            deadline: now + self.cfg.shutdown_grace,
            killed: false,
            memory: false,
        };
        let mut drain = Record::new(Event::DrainStarted, self.crash_count);
        drain.reason = Some("shutdown");
        vec![Action::Record(drain), Action::Signal(self.cfg.stop_signal)]
    }

    fn shutdown(&mut self, now: Instant) -> Vec<Action> {
        if self.shutting_down {
            return vec![];
        }
        self.shutting_down = true;
        if self.cfg.watch {
            // Not ours to stop: stop watching it and leave it running.
            self.phase = Phase::Over;
            return vec![Action::Done];
        }
        match self.phase {
            Phase::Running { .. } => self.stop_run(now),
            // Drained when it reports started (or ends when it fails to).
            Phase::Spawning => vec![],
            // Already draining: its grace stands, unless shutdown's is
            // shorter.
            Phase::Draining {
                since,
                deadline,
                killed,
                memory,
            } => {
                self.phase = Phase::Draining {
                    since,
                    deadline: deadline.min(now + self.cfg.shutdown_grace),
                    killed,
                    memory,
                };
                vec![]
            }
            Phase::Idle | Phase::BackingOff { .. } => {
                self.phase = Phase::Over;
                vec![Action::Done]
            }
            Phase::Over => vec![],
        }
    }

    fn exited(
        &mut self,
        status: ExitStatus,
        oom: Option<OomEvidence>,
        peak_rss_bytes: Option<u64>,
        error: Option<String>,
        now: Instant,
    ) -> Vec<Action> {
        let (since, drained) = match self.phase {
            Phase::Running { since } => (Some(since), None),
            Phase::Draining {
                since,
                killed,
                memory,
                ..
            } => (Some(since), Some((killed, memory))),
            Phase::Spawning => (None, None),
            Phase::Idle | Phase::BackingOff { .. } | Phase::Over => return vec![],
        };
        self.over_since = None;
        let uptime = since.map(|s| now.saturating_duration_since(s));
        let clean = status
            .code()
            .is_some_and(|c| self.cfg.success_codes.contains(&c));
        let cause = if self.shutting_down {
            Cause::Shutdown
        } else if let Some((killed, true)) = drained {
            if killed {
                Cause::MemoryKill
            } else {
                Cause::MemoryDrain
            }
        } else if oom.is_some() {
            Cause::OomKill
        } else if self.signalled.is_some_and(|at| {
            let grace = self.cfg.memory.as_ref().map_or(Duration::ZERO, |m| m.grace);
            now.saturating_duration_since(at) <= grace
        }) {
            // It ended on the memory signal we sent it.
            Cause::MemoryDrain
        } else if clean {
            Cause::CleanExit
        } else {
            Cause::Crash
        };

        self.last_cause = Some(cause);
        self.signalled = None;
        let mut exit = Record::new(Event::Exited, self.crash_count);
        exit.cause = Some(cause);
        exit.status = Some(status);
        exit.uptime = uptime;
        exit.peak_rss_bytes = peak_rss_bytes;
        exit.error = error;
        if cause == Cause::OomKill {
            exit.oom = oom;
        }
        if let Some((charged, metric)) = self.trigger.take() {
            exit.charged_bytes = Some(charged);
            exit.metric = Some(metric);
        }
        exit.limit_bytes = self.cfg.memory.as_ref().map(|m| m.limit);

        if cause == Cause::Shutdown {
            self.phase = Phase::Over;
            return vec![Action::Record(exit), Action::Done];
        }
        if self.cfg.watch {
            // Not ours to restart: look for the next process to watch.
            exit.restart_in = Some(Duration::ZERO);
            self.phase = Phase::Spawning;
            return vec![Action::Record(exit), Action::Spawn];
        }
        if matches!(cause, Cause::Crash | Cause::OomKill) {
            if uptime.is_some_and(|u| u >= self.cfg.stable_after) {
                self.crash_count = 0;
            }
            self.crash_count += 1;
            exit.crash_count = self.crash_count;
            if self.crash_count >= self.cfg.max_crashes {
                self.phase = Phase::Over;
                return vec![
                    Action::Record(exit),
                    Action::Record(Record::new(Event::MaxCrashesExceeded, self.crash_count)),
                    Action::GiveUp,
                ];
            }
        }
        // on-failure restarts after memory restarts too: we ended the run.
        let restart = !matches!(
            (self.cfg.restart, cause),
            (RestartPolicy::Never, _) | (RestartPolicy::OnFailure, Cause::CleanExit)
        );
        if !restart {
            self.phase = Phase::Over;
            return vec![Action::Record(exit), Action::Done];
        }

        let delay = if matches!(cause, Cause::Crash | Cause::OomKill) {
            Some(self.backoff(self.crash_count))
        } else {
            self.clean_restart(now)
        };
        match delay {
            None => {
                exit.restart_in = Some(Duration::ZERO);
                self.phase = Phase::Spawning;
                vec![Action::Record(exit), Action::Spawn]
            }
            Some(delay) => {
                exit.restart_in = Some(delay);
                let mut actions = vec![Action::Record(exit)];
                if !matches!(cause, Cause::Crash | Cause::OomKill) {
                    let mut warn = Record::new(Event::HealthWarn, self.crash_count);
                    warn.reason = Some("clean_restart_budget_exceeded");
                    warn.restart_in = Some(delay);
                    actions.push(Action::Record(warn));
                }
                self.phase = Phase::BackingOff { until: now + delay };
                let mut scheduled = Record::new(Event::RestartScheduled, self.crash_count);
                scheduled.restart_in = Some(delay);
                actions.push(Action::Record(scheduled));
                actions
            }
        }
    }

    /// `None` to restart at once (within the budget), else the backoff.
    fn clean_restart(&mut self, now: Instant) -> Option<Duration> {
        while self
            .clean_restarts
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= self.cfg.clean_window)
        {
            self.clean_restarts.pop_front();
        }
        if (self.clean_restarts.len() as u32) < self.cfg.clean_budget {
            self.clean_restarts.push_back(now);
            self.overruns = 0;
            return None;
        }
        self.overruns += 1;
        Some(self.backoff(self.overruns))
    }

    /// floor * 2^(n-1), jittered by +-20%, within [floor, cap].
    fn backoff(&mut self, n: u32) -> Duration {
        let base = self
            .cfg
            .backoff_floor
            .saturating_mul(1u32 << n.saturating_sub(1).min(20));
        let jitter = 0.8 + 0.4 * self.next_unit();
        base.mul_f64(jitter).clamp(
            self.cfg.backoff_floor,
            self.cfg.backoff_cap.max(self.cfg.backoff_floor),
        )
    }

    /// A uniform number in [0, 1) from a xorshift generator.
    fn next_unit(&mut self) -> f64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// Drives a policy with an injected clock and keeps what it did.
    struct Harness {
        policy: Policy,
        now: Instant,
        log: Vec<Action>,
    }

    impl Harness {
        fn new(cfg: Config) -> Self {
            let now = Instant::now();
            let mut h = Self {
                policy: Policy::new(cfg),
                now,
                log: Vec::new(),
            };
            assert_eq!(h.feed(Input::Start), vec![Action::Spawn]);
            h.feed(Input::Started);
            h
        }

        fn feed(&mut self, input: Input) -> Vec<Action> {
            let actions = self.policy.handle(input, self.now);
            self.log.extend(actions.clone());
            actions
        }

        fn advance(&mut self, by: Duration) {
            self.now += by;
        }

        /// The run exits after `uptime`; returns the actions.
        fn exit_after(&mut self, uptime: Duration, status: ExitStatus) -> Vec<Action> {
            self.advance(uptime);
            self.feed(Input::Exited {
                status,
                oom: None,
                peak_rss_bytes: None,
                error: None,
            })
        }

        /// Follows the policy's lead after an exit: waits out any backoff
        /// and reports the new run started.
        fn respawn(&mut self, actions: &[Action]) {
            if !actions.contains(&Action::Spawn) {
                let at = self
                    .policy
                    .next_deadline()
                    .unwrap_or_else(|| panic!("no respawn in {actions:?}"));
                self.now = at.max(self.now);
                let again = self.feed(Input::Timer);
                assert_eq!(again, vec![Action::Spawn]);
            }
            self.feed(Input::Started);
        }

        fn records(&self, event: Event) -> Vec<Record> {
            self.log
                .iter()
                .filter_map(|a| match a {
                    Action::Record(r) if r.event == event => Some(r.clone()),
                    _ => None,
                })
                .collect()
        }
    }

    fn exit_record(actions: &[Action]) -> Record {
        actions
            .iter()
            .find_map(|a| match a {
                Action::Record(r) if r.event == Event::Exited => Some(r.clone()),
                _ => None,
            })
            .expect("an exited record")
    }

    fn reading(charged: u64) -> Input {
        Input::Memory {
            charged,
            metric: Charged::AnonShmem,
        }
    }

    const CRASH: ExitStatus = ExitStatus::Code(1);
    const CLEAN: ExitStatus = ExitStatus::Code(0);

    #[test]
    fn exit_causes() {
        let mem = || Config {
            memory: Some(MemoryPolicy::new(100)),
            ..Config::default()
        };
        // (status, oom_killed, expected cause)
        let cases = [
            (CLEAN, false, Cause::CleanExit),
            (ExitStatus::Code(3), false, Cause::Crash),
            (
                ExitStatus::Signal {
                    signal: 11,
                    core_dumped: true,
                },
                false,
                Cause::Crash,
            ),
            (
                ExitStatus::Signal {
                    signal: 9,
                    core_dumped: false,
                },
                true,
                Cause::OomKill,
            ),
        ];
        for (status, oom_killed, want) in cases {
            let mut h = Harness::new(mem());
            h.advance(S);
            let oom = oom_killed.then_some(OomEvidence::EbpfMarkVictim);
            let actions = h.feed(Input::Exited {
                status,
                oom,
                peak_rss_bytes: None,
                error: None,
            });
            assert_eq!(exit_record(&actions).cause, Some(want), "{status:?}");
        }
        // A configured success code is clean too.
        let mut h = Harness::new(Config {
            success_codes: vec![0, 75],
            ..Config::default()
        });
        let actions = h.exit_after(S, ExitStatus::Code(75));
        assert_eq!(exit_record(&actions).cause, Some(Cause::CleanExit));
    }

    #[test]
    fn crashes_back_off_and_give_up() {
        let mut h = Harness::new(Config {
            max_crashes: 4,
            backoff_floor: S,
            backoff_cap: Duration::from_secs(60),
            ..Config::default()
        });
        let mut delays = Vec::new();
        for n in 1..=3 {
            let actions = h.exit_after(S, CRASH);
            let exit = exit_record(&actions);
            assert_eq!(exit.crash_count, n);
            assert!(h.records(Event::RestartScheduled).len() == n as usize);
            delays.push(exit.restart_in.unwrap());
            h.respawn(&actions);
        }
        assert!(delays[0] >= S, "{delays:?}");
        assert!(
            delays.windows(2).all(|w| w[1] > w[0]),
            "growing: {delays:?}"
        );
        let actions = h.exit_after(S, CRASH);
        assert!(actions.contains(&Action::GiveUp), "{actions:?}");
        assert_eq!(h.records(Event::MaxCrashesExceeded).len(), 1);
        assert_eq!(h.policy.next_deadline(), None, "no restart coming");
        assert_eq!(h.feed(Input::Timer), vec![]);
    }

    #[test]
    fn backoff_stays_within_floor_and_cap() {
        let mut h = Harness::new(Config {
            max_crashes: 100,
            backoff_floor: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(5),
            ..Config::default()
        });
        for _ in 0..30 {
            let actions = h.exit_after(Duration::from_millis(10), CRASH);
            let delay = exit_record(&actions).restart_in.unwrap();
            assert!(delay >= Duration::from_millis(500) && delay <= Duration::from_secs(5));
            h.respawn(&actions);
        }
        let last = h.records(Event::Exited).last().unwrap().restart_in.unwrap();
        assert_eq!(
            last,
            Duration::from_secs(5),
            "long crash loops sit at the cap"
        );
    }

    #[test]
    fn clean_exits_neither_count_nor_reset_crashes() {
        // crash, clean, crash, clean, crash trips max_crashes = 3.
        let mut h = Harness::new(Config {
            max_crashes: 3,
            ..Config::default()
        });
        let script = [CRASH, CLEAN, CRASH, CLEAN];
        let counts = [1, 1, 2, 2];
        for (status, want) in script.into_iter().zip(counts) {
            let actions = h.exit_after(S, status);
            assert_eq!(exit_record(&actions).crash_count, want, "{status:?}");
            h.respawn(&actions);
        }
        let actions = h.exit_after(S, CRASH);
        assert!(actions.contains(&Action::GiveUp), "{actions:?}");
    }

    #[test]
    fn a_stable_run_resets_the_crash_count() {
        let mut h = Harness::new(Config {
            max_crashes: 3,
            stable_after: Duration::from_secs(300),
            ..Config::default()
        });
        for _ in 0..2 {
            let actions = h.exit_after(S, CRASH);
            h.respawn(&actions);
        }
        assert_eq!(h.policy.crash_count(), 2);
        let actions = h.exit_after(Duration::from_secs(301), CRASH);
        assert_eq!(
            exit_record(&actions).crash_count,
            1,
            "stable run, fresh count"
        );
        assert!(!actions.contains(&Action::GiveUp));
    }

    #[test]
    fn memory_drains_never_count_as_crashes() {
        let mut h = Harness::new(Config {
            max_crashes: 3,
            clean_budget: 1000,
            memory: Some(MemoryPolicy::new(100)),
            ..Config::default()
        });
        for _ in 0..100 {
            h.advance(S);
            let over = h.feed(reading(150));
            assert!(over.contains(&Action::Signal(libc::SIGTERM)), "{over:?}");
            let actions = h.exit_after(Duration::from_millis(10), CLEAN);
            let exit = exit_record(&actions);
            assert_eq!(exit.cause, Some(Cause::MemoryDrain));
            assert_eq!(exit.crash_count, 0);
            assert_eq!(exit.charged_bytes, Some(150));
            assert_eq!(exit.restart_in, Some(Duration::ZERO), "restarted at once");
            h.respawn(&actions);
        }
        assert_eq!(h.policy.crash_count(), 0);
    }

    #[test]
    fn drain_escalates_to_kill_after_grace() {
        let mut mem = MemoryPolicy::new(100);
        mem.grace = Duration::from_secs(10);
        let mut h = Harness::new(Config {
            memory: Some(mem),
            ..Config::default()
        });
        let over = h.feed(reading(200));
        let deadline = h.now + Duration::from_secs(10);
        assert_eq!(
            over.iter()
                .filter(|a| !matches!(a, Action::Record(_)))
                .collect::<Vec<_>>(),
            [&Action::Signal(libc::SIGTERM)]
        );
        assert_eq!(h.policy.next_deadline(), Some(deadline));
        h.advance(Duration::from_secs(5));
        assert_eq!(h.feed(Input::Timer), vec![], "not before the deadline");
        h.advance(Duration::from_secs(5));
        let kill = h.feed(Input::Timer);
        assert!(kill.contains(&Action::KillTree), "{kill:?}");
        assert_eq!(h.records(Event::EscalatedKill).len(), 1);
        let actions = h.exit_after(
            Duration::from_millis(5),
            ExitStatus::Signal {
                signal: 9,
                core_dumped: false,
            },
        );
        let exit = exit_record(&actions);
        assert_eq!(exit.cause, Some(Cause::MemoryKill));
        assert_eq!(exit.crash_count, 0);
        assert!(actions.contains(&Action::Spawn));
    }

    #[test]
    fn clean_restart_budget() {
        let mut h = Harness::new(Config {
            clean_budget: 10,
            clean_window: Duration::from_secs(60),
            ..Config::default()
        });
        for i in 0..10 {
            let actions = h.exit_after(S, CLEAN);
            assert_eq!(
                exit_record(&actions).restart_in,
                Some(Duration::ZERO),
                "#{i}"
            );
            h.respawn(&actions);
        }
        // The 11th within the minute: a warning and backoff, not a loop.
        let actions = h.exit_after(S, CLEAN);
        let warn = h.records(Event::HealthWarn);
        assert_eq!(warn.len(), 1);
        assert_eq!(warn[0].reason, Some("clean_restart_budget_exceeded"));
        let delay = exit_record(&actions).restart_in.unwrap();
        assert!(delay >= S, "{delay:?}");
        assert_eq!(h.policy.crash_count(), 0);
        h.respawn(&actions);
        // A minute later the budget is back.
        let actions = h.exit_after(Duration::from_secs(61), CLEAN);
        assert_eq!(exit_record(&actions).restart_in, Some(Duration::ZERO));
    }

    #[test]
    fn restart_policies() {
        // (policy, status, restarts?)
        let cases = [
            (RestartPolicy::Always, CLEAN, true),
            (RestartPolicy::Always, CRASH, true),
            (RestartPolicy::OnFailure, CLEAN, false),
            (RestartPolicy::OnFailure, CRASH, true),
            (RestartPolicy::Never, CLEAN, false),
            (RestartPolicy::Never, CRASH, false),
        ];
        for (restart, status, want) in cases {
            let mut h = Harness::new(Config {
                restart,
                ..Config::default()
            });
            let actions = h.exit_after(S, status);
            let restarts = actions.contains(&Action::Spawn) || h.policy.next_deadline().is_some();
            assert_eq!(restarts, want, "{restart:?} {status:?}: {actions:?}");
            assert_eq!(actions.contains(&Action::Done), !want);
        }
        // on-failure still restarts after a memory drain: we caused it.
        let mut h = Harness::new(Config {
            restart: RestartPolicy::OnFailure,
            memory: Some(MemoryPolicy::new(100)),
            ..Config::default()
        });
        h.feed(reading(101));
        let actions = h.exit_after(S, CLEAN);
        assert!(actions.contains(&Action::Spawn), "{actions:?}");
    }

    #[test]
    fn over_for_needs_a_sustained_crossing() {
        let mut mem = MemoryPolicy::new(100);
        mem.over_for = Some(Duration::from_secs(30));
        let mut h = Harness::new(Config {
            memory: Some(mem),
            ..Config::default()
        });
        let first = h.feed(reading(120));
        assert_eq!(first, vec![]);
        assert_eq!(
            h.policy.next_deadline(),
            Some(h.now + LOOK_MAX),
            "looked at again before the window ends"
        );
        // A dip below cancels the window.
        h.advance(Duration::from_secs(20));
        h.feed(Input::BelowLimit);
        h.advance(Duration::from_secs(15));
        let again = h.feed(reading(120));
        assert_eq!(again, vec![]);
        assert_eq!(
            h.policy.next_deadline(),
            Some(h.now + LOOK_MAX),
            "looked at again before the window ends"
        );
        // Still over when the window ends: enforce.
        h.advance(Duration::from_secs(30));
        let enforce = h.feed(reading(130));
        assert!(
            enforce.contains(&Action::Signal(libc::SIGTERM)),
            "{enforce:?}"
        );
    }

    #[test]
    fn startup_grace_defers_soft_but_not_hard_limits() {
        let mut mem = MemoryPolicy::new(100);
        mem.startup_grace = Some(Duration::from_secs(60));
        mem.hard_limit = Some(500);
        let mut h = Harness::new(Config {
            memory: Some(mem),
            ..Config::default()
        });
        h.advance(Duration::from_secs(5));
        let soft = h.feed(reading(200));
        assert_eq!(soft, vec![Action::ArmAt(500)], "the hard limit is watched");
        assert_eq!(h.policy.next_deadline(), Some(h.now + LOOK_MAX));
        let hard = h.feed(reading(600));
        assert!(hard.contains(&Action::Signal(libc::SIGTERM)), "{hard:?}");
        let over = h.records(Event::MemoryOverLimit);
        assert_eq!(over[0].reason, Some("hard_limit"));
        assert_eq!(over[0].limit_bytes, Some(500));
    }

    #[test]
    fn other_memory_actions_leave_the_run_alone() {
        let cases = [
            (MemoryAction::Signal, Action::Signal(libc::SIGTERM)),
            (MemoryAction::Marker, Action::Mark),
            (
                MemoryAction::Exec(vec!["/bin/hook".into(), "--now".into()]),
                Action::Exec(vec!["/bin/hook".into(), "--now".into()]),
            ),
        ];
        for (action, want) in cases {
            let mut mem = MemoryPolicy::new(100);
            mem.action = action.clone();
            let mut h = Harness::new(Config {
                memory: Some(mem),
                ..Config::default()
            });
            let actions = h.feed(reading(150));
            assert!(actions.contains(&want), "{action:?}: {actions:?}");
            assert!(!actions.iter().any(|a| matches!(a, Action::KillTree)));
            assert!(actions.contains(&Action::Rearm), "{action:?}: {actions:?}");
            assert_eq!(h.policy.next_deadline(), None);
            // A later exit, past the grace, is judged on its own: a clean
            // exit stays clean.
            let exit = exit_record(&h.exit_after(Duration::from_secs(11), CLEAN));
            assert_eq!(exit.cause, Some(Cause::CleanExit), "{action:?}");
        }
    }

    #[test]
    fn shutdown_drains_and_ends() {
        let mut h = Harness::new(Config::default());
        let actions = h.feed(Input::Shutdown);
        assert_eq!(actions.last(), Some(&Action::Signal(libc::SIGTERM)));
        let drain = h.records(Event::DrainStarted);
        assert_eq!(drain[0].reason, Some("shutdown"), "the drain is recorded");
        let actions = h.exit_after(Duration::from_millis(50), CLEAN);
        assert_eq!(exit_record(&actions).cause, Some(Cause::Shutdown));
        assert!(actions.contains(&Action::Done));
        // During a backoff there is nothing to drain.
        let mut h = Harness::new(Config::default());
        let actions = h.exit_after(S, CRASH);
        assert!(h.policy.next_deadline().is_some(), "{actions:?}");
        assert_eq!(h.feed(Input::Shutdown), vec![Action::Done]);
        h.advance(Duration::from_secs(120));
        assert_eq!(h.feed(Input::Timer), vec![], "no spawn after shutdown");
    }

    #[test]
    fn shutdown_escalates_after_its_grace() {
        let mut h = Harness::new(Config {
            shutdown_grace: Duration::from_secs(3),
            ..Config::default()
        });
        h.feed(Input::Shutdown);
        h.advance(Duration::from_secs(3));
        assert!(h.feed(Input::Timer).contains(&Action::KillTree));
        let actions = h.exit_after(
            Duration::ZERO,
            ExitStatus::Signal {
                signal: 9,
                core_dumped: false,
            },
        );
        assert_eq!(exit_record(&actions).cause, Some(Cause::Shutdown));
    }

    /// Regression: a memory drain past the clean-restart budget scheduled
    /// a restart that never came (the drain's wake-up replaced it).
    #[test]
    fn a_backoff_after_drains_restarts() {
        let mut memory = MemoryPolicy::new(100);
        memory.grace = Duration::from_millis(100);
        let mut h = Harness::new(Config {
            clean_budget: 2,
            backoff_floor: S,
            memory: Some(memory),
            ..Config::default()
        });
        for round in 0..3 {
            h.advance(Duration::from_millis(10));
            h.feed(reading(150));
            let actions = h.exit_after(Duration::from_millis(10), CLEAN);
            if round < 2 {
                assert!(actions.contains(&Action::Spawn), "{actions:?}");
                h.feed(Input::Started);
            } else {
                let delay = exit_record(&actions).restart_in.unwrap();
                assert!(delay >= S, "{delay:?}");
                assert_eq!(h.records(Event::HealthWarn).len(), 1);
                let at = h
                    .policy
                    .next_deadline()
                    .expect("a deadline for the restart");
                assert_eq!(at, h.now + delay);
                h.now = at;
                assert_eq!(h.feed(Input::Timer), vec![Action::Spawn]);
            }
        }
    }

    /// Regression: shutdown while a decision was deferred never escalated.
    #[test]
    fn shutdown_while_deferred_kills_after_grace() {
        let mut memory = MemoryPolicy::new(100);
        memory.over_for = Some(Duration::from_secs(3));
        let mut h = Harness::new(Config {
            shutdown_grace: Duration::from_secs(6),
            memory: Some(memory),
            ..Config::default()
        });
        assert_eq!(h.feed(reading(150)), vec![]);
        h.advance(S);
        assert!(
            h.feed(Input::Shutdown)
                .contains(&Action::Signal(libc::SIGTERM))
        );
        let deadline = h.now + Duration::from_secs(6);
        assert_eq!(h.policy.next_deadline(), Some(deadline));
        h.now = deadline;
        assert!(h.feed(Input::Timer).contains(&Action::KillTree));
    }

    /// A hard limit is never deferred: while a soft decision waits, the
    /// sensor watches the hard one, and a reading over it acts at once.
    #[test]
    fn hard_limit_is_watched_while_soft_is_deferred() {
        let mut memory = MemoryPolicy::new(100);
        memory.over_for = Some(Duration::from_secs(10));
        memory.startup_grace = Some(Duration::from_secs(60));
        memory.hard_limit = Some(200);
        let mut h = Harness::new(Config {
            memory: Some(memory),
            ..Config::default()
        });
        assert_eq!(h.feed(reading(120)), vec![Action::ArmAt(200)]);
        h.advance(S);
        assert_eq!(h.feed(reading(150)), vec![], "armed once");
        let hard = h.feed(reading(250));
        assert!(hard.contains(&Action::Signal(libc::SIGTERM)), "{hard:?}");
        assert_eq!(
            h.records(Event::MemoryOverLimit)[0].reason,
            Some("hard_limit")
        );
    }

    /// Regression: a dip just under the limit left the sensor waiting to
    /// fall below the hysteresis level, deaf to the next crossing.
    #[test]
    fn a_dip_under_the_limit_rearms_at_the_limit() {
        let mut memory = MemoryPolicy::new(100);
        memory.over_for = Some(Duration::from_secs(2));
        let mut h = Harness::new(Config {
            memory: Some(memory),
            ..Config::default()
        });
        assert_eq!(h.feed(reading(103)), vec![]);
        h.advance(Duration::from_secs(2));
        assert_eq!(h.feed(Input::Timer), vec![Action::Measure]);
        assert_eq!(h.feed(reading(97)), vec![Action::ArmAt(100)]);
        assert_eq!(h.policy.next_deadline(), None);
        assert_eq!(h.feed(reading(400)), vec![]);
        h.advance(Duration::from_secs(2));
        assert_eq!(h.feed(Input::Timer), vec![Action::Measure]);
        let enforce = h.feed(reading(400));
        assert!(
            enforce.contains(&Action::Signal(libc::SIGTERM)),
            "{enforce:?}"
        );
    }

    /// Shutdown while a spawn is in flight drains the run once it starts.
    #[test]
    fn shutdown_during_spawn_drains_what_started() {
        let mut p = Policy::new(Config::default());
        let t = Instant::now();
        assert_eq!(p.handle(Input::Start, t), vec![Action::Spawn]);
        assert_eq!(p.handle(Input::Shutdown, t), vec![]);
        let started = p.handle(Input::Started, t);
        assert_eq!(
            started.last(),
            Some(&Action::Signal(libc::SIGTERM)),
            "{started:?}"
        );
        assert!(p.next_deadline().is_some());
        let exit = p.handle(
            Input::Exited {
                status: CLEAN,
                oom: None,
                peak_rss_bytes: None,
                error: None,
            },
            t + S,
        );
        assert_eq!(exit_record(&exit).cause, Some(Cause::Shutdown));
        assert!(exit.contains(&Action::Done));
    }
    /// Regression: `--on-memory signal` counted the service's death from
    /// our own signal as a crash, and gave up after a few.
    #[test]
    fn death_by_the_memory_signal_is_not_a_crash() {
        let mut memory = MemoryPolicy::new(100);
        memory.action = MemoryAction::Signal;
        memory.grace = Duration::from_secs(5);
        let mut h = Harness::new(Config {
            max_crashes: 2,
            memory: Some(memory),
            ..Config::default()
        });
        for _ in 0..5 {
            let signal = h.feed(reading(150));
            assert!(
                signal.contains(&Action::Signal(libc::SIGTERM)),
                "{signal:?}"
            );
            let drain = h.records(Event::DrainStarted);
            assert_eq!(drain.last().unwrap().reason, Some("signal"));
            let actions = h.exit_after(
                Duration::from_millis(100),
                ExitStatus::Signal {
                    signal: libc::SIGTERM,
                    core_dumped: false,
                },
            );
            let exit = exit_record(&actions);
            assert_eq!(exit.cause, Some(Cause::MemoryDrain));
            assert_eq!(exit.crash_count, 0);
            h.respawn(&actions);
        }
    }

    /// Regression: with `--restart never` a crash ended supervision as a
    /// success; it is a failure.
    #[test]
    fn a_last_run_that_crashed_fails() {
        let mut h = Harness::new(Config {
            restart: RestartPolicy::Never,
            ..Config::default()
        });
        let actions = h.exit_after(S, CRASH);
        assert!(actions.contains(&Action::Done));
        assert!(h.policy.failed());
        let mut h = Harness::new(Config {
            restart: RestartPolicy::Never,
            ..Config::default()
        });
        h.exit_after(S, CLEAN);
        assert!(!h.policy.failed());
        // Asked to stop during a crash's backoff: a clean stop.
        let mut h = Harness::new(Config::default());
        h.exit_after(S, CRASH);
        assert_eq!(h.feed(Input::Shutdown), vec![Action::Done]);
        assert!(!h.policy.failed());
    }

    /// Regression: with a slow sensor, a deferred decision was decided by
    /// the readings at its two ends; a dip in between did not count. It is
    /// looked at again during the window, and a dip cancels it.
    #[test]
    fn a_dip_during_the_window_cancels_the_decision() {
        let mut memory = MemoryPolicy::new(100);
        memory.over_for = Some(Duration::from_millis(2500));
        let mut h = Harness::new(Config {
            memory: Some(memory),
            ..Config::default()
        });
        assert_eq!(h.feed(reading(150)), vec![]);
        let look = h.policy.next_deadline().unwrap();
        assert_eq!(look, h.now + Duration::from_millis(500));
        h.now = look;
        assert_eq!(h.feed(Input::Timer), vec![Action::Measure]);
        assert_eq!(h.policy.next_deadline(), None, "waiting for the reading");
        assert_eq!(h.feed(reading(150)), vec![], "still over");
        h.now = h.policy.next_deadline().unwrap();
        assert_eq!(h.feed(Input::Timer), vec![Action::Measure]);
        assert_eq!(
            h.feed(reading(90)),
            vec![Action::ArmAt(100)],
            "a dip cancels"
        );
        assert_eq!(h.policy.next_deadline(), None);
        // The next crossing starts a window of its own.
        assert_eq!(h.feed(reading(150)), vec![]);
        h.advance(Duration::from_millis(2500));
        let mut enforced = false;
        for _ in 0..10 {
            if h.policy.next_deadline().is_some_and(|d| d <= h.now) {
                assert_eq!(h.feed(Input::Timer), vec![Action::Measure]);
                enforced = h
                    .feed(reading(150))
                    .contains(&Action::Signal(libc::SIGTERM));
                break;
            }
            h.now = h.policy.next_deadline().unwrap();
        }
        assert!(enforced, "sustained over the window: enforced");
    }
}
