//! What every sensor, and the kernel programs, mean by a group: its id,
//! its limits, and its trigger (armed, disarmed after firing, or waiting to
//! fall below its re-arm level).

use watchdog_common::{GROUP_ARMED, GROUP_DISARMED, GROUP_WAIT_BELOW};

/// A watched group. With the kernel programs it is the kernel's group
/// handle (slot and generation, see `watchdog_common::group_slot`), so an
/// id is never reused while the sensor runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub u32);

/// A group's thresholds, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// The group fires when its charged total reaches this; 0: never.
    pub limit: u64,
    /// After firing, it re-arms once it is below `limit - hysteresis`.
    pub hysteresis: u64,
    /// Report changes of at least this much (`SensorEvent::Changed`);
    /// 0: off.
    pub step: u64,
}

impl Limits {
    /// `limit` with the default hysteresis (5% of it).
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            hysteresis: limit / 20,
            step: 0,
        }
    }

    /// The same limits moved to `limit`, the hysteresis kept in proportion.
    pub fn at(self, limit: u64) -> Self {
        let hysteresis = if self.limit == 0 {
            limit / 20
        } else {
            u64::try_from(u128::from(limit) * u128::from(self.hysteresis) / u128::from(self.limit))
                .unwrap_or(0)
        };
        Self {
            limit,
            hysteresis: hysteresis.min(limit),
            step: self.step,
        }
    }

    pub fn rearm_below(&self) -> u64 {
        self.limit.saturating_sub(self.hysteresis)
    }
}

/// A group's trigger. The kernel programs keep the same three states in
/// `GROUP_STATE` (the `GROUP_*` constants, which these values are).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Trigger {
    /// Fired; quiet until re-armed.
    Disarmed = GROUP_DISARMED,
    /// Fires when the total reaches the limit.
    Armed = GROUP_ARMED,
    /// Re-arms once the total is below the re-arm level.
    WaitBelow = GROUP_WAIT_BELOW,
}

/// What a new reading did to a trigger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edge {
    /// The total reached the limit while armed: report it.
    Fired,
    /// The total fell below the re-arm level: armed again.
    Rearmed,
}

impl Trigger {
    /// The state in the kernel's `GROUP_STATE` encoding.
    pub const fn kernel(self) -> u32 {
        self as u32
    }

    /// The state a handled crossing re-arms to: armed when the total is
    /// already below the re-arm level, else waiting for it.
    pub fn after_crossing(charged: u64, limits: &Limits) -> Self {
        if charged < limits.rearm_below() {
            Self::Armed
        } else {
            Self::WaitBelow
        }
    }

    /// Moves the trigger for a new total, as the kernel programs do on
    /// every update.
    pub fn observe(&mut self, charged: u64, limits: &Limits) -> Option<Edge> {
        match *self {
            Self::Armed if limits.limit > 0 && charged >= limits.limit => {
                *self = Self::Disarmed;
                Some(Edge::Fired)
            }
            Self::WaitBelow if charged < limits.rearm_below() => {
                *self = Self::Armed;
                Some(Edge::Rearmed)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_move_with_their_hysteresis() {
        let limits = Limits {
            limit: 1000,
            hysteresis: 100,
            step: 7,
        };
        let soft = limits.at(500);
        assert_eq!((soft.limit, soft.hysteresis, soft.step), (500, 50, 7));
        assert_eq!(Limits::new(0).at(2000).hysteresis, 100, "5% by default");
        assert_eq!(Limits::new(u64::MAX).at(u64::MAX).limit, u64::MAX);
    }

    #[test]
    fn trigger_fires_once_and_rearms_below() {
        let limits = Limits {
            limit: 100,
            hysteresis: 10,
            step: 0,
        };
        let mut t = Trigger::Armed;
        assert_eq!(t.observe(99, &limits), None);
        assert_eq!(t.observe(100, &limits), Some(Edge::Fired));
        assert_eq!(t.observe(200, &limits), None, "fires once");
        t = Trigger::after_crossing(95, &limits);
        assert_eq!(t, Trigger::WaitBelow);
        assert_eq!(t.observe(91, &limits), None, "not below 90 yet");
        assert_eq!(t.observe(89, &limits), Some(Edge::Rearmed));
        assert_eq!(t.observe(100, &limits), Some(Edge::Fired));
        assert_eq!(Trigger::after_crossing(10, &limits), Trigger::Armed);
        assert_eq!(Trigger::WaitBelow.kernel(), GROUP_WAIT_BELOW);
    }
}
