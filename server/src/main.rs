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
        println!("{shown}: {} nodes compiled, {resources} resources, no problems", catalogs.len());
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
    let ttl = converge_server::keys::parse_duration(ttl)?;
    converge_server::keys::sign_catalog(catalog, &key, list.map(|(_, env)| env), serial, ttl)
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
