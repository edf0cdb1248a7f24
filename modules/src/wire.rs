//! What travels between agent and server over HTTPS (JSON bodies), under `/v1`.
//!
//! - `GET /v1/ca`: the CA certificate (PEM), to check against the pinned hash at bootstrap.
//! - `POST /v1/enroll` [`EnrollRequest`] -> [`EnrollResponse`]: a client certificate for a node.
//! - `POST /v1/catalog` [`CatalogRequest`] (mutual TLS, `If-None-Match`) -> an envelope or 304.
//! - `POST /v1/reports` [`Report`] (mutual TLS).
//! - `POST /v1/renew` [`RenewRequest`] (mutual TLS) -> [`RenewResponse`]: a new certificate
//!   for the node, for a key made on the host.
//! - `GET /healthz`, `GET /metrics`.
//!
//! Errors come back as [`ErrorBody`] with a status code; a 503 carries `Retry-After`.
//!
//! Every body has bounds ([`Limits`]): the server refuses a body past them before it reads
//! the rest, and checks each field of what it did read ([`EnrollRequest::check`],
//! [`CatalogRequest::check`], [`Report::check`]); the agent clips its own reports to fit
//! ([`Report::clip`]), so only a broken or hostile client is ever refused.

use crate::report::{ResourceEvent, RunInfo, Summary};
use crate::time::Timestamp;
use crate::trust::Envelope;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The node name the certificate will carry.
    pub name: String,
    /// The agent's public key, SPKI PEM (the private key never leaves the host).
    pub public_key: String,
    /// A one-time token; without one the request waits for `converge-server node approve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The host's sealing key (an age recipient, `age1...`): the server encrypts the
    /// catalog's secrets to it (see `sealed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase", deny_unknown_fields)]
pub enum EnrollResponse {
    /// The node's certificate (PEM) and the key list its catalogs are signed under.
    Issued { certificate: String, trusted_keys: Envelope },
    /// Waiting for an operator: ask again with the same key.
    Pending { message: String },
}

/// A node asks for a new certificate (over mutual TLS with its current one), for a new key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// The new public key, SPKI PEM (made on the host; its private key never leaves it).
    pub public_key: String,
    /// The host's sealing key (`age1...`), for a host that made one since it enrolled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewResponse {
    /// The new certificate (PEM), for the same node name.
    pub certificate: String,
}

impl RenewRequest {
    pub fn check(&self) -> Result<(), WireError> {
        within("the public key", &self.public_key, Limits::PUBLIC_KEY)?;
        self.seal_key.as_deref().map_or(Ok(()), |k| within("the sealing key", k, Limits::SEAL_KEY))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogRequest {
    pub agent_version: String,
    /// Catalog format majors the agent reads; the server compiles to the newest it can.
    pub formats: Vec<u32>,
    /// What the host reports about itself (never used to classify it).
    pub facts: serde_json::Map<String, serde_json::Value>,
    /// The hash of the CA bundle the host trusts (see the server's `ca status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
    /// The version of the key list the host holds (see the server's `keys status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_version: Option<u64>,
    /// The host's runs are paused (`converge pause`): why, since and until when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
}

/// One run's report, as the agent sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub started_at: Timestamp,
    pub info: RunInfo,
    pub resources: Vec<ResourceEvent>,
    pub summary: Summary,
    /// The catalog enforced was the cached one, past its expiry (the server was unreachable).
    #[serde(default)]
    pub stale: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// The bounds of what travels, in bytes unless said otherwise.
pub struct Limits;

impl Limits {
    /// An enrollment request: a name, a public key, a token.
    pub const ENROLL_BODY: usize = 16 << 10;
    /// A catalog request: mostly facts.
    pub const CATALOG_BODY: usize = 1 << 20;
    /// A report: every resource's outcome, with diffs.
    pub const REPORT_BODY: usize = 8 << 20;
    /// A node name (as DNS).
    pub const NAME: usize = 253;
    /// An SPKI PEM public key (an Ed25519 one is 113 bytes).
    pub const PUBLIC_KEY: usize = 1 << 10;
    /// An age recipient is 62 characters.
    pub const SEAL_KEY: usize = 128;
    pub const TOKEN: usize = 128;
    pub const AGENT_VERSION: usize = 64;
    /// What a paused host says about its pause.
    pub const PAUSED: usize = 1024;
    pub const FORMATS: usize = 16;
    pub const FACTS: usize = 1000;
    /// Resources in one report, and so any count in its summary.
    pub const RESOURCES: usize = 1_000_000;
    /// A resource id, a catalog label, a host, a commit, a key id.
    pub const ID: usize = 4 << 10;
    /// A message, a warning, one side of a change.
    pub const MESSAGE: usize = 16 << 10;
    /// One diff.
    pub const DIFF: usize = 256 << 10;
    /// Changes of one resource, warnings of one run.
    pub const LIST: usize = 256;
}

/// Why a body from the wire, or a node's name, is refused: each a field and the bound it
/// broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("`{0}` is not a node name: 1 to {max} characters", max = Limits::NAME)]
    NameLength(String),
    #[error("`{0}` is not a node name: dot-separated labels of letters, digits, - and _ (not starting with -)")]
    NameLabels(String),
    #[error("{what} is {len} bytes, more than the {max} allowed")]
    TooLong { what: &'static str, len: usize, max: usize },
    #[error("{what}: {n}, more than the {max} allowed")]
    TooMany { what: &'static str, n: usize, max: usize },
    #[error("{0}")]
    Malformed(&'static str),
}

/// Why `name` cannot be a node's name, if it cannot: DNS-like labels of letters, digits, `-`
/// and `_`, separated by single dots, none starting with `-` (it would read as an option),
/// 253 bytes at most. `.` and `..` are not names.
pub fn check_node_name(name: &str) -> Result<(), WireError> {
    let shown = || crate::text::clip(name, 64).into_owned();
    if name.is_empty() || name.len() > Limits::NAME {
        return Err(WireError::NameLength(shown()));
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(WireError::NameLabels(shown()));
        }
    }
    Ok(())
}

/// How people compare a node's key on the host and on the server before approving it:
/// `sha256:` and the hex SHA-256 of the raw Ed25519 public key.
pub fn key_fingerprint(public: &[u8; 32]) -> String {
    format!("sha256:{}", crate::hash::sha256_hex(public))
}

fn within(what: &'static str, value: &str, max: usize) -> Result<(), WireError> {
    if value.len() > max { Err(WireError::TooLong { what, len: value.len(), max }) } else { Ok(()) }
}

fn count_within(what: &'static str, n: usize, max: usize) -> Result<(), WireError> {
    if n > max { Err(WireError::TooMany { what, n, max }) } else { Ok(()) }
}

impl EnrollRequest {
    pub fn check(&self) -> Result<(), WireError> {
        check_node_name(&self.name)?;
        within("the public key", &self.public_key, Limits::PUBLIC_KEY)?;
        self.seal_key.as_deref().map_or(Ok(()), |k| within("the sealing key", k, Limits::SEAL_KEY))?;
        self.token.as_deref().map_or(Ok(()), |t| within("the token", t, Limits::TOKEN))
    }
}

impl CatalogRequest {
    pub fn check(&self) -> Result<(), WireError> {
        within("agent_version", &self.agent_version, Limits::AGENT_VERSION)?;
        if self.agent_version.chars().any(|c| c.is_control()) {
            return Err(WireError::Malformed("agent_version holds control characters"));
        }
        count_within("formats", self.formats.len(), Limits::FORMATS)?;
        if let Some(h) = &self.ca_bundle
            && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(WireError::Malformed("ca_bundle is not a SHA-256 in hex"));
        }
        if let Some(p) = &self.paused {
            within("paused", p, Limits::PAUSED)?;
            if p.chars().any(|c| c.is_control()) {
                return Err(WireError::Malformed("paused holds control characters"));
            }
        }
        count_within("facts", self.facts.len(), Limits::FACTS)
    }
}

/// Cuts `s` to at most `max` bytes at a character boundary, saying so.
fn clip_string(s: &mut String, max: usize) {
    if s.len() > max {
        let note = " [cut]";
        let mut cut = max.saturating_sub(note.len());
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str(note);
    }
}

impl Report {
    /// Every field within [`Limits`]: what the server demands of a report it stores.
    pub fn check(&self) -> Result<(), WireError> {
        let i = &self.info;
        within("info.catalog", &i.catalog, Limits::ID)?;
        for (what, v) in [("info.host", &i.host), ("info.commit", &i.commit), ("info.signed_by", &i.signed_by)] {
            v.as_deref().map_or(Ok(()), |v| within(what, v, Limits::ID))?;
        }
        count_within("info.warnings", i.warnings.len(), Limits::LIST)?;
        i.warnings.iter().try_for_each(|w| within("a warning", w, Limits::MESSAGE))?;
        count_within("info.resources", i.resources, Limits::RESOURCES)?;
        count_within("resources", self.resources.len(), Limits::RESOURCES)?;
        for r in &self.resources {
            within("a resource id", &r.id, Limits::ID)?;
            within("a status", r.status.as_str(), Limits::ID)?;
            for m in [&r.message, &r.refresh].into_iter().flatten() {
                within("a message", m, Limits::MESSAGE)?;
            }
            count_within("changes of one resource", r.changes.len(), Limits::LIST)?;
            for c in &r.changes {
                within("a change's attribute", &c.attribute, Limits::ID)?;
                within("a change", &c.from, Limits::MESSAGE)?;
                within("a change", &c.to, Limits::MESSAGE)?;
                c.diff.as_deref().map_or(Ok(()), |d| within("a diff", d, Limits::DIFF))?;
            }
        }
        let s = &self.summary;
        for (what, n) in [
            ("summary.resources", s.resources),
            ("summary.unchanged", s.unchanged),
            ("summary.changed", s.changed),
            ("summary.would_change", s.would_change),
            ("summary.failed", s.failed),
            ("summary.skipped", s.skipped),
            ("summary.held", s.held),
            ("summary.unplanned", s.unplanned),
        ] {
            count_within(what, n, Limits::RESOURCES)?;
        }
        if !s.duration_ms.is_finite() {
            return Err(WireError::Malformed("summary.duration_ms is not a number"));
        }
        Ok(())
    }

    /// Cuts the agent's own report to [`Limits`] (a huge diff, a long tool message), so that
    /// the server never refuses what an honest agent sends.
    pub fn clip(&mut self) {
        let i = &mut self.info;
        clip_string(&mut i.catalog, Limits::ID);
        for v in [&mut i.host, &mut i.commit, &mut i.signed_by].into_iter().flatten() {
            clip_string(v, Limits::ID);
        }
        i.warnings.truncate(Limits::LIST);
        i.warnings.iter_mut().for_each(|w| clip_string(w, Limits::MESSAGE));
        self.resources.truncate(Limits::RESOURCES);
        for r in &mut self.resources {
            clip_string(&mut r.id, Limits::ID);
            for m in [&mut r.message, &mut r.refresh].into_iter().flatten() {
                clip_string(m, Limits::MESSAGE);
            }
            r.changes.truncate(Limits::LIST);
            for c in &mut r.changes {
                clip_string(&mut c.attribute, Limits::ID);
                clip_string(&mut c.from, Limits::MESSAGE);
                clip_string(&mut c.to, Limits::MESSAGE);
                if let Some(d) = &mut c.diff {
                    clip_string(d, Limits::DIFF);
                }
            }
        }
        // Then the whole, against an estimate with room to spare: diffs go first, then the
        // events of unchanged resources (the summary still counts them), then the rest.
        let budget = Limits::REPORT_BODY / 4 * 3;
        if self.estimate() <= budget {
            return;
        }
        for r in &mut self.resources {
            for c in &mut r.changes {
                c.diff = None;
            }
        }
        if self.estimate() > budget {
            self.resources.retain(|r| r.status != crate::report::Status::Unchanged);
        }
        while self.estimate() > budget && !self.resources.is_empty() {
            let keep = self.resources.len() / 2;
            self.resources.truncate(keep);
        }
    }

    /// About how many bytes the report takes as JSON (a little more, never much less).
    fn estimate(&self) -> usize {
        let event = |r: &ResourceEvent| {
            let changes: usize = r
                .changes
                .iter()
                .map(|c| {
                    64 + c.attribute.len()
                        + 2 * (c.from.len() + c.to.len())
                        + 2 * c.diff.as_ref().map_or(0, String::len)
                })
                .sum();
            128 + 2 * r.id.len()
                + 2 * (r.message.as_ref().map_or(0, String::len) + r.refresh.as_ref().map_or(0, String::len))
                + changes
        };
        let warnings: usize = self.info.warnings.iter().map(|w| 8 + 2 * w.len()).sum();
        1024 + 2 * self.info.catalog.len() + warnings + self.resources.iter().map(event).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Change, ResourceEvent, Status};

    #[test]
    fn node_names_are_dns_like() {
        for good in ["web01", "web01.example.com", "a_b-c.d", "x"] {
            assert_eq!(check_node_name(good), Ok(()), "{good}");
        }
        for bad in [".", "..", "-rf", "a.-b", "a..b", ".a", "a.", "a b", "a/b", "a\nb", "é", ""] {
            assert!(check_node_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_node_name(&"a".repeat(254)).is_err());
        assert!(check_node_name(&"a".repeat(64)).is_err(), "a label is at most 63");
        let e = check_node_name("evil\n[ERROR] x").unwrap_err().to_string();
        assert!(!e.contains('\n'));
    }

    fn report() -> Report {
        Report {
            started_at: Timestamp(0),
            info: RunInfo {
                catalog: "x".into(),
                host: None,
                serial: None,
                commit: None,
                dry_run: false,
                resources: 1,
                signed_by: None,
                warnings: vec![],
            },
            resources: vec![ResourceEvent {
                id: "file:/a".into(),
                status: Status::Changed,
                changes: vec![Change { diff: Some("d".repeat(Limits::DIFF * 2)), ..Change::new("content", "a", "b") }],
                ..ResourceEvent::default()
            }],
            summary: Summary { resources: 1, changed: 1, ..Summary::default() },
            stale: false,
        }
    }

    #[test]
    fn an_honest_report_is_clipped_to_fit_and_a_hostile_one_refused() {
        let mut r = report();
        assert!(r.check().unwrap_err().to_string().contains("a diff is"), "{:?}", r.check());
        r.clip();
        assert_eq!(r.check(), Ok(()));
        assert!(r.resources[0].changes[0].diff.as_ref().unwrap().ends_with("[cut]"));
        let mut r = report();
        r.clip();
        r.summary.changed = usize::MAX;
        assert!(r.check().unwrap_err().to_string().contains("summary.changed"));
        r.summary.changed = 1;
        r.summary.duration_ms = f64::NAN;
        assert!(r.check().is_err());
    }

    #[test]
    fn a_huge_honest_report_fits_the_body_limit() {
        let mut r = report();
        let changed = r.resources[0].clone();
        let unchanged =
            ResourceEvent { id: "file:/u".repeat(50), status: Status::Unchanged, ..ResourceEvent::default() };
        r.resources = std::iter::repeat_n(changed, 100).chain(std::iter::repeat_n(unchanged, 200_000)).collect();
        r.clip();
        assert_eq!(r.check(), Ok(()));
        let size = serde_json::to_vec(&r).unwrap().len();
        assert!(size <= Limits::REPORT_BODY, "{size}");
        assert_eq!(r.resources.iter().filter(|e| e.status == Status::Changed).count(), 100, "changes are kept");
    }
}
