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
