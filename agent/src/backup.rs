//! The local backup store: content the agent replaced or removed, kept by hash.
//!
//! Under the state directory: `backups/objects/HEX` holds each distinct content once (written
//! atomically and fsync'ed before the original is touched), and `backups/index` is a JSON-lines
//! journal of `{time, path, sha256, size}`. After a run that made backups, [`BackupStore::prune`]
//! keeps the newest [`KEEP_PER_PATH`] versions of each path and at most the store's budget in
//! all, and deletes objects nothing refers to. A crash at any point leaves at worst an
//! unreferenced object, removed by the next prune.
//!
//! The store is bounded by its disk, checked before anything is copied: its budget is
//! [`MAX_BYTES`] or a tenth of its filesystem, whichever is less; one file may take at most
//! half of that; and a backup must leave a twentieth of the filesystem free (older backups go
//! first to make room). A backup that cannot be kept fails its resource, which then changes
//! nothing, and says what to do (free space, or `backup: false`). A line torn by a full disk
//! or a crash never takes the next entry with it: a new entry always starts on a line of its
//! own, and a torn line is skipped.

use crate::fs::{Root, errno};
use converge_modules::hash::hex;
use converge_modules::host::FileType;
use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::{Mode, fstat, fstatat};
use nix::unistd::{UnlinkatFlags, fsync, unlinkat};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;

pub const KEEP_PER_PATH: usize = 3;
pub const MAX_BYTES: u64 = 500 << 20;
/// The largest index read (a few hundred thousand entries).
const MAX_INDEX: u64 = 64 << 20;

/// The filesystem the store is on: its size and what is free for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disk {
    pub total: u64,
    pub free: u64,
}

impl Disk {
    fn of(fd: &OwnedFd) -> io::Result<Disk> {
        let st = nix::sys::statvfs::fstatvfs(fd).map_err(errno)?;
        let unit = st.fragment_size() as u64;
        Ok(Disk { total: st.blocks() as u64 * unit, free: st.blocks_available() as u64 * unit })
    }

    /// What the store may hold in all.
    pub fn budget(self) -> u64 {
        MAX_BYTES.min(self.total / 10)
    }

    /// What a backup must leave free.
    pub fn reserve(self) -> u64 {
        self.total / 20
    }
}

/// Whether a backup of `size` bytes may be made, and if room must be made first, how much.
/// Pure: `Err` is the message for the resource that wanted it.
pub fn admit(size: u64, disk: Disk) -> Result<u64, String> {
    let mib = |n: u64| format!("{:.1} MiB", n as f64 / (1 << 20) as f64);
    let per_file = disk.budget() / 2;
    if size > per_file {
        return Err(format!(
            "its backup ({}) would be more than the {} the backup store takes for one file: set `backup: false` \
             on the resource to replace it without one",
            mib(size),
            mib(per_file)
        ));
    }
    let needed = size + disk.reserve();
    Ok(needed.saturating_sub(disk.free))
}

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
    /// Whether it fits is decided before anything is copied.
    pub fn save(&self, root: &Root, path: &str, src: std::fs::File) -> io::Result<String> {
        let objects = self.objects(root)?;
        let size = src.metadata()?.len();
        let short = admit(size, Disk::of(&objects)?).map_err(io::Error::other)?;
        if short > 0 {
            self.make_room(root, short)?;
            let still = admit(size, Disk::of(&objects)?).map_err(io::Error::other)?;
            if still > 0 {
                let disk = Disk::of(&objects)?;
                return Err(io::Error::other(format!(
                    "no room for its backup: {} bytes are free, it needs {size} and must leave {} free; free some \
                     space, or set `backup: false` on the resource",
                    disk.free,
                    disk.reserve()
                )));
            }
        }
        let tmp = format!(".incoming.{}", std::process::id());
        let result = self.copy_in(root, &objects, &tmp, path, src, size);
        if result.is_err() {
            let _ = unlinkat(&objects, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        result
    }

    fn copy_in(
        &self,
        root: &Root,
        objects: &OwnedFd,
        tmp: &str,
        path: &str,
        src: std::fs::File,
        size: u64,
    ) -> io::Result<String> {
        match unlinkat(objects, tmp, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(errno(e)),
        }
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mut out = std::fs::File::from(openat(objects, tmp, flags, Mode::from_bits_truncate(0o600)).map_err(errno)?);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut copied = 0u64;
        // The size was admitted: a file that grows while it is copied is cut at that size.
        let mut src = src.take(size);
        loop {
            let n = src.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            copied += n as u64;
        }
        out.sync_all()?;
        let sha = hex(&hasher.finalize());
        renameat(objects, tmp, objects, sha.as_str()).map_err(errno)?;
        fsync(objects).map_err(errno)?;
        let entry = Entry {
            time: converge_modules::time::Timestamp::now().0,
            path: path.to_string(),
            sha256: sha.clone(),
            size: copied,
        };
        let mut index = self.open_index(root)?;
        // A line torn by a full disk or a crash would swallow this one: start on a line of its own.
        let mut line = String::new();
        let len = index.metadata()?.len();
        if len > 0 {
            let mut last = [0u8];
            std::os::unix::fs::FileExt::read_exact_at(&index, &mut last, len - 1)?;
            if last[0] != b'\n' {
                line.push('\n');
            }
        }
        line.push_str(&serde_json::to_string(&entry).expect("entry serializes"));
        line.push('\n');
        index.write_all(line.as_bytes())?;
        index.sync_all()?;
        self.saved.set(self.saved.get() + 1);
        Ok(format!("sha256:{sha}"))
    }

    /// The content kept as `sha256:HEX`, checked against its hash (the store is input too).
    pub fn read(&self, root: &Root, sha: &str) -> io::Result<Vec<u8>> {
        let name = sha
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .ok_or_else(|| io::Error::other(format!("{sha:?} does not name an object of the backup store")))?;
        let bytes = root.read_bounded(&format!("{}/objects/{name}", self.dir), MAX_BYTES)?;
        if hex(&Sha256::digest(&bytes)) != name {
            return Err(io::Error::other(format!("the backup {sha} is damaged: its content no longer has its hash")));
        }
        Ok(bytes)
    }

    /// The index for appending. One that is not a regular file (a symlink, a directory) is
    /// set aside as `index.damaged` and started anew: it must not make every backup fail.
    fn open_index(&self, root: &Root) -> io::Result<std::fs::File> {
        let path = format!("{}/index", self.dir);
        let open = || root.open_at(&path, OFlag::O_RDWR | OFlag::O_APPEND | OFlag::O_CREAT, 0o600, false);
        let regular = |fd: &OwnedFd| fstat(fd).is_ok_and(|st| crate::fs::file_type(&st) == FileType::File);
        match open() {
            Ok(fd) if regular(&fd) => return Ok(std::fs::File::from(fd)),
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::EISDIR | libc::ENXIO)) => {}
            Err(e) => return Err(e),
        }
        let dir = root.open_at(&self.dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0, false)?;
        renameat(&dir, "index", &dir, "index.damaged").map_err(errno)?;
        tracing::warn!("the backup index {path} was not a regular file: set aside as index.damaged");
        match open() {
            Ok(fd) if regular(&fd) => Ok(std::fs::File::from(fd)),
            Ok(_) => Err(io::Error::other(format!("{path} is not a regular file"))),
            Err(e) => Err(e),
        }
    }

    /// Every entry of the index, oldest first (a torn line, from a crash or a full disk, is
    /// skipped; what follows it on the same line is kept when it is a whole entry).
    pub fn entries(&self, root: &Root) -> io::Result<Vec<Entry>> {
        let text = match root.read_bounded(&format!("{}/index", self.dir), MAX_INDEX) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            // Damaged past reading: its entries are lost, and the objects are adopted by the
            // next prune rather than deleted.
            Err(e) => {
                tracing::warn!("the backup index cannot be read ({e}): its objects are kept without their paths");
                return Ok(Vec::new());
            }
        };
        Ok(text
            .lines()
            .filter_map(|l| {
                serde_json::from_str(l)
                    .ok()
                    .or_else(|| l.rfind("{\"time\"").and_then(|i| serde_json::from_str(&l[i..]).ok()))
            })
            .collect())
    }

    /// Drops the oldest backups until `bytes` are freed (or nothing is left to drop).
    fn make_room(&self, root: &Root, bytes: u64) -> io::Result<()> {
        let entries = self.adopt(root, self.entries(root)?)?;
        let held: u64 = distinct_size(&entries);
        self.rewrite(root, bound(entries, KEEP_PER_PATH, held.saturating_sub(bytes)))
    }

    /// Applies the bounds and removes unreferenced objects.
    pub fn prune(&self, root: &Root) -> io::Result<()> {
        let entries = self.adopt(root, self.entries(root)?)?;
        let budget = Disk::of(&self.objects(root)?)?.budget();
        self.rewrite(root, bound(entries, KEEP_PER_PATH, budget))
    }

    /// `entries` with every object on disk that none of them refers to (its line torn, or the
    /// index damaged, or a crash between the object and its line) adopted as an entry of its
    /// own, oldest of all: such objects go first when room is needed, never all at once.
    fn adopt(&self, root: &Root, entries: Vec<Entry>) -> io::Result<Vec<Entry>> {
        let objects = self.objects(root)?;
        let referenced: HashSet<&str> = entries.iter().map(|e| e.sha256.as_str()).collect();
        let mut orphans = Vec::new();
        let mut listing = nix::dir::Dir::from_fd(objects).map_err(errno)?;
        let objects = self.objects(root)?;
        for entry in listing.iter() {
            let entry = entry.map_err(errno)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_object = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
            if name.starts_with(".incoming.") {
                let _ = unlinkat(&objects, name.as_str(), UnlinkatFlags::NoRemoveDir);
            } else if is_object
                && !referenced.contains(name.as_str())
                && let Ok(st) = fstatat(&objects, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            {
                let path = format!("(not in the index: {})", &name[..12]);
                orphans.push(Entry { time: st.st_mtime, path, sha256: name, size: st.st_size as u64 });
            }
        }
        orphans.sort_by_key(|e| e.time);
        orphans.extend(entries);
        Ok(orphans)
    }

    /// Replaces the index with `kept` and removes the objects nothing in it refers to.
    fn rewrite(&self, root: &Root, kept: Vec<Entry>) -> io::Result<()> {
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

/// The bytes the distinct objects of `entries` take.
fn distinct_size(entries: &[Entry]) -> u64 {
    let mut sizes: HashMap<&str, u64> = HashMap::new();
    for e in entries {
        sizes.insert(&e.sha256, e.size);
    }
    sizes.values().sum()
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
    // Oldest first, until the distinct objects left fit: an object shared by several entries
    // is freed only with the last of them.
    let drop = {
        let mut refs: HashMap<&str, (usize, u64)> = HashMap::new();
        for e in &kept {
            refs.entry(&e.sha256).or_insert((0, e.size)).0 += 1;
        }
        let mut total: u64 = refs.values().map(|r| r.1).sum();
        let mut n = 0;
        while total > max_bytes && n < kept.len() {
            let r = refs.get_mut(kept[n].sha256.as_str()).expect("counted");
            r.0 -= 1;
            if r.0 == 0 {
                total -= r.1;
            }
            n += 1;
        }
        n
    };
    kept.drain(..drop);
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
    fn a_backup_is_admitted_before_anything_is_copied() {
        let disk = Disk { total: 1000 << 20, free: 900 << 20 };
        assert_eq!(disk.budget(), 100 << 20, "a tenth of a small filesystem");
        assert_eq!(admit(10 << 20, disk), Ok(0));
        let e = admit(60 << 20, disk).unwrap_err();
        assert!(e.contains("backup: false"), "{e}");
        let full = Disk { total: 1000 << 20, free: 60 << 20 };
        assert_eq!(admit(20 << 20, full), Ok(10 << 20), "room must be made: 20 + a reserve of 50, 60 free");
        let big = Disk { total: 1 << 40, free: 1 << 39 };
        assert_eq!(big.budget(), MAX_BYTES);
    }

    #[test]
    fn a_torn_line_never_takes_the_next_entry_with_it() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::open(t.path()).unwrap();
        let store = BackupStore::new("/var/lib/converge");
        std::fs::write(t.path().join("f"), "one").unwrap();
        store.save(&root, "/f", std::fs::File::open(t.path().join("f")).unwrap()).unwrap();
        // A full disk cut the next line short.
        let index = t.path().join("var/lib/converge/backups/index");
        let mut text = std::fs::read_to_string(&index).unwrap();
        text.push_str(r#"{"time":17,"path":"/g","sha"#);
        std::fs::write(&index, text).unwrap();
        std::fs::write(t.path().join("f"), "two").unwrap();
        store.save(&root, "/f", std::fs::File::open(t.path().join("f")).unwrap()).unwrap();
        // An index written by an older agent: the entry glued to the torn line.
        let mut glued = std::fs::read_to_string(&index).unwrap();
        glued.push_str(r#"{"time":18,"path":"/h","sha{"time":19,"path":"/f","sha256":"x","size":1}"#);
        glued.push('\n');
        std::fs::write(&index, glued).unwrap();
        let entries = store.entries(&root).unwrap();
        assert_eq!(entries.iter().map(|e| e.time).filter(|t| *t == 19).count(), 1, "salvaged: {entries:?}");
        store.prune(&root).unwrap();
        let kept: Vec<String> = store.entries(&root).unwrap().iter().map(|e| e.sha256.clone()).collect();
        let two = converge_modules::hash::sha256_hex(b"two");
        assert!(kept.contains(&two), "the backup after the torn line is kept: {kept:?}");
        assert!(t.path().join("var/lib/converge/backups/objects").join(&two).exists());
    }

    #[test]
    fn a_lost_or_replaced_index_never_costs_the_backups() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::open(t.path()).unwrap();
        let store = BackupStore::new("/var/lib/converge");
        for v in ["one", "two"] {
            std::fs::write(t.path().join("f"), v).unwrap();
            store.save(&root, "/f", std::fs::File::open(t.path().join("f")).unwrap()).unwrap();
        }
        let index = t.path().join("var/lib/converge/backups/index");
        let objects = t.path().join("var/lib/converge/backups/objects");
        // Zeroed: the paths are lost, the content is not.
        std::fs::write(&index, vec![0u8; 300]).unwrap();
        store.prune(&root).unwrap();
        assert_eq!(std::fs::read_dir(&objects).unwrap().count(), 2, "both objects kept");
        assert!(store.entries(&root).unwrap().iter().all(|e| e.path.starts_with("(not in the index")));
        // A symlink in its place: set aside, and backups go on.
        std::fs::remove_file(&index).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &index).unwrap();
        std::fs::write(t.path().join("f"), "three").unwrap();
        store.save(&root, "/f", std::fs::File::open(t.path().join("f")).unwrap()).unwrap();
        assert!(std::fs::symlink_metadata(&index).unwrap().is_file());
        assert!(std::fs::symlink_metadata(index.with_file_name("index.damaged")).unwrap().is_symlink());
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
