//! `file`: a regular file's existence, content, mode, owner and group.
//!
//! Content is compared byte for byte (no hashing on the no-op path); only a file whose content
//! differs is rewritten, atomically, with its old content backed up first (unless `backup:
//! false` or the resource is sensitive). A new file takes the declared attributes, else those of
//! the file it replaces, else mode 0644 and the agent's own owner.

use super::{Attrs, Observed, System, describe_content, fail, fail_create, present, unified_diff};
use crate::catalog::{FileSpec, Resource};
use crate::host::{FileType, HostError, NewAttrs};
use crate::report::Change;

pub fn check(sys: &System, r: &Resource, f: &FileSpec) -> Result<(Observed, Vec<Change>), String> {
    let path = r.id.title.as_str();
    let want = f.content.as_deref().map(str::as_bytes);
    let limit = want.map_or(0, |w| (w.len() as u64).max(super::DIFF_LIMIT));
    let read = sys.host.read_file(path, limit).map_err(fail)?;
    let observed =
        Observed { stat: read.as_ref().map(|r| r.stat), content: read.and_then(|r| r.content), purge: Vec::new() };
    let force = f.force.unwrap_or(false);
    if !present(r) {
        let changes = sys.absent_changes(path, observed.stat.as_ref(), force)?;
        return Ok((observed, changes));
    }
    let attrs = sys.wanted(f.mode, f.owner.as_deref(), f.group.as_deref())?;
    let mut changes: Vec<Change> =
        sys.retype(path, observed.stat.as_ref(), FileType::File, force)?.into_iter().collect();
    let is_file = observed.stat.is_some_and(|s| s.file_type == FileType::File);
    if let Some(want) = want {
        let differs = match (&observed.stat, &observed.content) {
            (Some(s), Some(have)) if is_file => s.size != want.len() as u64 || have.as_slice() != want,
            (Some(s), None) if is_file => s.size != want.len() as u64 || s.size > 0,
            _ => !want.is_empty(),
        };
        if differs {
            changes.push(content_change(path, r.sensitive(), is_file, &observed, want));
        }
    }
    changes.extend(sys.attr_changes(&attrs, observed.stat.as_ref().filter(|_| is_file)));
    Ok((observed, changes))
}

fn content_change(path: &str, sensitive: bool, is_file: bool, observed: &Observed, want: &[u8]) -> Change {
    let (from, old) = match (is_file, &observed.content, &observed.stat) {
        (true, Some(have), _) => (describe_content(have), Some(have.as_slice())),
        (true, None, Some(s)) => (format!("{} bytes (too large to show)", s.size), None),
        _ => ("absent".to_string(), Some(&[][..])),
    };
    let mut change = Change::new("content", from, describe_content(want));
    if !sensitive {
        change.diff = old.and_then(|old| unified_diff(path, old, want));
    }
    change
}

pub fn apply(sys: &System, r: &Resource, f: &FileSpec, seen: &Observed, changes: &[Change]) -> Result<(), String> {
    let path = r.id.title.as_str();
    let backup = f.backup.unwrap_or(true) && !r.sensitive();
    if !present(r) {
        return match &seen.stat {
            Some(s) => sys.remove_tree(path, s, backup),
            None => Ok(()),
        };
    }
    let attrs: Attrs = sys.wanted(f.mode, f.owner.as_deref(), f.group.as_deref())?;
    let existing_file = seen.stat.filter(|s| s.file_type == FileType::File);
    let rewrite = existing_file.is_none() || changes.iter().any(|c| c.attribute == "content");
    if !rewrite {
        return sys.apply_attrs(path, &attrs, existing_file.as_ref().expect("an existing file"));
    }
    match &seen.stat {
        Some(s) if s.file_type == FileType::File && backup => {
            sys.host.backup(path).map_err(fail)?;
        }
        // A symlink is replaced by the rename itself; anything else goes first (force was
        // checked by `check`).
        Some(s) if s.file_type != FileType::Symlink => sys.remove_tree(path, s, backup)?,
        _ => {}
    }
    let new = NewAttrs {
        mode: attrs.mode.or(existing_file.map(|s| s.mode)).unwrap_or(0o644),
        uid: attrs.uid.or(existing_file.map(|s| s.uid)),
        gid: attrs.gid.or(existing_file.map(|s| s.gid)),
    };
    let content = match (&f.content, &seen.content) {
        (Some(c), _) => c.as_bytes(),
        (None, Some(old)) => old.as_slice(),
        (None, None) => &[],
    };
    sys.host.write_file(path, content, new, f.validate.as_deref()).map_err(|e| match e {
        HostError::Command { command, status, .. } if r.sensitive() => {
            format!("validate `{command}` {status} (its output is hidden: the resource is sensitive)")
        }
        HostError::Command { .. } => format!("validate refused the new content, {path} left as it was: {e}"),
        e => fail_create(e),
    })
}

#[cfg(test)]
mod tests {
    use crate::engine::{Options, run};
    use crate::host::memory::{MemHost, MemNode};
    use crate::load::load;
    use crate::providers::System;
    use crate::report::{Collect, ResourceEvent, RunInfo, Status};

    /// Loads `yaml`, converges it on `host` (dry-run or not) and returns the one event.
    fn check(host: &MemHost, yaml: &str, dry_run: bool) -> ResourceEvent {
        let loaded = load("t.yaml", &format!("format: 1\nresources:\n{yaml}"), None).expect("valid catalog");
        let sys = System::new(host, &loaded.catalog.resources);
        let mut sink = Collect::default();
        let info = RunInfo { catalog: "t".into(), host: None, serial: None, commit: None, dry_run, resources: 1 };
        run(&loaded, &sys, Options { dry_run }, info, &mut sink);
        sink.resources.pop().unwrap()
    }

    const MOTD: &str = "  - file: /etc/motd\n    content: \"new\\n\"\n    mode: \"0644\"\n";

    #[test]
    fn creates_then_is_unchanged() {
        let host = MemHost::new().with_dir("/etc", 0o755);
        let e = check(&host, MOTD, false);
        assert_eq!(e.status, Status::Changed);
        let attrs: Vec<&str> = e.changes.iter().map(|c| c.attribute.as_str()).collect();
        assert_eq!(attrs, ["ensure", "content", "mode"]);
        assert_eq!(
            host.node("/etc/motd"),
            Some(MemNode::File { content: b"new\n".to_vec(), mode: 0o644, uid: 0, gid: 0 })
        );
        assert_eq!(check(&host, MOTD, false).status, Status::Unchanged);
    }

    #[test]
    fn drift_is_shown_as_a_diff_and_repaired_with_a_backup() {
        let host = MemHost::new().with_file("/etc/motd", "old\n", 0o600);
        let before = host.snapshot();
        let e = check(&host, MOTD, true);
        assert_eq!(e.status, Status::WouldChange);
        assert_eq!(host.snapshot(), before, "dry-run changed nothing");
        assert_eq!(host.mutations(), 0);
        let diff = e.changes[0].diff.as_deref().unwrap();
        assert!(diff.contains("-old\n+new"), "{diff}");
        assert_eq!((e.changes[1].from.as_str(), e.changes[1].to.as_str()), ("0600", "0644"));
        assert_eq!(check(&host, MOTD, false).status, Status::Changed);
        assert_eq!(host.content("/etc/motd").unwrap(), "new\n");
        assert_eq!(host.backups(), vec![("/etc/motd".to_string(), b"old\n".to_vec())]);
    }

    #[test]
    fn only_attributes_changed_means_no_rewrite() {
        let host = MemHost::new().with_file("/etc/motd", "new\n", 0o600);
        let e = check(&host, MOTD, false);
        assert_eq!(e.changes.len(), 1);
        assert_eq!(host.backups().len(), 0);
        assert!(matches!(host.node("/etc/motd"), Some(MemNode::File { mode: 0o644, .. })));
    }

    #[test]
    fn unmanaged_attributes_are_kept_when_content_is_replaced() {
        let host = MemHost::new().with_user("www", 33);
        host.put("/srv/x", MemNode::File { content: b"a".to_vec(), mode: 0o640, uid: 33, gid: 7 });
        check(&host, "  - file: /srv/x\n    content: b\n", false);
        assert_eq!(host.node("/srv/x"), Some(MemNode::File { content: b"b".to_vec(), mode: 0o640, uid: 33, gid: 7 }));
    }

    #[test]
    fn owner_and_group_by_name() {
        let host = MemHost::new().with_user("deploy", 2001).with_group("www-data", 33).with_file("/srv/x", "a", 0o644);
        let e = check(&host, "  - file: /srv/x\n    owner: deploy\n    group: www-data\n", false);
        assert_eq!((e.changes[0].from.as_str(), e.changes[0].to.as_str()), ("root", "deploy"));
        assert!(matches!(host.node("/srv/x"), Some(MemNode::File { uid: 2001, gid: 33, .. })));
        let e = check(&host, "  - file: /srv/x\n    owner: nobody-here\n", false);
        assert_eq!(e.status, Status::Failed);
        assert_eq!(e.message.as_deref(), Some("owner `nobody-here` does not exist on this system"));
    }

    #[test]
    fn sensitive_content_never_shows() {
        let host = MemHost::new().with_file("/etc/secret", "hunter2\n", 0o600);
        let e = check(&host, "  - file: /etc/secret\n    content: \"s3cret\\n\"\n    sensitive: true\n", true);
        let shown = serde_json::to_string(&e).unwrap();
        assert!(!shown.contains("hunter2") && !shown.contains("s3cret"), "{shown}");
        assert!(e.changes[0].diff.is_none());
        check(&host, "  - file: /etc/secret\n    content: \"s3cret\\n\"\n    sensitive: true\n", false);
        assert!(host.backups().is_empty(), "sensitive content stays out of the backup store");
    }

    #[test]
    fn a_directory_in_the_way_needs_force() {
        let host = MemHost::new().with_file("/srv/x/inner", "keep", 0o644);
        let e = check(&host, "  - file: /srv/x\n    content: a\n", true);
        assert_eq!(e.status, Status::Failed, "dry-run predicts the failure");
        assert!(e.message.unwrap().contains("set `force: true`"));
        let e = check(&host, "  - file: /srv/x\n    content: a\n    force: true\n", false);
        assert_eq!(e.status, Status::Changed);
        assert_eq!(host.content("/srv/x").unwrap(), "a");
        assert_eq!(host.backups(), vec![("/srv/x/inner".to_string(), b"keep".to_vec())]);
    }

    #[test]
    fn absent_removes_a_file_with_a_backup() {
        let host = MemHost::new().with_file("/etc/old", "x", 0o644);
        let e = check(&host, "  - file: /etc/old\n    ensure: absent\n", false);
        assert_eq!(e.status, Status::Changed);
        assert_eq!(host.node("/etc/old"), None);
        assert_eq!(host.backups().len(), 1);
        assert_eq!(check(&host, "  - file: /etc/old\n    ensure: absent\n", false).status, Status::Unchanged);
    }

    #[test]
    fn validate_refusal_keeps_the_old_file() {
        let host = MemHost::new().with_file("/etc/sudoers", "ok\n", 0o440).with_validator(|argv, content| {
            if content == b"bad\n" { Err(format!("{} says no", argv[0])) } else { Ok(()) }
        });
        let decl = "  - file: /etc/sudoers\n    content: \"bad\\n\"\n    validate: [visudo, -cf, \"%\"]\n";
        let e = check(&host, decl, false);
        assert_eq!(e.status, Status::Failed);
        assert!(e.message.as_deref().unwrap().contains("visudo says no"), "{e:?}");
        assert_eq!(host.content("/etc/sudoers").unwrap(), "ok\n");
    }

    #[test]
    fn a_failing_write_is_reported_with_the_path() {
        let host = MemHost::new().fail_on("/etc/motd", "read-only file system").with_dir("/etc", 0o755);
        let e = check(&host, MOTD, false);
        assert_eq!(e.status, Status::Failed);
        assert_eq!(e.message.as_deref(), Some("write /etc/motd: read-only file system"));
    }

    #[test]
    fn a_missing_parent_fails_clearly() {
        let host = MemHost::new();
        let e = check(&host, MOTD, false);
        assert_eq!(e.status, Status::Failed);
        assert!(e.message.as_deref().unwrap().contains("declare it as a `directory` resource"), "{e:?}");
    }
}
