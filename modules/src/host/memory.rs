//! A host held in memory, for testing providers and the engine without touching a disk.
//!
//! Paths are keys in a map; a parent must be a directory. Intermediate symlinks are not
//! followed (providers never rely on that). Every mutation is counted so tests can assert that
//! a dry-run made none, and failures can be injected per path.
//!
//! Its system (packages, accounts, units) is held as data and reached as a real one is: the
//! files the tools keep (`/var/lib/dpkg/status`, `/etc/passwd`, `/etc/group`, `/etc/shadow`,
//! `/etc/os-release`, unit files) read back rendered from that data, and the tools' command
//! lines (`apt-get`, `apt-cache policy`, shadow-utils, `chpasswd`, `systemctl`, `journalctl`)
//! emulated with their outputs and exit codes. Any other command is decided by
//! [`MemHost::with_runner`].

use super::*;
use crate::catalog::parent_path;
use crate::providers::account::{Account, AccountOp, Accounts, GroupEntry, UserFields};
use crate::providers::package::{Install, Installed};
use crate::providers::service::{Unit, UnitAction};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemNode {
    File { content: Vec<u8>, mode: u32, uid: u32, gid: u32 },
    Directory { mode: u32, uid: u32, gid: u32 },
    Symlink { target: String },
    Fifo,
}

type Validator = Box<dyn Fn(&[String], &[u8]) -> Result<(), String>>;
type Runner = Box<dyn Fn(&MemHost, &Run) -> Ran>;
type Script = Box<dyn Fn(&MemHost)>;

/// The system side of a memory host: packages, accounts, units, commands.
#[derive(Default)]
struct System {
    installed: BTreeMap<String, Installed>,
    /// Versions each package has in the "repositories", newest last.
    repo: BTreeMap<String, Vec<String>>,
    accounts: Accounts,
    units: BTreeMap<String, Unit>,
    /// How many times each unit was started (restarts included) and reloaded.
    starts: BTreeMap<String, usize>,
    reloads: BTreeMap<String, usize>,
    image: bool,
    /// Every operation that a real host carries out with a process, in order.
    processes: Vec<String>,
    runner: Option<Runner>,
    /// What installing a package does beyond installing it (its maintainer scripts).
    scripts: BTreeMap<String, std::rc::Rc<Script>>,
    /// /proc/sys is read-only (a container's): systemd-sysctl succeeds and changes nothing.
    sysctl_read_only: bool,
    /// A repository fetched alone fails its signature check.
    refuse_repositories: bool,
    /// Units systemd learnt from a file under /etc/systemd/system at a daemon-reload.
    file_units: std::collections::BTreeSet<String>,
}

#[derive(Default)]
struct Inner {
    nodes: BTreeMap<String, MemNode>,
    system: System,
    backups: Vec<(String, Vec<u8>)>,
    mutations: usize,
    failures: HashMap<String, String>,
    validator: Option<Validator>,
    /// Files written while flushes are held, put in place at the release.
    held: Option<Vec<(String, MemNode)>>,
    /// How many held batches were released with files in them.
    releases: usize,
    /// Paths whose held file fails to go in place at the release.
    release_failures: HashSet<String>,
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
        inner.system.accounts.system_max = 999;
        MemHost { inner: RefCell::new(inner) }.with_group("root", 0).with_user("root", 0)
    }

    /// A user whose primary group has the same id, home /home/NAME, shell /bin/sh.
    pub fn with_user(self, name: &str, uid: u32) -> Self {
        self.inner.borrow_mut().system.accounts.users.push(Account {
            name: name.into(),
            uid,
            gid: uid,
            comment: String::new(),
            home: format!("/home/{name}"),
            shell: "/bin/sh".into(),
            password_hash: None,
        });
        self
    }

    pub fn with_group(self, name: &str, gid: u32) -> Self {
        let entry = GroupEntry { name: name.into(), gid, members: vec![] };
        self.inner.borrow_mut().system.accounts.groups.push(entry);
        self
    }

    /// Adds `user` to the members of `group`.
    pub fn with_member(self, group: &str, user: &str) -> Self {
        if let Some(g) = self.inner.borrow_mut().system.accounts.groups.iter_mut().find(|g| g.name == group) {
            g.members.push(user.into());
        }
        self
    }

    /// A package the repositories offer, in these versions (oldest first).
    pub fn with_available(self, name: &str, versions: &[&str]) -> Self {
        self.inner.borrow_mut().system.repo.insert(name.into(), versions.iter().map(|v| v.to_string()).collect());
        self
    }

    pub fn with_installed(self, name: &str, version: &str, held: bool) -> Self {
        let p = Installed { version: version.into(), held };
        self.inner.borrow_mut().system.installed.insert(name.into(), p);
        self
    }

    /// A service unit, `active` or not, `enabled` as systemctl says it (enabled, disabled, static).
    pub fn with_unit(self, name: &str, active: bool, enabled: &str) -> Self {
        self.add_unit(name, active, enabled);
        self
    }

    /// As [`MemHost::with_unit`], from a maintainer script.
    pub fn add_unit(&self, name: &str, active: bool, enabled: &str) {
        let unit = Unit {
            exists: true,
            active: if active { "active" } else { "inactive" }.into(),
            enabled: enabled.into(),
            can_reload: true,
            needs_daemon_reload: false,
        };
        self.inner.borrow_mut().system.units.insert(unit_name(name), unit);
    }

    /// Marks a unit as changed on disk since systemd read it.
    pub fn unit_file_changed(&self, name: &str) {
        if let Some(u) = self.inner.borrow_mut().system.units.get_mut(&unit_name(name)) {
            u.needs_daemon_reload = true;
        }
    }

    /// An image under `--root` rather than a running system.
    pub fn as_image(self) -> Self {
        self.inner.borrow_mut().system.image = true;
        self
    }

    /// Repositories whose lists apt refuses (a wrong key).
    pub fn refuse_repositories(self) -> Self {
        self.inner.borrow_mut().system.refuse_repositories = true;
        self
    }

    /// A /proc/sys that takes no value, as in a container.
    pub fn refuse_sysctl(self) -> Self {
        self.inner.borrow_mut().system.sysctl_read_only = true;
        self
    }

    /// `systemd-sysctl FILE...` (and `sysctl -p FILE`): each assignment of the files written to
    /// /proc/sys, where that parameter exists; like the real tool, a value the kernel does not
    /// take is not an error.
    fn sysctl_apply(&self, args: &[&str]) -> Result<String, Failed> {
        use crate::providers::sysctl::{assignments, key_path};
        for file in operands(args) {
            let text = self.content(file).ok_or((1, format!("{file}: no such file")))?;
            for (key, value, _) in assignments(&text) {
                let proc = format!("/proc/sys/{}", key_path(&key));
                if !self.inner.borrow().system.sysctl_read_only
                    && matches!(self.node(&proc), Some(MemNode::File { .. }))
                {
                    self.put(&proc, system_node(format!("{value}\n").into_bytes()));
                }
            }
        }
        Ok(String::new())
    }

    /// `mount MP` from its fstab entry, `umount MP`, `mount -o remount MP`: kept in
    /// /proc/self/mountinfo.
    fn mount(&self, unmount: bool, args: &[&str]) -> Result<String, Failed> {
        use crate::providers::mount::{escape, unescape};
        let mp = operands(args).last().map(|s| s.to_string()).ok_or((1, "mount: no mount point".to_string()))?;
        let info = "/proc/self/mountinfo";
        let mut lines: Vec<String> = self.content(info).unwrap_or_default().lines().map(str::to_string).collect();
        let here = |l: &String| l.split(' ').nth(4).is_some_and(|m| unescape(m) == mp);
        if unmount {
            let i = lines.iter().rposition(here).ok_or((32, format!("umount: {mp}: not mounted.")))?;
            lines.remove(i);
        } else if flag(args, "-o").is_some_and(|o| o.contains("remount")) {
            lines.iter().rposition(here).ok_or((32, format!("mount: {mp}: mount point not mounted or bad option.")))?;
        } else {
            let fstab = self.content("/etc/fstab").unwrap_or_default();
            let fields: Vec<String> = fstab
                .lines()
                .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && !f[0].starts_with('#') && unescape(&f[1]) == mp)
                .ok_or((1, format!("mount: {mp}: can't find in /etc/fstab.")))?;
            lines.push(format!("99 1 0:99 / {} rw - {} {} rw", escape(&mp), fields[2], fields[0]));
        }
        self.put(info, system_node(lines.iter().map(|l| format!("{l}\n")).collect::<String>().into_bytes()));
        Ok(String::new())
    }

    /// Decides how commands end (default: exit 0, no output).
    pub fn with_runner(self, f: impl Fn(&MemHost, &Run) -> Ran + 'static) -> Self {
        self.inner.borrow_mut().system.runner = Some(Box::new(f));
        self
    }

    /// What installing `package` does besides (a maintainer script making its system user).
    pub fn with_install_script(self, package: &str, f: impl Fn(&MemHost) + 'static) -> Self {
        self.inner.borrow_mut().system.scripts.insert(package.into(), std::rc::Rc::new(Box::new(f)));
        self
    }

    /// Adds an account as a maintainer script would (`adduser --system`): a user with its group.
    pub fn add_account(&self, name: &str, id: u32, home: &str) {
        let mut inner = self.inner.borrow_mut();
        let a = &mut inner.system.accounts;
        a.groups.push(GroupEntry { name: name.into(), gid: id, members: vec![] });
        a.users.push(Account {
            name: name.into(),
            uid: id,
            gid: id,
            comment: String::new(),
            home: home.into(),
            shell: "/usr/sbin/nologin".into(),
            password_hash: None,
        });
    }

    pub fn installed_version(&self, name: &str) -> Option<String> {
        self.inner.borrow().system.installed.get(name).map(|p| p.version.clone())
    }

    pub fn account(&self, name: &str) -> Option<Account> {
        self.inner.borrow().system.accounts.user(name).cloned()
    }

    pub fn group(&self, name: &str) -> Option<GroupEntry> {
        self.inner.borrow().system.accounts.group(name).cloned()
    }

    pub fn unit(&self, name: &str) -> Option<Unit> {
        self.inner.borrow().system.units.get(&unit_name(name)).cloned()
    }

    /// How many times a unit was started or restarted, and reloaded.
    pub fn starts(&self, name: &str) -> (usize, usize) {
        let inner = self.inner.borrow();
        let n = unit_name(name);
        (inner.system.starts.get(&n).copied().unwrap_or(0), inner.system.reloads.get(&n).copied().unwrap_or(0))
    }

    /// Every operation a real host would run a process for, in order.
    pub fn processes(&self) -> Vec<String> {
        self.inner.borrow().system.processes.clone()
    }

    fn spawned(&self, what: String) {
        self.inner.borrow_mut().system.processes.push(what);
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

    /// How many held batches of files were released (each one shared flush on a real host).
    pub fn releases(&self) -> usize {
        self.inner.borrow().releases
    }

    /// The held file at `path` fails to go in place when its batch is released.
    pub fn fail_release(self, path: &str) -> Self {
        self.inner.borrow_mut().release_failures.insert(path.to_string());
        self
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
        if let Some(node) = self.inner.borrow().nodes.get(path) {
            return Ok(Some(stat_of(node)));
        }
        Ok(self.system_file(path).map(|content| stat_of(&system_node(content))))
    }

    fn read_file(&self, path: &str, limit: u64) -> HostResult<Option<FileRead>> {
        let inner = self.inner.borrow();
        let rendered = match inner.nodes.contains_key(path) {
            true => None,
            false => self.system_file(path).map(system_node),
        };
        Ok(inner.nodes.get(path).or(rendered.as_ref()).map(|node| {
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
        match inner.held.as_mut() {
            Some(held) => held.push((path.to_string(), node)),
            None => {
                inner.nodes.insert(path.to_string(), node);
            }
        }
        Ok(())
    }

    fn hold_flushes(&self) {
        self.inner.borrow_mut().held.get_or_insert_with(Vec::new);
    }

    fn release_flushes(&self) -> Vec<(Option<String>, HostError)> {
        let mut inner = self.inner.borrow_mut();
        let held = inner.held.take().unwrap_or_default();
        inner.releases += usize::from(!held.is_empty());
        let mut failed = Vec::new();
        for (path, node) in held {
            if inner.release_failures.contains(&path) {
                failed
                    .push((Some(path.clone()), HostError::io("rename into place", &path, io::Error::other("refused"))));
            } else {
                inner.nodes.insert(path, node);
            }
        }
        failed
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
        Ok(self.inner.borrow().system.accounts.user(name).map(|u| u.uid))
    }

    fn group_id(&self, name: &str) -> HostResult<Option<u32>> {
        Ok(self.inner.borrow().system.accounts.group(name).map(|g| g.gid))
    }

    fn user_name(&self, uid: u32) -> Option<String> {
        self.inner.borrow().system.accounts.users.iter().find(|u| u.uid == uid).map(|u| u.name.clone())
    }

    fn group_name(&self, gid: u32) -> Option<String> {
        self.inner.borrow().system.accounts.groups.iter().find(|g| g.gid == gid).map(|g| g.name.clone())
    }

    fn image_root(&self) -> Option<String> {
        self.inner.borrow().system.image.then(|| "/srv/image".to_string())
    }

    fn run(&self, cmd: &Run) -> HostResult<Ran> {
        self.spawned(cmd.argv.join(" "));
        let Some((program, args)) = cmd.argv.split_first() else {
            return Err(HostError::Command {
                command: String::new(),
                status: "is empty".into(),
                output: String::new(),
            });
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let emulated = match program.rsplit('/').next().unwrap_or(program) {
            "apt-get" => Some(self.apt_get(&args)),
            "apt-cache" => Some(self.apt_cache(&args)),
            tool @ ("useradd" | "usermod" | "userdel" | "groupadd" | "groupmod" | "groupdel") => {
                Some(parse_account_op(tool, &args).and_then(|op| {
                    self.change_account(&op)?;
                    // `useradd -m` makes the home, owned by the new user.
                    if let (AccountOp::AddUser(f), true) = (&op, has(&args, "-m"))
                        && let Some(u) = self.account(&f.name)
                        && self.stat(&u.home).ok().flatten().is_none()
                    {
                        self.put(&u.home, MemNode::Directory { mode: 0o755, uid: u.uid, gid: u.gid });
                    }
                    Ok(String::new())
                }))
            }
            "chpasswd" => Some(self.chpasswd(cmd.stdin.unwrap_or_default())),
            "systemctl" => Some(self.systemctl(&args)),
            "systemd-sysctl" | "sysctl" => Some(self.sysctl_apply(&args)),
            "mount" | "umount" => Some(self.mount(program.ends_with("umount"), &args)),
            "journalctl" => Some(Ok(format!("(the journal of {})", operands(&args).first().copied().unwrap_or("")))),
            _ => None,
        };
        let ran = match emulated {
            Some(Ok(stdout)) => Ran { code: Some(0), stdout, ..Ran::default() },
            Some(Err((code, message))) => Ran { code: Some(code), tail: message, ..Ran::default() },
            None => {
                let runner = self.inner.borrow_mut().system.runner.take();
                let ran = match &runner {
                    Some(f) => f(self, cmd),
                    None => Ran { code: Some(0), ..Ran::default() },
                };
                self.inner.borrow_mut().system.runner = runner;
                ran
            }
        };
        Ok(ran)
    }
}

/// A failed emulated tool: its exit code and what it printed.
type Failed = (i32, String);

fn system_node(content: Vec<u8>) -> MemNode {
    MemNode::File { content, mode: 0o644, uid: 0, gid: 0 }
}

/// The words of a command line that are not options (nor an option's value): after `--`, all.
fn operands<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut words = args.iter();
    while let Some(w) = words.next() {
        match *w {
            "--" => out.extend(words.by_ref().copied()),
            "-o" | "-u" | "-g" | "-G" | "-d" | "-s" | "-c" | "-n" => {
                words.next();
            }
            w if w.starts_with('-') => {}
            w => out.push(w),
        }
    }
    out
}

/// The value after `flag` in a command line.
fn flag<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    let end = args.iter().position(|a| *a == "--").unwrap_or(args.len());
    args[..end].iter().position(|a| *a == flag).and_then(|i| args.get(i + 1).copied())
}

fn has(args: &[&str], flag: &str) -> bool {
    let end = args.iter().position(|a| *a == "--").unwrap_or(args.len());
    args[..end].contains(&flag)
}

/// A shadow-utils command line back into the change it makes.
fn parse_account_op(tool: &str, args: &[&str]) -> Result<AccountOp, Failed> {
    let name = operands(args).last().map(|n| n.to_string()).ok_or((2, format!("{tool}: no name given")))?;
    let number = |f: &str| -> Result<Option<u32>, Failed> {
        flag(args, f).map(|v| v.parse().map_err(|_| (3, format!("{tool}: invalid id '{v}'")))).transpose()
    };
    Ok(match tool {
        "groupadd" => AccountOp::AddGroup { name, gid: number("-g")?, system: has(args, "-r") },
        "groupmod" => AccountOp::SetGid { name, gid: number("-g")?.ok_or((2, "groupmod: -g expected".to_string()))? },
        "groupdel" => AccountOp::DelGroup { name },
        "userdel" => AccountOp::DelUser { name, remove_home: has(args, "-r") },
        _ => {
            let text = |f: &str| flag(args, f).map(str::to_string);
            let fields = UserFields {
                name,
                uid: number("-u")?,
                gid: text("-g"),
                groups: text("-G").map(|g| g.split(',').filter(|x| !x.is_empty()).map(str::to_string).collect()),
                append: has(args, "-a"),
                home: text("-d"),
                shell: text("-s"),
                comment: text("-c"),
                system: has(args, "-r"),
                password_hash: None,
            };
            if tool == "useradd" { AccountOp::AddUser(fields) } else { AccountOp::ModUser(fields) }
        }
    })
}

impl MemHost {
    /// The files a system's tools keep, rendered from this host's system (when no node of
    /// the same path was put there).
    fn system_file(&self, path: &str) -> Option<Vec<u8>> {
        let inner = self.inner.borrow();
        let sys = &inner.system;
        let a = &sys.accounts;
        let text = match path {
            "/etc/os-release" => "ID=debian\nVERSION_ID=\"12\"\n".to_string(),
            "/var/lib/dpkg/status" => sys
                .installed
                .iter()
                .map(|(n, p)| {
                    let want = if p.held { "hold" } else { "install" };
                    format!("Package: {n}\nStatus: {want} ok installed\nVersion: {}\n\n", p.version)
                })
                .collect(),
            "/etc/passwd" => a
                .users
                .iter()
                .map(|u| format!("{}:x:{}:{}:{}:{}:{}\n", u.name, u.uid, u.gid, u.comment, u.home, u.shell))
                .collect(),
            "/etc/shadow" => a
                .users
                .iter()
                .map(|u| format!("{}:{}:19000:0:99999:7:::\n", u.name, u.password_hash.as_deref().unwrap_or("!")))
                .collect(),
            "/etc/group" => {
                a.groups.iter().map(|g| format!("{}:x:{}:{}\n", g.name, g.gid, g.members.join(","))).collect()
            }
            "/etc/login.defs" => format!("SYS_UID_MAX {}\n", a.system_max),
            _ => {
                let unit = path.strip_prefix("/lib/systemd/system/")?;
                sys.units.get(unit).filter(|u| u.exists)?;
                "[Service]\nExecStart=/bin/true\n".to_string()
            }
        };
        Some(text.into_bytes())
    }

    /// `apt-get update | install | remove`.
    fn apt_get(&self, args: &[&str]) -> Result<String, Failed> {
        let words = operands(args);
        let (verb, names) = words.split_first().ok_or((100, "E: Invalid operation".to_string()))?;
        match *verb {
            "update"
                if self.inner.borrow().system.refuse_repositories && args.iter().any(|a| a.contains("SourceList")) =>
            {
                Err((100, "E: The repository is not signed.".to_string()))
            }
            "update" => Ok(String::new()),
            "install" => {
                let packages: Vec<Install> = names
                    .iter()
                    .map(|n| match n.split_once('=') {
                        Some((n, v)) => Install { name: n.into(), version: Some(v.into()) },
                        None => Install { name: n.to_string(), version: None },
                    })
                    .collect();
                self.install(&packages, has(args, "--allow-downgrades")).map(|()| String::new())
            }
            "remove" => {
                let mut inner = self.inner.borrow_mut();
                inner.mutations += 1;
                for n in names {
                    inner.system.installed.remove(*n);
                }
                Ok(String::new())
            }
            other => Err((100, format!("E: Invalid operation {other}"))),
        }
    }

    /// `apt-cache policy NAME...`, as apt prints it.
    fn apt_cache(&self, args: &[&str]) -> Result<String, Failed> {
        let words = operands(args);
        let Some((&"policy", names)) = words.split_first() else {
            return Err((100, "E: only `policy` is emulated".into()));
        };
        let inner = self.inner.borrow();
        let mut out = String::new();
        for name in names {
            let installed = inner.system.installed.get(*name).map(|p| p.version.clone());
            let mut offered: Vec<String> = inner.system.repo.get(*name).cloned().unwrap_or_default();
            offered.reverse();
            if installed.is_none() && offered.is_empty() {
                continue;
            }
            let newest = offered.first().cloned();
            let candidate = match (&installed, &newest) {
                (Some(i), Some(n)) if crate::version::compare_deb(i, n).is_gt() => Some(i.clone()),
                (_, Some(n)) => Some(n.clone()),
                (i, None) => i.clone(),
            };
            out.push_str(&format!(
                "{name}:\n  Installed: {}\n  Candidate: {}\n  Version table:\n",
                installed.as_deref().unwrap_or("(none)"),
                candidate.as_deref().unwrap_or("(none)")
            ));
            for v in &offered {
                let mark = if installed.as_ref() == Some(v) { " ***" } else { "    " };
                out.push_str(&format!("{mark} {v} 500\n        500 file:/srv/repo ./ Packages\n"));
            }
            if let Some(i) = installed.as_ref().filter(|i| !offered.contains(i)) {
                out.push_str(&format!(" *** {i} 100\n        100 /var/lib/dpkg/status\n"));
            }
        }
        Ok(out)
    }

    fn install(&self, packages: &[Install], downgrade: bool) -> Result<(), Failed> {
        let mut inner = self.inner.borrow_mut();
        inner.mutations += 1;
        // All or nothing, as one apt transaction.
        let mut chosen = Vec::new();
        for p in packages {
            let Some(versions) = inner.system.repo.get(&p.name) else {
                return Err((100, format!("E: Unable to locate package {}", p.name)));
            };
            let version = match &p.version {
                Some(v) if !versions.contains(v) => {
                    return Err((100, format!("E: Version '{v}' for '{}' was not found", p.name)));
                }
                Some(v) => v.clone(),
                None => versions.last().cloned().unwrap_or_default(),
            };
            if let Some(have) = inner.system.installed.get(&p.name)
                && crate::version::compare_deb(&version, &have.version).is_lt()
                && !downgrade
            {
                let output =
                    format!("E: Packages were downgraded and -y was used without --allow-downgrades ({})", p.name);
                return Err((100, output));
            }
            chosen.push((p.name.clone(), version));
        }
        let mut scripts = Vec::new();
        for (name, version) in chosen {
            scripts.extend(inner.system.scripts.get(&name).cloned());
            inner.system.installed.insert(name, Installed { version, held: false });
        }
        drop(inner);
        for script in scripts {
            script(self);
        }
        Ok(())
    }

    /// `chpasswd -e`: `name:hash` lines on standard input.
    fn chpasswd(&self, input: &[u8]) -> Result<String, Failed> {
        let mut inner = self.inner.borrow_mut();
        inner.mutations += 1;
        for line in String::from_utf8_lossy(input).lines() {
            let (name, hash) = line.split_once(':').ok_or((1, "chpasswd: line 1: missing new password".to_string()))?;
            let user = inner.system.accounts.users.iter_mut().find(|u| u.name == name);
            let user = user.ok_or((1, format!("chpasswd: line 1: user '{name}' does not exist")))?;
            user.password_hash = Some(hash.to_string());
        }
        Ok(String::new())
    }

    /// `systemctl [--root=DIR] show | start | stop | restart | reload | enable | disable |
    /// is-enabled | daemon-reload`.
    fn systemctl(&self, args: &[&str]) -> Result<String, Failed> {
        let words = operands(args);
        let (verb, names) = words.split_first().ok_or((1, "systemctl: too few arguments".to_string()))?;
        let mut inner = self.inner.borrow_mut();
        let sys = &mut inner.system;
        match *verb {
            "show" => Ok(names
                .iter()
                .map(|n| {
                    let u = sys.units.get(*n).cloned().unwrap_or_default();
                    let yes = |b: bool| if b { "yes" } else { "no" };
                    format!(
                        "Id={n}\nLoadState={}\nActiveState={}\nUnitFileState={}\nCanReload={}\nNeedDaemonReload={}\n",
                        if u.exists { "loaded" } else { "not-found" },
                        if u.exists { u.active.as_str() } else { "inactive" },
                        u.enabled,
                        yes(u.can_reload),
                        yes(u.needs_daemon_reload)
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")),
            "is-enabled" => {
                let states: Vec<String> =
                    names.iter().map(|n| sys.units.get(*n).map(|u| u.enabled.clone()).unwrap_or_default()).collect();
                let all = states.iter().all(|s| s == "enabled");
                let out = states.join("\n") + "\n";
                if all { Ok(out) } else { Err((1, out)) }
            }
            "daemon-reload" => {
                for unit in sys.units.values_mut() {
                    unit.needs_daemon_reload = false;
                }
                // Unit files written under /etc/systemd/system become units; those removed
                // from there that no package installed go.
                let dir = "/etc/systemd/system/";
                let files: Vec<String> = inner
                    .nodes
                    .keys()
                    .filter_map(|p| p.strip_prefix(dir))
                    .filter(|n| !n.contains('/') && (n.ends_with(".service") || n.ends_with(".timer")))
                    .map(str::to_string)
                    .collect();
                let sys = &mut inner.system;
                let gone: Vec<String> = sys.file_units.iter().filter(|n| !files.contains(n)).cloned().collect();
                for n in gone {
                    sys.units.remove(&n);
                    sys.file_units.remove(&n);
                }
                for f in files {
                    if !sys.units.contains_key(&f) {
                        let unit = Unit {
                            exists: true,
                            active: "inactive".into(),
                            enabled: "disabled".into(),
                            ..Unit::default()
                        };
                        sys.units.insert(f.clone(), unit);
                        sys.file_units.insert(f);
                    }
                }
                Ok(String::new())
            }
            "enable" | "disable" => {
                inner.mutations += 1;
                for n in names {
                    if let Some(unit) = inner.system.units.get_mut(&unit_name(n)) {
                        unit.enabled = if *verb == "enable" { "enabled" } else { "disabled" }.into();
                        if has(args, "--now") {
                            unit.active = if *verb == "enable" { "active" } else { "inactive" }.into();
                        }
                    }
                }
                Ok(String::new())
            }
            verb => {
                let action = match verb {
                    "start" => UnitAction::Start,
                    "stop" => UnitAction::Stop,
                    "restart" => UnitAction::Restart,
                    "reload" => UnitAction::Reload,
                    other => return Err((1, format!("Unknown command verb {other}."))),
                };
                inner.mutations += 1;
                for name in names {
                    let n = unit_name(name);
                    let sys = &mut inner.system;
                    let Some(unit) = sys.units.get_mut(&n) else {
                        return Err((5, format!("Failed to {verb} {n}: Unit {n} not found.")));
                    };
                    match action {
                        UnitAction::Start | UnitAction::Restart => {
                            unit.active = "active".into();
                            *sys.starts.entry(n).or_default() += 1;
                        }
                        UnitAction::Stop => unit.active = "inactive".into(),
                        UnitAction::Reload => *sys.reloads.entry(n).or_default() += 1,
                    }
                }
                Ok(String::new())
            }
        }
    }

    /// Refuses what shadow-utils refuses, then carries the change out as they would.
    fn change_account(&self, op: &AccountOp) -> Result<(), Failed> {
        let mut inner = self.inner.borrow_mut();
        inner.mutations += 1;
        let refused = |what: String| Err((4, what));
        let accounts = &mut inner.system.accounts;
        match op {
            AccountOp::AddGroup { gid: Some(g), .. } if accounts.groups.iter().any(|x| x.gid == *g) => {
                return refused(format!("groupadd: GID '{g}' already exists"));
            }
            AccountOp::AddGroup { name, .. } if accounts.group(name).is_some() => {
                return refused(format!("groupadd: group '{name}' already exists"));
            }
            AccountOp::AddUser(f) | AccountOp::ModUser(f) => {
                let adding = matches!(op, AccountOp::AddUser(_));
                if adding && accounts.user(&f.name).is_some() {
                    return refused(format!("useradd: user '{}' already exists", f.name));
                }
                if !adding && accounts.user(&f.name).is_none() {
                    return refused(format!("usermod: user '{}' does not exist", f.name));
                }
                if let Some(uid) = f.uid
                    && accounts.users.iter().any(|u| u.uid == uid && u.name != f.name)
                {
                    return refused(format!("useradd: UID {uid} is not unique"));
                }
                if let Some(g) = &f.gid
                    && g.parse::<u32>().is_err()
                    && accounts.group(g).is_none()
                {
                    return refused(format!("useradd: group '{g}' does not exist"));
                }
                if let Some(groups) = &f.groups
                    && let Some(missing) = groups.iter().find(|g| accounts.group(g).is_none())
                {
                    return refused(format!("useradd: group '{missing}' does not exist"));
                }
            }
            _ => {}
        }
        crate::providers::account::simulate(accounts, op);
        Ok(())
    }
}

/// `nginx` is `nginx.service`.
fn unit_name(name: &str) -> String {
    if name.contains('.') { name.to_string() } else { format!("{name}.service") }
}

/// The next free id: system ids count down from 999, others up from 1000.
impl MemHost {
    /// The names in a directory (for assertions).
    pub fn list_dir_names(&self, path: &str) -> Vec<String> {
        self.list_dir(path).unwrap_or_default().into_iter().map(|(n, _)| n).collect()
    }
}
