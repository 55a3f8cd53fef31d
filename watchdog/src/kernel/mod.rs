//! The kernel programs behind a small typed API, one file per job:
//!
//! - `load`: resolve struct offsets from the kernel's BTF, load and attach
//!   the programs that fit this kernel, and prove them right with a
//!   self-check before anything is reported ([`Probes::load`]);
//! - `forms`: which form of each program this kernel took, and why for
//!   each fallback ([`Probes::forms`]);
//! - `table`: the watch table, which processes are watched and what each is
//!   charged ([`Probes::watch`], [`Probes::watch_tree`]);
//! - `groups`: group slots, their limits, running totals and triggers;
//! - `ring`: typed events from the ring buffer ([`Probes::next`]) and the
//!   loss counters.

pub mod btf;
mod forms;
mod groups;
mod load;
pub mod offsets;
mod ring;
mod table;

use std::collections::VecDeque;

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
};
use tokio::io::unix::AsyncFd;
use watchdog_common::Watch;

pub use forms::{ExitForm, Forms, RssStatForm, VictimForm};
pub use load::{LoadError, ProbeOptions, built_in};
pub use ring::{GroupSignal, KernelEvent, Losses};
pub use table::Charge;

/// The loaded and attached kernel programs.
pub struct Probes {
    // Owns the programs and their links: dropping it detaches them.
    _ebpf: Ebpf,
    watched: HashMap<MapData, u32, Watch>,
    filter: table::Filter,
    counters: PerCpuArray<MapData, u64>,
    groups: groups::Groups,
    ring: AsyncFd<RingBuf<MapData>>,
    /// Events read while looking for something else (during the self-check).
    pending: VecDeque<KernelEvent>,
    /// Whether the ring buffer was emptied since this was last cleared
    /// (see [`Probes::take_drained`]).
    drained: bool,
    /// Whether a record was read since the ring was last found empty.
    read_since_empty: bool,
    page_size: u64,
    /// How far below a process's true anon or shmem count the kernel's
    /// counter (and so the programs' view) can be, in bytes.
    counter_lag: u64,
    /// The form each program was attached in.
    forms: Forms,
}

impl Probes {
    /// How many bytes of one process's memory the kernel programs may not
    /// see yet: each of its two charged counters lags its true value by up
    /// to this much, plus the programs' own update granule.
    pub fn lag_per_process(&self) -> u64 {
        2 * (self.counter_lag + watchdog_common::GRANULE_PAGES as u64 * self.page_size)
    }

    /// The form each program was attached in, and why for each fallback.
    pub fn forms(&self) -> &Forms {
        &self.forms
    }
}
