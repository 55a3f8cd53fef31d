//! The respawn policy: a pure state machine. Inputs (what happened) and the
//! time go in, actions (what to do, what to record) come out; no processes,
//! no clocks, no sleeps, so every rule is tested with a table.
//!
//! The rules, from the incidents the product learns from:
//! - A memory drain is not a crash, and neither is a clean exit: neither
//!   changes the crash count, and neither resets it, so a worker that
//!   alternates crash / clean / crash still trips `max_crashes`.
//! - Crashes back off exponentially (with jitter, between a floor and a
//!   cap); a run that lasted `stable_after` starts the count afresh.
//! - Clean restarts are immediate within a budget (10 per 60 s); past it, a
//!   `health_warn` and backoff instead of a silent tight loop.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::exit::ExitStatus;

/// When to restart a service that exited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
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
    /// Enforced at once, grace periods or not.
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
    pub memory: Option<MemoryPolicy>,
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
            memory: None,
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

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// Start supervising (spawn the first run).
    Start,
    /// The run was spawned.
    Started,
    /// An exact reading of the run's memory (crossings, and re-reads the
    /// policy asked for with [`Action::WakeAt`]).
    Memory { charged: u64 },
    /// The run's memory fell back under the limit.
    BelowLimit,
    /// A wake-up asked for with [`Action::WakeAt`].
    Timer,
    /// The run exited.
    Exited {
        status: ExitStatus,
        oom_killed: bool,
    },
    /// Stop supervising: drain the run and end.
    Shutdown,
}

/// What to do. The caller performs them in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start a new run.
    Spawn,
    /// Send this signal to the run's process group.
    Signal(i32),
    /// SIGKILL every process of the run's tree.
    KillTree,
    /// Feed [`Input::Timer`] at this time (with a fresh [`Input::Memory`]
    /// reading first, when memory is being watched).
    WakeAt(Instant),
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
/// `pid` and what it measured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub event: &'static str,
    pub cause: Option<Cause>,
    pub status: Option<ExitStatus>,
    pub uptime: Option<Duration>,
    pub charged_bytes: Option<u64>,
    pub limit_bytes: Option<u64>,
    pub crash_count: u32,
    pub restart_in: Option<Duration>,
    pub reason: Option<&'static str>,
}

impl Record {
    fn new(event: &'static str, crash_count: u32) -> Self {
        Self {
            event,
            cause: None,
            status: None,
            uptime: None,
            charged_bytes: None,
            limit_bytes: None,
            crash_count,
            restart_in: None,
            reason: None,
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

/// The state machine of one service.
pub struct Policy {
    cfg: Config,
    phase: Phase,
    crash_count: u32,
    /// Times of recent immediate clean restarts.
    clean_restarts: VecDeque<Instant>,
    /// Budget overruns in a row, for their backoff.
    overruns: u32,
    /// When the run went over the soft limit (for `over_for`).
    over_since: Option<Instant>,
    /// The reading that triggered enforcement.
    trigger: Option<u64>,
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
            trigger: None,
            shutting_down: false,
            rng,
        }
    }

    pub fn crash_count(&self) -> u32 {
        self.crash_count
    }

    /// Whether a run is alive (spawned and not yet reported exited).
    pub fn running(&self) -> bool {
        matches!(
            self.phase,
            Phase::Spawning | Phase::Running { .. } | Phase::Draining { .. }
        )
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
            Input::Started => {
                self.phase = Phase::Running { since: now };
                self.over_since = None;
                self.trigger = None;
                vec![Action::Record(Record::new("started", self.crash_count))]
            }
            Input::Memory { charged } => self.memory(charged, now),
            Input::BelowLimit => {
                self.over_since = None;
                vec![]
            }
            Input::Timer => self.timer(now),
            Input::Exited { status, oom_killed } => self.exited(status, oom_killed, now),
            Input::Shutdown => self.shutdown(now),
        }
    }

    fn memory(&mut self, charged: u64, now: Instant) -> Vec<Action> {
        let Phase::Running { since } = self.phase else {
            return vec![];
        };
        let Some(mem) = self.cfg.memory.clone() else {
            return vec![];
        };
        let hard = mem.hard_limit.is_some_and(|h| charged >= h);
        if !hard {
            if charged < mem.limit {
                self.over_since = None;
                return vec![];
            }
            let over_since = *self.over_since.get_or_insert(now);
            // The later of: the end of the startup grace, and the end of
            // the sustained window.
            let mut due = over_since;
            if let Some(grace) = mem.startup_grace {
                due = due.max(since + grace);
            }
            if let Some(over_for) = mem.over_for {
                due = due.max(over_since + over_for);
            }
            if now < due {
                return vec![Action::WakeAt(due)];
            }
        }
        self.over_since = None;
        self.enforce(&mem, charged, hard, now)
    }

    fn enforce(
        &mut self,
        mem: &MemoryPolicy,
        charged: u64,
        hard: bool,
        now: Instant,
    ) -> Vec<Action> {
        let mut over = Record::new("memory_over_limit", self.crash_count);
        over.charged_bytes = Some(charged);
        over.limit_bytes = Some(if hard {
            mem.hard_limit.unwrap_or(mem.limit)
        } else {
            mem.limit
        });
        over.reason = Some(if hard { "hard_limit" } else { "limit" });
        let mut actions = vec![Action::Record(over)];
        match &mem.action {
            MemoryAction::Restart => {
                self.trigger = Some(charged);
                let Phase::Running { since } = self.phase else {
                    return actions;
                };
                let deadline = now + mem.grace;
                self.phase = Phase::Draining {
                    since,
                    deadline,
                    killed: false,
                    memory: true,
                };
                let mut drain = Record::new("drain_started", self.crash_count);
                drain.charged_bytes = Some(charged);
                actions.extend([
                    Action::Record(drain),
                    Action::Signal(mem.drain_signal),
                    Action::WakeAt(deadline),
                ]);
            }
            MemoryAction::Signal => actions.push(Action::Signal(mem.drain_signal)),
            MemoryAction::Marker => {
                let mut mark = Record::new("respawn_recommended", self.crash_count);
                mark.charged_bytes = Some(charged);
                actions.extend([Action::Record(mark), Action::Mark]);
            }
            MemoryAction::Exec(argv) => actions.push(Action::Exec(argv.clone())),
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
                    Action::Record(Record::new("escalated_kill", self.crash_count)),
                    Action::KillTree,
                ]
            }
            Phase::BackingOff { until } if now >= until => {
                self.phase = Phase::Spawning;
                vec![Action::Spawn]
            }
            _ => vec![],
        }
    }

    fn shutdown(&mut self, now: Instant) -> Vec<Action> {
        self.shutting_down = true;
        match self.phase {
            Phase::Running { since } => {
                let deadline = now + self.cfg.shutdown_grace;
                self.phase = Phase::Draining {
                    since,
                    deadline,
                    killed: false,
                    memory: false,
                };
                let signal = self
                    .cfg
                    .memory
                    .as_ref()
                    .map_or(libc::SIGTERM, |m| m.drain_signal);
                vec![Action::Signal(signal), Action::WakeAt(deadline)]
            }
            // It exits soon; its exit ends supervision.
            Phase::Spawning | Phase::Draining { .. } => vec![],
            Phase::Idle | Phase::BackingOff { .. } => {
                self.phase = Phase::Over;
                vec![Action::Done]
            }
            Phase::Over => vec![],
        }
    }

    fn exited(&mut self, status: ExitStatus, oom_killed: bool, now: Instant) -> Vec<Action> {
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
        } else if oom_killed {
            Cause::OomKill
        } else if clean {
            Cause::CleanExit
        } else {
            Cause::Crash
        };

        let mut exit = Record::new("exited", self.crash_count);
        exit.cause = Some(cause);
        exit.status = Some(status);
        exit.uptime = uptime;
        exit.charged_bytes = self.trigger.take();
        exit.limit_bytes = self.cfg.memory.as_ref().map(|m| m.limit);

        if cause == Cause::Shutdown {
            self.phase = Phase::Over;
            return vec![Action::Record(exit), Action::Done];
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
                    Action::Record(Record::new("max_crashes_exceeded", self.crash_count)),
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
        let mut actions = Vec::new();
        match delay {
            None => {
                exit.restart_in = Some(Duration::ZERO);
                self.phase = Phase::Spawning;
                actions.extend([Action::Record(exit), Action::Spawn]);
            }
            Some(delay) => {
                exit.restart_in = Some(delay);
                if !matches!(cause, Cause::Crash | Cause::OomKill) {
                    let mut warn = Record::new("health_warn", self.crash_count);
                    warn.reason = Some("clean_restart_budget_exceeded");
                    warn.restart_in = Some(delay);
                    actions.push(Action::Record(warn));
                }
                let until = now + delay;
                self.phase = Phase::BackingOff { until };
                let mut scheduled = Record::new("restart_scheduled", self.crash_count);
                scheduled.restart_in = Some(delay);
                actions.splice(0..0, [Action::Record(exit)]);
                actions.extend([Action::Record(scheduled), Action::WakeAt(until)]);
            }
        }
        actions
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
        t0: Instant,
        now: Instant,
        log: Vec<Action>,
    }

    impl Harness {
        fn new(cfg: Config) -> Self {
            let now = Instant::now();
            let mut h = Self {
                policy: Policy::new(cfg),
                t0: now,
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
                oom_killed: false,
            })
        }

        /// Follows the policy's lead after an exit: waits out any backoff
        /// and reports the new run started.
        fn respawn(&mut self, actions: &[Action]) {
            for a in actions {
                match a {
                    Action::WakeAt(at) => {
                        self.now = (*at).max(self.now);
                        let again = self.feed(Input::Timer);
                        assert_eq!(again, vec![Action::Spawn]);
                        self.feed(Input::Started);
                        return;
                    }
                    Action::Spawn => {
                        self.feed(Input::Started);
                        return;
                    }
                    _ => {}
                }
            }
            panic!("no respawn in {actions:?}");
        }

        fn records(&self, event: &str) -> Vec<Record> {
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
                Action::Record(r) if r.event == "exited" => Some(r.clone()),
                _ => None,
            })
            .expect("an exited record")
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
            let actions = h.feed(Input::Exited { status, oom_killed });
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
            assert!(h.records("restart_scheduled").len() == n as usize);
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
        assert_eq!(h.records("max_crashes_exceeded").len(), 1);
        assert!(!h.policy.running());
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
        let last = h.records("exited").last().unwrap().restart_in.unwrap();
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
            let over = h.feed(Input::Memory { charged: 150 });
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
        let over = h.feed(Input::Memory { charged: 200 });
        let deadline = h.now + Duration::from_secs(10);
        assert_eq!(
            over.iter()
                .filter(|a| !matches!(a, Action::Record(_)))
                .collect::<Vec<_>>(),
            [&Action::Signal(libc::SIGTERM), &Action::WakeAt(deadline)]
        );
        h.advance(Duration::from_secs(5));
        assert_eq!(h.feed(Input::Timer), vec![], "not before the deadline");
        h.advance(Duration::from_secs(5));
        let kill = h.feed(Input::Timer);
        assert!(kill.contains(&Action::KillTree), "{kill:?}");
        assert_eq!(h.records("escalated_kill").len(), 1);
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
        let warn = h.records("health_warn");
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
            let restarts = actions
                .iter()
                .any(|a| matches!(a, Action::Spawn | Action::WakeAt(_)));
            assert_eq!(restarts, want, "{restart:?} {status:?}: {actions:?}");
            assert_eq!(actions.contains(&Action::Done), !want);
        }
        // on-failure still restarts after a memory drain: we caused it.
        let mut h = Harness::new(Config {
            restart: RestartPolicy::OnFailure,
            memory: Some(MemoryPolicy::new(100)),
            ..Config::default()
        });
        h.feed(Input::Memory { charged: 101 });
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
        let first = h.feed(Input::Memory { charged: 120 });
        assert_eq!(first, vec![Action::WakeAt(h.now + Duration::from_secs(30))]);
        // A dip below cancels the window.
        h.advance(Duration::from_secs(20));
        h.feed(Input::BelowLimit);
        h.advance(Duration::from_secs(15));
        let again = h.feed(Input::Memory { charged: 120 });
        assert_eq!(again, vec![Action::WakeAt(h.now + Duration::from_secs(30))]);
        // Still over when the window ends: enforce.
        h.advance(Duration::from_secs(30));
        let enforce = h.feed(Input::Memory { charged: 130 });
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
        let t0 = h.t0;
        h.advance(Duration::from_secs(5));
        let soft = h.feed(Input::Memory { charged: 200 });
        assert_eq!(soft, vec![Action::WakeAt(t0 + Duration::from_secs(60))]);
        let hard = h.feed(Input::Memory { charged: 600 });
        assert!(hard.contains(&Action::Signal(libc::SIGTERM)), "{hard:?}");
        let over = h.records("memory_over_limit");
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
            let actions = h.feed(Input::Memory { charged: 150 });
            assert!(actions.contains(&want), "{action:?}: {actions:?}");
            assert!(
                !actions
                    .iter()
                    .any(|a| matches!(a, Action::WakeAt(_) | Action::KillTree))
            );
            // A later exit is judged on its own: a clean exit stays clean.
            let exit = exit_record(&h.exit_after(S, CLEAN));
            assert_eq!(exit.cause, Some(Cause::CleanExit), "{action:?}");
        }
    }

    #[test]
    fn shutdown_drains_and_ends() {
        let mut h = Harness::new(Config::default());
        let actions = h.feed(Input::Shutdown);
        assert_eq!(actions[0], Action::Signal(libc::SIGTERM));
        let actions = h.exit_after(Duration::from_millis(50), CLEAN);
        assert_eq!(exit_record(&actions).cause, Some(Cause::Shutdown));
        assert!(actions.contains(&Action::Done));
        // During a backoff there is nothing to drain.
        let mut h = Harness::new(Config::default());
        let actions = h.exit_after(S, CRASH);
        assert!(actions.iter().any(|a| matches!(a, Action::WakeAt(_))));
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
}
