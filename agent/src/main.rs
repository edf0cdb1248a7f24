//! `converge`, the agent: converges a host to its catalog.
//!
//! Code map: [`apply`] holds the `apply` and `verify` commands; [`signed`] keeps the trusted key
//! list and the last applied catalog; [`host`] is the real OS behind the `Host`
//! boundary, confined to a root by [`fs`]; [`backup`] keeps replaced content; [`command`] runs
//! argv commands (validate) with a timeout. Everything that decides anything lives in
//! `converge-modules`.

mod apply;
mod backup;
mod command;
mod fs;
mod host;
mod signed;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "converge", version, about = "converge: converges this host to its catalog", propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Converge this host (or the tree under --root) to a catalog file, plain or signed.
    Apply(apply::ApplyArgs),
    /// Check a signed catalog offline: its signature, key list, format and freshness.
    Verify(apply::VerifyArgs),
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("converge: internal error (a bug; please report it): {info}");
    }));
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONVERGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // Usage errors exit 1, never 2: with --detailed-exitcodes, 2 means "changed".
            return ExitCode::from(if e.use_stderr() { 1 } else { 0 });
        }
    };
    let result = match &cli.command {
        Command::Apply(args) => apply::run(args),
        Command::Verify(args) => apply::verify(args),
    };
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("converge: {e:#}");
            ExitCode::from(1)
        }
    }
}
