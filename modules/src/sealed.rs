//! Sealed values: how a catalog carries secrets to the one host it is for.
//!
//! A sensitive resource's secret-bearing fields ([`Field`]: a file's `content`, a command's
//! `stdin`, a user's `password_hash`) leave `resources` for the catalog's `sealed` list; their
//! values travel in `sealed_values`, one age file (X25519) encrypted to the host's own sealing
//! key, which is made on the host and never leaves it (one key agreement a catalog, however
//! many values). The signature covers the ciphertext; only the host can open it, in memory,
//! just before it converges ([`open`]). A catalog stolen from the server's database or from
//! another host's cache opens nothing.
//!
//! Each entry also carries a fingerprint: a keyed hash made by the server (never a plain hash,
//! which a dictionary could reverse for a short password), so that two catalogs can be told
//! apart by their secrets without either being opened.
//!
//! The same age helpers serve the operator repository's encrypted secrets (converge-server).

use crate::catalog::{Catalog, Content, FORMAT_SEALED, Resource, ResourceId, Spec};
use age::secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io::{Read, Write};

/// The largest value a secret may hold (a private key, a certificate chain).
pub const MAX_VALUE: usize = 64 << 10;

pub use age::x25519::{Identity, Recipient};

/// A field that can hold a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Field {
    /// A file's `content` (from `content`, `template` or `source`), a block's `content`.
    Content,
    /// A command's `stdin`.
    Stdin,
    /// A user's `password_hash`.
    PasswordHash,
}

impl Field {
    pub const ALL: [Field; 3] = [Field::Content, Field::Stdin, Field::PasswordHash];

    /// The field's name in a resource.
    pub fn name(self) -> &'static str {
        match self {
            Field::Content => "content",
            Field::Stdin => "stdin",
            Field::PasswordHash => "password_hash",
        }
    }

    /// The field by its name in a resource.
    pub fn named(name: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The field's place in `spec`, when the kind has it.
    pub fn slot(self, spec: &mut Spec) -> Option<Slot<'_>> {
        match (self, spec) {
            (Field::Content, Spec::File(f)) => Some(Slot::Content(&mut f.content)),
            (Field::Content, Spec::Block(b)) => Some(Slot::Text(&mut b.content)),
            (Field::Stdin, Spec::Exec(e)) => Some(Slot::Text(&mut e.stdin)),
            (Field::PasswordHash, Spec::User(u)) => Some(Slot::Text(&mut u.password_hash)),
            _ => None,
        }
    }
}

/// Where a sealable field's value lives in its resource.
pub enum Slot<'a> {
    Text(&'a mut Option<String>),
    Content(&'a mut Option<Content>),
}

impl Slot<'_> {
    /// Whether the field has a value in the clear.
    pub fn is_set(&self) -> bool {
        match self {
            Slot::Text(t) => t.is_some(),
            Slot::Content(c) => c.is_some(),
        }
    }

    /// Takes the value out. A sealable value is a sensitive resource's, which is never kept
    /// aside ([`crate::content::keep_aside`]): it is always in memory.
    pub fn take(self) -> Option<String> {
        match self {
            Slot::Text(t) => t.take(),
            Slot::Content(c) => c.take().map(|c| c.into_string().expect("sensitive content is never kept aside")),
        }
    }

    /// Puts `value` in.
    pub fn set(self, value: String) {
        match self {
            Slot::Text(t) => *t = Some(value),
            Slot::Content(c) => *c = Some(value.into()),
        }
    }
}

/// One sealed field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Sealed {
    /// The resource the value belongs to.
    pub resource: ResourceId,
    pub field: Field,
    /// A keyed hash of the value: equal values give equal fingerprints, and it says nothing
    /// else about the value.
    pub fingerprint: String,
}

/// The most the values of one catalog may hold together, opened.
pub const MAX_VALUES: usize = 32 << 20;

/// What can be wrong with sealed values.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SealError {
    #[error("a catalog with sealed values is format {FORMAT_SEALED} or newer, this one says {0}")]
    Format(u32),
    #[error("sealed value for {0}, which the catalog does not declare")]
    UnknownResource(ResourceId),
    #[error("{0} has no `{1}` to seal")]
    NoSuchField(ResourceId, &'static str),
    #[error("{0} has its `{1}` both sealed and in the clear")]
    AlsoClear(ResourceId, &'static str),
    #[error("{0} has its `{1}` sealed twice")]
    Twice(ResourceId, &'static str),
    #[error("the catalog's secrets were never sealed to a host (compiled without a host to seal them to)")]
    Unsealed,
    #[error("`sealed_values` without any `sealed` field")]
    Stray,
    #[error(
        "the catalog holds sealed values but this host has no sealing key ({0}); it makes one at bootstrap and \
         at its next certificate renewal"
    )]
    NoKey(String),
    #[error("the catalog's secrets cannot be opened: {0}")]
    Open(String),
    #[error("cannot encrypt: {0}")]
    Encrypt(String),
    #[error("a secret is at most {MAX_VALUE} bytes; this one is {0}")]
    TooLarge(usize),
}

/// Checks the shape of a catalog's sealed values: a sealed-format catalog, each field of a
/// declared resource of a kind that has it, left empty in the resource, sealed once.
pub fn check(catalog: &Catalog) -> Result<(), SealError> {
    if catalog.sealed.is_empty() {
        return match catalog.sealed_values {
            Some(_) => Err(SealError::Stray),
            None => Ok(()),
        };
    }
    if catalog.format < FORMAT_SEALED {
        return Err(SealError::Format(catalog.format));
    }
    let mut seen = HashSet::new();
    for s in &catalog.sealed {
        let r = catalog
            .resources
            .iter()
            .find(|r| r.id == s.resource)
            .ok_or_else(|| SealError::UnknownResource(s.resource.clone()))?;
        let mut spec = r.spec.clone();
        match s.field.slot(&mut spec) {
            None => return Err(SealError::NoSuchField(s.resource.clone(), s.field.name())),
            Some(slot) if slot.is_set() => return Err(SealError::AlsoClear(s.resource.clone(), s.field.name())),
            Some(_) => {}
        }
        if !seen.insert((&s.resource, s.field)) {
            return Err(SealError::Twice(s.resource.clone(), s.field.name()));
        }
    }
    Ok(())
}

/// Seals `values` (in the catalog's `sealed` order) to the host's `recipient`.
pub fn seal(catalog: &mut Catalog, values: &[impl AsRef<str>], recipient: &Recipient) -> Result<(), SealError> {
    let list: Vec<&str> = values.iter().map(AsRef::as_ref).collect();
    if let Some(v) = list.iter().find(|v| v.len() > MAX_VALUE) {
        return Err(SealError::TooLarge(v.len()));
    }
    let json = zeroize::Zeroizing::new(serde_json::to_vec(&list).expect("strings serialize"));
    catalog.sealed_values = Some(encrypt_bounded(&json, std::slice::from_ref(recipient), MAX_VALUES)?);
    Ok(())
}

/// Takes the secret-bearing fields out of a sensitive resource (a `password_hash` always is):
/// the fields and their values.
pub fn take_fields(r: &mut Resource) -> Vec<(Field, String)> {
    let sensitive = r.sensitive();
    Field::ALL
        .into_iter()
        .filter(|f| sensitive || *f == Field::PasswordHash)
        .filter_map(|f| f.slot(&mut r.spec).and_then(Slot::take).map(|v| (f, v)))
        .collect()
}

/// Opens the sealed values of `catalog` with the host's `identity` and puts each back in its
/// resource, which becomes sensitive; nothing is changed unless every value opens. `key_file`
/// names where the identity lives, for the message when there is none.
pub fn open(catalog: &mut Catalog, identity: Option<&Identity>, key_file: &str) -> Result<(), SealError> {
    check(catalog)?;
    if catalog.sealed.is_empty() {
        return Ok(());
    }
    let armored = catalog.sealed_values.as_deref().ok_or(SealError::Unsealed)?;
    let identity = identity.ok_or_else(|| SealError::NoKey(key_file.to_string()))?;
    let json = zeroize::Zeroizing::new(
        decrypt_bounded(armored, std::slice::from_ref(identity), MAX_VALUES).map_err(SealError::Open)?,
    );
    let values: Vec<String> =
        serde_json::from_slice(&json).map_err(|_| SealError::Open("they are not a list of texts".into()))?;
    if values.len() != catalog.sealed.len() {
        return Err(SealError::Open(format!("{} values for {} fields", values.len(), catalog.sealed.len())));
    }
    if let Some(v) = values.iter().find(|v| v.len() > MAX_VALUE) {
        return Err(SealError::TooLarge(v.len()));
    }
    catalog.sealed_values = None;
    for (s, value) in std::mem::take(&mut catalog.sealed).into_iter().zip(values) {
        let r = catalog.resources.iter_mut().find(|r| r.id == s.resource).expect("checked above");
        r.meta.sensitive = Some(true);
        s.field.slot(&mut r.spec).expect("checked above").set(value);
    }
    Ok(())
}

/// `value` encrypted to every recipient, ASCII-armored.
pub fn encrypt(value: &[u8], recipients: &[Recipient]) -> Result<String, SealError> {
    encrypt_bounded(value, recipients, MAX_VALUE)
}

fn encrypt_bounded(value: &[u8], recipients: &[Recipient], max: usize) -> Result<String, SealError> {
    if value.len() > max {
        return Err(SealError::TooLarge(value.len()));
    }
    let e = |e: &dyn std::fmt::Display| SealError::Encrypt(e.to_string());
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient)).map_err(|x| e(&x))?;
    let mut out = Vec::new();
    let armor = age::armor::ArmoredWriter::wrap_output(&mut out, age::armor::Format::AsciiArmor).map_err(|x| e(&x))?;
    let mut w = encryptor.wrap_output(armor).map_err(|x| e(&x))?;
    w.write_all(value).map_err(|x| e(&x))?;
    w.finish().and_then(|a| a.finish()).map_err(|x| e(&x))?;
    Ok(String::from_utf8(out).expect("armor is ASCII"))
}

/// Opens an armored value with any of `identities`; at most [`MAX_VALUE`] bytes.
pub fn decrypt(armored: &str, identities: &[Identity]) -> Result<Vec<u8>, String> {
    decrypt_bounded(armored, identities, MAX_VALUE)
}

fn decrypt_bounded(armored: &str, identities: &[Identity], max: usize) -> Result<Vec<u8>, String> {
    let d = age::Decryptor::new(age::armor::ArmoredReader::new(armored.as_bytes()))
        .map_err(|e| format!("not an age-encrypted value: {e}"))?;
    let mut r = d.decrypt(identities.iter().map(|i| i as &dyn age::Identity)).map_err(|e| match e {
        age::DecryptError::NoMatchingKeys => {
            "none of the given identities can open it (it was encrypted to other keys)".to_string()
        }
        e => format!("cannot open it: {e}"),
    })?;
    let mut value = Vec::new();
    r.by_ref().take(max as u64 + 1).read_to_end(&mut value).map_err(|e| format!("cannot open it: {e}"))?;
    if value.len() > max {
        return Err(format!("it holds more than the {max} bytes allowed"));
    }
    Ok(value)
}

/// A new identity: the text of its key file (its recipient in a comment) and the recipient.
pub fn generate(what: &str) -> (String, String) {
    let id = Identity::generate();
    let recipient = id.to_public().to_string();
    let text = format!("# {what}; its recipient: {recipient}\n{}\n", id.to_string().expose_secret());
    (text, recipient)
}

/// The identities in the text of an age identity file (`AGE-SECRET-KEY-1...` lines, `#`
/// comments). A line that does not parse is named by number, never echoed: it is a secret key.
pub fn parse_identities(text: &str) -> Result<Vec<Identity>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        out.push(line.parse::<Identity>().map_err(|_| format!("line {} is not an age identity", n + 1))?);
    }
    if out.is_empty() {
        return Err("no identity in it".into());
    }
    Ok(out)
}

/// A recipient (`age1...`) as a host or operator gives it.
pub fn parse_recipient(text: &str) -> Result<Recipient, String> {
    let t = text.trim();
    if t.len() > 200 {
        return Err("an age recipient is about 62 characters".into());
    }
    t.parse::<Recipient>().map_err(|e| format!("`{}` is not an age recipient (age1...): {e}", crate::text::clip(t, 80)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{ExecSpec, FileSpec, Kind, Meta};

    fn catalog() -> Catalog {
        let file = Resource::new(
            ResourceId::new(Kind::File, "/etc/app/token").unwrap(),
            Meta { sensitive: Some(true), ..Default::default() },
            Spec::File(FileSpec { content: Some("s3cret\n".into()), ..Default::default() }),
        );
        let plain = Resource::new(
            ResourceId::new(Kind::File, "/etc/motd").unwrap(),
            Meta::default(),
            Spec::File(FileSpec { content: Some("hello\n".into()), ..Default::default() }),
        );
        let exec = Resource::new(
            ResourceId::new(Kind::Exec, "load").unwrap(),
            Meta { sensitive: Some(true), ..Default::default() },
            Spec::Exec(ExecSpec { command: vec!["/bin/true".into()], stdin: Some("pw".into()), ..Default::default() }),
        );
        Catalog { format: FORMAT_SEALED, ..Catalog::new(vec![file, plain, exec]) }
    }

    fn seal_to(c: &mut Catalog, to: &Recipient) {
        let mut values = Vec::new();
        for r in &mut c.resources {
            let id = r.id.clone();
            for (field, value) in take_fields(r) {
                c.sealed.push(Sealed { resource: id.clone(), field, fingerprint: "k".into() });
                values.push(value);
            }
        }
        seal(c, &values, to).unwrap();
    }

    #[test]
    fn only_the_host_sealed_to_opens_and_only_sensitive_fields_are_sealed() {
        let (host, other) = (Identity::generate(), Identity::generate());
        let mut c = catalog();
        seal_to(&mut c, &host.to_public());
        assert_eq!(c.sealed.len(), 2, "the token's content and the command's stdin; not the motd");
        assert_eq!(c.sealed_values.as_deref().map(|v| v.matches("BEGIN AGE").count()), Some(1), "one age file");
        let wire = serde_json::to_string(&c).unwrap();
        assert!(!wire.contains("s3cret") && !wire.contains("\"pw\"") && wire.contains("hello"), "{wire}");
        let back: Catalog = serde_json::from_str(&wire).unwrap();
        assert_eq!(back, c);

        let mut stolen = c.clone();
        let e = open(&mut stolen, Some(&other), "k").unwrap_err();
        assert!(matches!(e, SealError::Open(_)) && e.to_string().contains("none of the given identities"), "{e}");
        assert_eq!(stolen, c, "nothing changes unless every value opens");
        assert!(matches!(open(&mut c.clone(), None, "/etc/converge/seal.key"), Err(SealError::NoKey(_))));

        open(&mut c, Some(&host), "k").unwrap();
        assert!(c.sealed.is_empty() && c.sealed_values.is_none());
        let Spec::File(f) = &c.resources[0].spec else { panic!() };
        assert_eq!(f.content.as_ref().and_then(|c| c.held()), Some("s3cret\n"));
        let Spec::Exec(e) = &c.resources[2].spec else { panic!() };
        assert_eq!(e.stdin.as_deref(), Some("pw"));
    }

    #[test]
    fn a_damaged_sealed_list_is_refused_by_its_shape() {
        let host = Identity::generate();
        let mut good = catalog();
        seal_to(&mut good, &host.to_public());
        let bad = |f: &dyn Fn(&mut Catalog)| {
            let mut c = good.clone();
            f(&mut c);
            check(&c).unwrap_err().to_string()
        };
        assert!(bad(&|c| c.format = 1).contains("format 2"));
        assert!(
            bad(&|c| c.sealed[0].resource = ResourceId::new(Kind::File, "/x").unwrap()).contains("does not declare")
        );
        assert!(bad(&|c| c.sealed[0].field = Field::Stdin).contains("has no `stdin`"));
        assert!(bad(&|c| c.sealed.push(c.sealed[0].clone())).contains("sealed twice"));
        assert!(
            bad(&|c| {
                let Spec::File(f) = &mut c.resources[0].spec else { panic!() };
                f.content = Some("clear".into());
            })
            .contains("both sealed and in the clear")
        );
        assert!(bad(&|c| c.sealed.clear()).contains("without any `sealed` field"));
        let mut unsealed = good.clone();
        unsealed.sealed_values = None;
        assert!(open(&mut unsealed, Some(&host), "k").unwrap_err().to_string().contains("never sealed"));
        let mut garbled = good.clone();
        garbled.sealed_values = Some("-----BEGIN AGE ENCRYPTED FILE-----\nxx\n".into());
        assert!(matches!(open(&mut garbled, Some(&host), "k"), Err(SealError::Open(..))));
        // Values that do not match the fields, sealed by someone who holds the host's key.
        for wrong in [&["one"][..], &["a", "b", "c"]] {
            let mut c = good.clone();
            seal(&mut c, wrong, &host.to_public()).unwrap();
            assert!(open(&mut c, Some(&host), "k").unwrap_err().to_string().contains("values for 2 fields"));
        }
        let mut c = good.clone();
        c.sealed_values = Some(encrypt(b"{\"not\": \"a list\"}", &[host.to_public()]).unwrap());
        assert!(open(&mut c, Some(&host), "k").unwrap_err().to_string().contains("not a list of texts"));
    }

    #[test]
    fn keys_parse_without_echoing_a_secret_line() {
        let (text, recipient) = generate("test key");
        let ids = parse_identities(&text).unwrap();
        assert_eq!(ids[0].to_public().to_string(), recipient);
        let Err(e) = parse_identities("AGE-SECRET-KEY-1NOTAKEY\n") else { panic!("parsed") };
        assert!(e.contains("line 1") && !e.contains("NOTAKEY"), "{e}");
        assert!(parse_recipient(&recipient).is_ok() && parse_recipient("age1nope").is_err());
        assert!(encrypt(&vec![0; MAX_VALUE + 1], &[parse_recipient(&recipient).unwrap()]).is_err());
    }
}
