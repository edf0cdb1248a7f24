//! Checks on declared resources that need no graph: merging repeated declarations, the fields
//! of each resource, and protected paths. Pure; problems name resources by index and
//! [`crate::load`] turns indexes into file:line:col.

use crate::catalog::{Ensure, FileSpec, Kind, Meta, Resource, ResourceId, Spec};
use serde::Serialize;
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
pub fn merge(declared: Vec<Resource>) -> (Vec<Resource>, Vec<usize>, Vec<Problem>) {
    let mut merged: Vec<Resource> = Vec::with_capacity(declared.len());
    let mut origin: Vec<usize> = Vec::with_capacity(declared.len());
    let mut by_id: HashMap<ResourceId, usize> = HashMap::with_capacity(declared.len());
    let mut problems = Vec::new();
    for (i, r) in declared.into_iter().enumerate() {
        match by_id.get(&r.id) {
            None => {
                by_id.insert(r.id.clone(), merged.len());
                merged.push(r);
                origin.push(i);
            }
            Some(&m) => match merge_one(&merged[m], &r) {
                Ok(combined) => merged[m] = combined,
                Err(fields) => problems.push(Problem {
                    at: i,
                    also: vec![origin[m]],
                    message: format!(
                        "{} is declared twice with different {}",
                        r.id,
                        fields.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", ")
                    ),
                }),
            },
        }
    }
    (merged, origin, problems)
}

/// Combines two declarations of one id, or names the fields on which they differ.
fn merge_one(a: &Resource, b: &Resource) -> Result<Resource, Vec<String>> {
    let mut conflicts = Vec::new();
    let meta = Meta {
        requires: pick(&a.meta.requires, &b.meta.requires, "requires", &mut conflicts, Vec::is_empty),
        notify: pick(&a.meta.notify, &b.meta.notify, "notify", &mut conflicts, Vec::is_empty),
        sensitive: pick(&a.meta.sensitive, &b.meta.sensitive, "sensitive", &mut conflicts, Option::is_none),
    };
    let spec = match (&a.spec, &b.spec) {
        (Spec::File(x), Spec::File(y)) => merge_fields(x, y, &mut conflicts).map(Spec::File),
        (Spec::Directory(x), Spec::Directory(y)) => merge_fields(x, y, &mut conflicts).map(Spec::Directory),
        (Spec::Symlink(x), Spec::Symlink(y)) => merge_fields(x, y, &mut conflicts).map(Spec::Symlink),
        _ => unreachable!("one id has one kind"),
    };
    match spec {
        Some(spec) if conflicts.is_empty() => Ok(Resource::new(a.id.clone(), meta, spec)),
        _ => Err(conflicts),
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

/// Merges two kind specs field by field through their serialized form: a field set in one and
/// not the other is taken; set in both, it must be equal.
fn merge_fields<S: Serialize + serde::de::DeserializeOwned>(a: &S, b: &S, conflicts: &mut Vec<String>) -> Option<S> {
    let (serde_json::Value::Object(mut x), serde_json::Value::Object(y)) =
        (serde_json::to_value(a).ok()?, serde_json::to_value(b).ok()?)
    else {
        return None;
    };
    for (k, v) in y {
        match x.get(&k) {
            Some(existing) if *existing != v => conflicts.push(k),
            Some(_) => {}
            None => {
                x.insert(k, v);
            }
        }
    }
    serde_json::from_value(serde_json::Value::Object(x)).ok()
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
        }
    }
    problems
}

fn check_file(r: &Resource, f: &FileSpec, say: &mut impl FnMut(String)) {
    if f.content.is_some() && f.source.is_some() {
        say(format!("{}: `content` and `source` cannot both be set", r.id));
    }
    for (name, v) in [("owner", &f.owner), ("group", &f.group)] {
        if v.as_deref() == Some("") {
            say(format!("`{name}` is empty"));
        }
    }
    if let Some(argv) = &f.validate {
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
    fn validate_needs_a_placeholder() {
        let rs =
            vec![file("/x", FileSpec { validate: Some(vec!["visudo".into(), "-c".into()]), ..Default::default() })];
        assert!(check_each(&rs)[0].message.contains("needs `%`"));
    }
}
