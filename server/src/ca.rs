//! The certificate authority of a converge server: its own CA, the server certificate, and
//! client certificates for enrolled nodes. The CA and the server key are ECDSA P-256, which
//! browsers accept (for the fleet page) as well as agents; nodes' keys are Ed25519, made on the
//! node.
//!
//! The CA is only ever used by converge: agents trust nothing else for the server, and the
//! server accepts client certificates only from it. The CA hash agents pin at bootstrap is the
//! SHA-256 of the CA certificate (DER).

use anyhow::{Context, Result, anyhow, bail};
use converge_modules::hash::sha256_hex;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ED25519, PublicKeyData, SanType, SignatureAlgorithm,
};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use time::{Duration, OffsetDateTime};

pub const CA_YEARS: i64 = 10;
pub const SERVER_DAYS: i64 = 397;

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM and DER.
    pub pem: String,
    pub der: Vec<u8>,
}

/// The CA's parameters: fixed, so that the issuer can be rebuilt from the key alone.
fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "converge CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

fn write_new(path: &Path, text: &str, mode: u32) -> Result<()> {
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

/// 16 random bytes, positive as X.509 wants serials.
fn random_serial() -> Result<rcgen::SerialNumber> {
    let mut bytes = crate::keys::random()?[..16].to_vec();
    bytes[0] &= 0x7f;
    Ok(rcgen::SerialNumber::from_slice(&bytes))
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
        let mut params = ca_params();
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(365 * CA_YEARS);
        let cert = params.self_signed(&key)?;
        write_new(&dir.join("ca.key"), &key.serialize_pem(), 0o600)?;
        write_new(&dir.join("ca.pem"), &cert.pem(), 0o644)?;
        let ca = Ca { issuer: Issuer::new(ca_params(), key), pem: cert.pem(), der: cert.der().to_vec() };
        let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let server = server_params(names, addresses, now)?.signed_by(&server_key, &ca.issuer)?;
        write_new(&dir.join("server.key"), &server_key.serialize_pem(), 0o600)?;
        write_new(&dir.join("server.pem"), &server.pem(), 0o644)?;
        Ok(ca)
    }

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
        let cert = server_params(&names, &addresses, OffsetDateTime::now_utc())?.signed_by(&key, &self.issuer)?;
        let tmp = dir.join("server.pem.new");
        let _ = std::fs::remove_file(&tmp);
        write_new(&tmp, &cert.pem(), 0o644)?;
        std::fs::rename(&tmp, dir.join("server.pem")).context("cannot replace server.pem")?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(cert.der().to_vec())
    }

    /// Loads the CA of a state directory.
    pub fn load(dir: &Path) -> Result<Ca> {
        let key_pem = std::fs::read_to_string(dir.join("ca.key"))
            .with_context(|| format!("cannot read {}/ca.key", dir.display()))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| anyhow!("{}/ca.key: {e}", dir.display()))?;
        let pem = std::fs::read_to_string(dir.join("ca.pem"))
            .with_context(|| format!("cannot read {}/ca.pem", dir.display()))?;
        let der = pem_der(&pem).ok_or_else(|| anyhow!("{}/ca.pem is not a PEM certificate", dir.display()))?;
        Ok(Ca { issuer: Issuer::new(ca_params(), key), pem, der })
    }

    pub fn hash(&self) -> String {
        cert_hash(&self.der)
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
        p.not_after = now + Duration::days(days);
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
