//! `converge apply FILE`: converge the root to a local catalog file.
//!
//! Read and check the whole catalog first (a bad catalog changes nothing and exits 1), take
//! the run lock in the state directory, converge through the real host, report, and prune the
//! backup store if this run used it.
//!
//! Signed or plain is decided by what the host trusts, never by what the file says it is: a
//! host that holds a key list (or is given one with `--trusted-keys`) applies only catalogs
//! those keys signed, unless the operator says `--unsigned`; a host with no keys applies a
//! plain catalog, and refuses one made for another host.

use crate::aside::{self, TempStore};
use crate::backup::BackupStore;
use crate::fs::Root;
use crate::host::RealHost;
use crate::signed::{self, Trust};
use crate::state::{RunLock, STATE_DIR};
use anyhow::{Context, Result, anyhow, bail};
use converge_modules::catalog::Catalog;
use converge_modules::content::Store;
use converge_modules::engine::{self, Options};
use converge_modules::host::Host;
use converge_modules::load::{Loaded, SourceError, load_decoded, load_each, load_yaml_from};
use converge_modules::providers::System;
use converge_modules::providers::tool::ToolOptions;
use converge_modules::report::{Collect, JsonSink, RunInfo, Summary, Tee, TextSink};
use converge_modules::stream::catalog_from_reader_each;
use converge_modules::time::Timestamp;
use converge_modules::trust;
use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// How a run goes and speaks: what `apply`, `run` and a bootstrap's first run share.
#[derive(Debug, Clone, clap::Args)]
pub struct RunOptions {
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

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            dry_run: false,
            root: PathBuf::from("/"),
            format: Format::Text,
            detailed_exitcodes: false,
            color: Color::Auto,
            verbose: false,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    /// The catalog to converge to: YAML, or JSON (the wire spelling).
    pub file: PathBuf,
    #[command(flatten)]
    pub opts: RunOptions,
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
    /// Apply a plain (unsigned) catalog on a host that trusts signing keys: the operator's
    /// explicit word that this file needs no signature.
    #[arg(long, conflicts_with_all = ["trusted_keys", "allow_rollback"])]
    pub unsigned: bool,
}

/// Reads and checks the catalog; the error is every problem, rendered with its source line.
///
/// Both spellings are streamed into the model so that the text and the catalog are never in
/// memory at once; the text is read whole only to place the problems of a catalog that has
/// some.
///
/// Large file content is kept aside in `aside` as each resource is decoded.
pub fn read_catalog(file: &Path, aside: Option<Arc<dyn Store>>) -> Result<Loaded> {
    let name = file.display().to_string();
    let max = MAX_CATALOG_FILE;
    let open = || {
        signed::open_bounded(file, max)
            .map_err(|e| anyhow!("refused {name}: {e} (a catalog file is at most {max} bytes); nothing was changed"))
    };
    let base = file.parent().unwrap_or(Path::new(".")).to_path_buf();
    let read_source = |src: &str| {
        let bytes = signed::read_file_bounded(&base.join(src), trust::MAX_PAYLOAD as u64)?;
        String::from_utf8(bytes).map_err(|_| SourceError::NotUtf8)
    };
    let mut reader = std::io::BufReader::with_capacity(1 << 16, open()?);
    let head = reader.fill_buf().with_context(|| format!("cannot read catalog {name}"))?;
    if head.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        let streamed = catalog_from_reader_each(reader, &mut aside::keeper(aside.clone())).ok();
        if let Some(Ok(loaded)) = streamed.map(|c| load_decoded(&name, c, Some(&read_source))) {
            return Ok(told_aside(loaded));
        }
    } else {
        // The reader already open first; again, should the catalog be beyond the block reader.
        let mut first = Some(reader);
        let mut again = || match first.take() {
            Some(r) => Ok(r),
            None => open().map(|f| std::io::BufReader::with_capacity(1 << 16, f)).map_err(std::io::Error::other),
        };
        if let Some(loaded) = load_yaml_from(&name, &mut again, Some(&read_source), &mut aside::keeper(aside.clone())) {
            return Ok(told_aside(loaded));
        }
    }
    // A catalog with problems (or that grew past the bound) is read again whole, for every
    // problem to be shown with its line.
    let text = std::io::read_to_string(open()?).map_err(|e| match e.kind() {
        std::io::ErrorKind::FileTooLarge => {
            anyhow!("refused {name}: more than the {max} bytes a catalog file can be; nothing was changed")
        }
        _ => anyhow!(e).context(format!("cannot read catalog {name}")),
    })?;
    load_each(&name, &text, Some(&read_source), &mut aside::keeper(aside)).map(told_aside).map_err(|diags| {
        let n = diags.len();
        let s = if n == 1 { "" } else { "s" };
        anyhow!("{}\n\n{name}: {n} problem{s}; nothing was changed", diags.render(Some(&text)))
    })
}

/// Says (at debug, and counts only then) how many contents were kept aside.
fn told_aside(loaded: Loaded) -> Loaded {
    if tracing::enabled!(tracing::Level::DEBUG) {
        let kept = loaded.catalog.resources.iter().filter(|r| aside::is_kept(r)).count();
        tracing::debug!(kept, "contents kept aside");
    }
    loaded
}

/// The largest catalog file `apply` reads (YAML is wordier than the JSON an envelope carries).
pub const MAX_CATALOG_FILE: u64 = 2 * trust::MAX_PAYLOAD as u64;

/// Runs `converge apply`; returns the process exit code.
pub fn run(args: &ApplyArgs) -> Result<i32> {
    let name = args.file.display().to_string();
    let envelope = signed::looks_like_envelope(&head(&args.file)?);
    if envelope && args.unsigned {
        bail!("{name} is a signed envelope: apply it without --unsigned, and its signature is checked");
    }
    if envelope {
        return run_signed(args);
    }
    let loaded = read_catalog(&args.file, aside_store(&args.opts.root))?;
    let root = Root::open(&args.opts.root).with_context(|| format!("cannot open root {}", args.opts.root.display()))?;
    let lock = RunLock::take(&root, args.opts.dry_run)?;
    if !args.unsigned && (args.trusted_keys.is_some() || signed::has_keys(&root)) {
        let keys = args.trusted_keys.as_ref().map_or_else(
            || root.path().join(signed::KEYS_FILE.trim_start_matches('/')).display().to_string(),
            |p| p.display().to_string(),
        );
        bail!(
            "refused {name}: it is not signed, and this host trusts the keys in {keys}; sign it (converge-server sign), \
             or apply it with --unsigned to take it as it is; nothing was changed"
        );
    }
    if let Some(host) = &loaded.catalog.host {
        let node = signed::node_name(&root, args.node.as_deref())
            .map_err(|e| anyhow!("refused {name}: it is for host {host}, and this node's name is unknown: {e}"))?;
        if *host != node {
            bail!("refused {name}: the catalog is for host {host}, and this is {node}; nothing was changed");
        }
    }
    let host = RealHost::new(root, BackupStore::new(STATE_DIR));
    let notes = if lock.exclusive() { crate::upgrade::outcome(&host).into_iter().collect() } else { Vec::new() };
    let (_, collect) = converge(&Output::of(args), &host, &loaded, None, notes, None, None);
    drop(lock);
    start_upgrade(&host, args);
    Ok(exit_code(args.opts.detailed_exitcodes, &collect.summary.unwrap_or_default()))
}

/// Where a run on `root` keeps large content aside; none (content stays in memory) when no
/// directory can hold an unnamed file.
pub fn aside_store(root: &Path) -> Option<Arc<dyn Store>> {
    match TempStore::open(&TempStore::dirs(root, STATE_DIR)) {
        Ok(store) => Some(Arc::new(store)),
        Err(e) => {
            tracing::debug!(error = %e, "content is kept in memory");
            None
        }
    }
}

/// The first bytes of a file, to tell envelopes from catalogs.
fn head(file: &Path) -> Result<Vec<u8>> {
    let name = file.display();
    let f = signed::open_bounded(file, MAX_CATALOG_FILE).map_err(|e| match e.kind() {
        // What the file is (a fifo, a device, too large), not whether it can be opened.
        std::io::ErrorKind::Other => anyhow!("refused {name}: {e}; nothing was changed"),
        _ => anyhow!("cannot read catalog {name}: {e}"),
    })?;
    let mut buf = Vec::with_capacity(64 * 1024);
    std::io::Read::read_to_end(&mut std::io::Read::take(f, 64 * 1024), &mut buf)
        .with_context(|| format!("cannot read catalog {name}"))?;
    Ok(buf)
}

/// An envelope file, read within the largest an agent accepts (checked before and while
/// reading: a device or a growing file is refused, never read to its end).
fn read_envelope_file(file: &Path) -> Result<Vec<u8>> {
    let name = file.display().to_string();
    signed::read_file_bounded(file, trust::MAX_ENVELOPE as u64).map_err(|e| {
        anyhow!("refused {name}: {e} (an envelope is at most {} bytes); nothing was changed", trust::MAX_ENVELOPE)
    })
}

/// A verified catalog with its sealed values opened (in memory) with the host's sealing key.
pub fn open_sealed(root: &Root, mut catalog: Catalog) -> Result<Catalog> {
    if catalog.sealed.is_empty() {
        return Ok(catalog);
    }
    let key = crate::state::read_seal_key(root)?;
    let shown = root.path().join(crate::state::SEAL_KEY_FILE.trim_start_matches('/'));
    converge_modules::sealed::open(&mut catalog, key.as_ref(), &shown.display().to_string())
        .map_err(|e| anyhow::anyhow!("the signed catalog's secrets: {e}"))?;
    Ok(catalog)
}

/// Keeps the large content of a catalog decoded from a verified envelope aside for the rest of
/// the run (a signature covers bytes, so such a catalog is decoded whole in memory first).
pub fn keep_aside(root: &Root, catalog: &mut Catalog) {
    let mut keep = aside::keeper(aside_store(root.path()));
    catalog.resources.iter_mut().for_each(&mut keep);
}

/// `converge apply ENVELOPE`: verify first (signature over the bytes, then host, serial,
/// freshness, format); a refusal changes nothing. An accepted catalog (not in a dry-run) is
/// recorded as applied, with the newer key list it carried, before converging.
fn run_signed(args: &ApplyArgs) -> Result<i32> {
    let name = args.file.display().to_string();
    let bytes = read_envelope_file(&args.file)?;
    let root = Root::open(&args.opts.root).with_context(|| format!("cannot open root {}", args.opts.root.display()))?;
    let node = signed::node_name(&root, args.node.as_deref())?;
    let lock = RunLock::take(&root, args.opts.dry_run)?;
    let host = RealHost::new(root, BackupStore::new(STATE_DIR));
    let mut trust = Trust::load(&host, &lock, args.trusted_keys.as_deref(), node)?;
    let mut verified = trust
        .verify(&host, &bytes, false, args.allow_rollback)
        .map_err(|r| anyhow!("refused {name}: {r}; nothing was changed"))?;
    // Taken, not copied: what is recorded is the envelope and its `applied`, not the catalog.
    let catalog = std::mem::replace(&mut verified.catalog, Catalog::new(Vec::new()));
    let mut catalog = open_sealed(host.root(), catalog)?;
    keep_aside(host.root(), &mut catalog);
    let loaded = load_decoded(&name, catalog, None).map_err(|d| {
        let first = d.0.first().map(|d| d.message.as_str()).unwrap_or("?");
        anyhow!("refused {name}: the signed catalog is not valid: {first}; nothing was changed")
    })?;
    if !args.opts.dry_run {
        trust.record(&host, &lock, &verified, &bytes)?;
    }
    drop(bytes);
    let mut warnings = std::mem::take(&mut trust.notes);
    if lock.exclusive() {
        warnings.extend(crate::upgrade::outcome(&host));
    }
    warnings.extend(verified.warnings);
    for w in &warnings {
        tracing::warn!("{name}: {}", converge_modules::text::clean(w));
    }
    let (_, collect) = converge(&Output::of(args), &host, &loaded, Some(verified.signed_by), warnings, None, None);
    drop(lock);
    start_upgrade(&host, args);
    Ok(exit_code(args.opts.detailed_exitcodes, &collect.summary.unwrap_or_default()))
}

/// Starts the agent's own upgrade the run deferred, once the run has let go of the lock.
fn start_upgrade(host: &RealHost, args: &ApplyArgs) {
    if let Some(note) = crate::upgrade::start(host, &args.opts.root) {
        if args.opts.format == Format::Text {
            eprintln!("converge: {note}");
        }
        tracing::info!("{note}");
    }
}

/// Where and how a run reports.
pub struct Output {
    /// What the run converges, for the header: a file, or a server.
    pub label: String,
    pub dry_run: bool,
    pub format: Format,
    pub color: Color,
    pub verbose: bool,
    /// Keep every event for a report (`converge run`); `converge apply` needs the totals only.
    pub report: bool,
}

impl Output {
    fn of(args: &ApplyArgs) -> Output {
        let mut label = args.file.display().to_string();
        if args.opts.root != Path::new("/") {
            label.push_str(&format!(" into {}", args.opts.root.display()));
        }
        Output {
            label,
            dry_run: args.opts.dry_run,
            format: args.opts.format,
            color: args.opts.color,
            verbose: args.opts.verbose,
            report: false,
        }
    }
}

/// What this agent decides about the system's tools: how long apt and dnf wait for another
/// package manager's lock (`CONVERGE_PACKAGE_LOCK_TIMEOUT`, seconds) [120].
pub fn tool_options() -> ToolOptions {
    let lock_timeout = std::env::var("CONVERGE_PACKAGE_LOCK_TIMEOUT").ok().and_then(|v| v.parse().ok());
    ToolOptions { lock_timeout: lock_timeout.unwrap_or(ToolOptions::default().lock_timeout) }
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
    guard: Option<&dyn engine::Guard>,
) -> (RunInfo, Collect) {
    // Everything logged during the run carries its node, serial and commit.
    let c = &loaded.catalog;
    let _run = tracing::info_span!(
        "run",
        node = c.host.as_deref().unwrap_or("-"),
        serial = c.serial.unwrap_or(0),
        commit = c.source.as_ref().map_or("-", |s| s.commit.as_str()),
        dry_run = out.dry_run,
    )
    .entered();
    let system = system(host, &loaded.catalog.resources).dry_run(out.dry_run).self_upgrade_after_run(!host.is_image());
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
    let options = Options { dry_run: out.dry_run, stop, guard };
    let mut collect = if out.report { Collect::default() } else { Collect::totals() };
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
    host.defer_upgrade(system.deferred_upgrade());
    if host.backups().saved() > 0
        && let Err(e) = host.backups().prune(host.root())
    {
        tracing::warn!("could not prune the backup store: {e}");
    }
    (info, collect)
}

/// The providers of `host` for `resources`, with the tools' options.
pub fn system<'h>(host: &'h RealHost, resources: &'h [converge_modules::catalog::Resource]) -> System<'h> {
    System::new(host, resources).tool_options(tool_options())
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
    let keys = signed::read_file_bounded(&keys_path, crate::state::SMALL_FILE)
        .with_context(|| format!("cannot read the trusted keys {}", keys_path.display()))?;
    let (list, _) = trust::read_key_list(&keys).map_err(|e| anyhow!("{}: {e}", keys_path.display()))?;
    let bytes = match signed::read_file_bounded(&args.envelope, trust::MAX_ENVELOPE as u64) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("converge: {name}: refused: {e} (an envelope is at most {} bytes)", trust::MAX_ENVELOPE);
            return Ok(1);
        }
    };
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
            let clean = |s: &str| converge_modules::text::clip(s, 200).into_owned();
            println!("{name}: valid, signed by key {}", v.signed_by);
            println!("  host       {}", clean(c.host.as_deref().unwrap_or("?")));
            println!("  serial     {}", v.applied.serial);
            println!("  issued     {}", v.applied.issued_at);
            println!("  expires    {}", c.expires_at.map(|t| t.to_string()).unwrap_or_default());
            if let Some(s) = &c.source {
                println!("  source     {} @ {}", clean(&s.repository), clean(&s.commit));
            }
            println!("  resources  {}", c.resources.len());
            if let Some((k, _)) = &v.new_keys {
                println!("  key list   version {} (newer than the {} held)", k.version, list.version);
            }
            for w in &v.warnings {
                println!("  warning    {}", clean(w));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_catalog_that_grew_past_its_bound_is_an_error_not_its_first_part() {
        // A YAML text cut at a line is still YAML: the bound must fail the read, not end it.
        let text = "format: 1\nresources:\n  - directory: /a\n  - directory: /b\n";
        let cut = text.find("  - directory: /b").unwrap() as u64;
        let mut whole = String::new();
        let e = std::io::Read::read_to_string(&mut signed::bounded(text.as_bytes(), cut), &mut whole).unwrap_err();
        assert!(e.to_string().contains("grew while it was read"), "{e}");
        let got = load_yaml_from("t.yaml", || Ok(signed::bounded(text.as_bytes(), cut)), None, &mut |_| {});
        assert!(got.is_none(), "a catalog read past its bound is not loaded");
        let all =
            load_yaml_from("t.yaml", || Ok(signed::bounded(text.as_bytes(), text.len() as u64)), None, &mut |_| {});
        assert_eq!(all.map(|l| l.catalog.resources.len()), Some(2));
    }
}
