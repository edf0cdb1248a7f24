//! The commands of `converge-server`, one module per group; `main.rs` only parses the
//! command line and calls them.
//!
//! - [`repo`]: `compile`, `check`, `diff`, `schemas` (an operator repository, no server state).
//! - [`keys`]: `keygen`, `sign`, `keys` (the catalog keys and their signed list).
//! - [`serve`]: `init` (a new server's state) and `serve` (the HTTPS server and its loops).
//! - [`fleet`]: `report`, `node`, `ca`, `token` (a running server's state).
//! - [`secret`]: `secret keygen|set|show|edit|rekey` (values in an operator repository's
//!   `data/secrets/`).

pub mod fleet;
pub mod keys;
pub mod repo;
pub mod secret;
pub mod serve;

pub(crate) use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use converge_modules::diag::Diagnostic;
pub(crate) use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Yaml,
    Json,
}

/// Signing a compiled catalog.
#[derive(Debug, clap::Args)]
pub struct Signing {
    /// Sign the catalog with this catalog key and print the envelope.
    #[arg(long, value_name = "KEYFILE")]
    sign: Option<PathBuf>,
    /// The key list to send along with a signed catalog.
    #[arg(long, value_name = "FILE", requires = "sign")]
    keys: Option<PathBuf>,
    /// How long a signed catalog stays valid.
    #[arg(long, default_value = "7d", requires = "sign")]
    ttl: String,
}

/// The state `config` names (the embedded file, or the PostgreSQL database every server
/// shares, so that any server's command sees and changes the whole fleet).
pub fn open_db(config: &Path) -> Result<(crate::config::Config, crate::db::Db)> {
    let config = crate::config::Config::read(config)?;
    let db = crate::db::Db::of(&config, 1)?;
    Ok((config, db))
}

pub fn when(t: Option<i64>) -> String {
    t.map_or("never".to_string(), |t| converge_modules::time::Timestamp(t).to_string())
}

/// A new enrollment token for `pattern`: returned once, stored hashed.
pub fn new_token(db: &crate::db::Db, pattern: &str, ttl: i64) -> Result<String> {
    let token = format!("cvg_{}", converge_modules::hash::hex(&crate::keys::random()?));
    let now = crate::db::now();
    db.add_token(&converge_modules::hash::sha256_hex(token.as_bytes()), pattern, now, now + ttl)?;
    Ok(token)
}

/// A diagnostic and the nodes it occurred for.
pub type NodeDiagnostic = (Diagnostic, Vec<String>);
