//! Fuzzes what an agent does with bytes that claim to be a signed catalog: envelope parsing,
//! key-list handling, signature checks, catalog parsing and the policy checks; and the
//! streaming catalog decoder. Nothing may panic, and nothing unsigned may be accepted.
#![no_main]

use converge_modules::time::Timestamp;
use converge_modules::trust::{self, KeyList, KeyRole, Policy, TrustedKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let root = trust::key_from_seed(&[1; 32]);
    let catalog = trust::key_from_seed(&[2; 32]);
    let held = KeyList {
        version: 1,
        keys: vec![
            TrustedKey::new(&root.verifying_key(), KeyRole::Root),
            TrustedKey::new(&catalog.verifying_key(), KeyRole::Catalog),
        ],
    };
    let policy = Policy { node: Some("web01".into()), now: Timestamp(1_800_000_000), last: None, allow_rollback: false, cached: false };
    if let Ok(v) = trust::verify_catalog(data, &held, &policy) {
        // Only a correctly signed envelope can get here: the fuzzer cannot forge one, so this
        // is reachable only from the seed corpus, and must describe the host we asked for.
        assert_eq!(v.catalog.host.as_deref(), Some("web01"));
    }
    let _ = trust::read_key_list(data);
    let _ = converge_modules::stream::catalog_from_reader(data);
});
