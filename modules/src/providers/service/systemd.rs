//! systemd: one `systemctl show` answers for every unit of a run; changes are `systemctl
//! start|stop|restart|reload|enable|disable` and `daemon-reload`; a failure carries the end of
//! `journalctl -u`. In an image (`--root`) nothing runs: unit files are looked up in the root
//! and `systemctl --root DIR is-enabled|enable|disable` runs from the host.

use super::{Unit, UnitAction, unit_name};
use crate::host::{Host, HostResult, Run};
use crate::providers::tool::{self, CHANGE, QUERY, argv};
use std::collections::HashMap;

/// Where unit files live, in the order systemd reads them.
const UNIT_FILE_DIRS: &[&str] =
    &["/etc/systemd/system", "/run/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system"];

/// The state of `names` (unit names, `.service` implied), in one query.
pub fn units(host: &dyn Host, names: &[&str]) -> HostResult<HashMap<String, Unit>> {
    if names.is_empty() {
        return Ok(HashMap::new());
    }
    let full: Vec<String> = names.iter().map(|n| unit_name(n)).collect();
    if let Some(root) = host.image_root() {
        return image_units(host, &root, names, &full);
    }
    let mut a = argv(&[
        "systemctl",
        "show",
        "--property=Id,LoadState,ActiveState,UnitFileState,CanReload,NeedDaemonReload",
        "--",
    ]);
    a.extend(full.iter().cloned());
    let out = tool::checked_query(host, &Run::new(&a, QUERY))?.stdout;
    let parsed = parse_systemctl_show(&out);
    Ok(names
        .iter()
        .zip(parsed.into_iter().chain(std::iter::repeat(Unit::default())))
        .map(|(n, u)| (n.to_string(), u))
        .collect())
}

/// Units of an image: their files, and what `systemctl --root` says of their enablement.
fn image_units(host: &dyn Host, root: &str, names: &[&str], full: &[String]) -> HostResult<HashMap<String, Unit>> {
    let mut exists = HashMap::new();
    for u in full {
        let mut found = false;
        for d in UNIT_FILE_DIRS {
            if host.stat(&format!("{d}/{u}"))?.is_some() {
                found = true;
                break;
            }
        }
        exists.insert(u.as_str(), found);
    }
    let present: Vec<&String> = full.iter().filter(|u| exists[u.as_str()]).collect();
    let mut states = HashMap::new();
    if !present.is_empty() {
        let mut a = vec!["systemctl".to_string(), format!("--root={root}"), "is-enabled".into(), "--".into()];
        a.extend(present.iter().map(|u| u.to_string()));
        // is-enabled exits non-zero when one is disabled: its lines still say each.
        let out = tool::query(host, &Run { outside: true, ..Run::new(&a, QUERY) })?.stdout;
        for (u, state) in present.iter().zip(out.lines()) {
            states.insert(u.to_string(), state.trim().to_string());
        }
    }
    Ok(names
        .iter()
        .zip(full)
        .map(|(n, u)| {
            let unit = Unit {
                exists: exists[u.as_str()],
                active: "inactive".into(),
                enabled: states.get(u).cloned().unwrap_or_default(),
                can_reload: false,
                needs_daemon_reload: false,
            };
            (n.to_string(), unit)
        })
        .collect())
}

pub fn action(host: &dyn Host, name: &str, action: UnitAction) -> HostResult<()> {
    tool::check(host, &Run::new(&argv(&["systemctl", action.verb(), "--", name]), CHANGE)).map(drop)
}

pub fn set_enabled(host: &dyn Host, name: &str, enabled: bool) -> HostResult<()> {
    let verb = if enabled { "enable" } else { "disable" };
    match host.image_root() {
        None => tool::check(host, &Run::new(&argv(&["systemctl", verb, "--", name]), CHANGE)).map(drop),
        Some(root) => {
            let a = vec!["systemctl".into(), format!("--root={root}"), verb.into(), "--".into(), name.into()];
            tool::check(host, &Run { outside: true, ..Run::new(&a, CHANGE) }).map(drop)
        }
    }
}

pub fn daemon_reload(host: &dyn Host) -> HostResult<()> {
    tool::check(host, &Run::new(&argv(&["systemctl", "daemon-reload"]), CHANGE)).map(drop)
}

/// The last lines of a unit's journal, for a failure report (nothing in an image).
pub fn journal(host: &dyn Host, name: &str) -> String {
    if host.is_image() {
        return String::new();
    }
    let a = argv(&["journalctl", "-u", name, "-n", "20", "--no-pager", "-o", "short-iso"]);
    match host.run(&Run::new(&a, QUERY)) {
        Ok(ran) if !ran.stdout.trim().is_empty() => format!("journal of {name}:\n{}", ran.stdout.trim_end()),
        _ => String::new(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemctl_show() {
        let text = "Id=a.service\nLoadState=loaded\nActiveState=active\nUnitFileState=enabled\nCanReload=yes\nNeedDaemonReload=no\n\nId=nope.service\nLoadState=not-found\nActiveState=inactive\nUnitFileState=\nCanReload=no\nNeedDaemonReload=no\n";
        let u = parse_systemctl_show(text);
        assert_eq!(u.len(), 2);
        assert!(u[0].exists && u[0].can_reload && u[0].active == "active" && u[0].enabled == "enabled");
        assert!(!u[1].exists);
    }
}
