//! The run's event stream and its sinks.
//!
//! The engine emits one [`Event`] when a run starts, one per resource, and one at the end; a
//! [`Sink`] turns them into output. [`TextSink`] is for people (colour only when asked, which
//! the agent does only on a terminal); [`JsonSink`] writes one JSON object per line.
//! Sinks never fail a run: an output error (a closed pipe) is remembered, not raised.

use crate::hash::sha256_hex;
use crate::text::clean;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt::Write as _;
use std::io::Write;

/// What happened to one resource. An open set: a reader shows values it does not know as they
/// come ([`Status::Other`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum Status {
    #[default]
    Unchanged,
    Changed,
    WouldChange,
    Failed,
    Skipped,
    /// A package the system holds (dpkg `hold`, dnf versionlock) that the catalog would change:
    /// left as it is, and said.
    Held,
    /// A change the run did not plan: its plan (a dry-run of the catalog made just before)
    /// said the resource was in sync. The change was made; a provider or something else on
    /// the host behaved otherwise than predicted, and the operator should know.
    Unplanned,
    /// A change made, then undone: its confirmation did not come in time (see
    /// [`crate::catalog::Confirm`]). Counted as a failure too: the host is not as the catalog
    /// says, and a rollout stops on it.
    Reverted,
    Other(String),
}

impl Status {
    pub fn as_str(&self) -> &str {
        match self {
            Status::Unchanged => "unchanged",
            Status::Changed => "changed",
            Status::WouldChange => "would-change",
            Status::Failed => "failed",
            Status::Skipped => "skipped",
            Status::Held => "held",
            Status::Unplanned => "unplanned",
            Status::Reverted => "reverted",
            Status::Other(s) => s,
        }
    }

    pub fn parse(s: &str) -> Status {
        match s {
            "unchanged" => Status::Unchanged,
            "changed" => Status::Changed,
            "would-change" => Status::WouldChange,
            "failed" => Status::Failed,
            "skipped" => Status::Skipped,
            "held" => Status::Held,
            "unplanned" => Status::Unplanned,
            "reverted" => Status::Reverted,
            other => Status::Other(other.to_string()),
        }
    }
}

impl Serialize for Status {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Status {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Status::parse(&String::deserialize(d)?))
    }
}

/// One attribute that differs (or differed) between the system and the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub attribute: String,
    pub from: String,
    pub to: String,
    /// A unified diff, for content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
}

impl Change {
    pub fn new(attribute: &str, from: impl Into<String>, to: impl Into<String>) -> Change {
        Change { attribute: attribute.to_string(), from: from.into(), to: to.into(), diff: None }
    }
}

/// Content larger than this is compared but never shown as a diff.
pub const DIFF_LIMIT: u64 = 1 << 20;
/// At most this many lines of a unified diff are shown.
pub const DIFF_LINES: usize = 400;

/// `sha256:` and the first 12 hex digits, with the size: enough to tell contents apart.
pub fn describe_content(content: &[u8]) -> String {
    format!("sha256:{} ({} bytes)", &sha256_hex(content)[..12], content.len())
}

/// A unified diff from `old` to `new`, when both are text and not too large.
pub fn unified_diff(old_label: &str, new_label: &str, old: &[u8], new: &[u8]) -> Option<String> {
    if old.len() as u64 > DIFF_LIMIT || new.len() as u64 > DIFF_LIMIT {
        return None;
    }
    let (old, new) = (std::str::from_utf8(old).ok()?, std::str::from_utf8(new).ok()?);
    let diff = similar::TextDiff::from_lines(old, new);
    let text = diff.unified_diff().context_radius(3).header(old_label, new_label).to_string();
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() > DIFF_LINES {
        let mut cut = lines[..DIFF_LINES].join("\n");
        cut.push_str(&format!("\n... {} more lines of diff not shown", lines.len() - DIFF_LINES));
        Some(cut)
    } else {
        Some(text)
    }
}

/// What a run is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    /// Where the catalog came from: a file name, or a server.
    pub catalog: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    pub dry_run: bool,
    pub resources: usize,
    /// The key whose signature verified, for a signed catalog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<String>,
    /// Things the operator must know before the resources: a rollback allowed, a clock behind.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// The outcome of one resource.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceEvent {
    pub id: String,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<Change>,
    /// Why it failed or was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What a notify did to it ("restarted"), or would do in a dry-run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<String>,
    pub duration_ms: f64,
    /// For a change: whether the catalog asked for something new (a new or changed resource)
    /// or the host had drifted from what it already asked for (Puppet's corrective change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
}

/// Where a change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cause {
    /// The resource is new in this catalog, or changed since the catalog applied before.
    Catalog,
    /// The resource is as the catalog applied before had it: the host had drifted.
    Drift,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Catalog => "from the catalog",
            Cause::Drift => "repaired drift",
        }
    }
}

/// "1 resource", "2 resources".
fn resources(n: usize) -> String {
    if n == 1 { "1 resource".into() } else { format!("{n} resources") }
}

/// Totals of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub resources: usize,
    pub unchanged: usize,
    pub changed: usize,
    pub would_change: usize,
    pub failed: usize,
    pub skipped: usize,
    /// Resources left as the system holds them ([`Status::Held`]); absent from the reports
    /// of agents before it was counted.
    #[serde(default)]
    pub held: usize,
    /// Changes the run's plan did not predict ([`Status::Unplanned`]); also counted in
    /// `changed`.
    #[serde(default)]
    pub unplanned: usize,
    /// Changes undone for want of their confirmation ([`Status::Reverted`]); also counted in
    /// `failed`.
    #[serde(default)]
    pub reverted: usize,
    pub dry_run: bool,
    pub duration_ms: f64,
}

impl Summary {
    pub fn count(&mut self, status: &Status) {
        self.resources += 1;
        match status {
            Status::Unchanged => self.unchanged += 1,
            Status::Changed => self.changed += 1,
            Status::WouldChange => self.would_change += 1,
            Status::Failed => self.failed += 1,
            Status::Skipped => self.skipped += 1,
            Status::Held => self.held += 1,
            Status::Unplanned => {
                self.changed += 1;
                self.unplanned += 1;
            }
            Status::Reverted => {
                self.failed += 1;
                self.reverted += 1;
            }
            Status::Other(_) => {}
        }
    }

    /// Puppet's detailed exit codes: 0 in sync, 2 changed or would change, 4 failures, 6 both.
    pub fn detailed_exit_code(&self) -> i32 {
        let changed = if self.changed + self.would_change > 0 { 2 } else { 0 };
        let failed = if self.failed + self.skipped > 0 { 4 } else { 0 };
        changed | failed
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    Started(&'a RunInfo),
    Resource(&'a ResourceEvent),
    Finished(&'a Summary),
}

/// Where events go.
pub trait Sink {
    fn emit(&mut self, event: Event<'_>);
}

/// Sends every event to several sinks.
pub struct Tee<'a>(pub Vec<&'a mut dyn Sink>);

impl Sink for Tee<'_> {
    fn emit(&mut self, event: Event<'_>) {
        for s in &mut self.0 {
            s.emit(event);
        }
    }
}

/// The most diff text a run keeps for its report. Past it a report loses every diff when it is
/// cut to size ([`crate::wire::Report::clip`]), so none is kept: a first run creating a
/// hundred thousand files holds a few MiB of events, not the diff of every file.
pub const KEPT_DIFFS: usize = crate::wire::Limits::REPORT_BODY / 4 * 3;

#[cfg(test)]
impl RunInfo {
    /// A local run of `resources` resources from `catalog`, for tests.
    pub(crate) fn test(catalog: &str, dry_run: bool, resources: usize) -> RunInfo {
        RunInfo {
            catalog: catalog.into(),
            host: None,
            serial: None,
            commit: None,
            dry_run,
            resources,
            signed_by: None,
            warnings: vec![],
        }
    }
}

/// Keeps the diffs of the events a sink stores while they fit in [`KEPT_DIFFS`].
#[derive(Debug, Default)]
pub struct DiffBudget {
    used: usize,
    spent: bool,
}

impl DiffBudget {
    /// Stores `event` in `kept`, with its diffs while the budget lasts; the first event over it
    /// takes the diffs of every event kept before it too.
    pub fn keep(&mut self, kept: &mut Vec<ResourceEvent>, event: &ResourceEvent) {
        let event = self.admit(event, kept.iter_mut());
        kept.push(event);
    }

    /// A copy of `event` to keep, with its diffs while the budget lasts; the first event over
    /// it takes the diffs of the `earlier` ones kept too.
    pub fn admit<'a>(
        &mut self,
        event: &ResourceEvent,
        earlier: impl IntoIterator<Item = &'a mut ResourceEvent>,
    ) -> ResourceEvent {
        let mut event = event.clone();
        if !self.spent {
            self.used += event.changes.iter().filter_map(|c| c.diff.as_ref()).map(String::len).sum::<usize>();
            if self.used > KEPT_DIFFS {
                self.spent = true;
                earlier.into_iter().flat_map(|e| e.changes.iter_mut()).for_each(|c| c.diff = None);
            }
        }
        if self.spent {
            event.changes.iter_mut().for_each(|c| c.diff = None);
        }
        event
    }
}

/// Keeps every event: the whole report, for tests and for sending to a server (diffs within
/// [`KEPT_DIFFS`]).
#[derive(Debug, Default)]
pub struct Collect {
    pub info: Option<RunInfo>,
    pub resources: Vec<ResourceEvent>,
    pub summary: Option<Summary>,
    diffs: DiffBudget,
    /// Keeps the run's information and totals, not its resources' events.
    totals_only: bool,
}

impl Collect {
    /// Keeps the run's information and totals only: what a run that sends no report needs
    /// (ten thousand events are megabytes).
    pub fn totals() -> Collect {
        Collect { totals_only: true, ..Collect::default() }
    }
}

impl Sink for Collect {
    fn emit(&mut self, event: Event<'_>) {
        match event {
            Event::Started(i) => self.info = Some(i.clone()),
            Event::Resource(_) if self.totals_only => {}
            Event::Resource(r) => self.diffs.keep(&mut self.resources, r),
            Event::Finished(s) => self.summary = Some(s.clone()),
        }
    }
}

/// JSON Lines: `{"type":"start",...}`, `{"type":"resource",...}`, `{"type":"summary",...}`.
pub struct JsonSink<W: Write> {
    out: W,
    pub error: Option<std::io::Error>,
}

impl<W: Write> JsonSink<W> {
    pub fn new(out: W) -> Self {
        JsonSink { out, error: None }
    }
}

#[derive(Serialize)]
struct Tagged<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(flatten)]
    body: &'a T,
}

impl<W: Write> Sink for JsonSink<W> {
    fn emit(&mut self, event: Event<'_>) {
        if self.error.is_some() {
            return;
        }
        let line = match event {
            Event::Started(i) => serde_json::to_string(&Tagged { kind: "start", body: i }),
            Event::Resource(r) => serde_json::to_string(&Tagged { kind: "resource", body: r }),
            Event::Finished(s) => serde_json::to_string(&Tagged { kind: "summary", body: s }),
        }
        .expect("report types serialize");
        if let Err(e) = writeln!(self.out, "{line}").and_then(|_| self.out.flush()) {
            self.error = Some(e);
        }
    }
}

/// Text for people. Unchanged resources are listed only when `verbose`.
pub struct TextSink<W: Write> {
    out: W,
    color: bool,
    verbose: bool,
    pub error: Option<std::io::Error>,
}

impl<W: Write> TextSink<W> {
    pub fn new(out: W, color: bool, verbose: bool) -> Self {
        TextSink { out, color, verbose, error: None }
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.color { format!("\x1b[{code}m{s}\x1b[0m") } else { s.to_string() }
    }

    fn status_word(&self, s: &Status) -> String {
        let (code, word) = match s {
            Status::Unchanged => ("2", "unchanged"),
            Status::Changed => ("32", "changed"),
            Status::WouldChange => ("33", "would change"),
            Status::Failed => ("1;31", "FAILED"),
            Status::Skipped => ("35", "skipped"),
            Status::Held => ("36", "held"),
            Status::Unplanned => ("1;33", "UNPLANNED"),
            Status::Reverted => ("1;31", "REVERTED"),
            Status::Other(o) => ("0", o.as_str()),
        };
        self.paint(code, &format!("{word:<12}"))
    }

    fn format(&self, event: Event<'_>) -> Option<String> {
        // Everything shown here came from a catalog, a tool or a server: escaped (see
        // `crate::text`), so no name or message can forge a line or drive the terminal.
        let c = |s: &str| clean(s).into_owned();
        let mut s = String::new();
        match event {
            Event::Started(i) => {
                let _ = write!(s, "converge: {} ({}", c(&i.catalog), resources(i.resources));
                if let Some(h) = &i.host {
                    let _ = write!(s, ", host {}", c(h));
                }
                if let Some(n) = i.serial {
                    let _ = write!(s, ", serial {n}");
                }
                if let Some(commit) = &i.commit {
                    let _ = write!(s, ", commit {}", c(commit));
                }
                if let Some(k) = &i.signed_by {
                    let _ = write!(s, ", signed by key {}", c(k));
                }
                s.push_str(if i.dry_run { ", dry-run)" } else { ")" });
                for w in &i.warnings {
                    let _ = write!(s, "\n  {}: {}", self.paint("1;33", "warning"), indented(w, "    "));
                }
            }
            Event::Resource(r) => {
                if r.status == Status::Unchanged && !self.verbose && r.refresh.is_none() {
                    return None;
                }
                let _ = write!(s, "  {} {}", self.status_word(&r.status), c(&r.id));
                if let Some(m) = &r.message {
                    let _ = write!(s, ": {}", indented(m, "      "));
                }
                for ch in &r.changes {
                    let _ = write!(s, "\n      {}: {} -> {}", c(&ch.attribute), c(&ch.from), c(&ch.to));
                    if let Some(d) = &ch.diff {
                        for line in d.lines() {
                            let line = c(line);
                            let colored = match line.as_bytes().first() {
                                Some(b'+') if !line.starts_with("+++") => self.paint("32", &line),
                                Some(b'-') if !line.starts_with("---") => self.paint("31", &line),
                                Some(b'@') => self.paint("36", &line),
                                _ => line,
                            };
                            let _ = write!(s, "\n        {colored}");
                        }
                    }
                }
                if let Some(rf) = &r.refresh {
                    let _ = write!(s, "\n      refresh: {}", c(rf));
                }
            }
            Event::Finished(t) => {
                let mut parts = vec![format!("{} unchanged", t.unchanged)];
                if t.dry_run {
                    parts.push(format!("{} would change", t.would_change));
                } else {
                    parts.push(format!("{} changed", t.changed));
                }
                parts.push(format!("{} failed", t.failed));
                parts.push(format!("{} skipped", t.skipped));
                if t.held > 0 {
                    parts.push(format!("{} held", t.held));
                }
                if t.unplanned > 0 {
                    parts.push(format!("{} of the changes unplanned", t.unplanned));
                }
                if t.reverted > 0 {
                    parts.push(format!("{} of the failures REVERTED changes", t.reverted));
                }
                let _ = write!(
                    s,
                    "summary: {}: {} in {:.3} s{}",
                    resources(t.resources),
                    parts.join(", "),
                    t.duration_ms / 1000.0,
                    if t.dry_run { " (dry-run: nothing was changed)" } else { "" }
                );
            }
        }
        Some(s)
    }
}

/// A message of several lines: each escaped, the ones after the first indented under it.
fn indented(message: &str, indent: &str) -> String {
    let lines: Vec<String> = message.lines().map(|l| clean(l).into_owned()).collect();
    lines.join(&format!("\n{indent}"))
}

impl<W: Write> Sink for TextSink<W> {
    fn emit(&mut self, event: Event<'_>) {
        if self.error.is_some() {
            return;
        }
        if let Some(text) = self.format(event)
            && let Err(e) = writeln!(self.out, "{text}").and_then(|_| self.out.flush())
        {
            self.error = Some(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> ResourceEvent {
        ResourceEvent {
            id: "file:/etc/motd".into(),
            status: Status::WouldChange,
            changes: vec![
                Change {
                    diff: Some("--- a\n+++ b\n@@ -1 +1 @@\n-old\n+new\n".into()),
                    ..Change::new("content", "x", "y")
                },
                Change::new("mode", "0600", "0644"),
            ],
            message: None,
            refresh: None,
            duration_ms: 1.5,
            cause: Some(Cause::Drift),
        }
    }

    #[test]
    fn a_totals_only_collector_keeps_no_event() {
        let mut sink = Collect::totals();
        let e = ResourceEvent {
            id: "file:/f".into(),
            status: Status::Unchanged,
            changes: vec![],
            message: None,
            refresh: None,
            duration_ms: 0.0,
            cause: None,
        };
        sink.emit(Event::Resource(&e));
        sink.emit(Event::Finished(&Summary { resources: 1, unchanged: 1, ..Summary::default() }));
        assert!(sink.resources.is_empty());
        assert_eq!(sink.summary.map(|s| s.unchanged), Some(1));
    }

    /// Diffs are kept while they fit in the budget; past it, none is (what `Report::clip` would
    /// leave), and the rest of every event stays.
    #[test]
    fn collected_diffs_stay_within_the_budget() {
        let event = |i: usize| {
            let mut c = Change::new("content", "a", "b");
            c.diff = Some("x".repeat(100 << 10));
            ResourceEvent {
                id: format!("file:/f{i}"),
                status: Status::Changed,
                changes: vec![c],
                message: None,
                refresh: None,
                duration_ms: 0.0,
                cause: None,
            }
        };
        let mut sink = Collect::default();
        let fit = KEPT_DIFFS / (100 << 10);
        for i in 0..fit {
            sink.emit(Event::Resource(&event(i)));
        }
        assert!(sink.resources.iter().all(|e| e.changes[0].diff.is_some()), "within the budget: kept");
        for i in fit..fit + 100 {
            sink.emit(Event::Resource(&event(i)));
        }
        assert_eq!(sink.resources.len(), fit + 100);
        assert!(sink.resources.iter().all(|e| e.changes[0].diff.is_none()), "past it: none");
        assert!(sink.resources.iter().all(|e| e.changes[0].to == "b"), "the changes themselves stay");
    }

    #[test]
    fn text_shows_changes_and_diffs_without_colour_by_default() {
        let mut out = Vec::new();
        TextSink::new(&mut out, false, false).emit(Event::Resource(&event()));
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "  would change file:/etc/motd\n      content: x -> y\n        --- a\n        +++ b\n        @@ -1 +1 @@\n        -old\n        +new\n      mode: 0600 -> 0644\n"
        );
    }

    #[test]
    fn names_and_messages_cannot_forge_lines_or_drive_the_terminal() {
        let hostile = ResourceEvent {
            id: "file:/x\n  changed     file:/etc/shadow\x1b[2J".into(),
            status: Status::Failed,
            message: Some("first line\nsecond \x1b[31mline".into()),
            changes: vec![Change::new("mode\r", "\x1b]0;title\x07", "0644")],
            ..ResourceEvent::default()
        };
        let mut out = Vec::new();
        TextSink::new(&mut out, false, false).emit(Event::Resource(&hostile));
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains('\x1b') && !text.contains('\r') && !text.contains('\x07'), "{text:?}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "  FAILED       file:/x\\n  changed     file:/etc/shadow\\u{1b}[2J: first line");
        assert_eq!(lines[1], "      second \\u{1b}[31mline", "a continuation is indented under its resource");
        assert_eq!(lines[2], "      mode\\r: \\u{1b}]0;title\\u{7} -> 0644");
    }

    #[test]
    fn colour_only_when_asked() {
        let mut out = Vec::new();
        TextSink::new(&mut out, true, false).emit(Event::Resource(&event()));
        assert!(String::from_utf8(out).unwrap().contains("\x1b[31m-old"));
    }

    #[test]
    fn json_lines_are_tagged() {
        let mut out = Vec::new();
        JsonSink::new(&mut out).emit(Event::Resource(&event()));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["type"], "resource");
        assert_eq!(v["status"], "would-change");
        assert_eq!(v["changes"][1]["to"], "0644");
    }

    #[test]
    fn held_is_counted_said_and_never_a_failure() {
        let mut sum = Summary::default();
        for s in [Status::Held, Status::Unchanged, Status::parse("held")] {
            sum.count(&s);
        }
        assert_eq!((sum.resources, sum.held, sum.unchanged, sum.failed), (3, 2, 1, 0));
        assert_eq!(sum.detailed_exit_code(), 0, "a held package is the system's choice, not a failure");
        assert_eq!(serde_json::to_string(&Status::Held).unwrap(), "\"held\"");
        let mut out = Vec::new();
        TextSink::new(&mut out, false, false).emit(Event::Finished(&sum));
        assert!(String::from_utf8(out).unwrap().contains("0 skipped, 2 held"));
        // A summary from an agent that did not count it yet still reads.
        let old: Summary = serde_json::from_str(
            r#"{"resources":1,"unchanged":1,"changed":0,"would_change":0,"failed":0,"skipped":0,"dry_run":false,"duration_ms":1.0}"#,
        )
        .unwrap();
        assert_eq!(old.held, 0);
    }

    #[test]
    fn unknown_statuses_are_kept() {
        let s: Status = serde_json::from_str("\"stale\"").unwrap();
        assert_eq!(s, Status::Other("stale".into()));
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"stale\"");
    }

    #[test]
    fn exit_codes() {
        let mut s = Summary::default();
        assert_eq!(s.detailed_exit_code(), 0);
        s.changed = 1;
        assert_eq!(s.detailed_exit_code(), 2);
        s.failed = 1;
        assert_eq!(s.detailed_exit_code(), 6);
        s.changed = 0;
        assert_eq!(s.detailed_exit_code(), 4);
    }
}
