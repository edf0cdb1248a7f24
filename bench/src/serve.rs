//! Load on `converge-server serve`: N distinct nodes over real mutual TLS on loopback.
//!
//! The server (the release binary, its own process) serves the repository `catalogs/`; each
//! node is enrolled with its own key and certificate. Measured, each phase with fresh TLS
//! connections as agents make them every 30 minutes:
//! - first fetches: every node's first catalog (compiled, signed, stored);
//! - full fetches: catalogs sent again without an ETag;
//! - conditional polls: every node asks with its ETag and is answered 304;
//! - the baseline: a bare mutual TLS handshake to the same server (connect, handshake, close),
//!   the floor any poll pays.
//!
//! Printed: requests/s, p50 and p99 latency, errors, the server's peak RSS, and how many agents
//! polling every 30 minutes that rate serves.

use converge_server::ca::Ca;
use converge_server::db::Db;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Node {
    name: String,
    tls: Arc<rustls::ClientConfig>,
    etag: Option<String>,
}

fn git(dir: &Path, args: &[&str]) {
    let ok = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=bench", "-c", "user.email=bench@example.invalid"])
        .args(args)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdout(Stdio::null())
        .status()
        .expect("git")
        .success();
    assert!(ok, "git {args:?}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// One request on a fresh connection; returns (status, etag).
async fn request(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    body: &[u8],
    etag: Option<&str>,
) -> Result<(u16, Option<String>), String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).ok();
    let connector = tokio_rustls::TlsConnector::from(tls);
    let mut s = connector
        .connect(ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let mut req = format!(
        "POST /v1/catalog HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(tag) = etag {
        req.push_str(&format!("If-None-Match: {tag}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    s.write_all(body).await.map_err(|e| e.to_string())?;
    let mut resp = Vec::with_capacity(16 * 1024);
    let _ = s.read_to_end(&mut resp).await;
    let text = String::from_utf8_lossy(&resp[..resp.len().min(4096)]);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP answer ({} bytes)", resp.len()))?;
    let etag = text
        .lines()
        .find_map(|l| l.strip_prefix("etag: ").or_else(|| l.strip_prefix("ETag: ")))
        .map(|t| t.trim().to_string());
    Ok((status, etag))
}

/// A bare mutual TLS handshake.
async fn handshake(addr: &str, tls: Arc<rustls::ClientConfig>) -> Result<(u16, Option<String>), String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).ok();
    let connector = tokio_rustls::TlsConnector::from(tls);
    let mut s = connector
        .connect(ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let _ = s.shutdown().await;
    Ok((0, None))
}

struct Phase {
    name: &'static str,
    count: usize,
    seconds: f64,
    latencies: Vec<Duration>,
    errors: usize,
    statuses: std::collections::BTreeMap<u16, usize>,
}

impl Phase {
    fn print(&self) {
        let mut l = self.latencies.clone();
        l.sort();
        let p = |q: f64| l.get(((l.len().max(1) - 1) as f64 * q) as usize).map_or(0.0, |d| d.as_secs_f64() * 1e3);
        println!(
            "{:<22} {:>7} {:>10.0}/s {:>8.2}ms {:>8.2}ms {:>7}  {:?}",
            self.name,
            self.count,
            self.count as f64 / self.seconds,
            p(0.5),
            p(0.99),
            self.errors,
            self.statuses
        );
    }

    fn rate(&self) -> f64 {
        self.count as f64 / self.seconds
    }
}

/// Runs `op` for each node index in `order`, `concurrency` at a time.
async fn phase<F, Fut>(
    name: &'static str,
    order: Vec<usize>,
    concurrency: usize,
    op: F,
) -> (Phase, Vec<(usize, Option<String>)>)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(u16, Option<String>), String>> + Send,
{
    let op = Arc::new(op);
    let queue = Arc::new(std::sync::Mutex::new(order.clone().into_iter()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (op, queue) = (op.clone(), queue.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let Some(i) = queue.lock().unwrap().next() else { break };
                let t = Instant::now();
                let r = op(i).await;
                out.push((i, t.elapsed(), r));
            }
            out
        }));
    }
    let mut p = Phase {
        name,
        count: order.len(),
        seconds: 0.0,
        latencies: Vec::new(),
        errors: 0,
        statuses: Default::default(),
    };
    let mut etags = Vec::new();
    for t in tasks {
        for (i, lat, r) in t.await.unwrap() {
            p.latencies.push(lat);
            match r {
                Ok((status, etag)) => {
                    *p.statuses.entry(status).or_default() += 1;
                    if !matches!(status, 0 | 200 | 304) {
                        p.errors += 1;
                    }
                    etags.push((i, etag));
                }
                Err(e) => {
                    if p.errors < 3 {
                        eprintln!("{name}: {e}");
                    }
                    p.errors += 1;
                }
            }
        }
    }
    p.seconds = started.elapsed().as_secs_f64();
    (p, etags)
}

fn peak_rss(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

pub fn run(nodes: usize, full: usize, concurrency: usize) {
    let server_bin: PathBuf = std::env::current_exe().unwrap().parent().unwrap().join("converge-server");
    assert!(server_bin.exists(), "build it first: cargo build --release -p converge-server -p converge-bench");
    let dir = tempfile_dir();
    let repo = dir.join("repo");
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../catalogs"), &repo);
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "bench"]);
    let state = dir.join("state");
    let init = Command::new(&server_bin)
        .args([
            "init",
            "--state",
            &state.display().to_string(),
            "--address",
            "127.0.0.1",
            "--listen",
            "127.0.0.1:0",
            "--repo",
            &repo.display().to_string(),
        ])
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));

    // Enroll every node directly in the store (what /v1/enroll does, without the wait).
    let t = Instant::now();
    let ca = Ca::load(&state).unwrap();
    let db = Db::open(&state.join("state.db"), 1).unwrap();
    let ca_der = CertificateDer::from_pem_file(state.join("ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der).unwrap();
    let roots = Arc::new(roots);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut fleet = Vec::with_capacity(nodes);
    for i in 0..nodes {
        use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        let name = format!("node-{i:05}.example.com");
        let (pem, der) =
            ca.issue_client(&name, &key.verifying_key().to_public_key_pem(Default::default()).unwrap(), 90).unwrap();
        let now = converge_server::db::now();
        db.add_cert(&converge_modules::hash::sha256_hex(&der), &name, now, now + 86_400).unwrap();
        let certs = vec![CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(key.to_pkcs8_pem(Default::default()).unwrap().as_bytes()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(certs, key)
            .unwrap();
        fleet.push(Node { name, tls: Arc::new(config), etag: None });
    }
    drop(db);
    eprintln!("enrolled {nodes} nodes in {:.1} s", t.elapsed().as_secs_f64());

    let mut server = Command::new(&server_bin)
        .args(["serve", "--config", &state.join("server.toml").display().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
        line.split("https://").nth(1).unwrap().split_whitespace().next().unwrap().to_string()
    };
    let body = Arc::new(
        serde_json::to_vec(
            &serde_json::json!({"agent_version": "bench", "formats": [1], "facts": {"cpus": 2, "memory_mb": 4096}}),
        )
        .unwrap(),
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let fleet = Arc::new(std::sync::RwLock::new(fleet));
    let all: Vec<usize> = (0..nodes).collect();
    let addr = Arc::new(addr);

    println!(
        "converge-server with {nodes} nodes over mutual TLS on loopback, {concurrency} connections at a time, a fresh connection per request"
    );
    println!("{:<22} {:>7} {:>12} {:>10} {:>10} {:>7}  statuses", "phase", "count", "rate", "p50", "p99", "errors");
    let tls_of = |f: &Arc<std::sync::RwLock<Vec<Node>>>, i: usize| f.read().unwrap()[i].tls.clone();

    let (f, a, b) = (fleet.clone(), addr.clone(), body.clone());
    let (first, etags) = rt.block_on(phase("first fetch (compile)", all.clone(), concurrency, move |i| {
        let (tls, addr, body) = (tls_of(&f, i), a.clone(), b.clone());
        async move { request(&addr, tls, &body, None).await }
    }));
    first.print();
    for (i, etag) in etags {
        fleet.write().unwrap()[i].etag = etag;
    }
    let (f, a) = (fleet.clone(), addr.clone());
    let (hs, _) = rt.block_on(phase("baseline: TLS handshake", all.clone(), concurrency, move |i| {
        let (tls, addr) = (tls_of(&f, i), a.clone());
        async move { handshake(&addr, tls).await }
    }));
    hs.print();
    let (f, a, b) = (fleet.clone(), addr.clone(), body.clone());
    let (full_phase, _) = rt.block_on(phase("full fetch", (0..full.min(nodes)).collect(), concurrency, move |i| {
        let (tls, addr, body) = (tls_of(&f, i), a.clone(), b.clone());
        async move { request(&addr, tls, &body, None).await }
    }));
    full_phase.print();
    let (f, a, b) = (fleet.clone(), addr.clone(), body.clone());
    let (polls, _) = rt.block_on(phase("conditional poll (304)", all, concurrency, move |i| {
        let (tls, addr, body) = (tls_of(&f, i), a.clone(), b.clone());
        let etag = f.read().unwrap()[i].etag.clone();
        async move { request(&addr, tls, &body, etag.as_deref()).await }
    }));
    polls.print();
    let rss = peak_rss(server.id());
    println!(
        "conditional polls: {:.0}/s = {:.2}x the bare handshake rate; server peak RSS {rss:.1} MiB; at one poll per 30 minutes that serves {:.0} agents",
        polls.rate(),
        hs.rate() / polls.rate(),
        polls.rate() * 1800.0
    );
    let _ = server.kill();
    let _ = server.wait();
    let _ = fleet.read().unwrap().first().map(|n| n.name.clone());
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("converge-bench-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
