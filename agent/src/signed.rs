//! Signed catalogs on the agent: the trust state (the key list it holds and what it last
//! applied), the one path by which `apply` and `run` accept a signed catalog, and this host's
//! name.
//!
//! Everything lives inside the managed root: the key list in `/etc/converge/trusted-keys.json`,
//! the last applied catalog (its serial, issue time, resources hash, clock floor, and the
//! envelope itself) in `/var/lib/converge/applied.json`. [`Trust::load`] reads both and can only
//! be called with the run lock in hand, so two runs never interleave a read and a write of
//! them; [`Trust::record`] writes them only after a catalog was accepted, and only in a run
//! that may change the host. A refused envelope writes nothing.
//!
//! The record of what was applied is input like any other: it is cross-checked against the
//! signed envelope it keeps (the serial, host, issue time and resources must be the ones that
//! envelope carries; the clock floor is bounded by that issue time and the clock). A damaged
//! record is set aside and rebuilt from its own envelope when that verifies (the signed values
//! win), else from the newest cached envelope that verifies. When none can stand in for it, the
//! run stops with exit 1 and says so: the last applied serial is unknown, and the next run
//! starts afresh, as after bootstrap.

use crate::fs::{Root, absent};
use crate::host::RealHost;
use crate::state::{self, RunLock};
use anyhow::{Result, anyhow, bail};
use converge_modules::host::{Host, NewAttrs};
use converge_modules::time::Timestamp;
use converge_modules::trust::{self, Applied, Envelope, KeyList, Policy, Refusal, Verified};
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

/// True when `head` (the start of a file) looks like an envelope rather than a plain
/// catalog: only an envelope has a `"payload_type"` key. Used only to say what a file is; what
/// the agent does with a file is decided by what it trusts (see `apply`).
pub fn looks_like_envelope(head: &[u8]) -> bool {
    head[..head.len().min(64 * 1024)].windows(14).any(|w| w == b"\"payload_type\"")
}

/// Whether this root holds a key list of its own: a host that trusts keys applies only what
/// they signed.
pub fn has_keys(root: &Root) -> bool {
    root.lstat(KEYS_FILE).ok().flatten().is_some()
}

/// The key list: `explicit` (a file of this machine, used as it is), else the root's own.
fn held_keys(root: &Root, explicit: Option<&Path>) -> Result<Held> {
    let max = state::SMALL_FILE;
    let (bytes, shown, own) = match explicit {
        Some(p) => {
            let shown = p.display().to_string();
            let bytes = read_file_bounded(p, max).map_err(|e| anyhow!("cannot read {shown}: {e}"))?;
            (bytes, shown, false)
        }
        None => {
            let shown = root.path().join(KEYS_FILE.trim_start_matches('/')).display().to_string();
            let bytes = root.read_bounded(KEYS_FILE, max).map_err(|e| {
                if absent(&e) {
                    anyhow!("no trusted keys at {shown}: install the server's trusted-keys.json there, or pass --trusted-keys")
                } else {
                    anyhow!("{shown}: {e}: the key list is damaged; restore it from the server (converge bootstrap)")
                }
            })?;
            (bytes, shown, true)
        }
    };
    let (list, _) = trust::read_key_list(&bytes).map_err(|e| {
        anyhow!("{shown}: {e}: the key list is damaged; restore it from the server (converge bootstrap)")
    })?;
    Ok(Held { list, own, shown })
}

/// Opens a file of this machine (not of the root) for reading at most `max` bytes: without
/// blocking (a fifo would wait for a writer for ever), a regular file only, no larger than
/// `max` as it stands; reading past `max` (a file that grows) is an error, never an end, so a
/// text is never taken cut at the bound (a YAML text cut at a line is still YAML).
pub fn open_bounded(path: &Path, max: u64) -> std::io::Result<Bounded<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.len() > max {
        return Err(std::io::Error::other(format!("{} bytes, more than the {max} accepted", meta.len())));
    }
    Ok(bounded(f, max))
}

/// `inner`, failing once more than `max` bytes have come from it.
pub fn bounded<R>(inner: R, max: u64) -> Bounded<R> {
    Bounded { inner, left: max, max }
}

/// A reader that fails (`FileTooLarge`) once more than its bound has come.
pub struct Bounded<R> {
    inner: R,
    left: u64,
    max: u64,
}

impl<R: std::io::Read> std::io::Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // One byte past the bound is asked for at most: enough to tell a file that grew.
        let room = buf.len().min(usize::try_from(self.left.saturating_add(1)).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..room])?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            let max = self.max;
            std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                format!("more than the {max} bytes accepted (it grew while it was read)"),
            )
        })?;
        Ok(n)
    }
}

/// A whole file of this machine, at most `max` bytes (see [`open_bounded`]): `/dev/zero` or a
/// growing file is refused, never read to the end.
pub fn read_file_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    open_bounded(path, max)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The trust state of one run, read under its lock.
pub struct Trust {
    pub held: Held,
    /// The last catalog applied, as its signed envelope confirms.
    pub last: Option<Applied>,
    /// Where the envelope of the last catalog applied is, for the rare runs that need it.
    kept: Kept,
    /// This host's node name: a signed catalog must be for it.
    pub node: String,
    /// Damaged state found and set aside on the way, for the run's report.
    pub notes: Vec<String>,
}

impl Trust {
    /// Reads the key list and the last applied catalog; the lock proves no other run is
    /// between reading and writing them.
    pub fn load(host: &RealHost, lock: &RunLock, explicit: Option<&Path>, node: String) -> Result<Trust> {
        let held = held_keys(host.root(), explicit)?;
        let mut t = Trust { held, last: None, kept: Kept::Nowhere, node, notes: Vec::new() };
        t.read_applied(host, lock)?;
        Ok(t)
    }

    fn policy(&self, cached: bool, allow_rollback: bool) -> Policy {
        Policy { node: Some(self.node.clone()), now: Timestamp::now(), last: self.last.clone(), allow_rollback, cached }
    }

    /// Every check before a catalog is believed (see `trust::verify_catalog`). `cached` for
    /// the agent's own copy, enforced past its expiry while the server is away.
    pub fn verify(
        &self,
        host: &RealHost,
        bytes: &[u8],
        cached: bool,
        allow_rollback: bool,
    ) -> Result<Verified, Refusal> {
        let mut policy = self.policy(cached, allow_rollback);
        match trust::verify_catalog(bytes, &self.held.list, &policy) {
            // The record's resources hash is the one field the check at load did not confirm
            // (it needs a whole parse): confirm it from the record's own envelope before
            // calling an equal serial with other resources a replay.
            Err(Refusal::Replay { serial }) => {
                let confirmed = self.last_envelope(host).and_then(|env| trust::applied_of(&env, &self.held.list).ok());
                match (confirmed, policy.last.as_mut()) {
                    (Some(c), Some(last)) if c.resources_sha256 != last.resources_sha256 => {
                        last.resources_sha256 = c.resources_sha256;
                        trust::verify_catalog(bytes, &self.held.list, &policy)
                    }
                    _ => Err(Refusal::Replay { serial }),
                }
            }
            r => r,
        }
    }

    /// Records an accepted catalog, and the newer key list it carried when the list is ours,
    /// before anything converges: a run cut short never reopens the door to an older serial.
    pub fn record(&mut self, host: &RealHost, lock: &RunLock, v: &Verified, bytes: &[u8]) -> Result<()> {
        let envelope = trust::parse_envelope(bytes).map_err(|r| anyhow!("{r}"))?;
        write_record(host, lock, &v.applied, &envelope)?;
        if let (Some((list, keys)), true) = (&v.new_keys, self.held.own) {
            let text = serde_json::to_vec_pretty(keys)?;
            host.write_file(KEYS_FILE, &text, NewAttrs { mode: 0o644, uid: None, gid: None }, None)
                .map_err(|e| anyhow!("cannot update {}: {e}", self.held.shown))?;
            self.held.list = list.clone();
        }
        self.last = Some(v.applied.clone());
        self.kept = Kept::Recorded;
        Ok(())
    }

    /// The envelope of the last catalog applied (read again from the record: it is needed
    /// only to confirm a replay, or when no cached catalog verifies).
    pub fn last_envelope(&self, host: &RealHost) -> Option<Envelope> {
        match &self.kept {
            Kept::Nowhere => None,
            Kept::InMemory(env) => Some((**env).clone()),
            Kept::Recorded => {
                let bytes = host.root().read_bounded(APPLIED_FILE, trust::MAX_ENVELOPE as u64 + (64 << 10)).ok()?;
                serde_json::from_slice::<AppliedFile>(&bytes).ok().map(|f| f.envelope)
            }
        }
    }

    /// Reads `applied.json` and checks it against its own envelope. A record whose envelope
    /// verifies is repaired from that envelope (the signed values win); one whose envelope
    /// does not is rebuilt from the newest cached envelope that verifies. Either way the damaged
    /// file is set aside and the repaired record written (not in a dry-run).
    fn read_applied(&mut self, host: &RealHost, lock: &RunLock) -> Result<()> {
        let root = host.root();
        let shown = root.path().join(APPLIED_FILE.trim_start_matches('/')).display().to_string();
        let max = trust::MAX_ENVELOPE as u64 + (64 << 10);
        let now = Timestamp::now();
        let (why, signed) = match root.read_bounded(APPLIED_FILE, max) {
            Err(e) if absent(&e) => return Ok(()),
            Err(e) => (e.to_string(), None),
            Ok(bytes) => match self.check_record(&bytes, now) {
                Ok(applied) => {
                    self.last = Some(applied);
                    self.kept = Kept::Recorded;
                    return Ok(());
                }
                Err(Damage { other_host: Some(host), .. }) => bail!(
                    "{shown} says the last catalog applied here was for host {host}, and this node is named {}: a \
                     renamed host bootstraps again under its new name; nothing was changed",
                    self.node
                ),
                Err(damage) => (damage.why, damage.signed),
            },
        };
        let (stand_in, from) = match signed {
            Some(s) => (Some(*s), "its own signed envelope"),
            None => {
                let cached = state::cached_envelopes(host).into_iter().find_map(|path| {
                    let bytes = state::read_envelope(host, &path).ok()?;
                    let env = trust::parse_envelope(&bytes).ok()?;
                    let applied = trust::applied_of(&env, &self.held.list).ok()?;
                    (applied.host == self.node).then_some((applied, env))
                });
                (cached, "the newest cached catalog that verifies")
            }
        };
        if !lock.exclusive() {
            let note = format!("{shown} is damaged ({why}); a run (not a dry-run) repairs it");
            let Some((mut applied, env)) = stand_in else { bail!("{note}; no cached catalog can stand in for it") };
            applied.time_floor = Some(applied.floor(now));
            self.notes.push(note);
            self.last = Some(applied);
            self.kept = Kept::InMemory(Box::new(env));
            return Ok(());
        }
        let aside = state::set_aside(host, APPLIED_FILE, &why);
        let Some((mut applied, bytes)) = stand_in else {
            bail!(
                "{aside}; no cached catalog can stand in for it, so the last applied serial is unknown and nothing was \
                 changed. The next run starts afresh, as after bootstrap, and accepts the newest catalog the server signs"
            )
        };
        applied.time_floor = Some(applied.floor(now));
        write_record(host, lock, &applied, &bytes)?;
        self.notes.push(format!("{aside}; rebuilt from {from} (serial {})", applied.serial));
        self.last = Some(applied);
        self.kept = Kept::Recorded;
        Ok(())
    }

    /// The record in `bytes`, if it is whole and agrees with the envelope it keeps (the
    /// signed host, serial and issue time; the resources hash is confirmed when it matters,
    /// in [`Trust::verify`]).
    fn check_record(&self, bytes: &[u8], now: Timestamp) -> Result<Applied, Damage> {
        let damaged = |why: String| Damage { why, signed: None, other_host: None };
        let file: AppliedFile = serde_json::from_slice(bytes).map_err(|e| damaged(format!("not a record: {e}")))?;
        let (host, serial, issued_at) = trust::signed_head(&file.envelope, &self.held.list)
            .map_err(|r| damaged(format!("its envelope does not verify: {r}")))?;
        if host != self.node {
            return Err(Damage { why: String::new(), signed: None, other_host: Some(host) });
        }
        let a = &file.applied;
        if (&a.host, a.serial, a.issued_at) != (&host, serial, issued_at) {
            let why = format!(
                "it says serial {} issued at {}, and its signed envelope says serial {serial} issued at {issued_at}",
                a.serial, a.issued_at
            );
            let signed = trust::applied_of(&file.envelope, &self.held.list).ok().map(|s| Box::new((s, file.envelope)));
            return Err(Damage { why, signed, other_host: None });
        }
        // The floor is the agent's own, in no envelope: it can never be above both the signed
        // issue time and this clock (a damaged floor must not freeze the host).
        let bound = issued_at.max(Timestamp(now.0.saturating_add(trust::CLOCK_SKEW)));
        let mut applied = file.applied;
        applied.time_floor = applied.time_floor.map(|f| f.min(bound));
        Ok(applied)
    }
}

/// Where the envelope of the last catalog applied is.
enum Kept {
    Nowhere,
    /// In `applied.json`, checked.
    Recorded,
    /// Standing in for a damaged record a dry-run may not repair.
    InMemory(Box<Envelope>),
}

/// Why a record of what was applied cannot be believed, and what its envelope says when that
/// envelope itself verifies.
struct Damage {
    why: String,
    signed: Option<Box<(Applied, Envelope)>>,
    /// Not damage: a whole record, for another host than this node's name.
    other_host: Option<String>,
}

/// Writes `applied.json`: what was applied, with the envelope it came from.
fn write_record(host: &RealHost, lock: &RunLock, applied: &Applied, envelope: &Envelope) -> Result<()> {
    if !lock.exclusive() {
        bail!("a dry-run records nothing");
    }
    host.root().create_dir_all(state::STATE_DIR, 0o700)?;
    #[derive(Serialize)]
    struct Record<'a> {
        applied: &'a Applied,
        envelope: &'a Envelope,
    }
    let text = serde_json::to_vec_pretty(&Record { applied, envelope })?;
    host.write_file(APPLIED_FILE, &text, NewAttrs { mode: 0o600, uid: None, gid: None }, None)
        .map_err(|e| anyhow!("cannot record the applied catalog: {e}"))
}

/// This host's node name: `--node`, else the managed root's `/etc/hostname` (for an image),
/// else the running system's host name.
pub fn node_name(root: &Root, flag: Option<&str>) -> Result<String> {
    if let Some(n) = flag {
        return Ok(n.to_string());
    }
    if !root.is_slash() {
        let name = state::read_text(root, "/etc/hostname", 4096).unwrap_or_default().trim().to_string();
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
