//! UTC timestamps, spelled RFC 3339 with a `Z` (`2026-11-30T03:50:07Z`), whole seconds; and
//! the workspace's one reader of the clock (clippy's `disallowed-methods` refuses
//! `SystemTime::now` everywhere else, and `Instant::now` anywhere else in this crate).
//!
//! Parsing and formatting are the `time` crate's; this type only fixes the spelling (UTC,
//! whole seconds) and keeps arithmetic checked: a time from input can be any `i64`, and
//! nothing reachable from input may overflow or panic.

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use std::fmt;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Text that is not an RFC 3339 time (shown escaped and clipped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a time like 2026-11-30T03:50:07Z")]
pub struct NotATime(pub String);

/// Seconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

/// The longest time text worth reading: RFC 3339 with nanoseconds and an offset is 35 bytes.
const MAX_TEXT: usize = 64;

/// Milliseconds since the Unix epoch, now: for serials and names that sort by time.
#[allow(clippy::disallowed_methods)] // the one wall-clock reader
pub fn unix_millis() -> u64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Measures how long something took, on the monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct Stopwatch(std::time::Instant);

impl Stopwatch {
    #[allow(clippy::disallowed_methods)] // the one monotonic-clock reader of this crate
    pub fn start() -> Stopwatch {
        Stopwatch(std::time::Instant::now())
    }

    pub fn elapsed(&self) -> std::time::Duration {
        self.0.elapsed()
    }
}

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp(i64::try_from(unix_millis() / 1000).unwrap_or(i64::MAX))
    }

    /// Parses RFC 3339 (`2026-11-30T03:50:07Z`, fractions dropped, any offset taken to UTC).
    pub fn parse(s: &str) -> Result<Timestamp, NotATime> {
        let bad = || NotATime(crate::text::clip(s, MAX_TEXT).into_owned());
        if s.len() > MAX_TEXT {
            return Err(bad());
        }
        let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|_| bad())?;
        Ok(Timestamp(t.unix_timestamp()))
    }

    /// `self` plus `seconds`, or `None` past what a time can be.
    pub fn checked_add(self, seconds: i64) -> Option<Timestamp> {
        let t = self.0.checked_add(seconds)?;
        OffsetDateTime::from_unix_timestamp(t).ok().map(|_| Timestamp(t))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Years beyond 9999 have no RFC 3339 spelling: such a time (only ever from hostile
        // input) is shown as seconds rather than refused.
        match OffsetDateTime::from_unix_timestamp(self.0).ok().and_then(|t| t.format(&Rfc3339).ok()) {
            Some(text) => f.write_str(&text),
            None => write!(f, "@{}", self.0),
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Timestamp::parse(&s).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_instants() {
        assert_eq!(Timestamp::parse("1970-01-01T00:00:00Z").unwrap(), Timestamp(0));
        assert_eq!(Timestamp::parse("2026-11-30T03:50:07Z").unwrap().to_string(), "2026-11-30T03:50:07Z");
        assert_eq!(Timestamp::parse("2000-02-29T12:00:00.123+00:00").unwrap(), Timestamp(951_825_600));
        assert_eq!(Timestamp::parse("2026-11-30T04:50:07+01:00").unwrap().to_string(), "2026-11-30T03:50:07Z");
        assert!(Timestamp::parse("2001-02-29T00:00:00Z").is_err());
        assert!(Timestamp::parse("2026-11-30 03:50:07").is_err());
    }

    #[test]
    fn hostile_text_is_an_error_never_a_panic() {
        // A multi-byte character where a digit or separator belongs (it used to split a
        // character and panic), control bytes, huge text.
        for s in ["2026-11-3é03:50:07Z", "202é-11-30T03:50:07Z", "2026-11-30T03:50:0\u{1b}Z", "\u{0}", ""] {
            assert!(Timestamp::parse(s).is_err(), "{s:?}");
        }
        let e = Timestamp::parse(&"9".repeat(1 << 20)).unwrap_err().to_string();
        assert!(e.len() < 200, "the message is bounded: {} bytes", e.len());
        let e = Timestamp::parse("2026-11-30T03:50:07Z\n[ERROR] forged").unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn arithmetic_is_checked() {
        assert_eq!(Timestamp(10).checked_add(5), Some(Timestamp(15)));
        assert_eq!(Timestamp(i64::MAX - 1).checked_add(5), None);
        assert_eq!(Timestamp::now().checked_add(i64::MAX / 2), None, "past the year 9999");
        assert_eq!(Timestamp(i64::MAX).to_string(), format!("@{}", i64::MAX));
    }

    proptest! {
        #[test]
        fn display_then_parse_is_identity(secs in -62_135_596_800i64..253_402_300_799) {
            let t = Timestamp(secs);
            prop_assert_eq!(Timestamp::parse(&t.to_string()).unwrap(), t);
        }

        #[test]
        fn any_text_parses_or_errs(s in ".{0,40}") {
            let _ = Timestamp::parse(&s);
        }
    }
}
