//! `symlink`: a symbolic link and its target, written as given (never resolved).

use super::{Observed, System, fail, fail_create, present};
use crate::catalog::{Resource, SymlinkSpec};
use crate::host::FileType;
use crate::report::Change;

pub fn check(sys: &System, r: &Resource, s: &SymlinkSpec) -> Result<(Observed, Vec<Change>), String> {
    let path = r.id.title.as_str();
    let stat = sys.host.stat(path).map_err(fail)?;
    let observed = Observed { stat, ..Observed::default() };
    let force = s.force.unwrap_or(false);
    if !present(r) {
        let changes = sys.absent_changes(path, stat.as_ref(), force)?;
        return Ok((observed, changes));
    }
    let target = s.target.as_deref().expect("validated: a present symlink has a target");
    let mut changes: Vec<Change> = sys.retype(path, stat.as_ref(), FileType::Symlink, force)?.into_iter().collect();
    let have = match stat {
        Some(st) if st.file_type == FileType::Symlink => Some(sys.host.read_link(path).map_err(fail)?),
        _ => None,
    };
    if have.as_deref() != Some(target) {
        changes.push(Change::new("target", have.unwrap_or_else(|| "absent".into()), target));
    }
    Ok((observed, changes))
}

pub fn apply(sys: &System, r: &Resource, s: &SymlinkSpec, seen: &Observed) -> Result<(), String> {
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
    use crate::engine::{Options, run};
    use crate::host::memory::{MemHost, MemNode};
    use crate::load::load;
    use crate::providers::System;
    use crate::report::{Collect, ResourceEvent, RunInfo, Status};

    fn check(host: &MemHost, yaml: &str, dry_run: bool) -> ResourceEvent {
        let loaded = load("t.yaml", &format!("format: 1\nresources:\n{yaml}"), None).expect("valid catalog");
        let sys = System::new(host, &loaded.catalog.resources);
        let mut sink = Collect::default();
        let info = RunInfo { catalog: "t".into(), host: None, serial: None, commit: None, dry_run, resources: 1 };
        run(&loaded, &sys, Options { dry_run }, info, &mut sink);
        sink.resources.pop().unwrap()
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
