//! `converge`, the agent: converges a host to its catalog.
//!
//! Code map: [`apply`] holds the `apply` and `verify` commands and the converge step every run
//! shares; [`aside`] keeps a catalog's large content out of memory during a run; [`bootstrap`] joins a server; [`run`] pulls, verifies, converges and reports (once
//! or as a daemon) and shows `status`; [`renew`] keeps the host's certificate alive;
//! [`client`] speaks to the server; [`blobs`] fetches the blobs a catalog names by hash; [`facts`] describes the
//! host; [`state`] and [`signed`] keep what lasts between runs; [`host`] is the real OS behind the `Host`
//! boundary (file operations, account lookups, running a command), confined to a root by
//! [`fs`]; [`backup`] keeps replaced content; [`command`] runs
//! argv commands (validate) with a timeout; [`upgrade`] has the agent upgrade itself after a
//! run; [`confirm`] confirms or reverts changes under `confirm`; [`why`] says where a managed
//! path came from; `converge doc` prints the built-in resource reference. Everything that decides anything lives in
//! `converge-modules`.

mod apply;
mod aside;
mod backup;
mod blobs;
mod bootstrap;
mod client;
mod command;
mod confirm;
mod facts;
mod fs;
mod host;
mod renew;
mod run;
mod signed;
mod state;
mod upgrade;
mod why;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "converge", version, about = "converge: converges this host to its catalog", propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no command, `converge` is `converge run --once`: these are its flags.
    #[command(flatten)]
    run: run::RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Converge this host (or the tree under --root) to a catalog file, plain or signed.
    Apply(apply::ApplyArgs),
    /// Check a signed catalog offline: its signature, key list, format and freshness.
    Verify(apply::VerifyArgs),
    /// Join this host to a server: pin its CA, make a key, enroll, run once.
    Bootstrap(bootstrap::BootstrapArgs),
    /// Pull, verify, converge and report: once, or every interval as a daemon.
    Run(run::RunArgs),
    /// Installs the agent's own package (launched by a run, detached, after its report).
    #[command(hide = true)]
    UpgradeSelf(upgrade::UpgradeArgs),
    /// Stop runs from changing this host (an incident, a change freeze) until `converge
    /// resume`, or for a while; the fleet page shows it.
    Pause {
        /// Why, in one line: it shows on the fleet page and in `converge status`.
        #[arg(long)]
        reason: String,
        /// How long (30m, 4h, 2d); without it, until `converge resume`.
        #[arg(long = "for", value_name = "DURATION")]
        duration: Option<String>,
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: std::path::PathBuf,
    },
    /// End a pause: the next run converges.
    Resume {
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: std::path::PathBuf,
    },
    /// Which resource manages PATH (or ID), from which lines of which commit, each value and
    /// the data layer it came from, signed by which key: from the catalog this host applied.
    Why {
        /// A path (/etc/ssh/sshd_config) or a resource id (service:ssh).
        target: String,
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: std::path::PathBuf,
    },
    /// The reference of a resource kind and its fields (without KIND: every kind), from the
    /// same types the catalog schema is made of.
    Doc {
        /// file, directory, symlink, package, user, group, service, exec.
        kind: Option<String>,
    },
    /// The last run, its outcome and catalog, and the next run.
    Status {
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("converge: internal error (a bug; please report it): {info}");
    }));
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONVERGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Colour only on a terminal: a journal or a log file gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // Usage errors exit 1, never 2: with --detailed-exitcodes, 2 means "changed".
            return ExitCode::from(if e.use_stderr() { 1 } else { 0 });
        }
    };
    let result = match &cli.command {
        Some(Command::Apply(args)) => apply::run(args),
        Some(Command::Verify(args)) => apply::verify(args),
        Some(Command::Bootstrap(args)) => bootstrap::bootstrap(args).and_then(|()| {
            if args.no_run {
                return Ok(0);
            }
            let once =
                run::RunArgs { once: true, opts: apply::RunOptions { root: args.root.clone(), ..Default::default() } };
            run::run_once(&once, None).map(|o| o.code)
        }),
        Some(Command::Run(args)) if args.once => run::run_once(args, None).map(|o| o.code),
        Some(Command::Run(args)) => run::daemon(args),
        Some(Command::Status { root }) => run::status(root),
        Some(Command::Why { target, root }) => why::why(root, target),
        Some(Command::Doc { kind }) => doc(kind.as_deref()),
        Some(Command::Pause { reason, duration, root }) => run::pause(root, reason, duration.as_deref()),
        Some(Command::Resume { root }) => run::resume(root),
        Some(Command::UpgradeSelf(args)) => upgrade::upgrade_self(args),
        None => run::run_once(&cli.run, None).map(|o| o.code),
    };
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("converge: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The resource reference (`schemas/reference.md`, generated with the schemas), built in.
const REFERENCE: &str = include_str!("../../schemas/reference.md");

/// `converge doc [KIND]`: one kind's section of the reference, or the list of kinds.
fn doc(kind: Option<&str>) -> anyhow::Result<i32> {
    let sections: Vec<(&str, &str)> =
        REFERENCE.split("\n## ").skip(1).map(|s| s.split_once('\n').unwrap_or((s, ""))).collect();
    let kinds: Vec<&str> = sections.iter().map(|(k, _)| *k).filter(|k| !k.contains(' ')).collect();
    match kind {
        None => {
            println!("converge doc KIND: the fields of a resource kind; kinds: {}", kinds.join(", "));
            if let Some((_, shared)) = sections.iter().find(|(k, _)| k.contains(' ')) {
                print!("\nfields every kind has:{shared}");
            }
            Ok(0)
        }
        Some(k) => match sections.iter().find(|(name, _)| *name == k) {
            Some((name, body)) => {
                print!("{name}\n{body}");
                Ok(0)
            }
            None => match kinds.iter().find(|n| converge_modules::yaml::similar_name(k, n)) {
                Some(close) => anyhow::bail!("no kind `{k}` (did you mean `{close}`?)"),
                None => anyhow::bail!("no kind `{k}`: the kinds are {}", kinds.join(", ")),
            },
        },
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
