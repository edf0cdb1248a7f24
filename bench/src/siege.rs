//! `converge-bench siege [NODES SLOW FLOODERS]`: enrolled agents polling while the server is
//! attacked, beside the same polls unloaded, in one run.
//!
//! The server (the release binary, its own process, default settings) serves `catalogs/` to
//! NODES enrolled nodes. Measured twice, the second time under attack:
//! - conditional polls (304), each on a fresh mutual TLS connection, 16 at a time: rate, p50,
//!   p99;
//! - the server's RSS.
//!
//! The attack, from 127.0.0.2 to 127.0.0.9 (other hosts, as far as the server knows): SLOW
//! connections held open, each reopened as soon as the server closes it: a quarter never
//! start TLS, a quarter send half a request head, a quarter trickle a body to enrollment and a
//! quarter trickle one to a route that needs a certificate; and FLOODERS tasks sending
//! enrollment requests without a token, for ever new names, as fast as they are answered.
//!
//! The goal (issue 11): polls keep p99 under 1 s and the server stays under 256 MiB.

use crate::serve::{catalog_body, connect_from, enroll_nodes, init_server, peak_rss, phase, request, start_server};
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Default)]
struct Attack {
    opened: AtomicU64,
    open: AtomicU64,
    peak_open: AtomicU64,
    enrollments: AtomicU64,
    enroll_refused: AtomicU64,
    enroll_busy: AtomicU64,
}

/// TLS to the server without a client certificate, as anyone on the network may connect.
fn anonymous_tls(state: &std::path::Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_file(state.join("ca.pem")).unwrap()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// One slow connection of kind `k`, held until the server closes it.
async fn slow_once(k: usize, to: SocketAddr, tls: Arc<rustls::ClientConfig>, stats: &Attack) {
    let from = std::net::Ipv4Addr::new(127, 0, 0, 2 + (k % 8) as u8);
    let Ok(tcp) = connect_from(from, &to.to_string()).await else { return };
    stats.opened.fetch_add(1, Ordering::Relaxed);
    let now = stats.open.fetch_add(1, Ordering::Relaxed) + 1;
    stats.peak_open.fetch_max(now, Ordering::Relaxed);
    let mut buf = [0u8; 512];
    match k % 4 {
        0 => {
            let mut tcp = tcp;
            let _ = tcp.read(&mut buf).await;
        }
        kind => {
            let connector = tokio_rustls::TlsConnector::from(tls);
            if let Ok(mut s) = connector.connect(ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()), tcp).await
            {
                let head: &[u8] = match kind {
                    1 => b"GET /healthz HT",
                    2 => b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Length: 16000\r\n\r\n{",
                    _ => b"POST /v1/catalog HTTP/1.1\r\nHost: x\r\nContent-Length: 4000000\r\n\r\n{",
                };
                if s.write_all(head).await.is_ok() {
                    // A byte a second until the server has had enough.
                    loop {
                        tokio::select! {
                            r = s.read(&mut buf) => { if !matches!(r, Ok(n) if n > 0) { break } }
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                                if kind != 1 && s.write_all(b" ").await.is_err() { break }
                            }
                        }
                    }
                }
            }
        }
    }
    stats.open.fetch_sub(1, Ordering::Relaxed);
}

/// Enrollment requests without a token, for new names, until `stop`.
async fn flood(
    n: usize,
    to: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    key: Arc<String>,
    stats: Arc<Attack>,
    stop: Arc<AtomicBool>,
) {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let from = std::net::Ipv4Addr::new(127, 0, 0, 2 + (n % 8) as u8);
        let Ok(tcp) = connect_from(from, &to.to_string()).await else { continue };
        let connector = tokio_rustls::TlsConnector::from(tls.clone());
        let Ok(mut s) = connector.connect(ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()), tcp).await
        else {
            continue;
        };
        let body = serde_json::json!({"name": format!("flood-{n}-{i}"), "public_key": *key}).to_string();
        let req = format!(
            "POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        if s.write_all(req.as_bytes()).await.is_err() {
            continue;
        }
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp).await;
        stats.enrollments.fetch_add(1, Ordering::Relaxed);
        let status = String::from_utf8_lossy(&resp[..resp.len().min(16)]).split_whitespace().nth(1).map(str::to_string);
        match status.as_deref() {
            Some("403") => stats.enroll_refused.fetch_add(1, Ordering::Relaxed),
            Some("503") => stats.enroll_busy.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }
}

fn rss_now(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

pub fn run(nodes: usize, slow: usize, flooders: usize) {
    let (server_bin, state) = init_server("siege");
    let mut fleet = enroll_nodes(&state, nodes);
    let key = {
        use ed25519_dalek::pkcs8::EncodePublicKey;
        let k = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        Arc::new(k.verifying_key().to_public_key_pem(Default::default()).unwrap())
    };
    let (mut server, addr) = start_server(&server_bin, &state);
    let to: SocketAddr = addr.parse().unwrap();
    let body = catalog_body();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let all: Vec<usize> = (0..nodes).collect();
    let tls: Arc<Vec<Arc<rustls::ClientConfig>>> = Arc::new(fleet.iter().map(|n| n.tls.clone()).collect());
    let froms: Arc<Vec<std::net::Ipv4Addr>> = Arc::new(fleet.iter().map(|n| n.from).collect());
    let addr = Arc::new(addr);

    // Every node's first catalog, for its ETag.
    let (t, a, b, fr) = (tls.clone(), addr.clone(), body.clone(), froms.clone());
    let (_, etags) = rt.block_on(phase("first fetch", all.clone(), 16, move |i| {
        let (tls, addr, body, from) = (t[i].clone(), a.clone(), b.clone(), fr[i]);
        async move { request(from, &addr, tls, &body, None).await }
    }));
    for (i, etag) in etags {
        fleet[i].etag = etag;
    }
    let etags: Arc<Vec<Option<String>>> = Arc::new(fleet.iter().map(|n| n.etag.clone()).collect());
    let polls = |name: &'static str| {
        let (t, a, b, e, fr) = (tls.clone(), addr.clone(), body.clone(), etags.clone(), froms.clone());
        let order: Vec<usize> = all.iter().chain(all.iter()).chain(all.iter()).copied().collect();
        rt.block_on(phase(name, order, 16, move |i| {
            let (tls, addr, body, etag, from) = (t[i].clone(), a.clone(), b.clone(), e[i].clone(), fr[i]);
            async move { request(from, &addr, tls, &body, etag.as_deref()).await }
        }))
        .0
    };
    println!(
        "converge-server with {nodes} enrolled nodes polling (304) on fresh mutual TLS connections, 16 at a time; then the same while {slow} slow connections and {flooders} enrollment flooders attack from 127.0.0.2-9"
    );
    println!(
        "{:<24} {:>6} {:>10} {:>9} {:>9} {:>10} {:>6}  statuses",
        "phase", "count", "rate", "p50", "p99", "server CPU", "errors"
    );
    let quiet = polls("polls, unloaded");
    quiet.print();
    let quiet_rss = rss_now(server.id());

    // The attack, on a runtime of its own.
    let stats = Arc::new(Attack::default());
    let stop = Arc::new(AtomicBool::new(false));
    let attack_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let anon = anonymous_tls(&state);
    for k in 0..slow {
        let (stats, stop, anon) = (stats.clone(), stop.clone(), anon.clone());
        attack_rt.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                slow_once(k, to, anon.clone(), &stats).await;
            }
        });
    }
    for n in 0..flooders {
        attack_rt.spawn(flood(n, to, anon.clone(), key.clone(), stats.clone(), stop.clone()));
    }
    // Let the attack build up.
    let settle = Instant::now();
    while stats.open.load(Ordering::Relaxed) < (slow as u64 * 9 / 10) && settle.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let attack_started = Instant::now();
    let before = stats.enrollments.load(Ordering::Relaxed);
    let loaded = polls("polls, under attack");
    loaded.print();
    let attack_seconds = attack_started.elapsed().as_secs_f64();
    let loaded_rss = rss_now(server.id());
    let enrolled = stats.enrollments.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    let peak = peak_rss(server.id());
    println!(
        "attack: {} slow connections open at peak, {} opened in all; {:.0} enrollment requests/s ({} refused, {} told to come back)",
        stats.peak_open.load(Ordering::Relaxed),
        stats.opened.load(Ordering::Relaxed),
        enrolled as f64 / attack_seconds,
        stats.enroll_refused.load(Ordering::Relaxed),
        stats.enroll_busy.load(Ordering::Relaxed)
    );
    println!(
        "polls p99: {:.1} ms unloaded, {:.1} ms under attack ({:.2}x; goal under 1000 ms); p50 {:.1} -> {:.1} ms; rate {:.0}/s -> {:.0}/s; errors {} -> {}",
        quiet.percentile(0.99),
        loaded.percentile(0.99),
        loaded.percentile(0.99) / quiet.percentile(0.99).max(1e-9),
        quiet.percentile(0.5),
        loaded.percentile(0.5),
        quiet.rate(),
        loaded.rate(),
        quiet.errors,
        loaded.errors
    );
    println!(
        "server RSS: {quiet_rss:.1} MiB unloaded, {loaded_rss:.1} MiB under attack, peak {peak:.1} MiB (goal under 256 MiB)"
    );
    attack_rt.shutdown_timeout(Duration::from_secs(1));
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(state.parent().unwrap());
}
