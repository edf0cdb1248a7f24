//! A host held in memory, for testing providers and the engine without touching a disk.
//!
//! Paths are keys in a map; a parent must be a directory. Intermediate symlinks are not
//! followed (providers never rely on that). Every mutation is counted so tests can assert that
//! a dry-run made none, and failures can be injected per path.

use super::*;
use crate::catalog::parent_path;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemNode {
    File { content: Vec<u8>, mode: u32, uid: u32, gid: u32 },
    Directory { mode: u32, uid: u32, gid: u32 },
    Symlink { target: String },
    Fifo,
}

type Validator = Box<dyn Fn(&[String], &[u8]) -> Result<(), String>>;

#[derive(Default)]
struct Inner {
    nodes: BTreeMap<String, MemNode>,
    users: BTreeMap<String, u32>,
    groups: BTreeMap<String, u32>,
    backups: Vec<(String, Vec<u8>)>,
    mutations: usize,
    failures: HashMap<String, String>,
    validator: Option<Validator>,
}

pub struct MemHost {
    inner: RefCell<Inner>,
}

impl Default for MemHost {
    fn default() -> Self {
        MemHost::new()
    }
}

fn enoent(op: &'static str, path: &str) -> HostError {
    HostError::io(op, path, io::Error::from(io::ErrorKind::NotFound))
}

impl MemHost {
    /// An empty root directory, with `root` (uid 0) and `root` (gid 0).
    pub fn new() -> MemHost {
        let mut inner = Inner::default();
        inner.nodes.insert("/".into(), MemNode::Directory { mode: 0o755, uid: 0, gid: 0 });
        inner.users.insert("root".into(), 0);
        inner.groups.insert("root".into(), 0);
        MemHost { inner: RefCell::new(inner) }
    }

    pub fn with_user(self, name: &str, uid: u32) -> Self {
        self.inner.borrow_mut().users.insert(name.into(), uid);
        self
    }

    pub fn with_group(self, name: &str, gid: u32) -> Self {
        self.inner.borrow_mut().groups.insert(name.into(), gid);
        self
    }

    /// Puts a node at `path`, creating missing parent directories.
    pub fn put(&self, path: &str, node: MemNode) {
        let mut inner = self.inner.borrow_mut();
        let mut p = parent_path(path);
        while let Some(dir) = p {
            inner.nodes.entry(dir.to_string()).or_insert(MemNode::Directory { mode: 0o755, uid: 0, gid: 0 });
            p = parent_path(dir);
        }
        inner.nodes.insert(path.to_string(), node);
    }

    pub fn with_file(self, path: &str, content: &str, mode: u32) -> Self {
        self.put(path, MemNode::File { content: content.as_bytes().to_vec(), mode, uid: 0, gid: 0 });
        self
    }

    pub fn with_dir(self, path: &str, mode: u32) -> Self {
        self.put(path, MemNode::Directory { mode, uid: 0, gid: 0 });
        self
    }

    pub fn with_symlink(self, path: &str, target: &str) -> Self {
        self.put(path, MemNode::Symlink { target: target.into() });
        self
    }

    /// Makes every mutation of `path` fail with `message`.
    pub fn fail_on(self, path: &str, message: &str) -> Self {
        self.inner.borrow_mut().failures.insert(path.into(), message.into());
        self
    }

    /// Decides the outcome of `validate` commands from their argv and the new content.
    pub fn with_validator(self, f: impl Fn(&[String], &[u8]) -> Result<(), String> + 'static) -> Self {
        self.inner.borrow_mut().validator = Some(Box::new(f));
        self
    }

    pub fn node(&self, path: &str) -> Option<MemNode> {
        self.inner.borrow().nodes.get(path).cloned()
    }

    pub fn content(&self, path: &str) -> Option<String> {
        match self.node(path)? {
            MemNode::File { content, .. } => Some(String::from_utf8_lossy(&content).into_owned()),
            _ => None,
        }
    }

    /// How many changes have been made since creation.
    pub fn mutations(&self) -> usize {
        self.inner.borrow().mutations
    }

    /// Every backup taken, as (path, content).
    pub fn backups(&self) -> Vec<(String, Vec<u8>)> {
        self.inner.borrow().backups.clone()
    }

    /// All paths and nodes: a snapshot to compare before and after.
    pub fn snapshot(&self) -> BTreeMap<String, MemNode> {
        self.inner.borrow().nodes.clone()
    }

    fn mutate(&self, op: &'static str, path: &str) -> HostResult<std::cell::RefMut<'_, Inner>> {
        let mut inner = self.inner.borrow_mut();
        if let Some(msg) = inner.failures.get(path) {
            return Err(HostError::io(op, path, io::Error::other(msg.clone())));
        }
        match parent_path(path).map(|p| inner.nodes.get(p)) {
            None | Some(Some(MemNode::Directory { .. })) => {}
            Some(None) => return Err(enoent(op, path)),
            Some(Some(_)) => {
                return Err(HostError::io(op, path, io::Error::from(io::ErrorKind::NotADirectory)));
            }
        }
        inner.mutations += 1;
        Ok(inner)
    }
}

fn stat_of(node: &MemNode) -> Stat {
    match node {
        MemNode::File { content, mode, uid, gid } => {
            Stat { file_type: FileType::File, mode: *mode, uid: *uid, gid: *gid, size: content.len() as u64 }
        }
        MemNode::Directory { mode, uid, gid } => {
            Stat { file_type: FileType::Directory, mode: *mode, uid: *uid, gid: *gid, size: 0 }
        }
        MemNode::Symlink { target } => {
            Stat { file_type: FileType::Symlink, mode: 0o777, uid: 0, gid: 0, size: target.len() as u64 }
        }
        MemNode::Fifo => Stat { file_type: FileType::Other("fifo"), mode: 0o644, uid: 0, gid: 0, size: 0 },
    }
}

impl Host for MemHost {
    fn stat(&self, path: &str) -> HostResult<Option<Stat>> {
        Ok(self.inner.borrow().nodes.get(path).map(stat_of))
    }

    fn read_file(&self, path: &str, limit: u64) -> HostResult<Option<FileRead>> {
        let inner = self.inner.borrow();
        Ok(inner.nodes.get(path).map(|node| {
            let stat = stat_of(node);
            let content = match node {
                MemNode::File { content, .. } if content.len() as u64 <= limit => Some(content.clone()),
                _ => None,
            };
            FileRead { stat, content }
        }))
    }

    fn read_link(&self, path: &str) -> HostResult<String> {
        match self.inner.borrow().nodes.get(path) {
            Some(MemNode::Symlink { target }) => Ok(target.clone()),
            Some(_) => Err(HostError::io("readlink", path, io::Error::from(io::ErrorKind::InvalidInput))),
            None => Err(enoent("readlink", path)),
        }
    }

    fn list_dir(&self, path: &str) -> HostResult<Vec<(String, FileType)>> {
        let inner = self.inner.borrow();
        match inner.nodes.get(path) {
            Some(MemNode::Directory { .. }) => {}
            Some(_) => {
                return Err(HostError::io("list", path, io::Error::from(io::ErrorKind::NotADirectory)));
            }
            None => return Err(enoent("list", path)),
        }
        let prefix = if path == "/" { "/".to_string() } else { format!("{path}/") };
        Ok(inner
            .nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| !k[prefix.len()..].contains('/') && k.len() > prefix.len())
            .map(|(k, n)| (k[prefix.len()..].to_string(), stat_of(n).file_type))
            .collect())
    }

    fn write_file(&self, path: &str, content: &[u8], attrs: NewAttrs, validate: Option<&[String]>) -> HostResult<()> {
        let mut inner = self.mutate("write", path)?;
        if let Some(MemNode::Directory { .. }) = inner.nodes.get(path) {
            return Err(HostError::io("rename onto", path, io::Error::from(io::ErrorKind::IsADirectory)));
        }
        if let Some(argv) = validate {
            let tmp = format!("{path}.converge-new");
            let argv: Vec<String> = argv.iter().map(|a| a.replace('%', &tmp)).collect();
            if let Some(f) = &inner.validator
                && let Err(output) = f(&argv, content)
            {
                return Err(HostError::Command { command: argv.join(" "), status: "exited with 1".into(), output });
            }
        }
        let node = MemNode::File {
            content: content.to_vec(),
            mode: attrs.mode,
            uid: attrs.uid.unwrap_or(0),
            gid: attrs.gid.unwrap_or(0),
        };
        inner.nodes.insert(path.to_string(), node);
        Ok(())
    }

    fn mkdir(&self, path: &str, attrs: NewAttrs) -> HostResult<()> {
        let mut inner = self.mutate("mkdir", path)?;
        if inner.nodes.contains_key(path) {
            return Err(HostError::io("mkdir", path, io::Error::from(io::ErrorKind::AlreadyExists)));
        }
        let node = MemNode::Directory { mode: attrs.mode, uid: attrs.uid.unwrap_or(0), gid: attrs.gid.unwrap_or(0) };
        inner.nodes.insert(path.to_string(), node);
        Ok(())
    }

    fn symlink(&self, path: &str, target: &str) -> HostResult<()> {
        let mut inner = self.mutate("symlink", path)?;
        if let Some(MemNode::Directory { .. }) = inner.nodes.get(path) {
            return Err(HostError::io("rename onto", path, io::Error::from(io::ErrorKind::IsADirectory)));
        }
        inner.nodes.insert(path.to_string(), MemNode::Symlink { target: target.to_string() });
        Ok(())
    }

    fn set_mode(&self, path: &str, new: u32) -> HostResult<()> {
        let mut inner = self.mutate("chmod", path)?;
        match inner.nodes.get_mut(path) {
            Some(MemNode::File { mode, .. } | MemNode::Directory { mode, .. }) => *mode = new,
            Some(_) => {}
            None => return Err(enoent("chmod", path)),
        }
        Ok(())
    }

    fn set_owner(&self, path: &str, new_uid: Option<u32>, new_gid: Option<u32>) -> HostResult<()> {
        let mut inner = self.mutate("chown", path)?;
        match inner.nodes.get_mut(path) {
            Some(MemNode::File { uid, gid, .. } | MemNode::Directory { uid, gid, .. }) => {
                *uid = new_uid.unwrap_or(*uid);
                *gid = new_gid.unwrap_or(*gid);
            }
            Some(_) => {}
            None => return Err(enoent("chown", path)),
        }
        Ok(())
    }

    fn remove(&self, path: &str) -> HostResult<()> {
        let has_children = !self.list_dir(path).unwrap_or_default().is_empty();
        let mut inner = self.mutate("remove", path)?;
        if has_children {
            return Err(HostError::io("remove", path, io::Error::from(io::ErrorKind::DirectoryNotEmpty)));
        }
        inner.nodes.remove(path).map(|_| ()).ok_or_else(|| enoent("remove", path))
    }

    fn backup(&self, path: &str) -> HostResult<String> {
        let mut inner = self.inner.borrow_mut();
        let content = match inner.nodes.get(path) {
            Some(MemNode::File { content, .. }) => content.clone(),
            _ => return Err(enoent("backup", path)),
        };
        let hash = crate::hash::sha256_id(&content);
        inner.backups.push((path.to_string(), content));
        Ok(hash)
    }

    fn user_id(&self, name: &str) -> HostResult<Option<u32>> {
        Ok(self.inner.borrow().users.get(name).copied())
    }

    fn group_id(&self, name: &str) -> HostResult<Option<u32>> {
        Ok(self.inner.borrow().groups.get(name).copied())
    }

    fn user_name(&self, uid: u32) -> Option<String> {
        self.inner.borrow().users.iter().find(|(_, u)| **u == uid).map(|(n, _)| n.clone())
    }

    fn group_name(&self, gid: u32) -> Option<String> {
        self.inner.borrow().groups.iter().find(|(_, g)| **g == gid).map(|(n, _)| n.clone())
    }
}

impl MemHost {
    /// The names in a directory (for assertions).
    pub fn list_dir_names(&self, path: &str) -> Vec<String> {
        self.list_dir(path).unwrap_or_default().into_iter().map(|(n, _)| n).collect()
    }
}
