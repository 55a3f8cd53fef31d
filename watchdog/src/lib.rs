//! watchdog: an eBPF-assisted memory watchdog and process supervisor.
//!
//! # Layout
//! - [`cmd`]: the command line: parsing, logging set-up, and one module
//!   per command (`audit`, `mem-check`, `supervise`, `watch`) that turns
//!   options into calls of the library modules below.
//! - [`config`]: the daemon's configuration file and the options a
//!   service or watch target takes (shared with `supervise`).
//! - [`daemon`]: start-up, signals, reload and shutdown around the one
//!   service loop (`run` and `supervise`).
//! - [`cgroup`] (Linux): a cgroup v2 per service: a tree no fork escapes,
//!   drain and kill of every member, OOM kills counted per service.
//! - [`ownership`]: whether a file or directory is this user's alone
//!   (the state directory, output files).
//! - [`notify`]: notifications to systemd (ready, reloading, stopping,
//!   status, watchdog pings).
//! - [`protect`]: the daemon's protection from what it watches
//!   (oom_score_adj, mlockall, priority) and its reset in each service.
//! - [`auditlog`]: the supervisor's audit log (append, fsync, reopen).
//! - [`runner`]: spawning, holding before exec, reaping, killing trees.
//! - [`kernel`] (Linux): the kernel programs behind a typed API: BTF
//!   offsets, loading and attaching, the watch table, the event stream.
//! - [`event`]: what sensors report (exits, forks) and clock conversion.
//! - [`exit`]: exit statuses decoded from wait(2) form.
//! - [`jsonl`]: whole-line JSON output to stdout or an O_APPEND file.
//! - [`mem`]: exact memory readings (RssAnon+RssShmem, phys_footprint).
//! - [`policy`]: the respawn policy, a pure state machine (inputs and time
//!   in, actions out).
//! - [`size`]: byte sizes as users write them.
//! - [`privilege`] (Linux): capability checks before loading programs.
//! - [`procs`]: process-table queries (existence, command lines, trees).
//! - [`service`]: the service actor (one service's policy, run and
//!   deadlines; inputs in, effects out) and the one loop that drives
//!   services on the real platform.
//! - [`sensor`]: one event stream (crossings, exits, forks) from the kernel
//!   programs or a sampler, with exact confirmation.
//! - [`status`]: what the running daemon reports about itself (`watchdog
//!   status`, `/healthz`, `/metrics`).
//! - [`hostmem`]: the host's (or container's) memory: warnings with
//!   hysteresis, never an action.
//! - [`state`]: the state directory: the instance lock and the records of
//!   the runs an instance started, which the next one sweeps after a crash.

pub mod auditlog;
pub mod cgroup;
pub mod cmd;
pub mod config;
pub mod daemon;
pub mod event;
pub mod exit;
pub mod hostmem;
pub mod jsonl;
#[cfg(target_os = "linux")]
pub mod kernel;
pub mod mem;
pub mod notify;
pub mod observe;
pub mod output;
pub mod ownership;
pub mod policy;
#[cfg(target_os = "linux")]
pub mod privilege;
pub mod procs;
pub mod protect;
pub mod runner;
pub mod sensor;
pub mod service;
pub mod size;
pub mod state;
pub mod status;

/// Whether this binary carries the compiled kernel programs.
pub fn kernel_programs_built_in() -> bool {
    #[cfg(target_os = "linux")]
    return kernel::built_in();
    #[cfg(not(target_os = "linux"))]
    return false;
}
