//! `converge apply FILE`: converge the root to a local catalog file.
//!
//! Read and check the whole catalog first (a bad catalog changes nothing and exits 1), take
//! the run lock in the state directory, converge through the real host, report, and prune the
//! backup store if this run used it.

use crate::backup::BackupStore;
use crate::fs::{Root, errno};
use crate::host::RealHost;
use anyhow::{Context, Result, anyhow};
use converge_modules::engine::{self, Options};
use converge_modules::load::{Loaded, load, load_decoded};
use converge_modules::providers::System;
use converge_modules::report::{JsonSink, RunInfo, Sink, Summary, TextSink};
use nix::fcntl::{Flock, FlockArg, OFlag};
use std::io::{BufRead, IsTerminal};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// The agent's state directory, inside the managed root.
pub const STATE_DIR: &str = "/var/lib/converge";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Color {
    Auto,
    Always,
    Never,
}

#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    /// The catalog to converge to: YAML, or JSON (the wire spelling).
    pub file: PathBuf,
    /// Show what would change (diffs included) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Manage the tree under DIR as if it were `/` (users and groups from DIR/etc, state in
    /// DIR/var/lib/converge).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// Output for people, or JSON Lines for programs.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Exit 0 in sync, 2 changed (or would change), 4 failures, 6 both; 1 if it could not start.
    #[arg(long)]
    pub detailed_exitcodes: bool,
    /// Colour in text output: auto means only on a terminal (and never with NO_COLOR set).
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    pub color: Color,
    /// List unchanged resources too.
    #[arg(short, long)]
    pub verbose: bool,
}

/// Reads and checks the catalog; the error is every problem, rendered with its source line.
///
/// JSON, the spelling agents receive, is streamed into the model so that the text and the
/// catalog are never in memory at once; the text is read whole only for YAML, or to place the
/// problems of a catalog that has some.
pub fn read_catalog(file: &Path) -> Result<Loaded> {
    let name = file.display().to_string();
    let open = || std::fs::File::open(file).with_context(|| format!("cannot read catalog {name}"));
    let base = file.parent().unwrap_or(Path::new(".")).to_path_buf();
    let read_source = |src: &str| std::fs::read_to_string(base.join(src)).map_err(|e| e.to_string());
    let mut reader = std::io::BufReader::with_capacity(1 << 16, open()?);
    let head = reader.fill_buf().with_context(|| format!("cannot read catalog {name}"))?;
    if head.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        let streamed = converge_modules::stream::catalog_from_reader(reader).ok();
        if let Some(Ok(loaded)) = streamed.map(|c| load_decoded(&name, c, Some(&read_source))) {
            return Ok(loaded);
        }
    }
    let text = std::io::read_to_string(open()?).with_context(|| format!("cannot read catalog {name}"))?;
    load(&name, &text, Some(&read_source)).map_err(|diags| {
        let n = diags.len();
        let s = if n == 1 { "" } else { "s" };
        anyhow!("{}\n\n{name}: {n} problem{s}; nothing was changed", diags.render(Some(&text)))
    })
}

/// Holds the run lock: one run at a time per root; dry-runs share it.
fn lock(root: &Root, dry_run: bool) -> Result<Option<Flock<OwnedFd>>> {
    let shown = root.path().join(STATE_DIR.trim_start_matches('/'));
    if dry_run && root.lstat(STATE_DIR)?.is_none() {
        return Ok(None); // nothing to protect, and a dry-run creates nothing
    }
    if !dry_run {
        root.create_dir_all(STATE_DIR, 0o700)
            .with_context(|| format!("cannot create state directory {}", shown.display()))?;
    }
    let fd = root
        .open_at(STATE_DIR, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0, false)
        .with_context(|| format!("cannot open state directory {}", shown.display()))?;
    let arg = if dry_run { FlockArg::LockSharedNonblock } else { FlockArg::LockExclusiveNonblock };
    match Flock::lock(fd, arg) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            Err(anyhow!("another converge run holds the lock on {}; try again when it has finished", shown.display()))
        }
        Err((_, e)) => Err(errno(e)).with_context(|| format!("cannot lock {}", shown.display())),
    }
}

/// Runs `converge apply`; returns the process exit code.
pub fn run(args: &ApplyArgs) -> Result<i32> {
    let loaded = read_catalog(&args.file)?;
    let root = Root::open(&args.root).with_context(|| format!("cannot open root {}", args.root.display()))?;
    let _lock = lock(&root, args.dry_run)?;
    let host = RealHost::new(root, BackupStore::new(STATE_DIR));
    let system = System::new(&host, &loaded.catalog.resources);
    let mut catalog = args.file.display().to_string();
    if !host.root().is_slash() {
        catalog.push_str(&format!(" into {}", args.root.display()));
    }
    let info = RunInfo {
        catalog,
        host: loaded.catalog.host.clone(),
        serial: loaded.catalog.serial,
        commit: loaded.catalog.source.as_ref().map(|s| s.commit.clone()),
        dry_run: args.dry_run,
        resources: loaded.catalog.resources.len(),
    };
    let stdout = std::io::stdout().lock();
    let summary: Summary = match args.format {
        Format::Json => engine::run(
            &loaded,
            &system,
            Options { dry_run: args.dry_run },
            info,
            &mut JsonSink::new(stdout) as &mut dyn Sink,
        ),
        Format::Text => {
            let color = match args.color {
                Color::Always => true,
                Color::Never => false,
                Color::Auto => std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
            };
            let mut sink = TextSink::new(stdout, color, args.verbose);
            engine::run(&loaded, &system, Options { dry_run: args.dry_run }, info, &mut sink)
        }
    };
    if host.backups().saved() > 0
        && let Err(e) = host.backups().prune(host.root())
    {
        tracing::warn!("could not prune the backup store: {e}");
    }
    Ok(if args.detailed_exitcodes {
        summary.detailed_exit_code()
    } else if summary.failed > 0 {
        1
    } else {
        0
    })
}
