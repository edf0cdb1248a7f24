//! Signed catalogs on the agent: the key list it trusts, what it last applied, and its name.
//!
//! Everything lives inside the managed root: the key list in `/etc/converge/trusted-keys.json`,
//! the last applied catalog (its serial, issue time, resources hash, and the envelope itself)
//! in `/var/lib/converge/applied.json`, each replaced atomically and only after a catalog was
//! accepted. A refused envelope writes nothing.

use crate::fs::Root;
use anyhow::{Context, Result, anyhow};
use converge_modules::host::{Host, NewAttrs};
use converge_modules::trust::{self, Applied, Envelope, KeyList};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const KEYS_FILE: &str = "/etc/converge/trusted-keys.json";
pub const APPLIED_FILE: &str = "/var/lib/converge/applied.json";

/// The key list in force, and whether it is the agent's own (which a newer list replaces).
pub struct Held {
    pub list: KeyList,
    pub own: bool,
    pub shown: String,
}

/// What `applied.json` holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppliedFile {
    pub applied: Applied,
    pub envelope: Envelope,
}

/// True when `head` (the start of a file) is meant as an envelope rather than a plain
/// catalog: only an envelope has a `"payload_type"` key (inside a JSON string the quotes would
/// be escaped). A damaged envelope is still treated, and refused, as one.
pub fn looks_like_envelope(head: &[u8]) -> bool {
    head[..head.len().min(64 * 1024)].windows(14).any(|w| w == b"\"payload_type\"")
}

/// The key list: `explicit` (a file of this machine, used as it is), else the root's own.
pub fn held_keys(root: &Root, explicit: Option<&Path>) -> Result<Held> {
    let (bytes, shown, own) = match explicit {
        Some(p) => {
            (std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?, p.display().to_string(), false)
        }
        None => {
            let shown = root.path().join(KEYS_FILE.trim_start_matches('/')).display().to_string();
            let bytes = root.read_to_string(KEYS_FILE).map_err(|e| {
                anyhow!("no trusted keys at {shown} ({e}): install the server's trusted-keys.json there, or pass --trusted-keys")
            })?;
            (bytes.into_bytes(), shown, true)
        }
    };
    let (list, _) = trust::read_key_list(&bytes).map_err(|e| anyhow!("{shown}: {e}"))?;
    Ok(Held { list, own, shown })
}

/// What was last applied under this root, if anything.
pub fn last_applied(root: &Root) -> Result<Option<Applied>> {
    match root.read_to_string(APPLIED_FILE) {
        Ok(text) => {
            let f: AppliedFile = serde_json::from_str(&text).with_context(|| format!("{APPLIED_FILE} is damaged"))?;
            Ok(Some(f.applied))
        }
        Err(e) if crate::fs::absent(&e) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {APPLIED_FILE}")),
    }
}

/// This host's node name: `--node`, else the managed root's `/etc/hostname` (for an image),
/// else the running system's host name.
pub fn node_name(root: &Root, flag: Option<&str>) -> Result<String> {
    if let Some(n) = flag {
        return Ok(n.to_string());
    }
    if !root.is_slash() {
        let name = root.read_to_string("/etc/hostname").unwrap_or_default().trim().to_string();
        if !name.is_empty() {
            return Ok(name);
        }
        return Err(anyhow!("{} has no /etc/hostname: name the node with --node", root.path().display()));
    }
    nix::unistd::gethostname()
        .map_err(|e| anyhow!("cannot read the host name: {e}"))?
        .into_string()
        .map_err(|_| anyhow!("the host name is not UTF-8; name the node with --node"))
}

/// Records an accepted catalog, and the newer key list it carried when the list is ours.
pub fn record(
    host: &dyn Host,
    root: &Root,
    held: &Held,
    applied: Applied,
    envelope: Envelope,
    new_keys: Option<&Envelope>,
) -> Result<()> {
    root.create_dir_all("/var/lib/converge", 0o700)?;
    let text = serde_json::to_vec_pretty(&AppliedFile { applied, envelope })?;
    host.write_file(APPLIED_FILE, &text, NewAttrs { mode: 0o600, uid: None, gid: None }, None)
        .map_err(|e| anyhow!("cannot record the applied catalog: {e}"))?;
    if let (Some(keys), true) = (new_keys, held.own) {
        let text = serde_json::to_vec_pretty(keys)?;
        host.write_file(KEYS_FILE, &text, NewAttrs { mode: 0o644, uid: None, gid: None }, None)
            .map_err(|e| anyhow!("cannot update {}: {e}", held.shown))?;
    }
    Ok(())
}

/// The default key list for `converge verify`, on this machine.
pub fn default_keys_path() -> PathBuf {
    PathBuf::from(KEYS_FILE)
}

#[cfg(test)]
mod tests {
    #[test]
    fn envelopes_are_told_from_catalogs() {
        assert!(super::looks_like_envelope(br#"{"payload_type":"x","payload":""}"#));
        assert!(super::looks_like_envelope(b"\n { \"signatures\": [], \"payload_type\": \"x\" }"));
        assert!(!super::looks_like_envelope(
            br#"{"format":1,"resources":[{"file":"/a","content":"\"payload_type\""}]}"#
        ));
        assert!(!super::looks_like_envelope(b"format: 1\n"));
        assert!(super::looks_like_envelope(b"z\"payload_type\":1"), "damaged, still an envelope");
    }
}
