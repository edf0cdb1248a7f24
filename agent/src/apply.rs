//! `converge apply FILE`: converge the root to a local catalog file.
//!
//! Read and check the whole catalog first (a bad catalog changes nothing and exits 1), take
//! the run lock in the state directory, converge through the real host, report, and prune the
//! backup store if this run used it.

use crate::backup::BackupStore;
use crate::fs::{Root, errno};
use crate::host::RealHost;
use crate::signed;
use anyhow::{Context, Result, anyhow};
use converge_modules::engine::{self, Options};
use converge_modules::load::{Loaded, load, load_decoded};
use converge_modules::providers::System;
use converge_modules::report::{Collect, JsonSink, RunInfo, Summary, Tee, TextSink};
use converge_modules::time::Timestamp;
use converge_modules::trust;
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
    /// For a signed catalog: the key list to trust [ROOT/etc/converge/trusted-keys.json].
    #[arg(long, value_name = "FILE")]
    pub trusted_keys: Option<PathBuf>,
    /// For a signed catalog: this host's node name [ROOT/etc/hostname with --root, else the
    /// host name].
    #[arg(long)]
    pub node: Option<String>,
    /// For a signed catalog: accept a serial older than the last applied one (logged and
    /// reported).
    #[arg(long)]
    pub allow_rollback: bool,
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
pub fn lock(root: &Root, dry_run: bool) -> Result<Option<Flock<OwnedFd>>> {
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
    if signed::looks_like_envelope(&head(&args.file)?) {
        return run_signed(args);
    }
    let loaded = read_catalog(&args.file)?;
    let root = Root::open(&args.root).with_context(|| format!("cannot open root {}", args.root.display()))?;
    let _lock = lock(&root, args.dry_run)?;
    let host = RealHost::new(root, BackupStore::new(STATE_DIR));
    let (_, collect) = converge(&Output::of(args), &host, &loaded, None, Vec::new(), None);
    Ok(exit_code(args.detailed_exitcodes, &collect.summary.unwrap_or_default()))
}

/// The first bytes of a file, to tell envelopes from catalogs.
fn head(file: &Path) -> Result<Vec<u8>> {
    let mut f = std::fs::File::open(file).with_context(|| format!("cannot read catalog {}", file.display()))?;
    let mut buf = vec![0; 64 * 1024];
    let n = std::io::Read::read(&mut f, &mut buf).with_context(|| format!("cannot read catalog {}", file.display()))?;
    buf.truncate(n);
    Ok(buf)
}

/// `converge apply ENVELOPE`: verify first (signature over the bytes, then host, serial,
/// freshness, format); a refusal changes nothing. An accepted catalog (not in a dry-run) is
/// recorded as applied, with the newer key list it carried, before converging.
fn run_signed(args: &ApplyArgs) -> Result<i32> {
    let name = args.file.display().to_string();
    let size = std::fs::metadata(&args.file).with_context(|| format!("cannot read {name}"))?.len() as usize;
    if size > trust::MAX_ENVELOPE {
        return Err(anyhow!("refused {name}: {}; nothing was changed", trust::Refusal::TooLarge(size)));
    }
    let bytes = std::fs::read(&args.file).with_context(|| format!("cannot read {name}"))?;
    let root = Root::open(&args.root).with_context(|| format!("cannot open root {}", args.root.display()))?;
    let held = signed::held_keys(&root, args.trusted_keys.as_deref())?;
    let policy = trust::Policy {
        node: Some(signed::node_name(&root, args.node.as_deref())?),
        now: Timestamp::now(),
        last: signed::last_applied(&root)?,
        allow_rollback: args.allow_rollback,
        cached: false,
    };
    let verified = trust::verify_catalog(&bytes, &held.list, &policy)
        .map_err(|r| anyhow!("refused {name}: {r}; nothing was changed"))?;
    let loaded = load_decoded(&name, verified.catalog, None).map_err(|d| {
        let first = d.0.first().map(|d| d.message.as_str()).unwrap_or("?");
        anyhow!("refused {name}: the signed catalog is not valid: {first}; nothing was changed")
    })?;
    let _lock = lock(&root, args.dry_run)?;
    let host = RealHost::new(root, BackupStore::new(STATE_DIR));
    // Accepted: remember it before converging, so that a run cut short never reopens the door
    // to an older serial.
    if !args.dry_run {
        let envelope = trust::parse_envelope(&bytes).map_err(|r| anyhow!("{name}: {r}"))?;
        let new_keys = verified.new_keys.as_ref().map(|(_, env)| env);
        signed::record(&host, host.root(), &held, verified.applied, envelope, new_keys)?;
    }
    drop(bytes);
    for w in &verified.warnings {
        tracing::warn!("{name}: {w}");
    }
    let (_, collect) = converge(&Output::of(args), &host, &loaded, Some(verified.signed_by), verified.warnings, None);
    Ok(exit_code(args.detailed_exitcodes, &collect.summary.unwrap_or_default()))
}

/// Where and how a run reports.
pub struct Output {
    /// What the run converges, for the header: a file, or a server.
    pub label: String,
    pub dry_run: bool,
    pub format: Format,
    pub color: Color,
    pub verbose: bool,
}

impl Output {
    fn of(args: &ApplyArgs) -> Output {
        let mut label = args.file.display().to_string();
        if args.root != Path::new("/") {
            label.push_str(&format!(" into {}", args.root.display()));
        }
        Output { label, dry_run: args.dry_run, format: args.format, color: args.color, verbose: args.verbose }
    }
}

/// Converges `loaded` on `host`, reporting to stdout in the chosen format; returns every
/// event as well, for a report.
pub fn converge(
    out: &Output,
    host: &RealHost,
    loaded: &Loaded,
    signed_by: Option<String>,
    warnings: Vec<String>,
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> (RunInfo, Collect) {
    let system = System::new(host, &loaded.catalog.resources).dry_run(out.dry_run);
    let info = RunInfo {
        catalog: out.label.clone(),
        host: loaded.catalog.host.clone(),
        serial: loaded.catalog.serial,
        commit: loaded.catalog.source.as_ref().map(|s| s.commit.clone()),
        dry_run: out.dry_run,
        resources: loaded.catalog.resources.len(),
        signed_by,
        warnings,
    };
    let stdout = std::io::stdout().lock();
    let options = Options { dry_run: out.dry_run, stop };
    let mut collect = Collect::default();
    match out.format {
        Format::Json => {
            let mut json = JsonSink::new(stdout);
            engine::run(loaded, &system, options, info.clone(), &mut Tee(vec![&mut json, &mut collect]));
        }
        Format::Text => {
            let color = match out.color {
                Color::Always => true,
                Color::Never => false,
                Color::Auto => std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
            };
            let mut text = TextSink::new(stdout, color, out.verbose);
            engine::run(loaded, &system, options, info.clone(), &mut Tee(vec![&mut text, &mut collect]));
        }
    }
    if host.backups().saved() > 0
        && let Err(e) = host.backups().prune(host.root())
    {
        tracing::warn!("could not prune the backup store: {e}");
    }
    (info, collect)
}

pub fn exit_code(detailed: bool, summary: &Summary) -> i32 {
    if detailed {
        summary.detailed_exit_code()
    } else if summary.failed > 0 {
        1
    } else {
        0
    }
}

/// `converge verify ENVELOPE`: checks an envelope offline and says what it holds.
pub fn verify(args: &VerifyArgs) -> Result<i32> {
    let name = args.envelope.display().to_string();
    let keys_path = args.trusted_keys.clone().unwrap_or_else(signed::default_keys_path);
    let keys =
        std::fs::read(&keys_path).with_context(|| format!("cannot read the trusted keys {}", keys_path.display()))?;
    let (list, _) = trust::read_key_list(&keys).map_err(|e| anyhow!("{}: {e}", keys_path.display()))?;
    let bytes = std::fs::read(&args.envelope).with_context(|| format!("cannot read {name}"))?;
    let policy = trust::Policy {
        node: args.node.clone(),
        now: Timestamp::now(),
        last: None,
        allow_rollback: false,
        cached: false,
    };
    match trust::verify_catalog(&bytes, &list, &policy) {
        Ok(v) => {
            let c = &v.catalog;
            println!("{name}: valid, signed by key {}", v.signed_by);
            println!("  host       {}", c.host.as_deref().unwrap_or("?"));
            println!("  serial     {}", v.applied.serial);
            println!("  issued     {}", v.applied.issued_at);
            println!("  expires    {}", c.expires_at.map(|t| t.to_string()).unwrap_or_default());
            if let Some(s) = &c.source {
                println!("  source     {} @ {}", s.repository, s.commit);
            }
            println!("  resources  {}", c.resources.len());
            if let Some((k, _)) = &v.new_keys {
                println!("  key list   version {} (newer than the {} held)", k.version, list.version);
            }
            for w in &v.warnings {
                println!("  warning    {w}");
            }
            Ok(0)
        }
        Err(r) => {
            eprintln!("converge: {name}: refused: {r}");
            Ok(1)
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The envelope to check.
    pub envelope: PathBuf,
    /// The key list to trust [/etc/converge/trusted-keys.json].
    #[arg(long, value_name = "FILE")]
    pub trusted_keys: Option<PathBuf>,
    /// Also check that the catalog is for this node.
    #[arg(long)]
    pub node: Option<String>,
}
