//! Commit-confirmed apply: a change to a resource marked `confirm` must be confirmed (the
//! agent reaches a server again over mutual TLS, on a new connection, and the resource's
//! `check` passes) before its deadline, or the host puts the path back as it was.
//!
//! Just before such a resource changes (the engine's [`Guard`]), the path's state is taken:
//! a file's content goes to the backup store, its mode and owner, a directory's mode and
//! owner, a symlink's target, or its absence; and `confirm.json` is written (atomically,
//! before the change) with the deadline. After the run [`settle`] tries to confirm until the
//! deadline; failing that it restores each path (newest first), refreshes what those resources
//! notify (the service that read the file), records the revert in `reverted.json` and reports
//! each one as `reverted`. A reverted change is held (skipped, and what depends on it) while
//! the catalog asks for the same thing: only a catalog that changes the resource tries again.
//!
//! A run that dies while a confirmation is pending (a crash, a reboot the change caused)
//! leaves `confirm.json`: the next run settles it first, before it fetches anything. Both
//! files are input: one that does not parse, or names a resource the verified catalog does not
//! mark `confirm`, is set aside and said, never acted on.

use crate::host::RealHost;
use crate::state;
use anyhow::Result;
use converge_modules::catalog::{Confirm, Resource};
use converge_modules::engine::{Guard, Providers};
use converge_modules::host::{FileType, Host, NewAttrs, Run};
use converge_modules::report::{ResourceEvent, Status};
use converge_modules::text::clip;
use converge_modules::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::time::Duration;

pub const PENDING_FILE: &str = "/var/lib/converge/confirm.json";
pub const REVERTED_FILE: &str = "/var/lib/converge/reverted.json";
/// The most entries either file holds (one per confirmed resource of one catalog).
const MAX_ENTRIES: usize = 10_000;
/// The longest one attempt to reach a server may take.
const ATTEMPT: Duration = Duration::from_secs(10);
/// The pause between attempts.
const PAUSE: Duration = Duration::from_secs(2);

/// A confirmation the host waits for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pending {
    pub serial: Option<u64>,
    pub commit: Option<String>,
    /// When the first of its changes was made.
    pub made: Timestamp,
    /// The earliest deadline of its resources.
    pub deadline: Timestamp,
    pub entries: Vec<Entry>,
}

/// One changed path and what it was before.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The resource's id.
    pub id: String,
    /// The hash of the resource as the catalog declared it.
    pub spec: String,
    pub was: Was,
}

/// A path's state before a change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Was {
    Absent,
    File { content: String, mode: u32, uid: u32, gid: u32 },
    Directory { mode: u32, uid: u32, gid: u32 },
    Symlink { target: String },
}

/// Changes reverted, held while the catalog asks for the same.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reverted {
    pub entries: Vec<Held>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Held {
    pub id: String,
    pub spec: String,
    pub at: Timestamp,
    pub why: String,
}

/// The hash a reverted change is known by: the resource as declared.
pub fn spec_of(r: &Resource) -> String {
    converge_modules::hash::sha256_hex(&serde_json::to_vec(r).unwrap_or_default())
}

/// Reads one of the two files. A damaged one is set aside when `exclusive` (the run lock is
/// ours), and said either way.
fn read<T: for<'de> Deserialize<'de>>(
    host: &RealHost,
    path: &str,
    exclusive: bool,
    entries: impl Fn(&T) -> usize,
    notes: &mut Vec<String>,
) -> Option<T> {
    host.root().lstat(path).ok().flatten()?;
    let parsed = state::read_text(host.root(), path, state::SMALL_FILE)
        .and_then(|t| serde_json::from_str::<T>(&t).map_err(|e| format!("not what converge wrote: {e}")))
        .and_then(|v| if entries(&v) > MAX_ENTRIES { Err("too many entries".into()) } else { Ok(v) });
    match parsed {
        Ok(v) => Some(v),
        Err(why) if exclusive => {
            notes.push(state::set_aside(host, path, &why));
            None
        }
        Err(why) => {
            notes.push(format!("{path} is damaged ({}); a run sets it aside", clip(&why, 200)));
            None
        }
    }
}

/// The confirmation a run left pending (under the run lock only).
pub fn read_pending(host: &RealHost, notes: &mut Vec<String>) -> Option<Pending> {
    read(host, PENDING_FILE, true, |p: &Pending| p.entries.len(), notes)
}

pub fn read_reverted(host: &RealHost, exclusive: bool, notes: &mut Vec<String>) -> Reverted {
    read(host, REVERTED_FILE, exclusive, |r: &Reverted| r.entries.len(), notes).unwrap_or_default()
}

fn write_json<T: Serialize>(host: &RealHost, path: &str, v: &T) -> Result<()> {
    state::write(host, path, &serde_json::to_vec_pretty(v)?, 0o600)
}

/// Keeps only the held changes the catalog about to be applied still asks for (a catalog
/// that changed the resource tries it again); writes the file only when that changed it.
pub fn prune_reverted(host: &RealHost, reverted: &mut Reverted, resources: &[Resource]) -> Result<()> {
    let before = reverted.entries.len();
    reverted.entries.retain(|h| {
        resources.iter().any(|r| r.meta.confirm.is_some() && r.id.to_string() == h.id && spec_of(r) == h.spec)
    });
    if reverted.entries.len() == before {
        return Ok(());
    }
    if reverted.entries.is_empty() {
        return host.remove(REVERTED_FILE).map_err(|e| anyhow::anyhow!("{e}"));
    }
    write_json(host, REVERTED_FILE, reverted)
}

/// The engine's guard for a run that applies `serial` of `commit`.
pub struct Confirming<'a> {
    host: &'a RealHost,
    serial: Option<u64>,
    commit: Option<String>,
    held: Vec<Held>,
    pending: RefCell<Option<Pending>>,
}

impl std::fmt::Debug for Confirming<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Confirming").field("serial", &self.serial).field("pending", &self.pending).finish()
    }
}

impl<'a> Confirming<'a> {
    pub fn new(host: &'a RealHost, serial: Option<u64>, commit: Option<String>, reverted: Reverted) -> Confirming<'a> {
        Confirming { host, serial, commit, held: reverted.entries, pending: RefCell::new(None) }
    }

    /// The confirmation this run's changes wait for, if it made any.
    pub fn pending(&self) -> Option<Pending> {
        self.pending.borrow().clone()
    }
}

impl Guard for Confirming<'_> {
    fn hold(&self, r: &Resource) -> Option<String> {
        r.meta.confirm.as_ref()?;
        let id = r.id.to_string();
        let h = self.held.iter().find(|h| h.id == id && h.spec == spec_of(r))?;
        Some(format!(
            "held as it was: this change was reverted at {} ({}); a catalog that changes the resource tries again",
            h.at,
            clip(&h.why, 300)
        ))
    }

    fn before_change(&self, r: &Resource) -> Result<(), String> {
        let Some(confirm) = &r.meta.confirm else { return Ok(()) };
        let path = r.path().ok_or_else(|| format!("{} takes no confirmation", r.id))?;
        let was =
            snapshot(self.host, path).map_err(|e| format!("its state before the change could not be kept: {e}"))?;
        let now = Timestamp::now();
        let deadline = now.checked_add(i64::from(confirm.within)).ok_or("the deadline is out of range")?;
        let mut slot = self.pending.borrow_mut();
        let pending = slot.get_or_insert_with(|| Pending {
            serial: self.serial,
            commit: self.commit.clone(),
            made: now,
            deadline,
            entries: Vec::new(),
        });
        pending.deadline = pending.deadline.min(deadline);
        let id = r.id.to_string();
        if !pending.entries.iter().any(|e| e.id == id) {
            pending.entries.push(Entry { id, spec: spec_of(r), was });
        }
        write_json(self.host, PENDING_FILE, &*pending).map_err(|e| {
            format!("{PENDING_FILE} could not be written ({e:#}): without it a failed confirmation could not be undone")
        })
    }
}

/// The state of `path` now, its content kept in the backup store.
fn snapshot(host: &RealHost, path: &str) -> Result<Was, String> {
    let Some(st) = host.stat(path).map_err(|e| e.to_string())? else { return Ok(Was::Absent) };
    match st.file_type {
        FileType::File => {
            let content = host.backup(path).map_err(|e| e.to_string())?;
            Ok(Was::File { content, mode: st.mode, uid: st.uid, gid: st.gid })
        }
        FileType::Directory => Ok(Was::Directory { mode: st.mode, uid: st.uid, gid: st.gid }),
        FileType::Symlink => Ok(Was::Symlink { target: host.read_link(path).map_err(|e| e.to_string())? }),
        other => Err(format!("{path} is a {other}, which a confirmation cannot put back")),
    }
}

/// Puts `path` back as `was`; says what it did.
fn restore(host: &RealHost, path: &str, was: &Was) -> Result<String, String> {
    let e = |e: converge_modules::host::HostError| e.to_string();
    let now = host.stat(path).map_err(e)?.map(|s| s.file_type);
    // A directory in the way of a file or a link goes only when empty (`remove` says so).
    let clear = |keep: FileType| match now {
        Some(t) if t != keep && t == FileType::Directory => host.remove(path).map_err(e),
        _ => Ok(()),
    };
    match was {
        Was::Absent => match now {
            None => Ok("it was not there before, and is not".into()),
            Some(_) => host.remove(path).map(|()| "removed it: it was not there before".into()).map_err(e),
        },
        Was::File { content, mode, uid, gid } => {
            let bytes = host.backups().read(host.root(), content).map_err(|err| err.to_string())?;
            clear(FileType::File)?;
            host.write_file(path, &bytes, NewAttrs { mode: *mode, uid: Some(*uid), gid: Some(*gid) }, None)
                .map_err(e)?;
            host.set_mode(path, *mode).map_err(e)?;
            host.set_owner(path, Some(*uid), Some(*gid)).map_err(e)?;
            Ok(format!(
                "restored its content ({}), mode {mode:04o} and owner {uid}:{gid}",
                converge_modules::report::describe_content(&bytes)
            ))
        }
        Was::Directory { mode, uid, gid } => {
            match now {
                None => host.mkdir(path, NewAttrs { mode: *mode, uid: Some(*uid), gid: Some(*gid) }).map_err(e)?,
                Some(FileType::Directory) => {}
                Some(other) => host
                    .remove(path)
                    .and_then(|()| host.mkdir(path, NewAttrs { mode: *mode, uid: None, gid: None }))
                    .map_err(|err| format!("a {other} is there now: {err}"))?,
            }
            host.set_mode(path, *mode).map_err(e)?;
            host.set_owner(path, Some(*uid), Some(*gid)).map_err(e)?;
            Ok(format!("restored the directory's mode {mode:04o} and owner {uid}:{gid}"))
        }
        Was::Symlink { target } => {
            clear(FileType::Symlink)?;
            host.symlink(path, target).map_err(e)?;
            Ok(format!("restored the link to {target}"))
        }
    }
}

/// How a pending confirmation ended.
#[derive(Debug)]
pub enum Settled {
    /// Confirmed: the changes stay.
    Confirmed,
    /// Not confirmed in time: one event per change, `reverted` (or `failed` when it could not
    /// be put back).
    Reverted(Vec<ResourceEvent>),
}

/// Waits for `pending`'s confirmation until its deadline (at least one attempt, so a change
/// confirmed late is kept), then keeps or reverts. `contact` reaches a server within the time
/// given, on a new connection; `resources` are those of the verified catalog the changes came
/// from (whatever else `pending` names is not acted on); `providers` refreshes what the
/// reverted resources notify.
pub fn settle<P: Providers>(
    host: &RealHost,
    pending: &Pending,
    resources: &[Resource],
    providers: &P,
    contact: &mut dyn FnMut(Duration) -> Result<(), String>,
) -> Result<Settled> {
    let declared =
        |id: &str| resources.iter().find(|r| r.meta.confirm.is_some() && r.id.to_string() == id && r.path().is_some());
    let mut checks: Vec<&Vec<String>> = Vec::new();
    for r in pending.entries.iter().filter_map(|e| declared(&e.id)) {
        if let Some(c) = r.meta.confirm.as_ref().and_then(|c| c.check.as_ref())
            && !checks.contains(&c)
        {
            checks.push(c);
        }
    }
    let mut why;
    // The wall clock may jump, and the file is input: never wait longer than a confirmation
    // may last, by the monotonic clock.
    let longest = (pending.deadline.0.saturating_sub(pending.made.0)).clamp(0, i64::from(Confirm::MAX_WITHIN));
    let give_up = std::time::Instant::now() + Duration::from_secs(longest as u64);
    loop {
        let left =
            Duration::from_secs(pending.deadline.0.saturating_sub(Timestamp::now().0).clamp(1, longest.max(1)) as u64);
        why = match contact(left.min(ATTEMPT)) {
            Err(e) => format!("no server answered: {e}"),
            Ok(()) => match run_checks(host, &checks, left) {
                Ok(()) => {
                    host.remove(PENDING_FILE).map_err(|e| anyhow::anyhow!("{e}"))?;
                    return Ok(Settled::Confirmed);
                }
                Err(e) => e,
            },
        };
        if Timestamp::now() >= pending.deadline || std::time::Instant::now() >= give_up {
            break;
        }
        std::thread::sleep(PAUSE.min(left));
    }
    let within = pending.deadline.0 - pending.made.0;
    let why = clip(&format!("not confirmed within {within} s of the change: {why}"), 1000).into_owned();
    let mut events = Vec::new();
    let mut reverted = Reverted::default();
    for entry in pending.entries.iter().rev() {
        let mut event = ResourceEvent { id: entry.id.clone(), status: Status::Reverted, ..ResourceEvent::default() };
        let Some(r) = declared(&entry.id) else {
            event.status = Status::Failed;
            event.message = Some(format!(
                "{why}; NOT reverted: the verified catalog does not mark it `confirm` (the pending confirmation in \
                 {PENDING_FILE} names it); check it by hand"
            ));
            events.push(event);
            continue;
        };
        let path = r.path().expect("a path kind");
        match restore(host, path, &entry.was) {
            Ok(what) => {
                let refreshed = refresh_notified(r, resources, providers);
                event.message = Some(format!("changed, then reverted: {why}; {what}"));
                event.refresh = (!refreshed.is_empty()).then(|| refreshed.join("; "));
                reverted.entries.push(Held {
                    id: entry.id.clone(),
                    spec: entry.spec.clone(),
                    at: Timestamp::now(),
                    why: why.clone(),
                });
            }
            Err(e) => {
                event.status = Status::Failed;
                let kept = match &entry.was {
                    Was::File { content, .. } => format!(" (its content before is {content} in the backup store)"),
                    _ => String::new(),
                };
                event.message =
                    Some(format!("{why}; and it could NOT be reverted: {e}: put {path} back by hand{kept}"));
            }
        }
        events.push(event);
    }
    events.reverse();
    let mut held = read_reverted(host, true, &mut Vec::new());
    held.entries.retain(|h| !reverted.entries.iter().any(|n| n.id == h.id));
    held.entries.extend(reverted.entries);
    write_json(host, REVERTED_FILE, &held)?;
    host.remove(PENDING_FILE).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Settled::Reverted(events))
}

/// Runs each check (argv) within what is left of the deadline (at least a second).
fn run_checks(host: &RealHost, checks: &[&Vec<String>], left: Duration) -> Result<(), String> {
    for argv in checks {
        let timeout = left.max(Duration::from_secs(1));
        let ran = host.run(&Run::new(argv, timeout)).map_err(|e| format!("the check {argv:?} could not run: {e}"))?;
        if !ran.success() {
            let tail = ran.tail.trim();
            return Err(clip(
                &format!(
                    "the check {argv:?} {}{}{tail}",
                    ran.describe(timeout),
                    if tail.is_empty() { "" } else { ": " }
                ),
                600,
            )
            .into_owned());
        }
    }
    Ok(())
}

/// Refreshes what `r` notifies (again, now that it is back as it was); says what was done.
fn refresh_notified<P: Providers>(r: &Resource, resources: &[Resource], providers: &P) -> Vec<String> {
    let mut done = Vec::new();
    for target in &r.meta.notify {
        let Some(t) = resources.iter().find(|x| &x.id == target) else { continue };
        match providers.refresh(t, false) {
            Ok(Some(what)) => done.push(format!("{target} {what}")),
            Ok(None) => {}
            Err(e) => done.push(format!("{target}: refresh failed: {e}")),
        }
    }
    done
}

/// Puts the events of a settled confirmation into a run's: each replaces the event of its
/// resource (keeping the changes that were made and undone), or joins them.
pub fn merge_events(run: &mut Vec<ResourceEvent>, reverted: Vec<ResourceEvent>) {
    for mut e in reverted {
        match run.iter_mut().find(|x| x.id == e.id) {
            Some(x) => {
                e.changes = std::mem::take(&mut x.changes);
                e.duration_ms = x.duration_ms;
                e.cause = x.cause;
                *x = e;
            }
            None => run.push(e),
        }
    }
}
