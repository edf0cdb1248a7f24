//! What the server does for its fleet, apart from HTTP: enrollment, the catalog of each node
//! (compiled from the branch's current commit, cached, signed), reports, and watching the
//! repository for new commits.
//!
//! A catalog is compiled again only when its cache key changes: the commit, the node, the
//! facts site.yaml declares (a volatile undeclared fact never forces a compile) and the
//! compiler's version. Its serial changes only when its resources do; an unchanged catalog is
//! re-signed with the same serial once past half its lifetime. A node whose compile fails keeps
//! its last good catalog, and the failure is recorded for the fleet page.

use crate::ca::Ca;
use crate::compiler::Compiler;
use crate::config::Config;
use crate::db::{Cert, Db, Pending, ReportRow, Stored, Visit, now};
use crate::keys;
use crate::repo::Repo;
use crate::secrets::SecretsKey;
use anyhow::{Context, Result};
use converge_modules::catalog::FORMAT;
use converge_modules::hash::sha256_hex;
use converge_modules::time::Timestamp;
use converge_modules::trust::{Envelope, resources_sha256};
use converge_modules::wire::{EnrollRequest, EnrollResponse, RenewRequest, RenewResponse, Report};
use ed25519_dalek::SigningKey;
use serde_json::{Map, Value as Json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

/// Changes whenever compiling the same inputs could give another catalog.
pub const COMPILER_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "/format-", "1");

/// The repository as compiled now.
pub struct Current {
    pub commit: String,
    /// The agreement that made this commit current ([`Db::agreed`]); -1 while this server
    /// lacks the commit the servers agree on (it then compiles nothing, and serves what the
    /// store holds).
    pub epoch: i64,
    pub compiler: Compiler,
}

/// What a node told the server last time it asked, to be written in batches.
#[derive(Default)]
struct Seen {
    at: i64,
    version: String,
    facts: Option<(String, String)>,
    ca_bundle: Option<String>,
    keys_version: Option<u64>,
    paused: Option<String>,
}

pub struct Fleet {
    pub config: Config,
    pub db: Db,
    /// The CA, and during a rollover the one before it: taken in again when `ca rotate` or
    /// `ca retire` changes the state directory ([`Fleet::watch_ca`]).
    ca: RwLock<Arc<Ca>>,
    ca_bundle_hash: RwLock<String>,
    /// The TLS configuration in force (rebuilt when the trusted CAs change).
    tls: RwLock<Arc<rustls::ServerConfig>>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    /// The key catalogs are signed with and the key list sent along: replaced together, and
    /// only when they agree, when `keys rotate` changes them ([`Fleet::watch_keys`]).
    signing: RwLock<Arc<Signing>>,
    current: RwLock<Arc<Current>>,
    /// During a rollout: the commit hosts in waves not yet open keep, compiled.
    previous: RwLock<Option<Arc<Current>>>,
    /// Commits hosts are pinned to (site.yaml `pins`), compiled when first asked for.
    pinned: Mutex<HashMap<String, Arc<Current>>>,
    /// The rollout of the current commit, as last read.
    progress: RwLock<Option<crate::rollout::Progress>>,
    /// The last catalog of each node, as in the store, without its envelope (serial, etag,
    /// cache key, when signed): what a poll for the catalog a host holds needs, in a few
    /// hundred bytes a node. An envelope is read from the store when it is sent.
    catalogs: RwLock<HashMap<String, Arc<Stored>>>,
    /// The facts hash last recorded per node.
    facts: RwLock<HashMap<String, String>>,
    seen: Mutex<HashMap<String, Seen>>,
    /// Every certificate by fingerprint, as the store has it: read at start, kept current by
    /// this server's enrollments and by [`Fleet::watch_certs`] (what `node revoke` and other
    /// processes change), so the check every request makes is no database call.
    certs: RwLock<HashMap<String, Cert>>,
    /// When the store's certificates were last looked at.
    cert_watch: Mutex<i64>,
    /// The branch's head as this server last saw it, to tell when it moves here.
    last_head: Mutex<Option<String>>,
    /// Who proposes commits, as the store records it: host name and port.
    pub name: String,
    pub compiles: tokio::sync::Semaphore,
    pub admission: crate::http::Admission,
    /// The server's own certificate, renewed in place.
    pub server_cert: Arc<crate::http::ServerCert>,
    pub metrics: crate::metrics::Metrics,
    pub started: i64,
    /// Opens the repository's secrets (in memory only) and keys the fingerprints of sealed
    /// values.
    secrets_key: Arc<SecretsKey>,
    /// The server key's pin for `curl --pinnedpubkey` (bootstrap.sh).
    pub pin: String,
}

/// The catalog key and the key list, which agree: the key is a catalog key of the list.
pub struct Signing {
    pub signer: SigningKey,
    pub list: converge_modules::trust::KeyList,
    pub envelope: Envelope,
    /// The files' bytes as read, to tell when they change.
    read: (Vec<u8>, Vec<u8>),
}

impl Signing {
    /// Reads the signing key and the key list of `config`; refused unless they agree.
    pub fn read(config: &Config) -> Result<Signing> {
        let key_bytes = std::fs::read(&config.signing_key)
            .with_context(|| format!("cannot read key {}", config.signing_key.display()))?;
        let list_bytes = std::fs::read(&config.trusted_keys)
            .with_context(|| format!("cannot read key list {}", config.trusted_keys.display()))?;
        let signer = keys::read_private(&config.signing_key)?;
        let (list, envelope) = keys::read_key_list(&config.trusted_keys)?;
        let id = converge_modules::trust::key_id(&signer.verifying_key());
        if !list.keys.iter().any(|k| k.id == id && k.role == converge_modules::trust::KeyRole::Catalog) {
            anyhow::bail!(
                "{} (key {id}) is not a catalog key of {}",
                config.signing_key.display(),
                config.trusted_keys.display()
            );
        }
        Ok(Signing { signer, list, envelope, read: (key_bytes, list_bytes) })
    }

    /// The signing key's id.
    pub fn key_id(&self) -> String {
        converge_modules::trust::key_id(&self.signer.verifying_key())
    }
}

/// Why a catalog cannot be served.
pub enum Refused {
    /// Too many compiles at once: try again later.
    Busy,
    /// The node has no catalog and its compile fails.
    Compile(String),
    /// The agent reads no format this server writes.
    TooOld(Vec<u32>),
    Internal(anyhow::Error),
}

impl From<anyhow::Error> for Refused {
    fn from(e: anyhow::Error) -> Self {
        Refused::Internal(e)
    }
}

/// Whether a certificate may be served at `t`, and for which node.
/// Whether the certificate `c` may be used at `t`: live, or (`grace` > 0, to renew itself)
/// expired less than `grace` seconds ago. Pure.
fn verdict(c: &Cert, t: i64, grace: i64) -> Result<String, String> {
    if c.revoked.is_some() {
        Err(format!("the certificate of {} is revoked", c.node))
    } else if c.expires <= t && t - c.expires < grace {
        Ok(c.node.clone())
    } else if c.expires <= t {
        Err(format!(
            "the certificate of {} expired at {}: the agent renews it itself (within renew_expired_within of its end), else bootstrap again",
            c.node,
            Timestamp(c.expires)
        ))
    } else {
        Ok(c.node.clone())
    }
}

/// Runs `git rev-parse` for the branch's commit.
fn head(repo: &std::path::Path, branch: &str) -> Result<String> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["rev-parse", "--verify", "--end-of-options", &format!("{branch}^{{commit}}")])
        .output()
        .context("cannot run git")?;
    if !out.status.success() {
        anyhow::bail!(
            "{branch} is not a commit of {}: {}",
            repo.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// How long a rollout check may run.
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs the rollout checks of server.toml (each with `CONVERGE_COMMIT` and `CONVERGE_WAVE`
/// set, within [`CHECK_TIMEOUT`]): the first that fails, said with its output.
fn run_checks(checks: &[Vec<String>], commit: &str, wave: &str) -> Result<(), String> {
    use std::io::{Read, Seek};
    for argv in checks {
        let shown = converge_modules::text::clip(&argv.join(" "), 200).into_owned();
        let fail = |e: std::io::Error| format!("the check `{shown}`: {e}");
        // Its output goes to a file (never a pipe it could fill and block on); the first
        // kilobytes say why it failed.
        let mut output = tempfile::tempfile().map_err(fail)?;
        let mut child = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .env("CONVERGE_COMMIT", commit)
            .env("CONVERGE_WAVE", wave)
            .stdin(std::process::Stdio::null())
            .stdout(output.try_clone().map_err(fail)?)
            .stderr(output.try_clone().map_err(fail)?)
            .spawn()
            .map_err(|e| format!("the check `{shown}` could not start: {e}"))?;
        let deadline = std::time::Instant::now() + CHECK_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("the check `{shown}` did not finish within {} s", CHECK_TIMEOUT.as_secs()));
                }
            }
        };
        if !status.success() {
            let mut said = Vec::new();
            let _ = output.rewind();
            let _ = output.take(2048).read_to_end(&mut said);
            let said = String::from_utf8_lossy(&said);
            let said = converge_modules::text::clip(said.trim(), 500);
            return Err(format!("the check `{shown}` failed ({status}) before wave {wave} could open: {said}"));
        }
    }
    Ok(())
}

/// Runs `git` in `repo` with `args`: whether it succeeded, or an error when git could not
/// answer (not a repository, no git).
fn git_says(repo: &std::path::Path, args: &[&str]) -> Result<bool> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("cannot run git")?;
    Ok(out.success())
}

/// Whether `repo` holds the commit `c`.
fn has_commit(repo: &std::path::Path, c: &str) -> bool {
    git_says(repo, &["cat-file", "-e", "--end-of-options", &format!("{c}^{{commit}}")]).unwrap_or(false)
}

/// Whether `a` is `b` or one of its ancestors.
fn is_ancestor(repo: &std::path::Path, a: &str, b: &str) -> bool {
    git_says(repo, &["merge-base", "--is-ancestor", "--end-of-options", a, b]).unwrap_or(false)
}

/// The commit this server compiles: the branch's head is proposed to the store when it moved
/// here and is news (not already part of what the servers agree on, or the branch was
/// rewound on purpose); then whatever the servers agree on is current. A server whose clone
/// lags never drags the fleet back to an older commit, and no two servers' clocks or polling
/// order decide anything. Returns the agreement (epoch, commit).
fn agree(db: &Db, config: &Config, last_head: &Mutex<Option<String>>, by: &str) -> Result<(i64, String)> {
    let head = head(&config.repo, &config.branch)?;
    let agreed = db.agreed()?;
    // The database is input like any other: what it says is current must be a commit id
    // before git is asked about it.
    if let Some((epoch, c)) = &agreed
        && !(matches!(c.len(), 40 | 64) && c.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        anyhow::bail!(
            "the database's agreed commit (agreement {epoch}) is not a commit id: {:?}; the state is damaged \
             (a server proposes its branch's head again once the row is deleted: DELETE FROM agreed)",
            converge_modules::text::clip(c, 100)
        );
    }
    let mut last = last_head.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if last.as_deref() == Some(head.as_str()) {
        return Ok(agreed.unwrap_or((0, head)));
    }
    let repo = &config.repo;
    let propose = match &agreed {
        None => true,
        Some((_, c)) if *c == head => false,
        // This server lags: it takes what the others agreed once its clone has it.
        Some((_, c)) if !has_commit(repo, c) => false,
        Some((_, c)) => !is_ancestor(repo, &head, c) || last.as_deref().is_some_and(|l| !is_ancestor(repo, l, &head)),
    };
    *last = Some(head.clone());
    drop(last);
    if propose {
        let epoch = agreed.as_ref().map_or(0, |a| a.0);
        if db.propose(epoch, &head, by, now())? {
            tracing::info!("proposed commit {head} as current (agreement {})", epoch + 1);
        }
        return Ok(db.agreed()?.unwrap_or((0, head)));
    }
    Ok(agreed.unwrap_or((0, head)))
}

fn load(repo: &std::path::Path, commit: &str, epoch: i64, key: &Arc<SecretsKey>) -> Result<Current> {
    let r = Repo::from_git(repo, commit)?;
    let compiler = Compiler::with_key(&r, Some(key.clone()));
    for p in &compiler.problems {
        tracing::warn!("repository {commit}: {}", converge_modules::text::clip(&p.to_string(), 2000));
    }
    Ok(Current { commit: commit.to_string(), epoch, compiler })
}

impl Fleet {
    /// Opens the fleet's state (from a thread that is not one of the runtime's: the state may
    /// be PostgreSQL, whose calls wait).
    pub fn open(config: Config) -> Result<Fleet> {
        let db = Db::of(&config, 16)?;
        let ca = Ca::load(&config.state)?;
        let signing = Signing::read(&config)?;
        let pin = crate::bootstrap::pin(&config.state)?;
        let server_cert = Arc::new(crate::http::ServerCert::load(&config.state, &ca.chain())?);
        let ticketer = crate::http::ticketer()?;
        let tls = crate::http::tls_config(&ca, server_cert.clone(), ticketer.clone(), config.renew_expired_within)?;
        let started = now();
        let certs = db.certs_changed(i64::MIN)?.into_iter().collect();
        let host = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
        let name = format!("{host}:{}", config.listen.port());
        let last_head = Mutex::new(None);
        let (epoch, commit) = agree(&db, &config, &last_head, &name)?;
        let (key, made) = crate::secrets::ensure_key(&config.state)?;
        if let Some(recipient) = made {
            tracing::info!(
                "made the server's secrets key {}: add {recipient} to data/secrets/recipients",
                config.state.join(crate::secrets::KEY_FILE).display()
            );
        }
        let secrets_key = Arc::new(key);
        let current = if has_commit(&config.repo, &commit) {
            tracing::info!("compiling {} at {commit}", config.repo.display());
            load(&config.repo, &commit, epoch, &secrets_key)?
        } else {
            let head = head(&config.repo, &config.branch)?;
            tracing::warn!(
                "the servers agree on commit {commit}, which {} does not hold yet: until it does (git fetch), this \
                 server serves the catalogs the store holds and compiles none",
                config.repo.display()
            );
            load(&config.repo, &head, -1, &secrets_key)?
        };
        let metrics = crate::metrics::Metrics::with_db(db.statements.clone());
        let fleet = Fleet {
            compiles: tokio::sync::Semaphore::new(config.max_compiles),
            admission: crate::http::Admission::new(&config),
            server_cert,
            config,
            db,
            ca_bundle_hash: RwLock::new(ca.bundle_hash()),
            ca: RwLock::new(Arc::new(ca)),
            tls: RwLock::new(tls),
            ticketer,
            signing: RwLock::new(Arc::new(signing)),
            current: RwLock::new(Arc::new(current)),
            previous: RwLock::new(None),
            pinned: Mutex::new(HashMap::new()),
            progress: RwLock::new(None),
            catalogs: RwLock::new(HashMap::new()),
            facts: RwLock::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            certs: RwLock::new(certs),
            cert_watch: Mutex::new(started),
            last_head,
            name,
            metrics,
            started,
            pin,
            secrets_key,
        };
        fleet.load_pins();
        fleet.drive_rollout(None)?;
        Ok(fleet)
    }

    /// The signing key and key list in force.
    pub fn signing(&self) -> Arc<Signing> {
        self.signing.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Takes in a new signing key and key list (`keys rotate`, or `keys add`/`retire`), once
    /// they agree; until then the pair in force stays (called every second, off the runtime's
    /// threads). Returns whether it changed.
    pub fn watch_keys(&self) -> Result<bool> {
        let current = self.signing();
        let key = std::fs::read(&self.config.signing_key).unwrap_or_default();
        let list = std::fs::read(&self.config.trusted_keys).unwrap_or_default();
        if (key.as_slice(), list.as_slice()) == (current.read.0.as_slice(), current.read.1.as_slice()) {
            return Ok(false);
        }
        match Signing::read(&self.config) {
            Ok(new) => {
                tracing::info!("signing with key {}, key list version {}", new.key_id(), new.list.version);
                *self.signing.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(new);
                Ok(true)
            }
            // Half-way through a rotation (or a mistake): the pair in force stays.
            Err(e) => {
                tracing::debug!("the signing key and key list do not agree (yet): {e:#}");
                Ok(false)
            }
        }
    }

    /// The CA (and the previous one during a rollover).
    pub fn ca(&self) -> Arc<Ca> {
        self.ca.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The hash of the CA bundle in force.
    pub fn ca_bundle_hash(&self) -> String {
        self.ca_bundle_hash.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The TLS configuration in force.
    pub fn tls(&self) -> Arc<rustls::ServerConfig> {
        self.tls.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Takes in a CA rollover begun or ended by `converge-server ca` (called every second, off
    /// the runtime's threads): the CA, the server's certificate and chain (issued anew when it
    /// came from another CA), and the TLS configuration, with the trusted CAs. Returns whether
    /// anything changed.
    pub fn watch_ca(&self) -> Result<bool> {
        let state = &self.config.state;
        let read = |f: &str| std::fs::read_to_string(state.join(f)).unwrap_or_default();
        if format!("{}{}", read("ca.pem"), read("ca-previous.pem")) == self.ca().bundle() {
            return Ok(false);
        }
        let ca = Ca::load(state)?;
        let server = crate::ca::pem_to_der(read("server.pem").as_bytes());
        if crate::ca::issuer_name(&server) != crate::ca::subject_name(&ca.der) {
            ca.renew_server(state)?;
        }
        self.server_cert.reload(&ca)?;
        let tls = crate::http::tls_config(
            &ca,
            self.server_cert.clone(),
            self.ticketer.clone(),
            self.config.renew_expired_within,
        )?;
        *self.tls.write().unwrap_or_else(std::sync::PoisonError::into_inner) = tls;
        *self.ca_bundle_hash.write().unwrap_or_else(std::sync::PoisonError::into_inner) = ca.bundle_hash();
        tracing::info!(
            "CA {} in force{}",
            ca.hash(),
            if ca.previous.is_some() { ", with the previous one trusted during the rollover" } else { "" }
        );
        *self.ca.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(ca);
        Ok(true)
    }

    pub fn commit(&self) -> String {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).commit.clone()
    }

    /// Takes in the commit the servers agree on (proposing the branch's head when it moved
    /// here), and compiles anew from it. Returns the new commit.
    /// Then moves the rollout of the current commit on (see [`Fleet::drive_rollout`]).
    pub fn refresh(&self) -> Result<Option<String>> {
        let before = self.commit();
        let changed = self.take_agreed()?;
        self.load_pins();
        self.drive_rollout(changed.as_ref().map(|_| before.as_str()))?;
        Ok(changed)
    }

    fn take_agreed(&self) -> Result<Option<String>> {
        let (epoch, commit) = agree(&self.db, &self.config, &self.last_head, &self.name)?;
        let current = self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if current.epoch == epoch && current.commit == commit {
            return Ok(None);
        }
        if !has_commit(&self.config.repo, &commit) {
            anyhow::bail!(
                "the servers agree on commit {commit}, which {} does not hold yet: fetch it (this server serves \
                 the catalogs the store holds meanwhile)",
                self.config.repo.display()
            );
        }
        let new = load(&self.config.repo, &commit, epoch, &self.secrets_key)?;
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(new);
        tracing::info!("now compiling {} at {commit} (agreement {epoch})", self.config.repo.display());
        Ok(Some(commit))
    }

    /// The rollout of the current commit, when its site.yaml has waves: begun (by whichever
    /// server sees the commit first; hosts in waves not yet open keep the commit every host
    /// has: the newest whose last wave opened, else the one it replaced), moved on as the hosts' runs
    /// allow ([`crate::rollout::step`], one conditional update, so that servers never move it
    /// twice), and the commit those hosts keep compiled here. Called with each look at the
    /// repository.
    pub fn drive_rollout(&self, replaced: Option<&str>) -> Result<()> {
        use crate::rollout::{Progress, State};
        let current = self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let rollout = match current.compiler.site.as_ref().and_then(|s| s.rollout.as_ref()) {
            Some(r) if current.epoch >= 0 && r.problems().is_empty() => r,
            _ => {
                *self.progress.write().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                *self.previous.write().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                return Ok(());
            }
        };
        let t = now();
        let short = |c: &str| c[..c.len().min(12)].to_string();
        let mut p = match self.db.rollout(&current.commit)? {
            Some(p) => p,
            None => {
                // The commit every host has; the first rollout keeps hosts at the commit it
                // replaced (which every host had); without either, every host gets it.
                let previous = self
                    .db
                    .last_rolled_out(&current.commit)?
                    .or_else(|| replaced.map(str::to_string))
                    .filter(|c| *c != current.commit);
                let state = if previous.is_some() { State::Rolling } else { State::Done };
                let p = Progress { commit: current.commit.clone(), previous, wave: 0, since: t, state };
                if self.db.start_rollout(&p, rollout.len(), t)? && p.state == State::Rolling {
                    tracing::info!(
                        "rollout of {}: wave {} of {} ({}) gets it; the others keep {}",
                        short(&p.commit),
                        1,
                        rollout.len(),
                        rollout.name(0),
                        short(p.previous.as_deref().unwrap_or_default())
                    );
                }
                self.db.rollout(&current.commit)?.unwrap_or(p)
            }
        };
        // Pinned hosts never run the new commit: they neither hold a rollout up nor pass it.
        let site = current.compiler.site.as_ref();
        let unpinned = |h: &crate::rollout::HostRun| site.is_none_or(|s| s.pin_of(&h.name).is_none());
        if p.state == State::Rolling
            && let Some(mut next) = crate::rollout::step(
                rollout,
                &p,
                &self.db.host_runs(t)?.into_iter().filter(unpinned).collect::<Vec<_>>(),
                t,
            )
        {
            // Before the next wave opens, the operator's checks (server.toml) must pass.
            if !matches!(next.state, State::Halted(_))
                && let Err(why) = run_checks(&self.config.rollout_checks, &p.commit, rollout.name(next.wave))
            {
                next = Progress { state: State::Halted(why), ..p.clone() };
            }
            if self.db.advance_rollout(&p, &next)? {
                match &next.state {
                    State::Halted(why) => tracing::warn!("rollout of {} halted: {why}", short(&p.commit)),
                    State::Done => tracing::info!("rollout of {}: every wave has it", short(&p.commit)),
                    State::Rolling => tracing::info!(
                        "rollout of {}: wave {} of {} ({}) gets it",
                        short(&p.commit),
                        next.wave + 1,
                        rollout.len(),
                        rollout.name(next.wave)
                    ),
                }
            }
            p = self.db.rollout(&current.commit)?.unwrap_or(next);
        }
        // The commit hosts in waves not yet open keep, compiled at this agreement.
        let need = p.previous.clone().filter(|_| p.state != State::Done);
        let have = self
            .previous
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|c| (c.commit.clone(), c.epoch));
        if need.as_ref().map(|c| (c.clone(), current.epoch)) != have {
            let loaded = match &need {
                Some(c) if has_commit(&self.config.repo, c) => {
                    Some(Arc::new(load(&self.config.repo, c, current.epoch, &self.secrets_key)?))
                }
                Some(c) => {
                    tracing::warn!(
                        "the rollout keeps hosts of waves not yet open at {c}, which {} does not hold: they are served \
                         what the store holds",
                        self.config.repo.display()
                    );
                    None
                }
                None => None,
            };
            *self.previous.write().unwrap_or_else(std::sync::PoisonError::into_inner) = loaded;
        }
        *self.progress.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(p);
        Ok(())
    }

    /// The waves of the current commit's site.yaml, if it has them.
    pub fn rollout(&self) -> Option<crate::rollout::Rollout> {
        let current = self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        current.compiler.site.as_ref().and_then(|s| s.rollout.clone())
    }

    /// The rollout of the current commit, as last read.
    pub fn progress(&self) -> Option<crate::rollout::Progress> {
        self.progress.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// What `node` is compiled from: the current commit, or during a rollout, for a host in
    /// a wave not yet open, the commit it keeps (`None` when that is not loaded here).
    fn commit_for(&self, node: &str, current: Arc<Current>) -> Option<Arc<Current>> {
        if let Some(pin) = current.compiler.site.as_ref().and_then(|s| s.pin_of(node)) {
            return self.pinned_commit(&pin.commit.value, current.epoch);
        }
        let Some(rollout) = current.compiler.site.as_ref().and_then(|s| s.rollout.as_ref()) else {
            return Some(current);
        };
        let progress = self.progress.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        match progress.as_ref() {
            Some(p) if p.commit == current.commit && !p.has(rollout.wave_of(node)) => {
                let previous = self.previous.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
                previous.filter(|c| p.previous.as_deref() == Some(c.commit.as_str()))
            }
            _ => Some(current),
        }
    }

    /// The commit `commit` a pin holds hosts at, compiled (at the agreement `epoch`), as
    /// [`Fleet::load_pins`] left it; `None` when it is not (the store's catalogs are served).
    fn pinned_commit(&self, commit: &str, epoch: i64) -> Option<Arc<Current>> {
        let pinned = self.pinned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        pinned.get(commit).filter(|c| c.epoch == epoch).cloned()
    }

    /// Compiles the commits the current site.yaml's pins hold hosts at (off the runtime's
    /// threads: a load runs git), and forgets the others.
    fn load_pins(&self) {
        let current = self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let wanted: Vec<String> = current
            .compiler
            .site
            .as_ref()
            .map(|s| s.pins.iter().map(|p| p.value.commit.value.clone()).collect())
            .unwrap_or_default();
        // What is missing is loaded without the lock held: a poll never waits for git.
        let missing: Vec<String> = {
            let mut pinned = self.pinned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            pinned.retain(|c, loaded| wanted.contains(c) && loaded.epoch == current.epoch);
            wanted.into_iter().filter(|c| !pinned.contains_key(c) && current.epoch >= 0).collect()
        };
        for commit in missing {
            if !has_commit(&self.config.repo, &commit) {
                tracing::warn!("a pin holds hosts at {commit}, which {} does not hold", self.config.repo.display());
                continue;
            }
            match load(&self.config.repo, &commit, current.epoch, &self.secrets_key) {
                Ok(c) => {
                    self.pinned.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(commit, Arc::new(c));
                }
                Err(e) => tracing::warn!("a pin holds hosts at {commit}, which cannot be loaded: {e:#}"),
            }
        }
    }

    /// The node a client certificate belongs to, if it may be served: issued by this server,
    /// neither revoked nor expired. Checked on every request, in memory; `None` for a
    /// certificate this server has not seen yet (then [`Fleet::node_of`] asks the store).
    pub fn node_of_known(&self, fingerprint: &str, renewing: bool) -> Option<Result<String, String>> {
        let certs = self.certs.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        certs.get(fingerprint).map(|c| verdict(c, now(), self.grace(renewing)))
    }

    /// How long after its end a certificate may still be used for what is asked.
    fn grace(&self, renewing: bool) -> i64 {
        if renewing { self.config.renew_expired_within } else { 0 }
    }

    /// [`Fleet::node_of_known`], asking the store about a certificate not known yet.
    pub fn node_of(&self, fingerprint: &str, renewing: bool) -> Result<Result<String, String>> {
        if let Some(v) = self.node_of_known(fingerprint, renewing) {
            return Ok(v);
        }
        Ok(match self.db.cert(fingerprint)? {
            None => Err("this certificate was not issued by this server".into()),
            Some(c) => {
                let v = verdict(&c, now(), self.grace(renewing));
                self.certs
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(fingerprint.to_string(), c);
                v
            }
        })
    }

    /// A new certificate for `node`, which asked with the certificate `presented` (checked
    /// live by the caller), for the key in `req`. Refused before the presented certificate is
    /// half through its life: a host renews at two thirds, and no host can mint certificates
    /// in a loop. The presented certificate stays live until the new one is first used.
    pub fn renew(&self, node: &str, presented: &str, req: &RenewRequest) -> Result<Result<RenewResponse, String>> {
        if let Err(why) = req.check() {
            return Ok(Err(why.to_string()));
        }
        if let Err(e) = crate::ca::public_key(&req.public_key) {
            return Ok(Err(e.to_string()));
        }
        if let Some(Err(e)) = req.seal_key.as_deref().map(converge_modules::sealed::parse_recipient) {
            return Ok(Err(format!("the sealing key: {e}")));
        }
        let Some(current) =
            self.certs.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(presented).cloned()
        else {
            return Ok(Err("this certificate is not known".into()));
        };
        let t = now();
        let half = current.issued + (current.expires - current.issued) / 2;
        // During a CA rollover a certificate from the previous CA renews at once; so does a
        // host that brings its first sealing key (once: the server then knows one).
        let from_previous_ca = self.ca().rotated_at.is_some_and(|r| current.issued < r);
        let first_seal_key = req.seal_key.is_some() && self.db.seal_key(node)?.is_none();
        if t < half && !from_previous_ca && !first_seal_key {
            return Ok(Err(format!(
                "the certificate of {node} is renewed from {} on (half its life), not before",
                Timestamp(half)
            )));
        }
        let (pem, der) = match self.ca().issue_client(node, &req.public_key, self.config.cert_days) {
            Ok(x) => x,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let (fp, expires) = (sha256_hex(&der), crate::ca::validity(&der)?.1);
        self.db.add_renewal(&fp, node, presented, t, expires)?;
        if let Some(k) = &req.seal_key {
            self.set_seal_key(node, k)?;
        }
        let mut certs = self.certs.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        // An earlier renewal of the same certificate, never used, is gone from the store too.
        certs.retain(|_, c| c.replaces.as_deref() != Some(presented));
        let cert = Cert { node: node.to_string(), issued: t, expires, revoked: None, replaces: Some(presented.into()) };
        certs.insert(fp.clone(), cert);
        drop(certs);
        self.metrics.renewals.inc();
        tracing::info!(node, key = %fp, "renewed a certificate");
        Ok(Ok(RenewResponse { certificate: pem }))
    }

    /// Records a node's sealing key; a catalog sealed to another key is compiled anew at the
    /// node's next poll.
    fn set_seal_key(&self, node: &str, key: &str) -> Result<()> {
        if self.db.seal_key(node)?.as_deref() == Some(key.trim()) {
            return Ok(());
        }
        self.db.set_seal_key(node, key.trim())?;
        self.db.forget_catalog(node)?;
        self.catalogs.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(node);
        Ok(())
    }

    /// Notes that the certificate `fingerprint` was just used: when it is a renewal used for
    /// the first time, the certificate it replaced is revoked here at once, and the store must
    /// be told (returns true).
    pub fn first_use(&self, fingerprint: &str) -> bool {
        let renewed = |c: &Cert| c.replaces.is_some();
        if !self.certs.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(fingerprint).is_some_and(renewed) {
            return false;
        }
        let mut certs = self.certs.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(old) = certs.get_mut(fingerprint).and_then(|c| c.replaces.take()) else { return false };
        if let Some(c) = certs.get_mut(&old) {
            c.revoked.get_or_insert(now());
        }
        true
    }

    /// Takes in what changed in the store's certificates since the last look (new ones, and
    /// revocations by `node revoke` or another server): called every second, off the
    /// runtime's threads. A node another server renewed may bring a new sealing key: its
    /// catalog is looked up in the store again at its next poll.
    pub fn watch_certs(&self) -> Result<()> {
        let since = *self.cert_watch.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let t = now();
        let changed = self.db.certs_changed(since - crate::db::CERT_LOOKBACK)?;
        let mut renewed = Vec::new();
        if !changed.is_empty() {
            let mut certs = self.certs.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (fp, mut c) in changed {
                match certs.get(&fp) {
                    // What this server knows already and the store may not have yet: a
                    // revocation, a renewal in use.
                    Some(known) => {
                        c.revoked = c.revoked.or(known.revoked);
                        if known.replaces.is_none() {
                            c.replaces = None;
                        }
                    }
                    None => renewed.push(c.node.clone()),
                }
                certs.insert(fp, c);
            }
        }
        if !renewed.is_empty() {
            let mut catalogs = self.catalogs.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            for node in &renewed {
                catalogs.remove(node);
            }
        }
        *self.cert_watch.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = t;
        Ok(())
    }

    /// Enrollment: a certificate at once with a valid token, else after `node approve` of
    /// this very key. Everything is checked before anything is stored: the name, the sizes,
    /// and that the public key is an Ed25519 key. `from` is the client's address, shown to
    /// the operator beside the key's fingerprint.
    pub fn enroll(&self, req: &EnrollRequest, from: &str) -> Result<Result<EnrollResponse, String>> {
        if let Err(why) = req.check() {
            return Ok(Err(why.to_string()));
        }
        let name = req.name.as_str();
        let raw = match crate::ca::public_key(&req.public_key) {
            Ok(k) => k,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let fingerprint = converge_modules::wire::key_fingerprint(&raw);
        if let Some(Err(e)) = req.seal_key.as_deref().map(converge_modules::sealed::parse_recipient) {
            return Ok(Err(format!("the sealing key: {e}")));
        }
        let t = now();
        if self.db.live_cert(name, t)? {
            return Ok(Err(format!(
                "{name} already has a live certificate; revoke it first (converge-server node revoke {name})"
            )));
        }
        if let Some(token) = &req.token {
            if let Err(why) = self.db.spend_token(&sha256_hex(token.as_bytes()), name, t, crate::site::glob_match)? {
                return Ok(Err(why));
            }
        } else {
            match self.db.pending(name, &req.public_key, &fingerprint, from, t)? {
                Pending::Approved => {}
                Pending::Refused(why) => return Ok(Err(why)),
                Pending::Waiting => {
                    self.metrics.enroll_pending.inc();
                    return Ok(Ok(EnrollResponse::Pending {
                        message: format!(
                            "waiting for an operator: converge-server node approve {name} --key {}",
                            &fingerprint[..23]
                        ),
                    }));
                }
            }
        }
        let (pem, der) = match self.ca().issue_client(name, &req.public_key, self.config.cert_days) {
            Ok(x) => x,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let (fp, expires) = (sha256_hex(&der), crate::ca::validity(&der)?.1);
        self.db.add_cert(&fp, name, t, expires)?;
        if let Some(k) = &req.seal_key {
            self.set_seal_key(name, k)?;
        }
        let cert = Cert { node: name.to_string(), issued: t, expires, revoked: None, replaces: None };
        self.certs.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(fp, cert);
        self.metrics.enroll_issued.inc();
        tracing::info!(node = name, key = %fingerprint, "enrolled");
        Ok(Ok(EnrollResponse::Issued { certificate: pem, trusted_keys: self.signing().envelope.clone() }))
    }

    /// The node's catalog as the store holds it now, which this server then holds too
    /// (without its envelope).
    fn stored(&self, node: &str) -> Result<Option<Arc<Stored>>> {
        let s = self.db.stored(node)?.map(Arc::new);
        match &s {
            Some(s) => self.hold(node, s),
            None => {
                self.catalogs.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(node);
            }
        }
        Ok(s)
    }

    /// Keeps what a poll needs of `s` in memory: all of it but the envelope.
    fn hold(&self, node: &str, s: &Stored) {
        let slim = Arc::new(Stored { envelope: Vec::new(), ..s.clone() });
        self.catalogs.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(node.to_string(), slim);
    }

    /// Notes that a node asked, with its facts (written in batches by [`Fleet::flush_seen`]).
    pub fn saw(&self, node: &str, req: &converge_modules::wire::CatalogRequest) {
        let (version, facts, ca_bundle) = (&req.agent_version, &req.facts, req.ca_bundle.as_deref());
        let json = serde_json::to_string(facts).unwrap_or_default();
        let sha = sha256_hex(json.as_bytes());
        let changed = self.facts.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(node) != Some(&sha);
        if changed {
            self.facts.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(node.to_string(), sha.clone());
        }
        let facts = changed.then_some((json, sha));
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = seen.entry(node.to_string()).or_default();
        if req.keys_version.is_some() {
            entry.keys_version = req.keys_version;
        }
        entry.at = now();
        entry.version = version.to_string();
        entry.paused = req.paused.clone();
        if let Some(b) = ca_bundle {
            entry.ca_bundle = Some(b.to_string());
        }
        if facts.is_some() {
            entry.facts = facts;
        }
    }

    /// Writes the visits noted since the last flush; when the store cannot take them (the
    /// database away), they are kept for the next flush, behind anything newer.
    pub fn flush_seen(&self) -> Result<()> {
        let taken = std::mem::take(&mut *self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        let batch: Vec<Visit> = taken
            .iter()
            .map(|(node, s)| Visit {
                node: node.clone(),
                at: s.at,
                version: s.version.clone(),
                facts: s.facts.clone(),
                ca_bundle: s.ca_bundle.clone(),
                keys_version: s.keys_version,
                paused: s.paused.clone(),
            })
            .collect();
        let result = self.db.seen(&batch);
        if result.is_err() {
            let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (node, old) in taken {
                let entry = seen.entry(node).or_default();
                if entry.at == 0 {
                    *entry = old;
                } else {
                    entry.facts = entry.facts.take().or(old.facts);
                    entry.ca_bundle = entry.ca_bundle.take().or(old.ca_bundle);
                    entry.keys_version = entry.keys_version.or(old.keys_version);
                }
            }
        }
        result
    }

    /// The blob `hex` (its bytes), when the commit the node is served, the newest or the one
    /// before names it: any other bytes of the repository are never served this way.
    pub fn blob(&self, node: &str, hex: &str) -> Option<bytes::Bytes> {
        let newest = self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let previous = self.previous.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let mut commits: Vec<Arc<Current>> = self.commit_for(node, newest.clone()).into_iter().collect();
        commits.push(newest);
        commits.extend(previous);
        commits.iter().find_map(|c| c.compiler.blob(hex).map(bytes::Bytes::copy_from_slice))
    }

    /// The node's signed catalog (compiling and signing only when needed). When the agent
    /// holds it already (`held`, its etag), the envelope may be left out: the answer is 304.
    pub async fn catalog(
        self: &Arc<Self>,
        node: &str,
        formats: &[u32],
        facts: Map<String, Json>,
        held: Option<&str>,
    ) -> Result<Arc<Stored>, Refused> {
        if !formats.contains(&FORMAT) {
            return Err(Refused::TooOld(formats.to_vec()));
        }
        let newest = self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let epoch = newest.epoch;
        // A commit this server cannot compile for the node yet: what the store holds, if any.
        let current = match self.commit_for(node, newest) {
            Some(c) => c,
            None => {
                return match self.off_runtime(node, |f, n| f.stored(n)).await? {
                    Some(s) => Ok(s),
                    None => Err(Refused::Busy),
                };
            }
        };
        // An agent that does not say it reads provenance gets its catalog without (it would
        // refuse a field it does not know); one that does gets a catalog of its own.
        let provenance = formats.contains(&converge_modules::catalog::READS_PROVENANCE);
        let blobs = formats.contains(&converge_modules::catalog::READS_BLOBS);
        let declared: Map<String, Json> = match &current.compiler.site {
            Some(site) => {
                facts.iter().filter(|(k, _)| site.facts.contains_key(*k)).map(|(k, v)| (k.clone(), v.clone())).collect()
            }
            None => Map::new(),
        };
        // A new signing key or key list signs every catalog anew at its next poll (the serial
        // stays when the resources do): no catalog is left signed by a retired key.
        let signing = self.signing();
        let cache_key = sha256_hex(
            format!(
                "{}\0{node}\0{}\0{COMPILER_VERSION}\0{}\0{}\0{provenance}\0{blobs}",
                current.commit,
                serde_json::to_string(&declared).unwrap_or_default(),
                signing.key_id(),
                signing.list.version
            )
            .as_bytes(),
        );
        let t = now();
        let fresh = |s: &Stored| s.cache_key == cache_key && t < s.issued_at + self.config.catalog_ttl / 2;
        // What this server holds answers a poll for the catalog the agent holds (the caller
        // answers 304): no database call. Otherwise the store says what is current (another
        // server may have stored a newer catalog, or the agent got one from it), and has the
        // envelope to send.
        let cached = self.catalogs.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(node).cloned();
        if let Some(s) = &cached
            && fresh(s)
            && held == Some(s.etag.as_str())
        {
            return Ok(s.clone());
        }
        let stored = self.off_runtime(node, |f, n| f.stored(n)).await?;
        if let Some(s) = &stored
            && (fresh(s) || s.epoch > epoch || epoch < 0)
        {
            // A catalog of a later agreement than this server has taken in is served as it is.
            return Ok(s.clone());
        }
        if epoch < 0 {
            return Err(Refused::Busy);
        }
        // A burst waits a little for a compile slot; past that, the agent is told to come back.
        let Ok(Ok(_permit)) = tokio::time::timeout(std::time::Duration::from_secs(2), self.compiles.acquire()).await
        else {
            return Err(Refused::Busy);
        };
        self.metrics.compiles.inc();
        // Said when its catalog is compiled (a commit, new facts), not at every poll.
        if let Some(w) = current.compiler.os_family_conflict(node, &facts) {
            tracing::warn!(node, "{}", converge_modules::text::clip(&w, 500));
        }
        let name = node.to_string();
        let compiling = current.clone();
        let compiled = tokio::task::spawn_blocking(move || compiling.compiler.compile_open(&name, &declared))
            .await
            .map_err(|e| Refused::Internal(e.into()))?;
        let what = |diags: Vec<converge_modules::diag::Diagnostic>| {
            diags.iter().take(5).map(|d| d.to_string()).collect::<Vec<_>>().join("; ")
        };
        let compiled = compiled.and_then(|(mut c, opened)| {
            if !provenance {
                c.provenance.clear();
            }
            if !blobs {
                inline_blobs(&current.compiler, &mut c)
                    .map_err(|m| vec![converge_modules::diag::Diagnostic::new("files/", Default::default(), m)])?;
            }
            Ok((c, opened))
        });
        let catalog = match compiled {
            Ok((mut c, opened)) if !c.sealed.is_empty() => {
                if !formats.contains(&c.format) {
                    return Err(Refused::TooOld(formats.to_vec()));
                }
                let seal_key = self.off_runtime(node, |f, n| f.db.seal_key(n)).await?;
                match seal_key.as_deref().and_then(|k| converge_modules::sealed::parse_recipient(k).ok()) {
                    Some(recipient) => {
                        opened.seal(&mut c, &recipient).map_err(Refused::Internal)?;
                        Ok(c)
                    }
                    None => Err(format!(
                        "its catalog holds secrets, which are sealed to each host's own key, and {node} has not sent \
                         one yet: its agent makes one and renews its certificate with it at its next run"
                    )),
                }
            }
            Ok((c, _)) => Ok(c),
            Err(diags) => Err(what(diags)),
        };
        // A catalog that cannot be made leaves the last good one served, and says why.
        let catalog = match catalog {
            Ok(c) => c,
            Err(what) => {
                self.metrics.compile_failures.inc();
                tracing::warn!(node, "compile failed: {}", converge_modules::text::clip(&what, 2000));
                let error = what.clone();
                self.off_runtime(node, move |f, n| f.db.compile_failed(n, &error)).await?;
                return match stored {
                    Some(s) => Ok(s),
                    None => Err(Refused::Compile(what)),
                };
            }
        };
        let resources = resources_sha256(&catalog);
        let millis = converge_modules::time::unix_millis();
        let serial = match &stored {
            Some(s) if s.resources_sha256 == resources => s.serial,
            Some(s) => (s.serial + 1).max(millis),
            None => millis,
        };
        let issued = Timestamp::now();
        let envelope = keys::sign_catalog(
            catalog,
            &signing.signer,
            Some(signing.envelope.clone()),
            Some(serial),
            self.config.catalog_ttl,
            issued,
        )?;
        let envelope = envelope.into_bytes();
        let s = Arc::new(Stored {
            serial,
            resources_sha256: resources,
            cache_key,
            etag: sha256_hex(&envelope)[..32].to_string(),
            issued_at: issued.0,
            envelope,
            epoch,
        });
        let (keep, previous) = (s.clone(), stored.as_ref().map(|p| p.etag.clone()));
        let stored_it = self.off_runtime(node, move |f, n| f.db.store_catalog(n, &keep, previous.as_deref())).await?;
        if !stored_it {
            // Another server stored one first: that one is the node's catalog.
            return match self.off_runtime(node, |f, n| f.stored(n)).await? {
                Some(theirs) => Ok(theirs),
                None => Err(Refused::Busy),
            };
        }
        self.hold(node, &s);
        Ok(s)
    }

    /// Runs `f` (a database call) on the blocking pool, never on a runtime thread.
    async fn off_runtime<T: Send + 'static>(
        self: &Arc<Self>,
        node: &str,
        f: impl FnOnce(&Fleet, &str) -> Result<T> + Send + 'static,
    ) -> Result<T, Refused> {
        let (me, node) = (self.clone(), node.to_string());
        tokio::task::spawn_blocking(move || f(&me, &node))
            .await
            .map_err(|e| Refused::Internal(e.into()))?
            .map_err(Refused::Internal)
    }

    /// Retention: the reports older than the window go (rows from the embedded file, daily
    /// partitions from PostgreSQL, where the days ahead are made too).
    pub fn prune_reports(&self) -> Result<crate::db::Pruned> {
        let t = now();
        let pruned = self.db.prune_reports(t - self.config.report_retention, 10_000, t)?;
        let days = self.config.report_retention / 86_400;
        match &pruned {
            crate::db::Pruned::Rows(0) => {}
            crate::db::Pruned::Rows(n) => tracing::info!("deleted {n} reports older than {days} days"),
            crate::db::Pruned::Partitions(p) if p.is_empty() => {}
            crate::db::Pruned::Partitions(p) => {
                tracing::info!("dropped the report partitions older than {days} days: {}", p.join(", "))
            }
        }
        Ok(pruned)
    }

    /// Stores a node's report, once every field is within bounds (a report past them is
    /// refused with the reason, and nothing is stored).
    pub fn report(&self, node: &str, report: &Report, body: &str) -> Result<Result<(), String>> {
        if let Err(why) = report.check() {
            return Ok(Err(why.to_string()));
        }
        let s = &report.summary;
        let digest = serde_json::to_string(&crate::view::Digest::of(report))?;
        self.db.add_report(
            &ReportRow {
                node,
                at: now(),
                changed: if s.dry_run { s.would_change } else { s.changed } as i64,
                dry_run: s.dry_run,
                failed: s.failed as i64,
                unplanned: s.unplanned as i64,
                stale: report.stale,
                serial: report.info.serial,
                commit: report.info.commit.as_deref(),
                body,
                digest: &digest,
            },
            self.config.reports_per_node,
        )?;
        self.metrics.reports.inc();
        Ok(Ok(()))
    }
}

/// For an agent that does not fetch blobs: each blob of `catalog` put back as `content`, which
/// a text one can be; a binary one cannot, and the agent must be upgraded.
fn inline_blobs(compiler: &Compiler, catalog: &mut converge_modules::catalog::Catalog) -> Result<(), String> {
    use converge_modules::catalog::{Spec, blob_hex};
    for r in &mut catalog.resources {
        let Spec::File(f) = &mut r.spec else { continue };
        let Some(hex) = f.content_sha256.as_deref().and_then(blob_hex) else { continue };
        let text = compiler.blob(hex).and_then(|b| std::str::from_utf8(b).ok()).ok_or_else(|| {
            format!(
                "{} is a binary file, which this agent cannot fetch (it is older than blobs): upgrade converge on it",
                r.id
            )
        })?;
        f.content = Some(text.into());
        f.content_sha256 = None;
        f.size = None;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// An agent older than blobs gets a text blob inlined, and a binary one refused with what
    /// to do.
    #[test]
    fn older_agents_get_text_blobs_inline_and_binary_ones_refused() {
        let mut repo = Repo::from_files([
            ("site.yaml", "nodes:\n  n: {roles: [r]}\n  m: {roles: [b]}\n"),
            ("roles/r.yaml", "resources:\n  - file: /big.txt\n    source: big.txt\n"),
            ("roles/b.yaml", "resources:\n  - file: /tool\n    source: tool.bin\n"),
        ]);
        repo.files.insert("files/big.txt".into(), "y".repeat(80 << 10).into_bytes());
        repo.files.insert("files/tool.bin".into(), vec![0xff, 0x00]);
        let compiler = Compiler::new(&repo);
        let mut c = compiler.compile("n", &Map::new()).unwrap();
        inline_blobs(&compiler, &mut c).unwrap();
        let converge_modules::catalog::Spec::File(f) = &c.resources[0].spec else { panic!() };
        assert_eq!(
            (f.content.as_ref().map(converge_modules::catalog::Content::len), f.content_sha256.as_ref()),
            (Some(80 << 10), None)
        );
        let mut c = compiler.compile("m", &Map::new()).unwrap();
        let e = inline_blobs(&compiler, &mut c).unwrap_err();
        assert!(e.contains("file:/tool is a binary file") && e.contains("upgrade converge"), "{e}");
    }

    use super::*;

    #[test]
    fn an_expired_certificate_only_renews_and_only_within_its_grace() {
        let cert = |revoked| Cert { node: "n".into(), issued: 0, expires: 1000, revoked, replaces: None };
        let grace = 500;
        assert_eq!(verdict(&cert(None), 999, 0), Ok("n".into()), "live");
        assert!(verdict(&cert(None), 1000, 0).unwrap_err().contains("expired at"), "to anything but renewal");
        assert_eq!(verdict(&cert(None), 1000, grace), Ok("n".into()), "to renew, at its end");
        assert_eq!(verdict(&cert(None), 1499, grace), Ok("n".into()), "to renew, within the grace");
        assert!(verdict(&cert(None), 1500, grace).is_err(), "past the grace");
        assert!(verdict(&cert(Some(1)), 999, grace).unwrap_err().contains("revoked"), "revoked is revoked");
        assert!(verdict(&cert(Some(1)), 1200, grace).unwrap_err().contains("revoked"));
    }
}
