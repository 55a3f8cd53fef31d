//! The supervisor's audit log: JSON lines appended to a file (or standard
//! output), one write per line, optionally made durable before the decision
//! it records takes effect. A full disk or a vanished directory is reported
//! once, retried, and never stops supervision; the lines it cost are
//! reported in the log itself (`audit_lines_lost`) once writing works again.

use std::{io, path::Path};

use serde::Serialize;
use tracing::info;

use crate::jsonl::{LineSink, OpenError};

/// Where audit lines go: a file or standard output, or nowhere (`None`:
/// standard output is a terminal and no file was given).
pub struct AuditLog {
    sink: Option<LineSink>,
}

impl AuditLog {
    /// Appends to `path` (created 0640, never through a symlink, and only
    /// when this user owns it and group and others cannot write it).
    pub fn file(path: &Path, fsync: bool) -> Result<Self, OpenError> {
        let mut sink = LineSink::append(path)?;
        sink.set_fsync(fsync);
        Ok(Self { sink: Some(sink) })
    }

    /// The default without `--audit-log`: standard output when it is a pipe
    /// or a file (a log collector, a redirect), nothing when it is a
    /// terminal, where JSON would only clutter the human-readable log.
    pub fn default_stdout() -> io::Result<Self> {
        use std::io::IsTerminal;
        if io::stdout().is_terminal() {
            info!("audit lines are off on a terminal; pass --audit-log FILE to keep them");
            return Ok(Self { sink: None });
        }
        Ok(Self {
            sink: Some(LineSink::stdout()?),
        })
    }

    /// Whether lines are written at all (not off on a terminal).
    pub fn is_on(&self) -> bool {
        self.sink.is_some()
    }

    /// Lines lost to write errors so far.
    pub fn lost(&self) -> u64 {
        self.sink.as_ref().map_or(0, LineSink::lost)
    }

    /// The current write error, if writing is failing.
    pub fn failing(&self) -> Option<&str> {
        self.sink.as_ref().and_then(LineSink::failing)
    }

    /// Reopens the file (after logrotate moved it away: SIGHUP), with the
    /// checks of [`AuditLog::file`]. A failure is logged once and retried
    /// with every later line.
    pub fn reopen(&mut self) {
        if let Some(sink) = self.sink.as_mut() {
            // The sink logs the failure and counts what it loses.
            let _ = sink.reopen();
        }
    }

    /// Writes one line (and syncs it, with fsync on). A failure is counted
    /// and logged once per episode by the sink, reported in the log itself
    /// once writing works again, and never stops supervision.
    pub fn write<T: Serialize>(&mut self, line: &T) {
        if let Some(sink) = self.sink.as_mut() {
            let _ = sink.write_line(line);
        }
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
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["event"], "audit_lines_lost", "{text}");
        assert_eq!(lines[0]["count"], 1, "{text}");
        assert_eq!(lines[1]["n"], 4, "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Guards against SIGHUP reopening a file that was replaced by one
    /// others can write: refused, counted, and taken up again once fixed.
    #[test]
    fn reopen_refuses_an_unsafe_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("watchdog-unsafe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let mut log = AuditLog::file(&path, false).unwrap();
        log.write(&serde_json::json!({"n": 1}));
        std::fs::rename(&path, dir.join("audit.jsonl.1")).unwrap();
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        log.reopen();
        assert!(
            log.failing().is_some_and(|e| e.contains("chmod go-w")),
            "{:?}",
            log.failing()
        );
        log.write(&serde_json::json!({"n": 2}));
        assert_eq!(log.lost(), 1);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        log.write(&serde_json::json!({"n": 3}));
        assert_eq!(log.failing(), None);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("{\"ts\":"), "{text}");
        assert!(
            text.contains("\"event\":\"audit_lines_lost\",\"count\":1,"),
            "{text}"
        );
        assert!(text.ends_with("{\"n\":3}\n"), "{text}");
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
