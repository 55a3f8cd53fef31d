//! The event ring: typed events from the kernel programs' ring buffer,
//! read through tokio's `AsyncFd`, and the loss counters.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    time::Duration,
};

use watchdog_common::{
    COMM_LEN, EVENT_CHANGED, EVENT_CROSSING, EVENT_EXIT, EVENT_FORK, EVENT_OOM_VICTIM,
    EVENT_REARMED, Event, counter,
};

use super::Probes;
use crate::{
    event::{ProcessExit, ProcessFork},
    exit::ExitStatus,
    sensor::GroupId,
};

/// An event from the kernel programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelEvent {
    Exit(ProcessExit),
    Fork(ProcessFork),
    /// A group's (approximate) total crossed its limit; the group is
    /// disarmed until [`Probes::rearm`].
    Crossing(GroupSignal),
    /// A group waiting to re-arm fell below its re-arm level.
    Rearmed(GroupSignal),
    /// A group's total moved by at least its step.
    Changed(GroupSignal),
    /// The kernel's OOM killer chose this watched process.
    OomVictim {
        pid: u32,
        group: GroupId,
    },
}

/// A group-level event: which group, what its kernel total was, and which
/// process's update caused it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupSignal {
    pub group: GroupId,
    pub pid: u32,
    /// The kernel's running total (approximate: per-CPU deltas of the
    /// counters are not folded in).
    pub bytes: i64,
    pub limit: u64,
    pub monotonic_ns: u64,
}

/// Counts of what the kernel side could not deliver or track.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Losses {
    /// Events dropped because the ring buffer was full.
    pub ringbuf_full: u64,
    /// New processes of watched trees that the watch table had no room for.
    pub watch_table_full: u64,
    /// Reads of kernel structures that failed in the programs (an
    /// unexpected layout): the event or update they were for was dropped.
    pub read_failed: u64,
}

impl Losses {
    /// Each counter with its name (`ringbuf_full`, `watch_table_full`,
    /// `read_failed`).
    pub fn named(&self) -> [(&'static str, u64); 3] {
        [
            ("ringbuf_full", self.ringbuf_full),
            ("watch_table_full", self.watch_table_full),
            ("read_failed", self.read_failed),
        ]
    }
}

impl Probes {
    /// Waits for the next event.
    pub async fn next(&mut self) -> io::Result<KernelEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            let mut guard = self.ring.readable_mut().await?;
            let raw = guard.get_inner_mut().next().map(|item| decode(&item));
            note_read(&mut self.drained, &mut self.read_since_empty, raw.is_some());
            match raw {
                Some(Some(raw)) => return Ok(self.convert(&raw)),
                // A record of a size this build does not know: skip it.
                Some(None) => continue,
                None => guard.clear_ready(),
            }
        }
    }

    /// Returns an event that is already waiting, without blocking.
    pub fn try_next(&mut self) -> Option<KernelEvent> {
        if let Some(event) = self.pending.pop_front() {
            return Some(event);
        }
        loop {
            let raw = self.ring.get_mut().next().map(|item| decode(&item));
            note_read(&mut self.drained, &mut self.read_since_empty, raw.is_some());
            let raw = raw?;
            if let Some(raw) = raw {
                return Some(self.convert(&raw));
            }
        }
    }

    /// What the kernel side has lost so far (summed over CPUs).
    pub fn losses(&self) -> Losses {
        let read = |index: u32| {
            self.counters
                .get(&index, 0)
                .map(|values| values.iter().sum())
                .unwrap_or(0)
        };
        Losses {
            ringbuf_full: read(counter::RINGBUF_FULL),
            watch_table_full: read(counter::WATCH_TABLE_FULL),
            read_failed: read(counter::READ_FAILED),
        }
    }

    pub(super) fn convert(&self, raw: &Event) -> KernelEvent {
        let signal = || GroupSignal {
            group: GroupId(raw.group),
            pid: raw.pid,
            bytes: raw.bytes,
            limit: raw.limit,
            monotonic_ns: raw.ktime_ns,
        };
        match raw.kind {
            EVENT_CROSSING => KernelEvent::Crossing(signal()),
            EVENT_REARMED => KernelEvent::Rearmed(signal()),
            EVENT_CHANGED => KernelEvent::Changed(signal()),
            EVENT_OOM_VICTIM => KernelEvent::OomVictim {
                pid: raw.pid,
                group: GroupId(raw.group),
            },
            EVENT_FORK => KernelEvent::Fork(ProcessFork {
                parent: raw.ppid,
                child: raw.pid,
                group: raw.group,
                monotonic_ns: raw.ktime_ns,
            }),
            _ => KernelEvent::Exit(ProcessExit {
                pid: raw.pid,
                ppid: raw.ppid,
                comm: comm_string(&raw.comm),
                status: ExitStatus::from_wait_status(raw.wait_status),
                peak_rss_bytes: raw.peak_rss_pages.saturating_mul(self.page_size),
                monotonic_ns: raw.ktime_ns,
                group: raw.group,
            }),
        }
    }

    /// Whether the ring buffer was emptied since the last call (records
    /// were read, then none was left): all that the programs wrote before
    /// then has been read, so a loss counter read now tells whether any of
    /// it was lost. An idle ring is not drained again and again.
    pub fn take_drained(&mut self) -> bool {
        std::mem::take(&mut self.drained)
    }
}

/// Notes a read from the ring: a record, or none left after some were
/// read (drained).
fn note_read(drained: &mut bool, read_since_empty: &mut bool, got_record: bool) {
    if got_record {
        *read_since_empty = true;
    } else if std::mem::take(read_since_empty) {
        *drained = true;
    }
}

/// Reads one ring-buffer record; `None` for a record of unknown size.
pub(super) fn decode(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: Event is plain integers, and the length was checked.
    let event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) };
    matches!(
        event.kind,
        EVENT_EXIT | EVENT_FORK | EVENT_CROSSING | EVENT_REARMED | EVENT_CHANGED | EVENT_OOM_VICTIM
    )
    .then_some(event)
}

pub(super) fn comm_string(comm: &[u8; COMM_LEN]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Blocks until `fd` is readable or `timeout` passes (used only before the
/// event loop runs, during the self-check).
pub(super) fn wait_readable(fd: &impl AsFd, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd: fd.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd. EINTR just makes the caller look again.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_records() {
        let mut event = Event {
            kind: EVENT_EXIT,
            pid: 7,
            ..Event::default()
        };
        event.comm[..2].copy_from_slice(b"sh");
        // SAFETY: Event is plain integers.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const event).cast::<u8>(), size_of::<Event>())
        };
        assert_eq!(decode(bytes), Some(event));
        assert_eq!(decode(&bytes[..10]), None, "short record");
        assert_eq!(comm_string(&event.comm), "sh");
        assert_eq!(comm_string(&[b'x'; COMM_LEN]), "x".repeat(COMM_LEN));
        event.kind = 99;
        // SAFETY: as above.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const event).cast::<u8>(), size_of::<Event>())
        };
        assert_eq!(decode(bytes), None, "unknown kind");
    }
}
