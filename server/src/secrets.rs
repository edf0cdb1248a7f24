//! Secrets in the operator repository, encrypted per value with age (the format sops made
//! familiar), so that a git diff shows which value changed and any recipient can edit.
//!
//! - `data/secrets/recipients`: who can read them, one age recipient (`age1...`) a line, `#`
//!   comments (say whose each is): the server's secrets key and the operators' own.
//! - `data/secrets/LEVEL.yaml` (`common`, `role/db`, `node/web01`...): a mapping of names to
//!   values, each value on its own ASCII-armored age file encrypted to every recipient.
//!
//! Plaintext exists only in memory here (and in what `show` prints); every mistake names its
//! file, line and name. Nothing here writes anything but the secrets files themselves.

use anyhow::{Context, Result, anyhow, bail};
use converge_modules::diag::Mark;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Where secrets live in an operator repository.
pub const DIR: &str = "data/secrets";
/// The recipients file, under [`DIR`].
pub const RECIPIENTS: &str = "recipients";
pub use converge_modules::sealed::{MAX_VALUE, decrypt, encrypt};
/// The server's secrets key, in its state directory.
pub const KEY_FILE: &str = "secrets.key";

/// The server's secrets key in `state`, made (readable by its owner alone) when there is none
/// yet; with its recipient when it was just made.
pub fn ensure_key(state: &Path) -> Result<(SecretsKey, Option<String>)> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = state.join(KEY_FILE);
    if path.exists() {
        return Ok((SecretsKey::read(&path)?, None));
    }
    let (text, recipient) = generate();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok((SecretsKey::read(&path)?, Some(recipient)))
}

/// The recipient of the server's secrets key, to list in `data/secrets/recipients`.
pub fn recipient_of(key: &SecretsKey) -> String {
    key.identities[0].to_public().to_string()
}

/// The largest secrets file or identity file read.
pub const MAX_FILE: u64 = 16 << 20;

fn read_bounded(path: &Path) -> Result<String> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut text = String::new();
    f.take(MAX_FILE + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read {} as text", path.display()))?;
    if text.len() as u64 > MAX_FILE {
        bail!("{}: more than the {MAX_FILE} bytes a secrets file may be", path.display());
    }
    Ok(text)
}

/// The entries of a keys file, one a line (`#` starts a comment), each parsed by `parse`;
/// `what` says what a line must be.
fn key_lines<T>(path: &Path, text: &str, what: &str, parse: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        out.push(parse(line).map_err(|e| anyhow!("{}:{}: `{line}` is not {what}: {e}", path.display(), n + 1))?);
    }
    Ok(out)
}

/// The recipients of a repository's secrets.
pub fn recipients(repo: &Path) -> Result<Vec<age::x25519::Recipient>> {
    let path = repo.join(DIR).join(RECIPIENTS);
    let text = read_bounded(&path)
        .with_context(|| format!("{DIR}/{RECIPIENTS} lists who can read the secrets: one age recipient a line"))?;
    let out = key_lines(&path, &text, "an age recipient (age1...)", |l| l.parse().map_err(|e: &str| e.to_string()))?;
    if out.is_empty() {
        bail!("{}: no recipient: add the server's secrets key and your own (age1...)", path.display());
    }
    Ok(out)
}

/// The identities in an age identity file (`AGE-SECRET-KEY-1...` lines, `#` comments).
pub fn identities(path: &Path) -> Result<Vec<age::x25519::Identity>> {
    let text = read_bounded(path)?;
    converge_modules::sealed::parse_identities(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// A new secrets key: the file's text (with its recipient in a comment) and the recipient.
pub fn generate() -> (String, String) {
    converge_modules::sealed::generate("converge secrets key")
}

/// One secrets file: names to armored values, in name order.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SecretsFile {
    pub values: BTreeMap<String, String>,
}

/// The path of a level's secrets file (`common`, `role/db`, `node/web01`).
pub fn level_path(repo: &Path, level: &str) -> Result<PathBuf> {
    let ok = !level.is_empty()
        && level.split('/').all(|p| {
            !p.is_empty() && p != "." && p != ".." && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        });
    if !ok || level == RECIPIENTS {
        bail!("`{level}` is not a data level (like common, role/db, node/web01.example.com)");
    }
    Ok(repo.join(DIR).join(format!("{level}.yaml")))
}

/// Whether `name` may name a secret: what a template can write after `secrets.`.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 128
}

/// A secret in a secrets file: its name, where it stands, its armored value.
pub type Entry = (String, Mark, String);

/// The entries of a secrets file's text: each name, where it stands, and the armored
/// value; or where the file is wrong, and how.
pub fn parse(text: &str) -> Result<Vec<Entry>, (Mark, String)> {
    use converge_modules::yaml::Value as Y;
    let node = converge_modules::yaml::parse(text).map_err(|mut e| e.problems.swap_remove(0))?;
    let mut out: Vec<Entry> = Vec::new();
    match &node.value {
        Y::Map(entries) => {
            for (k, v) in entries {
                let name = k.as_str().filter(|n| valid_name(n)).ok_or_else(|| {
                    (k.mark, "a secret's name is letters, digits and `_`, not starting with a digit".to_string())
                })?;
                let value = v
                    .as_str()
                    .filter(|s| s.trim_start().starts_with("-----BEGIN AGE ENCRYPTED FILE-----"))
                    .ok_or_else(|| {
                        let msg =
                            "is not an age-encrypted value: set it with `converge-server secret set`, never by hand";
                        (v.mark, format!("`{name}` {msg}"))
                    })?;
                if out.iter().any(|(n, _, _)| n == name) {
                    return Err((k.mark, format!("`{name}` is set twice in this file")));
                }
                out.push((name.to_string(), k.mark, value.to_string()));
            }
        }
        Y::Scalar { text, .. } if text.is_empty() => {}
        _ => return Err((node.mark, "a secrets file is a mapping of names to values".into())),
    }
    Ok(out)
}

/// The server's secrets key (`STATE/secrets.key`, made by `init`): the age identity that
/// opens the repository's secrets, and the key of the fingerprints put beside sealed values.
pub struct SecretsKey {
    pub identities: Vec<age::x25519::Identity>,
    mac: zeroize::Zeroizing<[u8; 32]>,
}

impl SecretsKey {
    pub fn read(path: &Path) -> Result<SecretsKey> {
        let identities = identities(path)?;
        Ok(SecretsKey::of(identities))
    }

    pub fn of(identities: Vec<age::x25519::Identity>) -> SecretsKey {
        use age::secrecy::ExposeSecret;
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"converge fingerprint key v1\0");
        h.update(identities[0].to_string().expose_secret().as_bytes());
        SecretsKey { identities, mac: zeroize::Zeroizing::new(h.finalize().into()) }
    }
}

/// A fingerprint of `parts`: with the key, a keyed hash (HMAC-SHA-256, 128 bits shown) that
/// says nothing about its input to whoever lacks the key; without it (a compile with
/// placeholders, which hold nothing secret), their SHA-256.
pub fn fingerprint(key: Option<&SecretsKey>, parts: &[&[u8]]) -> String {
    use hmac::{KeyInit, Mac};
    use sha2::Digest;
    let mut framed = Vec::new();
    for p in parts {
        framed.extend_from_slice(&(p.len() as u64).to_be_bytes());
        framed.extend_from_slice(p);
    }
    let framed = zeroize::Zeroizing::new(framed);
    match key {
        Some(k) => {
            let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(&k.mac[..]).expect("any key length");
            m.update(&framed);
            format!("hmac-sha256:{}", &converge_modules::hash::hex(&m.finalize().into_bytes())[..32])
        }
        None => {
            format!("sha256:{}", &converge_modules::hash::hex(&sha2::Sha256::digest(&framed[..]))[..32])
        }
    }
}

impl SecretsFile {
    /// Reads `path`; a missing file is an empty one.
    pub fn read(path: &Path) -> Result<SecretsFile> {
        if !path.exists() {
            return Ok(SecretsFile::default());
        }
        let text = read_bounded(path)?;
        let entries = parse(&text).map_err(|(m, msg)| anyhow!("{}:{}:{}: {msg}", path.display(), m.line, m.col))?;
        Ok(SecretsFile { values: entries.into_iter().map(|(name, _, v)| (name, v)).collect() })
    }

    /// The file's text: each value as a literal block, so that a change shows as its own lines.
    pub fn text(&self) -> String {
        let mut s = String::from(
            "# converge secrets: each value age-encrypted to data/secrets/recipients.\n# Change them with `converge-server secret set|edit|rekey`, never by hand.\n",
        );
        for (name, armored) in &self.values {
            s.push_str(&format!("{name}: |\n"));
            for line in armored.lines() {
                s.push_str(&format!("  {line}\n"));
            }
        }
        s
    }

    /// Writes the file whole (a temporary file renamed over it).
    pub fn write(&self, path: &Path) -> Result<()> {
        let dir = path.parent().expect("a level path has a directory");
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut tmp =
            tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot write in {}", dir.display()))?;
        tmp.write_all(self.text().as_bytes())?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| anyhow!("cannot write {}: {}", path.display(), e.error))?;
        Ok(())
    }
}

/// Every secrets file of a repository (`data/secrets/**.yaml`), by path.
pub fn all_files(repo: &Path) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                walk(&e.path(), out)?;
            } else if t.is_file() && e.path().extension().is_some_and(|x| x == "yaml") {
                out.push(e.path());
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    let dir = repo.join(DIR);
    if dir.is_dir() {
        walk(&dir, &mut out)?;
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_opens_with_any_recipient_and_no_other() {
        let (a, b, c) =
            (age::x25519::Identity::generate(), age::x25519::Identity::generate(), age::x25519::Identity::generate());
        let armored = encrypt(b"s3cret", &[a.to_public(), b.to_public()]).unwrap();
        assert!(armored.starts_with("-----BEGIN AGE ENCRYPTED FILE-----") && !armored.contains("s3cret"));
        assert_eq!(decrypt(&armored, std::slice::from_ref(&a)).unwrap(), b"s3cret");
        assert_eq!(decrypt(&armored, std::slice::from_ref(&b)).unwrap(), b"s3cret");
        let e = decrypt(&armored, std::slice::from_ref(&c)).unwrap_err().to_string();
        assert!(e.contains("none of the given identities can open it"), "{e}");
        let e = decrypt(&armored.replace('A', "B"), std::slice::from_ref(&a)).unwrap_err().to_string();
        assert!(e.contains("cannot open it") || e.contains("not an age-encrypted value"), "{e}");
        assert!(encrypt(&vec![b'x'; MAX_VALUE + 1], &[a.to_public()]).is_err(), "bounded");
    }

    #[test]
    fn levels_and_names_are_what_templates_and_the_hierarchy_can_use() {
        let repo = Path::new("/r");
        assert_eq!(level_path(repo, "role/db").unwrap(), Path::new("/r/data/secrets/role/db.yaml"));
        for bad in ["", "../x", "a//b", "/abs", "recipients", "a b"] {
            assert!(level_path(repo, bad).is_err(), "{bad}");
        }
        assert!(valid_name("db_password") && valid_name("_x1"));
        for bad in ["", "1x", "a-b", "a.b", "a b"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
