//! Human-friendly quantities on the command line: byte sizes ("200GiB", "4MiB", "1.5G") and
//! time-to-live values ("60s", "5m", "never").

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A size in bytes, parsed from forms such as `4MiB`, `200GiB`, `1G`, `512k` or a plain number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid size {input:?}: {reason} (examples: 4MiB, 200GiB, 1G, 65536)")]
pub struct ParseSizeError {
    input: String,
    reason: &'static str,
}

impl FromStr for ByteSize {
    type Err = ParseSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseSizeError {
            input: s.to_string(),
            reason,
        };
        let trimmed = s.trim();
        let split = trimmed
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        if number.is_empty() {
            return Err(err("it does not start with a number"));
        }
        let value: f64 = number.parse().map_err(|_| err("the number is malformed"))?;
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "ki" | "kib" => 1 << 10,
            "m" | "mb" => 1000 * 1000,
            "mi" | "mib" => 1 << 20,
            "g" | "gb" => 1000 * 1000 * 1000,
            "gi" | "gib" => 1 << 30,
            "t" | "tb" => 1000u64.pow(4),
            "ti" | "tib" => 1 << 40,
            _ => return Err(err("the unit is unknown (use B, KiB, MiB, GiB, TiB, or K, M, G, T)")),
        };
        let bytes = value * multiplier as f64;
        if !bytes.is_finite() || bytes > u64::MAX as f64 {
            return Err(err("it is too large"));
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
        for (name, size) in UNITS {
            if self.0 >= size {
                let value = self.0 as f64 / size as f64;
                return if self.0.is_multiple_of(size) {
                    write!(f, "{}{name}", self.0 / size)
                } else {
                    write!(f, "{value:.1}{name}")
                };
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// How long metadata (stat results) stays cached: a duration, or `never` expires (for
/// immutable snapshots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetadataTtl {
    Expires(Duration),
    Never,
}

impl MetadataTtl {
    /// Whether an entry cached `age` ago is still fresh.
    pub fn is_fresh(&self, age: Duration) -> bool {
        match self {
            MetadataTtl::Never => true,
            MetadataTtl::Expires(ttl) => age < *ttl,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid metadata TTL {input:?}: use a duration such as 60s, 5m, 0s, or `never`")]
pub struct ParseTtlError {
    input: String,
}

impl FromStr for MetadataTtl {
    type Err = ParseTtlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        if trimmed.eq_ignore_ascii_case("never") {
            return Ok(MetadataTtl::Never);
        }
        if trimmed == "0" {
            return Ok(MetadataTtl::Expires(Duration::ZERO));
        }
        humantime::parse_duration(trimmed)
            .map(MetadataTtl::Expires)
            .map_err(|_| ParseTtlError { input: s.to_string() })
    }
}

impl fmt::Display for MetadataTtl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetadataTtl::Never => f.write_str("never"),
            MetadataTtl::Expires(d) => write!(f, "{}", humantime::format_duration(*d)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_binary_and_decimal_units() {
        assert_eq!("4MiB".parse::<ByteSize>(), Ok(ByteSize(4 << 20)));
        assert_eq!("200GiB".parse::<ByteSize>(), Ok(ByteSize(200 << 30)));
        assert_eq!("1G".parse::<ByteSize>(), Ok(ByteSize(1_000_000_000)));
        assert_eq!("1.5KiB".parse::<ByteSize>(), Ok(ByteSize(1536)));
        assert_eq!("65536".parse::<ByteSize>(), Ok(ByteSize(65536)));
        assert_eq!(" 8 mib ".parse::<ByteSize>(), Ok(ByteSize(8 << 20)));
    }

    #[test]
    fn bad_sizes_say_what_is_wrong() {
        let err = "12 parsecs".parse::<ByteSize>().unwrap_err().to_string();
        assert!(err.contains("unit is unknown"), "{err}");
        let err = "GiB".parse::<ByteSize>().unwrap_err().to_string();
        assert!(err.contains("does not start with a number"), "{err}");
    }

    #[test]
    fn sizes_display_compactly() {
        assert_eq!(ByteSize(4 << 20).to_string(), "4MiB");
        assert_eq!(ByteSize(1536).to_string(), "1.5KiB");
        assert_eq!(ByteSize(12).to_string(), "12B");
    }

    #[test]
    fn ttl_parses_durations_and_never() {
        assert_eq!("never".parse::<MetadataTtl>().unwrap(), MetadataTtl::Never);
        assert_eq!(
            "60s".parse::<MetadataTtl>().unwrap(),
            MetadataTtl::Expires(Duration::from_secs(60))
        );
        assert_eq!(
            "0".parse::<MetadataTtl>().unwrap(),
            MetadataTtl::Expires(Duration::ZERO)
        );
        assert!("soon".parse::<MetadataTtl>().is_err());
        assert!(!MetadataTtl::Expires(Duration::ZERO).is_fresh(Duration::ZERO));
        assert!(MetadataTtl::Never.is_fresh(Duration::from_secs(1 << 40)));
    }
}
