//! The kernel-program sensor: crossings are sensed in the kernel on the
//! page fault that makes them, and confirmed here with exact readings.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::{Duration, Instant},
};

use super::{Crossing, GroupId, Limits, SensorError, SensorEvent, SensorStats, Trigger, now_ns};
use crate::{
    kernel::{Charge, KernelEvent, Losses, ProbeOptions, Probes},
    mem::{self, GroupReading},
};

/// The first re-reading of a kernel crossing that exact readings did not
/// confirm; each further one waits twice as long, up to [`RECHECK_MAX`],
/// for as long as the kernel's total stays over the limit.
const RECHECK_FIRST: Duration = Duration::from_millis(10);
const RECHECK_MAX: Duration = Duration::from_millis(1280);

/// The loss counters are read after the ring buffer drains, at most this
/// often.
const LOSS_CHECK: Duration = Duration::from_secs(1);
/// How often the loss counters are read when no event prompts it.
const LOSS_POLL: Duration = Duration::from_secs(5);

/// How often a group whose processes share pages copy-on-write is read
/// exactly. A forked child is charged by the kernel programs only its
/// growth since fork, and its counters do not move when it writes to a
/// page it shares with its parent: the private copy replaces the shared
/// page in its count (wp_page_copy, mm/memory.c). Such a tree can grow
/// unseen by the running total, so it is also read, this often, by the
/// measure that counts each page once, for as long as it has such members.
const SHARED_CHECK: Duration = Duration::from_secs(1);

/// The first exact reading of a group whose kernel total came within the
/// counters' lag of its limit; each further one waits twice as long, up to
/// [`RECHECK_MAX`], for as long as it stays that close. The kernel's
/// counters can be behind the truth (see `Probes::lag_per_process`): a
/// process that stops just past its limit may never move them past it, so
/// the kernel fires first at the limit less that lag, and from then on at
/// the limit itself while such a group is also read from here.
const NEAR_FIRST: Duration = Duration::from_millis(100);

struct Group {
    limits: Limits,
    members: HashSet<u32>,
    /// Polled because it is within the counters' lag of its limit.
    near: Option<Poll>,
    /// The member count the kernel's lowered limit was computed for.
    lag_members: usize,
    /// When a crossing was last reported from an exact reading here: a
    /// kernel crossing from before then (it fired as that reading was
    /// made) is the same one.
    reported_ns: u64,
    recheck: Option<Recheck>,
    /// When to read the group exactly next, while its members share pages.
    shared_check: Option<Instant>,
    /// Re-armed after a crossing while its members share pages: the
    /// kernel's running total undercounts such a group, so it is left
    /// disarmed there, and re-armed from here once an exact reading is
    /// below the re-arm level.
    wait_below: bool,
}

/// What the sensor wakes up for besides kernel events.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Wake {
    Recheck(GroupId),
    Near(GroupId),
    SharedCheck(GroupId),
    Losses,
}

/// The next of a series of exact readings that back off.
#[derive(Clone, Copy)]
struct Poll {
    at: Instant,
    /// The wait before `at`: the next one is twice as long.
    backoff: Duration,
}

impl Poll {
    fn first() -> Self {
        Self {
            at: Instant::now() + NEAR_FIRST,
            backoff: NEAR_FIRST,
        }
    }

    fn next(self) -> Self {
        let backoff = (self.backoff * 2).min(RECHECK_MAX);
        Self {
            at: Instant::now() + backoff,
            backoff,
        }
    }
}

/// The level at which the kernel fires for a group that is not yet near
/// its limit: the limit less what the counters may hide. 0 when that lag
/// is the whole limit (the group is then always read from here too).
fn far_limit(limit: u64, lag: u64) -> u64 {
    limit.saturating_sub(lag)
}

/// What the kernel programs are given for a group: its own limits while
/// it is near them, else the same lowered to `far` (a re-arm level above
/// it comes down with it).
fn kernel_limits(limits: Limits, far: Option<u64>) -> Limits {
    match far {
        Some(far) if far > 0 && far < limits.limit => {
            let rearm = limits.rearm_below().min(far);
            Limits {
                limit: far,
                hysteresis: far - rearm,
                step: limits.step,
            }
        }
        _ => limits,
    }
}

/// A kernel crossing that exact readings did not confirm yet.
#[derive(Clone, Copy)]
struct Recheck {
    at: Instant,
    /// The wait before `at`: the next one is twice as long.
    backoff: Duration,
    /// The kernel's timestamp of the crossing.
    sensed_ns: u64,
}

pub struct EbpfSensor {
    probes: Probes,
    groups: HashMap<GroupId, Group>,
    /// Events found outside [`Self::next`] (by `arm_at`, or resynchronising).
    queue: VecDeque<SensorEvent>,
    stats: SensorStats,
    /// The loss counters as last reported.
    losses: Losses,
    last_loss_check: Instant,
    /// A check the rate limit deferred.
    loss_check_due: Option<Instant>,
}

impl EbpfSensor {
    pub fn open() -> Result<Self, SensorError> {
        let probes = Probes::load(ProbeOptions::default())?;
        let losses = probes.losses();
        Ok(Self {
            probes,
            groups: HashMap::new(),
            queue: VecDeque::new(),
            stats: SensorStats::default(),
            losses,
            last_loss_check: Instant::now(),
            loss_check_due: None,
        })
    }

    pub fn forms(&self) -> &crate::kernel::Forms {
        self.probes.forms()
    }

    pub fn watch_tree(&mut self, root: u32, limits: Limits) -> Result<GroupId, SensorError> {
        if !crate::procs::exists(root) {
            return Err(SensorError::NoProcess(root));
        }
        // Read the tree first: the group starts from the sum of what its
        // members have now, each member from its own reading (its share of
        // pages it shares with the others, when there are others).
        let pids: Vec<u32> = std::iter::once(root)
            .chain(crate::procs::descendants(root))
            .collect();
        let read = if pids.len() > 1 {
            Charge::shared
        } else {
            Charge::of
        };
        let mut start: HashMap<u32, Charge> = pids.iter().map(|&pid| (pid, read(pid))).collect();
        let initial: u64 = start.values().map(|c| c.total()).sum();
        let lag = self.probes.lag_per_process() * pids.len() as u64;
        let far = far_limit(limits.limit, lag);
        let near = limits.limit > 0 && initial >= far;
        let id = self
            .probes
            .create_group(kernel_limits(limits, (!near).then_some(far)), initial)?;
        let members = match self.probes.watch_tree(root, Some(id), |pid| {
            start.remove(&pid).unwrap_or_else(|| Charge::shared(pid))
        }) {
            Ok(members) => members,
            Err(err) => {
                self.probes.remove_group(id);
                return Err(err.into());
            }
        };
        let shared_check = (members.len() > 1).then(|| Instant::now() + SHARED_CHECK);
        self.groups.insert(
            id,
            Group {
                limits,
                near: near.then(Poll::first),
                lag_members: pids.len(),
                reported_ns: 0,
                members,
                recheck: None,
                shared_check,
                wait_below: false,
            },
        );
        if limits.limit > 0 && initial >= limits.limit {
            // Already over: the kernel started it disarmed; confirm now.
            self.schedule_recheck(id, now_ns());
        }
        Ok(id)
    }

    pub fn rearm(&mut self, group: GroupId) -> Result<(), SensorError> {
        let g = self
            .groups
            .get_mut(&group)
            .ok_or(SensorError::UnknownGroup(group))?;
        g.recheck = None;
        let lag = self.probes.lag_per_process() * g.members.len().max(1) as u64;
        if g.limits.limit == 0 || (g.shared_check.is_none() && g.limits.hysteresis >= lag) {
            // A re-arm level at least the counters' lag under the limit:
            // the kernel's total cannot fall under it while the group is
            // still over its limit, so the kernel waits for the fall
            // itself, and re-arms as soon as it comes.
            self.probes.rearm(group, &g.limits)?;
            return Ok(());
        }
        if g.shared_check.is_none() && g.near.is_none() {
            // A narrower band: the kernel's lagging total could be under
            // the re-arm level already, and re-arm a group still over its
            // limit. It waits here instead, on exact readings.
            self.set_near(group, true)?;
        }
        let Some(g) = self.groups.get_mut(&group) else {
            return Ok(());
        };
        let charged = read_members(&g.members).charged_bytes;
        g.wait_below = Trigger::after_crossing(charged, &g.limits) == Trigger::WaitBelow;
        let trigger = if g.wait_below {
            Trigger::Disarmed
        } else {
            Trigger::Armed
        };
        self.probes.set_trigger(group, trigger)?;
        Ok(())
    }

    pub fn arm_at(&mut self, group: GroupId, limit_bytes: u64) -> Result<(), SensorError> {
        let lag = self.probes.lag_per_process();
        let g = self
            .groups
            .get_mut(&group)
            .ok_or(SensorError::UnknownGroup(group))?;
        g.limits = g.limits.at(limit_bytes);
        g.recheck = None;
        g.wait_below = false;
        // Disarmed while the limit changes, so that the programs do not
        // fire against a half-written one.
        self.probes.set_trigger(group, Trigger::Disarmed)?;
        let reading = read_against(&g.members, g.limits.limit);
        let far = far_limit(g.limits.limit, lag * g.members.len().max(1) as u64);
        let near = g.limits.limit > 0 && reading.charged_bytes >= far;
        g.near = near.then(Poll::first);
        g.lag_members = g.members.len();
        self.probes
            .set_limits(group, kernel_limits(g.limits, (!near).then_some(far)))?;
        // The kernel fires on an update, and a group that is already over
        // may not grow again: look now.
        if g.limits.limit > 0 && reading.charged_bytes >= g.limits.limit {
            let event = crossing(group, g, None, now_ns(), &reading);
            g.reported_ns = now_ns();
            self.queue.push_back(event);
        } else {
            self.probes.set_trigger(group, Trigger::Armed)?;
        }
        Ok(())
    }

    /// Starts or stops reading a group from here because it is within the
    /// counters' lag of its limit, and gives the kernel the limit that goes
    /// with it: its own while near, else the lowered one. A group whose
    /// lowered limit would be nothing stays near.
    fn set_near(&mut self, group: GroupId, near: bool) -> Result<(), SensorError> {
        let lag = self.probes.lag_per_process();
        let Some(g) = self.groups.get_mut(&group) else {
            return Ok(());
        };
        let far = far_limit(g.limits.limit, lag * g.members.len().max(1) as u64);
        let total = u64::try_from(self.probes.group_total(group)).unwrap_or(0);
        // Without a limit there is nothing to be near; with one, a group
        // whose kernel total is past the lowered limit is near already.
        let near = g.limits.limit > 0 && (near || far == 0 || total >= far);
        g.lag_members = g.members.len();
        match (near, g.near) {
            (true, Some(_)) => {}
            (true, None) => g.near = Some(Poll::first()),
            (false, _) => g.near = None,
        }
        self.probes
            .set_limits(group, kernel_limits(g.limits, (!near).then_some(far)))?;
        Ok(())
    }

    /// After the kernel fired at a group's lowered limit and an exact
    /// reading found it under its own: near from now on, the kernel armed
    /// at the limit itself. Unless its total went past that meanwhile (a
    /// process faulting fast covers the lag in well under a millisecond):
    /// then it is read again at once, and reported if over, or rechecked
    /// as a crossing the exact readings do not confirm.
    fn became_near(
        &mut self,
        group: GroupId,
        pid: u32,
        sensed_ns: u64,
    ) -> Result<Option<SensorEvent>, SensorError> {
        self.set_near(group, true)?;
        let limit = self.groups.get(&group).map_or(0, |g| g.limits.limit);
        if self.probes.group_total(group) < i64::try_from(limit).unwrap_or(i64::MAX) {
            // A crossing between that read and this is seen by the next
            // update, or by the first near check.
            self.probes.set_trigger(group, Trigger::Armed)?;
            return Ok(None);
        }
        if let Some(event) = self.confirm(group, Some(pid), sensed_ns) {
            return Ok(Some(event));
        }
        self.stats.unconfirmed_crossings += 1;
        self.schedule_recheck(group, sensed_ns);
        Ok(None)
    }

    /// Reads a group that is near its limit: the crossing its counters
    /// may not show yet, or back to the kernel alone once both the exact
    /// reading and the kernel's total are under the lowered limit.
    fn near_check(&mut self, group: GroupId) -> Result<Option<SensorEvent>, SensorError> {
        let lag = self.probes.lag_per_process();
        let Some(g) = self.groups.get_mut(&group) else {
            return Ok(None);
        };
        let Some(poll) = g.near else {
            return Ok(None);
        };
        self.stats.near_checks += 1;
        g.near = Some(poll.next());
        let limit = g.limits.limit;
        let reading = read_against(&g.members, limit);
        if g.wait_below && reading.charged_bytes < g.limits.rearm_below() {
            g.wait_below = false;
            self.probes.set_trigger(group, Trigger::Armed)?;
            return Ok(Some(SensorEvent::Rearmed {
                group,
                charged_bytes: reading.charged_bytes,
            }));
        }
        if limit > 0
            && reading.charged_bytes >= limit
            && g.recheck.is_none()
            && !g.wait_below
            && self.probes.trigger(group) == Some(Trigger::Armed)
        {
            self.probes.set_trigger(group, Trigger::Disarmed)?;
            let event = crossing(group, g, None, now_ns(), &reading);
            g.reported_ns = now_ns();
            return Ok(Some(event));
        }
        let far = far_limit(limit, lag * g.members.len().max(1) as u64);
        let total = u64::try_from(self.probes.group_total(group)).unwrap_or(0);
        if far > 0 && reading.charged_bytes < far && total < far {
            if g.shared_check.is_none() && std::mem::take(&mut g.wait_below) {
                // Under the lowered limit but not yet its re-arm level:
                // the kernel takes over the wait.
                self.probes.set_trigger(group, Trigger::WaitBelow)?;
            }
            self.set_near(group, false)?;
        }
        Ok(None)
    }

    pub fn read(&self, group: GroupId) -> Result<GroupReading, SensorError> {
        let g = self
            .groups
            .get(&group)
            .ok_or(SensorError::UnknownGroup(group))?;
        Ok(read_members(&g.members))
    }

    pub fn remove_group(&mut self, group: GroupId) {
        if let Some(g) = self.groups.remove(&group) {
            for pid in g.members {
                self.probes.unwatch(pid, Some(group));
            }
            self.probes.remove_group(group);
        }
        self.queue.retain(|e| e.group() != Some(group));
    }

    pub fn members(&self, group: GroupId) -> Vec<u32> {
        self.groups
            .get(&group)
            .map(|g| g.members.iter().copied().collect())
            .unwrap_or_default()
    }

    pub fn stats(&self) -> SensorStats {
        SensorStats {
            lost_events: self.probes.losses().ringbuf_full,
            ..self.stats
        }
    }

    fn schedule_recheck(&mut self, group: GroupId, sensed_ns: u64) {
        if let Some(g) = self.groups.get_mut(&group) {
            g.recheck = Some(Recheck {
                at: Instant::now() + RECHECK_FIRST,
                backoff: RECHECK_FIRST,
                sensed_ns,
            });
        }
    }

    pub async fn next(&mut self) -> Result<SensorEvent, SensorError> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Ok(event);
            }
            if let Some(event) = self.probes.try_next() {
                if let Some(event) = self.handle(event)? {
                    return Ok(event);
                }
                continue;
            }
            if self.probes.take_drained() {
                // All that was written before is read: a loss counter that
                // grew tells of losses among it.
                self.loss_check_soon();
                if !self.queue.is_empty() {
                    continue;
                }
            }
            let wake = self
                .groups
                .iter()
                .flat_map(|(&id, g)| {
                    let recheck = g.recheck.map(|r| (r.at, Wake::Recheck(id)));
                    let near = g.near.map(|p| (p.at, Wake::Near(id)));
                    let shared = g.shared_check.map(|at| (at, Wake::SharedCheck(id)));
                    recheck.into_iter().chain(near).chain(shared)
                })
                // Failures inside the programs may come with no event at
                // all: the counters are also looked at now and then.
                .chain(std::iter::once((
                    self.loss_check_due
                        .unwrap_or(self.last_loss_check + LOSS_POLL),
                    Wake::Losses,
                )))
                .min();
            let event = match wake {
                Some((at, what)) => {
                    tokio::select! {
                        event = self.probes.next() => event?,
                        () = tokio::time::sleep_until(at.into()) => {
                            let event = match what {
                                Wake::Recheck(id) => self.recheck(id)?,
                                Wake::Near(id) => self.near_check(id)?,
                                Wake::SharedCheck(id) => self.shared_check(id)?,
                                Wake::Losses => {
                                    self.check_losses()?;
                                    None
                                }
                            };
                            if let Some(event) = event {
                                return Ok(event);
                            }
                            continue;
                        }
                    }
                }
                None => self.probes.next().await?,
            };
            if let Some(event) = self.handle(event)? {
                return Ok(event);
            }
        }
    }

    /// Checks the loss counters now, or when the rate limit allows.
    fn loss_check_soon(&mut self) {
        let allowed = self.last_loss_check + LOSS_CHECK;
        if Instant::now() >= allowed {
            if let Err(err) = self.check_losses() {
                tracing::warn!(error = %err, "failed to resynchronise after kernel losses");
            }
        } else {
            self.loss_check_due.get_or_insert(allowed);
        }
    }

    /// Reports counters that grew, then resynchronises the groups.
    fn check_losses(&mut self) -> Result<(), SensorError> {
        self.last_loss_check = Instant::now();
        self.loss_check_due = None;
        let now = self.probes.losses();
        if now == self.losses {
            return Ok(());
        }
        for ((counter, total), (_, seen)) in now.named().into_iter().zip(self.losses.named()) {
            if total > seen {
                tracing::warn!(
                    counter,
                    count = total - seen,
                    total,
                    "the kernel programs lost events; resynchronising from /proc"
                );
                self.queue.push_back(SensorEvent::Lost {
                    counter,
                    count: total - seen,
                    total,
                });
            }
        }
        self.losses = now;
        self.resync()
    }

    /// Brings every group back in line with /proc after losses: members
    /// that are gone (their exit may be lost) leave, descendants the
    /// kernel could not track are watched, the kernel's totals are
    /// recomputed from the watch table, and each trigger is judged again
    /// by an exact reading, so that no crossing or re-arm stays lost.
    fn resync(&mut self) -> Result<(), SensorError> {
        self.stats.resyncs += 1;
        let ids: Vec<GroupId> = self.groups.keys().copied().collect();
        for id in ids {
            let Some(g) = self.groups.get_mut(&id) else {
                continue;
            };
            // ENOENT: exited; its exit event was lost or is still queued.
            g.members.retain(|&pid| crate::procs::exists(pid));
            let roots: Vec<u32> = g.members.iter().copied().collect();
            self.probes
                .watch_descendants(&roots, Some(id), &mut g.members, Charge::shared)?;
            let total = self.probes.charged_in_table(id, g.members.iter().copied());
            self.probes.set_group_total(id, total)?;
            let limits = g.limits;
            let reading = read_against(&g.members, limits.limit);
            match self.probes.trigger(id) {
                Some(Trigger::Armed)
                    if limits.limit > 0 && reading.charged_bytes >= limits.limit =>
                {
                    self.probes.set_trigger(id, Trigger::Disarmed)?;
                    let event = crossing(id, g, None, now_ns(), &reading);
                    g.reported_ns = now_ns();
                    self.queue.push_back(event);
                }
                Some(Trigger::WaitBelow) if reading.charged_bytes < limits.rearm_below() => {
                    self.probes.set_trigger(id, Trigger::Armed)?;
                    self.queue.push_back(SensorEvent::Rearmed {
                        group: id,
                        charged_bytes: reading.charged_bytes,
                    });
                }
                _ => {}
            }
            let lag = self.probes.lag_per_process() * g.members.len().max(1) as u64;
            if limits.limit > 0
                && g.near.is_none()
                && reading.charged_bytes >= far_limit(limits.limit, lag)
            {
                self.set_near(id, true)?;
            }
        }
        Ok(())
    }

    fn handle(&mut self, event: KernelEvent) -> Result<Option<SensorEvent>, SensorError> {
        Ok(match event {
            KernelEvent::Fork(fork) => {
                let group = self.group_of(fork.group);
                if let Some((id, g)) = group.and_then(|id| Some((id, self.groups.get_mut(&id)?))) {
                    g.members.insert(fork.child);
                    // The child shares its parent's pages until it execs.
                    g.shared_check
                        .get_or_insert_with(|| Instant::now() + SHARED_CHECK);
                    // Each member's counters lag on their own: the lowered
                    // limit comes down as the group doubles.
                    if g.near.is_none() && g.members.len() >= 2 * g.lag_members.max(1) {
                        self.set_near(id, false)?;
                    }
                }
                Some(SensorEvent::Fork { group, fork })
            }
            KernelEvent::Exit(exit) => {
                let group = self.group_of(exit.group);
                if let Some(g) = group.and_then(|id| self.groups.get_mut(&id)) {
                    g.members.remove(&exit.pid);
                }
                Some(SensorEvent::Exit { group, exit })
            }
            KernelEvent::Crossing(signal) => {
                let Some(group) = self.group_of(signal.group.0) else {
                    return Ok(None);
                };
                if self.groups[&group].reported_ns >= signal.monotonic_ns {
                    return Ok(None);
                }
                let event = self.confirm(group, Some(signal.pid), signal.monotonic_ns);
                if event.is_none() && self.groups.get(&group).is_some_and(|g| g.near.is_none()) {
                    // The lowered limit: not over, but close enough that
                    // the counters could hide a crossing.
                    return self.became_near(group, signal.pid, signal.monotonic_ns);
                } else if event.is_none() {
                    self.stats.unconfirmed_crossings += 1;
                    tracing::debug!(
                        group = group.0,
                        kernel_bytes = signal.bytes,
                        "kernel crossing not confirmed by exact readings; rechecking"
                    );
                    self.schedule_recheck(group, signal.monotonic_ns);
                }
                event
            }
            KernelEvent::Rearmed(signal) => {
                self.group_of(signal.group.0)
                    .map(|group| SensorEvent::Rearmed {
                        group,
                        charged_bytes: signal.bytes.max(0) as u64,
                    })
            }
            KernelEvent::OomVictim { pid, group } => Some(SensorEvent::OomVictim {
                group: self.group_of(group.0),
                pid,
            }),
            KernelEvent::Changed(signal) => {
                self.group_of(signal.group.0)
                    .map(|group| SensorEvent::Changed {
                        group,
                        charged_bytes: signal.bytes.max(0) as u64,
                    })
            }
        })
    }

    /// The group of a kernel handle; `None` for no group, or one that was
    /// removed (a late fork or exit of an earlier group).
    fn group_of(&self, handle: u32) -> Option<GroupId> {
        let id = GroupId(handle);
        self.groups.contains_key(&id).then_some(id)
    }

    /// Reads the group exactly; the crossing event when it is over.
    fn confirm(&mut self, group: GroupId, pid: Option<u32>, sensed_ns: u64) -> Option<SensorEvent> {
        let g = self.groups.get_mut(&group)?;
        let reading = read_against(&g.members, g.limits.limit);
        if g.limits.limit == 0 || reading.charged_bytes < g.limits.limit {
            return None;
        }
        g.recheck = None;
        Some(crossing(group, g, pid, sensed_ns, &reading))
    }

    /// Reads a group whose members share pages: a crossing the running
    /// total cannot see (see [`SHARED_CHECK`]) is reported like any other.
    /// Stops once no member shares pages any more.
    fn shared_check(&mut self, group: GroupId) -> Result<Option<SensorEvent>, SensorError> {
        let Some(g) = self.groups.get_mut(&group) else {
            return Ok(None);
        };
        if !self.probes.shares_pages(group, g.members.iter().copied()) {
            g.shared_check = None;
            if g.near.is_none() && std::mem::take(&mut g.wait_below) {
                // The running total is whole again: the kernel takes over.
                self.probes.set_trigger(group, Trigger::WaitBelow)?;
            }
            return Ok(None);
        }
        g.shared_check = Some(Instant::now() + SHARED_CHECK);
        if g.recheck.is_some()
            || !(g.wait_below || self.probes.trigger(group) == Some(Trigger::Armed))
        {
            return Ok(None);
        }
        self.stats.shared_checks += 1;
        let reading = read_against(&g.members, g.limits.limit);
        if g.wait_below {
            if reading.charged_bytes >= g.limits.rearm_below() {
                return Ok(None);
            }
            g.wait_below = false;
            self.probes.set_trigger(group, Trigger::Armed)?;
            return Ok(Some(SensorEvent::Rearmed {
                group,
                charged_bytes: reading.charged_bytes,
            }));
        }
        if g.limits.limit == 0 || reading.charged_bytes < g.limits.limit {
            return Ok(None);
        }
        self.probes.set_trigger(group, Trigger::Disarmed)?;
        g.reported_ns = now_ns();
        Ok(Some(crossing(group, g, None, now_ns(), &reading)))
    }

    /// Looks again at a crossing that did not confirm: confirmed now, or
    /// re-armed once the kernel's total is back under the limit, or
    /// checked again after twice the last wait.
    fn recheck(&mut self, group: GroupId) -> Result<Option<SensorEvent>, SensorError> {
        let Some(recheck) = self.groups.get(&group).and_then(|g| g.recheck) else {
            return Ok(None);
        };
        self.stats.rechecks += 1;
        if let Some(event) = self.confirm(group, None, recheck.sensed_ns) {
            return Ok(Some(event));
        }
        let limit = self.groups[&group].limits.limit;
        let under = self.probes.group_total(group) < i64::try_from(limit).unwrap_or(i64::MAX);
        if under {
            self.probes.set_trigger(group, Trigger::Armed)?;
        }
        if let Some(g) = self.groups.get_mut(&group) {
            g.recheck = (!under).then(|| {
                let backoff = (recheck.backoff * 2).min(RECHECK_MAX);
                Recheck {
                    at: Instant::now() + backoff,
                    backoff,
                    ..recheck
                }
            });
        }
        Ok(None)
    }
}

fn read_members(members: &HashSet<u32>) -> GroupReading {
    let pids: Vec<u32> = members.iter().copied().collect();
    mem::read_tree(&pids)
}

/// A reading to compare with `limit` (see [`mem::read_tree_against`]).
fn read_against(members: &HashSet<u32>, limit: u64) -> GroupReading {
    let pids: Vec<u32> = members.iter().copied().collect();
    mem::read_tree_against(&pids, limit)
}

fn crossing(
    group: GroupId,
    g: &Group,
    pid: Option<u32>,
    sensed_ns: u64,
    reading: &GroupReading,
) -> SensorEvent {
    SensorEvent::OverLimit(Crossing {
        group,
        pid,
        charged_bytes: reading.charged_bytes,
        limit_bytes: g.limits.limit,
        sensed_ns,
        confirmed_ns: now_ns(),
        members: reading.members.len(),
        metric: reading.metric.unwrap_or(mem::Charged::AnonShmem),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn far_limits_sit_the_lag_below_the_limit() {
        let limits = Limits {
            limit: 100 << 20,
            hysteresis: 5 << 20,
            step: 7,
        };
        assert_eq!(far_limit(limits.limit, 1 << 20), 99 << 20);
        let far = kernel_limits(limits, Some(99 << 20));
        assert_eq!(far.limit, 99 << 20);
        assert_eq!(far.rearm_below(), 95 << 20, "the re-arm level is kept");
        assert_eq!(far.step, 7);
        let wide = kernel_limits(limits, Some(90 << 20));
        assert_eq!(
            (wide.limit, wide.rearm_below()),
            (90 << 20, 90 << 20),
            "a re-arm level above the lowered limit comes down with it"
        );
        assert_eq!(kernel_limits(limits, None), limits, "near: its own");
    }

    #[test]
    fn a_lag_as_large_as_the_limit_leaves_no_far_level() {
        assert_eq!(far_limit(64 << 10, 640 << 10), 0);
        let limits = Limits::new(64 << 10);
        assert_eq!(kernel_limits(limits, Some(0)), limits);
        assert_eq!(kernel_limits(Limits::new(0), Some(0)), Limits::new(0));
    }
}
