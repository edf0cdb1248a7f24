//! The fleet page with N nodes: what an operator waits for when they open it.
//!
//! A real server state (`converge-server init` over `catalogs/`), N enrolled nodes each with a
//! last report: 1% failing, 2% late, 10% changed, the rest in sync. Measured in-process on the
//! server's own code, medians of 9:
//! - the page: `/` (every node), and `/?status=failed` (what an operator opens first);
//! - the baseline: the same rows read from the database and written as JSON (what the data
//!   costs to move at all, before any HTML).
//!
//! Printed: the times, the ratio, and the page's size.

use converge_server::db::{Db, ReportRow, Visit};
use std::time::{Duration, Instant};

fn time(mut f: impl FnMut() -> usize) -> (Duration, usize) {
    let mut size = 0;
    let runs = (0..9)
        .map(|_| {
            let t = Instant::now();
            size = std::hint::black_box(f());
            t.elapsed()
        })
        .collect();
    (crate::median(runs), size)
}

pub fn run(sizes: &[usize]) {
    println!("the fleet page, in-process, medians of 9 (1% failing, 2% late, 10% changed)");
    println!(
        "| nodes | `/` | `/?status=failed` | baseline: rows as JSON | `/` / baseline | `/` size | failed-only size |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for &n in sizes {
        let (_, state) = crate::serve::init_server("page");
        let db = Db::open(&state.join("state.db"), 1).unwrap();
        let now = converge_server::db::now();
        let body = r#"{"format":1,"resources":[]}"#;
        let mut visits = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("node-{i:05}.example.com");
            db.add_cert(&format!("sha256:{i:064x}"), &name, now - 86_400, now + 90 * 86_400).unwrap();
            let at = if i % 50 == 7 { now - 7_200 } else { now - 60 };
            let report = ReportRow {
                node: &name,
                at,
                changed: i64::from(i % 10 == 3),
                dry_run: false,
                failed: if i % 100 == 5 { 2 } else { 0 },
                unplanned: 0,
                stale: false,
                serial: Some(1_796_000_000_000 + i as u64),
                commit: Some("0123456789abcdef0123456789abcdef01234567"),
                body,
                digest: "{}",
            };
            db.add_report(&report, converge_server::db::REPORTS_PER_NODE).unwrap();
            visits.push(Visit {
                node: name,
                at,
                version: "0.1.0".into(),
                facts: None,
                ca_bundle: None,
                keys_version: None,
                paused: None,
            });
        }
        db.seen(&visits).unwrap();
        drop(db);
        let config = converge_server::config::Config::read(&state.join("server.toml")).unwrap();
        let fleet = converge_server::fleet::Fleet::open(config).unwrap();
        let (page, size) = time(|| converge_server::page::fleet_page(&fleet, None).unwrap().unwrap().len());
        let (failed, failed_size) =
            time(|| converge_server::page::fleet_page(&fleet, Some("failed")).unwrap().unwrap().len());
        let (base, _) = time(|| {
            let rows = fleet.db.nodes().unwrap();
            let views: Vec<_> = rows.iter().map(|r| converge_server::view::node_view(r, None, now, 3_600)).collect();
            serde_json::to_string(&views).unwrap().len()
        });
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        println!(
            "| {n} | {} | {} | {} | {:.2}x | {:.0} KiB | {:.0} KiB |",
            ms(page),
            ms(failed),
            ms(base),
            page.as_secs_f64() / base.as_secs_f64(),
            size as f64 / 1024.0,
            failed_size as f64 / 1024.0
        );
        let _ = std::fs::remove_dir_all(state.parent().unwrap());
    }
}
