//! Text that came from elsewhere (a node's name, a resource id from a catalog, a tool's error
//! output, a refused body), made safe to print on one line of a terminal or a log.
//!
//! [`clean`] escapes what a terminal or a log reader would obey rather than show: line breaks
//! (a forged log line), escape sequences (a rewritten screen), other control characters and
//! the bidirectional overrides that reorder what is shown. [`clip`] also bounds the length, so
//! a megabyte name floods nothing. Pure; the escaped text is unambiguous (`\n`, `\u{1b}`).

use std::borrow::Cow;
use std::fmt::Write as _;

/// Characters shown escaped rather than written.
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        || c == '\u{feff}'
}

/// `s` with every control character, and every character that reorders or hides text,
/// escaped; borrowed when there is none (the common case costs a scan).
pub fn clean(s: &str) -> Cow<'_, str> {
    if !s.chars().any(hidden) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if hidden(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// [`clean`], and at most `max` bytes of the original (cut at a character boundary), with how
/// much was left out.
pub fn clip(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return clean(s);
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    Cow::Owned(format!("{}... ({} more bytes)", clean(&s[..cut]), s.len() - cut))
}

/// Lossy UTF-8 of `bytes`, clipped: for a body or a tool's output that may be anything.
pub fn clip_bytes(bytes: &[u8], max: usize) -> String {
    let head = &bytes[..bytes.len().min(max)];
    let mut s = clip(&String::from_utf8_lossy(head), max).into_owned();
    if bytes.len() > max {
        let _ = write!(s, "... ({} more bytes)", bytes.len() - max);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn what_a_terminal_would_obey_is_shown_escaped() {
        assert!(matches!(clean("file:/etc/motd"), Cow::Borrowed(_)));
        assert_eq!(clean("a\nb\r\tc"), "a\\nb\\r\\tc");
        assert_eq!(clean("\x1b[2J\x1b[31mred"), "\\u{1b}[2J\\u{1b}[31mred");
        assert_eq!(clean("x\u{202e}gpj.exe"), "x\\u{202e}gpj.exe");
        assert_eq!(clean("\u{7f}\u{9b}"), "\\u{7f}\\u{9b}");
        assert_eq!(clean("naïve 日本"), "naïve 日本", "printable text stays as it is");
    }

    #[test]
    fn clipping_bounds_the_length_at_a_character_boundary() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("ééé", 3), "é... (4 more bytes)");
        let huge = "x".repeat(1 << 20);
        assert!(clip(&huge, 100).len() < 140);
        assert_eq!(clip_bytes(b"\xff\xfeok\n", 100), "\u{fffd}\u{fffd}ok\\n");
        assert!(clip_bytes(&[b'a'; 5000], 10).ends_with("(4990 more bytes)"));
    }

    proptest! {
        #[test]
        fn nothing_hidden_survives(s in "\\PC*|.*") {
            let c = clean(&s);
            prop_assert!(!c.chars().any(hidden), "{:?}", c);
            let k = clip(&s, 7);
            prop_assert!(!k.chars().any(hidden));
        }
    }
}
