//! The PostgreSQL harness the several-servers tests stand on: a cluster of Debian's package in
//! a temporary directory, run as the `postgres` user on a loopback port, that keeps its data
//! across a stop and a start and leaves nothing behind. Skipped (and said) where it cannot run:
//! CI demands it (`CONVERGE_REQUIRE_POSTGRES=1`, set by `.ci/run`).

use converge_e2e::postgres::{self, Postgres};

fn available() -> bool {
    match postgres::unavailable() {
        None => true,
        Some(why) if std::env::var_os("CONVERGE_REQUIRE_POSTGRES").is_some() => {
            panic!("PostgreSQL tests are required here but cannot run: {why}")
        }
        Some(why) => {
            eprintln!("skipped: {why}");
            false
        }
    }
}

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
/// daily partitions, made ahead), again changes nothing, is refused with a reason when
/// PostgreSQL is away, and `serve` says plainly that it does not serve from PostgreSQL yet.
#[test]
fn db_migrate_makes_the_one_schema_in_postgresql_and_again_changes_nothing() {
    if !available() {
        return;
    }
    let pg = Postgres::start();
    let f = converge_e2e::Fleet::new(&[("site.yaml", "nodes: {}\n")]);
    let config = f.config();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}database = \"{}\"\n", pg.url())).unwrap();
    let first = converge_e2e::server_ok(&["db", "migrate", "--config", &config]);
    assert!(first.contains("is up to date: 9 daily report partitions"), "{first}");
    let tables = pg.sql(
        "SELECT string_agg(table_name, ',' ORDER BY table_name) FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_name NOT LIKE 'reports_d%'",
    );
    assert_eq!(tables.trim(), "catalogs,certificates,nodes,operators,pending,reports,tokens");
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

    let serve = converge_e2e::run("converge-server", &["serve", "--config", &config]);
    assert_ne!(serve.code, 0);
    assert!(serve.stderr.contains("not yet serve from"), "{}", serve.stderr);
    pg.stop();
    let away = converge_e2e::run("converge-server", &["db", "migrate", "--config", &config]);
    assert_ne!(away.code, 0);
    assert!(away.stderr.contains("cannot reach PostgreSQL at 127.0.0.1:"), "{}", away.stderr);
}
