//! `converge bootstrap`: joins this host (or the image under `--root`) to a server.
//!
//! Nothing is trusted on first use: the CA the server sends is believed only if its hash is
//! the one the operator pinned (`--ca-hash`), and the key list only if it is signed by its own
//! root key (and, with `--root-key`, if that root key is the one pinned). The agent's private
//! key is made here and never leaves the host; the server certifies its public key.

use crate::client::Client;
use crate::fs::Root;
use crate::host::RealHost;
use crate::state::{self, AgentConfig, RunLock, STATE_DIR};
use crate::{backup::BackupStore, signed};
use anyhow::{Context, Result, anyhow, bail};
use converge_modules::trust;
use converge_modules::wire::{EnrollRequest, EnrollResponse};
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct BootstrapArgs {
    /// The server, like https://converge.example.com:8443; repeated, the addresses of several
    /// servers sharing one database (tried in turn when one cannot be reached).
    #[arg(long = "server", value_name = "URL", required = true)]
    pub server: Vec<String>,
    /// The CA's hash, as `converge-server init` printed it (sha256:HEX).
    #[arg(long)]
    pub ca_hash: String,
    /// A one-time enrollment token; without one, wait for `converge-server node approve`.
    #[arg(long)]
    pub token: Option<String>,
    /// This node's name [the host name; the image's /etc/hostname with --root].
    #[arg(long)]
    pub name: Option<String>,
    /// The id of the root key the key list must carry (`converge-server keys list`).
    #[arg(long, value_name = "KEY_ID")]
    pub root_key: Option<String>,
    /// Join the image under DIR instead of this host.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// How long to wait for an operator's approval, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub wait: u64,
    /// Join without running the first catalog.
    #[arg(long)]
    pub no_run: bool,
}

pub fn new_key() -> Result<ed25519_dalek::SigningKey> {
    use ring::rand::SecureRandom;
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut seed).map_err(|_| anyhow!("cannot read random bytes from the kernel"))?;
    Ok(ed25519_dalek::SigningKey::from_bytes(&seed))
}

/// Joins the host; returns the path of its configuration.
pub fn bootstrap(args: &BootstrapArgs) -> Result<()> {
    let root = Root::open(&args.root).with_context(|| format!("cannot open root {}", args.root.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let pinned = args.ca_hash.trim().to_ascii_lowercase();
    if !pinned.starts_with("sha256:") || pinned.len() != 71 {
        bail!("--ca-hash {} is not sha256:HEX (64 hex digits) as converge-server init printed it", args.ca_hash);
    }
    // 1. The CA, believed only with the pinned hash.
    // The server sends its CA bundle (two CAs during a rollover), over a connection nothing
    // vouches for yet: only the CA with the pinned hash is kept. The rest of the bundle comes
    // later, over the mutual TLS this CA verifies.
    let bundle = rt.block_on(Client::fetch_ca(&args.server))?;
    // Each certificate of the bundle, as its own PEM block.
    let blocks: Vec<String> = bundle
        .split_inclusive("-----END CERTIFICATE-----")
        .filter_map(|b| b.find("-----BEGIN CERTIFICATE-----").map(|i| format!("{}\n", &b[i..])))
        .collect();
    let hashed: Vec<(String, String)> = blocks
        .into_iter()
        .filter_map(|pem| {
            let der = crate::client::pem_certificates(&pem).ok()?.into_iter().next()?;
            Some((format!("sha256:{}", converge_modules::hash::sha256_hex(&der)), pem))
        })
        .collect();
    let Some((_, ca_pem)) = hashed.iter().find(|(h, _)| *h == pinned).cloned() else {
        let seen: Vec<&str> = hashed.iter().map(|(h, _)| h.as_str()).collect();
        bail!(
            "the server's CA is {}, not the pinned {pinned}: refusing to trust it (another server, or someone in \
             between; or the operator rotated the CA: ask for its current hash, converge-server ca status); nothing \
             was changed",
            if seen.is_empty() { "missing".to_string() } else { seen.join(" or ") }
        );
    };
    let name = match &args.name {
        Some(n) => n.clone(),
        None => signed::node_name(&root, None)?,
    };
    converge_modules::wire::check_node_name(&name).map_err(|e| anyhow!("{e}; choose one with --name"))?;
    // Everything below writes the host's identity and trust: under the run lock.
    let lock = RunLock::take(&root, false)?;
    let host = RealHost::new(root, BackupStore::new(STATE_DIR));
    host.root().create_dir_all("/etc/converge", 0o755)?;
    // 2. The node's key: made here, kept here.
    let key = match state::read_text(host.root(), state::KEY_FILE, 16 << 10) {
        Ok(pem) => {
            use ed25519_dalek::pkcs8::DecodePrivateKey;
            ed25519_dalek::SigningKey::from_pkcs8_pem(&pem)
                .map_err(|e| anyhow!("{}: {e}: remove the damaged key and bootstrap again", state::KEY_FILE))?
        }
        Err(why) if host.root().lstat(state::KEY_FILE).ok().flatten().is_some() => {
            bail!("{why}: remove the damaged key and bootstrap again")
        }
        Err(_) => {
            let key = new_key()?;
            let pem = key.to_pkcs8_pem(Default::default()).map_err(|e| anyhow!("cannot encode the key: {e}"))?;
            state::write(&host, state::KEY_FILE, pem.as_bytes(), 0o600)?;
            key
        }
    };
    let public_key = key.verifying_key().to_public_key_pem(Default::default()).map_err(|e| anyhow!("{e}"))?;
    // 3. Enrollment: a certificate at once with a token, else when an operator approves.
    let roots = crate::client::pem_certificates(&ca_pem).map_err(|e| anyhow!("the server's CA: {e}"))?;
    let client = Client::new(&args.server, roots, None)?;
    // The sealing key: the server encrypts this host's secrets to it.
    let seal_key = Some(state::seal_recipient(&host)?);
    let request = EnrollRequest { name: name.clone(), public_key, token: args.token.clone(), seal_key };
    let started = Instant::now();
    let mut told = false;
    let (certificate, keys) = loop {
        match rt.block_on(client.enroll(&request)).with_context(|| format!("enrollment of {name} refused"))? {
            EnrollResponse::Issued { certificate, trusted_keys } => break (certificate, trusted_keys),
            EnrollResponse::Pending { message } => {
                if started.elapsed() >= Duration::from_secs(args.wait) {
                    bail!(
                        "{name} is still waiting for approval after {} s ({})",
                        args.wait,
                        converge_modules::text::clip(&message, 500)
                    );
                }
                if !told {
                    let fingerprint = converge_modules::wire::key_fingerprint(&key.verifying_key().to_bytes());
                    eprintln!("converge: {}", converge_modules::text::clip(&message, 500));
                    eprintln!("converge: this host's key is {fingerprint}: approve only a request with this key");
                    told = true;
                }
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    };
    // 4. The key list, signed by its own root (the one pinned, if any).
    let list = trust::trust_key_list(&keys).map_err(|e| anyhow!("the server's key list is refused: {e}"))?;
    if let Some(id) = &args.root_key
        && !list.keys.iter().any(|k| k.role == trust::KeyRole::Root && k.id == *id)
    {
        bail!("the server's key list has no root key {id}: refusing it; nothing was changed");
    }
    state::write(&host, state::CA_FILE, ca_pem.as_bytes(), 0o644)?;
    state::write(&host, state::CERT_FILE, certificate.as_bytes(), 0o644)?;
    state::write(&host, signed::KEYS_FILE, &serde_json::to_vec_pretty(&keys)?, 0o644)?;
    state::write(&host, state::CONFIG_FILE, AgentConfig::text(&args.server, &name).as_bytes(), 0o644)?;
    println!("converge: {name} joined {} (key list version {})", args.server.join(", "), list.version);
    drop(lock);
    Ok(())
}
