//! The engine: converges a planned catalog, resource by resource.
//!
//! For each resource in plan order: if something it depends on failed or was skipped, it is
//! skipped; otherwise inspect and diff ([`Providers::check`]), and unless this is a dry-run,
//! apply the diff and check again: a diff left after apply is a failure. A changed resource
//! refreshes the resources it notifies (once, after they are converged themselves). A panic in
//! a provider becomes that resource's failure. The engine decides every status; providers only
//! inspect and change.
//!
//! A dry-run plans with what the run itself will have done by each resource's turn: each
//! change it predicts is handed to [`Providers::assume`], so a directory owned by a user the
//! catalog creates first is planned, not failed. A real run is that dry-run (its plan) and then
//! the changes: when the plan changes nothing, the plan is the run (a no-op costs one pass);
//! otherwise each resource's outcome is held against its plan, and a change the plan did not
//! predict is reported [`Status::Unplanned`]: a provider that lies shows in production.

use crate::catalog::Resource;
use crate::load::Loaded;
use crate::providers::ProviderError;
use crate::report::{Change, DiffBudget, Event, ResourceEvent, RunInfo, Sink, Status, Summary};
use crate::time::Stopwatch;
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// How each kind is inspected, changed and refreshed on some system.
pub trait Providers {
    /// What `check` observed, handed to `apply`.
    type State;

    /// Inspects the system (read only) and returns what differs from the resource. An `Err`
    /// means the resource cannot be converged as declared (and a run would fail on it too).
    fn check(&self, r: &Resource) -> Result<(Self::State, Vec<Change>), ProviderError>;

    /// Makes the changes `check` found; `Ok(Some(note))` puts the note in the report (the
    /// tail of a command's output).
    fn apply(&self, r: &Resource, state: &Self::State, changes: &[Change]) -> Result<Option<String>, ProviderError>;

    /// Reacts to a notify (restart a service, run a refresh-only exec). `Ok(None)` when the
    /// kind has nothing to do; otherwise what was done.
    fn refresh(&self, r: &Resource, dry_run: bool) -> Result<Option<String>, ProviderError>;

    /// Whether the resource converges together with others of its [`Batch`], handed to
    /// [`Providers::apply_batch`] all at once.
    fn batched(&self, _r: &Resource) -> Option<Batch> {
        None
    }

    /// Applies several resources at once; one result per item, in order.
    fn apply_batch(
        &self,
        items: &[(&Resource, &Self::State, &[Change])],
    ) -> Vec<Result<Option<String>, ProviderError>> {
        items.iter().map(|(r, state, changes)| self.apply(r, state, changes)).collect()
    }

    /// Whether an applied change is checked by inspecting again (a command is not: running it
    /// was the change).
    fn verify_after_apply(&self, _r: &Resource) -> bool {
        true
    }

    /// Why the system pins the resource as it is (a held package): it is reported `held` and
    /// never changed.
    fn held(&self, _state: &Self::State) -> Option<String> {
        None
    }

    /// In a dry-run, `r` would be changed as `state` and `changes` say: later checks of the
    /// same run see the system as if it had been (an account that would exist, a directory
    /// that would be there).
    fn assume(&self, _r: &Resource, _state: &Self::State, _changes: &[Change]) {}

    /// In a dry-run: whether the change `check` found is needed only if an earlier change of
    /// the run makes something first (a file to remove that a package about to be installed
    /// ships).
    fn conditional(&self, _state: &Self::State) -> bool {
        false
    }

    /// A real run's plan begins (`true`: check as in a dry-run, assume what would change) or
    /// ends (`false`: forget every assumption; what was read of the system stays valid).
    fn planning(&self, _on: bool) {}
}

/// How resources converge together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    /// One transaction (packages): every later resource of the batch whose dependencies have
    /// all converged joins, wherever it stands in the order.
    Transaction,
    /// Shared flushes (files and directories): the later resources of the batch whose
    /// dependencies have all converged join, up to the first resource of another kind in the
    /// order (so that nothing else sees them early), at most [`ADJACENT_MAX`] of them.
    Adjacent,
}

/// The most resources one [`Batch::Adjacent`] group holds, and how far ahead it looks (four
/// times as far): a bound on the work and on what is held open at once.
pub const ADJACENT_MAX: usize = 128;

#[derive(Debug, Clone, Copy, Default)]
pub struct Options<'a> {
    pub dry_run: bool,
    /// Set when the run must end: the resource in hand is finished, the rest are skipped.
    pub stop: Option<&'a std::sync::atomic::AtomicBool>,
    /// Asked before each resource and before each change (commit-confirmed apply).
    pub guard: Option<&'a dyn Guard>,
}

/// What the host asks of the engine around changes: resources to leave alone, and a step
/// before each change is made (to keep what it replaces, say). Neither sees a dry-run change.
pub trait Guard: std::fmt::Debug {
    /// `Some(why)`: the resource is skipped (in a dry-run too), and what depends on it.
    fn hold(&self, r: &Resource) -> Option<String>;
    /// Called just before `r` is changed; an `Err` fails it instead, unchanged.
    fn before_change(&self, r: &Resource) -> Result<(), String>;
}

/// Converges `loaded` through `providers`, emitting events to `sink`; returns the totals.
pub fn run<P: Providers>(
    loaded: &Loaded,
    providers: &P,
    options: Options,
    info: RunInfo,
    sink: &mut dyn Sink,
) -> Summary {
    let started = Stopwatch::start();
    sink.emit(Event::Started(&info));
    let mut summary = if options.dry_run {
        pass(loaded, providers, options, None, sink)
    } else {
        providers.planning(true);
        let mut planned = Planned::default();
        let predicted = {
            let _plan = tracing::debug_span!("plan").entered();
            pass(loaded, providers, Options { dry_run: true, ..options }, None, &mut planned)
        };
        providers.planning(false);
        if predicted.would_change == 0 {
            // Nothing to change: the plan is the run.
            planned.replay(&loaded.catalog.resources, &loaded.plan.order, sink);
            Summary { dry_run: false, ..predicted }
        } else {
            pass(loaded, providers, options, Some(&planned.by_index(&loaded.plan.order)), sink)
        }
    };
    summary.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    sink.emit(Event::Finished(&summary));
    summary
}

/// What a dry-run says of a change needed only if an earlier change makes something first.
const CONDITIONAL: &str = "only if an earlier change of this run makes it";

/// The events of a run's plan, in plan order (diffs within the report's budget).
#[derive(Default)]
struct Planned(Vec<Kept>, DiffBudget);

/// A planned event. Most of a run's say only "unchanged": those are kept as their duration
/// (16 bytes, where an event is over a hundred and its id as many again).
enum Kept {
    Unchanged(f64),
    Event(Box<ResourceEvent>),
}

/// What every planned "unchanged" event says but its id and duration.
static UNCHANGED: ResourceEvent = ResourceEvent {
    id: String::new(),
    status: Status::Unchanged,
    changes: Vec::new(),
    message: None,
    refresh: None,
    duration_ms: 0.0,
    cause: None,
};

impl Kept {
    fn event(&self) -> &ResourceEvent {
        match self {
            Kept::Unchanged(_) => &UNCHANGED,
            Kept::Event(e) => e,
        }
    }
}

impl Sink for Planned {
    fn emit(&mut self, event: Event<'_>) {
        let Event::Resource(e) = event else { return };
        // Every field named: a field added to events is kept until this says otherwise.
        let ResourceEvent { id: _, status, changes, message, refresh, duration_ms: _, cause } = e;
        let plain = *status == Status::Unchanged
            && changes.is_empty()
            && message.is_none()
            && refresh.is_none()
            && cause.is_none();
        if plain {
            self.0.push(Kept::Unchanged(e.duration_ms));
            return;
        }
        let earlier = self.0.iter_mut().filter_map(|k| match k {
            Kept::Event(e) => Some(&mut **e),
            Kept::Unchanged(_) => None,
        });
        let kept = self.1.admit(e, earlier);
        self.0.push(Kept::Event(Box::new(kept)));
    }
}

impl Planned {
    /// Each resource's planned event, by its index in the catalog.
    fn by_index<'a>(&'a self, order: &[usize]) -> Vec<Option<&'a ResourceEvent>> {
        let mut out = vec![None; order.len()];
        for (kept, &i) in self.0.iter().zip(order) {
            out[i] = Some(kept.event());
        }
        out
    }

    /// Emits the plan's events to `sink`, as the run's.
    fn replay(&self, resources: &[Resource], order: &[usize], sink: &mut dyn Sink) {
        for (kept, &i) in self.0.iter().zip(order) {
            match kept {
                Kept::Unchanged(ms) => {
                    let event =
                        ResourceEvent { id: resources[i].id.to_string(), duration_ms: *ms, ..UNCHANGED.clone() };
                    sink.emit(Event::Resource(&event));
                }
                Kept::Event(e) => sink.emit(Event::Resource(e)),
            }
        }
    }
}

/// Holds a real outcome against its plan. A change the plan did not predict is `unplanned`; a
/// state the plan would have changed, found converged at its turn, was changed by an earlier
/// resource of this run (a package's install script made the account): that is this run's
/// change, and reported as one. Actions (a command) are not states: one that no longer needs
/// to run did not run.
fn against_plan<P: Providers>(
    r: &Resource,
    providers: &P,
    mut event: ResourceEvent,
    planned: &ResourceEvent,
) -> ResourceEvent {
    let foreseen = planned.status == Status::WouldChange;
    match event.status {
        Status::Changed if !foreseen => {
            event.status = Status::Unplanned;
            let was = match (&planned.status, &planned.message) {
                (Status::Failed, Some(m)) => format!("its plan expected a failure: {m}"),
                (s, _) => format!("its plan found it {}", s.as_str()),
            };
            event.message = Some(match event.message.take() {
                Some(m) => format!("not in this run's plan ({was}); {m}"),
                None => format!("not in this run's plan ({was})"),
            });
        }
        Status::Unchanged
            if foreseen && planned.message.as_deref() != Some(CONDITIONAL) && providers.verify_after_apply(r) =>
        {
            event.status = Status::Changed;
            event.changes = planned.changes.clone();
            event.message = Some("made so by an earlier change of this run".into());
        }
        _ => {}
    }
    event
}

/// One pass over the catalog: a dry-run, or a real run held against `planned` (each
/// resource's planned event, by index). Returns the totals, without the duration.
fn pass<P: Providers>(
    loaded: &Loaded,
    providers: &P,
    options: Options,
    planned: Option<&[Option<&ResourceEvent>]>,
    sink: &mut dyn Sink,
) -> Summary {
    let resources = &loaded.catalog.resources;
    let plan = &loaded.plan;
    let mut status: Vec<Option<Status>> = vec![None; resources.len()];
    let mut notified_by: Vec<Option<usize>> = vec![None; resources.len()];
    let mut summary = Summary { dry_run: options.dry_run, ..Summary::default() };
    // Events of batched resources converged ahead of their turn, emitted at their turn.
    // (A map: there are only ever a batch's few, and a vector of them all is megabytes.)
    let mut early: HashMap<usize, ResourceEvent> = HashMap::new();
    for (pos, &i) in plan.order.iter().enumerate() {
        let r = &resources[i];
        // Whatever a provider logs is tagged with its resource.
        let _resource = tracing::debug_span!("resource", id = %r.id).entered();
        let t0 = Stopwatch::start();
        let stopping = options.stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst));
        if stopping && !early.contains_key(&i) {
            let event = ResourceEvent {
                id: r.id.to_string(),
                status: Status::Skipped,
                changes: Vec::new(),
                message: Some("the agent is stopping; converged on its next run".into()),
                refresh: None,
                duration_ms: 0.0,
                cause: None,
            };
            summary.count(&event.status);
            sink.emit(Event::Resource(&event));
            status[i] = Some(event.status);
            continue;
        }
        let mut event = match early.remove(&i) {
            Some(event) => event,
            None if let Some(batch) = providers.batched(r)
                && blocked_by(plan, resources, &status, i).is_none() =>
            {
                // A dependency converged: its turn came, or (for shared flushes) it converged
                // ahead of its turn in an earlier group; files and directories do nothing more
                // at their turn.
                let ok = |s: &Status| !matches!(s, Status::Failed | Status::Skipped);
                let ready = |j: usize| {
                    plan.deps[j].iter().all(|&(d, _)| match (&status[d], early.get(&d)) {
                        (Some(s), _) => ok(s),
                        (None, Some(e)) => batch == Batch::Adjacent && ok(&e.status),
                        (None, None) => false,
                    })
                };
                let later = plan.order[pos + 1..].iter().copied();
                let mut group = vec![i];
                match batch {
                    // Every later ready resource of the batch: one transaction for all.
                    Batch::Transaction => group.extend(later.filter(|&j| {
                        providers.batched(&resources[j]) == Some(batch) && ready(j) && !early.contains_key(&j)
                    })),
                    // The ready ones up to the first resource of another kind.
                    Batch::Adjacent => group.extend(
                        later
                            .take(4 * ADJACENT_MAX)
                            .take_while(|&j| providers.batched(&resources[j]) == Some(batch))
                            .filter(|&j| ready(j) && !early.contains_key(&j))
                            .take(ADJACENT_MAX - 1),
                    ),
                }
                let mut events = converge_batch(&group, resources, providers, options);
                for (&j, e) in group.iter().zip(events.iter_mut()).skip(1) {
                    early.insert(j, std::mem::take(e));
                }
                events.swap_remove(0)
            }
            None => converge_one(r, providers, options, blocked_by(plan, resources, &status, i)),
        };
        if let (Some(by), Status::Unchanged | Status::Changed | Status::WouldChange) = (notified_by[i], &event.status) {
            match guard(|| providers.refresh(r, options.dry_run)) {
                Ok(None) => {}
                Ok(Some(what)) => {
                    event.refresh = Some(format!("{what} (notified by {})", resources[by].id));
                }
                Err(e) => {
                    event.status = Status::Failed;
                    event.message = Some(format!("refresh (notified by {}) failed: {e}", resources[by].id));
                }
            }
        }
        if matches!(event.status, Status::Changed | Status::WouldChange) {
            for &t in &plan.notify[i] {
                notified_by[t].get_or_insert(i);
            }
        }
        if let Some(Some(p)) = planned.map(|p| p[i]) {
            event = against_plan(r, providers, event, p);
        }
        event.duration_ms = t0.elapsed().as_secs_f64() * 1000.0;
        tracing::debug!(status = ?event.status, ms = event.duration_ms, "converged");
        summary.count(&event.status);
        sink.emit(Event::Resource(&event));
        status[i] = Some(event.status);
    }
    summary
}

/// The first dependency of `i` that failed or was skipped.
fn blocked_by<'a>(
    plan: &crate::plan::Plan,
    resources: &'a [Resource],
    status: &'a [Option<Status>],
    i: usize,
) -> Option<(&'a Resource, &'a Status)> {
    plan.deps[i].iter().find_map(|&(j, _)| {
        let s = status[j].as_ref()?;
        matches!(s, Status::Failed | Status::Skipped).then(|| (&resources[j], s))
    })
}

/// What checking a resource led to: a final event, or changes to apply.
enum Step<S> {
    Done(ResourceEvent),
    Apply(ResourceEvent, S),
}

/// Inspects and diffs one resource; stops before any change.
fn prepare<P: Providers>(
    r: &Resource,
    providers: &P,
    options: Options<'_>,
    blocked_by: Option<(&Resource, &Status)>,
) -> Step<P::State> {
    let mut event = ResourceEvent { id: r.id.to_string(), status: Status::Unchanged, ..ResourceEvent::default() };
    if let Some((dep, why)) = blocked_by {
        let what = if *why == Status::Failed { "failed" } else { "was skipped" };
        event.status = Status::Skipped;
        event.message = Some(format!("depends on {}, which {what}", dep.id));
        return Step::Done(event);
    }
    if let Some(why) = options.guard.and_then(|g| g.hold(r)) {
        event.status = Status::Skipped;
        event.message = Some(why);
        return Step::Done(event);
    }
    let (state, changes) = match guard(|| providers.check(r)) {
        Ok(x) => x,
        Err(e) => return Step::Done(failed(event, e)),
    };
    if changes.is_empty() {
        return Step::Done(event);
    }
    event.changes = changes;
    if let Some(why) = providers.held(&state) {
        event.status = Status::Held;
        event.message = Some(why);
        return Step::Done(event);
    }
    if options.dry_run {
        providers.assume(r, &state, &event.changes);
        if providers.conditional(&state) {
            event.message = Some(CONDITIONAL.into());
        }
        event.status = Status::WouldChange;
        return Step::Done(event);
    }
    Step::Apply(event, state)
}

/// The event of a resource after `apply` returned `applied`: inspected again unless the kind
/// says a change cannot be seen that way.
fn finish<P: Providers>(
    r: &Resource,
    providers: &P,
    mut event: ResourceEvent,
    applied: Result<Option<String>, ProviderError>,
) -> ResourceEvent {
    match applied {
        Err(e) => return failed(event, e),
        Ok(note) => event.message = note,
    }
    if !providers.verify_after_apply(r) {
        return ResourceEvent { status: Status::Changed, ..event };
    }
    match guard(|| providers.check(r)) {
        Ok((_, left)) if left.is_empty() => ResourceEvent { status: Status::Changed, ..event },
        Ok((_, left)) => {
            let what: Vec<String> = left.iter().map(|c| format!("{}: {} -> {}", c.attribute, c.from, c.to)).collect();
            failed(event, format!("still differs after apply: {}", what.join("; ")).into())
        }
        Err(e) => failed(event, format!("after apply: {e}").into()),
    }
}

fn failed(mut event: ResourceEvent, error: ProviderError) -> ResourceEvent {
    event.status = Status::Failed;
    event.message = Some(error.to_string());
    event
}

fn converge_one<P: Providers>(
    r: &Resource,
    providers: &P,
    options: Options<'_>,
    blocked_by: Option<(&Resource, &Status)>,
) -> ResourceEvent {
    match prepare(r, providers, options, blocked_by) {
        Step::Done(event) => event,
        Step::Apply(event, state) => match before_change(r, options) {
            Err(e) => failed(event, e),
            Ok(()) => {
                let applied = guard(|| providers.apply(r, &state, &event.changes));
                finish(r, providers, event, applied)
            }
        },
    }
}

/// The host's step before `r` changes; its refusal is the resource's failure.
fn before_change(r: &Resource, options: Options<'_>) -> Result<(), ProviderError> {
    match options.guard {
        Some(g) => g.before_change(r).map_err(|e| format!("not changed: {e}").into()),
        None => Ok(()),
    }
}

/// Converges `group` (indices into `resources`, none blocked) with one `apply_batch` for all
/// that need a change; returns their events in the same order.
fn converge_batch<P: Providers>(
    group: &[usize],
    resources: &[Resource],
    providers: &P,
    options: Options<'_>,
) -> Vec<ResourceEvent> {
    let steps: Vec<Step<P::State>> = group
        .iter()
        .map(|&j| match prepare(&resources[j], providers, options, None) {
            Step::Apply(event, state) => match before_change(&resources[j], options) {
                Err(e) => Step::Done(failed(event, e)),
                Ok(()) => Step::Apply(event, state),
            },
            done => done,
        })
        .collect();
    let pending: Vec<(usize, &Resource, &P::State, &[Change])> = steps
        .iter()
        .enumerate()
        .filter_map(|(k, step)| match step {
            Step::Apply(event, state) => Some((k, &resources[group[k]], state, event.changes.as_slice())),
            Step::Done(_) => None,
        })
        .collect();
    let items: Vec<(&Resource, &P::State, &[Change])> = pending.iter().map(|&(_, r, s, c)| (r, s, c)).collect();
    let mut results = match catch_unwind(AssertUnwindSafe(|| providers.apply_batch(&items))) {
        Ok(results) if results.len() == items.len() => results,
        Ok(_) => {
            (0..items.len()).map(|_| Err("the provider answered for another number of resources".into())).collect()
        }
        Err(_) => (0..items.len()).map(|_| Err("provider panicked".into())).collect(),
    }
    .into_iter();
    steps
        .into_iter()
        .enumerate()
        .map(|(k, step)| match step {
            Step::Done(event) => event,
            Step::Apply(event, _) => {
                let applied = results.next().unwrap_or_else(|| Err("no result".into()));
                finish(&resources[group[k]], providers, event, applied)
            }
        })
        .collect()
}

/// Runs a provider call, turning a panic into an error.
pub(crate) fn guard<T>(f: impl FnOnce() -> Result<T, ProviderError>) -> Result<T, ProviderError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        Err(format!("provider panicked: {msg}").into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::load;
    use crate::report::Collect;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// A scripted system: each path has a current and a desired "value" held in memory, with
    /// per-path behaviours for the cases under test.
    #[derive(Default)]
    struct Script {
        value: RefCell<HashMap<String, String>>,
        fail_apply: Vec<&'static str>,
        panic_check: Vec<&'static str>,
        sticky: Vec<&'static str>,
        refreshes: RefCell<Vec<String>>,
        log: RefCell<Vec<String>>,
        /// How every resource batches (none by default).
        batch: Option<Batch>,
    }

    fn want(r: &Resource) -> String {
        match &r.spec {
            crate::catalog::Spec::File(f) => f.content.as_ref().and_then(|c| c.held()).unwrap_or_default().to_string(),
            _ => String::new(),
        }
    }

    impl Providers for Script {
        type State = ();

        fn check(&self, r: &Resource) -> Result<((), Vec<Change>), ProviderError> {
            let path = r.id.title.as_str();
            if self.panic_check.contains(&path) {
                panic!("boom in {path}");
            }
            self.log.borrow_mut().push(format!("check {path}"));
            let have = self.value.borrow().get(path).cloned().unwrap_or_default();
            let want = want(r);
            Ok(((), if have == want { vec![] } else { vec![Change::new("content", have, want)] }))
        }

        fn apply(&self, r: &Resource, _: &(), _: &[Change]) -> Result<Option<String>, ProviderError> {
            let path = r.id.title.as_str();
            self.log.borrow_mut().push(format!("apply {path}"));
            if self.fail_apply.contains(&path) {
                return Err(format!("cannot write {path}").into());
            }
            if !self.sticky.contains(&path) {
                self.value.borrow_mut().insert(path.to_string(), want(r));
            }
            Ok(None)
        }

        fn refresh(&self, r: &Resource, dry_run: bool) -> Result<Option<String>, ProviderError> {
            if !dry_run {
                self.refreshes.borrow_mut().push(r.id.to_string());
            }
            Ok(Some(if dry_run { "would restart".into() } else { "restarted".into() }))
        }

        fn batched(&self, _r: &Resource) -> Option<Batch> {
            self.batch
        }
    }

    const CATALOG: &str = "
format: 1
resources:
  - file: /a
    content: A
    notify: [file:/svc]
  - file: /b
    content: B
    requires: [file:/a]
  - file: /c
    content: C
  - file: /svc
    content: S
  - file: /d
    content: D
    notify: [file:/svc]
";

    fn check(script: &Script, dry_run: bool) -> (Summary, HashMap<String, ResourceEvent>) {
        check_guarded(script, dry_run, None)
    }

    fn check_guarded(
        script: &Script,
        dry_run: bool,
        guard: Option<&dyn Guard>,
    ) -> (Summary, HashMap<String, ResourceEvent>) {
        let loaded = load("t.yaml", CATALOG, None).unwrap();
        let mut sink = Collect::default();
        let info = RunInfo::test("t.yaml", dry_run, 5);
        let summary = run(&loaded, script, Options { dry_run, stop: None, guard }, info, &mut sink);
        let events = sink.resources.into_iter().map(|e| (e.id.clone(), e)).collect();
        (summary, events)
    }

    /// Holds `/a`, refuses to let `/c` change (its state could not be kept: a full disk), and
    /// notes every change it is asked about.
    #[derive(Debug, Default)]
    struct Keeper(RefCell<Vec<String>>);

    impl Guard for Keeper {
        fn hold(&self, r: &Resource) -> Option<String> {
            (r.id.title == "/a").then(|| "held as it was".to_string())
        }
        fn before_change(&self, r: &Resource) -> Result<(), String> {
            self.0.borrow_mut().push(r.id.title.clone());
            if r.id.title == "/c" { Err("no room to keep it".into()) } else { Ok(()) }
        }
    }

    #[test]
    fn a_guard_holds_resources_and_is_asked_before_each_change_which_it_can_refuse() {
        let s = Script::default();
        let keeper = Keeper::default();
        let (sum, ev) = check_guarded(&s, true, Some(&keeper));
        assert!(keeper.0.borrow().is_empty(), "a dry-run changes nothing, so nothing is asked");
        assert_eq!(ev["file:/a"].status, Status::Skipped, "held in a dry-run too");
        assert_eq!(sum.would_change, 2, "/c and /d: /b and /svc come after /a");
        let (_, ev) = check_guarded(&s, false, Some(&keeper));
        assert_eq!(ev["file:/a"].status, Status::Skipped);
        assert_eq!(ev["file:/a"].message.as_deref(), Some("held as it was"));
        assert_eq!(ev["file:/b"].status, Status::Skipped, "what depends on a held resource waits");
        assert_eq!(ev["file:/c"].status, Status::Failed);
        assert!(ev["file:/c"].message.as_deref().unwrap().contains("not changed: no room to keep it"));
        assert!(!s.log.borrow().iter().any(|l| l == "apply /c"), "a refused change is never applied");
        assert_eq!(ev["file:/d"].status, Status::Changed);
        assert_eq!(ev["file:/svc"].status, Status::Skipped, "a notify target of a held resource waits too");
        assert_eq!(*keeper.0.borrow(), vec!["/c".to_string(), "/d".to_string()]);
    }

    /// A resource converged ahead of its turn in one group is never taken into a later one
    /// (it would be converged twice, its change reported as unchanged).
    #[test]
    fn a_resource_converged_ahead_of_its_turn_is_not_converged_again() {
        for batch in [Batch::Transaction, Batch::Adjacent] {
            let text = "format: 1\nresources:\n  - file: /a\n    content: A\n  - file: /c\n    content: C\n    requires: [file:/a]\n  - file: /b\n    content: B\n";
            let loaded = load("t.yaml", text, None).unwrap();
            let script = Script { batch: Some(batch), ..Script::default() };
            let mut sink = Collect::default();
            let info = RunInfo::test("t.yaml", false, 3);
            run(&loaded, &script, Options::default(), info, &mut sink);
            let status: Vec<(&str, &Status)> = sink.resources.iter().map(|e| (e.id.as_str(), &e.status)).collect();
            assert_eq!(
                status,
                [("file:/a", &Status::Changed), ("file:/c", &Status::Changed), ("file:/b", &Status::Changed)],
                "{batch:?}"
            );
            // Converged again, /b would be found unchanged and told as made so by another change.
            assert!(sink.resources.iter().all(|e| e.message.is_none()), "{batch:?}: {:?}", sink.resources);
            let checks = script.log.borrow().iter().filter(|l| *l == "check /b").count();
            assert_eq!(checks, 3, "{batch:?}: planned, checked, verified: {:?}", script.log.borrow());
        }
    }

    #[test]
    fn a_plan_keeps_unchanged_events_small_and_tells_them_whole() {
        let loaded = load("t.yaml", CATALOG, None).unwrap();
        let script = Script::default();
        let ordered = |dry_run: bool| {
            let mut sink = Collect::default();
            run(
                &loaded,
                &script,
                Options { dry_run, ..Options::default() },
                RunInfo::test("t.yaml", dry_run, 5),
                &mut sink,
            );
            sink.resources
        };
        let first = ordered(false);
        // Nothing to change: the plan is the run, every event told whole from its small record.
        let again = ordered(false);
        let ids = |events: &[ResourceEvent]| events.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&again), ids(&first));
        assert!(again.iter().all(|e| e.status == Status::Unchanged && e.message.is_none() && e.changes.is_empty()));
        // One drifted: the run holds it against its plan, the others against "unchanged".
        script.value.borrow_mut().insert("/b".into(), "drifted".into());
        let drifted = ordered(false);
        assert_eq!(ids(&drifted), ids(&first));
        for e in &drifted {
            let want = if e.id == "file:/b" { Status::Changed } else { Status::Unchanged };
            assert_eq!((e.status.clone(), &e.message), (want, &None), "{}", e.id);
        }
    }

    #[test]
    fn converges_then_is_idempotent() {
        let s = Script::default();
        let (sum, ev) = check(&s, false);
        assert_eq!((sum.changed, sum.failed), (5, 0));
        assert_eq!(ev["file:/a"].changes, vec![Change::new("content", "", "A")]);
        let (sum, _) = check(&s, false);
        assert_eq!((sum.unchanged, sum.changed), (5, 0));
    }

    #[test]
    fn a_failure_skips_its_dependents_and_nothing_else() {
        let s = Script { fail_apply: vec!["/a"], ..Script::default() };
        let (sum, ev) = check(&s, false);
        assert_eq!(ev["file:/a"].status, Status::Failed);
        assert_eq!(ev["file:/a"].message.as_deref(), Some("cannot write /a"));
        assert_eq!(ev["file:/b"].status, Status::Skipped);
        assert_eq!(ev["file:/b"].message.as_deref(), Some("depends on file:/a, which failed"));
        assert_eq!(ev["file:/svc"].status, Status::Skipped, "a notify target comes after, so it is skipped too");
        assert_eq!(ev["file:/c"].status, Status::Changed);
        assert_eq!(ev["file:/d"].status, Status::Changed);
        assert_eq!((sum.failed, sum.skipped, sum.changed), (1, 2, 2));
    }

    #[test]
    fn a_panic_is_that_resources_failure() {
        let s = Script { panic_check: vec!["/c"], ..Script::default() };
        let (sum, ev) = check(&s, false);
        assert_eq!(ev["file:/c"].status, Status::Failed);
        assert_eq!(ev["file:/c"].message.as_deref(), Some("provider panicked: boom in /c"));
        assert_eq!(sum.changed, 4);
    }

    #[test]
    fn a_diff_left_after_apply_is_a_failure() {
        let s = Script { sticky: vec!["/c"], ..Script::default() };
        let (_, ev) = check(&s, false);
        assert_eq!(ev["file:/c"].status, Status::Failed);
        assert_eq!(ev["file:/c"].message.as_deref(), Some("still differs after apply: content:  -> C"));
    }

    #[test]
    fn dry_run_applies_nothing_and_predicts_refreshes() {
        let s = Script::default();
        let (sum, ev) = check(&s, true);
        assert_eq!(sum.would_change, 5);
        assert!(s.log.borrow().iter().all(|l| l.starts_with("check")));
        assert_eq!(ev["file:/svc"].refresh.as_deref(), Some("would restart (notified by file:/a)"));
        assert!(s.refreshes.borrow().is_empty());
    }

    #[test]
    fn a_stop_finishes_the_resource_in_hand_and_skips_the_rest() {
        let s = Script::default();
        let loaded = load("t.yaml", CATALOG, None).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let mut sink = Collect::default();
        let info = RunInfo::test("t", false, 5);
        // A sink that asks to stop after the first resource event, as a signal would.
        struct StopAfterFirst<'a>(&'a std::sync::atomic::AtomicBool, &'a mut Collect);
        impl Sink for StopAfterFirst<'_> {
            fn emit(&mut self, e: Event<'_>) {
                if matches!(e, Event::Resource(_)) {
                    self.0.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                self.1.emit(e);
            }
        }
        let summary = run(
            &loaded,
            &s,
            Options { dry_run: false, stop: Some(&stop), guard: None },
            info,
            &mut StopAfterFirst(&stop, &mut sink),
        );
        assert_eq!((summary.changed, summary.skipped), (1, 4));
        assert_eq!(sink.resources[1].message.as_deref(), Some("the agent is stopping; converged on its next run"));
    }

    #[test]
    fn notify_refreshes_once_after_the_target_converged() {
        let s = Script::default();
        check(&s, false);
        assert_eq!(*s.refreshes.borrow(), vec!["file:/svc".to_string()], "two notifiers, one refresh");
        let log = s.log.borrow();
        let applied = log.iter().position(|l| l == "apply /svc").unwrap();
        let d = log.iter().position(|l| l == "apply /d").unwrap();
        assert!(d < applied, "the notifier /d is ordered before its target: {log:?}");
        drop(log);
        // In sync: nothing changes, so nothing is refreshed.
        check(&s, false);
        assert_eq!(s.refreshes.borrow().len(), 1);
    }
}
