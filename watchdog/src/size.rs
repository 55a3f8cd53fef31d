//! Byte sizes as users write them: `512MiB`, `2GiB`, `8192MB`, `1.5G`.

use std::{fmt, str::FromStr};

/// A size in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(pub u64);

impl Size {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

/// Why a size did not parse. The message names the input and shows the
/// accepted form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {input:?}: {reason}; write a number and a unit, e.g. 512MiB, 2GiB or 8192MB")]
pub struct SizeError {
    input: String,
    reason: String,
}

/// Units: binary ones (`KiB`, and the bare `K`, `M`, `G`, `T` as most
/// process managers read them) are powers of 1024; `KB`, `MB`, `GB`, `TB`
/// are powers of 1000.
const UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("b", 1),
    ("k", 1 << 10),
    ("kib", 1 << 10),
    ("kb", 1_000),
    ("m", 1 << 20),
    ("mib", 1 << 20),
    ("mb", 1_000_000),
    ("g", 1 << 30),
    ("gib", 1 << 30),
    ("gb", 1_000_000_000),
    ("t", 1 << 40),
    ("tib", 1 << 40),
    ("tb", 1_000_000_000_000),
];

impl FromStr for Size {
    type Err = SizeError;

    fn from_str(input: &str) -> Result<Self, SizeError> {
        let err = |reason: &str| SizeError {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        let s = input.trim();
        if s.is_empty() {
            return Err(err("it is empty"));
        }
        if s.starts_with('-') {
            return Err(err("a size cannot be negative"));
        }
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let unit = unit.trim().to_ascii_lowercase();
        let Some(&(_, multiplier)) = UNITS.iter().find(|(name, _)| *name == unit) else {
            return Err(err(&format!("unknown unit {:?}", &s[split..].trim())));
        };
        if number.is_empty() {
            return Err(err("it has no number"));
        }
        let bytes = if let Some((whole, frac)) = number.split_once('.') {
            let whole: u64 = if whole.is_empty() {
                0
            } else {
                whole.parse().map_err(|_| err("the number is malformed"))?
            };
            if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) || frac.len() > 9 {
                return Err(err("the number is malformed"));
            }
            let scale = 10u128.pow(frac.len() as u32);
            let frac: u128 = frac.parse().map_err(|_| err("the number is malformed"))?;
            let total =
                u128::from(whole) * u128::from(multiplier) + frac * u128::from(multiplier) / scale;
            u64::try_from(total).map_err(|_| err("it is too large"))?
        } else {
            let n: u64 = number.parse().map_err(|_| err("the number is malformed"))?;
            n.checked_mul(multiplier)
                .ok_or_else(|| err("it is too large"))?
        };
        Ok(Size(bytes))
    }
}

impl fmt::Display for Size {
    /// The largest binary unit that keeps a whole or one-decimal number.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut unit = 0;
        let mut scaled = self.0 as f64;
        while scaled >= 1024.0 && unit < NAMES.len() - 1 {
            scaled /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} B", self.0)
        } else if scaled.fract() == 0.0 {
            write!(f, "{scaled:.0} {}", NAMES[unit])
        } else {
            write!(f, "{scaled:.1} {}", NAMES[unit])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let cases = [
            ("512MiB", 512 << 20),
            ("2GiB", 2 << 30),
            ("8192MB", 8_192_000_000),
            ("1G", 1 << 30),
            ("64k", 64 << 10),
            ("4096", 4096),
            ("4096B", 4096),
            ("1.5GiB", 3 << 29),
            ("0.5 MiB", 1 << 19),
            (" 2 gib ", 2 << 30),
            ("0", 0),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Size>(), Ok(Size(want)), "{input}");
        }
    }

    #[test]
    fn rejects_with_a_clear_message() {
        let msg = |s: &str| s.parse::<Size>().unwrap_err().to_string();
        assert_eq!(
            msg("12XB"),
            "invalid size \"12XB\": unknown unit \"XB\"; write a number and a unit, \
             e.g. 512MiB, 2GiB or 8192MB"
        );
        assert!(msg("-5MiB").contains("cannot be negative"));
        assert!(msg("").contains("empty"));
        assert!(msg("MiB").contains("no number"));
        assert!(msg("1.2.3G").contains("malformed"));
        assert!(msg("1.G").contains("malformed"));
        assert!(msg("99999999999TiB").contains("too large"));
        assert!(msg("18446744073709551616").contains("malformed"));
    }

    #[test]
    fn displays_in_binary_units() {
        assert_eq!(Size(512).to_string(), "512 B");
        assert_eq!(Size(2 << 30).to_string(), "2 GiB");
        assert_eq!(Size(3 << 29).to_string(), "1.5 GiB");
    }
}
