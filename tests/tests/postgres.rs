//! The PostgreSQL harness the several-servers tests stand on: a cluster of Debian's package in
//! a temporary directory, run as the `postgres` user on a loopback port, that keeps its data
//! across a stop and a start and leaves nothing behind. Skipped (and said) where it cannot run:
//! CI demands it (`CONVERGE_REQUIRE_POSTGRES=1`, set by `.ci/run`).

use converge_e2e::postgres::{Postgres, available};

#[test]
fn a_cluster_of_its_own_keeps_its_data_across_a_restart_and_leaves_nothing() {
    if !available() {
        return;
    }
    let pg = Postgres::start();
    let dir = pg.dir().to_path_buf();
    pg.sql("CREATE TABLE t (n INTEGER); INSERT INTO t VALUES (42);");
    assert_eq!(pg.sql("SELECT n FROM t").trim(), "42");
    pg.stop();
    pg.start_again();
    assert_eq!(pg.sql("SELECT n FROM t").trim(), "42", "the data survives");
    assert_eq!(pg.sql("SELECT current_setting('listen_addresses')").trim(), "127.0.0.1");
    drop(pg);
    assert!(!dir.exists(), "the cluster's directory is gone");
}

/// `converge-server db migrate` makes the schema in an empty PostgreSQL database (reports in
/// daily partitions, made ahead), again changes nothing, and is refused with a reason when
/// PostgreSQL is away.
#[test]
fn db_migrate_makes_the_one_schema_in_postgresql_and_again_changes_nothing() {
    if !available() {
        return;
    }
    let pg = Postgres::start();
    let f = converge_e2e::Fleet::new(&[("site.yaml", "nodes: {}\n")]);
    let config = f.config();
    pg.serve_from(&config, "");
    let first = converge_e2e::server_ok(&["db", "migrate", "--config", &config]);
    assert!(first.contains("is up to date: 9 daily report partitions"), "{first}");
    let tables = pg.sql(
        "SELECT string_agg(table_name, ',' ORDER BY table_name) FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_name NOT LIKE 'reports_d%'",
    );
    assert_eq!(tables.trim(), "agreed,catalogs,certificates,nodes,operators,pending,reports,rollouts,tokens");
    let columns = pg.sql(
        "SELECT string_agg(column_name || ':' || data_type, ',' ORDER BY column_name) FROM information_schema.columns \
         WHERE table_name = 'reports'",
    );
    assert!(
        columns.contains("dry_run:boolean") && columns.contains("digest:text") && columns.contains("id:bigint"),
        "{columns}"
    );
    assert_eq!(pg.sql("SELECT partstrat FROM pg_partitioned_table").trim(), "r", "reports by range");
    // A row lands in today's partition.
    pg.sql("INSERT INTO reports (node, received, changed, failed, stale, body) VALUES ('n', extract(epoch from now())::bigint, 0, 0, false, '{}')");
    let again = converge_e2e::server_ok(&["db", "migrate", "--config", &config]);
    assert_eq!(again, first, "idempotent");
    assert_eq!(pg.sql("SELECT count(*) FROM reports").trim(), "1", "nothing lost");

    pg.stop();
    let away = converge_e2e::run("converge-server", &["db", "migrate", "--config", &config]);
    assert_ne!(away.code, 0);
    assert!(away.stderr.contains("cannot reach PostgreSQL at 127.0.0.1:"), "{}", away.stderr);
}

/// `db import` copies a live fleet's embedded state (nodes, certificates, tokens, catalogs,
/// reports) into an empty PostgreSQL database in one transaction, and refuses a database that
/// is not empty.
#[test]
fn db_import_copies_the_embedded_state_into_an_empty_database_only() {
    if !available() {
        return;
    }
    let pg = Postgres::start();
    let f = converge_e2e::Fleet::new(&[
        ("site.yaml", "nodes:\n  \"agent*\": {roles: [motd]}\n"),
        ("roles/motd.yaml", "resources:\n  - file: /etc/motd\n    content: \"hi\\n\"\n"),
    ]);
    let server = converge_e2e::Server::start(&f.config());
    for name in ["agent1", "agent2"] {
        let root = f.root(name);
        let out = converge_e2e::converge_in(
            &root,
            &["bootstrap", "--server", &server.url, "--ca-hash", &f.ca_hash, "--token", &f.token(name)],
        );
        assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
        converge_e2e::converge_in(&root, &["run", "--once"]);
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    drop(server);
    let config = f.config();
    let embedded = converge_e2e::server_ok(&["node", "list", "--config", &config]);
    pg.serve_from(&config, "");
    let out = converge_e2e::server_ok(&["db", "import", "--config", &config]);
    assert!(out.contains("2 nodes, 2 certificates") && out.contains("4 reports"), "{out}");
    assert_eq!(pg.sql("SELECT string_agg(name, ',' ORDER BY name) FROM nodes").trim(), "agent1,agent2");
    assert_eq!(pg.sql("SELECT count(*) FROM catalogs WHERE length(envelope) > 100").trim(), "2");
    assert_eq!(pg.sql("SELECT count(*) FROM reports WHERE NOT stale AND NOT dry_run").trim(), "4");
    // The operators' listings read the shared database: the same fleet as before the import.
    let nodes = converge_e2e::server_ok(&["node", "list", "--config", &config]);
    for name in ["agent1", "agent2"] {
        let columns = |listing: &str| -> Vec<String> {
            let line = listing.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in {listing}"));
            line.split_whitespace().map(str::to_string).collect()
        };
        let (before, after) = (columns(&embedded), columns(&nodes));
        assert_eq!((&before[1], &before[5]), (&after[1], &after[5]), "status and serial: {before:?} {after:?}");
        assert_eq!(after[1..3], ["in", "sync"], "{after:?}");
    }
    let reports = converge_e2e::server_ok(&["report", "--node", "agent1", "--limit", "5", "--config", &config]);
    assert!(reports.contains("agent1") && reports.contains("changed"), "{reports}");
    let none = converge_e2e::run("converge-server", &["report", "--node", "nobody", "--config", &config]);
    assert!(none.stderr.contains("there is no node nobody"), "{}", none.stderr);
    // New reports are numbered after the imported ones.
    let next = pg.sql(
        "INSERT INTO reports (node, received, changed, failed, stale, body) \
         VALUES ('agent1', extract(epoch from now())::bigint, 0, 0, false, '{}') RETURNING id",
    );
    let max: i64 = pg.sql("SELECT max(id) FROM reports WHERE body <> '{}'").trim().parse().unwrap();
    let next: i64 = next.lines().next().unwrap().trim().parse().unwrap(); // then psql's "INSERT 0 1"
    assert!(next > max, "{next} after {max}");
    let again = converge_e2e::run("converge-server", &["db", "import", "--config", &config]);
    assert_ne!(again.code, 0);
    assert!(again.stderr.contains("import only into an empty database"), "{}", again.stderr);
}

/// Retention on PostgreSQL drops whole daily partitions past the window (no row deletes) and
/// makes the week ahead; on the embedded file it deletes the old rows.
#[test]
fn db_prune_drops_old_report_partitions_and_makes_the_week_ahead() {
    if !available() {
        return;
    }
    let pg = Postgres::start();
    let f = converge_e2e::Fleet::new(&[("site.yaml", "nodes: {}\n")]);
    let config = f.config();
    let embedded = converge_e2e::server_ok(&["db", "prune", "--config", &config]);
    assert!(embedded.starts_with("deleted 0 reports received before "), "{embedded}");
    pg.serve_from(&config, "report_retention = \"7d\"\n");
    converge_e2e::server_ok(&["db", "migrate", "--config", &config]);
    let now: i64 = pg.sql("SELECT extract(epoch from now())::bigint").trim().parse().unwrap();
    let old_day = now / 86_400 - 30;
    pg.sql(&format!(
        "CREATE TABLE reports_d{old_day} PARTITION OF reports FOR VALUES FROM ({}) TO ({});
         INSERT INTO reports (node, received, changed, failed, stale, body) VALUES ('n', {}, 0, 0, false, '{{}}'),
                ('n', {now}, 0, 0, false, '{{}}')",
        old_day * 86_400,
        (old_day + 1) * 86_400,
        old_day * 86_400 + 5
    ));
    let out = converge_e2e::server_ok(&["db", "prune", "--config", &config]);
    assert!(
        out.starts_with("dropped 1 daily report partitions") && out.contains(&format!("reports_d{old_day}")),
        "{out}"
    );
    assert_eq!(pg.sql("SELECT count(*) FROM reports").trim(), "1", "today's report stays");
    let ahead = format!("reports_d{}", now / 86_400 + 7);
    assert_eq!(pg.sql(&format!("SELECT count(*) FROM pg_class WHERE relname = '{ahead}'")).trim(), "1");
    let again = converge_e2e::server_ok(&["db", "prune", "--config", &config]);
    assert!(again.starts_with("dropped 0 daily report partitions"), "{again}");
}
