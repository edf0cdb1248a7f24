//! The agent's own state as hostile input, with both real binaries over TLS on loopback: every
//! file the agent keeps is truncated, zeroed, bit-flipped, emptied and replaced by a symlink
//! in turn, then the agent runs. Nothing may panic; the trust state never goes back; what can
//! be repaired is repaired (or refetched) and said; what cannot (the host's identity) stops
//! the run with exit 1 and names the file, and `converge status` never shows an old success
//! instead; and once the file is whole again, the next run is clean.

use converge_e2e::*;
use std::path::{Path, PathBuf};

const SITE: &str = "nodes:\n  \"*\": {roles: [motd]}\n";
const ROLE: &str = "resources:\n  - file: /etc/motd\n    content: \"{{ node.name }}\\n\"\n    mode: \"0644\"\n";

#[derive(Clone, Copy, Debug)]
enum Kind {
    Truncated,
    Zeroed,
    Flipped,
    Empty,
    Symlink,
}

const KINDS: [Kind; 5] = [Kind::Truncated, Kind::Zeroed, Kind::Flipped, Kind::Empty, Kind::Symlink];

fn damage(path: &Path, kind: Kind) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    match kind {
        Kind::Truncated => std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap(),
        Kind::Zeroed => std::fs::write(path, vec![0u8; bytes.len()]).unwrap(),
        Kind::Flipped => {
            let mut b = bytes.clone();
            let i = b.len() / 2;
            b[i] ^= 0x01;
            std::fs::write(path, b).unwrap();
        }
        Kind::Empty => std::fs::write(path, b"").unwrap(),
        Kind::Symlink => {
            let keep = path.with_extension("kept");
            std::fs::rename(path, &keep).unwrap();
            std::os::unix::fs::symlink(&keep, path).unwrap();
        }
    }
}

/// What a damaged file must lead to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// The agent repairs, refetches or sets it aside on its own: the run converges.
    Repaired,
    /// The host's identity or trust root: the run stops naming the file, or (when the damage
    /// only breaks the connection) enforces its cache and says so.
    Identity,
}

struct Agent {
    root: PathBuf,
}

impl Agent {
    fn run(&self) -> Out {
        converge_in(&self.root, &["run", "--once"])
    }

    fn state(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn serial(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.state("var/lib/converge/applied.json")).ok()?;
        serde_json::from_str::<serde_json::Value>(&text).ok()?["applied"]["serial"].as_u64()
    }

    /// The newest file in a state directory whose name ends in `suffix`.
    fn newest(&self, dir: &str, suffix: &str) -> PathBuf {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.state(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .collect();
        names.sort();
        names.pop().unwrap_or_else(|| panic!("no {suffix} in {dir}"))
    }
}

/// A fleet with a server, and a fresh agent per case.
struct Bench {
    f: Fleet,
    server: Server,
}

impl Bench {
    fn new() -> Bench {
        let f = Fleet::new(&[("site.yaml", SITE), ("roles/motd.yaml", ROLE)]);
        let server = Server::start(&f.config());
        Bench { f, server }
    }

    fn agent(&self, name: &str) -> Agent {
        let root = self.f.root(name);
        let token = self.f.token(name);
        let out = converge_in(
            &root,
            &["bootstrap", "--server", &self.server.url, "--ca-hash", &self.f.ca_hash, "--token", &token],
        );
        assert_eq!(out.code, 0, "bootstrap {name}: {}{}", out.stdout, out.stderr);
        let a = Agent { root };
        assert_eq!(a.run().code, 0, "a second run, with the ETag");
        a
    }
}

fn sane(what: &str, out: &Out) {
    assert!(!out.stderr.contains("internal error"), "{what}: a panic: {}", out.stderr);
    assert!(matches!(out.code, 0 | 1), "{what}: exit {}: {}{}", out.code, out.stdout, out.stderr);
}

/// Damages `file` (found by `locate` in a prepared agent) every way, and checks what follows.
fn check(file: &str, expect: Expect, prepare: impl Fn(&Agent), locate: impl Fn(&Agent) -> PathBuf) {
    let bench = Bench::new();
    for (i, kind) in KINDS.into_iter().enumerate() {
        let what = format!("{file} {kind:?}");
        let a = bench.agent(&format!("{}-{i}", file.replace(['/', '.', '*'], "-").trim_matches('-')));
        prepare(&a);
        let path = locate(&a);
        let whole = std::fs::read(&path).unwrap();
        let serial = a.serial();
        std::fs::write(a.state("etc/motd"), "drifted\n").unwrap();
        damage(&path, kind);
        let out = a.run();
        sane(&what, &out);
        assert!(a.serial() >= serial, "{what}: the applied serial went back");
        let text = format!("{}{}", out.stdout, out.stderr);
        match expect {
            Expect::Repaired => {
                assert_eq!(out.code, 0, "{what}: {text}");
                assert_eq!(std::fs::read_to_string(a.state("etc/motd")).unwrap(), format!("{}\n", name_of(&a)));
            }
            Expect::Identity if out.code == 1 => {
                let base = Path::new(file).file_name().unwrap().to_string_lossy().into_owned();
                assert!(out.stderr.contains(&base), "{what}: names the file: {}", out.stderr);
                assert_eq!(out.stderr.trim_end().lines().count(), 1, "{what}: one line: {}", out.stderr);
                let status = converge_in(&a.root, &["status"]);
                assert!(!status.stdout.contains("in sync"), "{what}: status shows an old success: {}", status.stdout);
            }
            Expect::Identity => {
                assert!(text.contains("enforcing the cached catalog"), "{what}: {text}");
            }
        }
        // Whole again (or left as the agent left it, for what it repairs): the next run is clean.
        if expect == Expect::Identity {
            let _ = std::fs::remove_file(&path);
            std::fs::write(&path, &whole).unwrap();
        }
        let again = a.run();
        assert_eq!(again.code, 0, "{what}: the run after: {}{}", again.stdout, again.stderr);
        assert!(!again.stdout.contains("damaged"), "{what}: still damaged: {}", again.stdout);
    }
}

fn name_of(a: &Agent) -> String {
    a.root.file_name().unwrap().to_string_lossy().into_owned()
}

fn nothing(_: &Agent) {}

fn at(rel: &'static str) -> impl Fn(&Agent) -> PathBuf {
    move |a| a.state(rel)
}

#[test]
fn the_applied_record() {
    check("var/lib/converge/applied.json", Expect::Repaired, nothing, at("var/lib/converge/applied.json"));
}

#[test]
fn the_cached_envelope() {
    check("catalogs/*.env", Expect::Repaired, nothing, |a| a.newest("var/lib/converge/catalogs", ".env"));
}

#[test]
fn the_etag() {
    check("catalogs/*.etag", Expect::Repaired, nothing, |a| a.newest("var/lib/converge/catalogs", ".etag"));
}

#[test]
fn the_status() {
    check("status.json", Expect::Repaired, nothing, at("var/lib/converge/status.json"));
}

#[test]
fn a_queued_report() {
    // A run while the server is away queues its report.
    let away = |a: &Agent| {
        let toml = a.state("etc/converge/agent.toml");
        let text = std::fs::read_to_string(&toml).unwrap();
        let server = text.lines().find(|l| l.starts_with("server")).unwrap().to_string();
        std::fs::write(&toml, text.replace(&server, "server = \"https://127.0.0.1:1\"")).unwrap();
        assert_eq!(a.run().code, 0);
        std::fs::write(&toml, text).unwrap();
    };
    check("reports/*.json", Expect::Repaired, away, |a| a.newest("var/lib/converge/reports", ".json"));
}

#[test]
fn the_backup_index() {
    let backed_up = |a: &Agent| {
        std::fs::write(a.state("etc/motd"), "drift to back up\n").unwrap();
        assert_eq!(a.run().code, 0);
    };
    check("backups/index", Expect::Repaired, backed_up, at("var/lib/converge/backups/index"));
}

#[test]
fn the_agent_configuration() {
    check("etc/converge/agent.toml", Expect::Identity, nothing, at("etc/converge/agent.toml"));
}

#[test]
fn the_ca() {
    check("etc/converge/ca.pem", Expect::Identity, nothing, at("etc/converge/ca.pem"));
}

#[test]
fn the_certificate() {
    check("etc/converge/agent.pem", Expect::Identity, nothing, at("etc/converge/agent.pem"));
}

#[test]
fn the_key() {
    check("etc/converge/agent.key", Expect::Identity, nothing, at("etc/converge/agent.key"));
}

#[test]
fn the_key_list() {
    check("etc/converge/trusted-keys.json", Expect::Identity, nothing, at("etc/converge/trusted-keys.json"));
}
