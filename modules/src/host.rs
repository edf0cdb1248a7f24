//! The `Host` boundary: the only way providers reach a system.
//!
//! Paths are the catalog's absolute, normalised paths; a host decides what they mean (the real
//! one resolves them inside its root, the in-memory one in a map). No operation follows a
//! symlink in the last component of a path. Every write is all-or-nothing for its path.

use std::fmt;
use std::io;

pub mod memory;

/// What is at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileType {
    File,
    Directory,
    Symlink,
    /// A fifo, socket or device: never replaced without `force`.
    Other(&'static str),
}

impl FileType {
    pub fn name(self) -> &'static str {
        match self {
            FileType::File => "file",
            FileType::Directory => "directory",
            FileType::Symlink => "symlink",
            FileType::Other(what) => what,
        }
    }
}

/// The metadata of a path itself (as `lstat` reports it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub file_type: FileType,
    /// Permission bits, `0o7777` at most.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
}

/// Attributes for something new: unset owner and group are left to the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewAttrs {
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// A failed host operation, with what was being done and where.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` {status}{}", tail_suffix(.output))]
    Command { command: String, status: String, output: String },
    #[error("{0}")]
    Refused(String),
}

fn tail_suffix(output: &str) -> String {
    if output.trim().is_empty() { String::new() } else { format!(": {}", output.trim_end()) }
}

impl HostError {
    pub fn io(op: &'static str, path: &str, source: io::Error) -> HostError {
        HostError::Io { op, path: path.to_string(), source }
    }

    /// True when the path (or a parent) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, HostError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

pub type HostResult<T> = Result<T, HostError>;

/// A regular file's metadata and, when it was no larger than asked, its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRead {
    pub stat: Stat,
    pub content: Option<Vec<u8>>,
}

/// A package as the package database has it installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The full version (with its epoch when it has one).
    pub version: String,
    /// Held (dpkg `hold`, dnf versionlock): converge never changes it.
    pub held: bool,
}

/// What the configured repositories offer of a package.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Available {
    /// What an install or upgrade would take.
    pub candidate: Option<String>,
    /// Every version on offer, newest first.
    pub versions: Vec<String>,
}

/// The package system of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackageSystem {
    /// apt and dpkg (Debian, Ubuntu).
    Apt,
    /// dnf and rpm (the RHEL family).
    Dnf,
}

impl PackageSystem {
    /// How versions compare on this system.
    pub fn compare(self, a: &str, b: &str) -> std::cmp::Ordering {
        match self {
            PackageSystem::Apt => crate::version::compare_deb(a, b),
            PackageSystem::Dnf => crate::version::compare_rpm(a, b),
        }
    }
}

/// One package to install, at its candidate version or at `version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Install {
    pub name: String,
    pub version: Option<String>,
}

/// A line of `/etc/passwd` (with its `/etc/shadow` password).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub comment: String,
    pub home: String,
    pub shell: String,
    /// From `/etc/shadow`, when readable.
    pub password_hash: Option<String>,
}

/// A line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// The local accounts, read at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accounts {
    pub users: Vec<Account>,
    pub groups: Vec<GroupEntry>,
    /// The highest uid and gid of system accounts (`SYS_UID_MAX` of login.defs) [999].
    pub system_max: u32,
}

impl Accounts {
    pub fn user(&self, name: &str) -> Option<&Account> {
        self.users.iter().find(|u| u.name == name)
    }

    pub fn group(&self, name: &str) -> Option<&GroupEntry> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// The supplementary groups of `user`, sorted.
    pub fn groups_of(&self, user: &str) -> Vec<String> {
        let mut v: Vec<String> =
            self.groups.iter().filter(|g| g.members.iter().any(|m| m == user)).map(|g| g.name.clone()).collect();
        v.sort();
        v
    }
}

/// A change to the local accounts, carried out with shadow-utils.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountOp {
    AddGroup { name: String, gid: Option<u32>, system: bool },
    SetGid { name: String, gid: u32 },
    DelGroup { name: String },
    AddUser(UserFields),
    ModUser(UserFields),
    DelUser { name: String, remove_home: bool },
}

/// The attributes of a user to set; `None` is left alone.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserFields {
    pub name: String,
    pub uid: Option<u32>,
    pub gid: Option<String>,
    /// The supplementary groups, exactly (`append` false) or added to the current ones.
    pub groups: Option<Vec<String>>,
    pub append: bool,
    pub home: Option<String>,
    pub shell: Option<String>,
    pub comment: Option<String>,
    pub system: bool,
    /// Never shown: passed to the tools on standard input.
    pub password_hash: Option<String>,
}

/// A systemd unit as `systemctl show` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Unit {
    /// `LoadState` is not `not-found`.
    pub exists: bool,
    /// `ActiveState`: active, inactive, failed, activating...
    pub active: String,
    /// `UnitFileState`: enabled, disabled, static, masked, indirect...
    pub enabled: String,
    pub can_reload: bool,
    /// The unit file changed on disk since systemd read it.
    pub needs_daemon_reload: bool,
}

/// What to do to a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitAction {
    Start,
    Stop,
    Restart,
    Reload,
}

impl UnitAction {
    pub fn verb(self) -> &'static str {
        match self {
            UnitAction::Start => "start",
            UnitAction::Stop => "stop",
            UnitAction::Restart => "restart",
            UnitAction::Reload => "reload",
        }
    }
}

/// A command to run for an `exec` resource or its guards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run<'a> {
    pub argv: &'a [String],
    pub user: Option<&'a str>,
    pub cwd: Option<&'a str>,
    pub env: &'a [(String, String)],
    pub timeout: std::time::Duration,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ran {
    /// The exit code; `None` when killed by a signal or the timeout.
    pub code: Option<i32>,
    pub timed_out: bool,
    /// The end of its output (standard output and error together).
    pub tail: String,
}

impl Ran {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// "exited with 3", "was killed after 300 s", "was killed by a signal".
    pub fn describe(&self, timeout: std::time::Duration) -> String {
        match (self.code, self.timed_out) {
            (_, true) => format!("was killed after {} s (its timeout)", timeout.as_secs()),
            (Some(c), _) => format!("exited with {c}"),
            (None, _) => "was killed by a signal".into(),
        }
    }
}

/// The operations providers may perform. Implementations: the real OS (in the agent), and
/// [`memory::MemHost`] for tests.
pub trait Host {
    /// The metadata of the path itself; `None` when nothing is there.
    fn stat(&self, path: &str) -> HostResult<Option<Stat>>;

    /// Metadata, and for a regular file of at most `limit` bytes its content. Never follows a
    /// final symlink and never blocks on a fifo.
    fn read_file(&self, path: &str, limit: u64) -> HostResult<Option<FileRead>>;

    fn read_link(&self, path: &str) -> HostResult<String>;

    /// Direct children with their types, sorted by name.
    fn list_dir(&self, path: &str) -> HostResult<Vec<(String, FileType)>>;

    /// Replaces whatever file or symlink is at `path` with a regular file, atomically: a crash
    /// leaves either the old or the new one. When `validate` is given, it runs with `%`
    /// replaced by the temporary file and a failure leaves the old file in place.
    fn write_file(&self, path: &str, content: &[u8], attrs: NewAttrs, validate: Option<&[String]>) -> HostResult<()>;

    fn mkdir(&self, path: &str, attrs: NewAttrs) -> HostResult<()>;

    /// Replaces whatever file or symlink is at `path` with a symlink to `target`, atomically.
    fn symlink(&self, path: &str, target: &str) -> HostResult<()>;

    fn set_mode(&self, path: &str, mode: u32) -> HostResult<()>;

    /// Changes owner and/or group of the path itself (never a symlink's target).
    fn set_owner(&self, path: &str, uid: Option<u32>, gid: Option<u32>) -> HostResult<()>;

    /// Removes a file, a symlink or an empty directory.
    fn remove(&self, path: &str) -> HostResult<()>;

    /// Keeps the current content of the regular file at `path` in the backup store and returns
    /// its `sha256:` hash.
    fn backup(&self, path: &str) -> HostResult<String>;

    fn user_id(&self, name: &str) -> HostResult<Option<u32>>;
    fn group_id(&self, name: &str) -> HostResult<Option<u32>>;
    fn user_name(&self, uid: u32) -> Option<String>;
    fn group_name(&self, gid: u32) -> Option<String>;

    /// True when this host is an image under `--root`, not a running system: services are
    /// enabled or disabled there, never started or stopped.
    fn is_image(&self) -> bool;

    /// The package system, or why there is none.
    fn package_system(&self) -> Result<PackageSystem, String>;

    /// The installed packages among `names`, in one query.
    fn installed(&self, names: &[&str]) -> HostResult<std::collections::HashMap<String, Installed>>;

    /// What the repositories offer of `names`, in one query. With `refresh`, the package lists
    /// are brought up to date first.
    fn available(&self, names: &[&str], refresh: bool) -> HostResult<std::collections::HashMap<String, Available>>;

    /// Installs (or upgrades, or downgrades with `downgrade`) in one transaction, keeping
    /// local configuration files and never asking anything.
    fn install(&self, packages: &[Install], downgrade: bool) -> HostResult<()>;

    /// Whether a change to the agent's own package ([`crate::providers::package::AGENT`])
    /// waits for the end of the run: on a live system the package manager would replace and
    /// restart the running agent mid-run. An image installs it like any package.
    fn defers_self_upgrade(&self) -> bool {
        false
    }

    /// Records the change to the agent's own package, made after the run's report, detached.
    fn defer_self_upgrade(&self, _install: &Install) -> HostResult<()> {
        Err(HostError::Refused("this host does not upgrade the agent after the run".into()))
    }

    /// Removes in one transaction.
    fn uninstall(&self, names: &[&str]) -> HostResult<()>;

    /// Every local user and group, from the files (no process).
    fn accounts(&self) -> HostResult<Accounts>;

    fn change_account(&self, op: &AccountOp) -> HostResult<()>;

    /// The state of `names` (unit names, `.service` implied), in one query.
    fn units(&self, names: &[&str]) -> HostResult<std::collections::HashMap<String, Unit>>;

    fn unit_action(&self, name: &str, action: UnitAction) -> HostResult<()>;

    fn set_unit_enabled(&self, name: &str, enabled: bool) -> HostResult<()>;

    fn daemon_reload(&self) -> HostResult<()>;

    /// The last lines of a unit's journal, for a failure report.
    fn unit_journal(&self, name: &str) -> String;

    /// Runs a command (inside the root), with the output's tail.
    fn run(&self, cmd: &Run) -> HostResult<Ran>;
}

impl fmt::Display for FileType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
