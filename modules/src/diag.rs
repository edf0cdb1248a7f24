//! Diagnostics: a problem in an input file, with the place it was found.
//!
//! Every loader in converge reports problems as [`Diagnostic`]s so that an operator sees
//! `file:line:col: message` followed by the offending line, for every problem at once.

use std::fmt;

/// A place in a source text. `line` and `col` are 1-based; 0 means "unknown".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Mark {
    pub line: u32,
    pub col: u32,
}

impl Mark {
    pub const UNKNOWN: Mark = Mark { line: 0, col: 0 };

    pub fn new(line: u32, col: u32) -> Mark {
        Mark { line, col }
    }

    pub fn is_known(self) -> bool {
        self.line > 0
    }
}

/// One problem found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub mark: Mark,
    pub message: String,
}

impl Diagnostic {
    pub fn new(file: impl Into<String>, mark: Mark, message: impl Into<String>) -> Diagnostic {
        Diagnostic { file: file.into(), mark, message: message.into() }
    }

    /// The diagnostic followed by the offending line of `source` and a caret under the column.
    /// A long line is cut to a window around the column.
    pub fn render(&self, source: Option<&str>) -> String {
        let mut out = self.to_string();
        let line = source.filter(|_| self.mark.is_known()).and_then(|s| s.lines().nth(self.mark.line as usize - 1));
        if let Some(line) = line {
            let col = self.mark.col.saturating_sub(1) as usize;
            let chars: Vec<char> = line.chars().collect();
            let start = col.saturating_sub(WINDOW / 2).min(chars.len());
            let end = (start + WINDOW).min(chars.len());
            let mut shown: String = chars[start..end].iter().collect();
            let mut caret_pad: String = chars[start..col.min(chars.len()).max(start)]
                .iter()
                .map(|c| if *c == '\t' { '\t' } else { ' ' })
                .collect();
            if start > 0 {
                shown.insert(0, '…');
                caret_pad.insert(0, ' ');
            }
            if end < chars.len() {
                shown.push('…');
            }
            let gutter = self.mark.line.to_string();
            let pad = " ".repeat(gutter.len());
            out.push_str(&format!("\n{pad} |\n{gutter} | {shown}\n{pad} | {caret_pad}^"));
        }
        out
    }
}

/// How many characters of a source line are shown around a problem.
const WINDOW: usize = 100;

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.mark.is_known() {
            write!(f, "{}:{}:{}: {}", self.file, self.mark.line, self.mark.col, self.message)
        } else {
            write!(f, "{}: {}", self.file, self.message)
        }
    }
}

/// How many diagnostics are rendered before the rest are only counted.
pub const MAX_SHOWN: usize = 100;

/// All the problems of one load, sorted by place. Never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        self.0.push(d);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter()
    }

    /// Sorts by file and place, dropping exact repeats.
    pub fn sorted(mut self) -> Diagnostics {
        self.0.sort_by(|a, b| (&a.file, a.mark, &a.message).cmp(&(&b.file, b.mark, &b.message)));
        self.0.dedup();
        self
    }

    /// Every diagnostic rendered with its source line, separated by blank lines; past
    /// [`MAX_SHOWN`], only a count of the rest.
    pub fn render(&self, source: Option<&str>) -> String {
        let mut parts: Vec<String> = self.0.iter().take(MAX_SHOWN).map(|d| d.render(source)).collect();
        if self.0.len() > MAX_SHOWN {
            parts.push(format!("... and {} more problems", self.0.len() - MAX_SHOWN));
        }
        parts.join("\n\n")
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_offending_line_with_a_caret() {
        let d = Diagnostic::new("c.yaml", Mark::new(2, 5), "unknown field `mdoe`");
        let src = "resources:\n  - mdoe: 1\n";
        assert_eq!(d.render(Some(src)), "c.yaml:2:5: unknown field `mdoe`\n  |\n2 |   - mdoe: 1\n  |     ^");
    }

    #[test]
    fn a_long_line_is_cut_around_the_column() {
        let line = format!("{}XY{}", "a".repeat(500), "b".repeat(500));
        let d = Diagnostic::new("c.json", Mark::new(1, 501), "here");
        let r = d.render(Some(&line));
        let shown = r.lines().nth(2).unwrap();
        assert!(shown.chars().count() < 120, "{shown}");
        let caret = r.lines().nth(3).unwrap();
        assert_eq!(shown.chars().nth(caret.chars().count() - 1), Some('X'), "{r}");
    }

    #[test]
    fn many_problems_are_counted_past_the_limit() {
        let ds = Diagnostics((0..150).map(|i| Diagnostic::new("f", Mark::new(i + 1, 1), "bad")).collect());
        assert!(ds.render(None).ends_with("... and 50 more problems"));
    }

    #[test]
    fn unknown_place_prints_file_only() {
        let d = Diagnostic::new("c.json", Mark::UNKNOWN, "bad");
        assert_eq!(d.render(Some("x")), "c.json: bad");
    }
}
