//! `converge-bench services`: the real-service roles of catalogs/ (ssh, web, db, cache: five
//! packages, accounts, sshd and sudoers checked before they are put in place, four services, a
//! PostgreSQL role and database), their first run and their no-op run, beside `puppet apply` of
//! the same state. Each tool gets fresh booted containers of the same testbed, in the same
//! run: wall time and peak RSS (a launcher inside the container), processes spawned (`strace
//! -f`, counting execve: a no-op run, and a first run on a second fresh container). The Puppet manifest is made from the compiled catalog,
//! resource for resource, so both converge exactly the same state.
//!
//! Needs root, the testbed (`CONVERGE_TESTBED`, Debian 12: puppet comes from its repository)
//! and the release build: `cargo build --release -p converge-agent -p converge-server -p
//! converge-bench`.

use crate::system::{launch, processes};
use converge_e2e::container::Container;
use converge_modules::catalog::{Catalog, Ensure, Kind, Membership, Mode, ResourceId, Spec};
use std::fmt::Write as _;
use std::time::Duration;

const NOOP_RUNS: usize = 5;
const PUPPET_NOOP_RUNS: usize = 3;

/// A Puppet single-quoted string.
fn pq(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A word for `sh`, single-quoted.
fn shq(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn sh_line(argv: &[String]) -> String {
    argv.iter().map(|a| shq(a)).collect::<Vec<_>>().join(" ")
}

fn reference(id: &ResourceId) -> String {
    let kind = match id.kind {
        Kind::File | Kind::Directory | Kind::Symlink => "File",
        Kind::Package => "Package",
        Kind::User => "User",
        Kind::Group => "Group",
        Kind::Service => "Service",
        Kind::Exec => "Exec",
        Kind::Line => "File_line",
        Kind::Block | Kind::Sysctl | Kind::Timer => "Exec",
        Kind::Mount => "Mount",
        Kind::Repository => "Exec",
    };
    format!("{kind}[{}]", pq(&id.title))
}

/// A path's mode, owner and group, as Puppet's `file` attributes.
fn ownership(set: &mut dyn FnMut(&str, String), mode: Option<Mode>, owner: &Option<String>, group: &Option<String>) {
    let mode = mode.map(|m| m.to_string());
    for (k, v) in [("mode", &mode), ("owner", owner), ("group", group)] {
        if let Some(v) = v {
            set(k, pq(v));
        }
    }
}

/// The Puppet manifest that declares what `catalog` does.
pub fn manifest(catalog: &Catalog) -> String {
    let mut pp = String::new();
    for r in &catalog.resources {
        let mut attrs: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: String| attrs.push((k.to_string(), v));
        let absent = r.spec.ensure() == Ensure::Absent;
        let kind = match &r.spec {
            Spec::File(f) => {
                set("ensure", if absent { "absent" } else { "file" }.into());
                if let Some(c) = f.content.as_ref().and_then(|c| c.held()) {
                    set("content", pq(c));
                }
                if let Some(v) = &f.validate {
                    set("validate_cmd", pq(&v.join(" ")));
                }
                ownership(&mut set, f.mode, &f.owner, &f.group);
                "file"
            }
            Spec::Directory(d) => {
                set("ensure", if absent { "absent" } else { "directory" }.into());
                ownership(&mut set, d.mode, &d.owner, &d.group);
                "file"
            }
            Spec::Symlink(s) => {
                set("ensure", if absent { "absent".into() } else { "link".into() });
                if let Some(t) = &s.target {
                    set("target", pq(t));
                }
                "file"
            }
            Spec::Package(_) => {
                set("ensure", if absent { "absent" } else { "installed" }.into());
                "package"
            }
            Spec::Group(g) => {
                set("ensure", if absent { "absent" } else { "present" }.into());
                if let Some(gid) = g.gid {
                    set("gid", gid.to_string());
                }
                if g.system == Some(true) {
                    set("system", "true".into());
                }
                "group"
            }
            Spec::User(u) => {
                set("ensure", if absent { "absent" } else { "present" }.into());
                if let Some(uid) = u.uid {
                    set("uid", uid.to_string());
                }
                for (k, v) in [("gid", &u.gid), ("home", &u.home), ("shell", &u.shell), ("comment", &u.comment)] {
                    if let Some(v) = v {
                        set(k, pq(v));
                    }
                }
                if let Some(groups) = &u.groups {
                    set("groups", format!("[{}]", groups.iter().map(|g| pq(g)).collect::<Vec<_>>().join(", ")));
                    let minimum = u.membership == Some(Membership::Minimum);
                    set("membership", if minimum { "minimum" } else { "inclusive" }.into());
                }
                let system = u.system == Some(true);
                if system {
                    set("system", "true".into());
                }
                if !system || u.home.is_some() {
                    set("managehome", "true".into());
                }
                "user"
            }
            Spec::Service(s) => {
                if let Some(e) = s.ensure {
                    set("ensure", format!("{e:?}").to_lowercase());
                }
                if let Some(e) = s.enabled {
                    set("enable", e.to_string());
                }
                "service"
            }
            Spec::Exec(e) => {
                let command = match &e.stdin {
                    // Puppet's exec has no standard input: the secret goes through printf (and
                    // so into an argument list, which is what `stdin:` avoids).
                    Some(input) => format!("printf %s {} | {}", shq(input), sh_line(&e.command)),
                    None => sh_line(&e.command),
                };
                set("command", pq(&command));
                set("provider", "shell".into());
                for (k, v) in [("unless", &e.unless), ("onlyif", &e.onlyif)] {
                    if let Some(v) = v {
                        set(k, pq(&sh_line(v)));
                    }
                }
                for (k, v) in [("creates", &e.creates), ("user", &e.user), ("cwd", &e.cwd)] {
                    if let Some(v) = v {
                        set(k, pq(v));
                    }
                }
                if e.refreshonly == Some(true) {
                    set("refreshonly", "true".into());
                }
                "exec"
            }
            // Puppet's stdlib has file_line; a block and a kernel parameter have no type in
            // Puppet itself and are not in the benchmark's catalogs.
            Spec::Line(l) => {
                set("ensure", if absent { "absent" } else { "present" }.into());
                set("path", pq(&l.path));
                for (k, v) in [("line", &l.line), ("match", &l.matches), ("after", &l.after)] {
                    if let Some(v) = v {
                        set(k, pq(v));
                    }
                }
                "file_line"
            }
            Spec::Block(_) | Spec::Sysctl(_) | Spec::Timer(_) | Spec::Mount(_) | Spec::Repository(_) => {
                let _ = writeln!(pp, "# {}: no Puppet core type; not translated", r.id);
                continue;
            }
        };
        for (k, ids) in [("require", &r.meta.requires), ("notify", &r.meta.notify)] {
            if !ids.is_empty() {
                set(k, format!("[{}]", ids.iter().map(reference).collect::<Vec<_>>().join(", ")));
            }
        }
        let _ = writeln!(pp, "{kind} {{ {}:", pq(&r.id.title));
        for (k, v) in attrs {
            let _ = writeln!(pp, "  {k} => {v},");
        }
        let _ = writeln!(pp, "}}");
    }
    pp
}

struct Measured {
    first: (Duration, u64),
    first_processes: usize,
    noop: Duration,
    noop_rss: u64,
    processes: usize,
}

/// On a fresh container from `boot`: the first run of `argv` (which must succeed with changes:
/// exit `changed`), then its no-op runs (exit 0) and the processes one spawns; the processes of
/// a first run are counted on a second fresh container (`strace` would slow the timed one).
fn measure(boot: &dyn Fn() -> Container, argv: &[&str], changed: i32, noop_runs: usize) -> Measured {
    let c = boot();
    let (first, first_rss, code) = launch(&c, argv);
    assert_eq!(code, changed, "the first run of {argv:?} converges everything");
    let mut walls = Vec::new();
    let mut rss = 0;
    for _ in 0..noop_runs {
        let (w, r, code) = launch(&c, argv);
        assert_eq!(code, 0, "a no-op run of {argv:?}");
        walls.push(w);
        rss = rss.max(r);
    }
    let noop_processes = processes(&c, argv);
    drop(c);
    let first_processes = processes(&boot(), argv);
    Measured {
        first: (first, first_rss),
        first_processes,
        noop: crate::median(walls),
        noop_rss: rss,
        processes: noop_processes,
    }
}

pub fn run() {
    let dir = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let (converge, server) = (dir.join("converge"), dir.join("converge-server"));
    assert!(
        converge.exists() && server.exists(),
        "build it first: cargo build --release -p converge-agent -p converge-server -p converge-bench"
    );
    if std::env::var("CONVERGE_TESTBED").is_err() {
        eprintln!(
            "converge-bench services needs root and the testbed: export CONVERGE_TESTBED=$(tests/testbed/prepare)"
        );
        std::process::exit(1);
    }
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../catalogs");
    let facts = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(facts.path(), "memory_mb: 512\ncpus: 2\n").unwrap();
    let out = std::process::Command::new(&server)
        .args(["compile", "--repo"])
        .arg(&repo)
        .args(["--node", "services.test", "--format", "json", "--facts"])
        .arg(facts.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "compile: {}", String::from_utf8_lossy(&out.stderr));
    let catalog: Catalog = serde_json::from_slice(&out.stdout).unwrap();
    let pp = manifest(&catalog);

    let ready = |file: &str, text: &[u8], puppet: bool| {
        let c = Container::boot_with(&converge);
        std::fs::copy(std::env::current_exe().unwrap(), c.path("/usr/local/bin/converge-bench")).unwrap();
        std::fs::write(c.path(file), text).unwrap();
        if puppet {
            // Puppet itself is installed before the clock starts: converge's agent is there too.
            c.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -qq puppet >/dev/null 2>&1");
        }
        c
    };
    let apply =
        ["/usr/local/bin/converge", "apply", "/root/services.json", "--detailed-exitcodes", "--node", "services.test"];
    let ours = measure(&|| ready("/root/services.json", &out.stdout, false), &apply, 2, NOOP_RUNS);
    let puppet = ["/usr/bin/puppet", "apply", "--detailed-exitcodes", "/root/services.pp"];
    let theirs = measure(&|| ready("/root/services.pp", pp.as_bytes(), true), &puppet, 2, PUPPET_NOOP_RUNS);

    println!(
        "converge-bench services: catalogs/ roles ssh, web, db, cache ({} resources) on fresh Debian containers",
        catalog.resources.len()
    );
    println!(
        "{:<30} {:>12} {:>12} {:>12} {:>12} {:>14} {:>12}",
        "", "first run", "first procs", "first RSS", "no-op", "no-op procs", "no-op RSS"
    );
    for (name, m) in [("converge apply", &ours), ("puppet apply (Debian's 7)", &theirs)] {
        println!(
            "{name:<30} {:>10.2} s {:>12} {:>8.1} MiB {:>10.3} s {:>14} {:>8.1} MiB",
            m.first.0.as_secs_f64(),
            m.first_processes,
            m.first.1 as f64 / 1024.0,
            m.noop.as_secs_f64(),
            m.processes,
            m.noop_rss as f64 / 1024.0
        );
    }
    println!(
        "puppet / converge: first run {:.1}x ({} / {} processes), no-op {:.0}x ({} / {} processes)",
        theirs.first.0.as_secs_f64() / ours.first.0.as_secs_f64(),
        theirs.first_processes,
        ours.first_processes,
        theirs.noop.as_secs_f64() / ours.noop.as_secs_f64(),
        theirs.processes,
        ours.processes
    );
}
