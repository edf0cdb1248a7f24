//! Decoding a JSON catalog from a reader, one resource at a time.
//!
//! An agent's catalog can hold megabytes of file content. Decoding it from a whole text in
//! memory doubles the peak (the text and the catalog at once); serde_json's reader decoding
//! avoids that but goes byte by byte and costs a quarter of a no-op run. This module finds the
//! extent of each value with a small scanner over a sliding buffer and hands each resource's
//! bytes to serde_json's fast slice decoder: memory holds one window, speed stays that of
//! `from_slice`. The result is the same catalog `serde_json::from_slice` gives, with the same
//! refusals (unknown fields, duplicate keys), proven by a property test.

use crate::catalog::{Catalog, Resource};
use std::io::Read;

/// How much is read at a time.
const CHUNK: usize = 256 * 1024;

/// Why a catalog could not be decoded from a reader.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("reading the catalog: {0}")]
    Read(#[from] std::io::Error),
    #[error("expected {wanted}, found {}", found.map(|b| format!("`{}`", b.escape_ascii())).unwrap_or_else(|| "the end of the input".into()))]
    Unexpected { wanted: &'static str, found: Option<u8> },
    #[error("the input ends inside {0}")]
    Truncated(&'static str),
    #[error("duplicate field `resources`")]
    DuplicateResources,
    #[error("trailing characters after the catalog")]
    Trailing,
    #[error("a field name is not valid UTF-8")]
    NotUtf8,
    #[error("{at}: {source}")]
    Json { at: String, source: serde_json::Error },
}

fn json(at: impl Into<String>) -> impl FnOnce(serde_json::Error) -> StreamError {
    move |source| StreamError::Json { at: at.into(), source }
}

/// Decodes a catalog in the JSON spelling from `r`.
pub fn catalog_from_reader<R: Read>(r: R) -> Result<Catalog, StreamError> {
    catalog_from_reader_each(r, &mut |_| {})
}

/// Decodes a catalog in the JSON spelling from `r`, handing each resource to `each` as soon as
/// it is decoded (an agent keeps large content aside there, before the next is read).
pub fn catalog_from_reader_each<R: Read>(r: R, each: &mut dyn FnMut(&mut Resource)) -> Result<Catalog, StreamError> {
    let mut s = Scanner { r, buf: Vec::with_capacity(CHUNK), pos: 0, eof: false };
    s.expect(b'{', "`{` opening the catalog")?;
    let mut header = String::from("{");
    let mut resources: Option<Vec<Resource>> = None;
    if s.peek()? == Some(b'}') {
        s.pos += 1;
    } else {
        loop {
            let key_end = s.value_end()?;
            let key: String = serde_json::from_slice(&s.buf[s.pos..key_end]).map_err(json("a field name"))?;
            s.pos = key_end;
            s.expect(b':', "`:` after a field name")?;
            if key == "resources" {
                if resources.is_some() {
                    return Err(StreamError::DuplicateResources);
                }
                resources = Some(s.resources(each)?);
            } else {
                let end = s.value_end()?;
                if header.len() > 1 {
                    header.push(',');
                }
                header.push_str(&serde_json::to_string(&key).expect("a string serializes"));
                header.push(':');
                header.push_str(std::str::from_utf8(&s.buf[s.pos..end]).map_err(|_| StreamError::NotUtf8)?);
                s.pos = end;
            }
            match s.next_byte()? {
                Some(b',') => continue,
                Some(b'}') => break,
                found => return Err(StreamError::Unexpected { wanted: "`,` or `}` after a field", found }),
            }
        }
    }
    if s.peek()?.is_some() {
        return Err(StreamError::Trailing);
    }
    header.push('}');
    let mut catalog: Catalog = serde_json::from_str(&header).map_err(json("the catalog header"))?;
    catalog.resources = resources.unwrap_or_default();
    Ok(catalog)
}

struct Scanner<R> {
    r: R,
    buf: Vec<u8>,
    /// The first byte not yet consumed.
    pos: usize,
    eof: bool,
}

impl<R: Read> Scanner<R> {
    /// Reads more; drops consumed bytes first when they are most of the buffer. Returns false
    /// at the end of the input.
    fn fill(&mut self) -> Result<bool, StreamError> {
        if self.eof {
            return Ok(false);
        }
        if self.pos > 0 && self.pos >= self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let n = (&mut self.r).take(CHUNK as u64).read_to_end(&mut self.buf)?;
        self.eof = n < CHUNK;
        Ok(n > 0)
    }

    /// The next byte that is not white space, left unconsumed.
    fn peek(&mut self) -> Result<Option<u8>, StreamError> {
        loop {
            while self.pos < self.buf.len() {
                let b = self.buf[self.pos];
                if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                    return Ok(Some(b));
                }
                self.pos += 1;
            }
            if !self.fill()? {
                return Ok(None);
            }
        }
    }

    fn next_byte(&mut self) -> Result<Option<u8>, StreamError> {
        let b = self.peek()?;
        if b.is_some() {
            self.pos += 1;
        }
        Ok(b)
    }

    fn expect(&mut self, want: u8, wanted: &'static str) -> Result<(), StreamError> {
        match self.next_byte()? {
            Some(b) if b == want => Ok(()),
            found => Err(StreamError::Unexpected { wanted, found }),
        }
    }

    /// The byte `off` bytes past `pos`, reading more when needed; `None` at the end of the
    /// input. Offsets from `pos` stay valid when a refill drops consumed bytes.
    fn at(&mut self, off: usize) -> Result<Option<u8>, StreamError> {
        while self.pos + off >= self.buf.len() {
            if !self.fill()? {
                return Ok(None);
            }
        }
        Ok(Some(self.buf[self.pos + off]))
    }

    /// Where the value starting at the next non-space byte ends (an index into `buf`, past
    /// the value). Moves `pos` to the value's first byte.
    fn value_end(&mut self) -> Result<usize, StreamError> {
        let first = self.peek()?.ok_or(StreamError::Unexpected { wanted: "a value", found: None })?;
        let mut off = 0;
        let end = match first {
            b'"' => self.string_end(0)?,
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.at(off)? {
                        Some(b'"') => off = self.string_end(off)?,
                        Some(b'{' | b'[') => {
                            depth += 1;
                            off += 1;
                        }
                        Some(b'}' | b']') => {
                            depth -= 1;
                            off += 1;
                            if depth == 0 {
                                break off;
                            }
                        }
                        Some(_) => off += 1,
                        None => return Err(StreamError::Truncated("a value")),
                    }
                }
            }
            _ => {
                while let Some(b) = self.at(off)? {
                    if matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                        break;
                    }
                    off += 1;
                }
                off
            }
        };
        Ok(self.pos + end)
    }

    /// `off` is at an opening quote; returns the offset just past the closing one. Strings
    /// hold nearly all of a catalog's bytes (file content): the next quote or backslash is
    /// found with `memchr`, not byte by byte.
    fn string_end(&mut self, mut off: usize) -> Result<usize, StreamError> {
        off += 1;
        loop {
            let start = self.pos + off;
            match memchr::memchr2(b'"', b'\\', self.buf.get(start..).unwrap_or_default()) {
                Some(k) if self.buf[start + k] == b'"' => return Ok(off + k + 1),
                Some(k) => {
                    // A backslash escapes the byte after it, whatever it is.
                    off += k + 1;
                    if self.at(off)?.is_none() {
                        return Err(StreamError::Truncated("a string"));
                    }
                    off += 1;
                }
                None => {
                    off = self.buf.len() - self.pos;
                    if !self.fill()? {
                        return Err(StreamError::Truncated("a string"));
                    }
                }
            }
        }
    }

    /// The `resources` array, each element decoded as soon as its extent is known.
    fn resources(&mut self, each: &mut dyn FnMut(&mut Resource)) -> Result<Vec<Resource>, StreamError> {
        self.expect(b'[', "`[` opening the resource list")?;
        let mut out = Vec::new();
        if self.peek()? == Some(b']') {
            self.pos += 1;
            return Ok(out);
        }
        loop {
            let end = self.value_end()?;
            let mut r: Resource =
                serde_json::from_slice(&self.buf[self.pos..end]).map_err(json(format!("resource {}", out.len())))?;
            each(&mut r);
            out.push(r);
            self.pos = end;
            match self.next_byte()? {
                Some(b',') => continue,
                Some(b']') => return Ok(out),
                found => return Err(StreamError::Unexpected { wanted: "`,` or `]` in the resource list", found }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reads `bytes` a few at a time, to cross every chunk boundary.
    struct Trickle<'a>(&'a [u8], usize);
    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.1.min(out.len()).min(self.0.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn both(text: &str) -> (Result<Catalog, String>, Result<Catalog, String>) {
        let streamed = catalog_from_reader(Trickle(text.as_bytes(), 7)).map_err(|e| e.to_string());
        let whole = serde_json::from_str::<Catalog>(text).map_err(|e| e.to_string());
        (streamed, whole)
    }

    #[test]
    fn same_as_whole_text_decoding() {
        for text in [
            r#"{"format":1,"resources":[]}"#,
            r#" { "resources" : [ {"file":"/a","content":"x\"]}{[\\"} , {"directory":"/b"} ] , "format" : 1 , "host":"h" } "#,
            r#"{"format":1}"#,
            r#"{"format":1,"serial":12,"issued_at":"2026-11-30T00:00:00Z","source":{"repository":"r","commit":"c"},"resources":[{"symlink":"/l","target":"/t"}]}"#,
        ] {
            let (s, w) = both(text);
            assert_eq!(s.unwrap(), w.unwrap(), "{text}");
        }
    }

    #[test]
    fn refuses_what_whole_text_decoding_refuses() {
        for text in [
            r#"{"format":1,"resources":[],"resources":[]}"#,
            r#"{"format":1,"format":1,"resources":[]}"#,
            r#"{"format":1,"colour":"red","resources":[]}"#,
            r#"{"format":1,"resources":[{"file":"/a","mdoe":"0644"}]}"#,
            r#"{"format":1,"resources":[{"file":"/a"}]"#,
            r#"{"format":1,"resources":[{"file":"/a"}]} x"#,
            r#"{"format":1,"resources":[{"file":"/a"},]}"#,
            r#"{"format":1,"resources":[{"file":"/a}]}"#,
            r#"["format"]"#,
            "",
        ] {
            let (s, w) = both(text);
            assert!(s.is_err(), "streamed accepted {text:?}");
            assert!(w.is_err(), "whole accepted {text:?}");
        }
    }

    #[test]
    fn each_refusal_says_what_kind_it_is() {
        let kind = |text: &str| catalog_from_reader(text.as_bytes()).unwrap_err();
        assert!(matches!(kind(r#"{"format":1,"resources":[{"file":"/a"#), StreamError::Truncated("a string")));
        assert!(matches!(kind(r#"{"format":1,"resources":[{"file":1"#), StreamError::Truncated("a value")));
        assert!(matches!(kind(r#"{"resources":[],"resources":[]}"#), StreamError::DuplicateResources));
        assert!(matches!(kind(r#"{"format":1} {"#), StreamError::Trailing));
        assert!(matches!(kind(r#"{"resources":[{"file":"/a","mdoe":1}]}"#), StreamError::Json { .. }));
        let e = kind("[");
        assert_eq!(e.to_string(), "expected `{` opening the catalog, found `[`");
        assert_eq!(kind("").to_string(), "expected `{` opening the catalog, found the end of the input");
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk gone"))
            }
        }
        assert!(matches!(catalog_from_reader(Broken), Err(StreamError::Read(_))));
    }

    fn arb_text() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![Just('"'), Just('\\'), Just('{'), Just(']'), Just('\n'), any::<char>()],
            0..40,
        )
        .prop_map(|v| v.into_iter().collect())
    }

    proptest! {
        #[test]
        fn any_catalog_round_trips_through_the_stream(
            contents in proptest::collection::vec(arb_text(), 0..30),
            chunk in 1usize..64,
            pretty in any::<bool>(),
        ) {
            use crate::catalog::*;
            let resources = contents.iter().enumerate().map(|(i, c)| {
                let spec = FileSpec { content: Some(c.clone().into()), ..FileSpec::default() };
                Resource::new(ResourceId::new(Kind::File, &format!("/f{i}")).unwrap(), Meta::default(), Spec::File(spec))
            }).collect();
            let catalog = Catalog { host: Some("h\"{".into()), ..Catalog::new(resources) };
            let text = if pretty { serde_json::to_string_pretty(&catalog) } else { serde_json::to_string(&catalog) }.unwrap();
            let back = catalog_from_reader(Trickle(text.as_bytes(), chunk)).unwrap();
            prop_assert_eq!(back, catalog);
        }
    }
}
