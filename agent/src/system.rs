//! The system side of the real host: packages, accounts, units and commands.
//!
//! What can be read from files is read from files, inside the root, with no process: the dpkg
//! database, `/etc/passwd`, `/etc/group`, `/etc/shadow`, `login.defs`. Everything else is the
//! system's own tools, run inside the root (chrooted when it is not `/`):
//!
//! | what | tool |
//! | --- | --- |
//! | installed packages (Debian) | `/var/lib/dpkg/status`, read directly |
//! | installed packages (RHEL) | `rpm -q` (`--root DIR` under `--root`) |
//! | what repositories offer | `apt-cache policy` / `dnf repoquery` |
//! | install, remove | `apt-get` / `dnf` (`--installroot DIR` under `--root`) |
//! | accounts | `useradd`, `usermod`, `userdel`, `groupadd`, `groupmod`, `groupdel`, `chpasswd -e` |
//! | units | `systemctl show` (one call for all), `systemctl start/stop/restart/reload/enable/disable` |
//! | units in an image | unit files looked up in the root, `systemctl --root DIR is-enabled/enable/disable` |
//! | a failed unit's journal | `journalctl -u UNIT -n 20` |
//!
//! The parsers are pure functions, tested on captured output.

use crate::command::{self, Spec};
use crate::fs::Root;
use converge_modules::host::{
    Account, AccountOp, Accounts, Available, GroupEntry, HostError, HostResult, Install, Installed, PackageSystem, Ran,
    Run, Unit, UnitAction, UserFields,
};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

/// How long a query may take.
const QUERY: Duration = Duration::from_secs(120);
/// How long a package transaction may take.
const TRANSACTION: Duration = Duration::from_secs(1800);
/// How long an account or unit change may take (a unit's own start timeout comes first).
const CHANGE: Duration = Duration::from_secs(600);

/// Seconds apt and dnf wait for another package manager to let go of its lock
/// (`CONVERGE_PACKAGE_LOCK_TIMEOUT`) [120].
pub fn lock_timeout() -> u64 {
    std::env::var("CONVERGE_PACKAGE_LOCK_TIMEOUT").ok().and_then(|v| v.parse().ok()).unwrap_or(120)
}

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// The tools of one root.
pub struct Tools<'a> {
    pub root: &'a Root,
}

impl Tools<'_> {
    fn chroot(&self) -> Option<&Path> {
        (!self.root.is_slash()).then(|| self.root.path())
    }

    fn spec<'s>(&'s self, argv: &'s [String], timeout: Duration) -> Spec<'s> {
        Spec::new(argv, self.chroot(), timeout)
    }

    /// Runs a tool inside the root and demands success.
    fn check(
        &self,
        argv: &[String],
        timeout: Duration,
        env: &[(String, String)],
        stdin: Option<&[u8]>,
    ) -> HostResult<()> {
        command::check(&Spec { env, stdin, ..self.spec(argv, timeout) })
    }

    /// Runs a query inside the root; its standard output, or a failure.
    fn query(&self, argv: &[String]) -> HostResult<(Ran, String)> {
        command::capture(&self.spec(argv, QUERY))
    }

    /// Runs a tool from the host (`rpm --root`, `dnf --installroot`, `systemctl --root`).
    fn on_host(&self, argv: &[String], timeout: Duration) -> HostResult<(Ran, String)> {
        command::capture(&Spec::new(argv, None, timeout))
    }

    // ---- packages ----

    pub fn installed(&self, system: PackageSystem, names: &[&str]) -> HostResult<HashMap<String, Installed>> {
        match system {
            PackageSystem::Apt => {
                let status = self
                    .root
                    .read_to_string("/var/lib/dpkg/status")
                    .map_err(|e| HostError::io("read", "/var/lib/dpkg/status", e))?;
                let all = parse_dpkg_status(&status);
                Ok(names.iter().filter_map(|n| Some((n.to_string(), all.get(*n)?.clone()))).collect())
            }
            PackageSystem::Dnf => {
                if names.is_empty() {
                    return Ok(HashMap::new());
                }
                let mut a = argv(&["rpm", "-q", "--qf", "%{NAME} %|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\\n"]);
                if !self.root.is_slash() {
                    a.splice(1..1, ["--root".to_string(), self.root.path().display().to_string()]);
                }
                a.push("--".into());
                a.extend(names.iter().map(|n| n.to_string()));
                // rpm exits non-zero when any is missing: its output still says which.
                let (_, out) = self.on_host(&a, QUERY)?;
                let locks = self.dnf_locks();
                Ok(parse_rpm_query(&out)
                    .into_iter()
                    .map(|(n, v)| {
                        let held = locks.iter().any(|l| l == &n);
                        (n, Installed { version: v, held })
                    })
                    .collect())
            }
        }
    }

    /// Packages dnf's versionlock plugin holds.
    fn dnf_locks(&self) -> Vec<String> {
        let text = self.root.read_to_string("/etc/dnf/plugins/versionlock.list").unwrap_or_default();
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| {
                // name-[epoch:]version-release.arch: the name is everything before the version.
                let l = l.trim_start_matches('!');
                let mut parts: Vec<&str> = l.rsplitn(3, '-').collect();
                parts.reverse();
                (parts.len() == 3).then(|| parts[0].to_string())
            })
            .collect()
    }

    fn dnf_root_args(&self) -> Vec<String> {
        let mut a = argv(&["dnf", "-y", "-q", "--setopt=install_weak_deps=False"]);
        if !self.root.is_slash() {
            a.push(format!("--installroot={}", self.root.path().display()));
            // An image being built has no release package yet: its os-release says the release.
            let os = self.root.read_to_string("/etc/os-release").unwrap_or_default();
            let release =
                os.lines().find_map(|l| l.strip_prefix("VERSION_ID=")).map(|v| v.trim_matches('"').to_string());
            if let Some(r) = release {
                a.push(format!("--releasever={r}"));
            }
        }
        a
    }

    pub fn available(
        &self,
        system: PackageSystem,
        names: &[&str],
        refresh: bool,
    ) -> HostResult<HashMap<String, Available>> {
        if names.is_empty() {
            return Ok(HashMap::new());
        }
        match system {
            PackageSystem::Apt => {
                if refresh {
                    let mut a = argv(&["apt-get", "update", "-q"]);
                    a.extend(apt_options());
                    self.check(&a, TRANSACTION, &apt_env(), None).map_err(apt_error)?;
                }
                let mut a = argv(&["apt-cache", "policy", "--"]);
                a.extend(names.iter().map(|n| n.to_string()));
                let (_, out) = self.query(&a)?;
                Ok(parse_apt_policy(&out))
            }
            PackageSystem::Dnf => {
                let mut a = self.dnf_root_args();
                if refresh {
                    let mut m = a.clone();
                    m.push("makecache".into());
                    self.on_host(&m, TRANSACTION)?;
                }
                a.extend(argv(&["repoquery", "--qf", "%{name} %{epoch}:%{version}-%{release}", "--"]));
                a.extend(names.iter().map(|n| n.to_string()));
                let (ran, out) = self.on_host(&a, QUERY)?;
                if !ran.success() {
                    return Err(HostError::Command {
                        command: a.join(" "),
                        status: ran.describe(QUERY),
                        output: ran.tail,
                    });
                }
                Ok(parse_repoquery(&out))
            }
        }
    }

    pub fn install(&self, system: PackageSystem, packages: &[Install], downgrade: bool) -> HostResult<()> {
        match system {
            PackageSystem::Apt => {
                let mut a = argv(&["apt-get", "install", "-y", "-q"]);
                a.extend(apt_options());
                a.extend(argv(&["-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]));
                if downgrade {
                    a.push("--allow-downgrades".into());
                }
                a.push("--".into());
                a.extend(packages.iter().map(|p| match &p.version {
                    Some(v) => format!("{}={v}", p.name),
                    None => p.name.clone(),
                }));
                self.check(&a, TRANSACTION, &apt_env(), None).map_err(apt_error)
            }
            PackageSystem::Dnf => {
                let mut a = self.dnf_root_args();
                a.push(if downgrade { "downgrade".into() } else { "install".into() });
                a.push("--".into());
                a.extend(packages.iter().map(|p| match &p.version {
                    Some(v) => format!("{}-{}", p.name, v.split_once(':').map_or(v.as_str(), |(_, rest)| rest)),
                    None => p.name.clone(),
                }));
                command::check(&Spec::new(&a, None, TRANSACTION))
            }
        }
    }

    pub fn uninstall(&self, system: PackageSystem, names: &[&str]) -> HostResult<()> {
        match system {
            PackageSystem::Apt => {
                let mut a = argv(&["apt-get", "remove", "-y", "-q"]);
                a.extend(apt_options());
                a.push("--".into());
                a.extend(names.iter().map(|n| n.to_string()));
                self.check(&a, TRANSACTION, &apt_env(), None).map_err(apt_error)
            }
            PackageSystem::Dnf => {
                let mut a = self.dnf_root_args();
                a.extend(argv(&["remove", "--"]));
                a.extend(names.iter().map(|n| n.to_string()));
                command::check(&Spec::new(&a, None, TRANSACTION))
            }
        }
    }

    // ---- accounts ----

    pub fn accounts(&self) -> HostResult<Accounts> {
        let read = |p: &str| self.root.read_to_string(p).map_err(|e| HostError::io("read", p, e));
        let passwd = read("/etc/passwd")?;
        let group = read("/etc/group").unwrap_or_default();
        let shadow = self.root.read_to_string("/etc/shadow").unwrap_or_default();
        let defs = self.root.read_to_string("/etc/login.defs").unwrap_or_default();
        Ok(parse_accounts(&passwd, &group, &shadow, &defs))
    }

    pub fn change_account(&self, op: &AccountOp) -> HostResult<()> {
        let none: &[(String, String)] = &[];
        let (a, password) = account_argv(op);
        if let Some(a) = a {
            self.check(&a, CHANGE, none, None)?;
        }
        if let Some((name, hash)) = password {
            let input = format!("{name}:{hash}\n");
            // The hash goes on standard input: never in an argv anyone can read in /proc.
            self.check(&argv(&["chpasswd", "-e"]), CHANGE, none, Some(input.as_bytes())).map_err(|e| {
                HostError::Refused(format!("setting the password of {name} failed: {}", redact(&e, &hash)))
            })?;
        }
        Ok(())
    }

    // ---- units ----

    pub fn units(&self, names: &[&str]) -> HostResult<HashMap<String, Unit>> {
        if names.is_empty() {
            return Ok(HashMap::new());
        }
        let full: Vec<String> = names.iter().map(|n| unit_name(n)).collect();
        if !self.root.is_slash() {
            return self.image_units(names, &full);
        }
        let mut a = argv(&[
            "systemctl",
            "show",
            "--property=Id,LoadState,ActiveState,UnitFileState,CanReload,NeedDaemonReload",
            "--",
        ]);
        a.extend(full.iter().cloned());
        let (ran, out) = self.query(&a)?;
        if !ran.success() {
            return Err(HostError::Command { command: a.join(" "), status: ran.describe(QUERY), output: ran.tail });
        }
        let parsed = parse_systemctl_show(&out);
        Ok(names
            .iter()
            .zip(parsed.into_iter().chain(std::iter::repeat(Unit::default())))
            .map(|(n, u)| (n.to_string(), u))
            .collect())
    }

    /// Units of an image: their files, and what `systemctl --root` says of their enablement.
    fn image_units(&self, names: &[&str], full: &[String]) -> HostResult<HashMap<String, Unit>> {
        let dirs = ["/etc/systemd/system", "/run/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system"];
        let exists = |u: &str| dirs.iter().any(|d| self.root.read_to_string(&format!("{d}/{u}")).is_ok());
        let present: Vec<&String> = full.iter().filter(|u| exists(u)).collect();
        let mut states = HashMap::new();
        if !present.is_empty() {
            let mut a =
                vec!["systemctl".to_string(), format!("--root={}", self.root.path().display()), "is-enabled".into()];
            a.push("--".into());
            a.extend(present.iter().map(|u| u.to_string()));
            let (_, out) = self.on_host(&a, QUERY)?;
            for (u, state) in present.iter().zip(out.lines()) {
                states.insert(u.to_string(), state.trim().to_string());
            }
        }
        Ok(names
            .iter()
            .zip(full)
            .map(|(n, u)| {
                let unit = Unit {
                    exists: exists(u),
                    active: "inactive".into(),
                    enabled: states.get(u).cloned().unwrap_or_default(),
                    can_reload: false,
                    needs_daemon_reload: false,
                };
                (n.to_string(), unit)
            })
            .collect())
    }

    pub fn unit_action(&self, name: &str, action: UnitAction) -> HostResult<()> {
        self.check(&argv(&["systemctl", action.verb(), "--", name]), CHANGE, &[], None)
    }

    pub fn set_unit_enabled(&self, name: &str, enabled: bool) -> HostResult<()> {
        let verb = if enabled { "enable" } else { "disable" };
        if self.root.is_slash() {
            return self.check(&argv(&["systemctl", verb, "--", name]), CHANGE, &[], None);
        }
        let a = vec![
            "systemctl".into(),
            format!("--root={}", self.root.path().display()),
            verb.into(),
            "--".into(),
            name.into(),
        ];
        command::check(&Spec::new(&a, None, CHANGE))
    }

    pub fn daemon_reload(&self) -> HostResult<()> {
        self.check(&argv(&["systemctl", "daemon-reload"]), CHANGE, &[], None)
    }

    pub fn journal(&self, name: &str) -> String {
        let a = argv(&["journalctl", "-u", name, "-n", "20", "--no-pager", "-o", "short-iso"]);
        match self.query(&a) {
            Ok((_, out)) if !out.trim().is_empty() => format!("journal of {name}:\n{}", out.trim_end()),
            _ => String::new(),
        }
    }

    // ---- commands ----

    pub fn run(&self, cmd: &Run, accounts: impl FnOnce() -> HostResult<Accounts>) -> HostResult<Ran> {
        let user = match cmd.user {
            None => None,
            Some(name) => {
                let accounts = accounts()?;
                let Some(u) = accounts.user(name) else {
                    return Err(HostError::Refused(format!("user `{name}` does not exist on this system")));
                };
                let mut groups: Vec<u32> =
                    accounts.groups.iter().filter(|g| g.members.iter().any(|m| m == name)).map(|g| g.gid).collect();
                groups.push(u.gid);
                Some((u.uid, u.gid, groups, u.home.clone(), u.name.clone()))
            }
        };
        let spec = Spec { user, cwd: cmd.cwd, env: cmd.env, ..self.spec(cmd.argv, cmd.timeout) };
        command::execute(&spec)
    }
}

/// Options for every apt call: never ask, wait a bounded time for the lock.
fn apt_options() -> Vec<String> {
    vec!["-o".into(), format!("DPkg::Lock::Timeout={}", lock_timeout())]
}

fn apt_env() -> Vec<(String, String)> {
    vec![
        ("DEBIAN_FRONTEND".into(), "noninteractive".into()),
        ("APT_LISTCHANGES_FRONTEND".into(), "none".into()),
        ("NEEDRESTART_MODE".into(), "l".into()),
    ]
}

/// apt's lock message, said plainly.
fn apt_error(e: HostError) -> HostError {
    match &e {
        HostError::Command { output, .. } if output.contains("Could not get lock") => HostError::Refused(format!(
            "the package database is locked by another process and stayed locked for {} s \
             (CONVERGE_PACKAGE_LOCK_TIMEOUT): {}",
            lock_timeout(),
            output.lines().find(|l| l.contains("Could not get lock")).unwrap_or("").trim()
        )),
        _ => e,
    }
}

fn redact(e: &HostError, secret: &str) -> String {
    e.to_string().replace(secret, "(hidden)")
}

/// `nginx` is `nginx.service`.
pub fn unit_name(name: &str) -> String {
    if name.contains('.') { name.to_string() } else { format!("{name}.service") }
}

/// The shadow-utils command of an account change (none when only the password changes), and a
/// password to set after it.
pub fn account_argv(op: &AccountOp) -> (Option<Vec<String>>, Option<(String, String)>) {
    match op {
        AccountOp::AddGroup { name, gid, system } => {
            let mut a = argv(&["groupadd"]);
            if let Some(g) = gid {
                a.extend(["-g".into(), g.to_string()]);
            }
            if *system {
                a.push("-r".into());
            }
            a.extend(["--".into(), name.clone()]);
            (Some(a), None)
        }
        AccountOp::SetGid { name, gid } => (Some(argv(&["groupmod", "-g", &gid.to_string(), "--", name])), None),
        AccountOp::DelGroup { name } => (Some(argv(&["groupdel", "--", name])), None),
        AccountOp::AddUser(f) => {
            let mut a = argv(&["useradd"]);
            user_fields(&mut a, f);
            if f.system {
                a.push("-r".into());
            }
            // A home is made for people, and for system accounts that declare one.
            if !f.system || f.home.is_some() {
                a.push("-m".into());
            }
            a.extend(["--".into(), f.name.clone()]);
            (Some(a), f.password_hash.clone().map(|h| (f.name.clone(), h)))
        }
        AccountOp::ModUser(f) => {
            let mut a = argv(&["usermod"]);
            user_fields(&mut a, f);
            if f.append && f.groups.is_some() {
                a.push("-a".into());
            }
            a.extend(["--".into(), f.name.clone()]);
            // Only a password to change: no usermod at all.
            let password = f.password_hash.clone().map(|h| (f.name.clone(), h));
            ((a.len() > 3).then_some(a), password)
        }
        AccountOp::DelUser { name, remove_home } => {
            let mut a = argv(&["userdel"]);
            if *remove_home {
                a.push("-r".into());
            }
            a.extend(["--".into(), name.clone()]);
            (Some(a), None)
        }
    }
}

fn user_fields(a: &mut Vec<String>, f: &UserFields) {
    let mut opt = |flag: &str, v: Option<String>| {
        if let Some(v) = v {
            a.push(flag.to_string());
            a.push(v);
        }
    };
    opt("-u", f.uid.map(|u| u.to_string()));
    opt("-g", f.gid.clone());
    opt("-G", f.groups.as_ref().map(|g| g.join(",")));
    opt("-d", f.home.clone());
    opt("-s", f.shell.clone());
    opt("-c", f.comment.clone());
}

/// Installed packages from dpkg's status file: version and whether held.
pub fn parse_dpkg_status(text: &str) -> HashMap<String, Installed> {
    let mut out = HashMap::new();
    for stanza in text.split("\n\n") {
        let field = |k: &str| stanza.lines().find_map(|l| l.strip_prefix(k)).map(str::trim);
        let (Some(name), Some(status), Some(version)) = (field("Package:"), field("Status:"), field("Version:")) else {
            continue;
        };
        let words: Vec<&str> = status.split_whitespace().collect();
        if words.get(2) != Some(&"installed") {
            continue;
        }
        out.entry(name.to_string()).or_insert(Installed { version: version.to_string(), held: words[0] == "hold" });
    }
    out
}

/// `apt-cache policy A B ...`: each package's candidate and versions, newest first.
pub fn parse_apt_policy(text: &str) -> HashMap<String, Available> {
    let mut out: HashMap<String, Available> = HashMap::new();
    let mut current: Option<String> = None;
    let mut in_table = false;
    for line in text.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            let name = line.trim_end_matches(':');
            let name = name.split(':').next().unwrap_or(name).to_string();
            out.entry(name.clone()).or_default();
            current = Some(name);
            in_table = false;
            continue;
        }
        let Some(name) = &current else { continue };
        let t = line.trim();
        if let Some(c) = t.strip_prefix("Candidate:") {
            let c = c.trim();
            if c != "(none)"
                && let Some(a) = out.get_mut(name)
            {
                a.candidate = Some(c.to_string());
            }
        } else if t.starts_with("Version table:") {
            in_table = true;
        } else if in_table {
            // "*** 1.2-1 500" or "1.2-1 500" at 5 spaces; sources are indented further.
            let t = t.trim_start_matches("***").trim();
            let indent = line.len() - line.trim_start().len();
            let mut words = t.split_whitespace();
            if let (Some(v), Some(prio)) = (words.next(), words.next())
                && indent <= 5
                && prio.parse::<i32>().is_ok()
                && words.next().is_none()
                && let Some(a) = out.get_mut(name)
            {
                a.versions.push(v.to_string());
            }
        }
    }
    // A package only installed, from no repository, is not on offer.
    for a in out.values_mut() {
        if a.candidate.is_some() && a.versions.is_empty() {
            a.versions.push(a.candidate.clone().unwrap_or_default());
        }
    }
    out.retain(|_, a| a.candidate.is_some() || !a.versions.is_empty());
    out
}

/// `rpm -q --qf '%{NAME} VERSION\n' A B`: the installed ones ("package X is not installed"
/// lines are skipped).
pub fn parse_rpm_query(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with("package ") || !l.ends_with("is not installed"))
        .filter_map(|l| {
            let (name, version) = l.trim().split_once(' ')?;
            let version = version.strip_prefix("0:").unwrap_or(version);
            Some((name.to_string(), version.to_string()))
        })
        .collect()
}

/// `dnf repoquery --qf '%{name} %{epoch}:%{version}-%{release}'`: versions on offer, newest first.
pub fn parse_repoquery(text: &str) -> HashMap<String, Available> {
    let mut out: HashMap<String, Available> = HashMap::new();
    for l in text.lines() {
        let Some((name, version)) = l.trim().split_once(' ') else { continue };
        let version = version.strip_prefix("0:").unwrap_or(version).to_string();
        let a = out.entry(name.to_string()).or_default();
        if !a.versions.contains(&version) {
            a.versions.push(version);
        }
    }
    for a in out.values_mut() {
        a.versions.sort_by(|x, y| converge_modules::version::compare_rpm(y, x));
        a.candidate = a.versions.first().cloned();
    }
    out
}

/// `systemctl show --property=...` of several units: blocks separated by blank lines.
pub fn parse_systemctl_show(text: &str) -> Vec<Unit> {
    text.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let get = |k: &str| {
                block.lines().find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix('='))).unwrap_or("").trim()
            };
            Unit {
                exists: !matches!(get("LoadState"), "not-found" | ""),
                active: get("ActiveState").to_string(),
                enabled: get("UnitFileState").to_string(),
                can_reload: get("CanReload") == "yes",
                needs_daemon_reload: get("NeedDaemonReload") == "yes",
            }
        })
        .collect()
}

/// The account files, parsed.
pub fn parse_accounts(passwd: &str, group: &str, shadow: &str, login_defs: &str) -> Accounts {
    let fields = |l: &str| l.split(':').map(str::to_string).collect::<Vec<_>>();
    let hashes: HashMap<String, String> = shadow
        .lines()
        .filter_map(|l| {
            let f = fields(l);
            Some((f.first()?.clone(), f.get(1)?.clone()))
        })
        .collect();
    let users = passwd
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('+') && !l.starts_with('-'))
        .filter_map(|l| {
            let f = fields(l);
            Some(Account {
                name: f.first()?.clone(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                comment: f.get(4).cloned().unwrap_or_default(),
                home: f.get(5).cloned().unwrap_or_default(),
                shell: f.get(6).cloned().unwrap_or_default(),
                password_hash: hashes.get(f.first()?).cloned(),
            })
        })
        .collect();
    let groups = group
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('+') && !l.starts_with('-'))
        .filter_map(|l| {
            let f = fields(l);
            let members = f.get(3).map(|m| m.split(',').filter(|x| !x.is_empty()).map(str::to_string).collect());
            Some(GroupEntry {
                name: f.first()?.clone(),
                gid: f.get(2)?.parse().ok()?,
                members: members.unwrap_or_default(),
            })
        })
        .collect();
    let system_max = login_defs
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "SYS_UID_MAX").then(|| w.next()?.parse().ok())?
        })
        .unwrap_or(999);
    Accounts { users, groups, system_max }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status() {
        let text = "Package: a\nStatus: install ok installed\nVersion: 1.0-1\n\nPackage: b\nStatus: hold ok installed\nArchitecture: amd64\nVersion: 1:2.0\n\nPackage: c\nStatus: deinstall ok config-files\nVersion: 3\n";
        let p = parse_dpkg_status(text);
        assert_eq!(p["a"], Installed { version: "1.0-1".into(), held: false });
        assert_eq!(p["b"], Installed { version: "1:2.0".into(), held: true });
        assert!(!p.contains_key("c"), "config files left are not installed");
    }

    #[test]
    fn apt_policy() {
        let text = "nginx-light:\n  Installed: (none)\n  Candidate: 1.22.1-9\n  Version table:\n     1.22.1-9 500\n        500 file:/srv/repo ./ Packages\n     1.22.0-1 500\n        500 file:/srv/repo ./ Packages\ncvt-hello:\n  Installed: 1.0\n  Candidate: 2.0\n  Version table:\n     2.0 500\n        500 file:/srv/repo ./ Packages\n *** 1.0 100\n        100 /var/lib/dpkg/status\nlocal-only:\n  Installed: 1.0\n  Candidate: 1.0\n  Version table:\n *** 1.0 100\n        100 /var/lib/dpkg/status\n";
        let p = parse_apt_policy(text);
        assert_eq!(p["nginx-light"].candidate.as_deref(), Some("1.22.1-9"));
        assert_eq!(p["nginx-light"].versions, vec!["1.22.1-9", "1.22.0-1"]);
        assert_eq!(p["cvt-hello"].versions, vec!["2.0", "1.0"]);
        assert!(!p.contains_key("missing"));
    }

    #[test]
    fn rpm_and_repoquery() {
        let q = parse_rpm_query("cvt-a 1.0-1\npackage nope is not installed\ncvt-b 2:3.1-4\n");
        assert_eq!(q["cvt-a"], "1.0-1");
        assert_eq!(q["cvt-b"], "2:3.1-4");
        assert!(!q.contains_key("nope"));
        let r = parse_repoquery("cvt-a 0:1.0-1\ncvt-a 0:1.10-1\ncvt-a 0:1.9-1\n");
        assert_eq!(r["cvt-a"].versions, vec!["1.10-1", "1.9-1", "1.0-1"]);
        assert_eq!(r["cvt-a"].candidate.as_deref(), Some("1.10-1"));
    }

    #[test]
    fn systemctl_show() {
        let text = "Id=a.service\nLoadState=loaded\nActiveState=active\nUnitFileState=enabled\nCanReload=yes\nNeedDaemonReload=no\n\nId=nope.service\nLoadState=not-found\nActiveState=inactive\nUnitFileState=\nCanReload=no\nNeedDaemonReload=no\n";
        let u = parse_systemctl_show(text);
        assert_eq!(u.len(), 2);
        assert!(u[0].exists && u[0].can_reload && u[0].active == "active" && u[0].enabled == "enabled");
        assert!(!u[1].exists);
    }

    #[test]
    fn accounts() {
        let a = parse_accounts(
            "root:x:0:0:root:/root:/bin/bash\n# comment\nalice:x:1000:1000:Alice,,,:/home/alice:/bin/sh\n",
            "root:x:0:\nsudo:x:27:alice,bob\nalice:x:1000:\n",
            "root:*:19000:0:99999:7:::\nalice:$6$s$h:19000:0:99999:7:::\n",
            "# defaults\nSYS_UID_MAX   499\n",
        );
        assert_eq!(a.users.len(), 2);
        assert_eq!(a.user("alice").unwrap().password_hash.as_deref(), Some("$6$s$h"));
        assert_eq!(a.user("alice").unwrap().comment, "Alice,,,");
        assert_eq!(a.groups_of("alice"), vec!["sudo"]);
        assert_eq!(a.system_max, 499);
    }

    #[test]
    fn account_commands() {
        let (a, pw) = account_argv(&AccountOp::AddUser(UserFields {
            name: "deploy".into(),
            uid: Some(2000),
            groups: Some(vec!["sudo".into(), "adm".into()]),
            shell: Some("/bin/bash".into()),
            password_hash: Some("$6$x$y".into()),
            ..UserFields::default()
        }));
        let a = a.unwrap();
        assert_eq!(a.join(" "), "useradd -u 2000 -G sudo,adm -s /bin/bash -m -- deploy");
        assert_eq!(pw, Some(("deploy".into(), "$6$x$y".into())));
        assert!(!a.iter().any(|w| w.contains("$6$")), "the hash never goes into argv");
        let (a, _) = account_argv(&AccountOp::ModUser(UserFields {
            name: "deploy".into(),
            groups: Some(vec!["adm".into()]),
            append: true,
            ..UserFields::default()
        }));
        assert_eq!(a.unwrap().join(" "), "usermod -G adm -a -- deploy");
        let (a, pw) = account_argv(&AccountOp::ModUser(UserFields {
            name: "deploy".into(),
            password_hash: Some("h".into()),
            ..UserFields::default()
        }));
        assert_eq!((a, pw.is_some()), (None, true));
        let (a, _) = account_argv(&AccountOp::AddGroup { name: "ops".into(), gid: Some(2001), system: true });
        assert_eq!(a.unwrap().join(" "), "groupadd -g 2001 -r -- ops");
    }
}
