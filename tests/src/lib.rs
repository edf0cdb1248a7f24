//! Helpers for end-to-end tests: the real `converge` and `converge-server` binaries.
//!
//! Cargo builds a package's binaries for its own integration tests only, so these tests find
//! them beside their own executable in the target directory; `cargo test --workspace` (and
//! `./test.sh`) builds them first.

pub mod container;
pub mod postgres;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The path of a workspace binary, built by the same `cargo test --workspace`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // A test runs from target/PROFILE/deps, a benchmark from target/PROFILE.
    let parent = exe.parent().expect("target/PROFILE");
    let dir = if parent.ends_with("deps") { parent.parent().expect("target/PROFILE") } else { parent };
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: build the binaries first (cargo build --workspace)", path.display());
    path
}

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for Out {
    fn from(out: std::process::Output) -> Out {
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Runs a workspace binary with `args`.
/// The resources a text report of `converge apply` says changed (or would change).
pub fn changed(out: &Out) -> Vec<String> {
    out.stdout
        .lines()
        .filter(|l| l.starts_with("  changed") || l.starts_with("  would change"))
        .map(|l| l.split_whitespace().last().unwrap_or_default().to_string())
        .collect()
}

/// Demands exit status `code`, or shows all the output.
pub fn assert_code(out: &Out, code: i32, what: &str) {
    assert_eq!(out.code, code, "{what}:\n{}{}", out.stdout, out.stderr);
}

pub fn run(name: &str, args: &[&str]) -> Out {
    run_at(None, name, args)
}

/// Runs a workspace binary with `args`, seeing `clock` when given.
pub fn run_at(clock: Option<&Clock>, name: &str, args: &[&str]) -> Out {
    let mut cmd = Command::new(bin(name));
    cmd.args(args);
    if let Some(c) = clock {
        cmd.envs(c.env());
    }
    let out = cmd.output().expect("run");
    Out::from(out)
}

/// Runs `converge-server` and demands success; returns its standard output.
pub fn server_ok(args: &[&str]) -> String {
    server_at(None, args)
}

/// [`server_ok`], seeing `clock` when given (an operator's command at that time).
pub fn server_at(clock: Option<&Clock>, args: &[&str]) -> String {
    let out = run_at(clock, "converge-server", args);
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
        Fleet::serving(files, "127.0.0.1", "127.0.0.1:0")
    }

    /// As [`Fleet::new`], for a server that agents reach at `address` and that listens on
    /// `listen`.
    pub fn serving(files: &[(&str, &str)], address: &str, listen: &str) -> Fleet {
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
            address,
            "--listen",
            listen,
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
        git(&self.repo(), &["add", "-A"]);
        git(&self.repo(), &["commit", "-q", "-m", "change"]);
    }

    /// A new single-use token for `name`.
    pub fn token(&self, name: &str) -> String {
        self.token_at(None, name)
    }

    /// A new single-use token for `name`, made at the time of `clock`.
    pub fn token_at(&self, clock: Option<&Clock>, name: &str) -> String {
        server_at(clock, &["token", "new", "--config", &self.config(), "--name", name]).trim().to_string()
    }

    /// Waits (10 s at most) until the server has renewed its own certificate if it is due at
    /// the clock's time: a test moves the clock in jumps, faster than the server's check once a
    /// second, where real months would leave it all the time it needs.
    pub fn server_keeps_up(&self, clock: &Clock) {
        let pem = self.dir.path().join("state/server.pem");
        let due = || {
            let text = std::fs::read(&pem).unwrap();
            let (_, pem) = x509_parser::pem::parse_x509_pem(&text).expect("server.pem is PEM");
            let cert = pem.parse_x509().expect("server.pem is a certificate");
            let (from, until) = (cert.validity().not_before.timestamp(), cert.validity().not_after.timestamp());
            clock.now() >= from + (until - from) * 2 / 3
        };
        eventually(Duration::from_secs(10), Duration::from_millis(100), || {
            (!due()).then_some(()).ok_or("the server has not renewed its certificate".into())
        });
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
    /// The file of the clock it runs on, when it runs on a [`Clock`]: the test's own TLS
    /// clients check its certificates at that time too.
    pub clock_file: Option<PathBuf>,
}

/// A rustls time source reading a [`Clock`]'s offset file: the test's view of the time the
/// binaries see.
#[derive(Debug)]
struct ClockTime(PathBuf);

impl rustls::time_provider::TimeProvider for ClockTime {
    fn current_time(&self) -> Option<rustls::pki_types::UnixTime> {
        let offset: i64 = std::fs::read_to_string(&self.0).ok()?.trim().trim_end_matches('s').parse().ok()?;
        let now = converge_modules::time::Timestamp::now().0;
        Some(rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs((now + offset) as u64)))
    }
}

/// How to start a server for a test.
#[derive(Default)]
pub struct Launch<'a> {
    /// The open-file limit (soft and hard) the server runs under.
    pub open_files: Option<u64>,
    /// Where its log (standard error) goes.
    pub log: Option<PathBuf>,
    /// The clock it sees.
    pub clock: Option<&'a Clock>,
    /// The network namespace it runs in (a name under /run/netns the test made), instead of
    /// the test's own.
    pub netns: Option<&'a str>,
}

/// The clock the binaries of a test see (libfaketime): the real time shifted by an offset the
/// test moves forward, in a file the binaries read at every call. Monotonic time is left
/// alone, so timers and timeouts behave. The machine's clock is never touched.
pub struct Clock {
    file: PathBuf,
    library: PathBuf,
    offset: std::cell::Cell<i64>,
}

impl Clock {
    /// A clock at the real time, or `None` when libfaketime is not installed (Debian's
    /// libfaketime package; `./test.sh` as root installs it).
    pub fn new(dir: &Path) -> Option<Clock> {
        let library = ["x86_64-linux-gnu", "aarch64-linux-gnu"]
            .iter()
            .map(|a| PathBuf::from(format!("/usr/lib/{a}/faketime/libfaketimeMT.so.1")))
            .find(|p| p.exists())?;
        let c = Clock { file: dir.join("faketime"), library, offset: std::cell::Cell::new(0) };
        c.advance(0);
        Some(c)
    }

    /// Moves the clock `seconds` forward.
    pub fn advance(&self, seconds: i64) {
        self.offset.set(self.offset.get() + seconds);
        let tmp = self.file.with_extension("new");
        std::fs::write(&tmp, format!("{:+}s\n", self.offset.get())).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
    }

    /// The libfaketime library the binaries are run with (`LD_PRELOAD`).
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// How far ahead of the real time it is, in seconds.
    pub fn offset(&self) -> i64 {
        self.offset.get()
    }

    /// Now, on this clock.
    pub fn now(&self) -> i64 {
        converge_modules::time::Timestamp::now().0 + self.offset.get()
    }

    /// What a process needs in its environment to see this clock.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LD_PRELOAD", self.library.display().to_string()),
            ("FAKETIME_TIMESTAMP_FILE", self.file.display().to_string()),
            ("FAKETIME_NO_CACHE", "1".into()),
            ("DONT_FAKE_MONOTONIC", "1".into()),
        ]
    }
}

/// A [`Clock`], or the test says why it cannot run: a skip when not demanded, a failure under
/// `CONVERGE_REQUIRE_CONTAINERS=1` (CI), which installs libfaketime.
pub fn clock(dir: &Path, test: &str) -> Option<Clock> {
    let c = Clock::new(dir);
    if c.is_none() {
        assert!(
            std::env::var("CONVERGE_REQUIRE_CONTAINERS").as_deref() != Ok("1"),
            "{test}: libfaketime is not installed (apt-get install libfaketime), and CI demands this test"
        );
        eprintln!(
            "{test}: skipped: libfaketime is not installed (apt-get install libfaketime; ./test.sh as root does)"
        );
    }
    c
}

impl Server {
    /// Starts the server of `config` and waits until it listens.
    pub fn start(config: &str) -> Server {
        Server::launch(config, Launch::default())
    }

    /// Starts the server of `config` as `how` says, and waits until it listens.
    pub fn launch(config: &str, how: Launch) -> Server {
        use std::io::BufRead;
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some(ns) = how.netns {
            argv.extend(["ip".into(), "netns".into(), "exec".into(), ns.into()]);
        }
        if let Some(n) = how.open_files {
            argv.extend(["prlimit".into(), format!("--nofile={n}:{n}").into(), "--".into()]);
        }
        argv.push(bin("converge-server").into());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        let stderr = match &how.log {
            Some(p) => std::process::Stdio::from(std::fs::File::create(p).unwrap()),
            None => std::process::Stdio::null(),
        };
        if let Some(clock) = how.clock {
            cmd.envs(clock.env());
        }
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
        let url = rx.recv_timeout(Duration::from_secs(30)).expect("the server starts listening");
        Server { child, url, clock_file: how.clock.map(|c| c.file.clone()) }
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
        let config = match &self.clock_file {
            Some(file) => Self::tls_at(fleet, None, file),
            None => Self::tls(fleet),
        };
        self.request_with(config, head, body)
    }

    /// TLS trusting the fleet's CA (presenting the client certificate of the agent under
    /// `root`, if given) that checks certificates at the time of the clock in `clock_file`.
    pub fn tls_at(fleet: &Fleet, root: Option<&Path>, clock_file: &Path) -> std::sync::Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let ca = CertificateDer::from_pem_file(fleet.dir.path().join("state/ca.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        let builder = rustls::ClientConfig::builder_with_details(
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
            std::sync::Arc::new(ClockTime(clock_file.to_path_buf())),
        )
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        std::sync::Arc::new(match root {
            None => builder.with_no_client_auth(),
            Some(root) => {
                let cert = CertificateDer::from_pem_file(root.join("etc/converge/agent.pem")).unwrap();
                let key = PrivateKeyDer::from_pem_file(root.join("etc/converge/agent.key")).unwrap();
                builder.with_client_auth_cert(vec![cert], key).unwrap()
            }
        })
    }

    /// The same, with the client certificate of the agent joined under `root`.
    pub fn request_as(&self, fleet: &Fleet, root: &Path, head: &str, body: &[u8]) -> (u16, String) {
        let config = match &self.clock_file {
            Some(file) => Self::tls_at(fleet, Some(root), file),
            None => Self::tls_as(fleet, root),
        };
        self.request_with(config, head, body)
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
        // A handshake refused (an unknown CA, a certificate refused) is an answer too: status 0.
        if let Err(e) = write!(tls, "{head}Host: {host}\r\nConnection: close\r\n\r\n") {
            return (0, e.to_string());
        }
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
    converge_at(None, root, args)
}

/// Runs `converge` with `args` in `root`, seeing `clock` when given.
pub fn converge_at(clock: Option<&Clock>, root: &Path, args: &[&str]) -> Out {
    let r = root.display().to_string();
    let mut all = args.to_vec();
    all.extend(["--root", &r]);
    run_at(clock, "converge", &all)
}

/// A child process killed when dropped, so a failing test leaves nothing running.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Copies the host's programs `tools` into `root` with the libraries they load (as `ldd`
/// lists them), so that commands run inside the root (chrooted) find them.
pub fn with_tools(root: &Path, tools: &[&str]) {
    let mut files: Vec<String> = tools.iter().map(|t| t.to_string()).collect();
    for tool in tools {
        let out = Command::new("ldd").arg(tool).output().expect("ldd");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let path = line.split("=>").last().unwrap_or("").split_whitespace().next().unwrap_or("");
            if path.starts_with('/') {
                files.push(path.to_string());
            }
        }
    }
    for file in files {
        let to = root.join(file.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&file, &to).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}
