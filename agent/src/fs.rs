//! Paths resolved inside a root directory, as if it were `/`.
//!
//! Every lookup starts from a file descriptor of the root and is resolved by the kernel with
//! `openat2(RESOLVE_IN_ROOT)`: an absolute symlink, or `..`, met on the way is taken relative to
//! the root, so nothing planted inside the root can lead a read or a write outside it. Kernels
//! older than 5.6 lack `openat2`; there the same rules are applied by walking one component at a
//! time with `O_NOFOLLOW` and resolving symlinks here ([`Resolver::Walk`]).
//!
//! The last component of a path is never followed: operations act on a symlink itself.

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// How paths are resolved inside the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolver {
    /// The kernel does it (`openat2` with `RESOLVE_IN_ROOT`), Linux 5.6 and later.
    Openat2,
    /// Component by component in user space, for older kernels.
    Walk,
}

pub fn errno(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// A directory treated as `/`.
pub struct Root {
    path: PathBuf,
    fd: OwnedFd,
    resolver: Resolver,
    /// The last parent directory opened, by path: files are usually declared directory by
    /// directory, so most lookups reuse it.
    parent_cache: RefCell<Option<(String, Rc<OwnedFd>)>>,
}

/// The most the agent reads of one system file (dpkg's status on a large system is tens of MB).
pub const MAX_SYSTEM_FILE: u64 = 256 << 20;

/// The most symlinks followed in one lookup, as the kernel's limit.
const MAX_LINKS: usize = 40;

impl Root {
    /// Opens `path` as a root, choosing the resolver this kernel supports.
    pub fn open(path: &Path) -> io::Result<Root> {
        let fd = nix::fcntl::open(path, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(errno)?;
        let how = OpenHow::new().flags(OFlag::O_PATH | OFlag::O_CLOEXEC).resolve(ResolveFlag::RESOLVE_IN_ROOT);
        let resolver = match openat2(&fd, ".", how) {
            // CONVERGE_RESOLVER=walk reproduces an old kernel's behaviour on a new one.
            Ok(_) if std::env::var_os("CONVERGE_RESOLVER").is_some_and(|v| v == "walk") => Resolver::Walk,
            Ok(_) => Resolver::Openat2,
            Err(Errno::ENOSYS | Errno::EPERM) => Resolver::Walk,
            Err(e) => return Err(errno(e)),
        };
        tracing::debug!(?resolver, root = %path.display(), "opened root");
        Ok(Root { path: path.to_path_buf(), fd, resolver, parent_cache: RefCell::new(None) })
    }

    /// The same root with another resolver (tests prove both).
    #[cfg(test)]
    pub fn with_resolver(mut self, resolver: Resolver) -> Root {
        self.resolver = resolver;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_slash(&self) -> bool {
        self.path == Path::new("/")
    }

    /// Opens `path`, resolving every component inside the root. The last component is followed
    /// only when `follow_last`.
    pub fn open_at(&self, path: &str, flags: OFlag, mode: u32, follow_last: bool) -> io::Result<OwnedFd> {
        let rel = path.trim_start_matches('/');
        let rel = if rel.is_empty() { "." } else { rel };
        let mut flags = flags | OFlag::O_CLOEXEC;
        if !follow_last {
            flags |= OFlag::O_NOFOLLOW;
        }
        match self.resolver {
            Resolver::Openat2 => {
                let how = OpenHow::new()
                    .flags(flags)
                    .mode(Mode::from_bits_truncate(mode))
                    .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
                // The kernel answers EAGAIN when a rename or mount anywhere raced a lookup that
                // went through `..`: ask again, and past a bound walk in user space instead.
                for _ in 0..16 {
                    match openat2(&self.fd, rel, how) {
                        Err(Errno::EAGAIN) => continue,
                        r => return r.map_err(errno),
                    }
                }
                self.walk(rel, flags, mode, follow_last)
            }
            Resolver::Walk => self.walk(rel, flags, mode, follow_last),
        }
    }

    /// The user-space resolver: each component is opened with `O_NOFOLLOW` relative to the
    /// one before; a symlink's target is spliced into the components still to walk (from the
    /// root when absolute); `..` never goes above the root.
    fn walk(&self, rel: &str, flags: OFlag, mode: u32, follow_last: bool) -> io::Result<OwnedFd> {
        let dup = || openat(&self.fd, ".", OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty());
        let mut stack: Vec<OwnedFd> = vec![dup().map_err(errno)?];
        let mut todo: VecDeque<Vec<u8>> = components(rel.as_bytes()).collect();
        let mut links = 0;
        let open_last = |dir: &OwnedFd, name: &[u8]| {
            openat(dir, OsStr::from_bytes(name), flags | OFlag::O_NOFOLLOW, Mode::from_bits_truncate(mode))
                .map_err(errno)
        };
        while let Some(comp) = todo.pop_front() {
            let last = todo.is_empty();
            if comp == b".." {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            let cur = stack.last().expect("the root stays on the stack");
            let name = OsStr::from_bytes(&comp);
            if last && !follow_last {
                return open_last(cur, &comp);
            }
            let st = fstatat(cur, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(errno)?;
            if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK {
                links += 1;
                if links > MAX_LINKS {
                    return Err(errno(Errno::ELOOP));
                }
                let target = readlinkat(cur, name).map_err(errno)?;
                let target = target.as_bytes();
                if target.first() == Some(&b'/') {
                    stack.truncate(1);
                }
                for c in components(target).collect::<Vec<_>>().into_iter().rev() {
                    todo.push_front(c);
                }
                continue;
            }
            if last {
                return open_last(cur, &comp);
            }
            let next = openat(
                cur,
                name,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(errno)?;
            stack.push(next);
        }
        // The path named the root itself, or ended in `..`.
        openat(stack.last().expect("root"), ".", flags & !OFlag::O_NOFOLLOW, Mode::from_bits_truncate(mode))
            .map_err(errno)
    }

    /// The directory holding `path` (opened for reading, so it can be fsync'ed) and the last
    /// component's name. Intermediate symlinks are followed inside the root.
    pub fn parent<'p>(&self, path: &'p str) -> io::Result<(Rc<OwnedFd>, &'p str)> {
        let (dir, name) = match path.rfind('/') {
            Some(0) => ("/", &path[1..]),
            Some(i) => (&path[..i], &path[i + 1..]),
            None => {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "not an absolute path"));
            }
        };
        if name.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "the root itself has no parent"));
        }
        if let Some((cached, fd)) = &*self.parent_cache.borrow()
            && cached == dir
        {
            return Ok((fd.clone(), name));
        }
        let fd = Rc::new(self.open_at(dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0, true)?);
        *self.parent_cache.borrow_mut() = Some((dir.to_string(), fd.clone()));
        Ok((fd, name))
    }

    /// [`Root::parent`] resolved afresh from the root, for a change: a directory renamed or
    /// moved out of the root since it was last looked up must not receive the change through
    /// a descriptor that still points at it. Reads may use the cache; writes never do.
    pub fn parent_fresh<'p>(&self, path: &'p str) -> io::Result<(Rc<OwnedFd>, &'p str)> {
        self.forget_dirs();
        self.parent(path)
    }

    /// Forgets cached directories: after a directory is removed or replaced.
    pub fn forget_dirs(&self) {
        self.parent_cache.borrow_mut().take();
    }

    /// `lstat` of `path` inside the root; `None` when nothing is there.
    pub fn lstat(&self, path: &str) -> io::Result<Option<FileStat>> {
        if path == "/" {
            return fstat(self.fd.as_fd()).map(Some).map_err(errno);
        }
        let (dir, name) = match self.parent(path) {
            Ok(x) => x,
            Err(e) if absent(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        match fstatat(&*dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::ENOENT | Errno::ENOTDIR) => Ok(None),
            Err(e) => Err(errno(e)),
        }
    }

    /// Creates `path` and its missing parents as directories with `mode` (like `mkdir -p`).
    pub fn create_dir_all(&self, path: &str, mode: u32) -> io::Result<()> {
        match self.lstat(path)? {
            Some(st) if file_type(&st) == converge_modules::host::FileType::Directory => {
                return Ok(());
            }
            Some(_) => {
                return Err(io::Error::other(format!("{path} exists and is not a directory")));
            }
            None => {}
        }
        if let Some(i) = path.rfind('/').filter(|&i| i > 0) {
            self.create_dir_all(&path[..i], mode)?;
        }
        let (dir, name) = self.parent(path)?;
        match nix::sys::stat::mkdirat(&*dir, name, Mode::from_bits_truncate(mode)) {
            Ok(()) | Err(Errno::EEXIST) => Ok(()),
            Err(e) => Err(errno(e)),
        }
    }

    /// Reads a whole file of the system, following symlinks inside the root (for /etc/passwd,
    /// dpkg's status and the like): a regular file only (never a device or a fifo), at most
    /// [`MAX_SYSTEM_FILE`] bytes.
    pub fn read_to_string(&self, path: &str) -> io::Result<String> {
        use std::io::Read;
        let fd = self.open_at(path, OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY, 0, true)?;
        let kind = file_type(&fstat(&fd).map_err(errno)?);
        if kind != converge_modules::host::FileType::File {
            return Err(io::Error::other(format!("is a {kind}, not a regular file")));
        }
        let mut text = String::new();
        std::fs::File::from(fd).take(MAX_SYSTEM_FILE + 1).read_to_string(&mut text)?;
        if text.len() as u64 > MAX_SYSTEM_FILE {
            return Err(io::Error::other(format!("is more than the {MAX_SYSTEM_FILE} bytes read of a system file")));
        }
        Ok(text)
    }

    /// Reads one of the agent's own files: a regular file, never through a symlink in its last
    /// component, at most `max` bytes (checked before reading, and again while reading, as
    /// the file may grow). Anything else is an error that says what was found.
    pub fn read_bounded(&self, path: &str, max: u64) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let fd = self.open_at(path, OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY, 0, false).map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) { io::Error::other("is a symbolic link") } else { e }
        })?;
        let st = fstat(&fd).map_err(errno)?;
        let kind = file_type(&st);
        if kind != converge_modules::host::FileType::File {
            return Err(io::Error::other(format!("is a {kind}, not a regular file")));
        }
        let too_big = |n: u64| io::Error::other(format!("is {n} bytes, more than the {max} it can be"));
        if st.st_size as u64 > max {
            return Err(too_big(st.st_size as u64));
        }
        let mut bytes = Vec::with_capacity(st.st_size as usize);
        std::fs::File::from(fd).take(max + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > max {
            return Err(too_big(bytes.len() as u64));
        }
        Ok(bytes)
    }
}

/// True for errors meaning "nothing there" (a missing component, or a file where a directory
/// was expected).
pub fn absent(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
}

fn components(path: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    path.split(|b| *b == b'/').filter(|c| !c.is_empty() && *c != b".").map(<[u8]>::to_vec)
}

pub fn file_type(st: &FileStat) -> converge_modules::host::FileType {
    use converge_modules::host::FileType;
    match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFREG => FileType::File,
        SFlag::S_IFDIR => FileType::Directory,
        SFlag::S_IFLNK => FileType::Symlink,
        SFlag::S_IFIFO => FileType::Other("fifo"),
        SFlag::S_IFSOCK => FileType::Other("socket"),
        SFlag::S_IFCHR => FileType::Other("character device"),
        SFlag::S_IFBLK => FileType::Other("block device"),
        _ => FileType::Other("unknown file type"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A root with an outside world beside it, and symlinks planted inside that point out.
    fn setup() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/inside"), "inside").unwrap();
        std::fs::write(t.path().join("outside"), "outside").unwrap();
        symlink(t.path(), root.join("up")).unwrap(); // absolute, out of the root
        symlink("../..", root.join("etc/dots")).unwrap(); // relative, climbs out
        symlink("/etc", root.join("abs")).unwrap(); // absolute: means the root's /etc
        (t, root)
    }

    fn check(resolver: Resolver) {
        let (_t, root_path) = setup();
        let root = Root::open(&root_path).unwrap().with_resolver(resolver);
        let read = |p: &str| root.read_to_string(p);
        assert_eq!(read("/etc/inside").unwrap(), "inside");
        assert_eq!(read("/abs/inside").unwrap(), "inside", "an absolute link resolves in the root");
        assert!(read("/up/outside").is_err(), "an absolute link out of the root stays in the root");
        assert!(read("/etc/dots/outside").is_err(), "`..` stops at the root");
        assert!(read("/../outside").is_err());
        assert_eq!(read("/etc/dots/etc/inside").unwrap(), "inside");
        // The last component is never followed when asked not to.
        assert!(root.open_at("/abs", OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0, false).is_err());
        let e = root.parent("/up/outside").unwrap_err();
        assert!(absent(&e), "the link's target is looked up in the root, where it does not exist: {e}");
    }

    #[test]
    fn openat2_keeps_lookups_inside_the_root() {
        check(Resolver::Openat2);
    }

    #[test]
    fn the_walk_keeps_lookups_inside_the_root() {
        check(Resolver::Walk);
    }

    #[test]
    fn lookups_through_dots_survive_renames_elsewhere() {
        // Any rename on the system can make the kernel refuse a `..` lookup with EAGAIN.
        let (_t, root_path) = setup();
        let busy = tempfile::tempdir().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let renamer = {
            let (dir, stop) = (busy.path().to_path_buf(), stop.clone());
            std::fs::write(dir.join("a"), "x").unwrap();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::fs::rename(dir.join("a"), dir.join("b")).unwrap();
                    std::fs::rename(dir.join("b"), dir.join("a")).unwrap();
                }
            })
        };
        let root = Root::open(&root_path).unwrap().with_resolver(Resolver::Openat2);
        let failures = (0..20_000).filter(|_| root.read_to_string("/etc/dots/etc/inside").is_err()).count();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        renamer.join().unwrap();
        assert_eq!(failures, 0, "lookups failed while files were renamed elsewhere");
    }

    #[test]
    fn system_files_are_regular_files_read_within_a_bound() {
        let (_t, root_path) = setup();
        // A fifo (nothing ever writes it) where a system file is looked for, reached through
        // a symlink as /etc/os-release -> ../usr/lib/os-release is.
        nix::unistd::mkfifo(&root_path.join("etc/fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        symlink("fifo", root_path.join("etc/os-release")).unwrap();
        let root = Root::open(&root_path).unwrap();
        let e = root.read_to_string("/etc/os-release").unwrap_err();
        assert!(e.to_string().contains("fifo, not a regular file"), "{e}");
        assert_eq!(root.read_to_string("/etc/inside").unwrap(), "inside");
    }

    #[test]
    fn link_loops_end() {
        let t = tempfile::tempdir().unwrap();
        symlink("/b", t.path().join("a")).unwrap();
        symlink("/a", t.path().join("b")).unwrap();
        for r in [Resolver::Openat2, Resolver::Walk] {
            let root = Root::open(t.path()).unwrap().with_resolver(r);
            assert_eq!(root.read_to_string("/a/x").unwrap_err().raw_os_error(), Some(libc::ELOOP), "{r:?}");
        }
    }
}
