//! `mount`: a filesystem's entry in /etc/fstab, and whether it is mounted.
//!
//! The entry is one line of /etc/fstab, edited in place (every other line kept byte for
//! byte; the file replaced atomically, its old content backed up); two entries for one mount
//! point are an error, not a guess. What is mounted is read from `/proc/self/mountinfo`: a
//! mount of another filesystem type, or of another device (`UUID=` and `LABEL=` resolved
//! through /dev/disk), is mounted again from the entry; a changed entry of a mounted
//! filesystem is remounted (`mount -o remount`), as Puppet does. `mount` and `umount` read the
//! entry, so the live state and the next boot agree; systemd is reloaded after the file
//! changes, as its fstab generator wants. A busy filesystem that must be unmounted fails with
//! `umount`'s own words. In an image (`--root`) only the entry is managed.

use super::{Checked, Op, System, fail};
use crate::catalog::{MountEnsure, MountSpec, Resource};
use crate::host::{NewAttrs, Run};
use crate::providers::ProviderError;
use crate::report::{Change, unified_diff};
use std::time::Duration;

pub const FSTAB: &str = "/etc/fstab";
const MOUNTINFO: &str = "/proc/self/mountinfo";
const MAX_READ: u64 = 4 << 20;
const TIMEOUT: Duration = Duration::from_secs(120);

/// fstab's and mountinfo's escapes: a space is `\040`, a tab `\011`, a backslash `\134`.
pub fn escape(field: &str) -> String {
    field.replace('\\', "\\134").replace(' ', "\\040").replace('\t', "\\011").replace('\n', "\\012")
}

pub fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).filter(|c| c.bytes().all(|b| (b'0'..=b'7').contains(&b)));
        match code.and_then(|c| u8::from_str_radix(c, 8).ok()) {
            Some(b) => {
                out.push(b as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The entry converge writes. Pure.
pub fn entry(mount_point: &str, m: &MountSpec) -> String {
    format!(
        "{} {} {} {} {} {}",
        escape(m.device.as_deref().unwrap_or_default()),
        escape(mount_point),
        escape(m.fstype.as_deref().unwrap_or_default()),
        escape(m.options.as_deref().unwrap_or("defaults")),
        m.dump.unwrap_or(0),
        m.pass.unwrap_or(0)
    )
}

/// The lines (from 0) of fstab's entries for `mount_point`.
fn entries_for(fstab: &str, mount_point: &str) -> Vec<usize> {
    fstab
        .lines()
        .enumerate()
        .filter(|(_, l)| {
            let l = l.trim_start();
            !l.starts_with('#') && l.split_whitespace().nth(1).is_some_and(|mp| unescape(mp) == mount_point)
        })
        .map(|(i, _)| i)
        .collect()
}

/// fstab with the entry for `mount_point` as wanted (`None`: removed). Pure.
pub fn edit_fstab(fstab: &str, mount_point: &str, want: Option<&str>) -> Result<String, String> {
    let at = entries_for(fstab, mount_point);
    if at.len() > 1 {
        let lines: Vec<String> = at.iter().map(|i| (i + 1).to_string()).collect();
        return Err(format!(
            "/etc/fstab has {} entries for {mount_point} (lines {}); remove all but one by hand",
            at.len(),
            lines.join(", ")
        ));
    }
    let mut lines: Vec<&str> = fstab.lines().collect();
    match (at.first(), want) {
        (Some(&i), Some(w)) => lines[i] = w,
        (Some(&i), None) => {
            lines.remove(i);
        }
        (None, Some(w)) => lines.push(w),
        (None, None) => {}
    }
    let mut out = lines.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    Ok(out)
}

/// The filesystem mounted on top at `mount_point`: (source, fstype).
pub fn mounted(mountinfo: &str, mount_point: &str) -> Option<(String, String)> {
    mountinfo.lines().rev().find_map(|l| {
        let (head, tail) = l.split_once(" - ")?;
        let mp = unescape(head.split(' ').nth(4)?);
        let mut t = tail.split(' ');
        let fstype = t.next()?.to_string();
        let source = unescape(t.next()?);
        (mp == mount_point).then_some((source, fstype))
    })
}

/// What `inspect` saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Seen {
    pub fstab: Option<String>,
    /// What is mounted there; `None` in an image or when nothing is.
    pub live: Option<(String, String)>,
    /// The declared device as the kernel names it (`UUID=`/`LABEL=` resolved).
    pub device: Option<String>,
}

/// The text of `path`, `None` when absent. A file that cannot be read whole (too large, a
/// symlink, not a regular file) is an error: an fstab read in part would be written back cut.
fn read_text(sys: &System, path: &str) -> Result<Option<String>, ProviderError> {
    match sys.host.read_file(path, MAX_READ).map_err(fail)? {
        None => Ok(None),
        Some(crate::host::FileRead { content: Some(c), .. }) => Ok(Some(String::from_utf8_lossy(&c).into_owned())),
        Some(r) => Err(format!(
            "{path} is a {} of {} bytes: converge reads it only as a regular file of at most {} MiB",
            r.stat.file_type,
            r.stat.size,
            MAX_READ >> 20
        )
        .into()),
    }
}

/// `UUID=x` as `/dev/sdb1`, through /dev/disk's links; other devices as they are.
fn resolve_device(sys: &System, device: &str) -> Result<String, ProviderError> {
    let link = match device.split_once('=') {
        Some(("UUID", v)) => format!("/dev/disk/by-uuid/{v}"),
        Some(("LABEL", v)) => format!("/dev/disk/by-label/{v}"),
        Some(("PARTUUID", v)) => format!("/dev/disk/by-partuuid/{v}"),
        _ => return Ok(device.to_string()),
    };
    match sys.host.read_link(&link) {
        Ok(to) if to.starts_with('/') => Ok(to),
        Ok(to) => Ok(crate::catalog::normalize_path(&format!("/dev/disk/x/{to}")).unwrap_or(to)),
        Err(_) => Ok(device.to_string()),
    }
}

pub fn inspect(sys: &System, r: &Resource, m: &MountSpec) -> Result<Seen, ProviderError> {
    let fstab = read_text(sys, FSTAB)?;
    if sys.host.is_image() {
        return Ok(Seen { fstab, ..Seen::default() });
    }
    let info = read_text(sys, MOUNTINFO)?.unwrap_or_default();
    let device = m.device.as_deref().map(|d| resolve_device(sys, d)).transpose()?;
    Ok(Seen { fstab, live: mounted(&info, &r.id.title), device })
}

/// What differs, and what `apply` is to run. Pure.
pub fn diff(r: &Resource, m: &MountSpec, seen: &Seen, image: bool) -> Result<(Vec<Change>, Vec<Step>), ProviderError> {
    let mp = r.id.title.as_str();
    let ensure = m.ensure.unwrap_or(MountEnsure::Mounted);
    let old = seen.fstab.clone().unwrap_or_default();
    let want = (ensure != MountEnsure::Absent).then(|| entry(mp, m));
    let new = edit_fstab(&old, mp, want.as_deref()).map_err(ProviderError::Declared)?;
    let mut changes = Vec::new();
    let mut steps = Vec::new();
    let entry_changed = new != old;
    if entry_changed {
        let from = entries_for(&old, mp)
            .first()
            .map_or("absent".to_string(), |&i| old.lines().nth(i).unwrap_or_default().trim().to_string());
        let mut c = Change::new("fstab", from, want.clone().unwrap_or_else(|| "absent".into()));
        c.diff = unified_diff(FSTAB, &format!("{FSTAB} ({})", r.id), old.as_bytes(), new.as_bytes());
        changes.push(c);
        steps.push(Step::WriteFstab(new));
    }
    if image {
        return Ok((changes, steps));
    }
    let shown = |(source, fstype): &(String, String)| format!("{source} ({fstype})");
    match (ensure, &seen.live) {
        (MountEnsure::Mounted, None) => {
            changes.push(Change::new("mounted", "no", "yes"));
            steps.push(Step::Mount);
        }
        (MountEnsure::Mounted, Some(live)) => {
            let other_type = m.fstype.as_deref().is_some_and(|t| t != live.1);
            let other_device = seen.device.as_deref().is_some_and(|d| d.starts_with('/') && d != live.0);
            if other_type || other_device {
                changes.push(Change::new(
                    "mounted",
                    shown(live),
                    format!(
                        "{} ({})",
                        m.device.as_deref().unwrap_or_default(),
                        m.fstype.as_deref().unwrap_or_default()
                    ),
                ));
                steps.extend([Step::Unmount, Step::Mount]);
            } else if entry_changed {
                changes.push(Change::new("mounted", "with the old options", "remounted"));
                steps.push(Step::Remount);
            }
        }
        (MountEnsure::Unmounted | MountEnsure::Absent, Some(live)) => {
            changes.push(Change::new("mounted", shown(live), "no"));
            steps.insert(0, Step::Unmount);
        }
        (_, None) => {}
    }
    Ok((changes, steps))
}

/// One thing `apply` does, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    WriteFstab(String),
    Mount,
    Unmount,
    Remount,
}

pub fn check(sys: &System, r: &Resource, m: &MountSpec) -> Result<(Checked, Vec<Change>), ProviderError> {
    let seen = inspect(sys, r, m)?;
    let (changes, steps) = diff(r, m, &seen, sys.host.is_image())?;
    if steps.contains(&Step::Mount) {
        let mp = r.id.title.as_str();
        let exists = sys.host.stat(mp).map_err(fail)?.is_some();
        if !exists && !sys.is_managed(mp) && !sys.assumed_path(mp) {
            return Err(format!("cannot mount on {mp}: it does not exist; declare it as a `directory` resource").into());
        }
    }
    Ok((Checked { op: Op::Mount(steps), ..Checked::default() }, changes))
}

fn run(sys: &System, argv: &[&str]) -> Result<(), ProviderError> {
    let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    crate::providers::tool::check(sys.host, &Run::new(&argv, TIMEOUT)).map(drop).map_err(fail)
}

pub fn apply(sys: &System, r: &Resource, state: &Checked) -> Result<(), ProviderError> {
    let mp = r.id.title.as_str();
    let Op::Mount(steps) = &state.op else { return Ok(()) };
    for step in steps {
        match step {
            Step::WriteFstab(text) => {
                let stat = sys.host.stat(FSTAB).map_err(fail)?;
                if stat.is_some() {
                    sys.host.backup(FSTAB).map_err(fail)?;
                }
                let attrs = match stat {
                    Some(s) => NewAttrs { mode: s.mode, uid: Some(s.uid), gid: Some(s.gid) },
                    None => NewAttrs { mode: 0o644, uid: Some(0), gid: Some(0) },
                };
                sys.host.write_file(FSTAB, text.as_bytes(), attrs, None).map_err(fail)?;
                // systemd makes mount units of fstab's entries: it reads them again.
                if !sys.host.is_image() && sys.host.stat("/run/systemd/system").map_err(fail)?.is_some() {
                    crate::providers::service::systemd::daemon_reload(sys.host).map_err(fail)?;
                }
            }
            Step::Mount => run(sys, &["mount", "--", mp])?,
            Step::Unmount => run(sys, &["umount", "--", mp])?,
            Step::Remount => run(sys, &["mount", "-o", "remount", "--", mp])?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_round_trip() {
        assert_eq!(escape("/srv/my data"), "/srv/my\\040data");
        assert_eq!(unescape("/srv/my\\040data\\134x"), "/srv/my data\\x");
        assert_eq!(unescape("odd\\9"), "odd\\9");
    }

    #[test]
    fn one_entry_is_edited_in_place_and_two_are_an_error() {
        let fstab = "# static\nUUID=a / ext4 defaults 0 1\ntmpfs /srv tmpfs size=1m 0 0\n";
        let e = edit_fstab(fstab, "/srv", Some("tmpfs /srv tmpfs size=2m 0 0")).unwrap();
        assert_eq!(e, "# static\nUUID=a / ext4 defaults 0 1\ntmpfs /srv tmpfs size=2m 0 0\n");
        assert_eq!(edit_fstab(fstab, "/srv", None).unwrap(), "# static\nUUID=a / ext4 defaults 0 1\n");
        assert_eq!(edit_fstab("", "/x", Some("a /x b c 0 0")).unwrap(), "a /x b c 0 0\n");
        let twice = format!("{fstab}tmpfs /srv tmpfs defaults 0 0\n");
        assert!(edit_fstab(&twice, "/srv", None).unwrap_err().contains("2 entries for /srv (lines 3, 4)"));
        // A commented entry is not one.
        assert_eq!(entries_for("#tmpfs /srv tmpfs defaults 0 0\n", "/srv"), Vec::<usize>::new());
    }

    #[test]
    fn the_top_mount_is_read_from_mountinfo() {
        let info = "22 1 0:21 / /srv rw - tmpfs tmpfs rw\n36 22 8:17 / /srv rw,relatime - ext4 /dev/sdb1 rw\n37 1 0:5 / /my\\040data rw - tmpfs none rw\n";
        assert_eq!(mounted(info, "/srv"), Some(("/dev/sdb1".into(), "ext4".into())));
        assert_eq!(mounted(info, "/my data"), Some(("none".into(), "tmpfs".into())));
        assert_eq!(mounted(info, "/none"), None);
        assert_eq!(mounted("garbage\n - \n", "/x"), None);
    }

    mod on_a_host {
        use crate::host::memory::MemHost;
        use crate::providers::converge_yaml;
        use crate::report::Status;

        const DATA: &str = "  - directory: /srv/data\n  - mount: /srv/data\n    device: tmpfs\n    fstype: tmpfs\n    options: size=1m\n";

        fn host() -> MemHost {
            MemHost::new()
                .with_dir("/etc", 0o755)
                .with_file("/etc/fstab", "UUID=a / ext4 defaults 0 1\n", 0o644)
                .with_dir("/srv", 0o755)
                .with_dir("/proc", 0o555)
                .with_dir("/proc/self", 0o555)
                .with_file("/proc/self/mountinfo", "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n", 0o444)
        }

        #[test]
        fn entry_and_mount_then_nothing_then_remount_and_removal() {
            let host = host();
            let dry = converge_yaml(&host, DATA, true).pop().unwrap();
            let shown: Vec<String> =
                dry.changes.iter().map(|c| format!("{}: {} -> {}", c.attribute, c.from, c.to)).collect();
            assert_eq!(shown, ["fstab: absent -> tmpfs /srv/data tmpfs size=1m 0 0", "mounted: no -> yes"]);
            assert!(!host.content("/etc/fstab").unwrap().contains("/srv/data"), "a dry-run changes nothing");
            assert_eq!(converge_yaml(&host, DATA, false).pop().unwrap().status, Status::Changed);
            assert_eq!(
                host.content("/etc/fstab").unwrap(),
                "UUID=a / ext4 defaults 0 1\ntmpfs /srv/data tmpfs size=1m 0 0\n"
            );
            assert!(host.content("/proc/self/mountinfo").unwrap().contains(" /srv/data "));
            assert_eq!(converge_yaml(&host, DATA, false).pop().unwrap().status, Status::Unchanged);
            let bigger = DATA.replace("size=1m", "size=2m");
            let e = converge_yaml(&host, &bigger, false).pop().unwrap();
            assert!(e.changes.iter().any(|c| c.to == "remounted"), "{e:?}");
            assert!(host.processes().iter().any(|p| p == "mount -o remount -- /srv/data"), "{:?}", host.processes());
            let gone = "  - mount: /srv/data\n    ensure: absent\n";
            assert_eq!(converge_yaml(&host, gone, false).pop().unwrap().status, Status::Changed);
            assert_eq!(host.content("/etc/fstab").unwrap(), "UUID=a / ext4 defaults 0 1\n");
            assert!(!host.content("/proc/self/mountinfo").unwrap().contains("/srv/data"));
        }

        #[test]
        fn an_fstab_that_cannot_be_read_whole_is_never_written() {
            let host = host().with_symlink("/etc/fstab", "/elsewhere");
            let e = converge_yaml(&host, DATA, false).pop().unwrap();
            assert_eq!(e.status, Status::Failed);
            assert!(e.message.unwrap().starts_with("/etc/fstab is a symlink"));
            assert!(matches!(host.node("/etc/fstab"), Some(crate::host::memory::MemNode::Symlink { .. })));
        }

        #[test]
        fn a_missing_mount_point_and_a_duplicate_entry_fail_clearly() {
            let e = converge_yaml(&host(), "  - mount: /mnt/x\n    device: tmpfs\n    fstype: tmpfs\n", false)
                .pop()
                .unwrap();
            assert_eq!(
                e.message.as_deref(),
                Some("cannot mount on /mnt/x: it does not exist; declare it as a `directory` resource")
            );
            let host = host().with_file("/etc/fstab", "a /srv b c 0 0\nd /srv e f 0 0\n", 0o644);
            let e =
                converge_yaml(&host, "  - mount: /srv\n    device: tmpfs\n    fstype: tmpfs\n", false).pop().unwrap();
            assert!(e.message.unwrap().contains("/etc/fstab has 2 entries for /srv (lines 1, 2)"));
        }
    }
}
