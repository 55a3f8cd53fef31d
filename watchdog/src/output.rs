//! Where the services' standard output and error go.
//!
//! By default they share the daemon's. Two cases need more:
//! - JSON logs (`--log-format json`): the daemon's standard error is read
//!   by journald or a log shipper as one JSON object per line, which a
//!   service's own lines (or a line it left unfinished, glued to the next
//!   record) would break. Each service then writes into pipes the daemon
//!   reads, and every line it writes becomes a record of its own
//!   (`target` `watchdog::output`, with `service`, `pid` and `stream`).
//! - Audit lines on standard output (`supervise` without `--audit-log`,
//!   into a pipe): the service's standard output goes to standard error, so
//!   that standard output carries nothing but whole audit lines.

use std::{
    collections::HashMap,
    io::{self, Write},
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::{Mutex, OnceLock, mpsc},
    time::SystemTime,
};

/// What the services' standard output and error are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChildOutput {
    /// The daemon's own.
    #[default]
    Inherit,
    /// Standard output to the daemon's standard error (its standard output
    /// carries the audit lines).
    StdoutToStderr,
    /// Both read by the daemon, each line written as a JSON record on its
    /// standard error.
    JsonRecords,
}

static MODE: OnceLock<ChildOutput> = OnceLock::new();

/// Chooses, once, before the first service starts.
pub fn set(mode: ChildOutput) {
    let _ = MODE.set(mode);
}

pub fn mode() -> ChildOutput {
    MODE.get().copied().unwrap_or_default()
}

/// A record's text holds at most this many characters: escaped, with its
/// fields, it stays under the 4096 bytes a pipe writes whole, so records
/// never mix with the daemon's own lines. Longer lines go in several
/// records, all but the last marked `"continued": true`.
const CHUNK_CHARS: usize = 512;

/// The most a line is held for its end (a service that writes without
/// newlines): past it, what was held goes out as a record.
const HOLD_MAX: usize = 16 * 1024;

/// A stream of a service's to forward.
struct Source {
    fd: OwnedFd,
    service: String,
    pid: u32,
    stream: &'static str,
    /// A memory hook's, not the service's own.
    hook: bool,
    held: Vec<u8>,
}

/// The thread that reads every forwarded stream.
struct Forwarder {
    add: mpsc::Sender<Source>,
    /// Written to wake the thread when a stream is added.
    wake: OwnedFd,
}

static FORWARDER: Mutex<Option<Forwarder>> = Mutex::new(None);

/// Streams being forwarded and not at their end yet.
static OPEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Waits, up to `limit`, for the forwarded streams to reach their end
/// (the services' last lines written) before the daemon exits.
pub fn finish(limit: std::time::Duration) {
    let deadline = std::time::Instant::now() + limit;
    while OPEN.load(std::sync::atomic::Ordering::Acquire) > 0
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Starts the forwarding thread if it is not running: called before a
/// child gets pipes, so that a child never writes into a pipe nobody will
/// read.
pub fn ready() -> io::Result<()> {
    forwarder().map(drop)
}

/// The forwarding thread's handle, the thread started if need be.
fn forwarder() -> io::Result<std::sync::MutexGuard<'static, Option<Forwarder>>> {
    let mut guard = FORWARDER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if guard.is_none() {
        *guard = Some(start()?);
    }
    Ok(guard)
}

/// Forwards `fd` (the read end of a service's pipe) as JSON records.
pub fn forward(
    fd: OwnedFd,
    service: &str,
    pid: u32,
    stream: &'static str,
    hook: bool,
) -> io::Result<()> {
    let guard = forwarder()?;
    let forwarder = guard
        .as_ref()
        .ok_or_else(|| io::Error::other("no forwarder"))?;
    OPEN.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    forwarder
        .add
        .send(Source {
            fd,
            service: service.to_owned(),
            pid,
            stream,
            hook,
            held: Vec::new(),
        })
        .map_err(|_| {
            OPEN.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            io::Error::other("the output thread is gone")
        })?;
    // SAFETY: one byte into our own non-blocking pipe; a full pipe already
    // wakes the thread.
    unsafe { libc::write(forwarder.wake.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    Ok(())
}

fn start() -> io::Result<Forwarder> {
    let (wake_r, wake_w) = crate::runner::cloexec_pipe()?;
    for fd in [&wake_r, &wake_w] {
        // SAFETY: fcntl on descriptors we own.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
    let (add, added) = mpsc::channel();
    // Through the log writer's queue: a stalled reader of standard error
    // costs records (counted), never the reading of the pipes, which would
    // then fill and hold every service (and the ended runs' descriptors).
    let mut out: Box<dyn Write + Send> = match crate::cmd::log_writer() {
        Some(writer) => Box::new(writer),
        None => Box::new(io::stderr()),
    };
    std::thread::Builder::new()
        .name("watchdog-output".into())
        .spawn(move || run(&wake_r, &added, &mut out))?;
    Ok(Forwarder { add, wake: wake_w })
}

/// Reads every stream as it has something, until the process exits.
fn run(wake: &OwnedFd, added: &mpsc::Receiver<Source>, out: &mut impl Write) {
    let mut sources: HashMap<RawFd, Source> = HashMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut fds: Vec<libc::pollfd> = std::iter::once(wake.as_raw_fd())
            .chain(sources.keys().copied())
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: a valid array of pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            // Never given up on: the services would die of SIGPIPE.
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            continue;
        }
        if fds[0].revents != 0 {
            // SAFETY: reading our own non-blocking wake pipe empty.
            while unsafe { libc::read(wake.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
            while let Ok(source) = added.try_recv() {
                sources.insert(source.fd.as_raw_fd(), source);
            }
        }
        for pollfd in &fds[1..] {
            if pollfd.revents == 0 {
                continue;
            }
            let Some(source) = sources.get_mut(&pollfd.fd) else {
                continue;
            };
            // SAFETY: reading into our buffer from a descriptor we own.
            let got = unsafe { libc::read(pollfd.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if got > 0 {
                source.take(&buf[..got as usize], out);
                continue;
            }
            if got < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // The end (every writer closed it), or an error: what is held
            // goes out, the stream is done.
            if let Some(mut source) = sources.remove(&pollfd.fd) {
                source.flush(out);
                OPEN.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            }
        }
    }
}

impl Source {
    /// Takes what was read: each whole line a record, the rest held (a
    /// line longer than [`HOLD_MAX`] goes out in parts of that size, cut
    /// between characters).
    fn take(&mut self, bytes: &[u8], out: &mut impl Write) {
        self.held.extend_from_slice(bytes);
        loop {
            let end = self.held.iter().position(|&b| b == b'\n');
            match end {
                Some(end) if end <= HOLD_MAX => {
                    let line: Vec<u8> = self.held.drain(..=end).collect();
                    self.emit(&line[..end], out);
                }
                _ if self.held.len() > HOLD_MAX => {
                    let cut = char_boundary(&self.held[..HOLD_MAX]);
                    let part: Vec<u8> = self.held.drain(..cut).collect();
                    self.emit(&part, out);
                }
                _ => break,
            }
        }
    }

    /// What is held, as a record of its own.
    fn flush(&mut self, out: &mut impl Write) {
        if !self.held.is_empty() {
            let held = std::mem::take(&mut self.held);
            self.emit(&held, out);
        }
    }

    fn emit(&self, line: &[u8], out: &mut impl Write) {
        let text = String::from_utf8_lossy(line);
        let text = text.strip_suffix('\r').unwrap_or(&text);
        let chars: Vec<char> = text.chars().collect();
        let chunks: Vec<String> = if chars.is_empty() {
            vec![String::new()]
        } else {
            chars
                .chunks(CHUNK_CHARS)
                .map(|c| c.iter().collect())
                .collect()
        };
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut fields = serde_json::json!({
                "message": chunk,
                "service": self.service,
                "pid": self.pid,
                "stream": self.stream,
            });
            if i < last {
                fields["continued"] = serde_json::Value::Bool(true);
            }
            if self.hook {
                fields["hook"] = serde_json::Value::Bool(true);
            }
            let record = serde_json::json!({
                "timestamp": humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
                "level": "INFO",
                "fields": fields,
                "target": "watchdog::output",
            });
            let mut line = record.to_string();
            line.push('\n');
            // One write per record; an error (a reader gone) loses it.
            let _ = out.write_all(line.as_bytes());
        }
    }
}

/// Where `bytes` can be cut without splitting a UTF-8 character: its
/// length, less an unfinished character at its end.
fn char_boundary(bytes: &[u8]) -> usize {
    match std::str::from_utf8(bytes) {
        Err(e) if e.error_len().is_none() && e.valid_up_to() > 0 => e.valid_up_to(),
        _ => bytes.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> Source {
        let (r, _w) = crate::runner::cloexec_pipe().unwrap();
        Source {
            fd: r,
            service: "svc".into(),
            pid: 42,
            stream: "stderr",
            hook: false,
            held: Vec::new(),
        }
    }

    fn records(out: &[u8]) -> Vec<serde_json::Value> {
        String::from_utf8_lossy(out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect()
    }

    /// Lines become records whole, however they were read; an unfinished
    /// line waits for its end, or goes out when the stream ends.
    #[test]
    fn lines_become_records() {
        let mut source = source();
        let mut out = Vec::new();
        source.take(b"progress: 50%", &mut out);
        assert!(out.is_empty());
        source.take(b" done\r\nnext\n\xff bad utf-8\nlast", &mut out);
        source.flush(&mut out);
        let records = records(&out);
        let messages: Vec<&str> = records
            .iter()
            .map(|r| r["fields"]["message"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(
            messages,
            ["progress: 50% done", "next", "\u{fffd} bad utf-8", "last"]
        );
        assert_eq!(records[0]["fields"]["service"], "svc");
        assert_eq!(records[0]["fields"]["pid"], 42);
        assert_eq!(records[0]["fields"]["stream"], "stderr");
        assert_eq!(records[0]["target"], "watchdog::output");
        assert!(records[0]["timestamp"].as_str().unwrap().ends_with('Z'));
    }

    /// A long line goes in records that each fit a pipe's atomic write;
    /// control characters (escaped six times longer) included.
    #[test]
    fn long_lines_are_split_in_records_a_pipe_writes_whole() {
        let mut source = source();
        let mut out = Vec::new();
        let line: String = "\u{1}".repeat(3 * CHUNK_CHARS + 7);
        source.take(format!("{line}\n").as_bytes(), &mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        for record in text.lines() {
            assert!(record.len() < 4096, "{} bytes", record.len());
        }
        let split = records(&out);
        assert_eq!(split.len(), 4);
        assert_eq!(split[0]["fields"]["continued"], true);
        assert!(split[3]["fields"].get("continued").is_none());
        let joined: String = split
            .iter()
            .map(|r| r["fields"]["message"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(joined, line);
        // Without a newline, it goes out in parts of HOLD_MAX, whatever
        // the reads, never cutting a character in two.
        let mut out = Vec::new();
        let text = format!("a{}", "é".repeat(3 * HOLD_MAX / 2));
        for read in text.as_bytes().chunks(65_536) {
            source.take(read, &mut out);
        }
        source.flush(&mut out);
        let parted = records(&out);
        let joined: String = parted
            .iter()
            .map(|r| r["fields"]["message"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(joined, text, "no character cut in two");
        let parts = parted
            .iter()
            .filter(|r| r["fields"].get("continued").is_none())
            .count();
        // 1 + 3 x 16384 bytes, its two-byte characters starting at odd
        // offsets: parts of 16383 bytes, and what is left.
        assert_eq!(parts, 4, "{} bytes in parts of {HOLD_MAX}", text.len());
        assert!(source.held.is_empty());
    }
}
