//! Settings files (`/etc/converge/agent.toml`, the server's `server.toml`): TOML, read by the
//! `toml` crate into each file's own struct (unknown keys refused) and written by its
//! serializer. Every mistake is a [`Diagnostic`] with the file, line and column of the key or
//! value at fault, and checks made after parsing point there too ([`Settings::at`]).

use crate::diag::{Diagnostic, Mark};
use serde::de::{self, DeserializeOwned};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::ops::Range;

pub use toml::Spanned;

/// The longest duration anything takes: a century. Every time computed from a duration (an
/// expiry, a certificate's end) then stays far inside what the types and formats can hold.
pub const MAX_DURATION: i64 = 100 * 365 * 86_400;

/// Why text is not a duration (shown escaped and clipped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("`{0}` is not a duration like 7d, 12h, 30m or 90s")]
    Malformed(String),
    #[error("`{0}` is longer than the 100 years a duration can be")]
    TooLong(String),
}

/// Parses a duration like `7d`, `12h`, `30m` or `90s` (seconds when unit-less), at most
/// [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<i64, DurationError> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let shown = || crate::text::clip(s, 40).into_owned();
    let bad = || DurationError::Malformed(shown());
    let n: i64 = n.parse().map_err(|_| bad())?;
    let unit = match unit {
        "d" => 86_400,
        "h" => 3600,
        "m" => 60,
        "s" | "" => 1,
        _ => return Err(bad()),
    };
    match n.checked_mul(unit) {
        Some(d) if d <= MAX_DURATION => Ok(d),
        _ => Err(DurationError::TooLong(shown())),
    }
}

/// A duration in a settings file, spelled `"7d"`, `"12h"`, `"30m"` or `"90s"`; in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub i64);

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(Duration).map_err(de::Error::custom)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let n = self.0;
        let text = match () {
            _ if n != 0 && n % 86_400 == 0 => format!("{}d", n / 86_400),
            _ if n != 0 && n % 3600 == 0 => format!("{}h", n / 3600),
            _ if n != 0 && n % 60 == 0 => format!("{}m", n / 60),
            _ => format!("{n}s"),
        };
        s.serialize_str(&text)
    }
}

/// The text of one settings file, for parsing it and pointing at its lines.
pub struct Settings<'a> {
    pub file: &'a str,
    pub text: &'a str,
}

impl Settings<'_> {
    /// Parses the file into `T` (which refuses unknown keys with `deny_unknown_fields`).
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, Diagnostic> {
        toml::from_str(self.text).map_err(|e| {
            let message = e.message().trim_end().to_string();
            // A missing key has the empty span at the start: it is the file's fault as a whole.
            self.diagnostic(e.span().filter(|s| *s != (0..0)), message)
        })
    }

    /// A diagnostic at a value read from the file.
    pub fn at<T>(&self, value: &Spanned<T>, message: impl Into<String>) -> Diagnostic {
        self.diagnostic(Some(value.span()), message.into())
    }

    /// A diagnostic for the file as a whole (a key that is missing, say).
    pub fn whole(&self, message: impl Into<String>) -> Diagnostic {
        self.diagnostic(None, message.into())
    }

    /// `value` if it is at least `min` seconds, else a diagnostic naming `key` at its line.
    pub fn at_least(&self, key: &str, value: &Spanned<Duration>, min: i64) -> Result<i64, Diagnostic> {
        let d = value.get_ref().0;
        if d < min {
            return Err(self.at(value, format!("`{key}` is {d}s; it must be at least {min}s")));
        }
        Ok(d)
    }

    fn diagnostic(&self, span: Option<Range<usize>>, message: String) -> Diagnostic {
        let mark = span.map_or(Mark::UNKNOWN, |s| {
            let before = &self.text.as_bytes()[..s.start.min(self.text.len())];
            let line = before.iter().filter(|b| **b == b'\n').count() as u32 + 1;
            let start = before.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            let col = String::from_utf8_lossy(&before[start..]).chars().count() as u32 + 1;
            Mark::new(line, col)
        });
        Diagnostic::new(self.file, mark, message)
    }
}

/// `value` written as TOML by the serializer, after `header` as comment lines.
pub fn write<T: Serialize>(header: &[&str], value: &T) -> String {
    let mut out: String = header.iter().map(|l| format!("# {l}\n")).collect();
    // The structs written here hold strings, numbers and durations only: always TOML.
    out.push_str(&toml::to_string(value).expect("settings serialize as TOML"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct File {
        server: String,
        #[serde(default)]
        port: Option<u16>,
        #[serde(default)]
        verbose: Option<bool>,
        interval: Option<Spanned<Duration>>,
    }

    fn parse(text: &str) -> Result<File, String> {
        Settings { file: "a.toml", text }.parse::<File>().map_err(|d| d.to_string())
    }

    #[test]
    fn reads_a_file_and_points_at_every_kind_of_mistake() {
        let f = parse(
            "# agent\nserver = \"https://x:8443\" # the server\nport = 8_443\nverbose = true\ninterval = \"30m\"\n",
        )
        .unwrap();
        assert_eq!((f.server.as_str(), f.port, f.verbose), ("https://x:8443", Some(8443), Some(true)));
        assert_eq!(f.interval.unwrap().into_inner(), Duration(1800));
        for (text, want) in [
            ("server = \"x\"\nsevrer = \"y\"\n", "a.toml:2:1: unknown field `sevrer`"),
            ("server = \"x\"\nport = \"8443\"\n", "a.toml:2:8: invalid type: string \"8443\", expected u16"),
            ("server = \"x\"\nport = 70000\n", "a.toml:2:8:"),
            ("server = \"x\"\ninterval = \"7w\"\n", "a.toml:2:12: `7w` is not a duration"),
            ("server = \"open\n", "a.toml:1:"),
            ("port = 1\n", "a.toml: missing field `server`"),
            ("server = \"x\"\nserver = \"y\"\n", "a.toml:2:1: duplicate key"),
            ("[agent]\nserver = \"x\"\n", "a.toml:1:"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.starts_with(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_check_after_parsing_names_the_line() {
        let text = "server = \"x\"\ninterval = \"2s\"\n";
        let s = Settings { file: "a.toml", text };
        let f: File = s.parse().unwrap();
        let e = s.at_least("interval", f.interval.as_ref().unwrap(), 10).unwrap_err().to_string();
        assert!(e.starts_with("a.toml:2:12: `interval` is 2s; it must be at least 10s"), "{e}");
        assert_eq!(s.at_least("interval", f.interval.as_ref().unwrap(), 2).unwrap(), 2);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("7d").unwrap(), 604_800);
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert!(parse_duration("7w").is_err());
        assert!(parse_duration("d").is_err());
        assert!(parse_duration("9223372036854775807s").unwrap_err().to_string().contains("100 years"));
        assert!(parse_duration("99999999999999999999d").is_err());
        assert_eq!(parse_duration("36500d").unwrap(), MAX_DURATION);
    }

    #[test]
    fn what_is_written_reads_back() {
        #[derive(Serialize)]
        struct Out<'a> {
            server: &'a str,
            interval: Duration,
        }
        for server in ["a \"b\" \\ c\n", "https://x:8443", "é\u{7}"] {
            let text = write(&["written by a test"], &Out { server, interval: Duration(1800) });
            assert!(text.starts_with("# written by a test\n") && text.contains("interval = \"30m\"\n"), "{text}");
            let f = parse(&text).unwrap();
            assert_eq!(f.server, server);
            assert_eq!(f.interval.unwrap().into_inner(), Duration(1800));
        }
        let spelled = |n| toml::to_string(&Out { server: "x", interval: Duration(n) }).unwrap();
        assert!(spelled(90).contains("\"90s\"") && spelled(7200).contains("\"2h\"") && spelled(0).contains("\"0s\""));
    }
}
