//! The fleet loop from end to end, with both real binaries over real TLS on loopback: init,
//! serve, bootstrap, converge, a commit picked up, isolation between nodes, revocation, a CA
//! that is not the pinned one, outages and restarts, and garbage from the network.

use converge_e2e::*;
use std::path::Path;
use std::time::{Duration, Instant};

const SITE: &str = "nodes:\n  \"agent*\": {roles: [motd]}\n";

fn motd(version: &str) -> String {
    format!("resources:\n  - file: /etc/motd\n    content: \"{{{{ node.name }}}} {version}\\n\"\n    mode: \"0644\"\n")
}

fn fleet() -> Fleet {
    Fleet::new(&[("site.yaml", SITE), ("roles/motd.yaml", &motd("v1"))])
}

fn bootstrap(f: &Fleet, server: &Server, name: &str, token: &str) -> std::path::PathBuf {
    let root = f.root(name);
    let out = converge_in(&root, &["bootstrap", "--server", &server.url, "--ca-hash", &f.ca_hash, "--token", token]);
    assert_eq!(out.code, 0, "bootstrap {name}: {}{}", out.stdout, out.stderr);
    root
}

fn read(root: &Path, path: &str) -> String {
    std::fs::read_to_string(root.join(path)).unwrap_or_default()
}

/// Runs the agent until `path` holds `want` (the server watches the repository every second).
fn run_until(root: &Path, path: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = converge_in(root, &["run", "--once"]);
        if read(root, path) == want {
            return;
        }
        assert!(Instant::now() < deadline, "{} never became {want:?}: {}{}", path, out.stdout, out.stderr);
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn two_agents_join_converge_pick_up_a_commit_and_report() {
    let f = fleet();
    let server = Server::start(&f.config());
    let a = bootstrap(&f, &server, "agent1", &f.token);
    let b = bootstrap(&f, &server, "agent2", &f.token("agent2"));
    assert_eq!(read(&a, "etc/motd"), "agent1 v1\n");
    assert_eq!(read(&b, "etc/motd"), "agent2 v1\n");
    for root in [&a, &b] {
        for file in
            ["etc/converge/agent.key", "etc/converge/agent.pem", "etc/converge/ca.pem", "etc/converge/agent.toml"]
        {
            assert!(root.join(file).exists(), "{file}");
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root.join("etc/converge/agent.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    // A second run: nothing new (the server answers 304), nothing changes.
    let again = converge_in(&a, &["run", "--once", "--detailed-exitcodes"]);
    assert_eq!(again.code, 0, "{}{}", again.stdout, again.stderr);

    f.commit(&[("roles/motd.yaml", &motd("v2"))]);
    run_until(&a, "etc/motd", "agent1 v2\n");
    run_until(&b, "etc/motd", "agent2 v2\n");

    let status = converge_in(&a, &["status"]);
    assert!(
        status.stdout.contains("node        agent1") && status.stdout.contains("from the server"),
        "{}",
        status.stdout
    );
    std::thread::sleep(Duration::from_millis(1500)); // the server records visits every second
    let nodes = server_ok(&["node", "list", "--config", &f.config()]);
    for name in ["agent1", "agent2"] {
        let line = nodes.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in {nodes}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[1], "changed", "{nodes}");
        let last = server_ok(&["report", "--node", name, "--limit", "1", "--config", &f.config()]);
        assert!(last.contains(": 1 changed, 0 failed"), "{last}");
    }
    // The fleet page, from loopback.
    let (status, page) = server.get(&f, "/");
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("data-node=\"agent1\"") && page.contains("data-node=\"agent2\""), "{page}");
    // The second run of each agent was answered 304.
    let (status, text) = server.get(&f, "/metrics");
    assert_eq!(status, 200, "{text}");
    let not_modified = text
        .lines()
        .find_map(|l| l.strip_prefix("converge_catalog_requests_total{outcome=\"not_modified\"} "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(not_modified.trim().parse::<u64>().unwrap() >= 2, "{text}");
}

#[test]
fn a_node_gets_only_its_own_catalog_and_a_revoked_node_is_refused_within_a_second() {
    let f = fleet();
    let server = Server::start(&f.config());
    let a = bootstrap(&f, &server, "agent1", &f.token);
    let b = bootstrap(&f, &server, "agent2", &f.token("agent2"));
    // agent2 presents agent1's identity: the server answers with agent1's catalog (the name
    // comes only from the certificate), which agent2 refuses as not its own.
    for file in ["agent.key", "agent.pem"] {
        std::fs::copy(a.join("etc/converge").join(file), b.join("etc/converge").join(file)).unwrap();
    }
    let out = converge_in(&b, &["run", "--once"]);
    assert!(out.stdout.contains("the catalog is for host agent1, and this is agent2"), "{}{}", out.stdout, out.stderr);
    assert_eq!(read(&b, "etc/motd"), "agent2 v1\n");

    server_ok(&["node", "revoke", "--config", &f.config(), "agent1"]);
    let before = std::fs::read(a.join("var/lib/converge/applied.json")).unwrap();
    // The server takes in what `node revoke` wrote within a second.
    std::thread::sleep(Duration::from_millis(1500));
    let out = converge_in(&a, &["run", "--once"]);
    assert!(out.stdout.contains("the certificate of agent1 is revoked"), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("enforcing the cached catalog"), "{}", out.stdout);
    assert_eq!(std::fs::read(a.join("var/lib/converge/applied.json")).unwrap(), before);
    // A revoked name enrolls again only through a new token.
    let again = converge_in(
        &f.root("agent1"),
        &["bootstrap", "--server", &server.url, "--ca-hash", &f.ca_hash, "--token", &f.token("agent1"), "--no-run"],
    );
    assert_eq!(again.code, 0, "{}", again.stderr);
}

#[test]
fn a_live_name_cannot_enroll_twice_and_tokens_are_single_use() {
    let f = fleet();
    let server = Server::start(&f.config());
    bootstrap(&f, &server, "agent1", &f.token);
    let other = f.dir.path().join("impostor");
    write(&other, &[("etc/hostname", "agent1\n")]);
    let out = converge_in(
        &other,
        &["bootstrap", "--server", &server.url, "--ca-hash", &f.ca_hash, "--token", &f.token("agent*")],
    );
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("agent1 already has a live certificate; revoke it first"), "{}", out.stderr);
    let reuse = converge_in(
        &f.root("agent3"),
        &["bootstrap", "--server", &server.url, "--ca-hash", &f.ca_hash, "--token", &f.token],
    );
    assert_eq!(reuse.code, 1);
    assert!(reuse.stderr.contains("the token was already used (by agent1)"), "{}", reuse.stderr);
}

#[test]
fn approval_instead_of_a_token() {
    let f = fleet();
    let server = Server::start(&f.config());
    // Someone else asks first for the name the operator means to approve, with a key of theirs.
    let keys = f.dir.path().join("impostor");
    server_ok(&["keygen", "--out", &keys.display().to_string()]);
    let impostor_key = std::fs::read_to_string(keys.join("catalog.pub")).unwrap();
    let request = serde_json::json!({"name": "agent5", "public_key": impostor_key}).to_string();
    let (status, body) = server.post(&f, "/v1/enroll", request.as_bytes());
    assert_eq!(status, 202, "{body}");
    // The real host is refused rather than taking (or losing) the name silently.
    let root = f.root("agent5");
    let bootstrap = |wait: &str| {
        converge_in(&root, &["bootstrap", "--server", &server.url, "--ca-hash", &f.ca_hash, "--wait", wait])
    };
    let out = bootstrap("30");
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("another enrollment request for agent5 is waiting"), "{}", out.stderr);
    assert!(out.stderr.contains("converge-server node reject agent5"), "{}", out.stderr);
    // The operator sees the key and where the request came from.
    let listed = server_ok(&["node", "list", "--config", &f.config()]);
    let line = listed.lines().find(|l| l.starts_with("agent5")).unwrap_or_else(|| panic!("{listed}"));
    assert!(line.contains("from 127.0.0.1, key sha256:") && line.contains("waiting for approval"), "{listed}");
    let impostor_fp = line.split("key ").nth(1).unwrap().split(':').take(2).collect::<Vec<_>>().join(":");
    // Approving needs the key, and the key the real host prints is not the impostor's.
    let no_key = run("converge-server", &["node", "approve", "--config", &f.config(), "agent5"]);
    assert_eq!(no_key.code, 1, "approve without --key");
    server_ok(&["node", "reject", "--config", &f.config(), "agent5"]);
    let out = bootstrap("1");
    assert_eq!(out.code, 1);
    let printed = out
        .stderr
        .lines()
        .find_map(|l| l.split("this host's key is ").nth(1))
        .unwrap_or_else(|| panic!("{}", out.stderr));
    let host_fp = printed.split_whitespace().next().unwrap().trim_end_matches(':').to_string();
    assert_ne!(host_fp, impostor_fp);
    let wrong = run("converge-server", &["node", "approve", "--config", &f.config(), "agent5", "--key", &impostor_fp]);
    assert_eq!(wrong.code, 1);
    assert!(wrong.stderr.contains("is from key"), "{}", wrong.stderr);
    // The impostor cannot take the request back over while the real one waits.
    let (status, body) = server.post(&f, "/v1/enroll", request.as_bytes());
    assert_eq!(status, 403, "{body}");
    server_ok(&["node", "approve", "--config", &f.config(), "agent5", "--key", &host_fp]);
    let out = bootstrap("30");
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(read(&root, "etc/motd"), "agent5 v1\n");
}

#[test]
fn a_ca_that_is_not_the_pinned_one_is_refused_at_bootstrap() {
    let real = fleet();
    let other = fleet();
    let impostor = Server::start(&other.config());
    let root = real.root("agent1");
    let out = converge_in(
        &root,
        &["bootstrap", "--server", &impostor.url, "--ca-hash", &real.ca_hash, "--token", &other.token],
    );
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("is not the pinned") || out.stderr.contains("not the pinned"), "{}", out.stderr);
    assert!(!root.join("etc/converge/agent.toml").exists(), "nothing was changed");
}

#[test]
fn outages_and_restarts() {
    let f = fleet();
    let server = Server::start(&f.config());
    let a = bootstrap(&f, &server, "agent1", &f.token);
    server.kill();
    // The server is gone: the agent enforces its cached catalog and keeps its report.
    std::fs::write(a.join("etc/motd"), "drifted\n").unwrap();
    let out = converge_in(&a, &["run", "--once"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("enforcing the cached catalog"), "{}", out.stdout);
    assert_eq!(read(&a, "etc/motd"), "agent1 v1\n", "drift repaired from the cache");
    let queued = std::fs::read_dir(a.join("var/lib/converge/reports")).unwrap().count();
    assert_eq!(queued, 1);
    let status = converge_in(&a, &["status"]);
    assert!(status.stdout.contains("from the cache"), "{}", status.stdout);
    // The server comes back with all its state: the same certificate works, the queued report
    // is delivered.
    let server = Server::start(&f.config());
    let a_toml = std::fs::read_to_string(a.join("etc/converge/agent.toml")).unwrap();
    let old_url = a_toml.lines().find(|l| l.starts_with("server")).unwrap().to_string();
    std::fs::write(
        a.join("etc/converge/agent.toml"),
        a_toml.replace(&old_url, &format!("server = \"{}\"", server.url)),
    )
    .unwrap();
    let out = converge_in(&a, &["run", "--once"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(std::fs::read_dir(a.join("var/lib/converge/reports")).unwrap().count(), 0, "the queue was delivered");
    std::thread::sleep(Duration::from_millis(1500));
    let nodes = server_ok(&["node", "list", "--config", &f.config()]);
    assert!(nodes.lines().any(|l| l.starts_with("agent1")), "{nodes}");
    // Newest first: the run just made (nothing to do), the offline run that repaired the motd,
    // and the bootstrap's first run.
    let reports = server_ok(&["report", "--node", "agent1", "--config", &f.config()]);
    let runs: Vec<&str> = reports.lines().filter(|l| !l.starts_with(' ')).collect();
    assert_eq!(runs.len(), 3, "{reports}");
    assert!(runs[0].contains(": 0 changed, 0 failed"), "{reports}");
    assert!(runs[1].contains(": 1 changed, 0 failed"), "{reports}");
    assert!(reports.contains("changed      file:/etc/motd"), "{reports}");
    let missing = run("converge-server", &["report", "--node", "nobody", "--config", &f.config()]);
    assert_eq!(missing.code, 1);
    assert!(missing.stderr.contains("there is no node nobody"), "{}", missing.stderr);
    let failed = server_ok(&["report", "--failed", "--config", &f.config()]);
    assert_eq!(failed.trim(), "no reports match");
}

/// A TLS server with the real server's certificate that answers every request with `response`.
fn fake_server(f: &Fleet, response: Vec<u8>) -> String {
    fake_server_by(f, move |_| response.clone())
}

/// [`fake_server`] whose answer depends on the request (its first bytes, as read).
fn fake_server_by(f: &Fleet, answer: impl Fn(&str) -> Vec<u8> + Send + 'static) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let state = f.dir.path().join("state");
    let cert = CertificateDer::from_pem_file(state.join("server.pem")).unwrap();
    let ca = CertificateDer::from_pem_file(state.join("ca.pem")).unwrap();
    let key = PrivateKeyDer::from_pem_file(state.join("server.key")).unwrap();
    let config =
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert, ca], key)
            .unwrap();
    let config = std::sync::Arc::new(config);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for tcp in listener.incoming().map_while(Result::ok) {
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut buf = [0u8; 65536];
            let n = tls.read(&mut buf).unwrap_or(0);
            let response = answer(&String::from_utf8_lossy(&buf[..n]));
            let _ = tls.write_all(&response);
            let _ = tls.flush();
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
    url
}

#[test]
fn garbage_and_truncated_answers_change_nothing() {
    let f = fleet();
    let server = Server::start(&f.config());
    let a = bootstrap(&f, &server, "agent1", &f.token);
    drop(server);
    let envelope = std::fs::read_dir(a.join("var/lib/converge/catalogs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "env"))
        .map(|p| std::fs::read(p).unwrap())
        .unwrap();
    let http = |body: &[u8]| {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    };
    let answers: Vec<(&str, Vec<u8>)> = vec![
        ("garbage body", http(b"\x00\x01\x02 not json at all")),
        ("truncated envelope", http(&envelope[..envelope.len() / 2])),
        (
            "an envelope with one byte changed",
            http(&{
                let mut e = envelope.clone();
                let i = e.len() / 2;
                e[i] = if e[i] == b'A' { b'B' } else { b'A' };
                e
            }),
        ),
        ("not HTTP", b"\x16\x03garbage\r\n\r\n".to_vec()),
        ("a short read", {
            let mut r = http(&envelope);
            r.truncate(r.len() - envelope.len() / 2);
            r
        }),
    ];
    let toml = std::fs::read_to_string(a.join("etc/converge/agent.toml")).unwrap();
    let applied = std::fs::read(a.join("var/lib/converge/applied.json")).unwrap();
    for (what, answer) in answers {
        let url = fake_server(&f, answer);
        let line = toml.lines().find(|l| l.starts_with("server")).unwrap();
        std::fs::write(a.join("etc/converge/agent.toml"), toml.replace(line, &format!("server = \"{url}\""))).unwrap();
        let motd = read(&a, "etc/motd");
        let out = converge_in(&a, &["run", "--once"]);
        assert_eq!(out.code, 0, "{what}: {}{}", out.stdout, out.stderr);
        assert!(out.stdout.contains("enforcing the cached catalog"), "{what}: {}", out.stdout);
        assert_eq!(read(&a, "etc/motd"), motd, "{what}");
        assert_eq!(std::fs::read(a.join("var/lib/converge/applied.json")).unwrap(), applied, "{what}");
    }
}

#[test]
fn the_daemon_runs_on_sighup_and_stops_on_sigterm() {
    let f = fleet();
    let server = Server::start(&f.config());
    let a = bootstrap(&f, &server, "agent1", &f.token);
    let toml = std::fs::read_to_string(a.join("etc/converge/agent.toml")).unwrap();
    std::fs::write(a.join("etc/converge/agent.toml"), format!("{toml}splay = \"0s\"\n")).unwrap();
    let mut daemon = Child(
        std::process::Command::new(bin("converge"))
            .args(["run", "--root", &a.display().to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    f.commit(&[("roles/motd.yaml", &motd("v3"))]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while read(&a, "etc/motd") != "agent1 v3\n" {
        assert!(Instant::now() < deadline, "the daemon never picked up v3");
        std::thread::sleep(Duration::from_millis(1200));
        let _ = std::process::Command::new("kill").args(["-HUP", &daemon.0.id().to_string()]).status();
    }
    let status = converge_in(&a, &["status"]);
    assert!(status.stdout.contains("next run"), "{}", status.stdout);
    // The daemon keeps its TLS session between runs: after the first, handshakes are resumed.
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.metric(&f, "converge_tls_resumed_total") < 1.0 {
        assert!(Instant::now() < deadline, "the daemon never resumed a TLS session");
        let _ = std::process::Command::new("kill").args(["-HUP", &daemon.0.id().to_string()]).status();
        std::thread::sleep(Duration::from_millis(1200));
    }
    let _ = std::process::Command::new("kill").args(["-TERM", &daemon.0.id().to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(code) = daemon.0.try_wait().unwrap() {
            assert!(code.success(), "{code:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the daemon did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_catalog_key_rotates_on_a_live_fleet_and_the_retired_key_signs_nothing_more() {
    let f = fleet();
    let server = Server::start(&f.config());
    let a = bootstrap(&f, &server, "agent1", &f.token);
    let b = bootstrap(&f, &server, "agent2", &f.token("agent2"));
    let keys = f.dir.path().join("state/keys");
    let old = std::fs::read(keys.join("catalog.key")).unwrap();
    // One command, with the root key brought online for it.
    let out = server_ok(&[
        "keys",
        "rotate",
        "--config",
        &f.config(),
        "--root-key",
        &keys.join("root.key").display().to_string(),
    ]);
    assert!(out.contains("version 2, with catalog key"), "{out}");
    let new_id = out.split("with catalog key ").nth(1).unwrap().split_whitespace().next().unwrap().to_string();
    assert_ne!(std::fs::read(keys.join("catalog.key")).unwrap(), old);
    let retired: Vec<_> = std::fs::read_dir(keys.join("retired")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(retired.len(), 1, "the old key is kept aside, to destroy");
    // The server signs with the new key within a second; each host adopts the list with its
    // next catalog, signed by the new key.
    for root in [&a, &b] {
        eventually(Duration::from_secs(10), Duration::from_millis(300), || {
            let out = converge_in(root, &["run", "--once"]);
            if out.code != 0 || out.stdout.contains("enforcing the cached catalog") {
                return Err(format!("{}{}", out.stdout, out.stderr));
            }
            out.stdout.contains(&format!("signed by key {new_id}")).then_some(()).ok_or(out.stdout)
        });
        let held = std::fs::read_to_string(root.join("etc/converge/trusted-keys.json")).unwrap();
        let (list, _) = converge_modules::trust::read_key_list(held.as_bytes()).unwrap();
        assert_eq!(list.version, 2);
    }
    // A host says which list it holds when it asks: the server knows at their next runs.
    for root in [&a, &b] {
        assert_eq!(converge_in(root, &["run", "--once"]).code, 0);
    }
    eventually(Duration::from_secs(10), Duration::from_millis(300), || {
        let status = server_ok(&["keys", "status", "--config", &f.config()]);
        status.contains("every host with a live certificate holds version 2").then_some(()).ok_or(status)
    });
    // A catalog signed with the retired key (stolen, say) is refused by the hosts.
    let catalog = f.dir.path().join("evil.yaml");
    std::fs::write(&catalog, "format: 1\nhost: agent1\nresources:\n  - file: /etc/evil\n    content: \"x\"\n").unwrap();
    let envelope = server_ok(&["sign", &retired[0].display().to_string(), &catalog.display().to_string()]);
    let path = f.dir.path().join("evil.env");
    std::fs::write(&path, envelope).unwrap();
    let out = converge_in(&a, &["apply", &path.display().to_string(), "--node", "agent1"]);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("no valid signature by a trusted catalog key"), "{}", out.stderr);
    assert!(!a.join("etc/evil").exists());
}

/// A host that knows several addresses of its fleet joins, pulls and reports through the one
/// that answers, and says which it could not reach; the address that answered is asked first
/// from then on.
#[test]
fn several_server_addresses_fail_over_to_the_one_that_answers() {
    let f = fleet();
    let server = Server::start(&f.config());
    let root = f.root("agent1");
    let dead = "https://127.0.0.1:1";
    let out = converge_in(
        &root,
        &["bootstrap", "--server", dead, "--server", &server.url, "--ca-hash", &f.ca_hash, "--token", &f.token],
    );
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(read(&root, "etc/motd"), "agent1 v1\n");
    let config = read(&root, "etc/converge/agent.toml");
    assert!(config.contains(&format!("server = \"{dead}\"")) && config.contains(&server.url), "{config}");
    std::fs::write(root.join("etc/motd"), "drifted\n").unwrap();
    let out = converge_in(&root, &["run", "--once"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(read(&root, "etc/motd"), "agent1 v1\n", "repaired from the catalog the second address sent");
    std::thread::sleep(Duration::from_millis(1500));
    let last = server_ok(&["report", "--node", "agent1", "--limit", "1", "--config", &f.config()]);
    assert!(last.contains(": 1 changed, 0 failed") && !last.contains("cached"), "the report arrived: {last}");
    let status = converge_in(&root, &["status"]);
    assert!(status.stdout.contains(&format!("server {dead}, {}", server.url)), "{}", status.stdout);
    // With every address away, the host says what each one answered, and enforces its cache.
    drop(server);
    let out = converge_in(&root, &["run", "--once"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(said.contains("127.0.0.1:1") && said.contains("enforcing the cached catalog"), "{said}");
}

/// `facts NODE`: what a host reported, which facts its templates see, and a warning (exit 2)
/// when its OS family contradicts the one its attributes choose its data by.
#[test]
fn facts_shows_what_a_node_reported_and_warns_when_its_os_family_contradicts_its_attributes() {
    let f = Fleet::new(&[(
        "site.yaml",
        "attributes: {os_family: debian}\nfacts:\n  cpus: {type: integer, default: 1}\n  gpus: {type: integer, default: 0}\nnodes:\n  \"*\": {roles: []}\n",
    )]);
    let server = Server::start(&f.config());
    let root = f.root("rocky1");
    write(&root, &[("etc/os-release", "ID=rocky\nID_LIKE=\"rhel centos fedora\"\nVERSION_ID=9.4\n")]);
    let out = converge_in(&root, &["bootstrap", "--server", &server.url, "--ca-hash", &f.ca_hash, "--token", &f.token]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    std::thread::sleep(Duration::from_millis(1500));
    let out = run("converge-server", &["facts", "rocky1", "--config", &f.config()]);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.starts_with("rocky1: facts reported "), "{}", out.stdout);
    assert!(out.stdout.lines().any(|l| l.contains("cpus") && l.ends_with("[declared: an integer]")), "{}", out.stdout);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.trim_start().starts_with("os_family") && l.contains("\"redhat\"") && !l.contains("declared")),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("declared but not reported (templates see their defaults): gpus"), "{}", out.stdout);
    assert!(
        out.stdout.contains("warning: rocky1 reports os_family `redhat`, but its attributes choose `debian`"),
        "{}",
        out.stdout
    );
    let json = run("converge-server", &["facts", "rocky1", "--config", &f.config(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["os_family"], "redhat");
    let none = run("converge-server", &["facts", "nobody", "--config", &f.config()]);
    assert_eq!(none.code, 1);
    assert!(none.stderr.contains("no node nobody"), "{}", none.stderr);
}

/// A server that lies about a blob (other bytes of the signed size, more, fewer) never has its
/// bytes kept or written: the file stays as it was, the store stays empty, and the run says why.
#[test]
fn a_server_that_lies_about_a_blob_never_has_its_bytes_written() {
    let f = Fleet::new(&[
        ("site.yaml", "nodes:\n  \"agent*\": {roles: [tool]}\n"),
        ("roles/tool.yaml", "resources:\n  - directory: /srv\n  - file: /srv/tool.bin\n    source: tool.bin\n"),
    ]);
    let v1: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::create_dir_all(f.repo().join("files")).unwrap();
    std::fs::write(f.repo().join("files/tool.bin"), &v1).unwrap();
    git(&f.repo(), &["add", "-A"]);
    git(&f.repo(), &["commit", "-q", "-m", "tool"]);
    let server = Server::start(&f.config());
    let root = bootstrap(&f, &server, "agent1", &f.token);
    assert_eq!(std::fs::read(root.join("srv/tool.bin")).unwrap(), v1);
    drop(server);
    let blob = root.join(format!("var/lib/converge/blobs/sha256/{}", converge_modules::hash::sha256_hex(&v1)));
    let toml = std::fs::read_to_string(root.join("etc/converge/agent.toml")).unwrap();
    let line = toml.lines().find(|l| l.starts_with("server")).unwrap().to_string();
    // Each lie meets its own check: the hash, the size bound while reading, the length.
    let lies: [(&str, Vec<u8>, &str); 3] = [
        ("other bytes of the signed size", v1.iter().map(|b| b ^ 1).collect(), "not the signed one"),
        ("more bytes than signed", [v1.as_slice(), b"trailing"].concat(), "more than the 100000 accepted"),
        ("fewer bytes than signed", v1[..v1.len() / 2].to_vec(), "sent 50000 bytes of a 100000-byte blob"),
    ];
    for (what, body, why) in lies {
        std::fs::remove_file(&blob).unwrap_or_default();
        std::fs::write(root.join("srv/tool.bin"), b"drift").unwrap();
        let url = fake_server_by(&f, move |request| {
            let head = |status: &str, len: usize| {
                format!("HTTP/1.1 {status}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n").into_bytes()
            };
            if request.contains("/blobs/sha256/") {
                [head("200 OK", body.len()), body.clone()].concat()
            } else if request.starts_with("GET") {
                head("304 Not Modified", 0)
            } else {
                head("503 Service Unavailable", 0)
            }
        });
        std::fs::write(root.join("etc/converge/agent.toml"), toml.replace(&line, &format!("server = \"{url}\"")))
            .unwrap();
        let out = converge_in(&root, &["run", "--once", "--detailed-exitcodes"]);
        assert_eq!(out.code, 4, "{what}: {}{}", out.stdout, out.stderr);
        let said = format!("{}{}", out.stdout, out.stderr);
        assert!(said.contains("could not be fetched") && said.contains(why), "{what}: {said}");
        assert_eq!(
            std::fs::read(root.join("srv/tool.bin")).unwrap(),
            b"drift",
            "{what}: nothing unverified is written"
        );
        assert!(!blob.exists(), "{what}: nothing unverified is kept");
    }
}

/// A binary file travels as a blob: fetched over mutual TLS, checked against the hash the
/// signed catalog holds, kept in the blob store; a damaged blob is refused and fetched again;
/// a new version replaces the old, whose blob goes.
#[test]
fn binary_files_arrive_as_blobs_checked_against_the_signed_hash() {
    let f = Fleet::new(&[
        ("site.yaml", "nodes:\n  \"agent*\": {roles: [tool]}\n"),
        (
            "roles/tool.yaml",
            "resources:\n  - directory: /srv\n  - file: /srv/tool.bin\n    source: tool.bin\n    mode: \"0755\"\n",
        ),
    ]);
    let v1: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let put = |bytes: &[u8]| {
        std::fs::create_dir_all(f.repo().join("files")).unwrap();
        std::fs::write(f.repo().join("files/tool.bin"), bytes).unwrap();
        git(&f.repo(), &["add", "-A"]);
        git(&f.repo(), &["commit", "-q", "-m", "tool"]);
    };
    put(&v1);
    let server = Server::start(&f.config());
    let root = bootstrap(&f, &server, "agent1", &f.token);
    assert_eq!(std::fs::read(root.join("srv/tool.bin")).unwrap(), v1);
    let hex = converge_modules::hash::sha256_hex(&v1);
    let blob = root.join(format!("var/lib/converge/blobs/sha256/{hex}"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&blob).unwrap().permissions().mode() & 0o777, 0o600);
    let again = converge_in(&root, &["run", "--once", "--detailed-exitcodes"]);
    assert_eq!(again.code, 0, "{}{}", again.stdout, again.stderr);

    // Damaged in the store (same size), and the file drifted: refused, then fetched again.
    std::fs::write(&blob, vec![0u8; v1.len()]).unwrap();
    std::fs::write(root.join("srv/tool.bin"), b"drift").unwrap();
    let out = converge_in(&root, &["run", "--once", "--detailed-exitcodes"]);
    assert_eq!(out.code, 4, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("is not what the catalog signed"), "{}", out.stdout);
    assert_eq!(std::fs::read(root.join("srv/tool.bin")).unwrap(), b"drift", "nothing unverified is written");
    let out = converge_in(&root, &["run", "--once", "--detailed-exitcodes"]);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert_eq!(std::fs::read(root.join("srv/tool.bin")).unwrap(), v1);

    // A new version: the old blob goes.
    let v2: Vec<u8> = v1.iter().rev().copied().collect();
    put(&v2);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read(root.join("srv/tool.bin")).unwrap() != v2 {
        assert!(Instant::now() < deadline, "the new version never arrived");
        converge_in(&root, &["run", "--once"]);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(!blob.exists(), "the blob no catalog names is removed");
}
