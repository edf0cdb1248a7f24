//! The state in PostgreSQL, for several servers sharing it (`database = "postgres://..."` in
//! `server.toml`): the same schema as the embedded file ([`crate::schema`]), applied by
//! `converge-server db migrate`, through an async client (tokio-postgres) and a pool
//! (deadpool): no call blocks a runtime thread. Reports live in daily partitions made ahead of
//! time, so that retention drops a partition instead of deleting rows.
//!
//! A URL may hold a password: it is never printed, and errors name the host and database only.

use crate::schema::{self, Engine};
use crate::sql::{Conn, PgConn};
use anyhow::{Context, Result, anyhow};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::sync::Arc;

/// Daily report partitions made ahead of today.
pub const PARTITIONS_AHEAD: i64 = 7;

pub struct Pg {
    pool: Pool,
    /// `host:port/database`, for messages (never the password).
    pub shown: String,
    /// The runtime the pool's connections live on: the server's own, or (for a command run
    /// outside one) a runtime of one thread made here.
    handle: tokio::runtime::Handle,
    _own: Option<tokio::runtime::Runtime>,
}

/// TLS to PostgreSQL (rustls, ring), trusting only the CA certificates in the file `ca`.
fn tls_to(ca: &std::path::Path) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(ca).with_context(|| format!("cannot read database_ca {}", ca.display()))?
    {
        let cert = cert.map_err(|e| anyhow!("database_ca {}: not a PEM certificate: {e}", ca.display()))?;
        roots.add(cert).map_err(|e| anyhow!("database_ca {}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        anyhow::bail!("database_ca {} holds no certificate", ca.display());
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS to PostgreSQL")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// What a URL names, without its password.
fn shown(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or("?"))
}

impl Pg {
    /// A pool of at most `size` connections to the database of `url` (none is opened yet):
    /// over TLS checked against the CA certificates in the file `ca` when given (the URL's
    /// `sslmode` is then `require` whatever it said), else plaintext.
    pub fn new(url: &str, size: usize, ca: Option<&std::path::Path>) -> Result<Pg> {
        // The parser's message may quote the URL, password and all: it is not passed on.
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|_| anyhow!("`database` is not a PostgreSQL URL (postgres://USER@HOST:PORT/DB)"))?;
        // A database that vanishes is noticed: connecting gives up, idle connections are probed.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(std::time::Duration::from_secs(5));
        }
        config.keepalives(true).keepalives_idle(std::time::Duration::from_secs(30));
        if config.get_application_name().is_none() {
            config.application_name("converge-server");
        }
        let shown = shown(&config);
        let recycling = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        use tokio_postgres::config::SslMode;
        let manager = match ca {
            Some(ca) => {
                config.ssl_mode(SslMode::Require);
                Manager::from_config(config, tls_to(ca)?, recycling)
            }
            None if config.get_ssl_mode() == SslMode::Require => anyhow::bail!(
                "`database` asks for TLS (sslmode=require): name the CA of PostgreSQL's certificate with \
                 `database_ca` in server.toml, so that the connection is checked, not only encrypted"
            ),
            None => {
                // Plaintext, never a TLS attempt without a certificate to check.
                config.ssl_mode(SslMode::Disable);
                Manager::from_config(config, tokio_postgres::NoTls, recycling)
            }
        };
        let pool = Pool::builder(manager)
            .max_size(size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(Some(std::time::Duration::from_secs(10)))
            .wait_timeout(Some(std::time::Duration::from_secs(10)))
            .build()
            .context("cannot make a PostgreSQL pool")?;
        let (handle, own) = match tokio::runtime::Handle::try_current() {
            Ok(h) => (h, None),
            Err(_) => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .context("cannot start a runtime for PostgreSQL")?;
                (rt.handle().clone(), Some(rt))
            }
        };
        Ok(Pg { pool, shown, handle, _own: own })
    }

    /// Runs `f` to its end, from a thread that is not one of the runtime's.
    pub fn block<T>(&self, f: impl Future<Output = T>) -> T {
        self.handle.block_on(f)
    }

    /// A connection of the pool, from a blocking thread.
    fn connection(&self) -> Result<deadpool_postgres::Object> {
        self.block(async {
            match tokio::time::timeout(crate::sql::PG_STATEMENT, self.client()).await {
                Ok(c) => c,
                Err(_) => Err(anyhow!(
                    "PostgreSQL at {} did not answer within {} s",
                    self.shown,
                    crate::sql::PG_STATEMENT.as_secs()
                )),
            }
        })
    }

    /// Runs `f` on a connection, each statement on its own (see [`crate::db::Db`]).
    pub fn with<T>(&self, f: impl FnOnce(&mut dyn Conn) -> Result<T>) -> Result<T> {
        let client = self.connection()?;
        f(&mut PgConn { client: &client, handle: &self.handle, shown: &self.shown })
    }

    /// Runs `f` in one transaction: committed when it returns `Ok`, else rolled back.
    pub fn tx<T>(&self, f: impl FnOnce(&mut dyn Conn) -> Result<T>) -> Result<T> {
        let mut client = self.connection()?;
        let tx = crate::sql::wait(&self.handle, &self.shown, client.transaction())?;
        let out = f(&mut PgConn { client: &tx, handle: &self.handle, shown: &self.shown })?;
        crate::sql::wait(&self.handle, &self.shown, tx.commit())?;
        Ok(out)
    }

    /// Makes the daily report partition that holds `t`.
    pub fn make_partition(&self, t: i64) -> Result<()> {
        let c = self.connection()?;
        crate::sql::wait(&self.handle, &self.shown, c.batch_execute(&schema::report_partition(t).1))
    }

    /// [`Pg::prune_reports`], from a blocking thread.
    pub fn prune_partitions(&self, before: i64, now: i64) -> Result<Vec<String>> {
        self.block(self.prune_reports(before, now))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| match e {
            // What PostgreSQL itself said (a refused login, no pg_hba.conf entry), or the TLS
            // or network error underneath: never the pool's summary alone.
            deadpool_postgres::PoolError::Backend(e) => {
                let why = match e.as_db_error() {
                    Some(db) => db.message().to_string(),
                    None => {
                        let mut why = e.to_string();
                        let mut source = std::error::Error::source(&e);
                        while let Some(s) = source {
                            why = format!("{why}: {s}");
                            source = s.source();
                        }
                        why
                    }
                };
                anyhow!("cannot reach PostgreSQL at {}: {why}", self.shown)
            }
            e => anyhow!("cannot reach PostgreSQL at {}: {e}", self.shown),
        })
    }

    /// Brings the schema up to date (creating it in an empty database) and makes the report
    /// partitions from yesterday to [`PARTITIONS_AHEAD`] days ahead of `now`; idempotent.
    /// Returns the partitions of `reports` that exist afterwards.
    pub async fn migrate(&self, now: i64) -> Result<Vec<String>> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        // One migration at a time, whichever server runs it.
        tx.batch_execute("SELECT pg_advisory_xact_lock(7243001)").await?;
        tx.batch_execute(&schema::tables(Engine::Postgres))
            .await
            .with_context(|| format!("cannot create the tables in {}", self.shown))?;
        for (table, column, def) in schema::ADDED {
            tx.batch_execute(&schema::add_column(Engine::Postgres, table, column, def))
                .await
                .with_context(|| format!("cannot add {table}.{column} in {}", self.shown))?;
        }
        for sql in schema::BACKFILL {
            tx.batch_execute(sql).await.with_context(|| format!("cannot fill in new columns in {}", self.shown))?;
        }
        for day in -1..=PARTITIONS_AHEAD {
            tx.batch_execute(&schema::report_partition(now + day * 86_400).1).await?;
        }
        tx.commit().await?;
        partitions(&c).await
    }

    /// The partitions of `reports`, oldest first.
    pub async fn partitions(&self) -> Result<Vec<String>> {
        partitions(&self.client().await?).await
    }
}

impl Pg {
    /// Retention: drops the daily report partitions wholly older than `before` (never a row
    /// delete), and makes the partitions up to [`PARTITIONS_AHEAD`] days after `now`. Returns
    /// the partitions dropped.
    pub async fn prune_reports(&self, before: i64, now: i64) -> Result<Vec<String>> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        tx.batch_execute("SELECT pg_advisory_xact_lock(7243002)").await?;
        for day in 0..=PARTITIONS_AHEAD {
            tx.batch_execute(&schema::report_partition(now + day * 86_400).1).await?;
        }
        let mut dropped = Vec::new();
        for name in partitions(&tx).await? {
            let Some(day) = name.strip_prefix("reports_d").and_then(|d| d.parse::<i64>().ok()) else { continue };
            if (day + 1) * 86_400 <= before {
                tx.batch_execute(&format!("DROP TABLE {name}")).await?;
                dropped.push(name);
            }
        }
        tx.commit().await?;
        Ok(dropped)
    }
}

/// The tables `db import` copies, in an order their references allow.
pub const TABLES: &[&str] =
    &["nodes", "certificates", "tokens", "pending", "catalogs", "reports", "operators", "agreed", "rollouts"];

impl Pg {
    /// Copies every row of the embedded database at `sqlite` into this one, which must be
    /// migrated and empty: one transaction, so that a failure leaves it empty. Returns the
    /// rows copied per table.
    pub async fn import(&self, sqlite: &std::path::Path, now: i64) -> Result<Vec<(&'static str, usize)>> {
        let source = rusqlite::Connection::open_with_flags(sqlite, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("cannot open {}", sqlite.display()))?;
        self.migrate(now).await?;
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        // A server already serving from the database may have proposed its commit: that
        // agreement stays (the file's is not copied over it); any other row refuses the import.
        let agreed: i64 = tx.query_one("SELECT count(*) FROM agreed", &[]).await?.get(0);
        for table in TABLES.iter().filter(|t| **t != "agreed") {
            let n: i64 = tx.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await?.get(0);
            if n > 0 {
                anyhow::bail!(
                    "{} already holds {n} rows in {table}: import only into an empty database (nothing was copied)",
                    self.shown
                );
            }
        }
        // A partition for every day the reports span.
        let mut days = source.prepare("SELECT DISTINCT received / 86400 FROM reports")?;
        let days: Vec<i64> = days.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
        for day in days {
            tx.batch_execute(&schema::report_partition(day * 86_400).1).await?;
        }
        let mut copied = Vec::new();
        for table in TABLES.iter().filter(|t| **t != "agreed" || agreed == 0) {
            let columns = tx
                .query(
                    "SELECT column_name, data_type FROM information_schema.columns
                     WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
                    &[table],
                )
                .await?;
            let columns: Vec<(String, String)> = columns.iter().map(|r| (r.get(0), r.get(1))).collect();
            let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
            let marks: Vec<String> = (1..=names.len()).map(|i| format!("${i}")).collect();
            let insert = tx
                .prepare(&format!("INSERT INTO {table} ({}) VALUES ({})", names.join(", "), marks.join(", ")))
                .await?;
            let mut select = source.prepare(&format!("SELECT {} FROM {table}", names.join(", ")))?;
            let mut rows = select.query([])?;
            let mut n = 0;
            while let Some(row) = rows.next()? {
                let mut values: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = Vec::new();
                for (i, (name, kind)) in columns.iter().enumerate() {
                    use rusqlite::types::ValueRef;
                    let v = row.get_ref(i)?;
                    let bad = || anyhow!("{table}.{name}: a value of the wrong type in {}", sqlite.display());
                    values.push(match (kind.as_str(), v) {
                        ("bigint", ValueRef::Null) => Box::new(None::<i64>),
                        ("bigint", ValueRef::Integer(x)) => Box::new(x),
                        ("boolean", ValueRef::Null) => Box::new(None::<bool>),
                        ("boolean", ValueRef::Integer(x)) => Box::new(x != 0),
                        ("text", ValueRef::Null) => Box::new(None::<String>),
                        ("text", ValueRef::Text(t)) => Box::new(String::from_utf8(t.to_vec()).map_err(|_| bad())?),
                        ("bytea", ValueRef::Blob(b)) => Box::new(b.to_vec()),
                        ("bytea", ValueRef::Null) => Box::new(None::<Vec<u8>>),
                        _ => return Err(bad()),
                    });
                }
                let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                    values.iter().map(|v| &**v as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
                tx.execute(&insert, &params).await.with_context(|| format!("cannot copy a row of {table}"))?;
                n += 1;
            }
            copied.push((*table, n));
        }
        // New reports are numbered after the imported ones.
        tx.batch_execute(
            "SELECT setval(pg_get_serial_sequence('reports', 'id'), GREATEST((SELECT max(id) FROM reports), 1))",
        )
        .await?;
        tx.commit().await?;
        Ok(copied)
    }
}

/// The partitions of `reports`, oldest first.
async fn partitions(c: &impl deadpool_postgres::GenericClient) -> Result<Vec<String>> {
    let rows = c
        .query(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'reports' ORDER BY c.relname",
            &[],
        )
        .await?;
    let mut names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    names.sort_by_key(|n| n.trim_start_matches("reports_d").parse::<i64>().unwrap_or(0));
    Ok(names)
}
