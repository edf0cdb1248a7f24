//! `converge pause` and `converge resume`, as an operator uses them in an incident: runs fetch
//! and verify their catalog but change nothing, the fleet page and `converge status` show the
//! pause and why, dry-runs still say what would change; `resume` (or the end of `--for`) lets the
//! next run converge. A damaged pause file counts as a pause that says so.

use converge_e2e::{Fleet, Out, Server, converge_in, eventually};
use std::path::Path;
use std::time::Duration;

fn motd(version: &str) -> String {
    format!("resources:\n  - file: /etc/motd\n    content: \"{{{{ node.name }}}} {version}\\n\"\n")
}

fn read(root: &Path) -> String {
    std::fs::read_to_string(root.join("etc/motd")).unwrap_or_default()
}

fn said(out: &Out) -> String {
    format!("{}{}", out.stdout, out.stderr)
}

#[test]
fn a_paused_host_changes_nothing_says_why_everywhere_and_resumes() {
    let f = Fleet::new(&[("site.yaml", "nodes:\n  \"agent*\": {roles: [motd]}\n"), ("roles/motd.yaml", &motd("v1"))]);
    let server = Server::start(&f.config());
    let root = f.root("agent1");
    let r = root.display().to_string();
    let out = converge_in(&root, &["bootstrap", "--server", &server.url, "--ca-hash", &f.ca_hash, "--token", &f.token]);
    assert_eq!(out.code, 0, "{}", said(&out));
    assert_eq!(read(&root), "agent1 v1\n");

    // Refused without a reason worth showing; nothing is written.
    for bad in ["", "two\nlines"] {
        let out = converge_e2e::run("converge", &["pause", "--reason", bad, "--root", &r]);
        assert_ne!(out.code, 0);
        assert!(out.stderr.contains("--reason"), "{}", out.stderr);
    }
    let out = converge_e2e::run("converge", &["pause", "--reason", "x", "--for", "soon", "--root", &r]);
    assert!(out.stderr.contains("--for soon"), "{}", out.stderr);
    assert!(!root.join("var/lib/converge/paused.json").exists());

    let out = converge_e2e::run("converge", &["pause", "--reason", "incident 42: disk array", "--root", &r]);
    assert_eq!(out.code, 0, "{}", said(&out));
    assert!(out.stdout.contains("until converge resume: incident 42"), "{}", out.stdout);
    std::fs::write(root.join("etc/motd"), "drifted\n").unwrap();
    f.commit(&[("roles/motd.yaml", &motd("v2"))]);
    std::thread::sleep(Duration::from_millis(1500));
    let out = converge_in(&root, &["run", "--once"]);
    assert_eq!(out.code, 0, "{}", said(&out));
    assert!(said(&out).contains("this run changed nothing"), "{}", said(&out));
    assert_eq!(read(&root), "drifted\n", "neither the drift nor the new commit is applied");
    let dry = converge_in(&root, &["run", "--once", "--dry-run"]);
    assert!(dry.stdout.contains("would change") || dry.stdout.contains("would-change"), "{}", said(&dry));
    assert_eq!(read(&root), "drifted\n");
    let status = converge_in(&root, &["status"]).stdout;
    assert!(status.contains("PAUSED") && status.contains("incident 42"), "{status}");
    // The fleet page shows it (loopback), once the visit is written.
    eventually(Duration::from_secs(10), Duration::from_millis(300), || {
        let page = std::process::Command::new("curl").args(["-sk", &format!("{}/", server.url)]).output().unwrap();
        let page = String::from_utf8_lossy(&page.stdout).into_owned();
        (page.contains("data-node=\"agent1\" data-status=\"paused\"") && page.contains("incident 42: disk array"))
            .then_some(())
            .ok_or(page)
    });

    let out = converge_e2e::run("converge", &["resume", "--root", &r]);
    assert!(out.stdout.contains("resumed"), "{}", said(&out));
    converge_in(&root, &["run", "--once"]);
    assert_eq!(read(&root), "agent1 v2\n");
    assert!(converge_e2e::run("converge", &["resume", "--root", &r]).stdout.contains("not paused"));

    // A pause for a while ends by itself.
    let out = converge_e2e::run("converge", &["pause", "--reason", "a minute", "--for", "1s", "--root", &r]);
    assert_eq!(out.code, 0, "{}", said(&out));
    std::fs::write(root.join("etc/motd"), "drifted\n").unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    let out = converge_in(&root, &["run", "--once"]);
    assert_eq!(read(&root), "agent1 v2\n", "{}", said(&out));
    assert!(!root.join("var/lib/converge/paused.json").exists());

    // A damaged pause file, or a symbolic link in its place: a pause that says what is wrong.
    for damage in ["garbage", "link"] {
        let file = root.join("var/lib/converge/paused.json");
        if damage == "link" {
            std::os::unix::fs::symlink("/etc/passwd", &file).unwrap();
        } else {
            std::fs::write(&file, "{\"reason\": 42").unwrap();
        }
        std::fs::write(root.join("etc/motd"), "drifted\n").unwrap();
        let out = converge_in(&root, &["run", "--once"]);
        assert!(said(&out).contains("paused.json") && said(&out).contains("converge resume"), "{}", said(&out));
        assert_eq!(read(&root), "drifted\n", "{damage}: in doubt, nothing changes");
        converge_e2e::run("converge", &["resume", "--root", &r]);
        assert!(file.symlink_metadata().is_err(), "resume clears it");
        converge_in(&root, &["run", "--once"]);
        assert_eq!(read(&root), "agent1 v2\n");
    }
}

/// Each change in a report says where it came from: the catalog (a resource new or changed
/// since the catalog applied before) or drift repaired (the host had left what was asked).
#[test]
fn each_change_says_whether_the_catalog_asked_for_it_or_drift_was_repaired() {
    let f = Fleet::new(&[
        ("site.yaml", "nodes:\n  \"agent*\": {roles: [motd]}\n"),
        ("roles/motd.yaml", &format!("{}  - file: /etc/issue\n    content: \"hi\\n\"\n", motd("v1"))),
    ]);
    let server = Server::start(&f.config());
    let root = f.root("agent1");
    let out = converge_in(&root, &["bootstrap", "--server", &server.url, "--ca-hash", &f.ca_hash, "--token", &f.token]);
    assert_eq!(out.code, 0, "{}", said(&out));
    let last = |n: &str| {
        std::thread::sleep(Duration::from_millis(300));
        converge_e2e::server_ok(&["report", "--node", "agent1", "--limit", n, "--config", &f.config()])
    };
    let first = last("1");
    assert!(
        first.contains("file:/etc/motd [from the catalog]") && first.contains("file:/etc/issue [from the catalog]"),
        "{first}"
    );
    // Drift on one file, and a new commit that changes the other.
    std::fs::write(root.join("etc/issue"), "drifted\n").unwrap();
    f.commit(&[("roles/motd.yaml", &format!("{}  - file: /etc/issue\n    content: \"hi\\n\"\n", motd("v2")))]);
    std::thread::sleep(Duration::from_millis(1500));
    converge_in(&root, &["run", "--once"]);
    let both = last("1");
    assert!(both.contains("file:/etc/motd [from the catalog]"), "{both}");
    assert!(both.contains("file:/etc/issue [repaired drift]"), "{both}");
    // Drift alone, with the same catalog (a 304).
    std::fs::write(root.join("etc/motd"), "drifted\n").unwrap();
    converge_in(&root, &["run", "--once"]);
    let drift = last("1");
    assert!(drift.contains("file:/etc/motd [repaired drift]") && !drift.contains("/etc/issue"), "{drift}");
}
