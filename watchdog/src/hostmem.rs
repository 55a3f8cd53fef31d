//! The host's memory (or the daemon's container's): pure telemetry that
//! warns when it runs short and says when it recovered, with hysteresis.
//! It never kills anything.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, de::Error};

use crate::size::Size;

/// A level of memory in use: a share of what there is, or a size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Threshold {
    /// Percent of the total, in (0, 100].
    Percent(f64),
    Bytes(u64),
}

impl Threshold {
    /// The level in bytes for a total of `total` bytes.
    pub fn bytes_of(self, total: u64) -> u64 {
        match self {
            Self::Percent(p) => (total as f64 * p / 100.0) as u64,
            Self::Bytes(b) => b,
        }
    }

    /// The default recovery level for this warning level: 5 points lower,
    /// or 95% of a size.
    pub fn default_recovery(self) -> Self {
        match self {
            Self::Percent(p) => Self::Percent((p - 5.0).max(p / 2.0)),
            Self::Bytes(b) => Self::Bytes(b / 20 * 19),
        }
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Percent(p) => write!(f, "{p}%"),
            Self::Bytes(b) => write!(f, "{b}B"),
        }
    }
}

impl FromStr for Threshold {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if let Some(number) = t.strip_suffix('%') {
            return match number.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => Ok(Self::Percent(p)),
                _ => Err(format!(
                    "invalid share {text:?}: write a percentage above 0 and at most 100, such as \"90%\""
                )),
            };
        }
        match t.parse::<Size>() {
            Ok(size) if size.bytes() > 0 => Ok(Self::Bytes(size.bytes())),
            Ok(_) => Err(format!("invalid level {text:?}: it must be more than 0")),
            Err(e) => Err(format!(
                "{e}; or write a share of the total, such as \"90%\""
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Threshold {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d).map_err(|_| {
            D::Error::custom("expected a share or a size in quotes, such as \"90%\" or \"12GiB\"")
        })?;
        text.parse().map_err(D::Error::custom)
    }
}
