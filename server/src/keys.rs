//! Signing keys on the server side: generating them, storing them, the signed key list agents
//! trust, and signing catalogs into envelopes.
//!
//! Private keys are PKCS#8 PEM files created with mode 0600 and never overwritten; public keys
//! are SPKI PEM. `keygen` makes a root key (to keep offline), a catalog key (online) and the
//! first key list, signed by the root key. Adding or retiring a key writes the next version of
//! the list, signed by a root key.

use anyhow::{Context, Result, anyhow, bail};
use converge_modules::catalog::Catalog;
use converge_modules::time::Timestamp;
use converge_modules::trust::{self, CATALOG_TYPE, Envelope, KEYS_TYPE, KeyList, KeyRole, TrustedKey, key_id};
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// A new key from the operating system's random source.
pub fn generate() -> Result<SigningKey> {
    Ok(trust::key_from_seed(&random()?))
}

/// 32 bytes from the operating system's random source.
pub fn random() -> Result<[u8; 32]> {
    use ring::rand::SecureRandom;
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut seed).map_err(|_| anyhow!("cannot read random bytes from the kernel"))?;
    Ok(seed)
}

/// Writes `text` to a new file with `mode`; never replaces an existing one.
pub(crate) fn create(path: &Path, text: &str, mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {} (it is never overwritten)", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Replaces a file atomically (for the key list, which is versioned, not secret).
fn replace(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("json.new");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

pub fn write_private(path: &Path, key: &SigningKey) -> Result<()> {
    let pem = key.to_pkcs8_pem(Default::default()).map_err(|e| anyhow!("cannot encode the key: {e}"))?;
    create(path, &pem, 0o600)
}

pub fn write_public(path: &Path, key: &VerifyingKey) -> Result<()> {
    let pem = key.to_public_key_pem(Default::default()).map_err(|e| anyhow!("cannot encode the key: {e}"))?;
    create(path, &pem, 0o644)
}

pub fn read_private(path: &Path) -> Result<SigningKey> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read key {}", path.display()))?;
    SigningKey::from_pkcs8_pem(&text)
        .map_err(|e| anyhow!("{} is not an ed25519 private key in PKCS#8 PEM: {e}", path.display()))
}

pub fn read_public(path: &Path) -> Result<VerifyingKey> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read key {}", path.display()))?;
    if let Ok(k) = VerifyingKey::from_public_key_pem(&text) {
        return Ok(k);
    }
    SigningKey::from_pkcs8_pem(&text)
        .map(|k| k.verifying_key())
        .map_err(|e| anyhow!("{} is not an ed25519 key in PEM: {e}", path.display()))
}

/// Reads a key list file: the envelope and the list it signs (signed by one of its roots).
pub fn read_key_list(path: &Path) -> Result<(KeyList, Envelope)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read key list {}", path.display()))?;
    trust::read_key_list(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))
}

fn signed_list(list: &KeyList, root: &SigningKey) -> Result<String> {
    if !list.keys.iter().any(|k| k.role == KeyRole::Root && k.id == key_id(&root.verifying_key())) {
        bail!("the signing key {} is not a root key of the list", key_id(&root.verifying_key()));
    }
    let env = trust::sign(KEYS_TYPE, &serde_json::to_vec(list)?, root);
    Ok(serde_json::to_string_pretty(&env)? + "\n")
}

/// `keygen --out DIR`: root and catalog keys, and version 1 of the key list.
pub fn keygen(dir: &Path) -> Result<Vec<String>> {
    let names = ["root.key", "root.pub", "catalog.key", "catalog.pub", "trusted-keys.json"];
    if let Some(existing) = names.iter().map(|n| dir.join(n)).find(|p| p.exists()) {
        bail!("{} exists; keygen never overwrites keys (choose another --out)", existing.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (root, catalog) = (generate()?, generate()?);
    write_private(&dir.join("root.key"), &root)?;
    write_public(&dir.join("root.pub"), &root.verifying_key())?;
    write_private(&dir.join("catalog.key"), &catalog)?;
    write_public(&dir.join("catalog.pub"), &catalog.verifying_key())?;
    let list = KeyList {
        version: 1,
        keys: vec![
            TrustedKey::new(&root.verifying_key(), KeyRole::Root),
            TrustedKey::new(&catalog.verifying_key(), KeyRole::Catalog),
        ],
    };
    create(&dir.join("trusted-keys.json"), &signed_list(&list, &root)?, 0o644)?;
    Ok(vec![key_id(&root.verifying_key()), key_id(&catalog.verifying_key())])
}

/// `keygen --out DIR --name NAME`: one more key pair, to be added to the list.
pub fn keygen_one(dir: &Path, name: &str) -> Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = generate()?;
    write_private(&dir.join(format!("{name}.key")), &key)?;
    write_public(&dir.join(format!("{name}.pub")), &key.verifying_key())?;
    Ok(key_id(&key.verifying_key()))
}

/// Adds a key to the list: the next version, signed by `root`.
pub fn add(list_path: &Path, root: &SigningKey, key: &VerifyingKey, role: KeyRole) -> Result<u64> {
    let (mut list, _) = read_key_list(list_path)?;
    let id = key_id(key);
    if list.keys.iter().any(|k| k.id == id) {
        bail!("key {id} is already in the list");
    }
    list.keys.push(TrustedKey::new(key, role));
    list.version += 1;
    replace(list_path, &signed_list(&list, root)?)?;
    Ok(list.version)
}

/// Retires a key: the next version without it, signed by `root`.
pub fn retire(list_path: &Path, root: &SigningKey, id: &str) -> Result<u64> {
    let (mut list, _) = read_key_list(list_path)?;
    let before = list.keys.len();
    list.keys.retain(|k| k.id != id);
    if list.keys.len() == before {
        bail!("key {id} is not in the list");
    }
    if !list.keys.iter().any(|k| k.role == KeyRole::Root) {
        bail!("retiring {id} would leave no root key: add the new root key first");
    }
    list.version += 1;
    replace(list_path, &signed_list(&list, root)?)?;
    Ok(list.version)
}

/// `keys rotate`: a new catalog key takes the place of the one at `signing_key`. The next
/// version of the list (signed by `root`, the one moment the root key is needed) holds the
/// new key instead of the old; the new key is written beside the old, the list replaced, then
/// the new key moved into place and the old one into `retired/` (to destroy). A running server
/// takes in the key and the list once they agree. Returns (old id, new id, list version).
pub fn rotate(list_path: &Path, signing_key: &Path, root: &SigningKey) -> Result<(String, String, u64)> {
    let old = read_private(signing_key)?;
    let old_id = key_id(&old.verifying_key());
    let (mut list, _) = read_key_list(list_path)?;
    if !list.keys.iter().any(|k| k.id == old_id && k.role == KeyRole::Catalog) {
        bail!("{} (key {old_id}) is not a catalog key of {}", signing_key.display(), list_path.display());
    }
    let new = generate()?;
    let new_id = key_id(&new.verifying_key());
    list.keys.retain(|k| k.id != old_id);
    list.keys.push(TrustedKey::new(&new.verifying_key(), KeyRole::Catalog));
    list.version += 1;
    let text = signed_list(&list, root)?;
    let dir = signing_key.parent().unwrap_or(Path::new("."));
    let next = dir.join("catalog-next.key");
    let _ = std::fs::remove_file(&next);
    write_private(&next, &new)?;
    let retired = dir.join("retired");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&retired)
        .with_context(|| format!("cannot create {}", retired.display()))?;
    replace(list_path, &text)?;
    std::fs::rename(signing_key, retired.join(format!("catalog-{old_id}.key")))
        .with_context(|| format!("cannot move {} aside", signing_key.display()))?;
    std::fs::rename(&next, signing_key)
        .with_context(|| format!("cannot put the new key in {}", signing_key.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok((old_id, new_id, list.version))
}

/// Signs a catalog for its host: stamps issued_at, expires_at (`ttl` seconds later) and a
/// serial (given, or the issue time in milliseconds, so serials never decrease), and attaches
/// the key list agents should hold.
pub fn sign_catalog(
    mut catalog: Catalog,
    key: &SigningKey,
    keys: Option<Envelope>,
    serial: Option<u64>,
    ttl: i64,
    now: Timestamp,
) -> Result<String> {
    if catalog.host.is_none() {
        bail!("the catalog names no host: a signed catalog is for one host (compile it with --node)");
    }
    let millis = converge_modules::time::unix_millis();
    catalog.issued_at = Some(now);
    catalog.expires_at = Some(now.checked_add(ttl).ok_or_else(|| anyhow!("a lifetime of {ttl} s is past any date"))?);
    catalog.serial = Some(serial.unwrap_or(millis));
    let payload = serde_json::to_vec(&catalog)?;
    let mut env = trust::sign(CATALOG_TYPE, &payload, key);
    env.keys = keys.map(Box::new);
    Ok(serde_json::to_string(&env)? + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_refuses_to_overwrite_and_keys_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        keygen(t.path()).unwrap();
        let mode = std::fs::metadata(t.path().join("root.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(keygen(t.path()).unwrap_err().to_string().contains("never overwrites"));
        let (list, _) = read_key_list(&t.path().join("trusted-keys.json")).unwrap();
        assert_eq!(list.version, 1);
        let root = read_private(&t.path().join("root.key")).unwrap();
        let extra = keygen_one(t.path(), "catalog-2").unwrap();
        let pubkey = read_public(&t.path().join("catalog-2.pub")).unwrap();
        assert_eq!(add(&t.path().join("trusted-keys.json"), &root, &pubkey, KeyRole::Catalog).unwrap(), 2);
        assert_eq!(retire(&t.path().join("trusted-keys.json"), &root, &extra).unwrap(), 3);
        let root_id = key_id(&root.verifying_key());
        assert!(
            retire(&t.path().join("trusted-keys.json"), &root, &root_id)
                .unwrap_err()
                .to_string()
                .contains("no root key")
        );
        let catalog_key = read_private(&t.path().join("catalog.key")).unwrap();
        assert!(
            add(&t.path().join("trusted-keys.json"), &catalog_key, &pubkey, KeyRole::Catalog).is_err(),
            "only a root key signs the list"
        );
    }
}
