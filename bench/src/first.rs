//! `converge-bench first [N]`: a first run (every file and directory created) beside CFEngine's,
//! in a container (the container suite's, systemd as PID 1, Debian's cfengine3 from the
//! testbed's local repository).
//!
//! The same N files of about 1 KiB (ten to a directory, mode 0644, root:root) under /srv/bench,
//! declared once as converge's catalog (JSON, the wire spelling) and once as a CFEngine policy
//! (`files:` promises with `content`, `create` and `perms`, the directories declared too). Each
//! run starts from an empty /srv/bench after `sync`; the runs alternate, converge then
//! cf-agent, and each tool's median is printed with their ratio, measured in the same run.
//! Both trees are checked afterwards: every file's content and mode. After each first run,
//! converge's no-op on the container's own root (names resolved through NSS, as on a server) is
//! timed too, and beside it an earlier build's when CONVERGE_BENCH_BEFORE names one.
//!
//! Needs root and the testbed (`tests/testbed/prepare`, `CONVERGE_TESTBED`), and the release
//! build: `cargo build --release -p converge-agent -p converge-bench`.

use crate::system::launch;
use converge_e2e::container::Container;
use converge_modules::catalog::{Catalog, Spec};
use std::fmt::Write as _;
use std::time::Duration;

const RUNS: usize = 3;

/// CFEngine's spelling of the same files and directories.
fn policy(cat: &Catalog) -> String {
    let mut out = String::from(
        "body common control { bundlesequence => { \"bench\" }; }\n\
         body perms m(mode) { mode => \"$(mode)\"; owners => { \"root\" }; groups => { \"root\" }; }\n\
         bundle agent bench {\n  files:\n",
    );
    for r in &cat.resources {
        match &r.spec {
            Spec::Directory(_) => {
                let _ = writeln!(out, "    \"{}/.\" create => \"true\", perms => m(\"755\");", r.id.title);
            }
            Spec::File(f) => {
                let content = f.content.as_ref().and_then(|c| c.held()).unwrap_or_default();
                assert!(!content.contains(['"', '$', '@', '\\']), "the bench content needs no CFEngine quoting");
                let _ = writeln!(
                    out,
                    "    \"{}\" create => \"true\", perms => m(\"644\"), content => \"{content}\";",
                    r.id.title
                );
            }
            _ => unreachable!("the bench catalog holds files and directories"),
        }
    }
    out.push_str("}\n");
    out
}

/// Every file as the catalog says (content and mode), checked inside the container.
fn check_tree(c: &Container, cat: &Catalog, who: &str) {
    use std::os::unix::fs::PermissionsExt;
    for r in &cat.resources {
        if let Spec::File(f) = &r.spec {
            let p = c.path(&r.id.title);
            let have = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{who}: {}: {e}", r.id.title));
            assert_eq!(Some(have.as_str()), f.content.as_ref().and_then(|c| c.held()), "{who}: {}", r.id.title);
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, 0o644, "{who}: {}", r.id.title);
        }
    }
}

fn fresh(c: &Container) {
    c.sh("rm -rf /srv/bench /var/lib/cfengine3/state/* && sync");
}

pub fn run(n: usize) {
    let c = crate::system::boot("first");
    let install =
        c.run(&["sh", "-c", "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cfengine3 >/dev/null 2>&1"]);
    let cfengine = install.code == 0;
    let cat = crate::catalog(n);
    std::fs::write(c.path("/root/first.json"), serde_json::to_string(&cat).unwrap()).unwrap();
    std::fs::write(c.path("/root/first.cf"), policy(&cat)).unwrap();
    c.sh("chmod 600 /root/first.cf");
    let apply = ["/usr/local/bin/converge", "apply", "/root/first.json", "--detailed-exitcodes"];
    let cf = ["/usr/bin/cf-agent", "-K", "-f", "/root/first.cf"];

    // An earlier build beside this one, for the no-op on the container's own root (names
    // through NSS, as on a server): CONVERGE_BENCH_BEFORE=path/to/converge.
    let before = std::env::var_os("CONVERGE_BENCH_BEFORE").map(|p| {
        std::fs::copy(&p, c.path("/usr/local/bin/converge-before")).expect("CONVERGE_BENCH_BEFORE: a converge binary");
        ["/usr/local/bin/converge-before", "apply", "/root/first.json", "--detailed-exitcodes"]
    });
    let (mut ours, mut theirs, mut noop, mut noop_before) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut rss, mut cf_rss, mut noop_rss) = (0, 0, 0);
    for _ in 0..RUNS {
        fresh(&c);
        let (w, r, code) = launch(&c, &apply);
        assert_eq!(code, 2, "converge's first run creates everything");
        ours.push(w);
        rss = rss.max(r);
        check_tree(&c, &cat, "converge");
        for _ in 0..3 {
            let (w, r, code) = launch(&c, &apply);
            assert_eq!(code, 0, "then converge has nothing left to do");
            noop.push(w);
            noop_rss = noop_rss.max(r);
            if let Some(argv) = &before {
                let (w, _, code) = launch(&c, argv);
                assert_eq!(code, 0, "the earlier build finds nothing to do either");
                noop_before.push(w);
            }
        }
        if cfengine {
            fresh(&c);
            let (w, r, code) = launch(&c, &cf);
            assert_eq!(code, 0, "cf-agent's first run");
            theirs.push(w);
            cf_rss = cf_rss.max(r);
            check_tree(&c, &cat, "cf-agent");
            let again = c.run(&apply);
            assert_eq!(again.code, 0, "cf-agent made what converge declares: {}", again.stdout);
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let o = crate::median(ours);
    println!(
        "first run of {n} files of about 1 KiB in {} directories, from nothing, in a container; medians of {RUNS}",
        n.div_ceil(10)
    );
    println!("{:<40} {:>10} {:>10}", "", "wall", "peak RSS");
    println!("{:<40} {:>8.0}ms {:>6.1} MiB", "converge apply", ms(o), rss as f64 / 1024.0);
    let n_ms = ms(crate::median(noop));
    println!(
        "{:<40} {:>8.1}ms {:>6.1} MiB",
        "converge apply, then a no-op (median of 9)",
        n_ms,
        noop_rss as f64 / 1024.0
    );
    if !noop_before.is_empty() {
        let b_ms = ms(crate::median(noop_before));
        println!("{:<40} {:>8.1}ms   ({:.2}x this build's)", "the earlier build's no-op", b_ms, b_ms / n_ms);
    }
    if !cfengine {
        println!("cf-agent: not measured (cfengine3 cannot be installed from the local repository)");
        return;
    }
    let t = crate::median(theirs);
    println!("{:<40} {:>8.0}ms {:>6.1} MiB", "cf-agent -K (Debian's cfengine3)", ms(t), cf_rss as f64 / 1024.0);
    println!("converge takes {:.2}x CFEngine's time", o.as_secs_f64() / t.as_secs_f64());
}
