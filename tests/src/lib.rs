//! Helpers for end-to-end tests: the real `converge` and `converge-server` binaries.
//!
//! Cargo builds a package's binaries for its own integration tests only, so these tests find
//! them beside their own executable in the target directory; `cargo test --workspace` (and
//! `./test.sh`) builds them first.

pub mod container;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The path of a workspace binary, built by the same `cargo test --workspace`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(Path::parent).expect("target/PROFILE");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: build the binaries first (cargo build --workspace)", path.display());
    path
}

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a workspace binary with `args`.
pub fn run(name: &str, args: &[&str]) -> Out {
    let out = Command::new(bin(name)).args(args).output().expect("run");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `converge-server` and demands success; returns its standard output.
pub fn server_ok(args: &[&str]) -> String {
    let out = run("converge-server", args);
    assert_eq!(out.code, 0, "converge-server {args:?}: {}{}", out.stdout, out.stderr);
    out.stdout
}

/// Writes files under `dir`, creating directories.
pub fn write(dir: &Path, files: &[(&str, &str)]) {
    for (path, text) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
}

/// Copies the tree `from` into `to` (as vagrant's rsync synced folders do), leaving out `.git`.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.file_name() == ".git" {
            continue;
        }
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Calls `check` every `every` until it returns `Ok`; fails the test with its last `Err` after
/// `within`.
pub fn eventually(within: Duration, every: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + within;
    loop {
        match check() {
            Ok(()) => return,
            Err(why) => assert!(Instant::now() < deadline, "after {within:?}: {why}"),
        }
        std::thread::sleep(every);
    }
}

/// Runs git in `dir` with an identity of its own (never the machine's configuration).
pub fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "commit.gpgsign=false"])
        .args(args)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .expect("git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A server's state made by `converge-server init`, over a git repository of `files`.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub ca_hash: String,
    /// The token `init` printed (for any node name).
    pub token: String,
}

impl Fleet {
    pub fn new(files: &[(&str, &str)]) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        write(&repo, files);
        git(&repo, &["init", "-q", "-b", "main"]);
        git(&repo, &["add", "-A"]);
        git(&repo, &["commit", "-q", "-m", "first"]);
        let state = dir.path().join("state");
        let out = server_ok(&[
            "init",
            "--state",
            &state.display().to_string(),
            "--address",
            "127.0.0.1",
            "--listen",
            "127.0.0.1:0",
            "--repo",
            &repo.display().to_string(),
        ]);
        let join = out.lines().find(|l| l.contains("converge bootstrap")).expect("a join command");
        let word = |flag: &str| join.split_whitespace().skip_while(|w| *w != flag).nth(1).unwrap().to_string();
        // Tests watch the repository every second.
        let config = state.join("server.toml");
        let text = std::fs::read_to_string(&config).unwrap().replace("repo_poll = \"5s\"", "repo_poll = \"1s\"");
        std::fs::write(&config, text).unwrap();
        Fleet { ca_hash: word("--ca-hash"), token: word("--token"), dir }
    }

    pub fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    pub fn config(&self) -> String {
        self.dir.path().join("state/server.toml").display().to_string()
    }

    /// Commits changed files to the repository.
    pub fn commit(&self, files: &[(&str, &str)]) {
        write(&self.repo(), files);
        git(&self.repo(), &["commit", "-q", "-am", "change"]);
    }

    /// A new single-use token for `name`.
    pub fn token(&self, name: &str) -> String {
        server_ok(&["token", "new", "--config", &self.config(), "--name", name]).trim().to_string()
    }

    /// A root directory for an agent named `name`.
    pub fn root(&self, name: &str) -> PathBuf {
        let root = self.dir.path().join(name);
        write(&root, &[("etc/hostname", &format!("{name}\n"))]);
        root
    }
}

/// A running `converge-server serve`, stopped when dropped.
pub struct Server {
    child: std::process::Child,
    pub url: String,
}

/// How to start a server for a test.
#[derive(Default)]
pub struct Launch {
    /// The open-file limit (soft and hard) the server runs under.
    pub open_files: Option<u64>,
    /// Where its log (standard error) goes.
    pub log: Option<PathBuf>,
}

impl Server {
    /// Starts the server of `config` and waits until it listens.
    pub fn start(config: &str) -> Server {
        Server::launch(config, Launch::default())
    }

    /// Starts the server of `config` as `how` says, and waits until it listens.
    pub fn launch(config: &str, how: Launch) -> Server {
        use std::io::BufRead;
        let mut cmd = match how.open_files {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(bin("converge-server"));
                c
            }
            None => Command::new(bin("converge-server")),
        };
        let stderr = match &how.log {
            Some(p) => std::process::Stdio::from(std::fs::File::create(p).unwrap()),
            None => std::process::Stdio::null(),
        };
        let mut child = cmd
            .args(["serve", "--config", config])
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start the server");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_string());
                }
            }
        });
        let url = rx.recv_timeout(std::time::Duration::from_secs(30)).expect("the server starts listening");
        Server { child, url }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's resident memory, in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    }

    /// GETs `path` over HTTPS, trusting only the fleet's CA; returns the status and body.
    pub fn get(&self, fleet: &Fleet, path: &str) -> (u16, String) {
        self.request(fleet, &format!("GET {path} HTTP/1.1\r\n"), b"")
    }

    /// POSTs `body` to `path` without a client certificate; returns the status and body.
    pub fn post(&self, fleet: &Fleet, path: &str, body: &[u8]) -> (u16, String) {
        let head =
            format!("POST {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n", body.len());
        self.request(fleet, &head, body)
    }

    /// A TLS client configuration trusting only the fleet's CA.
    pub fn tls(fleet: &Fleet) -> std::sync::Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        let ca = rustls::pki_types::CertificateDer::from_pem_file(fleet.dir.path().join("state/ca.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        std::sync::Arc::new(
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    /// `host:port` of the server.
    pub fn addr(&self) -> String {
        self.url.trim_start_matches("https://").trim_end_matches('/').to_string()
    }

    /// Sends a request (`head` is the request line and headers but the last CRLF), returns the
    /// status and body.
    pub fn request(&self, fleet: &Fleet, head: &str, body: &[u8]) -> (u16, String) {
        self.request_with(Self::tls(fleet), head, body)
    }

    /// The same, with the client certificate of the agent joined under `root`.
    pub fn request_as(&self, fleet: &Fleet, root: &Path, head: &str, body: &[u8]) -> (u16, String) {
        self.request_with(Self::tls_as(fleet, root), head, body)
    }

    /// A TLS client configuration trusting only the fleet's CA, presenting the client
    /// certificate of the agent joined under `root`.
    pub fn tls_as(fleet: &Fleet, root: &Path) -> std::sync::Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let ca = CertificateDer::from_pem_file(fleet.dir.path().join("state/ca.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        let cert = CertificateDer::from_pem_file(root.join("etc/converge/agent.pem")).unwrap();
        let key = PrivateKeyDer::from_pem_file(root.join("etc/converge/agent.key")).unwrap();
        std::sync::Arc::new(
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(vec![cert], key)
                .unwrap(),
        )
    }

    fn request_with(&self, config: std::sync::Arc<rustls::ClientConfig>, head: &str, body: &[u8]) -> (u16, String) {
        use std::io::{Read, Write};
        let addr = self.addr();
        let host = addr.rsplit_once(':').unwrap().0.to_string();
        let name = rustls::pki_types::ServerName::try_from(host.clone()).unwrap();
        let conn = rustls::ClientConnection::new(config, name).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, std::net::TcpStream::connect(&addr).unwrap());
        write!(tls, "{head}Host: {host}\r\nConnection: close\r\n\r\n").unwrap();
        // The server may answer (and close) before the whole body is sent: that is the point.
        let _ = tls.write_all(body);
        let mut response = Vec::new();
        let _ = tls.read_to_end(&mut response);
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    }

    /// The value of a counter or gauge (without labels) in `/metrics`.
    pub fn metric(&self, fleet: &Fleet, name: &str) -> f64 {
        let (status, text) = self.get(fleet, "/metrics");
        assert_eq!(status, 200, "{text}");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {text}"))
    }

    /// Stops the server at once (SIGKILL), as a crash would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `converge` with `args` in `root`.
pub fn converge_in(root: &Path, args: &[&str]) -> Out {
    let mut all: Vec<&str> = args.to_vec();
    let r = root.display().to_string();
    all.extend(["--root", &r]);
    run("converge", &all)
}

/// A child process killed when dropped, so a failing test leaves nothing running.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
