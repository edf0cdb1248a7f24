//! The server's state: one SQLite file (WAL) holding nodes, their certificates, enrollment
//! tokens and requests, the last catalog of each node, and reports.
//!
//! Certificates are known by the SHA-256 of their DER: the server issued every client
//! certificate it accepts, so a fingerprint names its node without parsing X.509, and
//! revocation is a column read on every request (a deny list that cannot expire like a CRL).
//! Tokens are stored hashed. Connections come from a small pool; each call holds one briefly.

use anyhow::{Context, Result, bail};
use converge_modules::time::Timestamp;
use rusqlite::{Connection, OptionalExtension, params};
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

/// Every node with its certificate, catalog, last report and pending dry-run (`?1`: one node's
/// name, or NULL for all); the same text serves both engines (the casts tell PostgreSQL a
/// parameter's type where it cannot see it).
pub(crate) const NODE_ROWS: &str = "SELECT n.name, n.last_seen,
    (SELECT MAX(expires) FROM certificates WHERE node = n.name AND revoked IS NULL),
    NOT EXISTS (SELECT 1 FROM certificates WHERE node = n.name AND revoked IS NULL),
    k.serial, k.compile_error,
    r.received, r.changed, r.failed, r.stale, r.commit_id, n.agent_version,
    (SELECT d.changed FROM reports d WHERE d.node = n.name AND d.dry_run AND d.id > COALESCE(r.id, 0)
     ORDER BY d.id DESC LIMIT 1)
 FROM nodes n
 LEFT JOIN catalogs k ON k.node = n.name
 LEFT JOIN reports r ON r.id = (SELECT MAX(id) FROM reports WHERE node = n.name AND NOT dry_run)
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

pub struct Db {
    pool: Vec<Mutex<Connection>>,
    next: AtomicUsize,
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
}

impl Db {
    /// Opens (creating) the store at `path` with `size` connections.
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
                        .exists(params![column])?;
                    if !has {
                        c.execute_batch(&schema::add_column(Engine::Sqlite, table, column, def))
                            .with_context(|| format!("cannot add {table}.{column} to the state database"))?;
                    }
                }
            }
            pool.push(Mutex::new(c));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        Ok(Db { pool, next: AtomicUsize::new(0) })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len();
        let mut c = self.pool[i].lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&mut c)?)
    }

    pub fn cert(&self, fingerprint: &str) -> Result<Option<Cert>> {
        self.with(|c| {
            c.prepare_cached(
                "SELECT node, issued, expires, revoked, replaces FROM certificates WHERE fingerprint = ?1",
            )?
            .query_row(params![fingerprint], |r| {
                Ok(Cert {
                    node: r.get(0)?,
                    issued: r.get(1)?,
                    expires: r.get(2)?,
                    revoked: r.get(3)?,
                    replaces: r.get(4)?,
                })
            })
            .optional()
        })
    }

    /// Certificates issued (rowid above `after`) or revoked (at `revoked_since` or later) since
    /// the last look: (rowid, fingerprint, certificate). With `after` 0, every certificate.
    pub fn certs_changed(&self, after: i64, revoked_since: i64) -> Result<Vec<(i64, String, Cert)>> {
        self.with(|c| {
            let mut s = c.prepare_cached(
                "SELECT rowid, fingerprint, node, issued, expires, revoked, replaces FROM certificates
                 WHERE rowid > ?1 OR revoked >= ?2",
            )?;
            s.query_map(params![after, revoked_since], |r| {
                let cert = Cert {
                    node: r.get(2)?,
                    issued: r.get(3)?,
                    expires: r.get(4)?,
                    revoked: r.get(5)?,
                    replaces: r.get(6)?,
                };
                Ok((r.get(0)?, r.get(1)?, cert))
            })?
            .collect()
        })
    }

    /// Whether `node` has a certificate that is neither revoked nor expired.
    pub fn live_cert(&self, node: &str, now: i64) -> Result<bool> {
        self.with(|c| {
            c.prepare_cached("SELECT 1 FROM certificates WHERE node = ?1 AND revoked IS NULL AND expires > ?2 LIMIT 1")?
                .exists(params![node, now])
        })
    }

    pub fn add_cert(&self, fingerprint: &str, node: &str, issued: i64, expires: i64) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO nodes (name, created) VALUES (?1, ?2) ON CONFLICT(name) DO NOTHING",
                params![node, issued],
            )?;
            tx.execute(
                "INSERT INTO certificates (fingerprint, node, issued, expires) VALUES (?1, ?2, ?3, ?4)",
                params![fingerprint, node, issued, expires],
            )?;
            tx.execute("DELETE FROM pending WHERE node = ?1", params![node])?;
            tx.commit()
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
            c.prepare_cached("SELECT seal_key FROM nodes WHERE name = ?1")?
                .query_row(params![node], |r| r.get::<_, Option<String>>(0))
                .optional()
                .map(Option::flatten)
        })
    }

    /// Revokes every certificate of `node`; returns how many.
    pub fn revoke(&self, node: &str, now: i64) -> Result<usize> {
        self.with(|c| {
            c.execute("UPDATE certificates SET revoked = ?2 WHERE node = ?1 AND revoked IS NULL", params![node, now])
        })
    }

    /// Revokes every live certificate issued before `before` (those of a retired CA); returns
    /// the nodes they were for.
    pub fn revoke_issued_before(&self, before: i64, now: i64) -> Result<Vec<String>> {
        self.with(|c| {
            let tx = c.transaction()?;
            let nodes: Vec<String> = tx
                .prepare("SELECT DISTINCT node FROM certificates WHERE revoked IS NULL AND issued < ?1 ORDER BY node")?
                .query_map(params![before], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            tx.execute(
                "UPDATE certificates SET revoked = ?2 WHERE revoked IS NULL AND issued < ?1",
                params![before, now],
            )?;
            tx.commit()?;
            Ok(nodes)
        })
    }

    /// A renewed certificate for `node`, replacing `old` (still live until the new one is
    /// used). An earlier renewal of `old` never used is dropped: one waits at a time.
    pub fn add_renewal(&self, fingerprint: &str, node: &str, old: &str, issued: i64, expires: i64) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM certificates WHERE replaces = ?1 AND node = ?2", params![old, node])?;
            tx.execute(
                "INSERT INTO certificates (fingerprint, node, issued, expires, replaces) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![fingerprint, node, issued, expires, old],
            )?;
            tx.commit()
        })
    }

    /// The renewed certificate `fingerprint` is in use: the one it replaced is revoked.
    pub fn renewal_used(&self, fingerprint: &str, now: i64) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "UPDATE certificates SET revoked = ?2
                 WHERE revoked IS NULL AND fingerprint = (SELECT replaces FROM certificates WHERE fingerprint = ?1)",
                params![fingerprint, now],
            )?;
            tx.execute("UPDATE certificates SET replaces = NULL WHERE fingerprint = ?1", params![fingerprint])?;
            tx.commit()
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
    /// match. Returns why not, when it cannot be spent.
    pub fn spend_token(
        &self,
        sha256: &str,
        node: &str,
        now: i64,
        matches: impl Fn(&str, &str) -> bool,
    ) -> Result<Result<(), String>> {
        self.with(|c| {
            let tx = c.transaction()?;
            let row: Option<(String, i64, Option<String>)> = tx
                .query_row("SELECT pattern, expires, used_by FROM tokens WHERE sha256 = ?1", params![sha256], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()?;
            let verdict = match row {
                None => Err("the token is not known".to_string()),
                Some((_, _, Some(by))) => Err(format!("the token was already used (by {by})")),
                Some((_, expires, None)) if expires <= now => Err("the token has expired".to_string()),
                Some((pattern, _, None)) if !matches(&pattern, node) => {
                    Err(format!("the token is for `{pattern}`, not `{node}`"))
                }
                Some(_) => {
                    tx.execute(
                        "UPDATE tokens SET used_by = ?2, used_at = ?3 WHERE sha256 = ?1",
                        params![sha256, node, now],
                    )?;
                    Ok(())
                }
            };
            tx.commit()?;
            Ok(verdict)
        })
    }

    /// Records an enrollment request waiting for approval, or says what became of it. The
    /// first key to ask for a name keeps the request: another key asking for the same name is
    /// refused (never replaces it) until an operator rejects the first. Old requests expire,
    /// and at most [`MAX_PENDING`] wait.
    pub fn pending(&self, node: &str, public_key: &str, fingerprint: &str, address: &str, now: i64) -> Result<Pending> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM pending WHERE requested < ?1", params![now - PENDING_TTL])?;
            let existing: Option<(String, Option<String>, Option<i64>)> = tx
                .query_row("SELECT public_key, fingerprint, approved FROM pending WHERE node = ?1", params![node], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()?;
            let verdict = match existing {
                Some((key, _, approved)) if key == public_key => {
                    if approved.is_some() { Pending::Approved } else { Pending::Waiting }
                }
                Some((_, other, _)) => Pending::Refused(format!(
                    "another enrollment request for {node} is waiting (key {}): an operator must reject it first \
                     (converge-server node reject {node})",
                    other.as_deref().unwrap_or("unknown")
                )),
                None => {
                    let waiting: i64 = tx.query_row("SELECT COUNT(*) FROM pending", [], |r| r.get(0))?;
                    if waiting >= MAX_PENDING {
                        Pending::Refused(format!(
                            "{waiting} enrollment requests are waiting already: an operator must approve or reject \
                             some first (converge-server node list)"
                        ))
                    } else {
                        tx.execute(
                            "INSERT INTO pending (node, public_key, requested, fingerprint, address) VALUES (?1, ?2, ?3, ?4, ?5)",
                            params![node, public_key, now, fingerprint, address],
                        )?;
                        Pending::Waiting
                    }
                }
            };
            tx.commit()?;
            Ok(verdict)
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
            let row: Option<Option<String>> = c
                .query_row("SELECT fingerprint FROM pending WHERE node = ?1 AND requested >= ?2", params![node, now - PENDING_TTL], |r| {
                    r.get(0)
                })
                .optional()?;
            Ok(match row {
                None => Err(format!("no enrollment request from {node} is waiting (converge-server node list shows them)")),
                Some(fp) => {
                    let fp = fp.unwrap_or_default();
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
            let mut s = c.prepare(PENDING)?;
            s.query_map(params![now - PENDING_TTL], |r| {
                Ok(PendingRow {
                    node: r.get(0)?,
                    requested: r.get(1)?,
                    approved: r.get(2)?,
                    fingerprint: r.get::<_, Option<String>>(3)?.unwrap_or_default(),
                    address: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
                })
            })?
            .collect()
        })
    }

    pub fn stored(&self, node: &str) -> Result<Option<Stored>> {
        self.with(|c| {
            c.prepare_cached(
                "SELECT serial, resources_sha256, cache_key, etag, issued_at, envelope FROM catalogs WHERE node = ?1",
            )?
            .query_row(params![node], |r| {
                Ok(Stored {
                    serial: r.get::<_, i64>(0)? as u64,
                    resources_sha256: r.get(1)?,
                    cache_key: r.get(2)?,
                    etag: r.get(3)?,
                    issued_at: r.get(4)?,
                    envelope: r.get(5)?,
                })
            })
            .optional()
        })
    }

    pub fn store(&self, node: &str, s: &Stored) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO catalogs (node, serial, resources_sha256, cache_key, etag, issued_at, envelope, compile_error)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL)
                 ON CONFLICT(node) DO UPDATE SET serial = ?2, resources_sha256 = ?3, cache_key = ?4, etag = ?5,
                     issued_at = ?6, envelope = ?7, compile_error = NULL",
                params![node, s.serial as i64, s.resources_sha256, s.cache_key, s.etag, s.issued_at, s.envelope],
            )
            .map(drop)
        })
    }

    /// Notes a compile failure for the fleet page (the last good catalog stays served).
    pub fn compile_failed(&self, node: &str, error: &str) -> Result<()> {
        self.with(|c| {
            c.execute("UPDATE catalogs SET compile_error = ?2 WHERE node = ?1", params![node, error]).map(drop)
        })
    }

    /// Records that nodes were seen, with their facts when these changed (one transaction).
    pub fn seen(&self, batch: &[Visit]) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.with(|c| {
            let tx = c.transaction()?;
            {
                let mut seen = tx.prepare_cached(
                    "UPDATE nodes SET last_seen = ?2, agent_version = ?3, ca_bundle = COALESCE(?4, ca_bundle),
                         keys_version = COALESCE(?5, keys_version) WHERE name = ?1",
                )?;
                let mut facts = tx.prepare_cached("UPDATE nodes SET facts = ?2, facts_sha256 = ?3 WHERE name = ?1")?;
                for v in batch {
                    seen.execute(params![v.node, v.at, v.version, v.ca_bundle, v.keys_version.map(|k| k as i64)])?;
                    if let Some((json, sha)) = &v.facts {
                        facts.execute(params![v.node, json, sha])?;
                    }
                }
            }
            tx.commit()
        })
    }

    /// Stores a report; of the node's reports, the newest `per_node` are kept.
    pub fn add_report(&self, r: &ReportRow, per_node: i64) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO reports (node, received, changed, failed, stale, serial, body, commit_id, digest, dry_run) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![r.node, r.at, r.changed, r.failed, r.stale, r.serial.map(|s| s as i64), r.body, r.commit, r.digest, r.dry_run],
            )?;
            tx.execute(
                "DELETE FROM reports WHERE node = ?1 AND id NOT IN (SELECT id FROM reports WHERE node = ?1 ORDER BY id DESC LIMIT ?2)",
                params![r.node, per_node],
            )?;
            tx.commit()
        })
    }

    /// Deletes the reports received before `before`, `batch` at a time (each its own short
    /// transaction, so that reports arriving meanwhile never wait long); returns how many.
    pub fn prune_reports(&self, before: i64, batch: i64) -> Result<usize> {
        let mut total = 0;
        loop {
            let n = self.with(|c| {
                c.execute(
                    "DELETE FROM reports WHERE id IN (SELECT id FROM reports WHERE received < ?1 ORDER BY id LIMIT ?2)",
                    params![before, batch],
                )
            })?;
            total += n;
            if (n as i64) < batch {
                return Ok(total);
            }
        }
    }

    /// Every node with its certificate, catalog and last report.
    pub fn nodes(&self) -> Result<Vec<NodeRow>> {
        self.node_rows(None)
    }

    fn node_rows(&self, only: Option<&str>) -> Result<Vec<NodeRow>> {
        self.with(|c| {
            let mut s = c.prepare(NODE_ROWS)?;
            s.query_map(params![only], |r| {
                let report = match r.get::<_, Option<i64>>(6)? {
                    Some(at) => Some((at, r.get(7)?, r.get(8)?, r.get(9)?)),
                    None => None,
                };
                Ok(NodeRow {
                    name: r.get(0)?,
                    last_seen: r.get(1)?,
                    cert_expires: r.get(2)?,
                    revoked: r.get(3)?,
                    serial: r.get::<_, Option<i64>>(4)?.map(|s| s as u64),
                    compile_error: r.get(5)?,
                    last_report: report,
                    last_commit: r.get(10)?,
                    agent_version: r.get(11)?,
                    dry_run_pending: r.get(12)?,
                })
            })?
            .collect()
        })
    }

    /// One node, with its facts.
    pub fn node(&self, name: &str) -> Result<Option<NodeInfo>> {
        let Some(row) = self.node_rows(Some(name))?.pop() else { return Ok(None) };
        let (created, agent_version, facts) = self.with(|c| {
            c.query_row("SELECT created, agent_version, facts FROM nodes WHERE name = ?1", params![name], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
        })?;
        Ok(Some(NodeInfo { row, created, agent_version, facts }))
    }

    /// Reports, newest first.
    pub fn reports(&self, f: &ReportFilter) -> Result<Vec<StoredReport>> {
        self.with(|c| {
            let mut s = c.prepare(REPORTS)?;
            s.query_map(params![f.node, f.failed, f.since, f.limit.max(1), f.bodies], stored_report)?.collect()
        })
    }

    pub fn report(&self, id: i64) -> Result<Option<StoredReport>> {
        self.with(|c| {
            c.query_row(
                "SELECT id, node, received, changed, failed, stale, serial, commit_id, body, digest, dry_run FROM reports WHERE id = ?1",
                params![id],
                stored_report,
            )
            .optional()
        })
    }

    /// Adds an operator token (by its hash) for the fleet page.
    pub fn add_operator(&self, sha256: &str, now: i64, expires: i64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO operators (sha256, created, expires) VALUES (?1, ?2, ?3)",
                params![sha256, now, expires],
            )
            .map(|_| ())
        })
    }

    pub fn is_operator(&self, sha256: &str, now: i64) -> Result<bool> {
        self.with(|c| {
            c.prepare_cached("SELECT 1 FROM operators WHERE sha256 = ?1 AND expires > ?2")?.exists(params![sha256, now])
        })
    }

    /// For a CA rollover: every node with a live certificate, the bundle hash it last said it
    /// trusts, and the issue time of its newest live certificate.
    pub fn trust_of_nodes(&self, now: i64) -> Result<Vec<(String, Option<String>, i64)>> {
        self.with(|c| {
            let mut s = c.prepare(
                "SELECT n.name, n.ca_bundle, MAX(k.issued) FROM nodes n
                 JOIN certificates k ON k.node = n.name AND k.revoked IS NULL AND k.expires > ?1
                 GROUP BY n.name ORDER BY n.name",
            )?;
            s.query_map(params![now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect()
        })
    }

    /// Nodes with a live certificate by the key-list version they last said they hold
    /// (`None`: not said yet).
    pub fn keys_versions(&self, now: i64) -> Result<Vec<(Option<u64>, i64)>> {
        self.with(|c| {
            let mut s = c.prepare(
                "SELECT n.keys_version, COUNT(*) FROM nodes n WHERE EXISTS
                   (SELECT 1 FROM certificates k WHERE k.node = n.name AND k.revoked IS NULL AND k.expires > ?1)
                 GROUP BY n.keys_version ORDER BY n.keys_version",
            )?;
            s.query_map(params![now], |r| Ok((r.get::<_, Option<i64>>(0)?.map(|v| v as u64), r.get(1)?)))?.collect()
        })
    }

    pub fn count_nodes(&self) -> Result<i64> {
        self.with(|c| c.query_row("SELECT COUNT(*) FROM nodes", [], |r| r.get(0)))
    }
}

/// Fails unless `path` is a state directory made by `init`.
pub fn require_state(dir: &Path) -> Result<()> {
    if !dir.join("state.db").exists() {
        bail!("{} is not a converge-server state directory (run `converge-server init` first)", dir.display());
    }
    Ok(())
}

fn stored_report(r: &rusqlite::Row) -> rusqlite::Result<StoredReport> {
    Ok(StoredReport {
        id: r.get(0)?,
        node: r.get(1)?,
        received: r.get(2)?,
        changed: r.get(3)?,
        failed: r.get(4)?,
        stale: r.get(5)?,
        serial: r.get::<_, Option<i64>>(6)?.map(|s| s as u64),
        commit: r.get(7)?,
        body: r.get(8)?,
        digest: r.get(9)?,
        dry_run: r.get(10)?,
    })
}

/// Now, as the store records times.
pub fn now() -> i64 {
    Timestamp::now().0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_single_use_bound_and_expire() {
        let t = tempfile::tempdir().unwrap();
        let db = Db::open(&t.path().join("state.db"), 2).unwrap();
        let glob = |p: &str, n: &str| crate::site::glob_match(p, n);
        db.add_token("a", "web*", 100, 200).unwrap();
        assert_eq!(db.spend_token("a", "db1", 150, glob).unwrap(), Err("the token is for `web*`, not `db1`".into()));
        assert_eq!(db.spend_token("a", "web1", 150, glob).unwrap(), Ok(()));
        assert!(db.spend_token("a", "web2", 150, glob).unwrap().unwrap_err().contains("already used"));
        db.add_token("b", "*", 100, 200).unwrap();
        assert!(db.spend_token("b", "x", 250, glob).unwrap().unwrap_err().contains("expired"));
        assert!(db.spend_token("zzz", "x", 150, glob).unwrap().unwrap_err().contains("not known"));
    }

    #[test]
    fn certificates_revocation_and_nodes() {
        let t = tempfile::tempdir().unwrap();
        let db = Db::open(&t.path().join("state.db"), 2).unwrap();
        db.add_cert("fp1", "web1", 100, 1000).unwrap();
        db.seen(&[Visit {
            node: "web1".into(),
            at: 150,
            version: "0.1".into(),
            facts: Some(("{}".into(), "x".into())),
            ca_bundle: None,
            keys_version: None,
        }])
        .unwrap();
        let row = ReportRow {
            node: "web1",
            at: 160,
            changed: 2,
            dry_run: false,
            failed: 0,
            stale: false,
            serial: Some(7),
            commit: Some("abc"),
            body: "{}",
            digest: "{}",
        };
        for _ in 0..(REPORTS_PER_NODE + 5) {
            db.add_report(&row, REPORTS_PER_NODE).unwrap();
        }
        let all = ReportFilter { node: Some("web1".into()), limit: 1000, ..ReportFilter::default() };
        assert_eq!(db.reports(&all).unwrap().len(), REPORTS_PER_NODE as usize, "bounded per node");
        db.add_report(&ReportRow { failed: 1, at: 170, ..row.clone() }, REPORTS_PER_NODE).unwrap();
        let failed = db.reports(&ReportFilter { failed: true, limit: 10, ..ReportFilter::default() }).unwrap();
        assert_eq!((failed.len(), failed[0].received, failed[0].commit.as_deref()), (1, 170, Some("abc")));
        let since = db.reports(&ReportFilter { since: Some(165), limit: 100, ..ReportFilter::default() }).unwrap();
        assert_eq!(since.len(), 1);
        assert_eq!(db.report(failed[0].id).unwrap().unwrap().failed, 1);
        // A dry-run is not a run: the node's state stays its last real run's, and what the
        // dry-run would change is said beside it until the next real run.
        db.add_report(&ReportRow { at: 180, changed: 3, dry_run: true, ..row.clone() }, REPORTS_PER_NODE).unwrap();
        let n = &db.nodes().unwrap()[0];
        assert_eq!((n.last_report, n.dry_run_pending), (Some((170, 2, 1, false)), Some(3)));
        db.add_report(&ReportRow { at: 190, changed: 0, ..row.clone() }, REPORTS_PER_NODE).unwrap();
        let n = &db.nodes().unwrap()[0];
        assert_eq!((n.last_report, n.dry_run_pending), (Some((190, 0, 0, false)), None));
        // Retention: what is older than the window goes, in batches; a smaller cap keeps fewer.
        for at in [10, 11, 12, 13, 14] {
            db.add_report(&ReportRow { node: "web2", at, ..row.clone() }, REPORTS_PER_NODE).unwrap();
        }
        assert_eq!(db.prune_reports(15, 2).unwrap(), 5, "all five, two at a time");
        let web2 = ReportFilter { node: Some("web2".into()), limit: 100, ..ReportFilter::default() };
        assert!(db.reports(&web2).unwrap().is_empty());
        assert_eq!(db.reports(&all).unwrap().len(), REPORTS_PER_NODE as usize, "newer ones stay");
        for at in 200..205 {
            db.add_report(&ReportRow { node: "web3", at, ..row.clone() }, 3).unwrap();
        }
        let web3 = ReportFilter { node: Some("web3".into()), limit: 100, ..ReportFilter::default() };
        let kept: Vec<i64> = db.reports(&web3).unwrap().iter().map(|r| r.received).collect();
        assert_eq!(kept, [204, 203, 202], "the cap in force keeps the newest");
        assert_eq!(db.node("web1").unwrap().unwrap().facts.as_deref(), Some("{}"));
        assert!(db.node("nobody").unwrap().is_none());
        assert!(db.live_cert("web1", 500).unwrap());
        assert!(!db.live_cert("web1", 1000).unwrap(), "expired");
        assert_eq!(db.revoke("web1", 600).unwrap(), 1);
        assert_eq!(db.cert("fp1").unwrap().unwrap().revoked, Some(600));
        assert!(!db.live_cert("web1", 500).unwrap());
        let nodes = db.nodes().unwrap();
        assert_eq!(nodes.len(), 1);
        assert!(nodes[0].revoked);
        assert_eq!((nodes[0].last_seen, nodes[0].last_report), (Some(150), Some((190, 0, 0, false))));
        // The store survives a reopen.
        drop(db);
        let db = Db::open(&t.path().join("state.db"), 1).unwrap();
        assert_eq!(db.count_nodes().unwrap(), 1);
    }
}
