//! What changes for each node between two compiles: resources added, removed and changed,
//! field by field, with content as a unified diff. Sensitive values never appear, nor any
//! hash of them: a sealed value is compared by its keyed fingerprint and said to have changed.

use converge_modules::catalog::{Catalog, Resource, ResourceId};
use converge_modules::report::{describe_content, unified_diff};
use converge_modules::sealed::Sealed;
use serde_json::{Map, Value as Json};
use std::collections::BTreeMap;
use std::fmt::Write;

/// One node's changes; empty when nothing differs.
#[derive(Debug, Default, PartialEq)]
pub struct NodeDiff {
    pub added: Vec<ResourceId>,
    pub removed: Vec<ResourceId>,
    /// Changed resources with (field, from, to, unified diff) per field.
    pub changed: Vec<(ResourceId, Vec<FieldChange>)>,
}

#[derive(Debug, PartialEq)]
pub struct FieldChange {
    pub field: String,
    pub from: String,
    pub to: String,
    pub diff: Option<String>,
}

impl NodeDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Fields whose values are never shown, whatever the resource.
const SECRET_FIELDS: &[&str] = &["password_hash", "stdin"];

/// A resource's fields, its sealed ones as their fingerprints (marked as such).
fn fields(r: &Resource, sealed: &[Sealed]) -> Map<String, Json> {
    let mut m = match serde_json::to_value(r) {
        Ok(Json::Object(mut m)) => {
            m.remove(r.id.kind.name());
            m
        }
        _ => Map::new(),
    };
    for s in sealed.iter().filter(|s| s.resource == r.id) {
        m.insert(s.field.name().to_string(), Json::String(format!("{SEALED}{}", s.fingerprint)));
    }
    m
}

/// What marks a sealed value's fingerprint among a resource's fields.
const SEALED: &str = "\0sealed:";

/// A hidden value as the diff shows it: whether it is set, and whether it is a secret.
fn hidden(v: Option<&Json>, changed: bool) -> String {
    let secret = v.and_then(Json::as_str).is_some_and(|s| s.starts_with(SEALED));
    match (v, secret, changed) {
        (None, ..) => "(unset)".into(),
        (_, true, false) => "(a secret)".into(),
        (_, true, true) => "(another secret)".into(),
        (_, false, false) => "(hidden)".into(),
        (_, false, true) => "(hidden, changed)".into(),
    }
}

fn show(v: Option<&Json>) -> String {
    match v {
        None => "(unset)".to_string(),
        Some(Json::String(s)) if s.contains('\n') || s.len() > 60 => describe_content(s.as_bytes()),
        Some(Json::String(s)) => format!("{s:?}"),
        Some(other) => other.to_string(),
    }
}

/// The differences from `a` to `b`, one node's two catalogs; `labels` name the two sides in
/// content diffs.
pub fn diff(a: &Catalog, b: &Catalog, labels: (&str, &str)) -> NodeDiff {
    let index = |c: &Catalog| -> BTreeMap<ResourceId, Map<String, Json>> {
        c.resources.iter().map(|r| (r.id.clone(), fields(r, &c.sealed))).collect()
    };
    let sensitive = |c: &Catalog| -> Vec<ResourceId> {
        c.resources.iter().filter(|r| r.sensitive()).map(|r| r.id.clone()).collect()
    };
    let hide = [sensitive(a), sensitive(b)].concat();
    let (a, b) = (index(a), index(b));
    let mut out = NodeDiff::default();
    for (id, fb) in &b {
        let Some(fa) = a.get(id) else {
            out.added.push(id.clone());
            continue;
        };
        let sensitive = hide.contains(id);
        let mut keys: Vec<&String> = fa.keys().chain(fb.keys()).collect();
        keys.sort();
        keys.dedup();
        let mut changes = Vec::new();
        for k in keys {
            let (va, vb) = (fa.get(k), fb.get(k));
            if va == vb {
                continue;
            }
            let secret = SECRET_FIELDS.contains(&k.as_str()) || (sensitive && k != "sensitive");
            let change = if secret {
                FieldChange { field: k.clone(), from: hidden(va, false), to: hidden(vb, va.is_some()), diff: None }
            } else {
                let text = |v: Option<&Json>| v.and_then(Json::as_str).map(str::to_string);
                let diff = match (text(va), text(vb)) {
                    (Some(x), Some(y)) if x.contains('\n') || y.contains('\n') => unified_diff(
                        &format!("{id} ({})", labels.0),
                        &format!("{id} ({})", labels.1),
                        x.as_bytes(),
                        y.as_bytes(),
                    ),
                    _ => None,
                };
                FieldChange { field: k.clone(), from: show(va), to: show(vb), diff }
            };
            changes.push(change);
        }
        if !changes.is_empty() {
            out.changed.push((id.clone(), changes));
        }
    }
    out.removed = a.keys().filter(|id| !b.contains_key(*id)).cloned().collect();
    out
}

/// The text shown for one node.
pub fn render(node: &str, d: &NodeDiff) -> String {
    let mut s =
        format!("node {node}: {} added, {} removed, {} changed\n", d.added.len(), d.removed.len(), d.changed.len());
    for id in &d.added {
        let _ = writeln!(s, "  + {id}");
    }
    for id in &d.removed {
        let _ = writeln!(s, "  - {id}");
    }
    for (id, changes) in &d.changed {
        let _ = writeln!(s, "  ~ {id}");
        for c in changes {
            let _ = writeln!(s, "      {}: {} -> {}", c.field, c.from, c.to);
            for line in c.diff.iter().flat_map(|d| d.lines()) {
                let _ = writeln!(s, "        {line}");
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use converge_modules::load::load;

    fn catalog(resources: &str) -> Catalog {
        load("t.yaml", &format!("format: 1\nresources:\n{resources}"), None).unwrap().catalog
    }

    #[test]
    fn added_removed_and_changed_fields() {
        let a = catalog("  - file: /a\n    content: \"one\\ntwo\\n\"\n  - package: apache2\n  - service: nginx\n");
        let b = catalog(
            "  - file: /a\n    content: \"one\\nthree\\n\"\n    mode: \"0640\"\n  - package: nginx\n  - service: nginx\n    enabled: true\n",
        );
        let d = diff(&a, &b, ("a", "b"));
        let text = render("web01", &d);
        assert!(text.starts_with("node web01: 1 added, 1 removed, 2 changed\n"), "{text}");
        assert!(text.contains("  + package:nginx\n  - package:apache2\n"), "{text}");
        assert!(text.contains("-two\n        +three"), "{text}");
        assert!(text.contains("      mode: (unset) -> \"0640\""), "{text}");
        assert!(text.contains("  ~ service:nginx\n      enabled: (unset) -> true"), "{text}");
        assert!(diff(&a, &a, ("a", "a")).is_empty());
    }

    #[test]
    fn sensitive_values_are_neither_shown_nor_hashed() {
        let a = catalog(
            "  - file: /k\n    content: old-secret\n    sensitive: true\n  - user: u\n    password_hash: $6$a\n",
        );
        let b = catalog(
            "  - file: /k\n    content: new-secret\n    sensitive: true\n  - user: u\n    password_hash: $6$b\n",
        );
        let text = render("n", &diff(&a, &b, ("a", "b")));
        assert!(!text.contains("old-secret") && !text.contains("new-secret") && !text.contains("$6$"), "{text}");
        assert!(!text.contains("sha256"), "no plain hash of a secret: {text}");
        assert!(text.contains("content: (hidden) -> (hidden, changed)"), "{text}");
        assert!(text.contains("password_hash: (hidden) -> (hidden, changed)"), "{text}");
    }

    #[test]
    fn a_sealed_value_is_told_changed_by_its_fingerprint_alone() {
        let mut a = catalog("  - file: /k\n    sensitive: true\n  - file: /same\n    sensitive: true\n");
        let seal = |c: &mut Catalog, k: &str, same: &str| {
            c.sealed = vec![
                Sealed {
                    resource: ResourceId::parse("file:/k").unwrap(),
                    field: converge_modules::sealed::Field::Content,
                    fingerprint: k.into(),
                },
                Sealed {
                    resource: ResourceId::parse("file:/same").unwrap(),
                    field: converge_modules::sealed::Field::Content,
                    fingerprint: same.into(),
                },
            ]
        };
        let mut b = a.clone();
        seal(&mut a, "hmac-sha256:aa", "hmac-sha256:ss");
        seal(&mut b, "hmac-sha256:bb", "hmac-sha256:ss");
        let text = render("n", &diff(&a, &b, ("a", "b")));
        assert!(text.contains("~ file:/k\n      content: (a secret) -> (another secret)\n"), "{text}");
        assert!(!text.contains("file:/same") && !text.contains("aa") && !text.contains("bb"), "{text}");
    }
}
