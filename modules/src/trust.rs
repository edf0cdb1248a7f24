//! Signed catalogs: envelopes, key lists, and the checks an agent makes before it believes a
//! catalog. Pure: no clock, no files (the caller passes "now" and what it holds).
//!
//! An [`Envelope`] carries the exact payload bytes (base64) and ed25519 signatures over
//! `DSSEv1 <len> <type> <len> <payload>` (DSSE's pre-authentication encoding: a signature for
//! one payload type can never be replayed as another). The verifier checks the signature over
//! the bytes first and parses only bytes it has verified.
//!
//! Keys have roles. A **root** key (kept offline) alone signs the versioned [`KeyList`];
//! **catalog** keys (online, on the server) sign catalogs. Adding or retiring a key is a new
//! version of the list signed by a root key the agent already trusts, and an agent refuses a
//! list older than the one it holds: a stolen catalog key can neither add keys nor retire the
//! real ones. Envelopes carry the server's current key list, so rotation reaches agents with
//! their next catalog.

use crate::catalog::{Catalog, FORMAT_SEALED};
use crate::hash::sha256_hex;
use crate::text::clip;
use crate::time::Timestamp;
use base64ct::{Base64, Encoding};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::fmt;

pub const CATALOG_TYPE: &str = "application/vnd.converge.catalog+json";
pub const KEYS_TYPE: &str = "application/vnd.converge.keys+json";

/// The largest catalog payload an agent accepts.
pub const MAX_PAYLOAD: usize = 32 << 20;
/// The largest envelope an agent reads (the payload in base64, plus signatures and keys).
pub const MAX_ENVELOPE: usize = MAX_PAYLOAD / 3 * 4 + (1 << 20);
/// How far a clock may be behind the newest catalog before it is reported.
pub const CLOCK_SKEW: i64 = 5 * 60;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub payload_type: String,
    /// The payload bytes, base64.
    pub payload: String,
    pub signatures: Vec<Sig>,
    /// The signer's current key list (itself an envelope of [`KEYS_TYPE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Box<Envelope>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sig {
    pub keyid: String,
    /// The signature, base64.
    pub sig: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyRole {
    /// Signs key lists; kept offline.
    Root,
    /// Signs catalogs; online on the server.
    Catalog,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedKey {
    pub id: String,
    pub role: KeyRole,
    /// The ed25519 public key, base64.
    pub public: String,
}

/// The keys an agent trusts, versioned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyList {
    pub version: u64,
    pub keys: Vec<TrustedKey>,
}

/// Why a key list is refused: one line for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyListError {
    #[error("key {id}: {why}")]
    BadKey { id: String, why: &'static str },
    #[error("a key is listed twice")]
    Duplicate,
    #[error("it lists no root key")]
    NoRoot,
    #[error("the payload is not base64")]
    NotBase64,
    /// Not a key list (the JSON reader's words).
    #[error("{0}")]
    Malformed(String),
    /// Its envelope is not signed as a key list must be.
    #[error("{0}")]
    Envelope(Box<Refusal>),
    #[error("version {new} is older than the version {held} held")]
    Older { new: u64, held: u64 },
    #[error("version {0} differs from the list of the same version held")]
    Differs(u64),
}

impl From<Refusal> for KeyListError {
    fn from(r: Refusal) -> Self {
        KeyListError::Envelope(Box::new(r))
    }
}

/// Why an envelope was refused: one line for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    TooLarge(usize),
    Malformed(String),
    WrongType(String),
    /// No signature by a trusted key of the needed role; names the key ids seen.
    Untrusted {
        role: KeyRole,
        seen: Vec<String>,
    },
    BadSignature(String),
    Keys(KeyListError),
    Incomplete(&'static str),
    NewerFormat(u32),
    WrongHost {
        catalog: String,
        node: String,
    },
    Rollback {
        serial: u64,
        last: u64,
    },
    Replay {
        serial: u64,
    },
    Expired {
        expires_at: Timestamp,
        now: Timestamp,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Most of these carry text from the unverified envelope: escaped and bounded.
        let c = |s: &str| clip(s, 200).into_owned();
        match self {
            Refusal::TooLarge(n) => write!(f, "the envelope is {n} bytes, more than the {MAX_ENVELOPE} accepted"),
            Refusal::Malformed(why) => write!(f, "not a valid envelope: {}", c(why)),
            Refusal::WrongType(t) => write!(f, "the envelope holds {}, not a catalog", c(t)),
            Refusal::Untrusted { role, seen } => {
                let shown: Vec<String> = seen.iter().take(4).map(|s| c(s)).collect();
                let more = if seen.len() > 4 { format!(" and {} more", seen.len() - 4) } else { String::new() };
                write!(
                    f,
                    "no valid signature by a trusted {} key (signed by {}{more})",
                    if *role == KeyRole::Root { "root" } else { "catalog" },
                    if shown.is_empty() { "nobody".to_string() } else { shown.join(", ") }
                )
            }
            Refusal::BadSignature(id) => write!(f, "the signature by key {} does not match the payload", c(id)),
            Refusal::Keys(why) => write!(f, "the key list it carries is refused: {}", c(&why.to_string())),
            Refusal::Incomplete(what) => write!(f, "a signed catalog must carry {what}"),
            Refusal::NewerFormat(v) => {
                write!(f, "catalog format {v} is newer than this agent understands ({FORMAT_SEALED}); upgrade converge")
            }
            Refusal::WrongHost { catalog, node } => {
                write!(f, "the catalog is for host {}, and this is {}", c(catalog), c(node))
            }
            Refusal::Rollback { serial, last } => write!(
                f,
                "serial {serial} is older than the last applied ({last}): a rollback (--allow-rollback to accept it)"
            ),
            Refusal::Replay { serial } => {
                write!(f, "serial {serial} was applied before with other resources: a replayed or forged catalog")
            }
            Refusal::Expired { expires_at, now } => {
                write!(f, "the catalog expired at {expires_at} (now {now}): a frozen or stale catalog")
            }
        }
    }
}

/// The id of a public key: the first 16 bytes of its SHA-256, in hex.
pub fn key_id(key: &VerifyingKey) -> String {
    sha256_hex(key.as_bytes())[..32].to_string()
}

/// DSSE's pre-authentication encoding: what is actually signed.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("DSSEv1 {} {} {} ", payload_type.len(), payload_type, payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Signs `payload` as `payload_type`.
pub fn sign(payload_type: &str, payload: &[u8], key: &SigningKey) -> Envelope {
    let sig = key.sign(&pae(payload_type, payload));
    Envelope {
        payload_type: payload_type.to_string(),
        payload: Base64::encode_string(payload),
        signatures: vec![Sig { keyid: key_id(&key.verifying_key()), sig: Base64::encode_string(&sig.to_bytes()) }],
        keys: None,
    }
}

impl TrustedKey {
    pub fn new(key: &VerifyingKey, role: KeyRole) -> TrustedKey {
        TrustedKey { id: key_id(key), role, public: Base64::encode_string(key.as_bytes()) }
    }

    fn verifying_key(&self) -> Result<VerifyingKey, KeyListError> {
        let bad = |why| KeyListError::BadKey { id: self.id.clone(), why };
        let bytes = Base64::decode_vec(&self.public).map_err(|_| bad("public key is not base64"))?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| bad("public key is not 32 bytes"))?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| bad("not an ed25519 public key"))?;
        if key_id(&key) != self.id {
            return Err(bad("its id does not match its public key"));
        }
        Ok(key)
    }
}

impl KeyList {
    /// The list's own consistency: ids match keys, at least one root key, no duplicates.
    fn check(&self) -> Result<(), KeyListError> {
        let mut ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        ids.sort();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(KeyListError::Duplicate);
        }
        if !self.keys.iter().any(|k| k.role == KeyRole::Root) {
            return Err(KeyListError::NoRoot);
        }
        self.keys.iter().try_for_each(|k| k.verifying_key().map(drop))
    }
}

/// Parses an envelope from bytes, within the size limit.
pub fn parse_envelope(bytes: &[u8]) -> Result<Envelope, Refusal> {
    if bytes.len() > MAX_ENVELOPE {
        return Err(Refusal::TooLarge(bytes.len()));
    }
    serde_json::from_slice(bytes).map_err(|e| Refusal::Malformed(e.to_string()))
}

/// The payload of `env` if it is of `payload_type` and signed by a key of `role` in `keys`.
/// Returns the payload and the id of the key whose signature verified.
pub fn open(env: &Envelope, payload_type: &str, keys: &KeyList, role: KeyRole) -> Result<(Vec<u8>, String), Refusal> {
    if env.payload_type != payload_type {
        return Err(Refusal::WrongType(env.payload_type.clone()));
    }
    let payload =
        Base64::decode_vec(&env.payload).map_err(|_| Refusal::Malformed("the payload is not base64".into()))?;
    let message = pae(payload_type, &payload);
    let mut seen = Vec::new();
    for s in &env.signatures {
        seen.push(s.keyid.clone());
        let Some(trusted) = keys.keys.iter().find(|k| k.id == s.keyid && k.role == role) else { continue };
        let key = trusted.verifying_key().map_err(Refusal::Keys)?;
        let sig = Base64::decode_vec(&s.sig).map_err(|_| Refusal::Malformed("a signature is not base64".into()))?;
        let sig = Signature::from_slice(&sig).map_err(|_| Refusal::BadSignature(s.keyid.clone()))?;
        key.verify_strict(&message, &sig).map_err(|_| Refusal::BadSignature(s.keyid.clone()))?;
        return Ok((payload, s.keyid.clone()));
    }
    Err(Refusal::Untrusted { role, seen })
}

/// A key list as first installed (copied from the server, or pinned at bootstrap): it must be
/// signed by one of its own root keys.
pub fn trust_key_list(env: &Envelope) -> Result<KeyList, KeyListError> {
    let payload = Base64::decode_vec(&env.payload).map_err(|_| KeyListError::NotBase64)?;
    let list: KeyList = serde_json::from_slice(&payload).map_err(|e| KeyListError::Malformed(e.to_string()))?;
    list.check()?;
    open(env, KEYS_TYPE, &list, KeyRole::Root)?;
    Ok(list)
}

/// Reads a key list file's bytes: the list and its envelope, signed by one of its own roots.
pub fn read_key_list(bytes: &[u8]) -> Result<(KeyList, Envelope), KeyListError> {
    let env = parse_envelope(bytes)?;
    let list = trust_key_list(&env)?;
    Ok((list, env))
}

/// Accepts `new` in place of `held` if a root key of `held` signed it and it is not older.
/// An equal version must be the identical list.
pub fn update_key_list(held: &KeyList, new: &Envelope) -> Result<KeyList, KeyListError> {
    let (payload, _) = open(new, KEYS_TYPE, held, KeyRole::Root)?;
    let list: KeyList = serde_json::from_slice(&payload).map_err(|e| KeyListError::Malformed(e.to_string()))?;
    list.check()?;
    if list.version < held.version {
        return Err(KeyListError::Older { new: list.version, held: held.version });
    }
    if list.version == held.version && list != *held {
        return Err(KeyListError::Differs(list.version));
    }
    Ok(list)
}

/// What the agent remembers of the last catalog it applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub host: String,
    pub serial: u64,
    pub issued_at: Timestamp,
    /// SHA-256 of the resources as serialized: an equal serial must carry the same ones.
    pub resources_sha256: String,
    /// The least the agent's "now" can be from here on: the newest `issued_at` verified, but
    /// never more than the agent's own clock (plus [`CLOCK_SKEW`]) when it accepted the
    /// catalog. A host whose clock dies keeps this floor; a signer whose clock runs ahead
    /// cannot push it into the future and freeze the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_floor: Option<Timestamp>,
}

impl Applied {
    /// The floor this record sets when the clock reads `now` (a record written before the
    /// floor was kept counts its `issued_at`, within the same bound).
    pub fn floor(&self, now: Timestamp) -> Timestamp {
        self.time_floor.unwrap_or(Timestamp(self.issued_at.0.min(now.0.saturating_add(CLOCK_SKEW))))
    }

    /// The same catalog: everything but the floor, which is the agent's own.
    pub fn same_catalog(&self, other: &Applied) -> bool {
        (&self.host, self.serial, self.issued_at, &self.resources_sha256)
            == (&other.host, other.serial, other.issued_at, &other.resources_sha256)
    }
}

/// What the agent checks a catalog against.
#[derive(Debug, Clone)]
pub struct Policy {
    /// This host's node name; `None` checks any host (offline verification).
    pub node: Option<String>,
    /// The clock, as the caller reads it.
    pub now: Timestamp,
    pub last: Option<Applied>,
    pub allow_rollback: bool,
    /// The envelope is the agent's own cached copy, enforced while the server cannot be
    /// reached: past its expiry it is still enforced, and marked stale.
    pub cached: bool,
}

/// A catalog that passed every check.
#[derive(Debug, Clone)]
pub struct Verified {
    pub catalog: Catalog,
    pub applied: Applied,
    /// The id of the key whose signature verified.
    pub signed_by: String,
    /// A newer key list the envelope carried, to keep once the catalog is accepted.
    pub new_keys: Option<(KeyList, Envelope)>,
    /// Things to report: an allowed rollback, a clock behind.
    pub warnings: Vec<String>,
    /// A cached catalog past its expiry, enforced anyway.
    pub stale: bool,
}

/// The SHA-256 of a catalog's resources as serialized, and of its sealed values' resources,
/// fields and fingerprints (not their ciphertext, which differs each time a value is sealed).
pub fn resources_sha256(c: &Catalog) -> String {
    let mut bytes = serde_json::to_vec(&c.resources).expect("resources serialize");
    for s in &c.sealed {
        bytes.extend_from_slice(format!("\0{}\0{}\0{}", s.resource, s.field.name(), s.fingerprint).as_bytes());
    }
    sha256_hex(&bytes)
}

/// The catalog of `env` if a catalog key of `keys` signed it: the signature over the bytes
/// first, then (parsing only verified bytes) the format, then the rest.
fn open_catalog(env: &Envelope, keys: &KeyList) -> Result<(Catalog, String), Refusal> {
    let (payload, signed_by) = open(env, CATALOG_TYPE, keys, KeyRole::Catalog)?;
    if payload.len() > MAX_PAYLOAD {
        return Err(Refusal::TooLarge(payload.len()));
    }
    #[derive(Deserialize)]
    struct Head {
        format: u32,
    }
    let head: Head = serde_json::from_slice(&payload).map_err(|e| Refusal::Malformed(format!("payload: {e}")))?;
    if head.format > FORMAT_SEALED {
        return Err(Refusal::NewerFormat(head.format));
    }
    let catalog: Catalog = serde_json::from_slice(&payload).map_err(|e| Refusal::Malformed(format!("payload: {e}")))?;
    Ok((catalog, signed_by))
}

/// The host, serial, issue and expiry times every signed catalog must carry.
fn signed_fields(c: &Catalog) -> Result<(String, u64, Timestamp, Timestamp), Refusal> {
    let host = c.host.clone().ok_or(Refusal::Incomplete("the host it is for"))?;
    let serial = c.serial.ok_or(Refusal::Incomplete("a serial"))?;
    let issued_at = c.issued_at.ok_or(Refusal::Incomplete("issued_at"))?;
    let expires_at = c.expires_at.ok_or(Refusal::Incomplete("expires_at"))?;
    Ok((host, serial, issued_at, expires_at))
}

/// The key list to check an envelope the agent accepted before: `held`, or the list the
/// envelope carries when a root key of `held` signed that list.
fn keys_for_stored(env: &Envelope, held: &KeyList) -> Option<KeyList> {
    let carried = env.keys.as_deref()?;
    let (payload, _) = open(carried, KEYS_TYPE, held, KeyRole::Root).ok()?;
    let list: KeyList = serde_json::from_slice(&payload).ok()?;
    list.check().ok().map(|()| list)
}

/// What an envelope the agent accepted before says of itself, to cross-check its record of
/// what it applied: the signed host, serial and issue time (the resources are skipped, not
/// parsed: see [`applied_of`] for their hash). No freshness or serial check (it was accepted
/// once).
pub fn signed_head(env: &Envelope, held: &KeyList) -> Result<(String, u64, Timestamp), Refusal> {
    #[derive(Deserialize)]
    struct Head {
        format: u32,
        host: Option<String>,
        serial: Option<u64>,
        issued_at: Option<Timestamp>,
    }
    let (payload, _) = match open(env, CATALOG_TYPE, held, KeyRole::Catalog) {
        Err(Refusal::Untrusted { role, seen }) => match keys_for_stored(env, held) {
            Some(keys) => open(env, CATALOG_TYPE, &keys, KeyRole::Catalog)?,
            None => return Err(Refusal::Untrusted { role, seen }),
        },
        r => r?,
    };
    let head: Head = serde_json::from_slice(&payload).map_err(|e| Refusal::Malformed(format!("payload: {e}")))?;
    if head.format > FORMAT_SEALED {
        return Err(Refusal::NewerFormat(head.format));
    }
    Ok((
        head.host.ok_or(Refusal::Incomplete("the host it is for"))?,
        head.serial.ok_or(Refusal::Incomplete("a serial"))?,
        head.issued_at.ok_or(Refusal::Incomplete("issued_at"))?,
    ))
}

/// Everything [`signed_head`] says, and the hash of the resources (a whole parse).
pub fn applied_of(env: &Envelope, held: &KeyList) -> Result<Applied, Refusal> {
    let (catalog, _) = match open_catalog(env, held) {
        Err(Refusal::Untrusted { role, seen }) => match keys_for_stored(env, held) {
            Some(keys) => open_catalog(env, &keys)?,
            None => return Err(Refusal::Untrusted { role, seen }),
        },
        r => r?,
    };
    let (host, serial, issued_at, _) = signed_fields(&catalog)?;
    Ok(Applied { host, serial, issued_at, resources_sha256: resources_sha256(&catalog), time_floor: None })
}

/// Everything an agent checks before it believes a catalog, in order: size, structure, the key
/// list it carries, the signature over the exact bytes, then (parsing only verified bytes) the
/// format, the host, the serial against the last applied one, and freshness.
pub fn verify_catalog(bytes: &[u8], held: &KeyList, policy: &Policy) -> Result<Verified, Refusal> {
    let env = parse_envelope(bytes)?;
    let mut keys = held.clone();
    let mut new_keys = None;
    if let Some(carried) = &env.keys {
        let list = update_key_list(held, carried).map_err(Refusal::Keys)?;
        if list.version > held.version {
            new_keys = Some((list.clone(), (**carried).clone()));
            keys = list;
        }
    }
    let (catalog, signed_by) = open_catalog(&env, &keys)?;
    let (host, serial, issued_at, expires_at) = signed_fields(&catalog)?;
    if let Some(node) = policy.node.as_ref().filter(|n| **n != host) {
        return Err(Refusal::WrongHost { catalog: host, node: node.clone() });
    }
    let resources_sha256 = resources_sha256(&catalog);
    let mut warnings = Vec::new();
    // Time never goes back below the floor the last verified catalog set: a host with a dead
    // clock cannot be fooled into accepting an expired catalog, and still gets new ones.
    let floor = policy.last.as_ref().map(|l| l.floor(policy.now));
    let now = floor.map_or(policy.now, |f| policy.now.max(f));
    if let Some(last) = &policy.last {
        if serial < last.serial {
            if !policy.allow_rollback {
                return Err(Refusal::Rollback { serial, last: last.serial });
            }
            warnings
                .push(format!("rollback allowed: serial {serial} is older than the last applied ({})", last.serial));
        } else if serial == last.serial && resources_sha256 != last.resources_sha256 {
            return Err(Refusal::Replay { serial });
        }
        if policy.now.0.saturating_add(CLOCK_SKEW) < last.issued_at.0 {
            warnings
                .push(format!("the clock ({}) is behind the last catalog issued at {}", policy.now, last.issued_at));
        }
    }
    if now.0.saturating_add(CLOCK_SKEW) < issued_at.0 {
        warnings.push(format!("the clock ({now}) is behind this catalog, issued at {issued_at}"));
    }
    let stale = expires_at <= now;
    if stale && !policy.cached {
        return Err(Refusal::Expired { expires_at, now });
    }
    if stale {
        warnings.push(format!(
            "stale: the cached catalog expired at {expires_at}, and is enforced until the server answers"
        ));
    }
    let raised = Timestamp(issued_at.0.min(now.0.saturating_add(CLOCK_SKEW)));
    let time_floor = Some(floor.map_or(raised, |f| f.max(raised)));
    let applied = Applied { host, serial, issued_at, resources_sha256, time_floor };
    Ok(Verified { catalog, applied, signed_by, new_keys, warnings, stale })
}

/// A new key pair from 32 random bytes.
pub fn key_from_seed(seed: &[u8; 32]) -> SigningKey {
    SigningKey::from_bytes(seed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{FileSpec, Kind, Meta, Resource, ResourceId, Spec};
    use proptest::prelude::*;

    fn key(n: u8) -> SigningKey {
        key_from_seed(&[n; 32])
    }

    /// A key list (`version`) with a root key and the given catalog keys, signed by `signer`.
    fn key_list(version: u64, root: &SigningKey, catalog: &[&SigningKey], signer: &SigningKey) -> (KeyList, Envelope) {
        let mut keys = vec![TrustedKey::new(&root.verifying_key(), KeyRole::Root)];
        keys.extend(catalog.iter().map(|k| TrustedKey::new(&k.verifying_key(), KeyRole::Catalog)));
        let list = KeyList { version, keys };
        let env = sign(KEYS_TYPE, &serde_json::to_vec(&list).unwrap(), signer);
        (list, env)
    }

    fn catalog(host: &str, serial: u64, issued: i64, content: &str) -> Catalog {
        let r = Resource::new(
            ResourceId::new(Kind::File, "/etc/motd").unwrap(),
            Meta::default(),
            Spec::File(FileSpec { content: Some(content.into()), ..Default::default() }),
        );
        Catalog {
            host: Some(host.into()),
            serial: Some(serial),
            issued_at: Some(Timestamp(issued)),
            expires_at: Some(Timestamp(issued + 7 * 86_400)),
            ..Catalog::new(vec![r])
        }
    }

    fn envelope(c: &Catalog, k: &SigningKey) -> Vec<u8> {
        serde_json::to_vec(&sign(CATALOG_TYPE, &serde_json::to_vec(c).unwrap(), k)).unwrap()
    }

    const NOW: i64 = 1_800_000_000;

    fn policy(last: Option<Applied>) -> Policy {
        Policy { node: Some("web01".into()), now: Timestamp(NOW), last, allow_rollback: false, cached: false }
    }

    /// The trusted list of the tests: root key 1, catalog key 2.
    fn trusted() -> KeyList {
        key_list(1, &key(1), &[&key(2)], &key(1)).0
    }

    fn check(bytes: &[u8], last: Option<Applied>) -> Result<Verified, Refusal> {
        verify_catalog(bytes, &trusted(), &policy(last))
    }

    #[test]
    fn a_signed_catalog_verifies_and_parses_to_itself() {
        let c = catalog("web01", 7, NOW - 60, "hi\n");
        let v = check(&envelope(&c, &key(2)), None).unwrap();
        assert_eq!(v.catalog, c);
        assert_eq!(v.signed_by, key_id(&key(2).verifying_key()));
        assert_eq!(v.applied.serial, 7);
    }

    #[test]
    fn every_attack_is_refused() {
        let good = catalog("web01", 7, NOW - 60, "hi\n");
        let last = Some(Applied {
            host: "web01".into(),
            serial: 7,
            issued_at: Timestamp(NOW - 60),
            resources_sha256: resources_sha256(&good),
            time_floor: None,
        });
        let refuse = |bytes: Vec<u8>, last: Option<Applied>, want: &str| {
            let e = check(&bytes, last).expect_err(want);
            assert!(e.to_string().contains(want), "expected {want:?}, got {e}");
        };
        refuse(envelope(&good, &key(9)), None, "no valid signature by a trusted catalog key");
        refuse(envelope(&good, &key(1)), None, "no valid signature by a trusted catalog key"); // root keys never sign catalogs
        refuse(envelope(&catalog("db01", 7, NOW - 60, "hi\n"), &key(2)), None, "for host db01, and this is web01");
        refuse(
            envelope(&catalog("web01", 6, NOW - 60, "hi\n"), &key(2)),
            last.clone(),
            "serial 6 is older than the last applied (7)",
        );
        refuse(
            envelope(&catalog("web01", 7, NOW - 60, "evil\n"), &key(2)),
            last.clone(),
            "applied before with other resources",
        );
        refuse(envelope(&catalog("web01", 8, NOW - 8 * 86_400, "hi\n"), &key(2)), None, "expired");
        let mut future = good.clone();
        future.format = FORMAT_SEALED + 1;
        refuse(envelope(&future, &key(2)), None, "newer than this agent understands");
        let mut unsigned_fields = good.clone();
        unsigned_fields.serial = None;
        refuse(envelope(&unsigned_fields, &key(2)), None, "must carry a serial");
        refuse(b"\x00\xffgarbage".to_vec(), None, "not a valid envelope");
        refuse(vec![b' '; MAX_ENVELOPE + 1], None, "more than the");
        // Truncated anywhere.
        let bytes = envelope(&good, &key(2));
        for cut in [0, 1, bytes.len() / 3, bytes.len() / 2, bytes.len() - 1] {
            assert!(check(&bytes[..cut], None).is_err(), "truncated at {cut}");
        }
        // A valid signature over other bytes than those shipped.
        let mut env = sign(CATALOG_TYPE, &serde_json::to_vec(&good).unwrap(), &key(2));
        env.payload = Base64::encode_string(&serde_json::to_vec(&catalog("web01", 7, NOW - 60, "evil\n")).unwrap());
        refuse(serde_json::to_vec(&env).unwrap(), None, "does not match the payload");
        // A signature over the raw payload, without the type bound in (DSSE's PAE).
        let raw = key(2).sign(&serde_json::to_vec(&good).unwrap());
        env.payload = Base64::encode_string(&serde_json::to_vec(&good).unwrap());
        env.signatures[0].sig = Base64::encode_string(&raw.to_bytes());
        refuse(serde_json::to_vec(&env).unwrap(), None, "does not match the payload");
        // A key list's signature replayed as a catalog's.
        let (_, keys_env) = key_list(1, &key(1), &[&key(2)], &key(2));
        let mut swapped = keys_env.clone();
        swapped.payload_type = CATALOG_TYPE.into();
        refuse(serde_json::to_vec(&swapped).unwrap(), None, "does not match the payload");
        // Duplicate keys in the envelope or in the payload.
        let dup = format!(
            "{{\"payload_type\":\"{CATALOG_TYPE}\",\"payload\":\"{}\",\"payload\":\"{}\",\"signatures\":[]}}",
            env.payload, env.payload
        );
        refuse(dup.into_bytes(), None, "duplicate field");
        let payload = br#"{"format":1,"host":"web01","host":"db01","serial":9,"issued_at":"2027-01-15T08:00:00Z","expires_at":"2027-01-22T08:00:00Z","resources":[]}"#;
        let dup = serde_json::to_vec(&sign(CATALOG_TYPE, payload, &key(2))).unwrap();
        refuse(dup, None, "duplicate field");
        // An oversized payload, correctly signed.
        let big = catalog("web01", 8, NOW - 60, &"x".repeat(MAX_PAYLOAD));
        refuse(envelope(&big, &key(2)), None, "more than the");
    }

    #[test]
    fn every_single_bit_flip_is_refused() {
        let c = catalog("w", 1, NOW - 60, "x");
        let p = Policy { node: Some("w".into()), ..policy(None) };
        let bytes = envelope(&c, &key(2));
        assert!(bytes.len() < 800, "keep it small: {}", bytes.len());
        verify_catalog(&bytes, &trusted(), &p).unwrap();
        let mut flipped = bytes.clone();
        for i in 0..bytes.len() * 8 {
            flipped[i / 8] ^= 1 << (i % 8);
            let result = verify_catalog(&flipped, &trusted(), &p);
            assert!(result.is_err(), "flipping bit {} of byte {} was accepted", i % 8, i / 8);
            flipped[i / 8] ^= 1 << (i % 8);
        }
    }

    #[test]
    fn rotation_adds_and_retires_keys_only_by_root() {
        let (root, a, b, c) = (key(1), key(2), key(3), key(4));
        let (v1, _) = key_list(1, &root, &[&a], &root);
        // v2 adds b, signed by root: accepted with a catalog signed by b.
        let (v2, v2_env) = key_list(2, &root, &[&a, &b], &root);
        let mut env = sign(CATALOG_TYPE, &serde_json::to_vec(&catalog("web01", 10, NOW - 60, "b\n")).unwrap(), &b);
        env.keys = Some(Box::new(v2_env.clone()));
        let v = verify_catalog(&serde_json::to_vec(&env).unwrap(), &v1, &policy(None)).unwrap();
        assert_eq!(v.new_keys.as_ref().unwrap().0, v2);
        // Without the new list, b is unknown.
        env.keys = None;
        assert!(verify_catalog(&serde_json::to_vec(&env).unwrap(), &v1, &policy(None)).is_err());
        // v3 retires a: a catalog signed by a, carrying v3 or the older v2, is refused to a v3 holder.
        let (v3, v3_env) = key_list(3, &root, &[&b], &root);
        let mut by_a = sign(CATALOG_TYPE, &serde_json::to_vec(&catalog("web01", 11, NOW - 60, "a\n")).unwrap(), &a);
        by_a.keys = Some(Box::new(v3_env));
        assert!(matches!(
            verify_catalog(&serde_json::to_vec(&by_a).unwrap(), &v2, &policy(None)),
            Err(Refusal::Untrusted { .. })
        ));
        by_a.keys = Some(Box::new(v2_env));
        let e = verify_catalog(&serde_json::to_vec(&by_a).unwrap(), &v3, &policy(None)).unwrap_err();
        assert!(e.to_string().contains("version 2 is older than the version 3 held"), "{e}");
        // A stolen catalog key cannot add a key: a list signed by b is refused.
        let (_, forged) = key_list(4, &root, &[&b, &c], &b);
        let mut by_c = sign(CATALOG_TYPE, &serde_json::to_vec(&catalog("web01", 12, NOW - 60, "c\n")).unwrap(), &c);
        by_c.keys = Some(Box::new(forged));
        let e = verify_catalog(&serde_json::to_vec(&by_c).unwrap(), &v3, &policy(None)).unwrap_err();
        assert!(e.to_string().contains("key list it carries is refused"), "{e}");
        // Nor can it rewrite the current version.
        let (_, same_version) = key_list(3, &root, &[&b, &c], &b);
        assert!(update_key_list(&v3, &same_version).is_err());
        // The root key itself can be rotated by the old root.
        let new_root = key(5);
        let (v4, v4_env) = key_list(4, &new_root, &[&b], &root);
        assert_eq!(update_key_list(&v3, &v4_env).unwrap(), v4);
    }

    #[test]
    fn installed_key_lists_must_be_signed_by_their_own_root() {
        let (list, env) = key_list(1, &key(1), &[&key(2)], &key(1));
        assert_eq!(trust_key_list(&env).unwrap(), list);
        let (_, by_catalog) = key_list(1, &key(1), &[&key(2)], &key(2));
        assert!(trust_key_list(&by_catalog).is_err());
    }

    #[test]
    fn a_cached_catalog_past_its_expiry_is_enforced_and_marked_stale() {
        let old = catalog("web01", 8, NOW - 8 * 86_400, "hi\n");
        let bytes = envelope(&old, &key(2));
        assert!(matches!(check(&bytes, None), Err(Refusal::Expired { .. })), "fetched: refused");
        let v = verify_catalog(&bytes, &trusted(), &Policy { cached: true, ..policy(None) }).unwrap();
        assert!(v.stale && v.warnings[0].starts_with("stale"), "{:?}", v.warnings);
    }

    #[test]
    fn a_clock_behind_is_reported_not_fatal_and_never_reopens_expired_catalogs() {
        let c = catalog("web01", 9, NOW + 3600, "x");
        let v = check(&envelope(&c, &key(2)), None).unwrap();
        assert!(v.warnings[0].contains("clock"), "{:?}", v.warnings);
        // The last catalog was accepted when this clock read 30 days later than it does now (it
        // has fallen back since): now is at least that floor.
        let last = Some(Applied {
            host: "web01".into(),
            serial: 1,
            issued_at: Timestamp(NOW + 30 * 86_400),
            resources_sha256: String::new(),
            time_floor: Some(Timestamp(NOW + 30 * 86_400)),
        });
        let old = catalog("web01", 5, NOW - 60, "x");
        let e = check(&envelope(&old, &key(2)), last).unwrap_err();
        assert!(matches!(e, Refusal::Rollback { .. } | Refusal::Expired { .. }), "{e}");
    }

    #[test]
    fn a_signer_clock_far_ahead_never_freezes_the_host() {
        // A catalog issued a year ahead of this (correct) clock is accepted with a warning...
        let future = catalog("web01", 100, NOW + 365 * 86_400, "x");
        let v = check(&envelope(&future, &key(2)), None).unwrap();
        assert!(v.warnings[0].contains("behind this catalog"), "{:?}", v.warnings);
        // ...but raises the floor only to this clock plus the skew,
        assert_eq!(v.applied.time_floor, Some(Timestamp(NOW + CLOCK_SKEW)));
        // so the next catalog, issued at the real time, is still fresh.
        let next = catalog("web01", 101, NOW + 60, "y");
        let v = check(&envelope(&next, &key(2)), Some(v.applied)).unwrap();
        assert!(!v.stale);
    }

    #[test]
    fn a_clock_that_dies_keeps_the_floor() {
        // Accepted while the clock was right...
        let good = catalog("web01", 10, NOW - 60, "x");
        let accepted = check(&envelope(&good, &key(2)), None).unwrap().applied;
        assert_eq!(accepted.time_floor, Some(Timestamp(NOW - 60)));
        // ...then the clock falls back to 1970: a catalog that expired before the floor is
        // still expired, and a newer one is still accepted.
        let dead = Policy { now: Timestamp(0), ..policy(Some(accepted.clone())) };
        let expired = catalog("web01", 11, NOW - 9 * 86_400, "old");
        let e = verify_catalog(&envelope(&expired, &key(2)), &trusted(), &dead).unwrap_err();
        assert!(matches!(e, Refusal::Expired { .. }), "{e}");
        let fresh = catalog("web01", 12, NOW, "new");
        let v = verify_catalog(&envelope(&fresh, &key(2)), &trusted(), &dead).unwrap();
        assert!(v.warnings.iter().any(|w| w.contains("clock")), "{:?}", v.warnings);
        assert!(v.applied.time_floor >= accepted.time_floor, "the floor never goes down");
    }

    #[test]
    fn refusals_are_one_bounded_line() {
        let huge = format!("{{\"payload_type\":\"{}\",\"payload\":\"\",\"signatures\":[]}}", "x\\n".repeat(100_000));
        let e = check(huge.as_bytes(), None).unwrap_err().to_string();
        assert!(e.len() < 400 && !e.contains('\n'), "{} bytes: {e:.200}", e.len());
    }

    proptest! {
        #[test]
        fn sign_verify_parse_round_trips(contents in proptest::collection::vec(".*", 0..8), serial in 1u64..u64::MAX / 2) {
            let resources = contents.iter().enumerate().map(|(i, c)| {
                Resource::new(ResourceId::new(Kind::File, &format!("/f/{i}")).unwrap(), Meta::default(), Spec::File(FileSpec { content: Some(c.clone().into()), ..Default::default() }))
            }).collect();
            let c = Catalog { host: Some("web01".into()), serial: Some(serial), issued_at: Some(Timestamp(NOW - 1)), expires_at: Some(Timestamp(NOW + 1)), ..Catalog::new(resources) };
            let v = check(&envelope(&c, &key(2)), None).unwrap();
            prop_assert_eq!(v.catalog, c);
        }
    }
}
