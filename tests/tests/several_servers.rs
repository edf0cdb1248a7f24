//! Several servers sharing one PostgreSQL database, as operators run them: the first server's
//! state imported (`db import`), a second made by `server add` with a clone of its own of the
//! repository, agents given both addresses. Losing a server is a non-event: the agents' runs
//! carry on against the other, and no report is lost or stored twice; PostgreSQL restarting is
//! one too; a commit reaches every host whichever server it asks, with one catalog per host and
//! commit.

use converge_e2e::postgres::{Postgres, available};
use converge_e2e::{Fleet, Out, Server, converge_in, eventually, git, server_ok};
use std::path::{Path, PathBuf};
use std::time::Duration;

const AGENTS: [&str; 4] = ["agent1", "agent2", "agent3", "agent4"];

fn motd(version: &str) -> String {
    format!("resources:\n  - file: /etc/motd\n    content: \"{{{{ node.name }}}} {version}\\n\"\n")
}

fn read(root: &Path, path: &str) -> String {
    std::fs::read_to_string(root.join(path)).unwrap_or_default()
}

fn said(out: &Out) -> String {
    format!("{}{}", out.stdout, out.stderr)
}

/// The fleet of two servers on one database, and the second server's clone of the repository.
struct Two {
    pg: Postgres,
    f: Fleet,
    a: String,
    b: String,
    clone: PathBuf,
}

fn two_servers() -> Two {
    let pg = Postgres::start();
    let f = Fleet::new(&[("site.yaml", "nodes:\n  \"agent*\": {roles: [motd]}\n"), ("roles/motd.yaml", &motd("v1"))]);
    let a = f.config();
    pg.serve_from(&a, "");
    let imported = server_ok(&["db", "import", "--config", &a]);
    assert!(imported.contains("copied"), "{imported}");
    let clone = f.dir.path().join("repo-b");
    git(f.dir.path(), &["clone", "-q", &f.repo().display().to_string(), "repo-b"]);
    let state_b = f.dir.path().join("state-b");
    let added = server_ok(&[
        "server",
        "add",
        "--config",
        &a,
        "--out",
        &state_b.display().to_string(),
        "--address",
        "127.0.0.1",
        "--listen",
        "127.0.0.1:0",
        "--repo",
        &clone.display().to_string(),
    ]);
    assert!(added.contains("converge-server serve --config"), "{added}");
    assert!(!state_b.join("keys/root.key").exists(), "the root key stays where it is");
    let b = state_b.join("server.toml").display().to_string();
    Two { pg, f, a, b, clone }
}

fn bootstrap(t: &Two, name: &str, servers: &[&Server]) -> PathBuf {
    let root = t.f.root(name);
    let token = t.f.token(name);
    let mut args = vec!["bootstrap"];
    for s in servers {
        args.extend(["--server", s.url.as_str()]);
    }
    args.extend(["--ca-hash", &t.f.ca_hash, "--token", &token]);
    let out = converge_in(&root, &args);
    assert_eq!(out.code, 0, "{}", said(&out));
    root
}

/// Reports stored per node, and in all.
fn reports(pg: &Postgres, node: &str) -> usize {
    pg.sql(&format!("SELECT count(*) FROM reports WHERE node = '{node}'")).trim().parse().unwrap()
}

#[test]
fn two_servers_share_one_fleet_and_losing_either_or_the_database_fails_no_run() {
    if !available() {
        return;
    }
    let t = two_servers();
    let server_a = Server::start(&t.a);
    let server_b = Server::start(&t.b);
    let roots: Vec<PathBuf> = AGENTS.iter().map(|n| bootstrap(&t, n, &[&server_a, &server_b])).collect();
    for (root, name) in roots.iter().zip(AGENTS) {
        assert_eq!(read(root, "etc/motd"), format!("{name} v1\n"));
    }
    // One host knows the second server only: it enrolls there with a token made by the first.
    let only_b = bootstrap(&t, "agent5", &[&server_b]);
    assert_eq!(read(&only_b, "etc/motd"), "agent5 v1\n");
    // Every server shows the whole fleet.
    for config in [&t.a, &t.b] {
        let list = server_ok(&["node", "list", "--config", config]);
        assert_eq!(list.lines().filter(|l| l.starts_with("agent")).count(), 5, "{list}");
    }

    // A commit to the first server's repository: it proposes it, the second server (whose
    // clone lags) never drags the fleet back and takes the commit in once its clone has it.
    t.f.commit(&[("roles/motd.yaml", &motd("v2"))]);
    let head = String::from_utf8(
        std::process::Command::new("git")
            .arg("-C")
            .arg(t.f.repo())
            .args(["rev-parse", "HEAD"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let head = head.trim();
    eventually(Duration::from_secs(10), Duration::from_millis(100), || {
        let agreed = t.pg.sql("SELECT commit_id FROM agreed");
        (agreed.trim() == head).then_some(()).ok_or(format!("agreed on {agreed}"))
    });
    let out = converge_in(&only_b, &["run", "--once"]);
    assert_eq!(out.code, 0, "{}", said(&out));
    assert_eq!(read(&only_b, "etc/motd"), "agent5 v1\n", "the second server does not hold the commit yet");
    git(&t.clone, &["pull", "-q", "--ff-only"]);
    eventually(Duration::from_secs(15), Duration::from_millis(200), || {
        let out = converge_in(&only_b, &["run", "--once"]);
        (read(&only_b, "etc/motd") == "agent5 v2\n").then_some(()).ok_or(said(&out))
    });
    assert_eq!(t.pg.sql("SELECT commit_id FROM agreed").trim(), head, "the lagging clone proposed nothing");

    // A wave of runs, and the first server killed in its middle: every run gets its catalog
    // from a server (none falls back to its cache), and every report arrives once.
    let before: Vec<usize> = AGENTS.iter().map(|n| reports(&t.pg, n)).collect();
    let runs = 4;
    let wave: Vec<_> = roots
        .iter()
        .cloned()
        .map(|root| {
            std::thread::spawn(move || {
                let outs = (0..runs)
                    .map(|_| {
                        let out = converge_in(&root, &["run", "--once"]);
                        std::thread::sleep(Duration::from_millis(150));
                        out
                    })
                    .collect::<Vec<Out>>();
                (outs, std::time::Instant::now())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(400));
    drop(server_a);
    let killed = std::time::Instant::now();
    for ((outs, ended), (root, name)) in wave.into_iter().map(|w| w.join().unwrap()).zip(roots.iter().zip(AGENTS)) {
        assert!(ended > killed, "{name}'s runs went on after the kill");
        for out in outs {
            assert_eq!(out.code, 0, "{name}: {}", said(&out));
            assert!(!said(&out).contains("enforcing the cached catalog"), "{name}: {}", said(&out));
        }
        assert_eq!(read(root, "etc/motd"), format!("{name} v2\n"));
    }
    for (i, name) in AGENTS.iter().enumerate() {
        eventually(Duration::from_secs(5), Duration::from_millis(100), || {
            let n = reports(&t.pg, name);
            (n == before[i] + runs).then_some(()).ok_or(format!("{name}: {n} reports, not {}", before[i] + runs))
        });
    }
    // One catalog per host and commit, whichever server it asked.
    let serials = t.pg.sql(&format!(
        "SELECT count(DISTINCT serial) FROM reports WHERE commit_id = '{head}' AND node LIKE 'agent%' GROUP BY node"
    ));
    assert!(serials.lines().all(|l| l.trim() == "1"), "{serials}");

    // PostgreSQL restarts: the server answers polls from what it holds, reports wait in the
    // agents' queues, and arrive once it is back; the server reconnects on its own.
    let before: Vec<usize> = AGENTS.iter().map(|n| reports(&t.pg, n)).collect();
    t.pg.stop();
    for root in &roots {
        let out = converge_in(root, &["run", "--once"]);
        assert_eq!(out.code, 0, "{}", said(&out));
        assert!(!said(&out).contains("enforcing the cached catalog"), "polls answered: {}", said(&out));
        assert!(said(&out).contains("report not delivered"), "{}", said(&out));
    }
    t.pg.start_again();
    for ((root, name), before) in roots.iter().zip(AGENTS).zip(before) {
        let mut runs = 1;
        eventually(Duration::from_secs(20), Duration::from_millis(300), || {
            let out = converge_in(root, &["run", "--once"]);
            runs += 1;
            let s = said(&out);
            (out.code == 0 && !s.contains("report not delivered")).then_some(()).ok_or(s)
        });
        eventually(Duration::from_secs(5), Duration::from_millis(100), || {
            let n = reports(&t.pg, name);
            (n == before + runs).then_some(()).ok_or(format!("{name}: {n} reports, not {}", before + runs))
        });
    }
    let dupes = t.pg.sql("SELECT count(*) FROM (SELECT node, body_sha256 FROM reports WHERE body_sha256 IS NOT NULL GROUP BY 1, 2 HAVING count(*) > 1) d");
    assert_eq!(dupes.trim(), "0", "no report stored twice");
    drop(server_b);
}

/// `server add` refuses a fleet whose state is in its own file, and never writes over a
/// directory.
#[test]
fn server_add_needs_the_shared_database_and_a_new_directory() {
    let f = Fleet::new(&[("site.yaml", "nodes: {}\n")]);
    let out_dir = f.dir.path().join("state-b");
    let args = |out: &Path| {
        vec![
            "server".to_string(),
            "add".into(),
            "--config".into(),
            f.config(),
            "--out".into(),
            out.display().to_string(),
            "--address".into(),
            "127.0.0.1".into(),
        ]
    };
    let words = args(&out_dir);
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let refused = converge_e2e::run("converge-server", &words);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("servers share a fleet through PostgreSQL"), "{}", refused.stderr);
    assert!(!out_dir.exists(), "nothing written");
    let text = std::fs::read_to_string(f.config()).unwrap();
    std::fs::write(f.config(), format!("{text}database = \"postgres://converge@127.0.0.1:1/converge\"\n")).unwrap();
    std::fs::create_dir(&out_dir).unwrap();
    let refused = converge_e2e::run("converge-server", &words);
    assert!(refused.stderr.contains("exists already"), "{}", refused.stderr);
    std::fs::remove_dir(&out_dir).unwrap();
    let made = converge_e2e::run("converge-server", &words);
    assert_eq!(made.code, 0, "{}", made.stderr);
    for (file, mode) in [("ca.key", 0o600), ("server.key", 0o600), ("server.toml", 0o600), ("keys/catalog.key", 0o600)]
    {
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(out_dir.join(file)).unwrap().permissions().mode() & 0o777;
        assert_eq!(m, mode, "{file}");
    }
    assert!(!out_dir.join("keys/root.key").exists());
    assert_ne!(
        std::fs::read(out_dir.join("server.key")).unwrap(),
        std::fs::read(f.dir.path().join("state/server.key")).unwrap(),
        "a key of its own"
    );
    let config = std::fs::read_to_string(out_dir.join("server.toml")).unwrap();
    assert!(config.contains("database = \"postgres://") && config.contains("state = \".\""), "{config}");
}
