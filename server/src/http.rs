//! The HTTPS API: a router over [`Fleet`], and an accept loop over rustls that hands each
//! request the fingerprint of the client certificate it came with.
//!
//! `router` is apart from sockets, so HTTP behaviour can be tested in-process. Every error
//! becomes a JSON body with a status; internal details are logged, never sent.
//!
//! Admission comes before work, at every stage, and every limit is checked before the work it
//! guards: connections (in all, and from one address) are capped and a connection past the cap
//! is closed at once; the TLS handshake, the request head and the request body each have a
//! deadline; requests in flight are capped (503 with a jittered `Retry-After` past it, as are
//! enrollments, which need no certificate); a request that needs a client certificate is
//! refused before a byte of its body is read; a body is refused by its declared length before
//! it is read, and cut off at its route's limit while it is read. Database calls and page
//! rendering run off the runtime's threads, so one slow request never holds up the rest; a
//! panic in a handler is logged and answered with a 500, and the server goes on.

use crate::fleet::{Fleet, Refused};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use converge_modules::hash::sha256_hex;
use converge_modules::text::clip;
use converge_modules::wire::{CatalogRequest, EnrollRequest, ErrorBody, Limits, Report};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

/// The header of catalog answers naming the CA bundle in force (the SHA-256 of its text).
pub const CA_BUNDLE_HEADER: &str = "x-converge-ca-bundle";

/// Enrollments handled at once (they need no certificate).
pub const ENROLLMENTS_AT_ONCE: usize = 4;
/// Requests in flight from one node at once (an agent makes one at a time).
pub const REQUESTS_PER_NODE: usize = 2;
/// Request bodies held in memory at once, in all (each counts its declared length, or its
/// route's limit when it declares none, from before it is read until its answer).
pub const BODY_BUDGET: usize = 256 << 20;

/// Who is on the other end: the client certificate's fingerprint, if the client presented
/// one, and its address.
#[derive(Clone, Debug)]
pub struct Peer {
    pub fingerprint: Option<String>,
    pub addr: Option<std::net::SocketAddr>,
}

/// The node a request's client certificate belongs to, once checked, and that certificate.
#[derive(Clone, Debug)]
struct Node(String, String);

/// What the router admits at once.
pub struct Admission {
    requests: Arc<Semaphore>,
    enrollments: Arc<Semaphore>,
    /// [`BODY_BUDGET`], in KiB.
    bodies: Arc<Semaphore>,
    /// Requests in flight per node.
    per_node: Mutex<HashMap<String, usize>>,
    /// How long a client has for its TLS handshake, and for each request's head (an idle
    /// connection is closed after as long).
    pub head: Duration,
    /// How long a client has to send a request's body, whole.
    pub body: Duration,
}

impl Admission {
    pub fn new(config: &crate::config::Config) -> Admission {
        Admission {
            requests: Arc::new(Semaphore::new(config.max_requests)),
            enrollments: Arc::new(Semaphore::new(ENROLLMENTS_AT_ONCE)),
            bodies: Arc::new(Semaphore::new(BODY_BUDGET >> 10)),
            per_node: Mutex::default(),
            head: Duration::from_secs(config.request_timeout),
            body: Duration::from_secs(2 * config.request_timeout),
        }
    }
}

/// A request of a node in flight; dropping it ends it.
struct NodeRequest(Arc<Fleet>, String);

impl Drop for NodeRequest {
    fn drop(&mut self) {
        let mut m = self.0.admission.per_node.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

impl Admission {
    /// A place among the requests being worked on, taken once a request's body is in: a
    /// body that trickles in holds its connection, never a place of work.
    fn work(&self, fleet: &Fleet) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.requests.clone().try_acquire_owned().map_err(|_| {
            fleet.metrics.requests_refused.inc();
            busy("the server is busy")
        })
    }
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
        tracing::error!("internal error: {}", clip(&format!("{e:#}"), 2000));
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal error; see the server's log".into(), None)
    }
}

/// A number of seconds between 5 and 29, different from call to call: clients told to come
/// back do not all come back at once.
fn jitter() -> u64 {
    fastrand::u64(5..30)
}

fn busy(what: &str) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("{what}; try again later"), Some(jitter()))
}

/// Runs `f` on the blocking pool (database calls, rendering): never on a runtime thread.
async fn blocking<T: Send + 'static>(
    fleet: &Arc<Fleet>,
    f: impl FnOnce(&Fleet) -> T + Send + 'static,
) -> Result<T, ApiError> {
    let fleet = fleet.clone();
    tokio::task::spawn_blocking(move || f(&fleet))
        .await
        .map_err(|e| ApiError::from(anyhow::anyhow!("a blocking task failed: {e}")))
}

/// The body of a request, within `limit` bytes and `deadline`: refused by its declared length
/// before it is read, cut off as soon as it passes the limit.
async fn read_body(
    fleet: &Fleet,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<(Bytes, tokio::sync::OwnedSemaphorePermit), ApiError> {
    let too_big =
        || ApiError(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is more than the {limit} bytes accepted"), None);
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_big());
    }
    let expected = declared.map_or(limit, |n| n as usize);
    let kib = u32::try_from(expected.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
    let Ok(budget) = fleet.admission.bodies.clone().try_acquire_many_owned(kib) else {
        fleet.metrics.requests_refused.inc();
        return Err(busy("too many request bodies at once"));
    };
    let limit = expected.min(limit);
    let deadline = fleet.admission.body;
    match tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError(
            StatusCode::REQUEST_TIMEOUT,
            format!("the body did not arrive within {} s", deadline.as_secs()),
            None,
        )),
        Ok(Err(e)) if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) => {
            Err(too_big())
        }
        Ok(Err(_)) => Err(ApiError(StatusCode::BAD_REQUEST, "the body was cut short".into(), None)),
        Ok(Ok(b)) => Ok((b, budget)),
    }
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError(StatusCode::BAD_REQUEST, format!("bad request body: {}", clip(&e.to_string(), 300)), None)
    })
}

/// Checks the client certificate before anything else of the request is read: its
/// fingerprint must be a live certificate this server issued.
async fn authenticate(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(fp) = peer.fingerprint.clone() else {
        fleet.metrics.auth_refused.inc();
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "a client certificate is required (converge bootstrap)".into(),
            None,
        )
        .into_response();
    };
    // In memory, as the store was a second ago at most; a certificate not seen yet is looked
    // up in the store, off the runtime's threads.
    let presented = fp.clone();
    // An expired certificate, within `renew_expired_within` of its end, may renew itself and
    // do nothing else.
    let renewing = req.uri().path() == "/v1/renew";
    let found = match fleet.node_of_known(&fp, renewing) {
        Some(found) => found,
        None => match blocking(&fleet, move |f| f.node_of(&fp, renewing)).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => return ApiError::from(e).into_response(),
            Err(e) => return e.into_response(),
        },
    };
    match found {
        Ok(node) => {
            let slot = {
                let mut m = fleet.admission.per_node.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let n = m.entry(node.clone()).or_insert(0);
                (*n < REQUESTS_PER_NODE).then(|| {
                    *n += 1;
                    NodeRequest(fleet.clone(), node.clone())
                })
            };
            let Some(_slot) = slot else {
                fleet.metrics.requests_refused.inc();
                return ApiError(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("{node} has {REQUESTS_PER_NODE} requests in flight already"),
                    Some(jitter()),
                )
                .into_response();
            };
            // A renewed certificate used for the first time: the one it replaced is revoked.
            if fleet.first_use(&presented) {
                let fp = presented.clone();
                let f = fleet.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = f.db.renewal_used(&fp, crate::db::now()) {
                        tracing::error!("recording a renewed certificate in use: {e:#}");
                    }
                });
            }
            tracing::Span::current().record("node", tracing::field::display(&node));
            req.extensions_mut().insert(Node(node, presented));
            next.run(req).await
        }
        Err(why) => {
            fleet.metrics.auth_refused.inc();
            ApiError(StatusCode::FORBIDDEN, why, None).into_response()
        }
    }
}

/// Requests being worked on are capped (a request with a body takes its place once the body
/// is in, in its handler); every answer carries the headers that keep browsers from framing or
/// sniffing it.
///
/// Each request runs in a `request` span (method, path, peer; the node once its certificate
/// is checked; a catalog's serial and commit) and ends with one line of the access log
/// (target `converge::access`: `CONVERGE_LOG=converge::access=off` silences it).
async fn admit(State(fleet): State<Arc<Fleet>>, req: Request, next: Next) -> Response {
    use tracing::Instrument;
    let peer = req.extensions().get::<Peer>().and_then(|p| p.addr).map(|a| a.to_string()).unwrap_or_default();
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        path = %clip(req.uri().path(), 200),
        peer = %peer,
        node = tracing::field::Empty,
        serial = tracing::field::Empty,
        commit = tracing::field::Empty,
    );
    let started = std::time::Instant::now();
    let response = async {
        if req.method() == axum::http::Method::POST {
            return next.run(req).await;
        }
        let permit = match fleet.admission.work(&fleet) {
            Ok(p) => p,
            Err(e) => return e.into_response(),
        };
        let response = next.run(req).await;
        drop(permit);
        response
    }
    .instrument(span.clone())
    .await;
    let status = response.status().as_u16();
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    span.in_scope(|| tracing::info!(target: "converge::access", status, ms = %format_args!("{ms:.1}"), "answered"));
    protect(response)
}

fn protect(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(HeaderName::from_static("x-content-type-options"), HeaderValue::from_static("nosniff"));
    h.insert(HeaderName::from_static("x-frame-options"), HeaderValue::from_static("DENY"));
    h.insert(HeaderName::from_static("referrer-policy"), HeaderValue::from_static("no-referrer"));
    h.entry(HeaderName::from_static("content-security-policy"))
        .or_insert(HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"));
    r
}

pub fn router(fleet: Arc<Fleet>) -> Router {
    let authenticated = Router::new()
        .route("/v1/catalog", post(catalog))
        .route("/v1/reports", post(report))
        .route("/v1/renew", post(renew))
        .route("/v1/ca-bundle", get(ca_bundle))
        .route("/blobs/sha256/{hex}", get(blob))
        .route_layer(middleware::from_fn_with_state(fleet.clone(), authenticate));
    Router::new()
        .route("/v1/ca", get(ca))
        .route("/v1/enroll", post(enroll))
        .merge(authenticated)
        .route("/healthz", get(healthz))
        .route("/bootstrap.sh", get(bootstrap_script))
        .route("/packages/{file}", get(package))
        .route("/", get(page_fleet))
        .route("/nodes/{name}", get(page_node))
        .route("/reports/{id}", get(page_report))
        .route("/source/{commit}/{*path}", get(page_source))
        .route("/metrics", get(metrics))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_: Box<dyn std::any::Any + Send>| {
            // The panic hook has logged it, with where.
            ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal error; see the server's log".into(), None)
                .into_response()
        }))
        .layer(middleware::from_fn_with_state(fleet.clone(), admit))
        .with_state(fleet)
}

/// The CA bundle, newest first: a new host keeps only the CA whose hash it pinned.
async fn ca(State(fleet): State<Arc<Fleet>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/x-pem-file")], fleet.ca().bundle())
}

/// The CA bundle, over mutual TLS: what a host that already trusts this server adopts.
async fn ca_bundle(State(fleet): State<Arc<Fleet>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/x-pem-file")], fleet.ca().bundle())
}

async fn enroll(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (body, _budget) = read_body(&fleet, &headers, body, Limits::ENROLL_BODY).await?;
    let _work = fleet.admission.work(&fleet)?;
    let Ok(_permit) = fleet.admission.enrollments.clone().try_acquire_owned() else {
        fleet.metrics.enroll_refused.inc();
        return Err(busy("too many enrollments at once"));
    };
    let req: EnrollRequest = json_body(&body)?;
    let from = peer.addr.map(|a| a.ip().to_string()).unwrap_or_default();
    let name = req.name.clone();
    match blocking(&fleet, move |f| f.enroll(&req, &from)).await?? {
        Ok(r @ converge_modules::wire::EnrollResponse::Pending { .. }) => {
            Ok((StatusCode::ACCEPTED, axum::Json(r)).into_response())
        }
        Ok(r) => Ok(axum::Json(r).into_response()),
        Err(why) => {
            fleet.metrics.enroll_refused.inc();
            tracing::warn!("enrollment of {} refused: {}", clip(&name, 80), clip(&why, 300));
            Err(ApiError(StatusCode::FORBIDDEN, why, None))
        }
    }
}

async fn catalog(
    State(fleet): State<Arc<Fleet>>,
    Extension(Node(node, _)): Extension<Node>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (body, _budget) = read_body(&fleet, &headers, body, Limits::CATALOG_BODY).await?;
    let _work = fleet.admission.work(&fleet)?;
    let req: CatalogRequest = json_body(&body)?;
    req.check().map_err(|why| ApiError(StatusCode::UNPROCESSABLE_ENTITY, why.to_string(), None))?;
    fleet.saw(&node, &req);
    // The catalog the agent holds, by the etag it sends back.
    let held = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).map(|v| v.trim_matches('"'));
    let stored = match fleet.catalog(&node, &req.formats, req.facts, held).await {
        Ok(s) => s,
        Err(Refused::Busy) => {
            fleet.metrics.catalog_busy.inc();
            return Err(busy("too many compiles at once"));
        }
        Err(Refused::TooOld(formats)) => {
            return Err(ApiError(
                StatusCode::UPGRADE_REQUIRED,
                format!(
                    "this server writes catalog format {} ({} for a catalog that holds secrets); the agent reads \
                     {formats:?}: upgrade converge",
                    converge_modules::catalog::FORMAT,
                    converge_modules::catalog::FORMAT_SEALED
                ),
                None,
            ));
        }
        Err(Refused::Compile(what)) => {
            fleet.metrics.catalog_error.inc();
            return Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("no catalog for {node}: {what}"), None));
        }
        Err(Refused::Internal(e)) => return Err(e.into()),
    };
    let span = tracing::Span::current();
    span.record("serial", stored.serial);
    span.record("commit", tracing::field::display(fleet.commit()));
    let etag = format!("\"{}\"", stored.etag);
    let etag_value = HeaderValue::from_str(&etag).expect("hex is a header value");
    // Every answer says which CA bundle is in force: a host holding another fetches it.
    let bundle =
        (HeaderName::from_static(CA_BUNDLE_HEADER), HeaderValue::from_str(&fleet.ca_bundle_hash()).expect("hex"));
    if headers.get(header::IF_NONE_MATCH).is_some_and(|v| v.as_bytes() == etag.as_bytes()) {
        fleet.metrics.catalog_304.inc();
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value), bundle]).into_response());
    }
    if stored.envelope.is_empty() {
        // Memory holds catalogs without their envelopes: one must never be sent as it is.
        return Err(anyhow::anyhow!("the catalog of {node} came without its envelope (a bug)").into());
    }
    fleet.metrics.catalog_200.inc();
    let content_type = (header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(([(header::ETAG, etag_value), content_type, bundle], stored.envelope.clone()).into_response())
}

/// A blob a catalog of the node's may name, by its SHA-256: to enrolled hosts only, over
/// mutual TLS; the agent checks it against the hash its signed catalog holds.
async fn blob(
    State(fleet): State<Arc<Fleet>>,
    Extension(Node(node, _)): Extension<Node>,
    axum::extract::Path(hex): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let _work = fleet.admission.work(&fleet)?;
    match fleet.blob(&node, &hex) {
        Some(bytes) => {
            let content_type = (header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            Ok(([content_type], bytes).into_response())
        }
        None => Err(ApiError(StatusCode::NOT_FOUND, "no such blob in the commits this server serves".into(), None)),
    }
}

async fn report(
    State(fleet): State<Arc<Fleet>>,
    Extension(Node(node, _)): Extension<Node>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let (body, _budget) = read_body(&fleet, &headers, body, Limits::REPORT_BODY).await?;
    let _work = fleet.admission.work(&fleet)?;
    let text = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError(StatusCode::BAD_REQUEST, "bad request body: not UTF-8".into(), None))?;
    let report: Report = json_body(text.as_bytes())?;
    if report.info.host.as_deref().is_some_and(|h| h != node) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("a report about {} from {node}", clip(report.info.host.as_deref().unwrap_or_default(), 80)),
            None,
        ));
    }
    let stored = blocking(&fleet, move |f| f.report(&node, &report, &text)).await??;
    stored.map_err(|why| ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("the report is refused: {why}"), None))?;
    Ok(StatusCode::NO_CONTENT)
}

async fn renew(
    State(fleet): State<Arc<Fleet>>,
    Extension(Node(node, presented)): Extension<Node>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (body, _budget) = read_body(&fleet, &headers, body, Limits::ENROLL_BODY).await?;
    let _work = fleet.admission.work(&fleet)?;
    let req: converge_modules::wire::RenewRequest = json_body(&body)?;
    match blocking(&fleet, move |f| f.renew(&node, &presented, &req)).await?? {
        Ok(r) => Ok(axum::Json(r).into_response()),
        Err(why) => Err(ApiError(StatusCode::FORBIDDEN, why, None)),
    }
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
    let script = crate::bootstrap::script(&format!("https://{host}"), &fleet.ca().hash(), &fleet.pin, &packages);
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
            fleet.metrics.auth_refused.inc();
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
        (HeaderName::from_static("content-security-policy"), "default-src 'none'; style-src 'unsafe-inline'"),
    ];
    match result {
        Ok(Some(page)) => (headers, page).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, headers, format!("<!doctype html><title>converge</title><p>{missing}</p>"))
            .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// A page for operators: access and rendering both on the blocking pool (they read the
/// database, and a page of ten thousand nodes takes a while).
async fn page(
    fleet: Arc<Fleet>,
    peer: Peer,
    headers: HeaderMap,
    uri: axum::http::Uri,
    render: impl FnOnce(&Fleet, &axum::http::Uri) -> Response + Send + 'static,
) -> Response {
    blocking(&fleet, move |f| operator(f, &peer, &headers, &uri).unwrap_or_else(|| render(f, &uri)))
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn page_fleet(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    page(fleet, peer, headers, uri, |f, uri| {
        let filter = uri.query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("status=")));
        let missing = format!("There is no such status: the page shows {}.", crate::page::FILTERS.join(", "));
        html(crate::page::fleet_page(f, filter), &missing)
    })
    .await
}

async fn page_node(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    page(fleet, peer, headers, uri, move |f, _| html(crate::page::node_page(f, &name), "There is no such node.")).await
}

async fn page_report(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    axum::extract::Path(id): axum::extract::Path<i64>,
) -> Response {
    page(fleet, peer, headers, uri, move |f, _| {
        html(crate::page::report_page(f, id), "There is no such report (reports are kept 50 a node).")
    })
    .await
}

/// A file of the repository at a commit, for the link from a failed resource to its line.
async fn page_source(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    axum::extract::Path((commit, path)): axum::extract::Path<(String, String)>,
) -> Response {
    page(fleet, peer, headers, uri, move |f, _| {
        html(crate::page::source_page(f, &commit, &path), "There is no such file of the repository at that commit.")
    })
    .await
}

async fn healthz(State(fleet): State<Arc<Fleet>>) -> Result<Response, ApiError> {
    let nodes = blocking(&fleet, |f| f.db.count_nodes()).await??;
    // The statements this server has sent its database: what an operator (or a benchmark)
    // divides by the polls answered.
    let body = serde_json::json!({
        "status": "ok", "commit": fleet.commit(), "nodes": nodes, "db_statements": fleet.db.statements.get(),
    });
    Ok(axum::Json(body).into_response())
}

/// `/metrics`, for operators as the fleet page is (it names every node): from loopback, or
/// with an operator token (`Authorization: Bearer`, as Prometheus sends it).
async fn metrics(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    page(fleet, peer, headers, uri, |f, _| metrics_text(f).unwrap_or_else(IntoResponse::into_response)).await
}

fn metrics_text(fleet: &Fleet) -> Result<Response, ApiError> {
    let nodes = fleet.db.nodes()?;
    let now = crate::db::now();
    let certificates =
        nodes.iter().filter(|n| !n.revoked).filter_map(|n| Some((n.name.clone(), n.cert_expires? - now))).collect();
    let page = fleet.metrics.render(crate::metrics::Snapshot {
        nodes: nodes.len(),
        certificates,
        server_certificate_left: fleet.server_cert.expires() - now,
        ca_left: fleet.ca().not_after - now,
        uptime: now - fleet.started,
        rollout: fleet.progress().zip(fleet.rollout()).map(|(p, r)| {
            let wave = if p.state == crate::rollout::State::Done { r.len() } else { p.wave + 1 };
            (wave as i64, matches!(p.state, crate::rollout::State::Halted(_)))
        }),
        rollout_hosts: rollout_hosts(fleet, now)?,
    });
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], page).into_response())
}

/// The hosts of each wave of the current rollout, by state, for `/metrics`.
fn rollout_hosts(fleet: &Fleet, now: i64) -> anyhow::Result<Vec<(String, &'static str, i64)>> {
    let (Some(p), Some(r)) = (fleet.progress(), fleet.rollout()) else { return Ok(Vec::new()) };
    if p.previous.is_none() {
        return Ok(Vec::new());
    }
    let tally = crate::rollout::tally(&r, &p.commit, &fleet.db.host_runs(now)?);
    Ok(tally
        .into_iter()
        .enumerate()
        .flat_map(|(w, t)| {
            let name = r.name(w).to_string();
            [
                (name.clone(), "ran", t.ran as i64),
                (name.clone(), "failed", t.failed.len() as i64),
                (name, "waiting", (t.hosts - t.ran) as i64),
            ]
        })
        .collect())
}

/// The cryptography of the server's TLS: ring, with AES-128-GCM and SHA-256 first, whatever
/// the client prefers (SHA-256 runs on the CPU's SHA extensions where SHA-384 does not, and it
/// was an eighth of the server's time per poll).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(provider)
}

/// The server's certificate, swapped in place when it is renewed: connections already open
/// keep the one they began with, new handshakes get the new one; no restart, no connection
/// dropped. The key stays the same (bootstrap.sh pins it); only the certificate is renewed.
#[derive(Debug)]
pub struct ServerCert {
    state: std::path::PathBuf,
    /// The certificate in use, and when it is valid (seconds since the epoch).
    current: std::sync::RwLock<(Arc<rustls::sign::CertifiedKey>, (i64, i64))>,
}

/// A certificate in use and when it is valid.
type InUse = (Arc<rustls::sign::CertifiedKey>, (i64, i64));

impl ServerCert {
    /// The certificate and key of the state directory `state`, followed by `chain` (see
    /// [`crate::ca::Ca::chain`]).
    pub fn load(state: &std::path::Path, chain: &[Vec<u8>]) -> anyhow::Result<ServerCert> {
        let current = std::sync::RwLock::new(Self::read(state, chain)?);
        Ok(ServerCert { state: state.to_path_buf(), current })
    }

    fn read(state: &std::path::Path, chain: &[Vec<u8>]) -> anyhow::Result<InUse> {
        use anyhow::Context;
        let cert = CertificateDer::from_pem_file(state.join("server.pem")).context("cannot read server.pem")?;
        let key = PrivateKeyDer::from_pem_file(state.join("server.key")).context("cannot read server.key")?;
        let validity = crate::ca::validity(&cert)?;
        let signer = provider().key_provider.load_private_key(key).context("the server key")?;
        let chain = std::iter::once(cert).chain(chain.iter().map(|d| CertificateDer::from(d.clone()))).collect();
        Ok((Arc::new(rustls::sign::CertifiedKey::new(chain, signer)), validity))
    }

    /// Takes the files in again (after a CA rollover began or ended), with `ca`'s chain.
    pub fn reload(&self, ca: &crate::ca::Ca) -> anyhow::Result<()> {
        let read = Self::read(&self.state, &ca.chain())?;
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = read;
        Ok(())
    }

    /// When the certificate in use expires (seconds since the epoch).
    pub fn expires(&self) -> i64 {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).1.1
    }

    /// Renews the certificate from two thirds of its life (a comparison of times until then:
    /// cheap to call every second). Returns the new expiry when it renewed.
    pub fn renew_if_due(&self, ca: &crate::ca::Ca, now: i64) -> anyhow::Result<Option<i64>> {
        let (from, until) = self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).1;
        if now < from + (until - from) * 2 / 3 {
            return Ok(None);
        }
        ca.renew_server(&self.state)?;
        let renewed = Self::read(&self.state, &ca.chain())?;
        let expires = renewed.1.1;
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = renewed;
        Ok(Some(expires))
    }
}

impl rustls::server::ResolvesServerCert for ServerCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).0.clone())
    }
}

/// The server's TLS configuration: TLS 1.3, its certificate (renewed in place), and client
/// certificates checked against its CA when presented (enrollment and the CA download come
/// without one).
pub fn tls_config(
    ca: &crate::ca::Ca,
    server_cert: Arc<ServerCert>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    renew_expired_within: i64,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use anyhow::Context;
    let provider = provider();
    let mut roots = rustls::RootCertStore::empty();
    for der in ca.trusted() {
        roots.add(CertificateDer::from(der)).context("a trusted CA certificate")?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .context("the client certificate verifier")?;
    let verifier = Arc::new(GraceVerifier { inner: verifier, grace: renew_expired_within });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(server_cert);
    // Session tickets (keys rotate every 6 h, tickets live 12 h): an agent polling every 30
    // minutes resumes its session instead of a full handshake. The ticket carries the client
    // certificate, so every request is still checked against the deny list. The ticketer
    // outlives a configuration rebuilt for a CA rollover, so sessions resume across it.
    config.ticketer = ticketer;
    config.send_tls13_tickets = 1;
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// Client certificates checked by webpki, except that one expired less than `grace` seconds
/// ago is checked as of its last second: the handshake still proves the host holds its key,
/// and [`authenticate`] lets such a certificate do one thing, renew itself. Everything else
/// (the chain to a trusted CA, the signatures, the key usage) is checked as ever.
#[derive(Debug)]
struct GraceVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    grace: i64,
}

impl rustls::server::danger::ClientCertVerifier for GraceVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let t = now.as_secs() as i64;
        let at = match crate::ca::validity(end_entity) {
            Ok((_, not_after)) if t > not_after && t - not_after < self.grace && not_after > 0 => {
                rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(not_after as u64 - 1))
            }
            _ => now,
        };
        self.inner.verify_client_cert(end_entity, intermediates, at)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Session tickets for the server's TLS, made once per process.
pub fn ticketer() -> anyhow::Result<Arc<dyn rustls::server::ProducesTickets>> {
    use anyhow::Context;
    rustls::crypto::ring::Ticketer::new().context("session tickets")
}

/// Raises this process's soft limit on open files to its hard limit (connections are files);
/// returns the soft limit in force.
pub fn raise_open_files() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return 1024 };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// The connections open, in all and per address, and each address's allowance of new ones.
struct Connections {
    max: usize,
    per_address: usize,
    /// New connections a second per address.
    rate: f64,
    open: Mutex<(usize, HashMap<IpAddr, Address>)>,
}

/// One address: its connections open, and a token bucket of new ones (refilled at the
/// configured rate, holding at most its connection cap).
struct Address {
    open: usize,
    tokens: f64,
    at: std::time::Instant,
}

/// One open connection; closing it (dropping this) frees its place.
struct Slot(Arc<Connections>, IpAddr);

impl Connections {
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let now = std::time::Instant::now();
        let burst = self.per_address as f64;
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if open.0 >= self.max {
            return None;
        }
        // Addresses with nothing open and a full bucket are forgotten: the map stays as small
        // as the set of clients connected, and a bucket refilled is the same as a new one.
        if open.1.len() > 4 * self.max {
            open.1.retain(|_, a| a.open > 0 || (a.tokens + now.duration_since(a.at).as_secs_f64() * self.rate) < burst);
        }
        let a = open.1.entry(ip).or_insert(Address { open: 0, tokens: burst, at: now });
        a.tokens = (a.tokens + now.duration_since(a.at).as_secs_f64() * self.rate).min(burst);
        a.at = now;
        if a.open >= self.per_address || a.tokens < 1.0 {
            return None;
        }
        a.tokens -= 1.0;
        a.open += 1;
        open.0 += 1;
        Some(Slot(self.clone(), ip))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.0.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        open.0 -= 1;
        if let Some(a) = open.1.get_mut(&self.1) {
            a.open -= 1;
        }
    }
}

/// Accepts connections forever: past the caps a connection is closed at once; then TLS, then
/// HTTP/1.1 (the handshake and each request head within the configured `request_timeout`),
/// with the client certificate's fingerprint attached to every request of the connection.
pub async fn serve(listener: tokio::net::TcpListener, fleet: Arc<Fleet>) -> anyhow::Result<()> {
    let app = router(fleet.clone());
    // A file descriptor per connection, and some for the database, the repository and logs.
    let files = raise_open_files();
    let max = fleet.config.max_connections.min(files.saturating_sub(128).max(16) as usize);
    if max < fleet.config.max_connections {
        tracing::warn!("at most {max} connections at once: the open-file limit is {files}");
    }
    let connections = Arc::new(Connections {
        max,
        per_address: fleet.config.max_connections_per_address,
        rate: fleet.config.new_connections_per_address as f64,
        open: Mutex::default(),
    });
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of files, most likely: wait for connections to close.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = connections.admit(addr.ip()) else {
            fleet.metrics.connections_refused.inc();
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        // The configuration in force now (a CA rollover rebuilds it; open connections keep theirs).
        let acceptor = tokio_rustls::TlsAcceptor::from(fleet.tls());
        let (app, fleet) = (app.clone(), fleet.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let head = fleet.admission.head;
            let Ok(Ok(tls)) = tokio::time::timeout(head, acceptor.accept(tcp)).await else { return };
            fleet.metrics.connections.inc();
            if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                fleet.metrics.resumed.inc();
            }
            let fingerprint = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| sha256_hex(c));
            let peer = Peer { fingerprint, addr: Some(addr) };
            let service = hyper_util::service::TowerToHyperService::new(app.layer(Extension(peer)));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(head)
                .max_buf_size(64 << 10)
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
