//! The compiler's throughput: N generated nodes over roles like those of `catalogs/` (the same
//! roles and templates, a dozen admins and three virtual hosts, so about 60 resources and 4-5
//! templates a node; a tenth of the nodes have data of their own), compiled on every core.
//!
//! Each compile is classify -> resolve -> render -> decode -> check -> JSON, the bytes a server
//! would sign. The baseline, measured in the same run on the same catalogs, is what a catalog
//! costs just to move: serialize it to JSON and parse it back. Printed: catalogs per second,
//! latency per catalog (p50, p99), the ratio to the baseline, and peak RSS.

use converge_modules::catalog::Catalog;
use converge_server::compiler::Compiler;
use converge_server::repo::Repo;
use serde_json::Map;
use std::path::Path;
use std::time::{Duration, Instant};

fn repo(n: usize) -> Repo {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../catalogs");
    let mut repo = Repo::from_dir(&dir).expect("catalogs/ loads");
    let admins: String = (0..12)
        .map(|i| {
            format!(
                "  - name: admin{i:02}\n    uid: {}\n    comment: Admin number {i}\n    ssh_keys: [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{i:02}examplekey admin{i:02}@laptop\"]\n",
                3000 + i
            )
        })
        .collect();
    let common = String::from_utf8(repo.files["data/common.yaml"].clone()).unwrap();
    let common = common.replacen("admins:\n", &format!("admins:\n{admins}"), 1);
    repo.files.insert("data/common.yaml".into(), common.into_bytes());
    repo.files.insert(
        "site.yaml".into(),
        std::fs::read_to_string(dir.join("site.yaml"))
            .unwrap()
            .replace("web*.example.com", "web-*")
            .replace("db*.example.com", "db-*")
            .into_bytes(),
    );
    let vhosts = "\n  - file: \"/etc/nginx/sites-available/{{ item }}.conf\"\n    for_each: \"['shop', 'blog', 'api']\"\n    template: nginx-site.conf.j2\n    mode: \"0644\"\n    notify: [service:nginx]\n  - symlink: \"/etc/nginx/sites-enabled/{{ item }}.conf\"\n    for_each: \"['shop', 'blog', 'api']\"\n    target: \"/etc/nginx/sites-available/{{ item }}.conf\"\n";
    let web = String::from_utf8(repo.files["roles/web.yaml"].clone()).unwrap() + vhosts;
    repo.files.insert("roles/web.yaml".into(), web.into_bytes());
    for i in (0..n).step_by(10) {
        repo.files.insert(
            format!("data/node/{}.yaml", node(i)),
            format!("params:\n  web:\n    listen_port: {}\n", 8000 + i % 100).into_bytes(),
        );
    }
    repo
}

fn node(i: usize) -> String {
    if i % 4 == 3 { format!("db-{i:05}") } else { format!("web-{i:05}") }
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub fn run(sizes: &[usize]) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "catalog compiler over generated nodes, {cores} threads; baseline: a JSON round trip of each compiled catalog"
    );
    println!(
        "{:>7}  {:>9}  {:>11}  {:>9}  {:>9}  {:>12}  {:>6}  {:>9}",
        "nodes", "resources", "catalogs/s", "p50", "p99", "baseline/s", "ratio", "peak RSS"
    );
    for &n in sizes {
        let repo = repo(n);
        let t = Instant::now();
        let compiler = Compiler::new(&repo);
        let load = t.elapsed();
        assert!(compiler.problems.is_empty(), "{:?}", compiler.problems);
        let facts = Map::new();
        // Compile on every core; keep the JSON sizes, and latencies per catalog.
        let started = Instant::now();
        let results: Vec<(Vec<Duration>, usize, usize)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..cores)
                .map(|t| {
                    let (compiler, facts) = (&compiler, &facts);
                    s.spawn(move || {
                        let (mut lat, mut resources, mut bytes) = (Vec::new(), 0, 0);
                        for i in (t..n).step_by(cores) {
                            let t0 = Instant::now();
                            let c = compiler.compile(&node(i), facts).unwrap_or_else(|e| panic!("{}: {e:?}", node(i)));
                            let json = serde_json::to_vec(&c).unwrap();
                            lat.push(t0.elapsed());
                            resources += c.resources.len();
                            bytes += json.len();
                        }
                        (lat, resources, bytes)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let wall = started.elapsed();
        let mut lat: Vec<Duration> = results.iter().flat_map(|r| r.0.clone()).collect();
        lat.sort();
        let resources: usize = results.iter().map(|r| r.1).sum();
        let per_sec = n as f64 / wall.as_secs_f64();
        // The baseline on the same catalogs, on every core.
        let sample: Vec<Catalog> = (0..n.min(1000)).map(|i| compiler.compile(&node(i), &facts).unwrap()).collect();
        let rounds = n.div_ceil(sample.len());
        let b0 = Instant::now();
        std::thread::scope(|s| {
            for t in 0..cores {
                let sample = &sample;
                s.spawn(move || {
                    for k in (t..rounds * sample.len()).step_by(cores) {
                        let json = serde_json::to_vec(&sample[k % sample.len()]).unwrap();
                        let back: Catalog = serde_json::from_slice(&json).unwrap();
                        std::hint::black_box(back);
                    }
                });
            }
        });
        let baseline = (rounds * sample.len()) as f64 / b0.elapsed().as_secs_f64();
        println!(
            "{n:>7}  {:>9}  {per_sec:>11.0}  {:>7.2}ms  {:>7.2}ms  {baseline:>12.0}  {:>5.1}x  {:>6.1}MiB",
            resources / n,
            percentile(&lat, 0.5).as_secs_f64() * 1e3,
            percentile(&lat, 0.99).as_secs_f64() * 1e3,
            baseline / per_sec,
            peak_rss_mib()
        );
        println!("{n:>7}  (repository loaded and every template compiled in {:.1} ms)", load.as_secs_f64() * 1e3);
    }
}
