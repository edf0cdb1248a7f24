//! The host's certificate over the years: how long it has left, renewing it from two thirds of
//! its life, and switching to the new key and certificate so that a crash at any instant
//! leaves a pair that goes together.
//!
//! Renewal runs over mutual TLS with the current certificate: the agent makes a new key here
//! (the private key never leaves the host), the server certifies it for the same node name, and
//! the current certificate stays valid until the server first sees the new one in use. The
//! switch writes `agent.key.new` and `agent.pem.new` beside the old pair, then renames the
//! key, then the certificate; [`finish_switch`] completes or discards a switch cut short by
//! checking which key the pending certificate certifies, never by guessing.

use crate::client::Client;
use crate::host::RealHost;
use crate::state::{self, CERT_FILE, KEY_FILE};
use anyhow::{Context, Result, anyhow};
use converge_modules::host::Host;
use converge_modules::time::Timestamp;
use converge_modules::wire::RenewRequest;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};

const NEW_KEY: &str = "/etc/converge/agent.key.new";
const NEW_CERT: &str = "/etc/converge/agent.pem.new";

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: Timestamp,
    pub not_after: Timestamp,
}

impl Validity {
    /// Two thirds into its life: from then on, each run renews it.
    pub fn renew_from(&self) -> Timestamp {
        Timestamp(self.not_before.0 + (self.not_after.0 - self.not_before.0) * 2 / 3)
    }
}

/// The first certificate of a PEM text: its validity and the raw Ed25519 key it certifies.
fn certificate(pem: &str) -> Result<(Validity, Vec<u8>), String> {
    let der = crate::client::pem_certificates(pem)?.into_iter().next().ok_or("holds no certificate")?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|_| "not an X.509 certificate".to_string())?;
    let v = cert.validity();
    let validity =
        Validity { not_before: Timestamp(v.not_before.timestamp()), not_after: Timestamp(v.not_after.timestamp()) };
    Ok((validity, cert.public_key().subject_public_key.data.to_vec()))
}

/// The subject of the first CA of a bundle (the newest; the server sends it first).
pub fn newest_ca_name(bundle: &str) -> Option<String> {
    let der = crate::client::pem_certificates(bundle).ok()?.into_iter().next()?;
    x509_parser::parse_x509_certificate(&der).ok().map(|(_, c)| c.subject().to_string())
}

/// The issuer of the first certificate of `pem`.
pub fn issuer_name(pem: &str) -> Option<String> {
    let der = crate::client::pem_certificates(pem).ok()?.into_iter().next()?;
    x509_parser::parse_x509_certificate(&der).ok().map(|(_, c)| c.issuer().to_string())
}

/// The validity of the certificate in `pem`.
pub fn validity(pem: &str) -> Result<Validity, String> {
    certificate(pem).map(|(v, _)| v)
}

fn public_of(key_pem: &str) -> Option<Vec<u8>> {
    ed25519_dalek::SigningKey::from_pkcs8_pem(key_pem).ok().map(|k| k.verifying_key().to_bytes().to_vec())
}

fn read(host: &RealHost, path: &str) -> Option<String> {
    state::read_text(host.root(), path, state::SMALL_FILE).ok()
}

/// Completes a switch to a renewed key and certificate that a crash cut short, or discards
/// its pieces when they cannot make a pair. Returns what was done, for the run's notes.
pub fn finish_switch(host: &RealHost) -> Option<String> {
    let exists = |p: &str| host.root().lstat(p).ok().flatten().is_some();
    let (new_cert, new_key) = (exists(NEW_CERT), exists(NEW_KEY));
    if !new_cert && !new_key {
        return None;
    }
    let cert_key = read(host, NEW_CERT).and_then(|pem| certificate(&pem).ok()).map(|(_, k)| k);
    let goes_with = |path: &str| cert_key.is_some() && read(host, path).and_then(|k| public_of(&k)) == cert_key;
    let done = if new_key && goes_with(NEW_KEY) {
        host.rename(NEW_KEY, KEY_FILE).and_then(|()| host.rename(NEW_CERT, CERT_FILE))
    } else if new_cert && goes_with(KEY_FILE) {
        host.rename(NEW_CERT, CERT_FILE)
    } else {
        let _ = host.remove(NEW_CERT);
        let _ = host.remove(NEW_KEY);
        return Some(
            "a certificate renewal cut short left pieces that make no pair: removed; it is tried again".into(),
        );
    };
    Some(match done {
        Ok(()) => "a certificate renewal cut short was completed".into(),
        Err(e) => format!("a certificate renewal cut short could not be completed: {e}"),
    })
}

/// Renews this host's certificate: a new key made here, certified by the server for the same
/// node, then switched to. Returns the new certificate's validity.
pub fn renew(host: &RealHost, client: &Client, rt: &tokio::runtime::Runtime) -> Result<Validity> {
    let key = crate::bootstrap::new_key()?;
    let public_key = key.verifying_key().to_public_key_pem(Default::default()).map_err(|e| anyhow!("{e}"))?;
    // A damaged sealing key never stands in the way of the certificate: renewed without it.
    let seal_key =
        state::seal_recipient(host).map_err(|e| tracing::warn!("renewing without a sealing key: {e:#}")).ok();
    let answer = rt.block_on(client.renew(&RenewRequest { public_key, seal_key }))?;
    let (validity, certified) =
        certificate(&answer.certificate).map_err(|e| anyhow!("the server's new certificate: {e}"))?;
    if certified != key.verifying_key().to_bytes() {
        return Err(anyhow!("the server's new certificate is not for the key this host made"));
    }
    let pem = key.to_pkcs8_pem(Default::default()).map_err(|e| anyhow!("cannot encode the key: {e}"))?;
    state::write(host, NEW_KEY, pem.as_bytes(), 0o600)?;
    state::write(host, NEW_CERT, answer.certificate.as_bytes(), 0o644)?;
    host.rename(NEW_KEY, KEY_FILE).context("cannot switch to the new key")?;
    host.rename(NEW_CERT, CERT_FILE).context("cannot switch to the new certificate")?;
    Ok(validity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::BackupStore;
    use crate::fs::Root;

    #[test]
    fn renewal_is_due_two_thirds_into_the_life() {
        let v = Validity { not_before: Timestamp(0), not_after: Timestamp(90 * 86_400) };
        assert_eq!(v.renew_from(), Timestamp(60 * 86_400));
    }

    /// A key and a certificate for it (self-signed: only the key it certifies matters here).
    fn pair(seed: u8) -> (String, String) {
        let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let key_pem = key.to_pkcs8_pem(Default::default()).unwrap().to_string();
        let kp = rcgen::KeyPair::from_pem(&key_pem).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["n".into()]).unwrap().self_signed(&kp).unwrap();
        (key_pem, cert.pem())
    }

    /// Every instant a switch can be cut at: it is completed when the pieces make a pair, and
    /// removed when they cannot; the pair in place always goes together.
    #[test]
    fn a_switch_cut_short_is_completed_or_discarded() {
        let (old_key, old_cert) = pair(1);
        let (new_key, new_cert) = pair(2);
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], (&'a str, &'a str));
        let cases: [Case; 5] = [
            ("both written, none renamed", &[(NEW_KEY, &new_key), (NEW_CERT, &new_cert)], (&new_key, &new_cert)),
            ("the key renamed", &[(KEY_FILE, &new_key), (NEW_CERT, &new_cert)], (&new_key, &new_cert)),
            ("only the new key written", &[(NEW_KEY, &new_key)], (&old_key, &old_cert)),
            ("a certificate for no key here", &[(NEW_CERT, &pair(3).1)], (&old_key, &old_cert)),
            ("a damaged new certificate", &[(NEW_KEY, &new_key), (NEW_CERT, "garbage")], (&old_key, &old_cert)),
        ];
        for (what, files, (want_key, want_cert)) in cases {
            let t = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(t.path().join("etc/converge")).unwrap();
            let host = RealHost::new(Root::open(t.path()).unwrap(), BackupStore::new(state::STATE_DIR));
            let at = |p: &str| t.path().join(p.trim_start_matches('/'));
            std::fs::write(at(KEY_FILE), &old_key).unwrap();
            std::fs::write(at(CERT_FILE), &old_cert).unwrap();
            for (path, text) in files {
                std::fs::write(at(path), text).unwrap();
            }
            assert!(finish_switch(&host).is_some(), "{what}: says what it did");
            assert_eq!(std::fs::read_to_string(at(KEY_FILE)).unwrap(), *want_key, "{what}");
            assert_eq!(std::fs::read_to_string(at(CERT_FILE)).unwrap(), *want_cert, "{what}");
            assert!(!at(NEW_KEY).exists() && !at(NEW_CERT).exists(), "{what}: nothing left pending");
            assert!(finish_switch(&host).is_none(), "{what}: nothing to do the next time");
        }
    }
}
