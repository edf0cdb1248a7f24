//! A server's state made by `init` (the library function the command calls), opened in-process.

use converge_server::fleet::Fleet;
use std::sync::Arc;

/// A fleet made by `converge-server init` over a small repository.
pub fn fleet() -> (tempfile::TempDir, Arc<Fleet>) {
    fleet_with("")
}

/// As [`fleet`], with `settings` added to its server.toml.
pub fn fleet_with(settings: &str) -> (tempfile::TempDir, Arc<Fleet>) {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("site.yaml"), "nodes:\n  \"*\": {roles: []}\n").unwrap();
    converge_e2e::git(&repo, &["init", "-q", "-b", "main"]);
    converge_e2e::git(&repo, &["add", "-A"]);
    converge_e2e::git(&repo, &["commit", "-q", "-m", "first"]);
    let state = t.path().join("state");
    let localhost = ["127.0.0.1".parse().unwrap()];
    converge_server::cli::serve::initialise(&converge_server::cli::serve::InitArgs {
        state: &state,
        names: &[],
        addresses: &localhost,
        repo: &repo,
        branch: "main",
        listen: "127.0.0.1:0",
        keys: None,
    })
    .unwrap();
    let toml = state.join("server.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(&toml, format!("{text}{settings}")).unwrap();
    let config = converge_server::config::Config::read(&state.join("server.toml")).unwrap();
    (t, Arc::new(Fleet::open(config).unwrap()))
}
