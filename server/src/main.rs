//! `converge-server`, the CLI: `compile`, `check`, `diff`. The work is in the library.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use converge_modules::catalog::Catalog;
use converge_modules::diag::Diagnostic;
use converge_server::compiler::Compiler;
use converge_server::repo::Repo;
use converge_server::{diff, site};
use serde_json::{Map, Value as Json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "converge-server", version, about = "converge-server: compiles, signs and serves per-host catalogs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Yaml,
    Json,
}

/// Signing a compiled catalog.
#[derive(Debug, clap::Args)]
struct Signing {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    Root,
    Catalog,
}

#[derive(Debug, Subcommand)]
enum KeysAction {
    /// Add a public key (PEM) to the list.
    Add {
        #[arg(long, value_name = "FILE")]
        keys: PathBuf,
        #[arg(long, value_name = "KEYFILE")]
        root_key: PathBuf,
        public: PathBuf,
        #[arg(long, value_enum, default_value_t = Role::Catalog)]
        role: Role,
    },
    /// Remove a key from the list by its id.
    Retire {
        #[arg(long, value_name = "FILE")]
        keys: PathBuf,
        #[arg(long, value_name = "KEYFILE")]
        root_key: PathBuf,
        key_id: String,
    },
    /// Show the list.
    List {
        #[arg(long, value_name = "FILE")]
        keys: PathBuf,
    },
    /// Replace the server's catalog key, in one step on a live fleet: a new key, the next key
    /// list without the old one (signed by the root key, brought online for this command
    /// only), the new key in place. The server takes both in within a second; hosts adopt the
    /// list with their next catalog.
    Rotate {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[arg(long, value_name = "KEYFILE")]
        root_key: PathBuf,
    },
    /// The key the server signs with, the key list, and which version hosts hold.
    Status {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum NodeAction {
    /// Every node: last seen, certificate, catalog, last report; and requests waiting.
    List {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Let a node that asked to enroll without a token have its certificate: the request
    /// whose key is KEY (the fingerprint the host printed, as `node list` shows it).
    Approve {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        name: String,
        /// The key's fingerprint: sha256:HEX (at least its first 16 hex digits).
        #[arg(long)]
        key: String,
    },
    /// Remove a waiting enrollment request (one from a key the host did not make).
    Reject {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        name: String,
    },
    /// Refuse a node's certificates from now on (it must bootstrap again to return).
    Revoke {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum CaAction {
    /// Begin a rollover: a successor CA, cross-signed by the current one; both are trusted
    /// until `ca retire`.
    Rotate {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// The CA in force, a rollover under way, and which hosts hold what.
    Status {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// End a rollover: the previous CA is trusted no more. Refused while a host with a live
    /// certificate lacks the new bundle or a certificate from the new CA, unless --force.
    Retire {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Retire even though hosts are not there yet (they will need to bootstrap again).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TokenAction {
    /// A one-time token for one node name, or a pattern of names.
    New {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The node name (or glob pattern) it may enroll [*].
        #[arg(long, default_value = "*")]
        name: String,
        /// How long it stays valid [token_ttl of the configuration, 24h].
        #[arg(long)]
        ttl: Option<String>,
    },
    /// A token for the fleet page from another machine (loopback needs none).
    Operator {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// How long it stays valid.
        #[arg(long, default_value = "30d")]
        ttl: String,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the catalog of one node.
    Compile {
        /// The operator repository (site.yaml, roles/, data/, templates/, files/).
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// The node's name (as in its certificate).
        #[arg(long)]
        node: String,
        /// Facts the node reported (YAML or JSON map); declared defaults otherwise.
        #[arg(long, value_name = "FILE")]
        facts: Option<PathBuf>,
        /// YAML (accepted by `converge apply` as it is) or JSON (the wire spelling).
        #[arg(long, value_enum, default_value_t = Format::Yaml)]
        format: Format,
        #[command(flatten)]
        signing: Signing,
    },
    /// Sign a catalog file for its host: an envelope `converge apply` and `converge verify` accept.
    Sign {
        /// The catalog signing key (PKCS#8 PEM).
        key: PathBuf,
        /// The catalog (YAML or JSON); it must name its host.
        catalog: PathBuf,
        /// The key list to send along (agents adopt a newer one signed by a root key they trust).
        #[arg(long, value_name = "FILE")]
        keys: Option<PathBuf>,
        /// The serial [the signing time in milliseconds].
        #[arg(long)]
        serial: Option<u64>,
        /// How long the catalog stays valid: 7d, 12h, 30m, 90s.
        #[arg(long, default_value = "7d")]
        ttl: String,
    },
    /// Make signing keys: with no --name, a root key (keep it offline), a catalog key and the
    /// key list agents trust (version 1); with --name, one more key pair.
    Keygen {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long)]
        name: Option<String>,
    },
    /// Change the key list agents trust: each change is a new version signed by a root key.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Compile every node named in site.yaml and report every error at once (for CI).
    Check {
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// Facts recorded per node: DIR/NODE.yaml or DIR/NODE.json.
        #[arg(long, value_name = "DIR")]
        facts_dir: Option<PathBuf>,
    },
    /// Show, per node, the resources a change between two git revisions adds, removes and
    /// changes. Exit 2 when anything differs.
    Diff {
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        #[arg(long, value_name = "REV")]
        from: String,
        #[arg(long, value_name = "REV")]
        to: String,
        /// Only nodes whose names match this glob.
        #[arg(long, value_name = "PATTERN")]
        node: Option<String>,
    },
    /// Set up a server: its CA and certificate, signing keys, state database, configuration,
    /// and a first enrollment token; prints the command that joins a host.
    Init {
        /// The state directory to create.
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// A DNS name agents reach the server by (repeatable).
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
        /// An IP address agents reach the server by (repeatable).
        #[arg(long = "address", value_name = "IP")]
        addresses: Vec<std::net::IpAddr>,
        /// The operator repository (a git repository).
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// The branch whose current commit is compiled.
        #[arg(long, default_value = "main")]
        branch: String,
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: String,
        /// Use the keys `keygen --out DIR` made instead of making new ones in STATE/keys.
        #[arg(long, value_name = "DIR")]
        keys: Option<PathBuf>,
    },
    /// Serve the fleet over HTTPS.
    Serve {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// See, approve and revoke nodes.
    Node {
        #[command(subcommand)]
        action: NodeAction,
    },
    /// Reports, newest first: what changed on each run, what failed and why.
    Report {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Only this node's.
        #[arg(long)]
        node: Option<String>,
        /// Only runs with failures.
        #[arg(long)]
        failed: bool,
        /// Only reports received since then: a duration (`24h`, `7d`) or a time (RFC 3339).
        #[arg(long, value_name = "T")]
        since: Option<String>,
        /// How many reports at most.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Each change and diff too.
        #[arg(long)]
        details: bool,
    },
    /// The certificate authority over the years: rotate, status, retire.
    Ca {
        #[command(subcommand)]
        action: CaAction,
    },
    /// Make enrollment and operator tokens.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Write the JSON Schemas of site.yaml, role files and catalogs (for editors).
    Schemas {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 1 } else { 0 });
        }
    };
    let result = match cli.command {
        Command::Compile { repo, node, facts, format, signing } => {
            compile(&repo, &node, facts.as_deref(), format, &signing)
        }
        Command::Sign { key, catalog, keys, serial, ttl } => sign(&key, &catalog, keys.as_deref(), serial, &ttl),
        Command::Keygen { out, name } => keygen(&out, name.as_deref()),
        Command::Keys { action } => keys_command(action),
        Command::Check { repo, facts_dir } => check(&repo, facts_dir.as_deref()),
        Command::Diff { repo, from, to, node } => diff(&repo, &from, &to, node.as_deref()),
        Command::Schemas { out } => schemas(&out),
        Command::Init { state, names, addresses, repo, branch, listen, keys } => {
            init(&state, &names, &addresses, &repo, &branch, &listen, keys.as_deref())
        }
        Command::Serve { config } => serve(&config),
        Command::Node { action } => node_command(action),
        Command::Report { config, node, failed, since, limit, details } => {
            report(&config, node, failed, since.as_deref(), limit, details)
        }
        Command::Token { action } => token_command(action),
        Command::Ca { action } => ca_command(action),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("converge-server: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Reads a facts file: a map, in YAML or JSON.
fn read_facts(path: &Path) -> Result<Map<String, Json>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read facts {}", path.display()))?;
    let node = converge_modules::yaml::parse(&text).map_err(|e| {
        let (m, msg) = &e.problems[0];
        anyhow::anyhow!("{}:{}:{}: {msg}", path.display(), m.line, m.col)
    })?;
    match converge_modules::yaml::from_node::<Json>(&node) {
        Ok(Json::Object(m)) => Ok(m),
        Ok(Json::Null) => Ok(Map::new()),
        Ok(_) => bail!("{}: facts are a mapping of names to values", path.display()),
        Err(e) => bail!("{}: {e}", path.display()),
    }
}

/// Prints diagnostics with their source lines, paths shown under `shown` (the repository as
/// the operator named it). Each carries the nodes it occurred for, if any.
fn print_diagnostics(repo: &Repo, shown: &str, diags: Vec<NodeDiagnostic>) -> usize {
    let mut grouped: BTreeMap<(String, u32, u32, String), Vec<String>> = BTreeMap::new();
    for (d, nodes) in diags {
        grouped.entry((d.file, d.mark.line, d.mark.col, d.message)).or_default().extend(nodes);
    }
    let n = grouped.len();
    for ((file, line, col, message), mut nodes) in grouped {
        nodes.sort();
        nodes.dedup();
        let mut message = message;
        if !nodes.is_empty() {
            let more = if nodes.len() > 3 { format!(" and {} more", nodes.len() - 3) } else { String::new() };
            message = format!("{message} [node {}{more}]", nodes.into_iter().take(3).collect::<Vec<_>>().join(", "));
        }
        let d = Diagnostic::new(format!("{shown}/{file}"), converge_modules::diag::Mark::new(line, col), message);
        let source = repo.text(&file).and_then(Result::ok);
        eprintln!("{}\n", d.render(source));
    }
    n
}

fn compile(dir: &Path, node: &str, facts: Option<&Path>, format: Format, signing: &Signing) -> Result<u8> {
    let repo = Repo::from_dir(dir)?;
    let facts = facts.map(read_facts).transpose()?.unwrap_or_default();
    let compiler = Compiler::new(&repo);
    let shown = dir.display().to_string();
    let catalog = match compiler.compile(node, &facts) {
        Ok(c) if compiler.problems.is_empty() => c,
        result => {
            let mut diags: Vec<_> = compiler.problems.iter().cloned().map(|d| (d, vec![])).collect();
            if let Err(e) = result {
                diags.extend(e.into_iter().map(|d| (d, vec![])));
            }
            let n = print_diagnostics(&repo, &shown, diags);
            bail!("{n} problem{} in {shown}; no catalog for {node}", if n == 1 { "" } else { "s" });
        }
    };
    if let Some(key) = &signing.sign {
        let envelope = signed(catalog, key, signing.keys.as_deref(), None, &signing.ttl)?;
        print!("{envelope}");
        return Ok(0);
    }
    let text = match format {
        Format::Yaml => yaml_serde::to_string(&catalog).context("cannot write YAML")?,
        Format::Json => serde_json::to_string_pretty(&catalog).context("cannot write JSON")? + "\n",
    };
    print!("{text}");
    Ok(0)
}

/// A diagnostic and the nodes it occurred for.
type NodeDiagnostic = (Diagnostic, Vec<String>);

/// Compiles every node; returns the catalogs that compiled and every diagnostic (with the
/// nodes it came from).
fn compile_all(
    repo: &Repo,
    facts_for: &dyn Fn(&str) -> Result<Map<String, Json>>,
    only: Option<&str>,
) -> Result<(BTreeMap<String, Catalog>, Vec<NodeDiagnostic>)> {
    let compiler = Compiler::new(repo);
    let mut diags: Vec<_> = compiler.problems.iter().cloned().map(|d| (d, vec![])).collect();
    let mut catalogs = BTreeMap::new();
    let names = compiler.site.as_ref().map(|s| s.node_names()).unwrap_or_default();
    for name in names.into_iter().filter(|n| only.is_none_or(|p| site::glob_match(p, n))) {
        match compiler.compile(&name, &facts_for(&name)?) {
            Ok(c) => {
                catalogs.insert(name, c);
            }
            Err(e) => diags.extend(e.into_iter().map(|d| (d, vec![name.clone()]))),
        }
    }
    Ok((catalogs, diags))
}

fn check(dir: &Path, facts_dir: Option<&Path>) -> Result<u8> {
    let repo = Repo::from_dir(dir)?;
    let facts_for = |node: &str| -> Result<Map<String, Json>> {
        let Some(fd) = facts_dir else { return Ok(Map::new()) };
        for ext in ["yaml", "yml", "json"] {
            let p = fd.join(format!("{node}.{ext}"));
            if p.exists() {
                return read_facts(&p);
            }
        }
        Ok(Map::new())
    };
    let (catalogs, diags) = compile_all(&repo, &facts_for, None)?;
    let shown = dir.display().to_string();
    if diags.is_empty() {
        let resources: usize = catalogs.values().map(|c| c.resources.len()).sum();
        let n = catalogs.len();
        println!("{shown}: {n} node{} compiled, {resources} resources, no problems", if n == 1 { "" } else { "s" });
        return Ok(0);
    }
    let n = print_diagnostics(&repo, &shown, diags);
    eprintln!("{shown}: {n} problem{}", if n == 1 { "" } else { "s" });
    Ok(1)
}

/// Signs `catalog` with the key in `key_path`, attaching the key list in `keys` if given.
fn signed(catalog: Catalog, key_path: &Path, keys: Option<&Path>, serial: Option<u64>, ttl: &str) -> Result<String> {
    let key = converge_server::keys::read_private(key_path)?;
    let list = keys.map(converge_server::keys::read_key_list).transpose()?;
    if let Some((list, _)) = &list {
        let id = converge_modules::trust::key_id(&key.verifying_key());
        if !list.keys.iter().any(|k| k.id == id && k.role == converge_modules::trust::KeyRole::Catalog) {
            bail!(
                "{} (key {id}) is not a catalog key of the list {}: agents would refuse what it signs",
                key_path.display(),
                keys.unwrap().display()
            );
        }
    }
    let ttl = converge_modules::settings::parse_duration(ttl).map_err(anyhow::Error::msg)?;
    converge_server::keys::sign_catalog(
        catalog,
        &key,
        list.map(|(_, env)| env),
        serial,
        ttl,
        converge_modules::time::Timestamp::now(),
    )
}

fn sign(key: &Path, file: &Path, keys: Option<&Path>, serial: Option<u64>, ttl: &str) -> Result<u8> {
    let name = file.display().to_string();
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read catalog {name}"))?;
    let base = file.parent().unwrap_or(Path::new(".")).to_path_buf();
    let read_source = |src: &str| std::fs::read_to_string(base.join(src)).map_err(|e| e.to_string());
    let loaded = converge_modules::load::load(&name, &text, Some(&read_source)).map_err(|d| {
        anyhow::anyhow!("{}\n\n{name}: {} problems; nothing was signed", d.render(Some(&text)), d.len())
    })?;
    print!("{}", signed(loaded.catalog, key, keys, serial, ttl)?);
    Ok(0)
}

fn keygen(out: &Path, name: Option<&str>) -> Result<u8> {
    match name {
        Some(name) => {
            let id = converge_server::keys::keygen_one(out, name)?;
            println!("wrote {0}/{name}.key (private, 0600) and {0}/{name}.pub: key {id}", out.display());
            println!(
                "add it to the list agents trust with: converge-server keys add --keys KEYLIST --root-key ROOTKEY {}/{name}.pub",
                out.display()
            );
        }
        None => {
            let ids = converge_server::keys::keygen(out)?;
            let d = out.display();
            println!("root key    {d}/root.key     (id {}): signs the key list only; keep it offline", ids[0]);
            println!("catalog key {d}/catalog.key  (id {}): signs catalogs; stays on the server", ids[1]);
            println!(
                "key list    {d}/trusted-keys.json (version 1): install on agents as /etc/converge/trusted-keys.json"
            );
        }
    }
    Ok(0)
}

fn keys_command(action: KeysAction) -> Result<u8> {
    use converge_modules::trust::KeyRole;
    use converge_server::keys;
    match action {
        KeysAction::Add { keys: list, root_key, public, role } => {
            let root = keys::read_private(&root_key)?;
            let key = keys::read_public(&public)?;
            let role = if role == Role::Root { KeyRole::Root } else { KeyRole::Catalog };
            let v = keys::add(&list, &root, &key, role)?;
            println!("{}: version {v}, with key {}", list.display(), converge_modules::trust::key_id(&key));
        }
        KeysAction::Retire { keys: list, root_key, key_id } => {
            let root = keys::read_private(&root_key)?;
            let v = keys::retire(&list, &root, &key_id)?;
            println!("{}: version {v}, without key {key_id}", list.display());
        }
        KeysAction::Rotate { config, root_key } => {
            let (config, _) = open_db(&config)?;
            let root = keys::read_private(&root_key)?;
            let (old, new, version) = keys::rotate(&config.trusted_keys, &config.signing_key, &root)?;
            println!("{}: version {version}, with catalog key {new} instead of {old}", config.trusted_keys.display());
            println!(
                "- the server signs with {new} from within a second; each host adopts the list with its next catalog"
            );
            println!(
                "- the old key is in {}: destroy it once `converge-server keys status` shows every host at version {version}",
                config.signing_key.parent().unwrap_or(Path::new(".")).join("retired").display()
            );
            println!("- take the root key offline again");
        }
        KeysAction::Status { config } => {
            let (config, db) = open_db(&config)?;
            let signer = keys::read_private(&config.signing_key)?;
            let (l, _) = keys::read_key_list(&config.trusted_keys)?;
            println!("signing with {}", converge_modules::trust::key_id(&signer.verifying_key()));
            println!("key list    {}: version {}", config.trusted_keys.display(), l.version);
            for k in &l.keys {
                println!("            {} {:?}", k.id, k.role);
            }
            let versions = db.keys_versions(converge_server::db::now())?;
            let behind: i64 = versions.iter().filter(|(v, _)| *v != Some(l.version)).map(|(_, n)| n).sum();
            for (v, n) in &versions {
                let v = v.map_or("not said yet".to_string(), |v| format!("version {v}"));
                println!("hosts       {n} hold {v}");
            }
            if behind == 0 {
                println!("every host with a live certificate holds version {}", l.version);
            }
        }
        KeysAction::List { keys: list } => {
            let (l, _) = keys::read_key_list(&list)?;
            println!("{}: version {}", list.display(), l.version);
            for k in l.keys {
                println!("  {} {:?}", k.id, k.role);
            }
        }
    }
    Ok(0)
}

/// A new enrollment token for `pattern`: returned once, stored hashed.
fn new_token(db: &converge_server::db::Db, pattern: &str, ttl: i64) -> Result<String> {
    let token = format!("cvg_{}", converge_modules::hash::hex(&converge_server::keys::random()?));
    let now = converge_server::db::now();
    db.add_token(&converge_modules::hash::sha256_hex(token.as_bytes()), pattern, now, now + ttl)?;
    Ok(token)
}

fn init(
    state: &Path,
    names: &[String],
    addresses: &[std::net::IpAddr],
    repo: &Path,
    branch: &str,
    listen: &str,
    keys: Option<&Path>,
) -> Result<u8> {
    use std::os::unix::fs::DirBuilderExt;
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
    let ca = converge_server::ca::Ca::create(&state, names, addresses)?;
    let (signing_key, trusted_keys) = match keys {
        Some(dir) => {
            let dir = dir.canonicalize().with_context(|| format!("cannot find {}", dir.display()))?;
            (dir.join("catalog.key"), dir.join("trusted-keys.json"))
        }
        None => {
            converge_server::keys::keygen(&state.join("keys"))?;
            (state.join("keys/catalog.key"), state.join("keys/trusted-keys.json"))
        }
    };
    converge_server::keys::read_key_list(&trusted_keys)?;
    let db = converge_server::db::Db::open(&state.join("state.db"), 1)?;
    let token = new_token(&db, "*", 86_400)?;
    // Paths inside the state directory are written relative to it (server.toml lives there),
    // so the whole state moves as one directory: to another path, or into another machine.
    let within = |p: &Path| p.strip_prefix(&state).unwrap_or(p).display().to_string();
    use converge_modules::settings::{Duration, Spanned};
    let file = converge_server::config::ServerFile {
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
    let d = state.display();
    println!("initialised {d}:");
    println!("  CA            {d}/ca.pem ({})", ca.hash());
    let for_whom: Vec<String> = names.iter().cloned().chain(addresses.iter().map(ToString::to_string)).collect();
    println!("  certificate   {d}/server.pem for {}", for_whom.join(", "));
    if keys.is_none() {
        println!("  keys          {d}/keys/ (move root.key offline: it only signs key lists)");
    }
    println!("  state         {d}/state.db");
    println!("  configuration {d}/server.toml");
    println!("\nserve with:\n  converge-server serve --config {d}/server.toml");
    println!("\njoin a host (the token is single-use, valid 24h; `converge-server token new` makes more):");
    // Port 0 picks a free port when serving: `serve` prints the one it got.
    let port = match listen_addr.port() {
        0 => "PORT".to_string(),
        p => p.to_string(),
    };
    println!("  converge bootstrap --server https://{host}:{port} --ca-hash {} --token {token}", ca.hash());
    let packages = state.join("packages");
    std::fs::create_dir_all(&packages).with_context(|| format!("cannot create {}", packages.display()))?;
    let pin = converge_server::bootstrap::pin(&state)?;
    println!("or, on a new machine without the agent (as root; copy the packages packaging/build makes");
    println!("into {} first):", packages.display());
    println!("  {}", converge_server::bootstrap::join_command(&format!("https://{host}:{port}"), &pin, &token));
    if listen_addr.port() == 0 {
        println!("  (PORT: the one `converge-server serve` prints when it starts listening)");
    }
    Ok(0)
}

fn serve(config_path: &Path) -> Result<u8> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONVERGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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
    let config = converge_server::config::Config::read(config_path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let fleet = std::sync::Arc::new(converge_server::fleet::Fleet::open(config.clone())?);
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        println!("converge-server listening on https://{} (commit {})", listener.local_addr()?, fleet.commit());
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let watcher = fleet.clone();
        tokio::spawn(async move {
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
        tokio::spawn(async move {
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
                match tokio::task::spawn_blocking(move || {
                    f.server_cert.renew_if_due(&f.ca(), converge_server::db::now())
                })
                .await
                {
                    Ok(Ok(Some(expires))) => tracing::info!(
                        "renewed the server's certificate: valid until {}",
                        converge_modules::time::Timestamp(expires)
                    ),
                    Ok(Err(e)) => tracing::warn!("renewing the server's certificate: {e:#}"),
                    _ => {}
                }
            }
        });
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = converge_server::http::serve(listener, fleet.clone()) => r?,
            _ = term.recv() => tracing::info!("stopping"),
            _ = tokio::signal::ctrl_c() => tracing::info!("stopping"),
        }
        fleet.flush_seen()?;
        anyhow::Ok(())
    })?;
    Ok(0)
}

fn open_db(config: &Path) -> Result<(converge_server::config::Config, converge_server::db::Db)> {
    let config = converge_server::config::Config::read(config)?;
    converge_server::db::require_state(&config.state)?;
    let db = converge_server::db::Db::open(&config.state.join("state.db"), 1)?;
    Ok((config, db))
}

fn when(t: Option<i64>) -> String {
    t.map_or("never".to_string(), |t| converge_modules::time::Timestamp(t).to_string())
}

/// `converge-server report`.
fn report(
    config: &Path,
    node: Option<String>,
    failed: bool,
    since: Option<&str>,
    limit: i64,
    details: bool,
) -> Result<u8> {
    let (_, db) = open_db(config)?;
    let now = converge_server::db::now();
    let since = match since {
        None => None,
        Some(t) => Some(match converge_modules::settings::parse_duration(t) {
            Ok(d) => now - d,
            Err(_) => {
                converge_modules::time::Timestamp::parse(t)
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "--since {t}: give a duration like 24h or 7d, or a time like 2026-11-30T08:00:00Z"
                        )
                    })?
                    .0
            }
        }),
    };
    if let Some(n) = &node
        && db.node(n)?.is_none()
    {
        bail!("there is no node {n} (converge-server node list shows them)");
    }
    let filter = converge_server::db::ReportFilter { node, failed, since, limit, bodies: true };
    let reports = db.reports(&filter)?;
    if reports.is_empty() {
        println!("no reports match");
    }
    for r in &reports {
        print!("{}", converge_server::view::report_text(&converge_server::view::report_view(r, now), details));
    }
    Ok(0)
}

fn node_command(action: NodeAction) -> Result<u8> {
    match action {
        NodeAction::List { config } => {
            let (config, db) = open_db(&config)?;
            let now = converge_server::db::now();
            let nodes = db.nodes()?;
            println!(
                "{:<28} {:<10} {:<12} {:<12} {:<14} {:>7} {:>6}  CERTIFICATE",
                "NODE", "STATUS", "LAST RUN", "COMMIT", "SERIAL", "CHANGED", "FAILED"
            );
            for n in &nodes {
                let v = converge_server::view::node_view(n, None, now, 2 * config.run_interval);
                let late = if v.late { " LATE" } else { "" };
                println!(
                    "{:<28} {:<10} {:<12} {:<12} {:<14} {:>7} {:>6}  {}{late}",
                    v.name, v.status, v.last_run_ago, v.commit, v.serial, v.changed, v.failed, v.certificate
                );
                if let Some(e) = &v.compile_error {
                    let e = converge_modules::text::clip(e, 2000);
                    println!("{:<28} compile failing (last good catalog served): {e}", "");
                }
            }
            let pending = db.pending_list(now)?;
            for p in &pending {
                let state = if p.approved { "approved, waiting for the agent" } else { "waiting for approval" };
                println!(
                    "{:<28} enrollment requested {} from {}, key {}: {state}",
                    p.node,
                    when(Some(p.requested)),
                    if p.address.is_empty() { "?" } else { &p.address },
                    p.fingerprint
                );
            }
            if nodes.is_empty() && pending.is_empty() {
                println!("no nodes yet");
            }
        }
        NodeAction::Approve { config, name, key } => {
            let (_, db) = open_db(&config)?;
            let fingerprint = db.approve(&name, &key, converge_server::db::now())?.map_err(anyhow::Error::msg)?;
            println!("approved {name} with key {fingerprint}: it gets its certificate the next time it asks");
        }
        NodeAction::Reject { config, name } => {
            let (_, db) = open_db(&config)?;
            if !db.reject(&name)? {
                bail!("no enrollment request from {name} is waiting (converge-server node list shows them)");
            }
            println!("rejected the request waiting for {name}: the host may ask again");
        }
        NodeAction::Revoke { config, name } => {
            let (_, db) = open_db(&config)?;
            let n = db.revoke(&name, converge_server::db::now())?;
            if n == 0 {
                bail!("{name} has no live certificate");
            }
            println!("revoked {n} certificate(s) of {name}: it is refused from now on");
        }
    }
    Ok(0)
}

/// The hosts not yet through a CA rollover: those with a live certificate that do not hold
/// the new bundle, or whose newest certificate came from the previous CA.
fn behind_in_rollover(db: &converge_server::db::Db, ca: &converge_server::ca::Ca) -> Result<(usize, Vec<String>)> {
    let now = converge_server::db::now();
    let nodes = db.trust_of_nodes(now)?;
    let bundle = ca.bundle_hash();
    let behind = nodes
        .iter()
        .filter(|(_, held, issued)| {
            held.as_deref() != Some(bundle.as_str()) || ca.rotated_at.is_some_and(|r| *issued < r)
        })
        .map(|(n, ..)| n.clone())
        .collect();
    Ok((nodes.len(), behind))
}

fn ca_command(action: CaAction) -> Result<u8> {
    use converge_server::ca::Ca;
    match action {
        CaAction::Rotate { config } => {
            let (config, _) = open_db(&config)?;
            let hash = Ca::rotate(&config.state)?;
            println!("rollover begun: the new CA is {hash}; the previous one stays trusted until `ca retire`");
            println!("- the server takes it in within a second (its own certificate is issued by the new CA);");
            println!(
                "- each host adopts the bundle at its next run, and renews its certificate from the new CA at the one after;"
            );
            println!(
                "- `converge-server ca status --config ...` shows the hosts not there yet; then `converge-server ca retire --config ...`"
            );
            println!("- new hosts join with --ca-hash {hash} (the old hash works until the retirement)");
        }
        CaAction::Status { config } => {
            let (config, db) = open_db(&config)?;
            let ca = Ca::load(&config.state)?;
            let (not_before, not_after) = converge_server::ca::validity(&ca.der)?;
            let t = |s: i64| converge_modules::time::Timestamp(s).to_string();
            println!("CA          {} (from {} until {})", ca.hash(), t(not_before), t(not_after));
            match (&ca.previous, ca.rotated_at) {
                (Some((_, prev)), at) => {
                    println!(
                        "rollover    begun {}: the previous CA {} is still trusted",
                        at.map_or("?".to_string(), t),
                        converge_server::ca::cert_hash(prev)
                    );
                    let (total, behind) = behind_in_rollover(&db, &ca)?;
                    println!(
                        "hosts       {total} with a live certificate; {} not through the rollover yet",
                        behind.len()
                    );
                    for n in behind.iter().take(20) {
                        println!("            {n}");
                    }
                    if behind.len() > 20 {
                        println!("            and {} more", behind.len() - 20);
                    }
                    if behind.is_empty() {
                        println!("next        converge-server ca retire --config {}", config.file.display());
                    }
                }
                (None, _) => println!("rollover    none under way"),
            }
            println!("join with   --ca-hash {}", ca.hash());
        }
        CaAction::Retire { config, force } => {
            let (config, db) = open_db(&config)?;
            let ca = Ca::load(&config.state)?;
            if ca.previous.is_none() {
                bail!("no rollover is under way (converge-server ca status)");
            }
            let (_, behind) = behind_in_rollover(&db, &ca)?;
            if !behind.is_empty() && !force {
                let shown: Vec<&str> = behind.iter().take(10).map(String::as_str).collect();
                bail!(
                    "{} host(s) are not through the rollover yet ({}{}): they hold the previous bundle or a certificate \
                     from the previous CA, and would be cut off. Wait for their next runs, or --force (they then need a \
                     token and `converge bootstrap --ca-hash {}`)",
                    behind.len(),
                    shown.join(", "),
                    if behind.len() > 10 { ", ..." } else { "" },
                    ca.hash()
                );
            }
            // Certificates from the retired CA can no longer be used: revoked, so the fleet page
            // shows their hosts, and those can enroll again with a token.
            let revoked = match ca.rotated_at {
                Some(at) => db.revoke_issued_before(at, converge_server::db::now())?,
                None => Vec::new(),
            };
            Ca::retire(&config.state)?;
            println!("retired the previous CA: the server trusts only {} from within a second", ca.hash());
            if !revoked.is_empty() {
                println!(
                    "revoked the certificates from the previous CA of {} host(s): {}; each comes back with a token and \
                     `converge bootstrap --ca-hash {}`",
                    revoked.len(),
                    revoked.join(", "),
                    ca.hash()
                );
            }
        }
    }
    Ok(0)
}

fn token_command(action: TokenAction) -> Result<u8> {
    match action {
        TokenAction::New { config, name, ttl } => {
            let (config, db) = open_db(&config)?;
            let ttl = match ttl {
                Some(t) => converge_modules::settings::parse_duration(&t).map_err(anyhow::Error::msg)?,
                None => config.token_ttl,
            };
            let token = new_token(&db, &name, ttl)?;
            println!("{token}");
            let until = converge_modules::time::Timestamp(converge_server::db::now() + ttl);
            eprintln!("single-use, for `{name}`, valid until {until}");
        }
        TokenAction::Operator { config, ttl } => {
            let (_, db) = open_db(&config)?;
            let ttl = converge_modules::settings::parse_duration(&ttl).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
            let token = format!("cvo_{}", converge_modules::hash::hex(&converge_server::keys::random()?));
            let now = converge_server::db::now();
            db.add_operator(&converge_modules::hash::sha256_hex(token.as_bytes()), now, now + ttl)?;
            println!("{token}");
            let until = converge_modules::time::Timestamp(now + ttl);
            eprintln!(
                "for the fleet page until {until}: open https://SERVER/?token={token} once, or send `Authorization: Bearer {token}`"
            );
        }
    }
    Ok(0)
}

fn schemas(out: &Path) -> Result<u8> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for (name, text) in converge_server::schemas::all() {
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(0)
}

fn diff(dir: &Path, from: &str, to: &str, only: Option<&str>) -> Result<u8> {
    let no_facts = |_: &str| Ok(Map::new());
    let mut sides = Vec::new();
    for rev in [from, to] {
        let repo = Repo::from_git(dir, rev)?;
        let (catalogs, diags) = compile_all(&repo, &no_facts, only)?;
        if !diags.is_empty() {
            let n = print_diagnostics(&repo, &format!("{rev}:"), diags);
            bail!("{n} problem{} at {rev}; fix them before comparing", if n == 1 { "" } else { "s" });
        }
        sides.push(catalogs);
    }
    let (a, b) = (&sides[0], &sides[1]);
    let mut nodes: Vec<&String> = a.keys().chain(b.keys()).collect();
    nodes.sort();
    nodes.dedup();
    let mut differ = 0;
    for node in &nodes {
        let d = diff::diff(a.get(*node), b.get(*node), (from, to));
        if !d.is_empty() {
            differ += 1;
            print!("{}", diff::render(node, &d));
        }
    }
    println!("{differ} of {} nodes change between {from} and {to}", nodes.len());
    Ok(if differ > 0 { 2 } else { 0 })
}

#[cfg(test)]
mod tests {
    /// Every subcommand's arguments are well-formed (clap checks these only when a command
    /// is parsed, so a clash would otherwise surface as a panic in the field).
    #[test]
    fn the_command_line_is_well_formed() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
