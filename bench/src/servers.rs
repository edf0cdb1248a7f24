//! Several servers on PostgreSQL against one on its embedded SQLite file, with a fleet of
//! simulated hosts enrolled with keys and certificates of their own (`converge-bench servers
//! [NODES REPORTS CONCURRENCY]`, 100,000 hosts and 1,000,000 reports by default).
//!
//! In one run, on this machine (server processes, PostgreSQL and the simulated hosts share its
//! cores), each setup answers every host's conditional poll twice over mutual TLS with fresh
//! connections (resumed sessions), host `i` asking server `i mod k`: a first round, where a
//! server that has just started reads each host's catalog from the database once, and the
//! steady round that is measured. Printed per setup: polls/s, p50 and p99, the servers' CPU per
//! poll, PostgreSQL's, and the database statements per poll (the servers' own count,
//! `converge_db_statements_total`). Then reports through the API (reports/s, statements per
//! report), the bytes each report takes in each database, and each database's size after
//! 1,000,000 reports over three weeks once retention (14 days) has run. The baseline measured
//! in the same run is one server on SQLite.

use crate::serve::{Node, connect_tls, cpu_seconds, peak_rss, phase, post};
use converge_e2e::postgres::Postgres;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, RwLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Fleet = Arc<RwLock<Vec<Node>>>;

/// A GET on a fresh connection; the body.
async fn get(node: &Node, addr: &str, path: &str) -> String {
    let Ok(mut s) = connect_tls(node.from, addr, node.tls.clone()).await else { return String::new() };
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The statements a server has sent to its database, from its `/healthz` (less the one
/// count of nodes that answer costs).
async fn statements(node: &Node, addr: &str) -> f64 {
    let page = get(node, addr, "/healthz").await;
    let body = page.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(body.trim()).unwrap_or_default();
    json["db_statements"].as_f64().map_or(f64::NAN, |n| n - 1.0)
}

/// CPU seconds PostgreSQL has used: the postmaster, its children alive, and those it reaped.
fn postgres_cpu(pg: &Postgres) -> f64 {
    let pid: u32 = std::fs::read_to_string(pg.dir().join("data/postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next()?.trim().parse().ok())
        .unwrap_or(0);
    if pid == 0 {
        return f64::NAN;
    }
    let mut total = cpu_seconds(pid) + reaped_cpu(pid);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        let parent = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
        if parent == Some(pid) {
            total += cpu_seconds(child);
        }
    }
    total
}

/// CPU seconds of `pid`'s children it has waited for (cutime, cstime).
fn reaped_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<f64> =
        stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    // cutime and cstime are fields 16 and 17; the state (field 3) is the first after ')'.
    (f.get(13).copied().unwrap_or(0.0) + f.get(14).copied().unwrap_or(0.0)) / 100.0
}

fn start(server_bin: &Path, config: &Path) -> (Child, String) {
    let mut child = Command::new(server_bin)
        .args(["serve", "--config", &config.display().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        line.split("https://")
            .nth(1)
            .unwrap_or_else(|| panic!("the server did not start: {line}"))
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    (child, addr)
}

fn server(server_bin: &Path, args: &[&str]) -> String {
    let out = Command::new(server_bin).args(args).output().unwrap();
    assert!(out.status.success(), "converge-server {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One setup's figures.
struct Setup {
    name: String,
    polls_per_s: f64,
    p50: f64,
    p99: f64,
    server_cpu_us: f64,
    db_cpu_us: f64,
    first_round_statements: f64,
    statements: f64,
    rss: f64,
    errors: usize,
}

impl Setup {
    fn print(&self) {
        println!(
            "{:<26} {:>8.0}/s {:>7.2}ms {:>7.2}ms {:>9.0}us {:>9.0}us {:>10.2} {:>10.3} {:>8.0}MiB {:>6}",
            self.name,
            self.polls_per_s,
            self.p50,
            self.p99,
            self.server_cpu_us,
            self.db_cpu_us,
            self.first_round_statements,
            self.statements,
            self.rss,
            self.errors
        );
    }
}

/// Every host polls twice (host `i` asking server `i mod k`); the second round is measured.
fn polls(
    rt: &tokio::runtime::Runtime,
    fleet: &Fleet,
    servers: &[(Child, String)],
    pg: Option<&Postgres>,
    name: &str,
    concurrency: usize,
) -> Setup {
    let n = fleet.read().unwrap().len();
    let addrs: Arc<Vec<String>> = Arc::new(servers.iter().map(|(_, a)| a.clone()).collect());
    let body = crate::serve::catalog_body();
    let count = |rt: &tokio::runtime::Runtime| -> f64 {
        let f = fleet.read().unwrap();
        addrs.iter().map(|a| rt.block_on(statements(&f[0], a))).sum()
    };
    let round = |rt: &tokio::runtime::Runtime| {
        let (f, a, b) = (fleet.clone(), addrs.clone(), body.clone());
        rt.block_on(phase("poll", (0..n).collect(), concurrency, move |i| {
            let (tls, from, etag) = {
                let node = &f.read().unwrap()[i];
                (node.tls.clone(), node.from, node.etag.clone())
            };
            let (a, b) = (a.clone(), b.clone());
            async move { post(from, &a[i % a.len()], tls, "/v1/catalog", &b, etag.as_deref()).await }
        }))
        .0
    };
    // Visits are written once a second: each count waits for the last ones.
    let settle = || std::thread::sleep(std::time::Duration::from_millis(1500));
    let s0 = count(rt);
    let first = round(rt);
    settle();
    let s1 = count(rt);
    let cpu = || servers.iter().map(|(c, _)| cpu_seconds(c.id())).sum::<f64>();
    let (c0, d0) = (cpu(), pg.map_or(0.0, postgres_cpu));
    let steady = round(rt);
    settle();
    let (c1, d1) = (cpu(), pg.map_or(0.0, postgres_cpu));
    let s2 = count(rt);
    let polled = steady.len().max(1) as f64;
    Setup {
        name: name.to_string(),
        polls_per_s: steady.rate(),
        p50: steady.percentile(0.5),
        p99: steady.percentile(0.99),
        server_cpu_us: (c1 - c0) / polled * 1e6,
        db_cpu_us: (d1 - d0) / polled * 1e6,
        // The statements counted include the /metrics reads' (none) and the visits written.
        first_round_statements: (s1 - s0) / n as f64,
        statements: (s2 - s1) / polled,
        rss: servers.iter().map(|(c, _)| peak_rss(c.id())).fold(0.0, f64::max),
        errors: first.errors + steady.errors,
    }
}

/// A report like an agent's after a run of 20 resources, one changed.
fn report_body(node: &str, i: usize) -> Vec<u8> {
    report_of(node, i, "4f1d2c3b4a5968778695a4b3c2d1e0f9a8b7c6d5", 1_780_000_000_000)
}

/// [`report_body`], of a run of `commit` at `serial`.
pub fn report_of(node: &str, i: usize, commit: &str, serial: u64) -> Vec<u8> {
    use converge_modules::report::{ResourceEvent, Status, Summary};
    let mut summary = Summary::default();
    let resources: Vec<ResourceEvent> = (0..20)
        .map(|k| {
            let status = if k == 0 { Status::Changed } else { Status::Unchanged };
            summary.count(&status);
            ResourceEvent {
                id: format!("file:/etc/app/conf.d/part-{k:02}.conf"),
                status,
                duration_ms: 0.4,
                ..Default::default()
            }
        })
        .collect();
    summary.duration_ms = 38.0;
    let report = converge_modules::wire::Report {
        started_at: converge_modules::time::Timestamp(1_780_000_000 + i as i64),
        info: converge_modules::report::RunInfo {
            catalog: "https://converge.example:8443".into(),
            host: Some(node.to_string()),
            serial: Some(serial),
            commit: Some(commit.into()),
            dry_run: false,
            resources: 20,
            signed_by: Some("ed25519:2b7e151628aed2a6".into()),
            warnings: vec![],
        },
        resources,
        summary,
        stale: false,
    };
    serde_json::to_vec(&report).unwrap()
}

/// `reports` reports through the API, spread over the servers, numbered from `first` (a
/// report sent again is stored once); (reports/s, statements per report, errors).
fn send_reports(
    rt: &tokio::runtime::Runtime,
    fleet: &Fleet,
    addrs: &[String],
    (first, reports): (usize, usize),
    concurrency: usize,
) -> (f64, f64, usize) {
    let n = fleet.read().unwrap().len();
    let addrs = Arc::new(addrs.to_vec());
    let before: f64 = addrs.iter().map(|a| rt.block_on(statements(&fleet.read().unwrap()[0], a))).sum();
    let (f, a) = (fleet.clone(), addrs.clone());
    let (p, _) = rt.block_on(phase("report", (0..reports).collect(), concurrency, move |r| {
        let i = r % n;
        let (tls, from, name) = {
            let node = &f.read().unwrap()[i];
            (node.tls.clone(), node.from, node.name.clone())
        };
        let a = a.clone();
        async move { post(from, &a[r % a.len()], tls, "/v1/reports", &report_body(&name, first + r), None).await }
    }));
    let after: f64 = addrs.iter().map(|a| rt.block_on(statements(&fleet.read().unwrap()[0], a))).sum();
    (p.rate(), (after - before) / reports as f64, p.errors)
}

fn stop(servers: Vec<(Child, String)>) {
    for (mut c, _) in servers {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The embedded file's size in use (pages not on its free list), in bytes.
fn sqlite_size(db: &Path) -> f64 {
    let c = rusqlite::Connection::open(db).unwrap();
    let q = |p: &str| c.query_row(&format!("PRAGMA {p}"), [], |r| r.get::<_, i64>(0)).unwrap() as f64;
    (q("page_count") - q("freelist_count")) * q("page_size")
}

fn pg_size(pg: &Postgres) -> f64 {
    pg.sql("SELECT pg_database_size('converge')").trim().parse().unwrap_or(f64::NAN)
}

/// `total` reports over the three weeks before now, as the API stores them (the body of a real
/// report, its digest and hash), written straight into each database.
fn fill_sqlite(db: &Path, nodes: usize, total: usize, now: i64) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.execute_batch("BEGIN").unwrap();
    {
        let mut s = c
            .prepare("INSERT INTO reports (node, received, changed, failed, stale, serial, body, commit_id, digest, dry_run, body_sha256) VALUES (?1, ?2, 1, 0, 0, 1, ?3, 'c', '{}', 0, ?4)")
            .unwrap();
        for r in 0..total {
            let node = format!("node-{:05}.example.com", r % nodes);
            let body = String::from_utf8(report_body(&node, r)).unwrap();
            let at = now - 21 * 86_400 + (r as i64 * 21 * 86_400) / total as i64;
            s.execute(rusqlite::params![node, at, body, format!("{r:064x}")]).unwrap();
        }
    }
    c.execute_batch("COMMIT").unwrap();
}

fn fill_postgres(pg: &Postgres, nodes: usize, total: usize, now: i64) {
    let body = String::from_utf8(report_body("NODE", 0)).unwrap().replace('\'', "''");
    for day in -22..=1 {
        let t = now + day * 86_400;
        let day = t - t.rem_euclid(86_400);
        pg.sql(&format!(
            "CREATE TABLE IF NOT EXISTS reports_d{} PARTITION OF reports FOR VALUES FROM ({day}) TO ({})",
            day / 86_400,
            day + 86_400
        ));
    }
    // In slices, so that no one statement holds everything.
    let slice = 100_000;
    for start in (0..total).step_by(slice) {
        let end = (start + slice).min(total);
        pg.sql(&format!(
            "INSERT INTO reports (node, received, changed, failed, stale, serial, body, commit_id, digest, dry_run, body_sha256)
             SELECT n, {now} - 21 * 86400 + (g::bigint * 21 * 86400) / {total}, 1, 0, false, 1,
                    replace(replace('{body}', 'NODE', n), '1780000000,', (1780000000 + g)::text || ','), 'c', '{{}}', false, md5(g::text)
             FROM generate_series({start}, {}) g, LATERAL (SELECT 'node-' || lpad((g % {nodes})::text, 5, '0') || '.example.com' AS n) x",
            end - 1
        ));
    }
}

pub fn run(nodes: usize, reports: usize, concurrency: usize) {
    if let Some(why) = converge_e2e::postgres::unavailable() {
        eprintln!("converge-bench servers needs PostgreSQL here: {why}");
        std::process::exit(1);
    }
    let (server_bin, state) = crate::serve::init_server("servers");
    let fleet: Fleet = Arc::new(RwLock::new(crate::serve::enroll_nodes(&state, nodes)));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let config = state.join("server.toml");
    println!(
        "{nodes} hosts enrolled, each polling over mutual TLS with a fresh connection, {concurrency} at a time; host i asks server i mod k"
    );
    println!(
        "{:<26} {:>10} {:>9} {:>9} {:>11} {:>11} {:>10} {:>10} {:>11} {:>6}",
        "setup", "polls", "p50", "p99", "server CPU", "db CPU", "stmts 1st", "stmts/poll", "server RSS", "errors"
    );

    // The baseline: one server on its embedded file. Every host's first catalog is compiled
    // here, then polled.
    let sqlite = vec![start(&server_bin, &config)];
    {
        let (f, a, b) = (fleet.clone(), Arc::new(sqlite[0].1.clone()), crate::serve::catalog_body());
        let (first, etags) = rt.block_on(phase("first fetch", (0..nodes).collect(), concurrency, move |i| {
            let (tls, from) = {
                let node = &f.read().unwrap()[i];
                (node.tls.clone(), node.from)
            };
            let (a, b) = (a.clone(), b.clone());
            async move { post(from, &a, tls, "/v1/catalog", &b, None).await }
        }));
        assert_eq!(first.errors, 0, "every host gets its first catalog");
        for (i, etag) in etags {
            fleet.write().unwrap()[i].etag = etag;
        }
    }
    let base = polls(&rt, &fleet, &sqlite, None, "1 server, SQLite", concurrency);
    base.print();
    let http_reports = (nodes / 5).max(1);
    let (sqlite_rate, sqlite_stmts, e1) =
        send_reports(&rt, &fleet, &[sqlite[0].1.clone()], (0, http_reports), concurrency);
    stop(sqlite);

    // The same state moved into PostgreSQL, and two more servers made from the first.
    let pg = Postgres::start();
    pg.serve_from(&config.display().to_string(), "");
    server(&server_bin, &["db", "import", "--config", &config.display().to_string()]);
    let dir = state.parent().unwrap().to_path_buf();
    let mut configs = vec![config.clone()];
    for name in ["b", "c"] {
        let out = dir.join(format!("state-{name}"));
        server(
            &server_bin,
            &[
                "server",
                "add",
                "--config",
                &config.display().to_string(),
                "--out",
                &out.display().to_string(),
                "--address",
                "127.0.0.1",
                "--listen",
                "127.0.0.1:0",
            ],
        );
        configs.push(out.join("server.toml"));
    }
    let mut setups = Vec::new();
    for k in 1..=3 {
        let servers: Vec<(Child, String)> = configs[..k].iter().map(|c| start(&server_bin, c)).collect();
        let s = polls(
            &rt,
            &fleet,
            &servers,
            Some(&pg),
            &format!("{k} server{}, PostgreSQL", if k > 1 { "s" } else { "" }),
            concurrency,
        );
        s.print();
        setups.push(s);
        stop(servers);
    }
    let servers: Vec<(Child, String)> = configs[..2].iter().map(|c| start(&server_bin, c)).collect();
    let addrs: Vec<String> = servers.iter().map(|(_, a)| a.clone()).collect();
    let (pg_rate, pg_stmts, e2) = send_reports(&rt, &fleet, &addrs, (http_reports, http_reports), concurrency);
    stop(servers);
    println!(
        "reports through the API ({http_reports} of 20 resources): SQLite {sqlite_rate:.0}/s ({sqlite_stmts:.1} statements each), PostgreSQL with 2 servers {pg_rate:.0}/s ({pg_stmts:.1} statements each); errors {}",
        e1 + e2
    );

    // Storage: a million reports over three weeks, then retention.
    let now = converge_server::db::now();
    let file = state.join("state.db");
    let (s0, p0) = (sqlite_size(&file), pg_size(&pg));
    fill_sqlite(&file, nodes, reports, now);
    fill_postgres(&pg, nodes, reports, now);
    let (s1, p1) = (sqlite_size(&file), pg_size(&pg));
    let sqlite_config = state.join("sqlite.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let text: String = text.lines().filter(|l| !l.starts_with("database")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&sqlite_config, text).unwrap();
    let t = std::time::Instant::now();
    server(&server_bin, &["db", "prune", "--config", &sqlite_config.display().to_string()]);
    let sqlite_prune = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let dropped = server(&server_bin, &["db", "prune", "--config", &config.display().to_string()]);
    let pg_prune = t.elapsed().as_secs_f64();
    let (s2, p2) = (sqlite_size(&file), pg_size(&pg));
    let mib = |b: f64| b / (1024.0 * 1024.0);
    println!(
        "{reports} reports over 21 days: bytes per report SQLite {:.0}, PostgreSQL {:.0}; after retention (14 days) SQLite {:.0} MiB in use (was {:.0}; {sqlite_prune:.1} s of row deletes), PostgreSQL {:.0} MiB (was {:.0}; {pg_prune:.1} s: {})",
        (s1 - s0) / reports as f64,
        (p1 - p0) / reports as f64,
        mib(s2),
        mib(s1),
        mib(p2),
        mib(p1),
        dropped.trim()
    );
    println!(
        "the steady poll: {:.3} database statements per poll on PostgreSQL (SQLite {:.3}); 1 server on PostgreSQL answers {:.2}x the polls of 1 on SQLite; 2 servers {:.2}x, 3 servers {:.2}x (all on this machine's {} cores with PostgreSQL and the simulated hosts)",
        setups[0].statements,
        base.statements,
        setups[0].polls_per_s / base.polls_per_s,
        setups[1].polls_per_s / base.polls_per_s,
        setups[2].polls_per_s / base.polls_per_s,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let per_poll = setups.iter().map(|s| s.server_cpu_us).sum::<f64>() / 3.0;
    println!(
        "scaling: a poll costs the servers {per_poll:.0} us of CPU and PostgreSQL {:.1} us, so polls scale with the servers' cores ({:.0} polls/s per core given to servers alone), and the database carries reports and changes only: at one poll per 30 minutes a core serves {:.0} hosts",
        setups.iter().map(|s| s.db_cpu_us).sum::<f64>() / 3.0,
        1e6 / per_poll,
        1e6 / per_poll * 1800.0
    );
    drop(pg);
    let _ = std::fs::remove_dir_all(dir);
}
