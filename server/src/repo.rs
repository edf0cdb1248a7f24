//! Loading an operator repository: the only I/O of the compiler.
//!
//! A repository is read whole into memory (`site.yaml`, `roles/`, `data/`, `templates/`,
//! `files/`), either from a directory or from any git revision. Revisions are read with the
//! `git` the operator already has (`git ls-tree` then one `git cat-file --batch`): nothing is
//! checked out, no temporary worktree needs cleaning up, the repository's `.git` is never
//! written, and no git library joins the build.

use anyhow::{Context, Result, anyhow, bail};
use converge_modules::catalog::Source;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

/// The parts of a repository the compiler reads.
pub const PARTS: &[&str] = &["site.yaml", "roles", "data", "templates", "files"];

/// The most one file may hold: catalogs inline content as text.
pub const MAX_FILE: usize = 16 << 20;

#[derive(Debug, Clone, Default)]
pub struct Repo {
    /// Relative path -> content.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Where the files come from, when it is a git repository.
    pub source: Option<Source>,
}

impl Repo {
    /// An in-memory repository (tests, benchmarks).
    pub fn from_files<'a>(files: impl IntoIterator<Item = (&'a str, &'a str)>) -> Repo {
        let files = files.into_iter().map(|(p, c)| (p.to_string(), c.as_bytes().to_vec())).collect();
        Repo { files, source: None }
    }

    /// The working tree of `dir` as it is on disk.
    pub fn from_dir(dir: &Path) -> Result<Repo> {
        if !dir.join("site.yaml").is_file() {
            bail!("{} is not an operator repository: it has no site.yaml", dir.display());
        }
        let mut files = BTreeMap::new();
        for part in PARTS {
            walk(dir, Path::new(part), &mut files)?;
        }
        let source = git(dir, &["rev-parse", "--verify", "HEAD"]).ok().map(|commit| {
            let dirty = git(dir, &["status", "--porcelain", "--", "."]).map(|s| !s.trim().is_empty()).unwrap_or(false);
            let commit = if dirty { format!("{}+dirty", commit.trim()) } else { commit.trim().to_string() };
            Source { repository: repository_name(dir), commit }
        });
        Ok(Repo { files, source })
    }

    /// The repository at git revision `rev` of `dir`.
    pub fn from_git(dir: &Path, rev: &str) -> Result<Repo> {
        let commit = git(dir, &["rev-parse", "--verify", "--end-of-options", &format!("{rev}^{{commit}}")])
            .with_context(|| format!("{rev} is not a commit of {}", dir.display()))?
            .trim()
            .to_string();
        let mut args = vec!["ls-tree", "-r", "-z", "--full-tree", commit.as_str(), "--"];
        args.extend_from_slice(PARTS);
        let listing = git(dir, &args)?;
        let mut blobs = Vec::new();
        for entry in listing.split('\0').filter(|e| !e.is_empty()) {
            let (meta, path) =
                entry.split_once('\t').ok_or_else(|| anyhow!("unexpected git ls-tree output: {entry}"))?;
            let mut meta = meta.split(' ');
            let (mode, kind, oid) = (meta.next(), meta.next(), meta.next());
            if kind == Some("blob") && mode != Some("120000") {
                blobs.push((path.to_string(), oid.unwrap_or_default().to_string()));
            }
        }
        let contents = cat_blobs(dir, blobs.iter().map(|(_, oid)| oid.as_str()))?;
        let files = blobs.into_iter().map(|(p, _)| p).zip(contents).collect();
        let source = Source { repository: repository_name(dir), commit: commit.clone() };
        Ok(Repo { files, source: Some(source) })
    }

    /// The text of a file; `None` when there is no such file.
    pub fn text(&self, path: &str) -> Option<Result<&str, String>> {
        self.files.get(path).map(|b| std::str::from_utf8(b).map_err(|_| format!("{path} is not UTF-8 text")))
    }

    /// Paths under `dir/`, sorted.
    pub fn under<'a>(&'a self, dir: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        let prefix = format!("{dir}/");
        self.files.keys().filter(move |p| p.starts_with(&prefix)).map(String::as_str)
    }
}

fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<String, Vec<u8>>) -> Result<()> {
    let full = root.join(rel);
    let meta = match std::fs::metadata(&full) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", full.display())),
    };
    if meta.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(&full)
            .with_context(|| format!("cannot list {}", full.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for name in entries {
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            walk(root, &rel.join(name), out)?;
        }
    } else if meta.is_file() {
        if meta.len() as usize > MAX_FILE {
            bail!("{} is larger than {} MiB", full.display(), MAX_FILE >> 20);
        }
        let content = std::fs::read(&full).with_context(|| format!("cannot read {}", full.display()))?;
        out.insert(rel.to_string_lossy().into_owned(), content);
    }
    Ok(())
}

/// How the repository is named in a catalog's `source`: its `origin` remote, else its path.
fn repository_name(dir: &Path) -> String {
    git(dir, &["config", "--get", "remote.origin.url"])
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| dir.canonicalize().unwrap_or(dir.to_path_buf()).display().to_string())
}

/// Runs `git -C dir ARGS` and returns its output.
/// The text of the repository's file `path` at `commit` (a whole id), for the source page:
/// `None` when the commit or file is not there, or the path is not one the compiler reads (or
/// is a secrets file). At most 1 MiB.
pub fn file_at(dir: &Path, commit: &str, path: &str) -> Result<Option<String>> {
    let whole = commit.len() == 40 && commit.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let readable = PARTS.iter().any(|p| path == *p || path.starts_with(&format!("{p}/")))
        && !path.starts_with(crate::secrets::DIR)
        && !path.split('/').any(|c| c.is_empty() || c == "." || c == "..");
    if !whole || !readable {
        return Ok(None);
    }
    let spec = format!("{commit}:{path}");
    let size = match git(dir, &["cat-file", "-s", "--end-of-options", &spec]) {
        Ok(s) => s.trim().parse::<u64>().unwrap_or(u64::MAX),
        Err(_) => return Ok(None),
    };
    if size > 1 << 20 {
        return Ok(Some(format!("({size} bytes: too large to show here)")));
    }
    Ok(git(dir, &["cat-file", "blob", "--end-of-options", &spec]).ok())
}

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run git (is it installed?)")?;
    if !out.status.success() {
        bail!("git {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    String::from_utf8(out.stdout).context("git printed something that is not UTF-8")
}

/// Reads blobs by id with one `git cat-file --batch`.
fn cat_blobs<'a>(dir: &Path, oids: impl Iterator<Item = &'a str>) -> Result<Vec<Vec<u8>>> {
    let request: String = oids.map(|o| format!("{o}\n")).collect();
    let wanted = request.lines().count();
    let mut child = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["cat-file", "--batch"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run git (is it installed?)")?;
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || stdin.write_all(request.as_bytes()));
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    let mut contents = Vec::with_capacity(wanted);
    let mut header = String::new();
    for _ in 0..wanted {
        header.clear();
        out.read_line(&mut header)?;
        let size: usize = header
            .split_whitespace()
            .nth(2)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("unexpected git cat-file output: {header}"))?;
        if size > MAX_FILE {
            bail!("a file of {} MiB is larger than {} MiB", size >> 20, MAX_FILE >> 20);
        }
        let mut content = vec![0; size + 1];
        out.read_exact(&mut content)?;
        content.pop();
        contents.push(content);
    }
    writer.join().expect("writer thread")?;
    if !child.wait()?.success() {
        bail!("git cat-file failed");
    }
    Ok(contents)
}
