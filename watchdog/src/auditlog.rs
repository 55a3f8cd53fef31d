//! The supervisor's audit log: JSON lines appended to a file (or standard
//! output), one write per line, optionally made durable before the decision
//! it records takes effect. A full disk or a vanished directory is reported
//! and retried, and never stops supervision.

use std::{
    io,
    path::{Path, PathBuf},
};

use serde::Serialize;
use tracing::{error, info};

use crate::jsonl::LineSink;

/// Where audit lines go.
pub struct AuditLog {
    target: Target,
    sink: Option<LineSink>,
    fsync: bool,
    /// Lines that could not be written.
    lost: u64,
    /// The last write error, while writing is failing.
    failing: Option<String>,
}

enum Target {
    File(PathBuf),
    Stdout,
    /// Nowhere: stdout is a terminal and no file was given.
    Off,
}

impl AuditLog {
    /// Appends to `path` (created 0640, never through a symlink).
    pub fn file(path: &Path, fsync: bool) -> io::Result<Self> {
        let sink = LineSink::append(path)?;
        Ok(Self {
            target: Target::File(path.to_owned()),
            sink: Some(sink),
            fsync,
            lost: 0,
            failing: None,
        })
    }

    /// The default without `--audit-log`: standard output when it is a pipe
    /// or a file (a log collector, a redirect), nothing when it is a
    /// terminal, where JSON would only clutter the human-readable log.
    pub fn default_stdout() -> io::Result<Self> {
        use std::io::IsTerminal;
        if io::stdout().is_terminal() {
            info!("audit lines are off on a terminal; pass --audit-log FILE to keep them");
            return Ok(Self {
                target: Target::Off,
                sink: None,
                fsync: false,
                lost: 0,
                failing: None,
            });
        }
        Ok(Self {
            target: Target::Stdout,
            sink: Some(LineSink::stdout()?),
            fsync: false,
            lost: 0,
            failing: None,
        })
    }

    /// Lines lost to write errors so far.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// The current write error, if writing is failing.
    pub fn failing(&self) -> Option<&str> {
        self.failing.as_deref()
    }

    /// Reopens the file (after logrotate moved it away: SIGHUP).
    pub fn reopen(&mut self) {
        if let Target::File(path) = &self.target {
            match LineSink::append(path) {
                Ok(sink) => {
                    self.sink = Some(sink);
                    info!(path = %path.display(), "audit log reopened");
                }
                Err(e) => {
                    // Lines must not keep going to a file that was moved or
                    // deleted: count them lost and retry with every line.
                    self.sink = None;
                    let what = format!("failed to reopen {}: {e}", path.display());
                    self.fail(&what);
                }
            }
        }
    }

    /// Writes one line (and syncs it, with fsync on).
    pub fn write<T: Serialize>(&mut self, line: &T) {
        if matches!(self.target, Target::Off) {
            return;
        }
        if self.sink.is_none() {
            // The file could not be opened last time (a vanished
            // directory): try again for every line.
            self.reopen();
        }
        let Some(sink) = self.sink.as_mut() else {
            self.lost += 1;
            return;
        };
        let result = sink
            .write_line(line)
            .and_then(|()| if self.fsync { sink.sync() } else { Ok(()) });
        match result {
            Ok(()) => {
                if self.failing.take().is_some() {
                    info!(lost = self.lost, "audit log writable again");
                }
            }
            Err(e) => {
                self.lost += 1;
                let what = match &self.target {
                    Target::File(p) => format!("failed to write to {}: {e}", p.display()),
                    _ => format!("failed to write to standard output: {e}"),
                };
                // The file may be gone (its directory removed): reopen next
                // time.
                if matches!(self.target, Target::File(_)) {
                    self.sink = None;
                }
                self.fail(&what);
            }
        }
    }

    fn fail(&mut self, what: &str) {
        if self.failing.as_deref() != Some(what) {
            error!(
                error = what,
                lost = self.lost,
                "audit log write failed; supervision goes on"
            );
        }
        self.failing = Some(what.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_vanished_directory_and_reopens() {
        let dir = std::env::temp_dir().join(format!("watchdog-auditlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let mut log = AuditLog::file(&path, true).unwrap();
        log.write(&serde_json::json!({"n": 1}));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"n\":1}\n");
        std::fs::remove_dir_all(&dir).unwrap();
        // The open file still takes the line (unlinked); reopening fails.
        log.write(&serde_json::json!({"n": 2}));
        log.reopen();
        assert!(log.failing().is_some_and(|e| e.contains("audit.jsonl")));
        log.write(&serde_json::json!({"n": 3}));
        assert!(log.lost() >= 1);
        // The directory comes back: the next line lands in a new file.
        std::fs::create_dir_all(&dir).unwrap();
        log.write(&serde_json::json!({"n": 4}));
        assert_eq!(log.failing(), None);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"n\":4}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reopen_follows_logrotate() {
        let dir = std::env::temp_dir().join(format!("watchdog-rotate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let mut log = AuditLog::file(&path, false).unwrap();
        log.write(&serde_json::json!({"n": 1}));
        std::fs::rename(&path, dir.join("audit.jsonl.1")).unwrap();
        log.write(&serde_json::json!({"n": 2}));
        log.reopen();
        log.write(&serde_json::json!({"n": 3}));
        let old = std::fs::read_to_string(dir.join("audit.jsonl.1")).unwrap();
        assert_eq!(old, "{\"n\":1}\n{\"n\":2}\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"n\":3}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
