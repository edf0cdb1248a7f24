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

/// A command to run: an `exec` resource, its guards, or a system tool of a provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run<'a> {
    pub argv: &'a [String],
    pub user: Option<&'a str>,
    pub cwd: Option<&'a str>,
    /// Added to a minimal environment (`PATH`, `LC_ALL=C`).
    pub env: &'a [(String, String)],
    /// Written to standard input: secrets go here, never into an argv.
    pub stdin: Option<&'a [u8]>,
    pub timeout: std::time::Duration,
    /// Run from the host itself rather than inside the root: a tool given the root as an
    /// argument (`rpm --root`, `dnf --installroot`, `systemctl --root`).
    pub outside: bool,
}

impl<'a> Run<'a> {
    /// `argv` inside the root, as root, with nothing more.
    pub fn new(argv: &'a [String], timeout: std::time::Duration) -> Run<'a> {
        Run { argv, user: None, cwd: None, env: &[], stdin: None, timeout, outside: false }
    }
}

/// The most of a command's standard output a host keeps for its caller ([`Ran::stdout`]).
pub const MAX_STDOUT: usize = 64 << 20;

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ran {
    /// The exit code; `None` when killed by a signal or the timeout.
    pub code: Option<i32>,
    pub timed_out: bool,
    /// The end of its output (standard output and error together), for a report.
    pub tail: String,
    /// Its standard output, at most [`MAX_STDOUT`] bytes (a tool's answer, parsed by its
    /// provider).
    pub stdout: String,
    /// The standard output was longer than [`MAX_STDOUT`]: `stdout` is its beginning.
    pub stdout_truncated: bool,
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

/// The operations providers may perform: file operations, account lookups, and running a
/// command. Everything a system's tools do (packages, accounts, units) is built on these by
/// the providers (`providers::<kind>::<tool>`), so a new tool never widens this boundary.
/// Implementations: the real OS (in the agent), and [`memory::MemHost`] for tests, which
/// emulates the tools' command lines and outputs.
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

    /// From now until [`Host::release_flushes`], a file written is left beside its path, not
    /// yet flushed nor in place, and a directory made is not yet flushed: one flush then serves
    /// them all (a first run of thousands of files flushes once per batch, not twice per file).
    /// Nothing may read those paths in between.
    fn hold_flushes(&self) {}

    /// Flushes what was held, puts each file in place and flushes that: the file is wholly
    /// old or wholly new at any instant, as with [`Host::write_file`]. Returns what failed,
    /// by path (`None`: everything held).
    fn release_flushes(&self) -> Vec<(Option<String>, HostError)> {
        Vec::new()
    }

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

    /// The directory of the image under `--root`, or `None` for the running system. Only
    /// tools that take the root as an argument need it ([`Run::outside`]).
    fn image_root(&self) -> Option<String>;

    /// True when this host is an image under `--root`, not a running system: services are
    /// enabled or disabled there, never started or stopped.
    fn is_image(&self) -> bool {
        self.image_root().is_some()
    }

    /// Runs a command (inside the root unless [`Run::outside`]): how it ended and what it
    /// printed. An error only when it could not be started.
    fn run(&self, cmd: &Run) -> HostResult<Ran>;
}

impl fmt::Display for FileType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
