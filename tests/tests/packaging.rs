//! The agent's .deb on a real system: installed into a booted container through the server's
//! `/bootstrap.sh`, over a network of namespaces the test made, with the server outside the
//! container. (The server's .deb under its hardened unit is proven by the lab, `lab.rs`.) Gated
//! with the container suite (`converge_e2e::container`).

use converge_e2e::container::{Container, NetPair, build_packages, enabled, package, run_ok, self_repo};
use converge_e2e::{Child, bin, copy_tree, eventually, git};
use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The `sha256//...` pin in a join line.
fn pin_of(join: &str) -> String {
    join.split_whitespace().find(|w| w.starts_with("sha256//")).expect("a pin").to_string()
}

#[test]
fn a_new_machine_joins_through_bootstrap_sh_and_runs_the_agent_service() {
    if !enabled("bootstrap.sh") {
        return;
    }
    let w = tempfile::tempdir().unwrap();
    let packages = build_packages(&w.path().join("packages"));
    let agent_deb = &package(&packages, "converge_");

    // The server, in a namespace of its own, with catalogs/ as its repository.
    let net = NetPair::new("b");
    let repo = w.path().join("repo");
    copy_tree(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../catalogs"), &repo);
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "catalogs"]);
    let state = w.path().join("state");
    let init = Command::new(bin("converge-server"))
        .args(["init", "--state", &state.display().to_string(), "--address", &net.a_ip, "--listen", "0.0.0.0:8443"])
        .args(["--repo", &repo.display().to_string()])
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let init = String::from_utf8_lossy(&init.stdout).into_owned();
    let join = init.lines().find(|l| l.contains("bootstrap.sh")).expect("the bootstrap.sh line").trim().to_string();
    std::fs::copy(agent_deb, state.join("packages").join(agent_deb.file_name().unwrap())).unwrap();
    let mut server = Child(
        net.in_a(&bin("converge-server"))
            .args(["serve", "--config", &state.join("server.toml").display().to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufReader::new(server.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains("listening on"), "{line}");

    // A fresh machine on the other side of the link runs the one line `init` printed.
    let c = Container::boot_in_netns(&net.b);
    let _ = c.run(&["rm", "-f", "/usr/local/bin/converge"]); // only what the package brings
    assert_ne!(c.run(&["sh", "-c", "command -v converge"]).code, 0);
    let script = format!("cd /root && {join} --name box1.demo");
    let out = c.run(&["sh", "-c", &script]);
    assert_eq!(out.code, 0, "{script}\n{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("the agent runs"), "{}", out.stdout);
    assert_eq!(c.sh("dpkg-query -W -f '${Status}' converge"), "install ok installed");
    assert_eq!(c.sh("systemctl is-active converge; systemctl is-enabled converge"), "active\nenabled\n");
    assert!(c.sh("cat /etc/motd").contains("box1.demo (demo)"), "converged");

    // The service reports; the node shows on the fleet page (asked from the server's side).
    eventually(Duration::from_secs(30), Duration::from_millis(500), || {
        let page = Command::new("ip")
            .args(["netns", "exec", &net.a, "curl", "-sk", "https://127.0.0.1:8443/"])
            .output()
            .unwrap();
        let page = String::from_utf8_lossy(&page.stdout).into_owned();
        if page.contains("data-node=\"box1.demo\" data-status=\"in sync\"") {
            return Ok(());
        }
        // SIGHUP: run now, rather than after the interval.
        let _ = c.run(&["systemctl", "reload", "converge"]);
        Err(format!("box1.demo never showed in sync on the fleet page:\n{page}"))
    });

    // The script comes only from the server whose key is pinned: another pin is refused by curl
    // (exit 90, the pinned key did not match) before any byte of a script is run.
    let wrong = join.replace(&pin_of(&join), &format!("sha256//{}=", "A".repeat(43)));
    let out = c.run(&["sh", "-c", &format!("cd /tmp && {wrong}")]);
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(out.stderr.contains("pinned"), "{}", out.stderr);

    // A package that does not match the script's hash is never installed.
    let tampered = state.join("packages").join(agent_deb.file_name().unwrap());
    let mut bytes = std::fs::read(&tampered).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let script_before = c.run(&["sh", "-c", &format!("cd /root && {}", join.split(" && ").next().unwrap())]);
    assert_eq!(script_before.code, 0, "{}", script_before.stderr);
    std::fs::write(&tampered, bytes).unwrap();
    let out = c.run(&["sh", "-c", "sh /root/bootstrap.sh --token x --name box2.demo"]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("does not match the hash this script carries"), "{}", out.stderr);
}

#[test]
fn the_packages_carry_their_units_configuration_and_dependencies() {
    // rpmbuild and dpkg-deb are host tools the testbed installs.
    if !enabled("package contents") {
        return;
    }
    let w = tempfile::tempdir().unwrap();
    let packages = build_packages(&w.path().join("packages"));
    for (deb, bin, depends) in [
        (package(&packages, "converge_"), "converge", "Depends: libc6, systemd\n"),
        (package(&packages, "converge-server_"), "converge-server", "Depends: libc6, systemd, git, adduser\n"),
    ] {
        let control = run_ok(Command::new("dpkg-deb").args(["-f"]).arg(&deb), "dpkg-deb");
        assert!(control.contains(depends), "{control}");
        let files = run_ok(Command::new("dpkg-deb").arg("-c").arg(&deb), "dpkg-deb");
        for f in
            [format!("./usr/bin/{bin}"), format!("./lib/systemd/system/{bin}.service"), format!("./etc/default/{bin}")]
        {
            assert!(files.contains(&f), "{f} in {}: {files}", deb.display());
        }
        // A local edit of its settings survives an upgrade.
        let conffiles = run_ok(Command::new("dpkg-deb").arg("--info").arg(&deb).arg("conffiles"), "dpkg-deb");
        assert_eq!(conffiles, format!("/etc/default/{bin}\n"));
    }
    for (rpm, bin, requires) in [
        (package(&packages, "converge-0"), "converge", &["systemd"][..]),
        (package(&packages, "converge-server-0"), "converge-server", &["systemd", "git"]),
    ] {
        let needs = run_ok(Command::new("rpm").args(["-qp", "--requires"]).arg(&rpm), "rpm");
        for r in requires {
            assert!(needs.lines().any(|l| l == *r), "{r} in {needs}");
        }
        let config = run_ok(Command::new("rpm").args(["-qp", "--configfiles"]).arg(&rpm), "rpm");
        assert_eq!(config, format!("/etc/sysconfig/{bin}\n"));
        // Installed into a scratch root (files only: no scripts, no dependencies there), its
        // unit reads the RHEL family's place for its settings.
        let root = w.path().join(format!("root-{bin}"));
        run_ok(Command::new("rpm").arg("--root").arg(&root).arg("--initdb"), "rpm");
        run_ok(Command::new("rpm").arg("--root").arg(&root).args(["-i", "--nodeps", "--noscripts"]).arg(&rpm), "rpm");
        let unit = std::fs::read_to_string(root.join(format!("usr/lib/systemd/system/{bin}.service"))).unwrap();
        assert!(unit.contains(&format!("EnvironmentFile=-/etc/sysconfig/{bin}\n")), "{unit}");
    }
}

#[test]
fn the_agent_upgrades_itself_after_its_run_and_a_failed_upgrade_leaves_it_running() {
    if !enabled("agent upgrade") {
        return;
    }
    let w = tempfile::tempdir().unwrap();
    let packages = build_packages(&w.path().join("packages"));
    let built = package(&packages, "converge_");
    // Three versions on offer: the one installed, the next, and one whose install fails.
    let repo = w.path().join("self");
    self_repo(
        &built,
        &[
            ("1.0.0", None),
            ("1.1.0", None),
            ("1.2.0", Some("#!/bin/sh\necho 'this version refuses to install' >&2\nexit 1\n")),
        ],
        &repo,
    );
    let c = Container::boot();
    c.install_self(&repo, "1.0.0");
    let version = || c.sh("dpkg-query -W -f '${Version}' converge");
    assert_eq!(version(), "1.0.0");
    let apply = |want: &str| {
        std::fs::write(
            c.path("/root/agent.yaml"),
            format!("format: 1\nresources:\n  - package: converge\n    ensure: \"{want}\"\n"),
        )
        .unwrap();
        c.run(&["/usr/bin/converge", "apply", "/root/agent.yaml", "--detailed-exitcodes"])
    };
    // The run reports the upgrade as its change and leaves it for after its report.
    let out = apply("1.1.0");
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("upgraded to 1.1.0 after this run's report"), "{}", out.stdout);
    assert!(out.stderr.contains("converge-upgrade-"), "started detached: {}", out.stderr);
    eventually(Duration::from_secs(60), Duration::from_millis(500), || {
        (version() == "1.1.0").then_some(()).ok_or_else(|| {
            format!("{}: {}", version(), c.sh("journalctl -q --no-pager -u 'converge-upgrade-*' | tail -20"))
        })
    });
    assert_eq!(c.sh("grep -c 'converge test build 1.1.0' /usr/bin/converge"), "1\n", "the new binary is in place");
    // The next run says how it went, and finds nothing to do.
    eventually(Duration::from_secs(20), Duration::from_millis(300), || {
        let out = apply("1.1.0");
        (out.code == 0 && out.stdout.contains("the agent was upgraded to 1.1.0"))
            .then_some(())
            .ok_or(format!("{}{}", out.stdout, out.stderr))
    });
    // A version that will not install: the agent that was there goes on, and says why.
    let out = apply("1.2.0");
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    c.upgrade_finished();
    assert_eq!(version(), "1.1.0", "the failed upgrade left the agent that was there");
    let out = apply("1.1.0");
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("the agent upgrade to 1.2.0 failed"), "{}", out.stdout);
    assert!(out.stdout.contains("the agent that was there goes on"), "{}", out.stdout);
}
