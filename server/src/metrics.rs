//! `/metrics`: the server's counters and gauges, in the OpenMetrics text format of the
//! `prometheus-client` crate (which escapes every label value: a node's name cannot forge a
//! sample). Counters are incremented where things happen; the gauges that come from the store
//! and the certificates are set when the page is asked for.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Mutex;

type Labels = Vec<(String, String)>;

/// Every metric of the server, registered once.
pub struct Metrics {
    registry: Registry,
    pub catalog_200: Counter,
    pub catalog_304: Counter,
    pub catalog_busy: Counter,
    pub catalog_error: Counter,
    pub compiles: Counter,
    pub compile_failures: Counter,
    pub enroll_issued: Counter,
    pub enroll_pending: Counter,
    pub enroll_refused: Counter,
    pub reports: Counter,
    pub auth_refused: Counter,
    pub connections: Counter,
    pub resumed: Counter,
    pub connections_refused: Counter,
    pub renewals: Counter,
    pub requests_refused: Counter,
    nodes: Gauge,
    certificate_expiry: Family<Labels, Gauge>,
    server_certificate_expiry: Gauge,
    ca_expiry: Gauge,
    uptime: Gauge,
    rollout_wave: Gauge,
    rollout_halted: Gauge,
    rollout_hosts: Family<Labels, Gauge>,
    /// One page at a time: the gauges are set, then read.
    rendering: Mutex<()>,
}

/// What the gauges say at the time the page is asked for.
pub struct Snapshot {
    pub nodes: usize,
    /// Each live certificate's node and seconds left (negative: expired).
    pub certificates: Vec<(String, i64)>,
    pub server_certificate_left: i64,
    pub ca_left: i64,
    pub uptime: i64,
    /// The rollout of the current commit: the last wave open (numbered from 1; every wave
    /// when done) and whether it is halted; `None` without waves.
    pub rollout: Option<(i64, bool)>,
    /// Per wave of that rollout: hosts that ran the commit, failed it, and wait for it.
    pub rollout_hosts: Vec<(String, &'static str, i64)>,
}

fn label(key: &str, value: &str) -> Labels {
    vec![(key.to_string(), value.to_string())]
}

/// A counter registered under `name`, or under `name` with `key` = each of `values`.
fn counters(registry: &mut Registry, name: &str, help: &str, key: &str, values: &[&str]) -> Vec<Counter> {
    if values.is_empty() {
        let c = Counter::default();
        registry.register(name, help, c.clone());
        return vec![c];
    }
    let family = Family::<Labels, Counter>::default();
    registry.register(name, help, family.clone());
    values.iter().map(|v| family.get_or_create(&label(key, v)).clone()).collect()
}

fn gauge(registry: &mut Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::default();
    registry.register(name, help, g.clone());
    g
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut r = Registry::with_prefix("converge");
        let mut one = |name: &str, help: &str| counters(&mut r, name, help, "", &[]).remove(0);
        let (compiles, compile_failures) =
            (one("compiles", "Catalog compiles."), one("compile_failures", "Catalog compiles that failed."));
        let (reports, renewals) =
            (one("reports", "Reports received."), one("renewals", "Client certificates renewed."));
        let auth_refused = one("auth_refused", "Requests refused for their client certificate.");
        let connections = one("connections", "TLS connections accepted.");
        let resumed =
            one("tls_resumed", "TLS connections that resumed a session (no certificate signatures checked again).");
        let [catalog_200, catalog_304, catalog_busy, catalog_error]: [Counter; 4] = counters(
            &mut r,
            "catalog_requests",
            "Catalog requests by outcome.",
            "outcome",
            &["sent", "not_modified", "busy", "no_catalog"],
        )
        .try_into()
        .expect("four outcomes");
        let [enroll_issued, enroll_pending, enroll_refused]: [Counter; 3] = counters(
            &mut r,
            "enrollments",
            "Enrollment requests by outcome.",
            "outcome",
            &["issued", "pending", "refused"],
        )
        .try_into()
        .expect("three outcomes");
        let [connections_refused, requests_refused]: [Counter; 2] = counters(
            &mut r,
            "refused",
            "Connections closed at once and requests answered 503, for the caps on them.",
            "what",
            &["connection", "request"],
        )
        .try_into()
        .expect("two kinds");
        let nodes = gauge(&mut r, "nodes", "Enrolled nodes.");
        let certificate_expiry = Family::<Labels, Gauge>::default();
        r.register("certificate_expiry_seconds", "Seconds until a certificate expires.", certificate_expiry.clone());
        let server_certificate_expiry =
            gauge(&mut r, "server_certificate_expiry_seconds", "Seconds until the server's certificate expires.");
        let ca_expiry = gauge(
            &mut r,
            "ca_expiry_seconds",
            "Seconds until the CA expires (roll it over with ca rotate while it still outlives the client certificates it issues).",
        );
        let uptime = gauge(&mut r, "uptime_seconds", "Seconds since the server started.");
        let rollout_wave = gauge(
            &mut r,
            "rollout_wave",
            "The last wave of the current commit's rollout that has it (from 1; 0 without waves).",
        );
        let rollout_hosts = Family::<Labels, Gauge>::default();
        r.register(
            "rollout_hosts",
            "Hosts of each wave of the current commit's rollout: ran it, failed it, waiting for it.",
            rollout_hosts.clone(),
        );
        let rollout_halted = gauge(
            &mut r,
            "rollout_halted",
            "1 while the current commit's rollout is halted (converge-server rollout status).",
        );
        Metrics {
            registry: r,
            catalog_200,
            catalog_304,
            catalog_busy,
            catalog_error,
            compiles,
            compile_failures,
            enroll_issued,
            enroll_pending,
            enroll_refused,
            reports,
            auth_refused,
            connections,
            resumed,
            connections_refused,
            renewals,
            requests_refused,
            nodes,
            certificate_expiry,
            server_certificate_expiry,
            ca_expiry,
            uptime,
            rollout_wave,
            rollout_halted,
            rollout_hosts,
            rendering: Mutex::new(()),
        }
    }
}

impl Metrics {
    /// The metrics, with the state database's statement count among them.
    pub fn with_db(statements: Counter) -> Metrics {
        let mut m = Metrics::default();
        m.registry.register(
            "db_statements",
            "Statements sent to the state database, transactions' begin and commit included (each a round trip on PostgreSQL).",
            statements,
        );
        m
    }

    /// The page, with the gauges as `now` has them.
    pub fn render(&self, now: Snapshot) -> String {
        let _one = self.rendering.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.nodes.set(now.nodes as i64);
        self.certificate_expiry.clear();
        for (node, left) in &now.certificates {
            self.certificate_expiry.get_or_create(&label("node", node)).set(*left);
        }
        self.server_certificate_expiry.set(now.server_certificate_left);
        self.ca_expiry.set(now.ca_left);
        self.uptime.set(now.uptime);
        let (wave, halted) = now.rollout.unwrap_or((0, false));
        self.rollout_wave.set(wave);
        self.rollout_halted.set(i64::from(halted));
        self.rollout_hosts.clear();
        for (wave, state, n) in &now.rollout_hosts {
            let labels = vec![("wave".to_string(), wave.clone()), ("state".to_string(), (*state).to_string())];
            self.rollout_hosts.get_or_create(&labels).set(*n);
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The page's content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_named_counted_and_escaped() {
        let m = Metrics::default();
        m.catalog_304.inc();
        m.catalog_304.inc();
        m.renewals.inc();
        let page = m.render(Snapshot {
            nodes: 2,
            certificates: vec![("web01".into(), 3600), ("evil\"} 1\nconverge_nodes 99\n#".into(), -5)],
            server_certificate_left: 100,
            ca_left: 200,
            uptime: 7,
            rollout: Some((2, true)),
            rollout_hosts: vec![("canary".into(), "failed", 1)],
        });
        for line in [
            "converge_catalog_requests_total{outcome=\"not_modified\"} 2",
            "converge_catalog_requests_total{outcome=\"sent\"} 0",
            "converge_renewals_total 1",
            "converge_nodes 2",
            "converge_certificate_expiry_seconds{node=\"web01\"} 3600",
            "converge_server_certificate_expiry_seconds 100",
            "converge_ca_expiry_seconds 200",
            "converge_uptime_seconds 7",
            "converge_rollout_wave 2",
            "converge_rollout_halted 1",
            "converge_rollout_hosts{wave=\"canary\",state=\"failed\"} 1",
        ] {
            assert!(page.lines().any(|l| l == line), "{line} in\n{page}");
        }
        // A hostile node name stays inside its label value: one sample line, no forged one.
        assert_eq!(page.lines().filter(|l| l.starts_with("converge_nodes ")).count(), 1, "{page}");
        assert!(page.contains("node=\"evil\\\"} 1\\nconverge_nodes 99\\n#\"} -5"), "{page}");
        assert!(page.ends_with("# EOF\n"));
    }
}
