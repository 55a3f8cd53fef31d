//! A small, scriptable child process for the integration tests (no shell
//! scripts): each argument is a step, run in order.
//!
//! Steps:
//! - `wait-stdin`: block until a line (or end of input) on standard input
//! - `sleep MS`: sleep
//! - `alloc MIB`: map and touch MIB mebibytes of anonymous memory
//! - `free`: unmap everything `alloc` mapped (the memory goes back at once)
//! - `free-last`: unmap what the last `alloc` mapped
//! - `thread-alloc N MIB`: N threads at once each map and touch MIB
//!   mebibytes, kept until exit
//! - `exec STEPS...`: replace this program with a fresh copy of itself
//!   running STEPS
//! - `threads N`: start N threads and join them (they exit before we do)
//! - `fork-child CODE`: fork a child that exits with CODE, and reap it
//! - `leader-exits-first CODE`: the main thread exits alone (exit(2), not
//!   exit_group); a second thread then exits alone with CODE, as the last
//!   thread of the process
//! - `core-limit on|off`: set RLIMIT_CORE to unlimited or 0
//! - `segv`: die of SIGSEGV
//! - `abort`: die of SIGABRT
//! - `tag WORD`: nothing; a word for tests to find the process by
//! - `fork-alloc MIB`: fork a child that allocates MIB mebibytes and then
//!   waits for a line (or end of input) on the shared standard input
//! - `cross-cycles N LIMIT_MIB HOLD_MS REST_MS`: N times: grow until the
//!   charged memory (RssAnon + RssShmem) crosses LIMIT_MIB, page by page
//!   near the line, print `cross <CLOCK_MONOTONIC ns>` taken right after
//!   the write that crossed, hold HOLD_MS, free it all, rest REST_MS
//! - `fault-bench MIB ROUNDS`: ROUNDS times map MIB, touch every page,
//!   unmap; print `fault-bench faults=<n> median_ns=<ns per fault>
//!   min_ns=<ns per fault>`
//! - `leak MIB STEP_MS`: one more mebibyte every STEP_MS, MIB times
//! - `ignore-term`: ignore SIGTERM from now on
//! - `write-env FILE`: write the WATCHDOG_* environment to FILE, one
//!   `KEY=VALUE` a line (a memory hook's view)
//! - `spawn-session MIB FILE`: fork a child that leaves for a session (and
//!   process group) of its own, writes its pid to FILE, maps and touches
//!   MIB mebibytes and sleeps until killed
//! - `fork-storm N`: fork N children one after another, each exiting at
//!   once, reaping each
//! - `exit CODE`: exit with CODE
//! - `prefork MIB N`: touch MIB mebibytes, then fork N children that share
//!   them copy-on-write and wait for a line (or end of input) on the
//!   shared standard input (a prefork server)
//! - `prefork-write MIB N`: as `prefork`, but each child writes to every
//!   page it shares with the parent (copy-on-write: each gets its own copy)
//!   before it waits
//! - `spawn-loop N`: N times start `/bin/true` and reap it, alternately by
//!   fork (the child lingers 20 ms before exec, as a runtime closing its
//!   descriptors does) and by posix_spawn (vfork: the child shares this
//!   process's mm until exec), as Python's `subprocess.run` does
//! - `shared-fork MIB N`: map MIB mebibytes of shared anonymous memory and
//!   touch it, then fork N children that each touch all of it and wait for
//!   a line (or end of input) on the shared standard input
//! - `thread-storm THREADS ROUNDS`: ROUNDS times fork a child that starts
//!   THREADS threads and, once all run, calls exit_group with code 7 while
//!   they do; reap it
//! - `touch FILE`: create FILE (a signal to the test)

use std::{io::BufRead, os::unix::process::CommandExt, process, thread, time::Duration};

/// An anonymous mapping, touched page by page so all of it is resident.
struct Block {
    addr: usize,
    len: usize,
}

impl Block {
    /// Maps `len` bytes, not yet touched.
    fn map(len: usize) -> Self {
        // SAFETY: a fresh private anonymous mapping.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "mmap failed");
        Self {
            addr: addr as usize,
            len,
        }
    }

    /// Writes to page `index`, making it resident.
    fn touch_page(&self, index: usize) {
        assert!(index * 4096 < self.len);
        // SAFETY: inside the mapping.
        unsafe { (self.addr as *mut u8).add(index * 4096).write_volatile(1) };
    }

    fn touch(mib: usize) -> Self {
        let block = Self::map(mib << 20);
        for page in 0..block.len / 4096 {
            block.touch_page(page);
        }
        block
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut steps = args.iter().map(String::as_str);
    let mut kept: Vec<Block> = Vec::new();
    while let Some(step) = steps.next() {
        let mut number = |what: &str| -> i64 {
            let arg = steps
                .next()
                .unwrap_or_else(|| usage(&format!("{step} needs {what}")));
            arg.parse()
                .unwrap_or_else(|_| usage(&format!("{step}: {arg:?} is not a number")))
        };
        match step {
            "wait-stdin" => {
                let mut line = String::new();
                let _ = std::io::stdin().lock().read_line(&mut line);
            }
            "sleep" => thread::sleep(Duration::from_millis(number("milliseconds") as u64)),
            "alloc" => kept.push(Block::touch(number("mebibytes") as usize)),
            "alloc-pages" => {
                let pages = number("pages") as usize;
                let block = Block::map(pages * 4096);
                for page in 0..pages {
                    block.touch_page(page);
                }
                kept.push(block);
            }
            "free" => kept.clear(),
            "free-last" => drop(kept.pop()),
            "thread-alloc" => {
                let n = number("a thread count") as usize;
                let mib = number("mebibytes") as usize;
                let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
                let handles: Vec<_> = (0..n)
                    .map(|_| {
                        let barrier = std::sync::Arc::clone(&barrier);
                        thread::spawn(move || {
                            barrier.wait();
                            Block::touch(mib)
                        })
                    })
                    .collect();
                for h in handles {
                    kept.push(h.join().expect("thread panicked"));
                }
            }
            "exec" => {
                let rest: Vec<&str> = steps.by_ref().collect();
                let err = process::Command::new("/proc/self/exe").args(rest).exec();
                usage(&format!("exec failed: {err}"));
            }
            "threads" => {
                let n = number("a thread count");
                let handles: Vec<_> = (0..n)
                    .map(|i| {
                        thread::spawn(move || thread::sleep(Duration::from_millis(20 + i as u64)))
                    })
                    .collect();
                for h in handles {
                    h.join().expect("thread panicked");
                }
            }
            "fork-child" => {
                let code = number("an exit code") as i32;
                // SAFETY: single-threaded here; the child only calls _exit.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    unsafe { libc::_exit(code) };
                }
                assert!(pid > 0, "fork failed");
                let mut status = 0;
                // SAFETY: our own child, valid pointer.
                unsafe { libc::waitpid(pid, &mut status, 0) };
            }
            "leader-exits-first" => {
                let code = number("an exit code");
                thread::spawn(move || {
                    thread::sleep(Duration::from_millis(200));
                    // SAFETY: SYS_exit ends only this thread.
                    unsafe { libc::syscall(libc::SYS_exit, code) };
                });
                // SAFETY: SYS_exit ends only the main thread; the process
                // lives on in the other one.
                unsafe { libc::syscall(libc::SYS_exit, 0) };
            }
            "core-limit" => {
                let value = match steps.next() {
                    Some("on") => libc::RLIM_INFINITY,
                    Some("off") => 0,
                    _ => usage("core-limit needs on or off"),
                };
                let limit = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                // SAFETY: valid resource and pointer; raising may fail
                // without privilege, which the tests account for.
                unsafe { libc::setrlimit(libc::RLIMIT_CORE, &limit) };
            }
            "segv" => {
                // The Rust runtime handles SIGSEGV (stack overflow checks) and
                // would swallow a raised one: restore the default action.
                // SAFETY: plain signal-disposition calls.
                unsafe {
                    libc::signal(libc::SIGSEGV, libc::SIG_DFL);
                    libc::raise(libc::SIGSEGV);
                }
                usage("still alive after SIGSEGV");
            }
            "abort" => process::abort(),
            "tag" => {
                steps.next();
            }
            "fork-alloc" => {
                let mib = number("mebibytes") as usize;
                // SAFETY: single-threaded here; the child allocates, waits
                // and exits without returning into the parent's steps.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    let block = Block::touch(mib);
                    let mut line = String::new();
                    let _ = std::io::stdin().lock().read_line(&mut line);
                    drop(block);
                    process::exit(0);
                }
                assert!(pid > 0, "fork failed");
            }
            "cross-cycles" => {
                let n = number("a cycle count");
                let limit = (number("a limit in MiB") as u64) << 20;
                let hold = Duration::from_millis(number("milliseconds") as u64);
                let rest = Duration::from_millis(number("milliseconds") as u64);
                for _ in 0..n {
                    let at = cross(limit);
                    println!("cross {at}");
                    thread::sleep(hold);
                    KEPT.with(|k| k.borrow_mut().clear());
                    thread::sleep(rest);
                }
            }
            "fault-bench" => {
                let mib = number("mebibytes") as usize;
                let rounds = number("a round count").max(1) as usize;
                let pages = (mib << 20) / 4096;
                let mut per_fault: Vec<f64> = (0..rounds)
                    .map(|_| {
                        let start = monotonic_ns();
                        drop(Block::touch(mib));
                        (monotonic_ns() - start) as f64 / pages as f64
                    })
                    .collect();
                per_fault.sort_by(f64::total_cmp);
                println!(
                    "fault-bench faults={} median_ns={:.1} min_ns={:.1}",
                    pages * rounds,
                    per_fault[rounds / 2],
                    per_fault[0]
                );
            }
            "leak" => {
                let total = number("mebibytes");
                let step = Duration::from_millis(number("milliseconds") as u64);
                for _ in 0..total {
                    kept.push(Block::touch(1));
                    thread::sleep(step);
                }
            }
            "write-env" => {
                let path = steps
                    .next()
                    .unwrap_or_else(|| usage("write-env needs a file"));
                let mut vars: Vec<String> = std::env::vars()
                    .filter(|(k, _)| k.starts_with("WATCHDOG_"))
                    .map(|(k, v)| format!("{k}={v}\n"))
                    .collect();
                vars.sort();
                // Whole or not at all, for a test waiting on the file.
                let tmp = format!("{path}.tmp");
                std::fs::write(&tmp, vars.concat()).expect("write-env");
                std::fs::rename(&tmp, path).expect("write-env");
            }
            "ignore-term" => {
                // SAFETY: setting a signal disposition.
                unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
            }
            "spawn-session" => {
                let mib = number("mebibytes") as usize;
                let file = steps
                    .next()
                    .unwrap_or_else(|| usage("spawn-session needs a file"))
                    .to_owned();
                // SAFETY: single-threaded here; the child runs its own
                // steps and never returns into the parent's.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    // SAFETY: setsid has no preconditions in a fresh child.
                    unsafe { libc::setsid() };
                    let tmp = format!("{file}.tmp");
                    std::fs::write(&tmp, process::id().to_string()).expect("write pid");
                    std::fs::rename(&tmp, &file).expect("rename pid file");
                    let _block = Block::touch(mib);
                    loop {
                        thread::sleep(Duration::from_secs(3600));
                    }
                }
                assert!(pid > 0, "fork failed");
            }
            "fork-storm" => {
                for _ in 0..number("a count") {
                    // SAFETY: the child only calls _exit.
                    let pid = unsafe { libc::fork() };
                    if pid == 0 {
                        unsafe { libc::_exit(0) };
                    }
                    assert!(pid > 0, "fork failed");
                    // SAFETY: our own child, no status wanted.
                    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
                }
            }
            "spin" => {
                // Burns a CPU for this long.
                let until = monotonic_ns() + number("milliseconds") as u64 * 1_000_000;
                let mut n = 0u64;
                while monotonic_ns() < until {
                    for _ in 0..10_000 {
                        n = std::hint::black_box(n.wrapping_add(1));
                    }
                }
            }
            "fork-for" => {
                // Forks children that exit at once, for this long; prints
                // how many.
                let forks = fork_for(number("milliseconds") as u64);
                println!("forks {forks}");
            }
            "fork-for-all" => {
                // As fork-for, in this many processes at once, each adding
                // a "forks N" line to FILE.
                let ms = number("milliseconds") as u64;
                let procs = number("a process count").max(1);
                let path = steps
                    .next()
                    .unwrap_or_else(|| usage("fork-for-all needs a file"));
                let file = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(path)
                    .expect("open the fork count file");
                let mut children = Vec::new();
                for _ in 0..procs {
                    // SAFETY: the child runs the loop, writes and exits.
                    let pid = unsafe { libc::fork() };
                    if pid == 0 {
                        let line = format!("forks {}\n", fork_for(ms));
                        // One write: appended whole.
                        let _ = std::io::Write::write(&mut &file, line.as_bytes());
                        unsafe { libc::_exit(0) };
                    }
                    assert!(pid > 0, "fork failed");
                    children.push(pid);
                }
                for pid in children {
                    // SAFETY: our own child.
                    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
                }
            }
            "lifecycle-bench" => {
                // fork + execve(/bin/true) + wait, this many times: the
                // mean cost of one, in ns.
                let n = number("a count").max(1) as u64;
                let path = c"/bin/true";
                let argv = [path.as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null()];
                let start = monotonic_ns();
                for _ in 0..n {
                    // SAFETY: single-threaded; the child execs or exits.
                    let pid = unsafe { libc::fork() };
                    if pid == 0 {
                        // SAFETY: valid NUL-terminated arrays.
                        unsafe {
                            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
                            libc::_exit(127);
                        }
                    }
                    assert!(pid > 0, "fork failed");
                    // SAFETY: our own child.
                    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
                }
                println!(
                    "lifecycle ns={:.1}",
                    (monotonic_ns() - start) as f64 / n as f64
                );
            }
            "race" => {
                // Touches fresh pages as fast as it can, up to this many
                // MiB, then waits. Its progress is in DIR/<pid> (see
                // `RACE`), so that it can be read after a SIGKILL;
                // SIGTERM records where it was and exits.
                let mib = number("mebibytes") as usize;
                let dir = steps
                    .next()
                    .unwrap_or_else(|| usage("race needs a directory"));
                race(mib, &format!("{dir}/{}", process::id()));
            }
            "exit" => process::exit(number("an exit code") as i32),
            "prefork" | "prefork-write" => {
                let mib = number("mebibytes") as usize;
                let n = number("a child count");
                let block = Block::touch(mib);
                let write = step == "prefork-write";
                for _ in 0..n {
                    // SAFETY: single-threaded here; the child blocks in
                    // read and exits without returning into the steps.
                    let pid = unsafe { libc::fork() };
                    if pid == 0 {
                        if write {
                            for page in 0..block.len / 4096 {
                                block.touch_page(page);
                            }
                        }
                        let mut line = String::new();
                        let _ = std::io::stdin().lock().read_line(&mut line);
                        process::exit(0);
                    }
                    assert!(pid > 0, "fork failed");
                }
                kept.push(block);
            }
            "spawn-loop" => {
                let n = number("a count");
                let path = c"/bin/true";
                let argv = [path.as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null()];
                for i in 0..n {
                    let pid = if i % 2 == 0 {
                        // SAFETY: single-threaded here; the child sleeps
                        // and execs or exits.
                        let pid = unsafe { libc::fork() };
                        if pid == 0 {
                            thread::sleep(Duration::from_millis(20));
                            // SAFETY: valid NUL-terminated arrays.
                            unsafe {
                                libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
                                libc::_exit(127);
                            }
                        }
                        pid
                    } else {
                        let mut pid = 0;
                        // SAFETY: valid pointers; no file actions or
                        // attributes.
                        let rc = unsafe {
                            libc::posix_spawn(
                                &mut pid,
                                path.as_ptr(),
                                std::ptr::null(),
                                std::ptr::null(),
                                argv.as_ptr().cast(),
                                envp.as_ptr().cast(),
                            )
                        };
                        assert_eq!(rc, 0, "posix_spawn failed");
                        pid
                    };
                    assert!(pid > 0, "fork failed");
                    // SAFETY: our own child.
                    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
                }
            }
            "shared-fork" => {
                let mib = number("mebibytes") as usize;
                let n = number("a child count");
                let len = mib << 20;
                // SAFETY: a fresh shared anonymous mapping, kept to exit.
                let addr = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                assert_ne!(addr, libc::MAP_FAILED, "mmap failed");
                let touch = || {
                    for offset in (0..len).step_by(4096) {
                        // SAFETY: inside the mapping.
                        unsafe { addr.cast::<u8>().add(offset).write_volatile(1) };
                    }
                };
                touch();
                for _ in 0..n {
                    // SAFETY: single-threaded here; the child touches,
                    // blocks in read and exits.
                    let pid = unsafe { libc::fork() };
                    if pid == 0 {
                        touch();
                        let mut line = String::new();
                        let _ = std::io::stdin().lock().read_line(&mut line);
                        process::exit(0);
                    }
                    assert!(pid > 0, "fork failed");
                }
            }
            "thread-storm" => {
                let threads = number("a thread count") as usize;
                let rounds = number("a round count");
                for _ in 0..rounds {
                    // SAFETY: single-threaded here; the child runs its own
                    // threads and exits without returning into the steps.
                    let pid = unsafe { libc::fork() };
                    if pid == 0 {
                        let barrier = std::sync::Arc::new(std::sync::Barrier::new(threads + 1));
                        for _ in 0..threads {
                            let barrier = std::sync::Arc::clone(&barrier);
                            thread::spawn(move || {
                                barrier.wait();
                                loop {
                                    thread::park();
                                }
                            });
                        }
                        barrier.wait();
                        // exit_group: every thread goes through do_exit
                        // at once.
                        // SAFETY: ends the process.
                        unsafe { libc::syscall(libc::SYS_exit_group, 7) };
                        unreachable!();
                    }
                    assert!(pid > 0, "fork failed");
                    // SAFETY: our own child.
                    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
                }
            }
            "touch" => {
                let path = steps.next().unwrap_or_else(|| usage("touch needs a file"));
                std::fs::write(path, b"").expect("touch");
            }
            other => usage(&format!("unknown step {other:?}")),
        }
    }
}

/// The progress a `race` worker shares through its file: its charged
/// bytes before it started, the bytes it touched since, and the latter
/// when SIGTERM arrived (0 until then), each a native-endian u64.
static RACE: std::sync::atomic::AtomicPtr<u64> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

extern "C" fn race_term(_: libc::c_int) {
    let words = RACE.load(std::sync::atomic::Ordering::SeqCst);
    if !words.is_null() {
        // SAFETY: the shared mapping set up by `race`, three words long.
        unsafe {
            let touched = std::ptr::read_volatile(words.add(1));
            std::ptr::write_volatile(words.add(2), touched.max(1));
        }
    }
    // SAFETY: async-signal-safe.
    unsafe { libc::_exit(0) };
}

fn race(mib: usize, path: &str) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("open the race file");
    file.set_len(4096).expect("size the race file");
    // SAFETY: a shared mapping of a file we sized; kept for the process's life.
    let words = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
        )
    };
    assert_ne!(words, libc::MAP_FAILED, "mmap the race file");
    let words = words.cast::<u64>();
    let block = Block::map(mib << 20);
    // SAFETY: three words inside the mapping.
    unsafe { std::ptr::write_volatile(words, charged()) };
    RACE.store(words, std::sync::atomic::Ordering::SeqCst);
    // SAFETY: a handler that only touches the mapping and exits.
    unsafe { libc::signal(libc::SIGTERM, race_term as *const () as libc::sighandler_t) };
    for page in 0..block.len / 4096 {
        // SAFETY: inside the mapping.
        unsafe {
            std::ptr::write_bytes((block.addr as *mut u8).add(page * 4096), 1, 4096);
            std::ptr::write_volatile(words.add(1), (page as u64 + 1) * 4096);
        }
    }
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}

/// Forks children that exit at once, one at a time, for `ms`: how many.
fn fork_for(ms: u64) -> u64 {
    let until = monotonic_ns() + ms * 1_000_000;
    let mut forks = 0u64;
    while monotonic_ns() < until {
        // SAFETY: the child only calls _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            unsafe { libc::_exit(0) };
        }
        assert!(pid > 0, "fork failed");
        // SAFETY: our own child, no status wanted.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        forks += 1;
    }
    forks
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock and out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// RssAnon + RssShmem of this process, in bytes.
fn charged() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    ["RssAnon:", "RssShmem:"]
        .iter()
        .map(|field| {
            let line = status.lines().find(|l| l.starts_with(field)).expect(field);
            line.split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<u64>()
                .unwrap()
                * 1024
        })
        .sum()
}

/// Grows this process until its charged memory reaches `limit`: most of
/// the way in one mapping, the last stretch page by page. Returns the
/// CLOCK_MONOTONIC time right after the write that crossed, and keeps the
/// memory (dropped by the caller).
fn cross(limit: u64) -> u64 {
    const SLOW: u64 = 256 << 10;
    let now = charged();
    assert!(
        now + SLOW < limit,
        "already at {now} bytes, over {limit} minus a margin"
    );
    let bulk = (limit - now - SLOW) >> 20;
    if bulk > 0 {
        KEPT.with(|k| k.borrow_mut().push(Block::touch(bulk as usize)));
    }
    let remaining = limit.saturating_sub(charged());
    // The last stretch, page by page, plus as much again beyond the line.
    let block = Block::map(((remaining as usize * 2 + (1 << 20)) + 4095) & !4095);
    let mut crossed_at = 0;
    for page in 0..block.len / 4096 {
        block.touch_page(page);
        if crossed_at == 0 && (page as u64 + 1) * 4096 >= remaining {
            crossed_at = monotonic_ns();
        }
    }
    KEPT.with(|k| k.borrow_mut().push(block));
    crossed_at
}

thread_local! {
    /// What `cross` mapped, until the caller frees it.
    static KEPT: std::cell::RefCell<Vec<Block>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn usage(msg: &str) -> ! {
    eprintln!("wd-helper: {msg}");
    process::exit(120);
}
