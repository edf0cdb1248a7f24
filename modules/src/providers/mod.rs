//! Providers: how each kind is inspected, diffed and changed, over a [`Host`].
//!
//! [`System`] implements the engine's [`Providers`] by dispatching on the kind. Each kind's
//! module has `inspect` (reads the host, changes nothing), `diff` (pure: what was seen against
//! what is declared) and `apply`. What the path kinds
//! share lives here: owners and groups by name, mode/owner/group changes, type changes (which
//! need `force`), and removal that never follows a symlink and backs up what it removes.
//!
//! The system kinds read through caches that live for one run: one query of the package
//! database, of the accounts and of the units answers every resource, so a run that changes
//! nothing runs (almost) no process. A change forgets what it made stale, and a package
//! transaction or a command can change anything: accounts, units and packages are read again
//! after one (a package's install script makes its system user).
//!
//! A dry-run, and the plan a real run makes first, see the system as the run will have left
//! it by each resource's turn ([`Assumed`]): accounts the catalog creates earlier, directories
//! and homes that will exist.

use crate::catalog::{Ensure, Mode, PackageSpec, Resource, Spec, join_path as join, parent_path as parent};
use crate::engine::{Batch, Providers};
use crate::host::{FileType, Host, HostError, Stat};
use crate::report::{Change, describe_content, unified_diff};
use crate::validate::holds_protected;
use account::{AccountOp, Accounts};
use package::{Available, Install, Installed, PackageTool};
use service::{Unit, UnitAction};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use tool::ToolOptions;

pub mod account;
pub mod directory;
pub mod edit;
pub mod exec;
pub mod file;
#[cfg(test)]
mod honest;
pub mod mount;
pub mod package;
pub mod repository;
pub mod service;
pub mod symlink;
pub mod sysctl;
pub mod timer;
pub mod tool;

/// Where systemd reads unit files: a change there needs a daemon-reload before services act.
pub const UNIT_DIRS: &[&str] =
    &["/etc/systemd/system/", "/lib/systemd/system/", "/usr/lib/systemd/system/", "/run/systemd/system/"];

/// The providers of this build over one host.
pub struct System<'h> {
    pub host: &'h dyn Host,
    /// Every path the catalog declares (present or absent), and every file a resource writes
    /// into: purge leaves them to their resource.
    managed: HashSet<std::borrow::Cow<'h, str>>,
    /// Every package and service of the catalog: each is asked about once, all together.
    packages: Vec<(&'h str, &'h PackageSpec)>,
    services: Vec<String>,
    dry_run: bool,
    /// What the caller decided about the tools (the package lock's timeout).
    tools: ToolOptions,
    /// A live system running the agent: a change to its own package waits for the end of
    /// the run (the package manager would replace and restart the agent mid-run).
    self_upgrade_after_run: bool,
    /// That change, when this run deferred one.
    deferred_upgrade: RefCell<Option<Install>>,
    package_tool: std::cell::OnceCell<Result<&'static dyn PackageTool, package::NoPackageTool>>,
    run: RefCell<RunState>,
    /// A real run's plan is being made: check as in a dry-run.
    planning: std::cell::Cell<bool>,
    assumed: RefCell<Assumed>,
}

/// What a dry-run assumes the run will have done by the resource in hand.
#[derive(Debug, Default)]
struct Assumed {
    /// Account changes, replayed over the accounts read from the system.
    accounts: Vec<AccountOp>,
    /// Paths that will exist: declared ones, and homes `useradd` makes.
    paths: HashSet<String>,
    /// A package transaction or a command would have run before: it may make accounts, units
    /// and files that no resource declares.
    side_effects: bool,
}

/// What one run has learnt of the system, and what it did.
#[derive(Default)]
struct RunState {
    installed: Option<HashMap<String, Installed>>,
    available: Option<HashMap<String, Available>>,
    lists_refreshed: bool,
    accounts: Option<Accounts>,
    units: Option<HashMap<String, Unit>>,
    /// A unit file changed in this run and systemd has not reloaded yet.
    unit_files_changed: bool,
    /// Services this run started: a notify does nothing more to them.
    started: HashSet<String>,
    /// Commands this run ran.
    ran: HashSet<String>,
    /// The sysctl.d files, read once for every `sysctl` of the run.
    sysctl_files: Option<sysctl::Files>,
}

/// What a system kind's `apply` is to do.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Op {
    #[default]
    None,
    Install(Install),
    Remove(String),
    Accounts(Vec<AccountOp>),
    Unit {
        enable: Option<bool>,
        action: Option<UnitAction>,
    },
    Run,
    /// What a `mount` does, in order.
    Mount(Vec<mount::Step>),
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
    /// For the system kinds.
    pub op: Op,
    /// Why a held package is left as it is.
    pub held: Option<String>,
    /// In a dry-run: a removal needed only if an earlier change makes the path first.
    pub conditional: bool,
}

impl<'h> System<'h> {
    pub fn new(host: &'h dyn Host, resources: &'h [Resource]) -> System<'h> {
        let managed = resources
            .iter()
            .flat_map(|r| match r.path() {
                Some(p) => vec![std::borrow::Cow::Borrowed(p)],
                None => r.writes(),
            })
            .collect();
        let packages = resources
            .iter()
            .filter_map(|r| match &r.spec {
                Spec::Package(p) => Some((r.id.title.as_str(), p)),
                _ => None,
            })
            .collect();
        let services = resources
            .iter()
            .filter_map(|r| match &r.spec {
                Spec::Service(_) => Some(r.id.title.clone()),
                Spec::Timer(_) => Some(timer::timer_unit(&r.id.title)),
                _ => None,
            })
            .collect();
        System {
            host,
            managed,
            packages,
            services,
            dry_run: false,
            tools: ToolOptions::default(),
            self_upgrade_after_run: false,
            deferred_upgrade: RefCell::default(),
            package_tool: std::cell::OnceCell::new(),
            run: RefCell::default(),
            planning: std::cell::Cell::new(false),
            assumed: RefCell::default(),
        }
    }

    pub fn tool_options(mut self, tools: ToolOptions) -> Self {
        self.tools = tools;
        self
    }

    /// On a live system running the agent: its own package is changed after the run's report.
    pub fn self_upgrade_after_run(mut self, yes: bool) -> Self {
        self.self_upgrade_after_run = yes;
        self
    }

    /// The change to the agent's own package this run deferred, if any (taken).
    pub fn deferred_upgrade(&self) -> Option<Install> {
        self.deferred_upgrade.borrow_mut().take()
    }

    /// The host's package manager, chosen once a run.
    fn package_tool(&self) -> Result<&'static dyn PackageTool, ProviderError> {
        self.package_tool
            .get_or_init(|| package::tool_of(self.host))
            .clone()
            .map_err(|e| ProviderError::Declared(e.to_string()))
    }

    /// For a dry-run: nothing is refreshed (package lists, systemd's view of unit files).
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Whether checks are a prediction: a dry-run, or a real run's plan.
    fn dry(&self) -> bool {
        self.dry_run || self.planning.get()
    }

    /// Whether `path` will exist by now, by what this dry-run assumed.
    fn assumed_path(&self, path: &str) -> bool {
        self.dry() && self.assumed.borrow().paths.contains(path)
    }

    /// Whether an earlier assumed change may have made what no resource declares.
    fn assumed_side_effects(&self) -> bool {
        self.dry() && self.assumed.borrow().side_effects
    }

    /// The installed version of `name`, from one query for every package of the run.
    fn installed(&self, name: &str) -> Result<Option<Installed>, ProviderError> {
        if self.run.borrow().installed.is_none() {
            let names: Vec<&str> = self.packages.iter().map(|(n, _)| *n).collect();
            let installed = self.package_tool()?.installed(self.host, &names).map_err(fail)?;
            self.run.borrow_mut().installed = Some(installed);
        }
        Ok(self.run.borrow().installed.as_ref().and_then(|m| m.get(name).cloned()))
    }

    /// What the repositories offer of `name`, asked once for every package that needs it.
    /// When some package is not on offer, the package lists are refreshed once (not in a
    /// dry-run) and asked again.
    fn available(&self, name: &str, system: &dyn PackageTool) -> Result<Option<Available>, ProviderError> {
        if self.run.borrow().available.is_none() {
            let mut names: Vec<&str> = Vec::new();
            for (n, spec) in &self.packages {
                let installed = self.installed(n)?;
                if package::needs_available(&package::want(spec), installed.as_ref(), system) {
                    names.push(n);
                }
            }
            if !names.contains(&name) {
                names.push(name);
            }
            let mut offered = system.available(self.host, &names, false, &self.tools).map_err(fail)?;
            let missing = names.iter().any(|n| offered.get(*n).is_none_or(|a| a.versions.is_empty()));
            if missing && !self.dry() && !self.run.borrow().lists_refreshed {
                self.run.borrow_mut().lists_refreshed = true;
                offered = system.available(self.host, &names, true, &self.tools).map_err(fail)?;
            }
            self.run.borrow_mut().available = Some(offered);
        }
        Ok(self.run.borrow().available.as_ref().and_then(|m| m.get(name).cloned()))
    }

    /// Every local account, read once until something changes them; in a dry-run, with the
    /// account changes it assumed made.
    fn accounts(&self) -> Result<Accounts, ProviderError> {
        if self.run.borrow().accounts.is_none() {
            let accounts = account::shadow::read(self.host).map_err(fail)?;
            self.run.borrow_mut().accounts = Some(accounts);
        }
        let mut accounts = self.run.borrow().accounts.clone().unwrap_or_default();
        if self.dry() {
            for op in &self.assumed.borrow().accounts {
                account::simulate(&mut accounts, op);
            }
        }
        Ok(accounts)
    }

    fn forget_accounts(&self) {
        self.run.borrow_mut().accounts = None;
    }

    /// After a package transaction or a command: whatever they changed is read again.
    fn forget_system(&self) {
        let mut run = self.run.borrow_mut();
        run.installed = None;
        run.accounts = None;
        run.units = None;
        run.sysctl_files = None;
    }

    /// The unit of a service, from one query for every service of the run. A unit file
    /// changed by this run, or one systemd reports as changed on disk, gets one daemon-reload
    /// first (not in a dry-run).
    fn unit(&self, name: &str) -> Result<Unit, ProviderError> {
        if self.run.borrow().units.is_none() {
            if self.run.borrow().unit_files_changed && !self.dry() && !self.host.is_image() {
                service::systemd::daemon_reload(self.host).map_err(fail)?;
                self.run.borrow_mut().unit_files_changed = false;
            }
            let mut names: Vec<&str> = self.services.iter().map(String::as_str).collect();
            if !names.contains(&name) {
                names.push(name);
            }
            let mut units = service::systemd::units(self.host, &names).map_err(fail)?;
            if units.values().any(|u| u.needs_daemon_reload) && !self.dry() && !self.host.is_image() {
                service::systemd::daemon_reload(self.host).map_err(fail)?;
                units = service::systemd::units(self.host, &names).map_err(fail)?;
            }
            self.run.borrow_mut().units = Some(units);
        }
        Ok(self.run.borrow().units.as_ref().and_then(|m| m.get(name).cloned()).unwrap_or_default())
    }

    fn forget_units(&self) {
        self.run.borrow_mut().units = None;
    }

    /// Notes a change to a path: a unit file's change makes systemd reload before services act.
    fn path_changed(&self, path: &str) {
        if sysctl::is_sysctl_file(path) {
            self.run.borrow_mut().sysctl_files = None;
        }
        if UNIT_DIRS.iter().any(|d| path.starts_with(d)) {
            let mut run = self.run.borrow_mut();
            run.unit_files_changed = true;
            run.units = None;
        }
    }

    fn is_managed(&self, path: &str) -> bool {
        self.managed.contains(path)
    }

    /// Resolves the declared mode, owner and group (names or numbers).
    fn wanted(&self, mode: Option<Mode>, owner: Option<&str>, group: Option<&str>) -> Result<Wanted, ProviderError> {
        let owner = match owner {
            None => None,
            Some(o) => Some(self.resolve("owner", o, |n| self.host.user_id(n), |a| a.user(o).map(|u| u.uid))?),
        };
        let group = match group {
            None => None,
            Some(g) => Some(self.resolve("group", g, |n| self.host.group_id(n), |a| a.group(g).map(|x| x.gid))?),
        };
        Ok(Wanted { mode: mode.map(|m| m.0), owner, group })
    }

    /// An owner or group by number or name. A dry-run also knows the accounts it assumed made
    /// (a placeholder id when an earlier package or command may make it).
    fn resolve(
        &self,
        what: &str,
        name: &str,
        lookup: impl Fn(&str) -> crate::host::HostResult<Option<u32>>,
        assumed: impl Fn(&Accounts) -> Option<u32>,
    ) -> Result<(u32, String), ProviderError> {
        if let Ok(n) = name.parse() {
            return Ok((n, name.to_string()));
        }
        if let Some(id) = lookup(name).map_err(fail)? {
            return Ok((id, name.to_string()));
        }
        if self.dry() {
            if let Some(id) = assumed(&self.accounts()?) {
                return Ok((id, name.to_string()));
            }
            if self.assumed_side_effects() {
                return Ok((UNKNOWN_ID, name.to_string()));
            }
        }
        Err(format!("{what} `{name}` does not exist on this system").into())
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

    /// In a dry-run, whether `path` may be made by a package or command planned earlier: its
    /// directory does not exist yet either.
    fn may_be_made(&self, path: &str) -> Result<bool, ProviderError> {
        if !self.assumed_side_effects() {
            return Ok(false);
        }
        match parent(path) {
            Some(dir) => Ok(self.host.stat(dir).map_err(fail)?.is_none()),
            None => Ok(false),
        }
    }

    /// Fails early, in a dry-run too, when `path` is to be created inside a directory that does
    /// not exist and that no resource will create.
    fn parent_must_exist(&self, path: &str, seen: &Observed) -> Result<(), ProviderError> {
        let Some(parent) = parent(path) else { return Ok(()) };
        // In a dry-run, a package or command planned earlier may make it (a package makes
        // /etc/nginx).
        if seen.stat.is_some()
            || self.is_managed(parent)
            || self.assumed_path(parent)
            || self.assumed_side_effects()
            || self.host.stat(parent).map_err(fail)?.is_some()
        {
            return Ok(());
        }
        Err(format!(
            "cannot create {path}: its directory {parent} does not exist; declare it as a `directory` resource"
        )
        .into())
    }

    /// Counts a directory's entries when the resource would remove it.
    fn count_entries(&self, path: &str, seen: &mut Observed) -> Result<(), ProviderError> {
        if seen.stat.is_some_and(|s| s.file_type == FileType::Directory) {
            seen.entries = self.host.list_dir(path).map_err(fail)?.len();
        }
        Ok(())
    }

    /// Sets what differs of mode, owner and group on an existing path.
    fn apply_attrs(&self, path: &str, want: &Wanted, have: &Stat) -> Result<(), ProviderError> {
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
    fn remove_tree(&self, path: &str, stat: &Stat, backup: bool) -> Result<(), ProviderError> {
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
fn diff_type(path: &str, have: Option<&Stat>, want: FileType, force: bool) -> Result<Option<Change>, ProviderError> {
    match have {
        None => Ok(Some(Change::new("ensure", "absent", want.name()))),
        Some(s) if s.file_type == want => Ok(None),
        Some(s) if !force => {
            Err(format!("{path} is a {}, not a {}; set `force: true` to replace it", s.file_type.name(), want.name())
                .into())
        }
        Some(s) => {
            refuse_protected(path)?;
            Ok(Some(Change::new("ensure", s.file_type.name(), want.name())))
        }
    }
}

/// The change that removes whatever is at `path`; a non-empty directory needs `force`. Pure.
fn diff_absent(path: &str, seen: &Observed, force: bool) -> Result<Vec<Change>, ProviderError> {
    let Some(s) = seen.stat else { return Ok(vec![]) };
    if s.file_type == FileType::Directory && seen.entries > 0 && !force {
        return Err(format!(
            "{path} is a directory holding {} entries; set `force: true` to remove it and everything in it",
            seen.entries
        )
        .into());
    }
    refuse_protected(path)?;
    Ok(vec![Change::new("ensure", s.file_type.name(), "absent")])
}

fn refuse_protected(path: &str) -> Result<(), ProviderError> {
    if holds_protected(path) {
        return Err(format!("{path} holds converge's own files; it is never removed").into());
    }
    Ok(())
}

/// Why a resource could not be converged: the kind of failure, and its cause.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The system failed an operation: a file operation (with the OS error as its source) or
    /// a tool (with its command line, exit status and output).
    #[error(transparent)]
    System(#[from] HostError),
    /// As `System`, with what the operator can do about it.
    #[error("{source} ({hint})")]
    Hinted {
        #[source]
        source: HostError,
        hint: &'static str,
    },
    /// A failure with the log that says why (a unit's journal).
    #[error("{source}\n{log}")]
    Logged {
        #[source]
        source: Box<ProviderError>,
        log: String,
    },
    /// The resource cannot be converged as declared on this system: no such package on
    /// offer, a downgrade not allowed, a system account that is never removed, a type
    /// change without `force`...
    #[error("{0}")]
    Declared(String),
}

impl ProviderError {
    /// `system`, `declared`: what kind of failure, for a report or a log.
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderError::System(_) | ProviderError::Hinted { .. } => "system",
            ProviderError::Declared(_) => "declared",
            ProviderError::Logged { source, .. } => source.kind(),
        }
    }
}

impl From<String> for ProviderError {
    fn from(message: String) -> Self {
        ProviderError::Declared(message)
    }
}

impl From<&str> for ProviderError {
    fn from(message: &str) -> Self {
        ProviderError::Declared(message.to_string())
    }
}

pub type ProviderResult<T> = Result<T, ProviderError>;

fn fail(e: HostError) -> ProviderError {
    e.into()
}

/// For operations that create something: a missing parent gets a hint.
fn fail_create(e: HostError) -> ProviderError {
    if e.is_not_found() {
        ProviderError::Hinted {
            source: e,
            hint: "its parent directory is missing: declare it as a `directory` resource",
        }
    } else {
        e.into()
    }
}

impl Providers for System<'_> {
    type State = Checked;

    fn check(&self, r: &Resource) -> Result<(Checked, Vec<Change>), ProviderError> {
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
            Spec::Package(p) => return package::check(self, r, p),
            Spec::User(u) => return account::check_user(self, r, u),
            Spec::Group(g) => return account::check_group(self, r, g),
            Spec::Service(s) => return service::check(self, r, s),
            Spec::Exec(e) => return exec::check(self, r, e),
            Spec::Line(_) | Spec::Block(_) => return edit::check(self, r),
            Spec::Sysctl(s) => return sysctl::check(self, r, s),
            Spec::Timer(t) => return timer::check(self, r, t),
            Spec::Mount(m) => return mount::check(self, r, m),
            Spec::Repository(p) => return repository::check(self, r, p),
        };
        // Nothing to remove yet, in a directory that does not exist yet either: a package or
        // command planned earlier may make both (nginx ships sites-enabled/default).
        let conditional = !present(r) && changes.is_empty() && seen.stat.is_none() && self.may_be_made(path)?;
        let changes =
            if conditional { vec![Change::new("ensure", "made by an earlier change", "absent")] } else { changes };
        Ok((Checked { seen, want, conditional, ..Checked::default() }, changes))
    }

    fn apply(&self, r: &Resource, state: &Checked, changes: &[Change]) -> Result<Option<String>, ProviderError> {
        let done = match &r.spec {
            Spec::File(f) => file::apply(self, r, f, state, changes),
            Spec::Directory(d) => directory::apply(self, r, d, state),
            Spec::Symlink(s) => symlink::apply(self, r, s, &state.seen),
            Spec::Package(_) if package::deferred(self, r) => return package::apply_deferred(self, state),
            Spec::Package(_) => return package::apply_all(self, &[(r, state)]).pop().unwrap_or(Ok(None)),
            Spec::User(_) | Spec::Group(_) => return account::apply(self, state),
            Spec::Service(_) => return service::apply(self, r, state),
            Spec::Exec(e) => return exec::apply(self, r, e),
            Spec::Line(_) | Spec::Block(_) => return edit::apply(self, r, state).map(|()| None),
            Spec::Sysctl(s) => return sysctl::apply(self, r, s, state, changes).map(|()| None),
            Spec::Timer(t) => return timer::apply(self, r, t, state).map(|()| None),
            Spec::Mount(_) => return mount::apply(self, r, state).map(|()| None),
            Spec::Repository(p) => return repository::apply(self, r, p).map(|()| None),
        };
        self.path_changed(&r.id.title);
        done.map(|()| None)
    }

    fn batched(&self, r: &Resource) -> Option<Batch> {
        match &r.spec {
            Spec::Package(_) if !package::deferred(self, r) => Some(Batch::Transaction),
            Spec::File(_) if account::ACCOUNT_FILES.contains(&r.id.title.as_str()) => None,
            Spec::File(_) | Spec::Directory(_) => Some(Batch::Adjacent),
            _ => None,
        }
    }

    fn apply_batch(&self, items: &[(&Resource, &Checked, &[Change])]) -> Vec<Result<Option<String>, ProviderError>> {
        if items.first().is_some_and(|(r, ..)| matches!(r.spec, Spec::Package(_))) {
            let items: Vec<(&Resource, &Checked)> = items.iter().map(|(r, c, _)| (*r, *c)).collect();
            return package::apply_all(self, &items);
        }
        if items.is_empty() {
            return Vec::new();
        }
        // Files and directories: each applied as on its own, their flushes shared.
        self.host.hold_flushes();
        let mut results: Vec<_> =
            items.iter().map(|(r, state, changes)| crate::engine::guard(|| self.apply(r, state, changes))).collect();
        for (path, e) in self.host.release_flushes() {
            match path {
                Some(path) => {
                    let at = items.iter().position(|(r, ..)| r.id.title == path);
                    if let Some(result) = at.map(|k| &mut results[k]) {
                        *result = Err(fail(e));
                    }
                }
                None => {
                    let e = e.to_string();
                    for result in results.iter_mut().filter(|r| r.is_ok()) {
                        *result = Err(e.clone().into());
                    }
                }
            }
        }
        results
    }

    /// A command's change is that it ran: inspecting again would only run its guards again. A
    /// deferred upgrade of the agent happens after the run.
    fn verify_after_apply(&self, r: &Resource) -> bool {
        !matches!(r.spec, Spec::Exec(_)) && !package::deferred(self, r)
    }

    fn held(&self, state: &Checked) -> Option<String> {
        state.held.clone()
    }

    fn assume(&self, r: &Resource, state: &Checked, changes: &[Change]) {
        let mut assumed = self.assumed.borrow_mut();
        match (&r.spec, &state.op) {
            // An edit that removes a line changes its file as much as one that adds it: later
            // checks of that file (a sysctl's) take it as the edit will leave it.
            (Spec::Line(_) | Spec::Block(_), _) if !changes.is_empty() => {
                assumed.paths.extend(r.writes().into_iter().map(std::borrow::Cow::into_owned));
            }
            (Spec::File(_) | Spec::Directory(_) | Spec::Symlink(_), _) if present(r) => {
                assumed.paths.insert(r.id.title.clone());
            }
            (
                Spec::Line(_)
                | Spec::Block(_)
                | Spec::Sysctl(_)
                | Spec::Timer(_)
                | Spec::Mount(_)
                | Spec::Repository(_),
                _,
            ) if present(r) => {
                assumed.paths.extend(r.writes().into_iter().map(std::borrow::Cow::into_owned));
            }
            (_, Op::Accounts(ops)) => {
                for op in ops {
                    if let AccountOp::AddUser(f) = op
                        && (!f.system || f.home.is_some())
                    {
                        let home = f.home.clone().unwrap_or_else(|| format!("/home/{}", f.name));
                        assumed.paths.insert(home);
                    }
                }
                assumed.accounts.extend(ops.iter().cloned());
            }
            (Spec::Exec(e), Op::Run) => {
                // A command says what it makes by its `creates` guard.
                assumed.paths.extend(e.creates.clone());
                assumed.side_effects = true;
            }
            (_, Op::Install(_) | Op::Remove(_)) => assumed.side_effects = true,
            _ => {}
        }
    }

    fn conditional(&self, state: &Checked) -> bool {
        state.conditional
    }

    fn planning(&self, on: bool) {
        self.planning.set(on);
        *self.assumed.borrow_mut() = Assumed::default();
    }

    fn refresh(&self, r: &Resource, dry_run: bool) -> Result<Option<String>, ProviderError> {
        match &r.spec {
            Spec::Service(s) => service::refresh(self, r, s, dry_run),
            Spec::Exec(e) => exec::refresh(self, r, e, dry_run),
            _ => Ok(None),
        }
    }
}

/// The id a dry-run gives an account that an earlier package or command is expected to make:
/// `(uid_t)-1`, which no account can have.
const UNKNOWN_ID: u32 = u32::MAX;

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
    converge_live(host, yaml, dry_run, false).0
}

/// As [`converge_yaml`], on a live system running the agent when `live_agent`: the events,
/// and the change to the agent's own package deferred to after the run.
#[cfg(test)]
pub(crate) fn converge_live(
    host: &crate::host::memory::MemHost,
    yaml: &str,
    dry_run: bool,
    live_agent: bool,
) -> (Vec<crate::report::ResourceEvent>, Option<Install>) {
    use crate::engine::{Options, run};
    use crate::report::{Collect, RunInfo};
    let loaded = crate::load::load("t.yaml", &format!("format: 1\nresources:\n{yaml}"), None).expect("valid catalog");
    let sys = System::new(host, &loaded.catalog.resources).dry_run(dry_run).self_upgrade_after_run(live_agent);
    let mut sink = Collect::default();
    let info = RunInfo::test("t", dry_run, loaded.catalog.resources.len());
    run(&loaded, &sys, Options { dry_run, stop: None, guard: None }, info, &mut sink);
    (sink.resources, sys.deferred_upgrade())
}

#[cfg(test)]
mod error_tests {
    use super::*;
    use crate::host::memory::MemHost;
    use std::error::Error as _;

    #[test]
    fn a_failure_carries_its_kind_and_cause() {
        let host = MemHost::new().with_dir("/etc", 0o755).fail_on("/etc/motd", "disk full");
        let loaded =
            crate::load::load("t.yaml", "format: 1\nresources:\n  - file: /etc/motd\n    content: hi\n", None).unwrap();
        let sys = System::new(&host, &loaded.catalog.resources);
        let r = &loaded.catalog.resources[0];
        let (state, changes) = sys.check(r).unwrap();
        let e = sys.apply(r, &state, &changes).unwrap_err();
        assert_eq!(e.kind(), "system");
        assert!(matches!(&e, ProviderError::System(HostError::Io { op: "write", .. })), "{e:?}");
        assert_eq!(e.source().map(|s| s.to_string()).as_deref(), Some("disk full"), "the OS error is its cause");
        // What cannot be done as declared is of its own kind.
        let e = sys_check(&MemHost::new(), "  - file: /nowhere/x\n    content: hi\n");
        assert_eq!(e.kind(), "declared");
        assert!(e.to_string().contains("declare it as a `directory` resource"), "{e}");
        let e = sys_check(&MemHost::new(), "  - package: nope\n");
        assert_eq!(e.kind(), "declared");
        assert!(e.to_string().starts_with("no package `nope`"), "{e}");
    }

    fn sys_check(host: &MemHost, yaml: &str) -> ProviderError {
        let loaded = crate::load::load("t.yaml", &format!("format: 1\nresources:\n{yaml}"), None).unwrap();
        let sys = System::new(host, &loaded.catalog.resources);
        sys.check(&loaded.catalog.resources[0]).expect_err("a failure")
    }
}
