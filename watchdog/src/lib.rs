//! watchdog: an eBPF-assisted memory watchdog and process supervisor.
//!
//! # Layout
//! - [`cli`]: the command line; parses, sets up logging, dispatches.
//! - [`audit`]: `watchdog audit`, process exits as JSON lines.
//! - [`auditlog`]: the supervisor's audit log (append, fsync, reopen).
//! - [`runner`]: spawning, holding before exec, reaping, killing trees.
//! - [`supervise`]: `watchdog supervise`, one service in the foreground.
//! - [`kernel`] (Linux): the kernel programs behind a typed API: BTF
//!   offsets, loading and attaching, the watch table, the event stream.
//! - [`event`]: what sensors report (exits, forks) and clock conversion.
//! - [`exit`]: exit statuses decoded from wait(2) form.
//! - [`jsonl`]: whole-line JSON output to stdout or an O_APPEND file.
//! - [`mem`]: exact memory readings (RssAnon+RssShmem, phys_footprint).
//! - [`memcheck`]: `watchdog mem-check`.
//! - [`policy`]: the respawn policy, a pure state machine (inputs and time
//!   in, actions out).
//! - [`size`]: byte sizes as users write them.
//! - [`watch`]: `watchdog watch`, memory limits on running process trees.
//! - [`privilege`] (Linux): capability checks before loading programs.
//! - [`procs`]: process-table queries (existence, command lines, trees).
//! - [`sensor`]: one event stream (crossings, exits, forks) from the kernel
//!   programs or a sampler, with exact confirmation.

pub mod audit;
pub mod auditlog;
pub mod cli;
pub mod event;
pub mod exit;
pub mod jsonl;
#[cfg(target_os = "linux")]
pub mod kernel;
pub mod mem;
pub mod memcheck;
pub mod policy;
#[cfg(target_os = "linux")]
pub mod privilege;
pub mod procs;
pub mod runner;
pub mod sensor;
pub mod size;
pub mod supervise;
pub mod watch;

/// Whether this binary carries the compiled kernel programs.
pub fn kernel_programs_built_in() -> bool {
    #[cfg(target_os = "linux")]
    return kernel::built_in();
    #[cfg(not(target_os = "linux"))]
    return false;
}
