//! The service actor and its loop, driven on a scripted platform with
//! tokio's clock paused: each test is a regression test of a defect seen
//! with real programs.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::{
    mem::Charged,
    policy::{Config, MemoryAction, MemoryPolicy},
    sensor::Crossing,
};

/// How the scripted service behaves.
#[derive(Clone, Copy, Default)]
struct Behaviour {
    /// Its memory: what a crossing and a measurement report.
    charged: u64,
    /// It is over its limit as soon as it starts.
    over_at_start: bool,
    /// It ignores the drain signal (only SIGKILL ends it).
    ignores_term: bool,
    /// How long a spawn takes.
    spawn_takes: Duration,
    /// Marker writes fail.
    marker_fails: bool,
}

/// What the platform saw, shared with the test.
#[derive(Default)]
struct Seen {
    effects: Vec<(Instant, Effect)>,
    behaviour: Behaviour,
}

impl Seen {
    fn count(&self, want: impl Fn(&Effect) -> bool) -> usize {
        self.effects.iter().filter(|(_, e)| want(e)).count()
    }

    fn lines(&self) -> Vec<AuditLine> {
        self.effects
            .iter()
            .filter_map(|(_, e)| match e {
                Effect::Audit(line) => Some((**line).clone()),
                _ => None,
            })
            .collect()
    }

    fn events(&self) -> Vec<Event> {
        self.lines().iter().map(|l| l.event).collect()
    }

    /// When the first effect matching `want` was performed.
    fn when(&self, want: impl Fn(&Effect) -> bool) -> Option<Instant> {
        self.effects.iter().find(|(_, e)| want(e)).map(|(t, _)| *t)
    }
}

struct Scripted {
    seen: Arc<Mutex<Seen>>,
    queue: VecDeque<Happening>,
    inject: mpsc::UnboundedReceiver<Happening>,
    /// Spawns that report after a delay: (when, pid).
    spawning: Vec<(tokio::time::Instant, usize, u32)>,
    next_pid: u32,
}

impl Scripted {
    fn new(behaviour: Behaviour) -> (Self, Arc<Mutex<Seen>>, mpsc::UnboundedSender<Happening>) {
        let seen = Arc::new(Mutex::new(Seen {
            behaviour,
            ..Seen::default()
        }));
        let (tx, inject) = mpsc::unbounded_channel();
        let platform = Self {
            seen: Arc::clone(&seen),
            queue: VecDeque::new(),
            inject,
            spawning: Vec::new(),
            next_pid: 100,
        };
        (platform, seen, tx)
    }

    fn crossing(pid: u32, charged: u64) -> Happening {
        Happening::Sensor(SensorEvent::OverLimit(Crossing {
            group: GroupId(pid),
            pid: Some(pid),
            charged_bytes: charged,
            limit_bytes: 0,
            sensed_ns: 0,
            confirmed_ns: 0,
            members: 1,
            metric: Charged::AnonShmem,
        }))
    }

    fn reaped(pid: u32, signal: i32) -> Happening {
        Happening::Reaped {
            pid,
            status: ExitStatus::Signal {
                signal,
                core_dumped: false,
            },
            peak_rss_bytes: 4096,
            cgroup_oom_kill: false,
        }
    }
}

impl Platform for Scripted {
    async fn next(&mut self) -> Happening {
        loop {
            if let Some(h) = self.queue.pop_front() {
                return h;
            }
            let due = self.spawning.iter().map(|s| s.0).min();
            let timer = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(h) = self.inject.recv() => return h,
                () = timer => {
                    let now = tokio::time::Instant::now();
                    let behaviour = self.seen.lock().unwrap().behaviour;
                    for (_, service, pid) in self.spawning.iter().filter(|s| s.0 <= now) {
                        self.queue.push_back(Happening::Spawned {
                            service: *service,
                            result: Ok(Spawned { pid: *pid, group: Some(GroupId(*pid)), foreign: false }),
                        });
                        if behaviour.over_at_start {
                            self.queue.push_back(Self::crossing(*pid, behaviour.charged));
                        }
                    }
                    self.spawning.retain(|s| s.0 > now);
                }
            }
        }
    }

    fn perform(&mut self, index: usize, _service: &Service, effect: Effect) -> Option<Input> {
        let behaviour = self.seen.lock().unwrap().behaviour;
        self.seen
            .lock()
            .unwrap()
            .effects
            .push((tokio::time::Instant::now().into_std(), effect.clone()));
        match effect {
            Effect::Spawn => {
                self.next_pid += 1;
                let at = tokio::time::Instant::now() + behaviour.spawn_takes;
                self.spawning.push((at, index, self.next_pid));
                None
            }
            Effect::Signal { pid, signal, .. } => {
                if !behaviour.ignores_term {
                    self.queue.push_back(Self::reaped(pid, signal));
                }
                None
            }
            Effect::KillTree { pid, .. } => {
                self.queue.push_back(Self::reaped(pid, libc::SIGKILL));
                None
            }
            Effect::Measure { .. } => Some(Input::Reading {
                charged: self.seen.lock().unwrap().behaviour.charged,
                metric: Charged::AnonShmem,
            }),
            Effect::WriteMarker { path, .. } => {
                Some(Input::MarkerWritten(if behaviour.marker_fails {
                    Err("No space left on device".into())
                } else {
                    Ok(path)
                }))
            }
            Effect::RunHook { .. } => {
                self.queue.push_back(Happening::Reaped {
                    pid: 7,
                    status: ExitStatus::Code(3),
                    peak_rss_bytes: 0,
                    cgroup_oom_kill: false,
                });
                Some(Input::HookStarted(Ok(7)))
            }
            _ => None,
        }
    }
}

fn service(memory: Option<MemoryPolicy>, tune: impl FnOnce(&mut Config)) -> Service {
    let mut policy = Config {
        memory,
        backoff_floor: Duration::from_secs(1),
        ..Config::default()
    };
    tune(&mut policy);
    Service::new(ServiceConfig {
        name: "svc".into(),
        target: super::Target::Spawn(crate::runner::Spec::default()),
        policy,
        marker: Some(super::MarkerSpec {
            path: "/run/marker".into(),
            format: super::MarkerFormat::KeyValue,
            clear_after: None,
        }),
        hook_timeout: Duration::from_secs(60),
    })
}

/// Runs `services` until `stop` resolves or they finish; returns them.
async fn run_until(
    services: Vec<Service>,
    mut platform: Scripted,
    stop: oneshot::Receiver<()>,
) -> Vec<Service> {
    let (control, mut controls) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        if stop.await.is_ok() {
            let _ = control.send(super::Control::Shutdown);
        }
    });
    let mut services = super::Services {
        list: services,
        ..Default::default()
    };
    drive(&mut services, &mut platform, &mut controls, true)
        .await
        .expect("drive");
    services.list
}

fn is_spawn(e: &Effect) -> bool {
    matches!(e, Effect::Spawn)
}

/// Regression: `--max-rss 64KiB --grace 100ms -- sleep 100`
/// started 11 times, wrote `health_warn` and `restart_scheduled`, and then
/// never started again: the drain's wake-up replaced the backoff's.
#[tokio::test(start_paused = true)]
async fn drains_past_the_clean_budget_restart_after_the_backoff() {
    let mut memory = MemoryPolicy::new(64 << 10);
    memory.grace = Duration::from_millis(100);
    let svc = service(Some(memory), |_| {});
    let (platform, seen, _inject) = Scripted::new(Behaviour {
        charged: 1 << 20,
        over_at_start: true,
        ..Behaviour::default()
    });
    let (stop_tx, stop) = oneshot::channel();
    let task = tokio::task::spawn(run_until(vec![svc], platform, stop));
    tokio::time::sleep(Duration::from_secs(20)).await;
    let _ = stop_tx.send(());
    task.await.unwrap();
    let seen = seen.lock().unwrap();
    let events = seen.events();
    assert!(events.contains(&Event::HealthWarn), "{events:?}");
    let scheduled = seen
        .lines()
        .into_iter()
        .find(|l| l.event == Event::RestartScheduled)
        .expect("restart_scheduled");
    let at = seen
        .when(|e| matches!(e, Effect::Audit(l) if l.event == Event::RestartScheduled))
        .unwrap();
    let spawns_after: Vec<Instant> = seen
        .effects
        .iter()
        .filter(|(t, e)| *t > at && is_spawn(e))
        .map(|(t, _)| *t)
        .collect();
    assert!(
        !spawns_after.is_empty(),
        "no start after the backoff: {events:?}"
    );
    let waited = spawns_after[0] - at;
    assert_eq!(waited.as_millis() as u64, scheduled.restart_in_ms.unwrap());
}

/// Regression: SIGTERM while a decision is deferred, the service
/// ignoring SIGTERM: the tree is SIGKILLed after grace and supervision
/// ends, instead of waiting until the service happened to exit.
#[tokio::test(start_paused = true)]
async fn shutdown_while_deferred_escalates_after_grace() {
    let mut memory = MemoryPolicy::new(100);
    memory.over_for = Some(Duration::from_secs(3));
    memory.grace = Duration::from_secs(6);
    let svc = service(Some(memory), |c| c.shutdown_grace = Duration::from_secs(6));
    let (platform, seen, _inject) = Scripted::new(Behaviour {
        charged: 150,
        over_at_start: true,
        ignores_term: true,
        ..Behaviour::default()
    });
    let (stop_tx, stop) = oneshot::channel();
    let task = tokio::task::spawn(run_until(vec![svc], platform, stop));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let asked = tokio::time::Instant::now().into_std();
    let _ = stop_tx.send(());
    let services = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("supervision ends")
        .unwrap();
    assert_eq!(services[0].outcome(), Some(&Outcome::Stopped));
    let seen = seen.lock().unwrap();
    let killed = seen
        .when(|e| matches!(e, Effect::KillTree { .. }))
        .expect("the tree is killed");
    assert_eq!(killed - asked, Duration::from_secs(6), "after grace");
    let exit = seen
        .lines()
        .into_iter()
        .find(|l| l.event == Event::Exited)
        .unwrap();
    assert_eq!(exit.cause, Some(Cause::Shutdown));
}

/// Regression: a hard limit is acted on at once while a soft
/// decision is deferred (the sensor watches the hard limit meanwhile).
#[tokio::test(start_paused = true)]
async fn hard_limit_is_not_deferred() {
    let mut memory = MemoryPolicy::new(100);
    memory.over_for = Some(Duration::from_secs(10));
    memory.startup_grace = Some(Duration::from_secs(30));
    memory.hard_limit = Some(200);
    let svc = service(Some(memory), |c| {
        c.restart = crate::policy::RestartPolicy::Never
    });
    let (platform, seen, inject) = Scripted::new(Behaviour {
        charged: 150,
        over_at_start: true,
        ..Behaviour::default()
    });
    let (_stop_tx, stop) = oneshot::channel();
    let task = tokio::task::spawn(run_until(vec![svc], platform, stop));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        seen.lock()
            .unwrap()
            .count(|e| matches!(e, Effect::ArmAt { limit: 200, .. }))
            == 1,
        "the hard limit is armed while the soft decision waits"
    );
    let crossed = tokio::time::Instant::now().into_std();
    inject.send(Scripted::crossing(101, 250)).unwrap();
    task.await.unwrap();
    let seen = seen.lock().unwrap();
    let drained = seen
        .when(|e| matches!(e, Effect::Signal { .. }))
        .expect("drained");
    assert_eq!(drained, crossed, "at once");
    let over = seen
        .lines()
        .into_iter()
        .find(|l| l.event == Event::MemoryOverLimit)
        .unwrap();
    assert_eq!(over.reason, Some("hard_limit"));
}

/// Regression: limit 100, over-for 2s, the service at 103, then
/// 97, then 400: it must be heard at 400 (a dip just under the limit made
/// the group wait to fall below the hysteresis level, deaf).
#[tokio::test(start_paused = true)]
async fn a_dip_under_the_limit_rearms() {
    let mut memory = MemoryPolicy::new(100);
    memory.over_for = Some(Duration::from_secs(2));
    let svc = service(Some(memory), |c| {
        c.restart = crate::policy::RestartPolicy::Never
    });
    let (platform, seen, inject) = Scripted::new(Behaviour {
        charged: 103,
        over_at_start: true,
        ..Behaviour::default()
    });
    let (_stop_tx, stop) = oneshot::channel();
    let task = tokio::task::spawn(run_until(vec![svc], platform, stop));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    seen.lock().unwrap().behaviour.charged = 97;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        seen.lock()
            .unwrap()
            .count(|e| matches!(e, Effect::ArmAt { limit: 100, .. })),
        1,
        "re-armed at the limit on learning it is under"
    );
    seen.lock().unwrap().behaviour.charged = 400;
    inject.send(Scripted::crossing(101, 400)).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("drained after the window")
        .unwrap();
    assert!(
        seen.lock()
            .unwrap()
            .events()
            .contains(&Event::MemoryOverLimit)
    );
}

/// Regression: shutdown while a spawn is in flight still drains
/// what was started.
#[tokio::test(start_paused = true)]
async fn shutdown_during_a_spawn_drains_the_run() {
    let svc = service(None, |_| {});
    let (platform, seen, _inject) = Scripted::new(Behaviour {
        spawn_takes: Duration::from_secs(1),
        ..Behaviour::default()
    });
    let (stop_tx, stop) = oneshot::channel();
    let task = tokio::task::spawn(run_until(vec![svc], platform, stop));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("supervision ends")
        .unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.count(|e| matches!(
            e,
            Effect::Signal {
                signal: libc::SIGTERM,
                ..
            }
        )),
        1
    );
    assert_eq!(
        seen.events(),
        [Event::Started, Event::DrainStarted, Event::Exited],
        "started, drained, ended"
    );
}

/// Regression: a marker that cannot be written is `marker_failed`, never
/// `respawn_recommended`; a hook's start, status and duration are recorded.
#[tokio::test(start_paused = true)]
async fn marker_and_hook_outcomes_are_recorded() {
    for (action, marker_fails, want) in [
        (MemoryAction::Marker, true, vec![Event::MarkerFailed]),
        (MemoryAction::Marker, false, vec![Event::RespawnRecommended]),
        (
            MemoryAction::Exec(vec!["/bin/hook".into()]),
            false,
            vec![Event::HookStarted, Event::HookExited],
        ),
    ] {
        let mut memory = MemoryPolicy::new(100);
        memory.action = action.clone();
        let svc = service(Some(memory), |_| {});
        let (platform, seen, _inject) = Scripted::new(Behaviour {
            charged: 150,
            over_at_start: true,
            marker_fails,
            ..Behaviour::default()
        });
        let (stop_tx, stop) = oneshot::channel();
        let task = tokio::task::spawn(run_until(vec![svc], platform, stop));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stop_tx.send(());
        task.await.unwrap();
        let seen = seen.lock().unwrap();
        let events: Vec<Event> = seen
            .events()
            .into_iter()
            .filter(|e| {
                !matches!(
                    e,
                    Event::Started | Event::MemoryOverLimit | Event::DrainStarted | Event::Exited
                )
            })
            .collect();
        assert_eq!(events, want, "{action:?}");
        let lines = seen.lines();
        if marker_fails {
            let failed = lines
                .iter()
                .find(|l| l.event == Event::MarkerFailed)
                .unwrap();
            assert_eq!(failed.error.as_deref(), Some("No space left on device"));
        }
        if let Some(exited) = lines.iter().find(|l| l.event == Event::HookExited) {
            assert_eq!(exited.hook_pid, Some(7));
            assert_eq!(exited.status.as_ref().unwrap().exit_code, Some(3));
            assert!(exited.duration_ms.is_some());
        }
    }
}

/// A marker that cannot be written (a full disk) is tried again, waiting
/// 1 s, 2 s, 4 s..., while the run stays over its limit: written once
/// there is room, said once when it failed; and not tried again once the
/// run is back under its limit.
#[tokio::test(start_paused = true)]
async fn a_marker_that_cannot_be_written_is_tried_again() {
    let mut memory = MemoryPolicy::new(100);
    memory.action = MemoryAction::Marker;
    let svc = service(Some(memory), |_| {});
    let (platform, seen, inject) = Scripted::new(Behaviour {
        charged: 150,
        over_at_start: true,
        marker_fails: true,
        ..Behaviour::default()
    });
    let (stop_tx, stop) = oneshot::channel();
    let task = tokio::task::spawn(run_until(vec![svc], platform, stop));
    let writes = |seen: &Arc<Mutex<Seen>>| {
        seen.lock()
            .unwrap()
            .effects
            .iter()
            .filter(|(_, e)| matches!(e, Effect::WriteMarker { .. }))
            .count()
    };
    // At 0, 1 s and 3 s.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    assert_eq!(writes(&seen), 3);
    seen.lock().unwrap().behaviour.marker_fails = false;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(writes(&seen), 4, "written at 7 s, and not again");
    {
        let seen = seen.lock().unwrap();
        let events: Vec<Event> = seen
            .events()
            .into_iter()
            .filter(|e| matches!(e, Event::MarkerFailed | Event::RespawnRecommended))
            .collect();
        assert_eq!(events, [Event::MarkerFailed, Event::RespawnRecommended]);
    }
    // Back under, over again with the disk full: one try, then none once
    // it is under again.
    inject
        .send(Happening::Sensor(SensorEvent::Rearmed {
            group: GroupId(101),
            charged_bytes: 50,
        }))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    seen.lock().unwrap().behaviour.marker_fails = true;
    inject.send(Scripted::crossing(101, 150)).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = writes(&seen);
    assert_eq!(before, 5, "the new crossing's marker");
    inject
        .send(Happening::Sensor(SensorEvent::Rearmed {
            group: GroupId(101),
            charged_bytes: 50,
        }))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(writes(&seen), before, "tried again while under its limit");
    let _ = stop_tx.send(());
    task.await.unwrap();
}

/// A run found (or started) with pid `pid` as its group.
fn found(pid: u32, foreign: bool) -> Input {
    Input::Spawned(Ok(Spawned {
        pid,
        group: Some(GroupId(pid)),
        foreign,
    }))
}

/// A confirmed crossing of the group of `pid`.
fn over(pid: u32, charged: u64) -> SensorEvent {
    match Scripted::crossing(pid, charged) {
        Happening::Sensor(event) => event,
        _ => unreachable!("a crossing is a sensor event"),
    }
}

/// The exit of `pid`, the root of its group, as the sensor reports it.
fn exit_of(pid: u32, status: ExitStatus) -> SensorEvent {
    SensorEvent::Exit {
        group: Some(GroupId(pid)),
        exit: crate::event::ProcessExit {
            pid,
            ppid: 1,
            comm: "x".into(),
            status,
            peak_rss_bytes: 0,
            monotonic_ns: 0,
            group: pid,
        },
    }
}

fn named(name: &str, tune: impl FnOnce(&mut Config)) -> ServiceConfig {
    let mut cfg = service(None, tune).config().clone();
    cfg.name = name.into();
    cfg
}

/// A stop asked for during start-up (before the loop runs): nothing is
/// started, and the loop ends at once.
#[tokio::test(start_paused = true)]
async fn a_stop_during_start_up_starts_nothing() {
    let (mut platform, seen, _inject) = Scripted::new(Behaviour::default());
    let (control, mut controls) = mpsc::unbounded_channel();
    control.send(Control::Shutdown).unwrap();
    let mut services = Services::new(vec![named("a", |_| {}), named("b", |_| {})]);
    let started = tokio::time::Instant::now();
    drive(&mut services, &mut platform, &mut controls, false)
        .await
        .unwrap();
    assert_eq!(started.elapsed(), Duration::ZERO);
    let seen = seen.lock().unwrap();
    assert!(
        !seen.effects.iter().any(|(_, e)| matches!(e, Effect::Spawn)),
        "{:?}",
        seen.effects
    );
    assert!(services.all().iter().all(Service::finished));
    assert_eq!(seen.events(), [], "nothing ran: nothing to record");
}

/// A sensor that fails is not the end of the services' lives: each is
/// drained (SIGTERM, then its exit) as for a shutdown, none is started
/// again, and the loop then ends with the sensor's error.
#[tokio::test(start_paused = true)]
async fn a_failed_sensor_drains_every_service_then_ends() {
    let (mut platform, seen, inject) = Scripted::new(Behaviour::default());
    let (_control, mut controls) = mpsc::unbounded_channel();
    let mut services = Services::new(vec![named("a", |_| {}), named("b", |_| {})]);
    let failing = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        inject
            .send(Happening::Failed("the ring buffer cannot be read".into()))
            .unwrap();
        inject
    });
    let result = drive(&mut services, &mut platform, &mut controls, false).await;
    let error = result.expect_err("the loop ends with the sensor's error");
    assert!(error.0.contains("ring buffer"), "{}", error.0);
    let _inject = failing.await.unwrap();
    let seen = seen.lock().unwrap();
    let terms = seen
        .effects
        .iter()
        .filter(|(_, e)| matches!(e, Effect::Signal { signal, .. } if *signal == libc::SIGTERM))
        .count();
    assert_eq!(terms, 2, "{:?}", seen.effects);
    let spawns = seen
        .effects
        .iter()
        .filter(|(_, e)| matches!(e, Effect::Spawn))
        .count();
    assert_eq!(
        spawns, 2,
        "started again after the failure: {:?}",
        seen.effects
    );
    assert!(services.all().iter().all(Service::finished));
}

/// A reload drains and restarts only the service whose definition
/// changed; the unchanged one is never signalled.
#[tokio::test(start_paused = true)]
async fn a_reload_restarts_only_what_changed() {
    let (mut platform, seen, _inject) = Scripted::new(Behaviour::default());
    let (control, mut controls) = mpsc::unbounded_channel();
    let configs = vec![named("same", |_| {}), named("changed", |_| {})];
    let mut changed = configs.clone();
    changed[1].policy.max_crashes = 9;
    let task = tokio::spawn(async move {
        let mut services = Services::new(configs);
        drive(&mut services, &mut platform, &mut controls, false)
            .await
            .expect("drive");
        services
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    control
        .send(Control::Reload {
            services: Some(changed.clone()),
            done: None,
        })
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The same configuration again changes nothing.
    control
        .send(Control::Reload {
            services: Some(changed),
            done: None,
        })
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    control.send(Control::Shutdown).unwrap();
    let services = task.await.unwrap();
    let seen = seen.lock().unwrap();
    // pids: same = 101, changed = 102, its new run 103.
    let signalled: Vec<u32> = seen
        .effects
        .iter()
        .filter_map(|(_, e)| match e {
            Effect::Signal { pid, .. } => Some(*pid),
            _ => None,
        })
        .collect();
    assert_eq!(signalled, vec![102, 101, 103], "{:?}", seen.events());
    let reasons: Vec<Option<&str>> = seen
        .lines()
        .iter()
        .filter(|l| l.event == Event::DrainStarted)
        .map(|l| l.reason)
        .collect();
    assert_eq!(
        reasons,
        [Some("reload"), Some("shutdown"), Some("shutdown")]
    );
    assert_eq!(seen.count(is_spawn), 3);
    let current: Vec<&str> = services.current().map(Service::name).collect();
    assert_eq!(current, ["same", "changed"]);
    assert_eq!(
        services
            .current()
            .nth(1)
            .unwrap()
            .config()
            .policy
            .max_crashes,
        9
    );
}

/// A marker is removed once the run has stayed under its limit for
/// `marker-clear-after`, and a new crossing meanwhile keeps it.
#[test]
fn a_marker_is_cleared_after_time_under_the_limit() {
    let mut memory = MemoryPolicy::new(100);
    memory.action = MemoryAction::Marker;
    let mut svc = service(Some(memory), |_| {});
    svc.cfg.marker.as_mut().unwrap().clear_after = Some(Duration::from_secs(10));
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    svc.handle(Input::Start, at(0));
    svc.handle(found(5, false), at(0));
    let cross = |svc: &mut Service, t| {
        let effects = svc.handle(Input::Sensor(over(5, 150)), t);
        for e in &effects {
            if let Effect::WriteMarker { path, .. } = e {
                svc.handle(Input::MarkerWritten(Ok(path.clone())), t);
            }
        }
        effects
    };
    let under = |svc: &mut Service, t| {
        svc.handle(
            Input::Sensor(SensorEvent::Rearmed {
                group: GroupId(5),
                charged_bytes: 50,
            }),
            t,
        )
    };
    assert!(
        cross(&mut svc, at(1))
            .iter()
            .any(|e| matches!(e, Effect::WriteMarker { .. }))
    );
    under(&mut svc, at(2));
    assert_eq!(svc.next_deadline(), Some(at(12)));
    // Over again before the time is up: the marker stays.
    cross(&mut svc, at(5));
    assert_eq!(svc.next_deadline(), None);
    assert!(svc.handle(Input::Timer, at(12)).is_empty());
    under(&mut svc, at(20));
    let effects = svc.handle(Input::Timer, at(30));
    assert!(
        effects.iter().any(|e| matches!(
            e,
            Effect::RemoveMarker {
                reason: "under_limit",
                ..
            }
        )),
        "{effects:?}"
    );
    assert!(!svc.marked());
}

/// A hook that overruns its timeout is killed and recorded as such.
#[test]
fn an_overrunning_hook_is_killed() {
    let mut memory = MemoryPolicy::new(100);
    memory.action = MemoryAction::Exec(vec!["/bin/hook".into()]);
    let mut svc = service(Some(memory), |_| {});
    svc.cfg.hook_timeout = Duration::from_secs(5);
    let t0 = Instant::now();
    svc.handle(Input::Start, t0);
    svc.handle(found(5, false), t0);
    let effects = svc.handle(Input::Sensor(over(5, 150)), t0);
    let env = effects
        .iter()
        .find_map(|e| match e {
            Effect::RunHook { env, .. } => Some(env.clone()),
            _ => None,
        })
        .expect("the hook");
    for key in [
        "WATCHDOG_EVENT",
        "WATCHDOG_NAME",
        "WATCHDOG_PID",
        "WATCHDOG_CHARGED_BYTES",
        "WATCHDOG_LIMIT_BYTES",
        "WATCHDOG_CAUSE",
    ] {
        assert!(env.iter().any(|(k, _)| *k == key), "{key} missing");
    }
    svc.handle(Input::HookStarted(Ok(77)), t0);
    assert_eq!(svc.next_deadline(), Some(t0 + Duration::from_secs(5)));
    let effects = svc.handle(Input::Timer, t0 + Duration::from_secs(5));
    assert!(
        effects.contains(&Effect::KillHook { pid: 77 }),
        "{effects:?}"
    );
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Audit(l) if l.event == Event::HookTimedOut))
    );
    // Killed once, and its exit is still recorded.
    assert_eq!(svc.next_deadline(), None);
    let effects = svc.handle(
        Input::Reaped {
            pid: 77,
            status: ExitStatus::Signal {
                signal: libc::SIGKILL,
                core_dumped: false,
            },
            peak_rss_bytes: 0,
        },
        t0 + Duration::from_secs(5),
    );
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Audit(l) if l.event == Event::HookExited))
    );
}

/// A watch target whose process exits is looked for again at once (never
/// counted as a crash, never given up on), and shutdown stops watching it
/// without a signal.
#[test]
fn a_watch_target_looks_again_and_is_never_signalled_on_shutdown() {
    let mut memory = MemoryPolicy::new(100);
    memory.action = MemoryAction::Marker;
    let mut svc = service(Some(memory), |c| {
        c.watch = true;
        c.max_crashes = u32::MAX;
    });
    svc.cfg.target = Target::Watch(Selector::Match(Pattern(regex::Regex::new("x").unwrap())));
    let t0 = Instant::now();
    for round in 0..10 {
        let effects = svc.handle(
            if round == 0 {
                Input::Start
            } else {
                Input::Timer
            },
            t0,
        );
        if round == 0 {
            assert_eq!(effects, vec![Effect::Spawn]);
        }
        svc.handle(found(5, true), t0);
        let effects = svc.handle(Input::Sensor(exit_of(5, ExitStatus::Code(1))), t0);
        assert!(
            effects.contains(&Effect::Detach {
                group: Some(GroupId(5))
            }),
            "{effects:?}"
        );
        assert!(
            effects.contains(&Effect::Spawn),
            "round {round}: {effects:?}"
        );
        assert!(!effects.iter().any(|e| matches!(e, Effect::EndRun { .. })));
    }
    assert!(!svc.finished());
    assert_eq!(svc.policy.crash_count(), 0);
    svc.handle(found(6, true), t0);
    let effects = svc.handle(Input::Shutdown, t0);
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::Signal { .. } | Effect::KillTree { .. })),
        "{effects:?}"
    );
    assert!(effects.contains(&Effect::Detach {
        group: Some(GroupId(6))
    }));
    assert!(svc.finished());
}

/// A watch of one pid ends when that process exits: a later process with
/// the same number is another, never watched (or signalled) in its place.
#[test]
fn a_pid_watch_ends_with_its_process() {
    let mut memory = MemoryPolicy::new(100);
    memory.action = MemoryAction::Signal;
    let mut svc = service(Some(memory), |c| c.watch = true);
    svc.cfg.target = Target::Watch(Selector::Pid(5));
    let t0 = Instant::now();
    assert_eq!(svc.handle(Input::Start, t0), vec![Effect::Spawn]);
    svc.handle(found(5, true), t0);
    let effects = svc.handle(Input::Sensor(exit_of(5, ExitStatus::Code(0))), t0);
    assert!(!effects.contains(&Effect::Spawn), "{effects:?}");
    assert!(effects.contains(&Effect::Finished(Outcome::Stopped)));
    assert!(svc.finished());
}

/// The daemon keeps trying a service whose first start fails (its program
/// may appear later; a mistake must not silently drop it); `supervise`
/// ends on it, as a mistake on its command line.
#[test]
fn a_failed_first_start_ends_supervise_but_not_the_daemon() {
    let t0 = Instant::now();
    for keep_trying in [false, true] {
        let mut services = Services::new(vec![named("svc", |_| {})]);
        if keep_trying {
            services = services.keep_trying();
        }
        let svc = &mut services.list[0];
        assert_eq!(svc.handle(Input::Start, t0), vec![Effect::Spawn]);
        let effects = svc.handle(Input::Spawned(Err("No such file or directory".into())), t0);
        if keep_trying {
            assert!(!svc.finished(), "{effects:?}");
            let exited = effects
                .iter()
                .find_map(|e| match e {
                    Effect::Audit(l) if l.event == Event::Exited => Some(l.clone()),
                    _ => None,
                })
                .expect("an exited line");
            assert_eq!(exited.cause, Some(Cause::Crash));
            assert_eq!(exited.error.as_deref(), Some("No such file or directory"));
            assert!(svc.next_deadline().is_some(), "no retry scheduled");
        } else {
            assert_eq!(
                svc.outcome(),
                Some(&Outcome::CannotStart("No such file or directory".into()))
            );
        }
    }
}

/// Regression: two reloads changing a service while its old run still
/// drained started the second new run at once, beside the old one (same
/// cgroup, same record): the newest waits for the old run to end.
#[tokio::test(start_paused = true)]
async fn quick_reloads_never_run_two_copies() {
    let (mut platform, seen, _inject) = Scripted::new(Behaviour {
        ignores_term: true,
        ..Behaviour::default()
    });
    let (control, mut controls) = mpsc::unbounded_channel();
    let first = vec![named("svc", |c| c.shutdown_grace = Duration::from_secs(10))];
    let mut second = first.clone();
    second[0].policy.max_crashes = 7;
    let mut third = first.clone();
    third[0].policy.max_crashes = 8;
    let task = tokio::spawn(async move {
        let mut services = Services::new(first);
        drive(&mut services, &mut platform, &mut controls, false)
            .await
            .expect("drive");
        services
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    for configs in [second, third] {
        control
            .send(Control::Reload {
                services: Some(configs),
                done: None,
            })
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The old run is killed 10 s after the first reload; only then does
    // the newest start.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        seen.lock().unwrap().count(is_spawn),
        1,
        "a copy started early"
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    control.send(Control::Shutdown).unwrap();
    let services = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("shutdown")
        .unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.count(is_spawn), 2, "{:?}", seen.events());
    let killed = seen
        .when(|e| matches!(e, Effect::KillTree { pid: 101, .. }))
        .expect("the old run killed after its grace");
    let respawned = seen
        .effects
        .iter()
        .filter(|(_, e)| is_spawn(e))
        .nth(1)
        .map(|(t, _)| *t)
        .unwrap();
    assert!(respawned >= killed);
    assert_eq!(
        services
            .current()
            .next()
            .unwrap()
            .config()
            .policy
            .max_crashes,
        8
    );
}

/// An adoption whose run is gone by the time it is answered starts a run
/// afresh instead of waiting forever.
#[test]
fn a_failed_adoption_starts_afresh() {
    let t0 = Instant::now();
    let mut services = Services::new(vec![named("svc", |_| {})]).keep_trying();
    let index = services.adopt("svc", 42, Duration::from_secs(3)).unwrap();
    let svc = &mut services.list[index];
    assert_eq!(svc.handle(Input::Start, t0), vec![Effect::Adopt]);
    let effects = svc.handle(Input::Spawned(Err("no run to adopt".into())), t0);
    assert_eq!(effects, vec![Effect::Spawn]);
    // An adoption that works takes the run's age.
    let mut services = Services::new(vec![named("svc", |_| {})]);
    services.adopt("svc", 42, Duration::from_secs(3));
    let svc = &mut services.list[0];
    svc.handle(Input::Start, t0);
    let effects = svc.handle(found(42, true), t0 + Duration::from_secs(10));
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Audit(l) if l.event == Event::Adopted))
    );
    assert_eq!(svc.pid(), Some(42));
}

/// A run we did not fork whose exit the sensor never reports (events lost)
/// cannot hold a drain forever: once it is asked to stop, its pid is
/// looked at every second.
#[test]
fn a_missed_exit_of_an_adopted_run_cannot_hold_a_drain() {
    let t0 = Instant::now();
    let mut services = Services::new(vec![named("svc", |c| {
        c.shutdown_grace = Duration::from_secs(2)
    })]);
    services.adopt("svc", 42, Duration::ZERO);
    let svc = &mut services.list[0];
    svc.handle(Input::Start, t0);
    svc.handle(found(42, true), t0);
    assert_eq!(svc.next_deadline(), None);
    let effects = svc.handle(Input::Shutdown, t0);
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Signal { pid: 42, .. }))
    );
    assert_eq!(svc.next_deadline(), Some(t0 + Duration::from_secs(1)));
    let effects = svc.handle(Input::Timer, t0 + Duration::from_secs(1));
    assert_eq!(effects, vec![Effect::CheckGone { pid: 42 }]);
    // Still there: looked at again a second later; the grace still runs.
    assert_eq!(svc.next_deadline(), Some(t0 + Duration::from_secs(2)));
    let effects = svc.handle(
        Input::Reaped {
            pid: 42,
            status: ExitStatus::Unknown,
            peak_rss_bytes: 0,
        },
        t0 + Duration::from_secs(2),
    );
    assert!(
        effects.contains(&Effect::Finished(Outcome::Stopped)),
        "{effects:?}"
    );
    assert_eq!(svc.next_deadline(), None);
}

/// A reload with an unchanged file (as log rotation sends) leaves a
/// service that is over as it is: a one-shot does not run again.
#[tokio::test(start_paused = true)]
async fn an_unchanged_reload_does_not_rerun_what_is_over() {
    let (mut platform, seen, inject) = Scripted::new(Behaviour::default());
    let (control, mut controls) = mpsc::unbounded_channel();
    let configs = vec![named("oneshot", |c| {
        c.restart = crate::policy::RestartPolicy::Never
    })];
    let again = configs.clone();
    let task = tokio::spawn(async move {
        let mut services = Services::new(configs);
        drive(&mut services, &mut platform, &mut controls, false)
            .await
            .expect("drive");
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    inject
        .send(Happening::Reaped {
            pid: 101,
            status: ExitStatus::Code(0),
            peak_rss_bytes: 0,
            cgroup_oom_kill: false,
        })
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    control
        .send(Control::Reload {
            services: Some(again),
            done: None,
        })
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    control.send(Control::Shutdown).unwrap();
    task.await.unwrap();
    assert_eq!(seen.lock().unwrap().count(is_spawn), 1);
}

/// What `watchdog status` and /metrics report follows the service's life:
/// state, uptime, restarts by the cause before them, backoff left, marker.
#[test]
fn status_follows_the_service() {
    use crate::status::State;
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let mut memory = MemoryPolicy::new(1000);
    memory.grace = Duration::from_secs(1);
    let mut svc = service(Some(memory), |c| c.backoff_floor = Duration::from_secs(2));
    let status = |svc: &Service, now| svc.status(now, vec![7, 8]);

    assert_eq!(status(&svc, t0).state, State::Starting);
    svc.handle(Input::Start, t0);
    svc.handle(found(100, false), t0);
    let s = status(&svc, at(1500));
    assert_eq!(
        (s.state, s.pid, s.uptime_ms, s.processes),
        (State::Running, Some(100), Some(1500), 2)
    );
    assert_eq!((s.limit_bytes, s.charged_bytes), (Some(1000), None));
    assert!(s.restarts.is_empty());

    // Over the limit: drained; the exit on the drain signal restarts it.
    svc.handle(Input::Sensor(over(100, 2000)), at(2000));
    assert_eq!(status(&svc, at(2100)).state, State::Draining);
    let reaped = |pid, signal| Input::Reaped {
        pid,
        status: ExitStatus::Signal {
            signal,
            core_dumped: false,
        },
        peak_rss_bytes: 0,
    };
    let effects = svc.handle(reaped(100, libc::SIGTERM), at(2200));
    assert!(effects.iter().any(is_spawn), "{effects:?}");
    let s = status(&svc, at(2200));
    assert_eq!(s.state, State::Starting);
    assert_eq!(s.restarts.get("memory_drain"), Some(&1));
    assert_eq!(s.last_exit_cause.as_deref(), Some("memory_drain"));
    svc.handle(found(101, false), at(2300));
    assert_eq!(status(&svc, at(2400)).uptime_ms, Some(100));

    // A crash: backing off, with the time left.
    let effects = svc.handle(reaped(101, libc::SIGSEGV), at(2500));
    assert!(!effects.iter().any(is_spawn), "{effects:?}");
    let s = status(&svc, at(2500));
    assert_eq!(s.state, State::Backoff);
    assert_eq!(s.crash_count, 1);
    let left = s.backoff_ms.expect("backoff left");
    assert!(left > 0 && left <= 4000, "{left}");
    let until = svc.next_deadline().expect("deadline");
    svc.handle(Input::Timer, until);
    let s = status(&svc, until);
    assert_eq!(s.restarts.get("crash"), Some(&1));
    assert_eq!(s.restarts.values().sum::<u64>(), 2);
    assert_eq!(s.state, State::Starting);

    // Stopped on request.
    svc.handle(found(102, false), until);
    svc.handle(Input::Shutdown, until);
    svc.handle(reaped(102, libc::SIGTERM), until);
    let s = status(&svc, until);
    assert_eq!((s.state, s.pid), (State::Stopped, None));
}

/// A reload that changes a service keeps its restart counts (a counter in
/// /metrics never goes back).
#[tokio::test(start_paused = true)]
async fn a_changed_service_keeps_its_restart_counts() {
    let (mut platform, _seen, _inject) = Scripted::new(Behaviour::default());
    let mut services = Services::new(vec![named("a", |_| {})]);
    services.list[0].restarts.insert("crash", 3);
    let (control, mut controls) = mpsc::unbounded_channel();
    let changed = named("a", |c| c.max_crashes = 9);
    control
        .send(Control::Reload {
            services: Some(vec![changed]),
            done: None,
        })
        .unwrap();
    control.send(Control::Shutdown).unwrap();
    drive(&mut services, &mut platform, &mut controls, false)
        .await
        .unwrap();
    let current: Vec<_> = services
        .current()
        .map(|s| s.status(Instant::now(), vec![]))
        .collect();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0].restarts.get("crash"), Some(&3));
}

/// What status reports after reloads (asked of the running loop): a
/// removed service until it has drained, then not at all; a changed one as
/// its draining predecessor until the new one starts; names in the order
/// they first appeared.
#[tokio::test(start_paused = true)]
async fn status_lists_what_the_configuration_runs() {
    use crate::status::State::{Draining, Running};
    let (mut platform, _seen, inject) = Scripted::new(Behaviour {
        ignores_term: true,
        ..Behaviour::default()
    });
    let grace = |c: &mut Config| c.shutdown_grace = Duration::from_secs(5);
    let mut services = Services::new(vec![named("a", grace), named("b", grace)]);
    let (control, mut controls) = mpsc::unbounded_channel();
    tokio::spawn(async move { drive(&mut services, &mut platform, &mut controls, false).await });
    let ask = || async {
        let (tx, rx) = oneshot::channel();
        inject.send(Happening::Snapshot(tx)).unwrap();
        let snapshot = rx.await.unwrap();
        snapshot
            .services
            .into_iter()
            .map(|s| (s.name, s.state))
            .collect::<Vec<_>>()
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(ask().await, [("a".into(), Running), ("b".into(), Running)]);
    // b removed, a changed: both drain (they ignore SIGTERM for 5 s).
    control
        .send(Control::Reload {
            services: Some(vec![named("a", |c| {
                grace(c);
                c.max_crashes = 9;
            })]),
            done: None,
        })
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        ask().await,
        [("a".into(), Draining), ("b".into(), Draining)]
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(ask().await, [("a".into(), Running)]);
}
