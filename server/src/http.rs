//! The HTTPS API: a router over [`Fleet`], and an accept loop over rustls that hands each
//! request the fingerprint of the client certificate it came with.
//!
//! `router` is apart from sockets, so HTTP behaviour can be tested in-process. Every error
//! becomes a JSON body with a status; internal details are logged, never sent.

use crate::fleet::{Fleet, Refused};
use axum::Router;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use converge_modules::hash::sha256_hex;
use converge_modules::wire::{CatalogRequest, EnrollRequest, ErrorBody, Report};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The largest request body: facts and reports are small.
pub const MAX_BODY: usize = 4 << 20;

/// Who is on the other end: the client certificate's fingerprint, if the client presented
/// one, and its address.
#[derive(Clone, Debug)]
pub struct Peer {
    pub fingerprint: Option<String>,
    pub addr: Option<std::net::SocketAddr>,
}

/// An error as the client sees it.
pub struct ApiError(StatusCode, String, Option<u64>);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, axum::Json(ErrorBody { error: self.1 })).into_response();
        if let Some(s) = self.2 {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        tracing::error!("internal error: {e:#}");
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal error; see the server's log".into(), None)
    }
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad request body: {e}"), None))
}

/// The node the request's client certificate belongs to.
fn node(fleet: &Fleet, peer: &Peer) -> Result<String, ApiError> {
    let Some(fp) = &peer.fingerprint else {
        fleet.metrics.auth_refused.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "a client certificate is required (converge bootstrap)".into(),
            None,
        ));
    };
    fleet.node_of(fp)?.map_err(|why| {
        fleet.metrics.auth_refused.fetch_add(1, Ordering::Relaxed);
        ApiError(StatusCode::FORBIDDEN, why, None)
    })
}

pub fn router(fleet: Arc<Fleet>) -> Router {
    Router::new()
        .route("/v1/ca", get(ca))
        .route("/v1/enroll", post(enroll))
        .route("/v1/catalog", post(catalog))
        .route("/v1/reports", post(report))
        .route("/healthz", get(healthz))
        .route("/bootstrap.sh", get(bootstrap_script))
        .route("/packages/{file}", get(package))
        .route("/", get(page_fleet))
        .route("/nodes/{name}", get(page_node))
        .route("/reports/{id}", get(page_report))
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(fleet)
}

async fn ca(State(fleet): State<Arc<Fleet>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/x-pem-file")], fleet.ca.pem.clone())
}

async fn enroll(State(fleet): State<Arc<Fleet>>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let req: EnrollRequest = json_body(&body)?;
    match fleet.enroll(&req)? {
        Ok(r @ converge_modules::wire::EnrollResponse::Pending { .. }) => {
            Ok((StatusCode::ACCEPTED, axum::Json(r)).into_response())
        }
        Ok(r) => Ok(axum::Json(r).into_response()),
        Err(why) => {
            fleet.metrics.enroll_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("enrollment of {} refused: {why}", req.name);
            Err(ApiError(StatusCode::FORBIDDEN, why, None))
        }
    }
}

async fn catalog(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let node = node(&fleet, &peer)?;
    let req: CatalogRequest = json_body(&body)?;
    fleet.saw(&node, &req.agent_version, &req.facts);
    let stored = match fleet.catalog(&node, &req.formats, req.facts).await {
        Ok(s) => s,
        Err(Refused::Busy) => {
            fleet.metrics.catalog_busy.fetch_add(1, Ordering::Relaxed);
            let jitter = 5
                + (std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .subsec_nanos()
                    % 25) as u64;
            return Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many compiles at once; try again later".into(),
                Some(jitter),
            ));
        }
        Err(Refused::TooOld(formats)) => {
            return Err(ApiError(
                StatusCode::UPGRADE_REQUIRED,
                format!(
                    "this server writes catalog format {}; the agent reads {formats:?}: upgrade converge",
                    converge_modules::catalog::FORMAT
                ),
                None,
            ));
        }
        Err(Refused::Compile(what)) => {
            fleet.metrics.catalog_error.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("no catalog for {node}: {what}"), None));
        }
        Err(Refused::Internal(e)) => return Err(e.into()),
    };
    let etag = format!("\"{}\"", stored.etag);
    let etag_value = HeaderValue::from_str(&etag).expect("hex is a header value");
    if headers.get(header::IF_NONE_MATCH).is_some_and(|v| v.as_bytes() == etag.as_bytes()) {
        fleet.metrics.catalog_304.fetch_add(1, Ordering::Relaxed);
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response());
    }
    fleet.metrics.catalog_200.fetch_add(1, Ordering::Relaxed);
    let headers = [(header::ETAG, etag_value), (header::CONTENT_TYPE, HeaderValue::from_static("application/json"))];
    Ok((headers, stored.envelope.clone()).into_response())
}

async fn report(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    let node = node(&fleet, &peer)?;
    let report: Report = json_body(&body)?;
    if report.info.host.as_deref().is_some_and(|h| h != node) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("a report about {} from {node}", report.info.host.unwrap_or_default()),
            None,
        ));
    }
    fleet.report(&node, &report, std::str::from_utf8(&body).unwrap_or_default())?;
    Ok(StatusCode::NO_CONTENT)
}

/// `/bootstrap.sh`: the script a new machine runs, for the server as it reached it.
async fn bootstrap_script(State(fleet): State<Arc<Fleet>>, headers: HeaderMap) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| h.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']')))
        .map(str::to_string)
        .unwrap_or_else(|| fleet.config.listen.to_string());
    // Hashing the packages reads megabytes: off the runtime's threads.
    let dir = fleet.config.state.join("packages");
    let packages = tokio::task::spawn_blocking(move || crate::bootstrap::packages(&dir)).await.unwrap_or_default();
    let script = crate::bootstrap::script(&format!("https://{host}"), &fleet.ca.hash(), &fleet.pin, &packages);
    ([(header::CONTENT_TYPE, "text/x-shellscript; charset=utf-8")], script).into_response()
}

/// `/packages/FILE`: an agent package for bootstrap.sh (public: a new machine has no
/// certificate yet, and the script checks what it gets against the hash it carries).
async fn package(State(fleet): State<Arc<Fleet>>, axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    if !crate::bootstrap::safe_name(&file) {
        return ApiError(StatusCode::NOT_FOUND, "no such package".into(), None).into_response();
    }
    let path = fleet.config.state.join("packages").join(&file);
    match tokio::task::spawn_blocking(move || std::fs::read(path))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response(),
        Err(_) => ApiError(StatusCode::NOT_FOUND, format!("no package {file} on this server"), None).into_response(),
    }
}

/// The cookie an operator token is kept in, once given as `?token=`.
const OPERATOR_COOKIE: &str = "converge_operator";

/// Who may see the fleet page.
#[derive(Debug, PartialEq, Eq)]
enum Access {
    Allowed,
    /// A valid `?token=`: keep it in a cookie and come back without it.
    Remember(String),
    Refused,
}

/// From loopback always; from elsewhere with a valid operator token, sent as
/// `Authorization: Bearer`, in the cookie, or once as `?token=`. Pure.
fn page_access(loopback: bool, sent: Option<&str>, query: Option<&str>, valid: impl Fn(&str) -> bool) -> Access {
    if loopback || sent.is_some_and(&valid) {
        return Access::Allowed;
    }
    match query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token="))) {
        Some(t) if valid(t) => Access::Remember(t.to_string()),
        _ => Access::Refused,
    }
}

/// `None` when the fleet page may be shown, else the answer instead.
fn operator(fleet: &Fleet, peer: &Peer, headers: &HeaderMap, uri: &axum::http::Uri) -> Option<Response> {
    let bearer =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| c.split(';').find_map(|kv| kv.trim().strip_prefix(OPERATOR_COOKIE)?.strip_prefix('=')));
    let loopback = peer.addr.is_some_and(|a| a.ip().is_loopback());
    let valid = |token: &str| fleet.db.is_operator(&sha256_hex(token.as_bytes()), crate::db::now()).unwrap_or(false);
    match page_access(loopback, bearer.or(cookie), uri.query(), valid) {
        Access::Allowed => None,
        Access::Remember(token) => {
            let cookie =
                format!("{OPERATOR_COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=2592000");
            let back = HeaderValue::from_str(uri.path()).unwrap_or(HeaderValue::from_static("/"));
            let set = HeaderValue::from_str(&cookie).unwrap_or(HeaderValue::from_static(""));
            Some((StatusCode::SEE_OTHER, [(header::LOCATION, back), (header::SET_COOKIE, set)]).into_response())
        }
        Access::Refused => {
            fleet.metrics.auth_refused.fetch_add(1, Ordering::Relaxed);
            let body = "<!doctype html><title>converge</title><p>The fleet page answers on loopback, or with an \
                        operator token: make one with <code>converge-server token operator --config ...</code> and \
                        open this page with <code>?token=THE_TOKEN</code> once.</p>";
            Some((StatusCode::FORBIDDEN, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response())
        }
    }
}

fn html(result: anyhow::Result<Option<String>>, missing: &str) -> Response {
    let headers = [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (header::HeaderName::from_static("content-security-policy"), "default-src 'none'; style-src 'unsafe-inline'"),
    ];
    match result {
        Ok(Some(page)) => (headers, page).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, headers, format!("<!doctype html><title>converge</title><p>{missing}</p>"))
            .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn page_fleet(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    if let Some(r) = operator(&fleet, &peer, &headers, &uri) {
        return r;
    }
    let filter = uri.query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("status=")));
    let missing = format!("There is no such status: the page shows {}.", crate::page::FILTERS.join(", "));
    html(crate::page::fleet_page(&fleet, filter), &missing)
}

async fn page_node(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    if let Some(r) = operator(&fleet, &peer, &headers, &uri) {
        return r;
    }
    html(crate::page::node_page(&fleet, &name), "There is no such node.")
}

async fn page_report(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    axum::extract::Path(id): axum::extract::Path<i64>,
) -> Response {
    if let Some(r) = operator(&fleet, &peer, &headers, &uri) {
        return r;
    }
    html(crate::page::report_page(&fleet, id), "There is no such report (reports are kept 50 a node).")
}

async fn healthz(State(fleet): State<Arc<Fleet>>) -> Result<Response, ApiError> {
    let body = serde_json::json!({"status": "ok", "commit": fleet.commit(), "nodes": fleet.db.count_nodes()?});
    Ok(axum::Json(body).into_response())
}

async fn metrics(State(fleet): State<Arc<Fleet>>) -> Result<Response, ApiError> {
    let m = &fleet.metrics;
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, labels: &[(&str, u64)]| {
        out.push_str(&format!("# HELP converge_{name} {help}\n# TYPE converge_{name} counter\n"));
        for (label, v) in labels {
            out.push_str(&format!("converge_{name}{label} {v}\n"));
        }
    };
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    counter(
        "catalog_requests_total",
        "Catalog requests by outcome.",
        &[
            ("{outcome=\"sent\"}", l(&m.catalog_200)),
            ("{outcome=\"not_modified\"}", l(&m.catalog_304)),
            ("{outcome=\"busy\"}", l(&m.catalog_busy)),
            ("{outcome=\"no_catalog\"}", l(&m.catalog_error)),
        ],
    );
    counter("compiles_total", "Catalog compiles.", &[("", l(&m.compiles))]);
    counter("compile_failures_total", "Catalog compiles that failed.", &[("", l(&m.compile_failures))]);
    counter(
        "enrollments_total",
        "Enrollment requests by outcome.",
        &[
            ("{outcome=\"issued\"}", l(&m.enroll_issued)),
            ("{outcome=\"pending\"}", l(&m.enroll_pending)),
            ("{outcome=\"refused\"}", l(&m.enroll_refused)),
        ],
    );
    counter("reports_total", "Reports received.", &[("", l(&m.reports))]);
    counter("auth_refused_total", "Requests refused for their client certificate.", &[("", l(&m.auth_refused))]);
    counter("connections_total", "TLS connections accepted.", &[("", l(&m.connections))]);
    counter(
        "tls_resumed_total",
        "TLS connections that resumed a session (no certificate signatures checked again).",
        &[("", l(&m.resumed))],
    );
    let nodes = fleet.db.nodes()?;
    let now = crate::db::now();
    out.push_str("# HELP converge_nodes Enrolled nodes.\n# TYPE converge_nodes gauge\n");
    out.push_str(&format!("converge_nodes {}\n", nodes.len()));
    out.push_str("# HELP converge_certificate_expiry_seconds Seconds until a certificate expires.\n# TYPE converge_certificate_expiry_seconds gauge\n");
    for n in nodes.iter().filter(|n| !n.revoked) {
        if let Some(exp) = n.cert_expires {
            out.push_str(&format!("converge_certificate_expiry_seconds{{node=\"{}\"}} {}\n", n.name, exp - now));
        }
    }
    out.push_str(&format!(
        "# HELP converge_uptime_seconds Seconds since the server started.\n# TYPE converge_uptime_seconds gauge\nconverge_uptime_seconds {}\n",
        now - fleet.started
    ));
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

/// The server's TLS configuration: TLS 1.3, its certificate, and client certificates checked
/// against its CA when presented (enrollment and the CA download come without one).
pub fn tls_config(state: &std::path::Path, ca_der: &[u8]) -> anyhow::Result<rustls::ServerConfig> {
    use anyhow::Context;
    // AES-128-GCM with SHA-256 first, whatever the client prefers: SHA-256 runs on the CPU's
    // SHA extensions where SHA-384 does not, and it was an eighth of the server's time per poll.
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    let provider = Arc::new(provider);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec())).context("the CA certificate")?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .context("the client certificate verifier")?;
    let cert = CertificateDer::from_pem_file(state.join("server.pem")).context("cannot read server.pem")?;
    let key = PrivateKeyDer::from_pem_file(state.join("server.key")).context("cannot read server.key")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert, CertificateDer::from(ca_der.to_vec())], key)
        .context("the server certificate and key")?;
    // Session tickets (keys rotate every 6 h, tickets live 12 h): an agent polling every 30
    // minutes resumes its session instead of a full handshake. The ticket carries the client
    // certificate, so every request is still checked against the deny list.
    config.ticketer = rustls::crypto::ring::Ticketer::new().context("session tickets")?;
    config.send_tls13_tickets = 1;
    config.ignore_client_order = true;
    Ok(config)
}

/// Accepts connections forever: TLS first (with a deadline), then HTTP/1.1 with the client
/// certificate's fingerprint attached to every request of the connection.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: rustls::ServerConfig,
    fleet: Arc<Fleet>,
) -> anyhow::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let app = router(fleet.clone());
    let connections = Arc::new(tokio::sync::Semaphore::new(20_000));
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().acquire_owned().await else { continue };
        let _ = tcp.set_nodelay(true);
        let (acceptor, app, fleet) = (acceptor.clone(), app.clone(), fleet.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await else { return };
            fleet.metrics.connections.fetch_add(1, Ordering::Relaxed);
            if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                fleet.metrics.resumed.fetch_add(1, Ordering::Relaxed);
            }
            let fingerprint = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| sha256_hex(c));
            let peer = Peer { fingerprint, addr: Some(addr) };
            let service = hyper_util::service::TowerToHyperService::new(app.layer(Extension(peer)));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            let _ = conn.await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fleet_page_is_for_loopback_and_operators() {
        let valid = |t: &str| t == "cvo_good";
        assert_eq!(page_access(true, None, None, valid), Access::Allowed);
        assert_eq!(page_access(false, None, None, valid), Access::Refused);
        assert_eq!(page_access(false, Some("cvo_good"), None, valid), Access::Allowed);
        assert_eq!(page_access(false, Some("cvo_bad"), None, valid), Access::Refused);
        assert_eq!(page_access(false, None, Some("a=1&token=cvo_good"), valid), Access::Remember("cvo_good".into()));
        assert_eq!(page_access(false, None, Some("token=cvo_bad"), valid), Access::Refused);
    }
}
