//! How a process ended, decoded from the wait(2) status word.

use serde::Serialize;

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// It called exit(code); `code` is the low 8 bits, as wait(2) reports.
    Code(i32),
    /// A signal ended it; `core_dumped` says whether it left a core dump.
    Signal { signal: i32, core_dumped: bool },
    /// It is gone, but how it ended could not be learned (a sampler sees
    /// the exit of a process that is not its child, but not its status).
    Unknown,
}

impl ExitStatus {
    /// Decodes a status in wait(2) form: `code << 8` for an exit, or the
    /// signal number in the low 7 bits with 0x80 set for a core dump.
    pub fn from_wait_status(status: u32) -> Self {
        let signal = (status & 0x7f) as i32;
        if signal == 0 {
            Self::Code(((status >> 8) & 0xff) as i32)
        } else {
            Self::Signal {
                signal,
                core_dumped: status & 0x80 != 0,
            }
        }
    }

    /// The exit code, when the process exited by itself.
    pub fn code(self) -> Option<i32> {
        match self {
            Self::Code(code) => Some(code),
            Self::Signal { .. } | Self::Unknown => None,
        }
    }

    /// The signal that ended the process, if one did.
    pub fn signal(self) -> Option<i32> {
        match self {
            Self::Code(_) | Self::Unknown => None,
            Self::Signal { signal, .. } => Some(signal),
        }
    }

    /// Whether the process left a core dump.
    pub fn core_dumped(self) -> bool {
        matches!(
            self,
            Self::Signal {
                core_dumped: true,
                ..
            }
        )
    }

    /// The audit-log fields for this status.
    pub fn fields(self) -> StatusFields {
        StatusFields {
            exit_code: self.code(),
            signal: self.signal(),
            signal_name: self.signal().and_then(signal_name),
            core_dumped: self.core_dumped(),
        }
    }
}

/// The status fields of an audit line: `exit_code` or `signal` (with its
/// name), and `core_dumped`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct StatusFields {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal_name: Option<&'static str>,
    pub core_dumped: bool,
}

/// The conventional name of a Linux signal number (`SIGKILL`).
pub fn signal_name(signal: i32) -> Option<&'static str> {
    // Linux numbering (x86, arm, riscv); the macOS build only reports what
    // its own kernel delivered, for which the common ones agree.
    const NAMES: [&str; 32] = [
        "",
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    match usize::try_from(signal).ok()? {
        0 => None,
        n if n < NAMES.len() => Some(NAMES[n]),
        n if (34..=64).contains(&n) => Some("SIGRT"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_wait_statuses() {
        let cases = [
            (0x0000, ExitStatus::Code(0)),
            (3 << 8, ExitStatus::Code(3)),
            (255 << 8, ExitStatus::Code(255)),
            (
                9,
                ExitStatus::Signal {
                    signal: 9,
                    core_dumped: false,
                },
            ),
            (
                11 | 0x80,
                ExitStatus::Signal {
                    signal: 11,
                    core_dumped: true,
                },
            ),
            (
                6 | 0x80,
                ExitStatus::Signal {
                    signal: 6,
                    core_dumped: true,
                },
            ),
        ];
        for (status, want) in cases {
            assert_eq!(
                ExitStatus::from_wait_status(status),
                want,
                "status {status:#x}"
            );
        }
    }

    #[test]
    fn fields_carry_code_or_signal_never_both() {
        let code = serde_json::to_value(ExitStatus::Code(3).fields()).unwrap();
        assert_eq!(
            code,
            serde_json::json!({"exit_code": 3, "core_dumped": false})
        );
        let sig = serde_json::to_value(ExitStatus::from_wait_status(11 | 0x80).fields()).unwrap();
        assert_eq!(
            sig,
            serde_json::json!({"signal": 11, "signal_name": "SIGSEGV", "core_dumped": true})
        );
    }

    #[test]
    fn names_signals() {
        assert_eq!(signal_name(9), Some("SIGKILL"));
        assert_eq!(signal_name(15), Some("SIGTERM"));
        assert_eq!(signal_name(0), None);
        assert_eq!(signal_name(-1), None);
        assert_eq!(signal_name(200), None);
    }
}
