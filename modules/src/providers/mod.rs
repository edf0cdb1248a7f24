//! Providers: how each kind is inspected, diffed and changed, over a [`Host`].
//!
//! [`System`] implements the engine's [`Providers`] by dispatching on the kind. Each kind's
//! module has `inspect` (reads the host, changes nothing), `diff` (pure: what was seen against
//! what is declared) and `apply`. What the path kinds
//! share lives here: owners and groups by name, mode/owner/group changes, type changes (which
//! need `force`), and removal that never follows a symlink and backs up what it removes.

use crate::catalog::{Ensure, Mode, Resource, Spec, join_path as join, parent_path as parent};
use crate::engine::Providers;
use crate::host::{FileType, Host, HostError, Stat};
use crate::report::{Change, describe_content, unified_diff};
use crate::validate::holds_protected;
use std::collections::HashSet;

pub mod directory;
pub mod file;
pub mod symlink;

/// The providers of this build over one host.
pub struct System<'h> {
    pub host: &'h dyn Host,
    /// Every path the catalog declares (present or absent): purge leaves them to their own
    /// resource.
    managed: HashSet<&'h str>,
}

/// What `inspect` saw of a path: everything `diff` needs, so that `diff` is pure.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    pub stat: Option<Stat>,
    /// The content of a regular file, when it was read (not when larger than asked).
    pub content: Option<Vec<u8>>,
    /// The target of a symlink.
    pub target: Option<String>,
    /// How many entries a directory holds, when that matters (removing it).
    pub entries: usize,
    /// Unmanaged children a purge would remove, and whether each is a non-empty directory.
    pub purge: Vec<(String, Stat, bool)>,
    /// The names of the path's owner and group, looked up when they are managed.
    pub owner: Option<String>,
    pub group: Option<String>,
}

/// Declared mode, owner and group, resolved to ids, with the names as written for reports.
/// `None` is unmanaged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Wanted {
    pub mode: Option<u32>,
    pub owner: Option<(u32, String)>,
    pub group: Option<(u32, String)>,
}

impl Wanted {
    fn uid(&self) -> Option<u32> {
        self.owner.as_ref().map(|o| o.0)
    }

    fn gid(&self) -> Option<u32> {
        self.group.as_ref().map(|g| g.0)
    }
}

/// What `check` hands to `apply`.
#[derive(Debug, Clone, Default)]
pub struct Checked {
    pub seen: Observed,
    pub want: Wanted,
}

impl<'h> System<'h> {
    pub fn new(host: &'h dyn Host, resources: &'h [Resource]) -> System<'h> {
        let managed = resources.iter().filter_map(Resource::path).collect();
        System { host, managed }
    }

    fn is_managed(&self, path: &str) -> bool {
        self.managed.contains(path)
    }

    /// Resolves the declared mode, owner and group (names or numbers).
    fn wanted(&self, mode: Option<Mode>, owner: Option<&str>, group: Option<&str>) -> Result<Wanted, String> {
        let owner = match owner {
            None => None,
            Some(o) => Some(match o.parse() {
                Ok(n) => (n, o.to_string()),
                Err(_) => {
                    let uid = self.host.user_id(o).map_err(fail)?;
                    (uid.ok_or_else(|| format!("owner `{o}` does not exist on this system"))?, o.to_string())
                }
            }),
        };
        let group = match group {
            None => None,
            Some(g) => Some(match g.parse() {
                Ok(n) => (n, g.to_string()),
                Err(_) => {
                    let gid = self.host.group_id(g).map_err(fail)?;
                    (gid.ok_or_else(|| format!("group `{g}` does not exist on this system"))?, g.to_string())
                }
            }),
        };
        Ok(Wanted { mode: mode.map(|m| m.0), owner, group })
    }

    /// Looks up the names of what owns the path, for the attributes the resource manages.
    fn name_owners(&self, seen: &mut Observed, owner: bool, group: bool) {
        if let Some(s) = seen.stat {
            if owner {
                seen.owner = Some(self.host.user_name(s.uid).unwrap_or_else(|| s.uid.to_string()));
            }
            if group {
                seen.group = Some(self.host.group_name(s.gid).unwrap_or_else(|| s.gid.to_string()));
            }
        }
    }

    /// Fails early, in a dry-run too, when `path` is to be created inside a directory that does
    /// not exist and that no resource will create.
    fn parent_must_exist(&self, path: &str, seen: &Observed) -> Result<(), String> {
        let Some(parent) = parent(path) else { return Ok(()) };
        if seen.stat.is_some() || self.is_managed(parent) || self.host.stat(parent).map_err(fail)?.is_some() {
            return Ok(());
        }
        Err(format!(
            "cannot create {path}: its directory {parent} does not exist; declare it as a `directory` resource"
        ))
    }

    /// Counts a directory's entries when the resource would remove it.
    fn count_entries(&self, path: &str, seen: &mut Observed) -> Result<(), String> {
        if seen.stat.is_some_and(|s| s.file_type == FileType::Directory) {
            seen.entries = self.host.list_dir(path).map_err(fail)?.len();
        }
        Ok(())
    }

    /// Sets what differs of mode, owner and group on an existing path.
    fn apply_attrs(&self, path: &str, want: &Wanted, have: &Stat) -> Result<(), String> {
        let uid = want.uid().filter(|u| *u != have.uid);
        let gid = want.gid().filter(|g| *g != have.gid);
        // Owner first: chown clears setuid/setgid bits, so the mode goes on afterwards.
        if uid.is_some() || gid.is_some() {
            self.host.set_owner(path, uid, gid).map_err(fail)?;
        }
        if let Some(m) = want.mode
            && (m != have.mode || uid.is_some() || gid.is_some())
        {
            self.host.set_mode(path, m).map_err(fail)?;
        }
        Ok(())
    }

    /// Removes what is at `path`, depth first, never following a symlink; regular files are
    /// backed up first when `backup`.
    fn remove_tree(&self, path: &str, stat: &Stat, backup: bool) -> Result<(), String> {
        refuse_protected(path)?;
        match stat.file_type {
            FileType::Directory => {
                for (name, _) in self.host.list_dir(path).map_err(fail)? {
                    let child = join(path, &name);
                    if let Some(cs) = self.host.stat(&child).map_err(fail)? {
                        self.remove_tree(&child, &cs, backup)?;
                    }
                }
            }
            FileType::File if backup => {
                self.host.backup(path).map_err(fail)?;
            }
            _ => {}
        }
        self.host.remove(path).map_err(fail)
    }
}

/// The mode, owner and group changes from what was seen (`have`: the path as it is, `None` when
/// it will be created) to what is wanted. Pure.
fn diff_attrs(want: &Wanted, have: Option<&Stat>, seen: &Observed) -> Vec<Change> {
    let mut changes = Vec::new();
    let from = |label: &Option<String>, id: u32| label.clone().unwrap_or_else(|| id.to_string());
    if let Some(m) = want.mode
        && have.is_none_or(|s| s.mode != m)
    {
        changes.push(Change::new(
            "mode",
            have.map_or("absent".into(), |s| Mode(s.mode).to_string()),
            Mode(m).to_string(),
        ));
    }
    if let Some((uid, name)) = &want.owner
        && have.is_none_or(|s| s.uid != *uid)
    {
        changes.push(Change::new("owner", have.map_or("absent".into(), |s| from(&seen.owner, s.uid)), name.clone()));
    }
    if let Some((gid, name)) = &want.group
        && have.is_none_or(|s| s.gid != *gid)
    {
        changes.push(Change::new("group", have.map_or("absent".into(), |s| from(&seen.group, s.gid)), name.clone()));
    }
    changes
}

/// The change that makes `path` of type `want`, if it is another type. Replacing another type
/// needs `force`; the error says so. Pure.
fn diff_type(path: &str, have: Option<&Stat>, want: FileType, force: bool) -> Result<Option<Change>, String> {
    match have {
        None => Ok(Some(Change::new("ensure", "absent", want.name()))),
        Some(s) if s.file_type == want => Ok(None),
        Some(s) if !force => {
            Err(format!("{path} is a {}, not a {}; set `force: true` to replace it", s.file_type.name(), want.name()))
        }
        Some(s) => {
            refuse_protected(path)?;
            Ok(Some(Change::new("ensure", s.file_type.name(), want.name())))
        }
    }
}

/// The change that removes whatever is at `path`; a non-empty directory needs `force`. Pure.
fn diff_absent(path: &str, seen: &Observed, force: bool) -> Result<Vec<Change>, String> {
    let Some(s) = seen.stat else { return Ok(vec![]) };
    if s.file_type == FileType::Directory && seen.entries > 0 && !force {
        return Err(format!(
            "{path} is a directory holding {} entries; set `force: true` to remove it and everything in it",
            seen.entries
        ));
    }
    refuse_protected(path)?;
    Ok(vec![Change::new("ensure", s.file_type.name(), "absent")])
}

fn refuse_protected(path: &str) -> Result<(), String> {
    if holds_protected(path) {
        return Err(format!("{path} holds converge's own files; it is never removed"));
    }
    Ok(())
}

fn fail(e: HostError) -> String {
    e.to_string()
}

/// For operations that create something: a missing parent gets a hint.
fn fail_create(e: HostError) -> String {
    if e.is_not_found() {
        format!("{e} (its parent directory is missing: declare it as a `directory` resource)")
    } else {
        e.to_string()
    }
}

impl Providers for System<'_> {
    type State = Checked;

    fn check(&self, r: &Resource) -> Result<(Checked, Vec<Change>), String> {
        let path = r.id.title.as_str();
        let (seen, want, changes) = match &r.spec {
            Spec::File(f) => {
                let seen = file::inspect(self, path, f, present(r))?;
                let want = if present(r) {
                    self.wanted(f.mode, f.owner.as_deref(), f.group.as_deref())?
                } else {
                    Wanted::default()
                };
                let changes = file::diff(r, f, &want, &seen)?;
                (seen, want, changes)
            }
            Spec::Directory(d) => {
                let seen = directory::inspect(self, path, d, present(r))?;
                let want = if present(r) {
                    self.wanted(d.mode, d.owner.as_deref(), d.group.as_deref())?
                } else {
                    Wanted::default()
                };
                let changes = directory::diff(r, d, &want, &seen)?;
                (seen, want, changes)
            }
            Spec::Symlink(s) => {
                let seen = symlink::inspect(self, path, present(r))?;
                let changes = symlink::diff(r, s, &seen)?;
                (seen, Wanted::default(), changes)
            }
            Spec::Package(_) | Spec::User(_) | Spec::Group(_) | Spec::Service(_) | Spec::Exec(_) => {
                return Err(format!(
                    "this agent does not converge {} resources yet; nothing was done for it",
                    r.id.kind
                ));
            }
        };
        Ok((Checked { seen, want }, changes))
    }

    fn apply(&self, r: &Resource, state: &Checked, changes: &[Change]) -> Result<(), String> {
        match &r.spec {
            Spec::File(f) => file::apply(self, r, f, state, changes),
            Spec::Directory(d) => directory::apply(self, r, d, state),
            Spec::Symlink(s) => symlink::apply(self, r, s, &state.seen),
            _ => Err(format!("this agent does not converge {} resources yet", r.id.kind)),
        }
    }

    /// Files, directories and symlinks have nothing to do on a notify.
    fn refresh(&self, _: &Resource, _: bool) -> Result<Option<String>, String> {
        Ok(None)
    }
}

/// Whether the resource wants its path to exist.
fn present(r: &Resource) -> bool {
    r.spec.ensure() == Ensure::Present
}

/// Converges a catalog of `yaml` resources on a memory host and returns every event: the
/// shared harness of the providers' tests.
#[cfg(test)]
pub(crate) fn converge_yaml(
    host: &crate::host::memory::MemHost,
    yaml: &str,
    dry_run: bool,
) -> Vec<crate::report::ResourceEvent> {
    use crate::engine::{Options, run};
    use crate::report::{Collect, RunInfo};
    let loaded = crate::load::load("t.yaml", &format!("format: 1\nresources:\n{yaml}"), None).expect("valid catalog");
    let sys = System::new(host, &loaded.catalog.resources);
    let mut sink = Collect::default();
    let info = RunInfo {
        catalog: "t".into(),
        host: None,
        serial: None,
        commit: None,
        dry_run,
        resources: loaded.catalog.resources.len(),
        signed_by: None,
        warnings: vec![],
    };
    run(&loaded, &sys, Options { dry_run, stop: None }, info, &mut sink);
    sink.resources
}
