//! `server.toml`: where the server listens, keeps its state, finds the repository and keys.
//! Relative paths are taken from the file's own directory (`init` writes it in the state
//! directory, so the whole state moves as one directory).

use anyhow::{Result, anyhow};
use converge_modules::settings::{Duration, Settings, Spanned};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
    /// Seconds a report is kept [14d, at least 1d]: older ones are deleted every hour.
    pub report_retention: i64,
    /// The most reports kept per node, newest first [50, at least 1].
    pub reports_per_node: i64,
    /// Commands (argv) the server runs before a rollout's next wave opens: every one must exit
    /// 0, else the rollout halts with its output. In server.toml, never in the repository
    /// (they run on the server, beside its keys).
    pub rollout_checks: Vec<Vec<String>>,
    /// A PostgreSQL URL (`postgres://USER@HOST:PORT/DB`) for state several servers share;
    /// `None`: the embedded file `STATE/state.db`.
    pub database: Option<String>,
    /// The CA certificate(s) (PEM) the PostgreSQL server's certificate must chain to: with it
    /// the connection is TLS (rustls) and never falls back to plaintext; without it, plaintext
    /// (for a database on loopback or a network trusted as such).
    pub database_ca: Option<PathBuf>,
}

/// `server.toml` as written: every key optional but `repo`, unknown ones refused.
#[derive(Debug, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<Spanned<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    pub repo: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trusted_keys: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub catalog_ttl: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_lifetime: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ttl: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_compiles: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repo_poll: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_interval: Option<Spanned<Duration>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_address: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<Spanned<Duration>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_connections_per_address: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renew_expired_within: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report_retention: Option<Spanned<Duration>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reports_per_node: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout_checks: Option<Spanned<Vec<Vec<String>>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<Spanned<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_ca: Option<Spanned<String>>,
}

impl Config {
    pub fn read(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
        let shown = path.display().to_string();
        let file = Settings { file: &shown, text: &text };
        let e = |d: converge_modules::diag::Diagnostic| anyhow!("{d}");
        let f: ServerFile = file.parse().map_err(e)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let at = |p: &str| if Path::new(p).is_absolute() { PathBuf::from(p) } else { base.join(p) };
        let listen = match &f.listen {
            Some(l) => l.get_ref().parse().map_err(|_| {
                e(file.at(l, format!("`listen`: `{}` is not an address like 0.0.0.0:8443", l.get_ref())))
            })?,
            None => SocketAddr::from(([0, 0, 0, 0], 8443)),
        };
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let seconds = |d: Option<Duration>, default: i64| d.map_or(default, |d| d.0);
        let count = |n: Option<u32>, default: usize, min: usize| n.map_or(default, |n| (n as usize).max(min));
        Ok(Config {
            file: path.to_path_buf(),
            listen,
            state: at(f.state.as_deref().unwrap_or(".")),
            repo: at(&f.repo),
            branch: f.branch.unwrap_or_else(|| "main".into()),
            signing_key: at(f.signing_key.as_deref().unwrap_or("keys/catalog.key")),
            trusted_keys: at(f.trusted_keys.as_deref().unwrap_or("keys/trusted-keys.json")),
            catalog_ttl: seconds(f.catalog_ttl, 7 * 86_400),
            cert_days: f.cert_lifetime.map_or(90, |d| (d.0 / 86_400).max(1)),
            token_ttl: seconds(f.token_ttl, 86_400),
            max_compiles: count(f.max_compiles, cores, 1),
            repo_poll: seconds(f.repo_poll, 5).max(1) as u64,
            run_interval: match &f.run_interval {
                Some(d) => file.at_least("run_interval", d, 10).map_err(e)?,
                None => 1800,
            },
            max_connections: count(f.max_connections, 4096, 16),
            max_connections_per_address: count(f.max_connections_per_address, 256, 1),
            max_requests: count(f.max_requests, 512, 1),
            request_timeout: match &f.request_timeout {
                Some(d) => file.at_least("request_timeout", d, 1).map_err(e)? as u64,
                None => 10,
            },
            new_connections_per_address: count(f.new_connections_per_address, 64, 1) as u64,
            renew_expired_within: seconds(f.renew_expired_within, 180 * 86_400),
            report_retention: match &f.report_retention {
                Some(d) => file.at_least("report_retention", d, 86_400).map_err(e)?,
                None => 14 * 86_400,
            },
            reports_per_node: count(f.reports_per_node, crate::db::REPORTS_PER_NODE as usize, 1) as i64,
            rollout_checks: match &f.rollout_checks {
                None => Vec::new(),
                Some(c) if c.get_ref().iter().all(|argv| argv.first().is_some_and(|p| Path::new(p).is_absolute())) => {
                    c.get_ref().clone()
                }
                Some(c) => {
                    return Err(e(file.at(c, "`rollout_checks`: each check is a command as a list, its program an absolute path: [[\"/usr/local/bin/check\", \"--quick\"]]")));
                }
            },
            database: match &f.database {
                None => None,
                Some(d)
                    if d.get_ref().parse::<tokio_postgres::Config>().is_ok()
                        && (d.get_ref().starts_with("postgres://") || d.get_ref().starts_with("postgresql://")) =>
                {
                    Some(d.get_ref().clone())
                }
                // The value may hold a password: it is not repeated.
                Some(d) => {
                    return Err(e(file.at(d, "`database`: not a PostgreSQL URL (postgres://USER@HOST:PORT/DB)")));
                }
            },
            database_ca: match (&f.database_ca, &f.database) {
                (Some(c), None) => {
                    return Err(e(file.at(c, "`database_ca` without `database`: it names the PostgreSQL server's CA")));
                }
                (c, _) => c.as_ref().map(|c| at(c.get_ref())),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Config> {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("server.toml");
        std::fs::write(&path, text).unwrap();
        Config::read(&path)
    }

    #[test]
    fn report_retention_and_cap_have_floors_and_say_where_they_are_wrong() {
        let c = read("repo = \"r\"\n").unwrap();
        assert_eq!((c.report_retention, c.reports_per_node), (14 * 86_400, 50));
        let checks = read("repo = \"r\"\nrollout_checks = [[\"/bin/true\"], [\"/usr/bin/env\", \"x\"]]\n").unwrap();
        assert_eq!(checks.rollout_checks, [vec!["/bin/true".to_string()], vec!["/usr/bin/env".into(), "x".into()]]);
        let relative = read("repo = \"r\"\nrollout_checks = [[\"check\"]]\n").unwrap_err().to_string();
        assert!(relative.contains("absolute path") && relative.contains(":2:"), "{relative}");
        let c = read("repo = \"r\"\nreport_retention = \"90d\"\nreports_per_node = 0\n").unwrap();
        assert_eq!((c.report_retention, c.reports_per_node), (90 * 86_400, 1));
        let e = read("repo = \"r\"\nreport_retention = \"1h\"\n").unwrap_err().to_string();
        assert!(e.contains("server.toml:2:") && e.contains("report_retention"), "{e}");
    }

    #[test]
    fn the_database_is_a_postgresql_url_and_a_wrong_one_is_never_repeated() {
        assert_eq!(read("repo = \"r\"\n").unwrap().database, None, "the embedded file");
        let url = "postgres://converge:pw@db.example:5432/converge";
        assert_eq!(read(&format!("repo = \"r\"\ndatabase = \"{url}\"\n")).unwrap().database.as_deref(), Some(url));
        let e = read("repo = \"r\"\ndatabase = \"mysql://u:s3cret@h/d\"\n").unwrap_err().to_string();
        assert!(e.contains("server.toml:2:") && e.contains("not a PostgreSQL URL") && !e.contains("s3cret"), "{e}");
        let ca = read(&format!("repo = \"r\"\ndatabase = \"{url}\"\ndatabase_ca = \"db-ca.pem\"\n")).unwrap();
        assert!(ca.database_ca.unwrap().ends_with("db-ca.pem"), "relative to server.toml");
        let alone = read("repo = \"r\"\ndatabase_ca = \"db-ca.pem\"\n").unwrap_err().to_string();
        assert!(alone.contains("`database_ca` without `database`") && alone.contains(":2:"), "{alone}");
    }
}
