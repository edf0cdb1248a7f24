//! A server's state made by the real `converge-server init`, opened in-process.

use converge_server::fleet::Fleet;
use std::process::Command;
use std::sync::Arc;

const BIN: &str = env!("CARGO_BIN_EXE_converge-server");

/// A fleet made by `converge-server init` over a small repository.
pub fn fleet() -> (tempfile::TempDir, Arc<Fleet>) {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("site.yaml"), "nodes:\n  \"*\": {roles: []}\n").unwrap();
    converge_e2e::git(&repo, &["init", "-q", "-b", "main"]);
    converge_e2e::git(&repo, &["add", "-A"]);
    converge_e2e::git(&repo, &["commit", "-q", "-m", "first"]);
    let state = t.path().join("state");
    let out = Command::new(BIN)
        .args(["init", "--state", &state.display().to_string(), "--address", "127.0.0.1", "--listen", "127.0.0.1:0"])
        .args(["--repo", &repo.display().to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = converge_server::config::Config::read(&state.join("server.toml")).unwrap();
    (t, Arc::new(Fleet::open(config).unwrap()))
}
