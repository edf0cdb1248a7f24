//! apt and dpkg (Debian, Ubuntu): what is installed is read from dpkg's status file (no
//! process); what the repositories offer is `apt-cache policy`; changes are `apt-get`, never
//! asking anything, keeping local configuration files, waiting a bounded time for the lock.

use super::{Available, Install, Installed, PackageTool};
use crate::catalog::RepositorySpec;
use crate::host::{Host, HostError, HostResult, Run};
use crate::providers::tool::{self, QUERY, TRANSACTION, ToolOptions, argv};
use std::cmp::Ordering;
use std::collections::HashMap;

pub struct Apt;

const STATUS: &str = "/var/lib/dpkg/status";

impl PackageTool for Apt {
    fn name(&self) -> &'static str {
        "apt"
    }

    fn serves(&self, family: &str) -> bool {
        family == "debian"
    }

    fn compare(&self, a: &str, b: &str) -> Ordering {
        crate::version::compare_deb(a, b)
    }

    fn offer_hint(&self, name: &str) -> String {
        format!("apt-cache policy {name}")
    }

    fn installed(&self, host: &dyn Host, names: &[&str]) -> HostResult<HashMap<String, Installed>> {
        let status = tool::read_text(host, STATUS)?
            .ok_or_else(|| HostError::Refused(format!("{STATUS} is missing: dpkg has no database here")))?;
        let all = parse_dpkg_status(&status);
        Ok(names.iter().filter_map(|n| Some((n.to_string(), all.get(*n)?.clone()))).collect())
    }

    fn available(
        &self,
        host: &dyn Host,
        names: &[&str],
        refresh: bool,
        opts: &ToolOptions,
    ) -> HostResult<HashMap<String, Available>> {
        if names.is_empty() {
            return Ok(HashMap::new());
        }
        if refresh {
            let mut a = argv(&["apt-get", "update", "-q"]);
            a.extend(options(opts));
            change(host, &a, opts)?;
        }
        let a = with_names(argv(&["apt-cache", "policy", "--"]), names);
        Ok(parse_apt_policy(&tool::query(host, &Run::new(&a, QUERY))?.stdout))
    }

    fn install(&self, host: &dyn Host, packages: &[Install], downgrade: bool, opts: &ToolOptions) -> HostResult<()> {
        change(host, &install_argv(packages, downgrade, opts), opts)
    }

    fn uninstall(&self, host: &dyn Host, names: &[&str], opts: &ToolOptions) -> HostResult<()> {
        let mut a = argv(&["apt-get", "remove", "-y", "-q"]);
        a.extend(options(opts));
        a.push("--".into());
        change(host, &with_names(a, names), opts)
    }

    fn repository_paths(&self, name: &str) -> [String; 2] {
        [format!("/etc/apt/keyrings/converge-{name}.asc"), format!("/etc/apt/sources.list.d/converge-{name}.sources")]
    }

    fn repository_files(&self, name: &str, r: &RepositorySpec) -> [String; 2] {
        let [key, _] = self.repository_paths(name);
        let mut sources = format!(
            "# Managed by converge (repository:{name}); edits are overwritten.\nTypes: deb\nURIs: {}\nSuites: {}\n",
            r.url.as_deref().unwrap_or_default(),
            r.suites.as_deref().unwrap_or_default().join(" ")
        );
        if let Some(c) = r.components.as_deref().filter(|c| !c.is_empty()) {
            sources.push_str(&format!("Components: {}\n", c.join(" ")));
        }
        sources.push_str(&format!("Signed-By: {key}\n"));
        if r.enabled == Some(false) {
            sources.push_str("Enabled: no\n");
        }
        [armored(r), sources]
    }

    fn refresh_repository(&self, host: &dyn Host, name: &str, opts: &ToolOptions) -> HostResult<()> {
        let [_, sources] = self.repository_paths(name);
        // This repository alone; the lists of the others are left as they are.
        let mut a = argv(&["apt-get", "update", "-q", "-o"]);
        a.push(format!("Dir::Etc::SourceList={sources}"));
        a.extend(argv(&[
            "-o",
            "Dir::Etc::SourceParts=-",
            "-o",
            "APT::Get::List-Cleanup=0",
            "-o",
            "APT::Update::Error-Mode=any",
        ]));
        a.extend(options(opts));
        change(host, &a, opts)
    }
}

/// The key as written to its file: its text, ending with a newline.
pub fn armored(r: &RepositorySpec) -> String {
    let key = r.key.as_deref().unwrap_or_default().trim_end();
    format!("{key}\n")
}

fn with_names(mut a: Vec<String>, names: &[&str]) -> Vec<String> {
    a.extend(names.iter().map(|n| n.to_string()));
    a
}

/// The `apt-get install` of one transaction.
pub fn install_argv(packages: &[Install], downgrade: bool, opts: &ToolOptions) -> Vec<String> {
    let mut a = argv(&["apt-get", "install", "-y", "-q"]);
    a.extend(options(opts));
    a.extend(argv(&["-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]));
    if downgrade {
        a.push("--allow-downgrades".into());
    }
    a.push("--".into());
    a.extend(packages.iter().map(|p| match &p.version {
        Some(v) => format!("{}={v}", p.name),
        None => p.name.clone(),
    }));
    a
}

/// Options for every apt call: never ask, wait a bounded time for the lock.
fn options(opts: &ToolOptions) -> Vec<String> {
    vec!["-o".into(), format!("DPkg::Lock::Timeout={}", opts.lock_timeout)]
}

/// Runs an apt change non-interactively; its lock message said plainly.
fn change(host: &dyn Host, a: &[String], opts: &ToolOptions) -> HostResult<()> {
    let env = [
        ("DEBIAN_FRONTEND".to_string(), "noninteractive".to_string()),
        ("APT_LISTCHANGES_FRONTEND".into(), "none".into()),
        ("NEEDRESTART_MODE".into(), "l".into()),
    ];
    match tool::check(host, &Run { env: &env, ..Run::new(a, TRANSACTION) }) {
        Ok(_) => Ok(()),
        Err(HostError::Command { output, .. }) if output.contains("Could not get lock") => {
            Err(HostError::Refused(format!(
                "the package database is locked by another process and stayed locked for {} s \
                 (CONVERGE_PACKAGE_LOCK_TIMEOUT): {}",
                opts.lock_timeout,
                output.lines().find(|l| l.contains("Could not get lock")).unwrap_or("").trim()
            )))
        }
        Err(e) => Err(e),
    }
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
    fn install_command_lines() {
        let opts = ToolOptions { lock_timeout: 7 };
        let p =
            [Install { name: "a".into(), version: None }, Install { name: "b".into(), version: Some("1:2".into()) }];
        assert_eq!(
            install_argv(&p, true, &opts).join(" "),
            "apt-get install -y -q -o DPkg::Lock::Timeout=7 -o Dpkg::Options::=--force-confdef \
             -o Dpkg::Options::=--force-confold --allow-downgrades -- a b=1:2"
        );
    }
}
