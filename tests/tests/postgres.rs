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
