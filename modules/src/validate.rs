//! Checks on declared resources that need no graph: merging repeated declarations, the fields
//! of each resource, and protected paths. Pure; problems name resources by index and
//! [`crate::load`] turns indexes into file:line:col.

use crate::catalog::{
    BlockSpec, Ensure, ExecSpec, FileSpec, Kind, LineSpec, Meta, MountEnsure, MountSpec, PackageSpec, RepositorySpec,
    Resource, ResourceId, Spec, SysctlSpec, TimerSpec, UserSpec,
};
use std::collections::HashMap;

/// A problem with the resource at `at`, possibly involving others (`also`: a second
/// declaration, the members of a cycle).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub at: usize,
    pub also: Vec<usize>,
    pub message: String,
}

impl Problem {
    pub fn new(at: usize, message: impl Into<String>) -> Problem {
        Problem { at, also: Vec::new(), message: message.into() }
    }
}

/// Paths no catalog may manage: the agent's own configuration, state, binary and unit. A catalog
/// that could change them could cut a host off from its fleet.
pub const PROTECTED: &[&str] = &[
    "/etc/converge",
    "/var/lib/converge",
    "/usr/bin/converge",
    "/usr/sbin/converge",
    "/usr/local/bin/converge",
    "/lib/systemd/system/converge.service",
    "/usr/lib/systemd/system/converge.service",
    "/etc/systemd/system/converge.service",
    "/etc/systemd/system/converge.service.d",
];

/// True when `path` is `base` or lies under it.
pub fn is_within(path: &str, base: &str) -> bool {
    base == "/"
        || path == base
        || (path.len() > base.len() && path.starts_with(base) && path.as_bytes()[base.len()] == b'/')
}

/// The protected path that `path` is, or lies under.
pub fn protected_by(path: &str) -> Option<&'static str> {
    PROTECTED.iter().copied().find(|p| is_within(path, p))
}

/// True when removing or replacing `path` would remove a protected path.
pub fn holds_protected(path: &str) -> bool {
    PROTECTED.iter().any(|p| is_within(p, path))
}

/// Merges repeated declarations of one id. Two declarations merge only when every field both
/// set is equal; the merged resource keeps the place of the first. Returns the merged list, the
/// declaration index of each merged resource, and the conflicts (in declaration indexes).
pub fn merge(mut declared: Vec<Resource>) -> (Vec<Resource>, Vec<usize>, Vec<Problem>) {
    // The first declaration of each id, by index: borrowed ids, so that a catalog of ten
    // thousand resources does not copy ten thousand paths to find that none repeats.
    let mut first: HashMap<&ResourceId, usize> = HashMap::with_capacity(declared.len());
    let mut repeats: Vec<(usize, usize)> = Vec::new();
    for (i, r) in declared.iter().enumerate() {
        match first.entry(&r.id) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(i);
            }
            std::collections::hash_map::Entry::Occupied(o) => repeats.push((*o.get(), i)),
        }
    }
    drop(first);
    if repeats.is_empty() {
        // The usual case: the list is kept as it is (no second list of every resource).
        let origin = (0..declared.len()).collect();
        return (declared, origin, Vec::new());
    }
    let mut problems = Vec::new();
    let mut gone = vec![false; declared.len()];
    for (m, i) in repeats {
        gone[i] = true;
        match merge_one(&declared[m], &declared[i]) {
            Ok(combined) => declared[m] = combined,
            Err(fields) => problems.push(Problem {
                at: i,
                also: vec![m],
                message: format!(
                    "{} is declared twice with different {}",
                    declared[i].id,
                    fields.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", ")
                ),
            }),
        }
    }
    let origin = (0..declared.len()).filter(|&i| !gone[i]).collect();
    let mut at = 0;
    declared.retain(|_| {
        at += 1;
        !gone[at - 1]
    });
    (declared, origin, problems)
}

/// Combines two declarations of one id, or names the fields on which they differ.
fn merge_one(a: &Resource, b: &Resource) -> Result<Resource, Vec<String>> {
    let mut conflicts = Vec::new();
    let meta = Meta {
        requires: pick(&a.meta.requires, &b.meta.requires, "requires", &mut conflicts, Vec::is_empty),
        notify: pick(&a.meta.notify, &b.meta.notify, "notify", &mut conflicts, Vec::is_empty),
        sensitive: pick(&a.meta.sensitive, &b.meta.sensitive, "sensitive", &mut conflicts, Option::is_none),
        confirm: pick(&a.meta.confirm, &b.meta.confirm, "confirm", &mut conflicts, Option::is_none),
    };
    match a.spec.merge(&b.spec) {
        Ok(spec) if conflicts.is_empty() => Ok(Resource::new(a.id.clone(), meta, spec)),
        Ok(_) => Err(conflicts),
        Err(fields) => {
            conflicts.extend(fields);
            conflicts.sort();
            Err(conflicts)
        }
    }
}

fn pick<T: Clone + PartialEq>(a: &T, b: &T, name: &str, conflicts: &mut Vec<String>, unset: fn(&T) -> bool) -> T {
    if unset(a) {
        b.clone()
    } else {
        if !unset(b) && a != b {
            conflicts.push(name.to_string());
        }
        a.clone()
    }
}

/// The checks on each resource's own fields.
pub fn check_each(resources: &[Resource]) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (i, r) in resources.iter().enumerate() {
        let mut say = |m: String| problems.push(Problem::new(i, m));
        if let Some(path) = r.path() {
            if let Some(p) = protected_by(path) {
                say(format!("{} is protected: converge never manages {p}, so no catalog can cut a host off", r.id));
            } else if holds_protected(path) && !(r.id.kind == Kind::Directory && r.spec.ensure() == Ensure::Present) {
                say(format!(
                    "{} would remove or replace a directory holding converge's own files; only a present directory may be declared here",
                    r.id
                ));
            }
        }
        for written in r.writes() {
            if let Some(p) = protected_by(&written) {
                say(format!("{} writes into {written}, which is protected: converge never manages {p}", r.id));
            }
        }
        if let Some(c) = &r.meta.confirm {
            check_confirm(r, c, &mut say);
        }
        match &r.spec {
            Spec::File(f) => check_file(r, f, &mut say),
            Spec::Directory(d) => {
                for (name, v) in [("owner", &d.owner), ("group", &d.group)] {
                    if v.as_deref() == Some("") {
                        say(format!("`{name}` is empty"));
                    }
                }
            }
            Spec::Symlink(s) => match (&s.target, r.spec.ensure()) {
                (None, Ensure::Present) => say(format!("{} needs a `target`", r.id)),
                (Some(t), _) if t.is_empty() => say("`target` is empty".to_string()),
                (Some(t), _) if t.contains('\0') => say("`target` contains a NUL byte".to_string()),
                _ => {}
            },
            Spec::Package(p) => check_package(r, p, &mut say),
            Spec::User(u) => check_user(r, u, &mut say),
            Spec::Group(_) => check_account_name(r, &mut say),
            Spec::Service(_) => {
                if r.id.title.chars().any(|c| c.is_whitespace() || c == '/') {
                    say(format!("{}: a unit name has no spaces or slashes", r.id));
                }
                if matches!(r.id.title.as_str(), "converge" | "converge.service") {
                    say(format!("{} is protected: converge never manages its own service", r.id));
                }
            }
            Spec::Exec(e) => check_exec(r, e, &mut say),
            Spec::Line(l) => check_line(r, l, &mut say),
            Spec::Block(b) => check_block(r, b, &mut say),
            Spec::Sysctl(s) => check_sysctl(r, s, &mut say),
            Spec::Timer(t) => check_timer(r, t, &mut say),
            Spec::Mount(m) => check_mount(r, m, &mut say),
            Spec::Repository(p) => check_repository(r, p, &mut say),
        }
    }
    problems
}

fn check_package(r: &Resource, p: &PackageSpec, say: &mut impl FnMut(String)) {
    let name = r.id.title.as_str();
    if name.chars().any(|c| c.is_whitespace() || c == '/') {
        say(format!("{}: a package name has no spaces or slashes", r.id));
    }
    if name == crate::providers::package::AGENT && p.ensure.as_deref().is_some_and(|e| matches!(e, "absent" | "purged"))
    {
        say(format!("{} is protected: converge never removes its own package (that would cut the host off)", r.id));
    }
    let version = match p.ensure.as_deref() {
        None | Some("present" | "absent" | "latest") => false,
        Some(v) if v.is_empty() || v.chars().any(char::is_whitespace) => {
            say(format!("{}: `ensure` is present, absent, latest or a version like 1.24.* (found {v:?})", r.id));
            false
        }
        Some(_) => true,
    };
    if p.allow_downgrade == Some(true) && !version {
        say(format!("{}: `allow_downgrade` applies only when `ensure` is a version", r.id));
    }
}

/// Names shadow-utils accepts: a letter or `_` first, then letters, digits, `_`, `-`, `.`, and
/// at most 32 characters (a trailing `$` for machine accounts).
fn check_account_name(r: &Resource, say: &mut impl FnMut(String)) {
    let name = r.id.title.trim_end_matches('$');
    let ok = name.len() <= 32
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !ok {
        say(format!(
            "{}: not a valid account name (a letter or _ first, then letters, digits, _ - .; 32 at most)",
            r.id
        ));
    }
}

fn check_user(r: &Resource, u: &UserSpec, say: &mut impl FnMut(String)) {
    check_account_name(r, say);
    if u.ensure == Some(Ensure::Absent) && (r.id.title == "root" || u.uid == Some(0)) {
        say(format!("{}: the account with uid 0 is never removed", r.id));
    }
    for (field, v) in [("home", &u.home), ("shell", &u.shell)] {
        if v.as_deref().is_some_and(|p| !p.starts_with('/')) {
            say(format!("{}: `{field}` must be an absolute path", r.id));
        }
    }
    if u.remove_home == Some(true) && u.ensure != Some(Ensure::Absent) {
        say(format!("{}: `remove_home` applies only with `ensure: absent`", r.id));
    }
}

fn check_exec(r: &Resource, e: &ExecSpec, say: &mut impl FnMut(String)) {
    if e.command.first().is_none_or(String::is_empty) {
        say(format!("{}: `command` is empty: give an argv, like [sysctl, --system]", r.id));
    }
    for (field, guard) in [("unless", &e.unless), ("onlyif", &e.onlyif)] {
        if guard.as_ref().is_some_and(|g| g.first().is_none_or(String::is_empty)) {
            say(format!("{}: `{field}` is an empty command", r.id));
        }
    }
    for (field, v) in [("creates", &e.creates), ("cwd", &e.cwd)] {
        if v.as_deref().is_some_and(|p| !p.starts_with('/')) {
            say(format!("{}: `{field}` must be an absolute path", r.id));
        }
    }
    if e.timeout == Some(0) {
        say(format!("{}: `timeout` must be at least 1 second", r.id));
    }
}

/// A confirmation undoes a change by putting a path back as it was: only paths can have one,
/// and its deadline must leave time to reach a server without leaving a host cut off for long.
fn check_confirm(r: &Resource, c: &crate::catalog::Confirm, say: &mut impl FnMut(String)) {
    use crate::catalog::Confirm;
    if !r.id.kind.is_path() {
        say(format!(
            "{}: `confirm` undoes a change by restoring a path, so only files, directories and symlinks take it; \
             confirm the file that configures it, and notify this resource from there",
            r.id
        ));
    }
    if !(Confirm::MIN_WITHIN..=Confirm::MAX_WITHIN).contains(&c.within) {
        say(format!(
            "{}: `confirm.within` is {} s: give between {} and {} seconds",
            r.id,
            c.within,
            Confirm::MIN_WITHIN,
            Confirm::MAX_WITHIN
        ));
    }
    if let Some(argv) = &c.check
        && argv.first().is_none_or(|p| !p.starts_with('/'))
    {
        say(format!(
            "{}: `confirm.check` is a command whose program is an absolute path, like [/usr/bin/host, example.com]",
            r.id
        ));
    }
}

/// What `file_line` and `file_block` share: the file's path, their anchors, their `validate`.
fn check_edit(
    r: &Resource,
    path: &str,
    anchors: [(&str, &Option<String>); 2],
    validate: &Option<Vec<String>>,
    say: &mut impl FnMut(String),
) {
    match crate::catalog::normalize_path(path) {
        Ok(p) if p == path => {}
        Ok(p) => say(format!("{}: `path` is written `{path}`; write it as `{p}`", r.id)),
        Err(e) => say(format!("{}: `path`: {e}", r.id)),
    }
    for (field, pattern) in anchors {
        if let Some(p) = pattern
            && let Err(e) = crate::providers::edit::regex(p)
        {
            say(format!("{}: `{field}`: {e}", r.id));
        }
    }
    if anchors[0].1.is_some() && anchors[1].1.is_some() {
        say(format!("{}: give `after` or `before`, not both", r.id));
    }
    check_validate(validate, say);
}

fn check_line(r: &Resource, l: &LineSpec, say: &mut impl FnMut(String)) {
    check_edit(r, &l.path, [("after", &l.after), ("before", &l.before)], &l.validate, say);
    if let Some(m) = &l.matches
        && let Err(e) = crate::providers::edit::regex(m)
    {
        say(format!("{}: `match`: {e}", r.id));
    }
    match (&l.line, r.spec.ensure()) {
        (Some(line), _) if line.contains('\n') => {
            say(format!("{}: `line` is one line: for several, use a `file_block`", r.id))
        }
        (None, Ensure::Present) => say(format!("{}: give the `line` to make present", r.id)),
        (None, Ensure::Absent) if l.matches.is_none() => {
            say(format!("{}: give the `line` to remove, or a `match` for the lines to remove", r.id))
        }
        _ => {}
    }
    if l.multiple.is_some() && l.matches.is_none() {
        say(format!("{}: `multiple` applies only with `match`", r.id));
    }
}

fn check_block(r: &Resource, b: &BlockSpec, say: &mut impl FnMut(String)) {
    check_edit(r, &b.path, [("after", &b.after), ("before", &b.before)], &b.validate, say);
    if let Some(m) = &b.marker
        && (!m.contains("{mark}") || m.contains('\n') || m.trim().is_empty())
    {
        say(format!("{}: `marker` is one line holding `{{mark}}` (BEGIN and END), like `# {{mark}} converge`", r.id));
    }
    if b.content.is_none() && r.spec.ensure() == Ensure::Present {
        say(format!("{}: give the block's `content`", r.id));
    }
}

fn check_sysctl(r: &Resource, s: &SysctlSpec, say: &mut impl FnMut(String)) {
    let key = r.id.title.as_str();
    let ok = !key.starts_with(['.', '/', '-'])
        && !key.ends_with(['.', '/'])
        && !key.contains("..")
        && !key.contains("//")
        && key.contains(['.', '/'])
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '/' | '_' | '-' | '@' | ':' | '+'));
    if !ok {
        say(format!("{}: not a kernel parameter name; write it as sysctl does, like net.ipv4.ip_forward", r.id));
    }
    match (&s.value, r.spec.ensure()) {
        (None, Ensure::Present) => say(format!("{}: give the `value`", r.id)),
        (Some(v), _) if v.trim().is_empty() || v.contains(['\n', '\r']) => {
            say(format!("{}: `value` is one line of text, like 1 or \"4096 87380 6291456\"", r.id))
        }
        _ => {}
    }
}

fn check_timer(r: &Resource, t: &TimerSpec, say: &mut impl FnMut(String)) {
    let name = r.id.title.as_str();
    if name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_')) {
        say(format!("{}: a timer's name is letters, digits, - and _ (64 at most): it names its units", r.id));
    }
    if r.spec.ensure() == Ensure::Absent {
        return;
    }
    if t.command.first().is_none_or(String::is_empty) {
        say(format!("{}: `command` is empty: give an argv, like [/usr/local/bin/backup, --all]", r.id));
    }
    if t.command.iter().any(|w| w.contains(['\n', '\r'])) {
        say(format!("{}: a word of `command` holds a line break", r.id));
    }
    match &t.schedule {
        None => say(format!("{}: give a `schedule`, like \"*/15 * * * *\" or \"Mon..Fri 03:00\"", r.id)),
        Some(s) => {
            if let Err(e) = crate::providers::timer::calendar(s) {
                say(format!("{}: `schedule`: {e}", r.id));
            }
        }
    }
    if t.cwd.as_deref().is_some_and(|p| !p.starts_with('/')) {
        say(format!("{}: `cwd` must be an absolute path", r.id));
    }
    let line_break = |s: &str| s.contains(['\n', '\r']);
    if t.user.as_deref().is_some_and(|u| u.is_empty() || line_break(u))
        || t.cwd.as_deref().is_some_and(line_break)
        || t.description.as_deref().is_some_and(line_break)
        || t.environment
            .iter()
            .flatten()
            .any(|(k, v)| line_break(k) || line_break(v) || k.is_empty() || k.contains('='))
    {
        say(format!("{}: `user`, `cwd`, `description` and `environment` are one line each (a name without `=`)", r.id));
    }
}

fn check_mount(r: &Resource, m: &MountSpec, say: &mut impl FnMut(String)) {
    let mp = r.id.title.as_str();
    match crate::catalog::normalize_path(mp) {
        Ok(p) if p == "/" => say(format!("{}: converge never mounts or unmounts the root filesystem", r.id)),
        Ok(p) if p == mp => {}
        Ok(p) => say(format!("{}: the mount point is written `{mp}`; write it as `{p}`", r.id)),
        Err(e) => say(format!("{}: {e}", r.id)),
    }
    if m.ensure == Some(MountEnsure::Absent) {
        return;
    }
    for (field, v) in [("device", &m.device), ("fstype", &m.fstype)] {
        match v {
            None => say(format!("{}: give the `{field}`", r.id)),
            Some(v) if v.is_empty() || v.chars().any(|c| c.is_control()) => {
                say(format!("{}: `{field}` is empty or holds a control character", r.id))
            }
            _ => {}
        }
    }
    if m.options.as_deref().is_some_and(|o| o.is_empty() || o.chars().any(|c| c.is_whitespace() || c.is_control())) {
        say(format!("{}: `options` are fstab's, separated by commas without spaces, like `noatime,nodev`", r.id));
    }
}

fn check_repository(r: &Resource, p: &RepositorySpec, say: &mut impl FnMut(String)) {
    let name = r.id.title.as_str();
    if name.len() > 64
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || name.starts_with('.')
    {
        say(format!("{}: a repository's name is letters, digits, - _ and . (64 at most): it names its files", r.id));
    }
    if r.spec.ensure() == Ensure::Absent {
        return;
    }
    match p.url.as_deref() {
        None => say(format!("{}: give its `url`", r.id)),
        Some(u)
            if u.chars().any(|c| c.is_whitespace() || c.is_control())
                || u.split_once(':').is_none_or(|(scheme, rest)| {
                    rest.is_empty()
                        || scheme.is_empty()
                        || !scheme.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
                }) =>
        {
            say(format!("{}: `url` is one address like https://deb.example.com/debian or file:/srv/repo", r.id))
        }
        _ => {}
    }
    let words = |v: &Option<Vec<String>>| {
        v.iter().flatten().all(|w| !w.is_empty() && !w.chars().any(|c| c.is_whitespace() || c.is_control()))
    };
    if !words(&p.suites) || !words(&p.components) {
        say(format!("{}: `suites` and `components` are words without spaces", r.id));
    }
    if p.suites.as_ref().is_some_and(Vec::is_empty) {
        say(format!("{}: `suites` is empty: name one, like [bookworm] (or [./] for a flat repository)", r.id));
    }
    match p.key.as_deref().map(str::trim) {
        None => say(format!("{}: give the `key` its packages are signed with (an ASCII-armored public key)", r.id)),
        Some(k)
            if !k.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----")
                || !k.ends_with("-----END PGP PUBLIC KEY BLOCK-----") =>
        {
            say(format!(
                "{}: `key` is an ASCII-armored OpenPGP public key, from -----BEGIN PGP PUBLIC KEY BLOCK----- to its END line (`gpg --armor --export KEYID` prints one)",
                r.id
            ))
        }
        _ => {}
    }
}

fn check_validate(validate: &Option<Vec<String>>, say: &mut impl FnMut(String)) {
    if let Some(argv) = validate {
        if argv.is_empty() || argv[0].is_empty() {
            say("`validate` is empty: give a command as a list, like [visudo, -cf, \"%\"]".to_string());
        } else if !argv.iter().any(|a| a.contains('%')) {
            say(format!(
                "`validate` needs `%` where the new file goes, like [{}, \"%\"]",
                argv.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
    }
}

fn check_file(r: &Resource, f: &FileSpec, say: &mut impl FnMut(String)) {
    if f.content.is_some() && f.source.is_some() {
        say(format!("{}: `content` and `source` cannot both be set", r.id));
    }
    match (&f.content_sha256, f.size) {
        (None, None) => {}
        (Some(_), _) if f.content.is_some() || f.source.is_some() => {
            say(format!("{}: `content_sha256` is the content: it goes without `content` and `source`", r.id))
        }
        (Some(h), _) if crate::catalog::blob_hex(h).is_none() => {
            say(format!("{}: `content_sha256` is `sha256:` and 64 lowercase hex digits", r.id))
        }
        (Some(_), None) => say(format!("{}: `content_sha256` needs the blob's `size`", r.id)),
        (Some(_), Some(n)) if n > crate::catalog::MAX_BLOB => say(format!(
            "{}: a blob is at most {} MiB (this one is {n} bytes): ship it in a package",
            r.id,
            crate::catalog::MAX_BLOB >> 20
        )),
        (Some(_), Some(_)) if r.sensitive() => {
            say(format!("{}: a sensitive file is sealed into its catalog, never fetched as a blob", r.id))
        }
        (None, Some(_)) => say(format!("{}: `size` goes with `content_sha256`", r.id)),
        _ => {}
    }
    for (name, v) in [("owner", &f.owner), ("group", &f.group)] {
        if v.as_deref() == Some("") {
            say(format!("`{name}` is empty"));
        }
    }
    check_validate(&f.validate, say);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{DirectorySpec, Mode};

    fn file(path: &str, spec: FileSpec) -> Resource {
        Resource::new(ResourceId::new(Kind::File, path).unwrap(), Meta::default(), Spec::File(spec))
    }

    #[test]
    fn equal_or_complementary_declarations_merge() {
        let a = file("/x", FileSpec { mode: Some(Mode(0o644)), ..Default::default() });
        let b = file("/x", FileSpec { owner: Some("root".into()), mode: Some(Mode(0o644)), ..Default::default() });
        let (merged, origin, problems) = merge(vec![a, b]);
        assert!(problems.is_empty());
        assert_eq!(origin, vec![0]);
        let Spec::File(f) = &merged[0].spec else { panic!() };
        assert_eq!((f.mode, f.owner.as_deref()), (Some(Mode(0o644)), Some("root")));
    }

    #[test]
    fn merging_keeps_the_order_and_places_of_first_declarations() {
        let a = file("/x", FileSpec { mode: Some(Mode(0o644)), ..Default::default() });
        let b = file("/y", FileSpec::default());
        let c = file("/x", FileSpec { owner: Some("root".into()), ..Default::default() });
        let d = file("/z", FileSpec::default());
        let e = file("/x", FileSpec { group: Some("adm".into()), ..Default::default() });
        let (merged, origin, problems) = merge(vec![a, b, c, d, e]);
        assert!(problems.is_empty());
        let titles: Vec<&str> = merged.iter().map(|r| r.id.title.as_str()).collect();
        assert_eq!(titles, ["/x", "/y", "/z"]);
        assert_eq!(origin, vec![0, 1, 3]);
        let Spec::File(f) = &merged[0].spec else { panic!() };
        assert_eq!((f.mode, f.owner.as_deref(), f.group.as_deref()), (Some(Mode(0o644)), Some("root"), Some("adm")));
    }

    #[test]
    fn disagreeing_declarations_name_both_places_and_fields() {
        let a = file("/x", FileSpec { mode: Some(Mode(0o644)), content: Some("a".into()), ..Default::default() });
        let b = file("/y", FileSpec::default());
        let c = file("/x", FileSpec { mode: Some(Mode(0o600)), content: Some("b".into()), ..Default::default() });
        let (merged, _, problems) = merge(vec![a, b, c]);
        assert_eq!(merged.len(), 2);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].at, 2);
        assert_eq!(problems[0].also, vec![0]);
        assert_eq!(problems[0].message, "file:/x is declared twice with different `content`, `mode`");
    }

    #[test]
    fn protected_paths_are_refused() {
        let rs = vec![
            file("/etc/converge/agent.toml", FileSpec::default()),
            file("/var/lib", FileSpec { force: Some(true), ..Default::default() }),
            Resource::new(
                ResourceId::new(Kind::Directory, "/var/lib").unwrap(),
                Meta::default(),
                Spec::Directory(DirectorySpec::default()),
            ),
            file("/etc/converge.bak", FileSpec::default()),
        ];
        let problems = check_each(&rs);
        let at: Vec<usize> = problems.iter().map(|p| p.at).collect();
        assert_eq!(at, vec![0, 1], "{problems:?}");
    }

    #[test]
    fn within() {
        assert!(is_within("/etc/converge/x", "/etc/converge"));
        assert!(is_within("/etc/converge", "/etc/converge"));
        assert!(!is_within("/etc/converge2", "/etc/converge"));
        assert!(is_within("/anything", "/"));
    }

    #[test]
    fn system_kinds_are_checked() {
        use crate::load::load;
        let text = "format: 1\nresources:\n  - package: nginx\n    ensure: \"1.24 beta\"\n  - package: curl\n    allow_downgrade: true\n  - user: 9lives\n  - user: root\n    ensure: absent\n  - user: deploy\n    home: home/deploy\n  - service: converge\n  - exec: reload\n    command: []\n  - exec: sysctl\n    command: [sysctl, --system]\n    creates: relative\n  - package: converge\n    ensure: purged\n  - group: \"bad name\"\n";
        let e = load("c.yaml", text, None).unwrap_err();
        let lines: Vec<u32> = e.iter().map(|d| d.mark.line).collect();
        assert_eq!(lines, [3, 5, 7, 8, 10, 12, 13, 15, 18, 20], "{e}");
        let ok = "format: 1\nresources:\n  - package: nginx\n    ensure: \"1.24.*\"\n    allow_downgrade: true\n  - user: deploy\n    uid: 2001\n    groups: [www-data]\n    membership: minimum\n  - service: nginx\n    ensure: running\n    enabled: true\n    refresh: reload-or-restart\n  - exec: apply-sysctl\n    command: [sysctl, --system]\n    refreshonly: true\n";
        load("c.yaml", ok, None).unwrap();
    }

    #[test]
    fn validate_needs_a_placeholder() {
        let rs =
            vec![file("/x", FileSpec { validate: Some(vec!["visudo".into(), "-c".into()]), ..Default::default() })];
        assert!(check_each(&rs)[0].message.contains("needs `%`"));
    }
}
