//! The server under attack, over real TLS on loopback: slow handshakes, heads and bodies from
//! hundreds of connections under a low open-file limit, oversized and malformed bodies,
//! enrollment floods and races, log injection and page-rendering bombs. Attackers connect
//! from 127.0.0.2, agents from 127.0.0.1, as they would from different hosts. Nothing an
//! attacker sends may starve an enrolled agent, grow the server without bound, forge a log
//! line or store anything out of bounds.

use converge_e2e::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const SITE: &str = "nodes:\n  \"*\": {roles: [motd]}\n";
const ROLE: &str = "resources:\n  - file: /etc/motd\n    content: \"{{ node.name }}\\n\"\n";

fn fleet(timeout: &str) -> Fleet {
    let f = Fleet::new(&[("site.yaml", SITE), ("roles/motd.yaml", ROLE)]);
    let config = f.dir.path().join("state/server.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("request_timeout = \"{timeout}\"\n"));
    std::fs::write(&config, text).unwrap();
    f
}

fn enroll(f: &Fleet, server: &Server, name: &str) -> std::path::PathBuf {
    let root = f.root(name);
    let token = f.token(name);
    let out = converge_in(&root, &["bootstrap", "--server", &server.url, "--ca-hash", &f.ca_hash, "--token", &token]);
    assert_eq!(out.code, 0, "bootstrap {name}: {}{}", out.stdout, out.stderr);
    root
}

/// A TCP connection to the server from 127.0.0.2: another host, as far as the server knows.
fn from_elsewhere(server: &Server) -> Option<TcpStream> {
    connect_from(server, [127, 0, 0, 2])
}

/// A TCP connection to the server from the loopback address `from`.
fn connect_from(server: &Server, from: [u8; 4]) -> Option<TcpStream> {
    let to: SocketAddr = server.addr().parse().unwrap();
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    s.bind(&SocketAddr::from((from, 0)).into()).ok()?;
    s.connect_timeout(&to.into(), Duration::from_secs(5)).ok()?;
    Some(s.into())
}

/// POSTs `body` to `path` from the loopback address `from`, without a client certificate.
fn post_from(server: &Server, f: &Fleet, from: [u8; 4], path: &str, body: &[u8]) -> (u16, String) {
    let Some(mut t) = connect_from(server, from).and_then(|tcp| tls(f, tcp)) else { return (0, String::new()) };
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = t.write_all(head.as_bytes());
    let _ = t.write_all(body);
    let mut response = String::new();
    let _ = t.read_to_string(&mut response);
    let status = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// TLS over `tcp`, handshake done; `None` when the server closed it first.
fn tls(f: &Fleet, tcp: TcpStream) -> Option<Tls> {
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Server::tls(f), name).unwrap();
    let mut t = rustls::StreamOwned::new(conn, tcp);
    while t.conn.is_handshaking() {
        t.conn.complete_io(&mut t.sock).ok()?;
    }
    Some(t)
}

/// An Ed25519 public key in SPKI PEM (a real one, made by keygen) for enrollment requests.
fn public_key(f: &Fleet, n: usize) -> String {
    let dir = f.dir.path().join(format!("keys{n}"));
    server_ok(&["keygen", "--out", &dir.display().to_string()]);
    std::fs::read_to_string(dir.join("catalog.pub")).unwrap()
}

#[test]
fn slow_clients_under_a_low_open_file_limit_starve_no_agent() {
    let f = fleet("3s");
    let server = Server::launch(&f.config(), Launch { open_files: Some(512), ..Launch::default() });
    let agent = enroll(&f, &server, "agent1");
    let quiet_rss = server.rss();
    // 600 connections from elsewhere, every kind of slow: no handshake at all, a handshake
    // and half a request head, a body that trickles to a route that needs a certificate, and
    // one that trickles to enrollment.
    let mut bare: Vec<TcpStream> = Vec::new();
    let mut slow: Vec<Tls> = Vec::new();
    for i in 0..600 {
        let Some(tcp) = from_elsewhere(&server) else { continue };
        if i % 4 == 0 {
            bare.push(tcp);
            continue;
        }
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
        let Some(mut t) = tls(&f, tcp) else { continue };
        let head: &[u8] = match i % 4 {
            1 => b"GET /healthz HT",
            2 => b"POST /v1/catalog HTTP/1.1\r\nHost: x\r\nContent-Length: 4000000\r\n\r\n{\"agent",
            _ => b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Length: 16000\r\n\r\n{\"na",
        };
        let _ = t.write_all(head);
        slow.push(t);
    }
    // Meanwhile the enrolled agent runs, and is answered by the server (not from its cache).
    for _ in 0..3 {
        let out = converge_in(&agent, &["run", "--once"]);
        assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
        assert!(!out.stdout.contains("enforcing the cached catalog"), "{}", out.stdout);
    }
    let (status, _) = server.get(&f, "/healthz");
    assert_eq!(status, 200);
    // Trickling enrollment bodies hold their connections, never the places of work: a new
    // host still joins.
    enroll(&f, &server, "agent2");
    // No attacker connection buffers a body: memory stays near what it was.
    let under_attack = server.rss();
    assert!(under_attack < quiet_rss + (64 << 20), "{quiet_rss} -> {under_attack} bytes");
    // One address cannot take every connection.
    let metrics = server.get(&f, "/metrics").1;
    let refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix("converge_refused_total{what=\"connection\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(refused > 0, "the per-address cap refused none: {metrics}");
    // Past the deadlines, the slow ones are gone and the server is as before.
    std::thread::sleep(Duration::from_secs(7));
    drop((bare, slow));
    let out = converge_in(&agent, &["run", "--once", "--detailed-exitcodes"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
}

#[test]
fn oversized_and_malformed_bodies_are_refused_before_the_work() {
    let f = fleet("3s");
    let server = Server::start(&f.config());
    let agent = enroll(&f, &server, "agent1");
    let post = |path: &str, body: &[u8]| server.post(&f, path, body);
    // A declared length past the limit: refused before a byte is read.
    let (status, _) = server.request(
        &f,
        "POST /v1/enroll HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n",
        b"",
    );
    assert_eq!(status, 413);
    // A body past the limit with no declared length: cut off at the limit.
    let mut chunked = Vec::new();
    for _ in 0..40 {
        chunked.extend_from_slice(format!("{:x}\r\n{}\r\n", 1024, "x".repeat(1024)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (status, _) = server.request(&f, "POST /v1/enroll HTTP/1.1\r\nTransfer-Encoding: chunked\r\n", &chunked);
    // The server answers 413 and closes while the rest is still arriving; the kernel may then
    // reset the connection before the client reads the answer (status 0).
    assert!(status == 413 || status == 0, "{status}");
    assert_eq!(server.get(&f, "/healthz").0, 200);
    // Malformed, not UTF-8, not a key, not a name.
    assert_eq!(post("/v1/enroll", b"{\"name\":").0, 400);
    assert_eq!(post("/v1/enroll", b"\xff\xfe\x00").0, 400);
    let key = public_key(&f, 0);
    for name in [".", "..", "-rf", "a..b", "x\ny"] {
        let body = serde_json::json!({"name": name, "public_key": key}).to_string();
        let (status, text) = post("/v1/enroll", body.as_bytes());
        assert_eq!(status, 403, "{name:?}: {text}");
        assert!(text.contains("is not a node name"), "{text}");
    }
    let body = serde_json::json!({"name": "good", "public_key": "x".repeat(900)}).to_string();
    let (status, text) = post("/v1/enroll", body.as_bytes());
    assert!(status == 403 && text.contains("not an Ed25519 key"), "{status} {text}");
    let listed = server_ok(&["node", "list", "--config", &f.config()]);
    assert!(!listed.contains("enrollment requested"), "nothing was stored: {listed}");
    // Routes that need a certificate refuse before reading a body.
    // (the body is declared and never sent: the answer comes without waiting for it)
    let (status, _) = server.request(&f, "POST /v1/catalog HTTP/1.1\r\nContent-Length: 900000\r\n", b"");
    assert_eq!(status, 401);
    // As the enrolled agent: a report past the limit, one with counts that would overflow,
    // one that is not UTF-8; none is stored.
    let as_agent = |body: &[u8]| {
        let head = format!(
            "POST /v1/reports HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        server.request_as(&f, &agent, &head, body)
    };
    let reports_before = server_ok(&["report", "--node", "agent1", "--config", &f.config()]);
    let past_limit = "POST /v1/reports HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 9437184\r\n";
    assert_eq!(server.request_as(&f, &agent, past_limit, b"").0, 413, "refused by its declared length alone");
    let report = |summary: &str| {
        format!(
            r#"{{"started_at":"2026-12-02T00:00:00Z","info":{{"catalog":"x","dry_run":false,"resources":0}},"resources":[],"summary":{summary},"stale":false}}"#
        )
    };
    let huge = report(&format!(
        r#"{{"resources":0,"unchanged":0,"changed":{},"would_change":{},"failed":0,"skipped":0,"dry_run":false,"duration_ms":1.0}}"#,
        u64::MAX,
        u64::MAX
    ));
    let (status, text) = as_agent(huge.as_bytes());
    assert_eq!(status, 422, "{text}");
    assert!(text.contains("summary.changed"), "{text}");
    assert_eq!(as_agent(b"{\"started_at\":\"\xff\"}").0, 400);
    let bad_time = report(r#"{"resources":0}"#).replace("2026-12-02T00:00:00Z", "2026-12-0é");
    assert_eq!(as_agent(bad_time.as_bytes()).0, 400);
    assert_eq!(server_ok(&["report", "--node", "agent1", "--config", &f.config()]), reports_before);
    assert!(server.get(&f, "/healthz").0 == 200, "and the server goes on");
}

#[test]
fn enrollment_floods_are_bounded_and_races_have_one_winner() {
    let f = fleet("3s");
    let server = Server::start(&f.config());
    let key = public_key(&f, 0);
    // A flood of requests without a token, for ever new names, from eight addresses: at most
    // 1000 wait.
    let sent = std::sync::atomic::AtomicUsize::new(0);
    let outcomes: Vec<(u16, String)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= 1050 {
                            return out;
                        }
                        let body = serde_json::json!({"name": format!("flood{i}"), "public_key": key}).to_string();
                        let from = [127, 0, 1, 1 + (i % 8) as u8];
                        out.push(post_from(&server, &f, from, "/v1/enroll", body.as_bytes()));
                    }
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    });
    let waiting = outcomes.iter().filter(|(s, _)| *s == 202).count();
    let refused: Vec<&String> = outcomes.iter().filter(|(s, _)| *s == 403).map(|(_, b)| b).collect();
    assert_eq!(waiting, 1000, "{:?}", &outcomes[..3]);
    assert_eq!(refused.len(), 50);
    assert!(refused[0].contains("1000 enrollment requests are waiting already"), "{}", refused[0]);
    let db = std::fs::metadata(f.dir.path().join("state/state.db")).unwrap().len();
    assert!(db < 8 << 20, "the database grew to {db} bytes");
    // The fleet page lists them, and stays a page.
    let (status, page) = server.get(&f, "/");
    assert_eq!(status, 200);
    assert!(page.len() < 1 << 20, "{} bytes", page.len());
    // Rejected requests make room again.
    for i in 0..30 {
        server_ok(&["node", "reject", "--config", &f.config(), &format!("flood{i}")]);
    }
    // Two keys racing for one name: one request waits, the other is refused.
    let other = public_key(&f, 1);
    for round in 0..10 {
        let name = format!("raced{round}");
        let bodies = [&key, &other].map(|k| serde_json::json!({"name": name, "public_key": k}).to_string());
        let statuses: Vec<u16> = std::thread::scope(|s| {
            let h: Vec<_> = bodies.iter().map(|b| s.spawn(|| server.post(&f, "/v1/enroll", b.as_bytes()).0)).collect();
            h.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut sorted = statuses.clone();
        sorted.sort();
        assert!(sorted == [202, 403] || sorted == [202, 503] || sorted == [403, 503], "{name}: {statuses:?}");
    }
    // One token, two hosts at once: one certificate.
    let token = f.token("twin*");
    let roots = [f.root("twin1"), f.root("twin2")];
    let codes: Vec<i32> = std::thread::scope(|s| {
        let h: Vec<_> = roots
            .iter()
            .map(|r| {
                let (url, hash, token) = (&server.url, &f.ca_hash, &token);
                s.spawn(move || {
                    converge_in(r, &["bootstrap", "--server", url, "--ca-hash", hash, "--token", token, "--no-run"])
                        .code
                })
            })
            .collect();
        h.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut codes = codes;
    codes.sort();
    assert_eq!(codes, [0, 1], "one token enrolls one host");
}

#[test]
fn log_lines_cannot_be_forged_and_pages_cannot_be_bombed() {
    let f = fleet("3s");
    let log = f.dir.path().join("server.log");
    let server = Server::launch(&f.config(), Launch { log: Some(log.clone()), ..Launch::default() });
    let agent = enroll(&f, &server, "agent1");
    let key = public_key(&f, 0);
    for name in [
        "evil\n2026-12-02T00:00:00.000000Z ERROR converge_server: forged".to_string(),
        "\u{1b}[2J\u{1b}[31mred".to_string(),
        "n".repeat(15_000),
    ] {
        let body = serde_json::json!({"name": name, "public_key": key}).to_string();
        assert_eq!(server.post(&f, "/v1/enroll", body.as_bytes()).0, 403);
    }
    // Reports as large as the limits let them be: thirty resources with a 250 KiB diff each.
    let diff = format!("@@ -1 +1 @@\n{}", "+line of a large diff\n".repeat(250 << 10 >> 5));
    let resources: Vec<serde_json::Value> = (0..30)
        .map(|i| {
            serde_json::json!({"id": format!("file:/big/{i}"), "status": "failed", "message": "m".repeat(16_000),
                "changes": [{"attribute": "content", "from": "a", "to": "b", "diff": diff}], "duration_ms": 1.0})
        })
        .collect();
    let report = serde_json::json!({
        "started_at": "2026-12-02T00:00:00Z",
        "info": {"catalog": "x", "dry_run": false, "resources": 30},
        "resources": resources,
        "summary": {"resources": 30, "unchanged": 0, "changed": 0, "would_change": 0, "failed": 30, "skipped": 0,
                    "dry_run": false, "duration_ms": 1.0},
    })
    .to_string();
    assert!(report.len() > 5 << 20, "{}", report.len());
    let head =
        format!("POST /v1/reports HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n", report.len());
    for _ in 0..20 {
        assert_eq!(server.request_as(&f, &agent, &head, report.as_bytes()).0, 204);
    }
    // The node page reads digests, not bodies: it is small, and agents are served meanwhile.
    let (pages, runs) = std::thread::scope(|s| {
        let pages = s.spawn(|| (0..3).map(|_| server.get(&f, "/nodes/agent1")).collect::<Vec<_>>());
        let runs = s.spawn(|| (0..3).map(|_| converge_in(&agent, &["run", "--once"]).code).collect::<Vec<_>>());
        (pages.join().unwrap(), runs.join().unwrap())
    });
    assert!(runs.iter().all(|c| *c == 0), "{runs:?}");
    for (status, page) in &pages {
        assert_eq!(*status, 200);
        assert!(page.len() < 200 << 10, "the node page is {} bytes", page.len());
        assert!(page.contains("file:&#x2f;big&#x2f;0"), "it names the failed resources");
    }
    let id = pages[0].1.split("/reports/").nth(1).unwrap().split('"').next().unwrap().to_string();
    let (status, one) = server.get(&f, &format!("/reports/{id}"));
    assert_eq!(status, 200);
    assert!(one.len() < 32 << 20, "{}", one.len());
    drop(server);
    let text = std::fs::read_to_string(&log).unwrap();
    for line in text.lines() {
        assert!(line.starts_with("20") && line.len() < 4000, "a forged or unbounded log line: {line:.300}");
        assert!(!line.contains('\u{1b}'), "an escape sequence in the log: {line:.300}");
    }
    assert!(text.contains("enrollment of evil\\n2026"), "the name is in the log, escaped: {text:.2000}");
}

/// Every answer carries the headers that keep browsers from framing or sniffing it.
#[test]
fn every_answer_is_protected() {
    let f = fleet("3s");
    let server = Server::start(&f.config());
    for path in ["/", "/v1/ca", "/healthz", "/nodes/none", "/metrics", "/bootstrap.sh"] {
        let mut t = tls(&f, TcpStream::connect(server.addr()).unwrap()).unwrap();
        write!(t, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        let _ = t.read_to_string(&mut text);
        let head = text.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
        for h in ["x-content-type-options: nosniff", "x-frame-options: deny", "referrer-policy: no-referrer"] {
            assert!(head.contains(h), "{path}: {h} missing: {head}");
        }
        assert!(head.contains("frame-ancestors 'none'") || head.contains("content-security-policy"), "{path}: {head}");
    }
}

#[test]
fn a_flood_of_short_connections_from_one_address_is_throttled() {
    let f = fleet("3s");
    let server = Server::start(&f.config());
    let agent = enroll(&f, &server, "agent1");
    // Handshake, a request refused at once, close, again: what a loop against a route that
    // needs a certificate costs the server. One address gets its burst, then its rate.
    let mut answered = 0;
    for _ in 0..600 {
        let (status, _) = post_from(&server, &f, [127, 0, 0, 3], "/v1/catalog", b"{}");
        if status == 401 {
            answered += 1;
        }
    }
    assert!(answered >= 256, "the burst is served: {answered}");
    assert!(answered < 600, "and then the rate: all 600 were answered");
    // Another address is not held back by it.
    let out = converge_in(&agent, &["run", "--once"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(!out.stdout.contains("enforcing the cached catalog"), "{}", out.stdout);
}
