//! What operators see of the fleet, the same for the terminal (`converge-server report`,
//! `node list`) and the fleet page: nodes with their last run and whether they are late, and
//! reports with their per-resource changes.
//!
//! Pure: built from what the store holds and the time given. Sensitive values never reach a
//! view: the agent put hashes in their place before the report left the host.

use crate::db::{NodeRow, StoredReport};
use converge_modules::report::Status;
use converge_modules::text::clip;
use converge_modules::time::Timestamp;
use converge_modules::wire::Report;
use serde::{Deserialize, Serialize};

/// Resources shown of one report (the rest are counted): a page stays a page.
pub const SHOWN_RESOURCES: usize = 1000;
/// Failed resources a digest names.
const DIGEST_FAILED: usize = 10;

/// What the node page shows of a report, kept beside it: counts and the first failed ids.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Digest {
    pub dry_run: bool,
    pub changed: usize,
    pub would_change: usize,
    pub failed: usize,
    pub skipped: usize,
    pub unchanged: usize,
    /// Changes the run's plan did not predict (absent from digests before it was counted).
    #[serde(default)]
    pub unplanned: usize,
    /// Changes undone for want of their confirmation (also counted in `failed`).
    #[serde(default)]
    pub reverted: usize,
    pub started: String,
    pub failed_ids: Vec<String>,
}

impl Digest {
    pub fn of(r: &Report) -> Digest {
        let s = &r.summary;
        Digest {
            dry_run: s.dry_run,
            changed: s.changed,
            would_change: s.would_change,
            failed: s.failed,
            skipped: s.skipped,
            unchanged: s.unchanged,
            unplanned: s.unplanned,
            reverted: s.reverted,
            started: r.started_at.to_string(),
            failed_ids: r
                .resources
                .iter()
                .filter(|e| matches!(e.status, Status::Failed | Status::Reverted))
                .take(DIGEST_FAILED)
                .map(|e| clip(&e.id, 200).into_owned())
                .collect(),
        }
    }
}

/// "just now", "42 s ago", "5 min ago", "3 h ago", "2 d ago".
pub fn ago(seconds: i64) -> String {
    match seconds.max(0) {
        0..=4 => "just now".into(),
        s @ 5..=119 => format!("{s} s ago"),
        s @ 120..=7199 => format!("{} min ago", s / 60),
        s @ 7200..=172_799 => format!("{} h ago", s / 3600),
        s => format!("{} d ago", s / 86_400),
    }
}

fn when(t: i64) -> String {
    Timestamp(t).to_string()
}

fn short(commit: &str) -> String {
    commit.get(..12).unwrap_or(commit).to_string()
}

/// One node in the fleet.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub name: String,
    /// failed, changed, in sync, never ran, revoked, paused.
    pub status: &'static str,
    /// Why and until when its runs are paused (`converge pause`), as the host said.
    pub paused: Option<String>,
    /// Its last run is older than twice the run interval (or it never ran since).
    pub late: bool,
    pub last_run: Option<String>,
    pub last_run_ago: String,
    pub last_seen_ago: String,
    pub commit: String,
    pub serial: String,
    pub changed: i64,
    /// What a dry-run since its last real run said would change.
    pub would_change: Option<i64>,
    pub failed: i64,
    pub stale: bool,
    pub agent_version: String,
    pub certificate: String,
    /// Its certificate expires within [`CERT_WARNING`]: renewal (from two thirds of its life)
    /// has been failing for weeks, or the host has been away.
    pub renewal_due: bool,
    pub compile_error: Option<String>,
}

/// How long before a certificate expires the fleet page warns.
pub const CERT_WARNING: i64 = 30 * 86_400;

/// How long before its end the CA is a warning: [`CERT_WARNING`] before it stops outliving the
/// client certificates it issues (`cert_days` long), when the rollover becomes urgent.
pub fn ca_warning(cert_days: i64) -> i64 {
    cert_days * 86_400 + CERT_WARNING
}

pub fn node_view(n: &NodeRow, created: Option<i64>, now: i64, late_after: i64) -> NodeView {
    let last = n.last_report.map(|(at, ..)| at);
    let status = match (n.revoked, n.last_report) {
        (true, _) => "revoked",
        _ if n.paused.is_some() => "paused",
        (_, None) => "never ran",
        (_, Some((_, _, failed, _))) if failed > 0 => "failed",
        (_, Some((_, changed, _, _))) if changed > 0 => "changed",
        _ => "in sync",
    };
    let since = last.or(created).or(n.last_seen);
    NodeView {
        name: n.name.clone(),
        status,
        // A paused host asks but does not report: late only when it stops asking.
        late: !n.revoked
            && match &n.paused {
                Some(_) => n.last_seen.is_none_or(|t| now - t > late_after),
                None => since.is_some_and(|t| now - t > late_after),
            },
        paused: n.paused.clone(),
        last_run: last.map(when),
        last_run_ago: last.map_or("never".into(), |t| ago(now - t)),
        last_seen_ago: n.last_seen.map_or("never".into(), |t| ago(now - t)),
        commit: n.last_commit.as_deref().map_or("-".into(), short),
        serial: n.serial.map_or("-".into(), |s| s.to_string()),
        changed: n.last_report.map_or(0, |r| r.1),
        would_change: n.dry_run_pending,
        failed: n.last_report.map_or(0, |r| r.2),
        stale: n.last_report.is_some_and(|r| r.3),
        agent_version: n.agent_version.clone().unwrap_or_else(|| "-".into()),
        certificate: if n.revoked {
            "revoked".into()
        } else {
            n.cert_expires.map_or("-".into(), |t| format!("until {}", &when(t)[..10]))
        },
        renewal_due: !n.revoked && n.cert_expires.is_some_and(|t| t - now < CERT_WARNING),
        compile_error: n.compile_error.clone(),
    }
}

/// Totals for the top of the fleet page.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FleetSummary {
    pub nodes: usize,
    pub failed: usize,
    pub late: usize,
    pub changed: usize,
    pub in_sync: usize,
    pub never_ran: usize,
    pub renewal_due: usize,
    pub paused: usize,
}

pub fn summary(nodes: &[NodeView]) -> FleetSummary {
    let count = |s: &str| nodes.iter().filter(|n| n.status == s).count();
    FleetSummary {
        nodes: nodes.len(),
        failed: count("failed"),
        late: nodes.iter().filter(|n| n.late).count(),
        changed: count("changed"),
        in_sync: count("in sync"),
        never_ran: count("never ran"),
        renewal_due: nodes.iter().filter(|n| n.renewal_due).count(),
        paused: count("paused"),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ChangeView {
    pub attribute: String,
    pub from: String,
    pub to: String,
    pub diff: Option<String>,
    /// The diff's lines, each marked `add`, `del` or `ctx`.
    pub diff_lines: Vec<DiffLine>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiffLine {
    pub kind: &'static str,
    pub text: String,
}

fn diff_lines(diff: Option<&str>) -> Vec<DiffLine> {
    diff.unwrap_or("")
        .lines()
        .map(|l| {
            let kind = if l.starts_with('+') && !l.starts_with("+++") {
                "add"
            } else if l.starts_with('-') && !l.starts_with("---") {
                "del"
            } else {
                "ctx"
            };
            DiffLine { kind, text: l.to_string() }
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct ResourceView {
    pub status: String,
    /// For a change: "from the catalog" or "repaired drift".
    pub cause: Option<&'static str>,
    pub id: String,
    pub message: Option<String>,
    pub refresh: Option<String>,
    pub changes: Vec<ChangeView>,
    /// For a failed resource: where it is declared (`roles/web.yaml:13`) and the server's page
    /// of that line at the commit, from the node's catalog when it is of the report's commit.
    pub source: Option<(String, String)>,
}

/// One report.
#[derive(Debug, Clone, Serialize)]
pub struct ReportView {
    pub id: i64,
    pub node: String,
    pub received: String,
    pub received_ago: String,
    pub started: String,
    pub serial: String,
    pub commit: String,
    pub signed_by: String,
    pub status: &'static str,
    pub dry_run: bool,
    pub stale: bool,
    pub changed: usize,
    pub would_change: usize,
    pub failed: usize,
    pub skipped: usize,
    pub unchanged: usize,
    /// Changes the run's plan did not predict.
    pub unplanned: usize,
    /// Changes undone for want of their confirmation (among `failed`).
    pub reverted: usize,
    pub duration_ms: f64,
    pub warnings: Vec<String>,
    /// Every resource that did not end unchanged (the first [`SHOWN_RESOURCES`]).
    pub resources: Vec<ResourceView>,
    /// Those not shown.
    pub hidden: usize,
    /// False when this server cannot read the report (a newer agent's).
    pub readable: bool,
}

pub fn report_view(r: &StoredReport, now: i64) -> ReportView {
    let parsed: Option<Report> = (!r.body.is_empty()).then(|| serde_json::from_str(&r.body).ok()).flatten();
    let digest: Option<Digest> = r.digest.as_deref().and_then(|d| serde_json::from_str(d).ok());
    let mut v = ReportView {
        id: r.id,
        node: r.node.clone(),
        received: when(r.received),
        received_ago: ago(now - r.received),
        started: String::new(),
        serial: r.serial.map_or("-".into(), |s| s.to_string()),
        commit: r.commit.as_deref().map_or("-".into(), short),
        signed_by: "-".into(),
        status: match (r.failed > 0, r.changed > 0, r.dry_run) {
            (true, ..) => "failed",
            (_, true, true) => "would change",
            (_, true, false) => "changed",
            _ => "in sync",
        },
        dry_run: r.dry_run,
        stale: r.stale,
        changed: r.changed as usize,
        would_change: 0,
        failed: r.failed as usize,
        skipped: 0,
        unchanged: 0,
        unplanned: 0,
        reverted: 0,
        duration_ms: 0.0,
        warnings: vec![],
        resources: vec![],
        hidden: 0,
        readable: parsed.is_some() || (r.body.is_empty() && digest.is_some()),
    };
    if let Some(d) = digest.filter(|_| parsed.is_none()) {
        v.started = d.started;
        v.dry_run = d.dry_run;
        (v.changed, v.would_change, v.failed, v.skipped, v.unchanged, v.unplanned) =
            (d.changed, d.would_change, d.failed, d.skipped, d.unchanged, d.unplanned);
        v.reverted = d.reverted;
        v.resources = d
            .failed_ids
            .into_iter()
            .map(|id| ResourceView {
                status: "failed".into(),
                cause: None,
                id,
                message: None,
                refresh: None,
                changes: vec![],
                source: None,
            })
            .collect();
    }
    if let Some(p) = parsed {
        let s = &p.summary;
        v.started = p.started_at.to_string();
        v.signed_by = p.info.signed_by.clone().unwrap_or_else(|| "-".into());
        v.dry_run = s.dry_run;
        (v.changed, v.would_change, v.failed, v.skipped, v.unchanged, v.unplanned) =
            (s.changed, s.would_change, s.failed, s.skipped, s.unchanged, s.unplanned);
        v.reverted = s.reverted;
        v.duration_ms = s.duration_ms;
        v.warnings = p.info.warnings.clone();
        if p.stale {
            v.warnings.push("the catalog enforced was past its expiry (the server was unreachable)".into());
        }
        let mut shown = p.resources.iter().filter(|e| e.status != Status::Unchanged || e.refresh.is_some());
        v.resources = shown
            .by_ref()
            .take(SHOWN_RESOURCES)
            .map(|e| ResourceView {
                status: e.status.as_str().to_string(),
                cause: e.cause.map(converge_modules::report::Cause::as_str),
                id: e.id.clone(),
                message: e.message.clone(),
                refresh: e.refresh.clone(),
                changes: e
                    .changes
                    .iter()
                    .map(|c| ChangeView {
                        attribute: c.attribute.clone(),
                        from: c.from.clone(),
                        to: c.to.clone(),
                        diff: c.diff.clone(),
                        diff_lines: diff_lines(c.diff.as_deref()),
                    })
                    .collect(),
                source: None,
            })
            .collect();
        v.hidden = shown.count();
    }
    v
}

/// A report as text, for the terminal: a line for the run, then one per resource that changed,
/// failed or was skipped (with its message), and with `details` its changes and diffs.
pub fn report_text(v: &ReportView, details: bool) -> String {
    let mut out = String::new();
    if !v.readable {
        out.push_str(&format!("{}  {}  (a report this version cannot read)\n", v.received, v.node));
        return out;
    }
    let mut flags = String::new();
    if v.stale {
        flags.push_str(", stale catalog");
    }
    if v.dry_run {
        flags.push_str(&format!(", dry-run: {} would change", v.would_change));
    }
    if v.unplanned > 0 {
        flags.push_str(&format!(", {} of the changes UNPLANNED", v.unplanned));
    }
    if v.reverted > 0 {
        flags.push_str(&format!(", {} of the failures REVERTED changes", v.reverted));
    }
    out.push_str(&format!(
        "{}  {}  #{} run of {}, serial {}, commit {}: {} changed, {} failed, {} skipped, {} unchanged{flags}\n",
        v.received, v.node, v.id, v.started, v.serial, v.commit, v.changed, v.failed, v.skipped, v.unchanged
    ));
    // What a node reported is shown escaped: no report can forge a line or drive the terminal.
    let c = |s: &str| clip(s, 4096).into_owned();
    for w in &v.warnings {
        out.push_str(&format!("    warning: {}\n", c(w)));
    }
    for r in &v.resources {
        let message = r.message.as_deref().map(|m| format!(": {}", c(m))).unwrap_or_default();
        let refresh = r.refresh.as_deref().map(|m| format!(" ({})", c(m))).unwrap_or_default();
        let cause = r.cause.map(|w| format!(" [{w}]")).unwrap_or_default();
        out.push_str(&format!("    {:<12} {}{cause}{refresh}{message}\n", c(&r.status), c(&r.id)));
        if details {
            for ch in &r.changes {
                out.push_str(&format!("        {}: {} -> {}\n", c(&ch.attribute), c(&ch.from), c(&ch.to)));
                for l in ch.diff.iter().flat_map(|d| d.lines()) {
                    out.push_str(&format!("          {}\n", c(l)));
                }
            }
        }
    }
    if v.hidden > 0 {
        out.push_str(&format!("    ... and {} more resources not shown\n", v.hidden));
    }
    out
}

/// Escapes text for HTML and SVG.
fn escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '&' => "&amp;".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '"' => "&quot;".to_string(),
            '\'' => "&#39;".to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// How a commit spread over the fleet, as an inline SVG chart (no script, no external asset):
/// for each wave, the hosts running `commit` over time, from the first of them to `now`, out
/// of all the hosts (the top of the chart). Every text in it is escaped.
pub fn spread_svg(
    rollout: &crate::rollout::Rollout,
    commit: &str,
    hosts: &[crate::rollout::HostRun],
    now: i64,
) -> String {
    const W: f64 = 640.0;
    const H: f64 = 170.0;
    const LEFT: f64 = 40.0;
    const BOTTOM: f64 = 20.0;
    const COLORS: [&str; 6] = ["#cf222e", "#9a6700", "#1a7f37", "#0969da", "#8250df", "#57606a"];
    let total = hosts.len().max(1) as f64;
    let on: Vec<(usize, i64)> = hosts
        .iter()
        .filter(|h| h.commit.as_deref() == Some(commit))
        .map(|h| (rollout.wave_of(&h.name), h.since.or(h.at).unwrap_or(now)))
        .collect();
    let start = on.iter().map(|(_, t)| *t).min().unwrap_or(now).min(now - 60);
    let span = (now - start).max(60) as f64;
    let x = |t: i64| LEFT + (t - start) as f64 / span * (W - LEFT - 10.0);
    let y = |n: usize| H - BOTTOM - n as f64 / total * (H - BOTTOM - 10.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {}\" width=\"{W}\" role=\"img\" aria-label=\"how the commit spread\">",
        H + 16.0 * rollout.len().div_ceil(3) as f64
    );
    svg.push_str(&format!(
        "<line x1=\"{LEFT}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#dfe3e8\"/><line x1=\"{LEFT}\" y1=\"10\" x2=\"{LEFT}\" y2=\"{0}\" stroke=\"#dfe3e8\"/>",
        H - BOTTOM,
        W - 10.0
    ));
    svg.push_str(&format!(
        "<text x=\"4\" y=\"14\" font-size=\"10\">{}</text><text x=\"4\" y=\"{}\" font-size=\"10\">0</text>",
        hosts.len(),
        H - BOTTOM
    ));
    svg.push_str(&format!(
        "<text x=\"{LEFT}\" y=\"{}\" font-size=\"10\">{}</text><text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"end\">now</text>",
        H - 6.0,
        escape(&Timestamp(start).to_string()),
        W - 10.0,
        H - 6.0
    ));
    // Each wave's hosts on the commit, then all of them.
    let mut series: Vec<(String, &str, Vec<i64>)> = (0..rollout.len())
        .map(|w| {
            let mut times: Vec<i64> = on.iter().filter(|(wave, _)| *wave == w).map(|(_, t)| *t).collect();
            times.sort_unstable();
            (rollout.name(w).to_string(), COLORS[w % COLORS.len()], times)
        })
        .collect();
    let mut all: Vec<i64> = on.iter().map(|(_, t)| *t).collect();
    all.sort_unstable();
    series.push(("all hosts".into(), "#1d2125", all));
    for (i, (name, color, times)) in series.iter().enumerate() {
        let mut points = vec![format!("{:.1},{:.1}", x(start), y(0))];
        for (n, t) in times.iter().enumerate() {
            points.push(format!("{:.1},{:.1}", x(*t), y(n)));
            points.push(format!("{:.1},{:.1}", x(*t), y(n + 1)));
        }
        points.push(format!("{:.1},{:.1}", x(now), y(times.len())));
        let width = if i + 1 == series.len() { 2.5 } else { 1.5 };
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"{width}\" points=\"{}\" data-series=\"{}\" data-hosts=\"{}\"/>",
            points.join(" "),
            escape(name),
            times.len()
        ));
        let (lx, ly) = (LEFT + (i % 3) as f64 * 200.0, H + 12.0 + (i / 3) as f64 * 16.0);
        svg.push_str(&format!(
            "<rect x=\"{lx}\" y=\"{}\" width=\"10\" height=\"4\" fill=\"{color}\"/><text x=\"{}\" y=\"{ly}\" font-size=\"11\">{} ({})</text>",
            ly - 5.0,
            lx + 14.0,
            escape(&clip(name, 40)),
            times.len()
        ));
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(report: Option<(i64, i64, i64, bool)>) -> NodeRow {
        NodeRow {
            name: "web1".into(),
            last_seen: Some(1000),
            cert_expires: Some(90_000_000),
            revoked: false,
            serial: Some(7),
            compile_error: None,
            last_report: report,
            last_commit: Some("0123456789abcdef".into()),
            agent_version: Some("0.1.0".into()),
            dry_run_pending: None,
            paused: None,
        }
    }

    #[test]
    fn statuses_and_lateness() {
        let v = node_view(&row(Some((1000, 0, 2, false))), None, 1100, 3600);
        assert_eq!(
            (v.status, v.late, v.commit.as_str(), v.last_run_ago.as_str()),
            ("failed", false, "0123456789ab", "100 s ago")
        );
        let v = node_view(&row(Some((1000, 3, 0, false))), None, 1000 + 7201, 3600);
        assert_eq!((v.status, v.late, v.last_run_ago.as_str()), ("changed", true, "2 h ago"));
        let v = node_view(&row(None), Some(900), 1000, 3600);
        assert_eq!((v.status, v.late), ("never ran", false));
        let all = [node_view(&row(Some((1000, 0, 1, false))), None, 9000, 3600), v];
        let s = summary(&all);
        assert_eq!((s.nodes, s.failed, s.late, s.never_ran), (2, 1, 1, 1));
        // A certificate (expiring at 90,000,000) is due for attention in its last 30 days.
        let expires = 90_000_000;
        assert!(!node_view(&row(None), None, expires - CERT_WARNING - 1, 3600).renewal_due);
        assert!(node_view(&row(None), None, expires - CERT_WARNING + 1, 3600).renewal_due);
        let mut revoked = row(None);
        revoked.revoked = true;
        assert!(!node_view(&revoked, None, expires, 3600).renewal_due, "a revoked node is not due");
        // A paused host shows as paused, late only once it stops asking (it does not report).
        let mut paused = row(Some((1000, 0, 0, false)));
        paused.paused = Some("paused since ...: incident 42".into());
        let v = node_view(&paused, None, 1000 + 7201, 3600);
        assert_eq!((v.status, v.late), ("paused", true), "last seen at 1000 too");
        paused.last_seen = Some(1000 + 7000);
        let v = node_view(&paused, None, 1000 + 7201, 3600);
        assert_eq!((v.status, v.late, v.paused.as_deref()), ("paused", false, Some("paused since ...: incident 42")));
        assert_eq!(summary(&[v]).paused, 1);
    }

    #[test]
    fn the_spread_chart_counts_each_waves_hosts_and_escapes_every_text() {
        let n: &'static converge_modules::yaml::Node = Box::leak(Box::new(
            converge_modules::yaml::parse("waves:\n  - {name: \"<script>x</script>\", nodes: [a]}\n  - {name: rest}\n")
                .unwrap(),
        ));
        let r: crate::rollout::Rollout = converge_modules::yaml::from_node(n).unwrap();
        let host = |name: &str, commit: &str, since| crate::rollout::HostRun {
            name: name.into(),
            commit: Some(commit.into()),
            at: Some(since),
            failed: 0,
            unplanned: 0,
            since: Some(since),
        };
        let svg = spread_svg(&r, "new", &[host("a", "new", 100), host("b", "new", 200), host("c", "old", 50)], 300);
        assert!(!svg.contains("<script>") && svg.contains("&lt;script&gt;x&lt;/script&gt;"), "{svg}");
        assert!(
            svg.contains("data-hosts=\"1\"") && svg.contains("data-series=\"all hosts\" data-hosts=\"2\""),
            "{svg}"
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
    }

    #[test]
    fn a_report_in_text_with_diffs() {
        let body = r#"{"started_at":"2026-11-30T10:00:00Z","info":{"catalog":"s","serial":9,"commit":"abc","dry_run":false,"resources":2,"warnings":["w1"]},"resources":[{"id":"file:/etc/motd","status":"changed","changes":[{"attribute":"content","from":"a","to":"b","diff":"-a\n+b"}],"duration_ms":1.0},{"id":"file:/etc/x","status":"unchanged","duration_ms":1.0},{"id":"package:nope","status":"failed","message":"no package","duration_ms":1.0}],"summary":{"resources":3,"unchanged":1,"changed":1,"would_change":0,"failed":1,"skipped":0,"dry_run":false,"duration_ms":3.0}}"#;
        let r = StoredReport {
            id: 4,
            node: "web1".into(),
            received: 0,
            changed: 1,
            dry_run: false,
            failed: 1,
            stale: false,
            serial: Some(9),
            commit: Some("abc".into()),
            body: body.into(),
            digest: None,
        };
        let v = report_view(&r, 10);
        assert_eq!((v.status, v.resources.len(), v.readable), ("failed", 2, true));
        let text = report_text(&v, true);
        assert!(
            text.contains("web1  #4 run of 2026-11-30T10:00:00Z, serial 9, commit abc: 1 changed, 1 failed"),
            "{text}"
        );
        assert!(text.contains("    warning: w1\n"), "{text}");
        assert!(text.contains("    failed       package:nope: no package\n"), "{text}");
        assert!(text.contains("        content: a -> b\n          -a\n          +b\n"), "{text}");
        assert!(!text.contains("file:/etc/x"), "unchanged resources are left out: {text}");
        let parsed: Report = serde_json::from_str(body).unwrap();
        let unreadable = report_view(&StoredReport { body: "{".into(), ..r.clone() }, 10);
        assert!(report_text(&unreadable, false).contains("cannot read"));
        // Without its body, the digest tells the node page enough.
        let digest = serde_json::to_string(&Digest::of(&parsed)).unwrap();
        let light = report_view(&StoredReport { body: String::new(), digest: Some(digest), ..r.clone() }, 10);
        assert_eq!((light.failed, light.unchanged, light.readable), (1, 1, true));
        assert_eq!(light.resources.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["package:nope"]);
        // What a node reports cannot forge a line of the terminal's output.
        let hostile = body.replace("no package", "no\\n    failed       package:forged\\u001b[2J");
        let v = report_view(&StoredReport { body: hostile, ..r }, 10);
        let text = report_text(&v, true);
        assert!(
            !text.contains('\x1b') && !text.lines().any(|l| l.trim_start().starts_with("failed       package:forged")),
            "{text}"
        );
    }

    /// A change the agent's plan did not predict is said in the report, from its body or its
    /// digest alone.
    #[test]
    fn unplanned_changes_are_said() {
        let body = r#"{"started_at":"2026-12-02T10:00:00Z","info":{"catalog":"s","dry_run":false,"resources":1},"resources":[{"id":"file:/etc/app.conf","status":"unplanned","message":"not in this run's plan (its plan found it unchanged)","duration_ms":1.0}],"summary":{"resources":1,"unchanged":0,"changed":1,"would_change":0,"failed":0,"skipped":0,"unplanned":1,"dry_run":false,"duration_ms":1.0}}"#;
        let r = StoredReport {
            id: 5,
            node: "web1".into(),
            received: 0,
            changed: 1,
            dry_run: false,
            failed: 0,
            stale: false,
            serial: None,
            commit: None,
            body: body.into(),
            digest: None,
        };
        let v = report_view(&r, 10);
        let text = report_text(&v, true);
        assert!(text.contains("1 changed") && text.contains(", 1 of the changes UNPLANNED"), "{text}");
        assert!(text.contains("unplanned") && text.contains("file:/etc/app.conf"), "{text}");
        let parsed: Report = serde_json::from_str(body).unwrap();
        let digest = serde_json::to_string(&Digest::of(&parsed)).unwrap();
        let light = report_view(&StoredReport { body: String::new(), digest: Some(digest), ..r }, 10);
        assert_eq!(light.unplanned, 1);
    }
}
