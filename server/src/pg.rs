//! The state in PostgreSQL, for several servers sharing it (`database = "postgres://..."` in
//! `server.toml`): the same schema as the embedded file ([`crate::schema`]), applied by
//! `converge-server db migrate`, through an async client (tokio-postgres) and a pool
//! (deadpool): no call blocks a runtime thread. Reports live in daily partitions made ahead of
//! time, so that retention drops a partition instead of deleting rows.
//!
//! A URL may hold a password: it is never printed, and errors name the host and database only.

use crate::schema::{self, Engine};
use anyhow::{Context, Result, anyhow};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

/// Daily report partitions made ahead of today.
pub const PARTITIONS_AHEAD: i64 = 7;

pub struct Pg {
    pool: Pool,
    /// `host:port/database`, for messages (never the password).
    pub shown: String,
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
    /// A pool of at most `size` connections to the database of `url` (none is opened yet).
    pub fn new(url: &str, size: usize) -> Result<Pg> {
        // The parser's message may quote the URL, password and all: it is not passed on.
        let config: tokio_postgres::Config =
            url.parse().map_err(|_| anyhow!("`database` is not a PostgreSQL URL (postgres://USER@HOST:PORT/DB)"))?;
        let shown = shown(&config);
        let manager = Manager::from_config(
            config,
            tokio_postgres::NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(Some(std::time::Duration::from_secs(10)))
            .wait_timeout(Some(std::time::Duration::from_secs(10)))
            .build()
            .context("cannot make a PostgreSQL pool")?;
        Ok(Pg { pool, shown })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| anyhow!("cannot reach PostgreSQL at {}: {e}", self.shown))
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
        for day in -1..=PARTITIONS_AHEAD {
            tx.batch_execute(&schema::report_partition(now + day * 86_400).1).await?;
        }
        tx.commit().await?;
        partitions(&c).await
    }

    /// The partitions of `reports`, oldest first.
    pub async fn partitions(&self) -> Result<Vec<String>> {
        partitions(&*self.client().await?).await
    }
}

/// The partitions of `reports`, oldest first.
async fn partitions(c: &tokio_postgres::Client) -> Result<Vec<String>> {
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
