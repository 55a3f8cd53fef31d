//! How the configuration file's values are read: sizes and durations as
//! people write them, signals by name or number, an environment table, an
//! argv as a string or a list. Each error names the value and shows the
//! accepted form.

use std::time::Duration;

use serde::{Deserialize, Deserializer, de::Error};

use crate::size::Size;

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A bare number is refused: `max-rss = 5` is far more likely a
        // forgotten unit than five bytes.
        let text = String::deserialize(d).map_err(|_| {
            D::Error::custom(
                "expected a size in quotes, with its unit, such as \"512MiB\" or \"2GiB\"",
            )
        })?;
        // Zero is zero in any unit (and refused as a limit with its own
        // message).
        let digits = text.trim();
        if !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && digits.bytes().any(|b| b != b'0')
        {
            return Err(D::Error::custom(format!(
                "the size {text:?} has no unit; write it with one, such as \"{}MiB\" (or \"{}B\" for bytes)",
                text.trim(),
                text.trim()
            )));
        }
        text.parse().map_err(D::Error::custom)
    }
}

/// A duration such as "10s", "500ms", "2m 30s".
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d).map_err(|_| {
        D::Error::custom("expected a duration in quotes, such as \"10s\", \"500ms\" or \"2m\"")
    })?;
    parse_duration(&text).map(Some).map_err(D::Error::custom)
}

/// Parses a duration as the command line does, with a message that shows
/// the accepted form.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim()).map_err(|e| {
        format!("invalid duration {text:?}: {e}; write a number and a unit, e.g. 10s, 500ms or 2m")
    })?;
    if duration > MAX_DURATION {
        return Err(format!("duration {text:?} is too long: at most 365 days"));
    }
    Ok(duration)
}

/// The longest duration any setting takes: deadlines are computed by
/// adding durations to the clock, which must not overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A signal by name ("SIGTERM", "TERM") or number.
pub fn signal<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Name(String),
        Number(i64),
    }
    let raw = Raw::deserialize(d)
        .map_err(|_| D::Error::custom("expected a signal name such as \"SIGTERM\", or a number"))?;
    let text = match raw {
        Raw::Name(name) => name,
        Raw::Number(n) => n.to_string(),
    };
    crate::cmd::supervise::parse_signal(&text)
        .map(Some)
        .map_err(D::Error::custom)
}

/// An environment table: `env = { KEY = "value" }`.
pub fn env<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
    let table = std::collections::BTreeMap::<String, String>::deserialize(d).map_err(|_| {
        D::Error::custom("expected a table of strings, such as env = { RUST_LOG = \"info\" }")
    })?;
    for (key, value) in &table {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(D::Error::custom(format!(
                "invalid environment variable name {key:?}"
            )));
        }
        if value.contains('\0') {
            return Err(D::Error::custom(format!(
                "the value of {key} has a NUL character, which no environment can hold"
            )));
        }
    }
    Ok(table.into_iter().collect())
}

/// An argv: a list of strings, or one string for a program without
/// arguments (never split by a shell).
pub fn argv<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    let argv = match Raw::deserialize(d).map_err(|_| {
        D::Error::custom(
            "expected a list of strings, such as [\"/usr/local/bin/notify\", \"--urgent\"]",
        )
    })? {
        Raw::One(program) => vec![program],
        Raw::Many(argv) => argv,
    };
    if argv.first().is_none_or(|p| p.is_empty()) {
        return Err(D::Error::custom(
            "the list is empty: give the program (and its arguments)",
        ));
    }
    Ok(Some(argv))
}

/// Exit codes: a non-empty list (an empty one would make every exit a
/// crash, surely not what was meant).
pub fn codes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<i32>, D::Error> {
    let codes = Vec::<i32>::deserialize(d)
        .map_err(|_| D::Error::custom("expected a list of exit codes, such as [0, 143]"))?;
    if codes.is_empty() {
        return Err(D::Error::custom(
            "the list is empty: list at least one code, e.g. [0]",
        ));
    }
    Ok(codes)
}
