//! A file's content in a catalog: held in memory, or kept aside in a store outside the heap.
//!
//! A catalog of thousands of files carries megabytes of content, of which a run needs one
//! file's at a time. An agent gives its decoder a [`Store`] (an unnamed temporary file) and
//! each large content goes there as soon as its resource is decoded: the process holds offsets,
//! not text. Reading it back is one `pread`, only for a file whose size already matches.
//! Sensitive content (a secret) never leaves memory, and a store that cannot take more (a full
//! disk) leaves content held: keeping aside saves memory, it never fails a run.
//!
//! Everywhere else content behaves as the text it is: it serializes as that text (a resource's
//! hash, a merge, a report see the same bytes), it deserializes held, and two contents are equal
//! when their bytes are.

use crate::catalog::{Resource, Spec};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Cow;
use std::fmt;
use std::io;
use std::sync::Arc;

/// Content of this many bytes or more is kept aside; below it, the `pread` to read it back
/// would cost more than the memory it saves.
pub const KEEP_ASIDE_FROM: usize = 512;

/// Where content is kept aside: bytes put once, read back by place.
pub trait Store: Send + Sync {
    /// Keeps `bytes`; returns where they start.
    fn put(&self, bytes: &[u8]) -> io::Result<u64>;
    /// The `len` bytes put at `at`.
    fn read(&self, at: u64, len: usize) -> io::Result<Vec<u8>>;
}

/// A file's content: text, wherever it is.
#[derive(Clone)]
pub struct Content(Repr);

#[derive(Clone)]
enum Repr {
    Held(String),
    Kept { store: Arc<dyn Store>, at: u64, len: usize },
}

impl Content {
    /// Its length in bytes, without reading it.
    pub fn len(&self) -> usize {
        match &self.0 {
            Repr::Held(s) => s.len(),
            Repr::Kept { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The text when it is in memory; `None` when it is kept aside.
    pub fn held(&self) -> Option<&str> {
        match &self.0 {
            Repr::Held(s) => Some(s),
            Repr::Kept { .. } => None,
        }
    }

    /// Whether it is kept aside.
    pub fn is_kept(&self) -> bool {
        matches!(self.0, Repr::Kept { .. })
    }

    /// Its bytes: borrowed when held, read back when kept aside.
    pub fn bytes(&self) -> io::Result<Cow<'_, [u8]>> {
        match &self.0 {
            Repr::Held(s) => Ok(Cow::Borrowed(s.as_bytes())),
            Repr::Kept { store, at, len } => {
                let bytes = store.read(*at, *len)?;
                if bytes.len() != *len {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "content kept aside was cut short"));
                }
                Ok(Cow::Owned(bytes))
            }
        }
    }

    /// Its text: borrowed when held, read back (and checked to be UTF-8 still) when kept aside.
    pub fn text(&self) -> io::Result<Cow<'_, str>> {
        match self.bytes()? {
            Cow::Borrowed(b) => Ok(Cow::Borrowed(std::str::from_utf8(b).expect("held content is a String"))),
            Cow::Owned(b) => String::from_utf8(b)
                .map(Cow::Owned)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "content kept aside is no longer UTF-8")),
        }
    }

    /// The text, owned.
    pub fn into_string(self) -> io::Result<String> {
        match self.0 {
            Repr::Held(s) => Ok(s),
            Repr::Kept { .. } => self.text().map(Cow::into_owned),
        }
    }

    /// This content kept aside in `store` when it is held and worth it; as it was when the
    /// store cannot take it.
    fn kept_aside(self, store: &Arc<dyn Store>) -> Result<Content, (Content, io::Error)> {
        match self.0 {
            Repr::Held(s) if s.len() >= KEEP_ASIDE_FROM => match store.put(s.as_bytes()) {
                Ok(at) => Ok(Content(Repr::Kept { store: Arc::clone(store), at, len: s.len() })),
                Err(e) => Err((Content(Repr::Held(s)), e)),
            },
            repr => Ok(Content(repr)),
        }
    }
}

/// Keeps the content of `r` aside in `store` when it is a file's, large enough, and not
/// sensitive. On an error (the store is full) the content stays held and the error is
/// returned, for the caller to stop trying.
pub fn keep_aside(r: &mut Resource, store: &Arc<dyn Store>) -> io::Result<()> {
    let sensitive = r.sensitive();
    let Spec::File(f) = &mut r.spec else { return Ok(()) };
    match f.content.take() {
        Some(c) if !sensitive => match c.kept_aside(store) {
            Ok(c) => {
                f.content = Some(c);
                Ok(())
            }
            Err((c, e)) => {
                f.content = Some(c);
                Err(e)
            }
        },
        c => {
            f.content = c;
            Ok(())
        }
    }
}

impl From<String> for Content {
    fn from(s: String) -> Self {
        Content(Repr::Held(s))
    }
}

impl From<&str> for Content {
    fn from(s: &str) -> Self {
        Content(Repr::Held(s.to_string()))
    }
}

impl Default for Content {
    fn default() -> Self {
        Content(Repr::Held(String::new()))
    }
}

impl fmt::Debug for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Held(s) => fmt::Debug::fmt(s, f),
            Repr::Kept { at, len, .. } => write!(f, "<{len} bytes kept aside at {at}>"),
        }
    }
}

impl PartialEq for Content {
    fn eq(&self, other: &Self) -> bool {
        if let (Repr::Held(a), Repr::Held(b)) = (&self.0, &other.0) {
            return a == b;
        }
        self.len() == other.len()
            && match (self.bytes(), other.bytes()) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            }
    }
}

impl Serialize for Content {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = self.text().map_err(|e| serde::ser::Error::custom(format!("content kept aside: {e}")))?;
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Content::from)
    }
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for Content {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        String::schema_name()
    }

    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        String::json_schema(g)
    }
}

/// A store in memory, for tests: it can be told to refuse (a full disk) or to lose its bytes.
#[cfg(test)]
#[derive(Default)]
pub struct MemStore {
    pub bytes: std::sync::Mutex<Vec<u8>>,
    pub full: std::sync::atomic::AtomicBool,
}

#[cfg(test)]
impl Store for MemStore {
    fn put(&self, bytes: &[u8]) -> io::Result<u64> {
        if self.full.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(28));
        }
        let mut all = self.bytes.lock().unwrap();
        let at = all.len() as u64;
        all.extend_from_slice(bytes);
        Ok(at)
    }

    fn read(&self, at: u64, len: usize) -> io::Result<Vec<u8>> {
        let all = self.bytes.lock().unwrap();
        let at = at as usize;
        Ok(all.get(at..at.saturating_add(len).min(all.len())).unwrap_or_default().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{FileSpec, Kind, Meta, ResourceId};

    fn file(content: &str, sensitive: bool) -> Resource {
        Resource {
            id: ResourceId::new(Kind::File, "/etc/big").unwrap(),
            meta: Meta { sensitive: sensitive.then_some(true), ..Meta::default() },
            spec: Spec::File(FileSpec { content: Some(content.into()), ..FileSpec::default() }),
        }
    }

    fn content(r: &Resource) -> &Content {
        let Spec::File(f) = &r.spec else { panic!("a file") };
        f.content.as_ref().unwrap()
    }

    #[test]
    fn large_content_is_kept_aside_and_reads_back_the_same() {
        let mem = Arc::new(MemStore::default());
        let store: Arc<dyn Store> = mem.clone();
        let big = "é".repeat(KEEP_ASIDE_FROM);
        let mut r = file(&big, false);
        let before = serde_json::to_string(&r).unwrap();
        keep_aside(&mut r, &store).unwrap();
        let c = content(&r);
        assert!(c.is_kept() && c.held().is_none());
        assert_eq!((c.len(), c.text().unwrap().as_ref()), (big.len(), big.as_str()));
        assert_eq!(mem.bytes.lock().unwrap().len(), big.len(), "the bytes are in the store");
        // It serializes, compares and clones as the text it is.
        assert_eq!(serde_json::to_string(&r).unwrap(), before);
        assert_eq!(*c, Content::from(big.clone()));
        assert_ne!(*c, Content::from("x".repeat(big.len())));
        assert_eq!(c.clone().into_string().unwrap(), big);
    }

    #[test]
    fn small_sensitive_and_refused_content_stays_held() {
        let mem = Arc::new(MemStore::default());
        let store: Arc<dyn Store> = mem.clone();
        let mut small = file(&"a".repeat(KEEP_ASIDE_FROM - 1), false);
        keep_aside(&mut small, &store).unwrap();
        let mut secret = file(&"s".repeat(4 * KEEP_ASIDE_FROM), true);
        keep_aside(&mut secret, &store).unwrap();
        assert!(mem.bytes.lock().unwrap().is_empty(), "a secret never leaves memory");
        mem.full.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut big = file(&"b".repeat(KEEP_ASIDE_FROM), false);
        assert_eq!(keep_aside(&mut big, &store).unwrap_err().raw_os_error(), Some(28));
        for r in [&small, &secret, &big] {
            assert!(content(r).held().is_some(), "held: {:?}", r.id);
        }
        assert_eq!(content(&big).held().unwrap(), "b".repeat(KEEP_ASIDE_FROM));
    }

    #[test]
    fn content_cut_short_in_its_store_is_an_error_not_other_bytes() {
        let mem = Arc::new(MemStore::default());
        let store: Arc<dyn Store> = mem.clone();
        let mut r = file(&"c".repeat(KEEP_ASIDE_FROM * 2), false);
        keep_aside(&mut r, &store).unwrap();
        mem.bytes.lock().unwrap().truncate(10);
        let c = content(&r);
        assert_eq!(c.bytes().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert!(serde_json::to_string(&r).unwrap_err().to_string().contains("content kept aside"));
        assert_ne!(*c, c.clone(), "unreadable content equals nothing");
    }
}
