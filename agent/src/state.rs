//! What the agent keeps between runs, under the root's `/var/lib/converge` and
//! `/etc/converge`: its configuration and identity, the last verified envelopes, reports not
//! yet delivered, and the status of the last run. Every file is replaced atomically through
//! the host, inside the root, and read as input: bounded, never through a symlink, checked
//! before use. A damaged file is set aside (renamed `NAME.damaged`) or refetched, and says so
//! in the run's notes; it never stops the agent silently.
//!
//! [`RunLock`] is the run lock: one run at a time per root, dry-runs sharing it. The trust
//! state (`crate::signed`) can only be read or written with one in hand.

use crate::fs::{Root, errno};
use crate::host::RealHost;
use anyhow::{Context, Result, anyhow, bail};
use converge_modules::host::{Host, NewAttrs};
use converge_modules::settings::{self, Settings, Spanned};
use converge_modules::text::clip;
use converge_modules::time::Timestamp;
use converge_modules::wire::{Limits, Report};
use nix::fcntl::{Flock, FlockArg, OFlag};
use serde::{Deserialize, Serialize};
use std::os::fd::OwnedFd;

/// The agent's state directory, inside the managed root.
pub const STATE_DIR: &str = "/var/lib/converge";

pub const CONFIG_FILE: &str = "/etc/converge/agent.toml";
pub const CA_FILE: &str = "/etc/converge/ca.pem";
pub const KEY_FILE: &str = "/etc/converge/agent.key";
pub const CERT_FILE: &str = "/etc/converge/agent.pem";
/// The host's sealing key: the age identity its catalogs' secrets are encrypted to (made on the
/// host, never sent; its recipient goes with enrollment and renewal).
pub const SEAL_KEY_FILE: &str = "/etc/converge/seal.key";
const CACHE_DIR: &str = "/var/lib/converge/catalogs";
const QUEUE_DIR: &str = "/var/lib/converge/reports";
const STATUS_FILE: &str = "/var/lib/converge/status.json";

/// Envelopes kept: the newest is enforced when the server cannot be reached.
pub const KEEP_ENVELOPES: usize = 5;
/// Reports kept while the server cannot be reached; the oldest go first.
pub const KEEP_REPORTS: usize = 100;
/// The most the agent reads of its small files (configuration, certificates, keys, status).
pub const SMALL_FILE: u64 = 1 << 20;
/// An ETag: the server sends 34 bytes.
const MAX_ETAG: u64 = 256;

/// The run lock on the state directory: exclusive for a run that may change the host,
/// shared by dry-runs. A dry-run on a root that has no state directory holds none (there is
/// nothing to protect, and a dry-run creates nothing).
pub struct RunLock {
    _flock: Option<Flock<OwnedFd>>,
    exclusive: bool,
}

impl RunLock {
    /// Takes the lock of `root`'s state directory, or says who holds it.
    pub fn take(root: &Root, dry_run: bool) -> Result<RunLock> {
        let shown = root.path().join(STATE_DIR.trim_start_matches('/'));
        if dry_run && root.lstat(STATE_DIR)?.is_none() {
            return Ok(RunLock { _flock: None, exclusive: false });
        }
        if !dry_run {
            root.create_dir_all(STATE_DIR, 0o700)
                .with_context(|| format!("cannot create state directory {}", shown.display()))?;
        }
        let fd = root
            .open_at(STATE_DIR, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0, false)
            .with_context(|| format!("cannot open state directory {}", shown.display()))?;
        let arg = if dry_run { FlockArg::LockSharedNonblock } else { FlockArg::LockExclusiveNonblock };
        match Flock::lock(fd, arg) {
            Ok(l) => Ok(RunLock { _flock: Some(l), exclusive: !dry_run }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(anyhow!(
                "another converge run holds the lock on {}; try again when it has finished",
                shown.display()
            )),
            Err((_, e)) => Err(errno(e)).with_context(|| format!("cannot lock {}", shown.display())),
        }
    }

    /// Whether this run may write the state (not a dry-run).
    pub fn exclusive(&self) -> bool {
        self.exclusive
    }
}

/// Reads one of the agent's files as text: bounded, a regular file, UTF-8; the error names
/// the file and what is wrong with it.
pub fn read_text(root: &Root, path: &str, max: u64) -> Result<String, String> {
    let shown = root.path().join(path.trim_start_matches('/')).display().to_string();
    let bytes = root.read_bounded(path, max).map_err(|e| format!("{shown}: {e}"))?;
    String::from_utf8(bytes).map_err(|_| format!("{shown}: is not UTF-8 text"))
}

/// The host's sealing key; `None` when there is none yet.
pub fn read_seal_key(root: &Root) -> Result<Option<converge_modules::sealed::Identity>> {
    if root.lstat(SEAL_KEY_FILE)?.is_none() {
        return Ok(None);
    }
    let text = read_text(root, SEAL_KEY_FILE, 16 << 10).map_err(|e| anyhow!(e))?;
    let ids = converge_modules::sealed::parse_identities(&text).map_err(|e| {
        anyhow!(
            "{}: {e}: this host cannot open its catalogs' secrets; bootstrap it again to make a new sealing key",
            root.path().join(SEAL_KEY_FILE.trim_start_matches('/')).display()
        )
    })?;
    Ok(ids.into_iter().next())
}

/// The recipient of the host's sealing key, made now when there is none (readable by root
/// alone).
pub fn seal_recipient(host: &RealHost) -> Result<String> {
    if let Some(id) = read_seal_key(host.root())? {
        return Ok(id.to_public().to_string());
    }
    let (text, recipient) = converge_modules::sealed::generate("converge sealing key of this host");
    write(host, SEAL_KEY_FILE, text.as_bytes(), 0o600)?;
    Ok(recipient)
}

/// Sets a damaged state file aside as `PATH.damaged` (replacing an older one), so that the
/// next run does not trip on it and an operator can still look at it. Returns the note for
/// the run's report.
pub fn set_aside(host: &RealHost, path: &str, why: &str) -> String {
    let shown = host.root().path().join(path.trim_start_matches('/')).display().to_string();
    let aside = format!("{path}.damaged");
    match host.rename(path, &aside) {
        Ok(()) => format!("{shown} was damaged ({}): set aside as {shown}.damaged", clip(why, 200)),
        Err(e) => format!("{shown} is damaged ({}), and could not be set aside: {e}", clip(why, 200)),
    }
}

/// `/etc/converge/agent.toml`.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The first address of the server.
    pub server: String,
    /// Every address, `server` first: several servers sharing one database, or one server by
    /// several names, tried in turn when one cannot be reached.
    pub servers: Vec<String>,
    pub name: String,
    /// Seconds between runs [30m].
    pub interval: i64,
    /// The most a run is delayed, fixed per host from its name [the interval].
    pub splay: i64,
}

/// `agent.toml` as written.
#[derive(serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    server: String,
    /// More addresses of the same fleet, tried after `server`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    servers: Vec<String>,
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    interval: Option<Spanned<settings::Duration>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    splay: Option<settings::Duration>,
}

impl AgentConfig {
    pub fn load(root: &Root) -> Result<AgentConfig> {
        let shown = root.path().join(CONFIG_FILE.trim_start_matches('/')).display().to_string();
        let text = match read_text(root, CONFIG_FILE, SMALL_FILE) {
            Ok(t) => t,
            Err(_) if root.lstat(CONFIG_FILE).ok().flatten().is_none() => {
                bail!("{shown} does not exist: this host has not joined a server yet (converge bootstrap)")
            }
            Err(why) => bail!("{why}: restore it, or join again (converge bootstrap)"),
        };
        let file = Settings { file: &shown, text: &text };
        let f: AgentFile = file.parse().map_err(|d| anyhow!("{d}"))?;
        let interval = match &f.interval {
            Some(i) => file.at_least("interval", i, 10).map_err(|d| anyhow!("{d}"))?,
            None => 1800,
        };
        if f.servers.len() > 16 {
            bail!("{shown}: `servers` lists {} addresses; 16 at most", f.servers.len());
        }
        let mut servers = vec![f.server.clone()];
        servers.extend(f.servers.into_iter().filter(|s| *s != f.server));
        servers.dedup();
        Ok(AgentConfig {
            server: f.server,
            servers,
            name: f.name,
            interval,
            splay: f.splay.map_or(interval, |s| s.0).max(0),
        })
    }

    /// The text bootstrap writes: the first of `servers` as `server`, the rest as `servers`.
    pub fn text(servers: &[String], name: &str) -> String {
        let file = AgentFile {
            server: servers.first().cloned().unwrap_or_default(),
            servers: servers.iter().skip(1).cloned().collect(),
            name: name.into(),
            interval: Some(Spanned::new(0..0, settings::Duration(1800))),
            splay: None,
        };
        let mut text = settings::write(&["converge agent (written by converge bootstrap)"], &file);
        text.push_str("# splay = \"30m\"   # the most a run is delayed, fixed per host\n");
        text
    }

    /// This host's fixed delay within the splay: the same every run, different across hosts.
    pub fn splay_offset(&self) -> i64 {
        if self.splay == 0 {
            return 0;
        }
        let h = converge_modules::hash::sha256_hex(self.name.as_bytes());
        (u64::from_str_radix(&h[..15], 16).unwrap_or(0) % self.splay as u64) as i64
    }
}

/// Writes a file of the state, atomically.
pub fn write(host: &RealHost, path: &str, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = &path[..path.rfind('/').unwrap_or(0)];
    host.root().create_dir_all(dir, 0o700)?;
    host.write_file(path, bytes, NewAttrs { mode, uid: None, gid: None }, None).map_err(|e| anyhow!("{e}"))
}

fn names(host: &RealHost, dir: &str) -> Vec<String> {
    host.list_dir(dir)
        .map(|v| v.into_iter().map(|(n, _)| n).filter(|n| !n.starts_with('.')).collect())
        .unwrap_or_default()
}

fn sort_key(name: &str) -> u64 {
    name.split('.').next().and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// The cached envelopes, newest first, as paths.
pub fn cached_envelopes(host: &RealHost) -> Vec<String> {
    let mut envs: Vec<String> = names(host, CACHE_DIR).into_iter().filter(|n| n.ends_with(".env")).collect();
    envs.sort_by_key(|n| std::cmp::Reverse(sort_key(n)));
    envs.into_iter().map(|n| format!("{CACHE_DIR}/{n}")).collect()
}

/// Reads a cached envelope (bounded by the largest envelope an agent accepts).
pub fn read_envelope(host: &RealHost, path: &str) -> Result<Vec<u8>, String> {
    host.root().read_bounded(path, converge_modules::trust::MAX_ENVELOPE as u64).map_err(|e| e.to_string())
}

/// The ETag kept beside a cached envelope, if it is one the server could have sent (a quoted
/// token of printable ASCII). A damaged one is removed, and the catalog fetched whole.
pub fn read_etag(host: &RealHost, envelope_path: &str, notes: &mut Vec<String>) -> Option<String> {
    let path = format!("{}.etag", envelope_path.trim_end_matches(".env"));
    let text = match read_text(host.root(), &path, MAX_ETAG) {
        Ok(t) => t,
        Err(_) if host.root().lstat(&path).ok().flatten().is_none() => return None,
        Err(why) => {
            notes.push(format!("{why}: the catalog is fetched whole"));
            let _ = host.remove(&path);
            return None;
        }
    };
    let tag = text.trim();
    let valid = tag.len() >= 2
        && tag.starts_with('"')
        && tag.ends_with('"')
        && tag[1..tag.len() - 1].bytes().all(|b| b.is_ascii_graphic() && b != b'"');
    if tag.is_empty() {
        return None;
    }
    if !valid {
        let shown = host.root().path().join(path.trim_start_matches('/')).display().to_string();
        notes.push(format!("{shown} held no ETag the server could have sent: the catalog is fetched whole"));
        let _ = host.remove(&path);
        return None;
    }
    Some(tag.to_string())
}

/// Keeps a verified envelope (by serial) and its ETag; the oldest beyond
/// [`KEEP_ENVELOPES`] go.
pub fn keep_envelope(host: &RealHost, serial: u64, bytes: &[u8], etag: Option<&str>) -> Result<()> {
    write(host, &format!("{CACHE_DIR}/{serial:020}.env"), bytes, 0o600)?;
    write(host, &format!("{CACHE_DIR}/{serial:020}.etag"), etag.unwrap_or("").as_bytes(), 0o600)?;
    let mut envs: Vec<String> = names(host, CACHE_DIR).into_iter().filter(|n| n.ends_with(".env")).collect();
    envs.sort_by_key(|n| sort_key(n));
    for old in envs.iter().rev().skip(KEEP_ENVELOPES) {
        let stem = old.trim_end_matches(".env");
        let _ = host.remove(&format!("{CACHE_DIR}/{old}"));
        let _ = host.remove(&format!("{CACHE_DIR}/{stem}.etag"));
    }
    // Envelopes set aside as damaged are kept for a look, a few at most.
    let mut damaged: Vec<String> = names(host, CACHE_DIR).into_iter().filter(|n| n.ends_with(".damaged")).collect();
    damaged.sort_by_key(|n| sort_key(n));
    for old in damaged.iter().rev().skip(KEEP_ENVELOPES) {
        let _ = host.remove(&format!("{CACHE_DIR}/{old}"));
    }
    Ok(())
}

/// Queues a report that could not be delivered.
pub fn queue_report(host: &RealHost, body: &[u8]) -> Result<()> {
    let millis = converge_modules::time::unix_millis();
    write(host, &format!("{QUEUE_DIR}/{millis:020}.json"), body, 0o600)?;
    let mut queued = names(host, QUEUE_DIR);
    queued.sort();
    let excess = queued.len().saturating_sub(KEEP_REPORTS);
    for old in &queued[..excess] {
        let _ = host.remove(&format!("{QUEUE_DIR}/{old}"));
    }
    Ok(())
}

/// The queued reports, oldest first, as (path, body). A queued report that is not one (a
/// torn write, a damaged disk) is set aside with a note, never sent and never in the way.
pub fn queued_reports(host: &RealHost, notes: &mut Vec<String>) -> Vec<(String, Vec<u8>)> {
    let mut queued = names(host, QUEUE_DIR);
    queued.sort();
    let mut out = Vec::new();
    for n in queued.into_iter().filter(|n| n.ends_with(".json")) {
        let path = format!("{QUEUE_DIR}/{n}");
        let body = host.root().read_bounded(&path, Limits::REPORT_BODY as u64).map_err(|e| e.to_string());
        let checked = body.and_then(|b| {
            let r: Report = serde_json::from_slice(&b).map_err(|e| e.to_string())?;
            r.check().map_err(|e| e.to_string())?;
            Ok(b)
        });
        match checked {
            Ok(b) => out.push((path, b)),
            Err(why) => notes.push(set_aside(host, &path, &format!("not a report: {why}"))),
        }
    }
    out
}

/// What `converge status` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub last_run: Option<LastRun>,
    pub next_run: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<Certificate>,
}

/// This host's certificate, as the last run saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Certificate {
    pub expires: Timestamp,
    /// From when each run renews it.
    pub renew_from: Timestamp,
    /// Why the last renewal failed, when it did (it is tried again each run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastRun {
    pub started: Timestamp,
    pub finished: Timestamp,
    pub unchanged: usize,
    pub changed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub serial: Option<u64>,
    pub commit: Option<String>,
    /// `server` (a catalog fetched or confirmed), or `cache` (the server could not be reached).
    pub source: String,
    pub stale: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Why the run could not converge at all (no catalog it could trust, damaged state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl LastRun {
    /// A run that converged nothing (`source`: why: `none`, `paused`), keeping the catalog the
    /// run before it applied.
    pub fn nothing(
        started: Timestamp,
        previous: Option<LastRun>,
        source: &str,
        notes: Vec<String>,
        error: Option<String>,
    ) -> LastRun {
        LastRun {
            started,
            finished: Timestamp::now(),
            unchanged: 0,
            changed: 0,
            failed: 0,
            skipped: 0,
            serial: previous.as_ref().and_then(|p| p.serial),
            commit: previous.and_then(|p| p.commit),
            source: source.into(),
            stale: false,
            notes,
            error,
        }
    }
}

/// The status file; a damaged one reads as no status (it is only a record, rewritten by the
/// next run), and says so.
pub fn read_status(root: &Root) -> (Status, Option<String>) {
    match read_text(root, STATUS_FILE, SMALL_FILE) {
        Ok(t) => match serde_json::from_str(&t) {
            Ok(s) => (s, None),
            Err(e) => (Status::default(), Some(format!("{STATUS_FILE} is damaged ({e}); the next run rewrites it"))),
        },
        Err(_) if root.lstat(STATUS_FILE).ok().flatten().is_none() => (Status::default(), None),
        Err(why) => (Status::default(), Some(format!("{why}; the next run rewrites it"))),
    }
}

pub fn write_status(host: &RealHost, status: &Status) -> Result<()> {
    write(host, STATUS_FILE, &serde_json::to_vec_pretty(status)?, 0o644).context("cannot record the run's status")
}

/// `converge pause`: while this file is there (and its end, if any, has not come), runs change
/// nothing on the host.
pub const PAUSE_FILE: &str = "/var/lib/converge/paused.json";
/// The longest pause reason kept.
pub const PAUSE_REASON: usize = 500;

/// An operator's pause of this host's runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pause {
    pub reason: String,
    pub since: Timestamp,
    /// When runs go on by themselves (`--for`); `None`: until `converge resume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Timestamp>,
    /// Who paused (the login that ran `converge pause`, as the environment says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

impl Pause {
    /// One line: why, since when, by whom, until when.
    pub fn describe(&self) -> String {
        let by = self.by.as_deref().map(|b| format!(" by {b}")).unwrap_or_default();
        let until = self.until.map(|u| format!(", until {u}")).unwrap_or_else(|| ", until converge resume".into());
        format!("paused since {}{by}{until}: {}", self.since, self.reason)
    }
}

/// The pause in force, read under the run lock. A pause file that cannot be read or makes no
/// sense counts as a pause (in doubt, a run changes nothing) that says what is wrong; one past
/// its end counts as none.
pub fn read_pause(root: &Root, now: Timestamp) -> Option<Pause> {
    match read_text(root, PAUSE_FILE, SMALL_FILE) {
        Ok(t) => match serde_json::from_str::<Pause>(&t) {
            Ok(p) if p.until.is_some_and(|u| u <= now) => None,
            Ok(p) => Some(p),
            Err(e) => Some(damaged_pause(format!("{PAUSE_FILE} is damaged ({e})"))),
        },
        Err(_) if root.lstat(PAUSE_FILE).ok().flatten().is_none() => None,
        Err(why) => Some(damaged_pause(why)),
    }
}

fn damaged_pause(why: String) -> Pause {
    Pause {
        reason: format!("{why}: runs change nothing until `converge resume` clears it"),
        since: Timestamp(0),
        until: None,
        by: None,
    }
}

/// Pauses this host's runs (under the run lock).
pub fn write_pause(host: &RealHost, pause: &Pause) -> Result<()> {
    write(host, PAUSE_FILE, &serde_json::to_vec_pretty(pause)?, 0o644).context("cannot record the pause")
}

/// Ends a pause (under the run lock); false when there was none.
pub fn remove_pause(host: &RealHost) -> Result<bool> {
    if host.root().lstat(PAUSE_FILE)?.is_none() {
        return Ok(false);
    }
    Host::remove(host, PAUSE_FILE).map_err(|e| anyhow!("cannot remove {PAUSE_FILE}: {e}"))?;
    Ok(true)
}
