//! The state, written once for both engines, behaves the same on the embedded file and on
//! PostgreSQL: the same calls, the same answers, including what several servers sharing one
//! database rely on (a token spent once, a catalog stored only over the one it replaces, one
//! agreement on the current commit, a report sent twice stored once).

use converge_e2e::postgres::{Postgres, available};
use converge_server::db::{Db, Pruned, ReportFilter, ReportRow, Stored, Visit};

const DAY: i64 = 86_400;

fn catalog(serial: u64, etag: &str, epoch: i64) -> Stored {
    Stored {
        serial,
        resources_sha256: format!("r{serial}"),
        cache_key: format!("k{serial}"),
        etag: etag.into(),
        issued_at: 5,
        envelope: vec![0, 159, 255],
        epoch,
    }
}

fn exercise(db: &Db) {
    let base = 10 * DAY;
    db.add_cert("fp1", "web1", base, base + 1000).unwrap();
    db.seen(&[Visit {
        node: "web1".into(),
        at: base + 50,
        version: "0.1".into(),
        facts: Some(("{}".into(), "x".into())),
        ca_bundle: None,
        keys_version: Some(3),
        paused: Some("paused since then: incident 42".into()),
    }])
    .unwrap();
    assert_eq!(db.node_rows(Some("web1")).unwrap()[0].paused.as_deref(), Some("paused since then: incident 42"));
    let body = |i: i64| format!("{{\"run\":{i}}}");
    let bodies: Vec<String> = (0..300).map(body).collect();
    let row = ReportRow {
        node: "web1",
        at: base + 160,
        changed: 2,
        dry_run: false,
        failed: 0,
        unplanned: 0,
        stale: false,
        serial: Some(7),
        commit: Some("abc"),
        body: &bodies[0],
        digest: "{}",
    };
    for b in &bodies[..55] {
        db.add_report(&ReportRow { body: b, ..row.clone() }, 50).unwrap();
    }
    let all = ReportFilter { node: Some("web1".into()), limit: 1000, ..ReportFilter::default() };
    assert_eq!(db.reports(&all).unwrap().len(), 50, "bounded per node");
    // The same report sent again (to another server) is stored once.
    db.add_report(&ReportRow { body: &bodies[54], ..row.clone() }, 50).unwrap();
    assert_eq!(db.reports(&all).unwrap().len(), 50);
    assert_eq!(db.reports(&ReportFilter { limit: 1, ..all.clone() }).unwrap()[0].body, "", "no bodies unless asked");
    db.add_report(&ReportRow { failed: 1, at: base + 170, body: &bodies[60], ..row.clone() }, 50).unwrap();
    let failed = db.reports(&ReportFilter { failed: true, limit: 10, ..ReportFilter::default() }).unwrap();
    assert_eq!((failed.len(), failed[0].received, failed[0].commit.as_deref()), (1, base + 170, Some("abc")));
    let since = db.reports(&ReportFilter { since: Some(base + 165), limit: 100, ..ReportFilter::default() }).unwrap();
    assert_eq!(since.len(), 1);
    let one = db.report(failed[0].id).unwrap().unwrap();
    assert_eq!((one.failed, one.body.as_str()), (1, bodies[60].as_str()));
    assert!(db.report(-1).unwrap().is_none());
    // A dry-run is not a run.
    db.add_report(&ReportRow { at: base + 180, changed: 3, dry_run: true, body: &bodies[61], ..row.clone() }, 50)
        .unwrap();
    let n = &db.nodes().unwrap()[0];
    assert_eq!((n.last_report, n.dry_run_pending), (Some((base + 170, 2, 1, false)), Some(3)));
    db.add_report(&ReportRow { at: base + 190, changed: 0, body: &bodies[62], ..row.clone() }, 50).unwrap();
    let n = &db.nodes().unwrap()[0];
    assert_eq!((n.last_report, n.dry_run_pending), (Some((base + 190, 0, 0, false)), None));

    // Retention: the day before the window goes whole (rows from the file, a partition from
    // PostgreSQL); later days stay.
    for (i, at) in [10, 11, 12, 13, 14].into_iter().enumerate() {
        db.add_report(&ReportRow { node: "web2", at: DAY + at, body: &bodies[100 + i], ..row.clone() }, 50).unwrap();
    }
    match db.prune_reports(2 * DAY, 2, base).unwrap() {
        Pruned::Rows(n) => assert_eq!(n, 5, "all five, two at a time"),
        Pruned::Partitions(p) => assert!(p.contains(&"reports_d1".to_string()), "{p:?}"),
    }
    let web2 = ReportFilter { node: Some("web2".into()), limit: 100, ..ReportFilter::default() };
    assert!(db.reports(&web2).unwrap().is_empty());
    assert_eq!(db.reports(&all).unwrap().len(), 50, "newer ones stay");

    // A visit without a pause ends it; the facts stay as they were.
    let visit = Visit {
        node: "web1".into(),
        at: base + 60,
        version: "0.1".into(),
        facts: None,
        ca_bundle: None,
        keys_version: None,
        paused: None,
    };
    db.seen(&[visit]).unwrap();
    let n = db.node("web1").unwrap().unwrap();
    assert_eq!((n.row.paused, n.row.last_seen, n.facts.as_deref()), (None, Some(base + 60), Some("{}")));

    // Certificates: watched by time, revoked, renewed.
    assert!(db.live_cert("web1", base + 500).unwrap());
    assert!(!db.live_cert("web1", base + 1000).unwrap(), "expired");
    assert_eq!(db.certs_changed(base + 1).unwrap().len(), 0);
    db.add_renewal("fp2", "web1", "fp1", base + 10, base + 2000).unwrap();
    let changed = db.certs_changed(base + 1).unwrap();
    assert_eq!(changed.len(), 1);
    assert_eq!((changed[0].0.as_str(), changed[0].1.replaces.as_deref()), ("fp2", Some("fp1")));
    db.renewal_used("fp2", base + 20).unwrap();
    assert_eq!(db.cert("fp1").unwrap().unwrap().revoked, Some(base + 20));
    assert_eq!(db.cert("fp2").unwrap().unwrap().replaces, None);
    assert_eq!(db.certs_changed(base + 15).unwrap().len(), 1, "the revocation shows");
    assert_eq!(db.certs_changed(i64::MIN).unwrap().len(), 2, "everything");
    assert_eq!(db.revoke("web1", base + 600).unwrap(), 1);
    assert!(!db.live_cert("web1", base + 500).unwrap());
    let nodes = db.nodes().unwrap();
    assert_eq!(nodes.len(), 1);
    assert!(nodes[0].revoked);
    assert_eq!(nodes[0].last_seen, Some(base + 60));
    assert_eq!(db.keys_versions(base).unwrap(), vec![]);
    assert_eq!(db.node("web1").unwrap().unwrap().facts.as_deref(), Some("{}"));
    assert!(db.node("nobody").unwrap().is_none());
    assert_eq!(db.count_nodes().unwrap(), 1);

    // A token is spent once, whichever server asks first.
    let glob = |p: &str, n: &str| converge_server::site::glob_match(p, n);
    db.add_token("t", "web*", 100, 200).unwrap();
    assert_eq!(db.spend_token("t", "db1", 150, glob).unwrap(), Err("the token is for `web*`, not `db1`".into()));
    assert_eq!(db.spend_token("t", "web3", 150, glob).unwrap(), Ok(()));
    assert!(db.spend_token("t", "web4", 150, glob).unwrap().unwrap_err().contains("already used"));

    // Enrollment requests: the first key keeps the name.
    use converge_server::db::Pending;
    assert_eq!(db.pending("new1", "K1", "sha256:aaaaaaaaaaaaaaaaaaaa", "10.0.0.1", base).unwrap(), Pending::Waiting);
    assert!(matches!(db.pending("new1", "K2", "sha256:bb", "10.0.0.2", base).unwrap(), Pending::Refused(_)));
    assert_eq!(db.pending_list(base).unwrap().len(), 1);
    assert!(db.approve("new1", "sha256:aaaaaaaaaaaaaaaa", base).unwrap().is_ok());
    assert_eq!(db.pending("new1", "K1", "sha256:aaaaaaaaaaaaaaaaaaaa", "10.0.0.1", base).unwrap(), Pending::Approved);
    assert!(db.reject("new1").unwrap());

    // A catalog is stored over the one it replaces only, and never over a later agreement's.
    db.add_cert("fp9", "db1", base, base + 1000).unwrap();
    assert!(db.store_catalog("db1", &catalog(1, "e1", 1), None).unwrap());
    assert!(!db.store_catalog("db1", &catalog(2, "e2", 1), None).unwrap(), "one was stored first");
    assert!(db.store_catalog("db1", &catalog(3, "e3", 2), Some("e1")).unwrap());
    assert!(!db.store_catalog("db1", &catalog(4, "e4", 2), Some("e1")).unwrap(), "not over the one it read");
    assert!(!db.store_catalog("db1", &catalog(5, "e5", 1), Some("e3")).unwrap(), "not over a later agreement");
    let s = db.stored("db1").unwrap().unwrap();
    assert_eq!((s.serial, s.etag.as_str(), s.epoch, s.envelope), (3, "e3", 2, vec![0, 159, 255]));
    db.forget_catalog("db1").unwrap();
    assert_eq!(db.stored("db1").unwrap().unwrap().cache_key, "");
    db.set_seal_key("db1", "age1xyz").unwrap();
    assert_eq!(db.seal_key("db1").unwrap().as_deref(), Some("age1xyz"));
    assert_eq!(db.seal_key("nobody").unwrap(), None);

    // One agreement on the current commit: a proposal over a stale one loses.
    assert_eq!(db.agreed().unwrap(), None);
    assert!(db.propose(0, "c1", "a:1", 1).unwrap());
    assert!(!db.propose(0, "c0", "b:1", 1).unwrap(), "the first proposal made the agreement");
    assert!(db.propose(1, "c2", "b:1", 2).unwrap());
    assert!(!db.propose(1, "c3", "a:1", 3).unwrap(), "proposed over an agreement that changed");
    assert_eq!(db.agreed().unwrap(), Some((2, "c2".to_string())));
    assert!(db.is_operator("nope", 0).is_ok_and(|x| !x));
    db.add_operator("op", 0, 10).unwrap();
    assert!(db.is_operator("op", 5).unwrap());
}

#[test]
fn the_embedded_file() {
    let t = tempfile::tempdir().unwrap();
    exercise(&Db::open(&t.path().join("state.db"), 2).unwrap());
    // The store survives a reopen.
    let db = Db::open(&t.path().join("state.db"), 1).unwrap();
    assert_eq!(db.count_nodes().unwrap(), 2);
}

#[test]
fn postgresql() {
    if !available() {
        return;
    }
    let pg = Postgres::start();
    let store = converge_server::pg::Pg::new(&pg.url(), 4, None).unwrap();
    store.block(store.migrate(10 * DAY)).unwrap();
    let db = Db::postgres(store);
    exercise(&db);
    // PostgreSQL away: an error that says where, within the time allowed; back: answers again.
    pg.stop();
    let e = db.count_nodes().unwrap_err().to_string();
    assert!(e.contains("PostgreSQL at 127.0.0.1:"), "{e}");
    pg.start_again();
    let back = (0..50).find_map(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        db.count_nodes().ok()
    });
    assert_eq!(back, Some(2), "reconnects on its own");
}

/// With `database_ca`, the state goes over TLS checked against that CA: a database that
/// refuses plaintext is reached; without it, or with another CA, it is not (and says why).
#[test]
fn postgresql_over_tls_checked_against_the_database_ca() {
    if !available() {
        return;
    }
    let pg = Postgres::start();
    let t = tempfile::tempdir().unwrap();
    // A CA and a certificate for 127.0.0.1, as converge makes its own.
    let ca = converge_server::ca::Ca::create(t.path(), &[], &["127.0.0.1".parse().unwrap()]).unwrap();
    let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap();
    pg.require_tls(&read("server.pem"), &read("server.key"));
    let ca_file = t.path().join("ca.pem");
    let store = converge_server::pg::Pg::new(&pg.url(), 2, Some(&ca_file)).unwrap();
    // Just restarted: a moment's "starting up" is retried, anything that lasts is the error.
    let mut tries = 0;
    while let Err(e) = store.block(store.migrate(10 * DAY)) {
        tries += 1;
        assert!(tries < 30, "{e:#}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(Db::postgres(store).count_nodes().unwrap(), 0, "over TLS");
    let plain = Db::postgres(converge_server::pg::Pg::new(&pg.url(), 1, None).unwrap());
    let e = format!("{:#}", plain.count_nodes().unwrap_err());
    assert!(e.contains("no encryption") || e.contains("pg_hba.conf"), "{e}");
    // Another CA: the server's certificate is not believed.
    let other = tempfile::tempdir().unwrap();
    converge_server::ca::Ca::create(other.path(), &[], &["127.0.0.1".parse().unwrap()]).unwrap();
    let wrong = Db::postgres(converge_server::pg::Pg::new(&pg.url(), 1, Some(&other.path().join("ca.pem"))).unwrap());
    let e = format!("{:#}", wrong.count_nodes().unwrap_err());
    assert!(e.contains("certificate") || e.contains("UnknownIssuer"), "{e}");
    // sslmode=require without a CA to check against is refused at once.
    let e = converge_server::pg::Pg::new(&format!("{}?sslmode=require", pg.url()), 1, None).err().unwrap();
    assert!(e.to_string().contains("database_ca"), "{e}");
    drop(ca);
}
