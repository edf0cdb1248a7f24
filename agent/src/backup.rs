//! The local backup store: content the agent replaced or removed, kept by hash.
//!
//! Under the state directory: `backups/objects/HEX` holds each distinct content once (written
//! atomically and fsync'ed before the original is touched), and `backups/index` is a JSON-lines
//! journal of `{time, path, sha256, size}`. After a run that made backups, [`BackupStore::prune`]
//! keeps the newest [`KEEP_PER_PATH`] versions of each path and at most [`MAX_BYTES`] in all,
//! and deletes objects nothing refers to. A crash at any point leaves at worst an unreferenced
//! object, removed by the next prune.

use crate::fs::{Root, errno};
use converge_modules::hash::hex;
use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::Mode;
use nix::unistd::{UnlinkatFlags, fsync, unlinkat};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;

pub const KEEP_PER_PATH: usize = 3;
pub const MAX_BYTES: u64 = 500 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub time: i64,
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

pub struct BackupStore {
    /// The store's directory inside the root.
    dir: String,
    saved: Cell<usize>,
}

impl BackupStore {
    pub fn new(state_dir: &str) -> BackupStore {
        BackupStore { dir: format!("{state_dir}/backups"), saved: Cell::new(0) }
    }

    /// How many backups this run made.
    pub fn saved(&self) -> usize {
        self.saved.get()
    }

    fn objects(&self, root: &Root) -> io::Result<OwnedFd> {
        root.create_dir_all(&format!("{}/objects", self.dir), 0o700)?;
        root.open_at(&format!("{}/objects", self.dir), OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0, false)
    }

    /// Copies `src` (the current content of `path`) into the store; returns `sha256:HEX`.
    pub fn save(&self, root: &Root, path: &str, mut src: std::fs::File) -> io::Result<String> {
        let objects = self.objects(root)?;
        let tmp = format!(".incoming.{}", std::process::id());
        match unlinkat(&objects, tmp.as_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(errno(e)),
        }
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mut out =
            std::fs::File::from(openat(&objects, tmp.as_str(), flags, Mode::from_bits_truncate(0o600)).map_err(errno)?);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut size = 0u64;
        loop {
            let n = src.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            size += n as u64;
        }
        out.sync_all()?;
        let sha = hex(&hasher.finalize());
        renameat(&objects, tmp.as_str(), &objects, sha.as_str()).map_err(errno)?;
        fsync(&objects).map_err(errno)?;
        let entry = Entry {
            time: converge_modules::time::Timestamp::now().0,
            path: path.to_string(),
            sha256: sha.clone(),
            size,
        };
        let index = root.open_at(
            &format!("{}/index", self.dir),
            OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CREAT,
            0o600,
            false,
        )?;
        let mut index = std::fs::File::from(index);
        index.write_all(format!("{}\n", serde_json::to_string(&entry).expect("entry serializes")).as_bytes())?;
        index.sync_all()?;
        self.saved.set(self.saved.get() + 1);
        Ok(format!("sha256:{sha}"))
    }

    /// Every entry of the index, oldest first (unreadable lines, from a crash, are skipped).
    pub fn entries(&self, root: &Root) -> io::Result<Vec<Entry>> {
        match root.read_to_string(&format!("{}/index", self.dir)) {
            Ok(text) => Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Applies the bounds and removes unreferenced objects.
    pub fn prune(&self, root: &Root) -> io::Result<()> {
        let entries = self.entries(root)?;
        let kept = bound(entries, KEEP_PER_PATH, MAX_BYTES);
        let objects = self.objects(root)?;
        let text: String = kept.iter().map(|e| serde_json::to_string(e).expect("entry serializes") + "\n").collect();
        let dir = root.open_at(&self.dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0, false)?;
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mut f =
            std::fs::File::from(openat(&dir, "index.new", flags, Mode::from_bits_truncate(0o600)).map_err(errno)?);
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        renameat(&dir, "index.new", &dir, "index").map_err(errno)?;
        fsync(&dir).map_err(errno)?;
        let referenced: HashSet<&str> = kept.iter().map(|e| e.sha256.as_str()).collect();
        let mut listing = nix::dir::Dir::from_fd(objects).map_err(errno)?;
        let mut stale = Vec::new();
        for entry in listing.iter() {
            let entry = entry.map_err(errno)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != "." && name != ".." && !referenced.contains(name.as_str()) {
                stale.push(name);
            }
        }
        let objects = self.objects(root)?;
        for name in stale {
            let _ = unlinkat(&objects, name.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        Ok(())
    }
}

/// Keeps the newest `per_path` entries of each path, then drops the oldest entries until the
/// distinct objects left take at most `max_bytes`.
pub fn bound(entries: Vec<Entry>, per_path: usize, max_bytes: u64) -> Vec<Entry> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut keep = vec![false; entries.len()];
    for (i, e) in entries.iter().enumerate().rev() {
        let n = seen.entry(e.path.as_str()).or_default();
        if *n < per_path {
            *n += 1;
            keep[i] = true;
        }
    }
    let mut kept: Vec<Entry> = entries.into_iter().zip(keep).filter_map(|(e, k)| k.then_some(e)).collect();
    let total = |kept: &[Entry]| {
        let mut sizes: HashMap<&str, u64> = HashMap::new();
        for e in kept {
            sizes.insert(&e.sha256, e.size);
        }
        sizes.values().sum::<u64>()
    };
    while !kept.is_empty() && total(&kept) > max_bytes {
        kept.remove(0);
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(time: i64, path: &str, sha: &str, size: u64) -> Entry {
        Entry { time, path: path.into(), sha256: sha.into(), size }
    }

    #[test]
    fn keeps_the_newest_per_path_and_bounds_the_total() {
        let all = vec![
            e(1, "/a", "1", 10),
            e(2, "/a", "2", 10),
            e(3, "/b", "3", 10),
            e(4, "/a", "4", 10),
            e(5, "/a", "5", 10),
        ];
        let kept: Vec<i64> = bound(all.clone(), 3, 1000).iter().map(|e| e.time).collect();
        assert_eq!(kept, [2, 3, 4, 5]);
        let kept: Vec<i64> = bound(all, 3, 25).iter().map(|e| e.time).collect();
        assert_eq!(kept, [4, 5]);
    }

    #[test]
    fn shared_objects_count_once() {
        let all = vec![e(1, "/a", "x", 10), e(2, "/b", "x", 10)];
        assert_eq!(bound(all, 3, 10).len(), 2);
    }

    #[test]
    fn save_then_prune_on_disk() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::open(t.path()).unwrap();
        let store = BackupStore::new("/var/lib/converge");
        for i in 0..5 {
            std::fs::write(t.path().join("f"), format!("v{i}")).unwrap();
            let id = store.save(&root, "/f", std::fs::File::open(t.path().join("f")).unwrap()).unwrap();
            assert_eq!(id, converge_modules::hash::sha256_id(format!("v{i}").as_bytes()));
        }
        store.prune(&root).unwrap();
        let entries = store.entries(&root).unwrap();
        assert_eq!(entries.len(), KEEP_PER_PATH);
        let objects: Vec<_> = std::fs::read_dir(t.path().join("var/lib/converge/backups/objects")).unwrap().collect();
        assert_eq!(objects.len(), KEEP_PER_PATH);
        let newest = &entries.last().unwrap().sha256;
        let kept = std::fs::read_to_string(t.path().join("var/lib/converge/backups/objects").join(newest)).unwrap();
        assert_eq!(kept, "v4");
    }
}
