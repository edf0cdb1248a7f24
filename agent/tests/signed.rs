//! `converge apply ENVELOPE` and `converge verify`: signed catalogs accepted, and every attack
//! refused in one line with nothing on disk changed.

mod common;
use common::*;
use converge_modules::catalog::{Catalog, FORMAT_SEALED, FileSpec, Kind, Meta, Resource, ResourceId, Spec};
use converge_modules::time::Timestamp;
use converge_modules::trust::{self, CATALOG_TYPE, KEYS_TYPE, KeyList, KeyRole, TrustedKey};

const ROOT_SEED: u8 = 1;
const CATALOG_SEED: u8 = 2;

/// A scratch root for node `web01` with the test key list installed.
fn signed_scratch() -> Scratch {
    let s = Scratch::new();
    s.write("/etc/hostname", "web01\n");
    s.write("/etc/converge/trusted-keys.json", &key_list(1, &[CATALOG_SEED]));
    std::fs::create_dir_all(s.at("/srv")).unwrap();
    s
}

/// A key list of root key 1 and the catalog keys of `seeds`, signed by root key 1.
fn key_list(version: u64, seeds: &[u8]) -> String {
    let root = trust::key_from_seed(&[ROOT_SEED; 32]);
    let mut keys = vec![TrustedKey::new(&root.verifying_key(), KeyRole::Root)];
    keys.extend(
        seeds.iter().map(|s| TrustedKey::new(&trust::key_from_seed(&[*s; 32]).verifying_key(), KeyRole::Catalog)),
    );
    let list = KeyList { version, keys };
    serde_json::to_string(&trust::sign(KEYS_TYPE, &serde_json::to_vec(&list).unwrap(), &root)).unwrap()
}

fn catalog(host: &str, serial: u64, content: &str) -> Catalog {
    let now = Timestamp::now().0;
    let r = Resource::new(
        ResourceId::new(Kind::File, "/srv/hello").unwrap(),
        Meta::default(),
        Spec::File(FileSpec { content: Some(content.into()), ..Default::default() }),
    );
    Catalog {
        host: Some(host.into()),
        serial: Some(serial),
        issued_at: Some(Timestamp(now - 60)),
        expires_at: Some(Timestamp(now + 86_400)),
        ..Catalog::new(vec![r])
    }
}

fn sign(c: &Catalog, seed: u8) -> String {
    let payload = serde_json::to_vec(c).unwrap();
    serde_json::to_string(&trust::sign(CATALOG_TYPE, &payload, &trust::key_from_seed(&[seed; 32]))).unwrap()
}

#[test]
fn a_signed_catalog_is_applied_recorded_and_reapplied_unchanged() {
    let s = signed_scratch();
    let env = s.catalog("c.env", &sign(&catalog("web01", 10, "hi\n"), CATALOG_SEED));
    let out = s.apply(&env, &[]);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("host web01, serial 10, signed by key"), "{}", out.stdout);
    assert_eq!(s.read("/srv/hello"), "hi\n");
    let applied = s.read("/var/lib/converge/applied.json");
    assert!(applied.contains("\"serial\": 10"), "{applied}");
    let again = s.apply(&env, &[]);
    assert_eq!(again.code, 0, "an equal serial with the same resources is accepted: {}", again.stderr);
}

#[test]
fn verify_prints_what_an_envelope_holds() {
    let s = signed_scratch();
    let env = s.catalog("c.env", &sign(&catalog("web01", 10, "hi\n"), CATALOG_SEED));
    let keys = s.at("/etc/converge/trusted-keys.json").display().to_string();
    let out = converge(&["verify", "--trusted-keys", &keys, &env]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    for want in ["valid, signed by key", "host       web01", "serial     10", "resources  1"] {
        assert!(out.stdout.contains(want), "{want}: {}", out.stdout);
    }
    let other = converge(&["verify", "--trusted-keys", &keys, "--node", "db01", &env]);
    assert_eq!(other.code, 1);
    assert!(other.stderr.contains("refused: the catalog is for host web01, and this is db01"), "{}", other.stderr);
}

/// Applies `envelope` to a root that has applied serial 10, and demands a refusal naming `why`
/// that changed nothing.
fn refused(envelope: &[u8], args: &[&str], why: &str) {
    let s = signed_scratch();
    let first = s.catalog("first.env", &sign(&catalog("web01", 10, "hi\n"), CATALOG_SEED));
    assert_eq!(s.apply(&first, &[]).code, 2);
    let path = s.dir.path().join("attack.env");
    std::fs::write(&path, envelope).unwrap();
    let before = listing(&s.root());
    let out = s.apply(&path.display().to_string(), args);
    assert_eq!(out.code, 1, "{why}: {}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains(why), "expected {why:?} in: {}", out.stderr);
    assert!(out.stderr.trim_end().ends_with("nothing was changed"), "{}", out.stderr);
    assert_eq!(out.stderr.trim_end().lines().count(), 1, "explained in one line: {}", out.stderr);
    assert_eq!(listing(&s.root()), before, "{why}: the root changed");
}

#[test]
fn every_attack_is_refused_and_changes_nothing() {
    let good = sign(&catalog("web01", 11, "new\n"), CATALOG_SEED);
    refused(sign(&catalog("web01", 11, "x"), 9).as_bytes(), &[], "no valid signature by a trusted catalog key");
    refused(
        sign(&catalog("db01", 11, "x"), CATALOG_SEED).as_bytes(),
        &[],
        "the catalog is for host db01, and this is web01",
    );
    refused(
        sign(&catalog("web01", 9, "old\n"), CATALOG_SEED).as_bytes(),
        &[],
        "serial 9 is older than the last applied (10)",
    );
    refused(
        sign(&catalog("web01", 10, "evil\n"), CATALOG_SEED).as_bytes(),
        &[],
        "serial 10 was applied before with other resources",
    );
    let mut expired = catalog("web01", 11, "x");
    expired.expires_at = Some(Timestamp(Timestamp::now().0 - 1));
    refused(sign(&expired, CATALOG_SEED).as_bytes(), &[], "expired");
    let mut future = catalog("web01", 11, "x");
    future.format = FORMAT_SEALED + 1;
    refused(sign(&future, CATALOG_SEED).as_bytes(), &[], "newer than this agent understands");
    refused(b"{\"payload_type\": \"garbage", &[], "not a valid envelope");
    refused(&good.as_bytes()[..good.len() / 2], &[], "not a valid envelope");
    let dup = good.replacen("\"payload_type\"", "\"payload_type\":\"x\",\"payload_type\"", 1);
    refused(dup.as_bytes(), &[], "duplicate field");
    let mut other_bytes: serde_json::Value = serde_json::from_str(&good).unwrap();
    let evil = serde_json::to_vec(&catalog("web01", 11, "evil\n")).unwrap();
    other_bytes["payload"] = base64(&evil).into();
    refused(other_bytes.to_string().as_bytes(), &[], "does not match the payload");
    let mut huge = b"{\"payload_type\":\"".to_vec();
    huge.resize(trust::MAX_ENVELOPE + 1, b'a');
    refused(&huge, &[], "more than the");
    // Single-bit flips spread over the envelope (every flip of a small one is tested in-process).
    let bytes = good.as_bytes();
    for i in (0..bytes.len() * 8).step_by(bytes.len() * 8 / 24) {
        let mut flipped = bytes.to_vec();
        flipped[i / 8] ^= 1 << (i % 8);
        refused(&flipped, &[], "refused");
    }
}

fn base64(bytes: &[u8]) -> String {
    // The same alphabet the envelope uses, by way of a signature over nothing.
    let env = trust::sign(CATALOG_TYPE, bytes, &trust::key_from_seed(&[7; 32]));
    env.payload
}

#[test]
fn a_rollback_can_be_allowed_and_is_reported() {
    let s = signed_scratch();
    let newer = s.catalog("new.env", &sign(&catalog("web01", 20, "new\n"), CATALOG_SEED));
    assert_eq!(s.apply(&newer, &[]).code, 2);
    let older = s.catalog("old.env", &sign(&catalog("web01", 19, "old\n"), CATALOG_SEED));
    let out = s.apply(&older, &["--allow-rollback"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stdout.contains("warning: rollback allowed: serial 19 is older than the last applied (20)"),
        "{}",
        out.stdout
    );
    assert!(out.stderr.contains("rollback allowed"), "logged too: {}", out.stderr);
    assert_eq!(s.read("/srv/hello"), "old\n");
}

#[test]
fn a_dry_run_of_a_signed_catalog_records_nothing() {
    let s = signed_scratch();
    let env = s.catalog("c.env", &sign(&catalog("web01", 10, "hi\n"), CATALOG_SEED));
    let before = listing(&s.root());
    assert_eq!(s.apply(&env, &["--dry-run"]).code, 2);
    assert_eq!(listing(&s.root()), before);
}

#[test]
fn without_trusted_keys_nothing_is_applied() {
    let s = Scratch::new();
    s.write("/etc/hostname", "web01\n");
    let env = s.catalog("c.env", &sign(&catalog("web01", 10, "hi\n"), CATALOG_SEED));
    let out = s.apply(&env, &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("no trusted keys at") && out.stderr.contains("--trusted-keys"), "{}", out.stderr);
}

#[test]
fn a_newer_key_list_signed_by_root_is_adopted() {
    let s = signed_scratch();
    let mut env: trust::Envelope = serde_json::from_str(&sign(&catalog("web01", 30, "by key 3\n"), 3)).unwrap();
    let v2: trust::Envelope = serde_json::from_str(&key_list(2, &[CATALOG_SEED, 3])).unwrap();
    env.keys = Some(Box::new(v2));
    let path = s.catalog("c.env", &serde_json::to_string(&env).unwrap());
    let out = s.apply(&path, &[]);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    let held = s.read("/etc/converge/trusted-keys.json");
    let (list, _) = trust::read_key_list(held.as_bytes()).unwrap();
    assert_eq!(list.version, 2);
}
