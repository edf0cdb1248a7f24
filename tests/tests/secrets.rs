//! Secrets from end to end, with both real binaries over real TLS on loopback, planted in the
//! example repository (`catalogs/`, with three nodes of files added): set in git encrypted, checked and diffed without a key, opened by the server in memory, sealed to each
//! host, opened by the host at apply time; then every byte the server and the agents wrote or
//! said is searched for each plaintext. A stolen catalog opens nothing elsewhere; a rotated
//! secret reaches only the hosts that read it; a removed recipient reads nothing new.

use converge_e2e::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Nodes added to the example repository's site.yaml (its `nodes:` comes last).
const NODES: &str = "
  app1: {roles: [secretapp]}
  app2: {roles: [secretapp]}
  web1: {roles: [plainweb]}
";

fn app(extra: &str) -> String {
    format!(
        "resources:
  - directory: /etc/app
    mode: \"0755\"
  - file: /etc/app/db.conf
    template: secretapp-db.conf.j2
    mode: \"0600\"
  - file: /etc/app/token
    content: \"{{{{ secrets.api_token }}}}\\n\"
    mode: \"0600\"
{extra}"
    )
}

const WEB: &str = "resources:\n  - file: /etc/motd\n    content: \"web\\n\"\n";
const DB_CONF: &str = "[db]\nuser = app\npassword = {{ secrets.db_password }}\n";
/// A resource that fails, and says why, holding a secret.
const FAILING: &str = "  - file: /etc/app/checked
    content: \"{{ secrets.api_token }}\"
    validate: [/nonexistent/validator, \"%\"]
";

/// Distinct plaintexts, none of which appears anywhere but in the hosts' managed files.
const PW_COMMON: &str = "pw-Alpha-7c1e0b";
const PW_APP2: &str = "pw-Delta-41f9aa";
const TOKEN_1: &str = "tok-Bravo-93d2c4";
const TOKEN_2: &str = "tok-Echo-2b7e11";

struct Setup {
    f: Fleet,
    keys: PathBuf,
    /// Everything the commands printed, to search at the end.
    said: Vec<u8>,
}

impl Setup {
    /// A fleet whose repository is the example one (`catalogs/`), with three nodes and two
    /// roles of files added, one of which will read secrets (none is set yet).
    fn new() -> Setup {
        let f = Fleet::new(&[("README", "the example repository follows\n")]);
        let repo = f.repo();
        copy_tree(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../catalogs"), &repo);
        let site = std::fs::read_to_string(repo.join("site.yaml")).unwrap() + NODES;
        f.commit(&[
            ("site.yaml", &site),
            ("roles/secretapp.yaml", &app("")),
            ("roles/plainweb.yaml", WEB),
            ("templates/secretapp-db.conf.j2", DB_CONF),
        ]);
        let keys = f.dir.path().join("operator");
        std::fs::create_dir_all(&keys).unwrap();
        Setup { f, keys, said: Vec::new() }
    }

    fn server(&mut self, args: &[&str], stdin: &str) -> Out {
        let mut child = Command::new(bin("converge-server"))
            .args(args)
            .env_remove("CONVERGE_SECRETS_IDENTITY")
            .env_remove("CONVERGE_SECRETS_KEY")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let out = Out::from(child.wait_with_output().unwrap());
        self.said.extend(out.stdout.as_bytes());
        self.said.extend(out.stderr.as_bytes());
        out
    }

    fn ok(&mut self, args: &[&str], stdin: &str) -> String {
        let out = self.server(args, stdin);
        assert_eq!(out.code, 0, "{args:?}: {}{}", out.stdout, out.stderr);
        out.stdout
    }

    fn set(&mut self, level: &str, name: &str, value: &str) {
        let repo = self.f.repo().display().to_string();
        self.ok(&["secret", "set", "--repo", &repo, "--level", level, name], &format!("{value}\n"));
    }

    /// `converge` in `root`, debug logging on; what it said is kept.
    fn converge(&mut self, root: &Path, args: &[&str]) -> Out {
        let out = Command::new(bin("converge"))
            .args(args)
            .args(["--root", &root.display().to_string()])
            .env("CONVERGE_LOG", "debug")
            .output()
            .unwrap();
        let out = Out::from(out);
        self.said.extend(out.stdout.as_bytes());
        self.said.extend(out.stderr.as_bytes());
        out
    }

    fn key(&self, name: &str) -> String {
        self.keys.join(name).display().to_string()
    }
}

fn read(root: &Path, path: &str) -> String {
    std::fs::read_to_string(root.join(path)).unwrap_or_default()
}

/// Every regular file under `dir` but those `skip` says no to, as (path, bytes).
fn files(dir: &Path, skip: &dyn Fn(&Path) -> bool, out: &mut Vec<(PathBuf, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let t = std::fs::symlink_metadata(&p).unwrap().file_type();
        if skip(&p) {
            continue;
        }
        if t.is_dir() {
            files(&p, skip, out);
        } else if t.is_file() {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
}

fn holds(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The recipient `converge-server init` made the server's secrets key for.
fn server_recipient(f: &Fleet) -> String {
    let text = std::fs::read_to_string(f.dir.path().join("state/secrets.key")).unwrap();
    text.split("recipient: ").nth(1).unwrap().lines().next().unwrap().trim().to_string()
}

/// The sealed values of the newest envelope an agent keeps (verified: the agent accepted it).
fn newest_envelope(root: &Path) -> Vec<u8> {
    let dir = root.join("var/lib/converge/catalogs");
    let mut all: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    all.retain(|p| p.extension().is_some_and(|x| x == "env"));
    all.sort(); // by serial, zero-padded
    std::fs::read(all.last().expect("a cached envelope")).unwrap()
}

fn catalog_of(envelope: &[u8]) -> converge_modules::catalog::Catalog {
    use base64ct::Encoding;
    let env = converge_modules::trust::parse_envelope(envelope).unwrap();
    let payload = base64ct::Base64::decode_vec(&env.payload).unwrap();
    serde_json::from_slice(&payload).unwrap()
}

fn serial(root: &Path) -> u64 {
    let status: serde_json::Value =
        serde_json::from_str(&read(root, "var/lib/converge/status.json")).expect("status.json");
    status["last_run"]["serial"].as_u64().expect("a serial")
}

#[test]
fn secrets_reach_only_their_hosts_and_no_byte_anywhere_else_holds_one() {
    let mut s = Setup::new();
    let repo = s.f.repo().display().to_string();
    let config = s.f.config();

    // The operator's workflow: keys, recipients, values from standard input, a commit.
    let alice = s.ok(&["secret", "keygen", "--out", &s.key("alice.key")], "");
    let bob = s.ok(&["secret", "keygen", "--out", &s.key("bob.key")], "");
    let recipients = format!("# the server\n{}\n# alice\n{alice}# bob\n{bob}", server_recipient(&s.f));
    write(&s.f.repo(), &[("data/secrets/recipients", &recipients)]);
    s.set("common", "db_password", PW_COMMON);
    s.set("node/app2", "db_password", PW_APP2);
    s.set("common", "api_token", TOKEN_1);
    s.f.commit(&[]);
    for (_, bytes) in {
        let mut v = Vec::new();
        files(&s.f.repo(), &|p| p.ends_with(".git"), &mut v);
        v
    } {
        for plain in [PW_COMMON, PW_APP2, TOKEN_1] {
            assert!(!holds(&bytes, plain), "{plain} in the repository in the clear");
        }
    }
    // CI without any key: check passes, and diff says which secret-bearing resources change.
    let check = s.ok(&["check", "--repo", &repo], "");
    assert!(check.contains("nodes compiled") && check.contains("no problems"), "{check}");

    // Serve; three hosts join and converge.
    let log = s.f.dir.path().join("server.log");
    let server = Server::launch(&config, Launch { log: Some(log.clone()), ..Default::default() });
    let mut roots = Vec::new();
    for name in ["app1", "app2", "web1"] {
        let root = s.f.root(name);
        let token = s.f.token(name);
        let out = s.converge(
            &root,
            &["bootstrap", "--server", &server.url, "--ca-hash", &s.f.ca_hash.clone(), "--token", &token],
        );
        assert_eq!(out.code, 0, "bootstrap {name}: {}{}", out.stdout, out.stderr);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root.join("etc/converge/seal.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the sealing key is root's alone");
        roots.push(root);
    }
    let (app1, app2, web1) = (roots[0].clone(), roots[1].clone(), roots[2].clone());
    // Each host received and used its own secrets.
    assert_eq!(read(&app1, "etc/app/db.conf"), format!("[db]\nuser = app\npassword = {PW_COMMON}\n"));
    assert_eq!(read(&app2, "etc/app/db.conf"), format!("[db]\nuser = app\npassword = {PW_APP2}\n"));
    assert_eq!(read(&app1, "etc/app/token"), format!("{TOKEN_1}\n"));
    assert_eq!(read(&web1, "etc/motd"), "web\n");
    assert!(!web1.join("etc/app").exists());
    let web1_serial = serial(&web1);
    let app1_serial = serial(&app1);

    // Rotation: a new token and a resource that fails with a secret in it. A dry-run first.
    s.set("common", "api_token", TOKEN_2);
    s.f.commit(&[("roles/secretapp.yaml", &app(FAILING))]);
    // CI without any key: diff says a secret changed, never what it is.
    let diff = s.server(&["diff", "--repo", &repo, "--from", "HEAD~1", "--to", "HEAD"], "");
    assert_eq!(diff.code, 2, "{}{}", diff.stdout, diff.stderr);
    assert!(
        diff.stdout.contains("~ file:/etc/app/token\n      content: (a secret) -> (another secret)"),
        "{}",
        diff.stdout
    );
    assert!(diff.stdout.contains("+ file:/etc/app/checked") && !diff.stdout.contains("node web1"), "{}", diff.stdout);
    assert!(!diff.stdout.contains("file:/etc/app/db.conf"), "its secret did not change: {}", diff.stdout);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let dry = s.converge(&app1, &["run", "--once", "--dry-run"]);
        if dry.stdout.contains("would change file:/etc/app/token") {
            assert!(dry.stdout.contains("bytes (sensitive)"), "{}", dry.stdout);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the dry-run never saw the new token: {}", dry.stdout);
        std::thread::sleep(Duration::from_millis(300));
    }
    for root in [&app1, &app2, &web1] {
        let out = s.converge(root, &["run", "--once"]);
        let failing = root != &web1;
        assert_eq!(out.code != 0, failing, "{}{}", out.stdout, out.stderr);
        if failing {
            assert!(out.stdout.contains("failed") && out.stdout.contains("file:/etc/app/checked"), "{}", out.stdout);
        }
        let json = s.converge(root, &["run", "--once", "--dry-run", "--format", "json"]);
        assert!(!json.stdout.is_empty());
    }
    assert_eq!(read(&app1, "etc/app/token"), format!("{TOKEN_2}\n"));
    assert_eq!(read(&app2, "etc/app/token"), format!("{TOKEN_2}\n"));
    assert!(serial(&app1) > app1_serial, "app1 reads the token: a new catalog");
    assert_eq!(serial(&web1), web1_serial, "web1 reads no secret: its catalog did not change");

    // A secret of one node changes: only that node gets a new catalog.
    let (app1_before, app2_before) = (serial(&app1), serial(&app2));
    s.set("node/app2", "db_password", "pw-Foxtrot-0d0d0d");
    s.f.commit(&[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !read(&app2, "etc/app/db.conf").contains("pw-Foxtrot-0d0d0d") {
        assert!(std::time::Instant::now() < deadline, "app2 never got its new password");
        s.converge(&app2, &["run", "--once"]);
        std::thread::sleep(Duration::from_millis(300));
    }
    s.converge(&app1, &["run", "--once"]);
    assert!(serial(&app2) > app2_before);
    assert_eq!(serial(&app1), app1_before, "app1 does not read app2's password");

    // A recipient removed and the secrets re-encrypted: bob reads nothing of the new commit.
    let recipients = format!("# the server\n{}\n# alice\n{alice}", server_recipient(&s.f));
    write(&s.f.repo(), &[("data/secrets/recipients", &recipients)]);
    s.ok(&["secret", "rekey", "--repo", &repo, "--identity", &s.key("alice.key")], "");
    s.f.commit(&[]);
    let shown = s.server(&["secret", "show", "--repo", &repo, "--identity", &s.key("bob.key"), "api_token"], "");
    assert_ne!(shown.code, 0, "bob was removed: {}", shown.stdout);
    assert!(!shown.stdout.contains(TOKEN_2));
    // (What `secret show` prints is the one plaintext an operator asks for: not searched.)
    let kept = s.said.len();
    let shown = s.ok(&["secret", "show", "--repo", &repo, "--identity", &s.key("alice.key"), "api_token"], "");
    assert_eq!(shown.trim_end(), TOKEN_2);
    s.said.truncate(kept);
    s.converge(&app1, &["run", "--once"]);
    assert_eq!(read(&app1, "etc/app/token"), format!("{TOKEN_2}\n"), "the server still opens them");

    // A catalog stolen from one host opens nothing on another, by either door.
    let stolen = newest_envelope(&app1);
    let stolen_path = s.f.dir.path().join("stolen.json");
    std::fs::write(&stolen_path, &stolen).unwrap();
    let out = s.converge(&web1, &["apply", &stolen_path.display().to_string()]);
    assert_ne!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let mut catalog = catalog_of(&stolen);
    assert!(!catalog.sealed.is_empty());
    let web1_key = converge_modules::sealed::parse_identities(&read(&web1, "etc/converge/seal.key")).unwrap();
    let e = converge_modules::sealed::open(&mut catalog, web1_key.first(), "web1").unwrap_err();
    assert!(e.to_string().contains("cannot be opened"), "{e}");

    // What the operators see: reports, nodes, the fleet page and its node and report pages.
    std::thread::sleep(Duration::from_millis(1500));
    for args in [vec!["report", "--config", &config, "--limit", "50"], vec!["node", "list", "--config", &config]] {
        s.ok(&args, "");
    }
    let mut pages = vec!["/".to_string(), "/metrics".to_string()];
    for name in ["app1", "app2", "web1"] {
        pages.push(format!("/nodes/{name}"));
    }
    let (_, node_page) = server.get(&s.f, "/nodes/app1");
    pages.extend(
        node_page
            .split("href=\"/reports/")
            .skip(1)
            .filter_map(|r| r.split('"').next())
            .map(|id| format!("/reports/{id}")),
    );
    assert!(pages.len() > 6, "report pages are linked: {pages:?}");
    for p in &pages {
        let (status, body) = server.get(&s.f, p);
        assert_eq!(status, 200, "{p}");
        s.said.extend(body.as_bytes());
    }
    let (_, report_page) = server.get(&s.f, &pages[6]);
    assert!(report_page.contains("sensitive") || report_page.contains("file:/etc/app"), "{report_page}");
    drop(server);

    // Every byte written or said, but the managed files themselves, holds no plaintext.
    let mut everything: Vec<(PathBuf, Vec<u8>)> = vec![(PathBuf::from("(output)"), s.said.clone())];
    files(&s.f.dir.path().join("state"), &|_| false, &mut everything);
    everything.push((log.clone(), std::fs::read(&log).unwrap()));
    for root in [&app1, &app2, &web1] {
        files(root, &|p| p.ends_with("etc/app"), &mut everything);
    }
    assert!(everything.iter().any(|(p, _)| p.ends_with("state.db-wal") || p.ends_with("state.db")));
    assert!(everything.iter().any(|(p, _)| p.to_string_lossy().contains("var/lib/converge/catalogs")));
    for plain in [PW_COMMON, PW_APP2, TOKEN_1, TOKEN_2, "pw-Foxtrot-0d0d0d"] {
        for (path, bytes) in &everything {
            assert!(!holds(bytes, plain), "{plain} in the clear in {}", path.display());
        }
    }
}

#[test]
fn a_host_that_enrolled_before_secrets_makes_its_sealing_key_and_sends_it_at_its_next_run() {
    let mut s = Setup::new();
    let recipients = format!("{}\n", server_recipient(&s.f));
    write(&s.f.repo(), &[("data/secrets/recipients", &recipients)]);
    s.set("common", "db_password", PW_COMMON);
    s.set("common", "api_token", TOKEN_1);
    s.f.commit(&[]);
    let server = Server::start(&s.f.config());
    let root = s.f.root("app1");
    let token = s.f.token("app1");
    let out = s
        .converge(&root, &["bootstrap", "--server", &server.url, "--ca-hash", &s.f.ca_hash.clone(), "--token", &token]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);

    // As a host enrolled by an older agent: no sealing key, and none known to the server.
    std::fs::remove_file(root.join("etc/converge/seal.key")).unwrap();
    let db = rusqlite::Connection::open(s.f.dir.path().join("state/state.db")).unwrap();
    db.execute("UPDATE nodes SET seal_key = NULL", []).unwrap();
    drop(db);
    // The server will not send secrets it cannot seal (once a commit makes it compile anew):
    // the host keeps its last catalog, and the node's page says why.
    s.f.commit(&[("roles/plainweb.yaml", "resources: []\n")]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        s.converge(&root, &["run", "--once", "--dry-run"]);
        let (_, page) = server.get(&s.f, "/nodes/app1");
        if page.contains("has not sent one yet") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{page}");
        std::thread::sleep(Duration::from_millis(300));
    }
    std::fs::remove_file(root.join("etc/app/token")).unwrap();
    // A real run makes the key, renews the certificate with it at once, and gets its secrets.
    let out = s.converge(&root, &["run", "--once"]);
    assert!(
        out.stdout.contains("certificate was renewed") || out.stderr.contains("certificate was renewed"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while read(&root, "etc/app/token") != format!("{TOKEN_1}\n") {
        assert!(std::time::Instant::now() < deadline, "the token never arrived");
        s.converge(&root, &["run", "--once"]);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(root.join("etc/converge/seal.key").exists());
    // The seal key is sent once: a second early renewal is refused (half its life first).
    let out = s.converge(&root, &["run", "--once", "--detailed-exitcodes"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(!out.stdout.contains("renewed") && !out.stderr.contains("renewed"), "{}{}", out.stdout, out.stderr);

    // A damaged sealing key is named, never echoed, and changes nothing.
    let key = root.join("etc/converge/seal.key");
    std::fs::write(&key, "AGE-SECRET-KEY-1DAMAGEDDAMAGED\n").unwrap();
    std::fs::write(root.join("etc/app/token"), "drifted\n").unwrap();
    let out = s.converge(&root, &["run", "--once"]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("seal.key: line 1 is not an age identity") && out.stderr.contains("bootstrap"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("DAMAGED") && !out.stdout.contains("DAMAGED"), "{}{}", out.stdout, out.stderr);
    assert_eq!(read(&root, "etc/app/token"), "drifted\n");
    // A symlink in its place is not followed.
    std::fs::remove_file(&key).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", &key).unwrap();
    let out = s.converge(&root, &["run", "--once"]);
    assert_ne!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(read(&root, "etc/app/token"), "drifted\n");
    drop(server);
}
