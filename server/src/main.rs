//! `converge-server`: compiles per-host catalogs from an operator repository, signs them and
//! serves them. Its commands arrive with the compiler, signing and fleet issues; today it only
//! names itself.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "converge-server",
    version,
    about = "converge-server: compiles, signs and serves per-host catalogs",
    long_about = "converge-server: compiles, signs and serves per-host catalogs.\n\nThis build has no server commands yet; converge a host from a local catalog with `converge apply`."
)]
struct Cli {}

fn main() {
    Cli::parse();
    println!(
        "converge-server {}: no server commands in this build yet; see `converge apply`",
        env!("CARGO_PKG_VERSION")
    );
}
