//! `init` and the serve loop, in-process: the library functions `converge-server init` and
//! `converge-server serve` are thin callers of.

mod common;

use converge_server::cli::serve::{InitArgs, initialise, run};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

fn repo(dir: &Path) -> std::path::PathBuf {
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("site.yaml"), "nodes:\n  \"*\": {roles: []}\n").unwrap();
    converge_e2e::git(&repo, &["init", "-q", "-b", "main"]);
    converge_e2e::git(&repo, &["add", "-A"]);
    converge_e2e::git(&repo, &["commit", "-q", "-m", "first"]);
    repo
}

fn args<'a>(state: &'a Path, repo: &'a Path, addresses: &'a [std::net::IpAddr]) -> InitArgs<'a> {
    InitArgs { state, names: &[], addresses, repo, branch: "main", listen: "127.0.0.1:0", keys: None }
}

#[test]
fn init_makes_a_state_that_reads_back_and_never_overwrites_one() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo(t.path());
    let state = t.path().join("state");
    let localhost = ["127.0.0.1".parse().unwrap()];
    let done = initialise(&args(&state, &repo, &localhost)).unwrap();
    assert_eq!(done.state, state.canonicalize().unwrap());
    assert!(done.ca_hash.starts_with("sha256:") && done.token.starts_with("cvg_"), "{done:?}");
    assert_eq!(done.url, "https://127.0.0.1:PORT", "port 0 is chosen at serve");
    assert!(done.join.contains(&done.token), "{}", done.join);
    // server.toml is written by the serializer and reads back as the same settings.
    let text = std::fs::read_to_string(state.join("server.toml")).unwrap();
    assert!(text.starts_with("# converge-server configuration (written by init)\n"), "{text}");
    let config = converge_server::config::Config::read(&state.join("server.toml")).unwrap();
    assert_eq!(config.state, done.state);
    assert_eq!(config.repo_poll, 5);
    assert_eq!(config.listen.to_string(), "127.0.0.1:0");
    let mode = |p: &str| std::fs::metadata(state.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(""), 0o700, "the state directory is the server's alone");
    assert_eq!(mode("keys/catalog.key"), 0o600);
    // A second init refuses, and changes nothing.
    let before = std::fs::read(state.join("state.db")).unwrap();
    let e = initialise(&args(&state, &repo, &localhost)).unwrap_err().to_string();
    assert!(e.contains("already a server's state directory; init never overwrites one"), "{e}");
    assert_eq!(std::fs::read(state.join("state.db")).unwrap(), before);
    // Nothing to name the server by: a clear error, no state made.
    let other = t.path().join("other");
    let e = initialise(&args(&other, &repo, &[])).unwrap_err().to_string();
    assert!(e.contains("give --name or --address"), "{e}");
    assert!(!other.exists());
}

/// `GET path` over TLS trusting only the state's CA; the status line.
fn get(addr: std::net::SocketAddr, ca: &Path, path: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_file(ca).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, std::net::TcpStream::connect(addr).unwrap());
    write!(tls, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    String::from_utf8_lossy(&out).lines().next().unwrap_or_default().to_string()
}

#[test]
fn the_serve_loop_answers_until_stopped_and_then_lets_go_of_its_port() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo(t.path());
    let state = t.path().join("state");
    let localhost = ["127.0.0.1".parse().unwrap()];
    initialise(&args(&state, &repo, &localhost)).unwrap();
    let config = converge_server::config::Config::read(&state.join("server.toml")).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let fleet = Arc::new(converge_server::fleet::Fleet::open(config).unwrap());
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = runtime.spawn(run(fleet, listener, async move {
        let _ = stopped.await;
    }));
    let ca = state.join("ca.pem");
    assert_eq!(get(addr, &ca, "/healthz"), "HTTP/1.1 200 OK");
    assert_eq!(get(addr, &ca, "/nowhere"), "HTTP/1.1 404 Not Found");
    stop.send(()).unwrap();
    let ended = runtime.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(10), serving).await });
    ended.expect("the loop ends when asked").unwrap().unwrap();
    assert!(std::net::TcpStream::connect(addr).is_err(), "the port is let go");
}

/// The commit the servers agree on comes from the database, which is input like any other: a
/// value that is not a commit id is refused before git sees it, and the commit in force stays.
#[test]
fn a_damaged_agreement_is_refused_before_git_sees_it() {
    let (_t, fleet) = common::fleet();
    let before = fleet.commit();
    let (epoch, _) = fleet.db.agreed().unwrap().unwrap();
    assert!(fleet.db.propose(epoch, "--upload-pack=touch /tmp/pwned", "x:1", 0).unwrap());
    let e = format!("{:#}", fleet.refresh().unwrap_err());
    assert!(e.contains("is not a commit id") && e.contains("DELETE FROM agreed"), "{e}");
    assert_eq!(fleet.commit(), before);
    // A commit id this repository does not hold: this server waits for it, compiling nothing new.
    assert!(fleet.db.propose(epoch + 1, &"ab".repeat(20), "x:1", 0).unwrap());
    let e = format!("{:#}", fleet.refresh().unwrap_err());
    assert!(e.contains("does not hold yet"), "{e}");
    assert_eq!(fleet.commit(), before);
}
