//! A fleet over simulated time (libfaketime: the binaries see the real time shifted by an
//! offset the test moves forward; the machine's clock is never touched): client certificates
//! renew themselves, hosts that stayed up never fail a run, and a host off for longer than its
//! certificate's life comes back by the one command it is told.

use converge_e2e::*;
use std::path::Path;

const SITE: &str = "nodes:\n  \"*\": {roles: [motd]}\n";
const ROLE: &str = "resources:\n  - file: /etc/motd\n    content: \"{{ node.name }}\\n\"\n";
const DAY: i64 = 86_400;

fn fingerprint(root: &Path) -> String {
    std::fs::read_to_string(root.join("etc/converge/agent.pem")).unwrap()
}

/// A fleet whose server runs on a simulated clock (`None`, said, when libfaketime is missing).
fn fleet_on_a_clock() -> Option<(Fleet, Clock, Server)> {
    let f = Fleet::new(&[("site.yaml", SITE), ("roles/motd.yaml", ROLE)]);
    let clock = clock(f.dir.path(), "lifecycle")?;
    let server = Server::launch(&f.config(), Launch { clock: Some(&clock), ..Launch::default() });
    Some((f, clock, server))
}

fn bootstrap(clock: &Clock, f: &Fleet, server: &Server, name: &str) -> std::path::PathBuf {
    let root = f.root(name);
    let token = f.token_at(Some(clock), name);
    let out = converge_at(
        Some(clock),
        &root,
        &["bootstrap", "--server", &server.url, "--ca-hash", &f.ca_hash, "--token", &token],
    );
    assert_eq!(out.code, 0, "bootstrap {name}: {}{}", out.stdout, out.stderr);
    root
}

#[test]
fn client_certificates_renew_themselves_and_an_absent_host_is_told_the_way_back() {
    let Some((f, clock, server)) = fleet_on_a_clock() else { return };
    let up = bootstrap(&clock, &f, &server, "up");
    let away = bootstrap(&clock, &f, &server, "away");
    let gone = bootstrap(&clock, &f, &server, "gone");
    // The first identity of `up`, kept aside to try once it has been replaced.
    let first = f.dir.path().join("first");
    std::fs::create_dir_all(first.join("etc/converge")).unwrap();
    for file in ["agent.pem", "agent.key"] {
        std::fs::copy(up.join("etc/converge").join(file), first.join("etc/converge").join(file)).unwrap();
    }
    // A month at a time for eleven months: the host that stays up runs each time, served by
    // the server (never from its cache), and renews its certificate from day 60 of each one's
    // 90. One host is off from day 0 to day 120, another to day 300.
    let mut certificates = vec![fingerprint(&up)];
    let mut revocation_seen = false;
    for month in 1..=11 {
        clock.advance(30 * DAY);
        let out = converge_at(Some(&clock), &up, &["run", "--once"]);
        assert_eq!(out.code, 0, "month {month}: {}{}", out.stdout, out.stderr);
        assert!(!out.stdout.contains("enforcing the cached catalog"), "month {month}: {}", out.stdout);
        assert!(!out.stdout.contains("could not be renewed"), "month {month}: {}", out.stdout);
        let now = fingerprint(&up);
        if certificates.last() != Some(&now) {
            assert!(out.stdout.contains("certificate was renewed"), "month {month}: {}", out.stdout);
            certificates.push(now);
        }
        if certificates.len() == 2 && month == 2 {
            // Day 60: the first certificate would be valid 30 more days, but its successor is
            // in use, so it is revoked.
            let head = "POST /v1/catalog HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n";
            let (status, body) = server.request_as(&f, &first, head, b"{}");
            assert_eq!(status, 403, "{body}");
            assert!(body.contains("the certificate of up is revoked"), "{body}");
            revocation_seen = true;
        }
        let status = converge_at(Some(&clock), &up, &["status"]);
        assert!(status.stdout.contains("certificate valid until"), "{}", status.stdout);
        assert!(!status.stdout.contains("RENEWAL FAILED"), "{}", status.stdout);
        if month == 4 {
            // 120 days without a run: its certificate (90 days) expired 30 days ago. The fleet
            // page warns of it, and /metrics says how long ago it expired.
            let (_, page) = server.get(&f, "/?status=renewal-due");
            assert!(page.contains("data-node=\"away\"") && !page.contains("data-node=\"up\""), "{page}");
            assert!(page.contains("id=\"renewal-due\""), "{page}");
            let metrics = server.get(&f, "/metrics").1;
            let left =
                metrics.lines().find_map(|l| l.strip_prefix("converge_certificate_expiry_seconds{node=\"away\"} "));
            assert!(left.and_then(|v| v.parse::<i64>().ok()).is_some_and(|v| v < 0), "{metrics}");
            // An expired certificate does nothing but renew itself.
            let head = "POST /v1/catalog HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n";
            let (status, body) = server.request_as(&f, &away, head, b"{}");
            assert_eq!(status, 403, "{body}");
            assert!(body.contains("the certificate of away expired at"), "{body}");
            // Back on, the host renews it on its own (within renew_expired_within, 180 days)
            // and is served in the same run.
            let out = converge_at(Some(&clock), &away, &["run", "--once", "--detailed-exitcodes"]);
            assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
            assert!(out.stdout.contains("certificate was renewed (it had expired at"), "{}", out.stdout);
            assert!(!out.stdout.contains("enforcing the cached catalog"), "{}", out.stdout);
            let status = converge_at(Some(&clock), &away, &["status"]);
            assert!(!status.stdout.contains("RENEWAL FAILED"), "{}", status.stdout);
        }
        if month == 10 {
            // 300 days without a run: expired 210 days ago, past renew_expired_within. It
            // enforces its cache and is told the way back.
            let out = from_cache(&clock, &gone, "it still enforces its cache");
            let told = out
                .stdout
                .lines()
                .find(|l| l.contains("certificate expired"))
                .unwrap_or_else(|| panic!("{}", out.stdout));
            assert!(told.contains(&format!("--ca-hash {}", f.ca_hash)) && told.contains("--name gone"), "{told}");
            assert!(told.contains("renewing it failed"), "{told}");
            let status = converge_at(Some(&clock), &gone, &["status"]);
            assert!(
                status.stdout.contains("RENEWAL FAILED") && status.stdout.contains("converge bootstrap"),
                "{}",
                status.stdout
            );
            // The operator gives it a token, and it runs what it was told: no revocation by hand.
            let token = f.token_at(Some(&clock), "gone");
            let command: Vec<String> = told
                .split("run: ")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .take_while(|w| !w.starts_with('('))
                .map(|w| if w == "TOKEN" { token.clone() } else { w.to_string() })
                .collect();
            assert_eq!(command[..2], ["converge".to_string(), "bootstrap".to_string()]);
            let args: Vec<&str> = command[1..].iter().map(String::as_str).collect();
            let back = converge_at(Some(&clock), &gone, &args);
            assert_eq!(back.code, 0, "{}{}", back.stdout, back.stderr);
            let out = converge_at(Some(&clock), &gone, &["run", "--once", "--detailed-exitcodes"]);
            assert_eq!(out.code, 0, "back in the fleet: {}{}", out.stdout, out.stderr);
        }
    }
    // Eleven months of 90-day certificates renewed from day 60: five renewals, and the one of
    // the host back after 120 days.
    assert_eq!(certificates.len(), 6, "{} certificates", certificates.len());
    assert!(revocation_seen, "the first renewal came on day 60");
    let metrics = server.get(&f, "/metrics").1;
    assert!(metrics.contains("converge_renewals_total 6"), "{metrics}");
}

#[test]
fn a_renewal_is_refused_early_and_one_that_fails_never_stops_enforcement() {
    let Some((f, clock, mut server)) = fleet_on_a_clock() else { return };
    let host = bootstrap(&clock, &f, &server, "host");
    // On day 0 a host cannot renew (the server renews from half a certificate's life), so an
    // enrolled host cannot mint certificates in a loop.
    let keys = f.dir.path().join("keys");
    server_ok(&["keygen", "--out", &keys.display().to_string()]);
    let body =
        serde_json::json!({"public_key": std::fs::read_to_string(keys.join("catalog.pub")).unwrap()}).to_string();
    let head =
        format!("POST /v1/renew HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n", body.len());
    let (status, answer) = server.request_as(&f, &host, &head, body.as_bytes());
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("is renewed from"), "{answer}");
    // Day 61, the server away: the run enforces its cache and says the renewal failed.
    clock.advance(61 * DAY);
    server.kill();
    let before = fingerprint(&host);
    let out = from_cache(&clock, &host, "the server away");
    assert!(
        out.stdout.contains("could not be renewed") && out.stdout.contains("each run tries again"),
        "{}",
        out.stdout
    );
    assert_eq!(fingerprint(&host), before, "the certificate in use is untouched");
    let status = converge_at(Some(&clock), &host, &["status"]);
    assert!(status.stdout.contains("RENEWAL FAILED"), "{}", status.stdout);
    // The server back (on another port: the host is pointed at it), the next run renews.
    server = Server::launch(&f.config(), Launch { clock: Some(&clock), ..Launch::default() });
    let toml = host.join("etc/converge/agent.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    let line = text.lines().find(|l| l.starts_with("server")).unwrap().to_string();
    std::fs::write(&toml, text.replace(&line, &format!("server = \"{}\"", server.url))).unwrap();
    let out = converge_at(Some(&clock), &host, &["run", "--once"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("certificate was renewed"), "{}", out.stdout);
    assert_ne!(fingerprint(&host), before);
    let status = converge_at(Some(&clock), &host, &["status"]);
    assert!(!status.stdout.contains("RENEWAL FAILED"), "{}", status.stdout);
}

/// One request on an open HTTP/1.1 connection, kept open: the status line and the body.
fn keep_alive_get<S: std::io::Read + std::io::Write>(s: &mut S, path: &str) -> (String, String) {
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the connection was closed");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                return (head.lines().next().unwrap().to_string(), body[..len].to_string());
            }
        }
    }
}

#[test]
fn the_server_certificate_renews_itself_without_a_restart_or_a_dropped_connection() {
    use std::io::Write as _;
    let Some((f, clock, server)) = fleet_on_a_clock() else { return };
    let host = bootstrap(&clock, &f, &server, "host");
    let state = f.dir.path().join("state");
    let (cert, key) =
        (std::fs::read(state.join("server.pem")).unwrap(), std::fs::read(state.join("server.key")).unwrap());
    let pin_line = |s: &str| s.lines().find(|l| l.contains("--pinnedpubkey")).map(str::to_string);
    let (_, script) = server.get(&f, "/bootstrap.sh");
    // A connection opened before the renewal, kept alive across it.
    let file = server.clock_file.clone().unwrap();
    let conn = rustls::ClientConnection::new(Server::tls_at(&f, None, &file), "127.0.0.1".try_into().unwrap()).unwrap();
    let mut open = rustls::StreamOwned::new(conn, std::net::TcpStream::connect(server.addr()).unwrap());
    assert_eq!(keep_alive_get(&mut open, "/healthz").0, "HTTP/1.1 200 OK");
    // The host lives through the months, renewing its own certificate on the way...
    for _ in 0..3 {
        clock.advance(80 * DAY);
        let out = converge_at(Some(&clock), &host, &["run", "--once"]);
        assert!(out.code == 0 && !out.stdout.contains("enforcing the cached catalog"), "{}{}", out.stdout, out.stderr);
    }
    // ...and two thirds of 397 days on, the server renews its own within a second.
    clock.advance(30 * DAY);
    eventually(std::time::Duration::from_secs(10), std::time::Duration::from_millis(200), || {
        (std::fs::read(state.join("server.pem")).unwrap() != cert).then_some(()).ok_or("not renewed yet".into())
    });
    assert_eq!(std::fs::read(state.join("server.key")).unwrap(), key, "the key is kept");
    assert_eq!(pin_line(&server.get(&f, "/bootstrap.sh").1), pin_line(&script), "so bootstrap.sh's pin holds");
    // The open connection goes on; a new one gets the new certificate.
    assert_eq!(keep_alive_get(&mut open, "/healthz").0, "HTTP/1.1 200 OK");
    let conn = rustls::ClientConnection::new(Server::tls_at(&f, None, &file), "127.0.0.1".try_into().unwrap()).unwrap();
    let mut fresh = rustls::StreamOwned::new(conn, std::net::TcpStream::connect(server.addr()).unwrap());
    assert_eq!(keep_alive_get(&mut fresh, "/healthz").0, "HTTP/1.1 200 OK");
    let presented = fresh.conn.peer_certificates().unwrap()[0].to_vec();
    let renewed = std::fs::read_to_string(state.join("server.pem")).unwrap();
    assert!(!presented.is_empty() && renewed.contains("BEGIN CERTIFICATE"));
    assert_ne!(
        Some(&presented[..]),
        open.conn.peer_certificates().map(|c| &c[0][..]),
        "a new certificate on a new connection"
    );
    let metrics = server.get(&f, "/metrics").1;
    let left: i64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("converge_server_certificate_expiry_seconds "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(left > 390 * DAY, "valid 397 days from the renewal: {left}");
    // The host notices nothing: served by the renewed server.
    let out = converge_at(Some(&clock), &host, &["run", "--once", "--detailed-exitcodes"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(!out.stdout.contains("enforcing the cached catalog"), "{}", out.stdout);
    let _ = open.flush();
}

/// Runs an operator's `converge-server` command at the clock's time; returns its output.
fn operator(clock: &Clock, f: &Fleet, args: &[&str]) -> Out {
    let config = f.config();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--config", &config]);
    run_at(Some(clock), "converge-server", &all)
}

/// A run that could not use the server and enforced its cache.
fn from_cache(clock: &Clock, root: &Path, what: &str) -> Out {
    let out = converge_at(Some(clock), root, &["run", "--once"]);
    assert_eq!(out.code, 0, "{what}: {}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("enforcing the cached catalog"), "{what}: {}", out.stdout);
    out
}

fn served(clock: &Clock, root: &Path, what: &str) -> Out {
    let out = converge_at(Some(clock), root, &["run", "--once"]);
    assert_eq!(out.code, 0, "{what}: {}{}", out.stdout, out.stderr);
    assert!(!out.stdout.contains("enforcing the cached catalog"), "{what}: {}", out.stdout);
    out
}

#[test]
fn the_ca_rolls_over_and_a_host_asleep_through_it_comes_back_with_the_operator() {
    let Some((f, clock, server)) = fleet_on_a_clock() else { return };
    let hosts: Vec<_> = ["a", "b"].iter().map(|n| bootstrap(&clock, &f, &server, n)).collect();
    let sleeper = bootstrap(&clock, &f, &server, "sleeper");
    clock.advance(30 * DAY);
    // The rollover begins: a successor CA, cross-signed by the current one.
    let out = operator(&clock, &f, &["ca", "rotate"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let new_hash = out.stdout.split("the new CA is ").nth(1).unwrap().split(';').next().unwrap().to_string();
    assert_ne!(new_hash, f.ca_hash);
    // The server takes it in within a second (the test's client now trusts only the new CA).
    eventually(std::time::Duration::from_secs(10), std::time::Duration::from_millis(200), || {
        (server.get(&f, "/healthz").0 == 200).then_some(()).ok_or("the server still presents the old chain".into())
    });
    let status = operator(&clock, &f, &["ca", "status"]);
    assert!(status.stdout.contains("3 with a live certificate; 3 not through the rollover yet"), "{}", status.stdout);
    // Hosts that trust only the old CA still reach the server (the chain holds the successor
    // cross-signed by the old CA), adopt the bundle, then renew from the new CA.
    for (i, root) in hosts.iter().enumerate() {
        let first = served(&clock, root, "adopting the bundle");
        assert!(first.stdout.contains("now trusts the server's CA bundle (2 CAs)"), "{}", first.stdout);
        let second = served(&clock, root, "renewing from the new CA");
        assert!(second.stdout.contains("certificate was renewed"), "host {i}: {}", second.stdout);
        served(&clock, root, "in the new CA");
    }
    // One host slept through it: the retirement waits for it, unless forced. (The server
    // records what hosts said once a second.)
    eventually(std::time::Duration::from_secs(10), std::time::Duration::from_millis(300), || {
        let status = operator(&clock, &f, &["ca", "status"]).stdout;
        let one = status.contains("1 not through the rollover yet") && status.contains("sleeper");
        one.then_some(()).ok_or(status)
    });
    let refused = operator(&clock, &f, &["ca", "retire"]);
    assert_eq!(refused.code, 1);
    assert!(refused.stderr.contains("sleeper") && refused.stderr.contains("--force"), "{}", refused.stderr);
    clock.advance(60 * DAY);
    for root in &hosts {
        served(&clock, root, "during the overlap");
    }
    let retired = operator(&clock, &f, &["ca", "retire", "--force"]);
    assert_eq!(retired.code, 0, "{}{}", retired.stdout, retired.stderr);
    assert!(
        retired.stdout.contains("revoked the certificates from the previous CA of 1 host(s): sleeper"),
        "{}",
        retired.stdout
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // The others go on, and adopt the bundle of the new CA alone.
    for root in &hosts {
        let out = served(&clock, root, "after the retirement");
        assert!(out.stdout.contains("now trusts the server's CA bundle (1 CA)"), "{}", out.stdout);
        served(&clock, root, "after the retirement, again");
    }
    // The sleeper wakes: it cannot verify the server (never trusting on first use), enforces
    // its cache, and says how to come back.
    let out = from_cache(&clock, &sleeper, "the sleeper");
    assert!(
        out.stdout.contains("not from a CA this host trusts") && out.stdout.contains("ca status"),
        "{}",
        out.stdout
    );
    // With the operator: a token and the current CA hash.
    let token = f.token_at(Some(&clock), "sleeper");
    let back = converge_at(
        Some(&clock),
        &sleeper,
        &["bootstrap", "--server", &server.url, "--ca-hash", &new_hash, "--name", "sleeper", "--token", &token],
    );
    assert_eq!(back.code, 0, "{}{}", back.stdout, back.stderr);
    served(&clock, &sleeper, "back");
    // A new host pinned to the old hash is refused now, and told why.
    let late = f.root("late");
    let token = f.token_at(Some(&clock), "late");
    let out = converge_at(
        Some(&clock),
        &late,
        &["bootstrap", "--server", &server.url, "--ca-hash", &f.ca_hash, "--token", &token],
    );
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("rotated the CA") && out.stderr.contains("ca status"), "{}", out.stderr);
}

/// A gauge of `/metrics`, by its full name with labels.
fn gauge(metrics: &str, name: &str) -> i64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
}

#[test]
fn a_ca_near_its_end_is_a_warning_and_a_metric_and_the_rollover_clears_it() {
    let Some((f, clock, server)) = fleet_on_a_clock() else { return };
    let host = bootstrap(&clock, &f, &server, "host");
    let (_, page) = server.get(&f, "/");
    assert!(!page.contains("id=\"ca-expiry\""), "no warning for years");
    let left = gauge(&server.get(&f, "/metrics").1, "converge_ca_expiry_seconds");
    assert!(left > 3640 * DAY, "ten years: {left}");
    // Nine years and two thirds on (the host living through them, renewing every 80 days):
    // 100 days are left, less than a client certificate's 90 and 30 days of warning.
    let mut days = 0;
    while days < 3550 {
        let step = (3550 - days).min(80);
        clock.advance(step * DAY);
        days += step;
        f.server_keeps_up(&clock);
        served(&clock, &host, &format!("day {days}"));
    }
    let (_, page) = server.get(&f, "/");
    assert!(page.contains("id=\"ca-expiry\"") && page.contains("converge-server ca rotate"), "{page}");
    let metrics = server.get(&f, "/metrics").1;
    let ca_left = gauge(&metrics, "converge_ca_expiry_seconds");
    assert!(ca_left < 101 * DAY && ca_left > 99 * DAY, "{ca_left}");
    // Certificates it issues from now on end with it, never after: 70 days on, the host's
    // renewal brings one of 30 days, not 90.
    clock.advance(70 * DAY);
    f.server_keeps_up(&clock);
    let out = served(&clock, &host, "renewing in the CA's last 30 days");
    assert!(out.stdout.contains("certificate was renewed"), "{}", out.stdout);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let metrics = server.get(&f, "/metrics").1;
    let (ca_left, cert_left) = (
        gauge(&metrics, "converge_ca_expiry_seconds"),
        gauge(&metrics, "converge_certificate_expiry_seconds{node=\"host\"}"),
    );
    assert!(cert_left <= ca_left && cert_left > 29 * DAY, "ends with the CA: {cert_left} against {ca_left}");
    // The operator rolls it over: the warning goes within a second, and the host follows on
    // its own in two runs, with a whole certificate from the new CA.
    let out = operator(&clock, &f, &["ca", "rotate"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    eventually(std::time::Duration::from_secs(10), std::time::Duration::from_millis(200), || {
        let (status, page) = server.get(&f, "/");
        (status == 200 && !page.contains("id=\"ca-expiry\"")).then_some(()).ok_or(page)
    });
    served(&clock, &host, "adopting the bundle");
    let out = served(&clock, &host, "renewing from the new CA");
    assert!(out.stdout.contains("certificate was renewed"), "{}", out.stdout);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let metrics = server.get(&f, "/metrics").1;
    assert!(gauge(&metrics, "converge_ca_expiry_seconds") > 3640 * DAY, "{metrics}");
    let cert_left = gauge(&metrics, "converge_certificate_expiry_seconds{node=\"host\"}");
    assert!(cert_left > 89 * DAY, "a whole certificate again: {cert_left}");
}
