//! `converge-bench system`: a no-op run over real system state, in a container.
//!
//! A disposable container (the container suite's, systemd as PID 1) is brought to 200 installed
//! packages, 50 users in 6 groups, 30 running and enabled services and 1,000 files of about
//! 1 KiB (100 directories) by converge itself; then the median of several no-op
//! `converge apply` runs (wall time and peak RSS from a launcher inside the container) and the
//! processes one spawns (`strace -f`, counting execve) are printed beside, in the same run:
//! - the floor: the one process a no-op cannot avoid, `systemctl show` of the 30 services;
//! - `puppet apply` of a manifest declaring the same state (Debian's puppet 7), the same way.
//!
//! Needs root and the testbed (`tests/testbed/prepare`, `CONVERGE_TESTBED`), and the release
//! build: `cargo build --release -p converge-agent -p converge-bench`.

use converge_e2e::container::Container;
use std::fmt::Write as _;
use std::time::Duration;

const PACKAGES_BUILT: usize = 100;
const USERS: usize = 50;
const SERVICES: usize = 30;
const FILES: usize = 1_000;
const RUNS: usize = 7;
const PUPPET_RUNS: usize = 3;

fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// The desired state: converge's catalog (JSON, the wire spelling) and puppet's manifest.
fn state(base_packages: &[String]) -> (String, String) {
    let mut packages: Vec<String> = base_packages.to_vec();
    packages.extend((1..=PACKAGES_BUILT).map(|i| format!("cvb-pkg-{i:03}")));
    let services: Vec<String> = (1..=SERVICES).map(|i| format!("cvb-svc-{i:02}")).collect();
    let mut cat = Vec::new();
    let mut pp = String::new();
    for p in packages.iter().chain(&services) {
        cat.push(format!("{{\"package\":{}}}", q(p)));
    }
    let _ = writeln!(
        pp,
        "package {{ [{}]: ensure => installed }}",
        packages.iter().chain(&services).map(|p| format!("'{p}'")).collect::<Vec<_>>().join(", ")
    );
    for g in 0..5 {
        cat.push(format!("{{\"group\":\"cvb-team-{g}\",\"gid\":{}}}", 6000 + g));
        let _ = writeln!(pp, "group {{ 'cvb-team-{g}': ensure => present, gid => {} }}", 6000 + g);
    }
    cat.push("{\"group\":\"cvb-all\",\"gid\":6010}".into());
    let _ = writeln!(pp, "group {{ 'cvb-all': ensure => present, gid => 6010 }}");
    for u in 1..=USERS {
        let team = u % 5;
        cat.push(format!(
            "{{\"user\":\"cvb-user-{u:02}\",\"uid\":{},\"gid\":\"cvb-team-{team}\",\"groups\":[\"cvb-all\"],\"shell\":\"/bin/bash\",\"home\":\"/home/cvb-user-{u:02}\"}}",
            5000 + u
        ));
        let _ = writeln!(
            pp,
            "user {{ 'cvb-user-{u:02}': ensure => present, uid => {}, gid => 'cvb-team-{team}', groups => ['cvb-all'], membership => inclusive, shell => '/bin/bash', home => '/home/cvb-user-{u:02}', managehome => true }}",
            5000 + u
        );
    }
    for s in &services {
        cat.push(format!("{{\"service\":{},\"ensure\":\"running\",\"enabled\":true}}", q(s)));
    }
    let _ = writeln!(
        pp,
        "service {{ [{}]: ensure => running, enable => true }}",
        services.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", ")
    );
    cat.push("{\"directory\":\"/srv/bench\",\"mode\":\"0755\"}".into());
    let _ = writeln!(pp, "file {{ '/srv/bench': ensure => directory, mode => '0755' }}");
    for d in 0..FILES / 10 {
        let dir = format!("/srv/bench/d{d:03}");
        cat.push(format!("{{\"directory\":{},\"mode\":\"0755\"}}", q(&dir)));
        let _ = writeln!(pp, "file {{ '{dir}': ensure => directory, mode => '0755' }}");
        for f in 0..10 {
            let path = format!("{dir}/f{f}");
            let content = format!("{path}\n{}\n", "x".repeat(1000));
            cat.push(format!(
                "{{\"file\":{},\"content\":{},\"mode\":\"0644\",\"owner\":\"root\",\"group\":\"root\"}}",
                q(&path),
                q(&content)
            ));
            let _ = writeln!(
                pp,
                "file {{ '{path}': ensure => file, content => {}, mode => '0644', owner => 'root', group => 'root' }}",
                q(&content).replace('\'', "\\'")
            );
        }
    }
    (format!("{{\"format\":1,\"resources\":[\n{}\n]}}\n", cat.join(",\n")), pp)
}

/// `converge-bench launch` inside the container: (wall, peak RSS in KiB, exit code).
pub fn launch(c: &Container, argv: &[&str]) -> (Duration, u64, i32) {
    let mut all = vec!["/usr/local/bin/converge-bench", "launch"];
    all.extend(argv);
    let out = c.run(&all);
    let f: Vec<&str> = out.stdout.split_whitespace().collect();
    assert_eq!(f.len(), 3, "launch {argv:?}: {}{}", out.stdout, out.stderr);
    (Duration::from_nanos(f[0].parse().unwrap()), f[1].parse().unwrap(), f[2].parse().unwrap())
}

/// Processes `argv` spawns (successful execve calls under `strace -f`, the command itself
/// excluded; the failed tries of a PATH search are not processes).
pub fn processes(c: &Container, argv: &[&str]) -> usize {
    let mut all = vec!["strace", "-f", "-qq", "-e", "trace=execve,execveat", "-o", "/tmp/trace"];
    all.extend(argv);
    let _ = c.run(&all);
    c.sh("grep 'execve' /tmp/trace | grep -c ' = 0$' || true").trim().parse::<usize>().unwrap_or(0).saturating_sub(1)
}

/// A container of the testbed with the release agent and this benchmark in it (`launch`);
/// exits with what to do when the build or the testbed is missing.
pub fn boot(bench: &str) -> Container {
    let dir = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let converge = dir.join("converge");
    assert!(converge.exists(), "build it first: cargo build --release -p converge-agent -p converge-bench");
    if std::env::var("CONVERGE_TESTBED").is_err() {
        eprintln!(
            "converge-bench {bench} needs root and the testbed: export CONVERGE_TESTBED=$(tests/testbed/prepare)"
        );
        std::process::exit(1);
    }
    let c = Container::boot_with(&converge);
    std::fs::copy(std::env::current_exe().unwrap(), c.path("/usr/local/bin/converge-bench")).unwrap();
    c
}

pub fn run() {
    let c = boot("system");
    let base: Vec<String> = c
        .sh("dpkg-query -W -f '${Package}\\n' | grep -v '^cvb-' | sort | head -n 100")
        .lines()
        .map(str::to_string)
        .collect();
    let (catalog, manifest) = state(&base);
    std::fs::write(c.path("/root/bench.json"), &catalog).unwrap();
    std::fs::write(c.path("/root/bench.pp"), &manifest).unwrap();
    let apply = ["/usr/local/bin/converge", "apply", "/root/bench.json", "--detailed-exitcodes"];
    let first = launch(&c, &apply);
    assert_eq!(first.2, 2, "the first run converges everything");
    let again = c.run(&apply);
    assert_eq!(again.code, 0, "then nothing is left to do: {}", again.stdout);
    let counts = c.sh("echo $(dpkg-query -W -f '${db:Status-Abbrev}\\n' | grep -c ^ii) packages, \
         $(getent passwd | grep -c ^cvb-user) users, \
         $(systemctl list-units 'cvb-svc-*' --state=running --no-legend | wc -l) running services, \
         $(find /srv/bench -type f | wc -l) files");
    println!("converge-bench system: a no-op run in a container (systemd as PID 1) with {}", counts.trim());
    println!("first run (installs, creates, starts everything): {:.2} s", first.0.as_secs_f64());

    let mut walls = Vec::new();
    let mut rss = 0;
    for _ in 0..RUNS {
        let (w, r, code) = launch(&c, &apply);
        assert_eq!(code, 0);
        walls.push(w);
        rss = rss.max(r);
    }
    let converge_wall = crate::median(walls);
    let converge_procs = processes(&c, &apply);

    let services: Vec<String> = (1..=SERVICES).map(|i| format!("cvb-svc-{i:02}.service")).collect();
    let mut floor_argv = vec![
        "/bin/systemctl",
        "show",
        "--property=Id,LoadState,ActiveState,UnitFileState,CanReload,NeedDaemonReload",
        "--",
    ];
    floor_argv.extend(services.iter().map(String::as_str));
    let floor = crate::median((0..RUNS).map(|_| launch(&c, &floor_argv).0).collect());

    println!("{:<44} {:>10} {:>10} {:>10}", "", "wall", "processes", "peak RSS");
    println!(
        "{:<44} {:>8.3} s {:>10} {:>7.1} MiB",
        "converge apply (no-op)",
        converge_wall.as_secs_f64(),
        converge_procs,
        rss as f64 / 1024.0
    );
    println!("{:<44} {:>8.3} s {:>10}", "floor: systemctl show of the 30 services", floor.as_secs_f64(), 1);

    // Puppet, when the local repository has it (tests/testbed/prepare fetches it).
    let install = c.run(&["sh", "-c", "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq puppet >/dev/null 2>&1"]);
    if install.code != 0 {
        println!("puppet apply: not measured (puppet cannot be installed from the local repository)");
        println!("converge no-op: {:.1}x the floor", converge_wall.as_secs_f64() / floor.as_secs_f64());
        return;
    }
    let puppet = ["/usr/bin/puppet", "apply", "--detailed-exitcodes", "/root/bench.pp"];
    let settle = launch(&c, &puppet);
    eprintln!("puppet's first apply over the converged state: exit {} in {:.1} s", settle.2, settle.0.as_secs_f64());
    let mut pwalls = Vec::new();
    let mut prss = 0;
    let mut pcode = 0;
    for _ in 0..PUPPET_RUNS {
        let (w, r, code) = launch(&c, &puppet);
        pwalls.push(w);
        prss = prss.max(r);
        pcode = code;
    }
    let puppet_wall = crate::median(pwalls);
    let puppet_procs = processes(&c, &puppet);
    println!(
        "{:<44} {:>8.3} s {:>10} {:>7.1} MiB  (exit {pcode})",
        "puppet apply (no-op, Debian's puppet 7)",
        puppet_wall.as_secs_f64(),
        puppet_procs,
        prss as f64 / 1024.0
    );
    println!(
        "converge no-op: {:.1}x the floor; puppet takes {:.0}x converge's time and spawns {} processes to converge's {}",
        converge_wall.as_secs_f64() / floor.as_secs_f64(),
        puppet_wall.as_secs_f64() / converge_wall.as_secs_f64(),
        puppet_procs,
        converge_procs
    );
}
