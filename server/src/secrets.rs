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

use age::secrecy::ExposeSecret;
use anyhow::{Context, Result, anyhow, bail};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Where secrets live in an operator repository.
pub const DIR: &str = "data/secrets";
/// The recipients file, under [`DIR`].
pub const RECIPIENTS: &str = "recipients";
/// The largest value a secret may hold (a private key, a certificate chain).
pub const MAX_VALUE: usize = 64 << 10;
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
    // An identity line is never repeated in an error: it is the secret key.
    let out =
        key_lines(path, &text, "an age identity", |l| l.parse::<age::x25519::Identity>().map_err(|e| e.to_string()))
            .map_err(|_| anyhow!("{}: a line is not an age identity (AGE-SECRET-KEY-1...)", path.display()))?;
    if out.is_empty() {
        bail!("{}: no identity in it", path.display());
    }
    Ok(out)
}

/// A new identity: the file's text (with its recipient in a comment) and the recipient.
pub fn generate() -> (String, String) {
    let id = age::x25519::Identity::generate();
    let recipient = id.to_public().to_string();
    let text = format!("# converge secrets key; its recipient: {recipient}\n{}\n", id.to_string().expose_secret());
    (text, recipient)
}

/// `value` encrypted to every recipient, ASCII-armored.
pub fn encrypt(value: &[u8], recipients: &[age::x25519::Recipient]) -> Result<String> {
    if value.len() > MAX_VALUE {
        bail!("a secret is at most {MAX_VALUE} bytes; this one is {}", value.len());
    }
    let encryptor = age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
        .map_err(|e| anyhow!("cannot encrypt: {e}"))?;
    let mut out = Vec::new();
    let armor = age::armor::ArmoredWriter::wrap_output(&mut out, age::armor::Format::AsciiArmor)?;
    let mut w = encryptor.wrap_output(armor)?;
    w.write_all(value)?;
    w.finish()?.finish()?;
    Ok(String::from_utf8(out).expect("armor is ASCII"))
}

/// Opens an armored value with any of `identities`.
pub fn decrypt(armored: &str, identities: &[age::x25519::Identity]) -> Result<Vec<u8>> {
    let d = age::Decryptor::new(age::armor::ArmoredReader::new(armored.as_bytes()))
        .map_err(|e| anyhow!("not an age-encrypted value: {e}"))?;
    let mut r = d.decrypt(identities.iter().map(|i| i as &dyn age::Identity)).map_err(|e| match e {
        age::DecryptError::NoMatchingKeys => {
            anyhow!("none of the given identities can open it (is your key among the recipients it was encrypted to?)")
        }
        e => anyhow!("cannot open it: {e}"),
    })?;
    let mut value = Vec::new();
    r.by_ref().take(MAX_VALUE as u64 + 1).read_to_end(&mut value).map_err(|e| anyhow!("cannot open it: {e}"))?;
    if value.len() > MAX_VALUE {
        bail!("it holds more than the {MAX_VALUE} bytes a secret may");
    }
    Ok(value)
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

impl SecretsFile {
    /// Reads `path`; a missing file is an empty one.
    pub fn read(path: &Path) -> Result<SecretsFile> {
        if !path.exists() {
            return Ok(SecretsFile::default());
        }
        let text = read_bounded(path)?;
        let node = converge_modules::yaml::parse(&text).map_err(|e| {
            let (m, msg) = &e.problems[0];
            anyhow!("{}:{}:{}: {msg}", path.display(), m.line, m.col)
        })?;
        let mut values = BTreeMap::new();
        match &node.value {
            converge_modules::yaml::Value::Map(entries) => {
                for (k, v) in entries {
                    let at = |m: converge_modules::diag::Mark| format!("{}:{}:{}", path.display(), m.line, m.col);
                    let name = k.as_str().filter(|n| valid_name(n)).ok_or_else(|| {
                        anyhow!("{}: a secret's name is letters, digits and `_`, not starting with a digit", at(k.mark))
                    })?;
                    let value = v
                        .as_str()
                        .filter(|s| s.trim_start().starts_with("-----BEGIN AGE ENCRYPTED FILE-----"))
                        .ok_or_else(|| {
                            anyhow!(
                                "{}: `{name}` is not an age-encrypted value: set it with `converge-server secret set`, never by hand",
                                at(v.mark)
                            )
                        })?;
                    values.insert(name.to_string(), value.to_string());
                }
            }
            converge_modules::yaml::Value::Scalar { text, .. } if text.is_empty() => {}
            _ => bail!(
                "{}:{}:{}: a secrets file is a mapping of names to values",
                path.display(),
                node.mark.line,
                node.mark.col
            ),
        }
        Ok(SecretsFile { values })
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
