//! What travels between agent and server over HTTPS (JSON bodies), under `/v1`.
//!
//! - `GET /v1/ca`: the CA certificate (PEM), to check against the pinned hash at bootstrap.
//! - `POST /v1/enroll` [`EnrollRequest`] -> [`EnrollResponse`]: a client certificate for a node.
//! - `POST /v1/catalog` [`CatalogRequest`] (mutual TLS, `If-None-Match`) -> an envelope or 304.
//! - `POST /v1/reports` [`Report`] (mutual TLS).
//! - `GET /healthz`, `GET /metrics`.
//!
//! Errors come back as [`ErrorBody`] with a status code; a 503 carries `Retry-After`.

use crate::report::{ResourceEvent, RunInfo, Summary};
use crate::time::Timestamp;
use crate::trust::Envelope;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The node name the certificate will carry.
    pub name: String,
    /// The agent's public key, SPKI PEM (the private key never leaves the host).
    pub public_key: String,
    /// A one-time token; without one the request waits for `converge-server node approve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase", deny_unknown_fields)]
pub enum EnrollResponse {
    /// The node's certificate (PEM) and the key list its catalogs are signed under.
    Issued { certificate: String, trusted_keys: Envelope },
    /// Waiting for an operator: ask again with the same key.
    Pending { message: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogRequest {
    pub agent_version: String,
    /// Catalog format majors the agent reads; the server compiles to the newest it can.
    pub formats: Vec<u32>,
    /// What the host reports about itself (never used to classify it).
    pub facts: serde_json::Map<String, serde_json::Value>,
}

/// One run's report, as the agent sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub started_at: Timestamp,
    pub info: RunInfo,
    pub resources: Vec<ResourceEvent>,
    pub summary: Summary,
    /// The catalog enforced was the cached one, past its expiry (the server was unreachable).
    #[serde(default)]
    pub stale: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
