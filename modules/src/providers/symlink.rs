//! `symlink`: a symbolic link and its target, written as given (never resolved).

use super::{Observed, System, diff_absent, diff_type, fail, fail_create, present};
use crate::catalog::{Resource, SymlinkSpec};
use crate::host::FileType;
use crate::providers::ProviderError;
use crate::report::Change;

/// Reads what is at the path and, for a symlink, its target.
pub fn inspect(sys: &System, path: &str, present: bool) -> Result<Observed, ProviderError> {
    let mut seen = Observed { stat: sys.host.stat(path).map_err(fail)?, ..Observed::default() };
    if seen.stat.is_some_and(|s| s.file_type == FileType::Symlink) {
        seen.target = Some(sys.host.read_link(path).map_err(fail)?);
    }
    if present {
        sys.parent_must_exist(path, &seen)?;
    } else {
        sys.count_entries(path, &mut seen)?;
    }
    Ok(seen)
}

/// What differs between what was seen and what is declared. Pure.
pub fn diff(r: &Resource, s: &SymlinkSpec, seen: &Observed) -> Result<Vec<Change>, ProviderError> {
    let path = r.id.title.as_str();
    let force = s.force.unwrap_or(false);
    if !present(r) {
        return diff_absent(path, seen, force);
    }
    let target = s.target.as_deref().expect("validated: a present symlink has a target");
    let mut changes: Vec<Change> = diff_type(path, seen.stat.as_ref(), FileType::Symlink, force)?.into_iter().collect();
    if seen.target.as_deref() != Some(target) {
        changes.push(Change::new("target", seen.target.clone().unwrap_or_else(|| "absent".into()), target));
    }
    Ok(changes)
}

pub fn apply(sys: &System, r: &Resource, s: &SymlinkSpec, seen: &Observed) -> Result<(), ProviderError> {
    let path = r.id.title.as_str();
    match &seen.stat {
        Some(st) if !present(r) => return sys.remove_tree(path, st, true),
        None if !present(r) => return Ok(()),
        // A file or symlink is replaced by the rename itself; a directory must go first.
        Some(st) if st.file_type == FileType::File => {
            sys.host.backup(path).map_err(fail)?;
        }
        Some(st) if st.file_type != FileType::Symlink => sys.remove_tree(path, st, true)?,
        _ => {}
    }
    let target = s.target.as_deref().expect("validated: a present symlink has a target");
    sys.host.symlink(path, target).map_err(fail_create)
}

#[cfg(test)]
mod tests {
    /// Pure tests of `diff`.
    mod pure {
        use super::super::diff;
        use crate::catalog::{Kind, Meta, Resource, ResourceId, Spec, SymlinkSpec};
        use crate::host::{FileType, Stat};
        use crate::providers::Observed;

        fn check(target: &str, seen: &Observed) -> Result<Vec<String>, String> {
            let spec = SymlinkSpec { target: Some(target.into()), ..Default::default() };
            let r = Resource::new(
                ResourceId::new(Kind::Symlink, "/l").unwrap(),
                Meta::default(),
                Spec::Symlink(spec.clone()),
            );
            Ok(diff(&r, &spec, seen)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|c| format!("{}: {} -> {}", c.attribute, c.from, c.to))
                .collect())
        }

        #[test]
        fn targets_compare_as_written() {
            let link = |t: &str| Observed {
                stat: Some(Stat { file_type: FileType::Symlink, mode: 0o777, uid: 0, gid: 0, size: 1 }),
                target: Some(t.into()),
                ..Observed::default()
            };
            assert_eq!(check("a/b", &link("a/b")).unwrap(), Vec::<String>::new());
            assert_eq!(check("a/b", &link("a//b")).unwrap(), ["target: a//b -> a/b"], "never normalised");
            assert_eq!(
                check("/t", &Observed::default()).unwrap(),
                ["ensure: absent -> symlink", "target: absent -> /t"]
            );
        }
    }

    use crate::host::memory::{MemHost, MemNode};
    use crate::report::{ResourceEvent, Status};

    fn check(host: &MemHost, yaml: &str, dry_run: bool) -> ResourceEvent {
        crate::providers::converge_yaml(host, yaml, dry_run).pop().unwrap()
    }

    const LINK: &str = "  - symlink: /srv/current\n    target: releases/2\n";

    #[test]
    fn creates_retargets_and_settles() {
        let host = MemHost::new().with_symlink("/srv/current", "releases/1");
        let e = check(&host, LINK, true);
        assert_eq!(
            (e.changes[0].attribute.as_str(), e.changes[0].from.as_str(), e.changes[0].to.as_str()),
            ("target", "releases/1", "releases/2")
        );
        assert_eq!(host.mutations(), 0);
        assert_eq!(check(&host, LINK, false).status, Status::Changed);
        assert_eq!(host.node("/srv/current"), Some(MemNode::Symlink { target: "releases/2".into() }));
        assert_eq!(check(&host, LINK, false).status, Status::Unchanged);
    }

    #[test]
    fn a_file_in_the_way_needs_force_and_is_backed_up() {
        let host = MemHost::new().with_file("/srv/current", "data", 0o644);
        assert_eq!(check(&host, LINK, false).status, Status::Failed);
        let e = check(&host, "  - symlink: /srv/current\n    target: releases/2\n    force: true\n", false);
        assert_eq!(e.status, Status::Changed);
        assert_eq!(host.backups(), vec![("/srv/current".to_string(), b"data".to_vec())]);
    }
}
