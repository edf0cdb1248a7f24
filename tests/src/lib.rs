//! Helpers for end-to-end tests: the real `converge` and `converge-server` binaries.
//!
//! Cargo builds a package's binaries for its own integration tests only, so these tests find
//! them beside their own executable in the target directory; `cargo test --workspace` (and
//! `./test.sh`) builds them first.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The path of a workspace binary, built by the same `cargo test --workspace`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(Path::parent).expect("target/PROFILE");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: build the binaries first (cargo build --workspace)", path.display());
    path
}

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a workspace binary with `args`.
pub fn run(name: &str, args: &[&str]) -> Out {
    let out = Command::new(bin(name)).args(args).output().expect("run");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `converge-server` and demands success; returns its standard output.
pub fn server_ok(args: &[&str]) -> String {
    let out = run("converge-server", args);
    assert_eq!(out.code, 0, "converge-server {args:?}: {}{}", out.stdout, out.stderr);
    out.stdout
}

/// Writes files under `dir`, creating directories.
pub fn write(dir: &Path, files: &[(&str, &str)]) {
    for (path, text) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
}
