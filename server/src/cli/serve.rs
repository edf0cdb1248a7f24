//! `init` (a new server's state directory) and `serve` (the HTTPS server and its loops).

use super::*;

/// What `init` is asked for.
#[derive(Debug, Clone)]
pub struct InitArgs<'a> {
    pub state: &'a Path,
    /// The server's DNS names and addresses, for its certificate.
    pub names: &'a [String],
    pub addresses: &'a [std::net::IpAddr],
    pub repo: &'a Path,
    pub branch: &'a str,
    pub listen: &'a str,
    /// A directory holding `catalog.key` and `trusted-keys.json` made elsewhere; else new
    /// keys are made in the state directory.
    pub keys: Option<&'a Path>,
}

/// What `init` made.
#[derive(Debug, Clone)]
pub struct Initialised {
    /// The state directory, absolute.
    pub state: PathBuf,
    /// The CA's pin (`sha256:...`) for `converge bootstrap --ca-hash`.
    pub ca_hash: String,
    /// A single-use enrollment token for any node, valid 24 h.
    pub token: String,
    /// `https://HOST:PORT` (`PORT` when the port is chosen at `serve`).
    pub url: String,
    /// The one line that joins a new machine through `/bootstrap.sh`.
    pub join: String,
    /// The recipient of the server's secrets key (`age1...`), for `data/secrets/recipients`.
    pub secrets_recipient: String,
}

/// `converge-server init`: makes the state and prints what to do next.
pub fn init(args: &InitArgs) -> Result<u8> {
    let done = initialise(args)?;
    let d = done.state.display();
    println!("initialised {d}:");
    println!("  CA            {d}/ca.pem ({})", done.ca_hash);
    let for_whom: Vec<String> =
        args.names.iter().cloned().chain(args.addresses.iter().map(ToString::to_string)).collect();
    println!("  certificate   {d}/server.pem for {}", for_whom.join(", "));
    if args.keys.is_none() {
        println!("  keys          {d}/keys/ (move root.key offline: it only signs key lists)");
    }
    println!(
        "  secrets key   {d}/{} (list {} in data/secrets/recipients)",
        crate::secrets::KEY_FILE,
        done.secrets_recipient
    );
    println!("  state         {d}/state.db");
    println!("  configuration {d}/server.toml");
    println!("\nserve with:\n  converge-server serve --config {d}/server.toml");
    println!("\njoin a host (the token is single-use, valid 24h; `converge-server token new` makes more):");
    println!("  converge bootstrap --server {} --ca-hash {} --token {}", done.url, done.ca_hash, done.token);
    println!("or, on a new machine without the agent (as root; copy the packages packaging/build makes");
    println!("into {}/packages first):", d);
    println!("  {}", done.join);
    if done.url.ends_with(":PORT") {
        println!("  (PORT: the one `converge-server serve` prints when it starts listening)");
    }
    Ok(0)
}

/// Makes a new server's state directory: CA and server certificate, catalog keys (unless
/// given), the state database, `server.toml` (written by the serializer, paths relative to
/// the directory so it moves as one), a first enrollment token. Never overwrites a state.
pub fn initialise(args: &InitArgs) -> Result<Initialised> {
    let InitArgs { state, names, addresses, repo, branch, listen, keys } = args.clone();
    use std::os::unix::fs::DirBuilderExt;
    if names.is_empty() && addresses.is_empty() {
        bail!("the server needs a name or an address for its certificate: give --name or --address");
    }
    if state.join("state.db").exists() {
        bail!("{} is already a server's state directory; init never overwrites one", state.display());
    }
    let listen_addr: std::net::SocketAddr =
        listen.parse().map_err(|_| anyhow::anyhow!("--listen {listen} is not an address like 0.0.0.0:8443"))?;
    let repo = repo.canonicalize().with_context(|| format!("cannot find the repository {}", repo.display()))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state)
        .with_context(|| format!("cannot create {}", state.display()))?;
    let state = state.canonicalize()?;
    let ca = crate::ca::Ca::create(&state, names, addresses)?;
    let (signing_key, trusted_keys) = match keys {
        Some(dir) => {
            let dir = dir.canonicalize().with_context(|| format!("cannot find {}", dir.display()))?;
            (dir.join("catalog.key"), dir.join("trusted-keys.json"))
        }
        None => {
            crate::keys::keygen(&state.join("keys"))?;
            (state.join("keys/catalog.key"), state.join("keys/trusted-keys.json"))
        }
    };
    crate::keys::read_key_list(&trusted_keys)?;
    let (secrets_key, _) = crate::secrets::ensure_key(&state)?;
    let db = crate::db::Db::open(&state.join("state.db"), 1)?;
    let token = new_token(&db, "*", 86_400)?;
    // Paths inside the state directory are written relative to it (server.toml lives there),
    // so the whole state moves as one directory: to another path, or into another machine.
    let within = |p: &Path| p.strip_prefix(&state).unwrap_or(p).display().to_string();
    use converge_modules::settings::{Duration, Spanned};
    let file = crate::config::ServerFile {
        listen: Some(Spanned::new(0..0, listen.to_string())),
        state: Some(".".into()),
        repo: repo.display().to_string(),
        branch: Some(branch.to_string()),
        signing_key: Some(within(&signing_key)),
        trusted_keys: Some(within(&trusted_keys)),
        catalog_ttl: Some(Duration(7 * 86_400)),
        cert_lifetime: Some(Duration(90 * 86_400)),
        token_ttl: Some(Duration(86_400)),
        repo_poll: Some(Duration(5)),
        ..Default::default()
    };
    let config = converge_modules::settings::write(&["converge-server configuration (written by init)"], &file);
    std::fs::write(state.join("server.toml"), config)?;
    let host = names.first().cloned().unwrap_or_else(|| match addresses[0] {
        std::net::IpAddr::V6(a) => format!("[{a}]"),
        a => a.to_string(),
    });
    // Port 0 picks a free port when serving: `serve` prints the one it got.
    let port = match listen_addr.port() {
        0 => "PORT".to_string(),
        p => p.to_string(),
    };
    let url = format!("https://{host}:{port}");
    let packages = state.join("packages");
    std::fs::create_dir_all(&packages).with_context(|| format!("cannot create {}", packages.display()))?;
    let pin = crate::bootstrap::pin(&state)?;
    let join = crate::bootstrap::join_command(&url, &pin, &token);
    let secrets_recipient = crate::secrets::recipient_of(&secrets_key);
    Ok(Initialised { state, ca_hash: ca.hash(), token, url, join, secrets_recipient })
}

#[derive(Debug, clap::Subcommand)]
pub enum ServerAction {
    /// Make the state directory of another server of this fleet (which must keep its state in
    /// PostgreSQL): the CA, the catalog key and key list, the secrets key, a certificate of its
    /// own for its names, and its server.toml. The root key is never copied. Copy the
    /// directory to the new machine (it holds the CA's key: keep it 0700) and serve from it.
    Add {
        /// This server's configuration.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The new server's state directory, to create.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// A DNS name agents reach the new server by (repeatable).
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
        /// An IP address agents reach the new server by (repeatable).
        #[arg(long = "address", value_name = "IP")]
        addresses: Vec<std::net::IpAddr>,
        /// The operator repository on the new machine (its own clone); this server's by default.
        #[arg(long, value_name = "DIR")]
        repo: Option<PathBuf>,
        /// Where the new server listens; this server's address by default.
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
    },
}

pub fn server_command(action: ServerAction) -> Result<u8> {
    match action {
        ServerAction::Add { config, out, names, addresses, repo, listen } => {
            let made = add_server(&config, &out, &names, &addresses, repo.as_deref(), listen.as_deref())?;
            let d = made.display();
            println!("made the state of a new server in {d}:");
            println!("  certificate   {d}/server.pem for {}", names_of(&names, &addresses).join(", "));
            println!("  CA, catalog key and key list, secrets key: this server's (never the root key)");
            println!("  configuration {d}/server.toml (the same database)");
            println!(
                "
copy {d} to the new machine as it is (it holds the CA's key), then there:"
            );
            println!("  converge-server serve --config {d}/server.toml");
            println!("and give agents both addresses (converge bootstrap --server A --server B, or `servers` in");
            println!("agent.toml), or put both behind a TCP load balancer.");
            Ok(0)
        }
    }
}

fn names_of(names: &[String], addresses: &[std::net::IpAddr]) -> Vec<String> {
    names.iter().cloned().chain(addresses.iter().map(ToString::to_string)).collect()
}

/// `converge-server server add`: the state directory `out` of another server of the fleet of
/// `config`. Nothing is written unless every check passes first; `out` must not exist yet.
pub fn add_server(
    config: &Path,
    out: &Path,
    names: &[String],
    addresses: &[std::net::IpAddr],
    repo: Option<&Path>,
    listen: Option<&str>,
) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let source = crate::config::Config::read(config)?;
    if source.database.is_none() {
        bail!(
            "{}: this server keeps its state in its own file; servers share a fleet through PostgreSQL: set \
             `database` (converge-server db migrate, then db import) before adding a server",
            config.display()
        );
    }
    if names.is_empty() && addresses.is_empty() {
        bail!("the new server needs a name or an address for its certificate: give --name or --address");
    }
    if let Some(l) = listen
        && l.parse::<std::net::SocketAddr>().is_err()
    {
        bail!("--listen {l} is not an address like 0.0.0.0:8443");
    }
    // A dangling symbolic link counts: nothing is made through one.
    if out.symlink_metadata().is_ok() {
        bail!("{} exists already; server add never writes over anything", out.display());
    }
    let ca = crate::ca::Ca::load(&source.state)?;
    crate::fleet::Signing::read(&source)?;
    let secrets = source.state.join(crate::secrets::KEY_FILE);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out.join("keys"))
        .with_context(|| format!("cannot create {}", out.display()))?;
    let out = out.canonicalize()?;
    let copy = |from: &Path, to: &str, mode: u32| -> Result<()> {
        let bytes = std::fs::read(from).with_context(|| format!("cannot read {}", from.display()))?;
        crate::keys::create(&out.join(to), &String::from_utf8_lossy(&bytes), mode)
    };
    for f in crate::ca::Ca::FILES {
        let from = source.state.join(f);
        if from.exists() {
            copy(&from, f, if f.ends_with(".key") { 0o600 } else { 0o644 })?;
        }
    }
    copy(&source.signing_key, "keys/catalog.key", 0o600)?;
    copy(&source.trusted_keys, "keys/trusted-keys.json", 0o644)?;
    if secrets.exists() {
        copy(&secrets, crate::secrets::KEY_FILE, 0o600)?;
    }
    ca.issue_server(&out, names, addresses)?;
    std::fs::create_dir_all(out.join("packages"))?;
    let text = std::fs::read_to_string(config)?;
    let shown = config.display().to_string();
    let mut file: crate::config::ServerFile = converge_modules::settings::Settings { file: &shown, text: &text }
        .parse()
        .map_err(|d| anyhow::anyhow!("{d}"))?;
    use converge_modules::settings::Spanned;
    file.state = Some(".".into());
    file.signing_key = Some("keys/catalog.key".into());
    file.trusted_keys = Some("keys/trusted-keys.json".into());
    file.repo = repo.map_or(source.repo.clone(), Path::to_path_buf).display().to_string();
    file.listen = Some(Spanned::new(0..0, listen.map_or(source.listen.to_string(), str::to_string)));
    if let Some(ca) = &source.database_ca {
        copy(ca, "database-ca.pem", 0o644)?;
        file.database_ca = Some(Spanned::new(0..0, "database-ca.pem".to_string()));
    }
    let written = converge_modules::settings::write(&["converge-server configuration (written by server add)"], &file);
    // It names the database, password and all.
    crate::keys::create(&out.join("server.toml"), &written, 0o600)?;
    Ok(out)
}

/// What the server logs when `CONVERGE_LOG` is unset: everything at `info` but the access log,
/// whose line per request (written unbuffered to standard error) costs about a sixth of the
/// polls a server answers; `CONVERGE_LOG=info` turns it on.
pub const DEFAULT_LOG: &str = "info,converge::access=off";

pub fn serve(config_path: &Path) -> Result<u8> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONVERGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG));
    // Colour only on a terminal: a journal or a log file gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
    // A panic is a bug: logged with where it happened; the request gets a 500 (the router
    // catches it) and the server goes on.
    std::panic::set_hook(Box::new(|info| {
        let place = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        tracing::error!(
            "internal error (a bug; please report it) at {place}: {}",
            converge_modules::text::clip(&info.to_string(), 2000)
        );
    }));
    let config = crate::config::Config::read(config_path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        // The state may be PostgreSQL, whose calls wait: opened off the runtime's threads.
        let opening = config.clone();
        let fleet =
            std::sync::Arc::new(tokio::task::spawn_blocking(move || crate::fleet::Fleet::open(opening)).await??);
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        println!("converge-server listening on https://{} (commit {})", listener.local_addr()?, fleet.commit());
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("stopping");
        };
        run(fleet, listener, stop).await
    })?;
    Ok(0)
}

/// Serves `fleet` on `listener` until `stop` completes, with the loops that keep a server
/// current: the repository polled for new commits, visits flushed to the database, and every
/// second the certificates, the signing keys, the CA and the server's own certificate taken
/// in or renewed. On `stop`, the loops end and the visits still in memory are written.
pub async fn run(
    fleet: std::sync::Arc<crate::fleet::Fleet>,
    listener: tokio::net::TcpListener,
    stop: impl Future<Output = ()>,
) -> Result<()> {
    let watcher = fleet.clone();
    let polling = tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(watcher.config.repo_poll)).await;
            let f = watcher.clone();
            match tokio::task::spawn_blocking(move || f.refresh()).await {
                Ok(Err(e)) => {
                    tracing::warn!("repository: {}", converge_modules::text::clip(&format!("{e:#}"), 2000))
                }
                Err(e) => tracing::warn!("repository: {e}"),
                Ok(Ok(_)) => {}
            }
        }
    });
    let flusher = fleet.clone();
    let keeping = tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            let f = flusher.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || f.flush_seen()).await {
                tracing::warn!("recording nodes: {e:#}");
            }
            let f = flusher.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || f.watch_certs()).await {
                tracing::warn!("reading certificates: {e:#}");
            }
            // A new signing key or key list (`converge-server keys rotate`).
            let f = flusher.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || f.watch_keys()).await {
                tracing::warn!("taking in the signing keys: {e:#}");
            }
            // A CA rollover begun or ended by `converge-server ca`.
            let f = flusher.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || f.watch_ca()).await {
                tracing::warn!("taking in the CA: {e:#}");
            }
            // The server's own certificate, from two thirds of its life; a failure is
            // tried again each second and shows in /metrics and on the fleet page.
            let f = flusher.clone();
            match tokio::task::spawn_blocking(move || f.server_cert.renew_if_due(&f.ca(), crate::db::now())).await {
                Ok(Ok(Some(expires))) => tracing::info!(
                    "renewed the server's certificate: valid until {}",
                    converge_modules::time::Timestamp(expires)
                ),
                Ok(Err(e)) => tracing::warn!("renewing the server's certificate: {e:#}"),
                _ => {}
            }
        }
    });
    // Reports past the retention window go once an hour (and at start).
    let pruner = fleet.clone();
    let pruning = tokio::spawn(async move {
        loop {
            let f = pruner.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || f.prune_reports()).await {
                tracing::warn!("deleting old reports: {e:#}");
            }
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        }
    });
    let served = tokio::select! {
        r = crate::http::serve(listener, fleet.clone()) => r,
        () = stop => Ok(()),
    };
    polling.abort();
    keeping.abort();
    pruning.abort();
    let f = fleet.clone();
    tokio::task::spawn_blocking(move || f.flush_seen()).await??;
    served
}
