//! Disposable Debian containers with systemd as PID 1, for testing against real apt, dpkg,
//! shadow-utils and systemd without touching the machine (TESTBED.md).
//!
//! Each [`Container`] is an overlayfs layer over the prepared tree (`tests/testbed/prepare`),
//! booted with `systemd-nspawn --private-network` in a cgroup of its own, with a local package
//! repository mounted read-only at `/srv/repo` and the `converge` under test in
//! `/usr/local/bin`. Dropping it stops it by its own PID, unmounts, and removes its cgroups, on
//! failure too.
//!
//! The suite runs only with `CONVERGE_CONTAINER_TESTS=1` (as root, with `CONVERGE_TESTBED` set
//! to what prepare printed); `.ci/run` sets both and fails if it cannot. Without the variable,
//! each test says it was skipped and passes, so a plain `cargo test` works anywhere.

use crate::{Out, bin};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Whether the container suite runs; prints why not when it does not.
pub fn enabled(test: &str) -> bool {
    match std::env::var("CONVERGE_CONTAINER_TESTS").as_deref() {
        Ok("1") => {
            assert!(nix_is_root(), "CONVERGE_CONTAINER_TESTS=1 needs root (containers, mounts, cgroups)");
            true
        }
        _ => {
            eprintln!(
                "{test}: skipped (the container suite runs with CONVERGE_CONTAINER_TESTS=1, as root; see README)"
            );
            false
        }
    }
}

/// Whether the tests run as root.
pub fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// The prepared directory: `tree/` (the Debian tree) and `debs/` (real packages).
pub fn testbed() -> PathBuf {
    let dir = std::env::var("CONVERGE_TESTBED").map(PathBuf::from).unwrap_or_default();
    assert!(
        dir.join("ready").exists(),
        "CONVERGE_TESTBED={} is not a prepared testbed: run `tests/testbed/prepare` as root and export what it prints",
        dir.display()
    );
    dir
}

/// A package the tests build.
#[derive(Clone)]
pub struct Deb {
    pub name: String,
    pub version: String,
    /// (path, content, mode)
    pub files: Vec<(String, String, u32)>,
    pub preinst: Option<String>,
}

impl Deb {
    pub fn new(name: &str, version: &str) -> Deb {
        Deb { name: name.into(), version: version.into(), files: vec![], preinst: None }
    }

    pub fn file(mut self, path: &str, content: &str, mode: u32) -> Deb {
        self.files.push((path.into(), content.into(), mode));
        self
    }

    /// Builds the package into `out` (`NAME_VERSION_all.deb`), its tree made under `work`.
    pub fn build(&self, work: &Path, out: &Path) -> PathBuf {
        let d = self;
        let root = work.join(format!("{}_{}", d.name, d.version));
        std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
        let control = format!(
            "Package: {}\nVersion: {}\nArchitecture: all\nMaintainer: converge tests <tests@example.invalid>\nDescription: a package the converge tests built\n",
            d.name, d.version
        );
        std::fs::write(root.join("DEBIAN/control"), control).unwrap();
        if let Some(script) = &d.preinst {
            let p = root.join("DEBIAN/preinst");
            std::fs::write(&p, script).unwrap();
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        for (path, content, mode) in &d.files {
            let p = root.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, content).unwrap();
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(*mode)).unwrap();
        }
        let file = out.join(format!("{}_{}_all.deb", d.name, d.version));
        run_ok(
            Command::new("dpkg-deb")
                .args(["--build", "--root-owner-group", "-Zgzip"])
                .arg(&root)
                .arg(&file)
                .stdout(Stdio::null()),
            "dpkg-deb",
        );
        file
    }

    /// A package shipping a service unit `NAME.service` that runs `exec`.
    pub fn service(name: &str, exec_start: &str, exec_reload: Option<&str>) -> Deb {
        let reload = exec_reload.map(|r| format!("ExecReload={r}\n")).unwrap_or_default();
        let unit = format!(
            "[Unit]\nDescription=converge test service {name}\n\n[Service]\nExecStart={exec_start}\n{reload}\n[Install]\nWantedBy=multi-user.target\n"
        );
        Deb::new(name, "1.0").file(&format!("/lib/systemd/system/{name}.service"), &unit, 0o644)
    }
}

/// Every package the suite's tests use.
pub fn test_debs() -> Vec<Deb> {
    let mut debs = vec![
        Deb::new("cvt-hello", "1.0").file("/usr/share/cvt-hello/version", "1.0\n", 0o644),
        Deb::new("cvt-hello", "2.0").file("/usr/share/cvt-hello/version", "2.0\n", 0o644),
        Deb::service(
            "cvt-svc",
            "/bin/sh -c 'echo start >> /var/log/cvt-svc.log; exec sleep infinity'",
            Some("/bin/sh -c 'echo reload >> /var/log/cvt-svc.log'"),
        ),
        Deb::service(
            "cvt-broken",
            "/bin/sh -c 'echo \"cvt-broken: /etc/cvt-broken.conf is missing\" >&2; exit 1'",
            None,
        ),
        Deb { preinst: Some("#!/bin/sh\nsleep 15\n".into()), ..Deb::new("cvt-slow", "1.0") },
    ];
    for i in 1..=100 {
        debs.push(Deb::new(&format!("cvb-pkg-{i:03}"), "1.0").file(
            &format!("/usr/share/cvb/pkg-{i:03}"),
            "x\n",
            0o644,
        ));
    }
    for i in 1..=30 {
        debs.push(Deb::service(&format!("cvb-svc-{i:02}"), "/bin/sleep infinity", None));
    }
    debs
}

/// Runs `cmd` (described as `what`) and demands success; its standard output.
pub fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({cmd:?}): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The local repository: the testbed's real packages and the built ones, indexed. Built once
/// per set of definitions (cached beside the testbed, under a lock).
pub fn repo() -> PathBuf {
    let testbed = testbed();
    let debs = test_debs();
    let key = {
        let mut text = String::new();
        for d in &debs {
            text.push_str(&format!("{}|{}|{:?}|{:?}\n", d.name, d.version, d.files, d.preinst));
        }
        converge_modules::hash::sha256_hex(text.as_bytes())[..12].to_string()
    };
    let repo = testbed.join(format!("repo-{key}"));
    if repo.join("Packages").exists() {
        return repo;
    }
    let lock = std::fs::File::create(testbed.join(".repo.lock")).unwrap();
    // Serialise builders across test processes.
    lock.lock().unwrap();
    if repo.join("Packages").exists() {
        return repo;
    }
    let tmp = testbed.join(format!("repo-{key}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    for e in std::fs::read_dir(testbed.join("debs")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.join(e.file_name())).unwrap();
    }
    let build = tempfile::tempdir().unwrap();
    for d in &debs {
        d.build(build.path(), &tmp);
    }
    let index = run_ok(
        Command::new("dpkg-scanpackages").args(["--multiversion", "."]).current_dir(&tmp).stderr(Stdio::null()),
        "dpkg-scanpackages",
    );
    std::fs::write(tmp.join("Packages"), index).unwrap();
    std::fs::rename(&tmp, &repo).unwrap();
    repo
}

/// Builds the packages (from the binaries this test run built) into `out`.
pub fn build_packages(out: &Path) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = bin("converge").parent().unwrap().parent().unwrap().to_path_buf();
    let built = Command::new(root.join("packaging/build"))
        .args(["--profile", "debug", "--out"])
        .arg(out)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    assert!(built.status.success(), "packaging/build: {}", String::from_utf8_lossy(&built.stderr));
    String::from_utf8_lossy(&built.stdout).lines().map(PathBuf::from).collect()
}

/// Builds a noarch RPM `NAME-VERSION-1` shipping `/usr/share/NAME/version`, under `build`
/// (rpmbuild's top directory); its path.
pub fn build_rpm(name: &str, version: &str, build: &Path) -> PathBuf {
    let spec = format!(
        "Name: {name}\nVersion: {version}\nRelease: 1\nSummary: converge test\nLicense: MIT\nBuildArch: noarch\n%description\nconverge test package\n%install\nmkdir -p %{{buildroot}}/usr/share/{name}\necho {version} > %{{buildroot}}/usr/share/{name}/version\n%files\n/usr/share/{name}/version\n"
    );
    std::fs::create_dir_all(build).unwrap();
    let spec_path = build.join(format!("{name}-{version}.spec"));
    std::fs::write(&spec_path, spec).unwrap();
    run_ok(
        Command::new("rpmbuild")
            .args(["-bb", "--define"])
            .arg(format!("_topdir {}", build.display()))
            .args(["--define", "_build_id_links none"])
            .arg(&spec_path),
        "rpmbuild",
    );
    build.join(format!("RPMS/noarch/{name}-{version}-1.noarch.rpm"))
}

/// The package among `packages` whose file name starts with `prefix`.
pub fn package(packages: &[PathBuf], prefix: &str) -> PathBuf {
    packages.iter().find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix)).expect(prefix).clone()
}

/// `deb` repackaged as version `version`, with `preinst` as its install script when given. Its
/// binary carries `converge test build VERSION` at its end (an ELF runs as ever with bytes
/// after it), so a test can tell which version's binary is in place.
pub fn repackaged(deb: &Path, version: &str, preinst: Option<&str>, out: &Path) -> PathBuf {
    let dir = out.join(format!("tree-{version}"));
    run_ok(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&dir), "dpkg-deb -R");
    let control = std::fs::read_to_string(dir.join("DEBIAN/control")).unwrap();
    let control: String = control
        .lines()
        .map(|l| if l.starts_with("Version:") { format!("Version: {version}\n") } else { format!("{l}\n") })
        .collect();
    std::fs::write(dir.join("DEBIAN/control"), control).unwrap();
    let binary = dir.join("usr/bin/converge");
    let mut bytes = std::fs::read(&binary).unwrap();
    bytes.extend_from_slice(format!("\nconverge test build {version}\n").as_bytes());
    std::fs::write(&binary, &bytes).unwrap();
    let sums = dir.join("DEBIAN/md5sums");
    if sums.exists() {
        let fresh = run_ok(Command::new("md5sum").arg("usr/bin/converge").current_dir(&dir), "md5sum");
        let text = std::fs::read_to_string(&sums).unwrap();
        let text: String = text
            .lines()
            .map(|l| if l.ends_with(" usr/bin/converge") { fresh.clone() } else { format!("{l}\n") })
            .collect();
        std::fs::write(&sums, text).unwrap();
    }
    if let Some(script) = preinst {
        let p = dir.join("DEBIAN/preinst");
        std::fs::write(&p, script).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let file = out.join(format!("converge_{version}_amd64.deb"));
    run_ok(
        Command::new("dpkg-deb").args(["--build", "--root-owner-group", "-Zgzip"]).arg(&dir).arg(&file),
        "dpkg-deb --build",
    );
    std::fs::remove_dir_all(&dir).unwrap();
    file
}

/// A flat apt repository in `dir` of the agent's package `deb` repackaged as each of
/// `versions` (with its install script, when given): for a container's
/// `deb [trusted=yes] file:/srv/self ./`.
pub fn self_repo(deb: &Path, versions: &[(&str, Option<&str>)], dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (version, preinst) in versions {
        repackaged(deb, version, *preinst, dir);
    }
    let index =
        run_ok(Command::new("dpkg-scanpackages").args(["--multiversion", "."]).current_dir(dir), "dpkg-scanpackages");
    std::fs::write(dir.join("Packages"), index).unwrap();
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A booted container.
pub struct Container {
    pub name: String,
    dir: PathBuf,
    merged: PathBuf,
    nspawn: Option<std::process::Child>,
    leader: u32,
}

impl Container {
    /// Boots a new container (about a second) with the `converge` of this build, and refreshes
    /// its package lists from the local repository.
    pub fn boot() -> Container {
        Container::boot_with(&bin("converge"))
    }

    /// As [`Container::boot`], with the given `converge` binary.
    pub fn boot_with(converge: &Path) -> Container {
        Container::boot_in(converge, None)
    }

    /// As [`Container::boot`], in the network namespace `netns` (a name under /run/netns) the
    /// test made, instead of a private network of its own.
    pub fn boot_in_netns(netns: &str) -> Container {
        Container::boot_in(&bin("converge"), Some(netns))
    }

    fn boot_in(converge: &Path, netns: Option<&str>) -> Container {
        let tree = testbed().join("tree");
        let repo = repo();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("cvt-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        let merged = dir.join("merged");
        for d in ["upper", "work", "merged"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let mut c = Container { name: name.clone(), dir: dir.clone(), merged: merged.clone(), nspawn: None, leader: 0 };
        run_ok(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(format!(
                    "lowerdir={},upperdir={},workdir={}",
                    tree.display(),
                    dir.join("upper").display(),
                    dir.join("work").display()
                ))
                .arg(&merged),
            "mount the overlay",
        );
        std::fs::write(merged.join("etc/hostname"), format!("{name}\n")).unwrap();
        std::fs::copy(converge, merged.join("usr/local/bin/converge")).unwrap();
        for h in ["unified", "systemd"] {
            std::fs::create_dir_all(format!("/sys/fs/cgroup/{h}/{name}")).unwrap();
        }
        let script = format!(
            "echo $$ > /sys/fs/cgroup/unified/{name}/cgroup.procs; echo $$ > /sys/fs/cgroup/systemd/{name}/cgroup.procs; \
             exec env SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 systemd-nspawn -D {} -M {name} -b --register=no --keep-unit \
             --console=passive {} --bind-ro={}:/srv/repo",
            merged.display(),
            match netns {
                Some(ns) => format!("--network-namespace-path=/run/netns/{ns}"),
                None => "--private-network".to_string(),
            },
            repo.display()
        );
        let log = std::fs::File::create(dir.join("nspawn.log")).unwrap();
        let child = Command::new("setsid")
            .args(["bash", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("systemd-nspawn");
        let pid = child.id();
        c.nspawn = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        c.leader = loop {
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
            let leader = children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .find(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "systemd"));
            if let Some(l) = leader {
                break l;
            }
            assert!(Instant::now() < deadline, "the container did not start: {}", c.log());
            std::thread::sleep(Duration::from_millis(50));
        };
        loop {
            let state = c.run(&["systemctl", "is-system-running"]).stdout;
            if matches!(state.trim(), "running" | "degraded") {
                break;
            }
            assert!(Instant::now() < deadline, "the container did not finish booting ({}): {}", state.trim(), c.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        let update = c.run(&["apt-get", "update", "-qq"]);
        assert_eq!(update.code, 0, "apt-get update in the container: {}", update.stderr);
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nspawn.log")).unwrap_or_default()
    }

    /// Joins this host to the server at `url` as `name`, with a token of its own: `converge
    /// bootstrap` (which runs once).
    pub fn join(&self, f: &crate::Fleet, url: &str, name: &str) -> Out {
        let token = f.token(name);
        let argv =
            ["converge", "bootstrap", "--server", url, "--ca-hash", &f.ca_hash, "--name", name, "--token", &token];
        self.run(&argv)
    }

    /// Runs a command inside the container (its namespaces, a clean environment).
    pub fn run(&self, argv: &[&str]) -> Out {
        self.run_env(&[], argv)
    }

    /// As [`Container::run`], with `NAME=VALUE` settings added to the environment.
    pub fn run_env(&self, env: &[&str], argv: &[&str]) -> Out {
        let out = Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a", "env", "-i"])
            .args(["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"])
            .args(env)
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .expect("nsenter");
        Out::from(out)
    }

    /// Runs a shell script inside the container and demands success; its standard output.
    pub fn sh(&self, script: &str) -> String {
        let out = self.run(&["sh", "-c", script]);
        assert_eq!(out.code, 0, "in the container: {script}\n{}{}", out.stdout, out.stderr);
        out.stdout
    }

    /// The path of a file inside the container, from the host.
    pub fn path(&self, p: &str) -> PathBuf {
        self.merged.join(p.trim_start_matches('/'))
    }

    /// Writes `catalog` to /root/NAME and runs `converge apply --detailed-exitcodes` on it
    /// with `args`.
    pub fn apply(&self, name: &str, catalog: &str, args: &[&str]) -> Out {
        self.apply_env(&[], name, catalog, args)
    }

    ///
    /// Every real run is held to an honest dry-run: a dry-run on the same state first, and
    /// the run must change exactly what it predicted (a predicted change may fail for real, as
    /// when another process holds the package lock), fail nowhere the dry-run did not, and
    /// report nothing `unplanned`.
    pub fn apply_env(&self, env: &[&str], name: &str, catalog: &str, args: &[&str]) -> Out {
        std::fs::write(self.path(&format!("/root/{name}")), catalog).unwrap();
        let file = format!("/root/{name}");
        let mut argv = vec!["/usr/local/bin/converge", "apply", file.as_str(), "--detailed-exitcodes"];
        argv.extend(args);
        if args.contains(&"--dry-run") {
            return self.run_env(env, &argv);
        }
        let mut dry_argv = argv.clone();
        dry_argv.extend(["--dry-run", "--format", "json"]);
        let dry = self.run_env(env, &dry_argv);
        let out = self.run_env(env, &argv);
        if out.stdout.starts_with("converge: ") {
            honest(&dry, &out);
        }
        out
    }

    /// Starts a command inside the container and leaves it running (it ends with the container).
    pub fn spawn(&self, argv: &[&str]) -> std::process::Child {
        Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a", "env", "-i"])
            .args(["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nsenter")
    }

    /// Offers the agent's packages of the flat repository `repo` ([`self_repo`]) to apt, as
    /// `/srv/self`, and installs `version` of them in place of the `converge` of this build.
    pub fn install_self(&self, repo: &Path, version: &str) {
        crate::copy_tree(repo, &self.path("/srv/self"));
        std::fs::write(self.path("/etc/apt/sources.list.d/self.list"), "deb [trusted=yes] file:/srv/self ./\n")
            .unwrap();
        self.sh(&format!(
            "rm -f /usr/local/bin/converge && apt-get update -q >/dev/null && \
             DEBIAN_FRONTEND=noninteractive apt-get install -y -q converge={version} >/dev/null"
        ));
    }

    /// Waits (60 s at most) until the agent's own upgrade has finished: its record written
    /// and its transient unit gone (so the run lock is free again).
    pub fn upgrade_finished(&self) {
        crate::eventually(Duration::from_secs(60), Duration::from_millis(300), || {
            let units = self.run(&[
                "systemctl",
                "list-units",
                "--no-legend",
                "--state=active,activating",
                "converge-upgrade-*",
            ]);
            let done = self.path("/var/lib/converge/upgrade.json").exists() && units.stdout.trim().is_empty();
            done.then_some(()).ok_or(format!("the upgrade has not finished: {}", units.stdout))
        });
    }

    /// Every path of the container's writable layer with its type, size, mode, owner and
    /// content hash: what a run changed, from the host.
    pub fn listing(&self) -> String {
        run_ok(Command::new("find").arg(self.dir.join("upper")).args(["-printf", "%P %y %s %m %U:%G %T@\n"]), "find")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(mut child) = self.nspawn.take() {
            // SIGTERM to nspawn shuts the container down; it is waited for, then killed.
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("umount").arg(&self.merged).status();
        if Command::new("mountpoint").arg("-q").arg(&self.merged).status().is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.merged).status();
        }
        for h in ["unified", "systemd"] {
            remove_cgroup(Path::new(&format!("/sys/fs/cgroup/{h}/{}", self.name)));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes a cgroup and its children, deepest first.
fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// A pair of network namespaces joined by a veth pair, made by the test and removed when
/// dropped: `a` has 10.X.Y.1/24, `b` 10.X.Y.2/24. Nothing is ever added to the host's own
/// network namespace.
pub struct NetPair {
    pub a: String,
    pub b: String,
    pub a_ip: String,
    pub b_ip: String,
}

impl NetPair {
    pub fn new(tag: &str) -> NetPair {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = std::process::id();
        let (a, b) = (format!("cv{tag}a-{id}-{n}"), format!("cv{tag}b-{id}-{n}"));
        let subnet = format!("10.{}.{}", 200 + (id % 50), (id / 50 % 200 + n as u32) % 250);
        let pair = NetPair { a_ip: format!("{subnet}.1"), b_ip: format!("{subnet}.2"), a, b };
        let ip = |args: &[&str]| run_ok(Command::new("ip").args(args), &format!("ip {}", args.join(" ")));
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        // Made inside a, its peer sent straight to b: the host's namespace never sees them.
        ip(&["-n", &pair.a, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", &pair.b]);
        ip(&["-n", &pair.a, "addr", "add", &format!("{}/24", pair.a_ip), "dev", "veth0"]);
        ip(&["-n", &pair.b, "addr", "add", &format!("{}/24", pair.b_ip), "dev", "veth1"]);
        for (ns, dev) in [(&pair.a, "veth0"), (&pair.b, "veth1")] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    /// A command to run in namespace `a`.
    pub fn in_a(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.a]).arg(program);
        c
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

/// Each resource's status in a dry-run's JSON Lines.
fn json_statuses(out: &Out) -> Vec<(String, String)> {
    out.stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "resource")
        .map(|v| {
            (v["status"].as_str().unwrap_or_default().to_string(), v["id"].as_str().unwrap_or_default().to_string())
        })
        .collect()
}

/// Each resource's status in a run's text output (`  STATUS      ID[: message]`).
fn text_statuses(out: &Out) -> Vec<(String, String)> {
    out.stdout
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   ") && l.len() > 15)
        .map(|l| {
            let status = l[2..14].trim().to_lowercase().replace(' ', "-");
            let id = l[15..].split(": ").next().unwrap_or_default().to_string();
            (status, id)
        })
        .collect()
}

/// Fails unless the run `real` did what the dry-run `dry` said it would.
fn honest(dry: &Out, real: &Out) {
    use std::collections::BTreeSet;
    let (dry_s, real_s) = (json_statuses(dry), text_statuses(real));
    let with = |v: &[(String, String)], s: &str| -> BTreeSet<String> {
        v.iter().filter(|(st, _)| st == s).map(|(_, id)| id.clone()).collect()
    };
    let (predicted, dry_failed) = (with(&dry_s, "would-change"), with(&dry_s, "failed"));
    let (changed, unplanned) = (with(&real_s, "changed"), with(&real_s, "unplanned"));
    // A predicted change may fail for real, or be skipped because one it depends on failed.
    let failed: BTreeSet<String> = with(&real_s, "failed").union(&with(&real_s, "skipped")).cloned().collect();
    let show = || format!("dry-run:\n{}{}\nrun:\n{}{}", dry.stdout, dry.stderr, real.stdout, real.stderr);
    assert!(unplanned.is_empty(), "changes the run did not plan: {unplanned:?}\n{}", show());
    assert!(
        changed.is_subset(&predicted),
        "changed, not predicted: {:?}\n{}",
        changed.difference(&predicted).collect::<Vec<_>>(),
        show()
    );
    let done: BTreeSet<String> = changed.union(&failed).cloned().collect();
    assert!(
        predicted.is_subset(&done),
        "predicted, not changed: {:?}\n{}",
        predicted.difference(&done).collect::<Vec<_>>(),
        show()
    );
    assert!(
        dry_failed.is_subset(&failed),
        "failed in the dry-run only: {:?}\n{}",
        dry_failed.difference(&failed).collect::<Vec<_>>(),
        show()
    );
}
