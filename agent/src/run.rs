//! `converge run`: pull, verify, converge, report; once, or as a daemon.
//!
//! A run asks the server for its catalog (sending its facts and the ETag of the envelope it
//! holds), verifies what comes back, converges, and reports. When the server cannot be
//! reached, is busy, or answers something that does not verify, the newest cached envelope is
//! enforced instead (past its expiry too, marked stale), and the report waits in a bounded
//! queue until the server answers again.
//!
//! As a daemon: a first run after this host's fixed splay, then one every interval; while the
//! server fails, back-off doubles (with jitter) up to the interval; SIGHUP runs now; SIGTERM
//! finishes the resource in hand and exits. Runs never overlap (the state directory's lock).

use crate::apply::{self, Color, Format, Output, STATE_DIR, lock};
use crate::backup::BackupStore;
use crate::client::{CatalogReply, Client};
use crate::fs::Root;
use crate::host::RealHost;
use crate::signed;
use crate::state::{self, AgentConfig, LastRun, Status};
use anyhow::{Context, Result, anyhow};
use converge_modules::catalog::FORMAT;
use converge_modules::load::load_decoded;
use converge_modules::time::Timestamp;
use converge_modules::trust::{self, Policy, Verified};
use converge_modules::wire::{CatalogRequest, Report};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Run once and exit (the default when `converge` is run with no command).
    #[arg(long)]
    pub once: bool,
    /// Show what would change and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The system image under DIR instead of this host.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    #[arg(long)]
    pub detailed_exitcodes: bool,
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    pub color: Color,
    #[arg(short, long)]
    pub verbose: bool,
}

/// How a run went, for the daemon's schedule.
pub struct Outcome {
    pub code: i32,
    /// The server answered (a catalog, a 304, or a refusal it meant).
    pub reached: bool,
    /// The server asked to be asked again later.
    pub retry_after: Option<u64>,
}

/// The client of the last run, kept while its server and identity stay the same: a daemon then
/// resumes its TLS session every interval instead of a full handshake.
static CLIENT: std::sync::Mutex<Option<(String, std::sync::Arc<Client>)>> = std::sync::Mutex::new(None);

fn client(root: &Root, config: &AgentConfig) -> Result<std::sync::Arc<Client>> {
    let (ca, cert, key) = (read(root, state::CA_FILE)?, read(root, state::CERT_FILE)?, read(root, state::KEY_FILE)?);
    let identity = converge_modules::hash::sha256_hex(format!("{}\0{ca}\0{cert}\0{key}", config.server).as_bytes());
    let mut kept = CLIENT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((id, c)) = kept.as_ref()
        && *id == identity
    {
        return Ok(c.clone());
    }
    let c = std::sync::Arc::new(Client::new(&config.server, &ca, Some((&cert, &key)))?);
    *kept = Some((identity, c.clone()));
    Ok(c)
}

fn read(root: &Root, path: &str) -> Result<String> {
    root.read_to_string(path).map_err(|e| {
        anyhow!(
            "{}: {e}: join a server first (converge bootstrap)",
            root.path().join(path.trim_start_matches('/')).display()
        )
    })
}

/// One run. `stop` ends it between resources.
pub fn run_once(args: &RunArgs, stop: Option<&AtomicBool>) -> Result<Outcome> {
    let root = Root::open(&args.root).with_context(|| format!("cannot open root {}", args.root.display()))?;
    let config = AgentConfig::load(&root)?;
    let client = client(&root, &config)?;
    let _lock = lock(&root, args.dry_run)?;
    let held = signed::held_keys(&root, None)?;
    let started = Timestamp::now();
    let facts = crate::facts::collect(&root, &config.name);
    let host = RealHost::new(root, BackupStore::new(STATE_DIR));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let cached = state::newest_envelope(&host);
    let request = CatalogRequest { agent_version: env!("CARGO_PKG_VERSION").into(), formats: vec![FORMAT], facts };
    let mut notes = Vec::new();
    let (mut reached, mut retry_after) = (false, None);
    let reply = rt.block_on(client.catalog(&request, cached.as_ref().and_then(|(_, e)| e.as_deref())));
    let fresh = match reply {
        Ok(CatalogReply::Envelope { bytes, etag }) => {
            reached = true;
            Some((bytes, etag))
        }
        Ok(CatalogReply::NotModified) => {
            reached = true;
            None
        }
        Ok(CatalogReply::Retry(after)) => {
            reached = true;
            retry_after = Some(after);
            notes.push(format!("the server is busy (asked to retry in {after} s): enforcing the cached catalog"));
            None
        }
        Err(e) => {
            notes.push(format!("{e:#}: enforcing the cached catalog"));
            None
        }
    };
    let last = signed::last_applied(host.root())?;
    let node = Some(config.name.clone());
    let policy = |cached| Policy {
        node: node.clone(),
        now: Timestamp::now(),
        last: last.clone(),
        allow_rollback: false,
        cached,
    };
    // A fresh catalog must pass every check; one that does not is reported, and the cached
    // catalog is enforced instead.
    let mut source = "server";
    let mut verified: Option<Verified> = None;
    if let Some((bytes, etag)) = &fresh {
        match trust::verify_catalog(bytes, &held.list, &policy(false)) {
            Ok(v) => {
                if !args.dry_run {
                    let envelope = trust::parse_envelope(bytes).map_err(|r| anyhow!("{r}"))?;
                    let new_keys = v.new_keys.as_ref().map(|(_, e)| e);
                    signed::record(&host, host.root(), &held, v.applied.clone(), envelope, new_keys)?;
                    state::keep_envelope(&host, v.applied.serial, bytes, etag.as_deref())?;
                }
                verified = Some(v);
            }
            Err(r) => notes.push(format!("the server's catalog was refused: {r}; enforcing the cached catalog")),
        }
    }
    if verified.is_none() {
        let (bytes, _) = cached.as_ref().ok_or_else(|| {
            anyhow!(
                "no catalog: {}; and none is cached yet",
                notes.last().map(String::as_str).unwrap_or("the server sent none")
            )
        })?;
        if fresh.is_some() || !reached || retry_after.is_some() {
            source = "cache";
        }
        verified = Some(
            trust::verify_catalog(bytes, &held.list, &policy(true))
                .map_err(|r| anyhow!("the cached catalog is refused: {r}"))?,
        );
    }
    let v = verified.expect("a catalog was chosen");
    let stale = v.stale;
    let loaded = load_decoded(&config.server, v.catalog, None).map_err(|d| {
        anyhow!("the signed catalog is not valid: {}", d.0.first().map(|d| d.message.as_str()).unwrap_or("?"))
    })?;
    let mut warnings = notes.clone();
    warnings.extend(v.warnings);
    let out = Output {
        label: format!("{} from {}", config.name, config.server),
        dry_run: args.dry_run,
        format: args.format,
        color: args.color,
        verbose: args.verbose,
    };
    let (info, collect) = apply::converge(&out, &host, &loaded, Some(v.signed_by), warnings, stop);
    let summary = collect.summary.clone().unwrap_or_default();
    let report = Report {
        started_at: started,
        info: info.clone(),
        resources: collect.resources,
        summary: summary.clone(),
        stale,
    };
    let body = serde_json::to_vec(&report)?;
    // Reports: the queue first (oldest first), then this one; what cannot be sent waits.
    let mut delivered = true;
    for (path, queued) in state::queued_reports(&host) {
        if rt.block_on(client.report(&queued)).is_err() {
            delivered = false;
            break;
        }
        let _ = converge_modules::host::Host::remove(&host, &path);
    }
    let sent = delivered
        && match rt.block_on(client.report(&body)) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("report not delivered: {e:#}");
                false
            }
        };
    if !sent && !args.dry_run {
        state::queue_report(&host, &body)?;
    }
    if !args.dry_run {
        let mut status = state::read_status(host.root());
        status.last_run = Some(LastRun {
            started,
            finished: Timestamp::now(),
            unchanged: summary.unchanged,
            changed: summary.changed,
            failed: summary.failed,
            skipped: summary.skipped,
            serial: info.serial,
            commit: info.commit,
            source: source.into(),
            stale,
            notes,
        });
        state::write_status(&host, &status)?;
    }
    Ok(Outcome { code: apply::exit_code(args.detailed_exitcodes, &summary), reached, retry_after })
}

static STOP: AtomicBool = AtomicBool::new(false);
static RUN_NOW: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    if sig == libc::SIGHUP {
        RUN_NOW.store(true, Ordering::SeqCst);
    } else {
        STOP.store(true, Ordering::SeqCst);
    }
}

fn install_signals() -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
    for sig in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to atomics, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.context("cannot install signal handlers")?;
    }
    Ok(())
}

/// Sleeps until `wait` has passed, SIGHUP asks for a run, or SIGTERM asks to stop.
fn sleep(wait: Duration) {
    let until = Instant::now() + wait;
    while Instant::now() < until && !STOP.load(Ordering::SeqCst) && !RUN_NOW.swap(false, Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100).min(until.saturating_duration_since(Instant::now())));
    }
}

/// A little randomness for back-off jitter.
fn jitter(range: u64) -> u64 {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos() as u64;
    if range == 0 { 0 } else { nanos % range }
}

/// `converge run` without `--once`.
pub fn daemon(args: &RunArgs) -> Result<i32> {
    install_signals()?;
    let root = Root::open(&args.root).with_context(|| format!("cannot open root {}", args.root.display()))?;
    let config = AgentConfig::load(&root)?;
    let mut wait = Duration::from_secs(config.splay_offset() as u64);
    let mut failures = 0u32;
    tracing::info!("converge agent for {} ({}); first run in {} s", config.name, config.server, wait.as_secs());
    loop {
        set_next(&args.root, wait);
        sleep(wait);
        if STOP.load(Ordering::SeqCst) {
            return Ok(0);
        }
        let config = AgentConfig::load(&root)?;
        let interval = config.interval as u64;
        let outcome = run_once(args, Some(&STOP));
        if STOP.load(Ordering::SeqCst) {
            return Ok(0);
        }
        wait = match outcome {
            Ok(Outcome { reached: true, retry_after: None, .. }) => {
                failures = 0;
                Duration::from_secs(interval)
            }
            Ok(Outcome { retry_after: Some(after), .. }) => Duration::from_secs(after.min(interval)),
            Ok(_) | Err(_) => {
                if let Err(e) = &outcome {
                    tracing::error!("run failed: {e:#}");
                }
                failures += 1;
                let base = (30u64 << failures.min(10)).min(interval);
                Duration::from_secs(base - base / 4 + jitter(base / 2 + 1))
            }
        };
    }
}

fn set_next(root: &std::path::Path, wait: Duration) {
    let Ok(r) = Root::open(root) else { return };
    let host = RealHost::new(r, BackupStore::new(STATE_DIR));
    let mut status = state::read_status(host.root());
    status.next_run = Some(Timestamp(Timestamp::now().0 + wait.as_secs() as i64));
    let _ = state::write_status(&host, &status);
}

/// `converge status`.
pub fn status(root: &std::path::Path) -> Result<i32> {
    let r = Root::open(root).with_context(|| format!("cannot open root {}", root.display()))?;
    let config = AgentConfig::load(&r).ok();
    let Status { last_run, next_run } = state::read_status(&r);
    if let Some(c) = &config {
        println!("node        {} (server {}, every {} s)", c.name, c.server, c.interval);
    } else {
        println!("node        not joined to a server (converge bootstrap)");
    }
    match last_run {
        None => println!("last run    none yet"),
        Some(l) => {
            let outcome = if l.failed > 0 {
                "FAILED"
            } else if l.changed > 0 {
                "changed"
            } else {
                "in sync"
            };
            println!(
                "last run    {} ({} s): {outcome}: {} changed, {} failed, {} skipped, {} unchanged",
                l.started,
                l.finished.0 - l.started.0,
                l.changed,
                l.failed,
                l.skipped,
                l.unchanged
            );
            println!(
                "catalog     serial {}, commit {}, from the {}{}",
                l.serial.map_or("-".into(), |s| s.to_string()),
                l.commit.as_deref().unwrap_or("-"),
                l.source,
                if l.stale { " (stale: past its expiry)" } else { "" }
            );
            for n in &l.notes {
                println!("note        {n}");
            }
        }
    }
    if let Some(n) = next_run {
        println!("next run    {n}");
    }
    Ok(0)
}
