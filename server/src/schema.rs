//! The state's schema, one for both engines: the tables in the SQL that SQLite and PostgreSQL
//! both take, with the few things they spell differently written as `{id}`, `{blob}`, `{bool}`,
//! `{false}`, and the reports table's partitioning (PostgreSQL keeps reports in daily
//! partitions, so old ones go by dropping a partition, never by deleting rows); then the columns
//! added since the first release, in order. Both engines apply both, idempotently: SQLite when
//! the server opens its file, PostgreSQL with `converge-server db migrate`.

/// A database engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

const TABLES: &str = "
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    created BIGINT NOT NULL,
    last_seen BIGINT,
    agent_version TEXT,
    facts TEXT,
    facts_sha256 TEXT
);
CREATE TABLE IF NOT EXISTS certificates (
    fingerprint TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    issued BIGINT NOT NULL,
    expires BIGINT NOT NULL,
    revoked BIGINT
);
CREATE INDEX IF NOT EXISTS certificates_node ON certificates(node);
CREATE INDEX IF NOT EXISTS certificates_issued ON certificates(issued);
CREATE INDEX IF NOT EXISTS certificates_revoked ON certificates(revoked);
CREATE TABLE IF NOT EXISTS tokens (
    sha256 TEXT PRIMARY KEY,
    pattern TEXT NOT NULL,
    created BIGINT NOT NULL,
    expires BIGINT NOT NULL,
    used_by TEXT,
    used_at BIGINT
);
CREATE TABLE IF NOT EXISTS pending (
    node TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    requested BIGINT NOT NULL,
    approved BIGINT
);
CREATE TABLE IF NOT EXISTS catalogs (
    node TEXT PRIMARY KEY,
    serial BIGINT NOT NULL,
    resources_sha256 TEXT NOT NULL,
    cache_key TEXT NOT NULL,
    etag TEXT NOT NULL,
    issued_at BIGINT NOT NULL,
    envelope {blob} NOT NULL,
    compile_error TEXT
);
CREATE TABLE IF NOT EXISTS reports (
    id {id},
    node TEXT NOT NULL,
    received BIGINT NOT NULL,
    changed BIGINT NOT NULL,
    failed BIGINT NOT NULL,
    stale {bool} NOT NULL,
    serial BIGINT,
    body TEXT NOT NULL{reports_key}
){partitioned};
CREATE INDEX IF NOT EXISTS reports_node ON reports(node, id);
CREATE TABLE IF NOT EXISTS agreed (
    id BIGINT PRIMARY KEY,
    epoch BIGINT NOT NULL,
    commit_id TEXT NOT NULL,
    since BIGINT NOT NULL,
    proposed_by TEXT
);
CREATE TABLE IF NOT EXISTS rollouts (
    commit_id TEXT PRIMARY KEY,
    previous TEXT,
    waves BIGINT NOT NULL,
    wave BIGINT NOT NULL,
    since BIGINT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    started BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS operators (
    sha256 TEXT PRIMARY KEY,
    created BIGINT NOT NULL,
    expires BIGINT NOT NULL
);
";

/// Columns added after the first release of a table: (table, column, definition).
pub const ADDED: &[(&str, &str, &str)] = &[
    ("reports", "commit_id", "TEXT"),
    ("pending", "fingerprint", "TEXT"),
    ("pending", "address", "TEXT"),
    // A report's counts and its first failed resources (JSON, small): the node page shows
    // them without reading whole report bodies.
    ("reports", "digest", "TEXT"),
    // The certificate a renewed one replaces: revoked once the new one is first used.
    ("certificates", "replaces", "TEXT"),
    // The hash of the CA bundle a node trusts, as it last said.
    ("nodes", "ca_bundle", "TEXT"),
    // The version of the key list a node holds, as it last said.
    ("nodes", "keys_version", "BIGINT"),
    // A dry-run's report: `changed` counts what would change, and the node's state stays
    // that of its last real run.
    ("reports", "dry_run", "{bool} NOT NULL DEFAULT {false}"),
    // The age recipient a node's sealed values are encrypted to (its sealing key, made on the
    // host and sent at enrollment or renewal).
    ("nodes", "seal_key", "TEXT"),
    // The agreement on the current commit a catalog was compiled at (see `agreed`): several
    // servers never replace a catalog of a later commit with one of an earlier.
    ("catalogs", "epoch", "BIGINT NOT NULL DEFAULT 0"),
    // The hash of a report's bytes: a report sent again (to another server, after the first
    // fell before answering) is stored once.
    ("reports", "body_sha256", "TEXT"),
    // A node's last real run, and what a dry-run since would change (NULL: none since), kept
    // with the node as reports arrive: listing a fleet of 100,000 nodes reads the nodes, not
    // their reports.
    ("nodes", "run_at", "BIGINT"),
    ("nodes", "run_changed", "BIGINT"),
    ("nodes", "run_failed", "BIGINT"),
    ("nodes", "run_stale", "{bool}"),
    ("nodes", "run_commit", "TEXT"),
    ("nodes", "dry_run_changed", "BIGINT"),
    // Changes the last real run's plan did not predict: a rollout halts on them.
    ("nodes", "run_unplanned", "BIGINT"),
    // The host's runs are paused (`converge pause`): why, since and until when, as it said.
    ("nodes", "paused", "TEXT"),
    // Since when the node's runs have been of the commit of its last run: how a commit spread
    // over the fleet, without a pass over the reports.
    ("nodes", "run_commit_since", "BIGINT"),
];

/// Statements run after the columns are added, idempotently, on both engines: what a state
/// from before a column gets for it.
pub const BACKFILL: &[&str] = &[
    // The last real run of nodes that have reports but no `run_at` yet.
    "UPDATE nodes SET (run_at, run_changed, run_failed, run_stale, run_commit) =
         (SELECT received, changed, failed, stale, commit_id FROM reports
          WHERE reports.node = nodes.name AND NOT reports.dry_run ORDER BY reports.id DESC LIMIT 1)
     WHERE run_at IS NULL AND EXISTS (SELECT 1 FROM reports WHERE reports.node = nodes.name AND NOT reports.dry_run)",
];

/// `sql` with the engine's own spellings.
pub fn render(sql: &str, engine: Engine) -> String {
    let words: [(&str, &str); 6] = match engine {
        Engine::Sqlite => [
            ("{id}", "INTEGER PRIMARY KEY"),
            ("{blob}", "BLOB"),
            ("{bool}", "INTEGER"),
            ("{false}", "0"),
            ("{reports_key}", ""),
            ("{partitioned}", ""),
        ],
        Engine::Postgres => [
            ("{id}", "BIGINT GENERATED BY DEFAULT AS IDENTITY"),
            ("{blob}", "BYTEA"),
            ("{bool}", "BOOLEAN"),
            ("{false}", "FALSE"),
            // A partitioned table's keys hold its partition key.
            ("{reports_key}", ",\n    PRIMARY KEY (id, received)"),
            ("{partitioned}", " PARTITION BY RANGE (received)"),
        ],
    };
    words.iter().fold(sql.to_string(), |s, (from, to)| s.replace(from, to))
}

/// The statements that create every table of a new database.
pub fn tables(engine: Engine) -> String {
    render(TABLES, engine)
}

/// The statement that adds a column (PostgreSQL's is idempotent; SQLite's caller checks first).
pub fn add_column(engine: Engine, table: &str, column: &str, definition: &str) -> String {
    let definition = render(definition, engine);
    match engine {
        Engine::Sqlite => format!("ALTER TABLE {table} ADD COLUMN {column} {definition}"),
        Engine::Postgres => format!("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {definition}"),
    }
}

/// The daily partition of `reports` that holds the day starting at `day` (UNIX seconds,
/// midnight UTC), on PostgreSQL.
pub fn report_partition(day: i64) -> (String, String) {
    let day = day - day.rem_euclid(86_400);
    let name = format!("reports_d{}", day / 86_400);
    let sql =
        format!("CREATE TABLE IF NOT EXISTS {name} PARTITION OF reports FOR VALUES FROM ({day}) TO ({})", day + 86_400);
    (name, sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_engine_gets_its_own_spellings_and_nothing_is_left_unspelled() {
        for engine in [Engine::Sqlite, Engine::Postgres] {
            let all = tables(engine) + &ADDED.iter().map(|(t, c, d)| add_column(engine, t, c, d)).collect::<String>();
            assert!(!all.contains('{'), "{engine:?}: {all}");
        }
        assert!(tables(Engine::Sqlite).contains("id INTEGER PRIMARY KEY,"), "the rowid");
        assert!(tables(Engine::Postgres).contains("PARTITION BY RANGE (received)"));
        assert_eq!(
            report_partition(86_400 * 3 + 5),
            (
                "reports_d3".to_string(),
                "CREATE TABLE IF NOT EXISTS reports_d3 PARTITION OF reports FOR VALUES FROM (259200) TO (345600)"
                    .to_string()
            )
        );
    }
}
