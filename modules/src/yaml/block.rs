//! The block YAML catalogs are written in, read a line at a time from bytes.
//!
//! `saphyr-parser` reads a character at a time, through a scanner, a token queue and a parser:
//! on a catalog of large quoted contents that is most of a no-op run. Almost every catalog
//! (and every one `converge-server` or a person writes out of habit) is block mappings and
//! sequences of one-line scalars, comments and blank lines; that subset is read here, a line
//! at a time, a scalar copied in runs between its escapes. It gives the very events (and
//! places) saphyr gives, so the one [`Builder`](super::Builder) makes the tree of both.
//!
//! Anything beyond the subset (a multi-line scalar, flow collections, block scalars, anchors,
//! tags, tabs, another document, and every syntax error) is not judged here: the reader
//! says so ([`Bail`]) and the caller reads the text again with saphyr, which accepts it or
//! places its error. So this reader never decides what is valid YAML, only what it can read
//! exactly; the `yaml` fuzz target holds it to saphyr's events on arbitrary input.

use saphyr_parser::{Event, Marker, ScalarStyle, ScanError, Span};
use std::borrow::Cow;
use std::cell::Cell;

/// Bytes read at a time (and the first size of the line buffer, which grows to hold a line).
const WINDOW: usize = 64 * 1024;

/// The longest implicit key read here, in bytes (saphyr refuses one of 1,024 characters).
const MAX_KEY: usize = 1000;

/// The text goes beyond the subset this reader reads exactly (or could not be read).
#[derive(Debug)]
pub(super) struct Bail;

type Step = Result<(Event<'static>, Span), Bail>;

/// An open block collection and its indentation.
#[derive(Clone, Copy)]
enum Open {
    Map(usize),
    Seq(usize),
}

#[derive(Clone, Copy)]
enum State {
    Start,
    Document,
    /// The root node, on the current (fresh) line.
    Root,
    /// The value of a key whose `:` is at `colon`, in a mapping indented `n`: the cursor is
    /// after the `:`.
    Value {
        n: usize,
        colon: Marker,
    },
    /// The item of a sequence: the cursor is after its `-`.
    Item,
    /// A node ended: the collections it closes, or the next key or item.
    Next,
    End,
    Done,
}

/// A pull reader of the block subset over a reader, giving saphyr's events.
pub(super) struct Block<'f, R> {
    r: R,
    buf: Vec<u8>,
    filled: usize,
    eof: bool,
    /// The current line is `buf[start..eol]`; `at` is the cursor in it.
    start: usize,
    eol: usize,
    at: usize,
    line: usize,
    ascii: bool,
    /// The indentation of the current line, when `fresh`; `None` when the text has ended.
    indent: Option<usize>,
    /// The current line is a content line not read from its indentation on yet.
    fresh: bool,
    stack: Vec<Open>,
    state: State,
    queued: Option<(Event<'static>, Span)>,
    bailed: &'f Cell<bool>,
}

impl<'f, R: std::io::Read> Block<'f, R> {
    pub(super) fn new(r: R, bailed: &'f Cell<bool>) -> Self {
        Block {
            r,
            buf: Vec::new(),
            filled: 0,
            eof: false,
            start: 0,
            eol: 0,
            at: 0,
            line: 0,
            ascii: true,
            indent: None,
            fresh: false,
            stack: Vec::new(),
            state: State::Start,
            queued: None,
            bailed,
        }
    }

    /// The next event, as saphyr's parser gives it; an error once the text goes beyond the
    /// subset (and `bailed` is set).
    pub(super) fn next_event(&mut self) -> Option<Result<(Event<'static>, Span), ScanError>> {
        if let Some(q) = self.queued.take() {
            return Some(Ok(q));
        }
        if matches!(self.state, State::Done) {
            return None;
        }
        match self.step() {
            Ok(ev) => Some(Ok(ev)),
            Err(Bail) => {
                self.bailed.set(true);
                self.state = State::Done;
                Some(Err(ScanError::new_str(Marker::new(0, 0, 0), "beyond the block subset")))
            }
        }
    }

    fn step(&mut self) -> Step {
        match self.state {
            State::Start => {
                self.state = State::Document;
                Ok(self.event(Event::StreamStart, self.here()))
            }
            State::Document => {
                let Some(_) = self.content_line(true)? else {
                    self.state = State::Done;
                    return Ok(self.event(Event::StreamEnd, self.here()));
                };
                let explicit = self.at == self.start
                    && self.rest().starts_with(b"---")
                    && matches!(self.rest().get(3), None | Some(b' '));
                let at = self.here();
                if explicit {
                    self.at += 3;
                    self.blank_to_eol()?;
                    // A document of nothing after its `---` is left to saphyr.
                    self.content_line(false)?.ok_or(Bail)?;
                }
                self.state = State::Root;
                Ok(self.event(Event::DocumentStart(explicit), at))
            }
            State::Root => self.fresh_node(),
            State::Value { n, colon } => {
                self.skip_spaces();
                if self.rest_is_blank() {
                    match self.content_line(false)? {
                        Some(k) if k > n || (k == n && self.is_dash()) => return self.fresh_node(),
                        _ => {
                            self.state = State::Next;
                            return Ok(self.event(Event::Scalar(Cow::Borrowed(""), ScalarStyle::Plain, 0, None), colon));
                        }
                    }
                }
                if self.is_dash() {
                    return Err(Bail);
                }
                let (ev, at, key) = self.scalar()?;
                if key.is_some() {
                    return Err(Bail);
                }
                self.state = State::Next;
                Ok((ev, Span::new(at, at)))
            }
            State::Item => {
                self.skip_spaces();
                if self.rest_is_blank() || self.is_dash() {
                    return Err(Bail);
                }
                let col = self.at - self.start;
                self.node_here(col)
            }
            State::Next => self.next(),
            State::End => {
                self.state = State::Done;
                Ok(self.event(Event::StreamEnd, self.here()))
            }
            State::Done => Err(Bail),
        }
    }

    /// A node on a fresh line, at its indentation.
    fn fresh_node(&mut self) -> Step {
        let k = self.indent.ok_or(Bail)?;
        self.fresh = false;
        if self.is_dash() {
            // saphyr places a sequence at its `-`, but one as indented as the mapping it is a
            // value of at its first item.
            let indentless = matches!(self.stack.last(), Some(Open::Map(m)) if *m == k);
            let mut at = self.here();
            self.at += 1;
            if indentless {
                self.skip_spaces();
                at = self.here();
            }
            self.stack.push(Open::Seq(k));
            self.state = State::Item;
            return Ok(self.event(Event::SequenceStart(0, None), at));
        }
        self.node_here(k)
    }

    /// A scalar at the cursor (column `col`, in bytes: only spaces and a `-` precede it), or
    /// the mapping whose first key it is.
    fn node_here(&mut self, col: usize) -> Step {
        let (ev, at, key) = self.scalar()?;
        let span = Span::new(at, at);
        match key {
            Some(colon) => {
                self.stack.push(Open::Map(col));
                self.queued = Some((ev, span));
                self.state = State::Value { n: col, colon };
                Ok((Event::MappingStart(0, None), span))
            }
            None => {
                self.state = State::Next;
                Ok((ev, span))
            }
        }
    }

    /// After a node: what it closes, or the next key or item.
    fn next(&mut self) -> Step {
        if !self.fresh {
            self.blank_to_eol()?;
            self.content_line(false)?;
        }
        let ended = self.indent.is_none();
        let k = self.indent.unwrap_or(0);
        match self.stack.last().copied() {
            None if ended => {
                self.state = State::End;
                Ok(self.event(Event::DocumentEnd, self.here()))
            }
            None => Err(Bail),
            Some(Open::Map(m)) if ended || k < m => {
                self.stack.pop();
                Ok(self.event(Event::MappingEnd, self.here()))
            }
            Some(Open::Map(m)) if k == m && !self.is_dash() => {
                self.fresh = false;
                let (ev, at, key) = self.scalar()?;
                let colon = key.ok_or(Bail)?;
                self.state = State::Value { n: m, colon };
                Ok((ev, Span::new(at, at)))
            }
            Some(Open::Seq(m)) if ended || k < m || (k == m && !self.is_dash()) => {
                self.stack.pop();
                Ok(self.event(Event::SequenceEnd, self.here()))
            }
            Some(Open::Seq(m)) if k == m => {
                self.fresh = false;
                self.at += 1;
                self.state = State::Item;
                self.step()
            }
            Some(_) => Err(Bail),
        }
    }

    fn event(&self, ev: Event<'static>, at: Marker) -> (Event<'static>, Span) {
        (ev, Span::new(at, at))
    }

    /// The place of the cursor, as saphyr counts it (columns in characters, from 0).
    fn here(&self) -> Marker {
        self.marker(self.at)
    }

    fn marker(&self, pos: usize) -> Marker {
        let col = if self.ascii {
            pos - self.start
        } else {
            self.buf[self.start..pos].iter().filter(|&&b| b & 0xC0 != 0x80).count()
        };
        Marker::new(0, self.line.max(1), col)
    }

    fn rest(&self) -> &[u8] {
        &self.buf[self.at..self.eol]
    }

    fn skip_spaces(&mut self) {
        while self.at < self.eol && self.buf[self.at] == b' ' {
            self.at += 1;
        }
    }

    /// Nothing but a comment (after a space, or starting the line) is left on the line.
    fn rest_is_blank(&self) -> bool {
        self.at == self.eol || (self.buf[self.at] == b'#' && (self.at == self.start || self.buf[self.at - 1] == b' '))
    }

    fn blank_to_eol(&mut self) -> Result<(), Bail> {
        self.skip_spaces();
        if self.rest_is_blank() { Ok(()) } else { Err(Bail) }
    }

    /// A block sequence's `-` at the cursor.
    fn is_dash(&self) -> bool {
        self.buf.get(self.at) == Some(&b'-') && (self.at + 1 == self.eol || self.buf[self.at + 1] == b' ')
    }

    /// Moves to the next line with content, at its indentation, which it returns (`None`
    /// when the text ends). A document marker beyond the first line is left to saphyr.
    fn content_line(&mut self, first: bool) -> Result<Option<usize>, Bail> {
        while self.next_line()? {
            self.skip_spaces();
            if self.rest_is_blank() {
                continue;
            }
            let indent = self.at - self.start;
            let line = &self.buf[self.start..self.eol];
            let marker =
                (line.starts_with(b"---") || line.starts_with(b"...")) && matches!(line.get(3), None | Some(b' '));
            if marker && (!first || line[0] == b'.') {
                return Err(Bail);
            }
            self.indent = Some(indent);
            self.fresh = true;
            return Ok(Some(indent));
        }
        self.indent = None;
        self.fresh = true;
        self.start = self.eol;
        self.at = self.eol;
        Ok(None)
    }

    /// Reads the next line; false at the end of the text. A line is UTF-8 with no control
    /// characters (tabs and carriage returns included) and no byte order mark.
    fn next_line(&mut self) -> Result<bool, Bail> {
        let mut from = if self.line == 0 { 0 } else { self.eol + 1 };
        loop {
            if from > self.filled {
                return Ok(false);
            }
            if let Some(i) = memchr::memchr(b'\n', &self.buf[from..self.filled]) {
                (self.start, self.eol) = (from, from + i);
                break;
            }
            if self.eof {
                if from == self.filled {
                    return Ok(false);
                }
                (self.start, self.eol) = (from, self.filled);
                break;
            }
            self.buf.copy_within(from..self.filled, 0);
            self.filled -= from;
            from = 0;
            if self.filled == self.buf.len() {
                self.buf.resize((2 * self.buf.len()).max(WINDOW), 0);
            }
            loop {
                match self.r.read(&mut self.buf[self.filled..]) {
                    Ok(0) => self.eof = true,
                    Ok(n) => self.filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return Err(Bail),
                }
                break;
            }
        }
        self.line += 1;
        self.at = self.start;
        let line = &self.buf[self.start..self.eol];
        // One pass (in blocks the compiler makes vector code of) for the usual line: printable ASCII.
        self.ascii = line.chunks(64).all(|c| c.iter().fold(true, |ok, &b| ok & (0x20..0x7F).contains(&b)));
        if !self.ascii
            && (line.iter().any(|&b| b < 0x20 || b == 0x7F)
                || std::str::from_utf8(line).is_err()
                || memchr::memmem::find(line, "\u{FEFF}".as_bytes()).is_some())
        {
            return Err(Bail);
        }
        Ok(true)
    }

    /// The scalar at the cursor, its place, and the place of its `:` when it is an implicit
    /// key. The cursor is left after the scalar (and after the `:` of a key).
    fn scalar(&mut self) -> Result<(Event<'static>, Marker, Option<Marker>), Bail> {
        let p = self.at;
        let line = &self.buf[..self.eol];
        let blank_after = |i: usize| i + 1 >= line.len() || line[i + 1] == b' ';
        let (text, style, end) = match line[p] {
            b'"' => {
                let (text, end) = double_quoted(&line[p + 1..]).ok_or(Bail)?;
                (text, ScalarStyle::DoubleQuoted, p + 1 + end)
            }
            b'\'' => {
                let (text, end) = single_quoted(&line[p + 1..]).ok_or(Bail)?;
                (text, ScalarStyle::SingleQuoted, p + 1 + end)
            }
            b'-' | b'?' | b':' if blank_after(p) => return Err(Bail),
            b',' | b'[' | b']' | b'{' | b'}' | b'#' | b'&' | b'*' | b'!' | b'|' | b'>' | b'%' | b'@' | b'`' => {
                return Err(Bail);
            }
            _ => {
                let mut end = p;
                while end < line.len() {
                    match memchr::memchr2(b':', b'#', &line[end..]) {
                        None => end = line.len(),
                        Some(i) => {
                            let c = end + i;
                            let stops = if line[c] == b':' { blank_after(c) } else { line[c - 1] == b' ' };
                            end = c + usize::from(!stops);
                            if stops {
                                break;
                            }
                            continue;
                        }
                    }
                }
                let mut trimmed = end;
                while trimmed > p && line[trimmed - 1] == b' ' {
                    trimmed -= 1;
                }
                let text = std::str::from_utf8(&line[p..trimmed]).map_err(|_| Bail)?.to_string();
                (text, ScalarStyle::Plain, end)
            }
        };
        let at = self.marker(p);
        let mut after = end;
        while after < line.len() && line[after] == b' ' {
            after += 1;
        }
        let key = after < line.len() && line[after] == b':' && blank_after(after);
        self.at = if key { after + 1 } else { end };
        let colon = if key {
            if after - p > MAX_KEY {
                return Err(Bail);
            }
            Some(self.marker(after))
        } else {
            None
        };
        Ok((Event::Scalar(Cow::Owned(text), style, 0, None), at, colon))
    }
}

/// A double-quoted scalar's text after its opening quote, to its closing quote on the same
/// line: the text and the index after the closing quote. `None` when it goes on to another
/// line, or has an escape saphyr refuses.
fn double_quoted(s: &[u8]) -> Option<(String, usize)> {
    let first = memchr::memchr2(b'"', b'\\', s)?;
    if s[first] == b'"' {
        return Some((std::str::from_utf8(&s[..first]).ok()?.to_string(), first + 1));
    }
    // Escaped: the bytes are gathered (the rest of the line bounds them, nearly always) and
    // checked as UTF-8 once.
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    let mut j = first;
    loop {
        out.extend_from_slice(&s[i..j]);
        if s[j] == b'"' {
            return Some((String::from_utf8(out).ok()?, j + 1));
        }
        let (c, len) = match *s.get(j + 1)? {
            b'0' => ('\0', 0),
            b'a' => ('\x07', 0),
            b'b' => ('\x08', 0),
            b't' => ('\t', 0),
            b'n' => ('\n', 0),
            b'v' => ('\x0b', 0),
            b'f' => ('\x0c', 0),
            b'r' => ('\r', 0),
            b'e' => ('\x1b', 0),
            b' ' => (' ', 0),
            b'"' => ('"', 0),
            b'/' => ('/', 0),
            b'\\' => ('\\', 0),
            b'N' => ('\u{85}', 0),
            b'_' => ('\u{A0}', 0),
            b'L' => ('\u{2028}', 0),
            b'P' => ('\u{2029}', 0),
            b'x' => ('\0', 2),
            b'u' => ('\0', 4),
            b'U' => ('\0', 8),
            _ => return None,
        };
        i = j + 2;
        let c = if len == 0 {
            c
        } else {
            let hex = s.get(i..i + len)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            i += len;
            char::from_u32(hex.iter().fold(0u32, |v, &b| (v << 4) | (b as char).to_digit(16).unwrap_or(0)))?
        };
        out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
        j = i + memchr::memchr2(b'"', b'\\', &s[i..])?;
    }
}

/// A single-quoted scalar's text after its opening quote (`''` is a quote), to its closing
/// quote on the same line.
fn single_quoted(s: &[u8]) -> Option<(String, usize)> {
    let mut out = String::new();
    let mut i = 0;
    loop {
        let j = i + memchr::memchr(b'\'', &s[i..])?;
        out.push_str(std::str::from_utf8(&s[i..j]).ok()?);
        if s.get(j + 1) == Some(&b'\'') {
            out.push('\'');
            i = j + 2;
        } else {
            return Some((out, j + 1));
        }
    }
}
