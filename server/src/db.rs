//! The server's state: one SQLite file (WAL) holding nodes, their certificates, enrollment
//! tokens and requests, the last catalog of each node, and reports.
//!
//! Certificates are known by the SHA-256 of their DER: the server issued every client
//! certificate it accepts, so a fingerprint names its node without parsing X.509, and
//! revocation is a column read on every request (a deny list that cannot expire like a CRL).
//! Tokens are stored hashed. Connections come from a small pool; each call holds one briefly.

use crate::sql::{Conn, Counting, Lite, Row, params};
use anyhow::{Context, Result, bail};
use converge_modules::time::Timestamp;
use rusqlite::Connection;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Enrollment requests waiting for approval, at most: past that, new ones are refused (an
/// unauthenticated client cannot grow the database or the fleet page without bound).
pub const MAX_PENDING: i64 = 1000;
/// How long an enrollment request waits for approval before it is forgotten.
pub const PENDING_TTL: i64 = 7 * 86_400;

/// What became of an enrollment request without a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// Recorded (or already recorded with this key): waiting for `node approve`.
    Waiting,
    /// An operator approved this key.
    Approved,
    /// Refused, and why (another key waits for the name, too many requests wait).
    Refused(String),
}

/// An enrollment request waiting, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRow {
    pub node: String,
    pub requested: i64,
    pub approved: bool,
    pub fingerprint: String,
    pub address: String,
}

/// Every node with its certificate, catalog, last run and pending dry-run (`?1`: one node's
/// name, or NULL for all), from the nodes themselves (a node's last run is kept with it as
/// reports arrive), never a pass over the reports; the same text serves both engines (the casts tell PostgreSQL a
/// parameter's type where it cannot see it).
pub(crate) const NODE_ROWS: &str = "SELECT n.name, n.last_seen,
    (SELECT MAX(expires) FROM certificates WHERE node = n.name AND revoked IS NULL),
    NOT EXISTS (SELECT 1 FROM certificates WHERE node = n.name AND revoked IS NULL),
    k.serial, k.compile_error,
    n.run_at, n.run_changed, n.run_failed, n.run_stale, n.run_commit, n.agent_version, n.dry_run_changed,
    n.paused
 FROM nodes n
 LEFT JOIN catalogs k ON k.node = n.name
 WHERE CAST(?1 AS TEXT) IS NULL OR n.name = ?1
 ORDER BY n.name";

/// Reports, newest first: `?1` node or NULL, `?2` failed only, `?3` received since or NULL,
/// `?4` how many, `?5` with their bodies.
pub(crate) const REPORTS: &str = "SELECT id, node, received, changed, failed, stale, serial, commit_id,
    CASE WHEN ?5 THEN body ELSE '' END, digest, dry_run FROM reports
 WHERE (CAST(?1 AS TEXT) IS NULL OR node = ?1) AND (NOT ?2 OR failed > 0)
   AND (CAST(?3 AS BIGINT) IS NULL OR received >= ?3)
 ORDER BY id DESC LIMIT ?4";

/// Enrollment requests not yet forgotten (`?1`: the oldest time kept).
pub(crate) const PENDING: &str = "SELECT node, requested, approved IS NOT NULL, fingerprint, address FROM pending
 WHERE requested >= ?1 ORDER BY node";

/// Reports kept per node; older ones are dropped.
pub const REPORTS_PER_NODE: i64 = 50;

/// The state, in the embedded file or in PostgreSQL: every method below is written once, for
/// both (see [`crate::sql`]).
pub struct Db {
    backend: Backend,
    /// Statements sent, transactions' begin and commit included (`/metrics`:
    /// `converge_db_statements_total`).
    pub statements: prometheus_client::metrics::counter::Counter,
}

enum Backend {
    Sqlite { pool: Vec<Mutex<Connection>>, next: AtomicUsize },
    Postgres(crate::pg::Pg),
}

/// A certificate as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cert {
    pub node: String,
    pub issued: i64,
    pub expires: i64,
    pub revoked: Option<i64>,
    /// The certificate this one renewed, until this one is first used and that one revoked.
    pub replaces: Option<String>,
}

/// The last catalog served to a node.
#[derive(Debug, Clone)]
pub struct Stored {
    pub serial: u64,
    pub resources_sha256: String,
    pub cache_key: String,
    pub etag: String,
    pub issued_at: i64,
    pub envelope: Vec<u8>,
    /// The agreement on the current commit it was compiled at ([`Db::agreed`]): a server
    /// never replaces a catalog of a later one.
    pub epoch: i64,
}

/// A node's request, for [`Db::seen`]: when, which agent version, and its facts (JSON and
/// hash) when they changed.
#[derive(Debug, Clone)]
pub struct Visit {
    pub node: String,
    pub at: i64,
    pub version: String,
    pub facts: Option<(String, String)>,
    pub ca_bundle: Option<String>,
    pub keys_version: Option<u64>,
    /// Its runs are paused, and why (`None`: not paused).
    pub paused: Option<String>,
}

/// A report row, for [`Db::add_report`].
#[derive(Debug, Clone)]
pub struct ReportRow<'a> {
    pub node: &'a str,
    pub at: i64,
    /// What changed, or for a dry-run what would.
    pub changed: i64,
    pub dry_run: bool,
    pub failed: i64,
    /// Changes the run's plan did not predict.
    pub unplanned: i64,
    pub stale: bool,
    pub serial: Option<u64>,
    pub commit: Option<&'a str>,
    pub body: &'a str,
    pub digest: &'a str,
}

/// A stored report.
#[derive(Debug, Clone)]
pub struct StoredReport {
    pub id: i64,
    pub node: String,
    pub received: i64,
    /// What changed, or for a dry-run what would.
    pub changed: i64,
    pub dry_run: bool,
    pub failed: i64,
    pub stale: bool,
    pub serial: Option<u64>,
    pub commit: Option<String>,
    /// Empty unless asked for ([`ReportFilter::bodies`]).
    pub body: String,
    pub digest: Option<String>,
}

/// Which reports to list.
#[derive(Debug, Clone, Default)]
pub struct ReportFilter {
    pub node: Option<String>,
    pub failed: bool,
    pub since: Option<i64>,
    pub limit: i64,
    /// Read the whole bodies too (megabytes each, at worst).
    pub bodies: bool,
}

/// What the store knows of one node.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub row: NodeRow,
    pub created: i64,
    pub agent_version: Option<String>,
    pub facts: Option<String>,
}

/// A node for listings.
#[derive(Debug, Clone)]
pub struct NodeRow {
    pub name: String,
    pub last_seen: Option<i64>,
    pub cert_expires: Option<i64>,
    pub revoked: bool,
    pub serial: Option<u64>,
    pub compile_error: Option<String>,
    /// The last real run's report: when, changed, failed, stale.
    pub last_report: Option<(i64, i64, i64, bool)>,
    /// What a dry-run since the last real run said would change.
    pub dry_run_pending: Option<i64>,
    /// The commit of the catalog the last report was about.
    pub last_commit: Option<String>,
    pub agent_version: Option<String>,
    /// The host's runs are paused: why, since and until when, as it said.
    pub paused: Option<String>,
}

impl Db {
    /// Opens (creating) the embedded store at `path` with `size` connections.
    pub fn open(path: &Path, size: usize) -> Result<Db> {
        let mut pool = Vec::with_capacity(size.max(1));
        for i in 0..size.max(1) {
            let c =
                Connection::open(path).with_context(|| format!("cannot open the state database {}", path.display()))?;
            c.busy_timeout(std::time::Duration::from_secs(10))?;
            c.pragma_update(None, "journal_mode", "WAL")?;
            c.pragma_update(None, "synchronous", "NORMAL")?;
            c.pragma_update(None, "foreign_keys", "ON")?;
            if i == 0 {
                use crate::schema::{self, Engine};
                c.execute_batch(&schema::tables(Engine::Sqlite))
                    .context("cannot create the state database's tables")?;
                for (table, column, def) in schema::ADDED {
                    let has: bool = c
                        .prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"))?
                        .exists(rusqlite::params![column])?;
                    if !has {
                        c.execute_batch(&schema::add_column(Engine::Sqlite, table, column, def))
                            .with_context(|| format!("cannot add {table}.{column} to the state database"))?;
                    }
                }
                for sql in schema::BACKFILL {
                    c.execute_batch(sql).context("cannot fill in new columns of the state database")?;
                }
            }
            pool.push(Mutex::new(c));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        Ok(Db { backend: Backend::Sqlite { pool, next: AtomicUsize::new(0) }, statements: Default::default() })
    }

    /// The state in PostgreSQL (migrated by `converge-server db migrate`).
    pub fn postgres(pg: crate::pg::Pg) -> Db {
        Db { backend: Backend::Postgres(pg), statements: Default::default() }
    }

    /// The state `config` names: PostgreSQL with `database`, else the state directory's file.
    pub fn of(config: &crate::config::Config, size: usize) -> Result<Db> {
        match &config.database {
            Some(url) => Ok(Db::postgres(crate::pg::Pg::new(url, size, config.database_ca.as_deref())?)),
            None => {
                require_state(&config.state)?;
                Db::open(&config.state.join("state.db"), size)
            }
        }
    }

    /// PostgreSQL, when the state lives there.
    pub fn pg(&self) -> Option<&crate::pg::Pg> {
        match &self.backend {
            Backend::Postgres(pg) => Some(pg),
            Backend::Sqlite { .. } => None,
        }
    }

    /// Runs `f` on a connection, each statement on its own.
    fn with<T>(&self, f: impl FnOnce(&mut dyn Conn) -> Result<T>) -> Result<T> {
        let count = &self.statements;
        match &self.backend {
            Backend::Sqlite { pool, next } => {
                let i = next.fetch_add(1, Ordering::Relaxed) % pool.len();
                let c = pool[i].lock().unwrap_or_else(|p| p.into_inner());
                f(&mut Counting { conn: &mut Lite(&c), count })
            }
            Backend::Postgres(pg) => pg.with(|conn| f(&mut Counting { conn, count })),
        }
    }

    /// Runs `f` in one transaction: committed when it returns `Ok`, else rolled back.
    fn tx<T>(&self, f: impl FnOnce(&mut dyn Conn) -> Result<T>) -> Result<T> {
        let count = &self.statements;
        // Begin and commit.
        count.inc_by(2);
        match &self.backend {
            Backend::Sqlite { pool, next } => {
                let i = next.fetch_add(1, Ordering::Relaxed) % pool.len();
                let mut c = pool[i].lock().unwrap_or_else(|p| p.into_inner());
                let tx = c.transaction()?;
                let out = f(&mut Counting { conn: &mut Lite(&tx), count })?;
                tx.commit()?;
                Ok(out)
            }
            Backend::Postgres(pg) => pg.tx(|conn| f(&mut Counting { conn, count })),
        }
    }

    pub fn cert(&self, fingerprint: &str) -> Result<Option<Cert>> {
        self.with(|c| {
            c.one(
                "SELECT node, issued, expires, revoked, replaces FROM certificates WHERE fingerprint = ?1",
                params![fingerprint],
            )?
            .map(|r| cert_of(&r, 0))
            .transpose()
        })
    }

    /// Certificates issued or revoked at `since` or later: (fingerprint, certificate). With
    /// `i64::MIN`, every certificate. Looked at by time, not by row order: several servers
    /// write certificates, and a transaction that commits late still shows (the caller looks
    /// back a while, [`CERT_LOOKBACK`]).
    pub fn certs_changed(&self, since: i64) -> Result<Vec<(String, Cert)>> {
        self.with(|c| {
            c.query(
                "SELECT node, issued, expires, revoked, replaces, fingerprint FROM certificates
                 WHERE issued >= ?1 OR revoked >= ?1",
                params![since],
            )?
            .iter()
            .map(|r| Ok((r.text(5)?, cert_of(r, 0)?)))
            .collect()
        })
    }

    /// Whether `node` has a certificate that is neither revoked nor expired.
    pub fn live_cert(&self, node: &str, now: i64) -> Result<bool> {
        self.with(|c| {
            c.exists(
                "SELECT 1 FROM certificates WHERE node = ?1 AND revoked IS NULL AND expires > ?2 LIMIT 1",
                params![node, now],
            )
        })
    }

    pub fn add_cert(&self, fingerprint: &str, node: &str, issued: i64, expires: i64) -> Result<()> {
        self.tx(|c| {
            c.execute(
                "INSERT INTO nodes (name, created) VALUES (?1, ?2) ON CONFLICT(name) DO NOTHING",
                params![node, issued],
            )?;
            c.execute(
                "INSERT INTO certificates (fingerprint, node, issued, expires) VALUES (?1, ?2, ?3, ?4)",
                params![fingerprint, node, issued, expires],
            )?;
            c.execute("DELETE FROM pending WHERE node = ?1", params![node])?;
            Ok(())
        })
    }

    /// Records the sealing key (an age recipient) `node` sent.
    pub fn set_seal_key(&self, node: &str, recipient: &str) -> Result<()> {
        self.with(|c| c.execute("UPDATE nodes SET seal_key = ?2 WHERE name = ?1", params![node, recipient]).map(drop))
    }

    /// Makes the stored catalog of `node` stale: the next poll compiles and seals it anew (its
    /// serial stays when its resources do).
    pub fn forget_catalog(&self, node: &str) -> Result<()> {
        self.with(|c| c.execute("UPDATE catalogs SET cache_key = '' WHERE node = ?1", params![node]).map(drop))
    }

    /// The sealing key of `node`, if it sent one.
    pub fn seal_key(&self, node: &str) -> Result<Option<String>> {
        self.with(|c| {
            c.one("SELECT seal_key FROM nodes WHERE name = ?1", params![node])?.map(|r| r.opt_text(0)).transpose()
        })
        .map(Option::flatten)
    }

    /// Revokes every certificate of `node`; returns how many.
    pub fn revoke(&self, node: &str, now: i64) -> Result<usize> {
        self.with(|c| {
            c.execute("UPDATE certificates SET revoked = ?2 WHERE node = ?1 AND revoked IS NULL", params![node, now])
        })
        .map(|n| n as usize)
    }

    /// Revokes every live certificate issued before `before` (those of a retired CA); returns
    /// the nodes they were for.
    pub fn revoke_issued_before(&self, before: i64, now: i64) -> Result<Vec<String>> {
        self.tx(|c| {
            let nodes = c
                .query(
                    "SELECT DISTINCT node FROM certificates WHERE revoked IS NULL AND issued < ?1 ORDER BY node",
                    params![before],
                )?
                .iter()
                .map(|r| r.text(0))
                .collect::<Result<Vec<_>>>()?;
            c.execute(
                "UPDATE certificates SET revoked = ?2 WHERE revoked IS NULL AND issued < ?1",
                params![before, now],
            )?;
            Ok(nodes)
        })
    }

    /// A renewed certificate for `node`, replacing `old` (still live until the new one is
    /// used). An earlier renewal of `old` never used is dropped: one waits at a time.
    pub fn add_renewal(&self, fingerprint: &str, node: &str, old: &str, issued: i64, expires: i64) -> Result<()> {
        self.tx(|c| {
            c.execute("DELETE FROM certificates WHERE replaces = ?1 AND node = ?2", params![old, node])?;
            c.execute(
                "INSERT INTO certificates (fingerprint, node, issued, expires, replaces) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![fingerprint, node, issued, expires, old],
            )?;
            Ok(())
        })
    }

    /// The renewed certificate `fingerprint` is in use: the one it replaced is revoked.
    pub fn renewal_used(&self, fingerprint: &str, now: i64) -> Result<()> {
        self.tx(|c| {
            c.execute(
                "UPDATE certificates SET revoked = ?2
                 WHERE revoked IS NULL AND fingerprint = (SELECT replaces FROM certificates WHERE fingerprint = ?1)",
                params![fingerprint, now],
            )?;
            c.execute("UPDATE certificates SET replaces = NULL WHERE fingerprint = ?1", params![fingerprint])?;
            Ok(())
        })
    }

    pub fn add_token(&self, sha256: &str, pattern: &str, now: i64, expires: i64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO tokens (sha256, pattern, created, expires) VALUES (?1, ?2, ?3, ?4)",
                params![sha256, pattern, now, expires],
            )
            .map(drop)
        })
    }

    /// Spends a token for `node`: it must exist, be unused, unexpired, and its pattern must
    /// match. Returns why not, when it cannot be spent. Spent by one conditional update, so
    /// that two servers asked at once never both spend it.
    pub fn spend_token(
        &self,
        sha256: &str,
        node: &str,
        now: i64,
        matches: impl Fn(&str, &str) -> bool,
    ) -> Result<Result<(), String>> {
        self.with(|c| {
            let row = c.one("SELECT pattern, expires, used_by FROM tokens WHERE sha256 = ?1", params![sha256])?;
            let row = row.map(|r| Ok::<_, anyhow::Error>((r.text(0)?, r.int(1)?, r.opt_text(2)?))).transpose()?;
            Ok(match row {
                None => Err("the token is not known".to_string()),
                Some((_, _, Some(by))) => Err(format!("the token was already used (by {by})")),
                Some((_, expires, None)) if expires <= now => Err("the token has expired".to_string()),
                Some((pattern, _, None)) if !matches(&pattern, node) => {
                    Err(format!("the token is for `{pattern}`, not `{node}`"))
                }
                Some(_) => {
                    let spent = c.execute(
                        "UPDATE tokens SET used_by = ?2, used_at = ?3 WHERE sha256 = ?1 AND used_by IS NULL",
                        params![sha256, node, now],
                    )?;
                    if spent == 1 { Ok(()) } else { Err("the token was already used".to_string()) }
                }
            })
        })
    }

    /// Records an enrollment request waiting for approval, or says what became of it. The
    /// first key to ask for a name keeps the request: another key asking for the same name is
    /// refused (never replaces it) until an operator rejects the first. Old requests expire,
    /// and at most [`MAX_PENDING`] wait.
    pub fn pending(&self, node: &str, public_key: &str, fingerprint: &str, address: &str, now: i64) -> Result<Pending> {
        self.tx(|c| {
            c.execute("DELETE FROM pending WHERE requested < ?1", params![now - PENDING_TTL])?;
            let existing = c.one("SELECT public_key, fingerprint, approved FROM pending WHERE node = ?1", params![node])?;
            let existing =
                existing.map(|r| Ok::<_, anyhow::Error>((r.text(0)?, r.opt_text(1)?, r.opt_int(2)?))).transpose()?;
            Ok(match existing {
                Some((key, _, approved)) if key == public_key => {
                    if approved.is_some() { Pending::Approved } else { Pending::Waiting }
                }
                Some((_, other, _)) => Pending::Refused(format!(
                    "another enrollment request for {node} is waiting (key {}): an operator must reject it first \
                     (converge-server node reject {node})",
                    other.as_deref().unwrap_or("unknown")
                )),
                None => {
                    let waiting = c.number("SELECT COUNT(*) FROM pending", params![])?;
                    if waiting >= MAX_PENDING {
                        Pending::Refused(format!(
                            "{waiting} enrollment requests are waiting already: an operator must approve or reject \
                             some first (converge-server node list)"
                        ))
                    } else {
                        // Another server may record the same name at the same instant: the
                        // first row stays, and the key that lost is told so.
                        let added = c.execute(
                            "INSERT INTO pending (node, public_key, requested, fingerprint, address) VALUES (?1, ?2, ?3, ?4, ?5)
                             ON CONFLICT(node) DO NOTHING",
                            params![node, public_key, now, fingerprint, address],
                        )?;
                        if added == 1 {
                            Pending::Waiting
                        } else {
                            Pending::Refused(format!("another enrollment request for {node} arrived at the same time"))
                        }
                    }
                }
            })
        })
    }

    /// Approves the waiting request for `node` whose key has the fingerprint `key` (the whole
    /// `sha256:HEX`, or at least its first 16 hex digits). Returns the whole fingerprint
    /// approved, or why nothing was.
    pub fn approve(&self, node: &str, key: &str, now: i64) -> Result<Result<String, String>> {
        let want = key.trim().trim_start_matches("sha256:").to_ascii_lowercase();
        if want.len() < 16 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Err(format!(
                "--key {key}: give the key's fingerprint as converge-server node list shows it (sha256: and at least 16 hex digits)"
            )));
        }
        self.with(|c| {
            let row = c.one(
                "SELECT fingerprint FROM pending WHERE node = ?1 AND requested >= ?2",
                params![node, now - PENDING_TTL],
            )?;
            Ok(match row {
                None => Err(format!("no enrollment request from {node} is waiting (converge-server node list shows them)")),
                Some(r) => {
                    let fp = r.opt_text(0)?.unwrap_or_default();
                    if fp.trim_start_matches("sha256:").starts_with(&want) {
                        c.execute("UPDATE pending SET approved = ?2 WHERE node = ?1", params![node, now])?;
                        Ok(fp)
                    } else {
                        Err(format!(
                            "the request waiting for {node} is from key {fp}, not {key}: do not approve it unless that is \
                             the key the host printed (converge-server node reject {node} removes it)"
                        ))
                    }
                }
            })
        })
    }

    /// Removes the waiting request for `node`; false when there was none.
    pub fn reject(&self, node: &str) -> Result<bool> {
        self.with(|c| Ok(c.execute("DELETE FROM pending WHERE node = ?1", params![node])? > 0))
    }

    pub fn pending_list(&self, now: i64) -> Result<Vec<PendingRow>> {
        self.with(|c| {
            c.query(PENDING, params![now - PENDING_TTL])?
                .iter()
                .map(|r| {
                    Ok(PendingRow {
                        node: r.text(0)?,
                        requested: r.int(1)?,
                        approved: r.bool(2)?,
                        fingerprint: r.opt_text(3)?.unwrap_or_default(),
                        address: r.opt_text(4)?.unwrap_or_default(),
                    })
                })
                .collect()
        })
    }

    pub fn stored(&self, node: &str) -> Result<Option<Stored>> {
        self.with(|c| {
            c.one(
                "SELECT serial, resources_sha256, cache_key, etag, issued_at, envelope, epoch FROM catalogs WHERE node = ?1",
                params![node],
            )?
            .map(|r| {
                Ok(Stored {
                    serial: r.int(0)? as u64,
                    resources_sha256: r.text(1)?,
                    cache_key: r.text(2)?,
                    etag: r.text(3)?,
                    issued_at: r.int(4)?,
                    envelope: r.bytes(5)?,
                    epoch: r.int(6)?,
                })
            })
            .transpose()
        })
    }

    /// Stores `s` as the catalog of `node` if the stored one is still `previous` (its etag;
    /// `None`: there was none), and is of no later commit: returns false, storing nothing,
    /// when another server stored one meanwhile (the caller reads it and serves it). Serials
    /// stay monotonic per node, whichever server compiles.
    pub fn store_catalog(&self, node: &str, s: &Stored, previous: Option<&str>) -> Result<bool> {
        let values = params![
            node,
            s.serial as i64,
            &s.resources_sha256,
            &s.cache_key,
            &s.etag,
            s.issued_at,
            &s.envelope[..],
            s.epoch,
            previous
        ];
        self.with(|c| {
            let n = match previous {
                None => c.execute(
                    "INSERT INTO catalogs (node, serial, resources_sha256, cache_key, etag, issued_at, envelope, epoch, compile_error)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL) ON CONFLICT(node) DO NOTHING",
                    &values[..8],
                )?,
                Some(_) => c.execute(
                    "UPDATE catalogs SET serial = ?2, resources_sha256 = ?3, cache_key = ?4, etag = ?5, issued_at = ?6,
                         envelope = ?7, epoch = ?8, compile_error = NULL
                     WHERE node = ?1 AND etag = ?9 AND epoch <= ?8",
                    values,
                )?,
            };
            Ok(n == 1)
        })
    }

    /// Notes a compile failure for the fleet page (the last good catalog stays served).
    pub fn compile_failed(&self, node: &str, error: &str) -> Result<()> {
        self.with(|c| {
            c.execute("UPDATE catalogs SET compile_error = ?2 WHERE node = ?1", params![node, error]).map(drop)
        })
    }

    /// The commit the servers agree is current, and its epoch (a number that grows with each
    /// new agreement): `None` before any server proposed one.
    pub fn agreed(&self) -> Result<Option<(i64, String)>> {
        self.with(|c| {
            c.one("SELECT epoch, commit_id FROM agreed WHERE id = 1", params![])?
                .map(|r| Ok((r.int(0)?, r.text(1)?)))
                .transpose()
        })
    }

    /// Proposes `commit` as current, in place of the agreement at `epoch` (0: none yet): true
    /// when it became current, false when another server changed the agreement first.
    pub fn propose(&self, epoch: i64, commit: &str, by: &str, now: i64) -> Result<bool> {
        self.with(|c| {
            let n = if epoch == 0 {
                c.execute(
                    "INSERT INTO agreed (id, epoch, commit_id, since, proposed_by) VALUES (1, 1, ?1, ?2, ?3)
                     ON CONFLICT(id) DO NOTHING",
                    params![commit, now, by],
                )?
            } else {
                c.execute(
                    "UPDATE agreed SET epoch = epoch + 1, commit_id = ?2, since = ?3, proposed_by = ?4
                     WHERE id = 1 AND epoch = ?1",
                    params![epoch, commit, now, by],
                )?
            };
            Ok(n == 1)
        })
    }

    /// Records that nodes were seen, with their facts when these changed: on the embedded
    /// file one transaction of an update per node; on PostgreSQL one statement for the whole
    /// batch (a round trip per second, not one per poll).
    pub fn seen(&self, batch: &[Visit]) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        if self.pg().is_some() {
            let rows: Vec<serde_json::Value> = batch
                .iter()
                .map(|v| {
                    serde_json::json!({
                        "name": v.node, "at": v.at, "version": v.version, "ca_bundle": v.ca_bundle,
                        "keys_version": v.keys_version, "facts": v.facts.as_ref().map(|f| &f.0),
                        "facts_sha256": v.facts.as_ref().map(|f| &f.1), "paused": v.paused,
                    })
                })
                .collect();
            return self.with(|c| {
                c.execute(
                    "UPDATE nodes SET last_seen = v.at, agent_version = v.version,
                         ca_bundle = COALESCE(v.ca_bundle, nodes.ca_bundle),
                         keys_version = COALESCE(v.keys_version, nodes.keys_version),
                         facts = COALESCE(v.facts, nodes.facts), facts_sha256 = COALESCE(v.facts_sha256, nodes.facts_sha256),
                         paused = v.paused
                     FROM jsonb_to_recordset(CAST(?1 AS TEXT)::jsonb) AS v(name TEXT, at BIGINT, version TEXT,
                         ca_bundle TEXT, keys_version BIGINT, facts TEXT, facts_sha256 TEXT, paused TEXT)
                     WHERE nodes.name = v.name",
                    params![serde_json::Value::Array(rows).to_string()],
                )
                .map(drop)
            });
        }
        self.tx(|c| {
            for v in batch {
                c.execute(
                    "UPDATE nodes SET last_seen = ?2, agent_version = ?3, ca_bundle = COALESCE(?4, ca_bundle),
                         keys_version = COALESCE(?5, keys_version), paused = ?6 WHERE name = ?1",
                    params![
                        &v.node,
                        v.at,
                        &v.version,
                        v.ca_bundle.as_deref(),
                        v.keys_version.map(|k| k as i64),
                        v.paused.as_deref()
                    ],
                )?;
                if let Some((json, sha)) = &v.facts {
                    c.execute(
                        "UPDATE nodes SET facts = ?2, facts_sha256 = ?3 WHERE name = ?1",
                        params![&v.node, json, sha],
                    )?;
                }
            }
            Ok(())
        })
    }

    /// Stores a report; of the node's reports, the newest `per_node` are kept. A report
    /// already stored (the same bytes from the same node: an agent that sent it to a server
    /// that stored it and fell before answering, then sent it to another) is stored once.
    pub fn add_report(&self, r: &ReportRow, per_node: i64) -> Result<()> {
        let body_sha256 = converge_modules::hash::sha256_hex(r.body.as_bytes());
        let add = || {
            self.tx(|c| {
                let added = c.execute(
                    "INSERT INTO reports (node, received, changed, failed, stale, serial, body, commit_id, digest, dry_run, body_sha256)
                     SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11
                     WHERE NOT EXISTS (SELECT 1 FROM reports WHERE node = ?1 AND body_sha256 = ?11)",
                    params![
                        r.node,
                        r.at,
                        r.changed,
                        r.failed,
                        r.stale,
                        r.serial.map(|s| s as i64),
                        r.body,
                        r.commit,
                        r.digest,
                        r.dry_run,
                        &body_sha256
                    ],
                )?;
                if added == 0 {
                    return Ok(());
                }
                if r.dry_run {
                    c.execute("UPDATE nodes SET dry_run_changed = ?2 WHERE name = ?1", params![r.node, r.changed])?;
                } else {
                    c.execute(
                        "UPDATE nodes SET run_at = ?2, run_changed = ?3, run_failed = ?4, run_stale = ?5,
                             run_commit_since = CASE WHEN run_commit IS NOT DISTINCT FROM ?6 THEN run_commit_since ELSE ?2 END,
                             run_commit = ?6, run_unplanned = ?7, dry_run_changed = NULL WHERE name = ?1",
                        params![r.node, r.at, r.changed, r.failed, r.stale, r.commit, r.unplanned],
                    )?;
                }
                c.execute(
                    "DELETE FROM reports WHERE node = ?1 AND id NOT IN (SELECT id FROM reports WHERE node = ?1 ORDER BY id DESC LIMIT ?2)",
                    params![r.node, per_node],
                )?;
                Ok(())
            })
        };
        match (add(), self.pg()) {
            // PostgreSQL keeps reports in daily partitions made ahead of time: a day without one
            // (a server down for a week) gets it now.
            (Err(e), Some(pg)) if format!("{e:#}").contains("no partition") => {
                pg.make_partition(r.at)?;
                add()
            }
            (result, _) => result,
        }
    }

    /// Retention: the reports received before `before` go. On the embedded file they are
    /// deleted `batch` at a time (each its own short transaction, so that reports arriving
    /// meanwhile never wait long); on PostgreSQL the daily partitions wholly before it are
    /// dropped, and the days ahead made. Returns what went: rows, or partitions by name.
    pub fn prune_reports(&self, before: i64, batch: i64, now: i64) -> Result<Pruned> {
        if let Some(pg) = self.pg() {
            return Ok(Pruned::Partitions(pg.prune_partitions(before, now)?));
        }
        let mut total = 0;
        loop {
            let n = self.with(|c| {
                c.execute(
                    "DELETE FROM reports WHERE id IN (SELECT id FROM reports WHERE received < ?1 ORDER BY id LIMIT ?2)",
                    params![before, batch],
                )
            })?;
            total += n as usize;
            if (n as i64) < batch {
                return Ok(Pruned::Rows(total));
            }
        }
    }

    /// Every node with its certificate, catalog and last report.
    pub fn nodes(&self) -> Result<Vec<NodeRow>> {
        self.node_rows(None)
    }

    /// One node's row, or every node's (`None`).
    pub fn node_rows(&self, only: Option<&str>) -> Result<Vec<NodeRow>> {
        self.with(|c| {
            c.query(NODE_ROWS, params![only])?
                .iter()
                .map(|r| {
                    let report = match r.opt_int(6)? {
                        Some(at) => Some((at, r.int(7)?, r.int(8)?, r.bool(9)?)),
                        None => None,
                    };
                    Ok(NodeRow {
                        name: r.text(0)?,
                        last_seen: r.opt_int(1)?,
                        cert_expires: r.opt_int(2)?,
                        revoked: r.bool(3)?,
                        serial: r.opt_int(4)?.map(|s| s as u64),
                        compile_error: r.opt_text(5)?,
                        last_report: report,
                        last_commit: r.opt_text(10)?,
                        agent_version: r.opt_text(11)?,
                        dry_run_pending: r.opt_int(12)?,
                        paused: r.opt_text(13)?,
                    })
                })
                .collect()
        })
    }

    /// One node, with its facts.
    pub fn node(&self, name: &str) -> Result<Option<NodeInfo>> {
        let Some(row) = self.node_rows(Some(name))?.pop() else { return Ok(None) };
        let Some(r) =
            self.with(|c| c.one("SELECT created, agent_version, facts FROM nodes WHERE name = ?1", params![name]))?
        else {
            return Ok(None);
        };
        Ok(Some(NodeInfo { row, created: r.int(0)?, agent_version: r.opt_text(1)?, facts: r.opt_text(2)? }))
    }

    /// Reports, newest first.
    pub fn reports(&self, f: &ReportFilter) -> Result<Vec<StoredReport>> {
        self.with(|c| {
            c.query(REPORTS, params![f.node.as_deref(), f.failed, f.since, f.limit.max(1), f.bodies])?
                .iter()
                .map(stored_report)
                .collect()
        })
    }

    pub fn report(&self, id: i64) -> Result<Option<StoredReport>> {
        self.with(|c| {
            c.one(
                "SELECT id, node, received, changed, failed, stale, serial, commit_id, body, digest, dry_run FROM reports WHERE id = ?1",
                params![id],
            )?
            .as_ref()
            .map(stored_report)
            .transpose()
        })
    }

    /// Adds an operator token (by its hash) for the fleet page.
    pub fn add_operator(&self, sha256: &str, now: i64, expires: i64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO operators (sha256, created, expires) VALUES (?1, ?2, ?3)",
                params![sha256, now, expires],
            )
            .map(drop)
        })
    }

    pub fn is_operator(&self, sha256: &str, now: i64) -> Result<bool> {
        self.with(|c| c.exists("SELECT 1 FROM operators WHERE sha256 = ?1 AND expires > ?2", params![sha256, now]))
    }

    /// For a CA rollover: every node with a live certificate, the bundle hash it last said it
    /// trusts, and the issue time of its newest live certificate.
    pub fn trust_of_nodes(&self, now: i64) -> Result<Vec<(String, Option<String>, i64)>> {
        self.with(|c| {
            c.query(
                "SELECT n.name, n.ca_bundle, MAX(k.issued) FROM nodes n
                 JOIN certificates k ON k.node = n.name AND k.revoked IS NULL AND k.expires > ?1
                 GROUP BY n.name, n.ca_bundle ORDER BY n.name",
                params![now],
            )?
            .iter()
            .map(|r| Ok((r.text(0)?, r.opt_text(1)?, r.int(2)?)))
            .collect()
        })
    }

    /// Nodes with a live certificate by the key-list version they last said they hold
    /// (`None`: not said yet).
    pub fn keys_versions(&self, now: i64) -> Result<Vec<(Option<u64>, i64)>> {
        self.with(|c| {
            c.query(
                "SELECT n.keys_version, COUNT(*) FROM nodes n WHERE EXISTS
                   (SELECT 1 FROM certificates k WHERE k.node = n.name AND k.revoked IS NULL AND k.expires > ?1)
                 GROUP BY n.keys_version ORDER BY n.keys_version",
                params![now],
            )?
            .iter()
            .map(|r| Ok((r.opt_int(0)?.map(|v| v as u64), r.int(1)?)))
            .collect()
        })
    }

    /// The rollout of `commit`, if one began.
    pub fn rollout(&self, commit: &str) -> Result<Option<crate::rollout::Progress>> {
        self.with(|c| {
            c.one(
                "SELECT commit_id, previous, wave, since, state, reason FROM rollouts WHERE commit_id = ?1",
                params![commit],
            )?
            .map(|r| progress_of(&r))
            .transpose()
        })
    }

    /// Begins the rollout `p`, over `waves` waves, unless one of its commit began already
    /// (another server's).
    pub fn start_rollout(&self, p: &crate::rollout::Progress, waves: usize, now: i64) -> Result<bool> {
        let (state, reason) = state_columns(&p.state);
        self.with(|c| {
            let n = c.execute(
                "INSERT INTO rollouts (commit_id, previous, waves, wave, since, state, reason, started)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT(commit_id) DO NOTHING",
                params![&p.commit, p.previous.as_deref(), waves as i64, p.wave as i64, p.since, state, reason, now],
            )?;
            Ok(n == 1)
        })
    }

    /// Moves the rollout from `old` to `new` unless it moved meanwhile (another server, an
    /// operator): true when this call moved it.
    pub fn advance_rollout(&self, old: &crate::rollout::Progress, new: &crate::rollout::Progress) -> Result<bool> {
        let (state, reason) = state_columns(&new.state);
        self.with(|c| {
            let n = c.execute(
                "UPDATE rollouts SET wave = ?2, since = ?3, state = ?4, reason = ?5
                 WHERE commit_id = ?1 AND wave = ?6 AND state = ?7",
                params![&new.commit, new.wave as i64, new.since, state, reason, old.wave as i64, old.state.word()],
            )?;
            Ok(n == 1)
        })
    }

    /// The commit every host has: that of the newest rollout, other than `commit`'s, whose last
    /// wave is open (done, or halted or soaking there).
    pub fn last_rolled_out(&self, commit: &str) -> Result<Option<String>> {
        self.with(|c| {
            c.one(
                "SELECT commit_id FROM rollouts WHERE commit_id <> ?1 AND (state = 'done' OR wave + 1 >= waves)
                 ORDER BY started DESC, commit_id LIMIT 1",
                params![commit],
            )?
            .map(|r| r.text(0))
            .transpose()
        })
    }

    /// What each node with a live certificate last ran.
    pub fn host_runs(&self, now: i64) -> Result<Vec<crate::rollout::HostRun>> {
        self.with(|c| {
            c.query(
                "SELECT n.name, n.run_commit, n.run_at, n.run_failed, n.run_unplanned, n.run_commit_since FROM nodes n WHERE EXISTS
                   (SELECT 1 FROM certificates k WHERE k.node = n.name AND k.revoked IS NULL AND k.expires > ?1)",
                params![now],
            )?
            .iter()
            .map(|r| {
                Ok(crate::rollout::HostRun {
                    name: r.text(0)?,
                    commit: r.opt_text(1)?,
                    at: r.opt_int(2)?,
                    failed: r.opt_int(3)?.unwrap_or(0),
                    unplanned: r.opt_int(4)?.unwrap_or(0),
                    since: r.opt_int(5)?,
                })
            })
            .collect()
        })
    }

    pub fn count_nodes(&self) -> Result<i64> {
        self.with(|c| c.number("SELECT COUNT(*) FROM nodes", params![]))
    }
}

/// A rollout's state as its two columns: the word, and the reason of a halt.
fn state_columns(s: &crate::rollout::State) -> (&'static str, Option<&str>) {
    match s {
        crate::rollout::State::Halted(why) => ("halted", Some(why.as_str())),
        other => (other.word(), None),
    }
}

fn progress_of(r: &Row) -> Result<crate::rollout::Progress> {
    use crate::rollout::State;
    let state = match r.text(4)?.as_str() {
        "rolling" => State::Rolling,
        "done" => State::Done,
        "halted" => State::Halted(r.opt_text(5)?.unwrap_or_default()),
        other => bail!("the state database holds a rollout in state {other:?}, which no version writes"),
    };
    let wave = r.int(2)?;
    Ok(crate::rollout::Progress {
        commit: r.text(0)?,
        previous: r.opt_text(1)?,
        wave: usize::try_from(wave)
            .map_err(|_| anyhow::anyhow!("the state database holds a rollout at wave {wave}"))?,
        since: r.int(3)?,
        state,
    })
}

/// What retention removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pruned {
    /// Reports deleted from the embedded file.
    Rows(usize),
    /// Daily partitions dropped in PostgreSQL.
    Partitions(Vec<String>),
}

/// How far back a server looks for certificates another process issued or revoked: a
/// transaction that commits late, or a clock a little behind another server's, is still seen.
pub const CERT_LOOKBACK: i64 = 120;

/// A certificate from the columns node, issued, expires, revoked, replaces (from `at`).
fn cert_of(r: &Row, at: usize) -> Result<Cert> {
    Ok(Cert {
        node: r.text(at)?,
        issued: r.int(at + 1)?,
        expires: r.int(at + 2)?,
        revoked: r.opt_int(at + 3)?,
        replaces: r.opt_text(at + 4)?,
    })
}

/// Fails unless `path` is a state directory made by `init`.
pub fn require_state(dir: &Path) -> Result<()> {
    if !dir.join("state.db").exists() {
        bail!("{} is not a converge-server state directory (run `converge-server init` first)", dir.display());
    }
    Ok(())
}

fn stored_report(r: &Row) -> Result<StoredReport> {
    Ok(StoredReport {
        id: r.int(0)?,
        node: r.text(1)?,
        received: r.int(2)?,
        changed: r.int(3)?,
        failed: r.int(4)?,
        stale: r.bool(5)?,
        serial: r.opt_int(6)?.map(|s| s as u64),
        commit: r.opt_text(7)?,
        body: r.text(8)?,
        digest: r.opt_text(9)?,
        dry_run: r.bool(10)?,
    })
}

/// Now, as the store records times.
pub fn now() -> i64 {
    Timestamp::now().0
}
