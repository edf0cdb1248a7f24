//! shadow-utils: the accounts are read from `/etc/passwd`, `/etc/group`, `/etc/shadow` and
//! `login.defs` (no process) and changed with `useradd`, `usermod`, `userdel`, `groupadd`,
//! `groupmod`, `groupdel`, and `chpasswd -e` (the hash on standard input, never in an argv).

use super::{Account, AccountOp, Accounts, GroupEntry, UserFields};
use crate::host::{Host, HostError, HostResult, Run};
use crate::providers::tool::{self, CHANGE, argv};
use std::collections::HashMap;

/// Every local user and group, from the files.
pub fn read(host: &dyn Host) -> HostResult<Accounts> {
    let text = |p: &str| tool::read_text(host, p);
    let passwd = text("/etc/passwd")?.ok_or_else(|| HostError::Refused("/etc/passwd is missing".into()))?;
    let group = text("/etc/group")?.unwrap_or_default();
    // Unreadable to anyone but root: without it, password hashes are simply unknown.
    let shadow = text("/etc/shadow").ok().flatten().unwrap_or_default();
    let defs = text("/etc/login.defs")?.unwrap_or_default();
    Ok(parse_accounts(&passwd, &group, &shadow, &defs))
}

/// Carries out one change.
pub fn change(host: &dyn Host, op: &AccountOp) -> HostResult<()> {
    let (a, password) = account_argv(op);
    if let Some(a) = a {
        tool::check(host, &Run::new(&a, CHANGE))?;
    }
    if let Some((name, hash)) = password {
        let input = format!("{name}:{hash}\n");
        let a = argv(&["chpasswd", "-e"]);
        tool::check(host, &Run { stdin: Some(input.as_bytes()), ..Run::new(&a, CHANGE) }).map_err(|e| {
            let shown = e.to_string().replace(&hash, "(hidden)");
            HostError::Refused(format!("setting the password of {name} failed: {shown}"))
        })?;
    }
    Ok(())
}

/// The shadow-utils command of an account change (none when only the password changes), and a
/// password to set after it.
pub fn account_argv(op: &AccountOp) -> (Option<Vec<String>>, Option<(String, String)>) {
    match op {
        AccountOp::AddGroup { name, gid, system } => {
            let mut a = argv(&["groupadd"]);
            if let Some(g) = gid {
                a.extend(["-g".into(), g.to_string()]);
            }
            if *system {
                a.push("-r".into());
            }
            a.extend(["--".into(), name.clone()]);
            (Some(a), None)
        }
        AccountOp::SetGid { name, gid } => (Some(argv(&["groupmod", "-g", &gid.to_string(), "--", name])), None),
        AccountOp::DelGroup { name } => (Some(argv(&["groupdel", "--", name])), None),
        AccountOp::AddUser(f) => {
            let mut a = argv(&["useradd"]);
            user_fields(&mut a, f);
            if f.system {
                a.push("-r".into());
            }
            // A home is made for people, and for system accounts that declare one.
            if !f.system || f.home.is_some() {
                a.push("-m".into());
            }
            a.extend(["--".into(), f.name.clone()]);
            (Some(a), f.password_hash.clone().map(|h| (f.name.clone(), h)))
        }
        AccountOp::ModUser(f) => {
            let mut a = argv(&["usermod"]);
            user_fields(&mut a, f);
            if f.append && f.groups.is_some() {
                a.push("-a".into());
            }
            a.extend(["--".into(), f.name.clone()]);
            // Only a password to change: no usermod at all.
            let password = f.password_hash.clone().map(|h| (f.name.clone(), h));
            ((a.len() > 3).then_some(a), password)
        }
        AccountOp::DelUser { name, remove_home } => {
            let mut a = argv(&["userdel"]);
            if *remove_home {
                a.push("-r".into());
            }
            a.extend(["--".into(), name.clone()]);
            (Some(a), None)
        }
    }
}

fn user_fields(a: &mut Vec<String>, f: &UserFields) {
    let mut opt = |flag: &str, v: Option<String>| {
        if let Some(v) = v {
            a.push(flag.to_string());
            a.push(v);
        }
    };
    opt("-u", f.uid.map(|u| u.to_string()));
    opt("-g", f.gid.clone());
    opt("-G", f.groups.as_ref().map(|g| g.join(",")));
    opt("-d", f.home.clone());
    opt("-s", f.shell.clone());
    opt("-c", f.comment.clone());
}

/// The account files, parsed.
pub fn parse_accounts(passwd: &str, group: &str, shadow: &str, login_defs: &str) -> Accounts {
    let fields = |l: &str| l.split(':').map(str::to_string).collect::<Vec<_>>();
    let hashes: HashMap<String, String> = shadow
        .lines()
        .filter_map(|l| {
            let f = fields(l);
            Some((f.first()?.clone(), f.get(1)?.clone()))
        })
        .collect();
    let users = passwd
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('+') && !l.starts_with('-'))
        .filter_map(|l| {
            let f = fields(l);
            Some(Account {
                name: f.first()?.clone(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                comment: f.get(4).cloned().unwrap_or_default(),
                home: f.get(5).cloned().unwrap_or_default(),
                shell: f.get(6).cloned().unwrap_or_default(),
                password_hash: hashes.get(f.first()?).cloned(),
            })
        })
        .collect();
    let groups = group
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('+') && !l.starts_with('-'))
        .filter_map(|l| {
            let f = fields(l);
            let members = f.get(3).map(|m| m.split(',').filter(|x| !x.is_empty()).map(str::to_string).collect());
            Some(GroupEntry {
                name: f.first()?.clone(),
                gid: f.get(2)?.parse().ok()?,
                members: members.unwrap_or_default(),
            })
        })
        .collect();
    let system_max = login_defs
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "SYS_UID_MAX").then(|| w.next()?.parse().ok())?
        })
        .unwrap_or(999);
    Accounts { users, groups, system_max }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts() {
        let a = parse_accounts(
            "root:x:0:0:root:/root:/bin/bash\n# comment\nalice:x:1000:1000:Alice,,,:/home/alice:/bin/sh\n",
            "root:x:0:\nsudo:x:27:alice,bob\nalice:x:1000:\n",
            "root:*:19000:0:99999:7:::\nalice:$6$s$h:19000:0:99999:7:::\n",
            "# defaults\nSYS_UID_MAX   499\n",
        );
        assert_eq!(a.users.len(), 2);
        assert_eq!(a.user("alice").unwrap().password_hash.as_deref(), Some("$6$s$h"));
        assert_eq!(a.user("alice").unwrap().comment, "Alice,,,");
        assert_eq!(a.groups_of("alice"), vec!["sudo"]);
        assert_eq!(a.system_max, 499);
    }

    #[test]
    fn account_commands() {
        let (a, pw) = account_argv(&AccountOp::AddUser(UserFields {
            name: "deploy".into(),
            uid: Some(2000),
            groups: Some(vec!["sudo".into(), "adm".into()]),
            shell: Some("/bin/bash".into()),
            password_hash: Some("$6$x$y".into()),
            ..UserFields::default()
        }));
        let a = a.unwrap();
        assert_eq!(a.join(" "), "useradd -u 2000 -G sudo,adm -s /bin/bash -m -- deploy");
        assert_eq!(pw, Some(("deploy".into(), "$6$x$y".into())));
        assert!(!a.iter().any(|w| w.contains("$6$")), "the hash never goes into argv");
        let (a, _) = account_argv(&AccountOp::ModUser(UserFields {
            name: "deploy".into(),
            groups: Some(vec!["adm".into()]),
            append: true,
            ..UserFields::default()
        }));
        assert_eq!(a.unwrap().join(" "), "usermod -G adm -a -- deploy");
        let (a, pw) = account_argv(&AccountOp::ModUser(UserFields {
            name: "deploy".into(),
            password_hash: Some("h".into()),
            ..UserFields::default()
        }));
        assert_eq!((a, pw.is_some()), (None, true));
        let (a, _) = account_argv(&AccountOp::AddGroup { name: "ops".into(), gid: Some(2001), system: true });
        assert_eq!(a.unwrap().join(" "), "groupadd -g 2001 -r -- ops");
    }
}
