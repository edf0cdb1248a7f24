//! `server.toml`: where the server listens, keeps its state, finds the repository and keys.
//! Relative paths are taken from the file's own directory (`init` writes it in the state
//! directory, so the whole state moves as one directory).

use anyhow::{Result, anyhow};
use converge_modules::conf::Conf;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const KEYS: &[&str] = &[
    "listen",
    "state",
    "repo",
    "branch",
    "signing_key",
    "trusted_keys",
    "catalog_ttl",
    "cert_lifetime",
    "token_ttl",
    "max_compiles",
    "repo_poll",
    "run_interval",
    "max_connections",
    "max_connections_per_address",
    "max_requests",
    "request_timeout",
    "new_connections_per_address",
    "renew_expired_within",
];

#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub listen: SocketAddr,
    pub state: PathBuf,
    pub repo: PathBuf,
    pub branch: String,
    pub signing_key: PathBuf,
    pub trusted_keys: PathBuf,
    /// Seconds a signed catalog stays valid [7d].
    pub catalog_ttl: i64,
    /// Days a client certificate is valid [90].
    pub cert_days: i64,
    /// Seconds an enrollment token is valid [24h].
    pub token_ttl: i64,
    /// Compiles run at once; past that, 503 with Retry-After [cores].
    pub max_compiles: usize,
    /// How often the branch is checked for a new commit [5s].
    pub repo_poll: u64,
    /// How often agents run [30m]: a node whose last run is older than twice this is late.
    pub run_interval: i64,
    /// Connections open at once [4096, and never more than the open-file limit allows];
    /// past that, new ones are closed at once.
    pub max_connections: usize,
    /// Connections open at once from one address [256]: one client cannot take them all.
    pub max_connections_per_address: usize,
    /// Requests handled at once [512]; past that, 503 with a jittered Retry-After.
    pub max_requests: usize,
    /// Seconds a client has for its TLS handshake, and for each request's head [10s]; a
    /// request's body gets twice that.
    pub request_timeout: u64,
    /// New connections a second from one address, on average [64]; a burst may open the
    /// address's whole cap at once. Behind a load balancer that hides client addresses, raise
    /// this and `max_connections_per_address` to the totals.
    pub new_connections_per_address: u64,
    /// Seconds after its end that an expired, unrevoked client certificate can still renew
    /// itself (and do nothing else) [180d; 0 turns it off]: a host that was off for months
    /// comes back on its own.
    pub renew_expired_within: i64,
}

impl Config {
    pub fn read(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
        let shown = path.display().to_string();
        let conf = Conf::parse(&shown, &text, KEYS)
            .map_err(|d| anyhow!("{}", d.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n")))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let at = |p: &str| if Path::new(p).is_absolute() { PathBuf::from(p) } else { base.join(p) };
        let e = |d: converge_modules::diag::Diagnostic| anyhow!("{d}");
        let listen = conf.str("listen").map_err(e)?.unwrap_or("0.0.0.0:8443");
        let listen = listen
            .parse()
            .map_err(|_| e(conf.err("listen", format!("`{listen}` is not an address like 0.0.0.0:8443"))))?;
        let state = at(conf.str("state").map_err(e)?.unwrap_or("."));
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Config {
            file: path.to_path_buf(),
            listen,
            repo: at(conf.required("repo").map_err(e)?),
            branch: conf.str("branch").map_err(e)?.unwrap_or("main").to_string(),
            signing_key: at(conf.str("signing_key").map_err(e)?.unwrap_or("keys/catalog.key")),
            trusted_keys: at(conf.str("trusted_keys").map_err(e)?.unwrap_or("keys/trusted-keys.json")),
            catalog_ttl: conf.duration("catalog_ttl").map_err(e)?.unwrap_or(7 * 86_400),
            cert_days: conf.duration("cert_lifetime").map_err(e)?.map_or(90, |s| (s / 86_400).max(1)),
            token_ttl: conf.duration("token_ttl").map_err(e)?.unwrap_or(86_400),
            max_compiles: conf.int("max_compiles").map_err(e)?.map_or(cores, |n| n.max(1) as usize),
            repo_poll: conf.duration("repo_poll").map_err(e)?.unwrap_or(5).max(1) as u64,
            run_interval: conf.duration_at_least("run_interval", 10).map_err(e)?.unwrap_or(1800),
            max_connections: conf.int("max_connections").map_err(e)?.map_or(4096, |n| n.max(16) as usize),
            max_connections_per_address: conf
                .int("max_connections_per_address")
                .map_err(e)?
                .map_or(256, |n| n.max(1) as usize),
            max_requests: conf.int("max_requests").map_err(e)?.map_or(512, |n| n.max(1) as usize),
            request_timeout: conf.duration_at_least("request_timeout", 1).map_err(e)?.map_or(10, |s| s as u64),
            new_connections_per_address: conf
                .int("new_connections_per_address")
                .map_err(e)?
                .map_or(64, |n| n.max(1) as u64),
            renew_expired_within: conf.duration("renew_expired_within").map_err(e)?.unwrap_or(180 * 86_400),
            state,
        })
    }
}
