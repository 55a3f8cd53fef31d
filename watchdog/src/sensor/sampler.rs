//! The sampling sensor: exact readings at an interval that shortens as a
//! group nears its limit, and exits from pidfds / kqueue. Used where the
//! kernel programs cannot be (no privilege, macOS), or when asked for.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::{Duration, Instant},
};

use super::{
    Crossing, Edge, GroupId, Limits, SensorError, SensorEvent, SensorStats, Source, Trigger,
    exits::ExitWatcher, now_ns,
};
use crate::{
    event::ProcessExit,
    mem::{self, GroupReading},
    procs,
};

#[cfg(target_os = "linux")]
pub const SOURCE: Source = Source::Procfs;
#[cfg(not(target_os = "linux"))]
pub const SOURCE: Source = Source::Macos;

/// How often to sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SamplingOptions {
    /// The interval while a group is far (under half) from its limit.
    pub interval: Duration,
    /// The shortest interval, reached as a group nears its limit.
    pub min_interval: Duration,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            min_interval: Duration::from_millis(50),
        }
    }
}

impl SamplingOptions {
    /// The interval for a group at `charged` of `limit`: `interval` up to
    /// half the limit, then shrinking linearly to `min_interval` at it.
    pub fn interval_for(&self, charged: u64, limit: u64) -> Duration {
        let min = self.min_interval.min(self.interval);
        if limit == 0 {
            return self.interval;
        }
        let ratio = charged as f64 / limit as f64;
        if ratio <= 0.5 {
            self.interval
        } else if ratio >= 1.0 {
            min
        } else {
            let span = (self.interval - min).as_secs_f64();
            min + Duration::from_secs_f64(span * (1.0 - ratio) / 0.5)
        }
    }
}

struct Group {
    roots: Vec<u32>,
    members: HashSet<u32>,
    limits: Limits,
    trigger: Trigger,
    due: Instant,
    charged: u64,
    step_base: u64,
}

/// What is remembered of a member for its exit report.
struct MemberInfo {
    group: GroupId,
    ppid: u32,
    comm: String,
    peak_rss: u64,
}

pub struct Sampler {
    options: SamplingOptions,
    groups: HashMap<GroupId, Group>,
    members: HashMap<u32, MemberInfo>,
    exits: ExitWatcher,
    queue: VecDeque<SensorEvent>,
    next_id: u32,
    stats: SensorStats,
}

impl Sampler {
    pub fn new(options: SamplingOptions) -> Self {
        Self {
            options,
            groups: HashMap::new(),
            members: HashMap::new(),
            exits: ExitWatcher::new(),
            queue: VecDeque::new(),
            next_id: 1,
            stats: SensorStats::default(),
        }
    }

    pub fn watch_tree(&mut self, root: u32, limits: Limits) -> Result<GroupId, SensorError> {
        if !procs::exists(root) {
            return Err(SensorError::NoProcess(root));
        }
        let id = GroupId(self.next_id);
        self.next_id += 1;
        self.groups.insert(
            id,
            Group {
                roots: vec![root],
                members: HashSet::new(),
                limits,
                trigger: Trigger::Armed,
                due: Instant::now(),
                charged: 0,
                step_base: 0,
            },
        );
        // The first sample now: members known, exits watched, and a group
        // that is already over reports so at once.
        self.sample(id, Instant::now())?;
        Ok(id)
    }

    pub fn rearm(&mut self, group: GroupId) -> Result<(), SensorError> {
        let g = self
            .groups
            .get_mut(&group)
            .ok_or(SensorError::UnknownGroup(group))?;
        g.trigger = Trigger::after_crossing(g.charged, &g.limits);
        Ok(())
    }

    pub fn arm_at(&mut self, group: GroupId, limit_bytes: u64) -> Result<(), SensorError> {
        let g = self
            .groups
            .get_mut(&group)
            .ok_or(SensorError::UnknownGroup(group))?;
        g.limits = g.limits.at(limit_bytes);
        g.trigger = Trigger::Armed;
        // Sample now: a group already over is reported at once.
        self.sample(group, Instant::now())
    }

    pub fn read(&self, group: GroupId) -> Result<GroupReading, SensorError> {
        let g = self
            .groups
            .get(&group)
            .ok_or(SensorError::UnknownGroup(group))?;
        let pids: Vec<u32> = g.members.iter().copied().collect();
        Ok(mem::read_tree(&pids))
    }

    pub fn remove_group(&mut self, group: GroupId) {
        if let Some(g) = self.groups.remove(&group) {
            for pid in g.members {
                self.exits.unwatch(pid);
                self.members.remove(&pid);
            }
        }
    }

    pub fn members(&self, group: GroupId) -> Vec<u32> {
        self.groups
            .get(&group)
            .map(|g| g.members.iter().copied().collect())
            .unwrap_or_default()
    }

    pub fn stats(&self) -> SensorStats {
        self.stats
    }

    pub async fn next(&mut self) -> Result<SensorEvent, SensorError> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Ok(event);
            }
            let due = self.groups.values().map(|g| g.due).min();
            let sleep = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                (pid, status) = self.exits.next() => {
                    if let Some(event) = self.exited(pid, status) {
                        return Ok(event);
                    }
                }
                () = sleep => {
                    let now = Instant::now();
                    let due: Vec<GroupId> = self
                        .groups
                        .iter()
                        .filter(|(_, g)| g.due <= now)
                        .map(|(&id, _)| id)
                        .collect();
                    for id in due {
                        self.sample(id, now)?;
                    }
                }
            }
        }
    }

    fn exited(&mut self, pid: u32, status: crate::exit::ExitStatus) -> Option<SensorEvent> {
        let info = self.members.remove(&pid)?;
        if let Some(g) = self.groups.get_mut(&info.group) {
            g.members.remove(&pid);
            g.roots.retain(|&r| r != pid);
        }
        Some(SensorEvent::Exit {
            group: Some(info.group),
            exit: ProcessExit {
                pid,
                ppid: info.ppid,
                comm: info.comm,
                status,
                peak_rss_bytes: info.peak_rss,
                monotonic_ns: now_ns(),
                group: info.group.0,
            },
        })
    }

    /// Reads a group: its members now (roots and their descendants), their
    /// exact total, and what that means for its trigger.
    fn sample(&mut self, id: GroupId, now: Instant) -> Result<(), SensorError> {
        let Some(g) = self.groups.get_mut(&id) else {
            return Ok(());
        };
        // Members stay members until their exit is reported, even when
        // reparented after their parent died (as with the kernel programs);
        // their new children join too. One that is gone but not yet
        // reported simply reads as nothing.
        let mut current: HashMap<u32, u32> = HashMap::new();
        for &pid in &g.members {
            if let Some(info) = self.members.get(&pid) {
                current.insert(pid, info.ppid);
            }
        }
        for &root in &g.roots {
            current
                .entry(root)
                .or_insert_with(|| procs::ppid(root).unwrap_or(0));
        }
        let mut stack: Vec<u32> = current.keys().copied().collect();
        while let Some(pid) = stack.pop() {
            let kids = procs::children(pid)
                .unwrap_or_else(|| procs::descendants(pid).into_iter().collect());
            for child in kids {
                if let std::collections::hash_map::Entry::Vacant(slot) = current.entry(child) {
                    slot.insert(pid);
                    stack.push(child);
                }
            }
        }
        for (&pid, &ppid) in &current {
            if g.members.insert(pid) {
                self.members.insert(
                    pid,
                    MemberInfo {
                        group: id,
                        ppid,
                        comm: procs::name(pid).unwrap_or_default(),
                        peak_rss: 0,
                    },
                );
                self.exits.watch(pid)?;
            }
        }
        let pids: Vec<u32> = current.keys().copied().collect();
        let reading = mem::read_tree_against(&pids, g.limits.limit);
        for r in &reading.members {
            if let Some(info) = self.members.get_mut(&r.pid) {
                info.peak_rss = info.peak_rss.max(r.vm_rss_bytes.unwrap_or(r.charged_bytes));
            }
        }
        self.stats.samples += 1;
        let charged = reading.charged_bytes;
        g.charged = charged;
        let limits = g.limits;
        match g.trigger.observe(charged, &limits) {
            Some(Edge::Fired) => {
                let at = now_ns();
                self.queue.push_back(SensorEvent::OverLimit(Crossing {
                    group: id,
                    pid: None,
                    charged_bytes: charged,
                    limit_bytes: limits.limit,
                    sensed_ns: at,
                    confirmed_ns: at,
                    members: reading.members.len(),
                    metric: reading.metric.unwrap_or(mem::Charged::AnonShmem),
                }));
            }
            Some(Edge::Rearmed) => {
                self.queue.push_back(SensorEvent::Rearmed {
                    group: id,
                    charged_bytes: charged,
                });
            }
            None => {}
        }
        if limits.step > 0 && charged.abs_diff(g.step_base) >= limits.step {
            g.step_base = charged;
            self.queue.push_back(SensorEvent::Changed {
                group: id,
                charged_bytes: charged,
            });
        }
        g.due = now + self.options.interval_for(charged, limits.limit);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `arm_at` under what a group already has reports it at once, with
    /// the new limit and the measure that confirmed it; `read` reads it by
    /// the same measure.
    #[tokio::test]
    async fn arming_under_the_current_total_reports_at_once() {
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let mut sampler = Sampler::new(SamplingOptions::default());
        let group = sampler
            .watch_tree(child.id(), Limits::new(1 << 40))
            .unwrap();
        let reading = sampler.read(group).unwrap();
        assert!(reading.charged_bytes > 0, "{reading:?}");
        #[cfg(target_os = "linux")]
        assert_eq!(reading.metric, Some(mem::Charged::AnonShmem));
        sampler.arm_at(group, 4096).unwrap();
        let event = tokio::time::timeout(Duration::from_secs(1), sampler.next())
            .await
            .expect("an event at once")
            .unwrap();
        let _ = child.kill();
        let _ = child.wait();
        let SensorEvent::OverLimit(c) = event else {
            panic!("{event:?}");
        };
        assert_eq!((c.group, c.limit_bytes), (group, 4096));
        assert_eq!(c.metric, reading.metric.unwrap());
        assert!(sampler.arm_at(GroupId(999), 1).is_err(), "unknown group");
    }

    #[test]
    fn interval_shrinks_near_the_limit() {
        let o = SamplingOptions {
            interval: Duration::from_secs(1),
            min_interval: Duration::from_millis(100),
        };
        assert_eq!(o.interval_for(0, 1000), Duration::from_secs(1));
        assert_eq!(o.interval_for(500, 1000), Duration::from_secs(1));
        assert_eq!(o.interval_for(1000, 1000), Duration::from_millis(100));
        assert_eq!(o.interval_for(5000, 1000), Duration::from_millis(100));
        let mid = o.interval_for(750, 1000);
        assert!((540..=560).contains(&mid.as_millis()), "{mid:?}");
        assert_eq!(
            o.interval_for(999_999, 0),
            Duration::from_secs(1),
            "no limit"
        );
        let inverted = SamplingOptions {
            interval: Duration::from_millis(10),
            min_interval: Duration::from_secs(1),
        };
        assert_eq!(inverted.interval_for(1000, 1000), Duration::from_millis(10));
    }
}
