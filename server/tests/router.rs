//! The HTTP API in-process (the router apart from sockets): who may see what, the headers
//! every answer carries, and a request that needs a certificate refused before its body.

use axum::body::Body;
use axum::extract::Extension;
use axum::http::{Request, StatusCode};
use converge_server::fleet::Fleet;
use converge_server::http::{Peer, router};
use std::sync::Arc;
use tower::ServiceExt;

mod common;
use common::fleet;

async fn get(fleet: &Arc<Fleet>, from: &str, path: &str) -> (StatusCode, axum::http::HeaderMap) {
    let peer = Peer { fingerprint: None, addr: Some(from.parse().unwrap()) };
    let app = router(fleet.clone()).layer(Extension(peer));
    let r = app.oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
    (r.status(), r.headers().clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn what_names_nodes_is_for_operators_only() {
    let (_t, fleet) = fleet();
    for path in ["/metrics", "/", "/nodes/web1", "/reports/1"] {
        let (status, headers) = get(&fleet, "10.0.0.7:40000", path).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path} from elsewhere");
        assert_eq!(headers["x-frame-options"], "DENY", "{path}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        assert_ne!(get(&fleet, "127.0.0.1:40000", path).await.0, StatusCode::FORBIDDEN, "{path} on loopback");
    }
    // What agents and new machines need stays public.
    for path in ["/v1/ca", "/healthz", "/bootstrap.sh"] {
        assert_eq!(get(&fleet, "10.0.0.7:40000", path).await.0, StatusCode::OK, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_needing_a_certificate_is_refused_before_its_body() {
    let (_t, fleet) = fleet();
    let peer = Peer { fingerprint: None, addr: Some("10.0.0.7:40000".parse().unwrap()) };
    // A body that never ends: the answer must not wait for it.
    let (_tx, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(1);
    let body = Body::from_stream(tokio_stream(rx));
    let req = Request::post("/v1/reports").header("content-type", "application/json").body(body).unwrap();
    let app = router(fleet.clone()).layer(Extension(peer));
    let r = tokio::time::timeout(std::time::Duration::from_secs(5), app.oneshot(req)).await.expect("answered at once");
    assert_eq!(r.unwrap().status(), StatusCode::UNAUTHORIZED);
}

/// A stream of what arrives on `rx` (never anything, in the test above).
fn tokio_stream(
    rx: tokio::sync::mpsc::Receiver<Result<axum::body::Bytes, std::io::Error>>,
) -> impl futures_core::Stream<Item = Result<axum::body::Bytes, std::io::Error>> {
    struct S<T>(tokio::sync::mpsc::Receiver<T>);
    impl<T> futures_core::Stream for S<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
    S(rx)
}

/// Sends one request as `peer`; the status and body.
async fn send(fleet: &Arc<Fleet>, peer: &Peer, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
    let app = router(fleet.clone()).layer(Extension(peer.clone()));
    let r = app.oneshot(req).await.unwrap();
    let (status, headers) = (r.status(), r.headers().clone());
    let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn post(path: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(path).header("content-type", "application/json").body(body.into()).unwrap()
}

fn enroll_body(name: &str, token: Option<&str>) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let req = converge_modules::wire::EnrollRequest {
        name: name.into(),
        public_key: key.public_key_pem(),
        token: token.map(str::to_string),
        seal_key: None,
    };
    serde_json::to_string(&req).unwrap()
}

fn catalog_body(formats: &[u32]) -> String {
    let req = converge_modules::wire::CatalogRequest {
        agent_version: "1.0.0".into(),
        formats: formats.to_vec(),
        facts: Default::default(),
        ca_bundle: None,
        keys_version: None,
        paused: None,
    };
    serde_json::to_string(&req).unwrap()
}

/// Every status the API answers, each from the request that earns it. (A 500 is a bug: the
/// router turns a handler's panic into one, tested with the page; a 503 is the caps of
/// `tests/tests/attack_server.rs`, which need real connections.)
#[tokio::test(flavor = "multi_thread")]
async fn every_status_the_api_answers_from_the_request_that_earns_it() {
    let (_t, fleet) = common::fleet_with("request_timeout = \"1s\"\n");
    let outside = Peer { fingerprint: None, addr: Some("10.0.0.7:40000".parse().unwrap()) };
    let loopback = Peer { fingerprint: None, addr: Some("127.0.0.1:40000".parse().unwrap()) };
    let get_req = |p: &str| Request::get(p).body(Body::empty()).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let mut expect = |status: StatusCode, got: (StatusCode, axum::http::HeaderMap, String), what: &str| {
        assert_eq!(got.0, status, "{what}: {}", got.2);
        assert_eq!(got.1["x-content-type-options"], "nosniff", "{what}: every answer is protected");
        seen.insert(status.as_u16());
        got
    };
    expect(StatusCode::OK, send(&fleet, &outside, get_req("/healthz")).await, "health");
    expect(StatusCode::NOT_FOUND, send(&fleet, &outside, get_req("/packages/none.deb")).await, "no package");
    expect(StatusCode::NOT_FOUND, send(&fleet, &loopback, get_req("/nodes/nobody")).await, "no node");
    expect(StatusCode::FORBIDDEN, send(&fleet, &outside, get_req("/metrics")).await, "metrics from elsewhere");
    // The operator's link logs in once and goes back without the token in the address.
    let token = "cvo_router-test";
    let now = converge_server::db::now();
    fleet.db.add_operator(&converge_modules::hash::sha256_hex(token.as_bytes()), now, now + 600).unwrap();
    let (_, headers, _) =
        expect(StatusCode::SEE_OTHER, send(&fleet, &outside, get_req(&format!("/?token={token}"))).await, "login");
    assert_eq!(headers["location"], "/");
    // Enrollment: without a token it waits for an operator; a bad body, a huge one.
    expect(
        StatusCode::ACCEPTED,
        send(&fleet, &outside, post("/v1/enroll", enroll_body("web1", None))).await,
        "pending",
    );
    expect(StatusCode::BAD_REQUEST, send(&fleet, &outside, post("/v1/enroll", "{not json")).await, "bad body");
    let huge = Request::post("/v1/enroll").header("content-length", "100000000").body(Body::empty()).unwrap();
    expect(StatusCode::PAYLOAD_TOO_LARGE, send(&fleet, &outside, huge).await, "declared too large");
    let token = fleet.db.add_token(&converge_modules::hash::sha256_hex(b"cvg_router"), "*", now, now + 600);
    token.unwrap();
    // A sealing key that is not an age recipient, or too long, is refused before the token is
    // spent.
    for (bad, why) in [("age1nope", "sealing key"), (&*"a".repeat(500), "the sealing key")] {
        let mut body: serde_json::Value = serde_json::from_str(&enroll_body("web2", Some("cvg_router"))).unwrap();
        body["seal_key"] = bad.into();
        let (_, _, text) = expect(
            StatusCode::FORBIDDEN,
            send(&fleet, &outside, post("/v1/enroll", body.to_string())).await,
            "bad sealing key",
        );
        assert!(text.contains(why), "{text}");
    }
    let (_, _, issued) = expect(
        StatusCode::OK,
        send(&fleet, &outside, post("/v1/enroll", enroll_body("web2", Some("cvg_router")))).await,
        "issued",
    );
    let issued: converge_modules::wire::EnrollResponse = serde_json::from_str(&issued).unwrap();
    let converge_modules::wire::EnrollResponse::Issued { certificate, .. } = issued else { panic!("{issued:?}") };
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(certificate.as_bytes()).unwrap();
    let node = Peer {
        fingerprint: Some(converge_modules::hash::sha256_hex(&der)),
        addr: Some("10.0.0.8:40000".parse().unwrap()),
    };
    let stranger = Peer { fingerprint: Some("00".repeat(32)), addr: node.addr };
    // The catalog: no certificate, an unknown one, an old agent, facts out of bounds, the
    // catalog itself, then not modified.
    expect(StatusCode::UNAUTHORIZED, send(&fleet, &outside, post("/v1/catalog", catalog_body(&[1]))).await, "no cert");
    expect(StatusCode::FORBIDDEN, send(&fleet, &stranger, post("/v1/catalog", catalog_body(&[1]))).await, "unknown");
    expect(StatusCode::UPGRADE_REQUIRED, send(&fleet, &node, post("/v1/catalog", catalog_body(&[0]))).await, "old");
    let bad = serde_json::json!({"agent_version": "1\u{1b}[2J", "formats": [1], "facts": {}}).to_string();
    expect(StatusCode::UNPROCESSABLE_ENTITY, send(&fleet, &node, post("/v1/catalog", bad)).await, "control chars");
    let (_, headers, _) =
        expect(StatusCode::OK, send(&fleet, &node, post("/v1/catalog", catalog_body(&[1]))).await, "catalog");
    let etag = headers["etag"].clone();
    let poll = |etag: axum::http::HeaderValue| {
        Request::post("/v1/catalog")
            .header("content-type", "application/json")
            .header("if-none-match", etag)
            .body(Body::from(catalog_body(&[1])))
            .unwrap()
    };
    // A poll for what the server holds costs no database call; one for something else (a
    // catalog another server may have sent) reads the store once before answering.
    let statements = fleet.db.statements.get();
    expect(StatusCode::NOT_MODIFIED, send(&fleet, &node, poll(etag.clone())).await, "unchanged catalog");
    assert_eq!(fleet.db.statements.get(), statements, "no database call");
    let other = axum::http::HeaderValue::from_static("\"0123\"");
    expect(StatusCode::OK, send(&fleet, &node, poll(other)).await, "another etag");
    assert_eq!(fleet.db.statements.get(), statements + 1, "one read of the store");
    // Reports: a good one, one about another host.
    let report = |host: &str| {
        format!(
            r#"{{"started_at":"2026-11-30T10:00:00Z","info":{{"catalog":"c","host":"{host}","dry_run":false,"resources":0}},"resources":[],"summary":{{"resources":0,"unchanged":0,"changed":0,"would_change":0,"failed":0,"skipped":0,"dry_run":false,"duration_ms":1.0}}}}"#
        )
    };
    expect(StatusCode::NO_CONTENT, send(&fleet, &node, post("/v1/reports", report("web2"))).await, "report");
    expect(StatusCode::FORBIDDEN, send(&fleet, &node, post("/v1/reports", report("web9"))).await, "forged report");
    // Two requests in flight per node: a third is told to come back.
    let mut held = Vec::new();
    for _ in 0..converge_server::http::REQUESTS_PER_NODE {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(1);
        let req = Request::post("/v1/reports")
            .header("content-type", "application/json")
            .body(Body::from_stream(tokio_stream(rx)))
            .unwrap();
        let app = router(fleet.clone()).layer(Extension(node.clone()));
        held.push((tx, tokio::spawn(app.oneshot(req))));
    }
    let more = until_refused(&fleet, &node).await;
    expect(StatusCode::TOO_MANY_REQUESTS, more, "a third request at once");
    drop(held);
    // A body that stops arriving is cut off at the deadline (request_timeout, 1 s here).
    let (_tx, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(1);
    let slow = Request::post("/v1/enroll").header("content-length", "100").body(Body::from_stream(tokio_stream(rx)));
    expect(StatusCode::REQUEST_TIMEOUT, send(&fleet, &outside, slow.unwrap()).await, "a body that stops");
    let all = [200, 202, 204, 303, 304, 400, 401, 403, 404, 408, 413, 422, 426, 429];
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), all);
}

/// Sends requests until the node's slots are seen taken (the held ones take theirs a moment
/// after they are spawned, later on a loaded machine); the answer that says so.
async fn until_refused(fleet: &Arc<Fleet>, node: &Peer) -> (StatusCode, axum::http::HeaderMap, String) {
    for _ in 0..1000 {
        let got = send(fleet, node, post("/v1/reports", "{}")).await;
        if got.0 == StatusCode::TOO_MANY_REQUESTS {
            return got;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the held requests never took their slots")
}

/// A writer the test reads back: where the log goes.
#[derive(Clone, Default)]
struct Log(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_request_is_one_access_log_line_in_a_span_naming_its_node_serial_and_commit() {
    let log = Log::default();
    let writer = log.clone();
    let subscriber =
        tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).with_env_filter("info").finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();
    let (_t, fleet) = fleet();
    let now = converge_server::db::now();
    fleet.db.add_token(&converge_modules::hash::sha256_hex(b"cvg_log"), "*", now, now + 600).unwrap();
    let outside = Peer { fingerprint: None, addr: Some("10.0.0.7:40000".parse().unwrap()) };
    let (status, _, issued) = send(&fleet, &outside, post("/v1/enroll", enroll_body("web3", Some("cvg_log")))).await;
    assert_eq!(status, StatusCode::OK, "{issued}");
    let issued: converge_modules::wire::EnrollResponse = serde_json::from_str(&issued).unwrap();
    let converge_modules::wire::EnrollResponse::Issued { certificate, .. } = issued else { panic!() };
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(certificate.as_bytes()).unwrap();
    let node = Peer {
        fingerprint: Some(converge_modules::hash::sha256_hex(&der)),
        addr: Some("10.0.0.9:40001".parse().unwrap()),
    };
    assert_eq!(send(&fleet, &node, post("/v1/catalog", catalog_body(&[1]))).await.0, StatusCode::OK);
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("converge::access")).collect();
    assert_eq!(lines.len(), 2, "one line per request:\n{text}");
    assert!(lines[0].contains("request{method=POST path=/v1/enroll peer=10.0.0.7:40000}"), "{}", lines[0]);
    assert!(lines[0].contains("status=200"), "{}", lines[0]);
    let commit = fleet.commit();
    let want = "path=/v1/catalog peer=10.0.0.9:40001 node=web3 serial=";
    assert!(lines[1].contains(want) && lines[1].contains(&format!("commit={commit}")), "{}", lines[1]);
    assert!(lines[1].contains("status=200 ms="), "{}", lines[1]);
}
