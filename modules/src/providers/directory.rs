//! `directory`: a directory's existence, mode, owner and group, and `purge` of what the catalog
//! does not declare in it.
//!
//! Purge removes only direct children that no resource declares, never follows symlinks, never
//! touches converge's own files, backs up files it removes, and fails rather than remove more
//! than `purge_limit` entries. Removing a non-empty directory needs `force`.

use super::{Checked, Observed, System, Wanted, diff_absent, diff_attrs, diff_type, fail, fail_create, present};
use crate::catalog::{DEFAULT_PURGE_LIMIT, DirectorySpec, Resource, join_path as join};
use crate::host::{FileType, NewAttrs};
use crate::providers::ProviderError;
use crate::report::Change;
use crate::validate::holds_protected;

/// Reads what is at the path and, for a purge, its unmanaged children.
pub fn inspect(sys: &System, path: &str, d: &DirectorySpec, present: bool) -> Result<Observed, ProviderError> {
    let mut seen = Observed { stat: sys.host.stat(path).map_err(fail)?, ..Observed::default() };
    if !present {
        sys.count_entries(path, &mut seen)?;
        return Ok(seen);
    }
    sys.parent_must_exist(path, &seen)?;
    sys.name_owners(&mut seen, d.owner.is_some(), d.group.is_some());
    if d.purge.unwrap_or(false) && seen.stat.is_some_and(|s| s.file_type == FileType::Directory) {
        for (name, _) in sys.host.list_dir(path).map_err(fail)? {
            let child = join(path, &name);
            if sys.is_managed(&child) || holds_protected(&child) {
                continue;
            }
            let Some(cs) = sys.host.stat(&child).map_err(fail)? else { continue };
            let non_empty = cs.file_type == FileType::Directory && !sys.host.list_dir(&child).map_err(fail)?.is_empty();
            seen.purge.push((child, cs, non_empty));
        }
    }
    Ok(seen)
}

/// What differs between what was seen and what is declared. Pure.
pub fn diff(r: &Resource, d: &DirectorySpec, want: &Wanted, seen: &Observed) -> Result<Vec<Change>, ProviderError> {
    let path = r.id.title.as_str();
    let force = d.force.unwrap_or(false);
    if !present(r) {
        return diff_absent(path, seen, force);
    }
    let mut changes: Vec<Change> =
        diff_type(path, seen.stat.as_ref(), FileType::Directory, force)?.into_iter().collect();
    let is_dir = seen.stat.is_some_and(|s| s.file_type == FileType::Directory);
    changes.extend(diff_attrs(want, seen.stat.as_ref().filter(|_| is_dir), seen));
    let limit = d.purge_limit.unwrap_or(DEFAULT_PURGE_LIMIT) as usize;
    if let Some((child, _, _)) = seen.purge.iter().find(|(_, _, non_empty)| *non_empty && !force) {
        return Err(format!(
            "purge would remove {child}, a directory that is not empty; set `force: true` to allow it"
        )
        .into());
    }
    if seen.purge.len() > limit {
        return Err(format!(
            "purge would remove {} entries from {path}, more than purge_limit ({limit}); raise purge_limit if that is meant",
            seen.purge.len()
        ).into());
    }
    for (child, cs, _) in &seen.purge {
        changes.push(Change::new("purge", format!("{child} ({})", cs.file_type.name()), "absent"));
    }
    Ok(changes)
}

pub fn apply(sys: &System, r: &Resource, d: &DirectorySpec, state: &Checked) -> Result<(), ProviderError> {
    let path = r.id.title.as_str();
    let Checked { seen, want, .. } = state;
    let backup = d.backup.unwrap_or(true) && !r.sensitive();
    if !present(r) {
        return match &seen.stat {
            Some(s) => sys.remove_tree(path, s, backup),
            None => Ok(()),
        };
    }
    match &seen.stat {
        Some(s) if s.file_type == FileType::Directory => sys.apply_attrs(path, want, s)?,
        other => {
            if let Some(s) = other {
                sys.remove_tree(path, s, backup)?;
            }
            let new = NewAttrs { mode: want.mode.unwrap_or(0o755), uid: want.uid(), gid: want.gid() };
            sys.host.mkdir(path, new).map_err(fail_create)?;
        }
    }
    for (child, cs, _) in &seen.purge {
        sys.remove_tree(child, cs, backup)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// Pure tests of `diff`.
    mod pure {
        use super::super::diff;
        use crate::catalog::{DirectorySpec, Ensure, Kind, Meta, Resource, ResourceId, Spec};
        use crate::host::{FileType, Stat};
        use crate::providers::{Observed, Wanted};

        fn stat(file_type: FileType) -> Stat {
            Stat { file_type, mode: 0o755, uid: 0, gid: 0, size: 0 }
        }

        fn check(spec: DirectorySpec, seen: &Observed) -> Result<Vec<String>, String> {
            let r = Resource::new(
                ResourceId::new(Kind::Directory, "/d").unwrap(),
                Meta::default(),
                Spec::Directory(spec.clone()),
            );
            let want = Wanted { mode: spec.mode.map(|m| m.0), ..Wanted::default() };
            Ok(diff(&r, &spec, &want, seen)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|c| format!("{}: {} -> {}", c.attribute, c.from, c.to))
                .collect())
        }

        #[test]
        fn purge_lists_each_child_and_respects_its_bounds() {
            let kids = |n: usize, non_empty: bool| Observed {
                stat: Some(stat(FileType::Directory)),
                purge: (0..n).map(|i| (format!("/d/{i}"), stat(FileType::Directory), non_empty)).collect(),
                ..Observed::default()
            };
            let purge = DirectorySpec { purge: Some(true), ..Default::default() };
            assert_eq!(
                check(purge.clone(), &kids(2, false)).unwrap(),
                ["purge: /d/0 (directory) -> absent", "purge: /d/1 (directory) -> absent"]
            );
            assert!(
                check(purge.clone(), &kids(101, false))
                    .unwrap_err()
                    .to_string()
                    .contains("more than purge_limit (100)")
            );
            assert!(check(purge.clone(), &kids(1, true)).unwrap_err().to_string().contains("set `force: true`"));
            assert_eq!(check(DirectorySpec { force: Some(true), ..purge }, &kids(1, true)).unwrap().len(), 1);
        }

        #[test]
        fn removal_of_a_non_empty_directory_needs_force() {
            let seen = Observed { stat: Some(stat(FileType::Directory)), entries: 3, ..Observed::default() };
            let absent = DirectorySpec { ensure: Some(Ensure::Absent), ..Default::default() };
            assert!(check(absent.clone(), &seen).unwrap_err().to_string().contains("holding 3 entries"));
            assert_eq!(
                check(DirectorySpec { force: Some(true), ..absent }, &seen).unwrap(),
                ["ensure: directory -> absent"]
            );
        }
    }

    use crate::host::memory::{MemHost, MemNode};
    use crate::report::{ResourceEvent, Status};

    fn check(host: &MemHost, yaml: &str, dry_run: bool) -> Vec<ResourceEvent> {
        crate::providers::converge_yaml(host, yaml, dry_run)
    }

    #[test]
    fn a_dry_run_of_a_new_tree_predicts_no_failure() {
        let host = MemHost::new();
        let e =
            check(&host, "  - directory: /srv\n  - directory: /srv/app\n  - file: /srv/app/x\n    content: x\n", true);
        assert!(e.iter().all(|e| e.status == Status::WouldChange), "{e:?}");
    }

    #[test]
    fn creates_with_mode_then_is_unchanged() {
        let host = MemHost::new();
        let e = check(&host, "  - directory: /srv\n    mode: \"0750\"\n", false);
        assert_eq!(e[0].status, Status::Changed);
        assert_eq!(host.node("/srv"), Some(MemNode::Directory { mode: 0o750, uid: 0, gid: 0 }));
        assert_eq!(check(&host, "  - directory: /srv\n    mode: \"0750\"\n", false)[0].status, Status::Unchanged);
    }

    #[test]
    fn purge_removes_only_unmanaged_children_and_backs_them_up() {
        let host = MemHost::new()
            .with_file("/etc/app/keep.conf", "k", 0o644)
            .with_file("/etc/app/stray.conf", "s", 0o644)
            .with_symlink("/etc/app/link", "/etc/shadow")
            .with_file("/etc/shadow", "secret", 0o600);
        let decl = "  - directory: /etc/app\n    purge: true\n  - file: /etc/app/keep.conf\n    content: k\n";
        let before = host.snapshot();
        let e = check(&host, decl, true);
        assert_eq!(host.snapshot(), before);
        let purged: Vec<&str> = e[0].changes.iter().map(|c| c.from.as_str()).collect();
        assert_eq!(purged, ["/etc/app/link (symlink)", "/etc/app/stray.conf (file)"]);
        check(&host, decl, false);
        assert!(host.node("/etc/app/stray.conf").is_none());
        assert!(host.node("/etc/app/link").is_none());
        assert_eq!(host.content("/etc/shadow").unwrap(), "secret", "a symlink is removed, never followed");
        assert_eq!(host.backups(), vec![("/etc/app/stray.conf".to_string(), b"s".to_vec())]);
        assert_eq!(check(&host, decl, false)[0].status, Status::Unchanged);
    }

    #[test]
    fn purge_limit_and_non_empty_children() {
        let host =
            MemHost::new().with_file("/d/a", "", 0o644).with_file("/d/b", "", 0o644).with_file("/d/sub/x", "", 0o644);
        let e = check(&host, "  - directory: /d\n    purge: true\n", false);
        assert!(e[0].message.as_deref().unwrap().contains("/d/sub, a directory that is not empty"));
        let e = check(&host, "  - directory: /d\n    purge: true\n    purge_limit: 2\n    force: true\n", false);
        assert!(e[0].message.as_deref().unwrap().contains("more than purge_limit (2)"), "{e:?}");
        assert_eq!(host.mutations(), 0);
        let e = check(&host, "  - directory: /d\n    purge: true\n    force: true\n", false);
        assert_eq!(e[0].status, Status::Changed);
        assert_eq!(host.list_dir_names("/d"), Vec::<String>::new());
    }

    #[test]
    fn purge_never_touches_converge_state() {
        let host =
            MemHost::new().with_file("/var/lib/converge/state", "x", 0o600).with_file("/var/lib/junk", "", 0o644);
        check(&host, "  - directory: /var/lib\n    purge: true\n", false);
        assert!(host.node("/var/lib/converge/state").is_some());
        assert!(host.node("/var/lib/junk").is_none());
    }

    #[test]
    fn absent_non_empty_needs_force() {
        let host = MemHost::new().with_file("/old/x", "", 0o644);
        let e = check(&host, "  - directory: /old\n    ensure: absent\n", false);
        assert!(e[0].message.as_deref().unwrap().contains("holding 1 entries"));
        let e = check(&host, "  - directory: /old\n    ensure: absent\n    force: true\n", false);
        assert_eq!(e[0].status, Status::Changed);
        assert!(host.node("/old").is_none());
    }
}
