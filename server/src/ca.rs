//! The certificate authority of a converge server: its own CA, the server certificate, and
//! client certificates for enrolled nodes. The CA and the server key are ECDSA P-256, which
//! browsers accept (for the fleet page) as well as agents; nodes' keys are Ed25519, made on the
//! node.
//!
//! The CA is only ever used by converge: agents trust nothing else for the server, and the
//! server accepts client certificates only from it. The CA hash agents pin at bootstrap is the
//! SHA-256 of the CA certificate (DER).
//!
//! A rollover ([`Ca::rotate`]) makes a successor CA and keeps, for the overlap, the CA before
//! it (`ca-previous.pem`, still trusted) and the successor cross-signed by it
//! (`ca-cross.pem`, sent after the server's certificate so hosts that trust only the old CA
//! still verify it). The trust bundle is this CA and, during the overlap, the previous one.
//! [`Ca::retire`] ends the overlap. A rotation cut short is completed at the next load.

use anyhow::{Context, Result, anyhow, bail};
use converge_modules::hash::sha256_hex;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ED25519, PublicKeyData, SanType, SignatureAlgorithm,
};
use std::net::IpAddr;
use std::path::Path;
use time::{Duration, OffsetDateTime};

pub const CA_YEARS: i64 = 10;
pub const SERVER_DAYS: i64 = 397;

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM and DER.
    pub pem: String,
    pub der: Vec<u8>,
    /// During a rollover: the CA before this one (PEM, DER), still trusted.
    pub previous: Option<(String, Vec<u8>)>,
    /// During a rollover: this CA cross-signed by the previous one (DER).
    pub cross: Option<Vec<u8>>,
    /// When the rollover began: client certificates issued before come from the previous CA.
    pub rotated_at: Option<i64>,
    /// When this CA ends: no certificate it issues outlives it.
    pub not_after: i64,
}

/// The files of a rollover.
const PREVIOUS: &str = "ca-previous.pem";
const CROSS: &str = "ca-cross.pem";
const ROTATED_AT: &str = "ca-rotated-at";
const NEXT_KEY: &str = "ca-next.key";
const NEXT_PEM: &str = "ca-next.pem";

/// A CA's parameters with its common name: enough to rebuild its issuer from its key.
fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

/// 16 random bytes, positive as X.509 wants serials.
fn random_serial() -> Result<rcgen::SerialNumber> {
    let mut bytes = crate::keys::random()?[..16].to_vec();
    bytes[0] &= 0x7f;
    Ok(rcgen::SerialNumber::from_slice(&bytes))
}

/// A CA's validity: from a day before `now`, [`CA_YEARS`] long.
fn ca_validity(mut p: CertificateParams, now: OffsetDateTime) -> CertificateParams {
    p.not_before = now - Duration::days(1);
    p.not_after = now + Duration::days(365 * CA_YEARS);
    p
}

/// Completes a rotation that wrote the successor's key and certificate (`ca-next.*`) but
/// did not move both into place: the key first, then the certificate.
fn finish_rotation(dir: &Path) -> Result<()> {
    let (key, pem) = (dir.join(NEXT_KEY), dir.join(NEXT_PEM));
    if key.exists() && pem.exists() {
        std::fs::rename(&key, dir.join("ca.key")).context("cannot move the new CA key into place")?;
    }
    if pem.exists() && !key.exists() {
        std::fs::rename(&pem, dir.join("ca.pem")).context("cannot move the new CA certificate into place")?;
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The subject of a certificate (DER), as text; `None` when it is not one.
pub fn subject_name(der: &[u8]) -> Option<String> {
    x509_parser::parse_x509_certificate(der).ok().map(|(_, c)| c.subject().to_string())
}

/// The issuer of a certificate (DER), as text; `None` when it is not one.
pub fn issuer_name(der: &[u8]) -> Option<String> {
    x509_parser::parse_x509_certificate(der).ok().map(|(_, c)| c.issuer().to_string())
}

/// The DER of the first certificate of a PEM text (empty when there is none).
pub fn pem_to_der(pem: &[u8]) -> Vec<u8> {
    std::str::from_utf8(pem).ok().and_then(pem_der).unwrap_or_default()
}

/// The common name of a certificate's subject (DER).
fn common_name(der: &[u8]) -> Result<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| anyhow!("ca.pem is not X.509"))?;
    let name = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string);
    name.ok_or_else(|| anyhow!("ca.pem has no common name"))
}

/// The server certificate's parameters: its names and addresses, valid [`SERVER_DAYS`] from
/// `now` (five minutes earlier, for clocks a little behind).
fn server_params(names: &[String], addresses: &[IpAddr], now: OffsetDateTime) -> Result<CertificateParams> {
    let mut sp = CertificateParams::new(names.to_vec()).context("a --name is not a valid DNS name")?;
    sp.serial_number = Some(random_serial()?);
    sp.subject_alt_names.extend(addresses.iter().map(|a| SanType::IpAddress(*a)));
    let common = names.first().cloned().or_else(|| addresses.first().map(ToString::to_string));
    sp.distinguished_name.push(DnType::CommonName, common.unwrap_or_default());
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    sp.not_before = now - Duration::minutes(5);
    sp.not_after = now + Duration::days(SERVER_DAYS);
    Ok(sp)
}

/// The DNS names and IP addresses a certificate (DER) is for.
fn subject_names(der: &[u8]) -> Result<(Vec<String>, Vec<IpAddr>)> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| anyhow!("server.pem is not X.509"))?;
    let (mut names, mut addresses) = (Vec::new(), Vec::new());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_string()),
                GeneralName::IPAddress(b) if b.len() == 4 => {
                    addresses.push(IpAddr::from(<[u8; 4]>::try_from(*b).expect("4 bytes")))
                }
                GeneralName::IPAddress(b) if b.len() == 16 => {
                    addresses.push(IpAddr::from(<[u8; 16]>::try_from(*b).expect("16 bytes")))
                }
                _ => {}
            }
        }
    }
    if names.is_empty() && addresses.is_empty() {
        bail!("server.pem names no host or address");
    }
    Ok((names, addresses))
}

/// When a certificate (DER) is valid: (not before, not after), in seconds since the epoch.
pub fn validity(der: &[u8]) -> Result<(i64, i64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| anyhow!("not an X.509 certificate"))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// `sha256:HEX` of a certificate in DER, the form agents pin.
pub fn cert_hash(der: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(der))
}

impl Ca {
    /// Creates the CA and the server certificate (for `names` and `addresses`) in `dir`.
    pub fn create(dir: &Path, names: &[String], addresses: &[IpAddr]) -> Result<Ca> {
        if names.is_empty() && addresses.is_empty() {
            bail!("the server certificate needs at least one --name or --address agents will connect to");
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = OffsetDateTime::now_utc();
        let name = "converge CA";
        let cert = ca_validity(ca_params(name), now).self_signed(&key)?;
        crate::keys::create(&dir.join("ca.key"), &key.serialize_pem(), 0o600)?;
        crate::keys::create(&dir.join("ca.pem"), &cert.pem(), 0o644)?;
        let ca = Ca {
            issuer: Issuer::new(ca_params(name), key),
            pem: cert.pem(),
            der: cert.der().to_vec(),
            previous: None,
            cross: None,
            rotated_at: None,
            not_after: validity(cert.der())?.1,
        };
        ca.issue_server(dir, names, addresses)?;
        Ok(ca)
    }

    /// A new key and certificate for a server known by `names` and `addresses`, in `dir`
    /// (`server.key`, `server.pem`): the first server's at `init`, another's at `server add`.
    pub fn issue_server(&self, dir: &Path, names: &[String], addresses: &[IpAddr]) -> Result<()> {
        if names.is_empty() && addresses.is_empty() {
            bail!("the server certificate needs at least one --name or --address agents will connect to");
        }
        let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = server_params(names, addresses, OffsetDateTime::now_utc())?;
        params.not_after = params.not_after.min(self.end());
        let server = params.signed_by(&server_key, &self.issuer)?;
        crate::keys::create(&dir.join("server.key"), &server_key.serialize_pem(), 0o600)?;
        crate::keys::create(&dir.join("server.pem"), &server.pem(), 0o644)?;
        Ok(())
    }

    /// The files of the CA in a state directory (the CA in force, and during a rollover the
    /// one before it and what ties them), for another server of the same fleet.
    pub const FILES: &[&str] = &["ca.pem", "ca.key", PREVIOUS, CROSS, ROTATED_AT];

    /// A new certificate for the server's own key (kept: `/bootstrap.sh` pins it), for the
    /// same names and addresses as the one in `dir`, valid [`SERVER_DAYS`] from now. Replaces
    /// `server.pem` atomically; returns the new certificate's DER.
    pub fn renew_server(&self, dir: &Path) -> Result<Vec<u8>> {
        let pem = std::fs::read_to_string(dir.join("server.pem"))
            .with_context(|| format!("cannot read {}/server.pem", dir.display()))?;
        let der = pem_der(&pem).ok_or_else(|| anyhow!("{}/server.pem is not a PEM certificate", dir.display()))?;
        let (names, addresses) = subject_names(&der)?;
        let key_pem = std::fs::read_to_string(dir.join("server.key"))
            .with_context(|| format!("cannot read {}/server.key", dir.display()))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| anyhow!("{}/server.key: {e}", dir.display()))?;
        let mut params = server_params(&names, &addresses, OffsetDateTime::now_utc())?;
        params.not_after = params.not_after.min(self.end());
        let cert = params.signed_by(&key, &self.issuer)?;
        let tmp = dir.join("server.pem.new");
        let _ = std::fs::remove_file(&tmp);
        crate::keys::create(&tmp, &cert.pem(), 0o644)?;
        std::fs::rename(&tmp, dir.join("server.pem")).context("cannot replace server.pem")?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(cert.der().to_vec())
    }

    /// Loads the CA of a state directory (completing a rotation a crash cut short).
    pub fn load(dir: &Path) -> Result<Ca> {
        finish_rotation(dir)?;
        let key_pem = std::fs::read_to_string(dir.join("ca.key"))
            .with_context(|| format!("cannot read {}/ca.key", dir.display()))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| anyhow!("{}/ca.key: {e}", dir.display()))?;
        let pem = std::fs::read_to_string(dir.join("ca.pem"))
            .with_context(|| format!("cannot read {}/ca.pem", dir.display()))?;
        let der = pem_der(&pem).ok_or_else(|| anyhow!("{}/ca.pem is not a PEM certificate", dir.display()))?;
        let name = common_name(&der)?;
        let read_der = |file: &str| -> Result<Option<(String, Vec<u8>)>> {
            match std::fs::read_to_string(dir.join(file)) {
                Ok(p) => {
                    let d = pem_der(&p).ok_or_else(|| anyhow!("{}/{file} is not a PEM certificate", dir.display()))?;
                    Ok(Some((p, d)))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).with_context(|| format!("cannot read {}/{file}", dir.display())),
            }
        };
        let previous = read_der(PREVIOUS)?;
        let cross = read_der(CROSS)?.map(|(_, d)| d);
        let rotated_at = std::fs::read_to_string(dir.join(ROTATED_AT)).ok().and_then(|t| t.trim().parse().ok());
        let not_after = validity(&der).with_context(|| format!("{}/ca.pem", dir.display()))?.1;
        Ok(Ca { issuer: Issuer::new(ca_params(&name), key), pem, der, previous, cross, rotated_at, not_after })
    }

    pub fn hash(&self) -> String {
        cert_hash(&self.der)
    }

    /// This CA's end, the latest any certificate it issues may end.
    fn end(&self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(self.not_after).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// The CAs hosts trust (PEM, this one first, then the previous one during a rollover).
    pub fn bundle(&self) -> String {
        let mut b = self.pem.clone();
        if let Some((p, _)) = &self.previous {
            b.push_str(p);
        }
        b
    }

    /// The bundle's own hash (of its text, as hosts keep it in `ca.pem`): a host whose
    /// `ca.pem` has another fetches the bundle.
    pub fn bundle_hash(&self) -> String {
        sha256_hex(self.bundle().as_bytes())
    }

    /// Every CA trusted (DER): client certificates from any of them are accepted.
    pub fn trusted(&self) -> Vec<Vec<u8>> {
        std::iter::once(self.der.clone()).chain(self.previous.iter().map(|(_, d)| d.clone())).collect()
    }

    /// What the server sends after its own certificate: this CA cross-signed by the previous
    /// one during a rollover, and this CA.
    pub fn chain(&self) -> Vec<Vec<u8>> {
        self.cross.iter().cloned().chain(std::iter::once(self.der.clone())).collect()
    }

    /// Starts a rollover in `dir`: a successor CA (10 years), cross-signed by this one; the
    /// server's certificate issued anew by the successor (same key). Returns the successor's
    /// hash. Refused while a rollover is under way.
    pub fn rotate(dir: &Path) -> Result<String> {
        let old = Ca::load(dir)?;
        if old.previous.is_some() {
            bail!("a rollover is under way already: retire the previous CA first (converge-server ca retire)");
        }
        let now = OffsetDateTime::now_utc();
        let name = format!("converge CA {}", converge_modules::time::Timestamp(now.unix_timestamp()));
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = ca_validity(ca_params(&name), now).self_signed(&key)?;
        let cross = ca_validity(ca_params(&name), now).signed_by(&key, &old.issuer)?;
        for file in [NEXT_KEY, NEXT_PEM, PREVIOUS, CROSS, ROTATED_AT] {
            let _ = std::fs::remove_file(dir.join(file));
        }
        crate::keys::create(&dir.join(PREVIOUS), &old.pem, 0o644)?;
        crate::keys::create(&dir.join(CROSS), &cross.pem(), 0o644)?;
        crate::keys::create(&dir.join(ROTATED_AT), &format!("{}\n", now.unix_timestamp()), 0o644)?;
        crate::keys::create(&dir.join(NEXT_KEY), &key.serialize_pem(), 0o600)?;
        crate::keys::create(&dir.join(NEXT_PEM), &cert.pem(), 0o644)?;
        finish_rotation(dir)?;
        let new = Ca::load(dir)?;
        new.renew_server(dir)?;
        Ok(new.hash())
    }

    /// Ends a rollover: the previous CA is trusted no more. Returns whether one was under way.
    pub fn retire(dir: &Path) -> Result<bool> {
        let was = dir.join(PREVIOUS).exists();
        for file in [CROSS, PREVIOUS, ROTATED_AT] {
            match std::fs::remove_file(dir.join(file)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("cannot remove {}/{file}", dir.display())),
            }
        }
        std::fs::File::open(dir)?.sync_all()?;
        Ok(was)
    }

    /// A client certificate for `node` and the public key the agent sent (SPKI PEM), valid
    /// `days`; returns the PEM and the DER.
    pub fn issue_client(&self, node: &str, public_key_pem: &str, days: i64) -> Result<(String, Vec<u8>)> {
        let spki = Ed25519Public::from_pem(public_key_pem)?;
        let mut p = CertificateParams::default();
        // A random serial: without one, re-enrolling with the same key in the same second
        // would give a certificate identical to the revoked one.
        p.serial_number = Some(random_serial()?);
        p.distinguished_name.push(DnType::CommonName, node);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::minutes(5);
        p.not_after = (now + Duration::days(days)).min(self.end());
        let cert = p.signed_by(&spki, &self.issuer)?;
        Ok((cert.pem(), cert.der().to_vec()))
    }
}

/// The raw Ed25519 key of an agent's SPKI PEM public key, or why it is not one.
pub fn public_key(pem: &str) -> Result<[u8; 32]> {
    Ok(Ed25519Public::from_pem(pem)?.0)
}

/// An agent's Ed25519 public key, as rcgen needs it to issue a certificate for a key the
/// server never holds.
struct Ed25519Public([u8; 32]);

impl Ed25519Public {
    fn from_pem(pem: &str) -> Result<Ed25519Public> {
        use ed25519_dalek::pkcs8::DecodePublicKey;
        let key = ed25519_dalek::VerifyingKey::from_public_key_pem(pem)
            .map_err(|_| anyhow!("the public key is not an Ed25519 key in SPKI PEM"))?;
        Ok(Ed25519Public(key.to_bytes()))
    }
}

impl PublicKeyData for Ed25519Public {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ED25519
    }
}

/// The DER of the first PEM block of `pem`.
pub fn pem_der(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).ok().map(|c| c.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_load_and_issue() {
        let t = tempfile::tempdir().unwrap();
        let ca = Ca::create(t.path(), &["converge.example.com".into()], &["127.0.0.1".parse().unwrap()]).unwrap();
        assert!(Ca::create(t.path(), &["x".into()], &[]).is_err(), "never overwrites");
        let loaded = Ca::load(t.path()).unwrap();
        assert_eq!(loaded.hash(), ca.hash());
        let agent = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let (pem, der) = loaded.issue_client("web01", &agent.public_key_pem(), 90).unwrap();
        assert!(loaded.issue_client("web01", "not a key", 90).is_err());
        let (_, again) = loaded.issue_client("web01", &agent.public_key_pem(), 90).unwrap();
        assert_ne!(der, again, "the same key twice gives two certificates");
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!der.is_empty());
    }
}
