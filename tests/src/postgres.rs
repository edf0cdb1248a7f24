//! A PostgreSQL cluster for one test, from Debian's package, that changes nothing on the
//! machine: `initdb` into a temporary directory as the unprivileged `postgres` user (the tests
//! run as root; PostgreSQL refuses to run as root), the server started on a free loopback port
//! with its socket in that directory, and stopped (then the directory removed) when dropped.
//! The machine's own clusters, if any, are never touched.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running cluster, with one database `converge` owned by the superuser `converge`
/// (trust authentication, on loopback only).
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

/// The newest PostgreSQL binaries installed (`/usr/lib/postgresql/N/bin`).
pub fn binaries() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

/// Why PostgreSQL tests cannot run here, if they cannot: they need root (to run the cluster
/// as the `postgres` user), that user, and the package's binaries.
pub fn unavailable() -> Option<String> {
    if !crate::container::nix_is_root() {
        return Some("not root: the cluster runs as the `postgres` user".into());
    }
    if Command::new("id").arg("postgres").output().map(|o| !o.status.success()).unwrap_or(true) {
        return Some("no `postgres` user (apt-get install postgresql)".into());
    }
    if binaries().is_none() {
        return Some("no /usr/lib/postgresql/N/bin (apt-get install postgresql)".into());
    }
    None
}

/// Whether PostgreSQL tests can run here; where they cannot, says why and the test passes,
/// unless `CONVERGE_REQUIRE_POSTGRES` is set (CI), where it fails.
pub fn available() -> bool {
    match unavailable() {
        None => true,
        Some(why) if std::env::var_os("CONVERGE_REQUIRE_POSTGRES").is_some() => {
            panic!("PostgreSQL tests are required here but cannot run: {why}")
        }
        Some(why) => {
            eprintln!("skipped: {why}");
            false
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Postgres {
    /// Makes and starts a cluster; panics with PostgreSQL's own words when it cannot.
    pub fn start() -> Postgres {
        let bin = binaries().expect("PostgreSQL binaries");
        let dir = tempfile::Builder::new().prefix("converge-pg.").tempdir().unwrap();
        let chown = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status().unwrap();
        assert!(chown.success());
        let pg = Postgres { dir, bin, port: free_port() };
        let data = pg.data().display().to_string();
        pg.as_postgres("initdb", &["-D", &data, "-U", "converge", "--auth=trust", "-E", "UTF8", "--no-sync"]);
        pg.start_again();
        pg.as_postgres("createdb", &["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "converge", "converge"]);
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs one of the cluster's programs as the `postgres` user.
    fn as_postgres(&self, program: &str, args: &[&str]) -> String {
        let out = Command::new("setpriv")
            .args(["--reuid=postgres", "--regid=postgres", "--clear-groups", "--"])
            .arg(self.bin.join(program))
            .args(args)
            .current_dir(self.dir.path())
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts the cluster (again, after [`Postgres::stop`]) on its port.
    pub fn start_again(&self) {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("postgres.log").display().to_string();
        let data = self.data().display().to_string();
        self.as_postgres("pg_ctl", &["-D", &data, "-o", &options, "-l", &log, "-w", "-t", "30", "start"]);
    }

    /// From now on, TCP connections only over TLS with the certificate and key given (PEM):
    /// a plaintext one is refused. Restarts the cluster.
    pub fn require_tls(&self, cert: &str, key: &str) {
        use std::os::unix::fs::PermissionsExt;
        let data = self.data();
        for (file, text) in [("server.crt", cert), ("server.key", key)] {
            std::fs::write(data.join(file), text).unwrap();
            std::fs::set_permissions(data.join(file), std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let hba = data.join("pg_hba.conf");
        let rules = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(&hba, format!("hostnossl all all 0.0.0.0/0 reject\n{rules}")).unwrap();
        let conf = data.join("postgresql.conf");
        let text = std::fs::read_to_string(&conf).unwrap();
        std::fs::write(&conf, format!("{text}\nssl = on\n")).unwrap();
        let chown = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&data).status().unwrap();
        assert!(chown.success());
        self.stop();
        self.start_again();
    }

    /// Stops the cluster at once (connections are cut), keeping its data.
    pub fn stop(&self) {
        let data = self.data().display().to_string();
        self.as_postgres("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }

    /// Points the server of `config` (a `server.toml`) at this database, with `extra` settings.
    pub fn serve_from(&self, config: &str, extra: &str) {
        let text = std::fs::read_to_string(config).unwrap();
        std::fs::write(config, format!("{text}database = \"{}\"\n{extra}", self.url())).unwrap();
    }

    /// The URL `server.toml` names the database by.
    pub fn url(&self) -> String {
        format!("postgres://converge@127.0.0.1:{}/converge", self.port)
    }

    /// Runs SQL with `psql`, returning its unaligned output.
    pub fn sql(&self, query: &str) -> String {
        let port = self.port.to_string();
        self.as_postgres(
            "psql",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "converge",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                query,
                "converge",
            ],
        )
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data().display().to_string();
        let _ = Command::new("setpriv")
            .args(["--reuid=postgres", "--regid=postgres", "--clear-groups", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .current_dir(self.dir.path())
            .output();
    }
}
