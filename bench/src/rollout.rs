//! How long a commit takes to reach the whole fleet, at once and in waves (`converge-bench
//! rollout [HOSTS INTERVAL_S WINDOW_S]`, 300 hosts polling every 6 s, a 3 s window, by default).
//!
//! One real server (the example repository, `repo_poll` 1 s) and simulated hosts enrolled with
//! certificates of their own. Each host polls for its catalog over mutual TLS every interval
//! (its own fixed offset within it, as a splay does), and after each new catalog reports a clean
//! run of the commit the catalog was compiled from (read from the envelope it got). Measured in
//! one run: the time from a commit to the last host's report of it without `rollout` (the
//! baseline), then with three waves (one canary host, 10 % of the rest, everyone), and each
//! wave's time; printed with their ratio and the model they follow (a wave opens a window after
//! its last host ran the commit, and its hosts take up to an interval to ask).

use crate::serve::{Node, enroll_nodes, init_server, start_server};
use base64ct::{Base64, Encoding};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Each host's last reported commit, and when.
type Seen = Arc<Mutex<HashMap<String, (String, Instant)>>>;

/// A request on a fresh connection; status, ETag and body.
async fn request(
    node: &Node,
    addr: &str,
    path: &str,
    body: &[u8],
    etag: Option<&str>,
) -> Option<(u16, Option<String>, Vec<u8>)> {
    crate::serve::exchange(node.from, addr, node.tls.clone(), path, body, etag).await.ok()
}

/// The commit and serial a catalog envelope was compiled from.
fn commit_of(envelope: &[u8]) -> Option<(String, u64)> {
    let env: converge_modules::trust::Envelope = serde_json::from_slice(envelope).ok()?;
    let payload = Base64::decode_vec(&env.payload).ok()?;
    let catalog: converge_modules::catalog::Catalog = serde_json::from_slice(&payload).ok()?;
    Some((catalog.source?.commit, catalog.serial?))
}

/// One simulated host: polls every `interval` from its offset, reports each new catalog's run.
async fn host(
    node: Node,
    i: usize,
    n: usize,
    addr: Arc<String>,
    interval: Duration,
    seen: Seen,
    stop: Arc<AtomicBool>,
) {
    tokio::time::sleep(interval * i as u32 / n as u32).await;
    let body = crate::serve::catalog_body();
    let mut held: Option<String> = None;
    let mut runs = 0;
    let mut tick = tokio::time::interval(interval);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let Some((status, tag, envelope)) = request(&node, &addr, "/v1/catalog", &body, held.as_deref()).await else {
            continue;
        };
        if status != 200 {
            continue;
        }
        let Some((commit, serial)) = commit_of(&envelope) else { continue };
        held = tag;
        runs += 1;
        let report = crate::servers::report_of(&node.name, runs, &commit, serial);
        if let Some((200..=299, _, _)) = request(&node, &addr, "/v1/reports", &report, None).await {
            seen.lock().unwrap().insert(node.name.clone(), (commit, Instant::now()));
        }
    }
}

fn git(repo: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git").arg("-C").arg(repo).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Commits `files` to the repository; its id.
fn commit(repo: &Path, files: &[(&str, &str)]) -> String {
    converge_e2e::write(repo, files);
    converge_e2e::git(repo, &["add", "-A"]);
    converge_e2e::git(repo, &["commit", "-q", "-m", "bench"]);
    git(repo, &["rev-parse", "HEAD"])
}

/// Waits until every host reported `commit`; the seconds from `t0` at which each did.
fn until_all(seen: &Seen, names: &[String], commit: &str, t0: Instant, limit: Duration) -> Vec<f64> {
    loop {
        {
            let s = seen.lock().unwrap();
            let done: Vec<f64> = names
                .iter()
                .filter_map(|n| {
                    s.get(n).filter(|(c, _)| c == commit).map(|(_, at)| at.duration_since(t0).as_secs_f64())
                })
                .collect();
            if done.len() == names.len() {
                return done;
            }
            assert!(t0.elapsed() < limit, "{} of {} hosts ran {commit} after {limit:?}", done.len(), names.len());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run(hosts: usize, interval_s: u64, window_s: u64) {
    let (server_bin, state) = init_server("rollout");
    let repo = state.parent().unwrap().join("repo");
    let config = state.join("server.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace("repo_poll = \"5s\"", "repo_poll = \"1s\"");
    std::fs::write(&config, text).unwrap();
    let fleet = enroll_nodes(&state, hosts);
    let names: Vec<String> = fleet.iter().map(|n| n.name.clone()).collect();
    let (mut server, addr) = start_server(&server_bin, &state);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (seen, stop): (Seen, _) = (Arc::default(), Arc::new(AtomicBool::new(false)));
    let interval = Duration::from_secs(interval_s);
    let addr = Arc::new(addr);
    for (i, node) in fleet.into_iter().enumerate() {
        rt.spawn(host(node, i, hosts, addr.clone(), interval, seen.clone(), stop.clone()));
    }
    let limit = Duration::from_secs(60 + 20 * (interval_s + window_s));
    let first = git(&repo, &["rev-parse", "HEAD"]);
    until_all(&seen, &names, &first, Instant::now(), limit);
    println!(
        "{hosts} simulated hosts, each asking every {interval_s} s (its own offset) over mutual TLS; the server looks at the repository every 1 s"
    );

    // The baseline: no rollout, a commit reaches every host at its next run.
    let motd = |v: &str| format!("{}\n# {v}\n", std::fs::read_to_string(repo.join("templates/motd.j2")).unwrap());
    let t0 = Instant::now();
    let plain = commit(&repo, &[("templates/motd.j2", &motd("plain"))]);
    let at = until_all(&seen, &names, &plain, t0, limit);
    let t_plain = at.iter().cloned().fold(0.0, f64::max);
    println!(
        "{:<44} {:>8.1} s   (worst case: repo poll + one interval = {} s)",
        "commit -> whole fleet, no waves",
        t_plain,
        1 + interval_s
    );

    // Waves: one canary, a tenth of the rest, everyone; the site change rolls out first.
    let site = std::fs::read_to_string(repo.join("site.yaml")).unwrap();
    let waves = format!(
        "{site}\nrollout:\n  window: {window_s}s\n  waves:\n    - name: canary\n      nodes: [{}]\n    - name: early\n      share: 10\n    - name: everyone\n",
        names[0]
    );
    let t = Instant::now();
    let with = commit(&repo, &[("site.yaml", &waves)]);
    until_all(&seen, &names, &with, t, limit);
    let t0 = Instant::now();
    let waved = commit(&repo, &[("templates/motd.j2", &motd("waves"))]);
    let at = until_all(&seen, &names, &waved, t0, limit);
    let t_waves = at.iter().cloned().fold(0.0, f64::max);
    let canary = at[0];
    let mut sorted = at.clone();
    sorted.sort_by(f64::total_cmp);
    let early_end = sorted[(1 + (hosts - 1) / 10).min(hosts - 1)];
    println!("{:<44} {:>8.1} s", "  canary (1 host) ran it after", canary);
    println!("{:<44} {:>8.1} s", "  the first tenth of the fleet after", early_end);
    let model = 1 + 3 * interval_s + 2 * window_s;
    println!(
        "{:<44} {:>8.1} s   (worst case: repo poll + 3 intervals + 2 windows = {model} s)",
        "commit -> whole fleet, 3 waves", t_waves
    );
    println!("{:<44} {:>8.2}x", "waves / no waves (same run)", t_waves / t_plain.max(0.001));
    println!(
        "at a 30 min interval and a 30 min window the same worst case is {} min without waves and {} min with these three",
        30,
        3 * 30 + 2 * 30
    );
    stop.store(true, Ordering::Relaxed);
    let _ = server.kill();
    let _ = server.wait();
    rt.shutdown_timeout(Duration::from_secs(2));
    let _ = std::fs::remove_dir_all(state.parent().unwrap());
}

/// How long a host takes to put a change back when its confirmation fails
/// (`converge-bench confirm [ROUNDS]`): a real agent in a scratch root against a real server,
/// a file under `confirm: {within: 10}`; the baseline is the same change confirmed at once (its
/// check passes), measured in the same run. Needs root (the check runs chrooted).
pub fn confirm(rounds: usize) {
    use converge_e2e::{Fleet, Server, converge_in, with_tools};
    let role = |v: usize, check: &str| {
        format!(
            "resources:\n  - file: /etc/app.conf\n    content: \"v{v}\\n\"\n    confirm: {{within: 10, check: [{check}]}}\n"
        )
    };
    let f = Fleet::new(&[
        ("site.yaml", "nodes:\n  \"*\": {roles: [app]}\n"),
        ("roles/app.yaml", &role(0, "/usr/bin/true")),
    ]);
    let server = Server::start(&f.config());
    let root = f.root("host1");
    with_tools(&root, &["/usr/bin/true", "/usr/bin/false"]);
    let out = converge_in(&root, &["bootstrap", "--server", &server.url, "--ca-hash", &f.ca_hash, "--token", &f.token]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let (mut confirmed, mut reverted) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for (check, into) in [("/usr/bin/true", &mut confirmed), ("/usr/bin/false", &mut reverted)] {
            f.commit(&[("roles/app.yaml", &role(round * 2 + 1 + usize::from(check.ends_with("false")), check))]);
            std::thread::sleep(Duration::from_millis(1500));
            let t = Instant::now();
            let out = converge_in(&root, &["run", "--once"]);
            into.push(t.elapsed().as_secs_f64());
            let text = format!("{}{}", out.stdout, out.stderr);
            assert_eq!(text.contains("reverted"), check.ends_with("false"), "{text}");
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (c, r) = (median(&mut confirmed), median(&mut reverted));
    println!("a run whose change under `confirm` is confirmed at once (the baseline): {c:.2} s (median of {rounds})");
    println!("the same run when the confirmation fails (deadline 10 s):                {r:.2} s");
    println!("the host had put the change back {:.2} s after its deadline ({:.2}x the baseline run)", r - 10.0, r / c);
}
