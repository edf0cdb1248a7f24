//! A YAML reader that keeps the place of every node, and a serde `Deserializer` over it.
//!
//! Operators write catalogs and roles by hand; every mistake must be reported with its line and
//! column, all at once. `yaml_serde` stops at the first error, so human input is first read into
//! a tree of [`Node`]s (YAML 1.2 core schema, via `saphyr-parser`), then decoded with serde from
//! that tree. The decoder reports every unknown field of a struct at once and attaches the place
//! of the node that failed to every other error.
//!
//! Scalars are typed by what the reader asks for, as in YAML's core schema: a plain `0644` read
//! as a string is the string `"0644"`, read as an integer it is 644. Quoted scalars are always
//! strings. Anchors and aliases are expanded (with a bound); tags other than `!!str` are refused.

mod block;

use crate::diag::Mark;
use saphyr_parser::{Event, Parser, ScalarStyle, ScanError, Span};
use serde::de::{self, DeserializeSeed, Visitor};
use std::collections::HashMap;
use std::fmt;

/// A YAML node and the place it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub mark: Mark,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `plain` is false for quoted, block and `!!str` scalars: those are always strings.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// The text of a scalar node.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar { text, plain: true } if is_null(text))
    }

    /// The entries of a mapping node.
    pub fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.value {
            Value::Map(entries) => Some(entries),
            _ => None,
        }
    }

    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.value {
            Value::Seq(items) => Some(items),
            _ => None,
        }
    }

    /// What the node is, for messages: "a mapping", "a list", "the string \"x\"".
    pub fn describe(&self) -> String {
        match &self.value {
            Value::Scalar { .. } if self.is_null() => "nothing (null)".to_string(),
            Value::Scalar { text, .. } => format!("{text:?}"),
            Value::Seq(_) => "a list".to_string(),
            Value::Map(_) => "a mapping".to_string(),
        }
    }
}

/// A YAML syntax problem (or several duplicate keys).
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub problems: Vec<(Mark, String)>,
}

/// The most nodes a document may expand to (aliases included): a bound against alias bombs.
pub const MAX_NODES: usize = 5_000_000;

/// How deep collections may nest: far beyond any catalog or role, and well within the stack
/// that building, decoding and dropping the tree take a level at a time (`- - - …` on one line
/// nests a level every two bytes).
pub const MAX_DEPTH: usize = 256;

/// Reads one YAML document. An empty document is a null scalar.
pub fn parse(src: &str) -> Result<Node, SyntaxError> {
    parse_document(src).map_err(|e| tab_hint(src, e))
}

/// A tab where YAML wants indentation is reported by the parser where the scanner noticed it
/// (often the end of the line before): said plainly, at the tab itself.
fn tab_hint(src: &str, mut e: SyntaxError) -> SyntaxError {
    if let Some((m, msg)) = e.problems.first_mut()
        && msg.contains("tab")
    {
        let from = (m.line.max(1) as usize).saturating_sub(1);
        let indented = src.lines().enumerate().skip(from).find(|(_, l)| l.trim_start_matches(' ').starts_with('\t'));
        if let Some((i, line)) = indented {
            let col = line.find('\t').unwrap_or(0) + 1;
            *m = Mark::new(i as u32 + 1, col as u32);
            *msg = "YAML indents with spaces, never tabs: this line begins with a tab (replace it with spaces)".into();
        }
    }
    e
}

/// Reads one YAML document whose root is a mapping, handing each item of the root's `key`
/// sequence to `item` as soon as it is read, instead of keeping it in the tree: the tree
/// returned holds that key with an empty sequence. A catalog of ten thousand resources is
/// so decoded one resource at a time, never held twice (as nodes and as resources). When the
/// root is not a mapping or `key` is not a sequence, nothing is handed over.
pub fn parse_streaming<'s>(src: &str, key: &'s str, item: &'s mut (dyn FnMut(Node) + 's)) -> Result<Node, SyntaxError> {
    parse_with(src, Some((key, item))).map_err(|e| tab_hint(src, e))
}

fn parse_document(src: &str) -> Result<Node, SyntaxError> {
    parse_with(src, None)
}

fn parse_with<'s>(src: &str, stream: Option<(&'s str, &'s mut (dyn FnMut(Node) + 's))>) -> Result<Node, SyntaxError> {
    build(Parser::new_from_str(src), stream)
}

/// [`parse_streaming`] from a reader: the text is never in memory whole. Bytes that are not
/// UTF-8, and a failed read, are syntax errors (at the place the parser had reached).
pub fn parse_streaming_from<'s, R: std::io::Read>(
    r: R,
    key: &'s str,
    item: &'s mut (dyn FnMut(Node) + 's),
) -> Result<Node, SyntaxError> {
    let failed = std::cell::Cell::new(None);
    let window = Window {
        r,
        bytes: Vec::new(),
        at: 0,
        filled: 0,
        chars: Vec::with_capacity(2 * WINDOW),
        pos: 0,
        lookahead: 0,
        end: false,
        failed: &failed,
    };
    let parsed = build(Parser::new(window), Some((key, item)));
    match failed.take() {
        Some(why) => Err(SyntaxError { problems: vec![(Mark::UNKNOWN, why)] }),
        None => parsed,
    }
}

/// How many bytes of a reader are read, and characters decoded, at a time.
const WINDOW: usize = 64 * 1024;

/// The parser's input over a reader: a window of decoded characters, refilled (a block of
/// bytes checked as UTF-8 at once) as the parser asks to look ahead, so that looking at a
/// character is an index, never a decoding. As with a whole text, everything looked ahead
/// stays counted (`buflen`), and past the end is `\0`. The first failure (a read, bytes that
/// are not UTF-8) ends the text and is kept in `failed`.
struct Window<'f, R> {
    r: R,
    /// Bytes read, `at..filled` not decoded yet.
    bytes: Vec<u8>,
    at: usize,
    filled: usize,
    chars: Vec<char>,
    pos: usize,
    lookahead: usize,
    end: bool,
    failed: &'f std::cell::Cell<Option<String>>,
}

impl<R: std::io::Read> Window<'_, R> {
    /// Makes at least `n` characters from the current one available, unless the text ends.
    #[inline]
    fn ensure(&mut self, n: usize) {
        if self.chars.len() - self.pos < n {
            self.refill(n);
        }
    }

    #[inline(never)]
    fn refill(&mut self, n: usize) {
        if self.pos >= WINDOW {
            self.chars.drain(..self.pos);
            self.pos = 0;
        }
        while self.chars.len() - self.pos < n && !self.end {
            let rest = &self.bytes[self.at..self.filled];
            let valid = std::str::from_utf8(rest).map_or_else(|e| e.valid_up_to(), str::len);
            if valid > 0 {
                let text = std::str::from_utf8(&rest[..valid]).unwrap_or_default();
                self.chars.extend(text.chars());
                self.at += valid;
                continue;
            }
            // Nothing decodable: the bytes of a character cut by the read, or not UTF-8.
            let cut = rest.is_empty()
                || (rest.len() < 4 && std::str::from_utf8(rest).is_err_and(|e| e.error_len().is_none()));
            let partial = !rest.is_empty();
            if !cut {
                self.fail("the text is not UTF-8".into());
            } else if !self.read() {
                if partial {
                    self.fail("the text is not UTF-8: it ends inside a character".into());
                }
                self.end = true;
            }
        }
    }

    /// Reads more bytes after those not decoded yet; false at the end of the reader.
    fn read(&mut self) -> bool {
        self.bytes.copy_within(self.at..self.filled, 0);
        let kept = self.filled - self.at;
        (self.at, self.filled) = (0, kept);
        if self.bytes.len() < WINDOW {
            self.bytes.resize(WINDOW, 0);
        }
        loop {
            match self.r.read(&mut self.bytes[kept..]) {
                Ok(n) => {
                    self.filled = kept + n;
                    return n > 0;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fail(format!("cannot read the text: {e}"));
                    return false;
                }
            }
        }
    }

    fn fail(&mut self, why: String) {
        self.failed.set(Some(why));
        self.end = true;
    }

    #[inline]
    fn at(&self, n: usize) -> char {
        self.chars.get(self.pos + n).copied().unwrap_or('\0')
    }
}

impl<R: std::io::Read> saphyr_parser::Input for Window<'_, R> {
    #[inline]
    fn lookahead(&mut self, count: usize) {
        self.ensure(count);
        self.lookahead = self.lookahead.max(count);
    }

    #[inline]
    fn buflen(&self) -> usize {
        self.lookahead
    }

    #[inline]
    fn bufmaxlen(&self) -> usize {
        16
    }

    #[inline]
    fn raw_read_ch(&mut self) -> char {
        self.ensure(1);
        let c = self.at(0);
        self.pos = (self.pos + 1).min(self.chars.len());
        c
    }

    #[inline]
    fn raw_read_non_breakz_ch(&mut self) -> Option<char> {
        self.ensure(1);
        let c =
            self.chars.get(self.pos).copied().filter(|&c| !saphyr_parser::input::is_breakz(c) && c != '\u{FEFF}')?;
        self.pos += 1;
        Some(c)
    }

    #[inline]
    fn skip(&mut self) {
        self.ensure(1);
        self.pos = (self.pos + 1).min(self.chars.len());
    }

    #[inline]
    fn skip_n(&mut self, count: usize) {
        self.ensure(count);
        self.pos = (self.pos + count).min(self.chars.len());
    }

    #[inline]
    fn peek(&self) -> char {
        self.at(0)
    }

    #[inline]
    fn peek_nth(&self, n: usize) -> char {
        self.at(n)
    }

    #[inline]
    fn peek_opt(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }
}

/// [`parse_streaming_from`] by the block reader (`block.rs`), much faster on the YAML catalogs
/// are written in; `None` when the text goes beyond what it reads (or cannot be read): nothing
/// is wrong with it then, but it must be read again with [`parse_streaming_from`], and
/// whatever was handed to `item` is to be forgotten.
pub fn parse_block_from<'s, R: std::io::Read>(
    r: R,
    key: &'s str,
    item: &'s mut (dyn FnMut(Node) + 's),
) -> Option<Result<Node, SyntaxError>> {
    let bailed = std::cell::Cell::new(false);
    let parsed = build(block::Block::new(r, &bailed), Some((key, item)));
    if bailed.get() { None } else { Some(parsed) }
}

/// What the builder reads: saphyr's parser, or the block reader that gives the same events.
trait Events<'a> {
    fn next_event(&mut self) -> Option<Result<(Event<'a>, Span), ScanError>>;
}

impl<'a, I: saphyr_parser::Input> Events<'a> for Parser<'a, I> {
    fn next_event(&mut self) -> Option<Result<(Event<'a>, Span), ScanError>> {
        Parser::next_event(self)
    }
}

impl<R: std::io::Read> Events<'static> for block::Block<'_, R> {
    fn next_event(&mut self) -> Option<Result<(Event<'static>, Span), ScanError>> {
        block::Block::next_event(self)
    }
}

fn build<'a, 's, E: Events<'a>>(
    parser: E,
    stream: Option<(&'s str, &'s mut (dyn FnMut(Node) + 's))>,
) -> Result<Node, SyntaxError> {
    let mut b = Builder {
        parser,
        _events: std::marker::PhantomData,
        anchors: HashMap::new(),
        count: 0,
        depth: 0,
        dups: Vec::new(),
        stream,
    };
    let one = |m: Mark, s: String| SyntaxError { problems: vec![(m, s)] };
    let mut doc: Option<Node> = None;
    loop {
        let (ev, span) = b.next()?;
        match ev {
            Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
            Event::StreamEnd => break,
            Event::DocumentStart(_) => {
                if doc.is_some() {
                    return Err(one(mark(&span), "only one YAML document is allowed here (remove this `---`)".into()));
                }
                let (ev, span) = b.next()?;
                if !matches!(ev, Event::MappingStart(..)) {
                    b.stream = None;
                }
                doc = Some(b.node(ev, span)?);
            }
            other => return Err(one(mark(&span), format!("unexpected YAML event {other:?}"))),
        }
    }
    if !b.dups.is_empty() {
        return Err(SyntaxError { problems: b.dups });
    }
    Ok(doc.unwrap_or(Node { mark: Mark::new(1, 1), value: Value::Scalar { text: String::new(), plain: true } }))
}

fn mark(span: &Span) -> Mark {
    Mark::new(span.start.line() as u32, span.start.col() as u32 + 1)
}

struct Builder<'a, 's, E: Events<'a>> {
    parser: E,
    _events: std::marker::PhantomData<Event<'a>>,
    anchors: HashMap<usize, Node>,
    count: usize,
    /// Collections open around the node being built.
    depth: usize,
    dups: Vec<(Mark, String)>,
    /// The root key whose sequence items are handed over as read, and where to (taken when
    /// the root mapping starts: only the root's key streams).
    stream: Option<(&'s str, &'s mut (dyn FnMut(Node) + 's))>,
}

impl<'a, E: Events<'a>> Builder<'a, '_, E> {
    fn next(&mut self) -> Result<(Event<'a>, Span), SyntaxError> {
        match self.parser.next_event() {
            Some(Ok(x)) => Ok(x),
            Some(Err(e)) => {
                let m = e.marker();
                Err(SyntaxError {
                    problems: vec![(
                        Mark::new(m.line() as u32, m.col() as u32 + 1),
                        format!("YAML syntax: {}", e.info()),
                    )],
                })
            }
            None => Err(SyntaxError { problems: vec![(Mark::UNKNOWN, "YAML syntax: unexpected end of input".into())] }),
        }
    }

    fn bump(&mut self, n: usize, at: Mark) -> Result<(), SyntaxError> {
        self.count += n;
        if self.count > MAX_NODES {
            return Err(SyntaxError {
                problems: vec![(at, format!("document expands to more than {MAX_NODES} nodes (alias bomb?)"))],
            });
        }
        Ok(())
    }

    fn node(&mut self, ev: Event<'a>, span: Span) -> Result<Node, SyntaxError> {
        let at = mark(&span);
        let refuse_tag = |what: &str| SyntaxError {
            problems: vec![(at, format!("YAML tags are not supported here (found {what}); remove the tag"))],
        };
        self.bump(1, at)?;
        let nests = matches!(ev, Event::SequenceStart(..) | Event::MappingStart(..));
        if nests {
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                let msg = format!("lists and mappings nest more than {MAX_DEPTH} deep here; flatten this");
                return Err(SyntaxError { problems: vec![(at, msg)] });
            }
        }
        let (node, anchor) = match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let mut plain = style == ScalarStyle::Plain;
                if let Some(tag) = tag {
                    if tag.is_yaml_core_schema() && tag.suffix == "str" {
                        plain = false;
                    } else {
                        return Err(refuse_tag(&tag.to_string()));
                    }
                }
                (Node { mark: at, value: Value::Scalar { text: text.into_owned(), plain } }, anchor)
            }
            Event::SequenceStart(anchor, tag) => {
                if let Some(tag) = tag {
                    return Err(refuse_tag(&tag.to_string()));
                }
                let mut items = Vec::new();
                loop {
                    let (ev, span) = self.next()?;
                    if ev == Event::SequenceEnd {
                        break;
                    }
                    items.push(self.node(ev, span)?);
                }
                (Node { mark: at, value: Value::Seq(items) }, anchor)
            }
            Event::MappingStart(anchor, tag) => {
                if let Some(tag) = tag {
                    return Err(refuse_tag(&tag.to_string()));
                }
                let mut entries: Vec<(Node, Node)> = Vec::new();
                let mut seen = Keys::default();
                let mut stream = self.stream.take();
                loop {
                    let (ev, span) = self.next()?;
                    if ev == Event::MappingEnd {
                        break;
                    }
                    let key = self.node(ev, span)?;
                    let (ev, span) = self.next()?;
                    let value = match (&mut stream, &ev) {
                        (Some((name, item)), Event::SequenceStart(0, None))
                            if key.as_str() == Some(*name) && seen.first(&entries, name).is_none() =>
                        {
                            self.bump(1, mark(&span))?;
                            loop {
                                let (ev, span) = self.next()?;
                                if ev == Event::SequenceEnd {
                                    break;
                                }
                                let n = self.node(ev, span)?;
                                item(n);
                            }
                            Node { mark: mark(&span), value: Value::Seq(Vec::new()) }
                        }
                        _ => self.node(ev, span)?,
                    };
                    if let Some(k) = key.as_str() {
                        if let Some(first) = seen.first(&entries, k) {
                            self.dups.push((key.mark, format!("duplicate key `{k}` (first at line {})", first.line)));
                        } else {
                            seen.add(k, key.mark);
                        }
                    }
                    entries.push((key, value));
                }
                (Node { mark: at, value: Value::Map(entries) }, anchor)
            }
            Event::Alias(id) => {
                let Some(n) = self.anchors.get(&id) else {
                    return Err(SyntaxError { problems: vec![(at, "alias to an unknown anchor".into())] });
                };
                let n = n.clone();
                self.bump(count_nodes(&n), at)?;
                return Ok(n);
            }
            other => {
                return Err(SyntaxError { problems: vec![(at, format!("unexpected YAML event {other:?}"))] });
            }
        };
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        self.depth -= usize::from(nests);
        Ok(node)
    }
}

/// The keys of a mapping read so far, for duplicates: looked for among its entries while it is
/// small (most are: no hashing, no copies), in an index once it is not.
#[derive(Default)]
struct Keys {
    index: Option<HashMap<String, Mark>>,
}

impl Keys {
    const SCAN: usize = 16;

    /// Where `k` was first a key among `entries`, the mapping's entries so far.
    fn first(&mut self, entries: &[(Node, Node)], k: &str) -> Option<Mark> {
        if entries.len() < Self::SCAN {
            return entries.iter().find(|(e, _)| e.as_str() == Some(k)).map(|(e, _)| e.mark);
        }
        let index = self.index.get_or_insert_with(|| {
            let mut index = HashMap::new();
            for (e, _) in entries {
                if let Some(s) = e.as_str() {
                    index.entry(s.to_string()).or_insert(e.mark);
                }
            }
            index
        });
        index.get(k).copied()
    }

    /// `k`, new, is now a key (at `at`).
    fn add(&mut self, k: &str, at: Mark) {
        if let Some(index) = &mut self.index {
            index.insert(k.to_string(), at);
        }
    }
}

fn count_nodes(n: &Node) -> usize {
    match &n.value {
        Value::Scalar { .. } => 1,
        Value::Seq(items) => 1 + items.iter().map(count_nodes).sum::<usize>(),
        Value::Map(entries) => 1 + entries.iter().map(|(k, v)| count_nodes(k) + count_nodes(v)).sum::<usize>(),
    }
}

fn is_null(text: &str) -> bool {
    matches!(text, "" | "~" | "null" | "Null" | "NULL")
}

fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

fn parse_int(text: &str) -> Option<i128> {
    let (neg, digits) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let v = if let Some(h) = digits.strip_prefix("0x") {
        i128::from_str_radix(h, 16).ok()?
    } else if let Some(o) = digits.strip_prefix("0o") {
        i128::from_str_radix(o, 8).ok()?
    } else if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse().ok()?
    } else {
        return None;
    };
    Some(if neg { -v } else { v })
}

fn parse_float(text: &str) -> Option<f64> {
    match text {
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => return Some(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Some(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Some(f64::NAN),
        _ => {}
    }
    let looks_numeric = text.bytes().any(|b| b.is_ascii_digit())
        && text.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'));
    if looks_numeric { text.parse().ok() } else { None }
}

/// An error from decoding a [`Node`]: one or more problems, each with its place when known.
#[derive(Debug, Clone, PartialEq)]
pub struct DeError(pub Vec<(Option<Mark>, String)>);

impl DeError {
    /// Gives a place to every problem that has none yet.
    pub fn at(mut self, m: Mark) -> DeError {
        for (place, _) in &mut self.0 {
            if place.is_none() {
                *place = Some(m);
            }
        }
        self
    }

    fn merge(mut self, other: DeError) -> DeError {
        self.0.extend(other.0);
        self
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<&str> = self.0.iter().map(|(_, m)| m.as_str()).collect();
        f.write_str(&parts.join("; "))
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError(vec![(None, msg.to_string())])
    }

    /// serde's message, and what people coming from other tools most likely meant.
    fn invalid_type(unexp: de::Unexpected, exp: &dyn de::Expected) -> Self {
        let expected = exp.to_string();
        let mut msg = format!("invalid type: {unexp}, expected {expected}");
        msg.push_str(&habit_hint(&unexp, &expected));
        DeError(vec![(None, msg)])
    }
}

/// A hint for the habits YAML and other tools leave: a command written as one string, `yes`
/// and `no` for booleans (YAML 1.1), an unquoted `{{ }}` (a YAML mapping).
fn habit_hint(unexp: &de::Unexpected, expected: &str) -> String {
    match unexp {
        de::Unexpected::Str(s) if expected.contains("sequence") => {
            let words: Vec<String> = s
                .split_whitespace()
                .map(|w| {
                    if w.contains([',', ':', '[', ']', '{', '}', '#', '"']) {
                        format!("\"{}\"", w.replace('"', "\\\""))
                    } else {
                        w.to_string()
                    }
                })
                .collect();
            format!(": write a list, one word an item, like [{}] (no shell parses it)", words.join(", "))
        }
        de::Unexpected::Str(s) if expected.contains("boolean") => match s.to_ascii_lowercase().as_str() {
            "yes" | "y" | "on" => "; YAML 1.2 reads `yes` and `on` as text: write true".into(),
            "no" | "n" | "off" => "; YAML 1.2 reads `no` and `off` as text: write false".into(),
            _ => String::new(),
        },
        de::Unexpected::Map if !expected.contains("map") && !expected.contains("struct") => {
            "; a value that begins with `{` is a YAML mapping: put a template in quotes, like \"{{ data.x }}\"".into()
        }
        _ => String::new(),
    }
}

/// Decodes a value of type `T` from a node with serde.
pub fn from_node<'a, T: de::Deserialize<'a>>(node: &'a Node) -> Result<T, DeError> {
    T::deserialize(NodeDe(node))
}

/// A serde `Deserializer` over a borrowed [`Node`].
#[derive(Clone, Copy)]
pub struct NodeDe<'a>(pub &'a Node);

impl<'a> NodeDe<'a> {
    fn invalid<V: Visitor<'a>>(&self, v: &V) -> DeError {
        let unexp = match &self.0.value {
            Value::Scalar { text, .. } if self.0.is_null() => {
                let _ = text;
                de::Unexpected::Unit
            }
            Value::Scalar { text, .. } => de::Unexpected::Str(text),
            Value::Seq(_) => de::Unexpected::Seq,
            Value::Map(_) => de::Unexpected::Map,
        };
        <DeError as de::Error>::invalid_type(unexp, v).at(self.0.mark)
    }

    fn plain(&self) -> Option<&'a str> {
        match &self.0.value {
            Value::Scalar { text, plain: true } => Some(text),
            _ => None,
        }
    }
}

macro_rules! int_methods {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'a>>(self, v: V) -> Result<V::Value, DeError> {
            match self.plain().and_then(parse_int) {
                Some(i) if i >= 0 && i <= u64::MAX as i128 => v.visit_u64(i as u64),
                Some(i) if i >= i64::MIN as i128 && i < 0 => v.visit_i64(i as i64),
                _ => Err(self.invalid(&v)),
            }
            .map_err(|e: DeError| e.at(self.0.mark))
        }
    )*};
}

impl<'a> de::Deserializer<'a> for NodeDe<'a> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'a>>(self, v: V) -> Result<V::Value, DeError> {
        let m = self.0.mark;
        match &self.0.value {
            Value::Scalar { text, plain: true } => {
                if is_null(text) {
                    v.visit_unit()
                } else if let Some(b) = parse_bool(text) {
                    v.visit_bool(b)
                } else if let Some(i) = parse_int(text) {
                    if i >= 0 && i <= u64::MAX as i128 {
                        v.visit_u64(i as u64)
                    } else if i >= i64::MIN as i128 && i < 0 {
                        v.visit_i64(i as i64)
                    } else {
                        v.visit_borrowed_str(text)
                    }
                } else if let Some(f) = parse_float(text) {
                    v.visit_f64(f)
                } else {
                    v.visit_borrowed_str(text)
                }
            }
            Value::Scalar { text, plain: false } => v.visit_borrowed_str(text),
            Value::Seq(items) => visit_seq(items, v, m),
            Value::Map(entries) => visit_map(entries, v, m),
        }
        .map_err(|e: DeError| e.at(m))
    }

    fn deserialize_bool<V: Visitor<'a>>(self, v: V) -> Result<V::Value, DeError> {
        match self.plain().and_then(parse_bool) {
            Some(b) => v.visit_bool(b).map_err(|e: DeError| e.at(self.0.mark)),
            None => Err(self.invalid(&v)),
        }
    }

    int_methods!(deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_i128
                 deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_u128);

    fn deserialize_f32<V: Visitor<'a>>(self, v: V) -> Result<V::Value, DeError> {
        self.deserialize_f64(v)
    }

    fn deserialize_f64<V: Visitor<'a>>(self, v: V) -> Result<V::Value, DeError> {
        match self.plain().and_then(|t| parse_float(t).or_else(|| parse_int(t).map(|i| i as f64))) {
            Some(f) => v.visit_f64(f).map_err(|e: DeError| e.at(self.0.mark)),
            None => Err(self.invalid(&v)),
        }
    }

    fn deserialize_char<V: Visitor<'a>>(self, v: V) -> Result<V::Value, DeError> {
        self.deserialize_str(v)
    }

    fn deserialize_str<V: Visitor<'a>>(self, v: V) -> Result<V::Value, DeError> {
        match &self.0.value {
            Value::Scalar { text, .. } if !self.0.is_null() || text.is_empty() => {
                v.visit_borrowed_str(text).map_err(|e: DeError| e.at(self.0.mark))
            }
            _ => Err(self.invalid(&v)),
        }
    }

    fn deserialize_string<V: Visitor<'a>>(self, v: V) -> Result<V::Value, DeError> {
        self.deserialize_str(v)
    }

    fn deserialize_bytes<V: Visitor<'a>>(self, v: V) -> Result<V::Value, DeError> {
        self.deserialize_str(v)
    }

    fn deserialize_byte_buf<V: Visitor<'a>>(self, v: V) -> Result<V::Value, DeError> {
        self.deserialize_str(v)
    }

    fn deserialize_option<V: Visitor<'a>>(self, v: V) -> Result<V::Value, DeError> {
        if self.0.is_null() { v.visit_none() } else { v.visit_some(self) }.map_err(|e: DeError| e.at(self.0.mark))
    }

    fn deserialize_unit<V: Visitor<'a>>(self, v: V) -> Result<V::Value, DeError> {
        if self.0.is_null() { v.visit_unit().map_err(|e: DeError| e.at(self.0.mark)) } else { Err(self.invalid(&v)) }
    }

    fn deserialize_unit_struct<V: Visitor<'a>>(self, _: &'static str, v: V) -> Result<V::Value, DeError> {
        self.deserialize_unit(v)
    }

    fn deserialize_newtype_struct<V: Visitor<'a>>(self, _: &'static str, v: V) -> Result<V::Value, DeError> {
        v.visit_newtype_struct(self).map_err(|e: DeError| e.at(self.0.mark))
    }

    fn deserialize_seq<V: Visitor<'a>>(self, v: V) -> Result<V::Value, DeError> {
        match &self.0.value {
            Value::Seq(items) => visit_seq(items, v, self.0.mark),
            _ => Err(self.invalid(&v)),
        }
    }

    fn deserialize_tuple<V: Visitor<'a>>(self, _: usize, v: V) -> Result<V::Value, DeError> {
        self.deserialize_seq(v)
    }

    fn deserialize_tuple_struct<V: Visitor<'a>>(self, _: &'static str, _: usize, v: V) -> Result<V::Value, DeError> {
        self.deserialize_seq(v)
    }

    fn deserialize_map<V: Visitor<'a>>(self, v: V) -> Result<V::Value, DeError> {
        match &self.0.value {
            Value::Map(entries) => visit_map(entries, v, self.0.mark),
            _ => Err(self.invalid(&v)),
        }
    }

    /// Reports every key that is not a field of the struct, then decodes the known ones.
    fn deserialize_struct<V: Visitor<'a>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DeError> {
        if name == SPANNED {
            return v.visit_map(SpannedAccess { node: self.0, next: 0 });
        }
        let Value::Map(entries) = &self.0.value else {
            return Err(self.invalid(&v));
        };
        let mut unknown = Vec::new();
        let known: Vec<&(Node, Node)> = entries
            .iter()
            .filter(|(k, _)| match k.as_str() {
                Some(name) if fields.contains(&name) => true,
                name => {
                    unknown.push((Some(k.mark), unknown_field_message(name.unwrap_or("?"), fields)));
                    false
                }
            })
            .collect();
        let result = v.visit_map(MapAccess { entries: known.into_iter(), value: None, last_key: None });
        let result = result.map_err(|e: DeError| e.at(self.0.mark));
        match (result, unknown.is_empty()) {
            (Ok(x), true) => Ok(x),
            (Ok(_), false) => Err(DeError(unknown)),
            (Err(e), true) => Err(e),
            (Err(e), false) => Err(DeError(unknown).merge(e)),
        }
    }

    fn deserialize_enum<V: Visitor<'a>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DeError> {
        match &self.0.value {
            Value::Scalar { text, .. } => {
                let d: de::value::BorrowedStrDeserializer<'a, DeError> = de::value::BorrowedStrDeserializer::new(text);
                v.visit_enum(d).map_err(|e: DeError| e.at(self.0.mark))
            }
            _ => Err(self.invalid(&v)),
        }
    }

    fn deserialize_identifier<V: Visitor<'a>>(self, v: V) -> Result<V::Value, DeError> {
        self.deserialize_str(v)
    }

    fn deserialize_ignored_any<V: Visitor<'a>>(self, v: V) -> Result<V::Value, DeError> {
        v.visit_unit()
    }
}

/// A value decoded from a [`Node`] together with the place it was written, for messages about
/// it later ("role `wbe` does not exist", at the line that names it). Only the located
/// decoder fills the place; other deserializers cannot produce it.
#[derive(Debug, Clone, PartialEq)]
pub struct Spanned<T> {
    pub mark: Mark,
    pub value: T,
}

const SPANNED: &str = "$converge::yaml::Spanned";
const SPANNED_FIELDS: &[&str] = &["$line", "$col", "$value"];

impl<'de, T: de::Deserialize<'de>> de::Deserialize<'de> for Spanned<T> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: de::Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Spanned<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a value read from YAML")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut m: A) -> Result<Spanned<T>, A::Error> {
                fn take<'de, A: de::MapAccess<'de>>(m: &mut A, want: &str) -> Result<(), A::Error> {
                    match m.next_key::<String>()? {
                        Some(k) if k == want => Ok(()),
                        _ => Err(de::Error::custom("a spanned value is only read by the located YAML decoder")),
                    }
                }
                take(&mut m, "$line")?;
                let line: u32 = m.next_value()?;
                take(&mut m, "$col")?;
                let col: u32 = m.next_value()?;
                take(&mut m, "$value")?;
                Ok(Spanned { mark: Mark::new(line, col), value: m.next_value()? })
            }
        }
        d.deserialize_struct(SPANNED, SPANNED_FIELDS, V(std::marker::PhantomData))
    }
}

/// Hands a node's place, then the node itself, to [`Spanned`]'s visitor.
struct SpannedAccess<'a> {
    node: &'a Node,
    next: usize,
}

impl<'a> de::MapAccess<'a> for SpannedAccess<'a> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'a>>(&mut self, seed: K) -> Result<Option<K::Value>, DeError> {
        let Some(&key) = SPANNED_FIELDS.get(self.next) else { return Ok(None) };
        seed.deserialize(de::value::BorrowedStrDeserializer::new(key)).map(Some)
    }

    fn next_value_seed<T: DeserializeSeed<'a>>(&mut self, seed: T) -> Result<T::Value, DeError> {
        self.next += 1;
        match self.next {
            1 => seed.deserialize(de::value::U32Deserializer::new(self.node.mark.line)),
            2 => seed.deserialize(de::value::U32Deserializer::new(self.node.mark.col)),
            _ => seed.deserialize(NodeDe(self.node)),
        }
    }
}

/// The message for a key that is not a field, with the fields that are.
pub fn unknown_field_message(name: &str, fields: &[&str]) -> String {
    let close = fields.iter().find(|f| similar_name(name, f));
    match close {
        Some(f) => format!("unknown field `{name}` (did you mean `{f}`?)"),
        None if fields.is_empty() => format!("unknown field `{name}`: no fields are allowed here"),
        None => format!("unknown field `{name}`; expected one of: {}", fields.join(", ")),
    }
}

/// True when `a` is within one edit (or one transposition) of `b`, and not `b` itself.
pub fn similar_name(a: &str, b: &str) -> bool {
    strsim::osa_distance(a, b) == 1
}

fn visit_seq<'a, V: Visitor<'a>>(items: &'a [Node], v: V, m: Mark) -> Result<V::Value, DeError> {
    v.visit_seq(SeqAccess { items: items.iter() }).map_err(|e: DeError| e.at(m))
}

fn visit_map<'a, V: Visitor<'a>>(entries: &'a [(Node, Node)], v: V, m: Mark) -> Result<V::Value, DeError> {
    let mut access = MapAccess { entries: entries.iter().collect::<Vec<_>>().into_iter(), value: None, last_key: None };
    let r = v.visit_map(&mut access);
    let last = access.last_key;
    r.map_err(|e: DeError| e.at(last.unwrap_or(m)))
}

struct SeqAccess<'a> {
    items: std::slice::Iter<'a, Node>,
}

impl<'a> de::SeqAccess<'a> for SeqAccess<'a> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'a>>(&mut self, seed: T) -> Result<Option<T::Value>, DeError> {
        match self.items.next() {
            Some(n) => seed.deserialize(NodeDe(n)).map(Some).map_err(|e: DeError| e.at(n.mark)),
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapAccess<'a> {
    entries: std::vec::IntoIter<&'a (Node, Node)>,
    value: Option<&'a Node>,
    /// The place of the last key handed out: errors raised by the visitor about a key (an
    /// unknown field, a duplicate) are reported there.
    last_key: Option<Mark>,
}

impl<'a> de::MapAccess<'a> for MapAccess<'a> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'a>>(&mut self, seed: K) -> Result<Option<K::Value>, DeError> {
        match self.entries.next() {
            Some((k, v)) => {
                self.value = Some(v);
                self.last_key = Some(k.mark);
                seed.deserialize(NodeDe(k)).map(Some).map_err(|e: DeError| e.at(k.mark))
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<T: DeserializeSeed<'a>>(&mut self, seed: T) -> Result<T::Value, DeError> {
        let v = self.value.take().expect("next_value_seed called before next_key_seed");
        seed.deserialize(NodeDe(v)).map_err(|e: DeError| e.at(v.mark))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[test]
    fn the_root_keys_items_stream_and_nothing_else_does() {
        let mut got = Vec::new();
        let text = "a: [x]\nresources:\n  - &one {file: /a}\n  - nested: {resources: [1, 2]}\n  - *one\nz: 1\n";
        let root = parse_streaming(text, "resources", &mut |n| got.push((n.mark.line, n.describe()))).unwrap();
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [3, 4, 3], "items in order, the alias at its anchor");
        let map = root.as_map().unwrap();
        let keys: Vec<_> = map.iter().map(|(k, _)| k.as_str().unwrap()).collect();
        assert_eq!(keys, ["a", "resources", "z"]);
        assert_eq!(map[1].1.as_seq().map(<[Node]>::len), Some(0), "streamed items leave the tree");
        assert_eq!(map[0].1.as_seq().map(<[Node]>::len), Some(1));
        // Not a sequence, or not at the root: kept in the tree, nothing handed over.
        for text in ["resources: {a: 1}\n", "- resources: [1]\n", "x: {resources: [1]}\n"] {
            let mut n = 0;
            let tree = parse_streaming(text, "resources", &mut |_| n += 1).unwrap();
            assert_eq!(n, 0, "{text}");
            assert_eq!(tree, parse(text).unwrap(), "{text}");
        }
        // A syntax error after streamed items is still an error.
        let mut n = 0;
        assert!(parse_streaming("resources:\n  - a\n  - [b\n", "resources", &mut |_| n += 1).is_err());
    }

    /// Reads a few bytes at a time (cutting characters), then fails or ends as told.
    struct Trickle<'a> {
        bytes: &'a [u8],
        step: usize,
        fail_at_end: bool,
    }

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            if self.bytes.is_empty() && self.fail_at_end {
                return Err(std::io::Error::other("the disk went away"));
            }
            let n = self.step.min(out.len()).min(self.bytes.len());
            out[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_reader_streams_the_same_nodes_as_a_text() {
        let mut text = String::from("# café ☕ 𝄞\nformat: 1\nresources:\n");
        // Enough to cross the window of characters, and its blocks of bytes, several times.
        for i in 0..3000 {
            text.push_str(&format!("  - file: /srv/é{i}\n    content: \"ünïcödé {i} 𝄞\\n\"\n    mode: '0644'\n"));
        }
        text.push_str("z: [1, {a: b}]\n");
        let mut want = Vec::new();
        let want_root = parse_streaming(&text, "resources", &mut |n| want.push(n)).unwrap();
        for step in [1, 2, 3, 5, 4096, 1 << 20] {
            let mut got = Vec::new();
            let r = Trickle { bytes: text.as_bytes(), step, fail_at_end: false };
            let root = parse_streaming_from(r, "resources", &mut |n| got.push(n)).unwrap();
            assert_eq!((&root, &got), (&want_root, &want), "read {step} bytes at a time");
        }
    }

    /// The block reader's tree and items for `text`, read `step` bytes at a time; `None` when
    /// it leaves the text to saphyr. Whatever it reads, it reads as saphyr does.
    fn by_block(text: &[u8], step: usize) -> Option<(Result<Node, SyntaxError>, Vec<Node>)> {
        let mut got = Vec::new();
        let r = Trickle { bytes: text, step, fail_at_end: false };
        let root = parse_block_from(r, "resources", &mut |n| got.push(n))?;
        let mut want = Vec::new();
        let text = std::str::from_utf8(text).expect("the block reader reads UTF-8 only");
        let want_root = parse_streaming(text, "resources", &mut |n| want.push(n));
        assert_eq!((&root, &got), (&want_root, &want), "block reader and saphyr disagree on {text:?}");
        Some((root, got))
    }

    #[test]
    fn the_block_reader_reads_what_catalogs_are_written_in_as_saphyr_does() {
        let read = [
            "format: 1\nresources:\n  - file: /a\n    content: \"x\\n\\t\\\"q\\\" \\u00e9\\x41\\U0001D11E \\\\ \\/\"\n    mode: '0644'\n",
            "# café ☕\n---\nformat: 1 # one\nresources:\n- directory: /é/ü\n  owner: root\n\n  # in between\n- package: nginx\n",
            "resources:\n  -   file: /a\n      empty:\n      after: 'it''s'\n  - x\nz: a b  \nq: http://x:80/#frag\n",
            "a:\n  b:\n    c: d\n  e:\n  - 1\n  - 2\nf: ~\n\"k y\": v\n'k''z' : v\n",
            "just a scalar\n",
            "",
            "# only a comment\n\n",
            "a: -1\nb: -x\nc: ?y\nd: :z\ne: a#b\nf: \"\"\ng: ''\n",
            "dup: 1\ndup: 2\n",
            "resources:\n  - a: 1\n    a: 2\n",
            "a: b\n  # a comment indented deeper\nc: d",
            "a:   # comment\nb:\n  v\n",
            "  x: 1\n  y: 2\n",
            "𝄞é: ünï\n  \ná: \"𝄞\"  # c\n",
        ];
        for text in read {
            for step in [1, 2, 7, 1 << 16] {
                assert!(by_block(text.as_bytes(), step).is_some(), "left to saphyr: {text:?} by {step}");
            }
        }
    }

    #[test]
    fn the_block_reader_leaves_the_rest_to_saphyr() {
        let beyond = [
            "a: |\n  x\n",
            "a: >\n  x\n",
            "a: [1, 2]\n",
            "a: {b: c}\n",
            "a: &x 1\nb: *x\n",
            "a: !!str 1\n",
            "a: \"two\n  lines\"\n",
            "a: 'two\n  lines'\n",
            "a: two\n  lines\n",
            "a:\tb\n",
            "a: b\r\n",
            "\u{FEFF}a: b\n",
            "a: b\n---\nc: d\n",
            "a: b\n...\n",
            "- - a\n",
            "-\n  a: b\n",
            "- \n",
            "? a\n: b\n",
            "a: b: c\n",
            "a: b\n c: d\n",
            "a: \"x\" y\n",
            "a: \"x\"#c\n",
            "a: \"\\q\"\n",
            "a: \"\\x4\"\n",
            "a: \"\\uD800\"\n",
            "%YAML 1.2\n---\na: b\n",
            "---\n",
            "--- a\n",
            "a:\n- b\n c\n",
            "[a]\n",
            "a: b\n- c\n",
            "- a\nb: c\n",
        ];
        for text in beyond {
            assert!(by_block(text.as_bytes(), 3).is_none(), "read by the block reader: {text:?}");
        }
        let long_key = format!("{}: v\n", "k".repeat(1001));
        assert!(by_block(long_key.as_bytes(), 64).is_none(), "a key saphyr may refuse is left to it");
        for bytes in [&b"a: \xff\n"[..], b"a: b\n\xc3", b"a: \x00\n", b"a: b\x7f\n"] {
            assert!(by_block(bytes, 1).is_none(), "{bytes:?}");
        }
        let failing = Trickle { bytes: b"resources:\n  - a: b\n", step: 4, fail_at_end: true };
        assert!(parse_block_from(failing, "resources", &mut |_| {}).is_none(), "a failed read is left to saphyr");
    }

    #[test]
    fn the_block_reader_crosses_its_window_and_grows_for_a_long_line() {
        let mut text = String::from("format: 1\nresources:\n");
        for i in 0..2000 {
            text.push_str(&format!("  - file: /srv/é{i}\n    content: \"ünï {i} 𝄞\\n\"\n    mode: '0644'\n"));
        }
        text.push_str(&format!("  - file: /long\n    content: \"{}\"\n", "x\\n".repeat(100_000)));
        let (_, items) = by_block(text.as_bytes(), 1 << 16).expect("read by the block reader");
        assert_eq!(items.len(), 2001);
        let (root, _) = by_block(text.as_bytes(), 4093).expect("read by the block reader");
        assert!(root.is_ok());
    }

    #[test]
    fn a_reader_that_is_not_utf8_or_fails_is_a_syntax_error() {
        let cases: [(&[u8], bool, &str); 4] = [
            (b"resources:\n  - a: \xff\n", false, "not UTF-8"),
            (b"resources:\n  - a: b\n\xc3", false, "ends inside a character"),
            (b"resources:\n  - a: \xc3\x28\n", false, "not UTF-8"),
            (b"resources:\n  - a: b\n", true, "the disk went away"),
        ];
        for (bytes, fail_at_end, says) in cases {
            for step in [1, 3, 64] {
                let r = Trickle { bytes, step, fail_at_end };
                let e = parse_streaming_from(r, "resources", &mut |_| {}).unwrap_err();
                assert!(e.problems[0].1.contains(says), "{bytes:?} by {step}: {:?}", e.problems);
            }
        }
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct T {
        name: String,
        mode: Option<String>,
        count: Option<u32>,
        on: Option<bool>,
        list: Option<Vec<String>>,
    }

    fn decode(src: &str) -> Result<T, DeError> {
        let n = parse(src).unwrap();
        // Leak for the test's convenience: the node must outlive the borrow.
        let n: &'static Node = Box::leak(Box::new(n));
        from_node(n)
    }

    #[test]
    fn plain_scalars_are_typed_by_the_reader() {
        let t = decode("name: 0644\nmode: 0644\ncount: 0x10\non: true\nlist: [a, 1]\n").unwrap();
        assert_eq!(t.name, "0644");
        assert_eq!(t.mode.as_deref(), Some("0644"));
        assert_eq!(t.count, Some(16));
        assert_eq!(t.on, Some(true));
        assert_eq!(t.list, Some(vec!["a".into(), "1".into()]));
    }

    #[test]
    fn every_unknown_field_is_reported_with_its_place() {
        let e = decode("name: x\nmdoe: 1\ncolour: red\n").unwrap_err();
        assert_eq!(e.0.len(), 2);
        assert_eq!(e.0[0].0, Some(Mark::new(2, 1)));
        assert!(e.0[0].1.contains("did you mean `mode`"), "{}", e.0[0].1);
        assert_eq!(e.0[1].0, Some(Mark::new(3, 1)));
    }

    #[test]
    fn a_wrong_type_is_reported_at_the_value() {
        let e = decode("name: x\ncount: many\n").unwrap_err();
        assert_eq!(e.0[0].0, Some(Mark::new(2, 8)));
        assert!(e.0[0].1.contains("invalid type"), "{}", e.0[0].1);
        let e = decode("name: x\non: \"yes\"\n").unwrap_err();
        assert_eq!(e.0[0].0, Some(Mark::new(2, 5)));
    }

    #[test]
    fn quoted_scalars_are_strings() {
        let e = decode("name: x\ncount: \"3\"\n").unwrap_err();
        assert!(e.0[0].1.contains("string \"3\""), "{}", e.0[0].1);
    }

    #[test]
    fn a_missing_field_is_reported_at_the_mapping() {
        let e = decode("\nmode: x\n").unwrap_err();
        assert_eq!(e.0[0].0, Some(Mark::new(2, 1)));
        assert!(e.0[0].1.contains("missing field `name`"));
    }

    #[test]
    fn duplicate_keys_are_syntax_errors() {
        let e = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(e.problems, vec![(Mark::new(3, 1), "duplicate key `a` (first at line 1)".to_string())]);
        // Past the size where keys are looked for among the entries, and across it.
        let mut big: Vec<String> = (0..40).map(|i| format!("k{i}: {i}")).collect();
        for (at, dup) in [(5, 1), (30, 2), (35, 20), (38, 10)] {
            big[at] = format!("k{dup}: again");
        }
        let e = parse(&(big.join("\n") + "\nz:\n  a: 1\n  a: 2\n")).unwrap_err();
        let said: Vec<(u32, String)> = e.problems.into_iter().map(|(m, s)| (m.line, s)).collect();
        let want = [(6, "k1", 2), (31, "k2", 3), (36, "k20", 21), (39, "k10", 11), (43, "a", 42)];
        let want: Vec<(u32, String)> =
            want.iter().map(|&(l, k, f)| (l, format!("duplicate key `{k}` (first at line {f})"))).collect();
        assert_eq!(said, want);
    }

    #[test]
    fn nesting_past_the_bound_is_an_error_not_a_stack_overflow() {
        let deep = format!("format: 1\nresources:\n  - file: /x\n    content:\n      {}a\n", "- ".repeat(200_000));
        let e = parse(&deep).unwrap_err();
        assert_eq!(e.problems[0].0.line, 5, "{:?}", e.problems);
        assert!(e.problems[0].1.contains("nest more than 256 deep"), "{:?}", e.problems);
        let e = parse_streaming_from(deep.as_bytes(), "resources", &mut |_| {}).unwrap_err();
        assert!(e.problems[0].1.contains("nest more than 256 deep"), "{:?}", e.problems);
        let blocks: String = (0..300).map(|i| format!("{}k:\n", " ".repeat(i))).collect();
        assert!(parse_block_from(blocks.as_bytes(), "resources", &mut |_| {}).unwrap().is_err());
        let ok: String = (0..MAX_DEPTH).map(|i| format!("{}k:\n", " ".repeat(i))).collect();
        assert!(parse(&ok).is_ok(), "{MAX_DEPTH} levels are read");
    }

    #[test]
    fn syntax_errors_have_a_place() {
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.problems[0].0.is_known());
    }

    #[test]
    fn aliases_expand_and_bombs_are_refused() {
        let t = decode("name: &n hello\nmode: *n\n").unwrap();
        assert_eq!(t.mode.as_deref(), Some("hello"));
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let prev = if i == 1 { "a".to_string() } else { format!("a{}", i - 1) };
            bomb.push_str(&format!("a{i}: &a{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
        }
        let e = parse(&bomb).unwrap_err();
        assert!(e.problems[0].1.contains("alias bomb"));
    }

    #[test]
    fn unknown_tags_are_refused() {
        assert!(parse("a: !!binary aGk=\n").is_err());
        let n = parse("a: !!str 12\n").unwrap();
        assert_eq!(n.as_map().unwrap()[0].1.value, Value::Scalar { text: "12".into(), plain: false });
    }

    #[test]
    fn spanned_values_keep_their_place() {
        #[derive(Deserialize)]
        struct R {
            include: Vec<Spanned<String>>,
        }
        let n: &'static Node = Box::leak(Box::new(parse("include:\n  - base\n  - web\n").unwrap()));
        let r: R = from_node(n).unwrap();
        assert_eq!(r.include[1], Spanned { mark: Mark::new(3, 5), value: "web".to_string() });
        let n: &'static Node = Box::leak(Box::new(parse("include: [base, 7x]\n").unwrap()));
        let r: R = from_node(n).unwrap();
        assert_eq!(r.include[1].value, "7x");
        assert!(serde_json::from_str::<Spanned<String>>("\"x\"").is_err());
    }

    #[test]
    fn similar_names() {
        assert!(similar_name("mdoe", "mode"));
        assert!(similar_name("mod", "mode"));
        assert!(similar_name("modes", "mode"));
        assert!(similar_name("node", "mode"));
        assert!(!similar_name("owner", "mode"));
    }
}

/// The block reader against saphyr on documents made from the subset's grammar: every one it
/// reads (the clean ones all), it reads as saphyr does; and so with noise put into them.
#[cfg(test)]
mod block_equals_saphyr {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Doc {
        /// A scalar and how it is spelled: plain, single- or double-quoted.
        Scalar(String, u8),
        Map(Vec<(String, u8, Doc)>),
        Seq(Vec<Doc>),
    }

    fn scalar_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z/][a-z0-9 ./_-]{0,12}",
            proptest::collection::vec(
                prop_oneof![
                    Just('a'),
                    Just(' '),
                    Just(':'),
                    Just('#'),
                    Just('-'),
                    Just('\''),
                    Just('"'),
                    Just('\\'),
                    Just('é'),
                    Just('𝄞'),
                    Just('?'),
                    Just(','),
                    Just('['),
                    Just('{'),
                    Just('&'),
                    Just('*'),
                    Just('!'),
                    Just('|'),
                    Just('>'),
                    Just('%'),
                    Just('@'),
                    Just('\n'),
                    Just('~'),
                    Just('0'),
                ],
                0..10
            )
            .prop_map(|v| v.into_iter().collect()),
        ]
    }

    fn doc() -> impl Strategy<Value = Doc> {
        let leaf = (scalar_text(), 0u8..3).prop_map(|(s, st)| Doc::Scalar(s, st));
        leaf.prop_recursive(4, 40, 5, |inner| {
            prop_oneof![
                proptest::collection::vec((scalar_text(), 0u8..3, inner.clone()), 0..5).prop_map(Doc::Map),
                proptest::collection::vec(inner, 0..5).prop_map(Doc::Seq),
            ]
        })
    }

    /// Spelled safely, a scalar is read by the block reader: plain only when plainly plain.
    fn spell(s: &str, style: u8, clean: bool) -> String {
        let plain_ok = s.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '/')
            && !s.contains(": ")
            && !s.contains(" #")
            && !s.ends_with(' ')
            && !s.ends_with(':')
            && !s.contains('\n');
        match style {
            0 if plain_ok || !clean => s.to_string(),
            1 if !s.contains('\n') || !clean => format!("'{}'", s.replace('\'', "''")),
            _ => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")),
        }
    }

    fn render(d: &Doc, indent: usize, out: &mut String, clean: bool) {
        let pad = " ".repeat(indent);
        match d {
            Doc::Scalar(s, st) => {
                out.push_str(&pad);
                out.push_str(&spell(s, *st, clean));
                out.push('\n');
            }
            Doc::Map(entries) if entries.is_empty() => out.push_str(&format!("{pad}~\n")),
            Doc::Seq(items) if items.is_empty() => out.push_str(&format!("{pad}~\n")),
            Doc::Map(entries) => {
                for (i, (k, st, v)) in entries.iter().enumerate() {
                    // A key is spelled so that it stays one (and unique keys stay unique).
                    let key = spell(&format!("{k}{i}"), *st, true);
                    out.push_str(&format!("{pad}{key}:"));
                    match v {
                        Doc::Scalar(s, st) => out.push_str(&format!(" {}  # note\n", spell(s, *st, clean))),
                        Doc::Seq(items) if !items.is_empty() && i % 2 == 0 => {
                            out.push('\n');
                            render(v, indent, out, clean);
                        }
                        _ => {
                            out.push_str("\n\n");
                            render(v, indent + 2, out, clean);
                        }
                    }
                }
            }
            Doc::Seq(items) => {
                for v in items {
                    match v {
                        Doc::Scalar(s, st) => out.push_str(&format!("{pad}-   {}\n", spell(s, *st, clean))),
                        Doc::Map(entries) if !entries.is_empty() => {
                            let mut inner = String::new();
                            render(v, indent + 2, &mut inner, clean);
                            out.push_str(&format!("{pad}- {}", &inner[indent + 2..]));
                        }
                        _ => {
                            out.push_str(&format!("{pad}- # below\n"));
                            render(v, indent + 2, out, clean);
                        }
                    }
                }
            }
        }
    }

    /// What saphyr reads of `text`, and what the block reader does (if it reads it).
    fn both(text: &str) -> (Result<Node, SyntaxError>, Option<Result<Node, SyntaxError>>) {
        (parse(text), parse_block_from(text.as_bytes(), "none", &mut |_| {}))
    }

    fn reads_nested_items(d: &Doc) -> bool {
        match d {
            Doc::Scalar(..) => true,
            Doc::Map(entries) => entries.iter().all(|(_, _, v)| reads_nested_items(v)),
            Doc::Seq(items) => {
                items.iter().all(|v| matches!(v, Doc::Scalar(..) | Doc::Map(_)) && reads_nested_items(v))
            }
        }
    }

    proptest! {
        #[test]
        fn clean_documents_are_read_as_saphyr_reads_them(d in doc()) {
            let mut text = String::from("# made\n");
            render(&d, 0, &mut text, true);
            let (saphyr, block) = both(&text);
            if let Some(block) = &block {
                prop_assert_eq!(block, &saphyr, "{}", text);
            }
            // An item that is itself a collection other than a mapping, or is empty, is left to saphyr.
            let items_inline = reads_nested_items(&d) && !text.contains("- # below");
            if items_inline {
                prop_assert!(block.is_some(), "left to saphyr: {}", text);
                prop_assert!(saphyr.is_ok(), "{}", text);
            }
        }

        #[test]
        fn noisy_documents_are_read_as_saphyr_reads_them_or_left_to_it(
            d in doc(),
            noise in proptest::collection::vec((any::<usize>(), prop_oneof![
                Just(" "), Just("  "), Just("\n"), Just(":"), Just(": "), Just("#"), Just(" #"), Just("-"), Just("- "),
                Just("'"), Just("\""), Just("\\"), Just("é"), Just("---"), Just("..."), Just("\t"), Just("x"),
            ]), 1..4),
        ) {
            let mut text = String::new();
            render(&d, 0, &mut text, false);
            for (at, s) in noise {
                let mut at = at % (text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                text.insert_str(at, s);
            }
            let (saphyr, block) = both(&text);
            if let Some(block) = block {
                prop_assert_eq!(block, saphyr, "{}", text);
            }
        }
    }
}
