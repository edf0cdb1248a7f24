//! The fleet page in a real browser: Debian's chromium, headless, against a server with
//! enrolled agents, one of them failing and one that never ran. A screenshot of each page is
//! kept in `target/test-artifacts/`.
//!
//! Runs when chromium is installed (`./test.sh` as root installs it); with
//! `CONVERGE_CONTAINER_TESTS=1` (the full suite) a missing chromium is a failure.

use converge_e2e::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn chromium() -> Option<PathBuf> {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"].iter().map(PathBuf::from).find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var("CONVERGE_CONTAINER_TESTS").as_deref() != Ok("1"),
            "the full suite needs chromium for the fleet page test (apt-get install chromium)"
        );
        eprintln!("fleet page test: skipped (no chromium; ./test.sh as root installs it)");
    }
    found
}

/// Where test artefacts are kept: `target/test-artifacts`.
fn artifacts() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).unwrap().to_path_buf();
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs headless chromium on `url` with a profile of its own; returns the DOM after load.
fn browse(chromium: &Path, profile: &Path, url: &str, screenshot: &Path) -> String {
    let common = |cmd: &mut Command| {
        cmd.args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--ignore-certificate-errors",
            "--no-first-run",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .env("HOME", profile);
    };
    let mut dom = Command::new(chromium);
    common(&mut dom);
    let out = dom.arg("--dump-dom").arg(url).output().expect("chromium");
    let mut shot = Command::new(chromium);
    common(&mut shot);
    let _ = shot.arg(format!("--screenshot={}", screenshot.display())).arg(url).output();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_fleet_page_in_a_browser() {
    let Some(chromium) = chromium() else { return };
    let f = Fleet::new(&[
        (
            "site.yaml",
            "nodes:\n  \"good*\":\n    roles: [motd]\n  \"bad*\":\n    roles: [motd, broken]\n  \"idle*\":\n    roles: [motd]\n",
        ),
        (
            "roles/motd.yaml",
            "resources:\n  - file: /etc/motd\n    content: \"{{ node.name }} <b>not markup</b>\\n\"\n  - file: /etc/app.secret\n    content: \"hunter2-in-the-catalog\\n\"\n    sensitive: true\n",
        ),
        ("roles/broken.yaml", "resources:\n  - file: /nonexistent/dir/app.conf\n    content: x\n"),
    ]);
    let server = Server::start(&f.config());
    for name in ["good1", "bad1", "idle1"] {
        let root = f.root(name);
        let mut args = vec!["bootstrap", "--server", &server.url, "--ca-hash", &f.ca_hash, "--token"];
        let token = f.token(name);
        args.push(&token);
        if name == "idle1" {
            args.push("--no-run");
        }
        let out = converge_in(&root, &args);
        assert!(out.code == 0 || name == "bad1", "{name}: {}{}", out.stdout, out.stderr);
    }
    // good1 runs again: nothing left to change.
    let again = converge_in(&f.root("good1"), &["run", "--once"]);
    assert_eq!(again.code, 0, "{}{}", again.stdout, again.stderr);
    std::thread::sleep(Duration::from_millis(1500)); // visits are written every second
    let profile = tempfile::tempdir().unwrap();
    let dir = artifacts();
    let fleet = browse(&chromium, profile.path(), &format!("{}/", server.url), &dir.join("fleet.png"));
    assert!(fleet.contains("data-node=\"good1\" data-status=\"in sync\""), "{fleet}");
    assert!(fleet.contains("<tr class=\"failed\" data-node=\"bad1\" data-status=\"failed\""), "{fleet}");
    assert!(fleet.contains("data-node=\"idle1\" data-status=\"never ran\""), "{fleet}");
    assert!(fleet.contains("<b>3</b>nodes") && fleet.contains("<b class=\"s-failed\">1</b>failing"), "{fleet}");
    assert!(dir.join("fleet.png").metadata().is_ok_and(|m| m.len() > 1000), "a screenshot");
    // The summary's counts link to just those nodes.
    assert!(fleet.contains("href=\"/?status=failed\""), "{fleet}");
    let failing =
        browse(&chromium, profile.path(), &format!("{}/?status=failed", server.url), &dir.join("failing.png"));
    assert!(failing.contains("data-node=\"bad1\"") && !failing.contains("data-node=\"good1\""), "{failing}");
    assert!(failing.contains("1 of 3 nodes: <b>failed</b>"), "{failing}");
    let never = browse(&chromium, profile.path(), &format!("{}/?status=never-ran", server.url), &dir.join("never.png"));
    assert!(never.contains("data-node=\"idle1\"") && !never.contains("data-node=\"bad1\""), "{never}");

    let node = browse(&chromium, profile.path(), &format!("{}/nodes/bad1", server.url), &dir.join("node.png"));
    assert!(node.contains("/nonexistent/dir/app.conf") || node.contains("file:/nonexistent"), "{node}");
    assert!(node.contains("os_name") || node.contains("hostname"), "facts: {node}");
    let id = node.split("/reports/").nth(1).and_then(|r| r.split('"').next()).expect("a report link").to_string();
    let report = browse(&chromium, profile.path(), &format!("{}/reports/{id}", server.url), &dir.join("report.png"));
    assert!(report.contains("its directory /nonexistent/dir does not exist"), "{report}");
    let good = converge_in(&f.root("good1"), &["status"]);
    assert!(good.stdout.contains("last run"), "{}", good.stdout);
    // What a node reports is text, never markup.
    let good_page = browse(&chromium, profile.path(), &format!("{}/nodes/good1", server.url), &dir.join("good.png"));
    // Its first run (the oldest report) wrote the motd.
    let good_report_id = good_page.split("/reports/").last().and_then(|r| r.split('"').next()).unwrap().to_string();
    let good_report = browse(
        &chromium,
        profile.path(),
        &format!("{}/reports/{good_report_id}", server.url),
        &dir.join("good-report.png"),
    );
    assert!(good_report.contains("&lt;b&gt;not markup&lt;/b&gt;"), "{good_report}");
    assert!(!good_report.contains("<b>not markup</b>"), "{good_report}");
    // A sensitive resource's change shows, its value never.
    assert!(good_report.contains("file:/etc/app.secret"), "{good_report}");
    assert!(!good_report.contains("hunter2"), "{good_report}");
}
