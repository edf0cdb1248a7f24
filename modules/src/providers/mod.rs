//! Providers: how each kind is inspected, diffed and changed, over a [`Host`].
//!
//! [`System`] implements the engine's [`Providers`] by dispatching on the kind. Each kind's
//! module has `check` (inspect, read only, then a pure diff) and `apply`. What the path kinds
//! share lives here: owners and groups by name, mode/owner/group changes, type changes (which
//! need `force`), and removal that never follows a symlink and backs up what it removes.

use crate::catalog::{Ensure, Mode, Resource, Spec};
use crate::engine::Providers;
use crate::hash::sha256_hex;
use crate::host::{FileType, Host, HostError, Stat};
use crate::report::Change;
use crate::validate::holds_protected;
use std::collections::HashSet;

pub mod directory;
pub mod file;
pub mod symlink;

/// Content larger than this is compared but never shown as a diff.
pub const DIFF_LIMIT: u64 = 1 << 20;
/// At most this many lines of a unified diff are shown.
pub const DIFF_LINES: usize = 400;

/// The providers of this build over one host.
pub struct System<'h> {
    pub host: &'h dyn Host,
    /// Every path the catalog declares (present or absent): purge leaves them to their own
    /// resource.
    managed: HashSet<&'h str>,
}

/// What `check` saw of a path, handed to `apply`.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub stat: Option<Stat>,
    /// The content of a regular file, when it was read.
    pub content: Option<Vec<u8>>,
    /// Children a purge will remove, with their types.
    pub purge: Vec<(String, Stat)>,
}

impl<'h> System<'h> {
    pub fn new(host: &'h dyn Host, resources: &'h [Resource]) -> System<'h> {
        let managed = resources.iter().filter_map(Resource::path).collect();
        System { host, managed }
    }

    fn is_managed(&self, path: &str) -> bool {
        self.managed.contains(path)
    }

    /// A uid from a user name or number.
    fn uid(&self, name: &str) -> Result<u32, String> {
        if let Ok(n) = name.parse() {
            return Ok(n);
        }
        self.host.user_id(name).map_err(fail)?.ok_or_else(|| format!("owner `{name}` does not exist on this system"))
    }

    fn gid(&self, name: &str) -> Result<u32, String> {
        if let Ok(n) = name.parse() {
            return Ok(n);
        }
        self.host.group_id(name).map_err(fail)?.ok_or_else(|| format!("group `{name}` does not exist on this system"))
    }

    fn user_label(&self, uid: u32) -> String {
        self.host.user_name(uid).unwrap_or_else(|| uid.to_string())
    }

    fn group_label(&self, gid: u32) -> String {
        self.host.group_name(gid).unwrap_or_else(|| gid.to_string())
    }

    /// Resolves the declared mode, owner and group.
    fn wanted(&self, mode: Option<Mode>, owner: Option<&str>, group: Option<&str>) -> Result<Attrs, String> {
        Ok(Attrs {
            mode: mode.map(|m| m.0),
            uid: owner.map(|o| self.uid(o)).transpose()?,
            gid: group.map(|g| self.gid(g)).transpose()?,
        })
    }

    /// The mode, owner and group changes from `have` (None: the path is new) to `want`.
    fn attr_changes(&self, want: &Attrs, have: Option<&Stat>) -> Vec<Change> {
        let mut changes = Vec::new();
        let absent = || "absent".to_string();
        if let Some(m) = want.mode
            && have.is_none_or(|s| s.mode != m)
        {
            changes.push(Change::new(
                "mode",
                have.map_or_else(absent, |s| Mode(s.mode).to_string()),
                Mode(m).to_string(),
            ));
        }
        if let Some(u) = want.uid
            && have.is_none_or(|s| s.uid != u)
        {
            changes.push(Change::new(
                "owner",
                have.map_or_else(absent, |s| self.user_label(s.uid)),
                self.user_label(u),
            ));
        }
        if let Some(g) = want.gid
            && have.is_none_or(|s| s.gid != g)
        {
            changes.push(Change::new(
                "group",
                have.map_or_else(absent, |s| self.group_label(s.gid)),
                self.group_label(g),
            ));
        }
        changes
    }

    /// Sets what differs of mode, owner and group on an existing path.
    fn apply_attrs(&self, path: &str, want: &Attrs, have: &Stat) -> Result<(), String> {
        let uid = want.uid.filter(|u| *u != have.uid);
        let gid = want.gid.filter(|g| *g != have.gid);
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

    /// The change that makes `path` of type `want`, if it is another type. Replacing another
    /// type needs `force`; the error says so.
    fn retype(&self, path: &str, have: Option<&Stat>, want: FileType, force: bool) -> Result<Option<Change>, String> {
        match have {
            None => Ok(Some(Change::new("ensure", "absent", want.name()))),
            Some(s) if s.file_type == want => Ok(None),
            Some(s) if !force => Err(format!(
                "{path} is a {}, not a {}; set `force: true` to replace it",
                s.file_type.name(),
                want.name()
            )),
            Some(s) => {
                self.refuse_protected(path)?;
                Ok(Some(Change::new("ensure", s.file_type.name(), want.name())))
            }
        }
    }

    /// The change that removes whatever is at `path`; a non-empty directory needs `force`.
    fn absent_changes(&self, path: &str, have: Option<&Stat>, force: bool) -> Result<Vec<Change>, String> {
        let Some(s) = have else { return Ok(vec![]) };
        if s.file_type == FileType::Directory {
            let n = self.host.list_dir(path).map_err(fail)?.len();
            if n > 0 && !force {
                return Err(format!(
                    "{path} is a directory holding {n} entries; set `force: true` to remove it and everything in it"
                ));
            }
        }
        self.refuse_protected(path)?;
        Ok(vec![Change::new("ensure", s.file_type.name(), "absent")])
    }

    fn refuse_protected(&self, path: &str) -> Result<(), String> {
        if holds_protected(path) {
            return Err(format!("{path} holds converge's own files; it is never removed"));
        }
        Ok(())
    }

    /// Removes what is at `path`, depth first, never following a symlink; regular files are
    /// backed up first when `backup`.
    fn remove_tree(&self, path: &str, stat: &Stat, backup: bool) -> Result<(), String> {
        self.refuse_protected(path)?;
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

/// Declared mode, uid and gid; `None` is unmanaged.
#[derive(Debug, Clone, Copy, Default)]
struct Attrs {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
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

pub(crate) fn join(dir: &str, name: &str) -> String {
    if dir == "/" { format!("/{name}") } else { format!("{dir}/{name}") }
}

/// `sha256:` and the first 12 hex digits, with the size: enough to tell contents apart.
fn describe_content(content: &[u8]) -> String {
    format!("sha256:{} ({} bytes)", &sha256_hex(content)[..12], content.len())
}

/// A unified diff from `old` to `new`, when both are text and not too large.
fn unified_diff(path: &str, old: &[u8], new: &[u8]) -> Option<String> {
    if old.len() as u64 > DIFF_LIMIT || new.len() as u64 > DIFF_LIMIT {
        return None;
    }
    let (old, new) = (std::str::from_utf8(old).ok()?, std::str::from_utf8(new).ok()?);
    let diff = similar::TextDiff::from_lines(old, new);
    let text = diff.unified_diff().context_radius(3).header(path, &format!("{path} (catalog)")).to_string();
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() > DIFF_LINES {
        let mut cut = lines[..DIFF_LINES].join("\n");
        cut.push_str(&format!("\n... {} more lines of diff not shown", lines.len() - DIFF_LINES));
        Some(cut)
    } else {
        Some(text)
    }
}

impl Providers for System<'_> {
    type State = Observed;

    fn check(&self, r: &Resource) -> Result<(Observed, Vec<Change>), String> {
        match &r.spec {
            Spec::File(f) => file::check(self, r, f),
            Spec::Directory(d) => directory::check(self, r, d),
            Spec::Symlink(s) => symlink::check(self, r, s),
        }
    }

    fn apply(&self, r: &Resource, state: &Observed, changes: &[Change]) -> Result<(), String> {
        match &r.spec {
            Spec::File(f) => file::apply(self, r, f, state, changes),
            Spec::Directory(d) => directory::apply(self, r, d, state, changes),
            Spec::Symlink(s) => symlink::apply(self, r, s, state),
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
