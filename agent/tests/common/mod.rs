//! Helpers for tests that run the real `converge` binary in temporary roots.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const BIN: &str = env!("CARGO_BIN_EXE_converge");

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `converge` with `args` and the environment pairs `env`.
pub fn converge_env(args: &[&str], env: &[(&str, &str)]) -> Out {
    let out =
        Command::new(BIN).args(args).envs(env.iter().copied()).env_remove("NO_COLOR").output().expect("run converge");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn converge(args: &[&str]) -> Out {
    converge_env(args, &[])
}

/// A scratch directory holding a catalog file and a root to converge.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("root")).unwrap();
        Scratch { dir }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn root_str(&self) -> String {
        self.root().display().to_string()
    }

    /// Writes a catalog file and returns its path.
    pub fn catalog(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    /// A path inside the root.
    pub fn at(&self, path: &str) -> PathBuf {
        self.root().join(path.trim_start_matches('/'))
    }

    pub fn write(&self, path: &str, content: &str) {
        let p = self.at(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    pub fn read(&self, path: &str) -> String {
        std::fs::read_to_string(self.at(path)).unwrap()
    }

    /// Applies `catalog` into the root with extra `args`.
    pub fn apply(&self, catalog: &str, args: &[&str]) -> Out {
        let root = self.root_str();
        let mut all = vec!["apply", catalog, "--root", root.as_str(), "--detailed-exitcodes"];
        all.extend_from_slice(args);
        converge(&all)
    }
}

/// Every path under `dir` with its type, mode, owner, group and content hash (or link target):
/// compared before and after to prove nothing was touched.
pub fn listing(dir: &Path) -> BTreeMap<String, String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for p in entries {
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            let what = if m.file_type().is_symlink() {
                format!("link -> {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                "dir".to_string()
            } else {
                converge_modules::hash::sha256_id(&std::fs::read(&p).unwrap())
            };
            out.insert(
                rel,
                format!(
                    "{what} {:o} {}:{} mtime={}",
                    m.mode() & 0o7777,
                    m.uid(),
                    m.gid(),
                    m.mtime_nsec() + m.mtime() * 1_000_000_000
                ),
            );
            if m.is_dir() {
                walk(base, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}
