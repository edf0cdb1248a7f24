//! Three years of a fleet, in about a minute: a server and four hosts on a simulated clock
//! (libfaketime; the machine's clock is never touched), through everything the years bring.
//! Client certificates renew themselves every two months, the server's own once a year; the
//! catalog key is rotated, the CA rolled over and retired; the agent of a real Debian host
//! (a booted container, installed from its .deb) upgrades itself to a newer package; and a
//! host that was off for 120 days comes back on its own. The hosts that stayed up never fail
//! a run, and no host is bootstrapped again.
//!
//! The server runs in a network namespace the test made; three hosts are scratch roots run
//! from that namespace, the fourth is the container on the other side of a veth pair.
//! Gated with the container suite (`converge_e2e::container`); `CONVERGE_YEARS_VERBOSE=1`
//! prints every run.

use converge_e2e::container::{Container, NetPair, build_packages, enabled, package, self_repo};
use converge_e2e::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const DAY: i64 = 86_400;
const STEP: i64 = 20;
const SITE: &str = "nodes:\n  \"*\": {roles: [motd]}\n";
const ROLE: &str = "resources:\n  - file: /etc/motd\n    content: \"{{ node.name }}\\n\"\n";
/// The agent's own package, from day 800, on the container host.
const UPGRADE_SITE: &str = "nodes:\n  \"*\": {roles: [motd]}\n  box: {roles: [motd, agent]}\n";
const UPGRADE_ROLE: &str = "resources:\n  - package: converge\n    ensure: \"1.1.0\"\n";
/// Where the container's processes read the clock.
const BOX_CLOCK: &str = "/var/lib/converge-test/faketime";
const BOX_LIBRARY: &str = "/usr/local/lib/faketime/libfaketimeMT.so.1";

/// Dropped in this order: the server and the container stop before their namespaces go.
struct World {
    _server: Server,
    c: Container,
    net: NetPair,
    clock: Clock,
    f: Fleet,
    url: String,
    day: i64,
    runs: usize,
}

impl World {
    /// A scratch host's `converge ARGS --root ROOT`, from the server's namespace, at the clock's time.
    fn scratch(&self, root: &Path, args: &[&str]) -> Out {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.net.a])
            .arg(bin("converge"))
            .args(args)
            .arg("--root")
            .arg(root)
            .envs(self.clock.env())
            .output()
            .unwrap();
        Out::from(out)
    }

    /// The container host's own agent (the packaged one), at the clock's time.
    fn boxed(&self, args: &[&str]) -> Out {
        let env = [
            format!("LD_PRELOAD={BOX_LIBRARY}"),
            format!("FAKETIME_TIMESTAMP_FILE={BOX_CLOCK}"),
            "FAKETIME_NO_CACHE=1".into(),
            "DONT_FAKE_MONOTONIC=1".into(),
        ];
        let env: Vec<&str> = env.iter().map(String::as_str).collect();
        let mut argv = vec!["/usr/bin/converge"];
        argv.extend(args);
        self.c.run_env(&env, &argv)
    }

    /// Moves the clock `days` on, for the container too, and gives the server the second it
    /// needs to renew its own certificate when that is due.
    fn pass(&mut self, days: i64) {
        self.clock.advance(days * DAY);
        self.day += days;
        let file = self.c.path(BOX_CLOCK);
        let tmp = file.with_extension("new");
        std::fs::write(&tmp, format!("{:+}s\n", self.clock.offset())).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        self.f.server_keeps_up(&self.clock);
    }

    /// A run of a host that stayed up: served by the server (never its cache), nothing
    /// failed, nothing refused, its certificate never failing to renew.
    fn stayed_up(&mut self, who: &str, out: Out) -> Out {
        self.runs += 1;
        let day = self.day;
        let all = format!("{who}, day {day}: exit {}\n{}{}", out.code, out.stdout, out.stderr);
        if std::env::var("CONVERGE_YEARS_VERBOSE").is_ok() {
            eprintln!("{all}");
        }
        assert!(out.code == 0 || out.code == 2, "a failed run: {all}");
        for bad in ["enforcing the cached catalog", "could not be renewed", "was refused", "could not be adopted"] {
            assert!(!out.stdout.contains(bad), "{bad}: {all}");
        }
        out
    }

    fn run_scratch(&mut self, who: &str, root: &Path) -> Out {
        let out = self.scratch(root, &["run", "--once", "--detailed-exitcodes"]);
        self.stayed_up(who, out)
    }

    fn run_box(&mut self) -> Out {
        let out = self.boxed(&["run", "--once", "--detailed-exitcodes"]);
        self.stayed_up("box", out)
    }

    /// `/metrics`, asked from the server's own namespace (loopback: no operator token).
    fn metrics(&self) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.net.a, "curl", "-sfk", "https://127.0.0.1:8443/metrics"])
            .output()
            .unwrap();
        assert!(out.status.success(), "curl /metrics: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn operator(&self, args: &[&str]) -> Out {
        let config = self.f.config();
        let mut all = args.to_vec();
        all.extend(["--config", &config]);
        run_at(Some(&self.clock), "converge-server", &all)
    }
}

fn counter(metrics: &str, name: &str) -> i64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {name} in {metrics}")) as i64
}

fn key_list_version(text: &str) -> u64 {
    converge_modules::trust::read_key_list(text.as_bytes()).unwrap().0.version
}

#[test]
fn a_fleet_lives_three_years_without_a_failed_run_or_a_bootstrap_by_hand() {
    if !enabled("three years") {
        return;
    }
    let w = tempfile::tempdir().unwrap();
    let built = package(&build_packages(&w.path().join("packages")), "converge_");
    let repo = w.path().join("self");
    self_repo(&built, &[("1.0.0", None), ("1.1.0", None)], &repo);

    // The server, on a clock, in a namespace of its own.
    let net = NetPair::new("y");
    let f = Fleet::serving(&[("site.yaml", SITE), ("roles/motd.yaml", ROLE)], &net.a_ip, "0.0.0.0:8443");
    let Some(clock) = clock(f.dir.path(), "three years") else { return };
    let server = Server::launch(
        &f.config(),
        Launch {
            clock: Some(&clock),
            netns: Some(&net.a),
            log: Some(w.path().join("server.log")),
            ..Launch::default()
        },
    );
    let url = format!("https://{}:8443", net.a_ip);
    // The container host: the agent's 1.0.0 package, and the same clock.
    let c = Container::boot_in_netns(&net.b);
    c.install_self(&repo, "1.0.0");
    std::fs::create_dir_all(c.path(BOX_LIBRARY).parent().unwrap()).unwrap();
    std::fs::copy(clock.library(), c.path(BOX_LIBRARY)).unwrap();
    std::fs::create_dir_all(c.path(BOX_CLOCK).parent().unwrap()).unwrap();
    let mut world = World { _server: server, c, net, clock, f, url, day: 0, runs: 0 };
    world.pass(0);

    // Day 0: four hosts join, each with its one token; none joins again.
    let scratch: Vec<(String, PathBuf)> =
        ["a", "b", "sleeper"].iter().map(|n| (n.to_string(), world.f.root(n))).collect();
    for (name, root) in &scratch {
        let token = world.f.token_at(Some(&world.clock), name);
        let out = world
            .scratch(root, &["bootstrap", "--server", &world.url, "--ca-hash", &world.f.ca_hash, "--token", &token]);
        assert_eq!(out.code, 0, "bootstrap {name}: {}{}", out.stdout, out.stderr);
    }
    let token = world.f.token_at(Some(&world.clock), "box");
    let out = world.boxed(&[
        "bootstrap",
        "--server",
        &world.url,
        "--ca-hash",
        &world.f.ca_hash,
        "--name",
        "box",
        "--token",
        &token,
    ]);
    assert_eq!(out.code, 0, "bootstrap box: {}{}", out.stdout, out.stderr);
    let (a, b, sleeper) = (scratch[0].1.clone(), scratch[1].1.clone(), scratch[2].1.clone());
    world.run_scratch("sleeper", &sleeper);

    let server_pem = world.f.dir.path().join("state/server.pem");
    let mut server_certificate = std::fs::read(&server_pem).unwrap();
    let (mut server_renewals, mut host_renewals) = (0, 0);
    let (mut keys_rotated, mut ca_rotated, mut ca_retired, mut upgraded, mut sleeper_back) =
        (false, false, false, false, false);
    while world.day < 3 * 365 + STEP {
        world.pass(STEP);
        let day = world.day;
        if std::fs::read(&server_pem).unwrap() != server_certificate {
            server_certificate = std::fs::read(&server_pem).unwrap();
            server_renewals += 1;
        }
        // Day 400: the catalog key is rotated, the root key online for that command only.
        if day == 400 {
            let root_key = world.f.dir.path().join("state/keys/root.key");
            let out = world.operator(&["keys", "rotate", "--root-key", &root_key.display().to_string()]);
            assert!(out.code == 0 && out.stdout.contains("version 2"), "{}{}", out.stdout, out.stderr);
            keys_rotated = true;
            std::thread::sleep(Duration::from_millis(1500));
        }
        // Day 600: the CA is rolled over; day 700, once every host is through, retired.
        if day == 600 {
            let out = world.operator(&["ca", "rotate"]);
            assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
            ca_rotated = true;
            std::thread::sleep(Duration::from_millis(1500));
        }
        if day == 700 {
            // (The server records what hosts said once a second; the clock moves faster.)
            eventually(Duration::from_secs(10), Duration::from_millis(300), || {
                let status = world.operator(&["ca", "status"]);
                status.stdout.contains("; 0 not through the rollover yet").then_some(()).ok_or(status.stdout)
            });
            let out = world.operator(&["ca", "retire"]);
            assert_eq!(out.code, 0, "retired without --force: {}{}", out.stdout, out.stderr);
            ca_retired = true;
            std::thread::sleep(Duration::from_millis(1500));
        }
        // Day 800: the container host's role asks for the agent's next version.
        if day == 800 {
            world.f.commit(&[("site.yaml", UPGRADE_SITE), ("roles/agent.yaml", UPGRADE_ROLE)]);
            let commit =
                Command::new("git").arg("-C").arg(world.f.repo()).args(["rev-parse", "HEAD"]).output().unwrap();
            let commit = String::from_utf8_lossy(&commit.stdout).trim().to_string();
            // Host a's runs show when the server compiles the new commit.
            eventually(Duration::from_secs(20), Duration::from_millis(300), || {
                let out = world.scratch(&a, &["run", "--once", "--detailed-exitcodes"]);
                (out.code == 0 && out.stdout.contains(&commit)).then_some(()).ok_or(out.stdout)
            });
        }
        for (who, root) in [("a", &a), ("b", &b)] {
            let out = world.run_scratch(who, root);
            host_renewals += usize::from(out.stdout.contains("certificate was renewed"));
        }
        // The sleeper is off from day 100 to day 220, 70 days past its certificate's end.
        if !(100..220).contains(&day) {
            let out = world.run_scratch("sleeper", &sleeper);
            host_renewals += usize::from(out.stdout.contains("certificate was renewed"));
            if day == 220 {
                assert!(out.stdout.contains("certificate was renewed (it had expired at"), "{}", out.stdout);
                sleeper_back = true;
            }
        }
        let out = world.run_box();
        host_renewals += usize::from(out.stdout.contains("certificate was renewed"));
        if day == 800 {
            assert_eq!(out.code, 2, "{}", out.stdout);
            assert!(out.stdout.contains("upgraded to 1.1.0 after this run's report"), "{}", out.stdout);
            eventually(Duration::from_secs(90), Duration::from_millis(500), || {
                let v = world.c.sh("dpkg-query -W -f '${Version}' converge");
                (v == "1.1.0").then_some(()).ok_or(v)
            });
            assert_eq!(world.c.sh("grep -c 'converge test build 1.1.0' /usr/bin/converge"), "1\n");
            world.c.upgrade_finished();
        }
        if day == 820 {
            assert!(out.stdout.contains("the agent was upgraded to 1.1.0"), "{}", out.stdout);
            upgraded = true;
        }
    }

    // Three years on: every event happened, every host holds the new key list, the hosts
    // renewed their certificates dozens of times, and the server issued no second identity.
    assert!(keys_rotated && ca_rotated && ca_retired && upgraded && sleeper_back);
    for (name, held) in [
        ("a", std::fs::read_to_string(a.join("etc/converge/trusted-keys.json")).unwrap()),
        ("b", std::fs::read_to_string(b.join("etc/converge/trusted-keys.json")).unwrap()),
        ("sleeper", std::fs::read_to_string(sleeper.join("etc/converge/trusted-keys.json")).unwrap()),
        ("box", std::fs::read_to_string(world.c.path("/etc/converge/trusted-keys.json")).unwrap()),
    ] {
        assert_eq!(key_list_version(&held), 2, "{name} holds the rotated key list");
    }
    assert!(server_renewals >= 1, "the server renewed its own certificate");
    let metrics = world.metrics();
    let renewed = counter(&metrics, "converge_renewals_total");
    assert!(
        renewed >= 12 && renewed as usize == host_renewals,
        "{renewed} renewals ({host_renewals} seen by the hosts)"
    );
    assert_eq!(counter(&metrics, "converge_enrollments_total{outcome=\"issued\"}"), 4, "nothing bootstrapped again");
    eprintln!(
        "three years: {} days, {} runs of hosts that stayed up, none failed; {} client renewals, {} server renewals, \
         one catalog key rotation, one CA rollover, one agent upgrade, one host back after 120 days",
        world.day, world.runs, renewed, server_renewals
    );
}
