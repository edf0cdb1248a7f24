//! `file`: a regular file's existence, content, mode, owner and group.
//!
//! Content is compared byte for byte (no hashing on the no-op path); only a file whose content
//! differs is rewritten, atomically, with its old content backed up first (unless `backup:
//! false` or the resource is sensitive). A new file takes the declared attributes, else those of
//! the file it replaces, else mode 0644 and the agent's own owner.

use super::{
    Checked, Observed, System, Wanted, describe_content, diff_absent, diff_attrs, diff_type, fail, fail_create,
};
use super::{present, unified_diff};
use crate::catalog::{BLOB_STORE, Content, FileSpec, Resource, blob_hex, blob_path};
use crate::host::{FileType, HostError, NewAttrs};
use crate::providers::ProviderError;
use crate::report::Change;

/// Reads what is at the path: metadata, and the content when the catalog manages it.
pub fn inspect(sys: &System, path: &str, f: &FileSpec, present: bool) -> Result<Observed, ProviderError> {
    let want = f.content.as_ref().map(Content::len).or(f.size.map(|n| n as usize));
    let limit = want.map_or(0, |w| (w as u64).max(crate::report::DIFF_LIMIT));
    let read = sys.host.read_file(path, limit).map_err(fail)?;
    let mut seen =
        Observed { stat: read.as_ref().map(|r| r.stat), content: read.and_then(|r| r.content), ..Observed::default() };
    if present {
        sys.parent_must_exist(path, &seen)?;
        sys.name_owners(&mut seen, f.owner.is_some(), f.group.is_some());
    } else {
        sys.count_entries(path, &mut seen)?;
    }
    Ok(seen)
}

/// What differs between what was seen and what is declared. Pure.
pub fn diff(r: &Resource, f: &FileSpec, want: &Wanted, seen: &Observed) -> Result<Vec<Change>, ProviderError> {
    let path = r.id.title.as_str();
    let force = f.force.unwrap_or(false);
    if !present(r) {
        return diff_absent(path, seen, force);
    }
    let mut changes: Vec<Change> = diff_type(path, seen.stat.as_ref(), FileType::File, force)?.into_iter().collect();
    let is_file = seen.stat.is_some_and(|s| s.file_type == FileType::File);
    if let Some(content) = &f.content {
        // Content kept aside is read back only when the sizes match.
        let len = content.len() as u64;
        let differs = match (&seen.stat, &seen.content) {
            (Some(s), Some(have)) if is_file => s.size != len || have.as_slice() != &*wanted(r, content)?,
            (Some(s), None) if is_file => s.size != len || s.size > 0,
            _ => len > 0,
        };
        if differs {
            changes.push(content_change(path, r.sensitive(), is_file, seen, &wanted(r, content)?));
        }
    }
    if let (Some(reference), Some(size)) = (f.content_sha256.as_deref(), f.size) {
        let same = match (&seen.stat, &seen.content) {
            (Some(s), Some(have)) if is_file => {
                s.size == size && Some(crate::hash::sha256_hex(have).as_str()) == blob_hex(reference)
            }
            _ => false,
        };
        if !same {
            let from = match (is_file, &seen.content, &seen.stat) {
                (true, Some(have), _) => describe_content(have),
                (true, None, Some(s)) => format!("{} bytes (too large to read)", s.size),
                _ => "absent".to_string(),
            };
            let hex = blob_hex(reference).unwrap_or_default();
            changes.push(Change::new("content", from, format!("sha256:{} ({size} bytes)", &hex[..hex.len().min(12)])));
        }
    }
    changes.extend(diff_attrs(want, seen.stat.as_ref().filter(|_| is_file), seen));
    Ok(changes)
}

/// The blob `reference` names, read from the agent's blob store and checked against it.
fn blob(sys: &System, r: &Resource, reference: &str, size: u64) -> Result<Vec<u8>, ProviderError> {
    let hex = blob_hex(reference).ok_or_else(|| format!("{}: `content_sha256` is not a sha256 reference", r.id))?;
    let path = blob_path(hex);
    let read = sys.host.read_file(&path, size).map_err(fail)?;
    match read.and_then(|r| r.content) {
        Some(bytes) if bytes.len() as u64 == size && crate::hash::sha256_hex(&bytes) == hex => Ok(bytes),
        Some(_) => {
            // A damaged blob goes, so that the next run fetches it again.
            let _ = sys.host.remove(&path);
            Err(format!(
                "the blob {reference} in {path} is not what the catalog signed (damaged or cut short); the next \
             `converge run` fetches it again"
            )
            .into())
        }
        None => Err(format!(
            "the blob {reference} is not in {BLOB_STORE}: `converge run` fetches a catalog's blobs from its server \
             before it converges"
        )
        .into()),
    }
}

/// The catalog's bytes for the file.
fn wanted<'a>(r: &Resource, content: &'a Content) -> Result<std::borrow::Cow<'a, [u8]>, ProviderError> {
    content
        .bytes()
        .map_err(|e| format!("{}: cannot read its content back from where the agent kept it: {e}", r.id).into())
}

fn content_change(path: &str, sensitive: bool, is_file: bool, seen: &Observed, want: &[u8]) -> Change {
    // Sensitive content is told by its size alone: even a hash of a short secret could be
    // reversed by trying every candidate.
    let describe = |c: &[u8]| if sensitive { format!("{} bytes (sensitive)", c.len()) } else { describe_content(c) };
    let (from, old) = match (is_file, &seen.content, &seen.stat) {
        (true, Some(have), _) => (describe(have), Some(have.as_slice())),
        (true, None, Some(s)) => (format!("{} bytes (too large to show)", s.size), None),
        _ => ("absent".to_string(), Some(&[][..])),
    };
    let mut change = Change::new("content", from, describe(want));
    if !sensitive {
        change.diff = old.and_then(|old| unified_diff(path, &format!("{path} (catalog)"), old, want));
    }
    change
}

pub fn apply(
    sys: &System,
    r: &Resource,
    f: &FileSpec,
    state: &Checked,
    changes: &[Change],
) -> Result<(), ProviderError> {
    let path = r.id.title.as_str();
    let Checked { seen, want, .. } = state;
    let backup = f.backup.unwrap_or(true) && !r.sensitive();
    if !present(r) {
        return match &seen.stat {
            Some(s) => sys.remove_tree(path, s, backup),
            None => Ok(()),
        };
    }
    let existing_file = seen.stat.filter(|s| s.file_type == FileType::File);
    let rewrite = existing_file.is_none() || changes.iter().any(|c| c.attribute == "content");
    if let (false, Some(existing)) = (rewrite, &existing_file) {
        return sys.apply_attrs(path, want, existing);
    }
    // A file or symlink is replaced by the rename itself (a file is backed up first); anything
    // else goes before (force was checked by `diff`).
    match seen.stat.map(|s| (s.file_type, s)) {
        Some((FileType::File, _)) if backup => {
            sys.host.backup(path).map_err(fail)?;
        }
        Some((FileType::File | FileType::Symlink, _)) | None => {}
        Some((_, s)) => sys.remove_tree(path, &s, backup)?,
    }
    let new = NewAttrs {
        mode: want.mode.or(existing_file.map(|s| s.mode)).unwrap_or(0o644),
        uid: want.uid().or(existing_file.map(|s| s.uid)),
        gid: want.gid().or(existing_file.map(|s| s.gid)),
    };
    let fetched = match (f.content_sha256.as_deref(), f.size) {
        (Some(reference), Some(size)) => Some(blob(sys, r, reference, size)?),
        _ => None,
    };
    let declared = f.content.as_ref().map(|c| wanted(r, c)).transpose()?;
    let content = match (&declared, &fetched, &seen.content) {
        (Some(c), _, _) => c,
        (None, Some(b), _) => b.as_slice(),
        (None, None, Some(old)) => old.as_slice(),
        (None, None, None) => &[],
    };
    sys.host.write_file(path, content, new, f.validate.as_deref()).map_err(|e| match e {
        HostError::Command { command, status, .. } if r.sensitive() => ProviderError::Declared(format!(
            "validate `{command}` {status} (its output is hidden: the resource is sensitive)"
        )),
        HostError::Command { .. } => {
            ProviderError::Declared(format!("validate refused the new content, {path} left as it was: {e}"))
        }
        e => fail_create(e),
    })
}

#[cfg(test)]
mod tests {
    /// Pure tests of `diff`: no host at all.
    mod pure {
        use super::super::diff;
        use crate::catalog::{FileSpec, Kind, Meta, Resource, ResourceId, Spec};
        use crate::host::{FileType, Stat};
        use crate::providers::{Observed, Wanted};

        fn file(spec: FileSpec) -> Resource {
            Resource::new(ResourceId::new(Kind::File, "/f").unwrap(), Meta::default(), Spec::File(spec.clone()))
        }

        fn seen(content: &str, mode: u32, uid: u32) -> Observed {
            let stat = Stat { file_type: FileType::File, mode, uid, gid: 0, size: content.len() as u64 };
            Observed {
                stat: Some(stat),
                content: Some(content.as_bytes().to_vec()),
                owner: Some(format!("user{uid}")),
                ..Observed::default()
            }
        }

        /// `(attribute, from, to)` of each change.
        fn check(spec: FileSpec, want: Wanted, seen: &Observed) -> Result<Vec<(String, String, String)>, String> {
            let r = file(spec.clone());
            let Spec::File(f) = &r.spec else { unreachable!() };
            Ok(diff(&r, f, &want, seen)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|c| (c.attribute, c.from, c.to))
                .collect())
        }

        fn t(a: &str, b: &str, c: &str) -> (String, String, String) {
            (a.into(), b.into(), c.into())
        }

        #[test]
        fn in_sync_is_empty() {
            let spec = FileSpec { content: Some("x".into()), ..Default::default() };
            let want = Wanted { mode: Some(0o644), owner: Some((0, "root".into())), group: None };
            assert_eq!(check(spec, want, &seen("x", 0o644, 0)).unwrap(), vec![]);
        }

        #[test]
        fn unmanaged_attributes_never_differ() {
            assert_eq!(check(FileSpec::default(), Wanted::default(), &seen("anything", 0o777, 42)).unwrap(), vec![]);
        }

        #[test]
        fn each_attribute_from_to() {
            let spec = FileSpec { content: Some("new".into()), ..Default::default() };
            let want = Wanted { mode: Some(0o600), owner: Some((7, "deploy".into())), group: None };
            let got = check(spec, want, &seen("old", 0o644, 0)).unwrap();
            assert_eq!(got[0].0, "content");
            assert_eq!(&got[1..], [t("mode", "0644", "0600"), t("owner", "user0", "deploy")]);
        }

        #[test]
        fn same_size_different_bytes_differ() {
            let spec = FileSpec { content: Some("abc".into()), ..Default::default() };
            assert_eq!(check(spec, Wanted::default(), &seen("abd", 0o644, 0)).unwrap().len(), 1);
        }

        #[test]
        fn a_new_file_lists_what_it_will_be() {
            let spec = FileSpec { content: Some("x".into()), ..Default::default() };
            let want = Wanted { mode: Some(0o640), ..Wanted::default() };
            let got = check(spec, want, &Observed::default()).unwrap();
            assert_eq!(got[0], t("ensure", "absent", "file"));
            assert_eq!(got[2], t("mode", "absent", "0640"));
        }

        #[test]
        fn another_type_needs_force() {
            let dir = Observed {
                stat: Some(Stat { file_type: FileType::Directory, mode: 0o755, uid: 0, gid: 0, size: 0 }),
                ..Observed::default()
            };
            let e = check(FileSpec::default(), Wanted::default(), &dir).unwrap_err().to_string();
            assert_eq!(e, "/f is a directory, not a file; set `force: true` to replace it");
            let forced = check(FileSpec { force: Some(true), ..Default::default() }, Wanted::default(), &dir).unwrap();
            assert_eq!(forced, vec![t("ensure", "directory", "file")]);
        }
    }

    use crate::host::memory::{MemHost, MemNode};
    use crate::report::{ResourceEvent, Status};

    fn check(host: &MemHost, yaml: &str, dry_run: bool) -> ResourceEvent {
        crate::providers::converge_yaml(host, yaml, dry_run).pop().unwrap()
    }

    const MOTD: &str = "  - file: /etc/motd\n    content: \"new\\n\"\n    mode: \"0644\"\n";

    /// Files and directories ready together share their flushes: one release per group
    /// (directories, then files up to the next resource of another kind), each file checked
    /// in place after it; a file that fails to go in place fails alone, and its dependents.
    #[test]
    fn ready_files_share_their_flushes_and_fail_alone() {
        let mut yaml = String::from("  - directory: /srv\n");
        for d in 0..3 {
            yaml.push_str(&format!("  - directory: /srv/d{d}\n"));
            for f in 0..10 {
                yaml.push_str(&format!("  - file: /srv/d{d}/f{f}\n    content: \"{d}{f}\"\n"));
            }
        }
        yaml.push_str("  - exec: stamp\n    command: [/bin/true]\n    requires: [\"file:/srv/d2/f9\"]\n");
        yaml.push_str("  - file: /srv/after\n    content: after\n");
        let host = MemHost::new().fail_release("/srv/d1/f3").fail_on("/srv/d0/f5", "No space left on device");
        let events = crate::providers::converge_yaml(&host, &yaml, false);
        let status = |id: &str| events.iter().find(|e| e.id == id).map(|e| e.status.clone()).unwrap();
        assert_eq!(status("file:/srv/d0/f0"), Status::Changed);
        assert_eq!(host.content("/srv/d2/f9").as_deref(), Some("29"));
        assert_eq!(status("file:/srv/d1/f3"), Status::Failed);
        let failed = events.iter().find(|e| e.id == "file:/srv/d1/f3").unwrap();
        assert!(failed.message.as_deref().unwrap_or("").contains("rename into place"), "{failed:?}");
        assert_eq!(host.content("/srv/d1/f3"), None);
        assert_eq!(status("file:/srv/d1/f4"), Status::Changed, "the rest of its batch went in place");
        // A file that cannot be written (a full disk) fails alone in its batch too.
        let full = events.iter().find(|e| e.id == "file:/srv/d0/f5").unwrap();
        assert_eq!(full.status, Status::Failed);
        assert!(full.message.as_deref().unwrap_or("").contains("No space left"), "{full:?}");
        assert_eq!(host.content("/srv/d0/f5"), None);
        assert_eq!(status("file:/srv/d0/f6"), Status::Changed);
        assert_eq!(status("exec:stamp"), Status::Changed);
        assert_eq!(host.content("/srv/after").as_deref(), Some("after"));
        // /srv; the three directories with d0's files; d1's and d2's files; /srv/after.
        assert!((2..=4).contains(&host.releases()), "{} releases", host.releases());
        let order: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
        let declared: Vec<String> = crate::load::load("t.yaml", &format!("format: 1\nresources:\n{yaml}"), None)
            .unwrap()
            .catalog
            .resources
            .iter()
            .map(|r| r.id.to_string())
            .collect();
        assert_eq!(order, declared, "events in the plan's order");
        // The second run: nothing to do, nothing released.
        let before = host.releases();
        let again = crate::providers::converge_yaml(&host, &yaml, false);
        let refused = ["file:/srv/d1/f3", "file:/srv/d0/f5", "exec:stamp"];
        assert!(again.iter().filter(|e| !refused.contains(&e.id.as_str())).all(|e| e.status == Status::Unchanged));
        assert_eq!(host.releases(), before + 1, "only the refused files are tried again");
    }

    /// A file that says what accounts exist is written on its own, at once: a file after it in
    /// the same batch may be owned by a user it declares.
    #[test]
    fn account_files_are_never_held_in_a_batch() {
        use crate::engine::{Batch, Providers};
        let yaml = "  - file: /etc/passwd\n    content: \"root:x:0:0::/root:/bin/sh\\n\"\n  - file: /etc/motd\n    content: hi\n";
        let loaded = crate::load::load("t.yaml", &format!("format: 1\nresources:\n{yaml}"), None).unwrap();
        let host = MemHost::new().with_dir("/etc", 0o755);
        let sys = crate::providers::System::new(&host, &loaded.catalog.resources);
        let batched: Vec<Option<Batch>> = loaded.catalog.resources.iter().map(|r| sys.batched(r)).collect();
        assert_eq!(batched, [None, Some(Batch::Adjacent)]);
    }

    /// A batch never reaches past a resource of another kind: a command declared between two
    /// groups of files runs after the first group is in place and before the second is written.
    #[test]
    fn a_batch_stops_at_a_resource_of_another_kind() {
        let mut yaml = String::from("  - directory: /a\n");
        for f in 0..5 {
            yaml.push_str(&format!("  - file: /a/f{f}\n    content: f\n"));
        }
        yaml.push_str("  - exec: between\n    command: [/bin/true]\n");
        for g in 0..5 {
            yaml.push_str(&format!("  - file: /a/g{g}\n    content: g\n"));
        }
        let host = MemHost::new();
        let events = crate::providers::converge_yaml(&host, &yaml, false);
        assert!(events.iter().all(|e| e.status == Status::Changed), "{events:?}");
        assert_eq!(host.releases(), 2, "f0-f4, then g0-g4 after the command");
    }

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
        let hash = |s: &str| crate::hash::sha256_hex(s.as_bytes())[..12].to_string();
        assert!(!shown.contains(&hash("hunter2\n")) && !shown.contains(&hash("s3cret\n")), "no hash: {shown}");
        assert_eq!(
            (e.changes[0].from.as_str(), e.changes[0].to.as_str()),
            ("8 bytes (sensitive)", "7 bytes (sensitive)")
        );
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
    fn a_missing_parent_fails_clearly_even_in_a_dry_run() {
        let host = MemHost::new();
        let e = check(&host, MOTD, true);
        assert_eq!(e.status, Status::Failed);
        assert_eq!(
            e.message.as_deref(),
            Some("cannot create /etc/motd: its directory /etc does not exist; declare it as a `directory` resource")
        );
        let e = check(&host, MOTD, false);
        assert_eq!(e.status, Status::Failed);
        assert!(e.message.as_deref().unwrap().contains("declare it as a `directory` resource"), "{e:?}");
    }

    #[test]
    fn a_blob_comes_from_the_store_checked_against_its_signed_hash() {
        let bytes: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        let hex = crate::hash::sha256_hex(&bytes);
        let store = |host: &MemHost, content: &[u8]| {
            host.put(
                &crate::catalog::blob_path(&hex),
                MemNode::File { content: content.to_vec(), mode: 0o600, uid: 0, gid: 0 },
            )
        };
        let yaml = format!("  - file: /srv/tool.bin\n    content_sha256: \"sha256:{hex}\"\n    size: 5000\n");
        let host = MemHost::new().with_dir("/srv", 0o755);
        // Not fetched: said, nothing written.
        let e = check(&host, &yaml, false);
        assert_eq!(e.status, Status::Failed);
        assert!(e.message.unwrap().contains("is not in /var/lib/converge/blobs"), "a missing blob");
        // Damaged in the store: refused.
        store(&host, &bytes[..4999]);
        let e = check(&host, &yaml, false);
        assert!(e.message.unwrap().contains("is not what the catalog signed"));
        assert_eq!(host.node("/srv/tool.bin"), None);
        store(&host, &bytes);
        let dry = check(&host, &yaml, true);
        assert_eq!(dry.changes[1].to, format!("sha256:{} (5000 bytes)", &hex[..12]));
        assert_eq!(check(&host, &yaml, false).status, Status::Changed);
        assert!(matches!(host.node("/srv/tool.bin"), Some(MemNode::File { content, .. }) if content == bytes));
        assert_eq!(check(&host, &yaml, false).status, Status::Unchanged);
    }
}
