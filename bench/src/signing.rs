//! Signing and verification of catalogs, beside raw ed25519 in the same run.
//!
//! Raw: sign and `verify_strict` a 64-byte message. Catalog: sign a compiled catalog (serialize,
//! pre-authentication encoding, sign, base64) and verify it as an agent does (parse the
//! envelope, decode, check the signature over the bytes, parse the catalog, check host, serial
//! and freshness). Two catalogs: a node of `catalogs/` (63 resources, about 12 KB) and 10,000
//! files of 1 KiB (about 11 MB). Single-threaded; medians of several rounds.
//!
//! Secrets: sealing one value to a host (age, X25519, at serve) and opening it (on the host,
//! before a run), beside the raw signature and verification, and beside a compile of web01: what
//! a catalog's sealed values add to the work the server and the agent do for it.

use converge_modules::catalog::{Catalog, FileSpec, Kind, Meta, Resource, ResourceId, Spec};
use converge_modules::time::Timestamp;
use converge_modules::trust::{self, CATALOG_TYPE, KEYS_TYPE, KeyList, KeyRole, Policy, TrustedKey};
use converge_server::compiler::Compiler;
use converge_server::repo::Repo;
use std::path::Path;
use std::time::Instant;

/// Operations per second of `f`, run for about `budget_ms`, median of 5 rounds.
fn rate(budget_ms: u64, mut f: impl FnMut()) -> f64 {
    let mut rates = Vec::new();
    for _ in 0..5 {
        let (t, mut n) = (Instant::now(), 0u64);
        while t.elapsed().as_millis() < budget_ms as u128 {
            f();
            n += 1;
        }
        rates.push(n as f64 / t.elapsed().as_secs_f64());
    }
    rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    rates[2]
}

fn stamped(mut c: Catalog) -> Catalog {
    let now = Timestamp::now();
    c.serial = Some(1);
    c.issued_at = Some(now);
    c.expires_at = Some(Timestamp(now.0 + 86_400));
    c
}

pub fn run() {
    let root = trust::key_from_seed(&[1; 32]);
    let key = trust::key_from_seed(&[2; 32]);
    let list = KeyList {
        version: 1,
        keys: vec![
            TrustedKey::new(&root.verifying_key(), KeyRole::Root),
            TrustedKey::new(&key.verifying_key(), KeyRole::Catalog),
        ],
    };
    let keys_env = trust::sign(KEYS_TYPE, &serde_json::to_vec(&list).unwrap(), &root);

    let msg = [7u8; 64];
    let sig = ed25519_sign(&key, &msg);
    let raw_sign = rate(200, || {
        std::hint::black_box(ed25519_sign(&key, &msg));
    });
    let raw_verify = rate(200, || {
        std::hint::black_box(key.verifying_key().verify_strict(&msg, &sig).is_ok());
    });
    println!("raw ed25519 (64-byte message): {raw_sign:.0} signatures/s, {raw_verify:.0} verifications/s");
    println!(
        "{:>22}  {:>10}  {:>12}  {:>10}  {:>14}  {:>10}",
        "catalog", "bytes", "signs/s", "x raw", "verifies/s", "x raw"
    );

    let repo = Repo::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../catalogs")).expect("catalogs/");
    let compiler = Compiler::new(&repo);
    let node = compiler.compile("web01.example.com", &Default::default()).expect("compiles");
    let compiles = rate(200, || {
        std::hint::black_box(compiler.compile("web01.example.com", &Default::default()).unwrap());
    });
    let files: Vec<Resource> = (0..10_000)
        .map(|i| {
            let spec =
                FileSpec { content: Some(format!("line {i} {}\n", "x".repeat(1000)).into()), ..Default::default() };
            Resource::new(
                ResourceId::new(Kind::File, &format!("/srv/f{i}")).unwrap(),
                Meta::default(),
                Spec::File(spec),
            )
        })
        .collect();
    let big = Catalog { host: Some("web01.example.com".into()), ..Catalog::new(files) };
    for (name, catalog) in [("web01 (63 resources)", node), ("10,000 files", big)] {
        let catalog = stamped(catalog);
        let sign = || {
            let payload = serde_json::to_vec(&catalog).unwrap();
            let mut env = trust::sign(CATALOG_TYPE, &payload, &key);
            env.keys = Some(Box::new(keys_env.clone()));
            serde_json::to_vec(&env).unwrap()
        };
        let bytes = sign();
        let budget = if bytes.len() > 1 << 20 { 1500 } else { 200 };
        let signs = rate(budget, || {
            std::hint::black_box(sign());
        });
        let policy = Policy {
            node: Some("web01.example.com".into()),
            now: Timestamp::now(),
            last: None,
            allow_rollback: false,
            cached: false,
        };
        let verifies = rate(budget, || {
            std::hint::black_box(trust::verify_catalog(&bytes, &list, &policy).expect("verifies"));
        });
        println!(
            "{name:>22}  {:>10}  {signs:>12.0}  {:>9.1}x  {verifies:>14.0}  {:>9.1}x",
            bytes.len(),
            raw_sign / signs,
            raw_verify / verifies
        );
    }

    // Ten secrets in a catalog, as a compile leaves them (fields out, fingerprints in), sealed
    // to a host at serve and opened on the host before a run.
    use converge_modules::sealed::{self, Identity, Sealed};
    let host = Identity::generate();
    let mut ten = Catalog { format: converge_modules::catalog::FORMAT_SEALED, ..Catalog::new(Vec::new()) };
    let mut values = Vec::new();
    for i in 0..10 {
        let spec = FileSpec {
            content: Some(format!("password = correct-horse-battery-staple-{i}\n").into()),
            ..Default::default()
        };
        let meta = Meta { sensitive: Some(true), ..Default::default() };
        let mut r =
            Resource::new(ResourceId::new(Kind::File, &format!("/etc/app/{i}.conf")).unwrap(), meta, Spec::File(spec));
        for (field, value) in sealed::take_fields(&mut r) {
            ten.sealed.push(Sealed { resource: r.id.clone(), field, fingerprint: format!("hmac-sha256:{i}") });
            values.push(value);
        }
        ten.resources.push(r);
    }
    let recipient = host.to_public();
    let seals = rate(200, || {
        let mut c = ten.clone();
        sealed::seal(&mut c, &values, &recipient).unwrap();
        std::hint::black_box(c);
    });
    let mut sealed_ten = ten.clone();
    sealed::seal(&mut sealed_ten, &values, &recipient).unwrap();
    let opens = rate(200, || {
        let mut c = sealed_ten.clone();
        sealed::open(&mut c, Some(&host), "seal.key").unwrap();
        std::hint::black_box(c);
    });
    println!(
        "secrets (10 values, one age file): sealed {seals:.0}/s ({:.1}x a raw signature, {:.0}% of a compile of \
         web01 at {compiles:.0}/s); opened {opens:.0}/s ({:.1}x a raw verification)",
        raw_sign / seals,
        compiles / seals * 100.0,
        raw_verify / opens,
    );
}

fn ed25519_sign(key: &ed25519_dalek::SigningKey, msg: &[u8]) -> ed25519_dalek::Signature {
    use ed25519_dalek::Signer;
    key.sign(msg)
}
