//! `converge-server`: the command line, parsed here; every command is a library function of
//! `converge_server::cli`, one module per group.

use clap::{Parser, Subcommand};
use converge_server::cli::fleet::{CaAction, NodeAction, TokenAction};
use converge_server::cli::keys::KeysAction;
use converge_server::cli::{Format, Signing, fleet, keys, repo, secret, serve};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "converge-server", version, about = "converge-server: compiles, signs and serves per-host catalogs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
        /// The server's secrets key (STATE/secrets.key) to open the repository's secrets with;
        /// without it each secret compiles as a placeholder that names it.
        #[arg(long, value_name = "FILE", env = "CONVERGE_SECRETS_KEY")]
        secrets_key: Option<PathBuf>,
    },
    /// The value of a data key for a node, as its templates see it; --explain shows each level
    /// of its data hierarchy and what it says.
    Lookup {
        /// The node's name.
        node: String,
        /// A dotted key: nginx.port, params.web.listen_port.
        key: String,
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// Show how the hierarchy resolved it, level by level, with files and lines.
        #[arg(long)]
        explain: bool,
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
        /// The server's secrets key (STATE/secrets.key) to open the repository's secrets with;
        /// without it each secret compiles as a placeholder that names it.
        #[arg(long, value_name = "FILE", env = "CONVERGE_SECRETS_KEY")]
        secrets_key: Option<PathBuf>,
    },
    /// Show, per node, the resources a change between two git revisions adds, removes and
    /// changes. Exit 2 when anything differs.
    Diff {
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// The revision before [HEAD].
        #[arg(long, value_name = "REV", default_value = "HEAD")]
        from: String,
        /// The revision after; without it, the working tree as it is on disk (what the next
        /// commit would do, before it is made).
        #[arg(long, value_name = "REV")]
        to: Option<String>,
        /// Only nodes whose names match this glob.
        #[arg(long, value_name = "PATTERN")]
        node: Option<String>,
        /// The server's secrets key (STATE/secrets.key) to open the repository's secrets with;
        /// without it each secret compiles as a placeholder that names it.
        #[arg(long, value_name = "FILE", env = "CONVERGE_SECRETS_KEY")]
        secrets_key: Option<PathBuf>,
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
    /// Another server for a fleet whose state is in PostgreSQL: `server add` makes its state
    /// directory (to copy to its machine) from this server's.
    Server {
        #[command(subcommand)]
        action: serve::ServerAction,
    },
    /// Serve the fleet over HTTPS.
    Serve {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// What a node last reported about itself, which facts its templates see, and whether its
    /// OS family contradicts its attributes (exit 2 when it does).
    Facts {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        node: String,
        /// The facts as the node sent them (JSON).
        #[arg(long)]
        json: bool,
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
    /// A new commit's rollout in waves (site.yaml `rollout`): status, promote, halt, resume.
    Rollout {
        #[command(subcommand)]
        action: fleet::RolloutAction,
    },
    /// Make enrollment and operator tokens.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// The state database: `migrate` brings its schema up to date (PostgreSQL's too).
    Db {
        #[command(subcommand)]
        action: fleet::DbAction,
    },
    /// Secrets in the operator repository (data/secrets/), encrypted per value with age.
    Secret {
        #[command(subcommand)]
        action: secret::SecretAction,
    },
    /// Write the JSON Schemas of site.yaml, role files and catalogs (for editors).
    Schemas {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Also point every YAML file of this repository at its schema in DIR (a modeline for
        /// editors, relative to the file): with DIR inside the repository, the hints travel
        /// with it when it is copied.
        #[arg(long, value_name = "REPO")]
        modelines: Option<PathBuf>,
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
        Command::Compile { repo, node, facts, format, signing, secrets_key } => {
            repo::compile(&repo, &node, facts.as_deref(), format, &signing, secrets_key.as_deref())
        }
        Command::Lookup { node, key, repo, explain } => repo::lookup(&repo, &node, &key, explain),
        Command::Sign { key, catalog, keys, serial, ttl } => keys::sign(&key, &catalog, keys.as_deref(), serial, &ttl),
        Command::Keygen { out, name } => keys::keygen(&out, name.as_deref()),
        Command::Keys { action } => keys::keys_command(action),
        Command::Check { repo, facts_dir, secrets_key } => {
            repo::check(&repo, facts_dir.as_deref(), secrets_key.as_deref())
        }
        Command::Diff { repo, from, to, node, secrets_key } => {
            repo::diff(&repo, &from, to.as_deref(), node.as_deref(), secrets_key.as_deref())
        }
        Command::Schemas { out, modelines } => repo::schemas(&out, modelines.as_deref()),
        Command::Secret { action } => secret::secret_command(action),
        Command::Db { action } => fleet::db_command(action),
        Command::Init { state, names, addresses, repo, branch, listen, keys } => {
            let keys = keys.as_deref();
            serve::init(&serve::InitArgs {
                state: &state,
                names: &names,
                addresses: &addresses,
                repo: &repo,
                branch: &branch,
                listen: &listen,
                keys,
            })
        }
        Command::Serve { config } => serve::serve(&config),
        Command::Server { action } => serve::server_command(action),
        Command::Node { action } => fleet::node_command(action),
        Command::Facts { config, node, json } => fleet::facts(&config, &node, json),
        Command::Report { config, node, failed, since, limit, details } => {
            fleet::report(&config, node, failed, since.as_deref(), limit, details)
        }
        Command::Token { action } => fleet::token_command(action),
        Command::Rollout { action } => fleet::rollout_command(action),
        Command::Ca { action } => fleet::ca_command(action),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("converge-server: {e:#}");
            ExitCode::from(1)
        }
    }
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
