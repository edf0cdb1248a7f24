//! Configuration files (`/etc/converge/agent.toml`, the server's `server.toml`): flat TOML,
//! `key = value` lines with strings, integers and booleans, and `#` comments.
//!
//! That subset is all converge's settings need; anything else (tables, arrays, dates) is
//! refused with its line rather than half-understood, and so is an unknown key.

use crate::diag::{Diagnostic, Mark};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
}

/// The settings of one file, each with its line.
#[derive(Debug, Clone, Default)]
pub struct Conf {
    pub file: String,
    values: BTreeMap<String, (Value, u32)>,
}

impl Conf {
    /// Parses `text`; `known` lists the keys this file may hold.
    pub fn parse(file: &str, text: &str, known: &[&str]) -> Result<Conf, Vec<Diagnostic>> {
        let mut values = BTreeMap::new();
        let mut errors = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line_no = i as u32 + 1;
            let mut fail =
                |col: usize, msg: String| errors.push(Diagnostic::new(file, Mark::new(line_no, col as u32 + 1), msg));
            let line = strip_comment(raw).trim();
            if line.is_empty() {
                continue;
            }
            if line.starts_with('[') {
                fail(0, "tables are not used in this file: write `key = value` lines".into());
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                fail(0, "expected `key = value`".into());
                continue;
            };
            let (key, value) = (key.trim(), value.trim());
            let col = raw.find(value).unwrap_or(0);
            if !known.contains(&key) {
                fail(raw.find(key).unwrap_or(0), format!("unknown setting `{key}` (settings: {})", known.join(", ")));
                continue;
            }
            match parse_value(value) {
                Ok(v) => {
                    if values.insert(key.to_string(), (v, line_no)).is_some() {
                        fail(0, format!("`{key}` is set twice"));
                    }
                }
                Err(e) => fail(col, e),
            }
        }
        if errors.is_empty() { Ok(Conf { file: file.to_string(), values }) } else { Err(errors) }
    }

    /// A diagnostic at the line of `key` (the file alone when it is not set).
    pub fn err(&self, key: &str, msg: String) -> Diagnostic {
        let line = self.values.get(key).map_or(0, |(_, l)| *l);
        Diagnostic::new(&self.file, Mark::new(line, if line == 0 { 0 } else { 1 }), msg)
    }

    pub fn str(&self, key: &str) -> Result<Option<&str>, Diagnostic> {
        match self.values.get(key) {
            None => Ok(None),
            Some((Value::Str(s), _)) => Ok(Some(s)),
            Some(_) => Err(self.err(key, format!("`{key}` must be a string in double quotes"))),
        }
    }

    pub fn int(&self, key: &str) -> Result<Option<i64>, Diagnostic> {
        match self.values.get(key) {
            None => Ok(None),
            Some((Value::Int(n), _)) => Ok(Some(*n)),
            Some(_) => Err(self.err(key, format!("`{key}` must be a whole number"))),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, Diagnostic> {
        match self.values.get(key) {
            None => Ok(None),
            Some((Value::Bool(b), _)) => Ok(Some(*b)),
            Some(_) => Err(self.err(key, format!("`{key}` must be true or false"))),
        }
    }

    /// A duration written as a string: `"30m"`, `"12h"`, `"7d"`, `"90s"`.
    pub fn duration(&self, key: &str) -> Result<Option<i64>, Diagnostic> {
        let Some(s) = self.str(key)? else { return Ok(None) };
        parse_duration(s).map(Some).map_err(|e| self.err(key, format!("`{key}`: {e}")))
    }

    /// A duration of at least `min` seconds.
    pub fn duration_at_least(&self, key: &str, min: i64) -> Result<Option<i64>, Diagnostic> {
        match self.duration(key)? {
            Some(d) if d < min => Err(self.err(key, format!("`{key}` is {d}s; it must be at least {min}s"))),
            d => Ok(d),
        }
    }

    /// A required string.
    pub fn required(&self, key: &str) -> Result<&str, Diagnostic> {
        self.str(key)?.ok_or_else(|| Diagnostic::new(&self.file, Mark::UNKNOWN, format!("`{key}` is not set")))
    }
}

/// The longest duration anything takes: a century. Every time computed from a duration (an
/// expiry, a certificate's end) then stays far inside what the types and formats can hold.
pub const MAX_DURATION: i64 = 100 * 365 * 86_400;

/// Parses a duration like `7d`, `12h`, `30m` or `90s` (seconds when unit-less), at most
/// [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<i64, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let bad = || format!("`{}` is not a duration like 7d, 12h, 30m or 90s", crate::text::clip(s, 40));
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
        _ => Err(format!("`{}` is longer than the 100 years a duration can be", crate::text::clip(s, 40))),
    }
}

/// A line without its comment (a `#` outside a string).
fn strip_comment(line: &str) -> &str {
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            '\\' if in_string && !escaped => {
                escaped = true;
                continue;
            }
            '"' if !escaped => in_string = !in_string,
            '#' if !in_string => return &line[..i],
            _ => {}
        }
        escaped = false;
    }
    line
}

fn parse_value(v: &str) -> Result<Value, String> {
    if let Some(inner) = v.strip_prefix('"') {
        let Some(body) = inner.strip_suffix('"') else {
            return Err("the string is not closed with `\"`".into());
        };
        let mut out = String::with_capacity(body.len());
        let mut chars = body.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('"') => out.push('"'),
                    Some('\\') => out.push('\\'),
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    other => return Err(format!("unknown escape `\\{}`", other.map(String::from).unwrap_or_default())),
                },
                '"' => return Err("a `\"` inside a string must be written `\\\"`".into()),
                c => out.push(c),
            }
        }
        return Ok(Value::Str(out));
    }
    match v {
        "true" => return Ok(Value::Bool(true)),
        "false" => return Ok(Value::Bool(false)),
        _ => {}
    }
    if let Ok(n) = v.replace('_', "").parse::<i64>() {
        return Ok(Value::Int(n));
    }
    Err(format!("`{v}` is not a string (\"...\"), a whole number, or true/false"))
}

/// Writes a string as a TOML basic string.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &["server", "interval", "port", "verbose"];

    #[test]
    fn reads_the_subset() {
        let c = Conf::parse(
            "a.toml",
            "# agent\nserver = \"https://x:8443\" # the server\nport = 8_443\nverbose = true\ninterval = \"30m\"\n",
            KNOWN,
        )
        .unwrap();
        assert_eq!(c.str("server").unwrap(), Some("https://x:8443"));
        assert_eq!(c.int("port").unwrap(), Some(8443));
        assert_eq!(c.bool("verbose").unwrap(), Some(true));
        assert_eq!(c.duration("interval").unwrap(), Some(1800));
        assert!(c.int("server").unwrap_err().to_string().contains("a.toml:2:1: `server` must be a whole number"));
    }

    #[test]
    fn refuses_what_it_does_not_understand_with_the_line() {
        let e = Conf::parse("a.toml", "[agent]\nsevrer = \"x\"\nport = [1]\nserver = \"open\n", KNOWN).unwrap_err();
        let msgs: Vec<String> = e.iter().map(|d| d.to_string()).collect();
        assert_eq!(msgs.len(), 4, "{msgs:?}");
        assert!(msgs[0].starts_with("a.toml:1:1: tables are not used"));
        assert!(msgs[1].contains("a.toml:2:1: unknown setting `sevrer`"));
        assert!(msgs[2].contains("a.toml:3:8: `[1]` is not a string"));
        assert!(msgs[3].contains("not closed"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("7d").unwrap(), 604_800);
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert!(parse_duration("7w").is_err());
        assert!(parse_duration("d").is_err());
        assert!(parse_duration("9223372036854775807s").unwrap_err().contains("100 years"));
        assert!(parse_duration("99999999999999999999d").is_err());
        assert_eq!(parse_duration("36500d").unwrap(), MAX_DURATION);
        let c = Conf::parse("a.toml", "server = \"x\"\ninterval = \"2s\"\n", KNOWN).unwrap();
        let e = c.duration_at_least("interval", 10).unwrap_err().to_string();
        assert!(e.starts_with("a.toml:2:1: `interval` is 2s; it must be at least 10s"), "{e}");
        assert_eq!(c.duration_at_least("interval", 2).unwrap(), Some(2));
    }

    #[test]
    fn quoting_round_trips() {
        let s = "a \"b\" \\ c\n";
        let c = Conf::parse("a", &format!("server = {}\n", quote(s)), KNOWN).unwrap();
        assert_eq!(c.str("server").unwrap(), Some(s));
    }
}
