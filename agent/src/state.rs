//! What the agent keeps between runs, under the root's `/var/lib/converge` and
//! `/etc/converge`: its configuration and identity, the last verified envelopes, reports not
//! yet delivered, and the status of the last run. Every file is replaced atomically through
//! the host, inside the root.

use crate::fs::Root;
use crate::host::RealHost;
use anyhow::{Context, Result, anyhow};
use converge_modules::conf::Conf;
use converge_modules::host::{Host, NewAttrs};
use converge_modules::time::Timestamp;
use serde::{Deserialize, Serialize};

pub const CONFIG_FILE: &str = "/etc/converge/agent.toml";
pub const CA_FILE: &str = "/etc/converge/ca.pem";
pub const KEY_FILE: &str = "/etc/converge/agent.key";
pub const CERT_FILE: &str = "/etc/converge/agent.pem";
const CACHE_DIR: &str = "/var/lib/converge/catalogs";
const QUEUE_DIR: &str = "/var/lib/converge/reports";
const STATUS_FILE: &str = "/var/lib/converge/status.json";

/// Envelopes kept: the newest is enforced when the server cannot be reached.
pub const KEEP_ENVELOPES: usize = 5;
/// Reports kept while the server cannot be reached; the oldest go first.
pub const KEEP_REPORTS: usize = 100;

/// `/etc/converge/agent.toml`.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub server: String,
    pub name: String,
    /// Seconds between runs [30m].
    pub interval: i64,
    /// The most a run is delayed, fixed per host from its name [the interval].
    pub splay: i64,
}

pub const CONFIG_KEYS: &[&str] = &["server", "name", "interval", "splay"];

impl AgentConfig {
    pub fn load(root: &Root) -> Result<AgentConfig> {
        let shown = root.path().join(CONFIG_FILE.trim_start_matches('/')).display().to_string();
        let text = root
            .read_to_string(CONFIG_FILE)
            .map_err(|e| anyhow!("{shown}: {e}: this host has not joined a server yet (converge bootstrap)"))?;
        let conf = Conf::parse(&shown, &text, CONFIG_KEYS)
            .map_err(|d| anyhow!("{}", d.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n")))?;
        let e = |d: converge_modules::diag::Diagnostic| anyhow!("{d}");
        let interval = conf.duration_at_least("interval", 10).map_err(e)?.unwrap_or(1800);
        Ok(AgentConfig {
            server: conf.required("server").map_err(e)?.to_string(),
            name: conf.required("name").map_err(e)?.to_string(),
            interval,
            splay: conf.duration("splay").map_err(e)?.unwrap_or(interval).max(0),
        })
    }

    /// The text bootstrap writes.
    pub fn text(server: &str, name: &str) -> String {
        let q = converge_modules::conf::quote;
        format!(
            "# converge agent (written by converge bootstrap)\nserver = {}\nname = {}\ninterval = \"30m\"\n# splay = \"30m\"   # the most a run is delayed, fixed per host\n",
            q(server),
            q(name)
        )
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

/// The newest cached envelope and its ETag.
pub fn newest_envelope(host: &RealHost) -> Option<(Vec<u8>, Option<String>)> {
    let newest = names(host, CACHE_DIR).into_iter().filter(|n| n.ends_with(".env")).max_by_key(|n| sort_key(n))?;
    let bytes = host.root().read_to_string(&format!("{CACHE_DIR}/{newest}")).ok()?.into_bytes();
    let etag = host.root().read_to_string(&format!("{CACHE_DIR}/{}.etag", newest.trim_end_matches(".env"))).ok();
    Some((bytes, etag.map(|e| e.trim().to_string())))
}

fn sort_key(name: &str) -> u64 {
    name.split('.').next().and_then(|s| s.parse().ok()).unwrap_or(0)
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
    Ok(())
}

/// Queues a report that could not be delivered.
pub fn queue_report(host: &RealHost, body: &[u8]) -> Result<()> {
    let millis = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
    write(host, &format!("{QUEUE_DIR}/{millis:020}.json"), body, 0o600)?;
    let mut queued = names(host, QUEUE_DIR);
    queued.sort();
    let excess = queued.len().saturating_sub(KEEP_REPORTS);
    for old in &queued[..excess] {
        let _ = host.remove(&format!("{QUEUE_DIR}/{old}"));
    }
    Ok(())
}

/// The queued reports, oldest first, as (path, body).
pub fn queued_reports(host: &RealHost) -> Vec<(String, Vec<u8>)> {
    let mut queued = names(host, QUEUE_DIR);
    queued.sort();
    queued
        .into_iter()
        .filter_map(|n| {
            let path = format!("{QUEUE_DIR}/{n}");
            let body = host.root().read_to_string(&path).ok()?;
            Some((path, body.into_bytes()))
        })
        .collect()
}

/// What `converge status` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub last_run: Option<LastRun>,
    pub next_run: Option<Timestamp>,
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
}

pub fn read_status(root: &Root) -> Status {
    root.read_to_string(STATUS_FILE).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

pub fn write_status(host: &RealHost, status: &Status) -> Result<()> {
    write(host, STATUS_FILE, &serde_json::to_vec_pretty(status)?, 0o644).context("cannot record the run's status")
}
