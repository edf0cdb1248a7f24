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

use crate::apply::{self, Output};
use crate::backup::BackupStore;
use crate::client::{CatalogReply, Client, Identity, Sent};
use crate::confirm;
use crate::fs::Root;
use crate::host::RealHost;
use crate::signed::Trust;
use crate::state::{self, AgentConfig, LastRun, RunLock, STATE_DIR, Status};
use anyhow::{Context, Result, anyhow};
use converge_modules::catalog::{FORMAT, FORMAT_SEALED};
use converge_modules::load::load_decoded;
use converge_modules::text::clip;
use converge_modules::time::Timestamp;
use converge_modules::trust::{Refusal, Verified};
use converge_modules::wire::{CatalogRequest, Report};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Run once and exit (the default when `converge` is run with no command).
    #[arg(long)]
    pub once: bool,
    #[command(flatten)]
    pub opts: apply::RunOptions,
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
    let identity =
        converge_modules::hash::sha256_hex(format!("{}\0{ca}\0{cert}\0{key}", config.servers.join("\0")).as_bytes());
    let mut kept = CLIENT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((id, c)) = kept.as_ref()
        && *id == identity
    {
        return Ok(c.clone());
    }
    let c = std::sync::Arc::new(new_client(root, config, &ca, &cert, &key)?);
    *kept = Some((identity, c.clone()));
    Ok(c)
}

/// A client of its own, with no connection from before: what a confirmation reaches the
/// server with (a kept connection would say nothing of whether the host can reach it now).
fn fresh_client(root: &Root, config: &AgentConfig) -> Result<std::sync::Arc<Client>> {
    let (ca, cert, key) = (read(root, state::CA_FILE)?, read(root, state::CERT_FILE)?, read(root, state::KEY_FILE)?);
    Ok(std::sync::Arc::new(new_client(root, config, &ca, &cert, &key)?))
}

fn new_client(root: &Root, config: &AgentConfig, ca: &str, cert: &str, key: &str) -> Result<Client> {
    let damaged = |path: &str, why: String| {
        let shown = root.path().join(path.trim_start_matches('/'));
        anyhow!("{}: {why}: this host's identity is damaged; join again (converge bootstrap)", shown.display())
    };
    let roots = crate::client::pem_certificates(ca).map_err(|e| damaged(state::CA_FILE, e))?;
    let certs = crate::client::pem_certificates(cert).map_err(|e| damaged(state::CERT_FILE, e))?;
    let key = crate::client::pem_key(key).map_err(|e| damaged(state::KEY_FILE, e))?;
    Client::new(&config.servers, roots, Some(Identity { certs, key })).map_err(|e| {
        damaged(
            state::CERT_FILE,
            format!("{e:#} (with {})", root.path().join(state::KEY_FILE.trim_start_matches('/')).display()),
        )
    })
}

/// Settles a confirmation (see [`crate::confirm`]) against the verified `catalog` its changes
/// came from: reaching the server on new connections. Returns the reverted events, and the
/// client to go on with (the new one, whose connections are known to work).
fn settle(
    host: &RealHost,
    config: &AgentConfig,
    rt: &tokio::runtime::Runtime,
    pending: &confirm::Pending,
    resources: &[converge_modules::catalog::Resource],
    notes: &mut Vec<String>,
) -> Result<(Vec<converge_modules::report::ResourceEvent>, std::sync::Arc<Client>)> {
    let fresh = fresh_client(host.root(), config)?;
    let mut contact = |within: Duration| -> Result<(), String> {
        match rt.block_on(async { tokio::time::timeout(within, fresh.ca_bundle()).await }) {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err(format!("no answer within {} s", within.as_secs())),
        }
    };
    let system = apply::system(host, resources);
    let n = pending.entries.len();
    eprintln!("converge: confirming {n} change(s) (by {}): reaching the server again...", pending.deadline);
    match confirm::settle(host, pending, resources, &system, &mut contact)? {
        confirm::Settled::Confirmed => {
            notes.push(format!(
                "{n} change(s) under `confirm` were confirmed: the server answered and every check passed"
            ));
            Ok((Vec::new(), fresh))
        }
        confirm::Settled::Reverted(events) => {
            for e in &events {
                let said = format!("converge: {} {}: {}", e.id, e.status.as_str(), e.message.as_deref().unwrap_or(""));
                eprintln!("{}", clip(&said, 2000));
            }
            notes.push(format!("{n} change(s) under `confirm` were not confirmed in time and were reverted"));
            Ok((events, fresh))
        }
    }
}

fn read(root: &Root, path: &str) -> Result<String> {
    state::read_text(root, path, state::SMALL_FILE).map_err(|why| {
        if root.lstat(path).ok().flatten().is_none() {
            anyhow!("{why}: join a server first (converge bootstrap)")
        } else {
            anyhow!("{why}: this host's identity is damaged; join again (converge bootstrap)")
        }
    })
}

/// One run. `stop` ends it between resources. A run that cannot converge at all (no catalog
/// it can trust, damaged state) says why in the status, so `converge status` never shows an
/// old success instead.
pub fn run_once(args: &RunArgs, stop: Option<&AtomicBool>) -> Result<Outcome> {
    let root = Root::open(&args.opts.root).with_context(|| format!("cannot open root {}", args.opts.root.display()))?;
    if root.lstat(state::CONFIG_FILE)?.is_none() {
        // Not joined: nothing to lock, record or create (this says so; should the file have
        // appeared meanwhile, the run goes on).
        AgentConfig::load(&root)?;
    }
    let lock = RunLock::take(&root, args.opts.dry_run)?;
    let host = RealHost::new(root, BackupStore::new(STATE_DIR));
    let started = Timestamp::now();
    let outcome =
        AgentConfig::load(host.root()).and_then(|config| locked_run(args, stop, &config, &host, &lock, started));
    if let (Err(e), true) = (&outcome, lock.exclusive()) {
        let (mut status, _) = state::read_status(host.root());
        let error = Some(clip(&format!("{e:#}"), 4096).into_owned());
        status.last_run = Some(LastRun::nothing(started, status.last_run.take(), "none", Vec::new(), error));
        let _ = state::write_status(&host, &status);
    }
    // The agent's own upgrade, deferred by the run, starts once the run has let go.
    drop(lock);
    if let Some(note) = crate::upgrade::start(&host, &args.opts.root) {
        tracing::info!("{note}");
    }
    outcome
}

/// A catalog the agent can fall back on, verified, and the ETag to send for it.
struct Fallback {
    verified: Verified,
    etag: Option<String>,
}

/// The newest cached envelope that still verifies, else the one `applied.json` keeps. A cached
/// envelope that no longer verifies is set aside (one older than the last applied is just
/// old). Its ETag is sent only when it is the newest cached one: a 304 then means exactly it.
fn fallback(host: &RealHost, lock: &RunLock, trust: &Trust, notes: &mut Vec<String>) -> Option<Fallback> {
    let set_aside = |path: &str, why: String, notes: &mut Vec<String>| {
        if lock.exclusive() {
            notes.push(state::set_aside(host, path, &why));
        } else {
            notes.push(format!("a cached catalog no longer verifies ({why}); a run sets it aside"));
        }
    };
    for (i, path) in state::cached_envelopes(host).into_iter().enumerate() {
        let bytes = match state::read_envelope(host, &path) {
            Ok(b) => b,
            Err(why) => {
                set_aside(&path, why, notes);
                continue;
            }
        };
        match trust.verify(host, &bytes, true, false) {
            Ok(verified) => {
                let etag = if i == 0 { state::read_etag(host, &path, notes) } else { None };
                return Some(Fallback { verified, etag });
            }
            Err(Refusal::Rollback { .. }) => {}
            Err(r) => set_aside(&path, r.to_string(), notes),
        }
    }
    let bytes = serde_json::to_vec(&trust.last_envelope(host)?).ok()?;
    trust.verify(host, &bytes, true, false).ok().map(|verified| Fallback { verified, etag: None })
}

fn locked_run(
    args: &RunArgs,
    stop: Option<&AtomicBool>,
    config: &AgentConfig,
    host: &RealHost,
    lock: &RunLock,
    started: Timestamp,
) -> Result<Outcome> {
    let mut notes: Vec<String> = crate::renew::finish_switch(host).into_iter().collect();
    if lock.exclusive() {
        notes.extend(crate::upgrade::outcome(host));
    }
    let mut client = client(host.root(), config)?;
    let mut trust = Trust::load(host, lock, None, config.name.clone()).with_context(|| {
        let shown = host.root().path().join(state::CONFIG_FILE.trim_start_matches('/'));
        format!("{} names this node {}", shown.display(), config.name)
    })?;
    notes.append(&mut trust.notes);
    // A pause (`converge pause`) stops real runs from changing anything; dry-runs go on. One
    // past its end is removed here, under the run lock.
    // (A dry-run goes on while paused, and says the pause to the server all the same.)
    let paused = state::read_pause(host.root(), Timestamp::now());
    if lock.exclusive() && paused.is_none() && state::remove_pause(host)? {
        notes.push("the pause ended (its --for ran out): this run converges".into());
    }
    let facts = crate::facts::collect(host.root(), &config.name);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let certificate = keep_certificate(host, config, &rt, &mut client, &mut notes, args.opts.dry_run);
    let cached = fallback(host, lock, &trust, &mut notes);
    // A confirmation a run left pending (it died, or the host rebooted, while waiting) is
    // settled first, against the verified catalog its changes came from.
    let mut settled: Vec<converge_modules::report::ResourceEvent> = Vec::new();
    if lock.exclusive()
        && !args.opts.dry_run
        && let Some(pending) = confirm::read_pending(host, &mut notes)
    {
        let opened = cached.as_ref().map(|c| apply::open_sealed(host.root(), c.verified.catalog.clone()));
        match opened {
            Some(Ok(catalog)) => {
                let (events, fresh) = settle(host, config, &rt, &pending, &catalog.resources, &mut notes)?;
                settled = events;
                client = fresh;
            }
            Some(Err(e)) => notes.push(state::set_aside(
                host,
                confirm::PENDING_FILE,
                &format!("its catalog cannot be opened ({e:#}), so its changes cannot be checked or reverted: check the paths it names by hand"),
            )),
            None => notes.push(state::set_aside(
                host,
                confirm::PENDING_FILE,
                "no verified catalog is cached to check it against: check the paths it names by hand",
            )),
        }
    }
    let queued = state::queued_reports(host, &mut notes);
    let held_bundle = read(host.root(), state::CA_FILE).map(|t| converge_modules::hash::sha256_hex(t.as_bytes())).ok();
    let request = CatalogRequest {
        agent_version: env!("CARGO_PKG_VERSION").into(),
        formats: vec![
            FORMAT,
            FORMAT_SEALED,
            converge_modules::catalog::READS_PROVENANCE,
            converge_modules::catalog::READS_BLOBS,
        ],
        facts,
        ca_bundle: held_bundle.clone(),
        keys_version: Some(trust.held.list.version),
        paused: paused.as_ref().map(|p| clip(&p.describe(), converge_modules::wire::Limits::PAUSED).into_owned()),
    };
    let (mut reached, mut retry_after) = (false, None);
    let reply = rt.block_on(client.catalog(&request, cached.as_ref().and_then(|c| c.etag.as_deref())));
    let fresh = match reply {
        Ok(CatalogReply::Envelope { bytes, etag, ca_bundle }) => {
            reached = true;
            adopt_bundle(host, &rt, &client, held_bundle.as_deref(), ca_bundle, &mut notes);
            Some((bytes, etag))
        }
        Ok(CatalogReply::NotModified { ca_bundle }) => {
            reached = true;
            adopt_bundle(host, &rt, &client, held_bundle.as_deref(), ca_bundle, &mut notes);
            None
        }
        Ok(CatalogReply::Retry(after)) => {
            reached = true;
            retry_after = Some(after);
            notes.push(format!("the server is busy (asked to retry in {after} s): enforcing the cached catalog"));
            None
        }
        Err(e) => {
            let text = format!("{e:#}");
            notes.push(format!("{text}: enforcing the cached catalog"));
            if text.contains("UnknownIssuer") {
                notes.push(format!(
                    "the server's certificate is not from a CA this host trusts: if the operator has rotated the CA, \
                     ask for a one-time token and the current CA hash (converge-server ca status) and run: converge \
                     bootstrap --server {} --ca-hash sha256:NEW --name {} --token TOKEN",
                    config.server, config.name
                ));
            }
            None
        }
    };
    // A fresh catalog must pass every check; one that does not is reported, and the cached
    // catalog is enforced instead.
    let mut source = "server";
    let mut verified: Option<Verified> = None;
    // With a fresh catalog, the one applied before it (`Some(None)`: none ever was): what its
    // changes are measured against, to tell what the catalog asked from drift repaired.
    let mut before: Option<Option<converge_modules::trust::Envelope>> = None;
    if let Some((bytes, etag)) = &fresh {
        match trust.verify(host, bytes, false, false) {
            Ok(v) => {
                before = Some(trust.last_envelope(host));
                if !args.opts.dry_run {
                    trust.record(host, lock, &v, bytes)?;
                    state::keep_envelope(host, v.applied.serial, bytes, etag.as_deref())?;
                }
                verified = Some(v);
            }
            Err(r) => notes.push(format!("the server's catalog was refused: {r}; enforcing the cached catalog")),
        }
    }
    let v = match verified {
        Some(v) => v,
        None => {
            if fresh.is_some() || !reached || retry_after.is_some() {
                source = "cache";
            }
            cached
                .ok_or_else(|| {
                    anyhow!(
                        "no catalog: {}; and none is cached yet",
                        notes.last().map(String::as_str).unwrap_or("the server sent none")
                    )
                })?
                .verified
        }
    };
    if let Some(p) = paused.as_ref().filter(|_| lock.exclusive()) {
        // The catalog was fetched and verified (and is kept for the run after `resume`);
        // nothing is applied, nothing reported (the server shows the pause from the request).
        let said = format!("converge: {}: this run changed nothing (converge resume)", p.describe());
        eprintln!("{}", clip(&said, 2000));
        let (mut status, _) = state::read_status(host.root());
        notes.push(clip(&said, 2000).into_owned());
        status.last_run = Some(LastRun::nothing(started, status.last_run.take(), "paused", notes, None));
        status.certificate = certificate.or(status.certificate);
        state::write_status(host, &status)?;
        return Ok(Outcome { code: 0, reached, retry_after });
    }
    let origins = match before {
        None => Origins::Same,
        Some(None) => Origins::First,
        Some(Some(env)) => {
            let previous = serde_json::to_vec(&env).ok().and_then(|b| trust.verify(host, &b, true, true).ok());
            match previous {
                Some(p) if p.applied.resources_sha256 == v.applied.resources_sha256 => Origins::Same,
                Some(p) => Origins::Changed(changed_ids(&p.catalog, &v.catalog)),
                None => Origins::Unknown,
            }
        }
    };
    let stale = v.stale;
    let mut catalog = apply::open_sealed(host.root(), v.catalog).map_err(|e| match notes.last() {
        Some(note) => anyhow!("{e:#} (and: {note})"),
        None => e,
    })?;
    apply::keep_aside(host.root(), &mut catalog);
    let loaded = load_decoded(&config.server, catalog, None).map_err(|d| {
        anyhow!("the signed catalog is not valid: {}", d.0.first().map(|d| d.message.as_str()).unwrap_or("?"))
    })?;
    // Commit-confirmed apply: the guard keeps what `confirm` resources were before they change,
    // and holds those whose change was reverted while the catalog asks the same.
    let mut reverted = confirm::read_reverted(host, lock.exclusive(), &mut notes);
    if lock.exclusive() && !args.opts.dry_run {
        confirm::prune_reverted(host, &mut reverted, &loaded.catalog.resources)?;
    }
    // The catalog's blobs, before anything converges (a dry-run needs only their hashes).
    if lock.exclusive() && !args.opts.dry_run {
        crate::blobs::fetch(host, &rt, &client, &loaded.catalog.resources, &mut notes);
    }
    let mut warnings = notes.clone();
    warnings.extend(v.warnings);
    let out = Output {
        label: format!("{} from {}", config.name, config.server),
        dry_run: args.opts.dry_run,
        format: args.opts.format,
        color: args.opts.color,
        verbose: args.opts.verbose,
        report: true,
    };
    let guard = confirm::Confirming::new(
        host,
        loaded.catalog.serial,
        loaded.catalog.source.as_ref().map(|s| s.commit.clone()),
        reverted,
    );
    let (info, collect) = apply::converge(&out, host, &loaded, Some(v.signed_by), warnings, stop, Some(&guard));
    if lock.exclusive() && !args.opts.dry_run {
        crate::blobs::prune(host, &loaded.catalog.resources);
    }
    let mut summary = collect.summary.clone().unwrap_or_default();
    let mut resources = collect.resources;
    origins.tag(&mut resources);
    if let Some(pending) = guard.pending() {
        let (events, fresh) = settle(host, config, &rt, &pending, &loaded.catalog.resources, &mut notes)?;
        settled.extend(events);
        client = fresh;
    }
    if !settled.is_empty() {
        confirm::merge_events(&mut resources, settled);
        let mut recount = converge_modules::report::Summary {
            dry_run: summary.dry_run,
            duration_ms: summary.duration_ms,
            ..Default::default()
        };
        for e in &resources {
            recount.count(&e.status);
        }
        summary = recount;
    }
    let mut report = Report { started_at: started, info: info.clone(), resources, summary: summary.clone(), stale };
    report.clip();
    let body = serde_json::to_vec(&report)?;
    // Reports: the queue first (oldest first), then this one; what cannot be sent now waits,
    // and what the server refuses for what it is (it never will take it) goes.
    let mut reachable = true;
    for (path, queued) in queued {
        match rt.block_on(client.report(&queued)) {
            Ok(sent) => {
                if let Sent::Refused(why) = sent {
                    tracing::warn!("a queued report was refused by the server and dropped: {why}");
                }
                let _ = converge_modules::host::Host::remove(host, &path);
            }
            Err(_) => {
                reachable = false;
                break;
            }
        }
    }
    let sent = reachable
        && match rt.block_on(client.report(&body)) {
            Ok(Sent::Stored) => true,
            Ok(Sent::Refused(why)) => {
                tracing::warn!("the server refused this run's report: {why}");
                true
            }
            Err(e) => {
                tracing::warn!("report not delivered: {e:#}");
                false
            }
        };
    if !sent && !args.opts.dry_run {
        state::queue_report(host, &body)?;
    }
    if !args.opts.dry_run {
        let (mut status, _) = state::read_status(host.root());
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
            error: None,
        });
        status.certificate = certificate.or(status.certificate);
        state::write_status(host, &status)?;
    }
    Ok(Outcome { code: apply::exit_code(args.opts.detailed_exitcodes, &summary), reached, retry_after })
}

/// Adopts the server's CA bundle when the server names another than the one held: fetched
/// over the mutual TLS this host already trusts (during a CA rollover: the successor beside
/// the current CA; after it: the successor alone). A failure is a note; the next run tries
/// again.
fn adopt_bundle(
    host: &RealHost,
    rt: &tokio::runtime::Runtime,
    client: &Client,
    held: Option<&str>,
    named: Option<String>,
    notes: &mut Vec<String>,
) {
    let Some(named) = named.filter(|n| Some(n.as_str()) != held) else { return };
    let adopted = rt.block_on(client.ca_bundle()).and_then(|pem| {
        let certs = crate::client::pem_certificates(&pem).map_err(|e| anyhow!("the server's CA bundle: {e}"))?;
        if converge_modules::hash::sha256_hex(pem.as_bytes()) != named {
            return Err(anyhow!("the CA bundle the server sent is not the one it named (it changed meanwhile?)"));
        }
        state::write(host, state::CA_FILE, pem.as_bytes(), 0o644)?;
        Ok(certs.len())
    });
    match adopted {
        Ok(n) => {
            notes.push(format!("this host now trusts the server's CA bundle ({n} CA{})", if n == 1 { "" } else { "s" }))
        }
        Err(e) => notes.push(format!("the server's CA bundle could not be adopted: {e:#}; the next run tries again")),
    }
}

/// This host's certificate: renewed from two thirds of its life (the new one serves the rest
/// of this run). Expired (the host was off for months), it is renewed all the same where the
/// server still allows it (`renew_expired_within`), and otherwise the note says the exact way
/// back. A failure is a note, tried again each run, and never stops enforcement.
fn keep_certificate(
    host: &RealHost,
    config: &AgentConfig,
    rt: &tokio::runtime::Runtime,
    client: &mut std::sync::Arc<Client>,
    notes: &mut Vec<String>,
    dry_run: bool,
) -> Option<state::Certificate> {
    let v = crate::renew::validity(&read(host.root(), state::CERT_FILE).ok()?).ok()?;
    let now = Timestamp::now();
    let mut seen = state::Certificate { expires: v.not_after, renew_from: v.renew_from(), renewal_error: None };
    let expired = now >= v.not_after;
    let way_back = || {
        let ca = read(host.root(), state::CA_FILE).ok().and_then(|p| crate::client::pem_certificates(&p).ok());
        let hash = ca.and_then(|c| c.first().map(|d| converge_modules::hash::sha256_hex(d))).unwrap_or_default();
        format!(
            "this host's certificate expired at {}: ask an operator for a one-time token (converge-server token new \
             --name {name}) and run: converge bootstrap --server {} --ca-hash sha256:{hash} --name {name} --token TOKEN",
            v.not_after,
            config.server,
            name = config.name
        )
    };
    // During a CA rollover, a certificate from a CA that is not the newest this host trusts
    // is renewed at once (the server issues from the newest).
    let newest_ca = read(host.root(), state::CA_FILE).ok().and_then(|p| crate::renew::newest_ca_name(&p));
    let from_old_ca = newest_ca.is_some_and(|ca| {
        crate::renew::issuer_name(&read(host.root(), state::CERT_FILE).unwrap_or_default()).is_some_and(|i| i != ca)
    });
    // A host without a sealing key (it enrolled before there were any) makes one and renews
    // at once, which tells the server its key.
    // (One lstat on the no-op path: the key is read only where a catalog holds secrets.)
    let no_seal_key = matches!(host.root().lstat(state::SEAL_KEY_FILE), Ok(None));
    if (now < v.renew_from() && !from_old_ca && !no_seal_key) || dry_run {
        if expired {
            let why = way_back();
            notes.push(why.clone());
            seen.renewal_error = Some(why);
        }
        return Some(seen);
    }
    match crate::renew::renew(host, client, rt) {
        Ok(new) => {
            let had = if expired { format!(" (it had expired at {})", v.not_after) } else { String::new() };
            notes.push(format!(
                "this host's certificate was renewed{had}: the new one is valid until {}",
                new.not_after
            ));
            match self::client(host.root(), config) {
                Ok(c) => *client = c,
                Err(e) => notes.push(format!("the renewed certificate cannot be used: {e:#}")),
            }
            seen = state::Certificate { expires: new.not_after, renew_from: new.renew_from(), renewal_error: None };
        }
        Err(e) => {
            let why = clip(&format!("{e:#}"), 500).into_owned();
            let note = if expired {
                format!("{} (renewing it failed: {why})", way_back())
            } else {
                format!(
                    "this host's certificate could not be renewed ({why}); it expires at {}, and each run tries again",
                    v.not_after
                )
            };
            notes.push(note.clone());
            seen.renewal_error = Some(if expired { note } else { why });
        }
    }
    Some(seen)
}

/// What the daemon's signals ask: SIGTERM and SIGINT to stop, SIGHUP to run now.
#[derive(Default)]
struct Signals {
    stop: std::sync::Arc<AtomicBool>,
    run_now: std::sync::Arc<AtomicBool>,
}

impl Signals {
    fn install() -> Result<Signals> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let s = Signals::default();
        for (sig, flag) in [(SIGTERM, &s.stop), (SIGINT, &s.stop), (SIGHUP, &s.run_now)] {
            signal_hook::flag::register(sig, flag.clone()).context("cannot install signal handlers")?;
        }
        Ok(s)
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Sleeps until `wait` has passed, SIGHUP asks for a run, or SIGTERM asks to stop.
    fn sleep(&self, wait: Duration) {
        let until = Instant::now() + wait;
        while Instant::now() < until && !self.stopping() && !self.run_now.swap(false, Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100).min(until.saturating_duration_since(Instant::now())));
        }
    }
}

/// `converge run` without `--once`.
pub fn daemon(args: &RunArgs) -> Result<i32> {
    let signals = Signals::install()?;
    let root = Root::open(&args.opts.root).with_context(|| format!("cannot open root {}", args.opts.root.display()))?;
    let config = AgentConfig::load(&root)?;
    let mut wait = Duration::from_secs(config.splay_offset() as u64);
    let mut failures = 0u32;
    tracing::info!("converge agent for {} ({}); first run in {} s", config.name, config.server, wait.as_secs());
    loop {
        set_next(&args.opts.root, wait);
        signals.sleep(wait);
        if signals.stopping() {
            return Ok(0);
        }
        let config = AgentConfig::load(&root)?;
        let interval = config.interval as u64;
        let outcome = run_once(args, Some(&signals.stop));
        if signals.stopping() {
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
                Duration::from_secs(base - base / 4 + fastrand::u64(0..=base / 2))
            }
        };
    }
}

fn set_next(root: &std::path::Path, wait: Duration) {
    let Ok(r) = Root::open(root) else { return };
    // Under the lock like every write of the state; when a run holds it, that run writes.
    let Ok(_lock) = RunLock::take(&r, false) else { return };
    let host = RealHost::new(r, BackupStore::new(STATE_DIR));
    let (mut status, _) = state::read_status(host.root());
    status.next_run = Timestamp::now().checked_add(wait.as_secs() as i64);
    let _ = state::write_status(&host, &status);
}

/// `converge status`.
/// What the catalog enforced brings against the one applied before it.
enum Origins {
    /// The same resources: every change repaired drift.
    Same,
    /// No catalog was applied before: every change is the catalog's.
    First,
    /// The resources (by id) new or changed since: their changes are the catalog's.
    Changed(std::collections::HashSet<String>),
    /// The catalog before could not be read (a retired key, a damaged record): not said.
    Unknown,
}

impl Origins {
    /// Says, for each change (or change a dry-run would make), where it came from.
    fn tag(&self, events: &mut [converge_modules::report::ResourceEvent]) {
        use converge_modules::report::{Cause, Status};
        for e in
            events.iter_mut().filter(|e| matches!(e.status, Status::Changed | Status::Unplanned | Status::WouldChange))
        {
            e.cause = match self {
                Origins::Same => Some(Cause::Drift),
                Origins::First => Some(Cause::Catalog),
                Origins::Changed(ids) if ids.contains(&e.id) => Some(Cause::Catalog),
                Origins::Changed(_) => Some(Cause::Drift),
                Origins::Unknown => None,
            };
        }
    }
}

/// The resources of `now` that `before` did not have, or had otherwise (a field, a sealed
/// value's fingerprint). Pure.
fn changed_ids(
    before: &converge_modules::catalog::Catalog,
    now: &converge_modules::catalog::Catalog,
) -> std::collections::HashSet<String> {
    let sealed = |c: &converge_modules::catalog::Catalog, id: &converge_modules::catalog::ResourceId| {
        c.sealed
            .iter()
            .filter(|s| &s.resource == id)
            .map(|s| format!("{:?}={}", s.field, s.fingerprint))
            .collect::<Vec<_>>()
    };
    let old: std::collections::HashMap<String, &converge_modules::catalog::Resource> =
        before.resources.iter().map(|r| (r.id.to_string(), r)).collect();
    now.resources
        .iter()
        .filter(|r| {
            old.get(&r.id.to_string()).is_none_or(|o| **o != **r || sealed(before, &r.id) != sealed(now, &r.id))
        })
        .map(|r| r.id.to_string())
        .collect()
}

/// `converge pause`: runs change nothing on this host until `converge resume` (or for
/// `duration`). Waits for a run underway to end first (5 minutes at most), so that once it
/// returns nothing changes.
pub fn pause(root: &std::path::Path, reason: &str, duration: Option<&str>) -> Result<i32> {
    let reason = reason.trim();
    if reason.is_empty() || reason.chars().count() > state::PAUSE_REASON || reason.chars().any(char::is_control) {
        anyhow::bail!(
            "--reason: say why in one line of at most {} characters (it shows on the fleet page)",
            state::PAUSE_REASON
        );
    }
    let seconds = match duration {
        None => None,
        Some(d) => Some(match converge_modules::settings::parse_duration(d) {
            Ok(s) if s > 0 => s,
            _ => anyhow::bail!("--for {}: give a duration like 30m, 4h or 2d", clip(d, 40)),
        }),
    };
    let r = Root::open(root).with_context(|| format!("cannot open root {}", root.display()))?;
    let lock = wait_for_lock(&r)?;
    let host = RealHost::new(r, BackupStore::new(STATE_DIR));
    let now = Timestamp::now();
    let by = ["SUDO_USER", "LOGNAME", "USER"].iter().find_map(|v| std::env::var(v).ok()).filter(|u| !u.is_empty());
    let pause = state::Pause {
        reason: reason.to_string(),
        since: now,
        until: seconds.map(|s| Timestamp(now.0 + s)),
        by: by.map(|b| clip(&b, 64).into_owned()),
    };
    state::write_pause(&host, &pause)?;
    drop(lock);
    println!("{}", pause.describe());
    println!("runs fetch and verify their catalog but change nothing, and the fleet page shows the pause");
    Ok(0)
}

/// `converge resume`: ends a pause; the next run converges.
pub fn resume(root: &std::path::Path) -> Result<i32> {
    let r = Root::open(root).with_context(|| format!("cannot open root {}", root.display()))?;
    let lock = wait_for_lock(&r)?;
    let host = RealHost::new(r, BackupStore::new(STATE_DIR));
    let was = state::read_pause(host.root(), Timestamp(i64::MIN));
    let removed = state::remove_pause(&host)?;
    drop(lock);
    match (removed, was) {
        (true, Some(p)) => {
            println!("resumed ({}); the next run converges (converge run --once runs it now)", p.describe())
        }
        _ => println!("not paused"),
    }
    Ok(0)
}

/// The run lock, waiting (5 minutes at most) for a run underway to end.
fn wait_for_lock(root: &Root) -> Result<RunLock> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut said = false;
    loop {
        match RunLock::take(root, false) {
            Ok(l) => return Ok(l),
            Err(e) if Instant::now() < deadline && format!("{e:#}").contains("another converge run") => {
                if !said {
                    eprintln!("converge: a run is underway; waiting for it to end");
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    }
}

pub fn status(root: &std::path::Path) -> Result<i32> {
    let r = Root::open(root).with_context(|| format!("cannot open root {}", root.display()))?;
    let config = AgentConfig::load(&r);
    let (Status { last_run, next_run, certificate }, damaged) = state::read_status(&r);
    match &config {
        Ok(c) => {
            println!("node        {} (server {}, every {} s)", c.name, clip(&c.servers.join(", "), 400), c.interval)
        }
        Err(e) => println!("node        {}", clip(&format!("{e:#}"), 400)),
    }
    if let Some(d) = damaged {
        println!("note        {}", clip(&d, 400));
    }
    if let Some(p) = state::read_pause(&r, Timestamp::now()) {
        println!("PAUSED      {} (runs change nothing)", clip(&p.describe(), 1000));
    }
    match last_run {
        None => println!("last run    none yet"),
        Some(l) if l.error.is_some() => {
            println!(
                "last run    {}: FAILED, nothing converged: {}",
                l.started,
                clip(l.error.as_deref().unwrap_or(""), 2000)
            );
        }
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
                clip(l.commit.as_deref().unwrap_or("-"), 80),
                l.source,
                if l.stale { " (stale: past its expiry)" } else { "" }
            );
            for n in &l.notes {
                println!("note        {}", clip(n, 2000));
            }
        }
    }
    if let Some(n) = next_run {
        println!("next run    {n}");
    }
    if let Some(c) = certificate {
        match &c.renewal_error {
            None => println!("certificate valid until {} (renewed automatically from {})", c.expires, c.renew_from),
            Some(e) => println!("certificate valid until {}: RENEWAL FAILED: {}", c.expires, clip(e, 1000)),
        }
    }
    Ok(0)
}

#[cfg(test)]
mod origins_tests {
    use super::*;
    use converge_modules::catalog::{Catalog, FileSpec, Kind, Meta, Resource, ResourceId, Spec};
    use converge_modules::report::{Cause, ResourceEvent, Status};

    fn file(path: &str, content: &str) -> Resource {
        Resource::new(
            ResourceId::new(Kind::File, path).unwrap(),
            Meta::default(),
            Spec::File(FileSpec { content: Some(content.into()), ..Default::default() }),
        )
    }

    fn sealed(c: &mut Catalog, path: &str, fingerprint: &str) {
        c.sealed.push(converge_modules::sealed::Sealed {
            resource: ResourceId::new(Kind::File, path).unwrap(),
            field: converge_modules::sealed::Field::Content,
            fingerprint: fingerprint.into(),
        });
    }

    #[test]
    fn a_change_is_the_catalogs_when_its_resource_is_new_or_changed_else_drift_repaired() {
        let mut before = Catalog::new(vec![file("/a", "1"), file("/b", "x"), file("/s", "")]);
        sealed(&mut before, "/s", "f1");
        let mut now = Catalog::new(vec![file("/a", "2"), file("/b", "x"), file("/s", ""), file("/new", "n")]);
        sealed(&mut now, "/s", "f2");
        let ids = changed_ids(&before, &now);
        let mut want: Vec<&str> = vec!["file:/a", "file:/new", "file:/s"];
        want.sort();
        let mut got: Vec<&str> = ids.iter().map(String::as_str).collect();
        got.sort();
        assert_eq!(got, want, "a field, a new resource, a sealed value's fingerprint; not /b");
        let event = |id: &str, status| ResourceEvent { id: id.into(), status, ..Default::default() };
        let mut events = vec![
            event("file:/a", Status::Changed),
            event("file:/b", Status::Changed),
            event("file:/x", Status::Unchanged),
        ];
        Origins::Changed(ids).tag(&mut events);
        let causes: Vec<Option<Cause>> = events.iter().map(|e| e.cause).collect();
        assert_eq!(causes, [Some(Cause::Catalog), Some(Cause::Drift), None]);
        Origins::Same.tag(&mut events);
        assert_eq!(events[0].cause, Some(Cause::Drift));
        Origins::Unknown.tag(&mut events);
        assert_eq!(events[0].cause, None, "not said when the catalog before cannot be read");
    }
}
