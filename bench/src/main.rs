//! Benchmarks of converge against a baseline measured in the same run (machines here are
//! shared and noisy, so only ratios mean much).
//!
//! `converge-bench noop [N ...]`: for each N, a tree of N files of about 1 KiB, ten to a
//! directory (mode 0644, root:root; directories 0755), converged once; then the median of
//! several no-op `converge apply` runs beside the median of the baseline, a separate process
//! that lstat()s, reads and SHA-256-hashes the same files. Prints both, the ratio and the peak
//! RSS of each, then a drift run (1% of the files changed) for scale. Beside both, the floor: a
//! C program (`floor/floor.c`, built with the machine's `cc`) that lstat()s, reads and
//! memcmp()s each file with its content from a flat manifest, what no correct agent can avoid.
//!
//! `converge-bench compile [N ...]`: the catalog compiler over N generated nodes; see
//! `compile.rs`.
//!
//! `converge-bench sign`: signing and verifying catalogs beside raw ed25519; see `signing.rs`.
//!
//! `converge-bench serve [NODES FULL CONCURRENCY]`: load on the server over mutual TLS; see
//! `serve.rs`. `converge-bench siege [NODES SLOW FLOODERS]`: agents' polls while slow
//! connections and an enrollment flood attack the server, beside the same unloaded; see
//! `siege.rs`.
//!
//! `converge-bench servers [NODES REPORTS CONCURRENCY]`: 1, 2 and 3 servers on PostgreSQL
//! beside one on SQLite, polled by simulated hosts; reports; storage and retention; see
//! `servers.rs`. `converge-bench rollout [HOSTS INTERVAL_S WINDOW_S]`: the time from a commit
//! to the whole fleet without waves (the baseline) and with three; `converge-bench confirm
//! [ROUNDS]`: how long a host takes to revert a change whose confirmation failed; in `rollout.rs`.
//!
//! `converge-bench first [N]`: a first run of N files in a container beside CFEngine's; see
//! `first.rs`.
//! `converge-bench system`: a no-op run over packages, users, services and files in a container,
//! beside the one query it cannot avoid and `puppet apply`; see `system.rs`.
//!
//! `converge-bench services`: the real-service roles of catalogs/, first run and no-op, beside
//! `puppet apply` of the same state; see `services.rs`.
//!
//! `converge-bench edits [N ...]`: a no-op run over N files each edited by a `file_line` and a
//! `file_block` (2N edits), beside a no-op run over the same N files managed whole (`file`
//! with `content`), in scratch roots.
//!
//! `converge-bench baseline LIST`: the baseline itself, over the paths listed in LIST.

use converge_modules::catalog::{Catalog, DirectorySpec, FileSpec, Kind, Meta, Mode, Resource, ResourceId, Spec};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod compile;
mod first;
mod page;
mod rollout;
mod serve;
mod servers;
mod services;
mod siege;
mod signing;
mod system;

const RUNS: usize = 9;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The sizes a benchmark runs at: the arguments, else 1,000 and 10,000.
    let sizes = || -> Vec<usize> {
        if args.len() > 1 { args[1..].iter().map(|a| a.parse().expect("N")).collect() } else { vec![1_000, 10_000] }
    };
    match args.first().map(String::as_str) {
        Some("baseline") => baseline(Path::new(&args[1])),
        Some("launch") => launch(&args[1..]),
        Some("compile") => compile::run(&sizes()),
        Some("sign") => signing::run(),
        Some("system") => system::run(),
        Some("first") => first::run(args.get(1).map_or(5_000, |a| a.parse().expect("N"))),
        Some("services") => services::run(),
        Some("serve") => {
            let n = |i: usize, d: usize| args.get(i).map_or(d, |a| a.parse().expect("a number"));
            serve::run(n(1, 10_000), n(2, 1_000), n(3, 64));
        }
        Some("page") => page::run(&sizes()),
        Some("servers") => {
            let n = |i: usize, d: usize| args.get(i).map_or(d, |a| a.parse().expect("a number"));
            servers::run(n(1, 100_000), n(2, 1_000_000), n(3, 64));
        }
        Some("siege") => {
            let n = |i: usize, d: usize| args.get(i).map_or(d, |a| a.parse().expect("a number"));
            siege::run(n(1, 500), n(2, 1000), n(3, 4));
        }
        Some("rollout") => {
            let n = |i: usize, d: usize| args.get(i).map_or(d, |a| a.parse().expect("a number"));
            rollout::run(n(1, 300), n(2, 6) as u64, n(3, 3) as u64);
        }
        Some("confirm") => rollout::confirm(args.get(1).map_or(3, |a| a.parse().expect("a number"))),
        Some("noop") => noop(&sizes()),
        Some("edits") => edits(&sizes()),
        _ => {
            eprintln!(
                "usage: converge-bench noop [N ...] | compile [N ...] | sign | page [N ...] | serve [NODES FULL CONCURRENCY] | servers [NODES REPORTS CONCURRENCY] | rollout [HOSTS INTERVAL_S WINDOW_S] | confirm [ROUNDS] | siege [NODES SLOW FLOODERS] | system | first [N] | services | baseline LIST"
            );
            std::process::exit(1);
        }
    }
}

/// lstat, read and hash every listed file: the floor a correct agent is measured against.
fn baseline(list: &Path) {
    let list = std::fs::read_to_string(list).expect("read list");
    let mut buf = Vec::with_capacity(4096);
    let mut acc = 0u8;
    for path in list.lines() {
        let meta = std::fs::symlink_metadata(path).expect("lstat");
        buf.clear();
        std::fs::File::open(path).expect("open").read_to_end(&mut buf).expect("read");
        let h = Sha256::digest(&buf);
        acc ^= h[0] ^ (meta.len() as u8);
    }
    std::hint::black_box(acc);
}

fn content(i: usize, version: &str) -> String {
    let line = format!("{version} line of file {i}: the quick brown fox jumps over the lazy dog\n");
    line.repeat(1024 / line.len() + 1)
}

fn rel(i: usize) -> String {
    format!("/srv/bench/d{:05}/f{:06}.conf", i / 10, i)
}

fn catalog(n: usize) -> Catalog {
    let mut resources = Vec::with_capacity(n + n / 10 + 2);
    let dir = |path: &str| {
        let spec = DirectorySpec {
            mode: Some(Mode(0o755)),
            owner: Some("root".into()),
            group: Some("root".into()),
            ..Default::default()
        };
        Resource::new(ResourceId::new(Kind::Directory, path).unwrap(), Meta::default(), Spec::Directory(spec))
    };
    resources.push(dir("/srv"));
    resources.push(dir("/srv/bench"));
    for d in 0..n.div_ceil(10) {
        resources.push(dir(&format!("/srv/bench/d{d:05}")));
        for i in d * 10..(d * 10 + 10).min(n) {
            let spec = FileSpec {
                content: Some(content(i, "v1").into()),
                mode: Some(Mode(0o644)),
                owner: Some("root".into()),
                group: Some("root".into()),
                ..Default::default()
            };
            resources.push(Resource::new(
                ResourceId::new(Kind::File, &rel(i)).unwrap(),
                Meta::default(),
                Spec::File(spec),
            ));
        }
    }
    Catalog::new(resources)
}

/// The same catalog in the YAML spelling people write.
fn yaml(c: &Catalog) -> String {
    let mut out = String::from("format: 1\nresources:\n");
    for r in &c.resources {
        out.push_str(&format!("  - {}: {}\n", r.id.kind, r.id.title));
        match &r.spec {
            Spec::File(f) => {
                out.push_str(&format!(
                    "    content: {}\n",
                    serde_json::to_string(f.content.as_ref().unwrap()).unwrap()
                ));
                out.push_str("    mode: \"0644\"\n    owner: root\n    group: root\n");
            }
            _ => out.push_str("    mode: \"0755\"\n    owner: root\n    group: root\n"),
        }
    }
    out
}

struct Run {
    wall: Duration,
    rss_kib: i64,
    code: i32,
}

/// `launch CMD...`: runs CMD and prints `wall_ns rss_kib exit_code`. A peak RSS read of a
/// child includes the memory of whatever process forked it (it survives exec), so measured
/// commands are started from this small, fresh process rather than from the benchmark itself;
/// and as CMD is its only child, the children's usage is CMD's.
fn launch(argv: &[String]) {
    let t = Instant::now();
    let status =
        Command::new(&argv[0]).args(&argv[1..]).stdout(Stdio::null()).stderr(Stdio::inherit()).status().expect("spawn");
    let wall = t.elapsed();
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).expect("getrusage");
    println!("{} {} {}", wall.as_nanos(), usage.max_rss(), status.code().unwrap_or(-1));
}

/// Runs a command through `launch` and reads its wall time and peak RSS.
fn measure(cmd: &mut Command) -> Run {
    let me = std::env::current_exe().unwrap();
    let out = Command::new(me)
        .arg("launch")
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stderr(Stdio::inherit())
        .output()
        .expect("launch");
    let text = String::from_utf8(out.stdout).unwrap();
    let f: Vec<i64> = text.split_whitespace().map(|x| x.parse().unwrap()).collect();
    Run { wall: Duration::from_nanos(f[0] as u64), rss_kib: f[1], code: f[2] as i32 }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn agent() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let agent = exe.parent().unwrap().join("converge");
    if !agent.exists() {
        eprintln!(
            "{} not found: build it first: cargo build --release -p converge-agent -p converge-bench",
            agent.display()
        );
        std::process::exit(1);
    }
    agent
}

/// No-op runs of line and block edits beside whole files, over the same N files.
fn edits(sizes: &[usize]) {
    let agent = agent();
    println!(
        "no-op converge apply: N files each with a file_line and a file_block, vs the same N files managed whole; medians of {RUNS} runs"
    );
    println!(
        "{:>7}  {:>10}  {:>12}  {:>6}  {:>9}  {:>9}",
        "N", "edits", "whole files", "ratio", "edits RSS", "whole RSS"
    );
    for &n in sizes {
        let dir = std::env::temp_dir().join(format!("converge-bench-edits-{}-{n}", std::process::id()));
        let (whole_root, edit_root) = (dir.join("whole"), dir.join("edit"));
        let mut whole = String::from("format: 1\nresources:\n  - directory: /srv\n");
        let mut edit = whole.clone();
        for root in [&whole_root, &edit_root] {
            std::fs::create_dir_all(root.join("etc")).unwrap();
            std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
            std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
        }
        for d in 0..n.div_ceil(10) {
            whole.push_str(&format!("  - directory: /srv/d{d}\n"));
            edit.push_str(&format!("  - directory: /srv/d{d}\n"));
        }
        for i in 0..n {
            let path = format!("/srv/d{}/f{i}.conf", i / 10);
            // The edits' files are there already, as a package would have left them.
            let body = content(i, "v1");
            let on_disk = edit_root.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(on_disk.parent().unwrap()).unwrap();
            std::fs::write(&on_disk, &body).unwrap();
            let edited = format!("{body}key{i} = on\n# BEGIN converge b{i}\nblock {i}\n# END converge b{i}\n");
            whole.push_str(&format!("  - file: {path}\n    content: {}\n", serde_json::to_string(&edited).unwrap()));
            edit.push_str(&format!(
                "  - file_line: l{i}\n    path: {path}\n    line: key{i} = on\n    match: ^key{i} =\n  - file_block: b{i}\n    path: {path}\n    content: \"block {i}\\n\"\n"
            ));
        }
        let (whole_path, edit_path) = (dir.join("whole.yaml"), dir.join("edit.yaml"));
        std::fs::write(&whole_path, &whole).unwrap();
        std::fs::write(&edit_path, &edit).unwrap();
        let apply = |catalog: &Path, root: &Path| {
            let mut c = Command::new(&agent);
            c.arg("apply").arg(catalog).arg("--root").arg(root).arg("--detailed-exitcodes");
            c
        };
        assert_eq!(measure(&mut apply(&whole_path, &whole_root)).code, 2, "the whole files' first run");
        assert_eq!(measure(&mut apply(&edit_path, &edit_root)).code, 2, "the edits' first run");
        let same = std::fs::read(edit_root.join("srv/d0/f0.conf")).unwrap()
            == std::fs::read(whole_root.join("srv/d0/f0.conf")).unwrap();
        assert!(same, "both ways make the same files");
        let (mut e, mut w) = (Vec::new(), Vec::new());
        let (mut e_rss, mut w_rss) = (0, 0);
        for _ in 0..RUNS {
            let a = measure(&mut apply(&edit_path, &edit_root));
            assert_eq!(a.code, 0, "a no-op run of the edits");
            e.push(a.wall);
            e_rss = e_rss.max(a.rss_kib);
            let b = measure(&mut apply(&whole_path, &whole_root));
            assert_eq!(b.code, 0, "a no-op run of the whole files");
            w.push(b.wall);
            w_rss = w_rss.max(b.rss_kib);
        }
        let (e, w) = (median(e), median(w));
        println!(
            "{n:>7}  {:>8.1}ms  {:>10.1}ms  {:>5.2}x  {:>6.1}MiB  {:>6.1}MiB",
            e.as_secs_f64() * 1e3,
            w.as_secs_f64() * 1e3,
            e.as_secs_f64() / w.as_secs_f64(),
            e_rss as f64 / 1024.0,
            w_rss as f64 / 1024.0
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The C floor of `noop`, compiled with the machine's C compiler into `dir`; `None` (said)
/// without one.
fn floor_program(dir: &Path) -> Option<PathBuf> {
    let source = dir.join("floor.c");
    std::fs::write(&source, include_str!("floor/floor.c")).unwrap();
    let program = dir.join("floor");
    match Command::new("cc").args(["-O2", "-o"]).arg(&program).arg(&source).status() {
        Ok(s) if s.success() => Some(program),
        _ => {
            println!("(no C compiler: the C floor is left out)");
            None
        }
    }
}

/// The floor's manifest of `catalog`'s files under `root`.
fn floor_manifest(root: &Path, catalog: &Catalog) -> Vec<u8> {
    let mut out = Vec::new();
    for r in &catalog.resources {
        let Spec::File(f) = &r.spec else { continue };
        let path = format!("{}{}", root.display(), r.id.title);
        let content = f.content.as_ref().and_then(|c| c.held()).unwrap_or_default().as_bytes();
        out.extend_from_slice(&(path.len() as u32).to_le_bytes());
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(&f.mode.map_or(0o644, |m| m.0).to_le_bytes());
        out.extend_from_slice(&(content.len() as u32).to_le_bytes());
        out.extend_from_slice(content);
    }
    out
}

fn noop(sizes: &[usize]) {
    let agent = agent();
    let me = std::env::current_exe().unwrap();
    let tools = std::env::temp_dir().join(format!("converge-bench-floor-{}", std::process::id()));
    std::fs::create_dir_all(&tools).unwrap();
    let floor = floor_program(&tools);
    println!(
        "no-op converge apply vs a stat+read+SHA-256 baseline over the same files; medians of {RUNS} runs, whole processes"
    );
    println!(
        "{:>7}  {:>9}  {:>10}  {:>10}  {:>6}  {:>9}  {:>12}  {:>9}  {:>6}  {:>7}",
        "N", "spelling", "converge", "baseline", "ratio", "agent RSS", "baseline RSS", "C floor", "ratio", "C RSS"
    );
    for &n in sizes {
        let dir = std::env::temp_dir().join(format!("converge-bench-{}-{n}", std::process::id()));
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
        let cat = catalog(n);
        let json_path = dir.join("catalog.json");
        std::fs::write(&json_path, serde_json::to_string(&cat).unwrap()).unwrap();
        let yaml_path = dir.join("catalog.yaml");
        std::fs::write(&yaml_path, yaml(&cat)).unwrap();
        let list: String = (0..n).map(|i| format!("{}{}\n", root.display(), rel(i))).collect();
        let list_path = dir.join("files.list");
        std::fs::write(&list_path, list).unwrap();
        let manifest_path = dir.join("floor.manifest");
        std::fs::write(&manifest_path, floor_manifest(&root, &cat)).unwrap();

        let apply = |catalog: &Path| {
            let mut c = Command::new(&agent);
            c.arg("apply").arg(catalog).arg("--root").arg(&root).arg("--detailed-exitcodes");
            c
        };
        let first = measure(&mut apply(&json_path));
        assert_eq!(first.code, 2, "the first run converges the tree");
        // The floor, measured once per size (its runs interleaved with the agent's below would
        // only add noise to a figure this small): the median of RUNS.
        let floor_ms = floor.as_ref().map(|f| {
            let mut walls = Vec::new();
            let mut rss = 0;
            for _ in 0..RUNS {
                let r = measure(Command::new(f).arg(&manifest_path));
                assert_eq!(r.code, 0, "the C floor finds every file as the catalog says");
                walls.push(r.wall);
                rss = rss.max(r.rss_kib);
            }
            (median(walls), rss)
        });

        for (spelling, path) in [("json", &json_path), ("yaml", &yaml_path)] {
            let (mut ours, mut base) = (Vec::new(), Vec::new());
            let (mut rss, mut base_rss) = (0, 0);
            for _ in 0..RUNS {
                let a = measure(&mut apply(path));
                assert_eq!(a.code, 0, "a no-op run changes nothing");
                ours.push(a.wall);
                rss = rss.max(a.rss_kib);
                let b = measure(Command::new(&me).arg("baseline").arg(&list_path));
                base.push(b.wall);
                base_rss = base_rss.max(b.rss_kib);
            }
            let (o, b) = (median(ours), median(base));
            let floor_text = match floor_ms {
                Some((f, f_rss)) => format!(
                    "  {:>7.1}ms  {:>5.2}x  {:>5.1}MiB",
                    f.as_secs_f64() * 1e3,
                    o.as_secs_f64() / f.as_secs_f64(),
                    f_rss as f64 / 1024.0
                ),
                None => String::new(),
            };
            println!(
                "{n:>7}  {spelling:>9}  {:>8.1}ms  {:>8.1}ms  {:>5.2}x  {:>6.1}MiB  {:>9.1}MiB{floor_text}",
                o.as_secs_f64() * 1e3,
                b.as_secs_f64() * 1e3,
                o.as_secs_f64() / b.as_secs_f64(),
                rss as f64 / 1024.0,
                base_rss as f64 / 1024.0
            );
        }
        // Drift: 1% of the files rewritten, then repaired (reported for scale).
        for i in (0..n).step_by(100) {
            std::fs::write(root.join(rel(i).trim_start_matches('/')), "drifted\n").unwrap();
        }
        let drift = measure(&mut apply(&json_path));
        assert_eq!(drift.code, 2);
        println!(
            "{n:>7}  first run {:.1}ms, drift repair ({} files) {:.1}ms",
            first.wall.as_secs_f64() * 1e3,
            n.div_ceil(100),
            drift.wall.as_secs_f64() * 1e3
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::remove_dir_all(&tools).unwrap();
}
