//! The blob store: the content-addressed files a catalog names by hash (`content_sha256`),
//! fetched from the server over mutual TLS before a run converges, under the run lock.
//!
//! A blob is taken only at its signed size and kept only when its SHA-256 is the one the signed
//! catalog names (a server, a proxy or a disk cannot slip other bytes in); it is written
//! atomically, mode 0600, as `/var/lib/converge/blobs/sha256/HEX`. One already there at its
//! size is not fetched again: the file provider checks its hash when it uses it and removes a
//! damaged one, which the next run fetches again. Blobs no catalog of this run names are
//! removed after it. A fetch that fails is a note: the files that need the blob fail with
//! their own message, and everything else converges.

use crate::client::Client;
use crate::host::RealHost;
use converge_modules::catalog::{BLOB_STORE, MAX_BLOB, Resource, Spec, blob_hex, blob_path};
use converge_modules::host::Host;
use std::collections::BTreeMap;

/// The blobs `resources` name: hex digest -> size.
pub fn named(resources: &[Resource]) -> BTreeMap<String, u64> {
    resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::File(f) => Some((blob_hex(f.content_sha256.as_deref()?)?.to_string(), f.size?)),
            _ => None,
        })
        .filter(|(_, size)| *size <= MAX_BLOB)
        .collect()
}

/// Fetches what the store lacks of `resources`' blobs; each problem is a note.
pub fn fetch(
    host: &RealHost,
    rt: &tokio::runtime::Runtime,
    client: &Client,
    resources: &[Resource],
    notes: &mut Vec<String>,
) {
    for (hex, size) in named(resources) {
        let path = blob_path(&hex);
        if host.stat(&path).ok().flatten().is_some_and(|s| s.size == size) {
            continue;
        }
        let got = rt.block_on(client.blob(&hex, size));
        let result = got.and_then(|bytes| {
            let have = converge_modules::hash::sha256_hex(&bytes);
            if have != hex {
                anyhow::bail!("its content hashes to sha256:{have}, not the signed one");
            }
            crate::state::write(host, &path, &bytes, 0o600)
        });
        if let Err(e) = result {
            notes.push(format!("blob sha256:{hex} could not be fetched: {e:#}"));
        }
    }
}

/// Removes the blobs none of `resources` names.
pub fn prune(host: &RealHost, resources: &[Resource]) {
    let keep = named(resources);
    let dir = format!("{BLOB_STORE}/sha256");
    for (name, _) in host.list_dir(&dir).unwrap_or_default() {
        if !keep.contains_key(&name)
            && let Err(e) = host.remove(&format!("{dir}/{name}"))
        {
            tracing::warn!("could not remove the blob {dir}/{name}: {e}");
        }
    }
}
