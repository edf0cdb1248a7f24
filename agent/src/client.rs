//! The agent's side of the HTTPS API.
//!
//! TLS trusts only the converge CA (never the system's roots) and presents the node's client
//! certificate. The one exception is fetching the CA at bootstrap, before anything is trusted:
//! that connection accepts any certificate, and the CA it brings is believed only if its hash
//! is the one the operator pinned.
//!
//! A host may know several addresses of its fleet (servers sharing one database, or one server
//! by several names): each request goes to the one that answered last, and on to the next when
//! an address cannot be reached (no connection, no TLS, no answer in time, a gateway error, a
//! server too busy or not caught up: 503); an address that failed is tried last for a while
//! that doubles with each failure (30 s to 10 min). One that answers is preferred again at once.

use anyhow::{Context, Result, anyhow, bail};
use converge_modules::wire::{CatalogRequest, EnrollRequest, EnrollResponse, ErrorBody, RenewRequest, RenewResponse};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;
use std::time::Duration;

pub struct Client {
    /// The addresses, in the order configured.
    bases: Vec<String>,
    http: reqwest::Client,
    failover: std::sync::Mutex<Failover>,
}

/// Which address answered last, and each one's failures in a row and until when it waits.
#[derive(Debug, Default)]
struct Failover {
    preferred: usize,
    failures: Vec<(u32, Option<std::time::Instant>)>,
}

/// The first back-off of an address that failed; it doubles with each failure in a row.
const BACKOFF: Duration = Duration::from_secs(30);
/// The longest back-off.
const BACKOFF_MAX: Duration = Duration::from_secs(600);

impl Failover {
    /// The order to try `n` addresses in: the preferred one, the others as configured, and
    /// those waiting out a back-off last (soonest back first).
    fn order(&self, n: usize, now: std::time::Instant) -> Vec<usize> {
        let waiting = |i: usize| self.failures.get(i).and_then(|f| f.1).filter(|until| *until > now);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| (waiting(i), i != self.preferred, i));
        order
    }

    fn failed(&mut self, i: usize, n: usize, now: std::time::Instant) {
        self.failures.resize(n, (0, None));
        let f = &mut self.failures[i];
        f.0 = f.0.saturating_add(1);
        let wait = BACKOFF.saturating_mul(1 << (f.0 - 1).min(10)).min(BACKOFF_MAX);
        f.1 = Some(now + wait);
    }

    fn worked(&mut self, i: usize, n: usize) {
        self.failures.resize(n, (0, None));
        self.failures[i] = (0, None);
        self.preferred = i;
    }
}

/// The node's certificate chain and private key, for mutual TLS.
pub struct Identity {
    pub certs: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// The certificates of a PEM text; `Err` says why in words (never the parser's bytes).
pub fn pem_certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| "not a PEM certificate (damaged or cut short)".to_string())?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certs)
}

/// The private key of a PEM text.
pub fn pem_key(pem: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| "not a PEM private key (damaged or cut short)".to_string())
}

/// What became of a report.
pub enum Sent {
    Stored,
    /// The server will never take this body (a 4xx other than for the client's identity):
    /// keeping it would only block the reports behind it.
    Refused(String),
}

/// What the server said about the catalog.
pub enum CatalogReply {
    /// A new envelope, with its ETag, and the hash of the server's CA bundle.
    Envelope { bytes: Vec<u8>, etag: Option<String>, ca_bundle: Option<String> },
    /// The cached one is current; the hash of the server's CA bundle.
    NotModified { ca_bundle: Option<String> },
    /// Busy: ask again after this many seconds.
    Retry(u64),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn http(config: rustls::ClientConfig) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .connect_timeout(Duration::from_secs(10))
        // One connection per request, never pooled: runs do not share a runtime. TLS sessions
        // are resumed through the configuration's own cache instead.
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(120))
        .user_agent(concat!("converge/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("cannot set up HTTPS")
}

/// Accepts any server certificate: only for downloading the CA, which is then checked
/// against its pinned hash. Handshake signatures are still verified.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// "cannot reach URL: " and the innermost cause (connection refused, a certificate problem, a
/// timeout), without the layers of the HTTP stack in between.
fn unreachable(base: &str, e: reqwest::Error) -> anyhow::Error {
    if e.is_builder() {
        return anyhow!("cannot make a request to {base}: {e}");
    }
    let timeout = e.is_timeout();
    let mut cause: &dyn std::error::Error = &e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    let why = if timeout { "no answer in time".to_string() } else { cause.to_string() };
    anyhow!("cannot reach the server {base}: {why}")
}

/// The CA bundle hash a catalog answer names (64 hex digits, or nothing).
fn bundle_of(resp: &reqwest::Response) -> Option<String> {
    let v = resp.headers().get("x-converge-ca-bundle")?.to_str().ok()?;
    (v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit())).then(|| v.to_string())
}

/// The server's message from an error response, or its status.
async fn error_of(resp: reqwest::Response) -> anyhow::Error {
    let status = resp.status();
    let body = bounded_body(resp, 64 << 10).await.unwrap_or_default();
    match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(e) => anyhow!("the server answered {status}: {}", converge_modules::text::clip(&e.error, 1000)),
        Err(_) => anyhow!("the server answered {status}"),
    }
}

/// A response body of at most `max` bytes, refused as soon as it is longer (checked against
/// Content-Length before reading, and chunk by chunk while reading).
async fn bounded_body(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        bail!("the server's answer is {} bytes, more than the {max} accepted", resp.content_length().unwrap_or(0));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.context("the answer was cut short")? {
        if body.len() + chunk.len() > max {
            bail!("the server's answer is more than the {max} bytes accepted");
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

impl Client {
    fn base(server: &str) -> String {
        server.trim_end_matches('/').to_string()
    }

    /// Fetches the CA certificate (PEM) without trusting anything yet, from the first of
    /// `servers` that answers.
    pub async fn fetch_ca(servers: &[String]) -> Result<String> {
        let provider = provider();
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
            .with_no_client_auth();
        let c = Client::with(servers, http(config)?);
        let resp = c.send(|http, base| http.get(format!("{base}/v1/ca"))).await?;
        if !resp.status().is_success() {
            return Err(error_of(resp).await);
        }
        let pem = bounded_body(resp, 64 << 10).await?;
        String::from_utf8(pem).map_err(|_| anyhow!("the server's CA is not PEM text"))
    }

    /// A client that trusts only the CA certificates `roots`, presenting a certificate and its
    /// key when given (parsed by the caller, who knows which file each came from).
    pub fn new(servers: &[String], roots: Vec<CertificateDer<'static>>, identity: Option<Identity>) -> Result<Client> {
        let mut store = rustls::RootCertStore::empty();
        for cert in roots {
            store.add(cert).context("the CA certificate is not one rustls accepts")?;
        }
        if store.is_empty() {
            bail!("the CA file holds no certificate");
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(store);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some(Identity { certs, key }) => {
                builder.with_client_auth_cert(certs, key).context("the node certificate and key do not go together")?
            }
        };
        Ok(Client::with(servers, http(config)?))
    }

    fn with(servers: &[String], http: reqwest::Client) -> Client {
        Client { bases: servers.iter().map(|s| Client::base(s)).collect(), http, failover: Default::default() }
    }

    /// Sends the request `make` builds for an address, to the addresses in failover order,
    /// until one answers (see the module's comment); the errors of all when none does.
    async fn send(
        &self,
        make: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response> {
        let n = self.bases.len();
        let lock = || self.failover.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let order = lock().order(n, std::time::Instant::now());
        let mut errors = Vec::new();
        for (k, &i) in order.iter().enumerate() {
            let base = &self.bases[i];
            match make(&self.http, base).send().await {
                Ok(resp) if matches!(resp.status().as_u16(), 502..=504) && k + 1 < n => {
                    lock().failed(i, n, std::time::Instant::now());
                    errors.push(anyhow!("the server {base} answered {}", resp.status()));
                }
                Ok(resp) => {
                    lock().worked(i, n);
                    return Ok(resp);
                }
                Err(e) if e.is_builder() => return Err(unreachable(base, e)),
                Err(e) => {
                    lock().failed(i, n, std::time::Instant::now());
                    errors.push(unreachable(base, e));
                }
            }
        }
        Err(match errors.len() {
            1 => errors.remove(0),
            _ => anyhow!("{}", errors.iter().map(|e| format!("{e:#}")).collect::<Vec<_>>().join("; ")),
        })
    }

    /// The blob `hex`, of exactly `size` bytes (a longer answer is refused as it arrives).
    pub async fn blob(&self, hex: &str, size: u64) -> Result<Vec<u8>> {
        let resp = self.send(|h, b| h.get(format!("{b}/blobs/sha256/{hex}"))).await?;
        if !resp.status().is_success() {
            return Err(error_of(resp).await);
        }
        let body = bounded_body(resp, usize::try_from(size).unwrap_or(usize::MAX)).await?;
        if body.len() as u64 != size {
            bail!("the server sent {} bytes of a {size}-byte blob", body.len());
        }
        Ok(body)
    }

    pub async fn enroll(&self, req: &EnrollRequest) -> Result<EnrollResponse> {
        self.post_json("/v1/enroll", req, "enrollment").await
    }

    /// POSTs `req` as JSON to `path` and reads the answer (within 1 MiB) as JSON; `what` names
    /// the exchange in an error.
    async fn post_json<Q: serde::Serialize, A: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        req: &Q,
        what: &str,
    ) -> Result<A> {
        let resp = self.send(|http, base| http.post(format!("{base}{path}")).json(req)).await?;
        if !resp.status().is_success() {
            return Err(error_of(resp).await);
        }
        let body = bounded_body(resp, 1 << 20).await?;
        serde_json::from_slice(&body).with_context(|| format!("the server's answer to {what} is not understood"))
    }

    pub async fn catalog(&self, req: &CatalogRequest, etag: Option<&str>) -> Result<CatalogReply> {
        let resp = self
            .send(|http, base| {
                let r = http.post(format!("{base}/v1/catalog")).json(req);
                match etag {
                    Some(tag) => r.header(reqwest::header::IF_NONE_MATCH, tag),
                    None => r,
                }
            })
            .await?;
        match resp.status().as_u16() {
            304 => Ok(CatalogReply::NotModified { ca_bundle: bundle_of(&resp) }),
            503 => {
                let after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(60);
                Ok(CatalogReply::Retry(after))
            }
            200 => {
                let ca_bundle = bundle_of(&resp);
                let etag = resp
                    .headers()
                    .get(reqwest::header::ETAG)
                    .and_then(|v| v.to_str().ok())
                    .filter(|t| t.len() <= 128)
                    .map(str::to_string);
                let bytes =
                    bounded_body(resp, converge_modules::trust::MAX_ENVELOPE).await.context("the catalog download")?;
                Ok(CatalogReply::Envelope { bytes, etag, ca_bundle })
            }
            _ => Err(error_of(resp).await),
        }
    }

    /// The server's CA bundle (PEM), over the connection this host already trusts.
    pub async fn ca_bundle(&self) -> Result<String> {
        let resp = self.send(|http, base| http.get(format!("{base}/v1/ca-bundle"))).await?;
        if !resp.status().is_success() {
            return Err(error_of(resp).await);
        }
        let pem = bounded_body(resp, 64 << 10).await?;
        String::from_utf8(pem).map_err(|_| anyhow!("the server's CA bundle is not PEM text"))
    }

    /// Asks for a new certificate for the key in `req` (over mutual TLS with the current one).
    pub async fn renew(&self, req: &RenewRequest) -> Result<RenewResponse> {
        self.post_json("/v1/renew", req, "a renewal").await
    }

    /// Sends a report. An error means "not now" (unreachable, busy, our identity refused);
    /// [`Sent::Refused`] means "never" (the body itself was refused).
    pub async fn report(&self, body: &[u8]) -> Result<Sent> {
        let resp = self
            .send(|http, base| {
                http.post(format!("{base}/v1/reports"))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.to_vec())
            })
            .await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(Sent::Stored);
        }
        let never = status.is_client_error() && !matches!(status.as_u16(), 401 | 403 | 408 | 429);
        let e = error_of(resp).await;
        if never { Ok(Sent::Refused(format!("{e:#}"))) } else { Err(e) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_that_answered_goes_first_and_one_that_failed_waits_longer_each_time() {
        let t0 = std::time::Instant::now();
        let mut f = Failover::default();
        assert_eq!(f.order(3, t0), [0, 1, 2], "as configured");
        f.failed(0, 3, t0);
        assert_eq!(f.order(3, t0), [1, 2, 0], "the one that failed, last");
        f.worked(1, 3);
        assert_eq!(f.order(3, t0 + BACKOFF), [1, 0, 2], "back in line after its wait, behind the one that answered");
        f.failed(0, 3, t0);
        assert_eq!(f.failures[0].1, Some(t0 + BACKOFF * 2), "twice as long");
        for _ in 0..20 {
            f.failed(0, 3, t0);
        }
        assert_eq!(f.failures[0].1, Some(t0 + BACKOFF_MAX), "at most ten minutes");
        f.failed(1, 3, t0);
        f.failed(2, 3, t0);
        assert_eq!(f.order(3, t0).len(), 3, "all waiting: every one is still tried");
        f.worked(0, 3);
        assert_eq!(f.order(3, t0)[0], 0);
    }
}
