//! Load on `converge-server serve`: N distinct nodes over real mutual TLS on loopback.
//!
//! The server (the release binary, its own process) serves the repository `catalogs/`; each
//! node is enrolled with its own key and certificate. Measured, each phase with fresh TLS
//! connections as agents make them every 30 minutes, resuming their sessions with tickets:
//! - first fetches: every node's first catalog (compiled, signed, stored);
//! - full fetches: catalogs sent again without an ETag;
//! - conditional polls: every node asks with its ETag and is answered 304;
//! - the same polls with full handshakes, as right after a server restart (ticket keys live in
//!   memory only);
//! - the baseline: a bare resumed mutual TLS handshake to the same server (connect, handshake,
//!   close), the floor any poll pays.
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

pub struct Node {
    pub name: String,
    /// The loopback address it connects from: every agent has an address of its own, as on a
    /// real network (the server counts connections per address).
    pub from: std::net::Ipv4Addr,
    pub tls: Arc<rustls::ClientConfig>,
    pub etag: Option<String>,
}

/// A TCP connection to `addr` from the loopback address `from`.
pub async fn connect_from(from: std::net::Ipv4Addr, addr: &str) -> std::io::Result<tokio::net::TcpStream> {
    let to: std::net::SocketAddr = addr.parse().map_err(std::io::Error::other)?;
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(std::net::SocketAddr::from((from, 0)))?;
    s.connect(to).await
}

/// One catalog request on a fresh connection from `from`; returns (status, etag).
pub async fn request(
    from: std::net::Ipv4Addr,
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    body: &[u8],
    etag: Option<&str>,
) -> Result<(u16, Option<String>), String> {
    post(from, addr, tls, "/v1/catalog", body, etag).await
}

/// One POST of `body` to `path` on a fresh connection from `from`; returns (status, etag).
pub async fn post(
    from: std::net::Ipv4Addr,
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    path: &str,
    body: &[u8],
    etag: Option<&str>,
) -> Result<(u16, Option<String>), String> {
    exchange(from, addr, tls, path, body, etag).await.map(|(status, etag, _)| (status, etag))
}

/// [`post`], and the body of the answer.
pub async fn exchange(
    from: std::net::Ipv4Addr,
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    path: &str,
    body: &[u8],
    etag: Option<&str>,
) -> Result<(u16, Option<String>, Vec<u8>), String> {
    let mut s = connect_tls(from, addr, tls).await?;
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
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
    let body = resp.windows(4).position(|w| w == b"\r\n\r\n").map_or(Vec::new(), |at| resp[at + 4..].to_vec());
    Ok((status, etag, body))
}

/// A bare mutual TLS handshake.
/// A TLS connection to the server from `from`, handshake done.
pub async fn connect_tls(
    from: std::net::Ipv4Addr,
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let tcp = connect_from(from, addr).await.map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).ok();
    let connector = tokio_rustls::TlsConnector::from(tls);
    connector.connect(ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()), tcp).await.map_err(|e| e.to_string())
}

async fn handshake(
    from: std::net::Ipv4Addr,
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(u16, Option<String>), String> {
    let mut s = connect_tls(from, addr, tls).await?;
    let _ = s.shutdown().await;
    Ok((0, None))
}

pub struct Phase {
    name: &'static str,
    count: usize,
    seconds: f64,
    latencies: Vec<Duration>,
    pub errors: usize,
    statuses: std::collections::BTreeMap<u16, usize>,
    /// CPU seconds the server process used during the phase.
    server_cpu: f64,
}

impl Phase {
    /// The latency below which a share `q` of requests finished, in milliseconds.
    pub fn percentile(&self, q: f64) -> f64 {
        let mut l = self.latencies.clone();
        l.sort();
        l.get(((l.len().max(1) - 1) as f64 * q) as usize).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    }

    pub fn print(&self) {
        let p = |q: f64| self.percentile(q);
        println!(
            "{:<24} {:>6} {:>8.0}/s {:>7.2}ms {:>7.2}ms {:>8.0}us {:>6}  {:?}",
            self.name,
            self.count,
            self.count as f64 / self.seconds,
            p(0.5),
            p(0.99),
            self.cpu_per_request() * 1e6,
            self.errors,
            self.statuses
        );
    }

    /// Requests made.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn rate(&self) -> f64 {
        self.count as f64 / self.seconds
    }

    fn cpu_per_request(&self) -> f64 {
        self.server_cpu / self.count.max(1) as f64
    }
}

/// CPU seconds (user and system) process `pid` has used.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses: utime and stime are 14th and 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    // (the state, field 3, comes first).
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| f.get(n - 3).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (field(14) + field(15)) / clock_ticks()
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on every Linux this runs on).
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The server process, whose CPU time each phase measures.
pub static SERVER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Runs `op` for each node index in `order`, `concurrency` at a time.
pub async fn phase<F, Fut>(
    name: &'static str,
    order: Vec<usize>,
    concurrency: usize,
    op: F,
) -> (Phase, Vec<(usize, Option<String>)>)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(u16, Option<String>), String>> + Send,
{
    let op = Arc::new(op);
    let queue = Arc::new(std::sync::Mutex::new(order.clone().into_iter()));
    let server = SERVER.load(std::sync::atomic::Ordering::Relaxed);
    let cpu_before = cpu_seconds(server);
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
        server_cpu: 0.0,
    };
    let mut etags = Vec::new();
    for t in tasks {
        for (i, lat, r) in t.await.unwrap() {
            p.latencies.push(lat);
            match r {
                Ok((status, etag)) => {
                    *p.statuses.entry(status).or_default() += 1;
                    if !matches!(status, 0 | 200 | 204 | 304) {
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
    p.server_cpu = cpu_seconds(server) - cpu_before;
    (p, etags)
}

pub fn peak_rss(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// A server's state made by the real `converge-server init` (next to this binary) over a copy
/// of `catalogs/` in git, in a directory of its own: (the server binary, the state directory).
pub fn init_server(name: &str) -> (PathBuf, PathBuf) {
    let server_bin: PathBuf = std::env::current_exe().unwrap().parent().unwrap().join("converge-server");
    assert!(server_bin.exists(), "build it first: cargo build --release -p converge-server -p converge-bench");
    let dir = std::env::temp_dir().join(format!("converge-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let repo = dir.join("repo");
    converge_e2e::copy_tree(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../catalogs"), &repo);
    converge_e2e::git(&repo, &["init", "-q", "-b", "main"]);
    converge_e2e::git(&repo, &["add", "-A"]);
    converge_e2e::git(&repo, &["commit", "-q", "-m", "bench"]);
    let state = dir.join("state");
    let init = Command::new(&server_bin)
        .args(["init", "--state", &state.display().to_string(), "--address", "127.0.0.1", "--listen", "127.0.0.1:0"])
        .args(["--repo", &repo.display().to_string()])
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    (server_bin, state)
}

/// `nodes` nodes enrolled directly in the store of `state` (what /v1/enroll does, without
/// the wait), each with its own key and a TLS client configuration presenting its certificate.
pub fn enroll_nodes(state: &Path, nodes: usize) -> Vec<Node> {
    let t = Instant::now();
    let ca = Ca::load(state).unwrap();
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
        let from = std::net::Ipv4Addr::new(127, 1 + (i >> 16) as u8, (i >> 8) as u8, (i & 0xff) as u8 | 1);
        fleet.push(Node { name, tls: Arc::new(config), etag: None, from });
    }
    eprintln!("enrolled {nodes} nodes in {:.1} s", t.elapsed().as_secs_f64());
    fleet
}

/// Starts `converge-server serve` on `state`; returns the process and the address it listens
/// on. Its CPU time is what the phases measure.
pub fn start_server(server_bin: &Path, state: &Path) -> (std::process::Child, String) {
    let mut server = Command::new(server_bin)
        .args(["serve", "--config", &state.join("server.toml").display().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    SERVER.store(server.id(), std::sync::atomic::Ordering::Relaxed);
    let addr = {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
        line.split("https://").nth(1).unwrap().split_whitespace().next().unwrap().to_string()
    };
    (server, addr)
}

/// What agents send with each catalog request.
pub fn catalog_body() -> Arc<Vec<u8>> {
    Arc::new(
        serde_json::to_vec(
            &serde_json::json!({"agent_version": "bench", "formats": [1], "facts": {"cpus": 2, "memory_mb": 4096}}),
        )
        .unwrap(),
    )
}

pub fn run(nodes: usize, full: usize, concurrency: usize) {
    let (server_bin, state) = init_server("serve");
    let fleet = enroll_nodes(&state, nodes);
    let (mut server, addr) = start_server(&server_bin, &state);
    let body = catalog_body();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let fleet = Arc::new(std::sync::RwLock::new(fleet));
    let all: Vec<usize> = (0..nodes).collect();
    let addr = Arc::new(addr);

    println!(
        "converge-server with {nodes} nodes over mutual TLS on loopback, {concurrency} connections at a time, a fresh connection per request"
    );
    println!(
        "{:<24} {:>6} {:>10} {:>9} {:>9} {:>10} {:>6}  statuses",
        "phase", "count", "rate", "p50", "p99", "server CPU", "errors"
    );
    let tls_of = |f: &Arc<std::sync::RwLock<Vec<Node>>>, i: usize| f.read().unwrap()[i].tls.clone();
    let from_of = |f: &Arc<std::sync::RwLock<Vec<Node>>>, i: usize| f.read().unwrap()[i].from;

    let (f, a, b) = (fleet.clone(), addr.clone(), body.clone());
    let (first, etags) = rt.block_on(phase("first fetch (compile)", all.clone(), concurrency, move |i| {
        let (tls, addr, body, from) = (tls_of(&f, i), a.clone(), b.clone(), from_of(&f, i));
        async move { request(from, &addr, tls, &body, None).await }
    }));
    first.print();
    for (i, etag) in etags {
        fleet.write().unwrap()[i].etag = etag;
    }
    let (f, a, b) = (fleet.clone(), addr.clone(), body.clone());
    let (full_phase, _) = rt.block_on(phase("full fetch", (0..full.min(nodes)).collect(), concurrency, move |i| {
        let (tls, addr, body, from) = (tls_of(&f, i), a.clone(), b.clone(), from_of(&f, i));
        async move { request(from, &addr, tls, &body, None).await }
    }));
    full_phase.print();
    let (f, a, b) = (fleet.clone(), addr.clone(), body.clone());
    let (polls, _) = rt.block_on(phase("conditional poll (304)", all.clone(), concurrency, move |i| {
        let (tls, addr, body, from) = (tls_of(&f, i), a.clone(), b.clone(), from_of(&f, i));
        let etag = f.read().unwrap()[i].etag.clone();
        async move { request(from, &addr, tls, &body, etag.as_deref()).await }
    }));
    polls.print();
    // As right after a server restart: its ticket keys are gone, every agent does a full handshake.
    let cold: Arc<Vec<Arc<rustls::ClientConfig>>> = Arc::new(
        fleet
            .read()
            .unwrap()
            .iter()
            .map(|n| {
                let mut c = (*n.tls).clone();
                c.resumption = rustls::client::Resumption::disabled();
                Arc::new(c)
            })
            .collect(),
    );
    let (f, a, b, c) = (fleet.clone(), addr.clone(), body.clone(), cold.clone());
    let (cold_polls, _) = rt.block_on(phase("poll, full handshake", all.clone(), concurrency, move |i| {
        let (tls, addr, body, from) = (c[i].clone(), a.clone(), b.clone(), from_of(&f, i));
        let etag = f.read().unwrap()[i].etag.clone();
        async move { request(from, &addr, tls, &body, etag.as_deref()).await }
    }));
    cold_polls.print();
    // Last, since it closes before the server's new session ticket arrives: the ticket each node
    // holds is spent here, and the phases above would otherwise pay full handshakes.
    let (f, a) = (fleet.clone(), addr.clone());
    let (hs, _) = rt.block_on(phase("baseline: TLS handshake", all, concurrency, move |i| {
        let (tls, addr, from) = (tls_of(&f, i), a.clone(), from_of(&f, i));
        async move { handshake(from, &addr, tls).await }
    }));
    hs.print();
    let rss = peak_rss(server.id());
    println!(
        "conditional polls: {:.0}/s ({:.0}/s with full handshakes), {:.2}x the cost of a bare resumed handshake; server peak RSS {rss:.1} MiB; at one poll per 30 minutes that serves {:.0} agents",
        polls.rate(),
        cold_polls.rate(),
        hs.rate() / polls.rate(),
        polls.rate() * 1800.0
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    println!(
        "the server's own CPU per poll: {:.0} us ({:.2}x a bare resumed handshake's {:.0} us); {cores} cores given to the server alone would answer {:.0} polls/s",
        polls.cpu_per_request() * 1e6,
        polls.cpu_per_request() / hs.cpu_per_request().max(1e-9),
        hs.cpu_per_request() * 1e6,
        cores / polls.cpu_per_request().max(1e-9)
    );
    let _ = server.kill();
    let _ = server.wait();
    let _ = fleet.read().unwrap().first().map(|n| n.name.clone());
    let _ = std::fs::remove_dir_all(state.parent().unwrap());
}
