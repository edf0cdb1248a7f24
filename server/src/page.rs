//! The fleet page: server-rendered HTML with its styles inline, no script and no external asset.
//! `/` lists every node (failing and late ones stand out; the summary's counts link to just
//! those nodes, `/?status=failed`), `/nodes/NAME` shows a node's facts and recent runs,
//! `/reports/ID` a run's per-resource changes and diffs.
//!
//! Templates are minijinja, compiled once, with HTML escaping on: nothing a node reports can
//! become markup. Who may see the page is decided in [`crate::http`].

use crate::fleet::Fleet;
use crate::view::{self, NodeView, ReportView};
use anyhow::Result;
use minijinja::{Environment, Value, context};
use std::sync::OnceLock;

fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut e = Environment::new();
        for (name, text) in [
            ("base.html", include_str!("page/base.html")),
            ("fleet.html", include_str!("page/fleet.html")),
            ("node.html", include_str!("page/node.html")),
            ("report.html", include_str!("page/report.html")),
            ("source.html", include_str!("page/source.html")),
        ] {
            e.add_template(name, text).unwrap_or_else(|err| panic!("the built-in template {name}: {err}"));
        }
        e
    })
}

/// A view as a template value.
fn val<T: serde::Serialize>(x: T) -> Value {
    Value::from(minijinja::value::Serde(x))
}

fn render(name: &str, ctx: Value) -> Result<String> {
    Ok(env().get_template(name)?.render(ctx)?)
}

fn common(fleet: &Fleet) -> (String, String, i64) {
    let now = crate::db::now();
    let commit = fleet.commit();
    (commit.get(..12).unwrap_or(&commit).to_string(), converge_modules::time::Timestamp(now).to_string(), now)
}

fn human(seconds: i64) -> String {
    match seconds {
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// What `/?status=` may ask for: a node status (spaces as `-`), or `late`.
pub const FILTERS: &[&str] = &["failed", "late", "changed", "in-sync", "never-ran", "revoked", "renewal-due", "paused"];

/// Whether `n` is shown under `filter`. Pure.
fn shown(n: &NodeView, filter: Option<&str>) -> bool {
    match filter {
        None => true,
        Some("late") => n.late,
        Some("renewal-due") => n.renewal_due,
        Some(s) => n.status.replace(' ', "-") == s,
    }
}

/// `/`: every node, or with `filter` (one of [`FILTERS`]) only those; `None` for another filter.
/// The summary always counts the whole fleet.
pub fn fleet_page(fleet: &Fleet, filter: Option<&str>) -> Result<Option<String>> {
    if filter.is_some_and(|f| !FILTERS.contains(&f)) {
        return Ok(None);
    }
    let (commit, now_text, now) = common(fleet);
    let late_after = 2 * fleet.config.run_interval;
    let nodes: Vec<NodeView> = fleet.db.nodes()?.iter().map(|n| view::node_view(n, None, now, late_after)).collect();
    let summary = val(view::summary(&nodes));
    let total = nodes.len();
    let nodes: Vec<NodeView> = nodes.into_iter().filter(|n| shown(n, filter)).collect();
    let pending: Vec<Value> = fleet
        .db
        .pending_list(now)?
        .into_iter()
        .map(|p| {
            context! {
                node => p.node,
                requested => converge_modules::time::Timestamp(p.requested).to_string(),
                state => if p.approved { "approved, waiting for the agent" } else { "waiting for approval" },
                key => p.fingerprint,
                address => p.address,
            }
        })
        .collect();
    // The server's own certificate renews itself from two thirds of its life: within 30 days
    // of its end, renewal has been failing for months (the log says why).
    let server_expires = fleet.server_cert.expires();
    let server_cert_warning = (server_expires - now < view::CERT_WARNING)
        .then(|| converge_modules::time::Timestamp(server_expires).to_string());
    // The CA: the operator rolls it over (`ca rotate`) while it still outlives the client
    // certificates it issues; from then on they are cut short to end with it.
    let ca_end = fleet.ca().not_after;
    let ca_warning = (ca_end - now < view::ca_warning(fleet.config.cert_days))
        .then(|| converge_modules::time::Timestamp(ca_end).to_string());
    let rollout = rollout_view(fleet, now)?;
    render(
        "fleet.html",
        context! {
            commit, now => now_text, summary, total, filter => filter.map(|f| f.replace('-', " ")),
            nodes => val(&nodes), pending, late_after => human(late_after), server_cert_warning, ca_warning,
            rollout,
        },
    )
    .map(Some)
}

/// The rollout of the current commit, wave by wave, for the fleet page; `None` without one.
fn rollout_view(fleet: &Fleet, now: i64) -> Result<Option<Value>> {
    use crate::rollout::State;
    let (Some(p), Some(rollout)) = (fleet.progress(), fleet.rollout()) else { return Ok(None) };
    if p.previous.is_none() {
        return Ok(None);
    }
    let hosts = fleet.db.host_runs(now)?;
    // Escaped where it is made: every text in it is.
    let chart = Value::from_safe_string(view::spread_svg(&rollout, &p.commit, &hosts, now));
    let waves: Vec<Value> = crate::rollout::tally(&rollout, &p.commit, &hosts)
        .into_iter()
        .enumerate()
        .map(|(w, t)| {
            context! {
                number => w + 1, name => rollout.name(w).to_string(), hosts => t.hosts, ran => t.ran,
                failed => t.failed.len(), failed_names => t.failed.into_iter().take(5).collect::<Vec<String>>(),
                waiting => t.hosts - t.ran, open => p.has(w),
            }
        })
        .collect();
    let short = |c: &str| c[..c.len().min(12)].to_string();
    Ok(Some(context! {
        commit => short(&p.commit), previous => p.previous.as_deref().map(short), state => p.state.word(),
        reason => match &p.state { State::Halted(why) => Some(why.clone()), _ => None },
        since => converge_modules::time::Timestamp(p.since).to_string(), waves, chart,
    }))
}

/// `/nodes/NAME`; `None` when there is no such node.
pub fn node_page(fleet: &Fleet, name: &str) -> Result<Option<String>> {
    let (commit, now_text, now) = common(fleet);
    let Some(info) = fleet.db.node(name)? else { return Ok(None) };
    let node = view::node_view(&info.row, Some(info.created), now, 2 * fleet.config.run_interval);
    let filter = crate::db::ReportFilter { node: Some(name.to_string()), limit: 20, ..Default::default() };
    let reports: Vec<ReportView> = fleet.db.reports(&filter)?.iter().map(|r| view::report_view(r, now)).collect();
    let facts: Option<serde_json::Map<String, serde_json::Value>> =
        info.facts.as_deref().and_then(|f| serde_json::from_str(f).ok());
    let facts: Vec<(String, String)> = facts
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, if let serde_json::Value::String(s) = v { s } else { v.to_string() }))
        .collect();
    let enrolled = converge_modules::time::Timestamp(info.created).to_string();
    let facts: std::collections::BTreeMap<String, String> = facts.into_iter().collect();
    let (node, reports) = (val(node), val(reports));
    render("node.html", context! { commit, now => now_text, node, reports, facts, enrolled }).map(Some)
}

/// `/reports/ID`; `None` when there is no such report.
pub fn report_page(fleet: &Fleet, id: i64) -> Result<Option<String>> {
    let (commit, now_text, now) = common(fleet);
    let Some(r) = fleet.db.report(id)? else { return Ok(None) };
    let mut report = view::report_view(&r, now);
    link_sources(fleet, &r, &mut report);
    let report = val(report);
    render("report.html", context! { commit, now => now_text, report }).map(Some)
}

/// Links each failed or reverted resource of a report to the line that declares it, from the
/// node's stored catalog when it is of the report's commit (opened with the server's key list:
/// the database is input too). Without one (an older catalog, one without provenance), no link.
fn link_sources(fleet: &Fleet, r: &crate::db::StoredReport, v: &mut ReportView) {
    use converge_modules::trust::{CATALOG_TYPE, Envelope, KeyRole, open};
    let failed = |x: &view::ResourceView| matches!(x.status.as_str(), "failed" | "reverted");
    let Some(commit) = r.commit.as_deref().filter(|_| v.resources.iter().any(failed)) else { return };
    let Ok(Some(stored)) = fleet.db.stored(&r.node) else { return };
    let Ok(envelope) = serde_json::from_slice::<Envelope>(&stored.envelope) else { return };
    let Ok((payload, _)) = open(&envelope, CATALOG_TYPE, &fleet.signing().list, KeyRole::Catalog) else { return };
    let Ok(catalog) = serde_json::from_slice::<converge_modules::catalog::Catalog>(&payload) else { return };
    if catalog.source.as_ref().map(|s| s.commit.as_str()) != Some(commit) {
        return;
    }
    for x in v.resources.iter_mut().filter(|x| failed(x)) {
        if let Some(o) = catalog.provenance.get(&x.id) {
            x.source = Some((format!("{}:{}", o.file, o.line), format!("/source/{commit}/{}#L{}", o.file, o.line)));
        }
    }
}

/// One file of the repository at a commit, its lines numbered and each one a link target
/// (`#L13`): where a failed resource's link goes.
pub fn source_page(fleet: &Fleet, commit: &str, path: &str) -> Result<Option<String>> {
    let (head, now_text, _) = common(fleet);
    let Some(text) = crate::repo::file_at(&fleet.config.repo, commit, path)? else { return Ok(None) };
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    render("source.html", context! { commit => head, now => now_text, at => commit, path, lines }).map(Some)
}
