//! Commit-confirmed apply, end to end against a real server: a change under `confirm` stays
//! once the host reaches its server again and the check passes; otherwise the host puts the
//! file back (content, mode, or its absence) by itself within the deadline, reports the revert,
//! and holds the change until a catalog changes it. A run that dies while waiting leaves the
//! confirmation to the next run, which settles it first; a damaged confirmation file is set
//! aside, never acted on.

use converge_e2e::{Child, Fleet, Out, Server, converge_in, eventually, with_tools};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

fn role(version: &str, check: &str) -> String {
    format!(
        "resources:\n  - file: /etc/app.conf\n    content: \"{version}\\n\"\n    mode: \"{mode}\"\n    confirm: {{within: 10, check: [{check}]}}\n  - file: /etc/new.conf\n    content: \"{version}\\n\"\n    confirm: {{within: 10, check: [{check}]}}\n",
        mode = if version == "v1" { "0644" } else { "0600" },
    )
}

fn said(out: &Out) -> String {
    format!("{}{}", out.stdout, out.stderr)
}

fn read(root: &Path, path: &str) -> Option<String> {
    std::fs::read_to_string(root.join(path)).ok()
}

fn last_report(f: &Fleet) -> String {
    std::thread::sleep(Duration::from_millis(300));
    converge_e2e::server_ok(&["report", "--node", "agent1", "--limit", "1", "--config", &f.config()])
}

#[test]
fn an_unconfirmed_change_is_put_back_by_the_host_reported_and_held_until_the_catalog_changes() {
    let f = Fleet::new(&[
        ("site.yaml", "nodes:\n  \"agent*\": {roles: [app]}\n"),
        ("roles/app.yaml", &role("v1", "/usr/bin/true")),
    ]);
    let server = Server::start(&f.config());
    let root = f.root("agent1");
    with_tools(&root, &["/usr/bin/true", "/usr/bin/false", "/usr/bin/sleep"]);
    let out = converge_in(&root, &["bootstrap", "--server", &server.url, "--ca-hash", &f.ca_hash, "--token", &f.token]);
    assert_eq!(out.code, 0, "{}", said(&out));
    assert!(said(&out).contains("confirming 2 change(s)"), "{}", said(&out));
    assert_eq!(read(&root, "etc/app.conf").as_deref(), Some("v1\n"), "confirmed: kept");
    assert!(!root.join("var/lib/converge/confirm.json").exists());
    let mode = |root: &Path| std::fs::metadata(root.join("etc/app.conf")).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&root), 0o644);

    // A commit whose check fails: both files changed, then put back within the deadline.
    f.commit(&[("roles/app.yaml", &role("v2", "/usr/bin/false"))]);
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = Instant::now();
    let out = converge_in(&root, &["run", "--once"]);
    let took = t0.elapsed();
    assert!(said(&out).contains("file:/etc/app.conf reverted"), "{}", said(&out));
    assert!(took >= Duration::from_secs(9) && took < Duration::from_secs(40), "{took:?}");
    assert_eq!(read(&root, "etc/app.conf").as_deref(), Some("v1\n"), "{}", said(&out));
    assert_eq!(mode(&root), 0o644, "the mode is put back too");
    let report = last_report(&f);
    assert!(report.contains("reverted") && report.contains("file:/etc/app.conf"), "{report}");
    assert!(report.contains("not confirmed within 10 s") && report.contains("/usr/bin/false"), "{report}");
    assert!(report.contains("restored its content"), "{report}");
    assert!(report.contains("2 failed") && report.contains(", 2 of the failures REVERTED changes"), "{report}");
    let status = converge_in(&root, &["status"]).stdout;
    assert!(status.contains("reverted"), "{status}");
    // The report page links each reverted resource to the line that declares it, at its commit.
    let id: String = report.split('#').nth(1).unwrap().chars().take_while(char::is_ascii_digit).collect();
    let get = |path: &str| {
        let out = std::process::Command::new("curl")
            .args(["-sk", "--path-as-is", &format!("{}{path}", server.url)])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let page = get(&format!("/reports/{id}")).replace("&#x2f;", "/");
    let link =
        page.split("data-source href=\"").nth(1).and_then(|l| l.split('"').next()).unwrap_or_else(|| panic!("{page}"));
    let head = String::from_utf8(
        std::process::Command::new("git").arg("-C").arg(f.repo()).args(["rev-parse", "HEAD"]).output().unwrap().stdout,
    )
    .unwrap();
    assert_eq!(link, format!("/source/{}/roles/app.yaml#L2", head.trim()), "{page}");
    let source = get(link.split('#').next().unwrap()).replace("&#x2f;", "/");
    assert!(source.contains("<tr id=\"L2\">") && source.contains("- file: /etc/app.conf"), "{source}");
    assert!(get(&format!("/source/{}/data/secrets/x.yaml", head.trim())).contains("no such file"));
    assert!(get(&format!("/source/{}/roles/../site.yaml", head.trim())).contains("no such file"));

    // The same catalog again: held, not applied again (and not waited on).
    let t0 = Instant::now();
    let out = converge_in(&root, &["run", "--once"]);
    assert!(t0.elapsed() < Duration::from_secs(8), "a held change is not retried");
    assert!(said(&out).contains("held as it was"), "{}", said(&out));
    assert_eq!(read(&root, "etc/app.conf").as_deref(), Some("v1\n"));

    // A catalog that changes the resource tries again, and this one is confirmed.
    f.commit(&[("roles/app.yaml", &role("v3", "/usr/bin/true"))]);
    std::thread::sleep(Duration::from_millis(1500));
    let out = converge_in(&root, &["run", "--once"]);
    assert_eq!(read(&root, "etc/app.conf").as_deref(), Some("v3\n"), "{}", said(&out));
    assert!(!root.join("var/lib/converge/reverted.json").exists(), "nothing is held any more");

    // A run that dies while it waits: the next run settles the confirmation first.
    f.commit(&[("roles/app.yaml", &role("v4", "/usr/bin/sleep, \"30\""))]);
    std::thread::sleep(Duration::from_millis(1500));
    let r = root.display().to_string();
    let mut child = Child(
        std::process::Command::new(converge_e2e::bin("converge"))
            .args(["run", "--once", "--root", &r])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually(Duration::from_secs(20), Duration::from_millis(100), || {
        (read(&root, "etc/app.conf").as_deref() == Some("v4\n")).then_some(()).ok_or("not applied yet".into())
    });
    assert!(root.join("var/lib/converge/confirm.json").exists());
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    std::thread::sleep(Duration::from_secs(10));
    let out = converge_in(&root, &["run", "--once"]);
    assert_eq!(read(&root, "etc/app.conf").as_deref(), Some("v3\n"), "{}", said(&out));
    assert!(said(&out).contains("held as it was"), "and held: {}", said(&out));
    assert!(!root.join("var/lib/converge/confirm.json").exists());
}

#[test]
fn a_new_file_that_is_not_confirmed_goes_away_and_a_damaged_confirmation_file_is_set_aside() {
    let f = Fleet::new(&[
        ("site.yaml", "nodes:\n  \"agent*\": {roles: [app]}\n"),
        (
            "roles/app.yaml",
            "confirm: {within: 10, check: [/usr/bin/false]}\nresources:\n  - file: /etc/cut.conf\n    content: \"cut\\n\"\n",
        ),
    ]);
    let server = Server::start(&f.config());
    let root = f.root("agent1");
    with_tools(&root, &["/usr/bin/false"]);
    let out = converge_in(&root, &["bootstrap", "--server", &server.url, "--ca-hash", &f.ca_hash, "--token", &f.token]);
    assert!(said(&out).contains("reverted"), "{}", said(&out));
    assert!(!root.join("etc/cut.conf").exists(), "the role's confirm covers its file: absent before, absent again");
    assert!(said(&out).contains("removed it: it was not there before"), "{}", said(&out));

    // A damaged confirmation file: said, set aside, nothing restored from it.
    std::fs::write(root.join("etc/keep.conf"), "mine\n").unwrap();
    let pending = root.join("var/lib/converge/confirm.json");
    for damage in [
        "{\"serial\": 1",
        "{\"serial\":1,\"commit\":null,\"made\":\"2026-01-01T00:00:00Z\",\"deadline\":\"2026-01-01T00:00:10Z\",\"entries\":[{\"id\":\"file:/etc/keep.conf\",\"spec\":\"x\",\"was\":{\"type\":\"absent\"}}]}",
    ] {
        std::fs::write(&pending, damage).unwrap();
        let out = converge_in(&root, &["run", "--once"]);
        assert_eq!(read(&root, "etc/keep.conf").as_deref(), Some("mine\n"), "{}", said(&out));
        assert!(!pending.exists(), "{}", said(&out));
        if damage.len() < 20 {
            assert!(said(&out).contains("confirm.json.damaged"), "{}", said(&out));
        }
        // Well formed, but naming a resource the catalog does not mark `confirm`: the server
        // answers, so it is confirmed, and nothing is restored from it.
    }
    // A symbolic link in its place is never followed: set aside like any damage.
    std::os::unix::fs::symlink("/etc/passwd", &pending).unwrap();
    let out = converge_in(&root, &["run", "--once"]);
    assert!(pending.symlink_metadata().is_err() && said(&out).contains("confirm.json.damaged"), "{}", said(&out));

    // A damaged record of reverted changes: set aside, so the held change is tried again, and
    // (its check still failing) put back again and held anew.
    let reverted = root.join("var/lib/converge/reverted.json");
    assert!(reverted.exists());
    std::fs::write(&reverted, [0xff, 0xfe, b'{']).unwrap();
    let out = converge_in(&root, &["run", "--once"]);
    assert!(said(&out).contains("reverted.json.damaged"), "{}", said(&out));
    assert!(said(&out).contains("file:/etc/cut.conf reverted"), "{}", said(&out));
    assert!(!root.join("etc/cut.conf").exists());
    let out = converge_in(&root, &["run", "--once"]);
    assert!(said(&out).contains("held as it was"), "held anew: {}", said(&out));
}

/// The change the issue is about: a rule that cuts the host's route to its server, inside the
/// container's own network namespace. The host cannot reach the server, so the change is not
/// confirmed: the host restores the file, the notified command takes the route back, and the
/// report of the revert reaches the server. Gated with the container suite.
#[test]
fn a_change_that_cuts_the_host_off_is_reverted_by_the_host_within_its_deadline() {
    use converge_e2e::container::{Container, NetPair, enabled};
    if !enabled("a change that cuts the host off is reverted") {
        return;
    }
    let net = NetPair::new("k");
    // The rule file, confirmed within 20 s; the command that applies it, run when it changes
    // (and again when it is put back).
    let role = format!(
        "resources:\n  - file: /etc/converge-route.conf\n    content: \"blackhole\\n\"\n    confirm: {{within: 20}}\n    notify: [exec:route]\n  - exec: route\n    refreshonly: true\n    command: [/bin/sh, -c, \"ip route del blackhole {ip}/32 2>/dev/null; if grep -qs blackhole /etc/converge-route.conf; then ip route add blackhole {ip}/32; fi; true\"]\n",
        ip = net.a_ip
    );
    let f = Fleet::serving(&[("site.yaml", "nodes:\n  box: {roles: []}\n")], &net.a_ip, "0.0.0.0:8443");
    let w = tempfile::tempdir().unwrap();
    let _server = Server::launch(
        &f.config(),
        converge_e2e::Launch { netns: Some(&net.a), log: Some(w.path().join("server.log")), ..Default::default() },
    );
    let c = Container::boot_in_netns(&net.b);
    let url = format!("https://{}:8443", net.a_ip);
    let out = c.join(&f, &url, "box");
    assert_eq!(out.code, 0, "{}", said(&out));

    f.commit(&[("site.yaml", "nodes:\n  box: {roles: [cut]}\n"), ("roles/cut.yaml", &role)]);
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = Instant::now();
    let out = c.run(&["converge", "run", "--once"]);
    let took = t0.elapsed();
    assert!(said(&out).contains("changed      file:/etc/converge-route.conf"), "{}", said(&out));
    assert!(said(&out).contains("no server answered"), "{}", said(&out));
    assert!(took >= Duration::from_secs(19) && took < Duration::from_secs(60), "reverted after its deadline: {took:?}");
    assert!(!c.path("/etc/converge-route.conf").exists(), "absent before, absent again");
    let routes = c.sh("ip route");
    assert!(!routes.contains("blackhole"), "the notified command took the route back: {routes}");
    // Back in contact: the report of the revert reached the server in the same run.
    let report = converge_e2e::server_ok(&["report", "--node", "box", "--limit", "1", "--config", &f.config()]);
    assert!(report.contains("reverted") && report.contains("file:/etc/converge-route.conf"), "{report}");
    assert!(report.contains("no server answered") && report.contains("exec:route"), "{report}");
    // And the next run holds the change instead of cutting the host off again.
    let out = c.run(&["converge", "run", "--once"]);
    assert!(said(&out).contains("held as it was"), "{}", said(&out));
    assert!(!c.sh("ip route").contains("blackhole"));
    eprintln!("a host cut off from its server reverted its change {took:?} after the run began (deadline 20 s)");
}
