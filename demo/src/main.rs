//! Programs with a known memory shape, for watching the watchdog at work
//! (`cargo xtask run` starts them with examples/watchdog.toml):
//!
//! - `leak --rate 16MiB/s [--step 1MiB]`: grows by `step` at `rate`,
//!   forever, as a leaking worker does; SIGTERM makes it drain for about
//!   200 ms and exit 0.
//! - `steady --size 24MiB`: takes `size` once and keeps using it, as a
//!   healthy worker does.
//! - `session --grow-to 96MiB --over 6s`: grows to `grow-to` over `over`,
//!   then holds it, as a long-lived interactive session does.
//!
//! Every byte counted is written, so it is resident and counts against a
//! limit. SIGTERM and SIGINT stop each of them with exit code 0; bad
//! arguments exit 2 with a message.

use std::{
    hint::black_box,
    num::{IntErrorKind, ParseIntError},
    process,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
const GIB: usize = 1 << 30;

/// The smallest page size on Linux: a write every 4 KiB reaches every page.
const PAGE: usize = 4 * KIB;

/// How long the leak takes to drain on SIGTERM, as a server finishing its
/// requests would.
const DRAIN: Duration = Duration::from_millis(200);

/// How often the leak reports what it holds.
const REPORT_EVERY: usize = 16 * MIB;

/// How often a waiting program looks for a stop request.
const TICK: Duration = Duration::from_millis(50);

#[derive(Parser)]
#[command(
    name = "watchdog-demo",
    about = "Programs with a known memory shape, for watching the watchdog at work"
)]
struct Cli {
    #[command(subcommand)]
    program: Program,
}

#[derive(Subcommand)]
enum Program {
    /// Grow by STEP at RATE, forever; drain for 200 ms on SIGTERM.
    Leak {
        /// How fast to grow, e.g. 16MiB/s.
        #[arg(long, value_parser = parse_rate)]
        rate: usize,
        /// How much to take at a time.
        #[arg(long, default_value = "1MiB", value_parser = parse_size)]
        step: usize,
    },
    /// Take SIZE once and keep using it.
    Steady {
        /// How much to hold, e.g. 24MiB.
        #[arg(long, value_parser = parse_size)]
        size: usize,
    },
    /// Grow to GROW_TO over OVER, then hold it.
    Session {
        /// How much to hold in the end, e.g. 96MiB.
        #[arg(long, value_parser = parse_size)]
        grow_to: usize,
        /// How long the growth takes, e.g. 6s.
        #[arg(long, value_parser = parse_duration)]
        over: Duration,
    },
}

fn main() {
    let cli = Cli::parse();
    stop_on_signals();
    match cli.program {
        Program::Leak { rate, step } => leak(rate, step),
        Program::Steady { size } => steady(size),
        Program::Session { grow_to, over } => session(grow_to, over),
    }
}

fn leak(rate: usize, step: usize) {
    let interval = Duration::from_secs_f64(step as f64 / rate as f64);
    let mut memory = Memory::default();
    let mut next = Instant::now();
    loop {
        let before = memory.bytes;
        memory.grow(step);
        if memory.bytes / REPORT_EVERY > before / REPORT_EVERY {
            println!("leak: {} MiB held", memory.bytes / MIB);
        }
        next += interval;
        if sleep_until(next) {
            break;
        }
    }
    println!("leak: draining ({} MiB held)", memory.bytes / MIB);
    thread::sleep(DRAIN);
}

fn steady(size: usize) {
    let mut memory = Memory::default();
    memory.grow(size);
    println!("steady: {} MiB held", memory.bytes / MIB);
    memory.idle();
    println!("steady: stopping");
}

fn session(grow_to: usize, over: Duration) {
    println!(
        "session: growing to {} MiB over {}",
        grow_to / MIB,
        humantime::format_duration(over)
    );
    // About a mebibyte at a time, evenly spread over `over`.
    let steps = (grow_to / MIB).max(1);
    let start = Instant::now();
    let mut memory = Memory::default();
    for i in 1..=steps {
        if sleep_until(start + over.mul_f64(i as f64 / steps as f64)) {
            println!("session: stopping");
            return;
        }
        let target = if i == steps {
            grow_to
        } else {
            grow_to / steps * i
        };
        memory.grow(target - memory.bytes);
    }
    println!("session: {} MiB held", memory.bytes / MIB);
    memory.idle();
    println!("session: stopping");
}

/// Memory this program holds, all of it written to.
#[derive(Default)]
struct Memory {
    chunks: Vec<Vec<u8>>,
    bytes: usize,
}

impl Memory {
    /// Takes `len` more bytes and writes to every page of them: until
    /// written, fresh memory is only address space, not resident.
    /// Exits 1 when the system refuses the memory.
    fn grow(&mut self, len: usize) {
        let mut chunk = Vec::new();
        if let Err(e) = chunk.try_reserve_exact(len) {
            eprintln!("watchdog-demo: cannot take {} MiB more: {e}", len / MIB);
            process::exit(1);
        }
        chunk.resize(len, 0u8);
        for i in (0..len).step_by(PAGE) {
            chunk[i] = 1;
        }
        // The writes are the point: keep the optimizer from dropping them.
        self.chunks.push(black_box(chunk));
        self.bytes += len;
    }

    /// Waits for a stop request, writing to a page now and then, as a live
    /// program uses its memory.
    fn idle(&mut self) {
        let mut turn = 0;
        while !sleep_until(Instant::now() + Duration::from_secs(1)) {
            let count = self.chunks.len().max(1);
            if let Some(chunk) = self.chunks.get_mut(turn % count) {
                chunk[0] ^= 1;
                black_box(chunk);
            }
            turn += 1;
        }
    }
}

/// Set by SIGTERM or SIGINT.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_signal: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Makes SIGTERM and SIGINT a stop request the program finishes on, instead
/// of an abrupt end.
fn stop_on_signals() {
    let handler = request_stop as extern "C" fn(libc::c_int);
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(signal, handler as libc::sighandler_t) };
    }
}

/// Sleeps until `deadline` or a stop request, whichever comes first; true
/// when a stop was requested.
fn sleep_until(deadline: Instant) -> bool {
    loop {
        if STOP.load(Ordering::Relaxed) {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        thread::sleep((deadline - now).min(TICK));
    }
}

/// A size in binary units: `16MiB`, `512KiB`, `1GiB`, or bytes (`4096`,
/// `4096B`).
fn parse_size(text: &str) -> Result<usize, String> {
    let usage = || format!("{text:?} is not a size; write e.g. 16MiB (units: B, KiB, MiB, GiB)");
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit = match unit.trim() {
        "" | "B" => 1,
        "KiB" => KIB,
        "MiB" => MIB,
        "GiB" => GIB,
        _ => return Err(usage()),
    };
    let too_large = || format!("{text:?} is too large");
    let number: usize = number.parse().map_err(|e: ParseIntError| match e.kind() {
        IntErrorKind::PosOverflow => too_large(),
        _ => usage(),
    })?;
    match number.checked_mul(unit) {
        Some(0) => Err(format!("{text:?}: a size must be more than 0")),
        Some(bytes) => Ok(bytes),
        None => Err(too_large()),
    }
}

/// Bytes per second, written as a size per second: `16MiB/s`.
fn parse_rate(text: &str) -> Result<usize, String> {
    let size = text
        .strip_suffix("/s")
        .ok_or_else(|| format!("{text:?} is not a rate; write a size per second, e.g. 16MiB/s"))?;
    parse_size(size)
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration ({e}); write e.g. 6s or 1500ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_binary_units() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("2 MiB"), Ok(2 << 20));
    }

    #[test]
    fn bad_sizes_say_what_to_write() {
        for bad in ["", "MiB", "16MB", "16mib", "1.5MiB", "-1MiB", "16MiB/s"] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.contains("e.g. 16MiB"), "{bad:?}: {err}");
        }
        assert!(parse_size("0MiB").unwrap_err().contains("more than 0"));
        assert!(
            parse_size("99999999999999GiB")
                .unwrap_err()
                .contains("too large")
        );
        assert!(
            parse_size("99999999999999999999")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn rates_are_sizes_per_second() {
        assert_eq!(parse_rate("16MiB/s"), Ok(16 << 20));
        assert!(parse_rate("16MiB").unwrap_err().contains("e.g. 16MiB/s"));
        assert!(parse_rate("16MB/s").unwrap_err().contains("e.g. 16MiB"));
    }

    #[test]
    fn memory_grows_by_what_was_asked() {
        let mut memory = Memory::default();
        memory.grow(PAGE + 1);
        memory.grow(3 * PAGE);
        assert_eq!(memory.bytes, 4 * PAGE + 1);
        assert!(memory.chunks.iter().all(|c| c[0] == 1));
    }
}
