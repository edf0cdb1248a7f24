//! dnf and rpm (the RHEL family): what is installed is `rpm -q` (`--root DIR` under
//! `--root`), held packages are dnf's versionlock list, what the repositories offer is
//! `dnf repoquery`, changes are `dnf` (`--installroot DIR` under `--root`). Under `--root`
//! these run from the host, with the image's directory as an argument.

use super::{Available, Install, Installed, PackageTool};
use crate::catalog::RepositorySpec;
use crate::host::{Host, HostResult, Run};
use crate::providers::tool::{self, QUERY, TRANSACTION, ToolOptions, argv};
use std::cmp::Ordering;
use std::collections::HashMap;

pub struct Dnf;

impl PackageTool for Dnf {
    fn name(&self) -> &'static str {
        "dnf"
    }

    fn serves(&self, family: &str) -> bool {
        family == "redhat"
    }

    fn compare(&self, a: &str, b: &str) -> Ordering {
        crate::version::compare_rpm(a, b)
    }

    fn offer_hint(&self, name: &str) -> String {
        format!("dnf list --available {name}")
    }

    fn installed(&self, host: &dyn Host, names: &[&str]) -> HostResult<HashMap<String, Installed>> {
        if names.is_empty() {
            return Ok(HashMap::new());
        }
        let mut a = argv(&["rpm", "-q", "--qf", "%{NAME} %|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\\n"]);
        if let Some(root) = host.image_root() {
            a.splice(1..1, ["--root".to_string(), root]);
        }
        a.push("--".into());
        a.extend(names.iter().map(|n| n.to_string()));
        // rpm exits non-zero when any is missing: its output still says which.
        let out = tool::query(host, &Run { outside: true, ..Run::new(&a, QUERY) })?.stdout;
        let locks = parse_versionlock(&tool::read_text(host, "/etc/dnf/plugins/versionlock.list")?.unwrap_or_default());
        Ok(parse_rpm_query(&out)
            .into_iter()
            .map(|(n, v)| {
                let held = locks.iter().any(|l| l == &n);
                (n, Installed { version: v, held })
            })
            .collect())
    }

    fn available(
        &self,
        host: &dyn Host,
        names: &[&str],
        refresh: bool,
        _opts: &ToolOptions,
    ) -> HostResult<HashMap<String, Available>> {
        if names.is_empty() {
            return Ok(HashMap::new());
        }
        let base = root_args(host)?;
        if refresh {
            let mut m = base.clone();
            m.push("makecache".into());
            tool::check(host, &Run { outside: true, ..Run::new(&m, TRANSACTION) })?;
        }
        let mut a = base;
        a.extend(argv(&["repoquery", "--qf", "%{name} %{epoch}:%{version}-%{release}", "--"]));
        a.extend(names.iter().map(|n| n.to_string()));
        let ran = tool::checked_query(host, &Run { outside: true, ..Run::new(&a, QUERY) })?;
        Ok(parse_repoquery(&ran.stdout))
    }

    fn install(&self, host: &dyn Host, packages: &[Install], downgrade: bool, _opts: &ToolOptions) -> HostResult<()> {
        let mut a = root_args(host)?;
        a.push(if downgrade { "downgrade".into() } else { "install".into() });
        a.push("--".into());
        a.extend(packages.iter().map(|p| match &p.version {
            Some(v) => format!("{}-{}", p.name, v.split_once(':').map_or(v.as_str(), |(_, rest)| rest)),
            None => p.name.clone(),
        }));
        tool::check(host, &Run { outside: true, ..Run::new(&a, TRANSACTION) }).map(drop)
    }

    fn uninstall(&self, host: &dyn Host, names: &[&str], _opts: &ToolOptions) -> HostResult<()> {
        let mut a = root_args(host)?;
        a.extend(argv(&["remove", "--"]));
        a.extend(names.iter().map(|n| n.to_string()));
        tool::check(host, &Run { outside: true, ..Run::new(&a, TRANSACTION) }).map(drop)
    }

    fn repository_paths(&self, name: &str) -> [String; 2] {
        [format!("/etc/pki/rpm-gpg/RPM-GPG-KEY-converge-{name}"), format!("/etc/yum.repos.d/converge-{name}.repo")]
    }

    fn repository_files(&self, name: &str, r: &RepositorySpec) -> [String; 2] {
        let [key, _] = self.repository_paths(name);
        let repo = format!(
            "# Managed by converge (repository:{name}); edits are overwritten.\n[converge-{name}]\nname={name}\nbaseurl={}\nenabled={}\ngpgcheck=1\ngpgkey=file://{key}\n",
            r.url.as_deref().unwrap_or_default(),
            u8::from(r.enabled != Some(false))
        );
        [super::apt::armored(r), repo]
    }

    fn refresh_repository(&self, host: &dyn Host, name: &str, _opts: &ToolOptions) -> HostResult<()> {
        // The key goes into the rpm database now, as dnf would at the first install: under
        // `--root`, dnf reads `gpgkey` from the host, not the image, and could not.
        let [key, _] = self.repository_paths(name);
        let mut import = argv(&["rpm"]);
        if let Some(root) = host.image_root() {
            import.extend(["--root".to_string(), root.clone()]);
            import.extend(["--import".to_string(), "--".into(), format!("{root}{key}")]);
        } else {
            import.extend(["--import".to_string(), "--".into(), key]);
        }
        tool::check(host, &Run { outside: true, ..Run::new(&import, TRANSACTION) })?;
        let mut a = root_args(host)?;
        a.extend(argv(&["makecache", "--disablerepo=*"]));
        a.push(format!("--enablerepo=converge-{name}"));
        tool::check(host, &Run { outside: true, ..Run::new(&a, TRANSACTION) }).map(drop)
    }
}

/// `dnf` with the options of every call, and under `--root` the image as its install root
/// (whose release an image being built says in its os-release, having no release package
/// yet).
fn root_args(host: &dyn Host) -> HostResult<Vec<String>> {
    let mut a = argv(&["dnf", "-y", "-q", "--setopt=install_weak_deps=False"]);
    if let Some(root) = host.image_root() {
        a.push(format!("--installroot={root}"));
        let os = tool::read_text(host, "/etc/os-release")?.unwrap_or_default();
        if let Some(r) = tool::os_release_field(&os, "VERSION_ID") {
            a.push(format!("--releasever={r}"));
        }
    }
    Ok(a)
}

/// The names dnf's versionlock list holds (`name-[epoch:]version-release.arch` lines).
pub fn parse_versionlock(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            // The name is everything before the version.
            let l = l.trim_start_matches('!');
            let mut parts: Vec<&str> = l.rsplitn(3, '-').collect();
            parts.reverse();
            (parts.len() == 3).then(|| parts[0].to_string())
        })
        .collect()
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
        a.versions.sort_by(|x, y| crate::version::compare_rpm(y, x));
        a.candidate = a.versions.first().cloned();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn versionlock() {
        let text = "# added by dnf\nnginx-1:1.24.0-1.el9.x86_64\n!cvt-b-2.0-1.noarch\n\nbad\n";
        assert_eq!(parse_versionlock(text), vec!["nginx", "cvt-b"]);
    }
}
