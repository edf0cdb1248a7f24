//! `user` and `group`: local accounts, read from the account files once a run and changed with
//! shadow-utils ([`shadow`]).
//!
//! A user's supplementary groups are exactly the listed ones unless `membership: minimum`. The
//! account with uid 0 is never removed, nor a system account (or group) not declared
//! `system: true`. A password hash is never shown: its changes read `(hidden)`.

use super::{Checked, Op, System, fail};
use crate::catalog::{Ensure, GroupSpec, Membership, Resource, UserSpec};
use crate::providers::ProviderError;
use crate::report::Change;

pub mod shadow;

/// The files that say what names and ids resolve to: a host forgets what it looked up when one
/// is written, and a `file` at one of them is written on its own (never held in a batch), so
/// that what comes after it finds the accounts it declares.
pub const ACCOUNT_FILES: &[&str] = &["/etc/passwd", "/etc/group", "/etc/nsswitch.conf"];

/// A line of `/etc/passwd` (with its `/etc/shadow` password).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub comment: String,
    pub home: String,
    pub shell: String,
    /// From `/etc/shadow`, when readable.
    pub password_hash: Option<String>,
}

/// A line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// The local accounts, read at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accounts {
    pub users: Vec<Account>,
    pub groups: Vec<GroupEntry>,
    /// The highest uid and gid of system accounts (`SYS_UID_MAX` of login.defs) [999].
    pub system_max: u32,
}

impl Accounts {
    pub fn user(&self, name: &str) -> Option<&Account> {
        self.users.iter().find(|u| u.name == name)
    }

    pub fn group(&self, name: &str) -> Option<&GroupEntry> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// The supplementary groups of `user`, sorted.
    pub fn groups_of(&self, user: &str) -> Vec<String> {
        let mut v: Vec<String> =
            self.groups.iter().filter(|g| g.members.iter().any(|m| m == user)).map(|g| g.name.clone()).collect();
        v.sort();
        v
    }
}

/// A change to the local accounts, carried out with shadow-utils.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountOp {
    AddGroup { name: String, gid: Option<u32>, system: bool },
    SetGid { name: String, gid: u32 },
    DelGroup { name: String },
    AddUser(UserFields),
    ModUser(UserFields),
    DelUser { name: String, remove_home: bool },
}

/// The attributes of a user to set; `None` is left alone.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserFields {
    pub name: String,
    pub uid: Option<u32>,
    pub gid: Option<String>,
    /// The supplementary groups, exactly (`append` false) or added to the current ones.
    pub groups: Option<Vec<String>>,
    pub append: bool,
    pub home: Option<String>,
    pub shell: Option<String>,
    pub comment: Option<String>,
    pub system: bool,
    /// Never shown: passed to the tools on standard input.
    pub password_hash: Option<String>,
}

const HIDDEN: &str = "(hidden)";

/// What makes group `name` as declared. Pure.
pub fn diff_group(
    name: &str,
    g: &GroupSpec,
    have: Option<&GroupEntry>,
    accounts: &Accounts,
) -> Result<(Vec<Change>, Vec<AccountOp>), ProviderError> {
    let taken = |gid: u32| accounts.groups.iter().find(|x| x.gid == gid && x.name != name);
    if g.ensure == Some(Ensure::Absent) {
        let Some(have) = have else { return Ok((vec![], vec![])) };
        if have.gid == 0 || (have.gid <= accounts.system_max && g.system != Some(true)) {
            return Err(format!(
                "{name} is a system group (gid {}); it is removed only when declared `system: true`",
                have.gid
            )
            .into());
        }
        return Ok((vec![Change::new("ensure", "present", "absent")], vec![AccountOp::DelGroup { name: name.into() }]));
    }
    if let Some(gid) = g.gid
        && let Some(other) = taken(gid)
    {
        return Err(format!("gid {gid} is already the group {}'s", other.name).into());
    }
    match have {
        None => {
            let mut changes = vec![Change::new("ensure", "absent", "present")];
            if let Some(gid) = g.gid {
                changes.push(Change::new("gid", "absent", gid.to_string()));
            }
            let op = AccountOp::AddGroup { name: name.into(), gid: g.gid, system: g.system == Some(true) };
            Ok((changes, vec![op]))
        }
        Some(have) => match g.gid {
            Some(gid) if gid != have.gid => Ok((
                vec![Change::new("gid", have.gid.to_string(), gid.to_string())],
                vec![AccountOp::SetGid { name: name.into(), gid }],
            )),
            _ => Ok((vec![], vec![])),
        },
    }
}

/// The name of the primary group `gid`, or the number when no group has it.
fn group_label(accounts: &Accounts, gid: u32) -> String {
    accounts.groups.iter().find(|g| g.gid == gid).map_or(gid.to_string(), |g| g.name.clone())
}

/// Whether the declared primary group (a name or a number) is the one the user has.
fn same_group(accounts: &Accounts, want: &str, have: u32) -> bool {
    match want.parse::<u32>() {
        Ok(n) => n == have,
        Err(_) => accounts.group(want).map(|g| g.gid) == Some(have),
    }
}

/// What makes user `name` as declared. Pure.
pub fn diff_user(
    name: &str,
    u: &UserSpec,
    have: Option<&Account>,
    accounts: &Accounts,
) -> Result<(Vec<Change>, Vec<AccountOp>), ProviderError> {
    if u.ensure == Some(Ensure::Absent) {
        let Some(have) = have else { return Ok((vec![], vec![])) };
        if have.uid == 0 {
            return Err(format!("{name} has uid 0; converge never removes it").into());
        }
        if have.uid <= accounts.system_max && u.system != Some(true) {
            return Err(format!(
                "{name} is a system account (uid {}); it is removed only when declared `system: true`",
                have.uid
            )
            .into());
        }
        let op = AccountOp::DelUser { name: name.into(), remove_home: u.remove_home == Some(true) };
        return Ok((vec![Change::new("ensure", "present", "absent")], vec![op]));
    }
    if let Some(uid) = u.uid
        && let Some(other) = accounts.users.iter().find(|x| x.uid == uid && x.name != name)
    {
        return Err(format!("uid {uid} is already the user {}'s", other.name).into());
    }
    let minimum = u.membership == Some(Membership::Minimum);
    let mut wanted_groups: Option<Vec<String>> = u.groups.clone().map(|mut g| {
        g.sort();
        g.dedup();
        g
    });
    let mut fields = UserFields { name: name.into(), system: u.system == Some(true), ..UserFields::default() };
    let Some(have) = have else {
        let mut changes = vec![Change::new("ensure", "absent", "present")];
        let mut set = |field: &str, v: Option<String>| {
            if let Some(v) = v {
                changes.push(Change::new(field, "absent", v));
            }
        };
        set("uid", u.uid.map(|x| x.to_string()));
        set("gid", u.gid.clone());
        set("groups", wanted_groups.as_ref().map(|g| g.join(", ")));
        set("home", u.home.clone());
        set("shell", u.shell.clone());
        set("comment", u.comment.clone());
        if u.password_hash.is_some() {
            changes.push(Change::new("password_hash", "absent", HIDDEN));
        }
        fields.uid = u.uid;
        fields.gid = u.gid.clone();
        fields.groups = wanted_groups;
        fields.home = u.home.clone();
        fields.shell = u.shell.clone();
        fields.comment = u.comment.clone();
        fields.password_hash = u.password_hash.clone();
        return Ok((changes, vec![AccountOp::AddUser(fields)]));
    };
    let mut changes = Vec::new();
    if let Some(uid) = u.uid
        && uid != have.uid
    {
        changes.push(Change::new("uid", have.uid.to_string(), uid.to_string()));
        fields.uid = Some(uid);
    }
    if let Some(gid) = &u.gid
        && !same_group(accounts, gid, have.gid)
    {
        changes.push(Change::new("gid", group_label(accounts, have.gid), gid.clone()));
        fields.gid = Some(gid.clone());
    }
    if let Some(want) = wanted_groups.take() {
        let current = accounts.groups_of(name);
        let missing: Vec<&String> = want.iter().filter(|g| !current.contains(g)).collect();
        let differs = if minimum { !missing.is_empty() } else { current != want };
        if differs {
            let after = if minimum {
                let mut all = current.clone();
                all.extend(missing.into_iter().cloned());
                all.sort();
                all
            } else {
                want.clone()
            };
            changes.push(Change::new("groups", current.join(", "), after.join(", ")));
            fields.groups = Some(want);
            fields.append = minimum;
        }
    }
    for (field, want, have_v, slot) in [
        ("home", &u.home, &have.home, &mut fields.home),
        ("shell", &u.shell, &have.shell, &mut fields.shell),
        ("comment", &u.comment, &have.comment, &mut fields.comment),
    ] {
        if let Some(w) = want
            && w != have_v
        {
            changes.push(Change::new(field, have_v.as_str(), w.as_str()));
            *slot = Some(w.clone());
        }
    }
    if let Some(hash) = &u.password_hash
        && have.password_hash.as_ref() != Some(hash)
    {
        changes.push(Change::new("password_hash", HIDDEN, HIDDEN));
        fields.password_hash = Some(hash.clone());
    }
    if changes.is_empty() {
        return Ok((changes, vec![]));
    }
    Ok((changes, vec![AccountOp::ModUser(fields)]))
}

/// Carries out `op` on `accounts` in memory, as shadow-utils would on Debian and the RHEL
/// family (a user gets a group of its own name unless given one; ids are the first free ones
/// in the system or the ordinary range): what a dry-run assumes. Pure.
pub fn simulate(accounts: &mut Accounts, op: &AccountOp) {
    let free = |taken: &dyn Fn(u32) -> bool, system: bool, max: u32| -> u32 {
        if system { (1..=max).rev().find(|&i| !taken(i)) } else { (max + 1..u32::MAX).find(|&i| !taken(i)) }
            .unwrap_or(u32::MAX - 1)
    };
    let max = accounts.system_max;
    match op {
        AccountOp::AddGroup { name, gid, system } => {
            let taken = |g: u32| accounts.groups.iter().any(|x| x.gid == g);
            let gid = gid.unwrap_or_else(|| free(&taken, *system, max));
            accounts.groups.push(GroupEntry { name: name.clone(), gid, members: vec![] });
        }
        AccountOp::SetGid { name, gid } => {
            if let Some(g) = accounts.groups.iter_mut().find(|g| &g.name == name) {
                g.gid = *gid;
            }
        }
        AccountOp::DelGroup { name } => accounts.groups.retain(|g| &g.name != name),
        AccountOp::AddUser(f) => {
            let taken = |u: u32| accounts.users.iter().any(|x| x.uid == u);
            let uid = f.uid.unwrap_or_else(|| free(&taken, f.system, max));
            let gid = match &f.gid {
                Some(g) => g.parse().ok().or_else(|| accounts.group(g).map(|x| x.gid)).unwrap_or(u32::MAX),
                None => {
                    let taken = |g: u32| accounts.groups.iter().any(|x| x.gid == g);
                    let gid = if taken(uid) { free(&taken, f.system, max) } else { uid };
                    accounts.groups.push(GroupEntry { name: f.name.clone(), gid, members: vec![] });
                    gid
                }
            };
            accounts.users.push(Account {
                name: f.name.clone(),
                uid,
                gid,
                comment: f.comment.clone().unwrap_or_default(),
                home: f.home.clone().unwrap_or_else(|| format!("/home/{}", f.name)),
                shell: f.shell.clone().unwrap_or_else(|| "/bin/sh".into()),
                password_hash: f.password_hash.clone(),
            });
            set_groups(accounts, &f.name, f.groups.as_deref(), false);
        }
        AccountOp::ModUser(f) => {
            let gid = f.gid.as_ref().map(|g| g.parse().ok().or_else(|| accounts.group(g).map(|x| x.gid)));
            if let Some(u) = accounts.users.iter_mut().find(|u| u.name == f.name) {
                u.uid = f.uid.unwrap_or(u.uid);
                u.gid = gid.flatten().unwrap_or(u.gid);
                for (have, want) in [(&mut u.home, &f.home), (&mut u.shell, &f.shell), (&mut u.comment, &f.comment)] {
                    if let Some(w) = want {
                        *have = w.clone();
                    }
                }
                if f.password_hash.is_some() {
                    u.password_hash = f.password_hash.clone();
                }
            }
            set_groups(accounts, &f.name, f.groups.as_deref(), f.append);
        }
        AccountOp::DelUser { name, .. } => {
            accounts.users.retain(|u| &u.name != name);
            set_groups(accounts, name, Some(&[]), false);
        }
    }
}

/// Makes `user` a member of exactly `groups`, or of them too when `append`.
fn set_groups(accounts: &mut Accounts, user: &str, groups: Option<&[String]>, append: bool) {
    let Some(groups) = groups else { return };
    for g in &mut accounts.groups {
        let want = groups.contains(&g.name);
        let has = g.members.iter().any(|m| m == user);
        if want && !has {
            g.members.push(user.to_string());
        } else if has && !want && !append {
            g.members.retain(|m| m != user);
        }
    }
}

pub fn check_user(sys: &System, r: &Resource, u: &UserSpec) -> Result<(Checked, Vec<Change>), ProviderError> {
    let accounts = sys.accounts()?;
    let (changes, ops) = diff_user(&r.id.title, u, accounts.user(&r.id.title), &accounts)?;
    Ok((Checked { op: Op::Accounts(ops), ..Checked::default() }, changes))
}

pub fn check_group(sys: &System, r: &Resource, g: &GroupSpec) -> Result<(Checked, Vec<Change>), ProviderError> {
    let accounts = sys.accounts()?;
    let (changes, ops) = diff_group(&r.id.title, g, accounts.group(&r.id.title), &accounts)?;
    Ok((Checked { op: Op::Accounts(ops), ..Checked::default() }, changes))
}

pub fn apply(sys: &System, state: &Checked) -> Result<Option<String>, ProviderError> {
    let Op::Accounts(ops) = &state.op else { return Ok(None) };
    let result = ops.iter().try_for_each(|op| shadow::change(sys.host, op).map_err(fail));
    sys.forget_accounts();
    result.map(|()| None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::memory::MemHost;
    use crate::providers::converge_yaml;
    use crate::report::Status;

    fn accounts() -> Accounts {
        Accounts {
            users: vec![
                Account {
                    name: "root".into(),
                    uid: 0,
                    gid: 0,
                    home: "/root".into(),
                    shell: "/bin/bash".into(),
                    ..Default::default()
                },
                Account { name: "daemon".into(), uid: 1, gid: 1, ..Default::default() },
                Account {
                    name: "alice".into(),
                    uid: 1000,
                    gid: 1000,
                    home: "/home/alice".into(),
                    shell: "/bin/sh".into(),
                    ..Default::default()
                },
            ],
            groups: vec![
                GroupEntry { name: "root".into(), gid: 0, members: vec![] },
                GroupEntry { name: "alice".into(), gid: 1000, members: vec![] },
                GroupEntry { name: "sudo".into(), gid: 27, members: vec!["alice".into()] },
                GroupEntry { name: "adm".into(), gid: 4, members: vec![] },
                GroupEntry { name: "www".into(), gid: 33, members: vec!["alice".into()] },
            ],
            system_max: 999,
        }
    }

    fn user(yaml: &str) -> UserSpec {
        let loaded = crate::load::load("t.yaml", &format!("format: 1\nresources:\n  - user: x\n{yaml}"), None).unwrap();
        match &loaded.catalog.resources[0].spec {
            crate::catalog::Spec::User(u) => u.clone(),
            _ => unreachable!(),
        }
    }

    mod pure {
        use super::*;

        #[test]
        fn membership_exact_and_minimum() {
            let a = accounts();
            let (c, _) = diff_user("alice", &user("    groups: [sudo, adm]\n"), a.user("alice"), &a).unwrap();
            assert_eq!(c, vec![Change::new("groups", "sudo, www", "adm, sudo")]);
            let (c, ops) =
                diff_user("alice", &user("    groups: [adm]\n    membership: minimum\n"), a.user("alice"), &a).unwrap();
            assert_eq!(c, vec![Change::new("groups", "sudo, www", "adm, sudo, www")]);
            assert!(
                matches!(&ops[0], AccountOp::ModUser(f) if f.append && f.groups.as_deref() == Some(&["adm".to_string()][..]))
            );
            let (c, _) =
                diff_user("alice", &user("    groups: [www]\n    membership: minimum\n"), a.user("alice"), &a).unwrap();
            assert!(c.is_empty());
        }

        #[test]
        fn attributes_from_to_and_the_password_hidden() {
            let a = accounts();
            let u = user("    shell: /bin/bash\n    gid: sudo\n    comment: Alice\n    password_hash: $6$x$y\n");
            let (c, _) = diff_user("alice", &u, a.user("alice"), &a).unwrap();
            assert_eq!(
                c,
                vec![
                    Change::new("gid", "alice", "sudo"),
                    Change::new("shell", "/bin/sh", "/bin/bash"),
                    Change::new("comment", "", "Alice"),
                    Change::new("password_hash", HIDDEN, HIDDEN),
                ]
            );
            assert!(!format!("{c:?}").contains("$6$"));
            assert!(
                diff_user("alice", &user("    gid: \"1000\"\n    home: /home/alice\n"), a.user("alice"), &a)
                    .unwrap()
                    .0
                    .is_empty()
            );
        }

        #[test]
        fn refusals() {
            let a = accounts();
            let e = diff_user("bob", &user("    uid: 1000\n"), None, &a).unwrap_err().to_string();
            assert_eq!(e, "uid 1000 is already the user alice's");
            let e = diff_user("root", &user("    ensure: absent\n"), a.user("root"), &a).unwrap_err().to_string();
            assert!(e.contains("uid 0"), "{e}");
            let e = diff_user("daemon", &user("    ensure: absent\n"), a.user("daemon"), &a).unwrap_err().to_string();
            assert!(e.contains("system account (uid 1)"), "{e}");
            assert!(diff_user("daemon", &user("    ensure: absent\n    system: true\n"), a.user("daemon"), &a).is_ok());
            let g = GroupSpec { ensure: None, gid: Some(27), system: None };
            assert_eq!(diff_group("ops", &g, None, &a).unwrap_err().to_string(), "gid 27 is already the group sudo's");
            let g = GroupSpec { ensure: Some(Ensure::Absent), gid: None, system: None };
            assert!(diff_group("adm", &g, a.group("adm"), &a).unwrap_err().to_string().contains("system group"));
        }
    }

    #[test]
    fn create_modify_remove_through_the_host() {
        let host = MemHost::new().with_group("sudo", 27);
        let yaml = "  - group: deploy\n    gid: 2000\n  - user: deploy\n    uid: 2000\n    gid: deploy\n    groups: [sudo]\n    shell: /bin/bash\n    password_hash: \"$6$salt$hash\"\n";
        let events = converge_yaml(&host, yaml, false);
        assert!(events.iter().all(|e| e.status == Status::Changed), "{events:?}");
        let u = host.account("deploy").unwrap();
        assert_eq!(
            (u.uid, u.gid, u.shell.as_str(), u.password_hash.as_deref()),
            (2000, 2000, "/bin/bash", Some("$6$salt$hash"))
        );
        assert_eq!(host.group("sudo").unwrap().members, vec!["deploy"]);
        assert!(!format!("{events:?}").contains("$6$"), "the hash never shows");
        // Again: nothing to do, and no process at all.
        let before = host.processes().len();
        let again = converge_yaml(&host, yaml, false);
        assert!(again.iter().all(|e| e.status == Status::Unchanged), "{again:?}");
        assert_eq!(host.processes().len(), before);
        // Removal.
        let events = converge_yaml(
            &host,
            "  - user: deploy\n    ensure: absent\n  - group: deploy\n    ensure: absent\n",
            false,
        );
        assert!(events.iter().all(|e| e.status == Status::Changed), "{events:?}");
        assert!(host.account("deploy").is_none() && host.group("deploy").is_none());
    }
}
