//! `package`: installed, a version, the latest, or absent, through the package tool of the
//! host's family: [`apt`] (Debian, Ubuntu) or [`dnf`] (the RHEL family). A new package
//! manager is one new file implementing [`PackageTool`] and one entry in [`TOOLS`].
//!
//! One query of the package database answers every package of a run; what the repositories
//! offer is asked (once, for all) only when some package needs it: not installed, `latest`, or
//! a version. Every package that needs a change when the engine reaches the first of them goes
//! into one transaction; when that transaction fails, each is tried alone so that the failure
//! lands on the package that caused it.

use super::tool::ToolOptions;
use super::{Checked, Op, System, fail};
use crate::catalog::{PackageSpec, RepositorySpec, Resource};
use crate::host::{Host, HostResult};
use crate::providers::ProviderError;
use crate::report::Change;
use crate::version::{best_match, matches};
use std::cmp::Ordering;
use std::collections::HashMap;

pub mod apt;
pub mod dnf;

/// A package as the package database has it installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The full version (with its epoch when it has one).
    pub version: String,
    /// Held (dpkg `hold`, dnf versionlock): converge never changes it.
    pub held: bool,
}

/// What the configured repositories offer of a package.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Available {
    /// What an install or upgrade would take.
    pub candidate: Option<String>,
    /// Every version on offer, newest first.
    pub versions: Vec<String>,
}

/// One package to install, at its candidate version or at `version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Install {
    pub name: String,
    pub version: Option<String>,
}

/// A package manager: how packages are asked about and changed on a family of systems. Its
/// command lines and the parsing of their output live in its module, tested on captured
/// output; it reaches the system only through [`Host`].
pub trait PackageTool: Sync {
    /// `apt`, `dnf`.
    fn name(&self) -> &'static str;
    /// Whether it manages the packages of this os-release family (`debian`, `redhat`).
    fn serves(&self, family: &str) -> bool;
    /// How versions compare on its systems.
    fn compare(&self, a: &str, b: &str) -> Ordering;
    /// The command that shows an operator what the repositories offer of `name`.
    fn offer_hint(&self, name: &str) -> String;
    /// The installed packages among `names`, in one query.
    fn installed(&self, host: &dyn Host, names: &[&str]) -> HostResult<HashMap<String, Installed>>;
    /// What the repositories offer of `names`, in one query; with `refresh`, the package
    /// lists are brought up to date first.
    fn available(
        &self,
        host: &dyn Host,
        names: &[&str],
        refresh: bool,
        opts: &ToolOptions,
    ) -> HostResult<HashMap<String, Available>>;
    /// Installs (or upgrades, or downgrades with `downgrade`) in one transaction, keeping
    /// local configuration files and never asking anything.
    fn install(&self, host: &dyn Host, packages: &[Install], downgrade: bool, opts: &ToolOptions) -> HostResult<()>;
    /// Removes in one transaction.
    fn uninstall(&self, host: &dyn Host, names: &[&str], opts: &ToolOptions) -> HostResult<()>;
    /// The files repository `name` is kept in: its key, then its definition.
    fn repository_paths(&self, name: &str) -> [String; 2];
    /// Their contents, for `r` (pure).
    fn repository_files(&self, name: &str, r: &RepositorySpec) -> [String; 2];
    /// Fetches the package lists of repository `name` alone: proves its address and its
    /// signature, and makes its packages known.
    fn refresh_repository(&self, host: &dyn Host, name: &str, opts: &ToolOptions) -> HostResult<()>;
}

/// Every package manager of this build.
pub const TOOLS: &[&dyn PackageTool] = &[&apt::Apt, &dnf::Dnf];

/// Why a host has no package manager converge can drive.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoPackageTool {
    #[error("cannot read os-release: {0}")]
    Unreadable(String),
    #[error("{root}/etc/os-release does not say which system this is: converge cannot choose apt or dnf")]
    Unknown { root: String },
    #[error("converge manages packages with apt (Debian, Ubuntu) or dnf (the RHEL family), not on a {0} system")]
    Unsupported(String),
}

/// The package manager of `host`, by the family its os-release names, or why there is none.
pub fn tool_of(host: &dyn Host) -> Result<&'static dyn PackageTool, NoPackageTool> {
    let os = super::tool::os_release(host).map_err(|e| NoPackageTool::Unreadable(e.to_string()))?;
    let family = os.as_deref().and_then(super::tool::os_family);
    let Some(family) = family else {
        return Err(NoPackageTool::Unknown { root: host.image_root().unwrap_or_default() });
    };
    TOOLS.iter().copied().find(|t| t.serves(family)).ok_or_else(|| NoPackageTool::Unsupported(family.to_string()))
}

/// The agent's own package: managed like any (never removed: that would cut the host off),
/// but on a live system changed only after the run's report, detached from the running agent.
pub const AGENT: &str = "converge";

/// Whether `r` is the agent's own package, changed after the run on this host.
pub fn deferred(sys: &System, r: &Resource) -> bool {
    matches!(r.spec, crate::catalog::Spec::Package(_)) && r.id.title == AGENT && sys.self_upgrade_after_run
}

/// Defers the change to the agent's own package until after the run's report.
pub fn apply_deferred(sys: &System, state: &Checked) -> Result<Option<String>, ProviderError> {
    match &state.op {
        Op::Install(i) => {
            *sys.deferred_upgrade.borrow_mut() = Some(i.clone());
            let to = i.version.as_deref().unwrap_or("the newest version");
            Ok(Some(format!("the agent is upgraded to {to} after this run's report, detached from it")))
        }
        _ => Err("converge never removes its own package".into()),
    }
}

/// What `ensure` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want<'a> {
    Present,
    Absent,
    Latest,
    Version(&'a str),
}

pub fn want(p: &PackageSpec) -> Want<'_> {
    match p.ensure.as_deref() {
        None | Some("present" | "installed") => Want::Present,
        Some("absent" | "purged") => Want::Absent,
        Some("latest") => Want::Latest,
        Some(v) => Want::Version(v),
    }
}

/// Whether deciding needs what the repositories offer.
pub fn needs_available(want: &Want, installed: Option<&Installed>, system: &dyn PackageTool) -> bool {
    match want {
        Want::Absent => false,
        Want::Present => installed.is_none(),
        Want::Latest => true,
        Want::Version(v) => installed.is_none_or(|i| !matches(&i.version, v, |a, b| system.compare(a, b))),
    }
}

/// What to do, from what is installed and what is on offer. Pure.
pub fn diff(
    name: &str,
    p: &PackageSpec,
    installed: Option<&Installed>,
    available: Option<&Available>,
    system: &dyn PackageTool,
) -> Result<(Vec<Change>, Op), ProviderError> {
    let compare = |a: &str, b: &str| system.compare(a, b);
    let have = installed.map_or("absent", |i| i.version.as_str());
    let none_on_offer = || {
        let ask = system.offer_hint(name);
        format!("no package `{name}` in the configured repositories (`{ask}` shows what they offer)")
    };
    let install = |version: &str, pinned: bool| {
        let change = Change::new(if installed.is_some() { "version" } else { "ensure" }, have, version);
        let op = Op::Install(Install { name: name.to_string(), version: pinned.then(|| version.to_string()) });
        Ok((vec![change], op))
    };
    match want(p) {
        Want::Absent => match installed {
            Some(i) => Ok((vec![Change::new("ensure", i.version.as_str(), "absent")], Op::Remove(name.to_string()))),
            None => Ok((vec![], Op::None)),
        },
        Want::Present => match (installed, available.and_then(|a| a.candidate.as_deref())) {
            (Some(_), _) => Ok((vec![], Op::None)),
            (None, Some(candidate)) => install(candidate, false),
            (None, None) => Err(none_on_offer().into()),
        },
        Want::Latest => match (installed, available.and_then(|a| a.candidate.as_deref())) {
            (Some(i), Some(c)) if compare(c, &i.version).is_gt() => install(c, true),
            (Some(_), _) => Ok((vec![], Op::None)),
            (None, Some(c)) => install(c, false),
            (None, None) => Err(none_on_offer().into()),
        },
        Want::Version(pattern) => {
            if installed.is_some_and(|i| matches(&i.version, pattern, compare)) {
                return Ok((vec![], Op::None));
            }
            let versions = available.map(|a| a.versions.as_slice()).unwrap_or_default();
            let Some(target) = best_match(versions, pattern, compare) else {
                if versions.is_empty() {
                    return Err(none_on_offer().into());
                }
                return Err(format!(
                    "no version of `{name}` matches {pattern} in the configured repositories (they offer {})",
                    versions.join(", ")
                )
                .into());
            };
            if let Some(i) = installed
                && compare(target, &i.version).is_lt()
                && p.allow_downgrade != Some(true)
            {
                return Err(format!(
                    "`{name}` {} is installed and {pattern} means a downgrade to {target}: set `allow_downgrade: true` to allow it",
                    i.version
                ).into());
            }
            install(target, true)
        }
    }
}

/// Inspects and diffs a package from the run's queries.
pub fn check(sys: &System, r: &Resource, p: &PackageSpec) -> Result<(Checked, Vec<Change>), ProviderError> {
    let system = sys.package_tool()?;
    let name = r.id.title.as_str();
    let installed = sys.installed(name)?;
    let available =
        if needs_available(&want(p), installed.as_ref(), system) { sys.available(name, system)? } else { None };
    let (changes, op) = match diff(name, p, installed.as_ref(), available.as_ref(), system) {
        // A dry-run does not refresh the package lists, which the run does when a package is
        // not on offer: say what the run would try.
        Err(_) if sys.dry() && installed.is_none() && available.as_ref().is_none_or(|a| a.versions.is_empty()) => {
            let to = match want(p) {
                Want::Version(v) => v.to_string(),
                _ => "present".to_string(),
            };
            let change =
                Change::new("ensure", "absent", format!("{to} (not on offer before the package lists are refreshed)"));
            (vec![change], Op::Install(Install { name: name.to_string(), version: None }))
        }
        other => other?,
    };
    let held = installed
        .as_ref()
        .filter(|i| i.held && !changes.is_empty())
        .map(|i| format!("{name} {} is held on this system; converge never changes a held package", i.version));
    Ok((Checked { op, held, ..Checked::default() }, changes))
}

/// Installs and removes every package of `items` in one transaction each; when one fails,
/// every package of it is tried alone. One result per item.
pub fn apply_all(sys: &System, items: &[(&Resource, &Checked)]) -> Vec<Result<Option<String>, ProviderError>> {
    let installs: Vec<(usize, &Install)> = items
        .iter()
        .enumerate()
        .filter_map(|(k, (_, c))| match &c.op {
            Op::Install(i) => Some((k, i)),
            _ => None,
        })
        .collect();
    let removals: Vec<(usize, &str)> = items
        .iter()
        .enumerate()
        .filter_map(|(k, (_, c))| match &c.op {
            Op::Remove(n) => Some((k, n.as_str())),
            _ => None,
        })
        .collect();
    let mut results: Vec<Result<Option<String>, ProviderError>> = (0..items.len()).map(|_| Ok(None)).collect();
    let downgrade = |ks: &[usize]| {
        ks.iter()
            .any(|&k| matches!(&items[k].0.spec, crate::catalog::Spec::Package(p) if p.allow_downgrade == Some(true)))
    };
    if !installs.is_empty() {
        let all: Vec<Install> = installs.iter().map(|(_, i)| (*i).clone()).collect();
        let ks: Vec<usize> = installs.iter().map(|(k, _)| *k).collect();
        let install = |p: &[Install], downgrade: bool| match sys.package_tool() {
            Ok(t) => t.install(sys.host, p, downgrade, &sys.tools).map_err(fail),
            Err(e) => Err(e),
        };
        if let Err(e) = install(&all, downgrade(&ks)) {
            if installs.len() == 1 {
                results[installs[0].0] = Err(e);
            } else {
                for (k, i) in &installs {
                    results[*k] = install(std::slice::from_ref(*i), downgrade(&[*k])).map(|()| None);
                }
            }
        }
    }
    if !removals.is_empty() {
        let names: Vec<&str> = removals.iter().map(|(_, n)| *n).collect();
        let uninstall = |n: &[&str]| match sys.package_tool() {
            Ok(t) => t.uninstall(sys.host, n, &sys.tools).map_err(fail),
            Err(e) => Err(e),
        };
        if let Err(e) = uninstall(&names) {
            if removals.len() == 1 {
                results[removals[0].0] = Err(e);
            } else {
                for (k, n) in &removals {
                    results[*k] = uninstall(&[n]).map(|()| None);
                }
            }
        }
    }
    // Install scripts make accounts, units and files: all of it is read again.
    sys.forget_system();
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::memory::MemHost;
    use crate::providers::{converge_live, converge_yaml};
    use crate::report::Status;

    fn spec(ensure: &str) -> PackageSpec {
        PackageSpec { ensure: Some(ensure.into()), allow_downgrade: None }
    }

    fn inst(v: &str) -> Installed {
        Installed { version: v.into(), held: false }
    }

    fn offer(versions: &[&str]) -> Available {
        Available {
            candidate: versions.first().map(|v| v.to_string()),
            versions: versions.iter().map(|v| v.to_string()).collect(),
        }
    }

    mod pure {
        use super::*;
        const APT: &dyn PackageTool = &apt::Apt;

        #[test]
        fn present_absent_latest() {
            let (c, op) = diff("x", &spec("present"), None, Some(&offer(&["1.2-1"])), APT).unwrap();
            assert_eq!(c, vec![Change::new("ensure", "absent", "1.2-1")]);
            assert_eq!(op, Op::Install(Install { name: "x".into(), version: None }));
            assert!(diff("x", &spec("present"), Some(&inst("1.0")), None, APT).unwrap().0.is_empty());
            let (c, op) = diff("x", &spec("absent"), Some(&inst("1.0")), None, APT).unwrap();
            assert_eq!(c, vec![Change::new("ensure", "1.0", "absent")]);
            assert_eq!(op, Op::Remove("x".into()));
            let (c, _) =
                diff("x", &spec("latest"), Some(&inst("1.0-1")), Some(&offer(&["1.1-1", "1.0-1"])), APT).unwrap();
            assert_eq!(c, vec![Change::new("version", "1.0-1", "1.1-1")]);
            assert!(
                diff("x", &spec("latest"), Some(&inst("1.1-1")), Some(&offer(&["1.1-1"])), APT).unwrap().0.is_empty()
            );
        }

        #[test]
        fn versions_and_downgrades() {
            let offered = offer(&["1.25.0-1", "1.24.2-1", "1.24.0-1"]);
            let (c, op) = diff("x", &spec("1.24.*"), None, Some(&offered), APT).unwrap();
            assert_eq!(c, vec![Change::new("ensure", "absent", "1.24.2-1")]);
            assert_eq!(op, Op::Install(Install { name: "x".into(), version: Some("1.24.2-1".into()) }));
            assert!(diff("x", &spec("1.24.*"), Some(&inst("1.24.0-1")), None, APT).unwrap().0.is_empty());
            let e = diff("x", &spec("1.24.*"), Some(&inst("1.25.0-1")), Some(&offered), APT).unwrap_err().to_string();
            assert!(e.contains("downgrade to 1.24.2-1: set `allow_downgrade: true`"), "{e}");
            let mut allowed = spec("1.24.*");
            allowed.allow_downgrade = Some(true);
            let (c, _) = diff("x", &allowed, Some(&inst("1.25.0-1")), Some(&offered), APT).unwrap();
            assert_eq!(c, vec![Change::new("version", "1.25.0-1", "1.24.2-1")]);
            let e = diff("x", &spec("2.*"), None, Some(&offered), APT).unwrap_err().to_string();
            assert!(
                e.contains("no version of `x` matches 2.* in the configured repositories (they offer 1.25.0-1"),
                "{e}"
            );
        }

        #[test]
        fn nothing_on_offer_is_an_error_naming_the_tool() {
            let e = diff("nope", &spec("present"), None, None, APT).unwrap_err().to_string();
            assert_eq!(
                e,
                "no package `nope` in the configured repositories (`apt-cache policy nope` shows what they offer)"
            );
        }
    }

    #[test]
    fn one_query_one_transaction_and_a_silent_no_op() {
        let host = MemHost::new()
            .with_dir("/etc", 0o755)
            .with_installed("base", "1.0", false)
            .with_available("a", &["1.0"])
            .with_available("b", &["2.0"])
            .with_available("c", &["3.0"]);
        let yaml =
            "  - package: base\n  - package: a\n  - package: b\n  - file: /etc/x\n    content: x\n  - package: c\n";
        let events = converge_yaml(&host, yaml, false);
        let statuses: Vec<_> = events.iter().map(|e| (e.id.as_str(), e.status.clone())).collect();
        assert_eq!(
            statuses,
            vec![
                ("package:base", Status::Unchanged),
                ("package:a", Status::Changed),
                ("package:b", Status::Changed),
                ("file:/etc/x", Status::Changed),
                ("package:c", Status::Changed)
            ]
        );
        // What is installed is read from dpkg's status file: no process at all.
        let p = host.processes();
        let installs: Vec<&String> = p.iter().filter(|x| x.starts_with("apt-get install")).collect();
        assert_eq!(installs.len(), 1, "one transaction: {p:?}");
        assert!(installs[0].ends_with(" -- a b c"), "{p:?}");
        assert_eq!(
            p.iter().filter(|x| x.starts_with("apt-cache policy")).collect::<Vec<_>>(),
            ["apt-cache policy -- a b c"]
        );
        assert_eq!(host.installed_version("c").as_deref(), Some("3.0"));
        let before = host.processes().len();
        let again = converge_yaml(&host, yaml, false);
        assert!(again.iter().all(|e| e.status == Status::Unchanged), "{again:?}");
        assert_eq!(host.processes()[before..], [] as [String; 0], "a no-op runs no process");
    }

    #[test]
    fn a_missing_package_fails_alone_and_the_rest_install() {
        let host = MemHost::new().with_dir("/etc", 0o755).with_available("a", &["1.0"]).with_available("b", &["1.0"]);
        let yaml = "  - package: a\n  - package: nope\n  - package: b\n  - file: /etc/after-nope\n    content: x\n    requires: [package:nope]\n";
        let events = converge_yaml(&host, yaml, false);
        let by = |id: &str| events.iter().find(|e| e.id == id).unwrap();
        assert_eq!(by("package:a").status, Status::Changed);
        assert_eq!(by("package:b").status, Status::Changed);
        assert_eq!(by("package:nope").status, Status::Failed);
        assert!(by("package:nope").message.as_deref().unwrap().contains("no package `nope`"));
        assert_eq!(by("file:/etc/after-nope").status, Status::Skipped);
    }

    #[test]
    fn a_failed_transaction_is_retried_package_by_package() {
        // `b` is on offer when asked but cannot be installed: the whole transaction fails.
        let host = MemHost::new().with_available("a", &["1.0"]).with_available("b", &["1.0"]);
        let host = host.with_available("c", &["1.0"]);
        let yaml = "  - package: a\n  - package: b\n    ensure: \"1.0\"\n  - package: c\n";
        // Make b's pinned version disappear between the query and the install.
        let events = {
            let loaded = crate::load::load("t.yaml", &format!("format: 1\nresources:\n{yaml}"), None).unwrap();
            let sys = System::new(&host, &loaded.catalog.resources);
            let items: Vec<(&Resource, Checked)> = loaded
                .catalog
                .resources
                .iter()
                .map(|r| {
                    let mut c = Checked::default();
                    let version = if r.id.title == "b" { Some("9.9".to_string()) } else { None };
                    c.op = Op::Install(Install { name: r.id.title.clone(), version });
                    (r, c)
                })
                .collect();
            let refs: Vec<(&Resource, &Checked)> = items.iter().map(|(r, c)| (*r, c)).collect();
            apply_all(&sys, &refs)
        };
        assert!(events[0].is_ok() && events[2].is_ok(), "{events:?}");
        assert!(
            events[1].as_ref().unwrap_err().to_string().contains("Version '9.9' for 'b' was not found"),
            "{events:?}"
        );
        let installs: Vec<String> = host
            .processes()
            .into_iter()
            .filter_map(|p| p.strip_prefix("apt-get install").map(|p| p.rsplit(" -- ").next().unwrap().to_string()))
            .collect();
        assert_eq!(installs, vec!["a b=9.9 c", "a", "b=9.9", "c"]);
    }

    #[test]
    fn held_packages_are_reported_and_never_changed() {
        let host = MemHost::new().with_installed("pinned", "1.0-1", true).with_available("pinned", &["1.0-1", "2.0-1"]);
        let events = converge_yaml(&host, "  - package: pinned\n    ensure: latest\n", false);
        assert_eq!(events[0].status, Status::Held);
        assert!(events[0].message.as_deref().unwrap().contains("held"), "{events:?}");
        assert_eq!(host.installed_version("pinned").as_deref(), Some("1.0-1"));
    }

    #[test]
    fn dry_run_installs_nothing() {
        let host = MemHost::new().with_available("a", &["1.0"]).with_installed("gone", "1.0", false);
        let events = converge_yaml(&host, "  - package: a\n  - package: gone\n    ensure: absent\n", true);
        assert!(events.iter().all(|e| e.status == Status::WouldChange), "{events:?}");
        assert_eq!(host.mutations(), 0);
        assert!(host.installed_version("a").is_none());
    }

    #[test]
    fn the_agents_own_package_is_upgraded_after_the_run_on_a_live_host() {
        let catalog = "  - package: converge\n    ensure: \"0.2.0-1\"\n  - package: a\n";
        let host = || {
            MemHost::new()
                .with_installed("converge", "0.1.0-1", false)
                .with_available("converge", &["0.1.0-1", "0.2.0-1"])
                .with_available("a", &["1.0"])
        };
        let live = host();
        let (events, deferred) = converge_live(&live, catalog, false, true);
        assert_eq!(events[0].status, Status::Changed, "{events:?}");
        assert!(events[0].message.as_deref().unwrap().contains("after this run's report"), "{events:?}");
        assert_eq!(live.installed_version("converge").as_deref(), Some("0.1.0-1"), "not during the run");
        assert_eq!(deferred.and_then(|d| d.version).as_deref(), Some("0.2.0-1"));
        assert_eq!(live.installed_version("a").as_deref(), Some("1.0"), "the rest converges as ever");
        let installs: Vec<String> = live.processes().into_iter().filter(|p| p.starts_with("apt-get install")).collect();
        assert_eq!(installs.len(), 1, "{installs:?}");
        assert!(installs[0].ends_with("-- a"), "never in a transaction of the run: {installs:?}");
        // A dry-run says it would change, and defers nothing.
        let (events, deferred) = converge_live(&host(), catalog, true, true);
        assert_eq!(events[0].status, Status::WouldChange);
        assert!(deferred.is_none());
        // In an image (no agent running in it) it is installed like any package.
        let image =
            MemHost::new().with_installed("converge", "0.1.0-1", false).with_available("converge", &["0.2.0-1"]);
        let (events, deferred) = converge_live(&image, "  - package: converge\n    ensure: latest\n", false, false);
        assert_eq!(events[0].status, Status::Changed);
        assert!(deferred.is_none());
        assert_eq!(image.installed_version("converge").as_deref(), Some("0.2.0-1"));
    }

    #[test]
    fn the_agents_own_package_is_never_removed() {
        let e = crate::load::load("t.yaml", "format: 1\nresources:\n  - package: converge\n    ensure: absent\n", None)
            .unwrap_err();
        assert!(e.render(None).contains("never removes its own package"), "{}", e.render(None));
    }
}
