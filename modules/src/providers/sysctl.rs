//! `sysctl`: a kernel parameter's live value, and the value it gets at boot.
//!
//! The boot value is kept in a file of its own, [`crate::catalog::sysctl_file`], named to be
//! read after every other file of the sysctl.d directories; the live value is set by applying
//! that very file with `systemd-sysctl` (what the boot runs), so a run proves the file. The
//! check is honest about both: a live value the kernel did not take (a read-only /proc/sys in
//! a container) fails the run as still differing, and a file read after converge's one that
//! sets the key otherwise (`/etc/sysctl.conf`, which `sysctl --system` reads last) is an error
//! naming its file and line, since it would win at the next boot.
//!
//! In an image (`--root`) only the file is managed: its kernel is not the image's. `absent`
//! removes converge's file and leaves the live value as it is until the next boot.

use super::{Checked, Observed, System, fail, present};
use crate::catalog::{Resource, SysctlSpec, sysctl_file};
use crate::host::{FileType, NewAttrs, Run};
use crate::providers::ProviderError;
use crate::report::Change;
use std::time::Duration;

/// The directories systemd-sysctl reads, most important first (a file name in an earlier one
/// hides the same name in a later one).
pub const DIRS: &[&str] = &["/etc/sysctl.d", "/run/sysctl.d", "/usr/local/lib/sysctl.d", "/usr/lib/sysctl.d"];

/// Read after every file of [`DIRS`] by `sysctl --system` (Debian 12 also links it as
/// `99-sysctl.conf`).
pub const SYSCTL_CONF: &str = "/etc/sysctl.conf";

/// The most of one configuration file or one value read.
const MAX_READ: u64 = 1 << 20;

/// A key in the `/` form of its path under /proc/sys: `net.ipv4.ip_forward` is
/// `net/ipv4/ip_forward`; a key whose first separator is `/` already is one (`.` stays a
/// dot in it, as in an interface name `eth0.10`).
pub fn key_path(key: &str) -> String {
    let key = key.trim().trim_start_matches('-');
    match key.find(['.', '/']) {
        Some(i) if key.as_bytes()[i] == b'.' => key
            .chars()
            .map(|c| {
                if c == '.' {
                    '/'
                } else if c == '/' {
                    '.'
                } else {
                    c
                }
            })
            .collect(),
        _ => key.to_string(),
    }
}

/// A value as the kernel prints it, whitespace made single spaces.
fn normal(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The `key = value` assignments of a sysctl.d file, with their line numbers. Comments (`#`,
/// `;`) and lines that are not assignments are skipped.
pub fn assignments(text: &str) -> Vec<(String, String, usize)> {
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let line = line.trim();
            if line.is_empty() || line.starts_with(['#', ';']) {
                return None;
            }
            let (k, v) = line.split_once('=')?;
            Some((k.trim().to_string(), v.trim().to_string(), i + 1))
        })
        .collect()
}

/// What converge's file holds for `key`.
pub fn file_content(key: &str, value: &str) -> String {
    format!("# Managed by converge (sysctl:{key}); edits are overwritten.\n{key} = {value}\n")
}

/// What `inspect` found besides the file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Seen {
    /// The live value; `None` in an image.
    pub live: Option<String>,
    /// A later file that sets the key: (where, its value).
    pub overridden: Option<(String, String)>,
}

fn read_text(sys: &System, path: &str) -> Result<Option<String>, ProviderError> {
    let read = sys.host.read_file(path, MAX_READ).map_err(fail)?;
    Ok(read.and_then(|r| r.content).map(|c| String::from_utf8_lossy(&c).into_owned()))
}

/// Every file systemd-sysctl reads, in its order, and `/etc/sysctl.conf` last: (file name, path
/// shown, content). A symlink is read through, once, as systemd does. Read once a run, for
/// every `sysctl` resource; a change to any of them in the run (a `file_line`) forgets it.
pub type Files = std::rc::Rc<Vec<(String, String, String)>>;

fn all_files(sys: &System) -> Result<Files, ProviderError> {
    if let Some(files) = sys.run.borrow().sysctl_files.clone() {
        return Ok(files);
    }
    let mut names: Vec<(String, String)> = Vec::new();
    for dir in DIRS {
        let entries = match sys.host.list_dir(dir) {
            Ok(e) => e,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(fail(e)),
        };
        for (name, _) in entries {
            if name.ends_with(".conf") && !names.iter().any(|(n, _)| *n == name) {
                names.push((name.clone(), format!("{dir}/{name}")));
            }
        }
    }
    names.sort();
    // /etc/sysctl.conf comes after every name.
    names.push((String::from("\u{10ffff}"), SYSCTL_CONF.to_string()));
    let mut out = Vec::new();
    for (name, path) in names {
        let shown = path.clone();
        let target = match sys.host.stat(&path).map_err(fail)? {
            Some(s) if s.file_type == FileType::Symlink => {
                let to = sys.host.read_link(&path).map_err(fail)?;
                if to.starts_with('/') {
                    to
                } else {
                    format!("{}/{to}", crate::catalog::parent_path(&path).unwrap_or("/"))
                }
            }
            _ => path,
        };
        let Ok(target) = crate::catalog::normalize_path(&target) else { continue };
        if let Some(text) = read_text(sys, &target)? {
            out.push((name, shown, text));
        }
    }
    let files: Files = std::rc::Rc::new(out);
    sys.run.borrow_mut().sysctl_files = Some(files.clone());
    Ok(files)
}

/// Whether a change to `path` makes the files read by [`all_files`] stale.
pub fn is_sysctl_file(path: &str) -> bool {
    path == SYSCTL_CONF || DIRS.iter().any(|d| path.starts_with(d) && path.as_bytes().get(d.len()) == Some(&b'/'))
}

pub fn inspect(sys: &System, r: &Resource, s: &SysctlSpec) -> Result<(Observed, Seen), ProviderError> {
    let key = r.id.title.as_str();
    let file = sysctl_file(key);
    let read = sys.host.read_file(&file, MAX_READ).map_err(fail)?;
    let seen =
        Observed { stat: read.as_ref().map(|r| r.stat), content: read.and_then(|r| r.content), ..Observed::default() };
    if !present(r) {
        return Ok((seen, Seen::default()));
    }
    let path = key_path(key);
    let live = if sys.host.is_image() {
        None
    } else {
        match read_text(sys, &format!("/proc/sys/{path}"))? {
            Some(v) => Some(normal(&v)),
            None => {
                return Err(format!(
                    "the kernel has no parameter {key} (/proc/sys/{path}): is the module that adds it loaded?"
                )
                .into());
            }
        }
    };
    let mut overridden = None;
    if let Some(want) = &s.value {
        let our_name = file.rsplit('/').next().unwrap_or(&file);
        // In a plan or a dry-run, a file an earlier resource edits is as that edit will leave it:
        // not known here, so not held against the value.
        let later = all_files(sys)?;
        for (_, name, text) in later.iter().filter(|(n, shown, _)| n.as_str() > our_name && !sys.assumed_path(shown)) {
            for (k, v, line) in assignments(text) {
                if key_path(&k) == path && normal(&v) != normal(want) {
                    overridden = Some((format!("{name}:{line}"), v));
                }
            }
        }
    }
    Ok((seen, Seen { live, overridden }))
}

/// What differs. Pure.
pub fn diff(r: &Resource, s: &SysctlSpec, seen: &Observed, found: &Seen) -> Result<Vec<Change>, ProviderError> {
    let key = r.id.title.as_str();
    let file = sysctl_file(key);
    let mut changes = Vec::new();
    if !present(r) {
        if seen.stat.is_some() {
            changes.push(Change::new("persisted", format!("in {file}"), "absent"));
        }
        return Ok(changes);
    }
    let Some(want) = s.value.as_deref() else { return Ok(changes) };
    if let Some((at, value)) = &found.overridden {
        return Err(format!(
            "{at} sets {key} = {value} and is read after converge's {file}: at the next boot its value would win; \
             remove it there (a `file_line` with `ensure: absent` can)"
        )
        .into());
    }
    let expected = file_content(key, want);
    let persisted_value = seen
        .content
        .as_deref()
        .and_then(|c| assignments(&String::from_utf8_lossy(c)).into_iter().next().map(|(_, v, _)| v));
    if seen.content.as_deref() != Some(expected.as_bytes()) {
        let from = match (&seen.stat, persisted_value) {
            (None, _) => "absent".to_string(),
            (Some(_), Some(v)) if normal(&v) != normal(want) => v,
            (Some(_), _) => "another text".to_string(),
        };
        changes.push(Change::new("persisted", from, want));
    }
    if let Some(live) = &found.live
        && *live != normal(want)
    {
        changes.push(Change::new("value", live.clone(), normal(want)));
    }
    Ok(changes)
}

pub fn check(sys: &System, r: &Resource, s: &SysctlSpec) -> Result<(Checked, Vec<Change>), ProviderError> {
    let (seen, found) = inspect(sys, r, s)?;
    let changes = diff(r, s, &seen, &found)?;
    Ok((Checked { seen, ..Checked::default() }, changes))
}

/// The program that applies a sysctl.d file, as the boot does.
fn applier(sys: &System) -> Result<Vec<String>, ProviderError> {
    for p in ["/usr/lib/systemd/systemd-sysctl", "/lib/systemd/systemd-sysctl"] {
        if sys.host.stat(p).map_err(fail)?.is_some() {
            return Ok(vec![p.to_string()]);
        }
    }
    Ok(vec!["sysctl".into(), "-q".into(), "-p".into()])
}

pub fn apply(
    sys: &System,
    r: &Resource,
    s: &SysctlSpec,
    state: &Checked,
    changes: &[Change],
) -> Result<(), ProviderError> {
    let key = r.id.title.as_str();
    let file = sysctl_file(key);
    if !present(r) {
        return match state.seen.stat {
            Some(_) => sys.host.remove(&file).map_err(fail),
            None => Ok(()),
        };
    }
    let Some(want) = s.value.as_deref() else { return Ok(()) };
    if changes.iter().any(|c| c.attribute == "persisted") {
        let attrs = NewAttrs { mode: 0o644, uid: Some(0), gid: Some(0) };
        sys.host.write_file(&file, file_content(key, want).as_bytes(), attrs, None).map_err(super::fail_create)?;
    }
    if changes.iter().any(|c| c.attribute == "value") && !sys.host.is_image() {
        let mut argv = applier(sys)?;
        argv.push(file.clone());
        crate::providers::tool::check(sys.host, &Run::new(&argv, Duration::from_secs(60))).map_err(fail)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::memory::MemHost;
    use crate::report::Status;

    #[test]
    fn keys_map_to_their_proc_paths() {
        assert_eq!(key_path("net.ipv4.ip_forward"), "net/ipv4/ip_forward");
        assert_eq!(key_path("net/ipv4/conf/eth0.10/rp_filter"), "net/ipv4/conf/eth0.10/rp_filter");
        assert_eq!(key_path("-vm.swappiness"), "vm/swappiness");
    }

    #[test]
    fn assignments_skip_comments() {
        let a = assignments("# c\n; c\nvm.swappiness = 10\n\n net.core.somaxconn=4096 \nnonsense\n");
        assert_eq!(a, vec![("vm.swappiness".into(), "10".into(), 3), ("net.core.somaxconn".into(), "4096".into(), 5)]);
    }

    fn host() -> MemHost {
        MemHost::new()
            .with_dir("/etc", 0o755)
            .with_dir("/etc/sysctl.d", 0o755)
            .with_dir("/proc", 0o555)
            .with_dir("/proc/sys", 0o555)
            .with_dir("/proc/sys/net", 0o555)
            .with_dir("/proc/sys/net/ipv4", 0o555)
            .with_file("/proc/sys/net/ipv4/ip_forward", "0\n", 0o644)
    }

    const FORWARD: &str = "  - sysctl: net.ipv4.ip_forward\n    value: 1\n";

    #[test]
    fn sets_persists_then_is_unchanged_and_a_dry_run_changes_nothing() {
        let host = host();
        let dry = crate::providers::converge_yaml(&host, FORWARD, true).pop().unwrap();
        assert_eq!(dry.status, Status::WouldChange);
        let shown: Vec<String> =
            dry.changes.iter().map(|c| format!("{}: {} -> {}", c.attribute, c.from, c.to)).collect();
        assert_eq!(shown, ["persisted: absent -> 1", "value: 0 -> 1"]);
        assert_eq!(host.content("/proc/sys/net/ipv4/ip_forward").as_deref(), Some("0\n"), "a dry-run changes nothing");
        let e = crate::providers::converge_yaml(&host, FORWARD, false).pop().unwrap();
        assert_eq!(e.status, Status::Changed, "{e:?}");
        assert_eq!(host.content("/proc/sys/net/ipv4/ip_forward").as_deref(), Some("1\n"));
        assert_eq!(
            host.content("/etc/sysctl.d/99-zz-converge-net.ipv4.ip_forward.conf").as_deref(),
            Some(file_content("net.ipv4.ip_forward", "1").as_str())
        );
        assert_eq!(crate::providers::converge_yaml(&host, FORWARD, false).pop().unwrap().status, Status::Unchanged);
    }

    #[test]
    fn a_later_file_that_would_win_at_boot_is_named() {
        let host = host().with_file("/etc/sysctl.conf", "# x\nnet.ipv4.ip_forward=0\n", 0o644);
        let e = crate::providers::converge_yaml(&host, FORWARD, false).pop().unwrap();
        assert_eq!(e.status, Status::Failed);
        let m = e.message.unwrap();
        assert!(m.starts_with("/etc/sysctl.conf:2 sets net.ipv4.ip_forward = 0 and is read after"), "{m}");
        // An earlier file does not matter: ours is read after it.
        let host = self::host().with_file("/etc/sysctl.d/10-x.conf", "net.ipv4.ip_forward = 0\n", 0o644);
        assert_eq!(crate::providers::converge_yaml(&host, FORWARD, false).pop().unwrap().status, Status::Changed);
    }

    #[test]
    fn the_files_are_read_once_a_run_and_again_after_an_edit_of_one() {
        // The fix the error suggests, in the same run: the override removed, then the value.
        let host = host().with_file("/etc/sysctl.conf", "net.ipv4.ip_forward=0\n", 0o644);
        let yaml = format!(
            "  - file_line: no-override\n    path: /etc/sysctl.conf\n    match: ^net.ipv4.ip_forward\n    ensure: absent\n{FORWARD}  - sysctl: net.ipv4.conf.all.forwarding\n    value: 1\n"
        );
        let host = host
            .with_dir("/proc/sys/net/ipv4/conf", 0o555)
            .with_dir("/proc/sys/net/ipv4/conf/all", 0o555)
            .with_file("/proc/sys/net/ipv4/conf/all/forwarding", "0\n", 0o644);
        let events = crate::providers::converge_yaml(&host, &yaml, false);
        assert!(events.iter().all(|e| e.status == Status::Changed), "{events:?}");
        assert_eq!(host.content("/proc/sys/net/ipv4/ip_forward").as_deref(), Some("1\n"));
    }

    #[test]
    fn a_value_the_kernel_refuses_fails_as_still_differing() {
        let host = host().refuse_sysctl();
        let e = crate::providers::converge_yaml(&host, FORWARD, false).pop().unwrap();
        assert_eq!(e.status, Status::Failed);
        assert!(e.message.unwrap().contains("still differs after apply: value: 0 -> 1"));
    }

    #[test]
    fn an_unknown_key_and_an_image() {
        let e = crate::providers::converge_yaml(&host(), "  - sysctl: net.nope\n    value: 1\n", false).pop().unwrap();
        assert_eq!(
            e.message.as_deref(),
            Some("the kernel has no parameter net.nope (/proc/sys/net/nope): is the module that adds it loaded?")
        );
        let image = host().as_image();
        let e = crate::providers::converge_yaml(&image, FORWARD, false).pop().unwrap();
        assert_eq!(e.changes.len(), 1, "only the file in an image: {e:?}");
        assert_eq!(image.content("/proc/sys/net/ipv4/ip_forward").as_deref(), Some("0\n"));
    }

    #[test]
    fn absent_removes_the_file_only() {
        let host = host();
        crate::providers::converge_yaml(&host, FORWARD, false);
        let e = crate::providers::converge_yaml(&host, "  - sysctl: net.ipv4.ip_forward\n    ensure: absent\n", false)
            .pop()
            .unwrap();
        assert_eq!(e.status, Status::Changed);
        assert_eq!(host.content("/etc/sysctl.d/99-zz-converge-net.ipv4.ip_forward.conf"), None);
        assert_eq!(host.content("/proc/sys/net/ipv4/ip_forward").as_deref(), Some("1\n"));
    }
}
