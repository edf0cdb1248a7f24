//! Rollout waves, as operators use them: a commit reaches the canary first and the rest of the
//! fleet only once the canary ran it clean for the window; a commit that breaks the canary halts
//! the rollout, the rest of the fleet never sees it, the fleet page and `rollout status` say
//! why; `promote` lets it through; a fixed commit rolls out again from the canary.

use converge_e2e::{Fleet, Out, Server, converge_in, eventually, server_ok};
use std::path::{Path, PathBuf};
use std::time::Duration;

const SITE: &str = "nodes:\n  \"agent*\": {roles: [motd]}\nrollout:\n  window: 1s\n  waves:\n    - {name: canary, nodes: [agent1]}\n    - {name: everyone}\n";

fn motd(version: &str, broken: bool) -> String {
    let mut role = format!("resources:\n  - file: /etc/motd\n    content: \"{{{{ node.name }}}} {version}\\n\"\n");
    if broken {
        // A file under a file the catalog does not manage: fails on every host.
        role.push_str("  - file: /etc/hostname/broken\n    content: x\n");
    }
    role
}

fn read(root: &Path) -> String {
    std::fs::read_to_string(root.join("etc/motd")).unwrap_or_default()
}

fn run(root: &Path) -> Out {
    converge_in(root, &["run", "--once"])
}

fn head(f: &Fleet) -> String {
    let out = std::process::Command::new("git").arg("-C").arg(f.repo()).args(["rev-parse", "HEAD"]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Hosts that join the server, each with a token of its own.
fn join(f: &Fleet, server: &Server, names: &[&str]) -> Vec<PathBuf> {
    names
        .iter()
        .map(|name| {
            let root = f.root(name);
            let out = converge_in(
                &root,
                &["bootstrap", "--server", &server.url, "--ca-hash", &f.ca_hash, "--token", &f.token(name)],
            );
            assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
            root
        })
        .collect()
}

/// Waits until the server has begun the rollout of `commit`.
fn begun(f: &Fleet, commit: &str) -> String {
    let mut status = String::new();
    eventually(Duration::from_secs(15), Duration::from_millis(200), || {
        status = server_ok(&["rollout", "status", "--config", &f.config()]);
        // ("the rollout of C has not begun yet" names the commit too: not begun.)
        let named = status.contains(&format!("rollout of {}", &commit[..12]));
        (named && !status.contains("has not begun")).then_some(()).ok_or(status.clone())
    });
    status
}

#[test]
fn a_commit_reaches_the_canary_first_and_a_broken_one_never_passes_it() {
    let f = Fleet::new(&[("site.yaml", SITE), ("roles/motd.yaml", &motd("v1", false))]);
    let server = Server::start(&f.config());
    let roots = join(&f, &server, &["agent1", "agent2", "agent3"]);
    let (canary, rest) = (&roots[0], &roots[1..]);
    for (i, root) in roots.iter().enumerate() {
        assert_eq!(read(root), format!("agent{} v1\n", i + 1), "the first commit reaches everyone");
    }

    // v2: the canary first; the others once it ran it clean for the window.
    f.commit(&[("roles/motd.yaml", &motd("v2", false))]);
    let v2 = head(&f);
    let status = begun(&f, &v2);
    assert!(status.contains("rolling: wave 1 of 2"), "{status}");
    for root in rest {
        run(root);
        assert!(read(root).ends_with(" v1\n"), "not before the canary: {}", read(root));
    }
    run(canary);
    assert_eq!(read(canary), "agent1 v2\n");
    eventually(Duration::from_secs(20), Duration::from_millis(300), || {
        run(&rest[0]);
        (read(&rest[0]) == "agent2 v2\n").then_some(()).ok_or(read(&rest[0]))
    });
    run(&rest[1]);
    assert_eq!(read(&rest[1]), "agent3 v2\n");

    // v3 breaks the canary: the rollout halts, and the rest of the fleet never sees it.
    f.commit(&[("roles/motd.yaml", &motd("v3", true))]);
    let v3 = head(&f);
    begun(&f, &v3);
    let out = run(canary);
    assert!(out.stdout.contains("FAILED"), "a failure: {}{}", out.stdout, out.stderr);
    let mut status = String::new();
    eventually(Duration::from_secs(15), Duration::from_millis(300), || {
        status = server_ok(&["rollout", "status", "--config", &f.config()]);
        status.contains("HALTED").then_some(()).ok_or(status.clone())
    });
    assert!(status.contains("agent1 (canary) ran") && status.contains("1 failed"), "{status}");
    std::thread::sleep(Duration::from_secs(3));
    for root in rest {
        run(root);
        assert!(read(root).ends_with(" v2\n"), "the rest keeps v2: {}", read(root));
    }
    let curl = |path: &str| {
        let out = std::process::Command::new("curl").args(["-sk", &format!("{}{path}", server.url)]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let page = curl("/");
    assert!(page.contains("id=\"rollout-halted\"") && page.contains("data-state=\"halted\""), "{page}");
    let metrics = curl("/metrics");
    assert!(metrics.contains("converge_rollout_halted 1") && metrics.contains("converge_rollout_wave 1"), "{metrics}");
    for line in [
        "converge_rollout_hosts{wave=\"canary\",state=\"failed\"} 1",
        "converge_rollout_hosts{wave=\"everyone\",state=\"waiting\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    // The chart: each wave's hosts on the commit over time, drawn by the server.
    assert!(page.contains("id=\"rollout-chart\"") && page.contains("<svg"), "{page}");
    assert!(page.contains("data-series=\"canary\" data-hosts=\"1\""), "{page}");
    assert!(page.contains("data-series=\"everyone\" data-hosts=\"0\""), "{page}");

    // The operator lets it through: the rest gets v3 (and fails the same way).
    let promoted = server_ok(&["rollout", "promote", "--config", &f.config()]);
    assert!(promoted.contains("wave 2 (everyone) gets it"), "{promoted}");
    eventually(Duration::from_secs(15), Duration::from_millis(300), || {
        run(&rest[0]);
        (read(&rest[0]) == "agent2 v3\n").then_some(()).ok_or(read(&rest[0]))
    });

    // halt and resume: an operator's halt holds until resumed.
    f.commit(&[("roles/motd.yaml", &motd("v4", false))]);
    let v4 = head(&f);
    begun(&f, &v4);
    let held = server_ok(&["rollout", "halt", "--config", &f.config(), "--reason", "change freeze"]);
    assert!(held.contains("halted"), "{held}");
    run(canary);
    assert_eq!(read(canary), "agent1 v4\n", "the open wave has it");
    std::thread::sleep(Duration::from_secs(3));
    run(&rest[1]);
    assert_eq!(read(&rest[1]), "agent3 v3\n", "held at the commit every host has");
    let status = server_ok(&["rollout", "status", "--config", &f.config()]);
    assert!(status.contains("HALTED") && status.contains("change freeze"), "{status}");
    server_ok(&["rollout", "resume", "--config", &f.config()]);
    run(canary);
    eventually(Duration::from_secs(20), Duration::from_millis(300), || {
        run(&rest[1]);
        (read(&rest[1]) == "agent3 v4\n").then_some(()).ok_or(read(&rest[1]))
    });
    let bad = converge_e2e::run("converge-server", &["rollout", "resume", "--config", &f.config()]);
    assert!(bad.stderr.contains("not halted"), "{}", bad.stderr);
}

/// The operator's health checks (server.toml `rollout_checks`) gate each wave: one that fails
/// halts the rollout with its output; once it passes, `resume` lets the next wave open.
#[test]
fn a_failing_health_check_holds_the_next_wave() {
    let f = Fleet::new(&[("site.yaml", SITE), ("roles/motd.yaml", &motd("v1", false))]);
    let flag = f.dir.path().join("healthy");
    let check = format!(
        "rollout_checks = [[\"/bin/sh\", \"-c\", \"test -e {} || {{ echo \\\"alerts firing for $CONVERGE_WAVE\\\"; exit 3; }}\"]]\n",
        flag.display()
    );
    let text = std::fs::read_to_string(f.config()).unwrap();
    std::fs::write(f.config(), format!("{text}{check}")).unwrap();
    let server = Server::start(&f.config());
    let roots = join(&f, &server, &["agent1", "agent2"]);
    f.commit(&[("roles/motd.yaml", &motd("v2", false))]);
    let v2 = head(&f);
    begun(&f, &v2);
    run(&roots[0]);
    assert_eq!(read(&roots[0]), "agent1 v2\n");
    let mut status = String::new();
    eventually(Duration::from_secs(15), Duration::from_millis(300), || {
        status = server_ok(&["rollout", "status", "--config", &f.config()]);
        status.contains("HALTED").then_some(()).ok_or(status.clone())
    });
    assert!(status.contains("failed (exit status: 3)") && status.contains("alerts firing for everyone"), "{status}");
    run(&roots[1]);
    assert_eq!(read(&roots[1]), "agent2 v1\n", "held by the check");
    std::fs::write(&flag, "").unwrap();
    server_ok(&["rollout", "resume", "--config", &f.config()]);
    eventually(Duration::from_secs(20), Duration::from_millis(300), || {
        run(&roots[1]);
        (read(&roots[1]) == "agent2 v2\n").then_some(()).ok_or(read(&roots[1]))
    });
}

/// A pin holds hosts at a commit whatever the branch says; without it they follow again. A pin
/// that does not name a whole commit id is refused by `check`.
#[test]
fn a_pinned_host_stays_at_its_commit_until_the_pin_goes() {
    let site = "nodes:\n  \"agent*\": {roles: [motd]}\n";
    let f = Fleet::new(&[("site.yaml", site), ("roles/motd.yaml", &motd("v1", false))]);
    let server = Server::start(&f.config());
    let roots = join(&f, &server, &["agent1", "agent2"]);
    let v1 = head(&f);
    let pinned = format!("{site}pins:\n  - nodes: [agent2]\n    commit: {v1}\n    reason: migration freeze\n");
    f.commit(&[("site.yaml", &pinned), ("roles/motd.yaml", &motd("v2", false))]);
    eventually(Duration::from_secs(15), Duration::from_millis(300), || {
        run(&roots[0]);
        (read(&roots[0]) == "agent1 v2\n").then_some(()).ok_or(read(&roots[0]))
    });
    run(&roots[1]);
    assert_eq!(read(&roots[1]), "agent2 v1\n", "held at its pin");
    f.commit(&[("site.yaml", site)]);
    eventually(Duration::from_secs(15), Duration::from_millis(300), || {
        run(&roots[1]);
        (read(&roots[1]) == "agent2 v2\n").then_some(()).ok_or(read(&roots[1]))
    });
    // `check` refuses a pin to something that is not a whole commit id.
    let bad = format!("{site}pins:\n  - nodes: [agent2]\n    commit: main\n");
    f.commit(&[("site.yaml", &bad)]);
    let out = converge_e2e::run("converge-server", &["check", "--repo", &f.repo().display().to_string()]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("site.yaml:5") && out.stderr.contains("not a whole commit id"), "{}", out.stderr);
}

/// The same on real Debian hosts (booted containers on their own network, the server in a
/// namespace of its own): a commit whose package apt cannot install fails on the canary and
/// halts the rollout; the other host keeps the commit before; a fixed commit runs clean on the
/// canary, and `promote` lets it through at once (the window is an hour). Gated with the
/// container suite.
#[test]
fn on_real_hosts_a_commit_apt_cannot_apply_stops_at_the_canary_and_a_fix_is_promoted_to_the_fleet() {
    use converge_e2e::container::{Container, NetPair, enabled};
    if !enabled("a broken commit stops at the canary on real hosts") {
        return;
    }
    let site = "nodes:\n  \"*\": {roles: [motd]}\nrollout:\n  window: 1h\n  waves:\n    - {name: canary, nodes: [canary]}\n    - {name: everyone}\n";
    let role = |v: &str, broken: bool| {
        let mut r = format!("resources:\n  - file: /etc/motd\n    content: \"{{{{ node.name }}}} {v}\\n\"\n");
        if broken {
            r.push_str("  - package: converge-test-no-such-package\n");
        }
        r
    };
    let net = NetPair::new("w");
    let f = Fleet::serving(&[("site.yaml", site), ("roles/motd.yaml", &role("v1", false))], &net.a_ip, "0.0.0.0:8443");
    let w = tempfile::tempdir().unwrap();
    let _server = Server::launch(
        &f.config(),
        converge_e2e::Launch { netns: Some(&net.a), log: Some(w.path().join("server.log")), ..Default::default() },
    );
    let url = format!("https://{}:8443", net.a_ip);
    let hosts: Vec<(&str, Container)> =
        ["canary", "other"].into_iter().map(|n| (n, Container::boot_in_netns(&net.b))).collect();
    for (name, c) in &hosts {
        let out = c.join(&f, &url, name);
        assert_eq!(out.code, 0, "{name}: {}{}", out.stdout, out.stderr);
    }
    let motd = |c: &Container| std::fs::read_to_string(c.path("/etc/motd")).unwrap_or_default();
    let run = |c: &Container| c.run(&["converge", "run", "--once"]);
    let (canary, other) = (&hosts[0].1, &hosts[1].1);
    assert_eq!((motd(canary), motd(other)), ("canary v1\n".into(), "other v1\n".into()));

    // v2 asks apt for a package it does not have: the canary fails, the rollout halts.
    f.commit(&[("roles/motd.yaml", &role("v2", true))]);
    begun(&f, &head(&f));
    let out = run(canary);
    assert!(
        out.stdout.contains("FAILED") && out.stdout.contains("package:converge-test-no-such-package"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    let mut status = String::new();
    eventually(Duration::from_secs(15), Duration::from_millis(300), || {
        status = server_ok(&["rollout", "status", "--config", &f.config()]);
        status.contains("HALTED").then_some(()).ok_or(status.clone())
    });
    run(other);
    assert_eq!(motd(other), "other v1\n", "the rest of the fleet never sees it: {status}");

    // v3 fixes it: clean on the canary; the hour's window would hold the rest, promote does not.
    f.commit(&[("roles/motd.yaml", &role("v3", false))]);
    begun(&f, &head(&f));
    let out = run(canary);
    assert_eq!(motd(canary), "canary v3\n", "{}{}", out.stdout, out.stderr);
    run(other);
    assert_eq!(motd(other), "other v1\n", "the window holds the next wave");
    eventually(Duration::from_secs(15), Duration::from_millis(300), || {
        let s = server_ok(&["rollout", "status", "--config", &f.config()]);
        s.lines().any(|l| l.contains(" canary ") && l.ends_with("has it")).then_some(()).ok_or(s)
    });
    let promoted = server_ok(&["rollout", "promote", "--config", &f.config()]);
    assert!(promoted.contains("wave 2 (everyone) gets it"), "{promoted}");
    eventually(Duration::from_secs(15), Duration::from_millis(300), || {
        run(other);
        (motd(other) == "other v3\n").then_some(()).ok_or(motd(other))
    });
}
