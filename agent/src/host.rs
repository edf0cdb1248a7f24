//! The real OS behind the `Host` boundary, confined to a root (`/`, or `--root DIR`).
//!
//! Every operation works relative to a directory descriptor opened inside the root ([`Root`]),
//! never on a path string the kernel would resolve from the host's `/`. Writes go to a
//! temporary file in the same directory, are fsync'ed, renamed over the target, and the
//! directory is fsync'ed: a crash leaves the old file or the new one, never a mix. A batch of
//! files and directories ([`Host::hold_flushes`]) shares its flushes instead: every temporary
//! file is written, one `syncfs` per filesystem makes them all durable, each is renamed into
//! place, and a second `syncfs` makes the renames durable. The order (data before rename) is
//! the same, so the guarantee is too; a first run of thousands of files pays two flushes per
//! batch instead of two per file.

use crate::backup::BackupStore;
use crate::command;
use crate::fs::{Root, absent, errno, file_type};
use converge_modules::catalog::join_path;
use converge_modules::host::{FileRead, FileType, Host, HostError, HostResult, NewAttrs, Ran, Run, Stat};
use converge_modules::providers::account::{ACCOUNT_FILES, Accounts, shadow};
use converge_modules::providers::package::Install;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, readlinkat, renameat};
use nix::sys::stat::{FileStat, Mode, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, fsync, symlinkat, syncfs, unlinkat};
use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::time::Duration;

/// How long a `validate` command may run.
pub const VALIDATE_TIMEOUT: Duration = Duration::from_secs(120);

pub struct RealHost {
    root: Root,
    backups: BackupStore,
    /// The root's accounts (for names under `--root`, and commands run as a user), read once
    /// and again after any command, which may have changed them.
    accounts: RefCell<Option<Accounts>>,
    /// The change to the agent's own package, made after the run (see `crate::upgrade`).
    deferred: RefCell<Option<Install>>,
    /// Between `hold_flushes` and `release_flushes`: what waits for the shared flush.
    held: RefCell<Option<Held>>,
    /// Names and ids looked up this run (the running system's, through NSS).
    names: RefCell<Names>,
}

/// Files and directories whose flush is shared.
#[derive(Default)]
struct Held {
    /// Files written beside their path: directory, temporary name, name, path.
    files: Vec<(OwnedFd, String, String, String)>,
    /// One directory on each filesystem touched (its device), for `syncfs`.
    filesystems: Vec<(u64, OwnedFd)>,
}

impl Held {
    /// Notes the filesystem `dir` is on (one descriptor kept per filesystem).
    fn touch(&mut self, dir: &OwnedFd, path: &str) -> HostResult<()> {
        let dev = fstat(dir).map_err(|e| HostError::io("stat directory of", path, errno(e)))?.st_dev;
        if !self.filesystems.iter().any(|(d, _)| *d == dev) {
            let fd = dir.try_clone().map_err(|e| HostError::io("keep directory of", path, e))?;
            self.filesystems.push((dev, fd));
        }
        Ok(())
    }

    /// One flush of every filesystem touched.
    fn flush(&self) -> Result<(), HostError> {
        for (_, fd) in &self.filesystems {
            syncfs(fd)
                .map_err(|e| HostError::io("flush (syncfs) the filesystem of", "the files of this batch", errno(e)))?;
        }
        Ok(())
    }
}

fn to_stat(st: &FileStat) -> Stat {
    Stat {
        file_type: file_type(st),
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        size: st.st_size as u64,
    }
}

/// The name of the temporary file that stands in for `name` while it is written. Fixed per
/// target, so a run killed half-way leaves at most one per file, and the next write of that
/// file clears it.
pub fn temp_name(name: &str) -> String {
    if name.len() <= 200 {
        format!(".{name}.converge-new")
    } else {
        let hash = converge_modules::hash::sha256_hex(name.as_bytes());
        format!(".{}.converge-new", &hash[..32])
    }
}

impl RealHost {
    pub fn new(root: Root, backups: BackupStore) -> RealHost {
        RealHost {
            root,
            backups,
            accounts: RefCell::new(None),
            deferred: RefCell::new(None),
            held: RefCell::new(None),
            names: RefCell::new(Names::default()),
        }
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    pub fn backups(&self) -> &BackupStore {
        &self.backups
    }

    /// The change to the agent's own package this run deferred, if any (taken).
    pub fn deferred_upgrade(&self) -> Option<Install> {
        self.deferred.borrow_mut().take()
    }

    /// Records the change to the agent's own package that the run deferred.
    pub fn defer_upgrade(&self, install: Option<Install>) {
        *self.deferred.borrow_mut() = install;
    }

    /// Renames `from` to `to` (the agent's own files: setting a damaged one aside), replacing
    /// what `to` was; both resolved inside the root, neither followed.
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (from_dir, from_name) = self.root.parent_fresh(from)?;
        let (to_dir, to_name) = self.root.parent_fresh(to)?;
        renameat(&*from_dir, from_name, &*to_dir, to_name).map_err(errno)?;
        fsync(&*to_dir).map_err(errno)
    }

    /// Opens an existing regular file or directory by name in `dir`, refusing anything else
    /// (checked on the descriptor, so a swap between look and open cannot fool it).
    fn open_existing(dir: &OwnedFd, name: &str, op: &'static str, path: &str) -> HostResult<(OwnedFd, FileStat)> {
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
        let fd = openat(dir, name, flags, Mode::empty()).map_err(|e| HostError::io(op, path, errno(e)))?;
        let st = fstat(&fd).map_err(|e| HostError::io(op, path, errno(e)))?;
        match file_type(&st) {
            FileType::File | FileType::Directory => Ok((fd, st)),
            other => Err(HostError::io(op, path, io::Error::other(format!("is a {other}")))),
        }
    }

    /// Writes the temporary file; flushes it unless `sync` is false (a held batch flushes
    /// all its files at once).
    fn write_temp(
        &self,
        dir: &OwnedFd,
        tmp: &str,
        content: &[u8],
        attrs: NewAttrs,
        path: &str,
        sync: bool,
    ) -> HostResult<()> {
        let io_err = |op, e: Errno| HostError::io(op, path, errno(e));
        match unlinkat(dir, tmp, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(io_err("remove stale temporary file for", e)),
        }
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(dir, tmp, flags, Mode::from_bits_truncate(0o600))
            .map_err(|e| io_err("create temporary file for", e))?;
        let mut file = std::fs::File::from(fd);
        file.write_all(content).map_err(|e| HostError::io("write", path, e))?;
        if attrs.uid.is_some() || attrs.gid.is_some() {
            fchown(&file, attrs.uid.map(Uid::from_raw), attrs.gid.map(Gid::from_raw))
                .map_err(|e| io_err("chown", e))?;
        }
        fchmod(&file, Mode::from_bits_truncate(attrs.mode)).map_err(|e| io_err("chmod", e))?;
        if sync {
            file.sync_all().map_err(|e| HostError::io("fsync", path, e))?;
        }
        Ok(())
    }

    /// `f` of the root's accounts, read once (for `--root`: names resolve against the image's
    /// own files) until a command may have changed them.
    fn with_accounts<T>(&self, f: impl FnOnce(&Accounts) -> T) -> HostResult<T> {
        if self.accounts.borrow().is_none() {
            let a = shadow::read(self)?;
            *self.accounts.borrow_mut() = Some(a);
        }
        Ok(f(self.accounts.borrow().as_ref().expect("read just above")))
    }

    /// A name or id looked up in the system's databases (NSS) once a run: a file owned by
    /// root:root would otherwise cost four lookups, each reading /etc/passwd or /etc/group,
    /// and ten thousand files forty thousand. Forgotten, like the accounts, after any command.
    fn remember<K, Q, V: Clone>(
        &self,
        table: impl Fn(&mut Names) -> &mut std::collections::HashMap<K, V>,
        key: &Q,
        look: impl FnOnce() -> HostResult<V>,
    ) -> HostResult<V>
    where
        K: std::borrow::Borrow<Q> + Eq + std::hash::Hash,
        Q: ToOwned<Owned = K> + Eq + std::hash::Hash + ?Sized,
    {
        if let Some(v) = table(&mut self.names.borrow_mut()).get(key) {
            return Ok(v.clone());
        }
        let v = look()?;
        table(&mut self.names.borrow_mut()).insert(key.to_owned(), v.clone());
        Ok(v)
    }
}

impl RealHost {
    /// Forgets the accounts and names read so far when `path` is where they come from.
    fn wrote(&self, path: &str) {
        if ACCOUNT_FILES.contains(&path) {
            *self.accounts.borrow_mut() = None;
            *self.names.borrow_mut() = Names::default();
        }
    }
}

/// NSS answers of one run (see [`RealHost::remember`]).
#[derive(Default)]
struct Names {
    users: std::collections::HashMap<String, Option<u32>>,
    groups: std::collections::HashMap<String, Option<u32>>,
    uids: std::collections::HashMap<u32, Option<String>>,
    gids: std::collections::HashMap<u32, Option<String>>,
}

impl Host for RealHost {
    fn stat(&self, path: &str) -> HostResult<Option<Stat>> {
        self.root.lstat(path).map(|s| s.as_ref().map(to_stat)).map_err(|e| HostError::io("stat", path, e))
    }

    fn read_file(&self, path: &str, limit: u64) -> HostResult<Option<FileRead>> {
        let err = |e| HostError::io("read", path, e);
        let (dir, name) = match self.root.parent(path) {
            Ok(x) => x,
            Err(e) if absent(&e) => return Ok(None),
            Err(e) => return Err(err(e)),
        };
        let st = match fstatat(&*dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT | Errno::ENOTDIR) => return Ok(None),
            Err(e) => return Err(err(errno(e))),
        };
        let stat = to_stat(&st);
        if stat.file_type != FileType::File || stat.size > limit {
            return Ok(Some(FileRead { stat, content: None }));
        }
        let (fd, st) = Self::open_existing(&dir, name, "read", path)?;
        let stat = to_stat(&st);
        if stat.file_type != FileType::File || stat.size > limit {
            return Ok(Some(FileRead { stat, content: None }));
        }
        let mut file = std::fs::File::from(fd);
        let file_read = |f: &mut std::fs::File, buf: &mut [u8]| f.read(buf);
        // One read for the common case: a buffer one byte longer than the size fstat gave, and
        // a regular file's short read is its end. A file whose size says 0 (/proc, /sys) is read
        // first into a buffer as long as the limit allows (a sysctl's file answers only the
        // first read), then on until its end (a seq_file answers a page a read). So is a file
        // that grew, to the limit.
        let len = if stat.size > 0 { stat.size + 1 } else { (limit + 1).min(64 << 10) };
        let mut content = vec![0u8; len as usize];
        let first = loop {
            match file_read(&mut file, &mut content) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other.map_err(err)?,
            }
        };
        if stat.size > 0 && first as u64 == stat.size {
            content.truncate(first);
            return Ok(Some(FileRead { stat, content: Some(content) }));
        }
        content.truncate(first);
        file.take(limit + 1 - first.min(limit as usize + 1) as u64).read_to_end(&mut content).map_err(err)?;
        let content = (content.len() as u64 <= limit).then_some(content);
        Ok(Some(FileRead { stat, content }))
    }

    fn read_link(&self, path: &str) -> HostResult<String> {
        let err = |e| HostError::io("readlink", path, e);
        let (dir, name) = self.root.parent(path).map_err(err)?;
        let target = readlinkat(&*dir, name).map_err(|e| err(errno(e)))?;
        target.into_string().map_err(|_| err(io::Error::other("link target is not UTF-8")))
    }

    fn list_dir(&self, path: &str) -> HostResult<Vec<(String, FileType)>> {
        let err = |e| HostError::io("list", path, e);
        let fd = self.root.open_at(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0, false).map_err(err)?;
        let mut dir = nix::dir::Dir::from_fd(fd).map_err(|e| err(errno(e)))?;
        let mut names = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(|e| err(errno(e)))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            names.push(String::from_utf8_lossy(name).into_owned());
        }
        drop(dir);
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let child = join_path(path, &name);
            if let Some(st) = self.root.lstat(&child).map_err(err)? {
                out.push((name, file_type(&st)));
            }
        }
        Ok(out)
    }

    fn write_file(&self, path: &str, content: &[u8], attrs: NewAttrs, validate: Option<&[String]>) -> HostResult<()> {
        let (dir, name) = self.root.parent_fresh(path).map_err(|e| HostError::io("write", path, e))?;
        let tmp = temp_name(name);
        let held = self.held.borrow().is_some();
        let result = self.write_temp(&dir, &tmp, content, attrs, path, !held).and_then(|()| {
            if let Some(argv) = validate {
                let dir_path = &path[..path.len() - name.len()];
                let tmp_path = format!("{dir_path}{tmp}");
                let argv: Vec<String> = argv.iter().map(|a| a.replace('%', &tmp_path)).collect();
                let chroot = (!self.root.is_slash()).then(|| self.root.path());
                command::run(&argv, chroot, VALIDATE_TIMEOUT)?;
            }
            if let Some(h) = self.held.borrow_mut().as_mut() {
                // Put in place by `release_flushes`, after the shared flush of its content.
                h.touch(&dir, path)?;
                let dir = dir.try_clone().map_err(|e| HostError::io("keep directory of", path, e))?;
                h.files.push((dir, tmp.clone(), name.to_string(), path.to_string()));
                return Ok(());
            }
            renameat(&*dir, tmp.as_str(), &*dir, name)
                .map_err(|e| HostError::io("rename into place", path, errno(e)))?;
            self.wrote(path);
            fsync(&*dir).map_err(|e| HostError::io("fsync directory of", path, errno(e)))
        });
        if result.is_err() {
            let _ = unlinkat(&*dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        result
    }

    fn hold_flushes(&self) {
        self.held.borrow_mut().get_or_insert_with(Held::default);
    }

    fn release_flushes(&self) -> Vec<(Option<String>, HostError)> {
        let Some(held) = self.held.borrow_mut().take() else {
            return Vec::new();
        };
        // The content of every file (and every directory made) is durable before any rename:
        // a crash at any instant leaves each file wholly old or wholly new.
        if let Err(e) = held.flush() {
            for (dir, tmp, ..) in &held.files {
                let _ = unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            }
            return vec![(None, e)];
        }
        let mut failed = Vec::new();
        for (dir, tmp, name, path) in &held.files {
            if let Err(e) = renameat(dir, tmp.as_str(), dir, name.as_str()) {
                let _ = unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
                failed.push((Some(path.clone()), HostError::io("rename into place", path, errno(e))));
            } else {
                self.wrote(path);
            }
        }
        if let Err(e) = held.flush() {
            failed.push((None, e));
        }
        failed
    }

    fn mkdir(&self, path: &str, attrs: NewAttrs) -> HostResult<()> {
        let io_err = |op, e: Errno| HostError::io(op, path, errno(e));
        let (dir, name) = self.root.parent_fresh(path).map_err(|e| HostError::io("mkdir", path, e))?;
        mkdirat(&*dir, name, Mode::from_bits_truncate(0o700)).map_err(|e| io_err("mkdir", e))?;
        let (fd, _) = Self::open_existing(&dir, name, "mkdir", path)?;
        if attrs.uid.is_some() || attrs.gid.is_some() {
            fchown(&fd, attrs.uid.map(Uid::from_raw), attrs.gid.map(Gid::from_raw)).map_err(|e| io_err("chown", e))?;
        }
        fchmod(&fd, Mode::from_bits_truncate(attrs.mode)).map_err(|e| io_err("chmod", e))?;
        match self.held.borrow_mut().as_mut() {
            Some(h) => h.touch(&dir, path),
            None => fsync(&*dir).map_err(|e| io_err("fsync directory of", e)),
        }
    }

    fn symlink(&self, path: &str, target: &str) -> HostResult<()> {
        let io_err = |op, e: Errno| HostError::io(op, path, errno(e));
        let (dir, name) = self.root.parent_fresh(path).map_err(|e| HostError::io("symlink", path, e))?;
        let tmp = temp_name(name);
        match unlinkat(&*dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(io_err("remove stale temporary link for", e)),
        }
        symlinkat(target, &*dir, tmp.as_str()).map_err(|e| io_err("symlink", e))?;
        if let Err(e) = renameat(&*dir, tmp.as_str(), &*dir, name) {
            let _ = unlinkat(&*dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            return Err(io_err("rename into place", e));
        }
        fsync(&*dir).map_err(|e| io_err("fsync directory of", e))
    }

    fn set_mode(&self, path: &str, mode: u32) -> HostResult<()> {
        let (dir, name) = self.root.parent_fresh(path).map_err(|e| HostError::io("chmod", path, e))?;
        let (fd, _) = Self::open_existing(&dir, name, "chmod", path)?;
        fchmod(&fd, Mode::from_bits_truncate(mode)).map_err(|e| HostError::io("chmod", path, errno(e)))
    }

    fn set_owner(&self, path: &str, uid: Option<u32>, gid: Option<u32>) -> HostResult<()> {
        let err = |e| HostError::io("chown", path, e);
        let (dir, name) = self.root.parent_fresh(path).map_err(err)?;
        fchownat(&*dir, name, uid.map(Uid::from_raw), gid.map(Gid::from_raw), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| err(errno(e)))
    }

    fn remove(&self, path: &str) -> HostResult<()> {
        let err = |e| HostError::io("remove", path, e);
        let (dir, name) = self.root.parent_fresh(path).map_err(err)?;
        let st = fstatat(&*dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| err(errno(e)))?;
        let is_dir = file_type(&st) == FileType::Directory;
        let flag = if is_dir { UnlinkatFlags::RemoveDir } else { UnlinkatFlags::NoRemoveDir };
        unlinkat(&*dir, name, flag).map_err(|e| err(errno(e)))?;
        if is_dir {
            self.root.forget_dirs();
        }
        Ok(())
    }

    fn backup(&self, path: &str) -> HostResult<String> {
        let (dir, name) = self.root.parent_fresh(path).map_err(|e| HostError::io("backup", path, e))?;
        let (fd, st) = Self::open_existing(&dir, name, "backup", path)?;
        if file_type(&st) != FileType::File {
            return Err(HostError::io("backup", path, io::Error::other("not a regular file")));
        }
        self.backups.save(&self.root, path, std::fs::File::from(fd)).map_err(|e| HostError::io("back up", path, e))
    }

    fn user_id(&self, name: &str) -> HostResult<Option<u32>> {
        if self.root.is_slash() {
            return self.remember(
                |n| &mut n.users,
                name,
                || {
                    nix::unistd::User::from_name(name)
                        .map(|u| u.map(|u| u.uid.as_raw()))
                        .map_err(|e| HostError::io("look up user", name, errno(e)))
                },
            );
        }
        Ok(self.with_accounts(|a| a.user(name).map(|u| u.uid)).ok().flatten())
    }

    fn group_id(&self, name: &str) -> HostResult<Option<u32>> {
        if self.root.is_slash() {
            return self.remember(
                |n| &mut n.groups,
                name,
                || {
                    nix::unistd::Group::from_name(name)
                        .map(|g| g.map(|g| g.gid.as_raw()))
                        .map_err(|e| HostError::io("look up group", name, errno(e)))
                },
            );
        }
        Ok(self.with_accounts(|a| a.group(name).map(|g| g.gid)).ok().flatten())
    }

    fn user_name(&self, uid: u32) -> Option<String> {
        if self.root.is_slash() {
            let look = || Ok(nix::unistd::User::from_uid(Uid::from_raw(uid)).ok().flatten().map(|u| u.name));
            return self.remember(|n| &mut n.uids, &uid, look).ok().flatten();
        }
        self.with_accounts(|a| a.users.iter().find(|u| u.uid == uid).map(|u| u.name.clone())).ok().flatten()
    }

    fn group_name(&self, gid: u32) -> Option<String> {
        if self.root.is_slash() {
            let look = || Ok(nix::unistd::Group::from_gid(Gid::from_raw(gid)).ok().flatten().map(|g| g.name));
            return self.remember(|n| &mut n.gids, &gid, look).ok().flatten();
        }
        self.with_accounts(|a| a.groups.iter().find(|g| g.gid == gid).map(|g| g.name.clone())).ok().flatten()
    }

    fn image_root(&self) -> Option<String> {
        (!self.root.is_slash()).then(|| self.root.path().display().to_string())
    }

    fn run(&self, cmd: &Run) -> HostResult<Ran> {
        let user = match cmd.user {
            None => None,
            Some(name) => {
                let found = self.with_accounts(|accounts| {
                    let u = accounts.user(name)?;
                    let mut groups: Vec<u32> =
                        accounts.groups.iter().filter(|g| g.members.iter().any(|m| m == name)).map(|g| g.gid).collect();
                    groups.push(u.gid);
                    Some((u.uid, u.gid, groups, u.home.clone(), u.name.clone()))
                })?;
                let Some(found) = found else {
                    return Err(HostError::Refused(format!("user `{name}` does not exist on this system")));
                };
                Some(found)
            }
        };
        let chroot = (!cmd.outside && !self.root.is_slash()).then(|| self.root.path());
        let spec = command::Spec {
            user,
            cwd: cmd.cwd,
            env: cmd.env,
            stdin: cmd.stdin,
            ..command::Spec::new(cmd.argv, chroot, cmd.timeout)
        };
        let ran = command::execute(&spec);
        // Any command may have changed the accounts (a package's scripts add users).
        *self.accounts.borrow_mut() = None;
        *self.names.borrow_mut() = Names::default();
        ran
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files whose size says 0 are read whole: a sysctl's (an integer's answers only the first
    /// read), mountinfo (a page a read); a regular file at its size, and not over the limit.
    #[test]
    fn proc_files_are_read_whole() {
        let host =
            RealHost::new(Root::open(std::path::Path::new("/")).unwrap(), BackupStore::new(crate::state::STATE_DIR));
        let boot_id = host.read_file("/proc/sys/kernel/random/boot_id", 4096).unwrap().unwrap().content.unwrap();
        assert_eq!(boot_id.len(), 37, "a uuid and its newline: {:?}", String::from_utf8_lossy(&boot_id));
        let mountinfo = host.read_file("/proc/self/mountinfo", 4 << 20).unwrap().unwrap().content.unwrap();
        let expected = std::fs::read("/proc/self/mountinfo").unwrap();
        assert_eq!(mountinfo.len() / 100, expected.len() / 100, "read to its end");
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("f"), "0123456789").unwrap();
        let host = RealHost::new(Root::open(t.path()).unwrap(), BackupStore::new(crate::state::STATE_DIR));
        assert_eq!(host.read_file("/f", 10).unwrap().unwrap().content.as_deref(), Some(&b"0123456789"[..]));
        assert_eq!(host.read_file("/f", 9).unwrap().unwrap().content, None, "over the limit: not read");
    }

    /// Names resolve once a run, and again after the files they come from were written (or a
    /// command ran, which may have added an account).
    #[test]
    fn names_are_looked_up_once_and_again_after_their_files_change() {
        let host =
            RealHost::new(Root::open(std::path::Path::new("/")).unwrap(), BackupStore::new(crate::state::STATE_DIR));
        for _ in 0..3 {
            assert_eq!(host.user_id("root").unwrap(), Some(0));
            assert_eq!(host.group_id("root").unwrap(), Some(0));
            assert_eq!(host.user_name(0).as_deref(), Some("root"));
            assert_eq!(host.group_name(0).as_deref(), Some("root"));
            assert_eq!(host.user_id("no-such-user-here").unwrap(), None);
        }
        assert_eq!(host.names.borrow().users.len(), 2, "answers, absent ones too, are kept");
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("etc")).unwrap();
        std::fs::write(t.path().join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        std::fs::write(t.path().join("etc/group"), "root:x:0:\n").unwrap();
        let host = RealHost::new(Root::open(t.path()).unwrap(), BackupStore::new(crate::state::STATE_DIR));
        assert_eq!(host.user_id("alice").unwrap(), None);
        let attrs = NewAttrs { mode: 0o644, uid: None, gid: None };
        let passwd = "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n";
        host.write_file("/etc/passwd", passwd.as_bytes(), attrs, None).unwrap();
        assert_eq!(host.user_id("alice").unwrap(), Some(1000), "read again once /etc/passwd was written");
        host.write_file("/etc/group", b"root:x:0:\nalice:x:1000:\n", attrs, None).unwrap();
        assert_eq!(host.group_name(1000).as_deref(), Some("alice"));
    }

    /// A held batch: nothing is in place before the release, everything after; a rename that
    /// fails is that file's failure alone, and leaves no temporary file behind.
    #[test]
    fn held_files_go_in_place_together_and_fail_alone() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("d/old"), "old").unwrap();
        let host = RealHost::new(Root::open(&root).unwrap(), BackupStore::new(crate::state::STATE_DIR));
        let attrs = NewAttrs { mode: 0o640, uid: None, gid: None };
        host.hold_flushes();
        host.mkdir("/e", NewAttrs { mode: 0o750, uid: None, gid: None }).unwrap();
        host.write_file("/d/old", b"new", attrs, None).unwrap();
        host.write_file("/d/fresh", b"fresh", attrs, None).unwrap();
        host.write_file("/e/blocked", b"x", attrs, None).unwrap();
        assert_eq!(std::fs::read_to_string(root.join("d/old")).unwrap(), "old", "not in place before the release");
        assert!(!root.join("d/fresh").exists());
        assert!(root.join("e").is_dir(), "a directory is made at once (its files go in it)");
        // Something takes the path of a held file before the release.
        std::fs::create_dir_all(root.join("e/blocked/inside")).unwrap();
        let failed = host.release_flushes();
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].0.as_deref(), Some("/e/blocked"));
        assert!(failed[0].1.to_string().contains("rename into place"), "{}", failed[0].1);
        assert_eq!(std::fs::read_to_string(root.join("d/old")).unwrap(), "new");
        assert_eq!(std::fs::read_to_string(root.join("d/fresh")).unwrap(), "fresh");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(root.join("d/fresh")).unwrap().permissions().mode() & 0o7777, 0o640);
        let names = |d: &str| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(root.join(d))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names("d"), ["fresh", "old"], "no temporary file left");
        assert_eq!(names("e"), ["blocked"]);
        // Released: writes are immediate again, and a second release has nothing to do.
        host.write_file("/d/later", b"l", attrs, None).unwrap();
        assert!(root.join("d/later").exists());
        assert!(host.release_flushes().is_empty());
    }

    #[test]
    fn a_directory_moved_out_of_the_root_receives_no_more_writes() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("d/a"), "a").unwrap();
        let host = RealHost::new(Root::open(&root).unwrap(), BackupStore::new(crate::state::STATE_DIR));
        let attrs = NewAttrs { mode: 0o644, uid: None, gid: None };
        // The run looks at /d (its descriptor is kept for the next lookups)...
        assert!(host.read_file("/d/a", 100).unwrap().is_some());
        // ...then /d is moved out of the root while the run goes on.
        std::fs::rename(root.join("d"), t.path().join("outside")).unwrap();
        for (what, result) in [
            ("write", host.write_file("/d/b", b"x", attrs, None)),
            ("mkdir", host.mkdir("/d/c", attrs)),
            ("symlink", host.symlink("/d/l", "x")),
            ("chmod", host.set_mode("/d/a", 0o600)),
            ("remove", host.remove("/d/a")),
        ] {
            assert!(result.is_err(), "{what} went through");
        }
        let outside: Vec<_> =
            std::fs::read_dir(t.path().join("outside")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(outside, ["a"], "nothing reached the moved directory");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(t.path().join("outside/a")).unwrap().permissions().mode() & 0o777, 0o644);
    }
}
