//! Reading a catalog: text -> structure -> merged, checked resources -> plan, with every problem
//! reported at once as `file:line:col: message`.
//!
//! JSON (the wire spelling, what agents receive) is decoded straight into the model with
//! serde_json: the fast path. Everything else, and any JSON that fails, goes through the located
//! YAML reader, so that every diagnostic has a place. Reading `source:` files is left to the
//! caller's closure: this module does no I/O.

use crate::catalog::{Catalog, FORMAT_SEALED, Kind, Meta, Resource, ResourceId, Spec, kind_from_first_key};
use crate::diag::{Diagnostic, Diagnostics, Mark};
use crate::plan::{self, Plan};
use crate::validate::{self, Problem};
use crate::yaml::{self, DeError, Node, NodeDe, Value};
use std::collections::HashSet;

/// A catalog ready to converge: merged resources and their plan.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub catalog: Catalog,
    pub plan: Plan,
}

/// Reads `source:` files of file resources: given the `source` value, returns the content or
/// why it cannot.
pub type SourceReader<'a> = &'a dyn Fn(&str) -> Result<String, SourceError>;

/// Why a `source:` file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not UTF-8 text")]
    NotUtf8,
}

/// Loads and checks a catalog. `name` is the file name used in diagnostics.
pub fn load(name: &str, text: &str, read_source: Option<SourceReader>) -> Result<Loaded, Diagnostics> {
    load_each(name, text, read_source, &mut |_| {})
}

/// [`load`], handing each resource of a YAML catalog to `each` as soon as it is decoded (an
/// agent keeps large content aside there).
pub fn load_each(
    name: &str,
    text: &str,
    read_source: Option<SourceReader>,
    each: &mut dyn FnMut(&mut Resource),
) -> Result<Loaded, Diagnostics> {
    let fast = if text.trim_start().starts_with('{') { serde_json::from_str::<Catalog>(text).ok() } else { None };
    let decoded = match fast {
        Some(catalog) => Decoded { catalog, origins: None, broken: HashSet::new(), diags: Diagnostics::default() },
        None => decode_located(name, text, each),
    };
    check(name, Some(text), decoded, read_source)
}

/// Loads a YAML catalog from a reader, its text never in memory whole. `None` when it has any
/// problem at all: the caller then loads the text with [`load_each`], for every problem with
/// its place and line.
///
/// The catalog is read by the block reader first ([`yaml::parse_block_from`]); a catalog
/// beyond it is read again, from a second reader `open` gives, by saphyr.
pub fn load_yaml_from<R: std::io::Read>(
    name: &str,
    mut open: impl FnMut() -> std::io::Result<R>,
    read_source: Option<SourceReader>,
    each: &mut dyn FnMut(&mut Resource),
) -> Option<Loaded> {
    let unread = |e: std::io::Error| yaml::SyntaxError { problems: vec![(Mark::UNKNOWN, e.to_string())] };
    let mut beyond = false;
    let decoded = decode_located_with(name, each, |item| {
        match yaml::parse_block_from(open().map_err(unread)?, "resources", item) {
            Some(parsed) => parsed,
            None => {
                // Not an error: this pass is set aside below.
                beyond = true;
                Err(yaml::SyntaxError { problems: Vec::new() })
            }
        }
    });
    let decoded = if beyond {
        tracing::debug!(catalog = name, "beyond the block YAML reader: read again with the full one");
        decode_located_with(name, each, |item| yaml::parse_streaming_from(open().map_err(unread)?, "resources", item))
    } else {
        decoded
    };
    if !decoded.diags.is_empty() || !decoded.broken.is_empty() {
        return None;
    }
    check(name, None, decoded, read_source).ok()
}

/// Checks a catalog already decoded (the agent streams JSON straight into the model, so as not
/// to hold the text and the catalog at once). Problems come without places: a caller that
/// wants them reloads the text with [`load`].
pub fn load_decoded(name: &str, catalog: Catalog, read_source: Option<SourceReader>) -> Result<Loaded, Diagnostics> {
    let decoded = Decoded { catalog, origins: None, broken: HashSet::new(), diags: Diagnostics::default() };
    check(name, None, decoded, read_source)
}

/// A catalog as decoded, before merging and checks.
struct Decoded {
    catalog: Catalog,
    /// The place of each declared resource; `None` on the JSON fast path until needed.
    origins: Option<Vec<Mark>>,
    /// Ids of resources that failed to decode: not reported again as undeclared.
    broken: HashSet<ResourceId>,
    diags: Diagnostics,
}

/// Which list a problem's indexes refer to.
#[derive(Clone, Copy)]
enum Space {
    Declared,
    Merged,
}

fn check(name: &str, text: Option<&str>, d: Decoded, read_source: Option<SourceReader>) -> Result<Loaded, Diagnostics> {
    let Decoded { mut catalog, origins, broken, mut diags } = d;
    if catalog.format > FORMAT_SEALED || catalog.format == 0 {
        let msg = if catalog.format == 0 {
            "`format` must be 1 or more".to_string()
        } else {
            format!(
                "catalog format {} is newer than this converge understands ({FORMAT_SEALED}); upgrade converge",
                catalog.format
            )
        };
        diags.push(Diagnostic::new(name, Mark::new(1, 1), msg));
    }
    if !catalog.sealed.is_empty() {
        let msg = format!(
            "`sealed`: {} values are still sealed: converge opens them only in a signed catalog for this host",
            catalog.sealed.len()
        );
        diags.push(Diagnostic::new(name, Mark::new(1, 1), msg));
    }
    let mut problems: Vec<Problem> = Vec::new();
    let mut declared = std::mem::take(&mut catalog.resources);
    for (i, r) in declared.iter_mut().enumerate() {
        let Spec::File(f) = &mut r.spec else { continue };
        let (Some(src), None) = (&f.source, &f.content) else {
            continue;
        };
        let result = match read_source {
            Some(read) => read(src).map_err(|e| format!("{}: cannot read source {src}: {e}", r.id)),
            None => Err(format!("{}: `source` cannot be read here; a compiled catalog carries `content`", r.id)),
        };
        match result {
            Ok(content) => {
                f.content = Some(content.into());
                f.source = None;
            }
            Err(msg) => problems.push(Problem::new(i, msg)),
        }
    }
    let mut origins = origins;
    let mut place = |i: usize| {
        let origins = origins
            .get_or_insert_with(|| text.and_then(|t| decode_located(name, t, &mut |_| {}).origins).unwrap_or_default());
        (name.to_string(), origins.get(i).copied().unwrap_or(Mark::UNKNOWN))
    };
    match (check_declared(declared, &broken, problems, &mut place), diags.is_empty()) {
        (Ok((resources, plan)), true) => {
            catalog.resources = resources;
            Ok(Loaded { catalog, plan })
        }
        (Ok(_), false) => Err(diags.sorted()),
        (Err(more), _) => {
            diags.0.extend(more);
            Err(diags.sorted())
        }
    }
}

/// Merges, checks and plans declared resources, wherever they were declared. `early` are
/// problems already found (indexes into `declared`); `place` gives the file and place of the
/// resource declared at an index, and is called only when there is something to report.
pub fn check_declared(
    declared: Vec<Resource>,
    unreadable: &HashSet<ResourceId>,
    early: Vec<Problem>,
    place: &mut dyn FnMut(usize) -> (String, Mark),
) -> Result<(Vec<Resource>, Plan), Vec<Diagnostic>> {
    let mut problems: Vec<(Problem, Space)> = early.into_iter().map(|p| (p, Space::Declared)).collect();
    let (merged, origin_of, conflicts) = validate::merge(declared);
    problems.extend(conflicts.into_iter().map(|p| (p, Space::Declared)));
    problems.extend(validate::check_each(&merged).into_iter().map(|p| (p, Space::Merged)));
    let plan = plan::plan_partial(&merged, unreadable)
        .map_err(|ps| problems.extend(ps.into_iter().map(|p| (p, Space::Merged))))
        .ok();
    if problems.is_empty() {
        return Ok((merged, plan.expect("a plan when there are no problems")));
    }
    let mut at = |i: usize, space: Space| {
        place(match space {
            Space::Declared => i,
            Space::Merged => origin_of[i],
        })
    };
    let mut diags = Vec::with_capacity(problems.len());
    for (p, space) in problems {
        let (file, mark) = at(p.at, space);
        let also: Vec<String> = p
            .also
            .iter()
            .map(|&j| at(j, space))
            .filter(|(_, m)| m.is_known())
            .map(|(f, m)| if f == file { format!("line {}", m.line) } else { format!("{f}:{}", m.line) })
            .collect();
        let msg = if also.is_empty() { p.message } else { format!("{} (see {})", p.message, also.join(", ")) };
        diags.push(Diagnostic::new(file, mark, msg));
    }
    Err(diags)
}

/// Decodes through the located YAML reader: every structural problem with its place.
fn decode_located(name: &str, text: &str, each: &mut dyn FnMut(&mut Resource)) -> Decoded {
    decode_located_with(name, each, |item| yaml::parse_streaming(text, "resources", item))
}

/// [`decode_located`] over a parse of the caller's: from a text, or from a reader.
fn decode_located_with(
    name: &str,
    each: &mut dyn FnMut(&mut Resource),
    parse: impl FnOnce(&mut dyn FnMut(Node)) -> Result<Node, yaml::SyntaxError>,
) -> Decoded {
    let mut diags = Diagnostics::default();
    let push = |diags: &mut Diagnostics, e: DeError| {
        for (m, msg) in e.0 {
            diags.push(Diagnostic::new(name, m.unwrap_or(Mark::UNKNOWN), msg));
        }
    };
    let empty = |diags| Decoded { catalog: Catalog::new(vec![]), origins: Some(vec![]), broken: HashSet::new(), diags };
    // Each resource is decoded as soon as the parser has read it (and its nodes dropped).
    let mut resources = Vec::new();
    let mut origins = Vec::new();
    let mut broken = HashSet::new();
    let mut late = Diagnostics::default();
    let mut item = |node: Node| {
        let mark = node.mark;
        match decode_resource(node) {
            Ok(mut r) => {
                each(&mut r);
                resources.push(r);
                origins.push(mark);
            }
            Err((id, e)) => {
                broken.extend(id);
                push(&mut late, e.at(mark));
            }
        }
    };
    let parsed = parse(&mut item);
    let root = match parsed {
        // Problems in resources read before a syntax error are left out: the syntax comes first.
        Ok(n) => {
            diags.0.extend(late.0);
            n
        }
        Err(e) => {
            for (m, msg) in e.problems {
                diags.push(Diagnostic::new(name, m, msg));
            }
            return empty(diags);
        }
    };
    let Value::Map(entries) = root.value else {
        let msg = format!("a catalog is a mapping with `format` and `resources`, found {}", root.describe());
        diags.push(Diagnostic::new(name, root.mark, msg));
        return empty(diags);
    };
    let (items, header): (Vec<_>, Vec<_>) = entries.into_iter().partition(|(k, _)| k.as_str() == Some("resources"));
    let mut header = header;
    let empty_list = Node { mark: root.mark, value: Value::Seq(vec![]) };
    header.push((Node { mark: root.mark, value: Value::Scalar { text: "resources".into(), plain: true } }, empty_list));
    let header_node = Node { mark: root.mark, value: Value::Map(header) };
    let mut catalog = match yaml::from_node::<Catalog>(&header_node) {
        Ok(c) => c,
        Err(e) => {
            push(&mut diags, e);
            Catalog::new(vec![])
        }
    };
    catalog.resources = resources;
    if let Some((_, list)) = items.into_iter().next() {
        let (list_mark, described, is_null) = (list.mark, list.describe(), list.is_null());
        match list.value {
            // A sequence's items were decoded while it was read.
            Value::Seq(nodes) => debug_assert!(nodes.is_empty()),
            _ if is_null => {}
            _ => diags.push(Diagnostic::new(name, list_mark, format!("`resources` must be a list, found {described}"))),
        }
    }
    Decoded { catalog, origins: Some(origins), broken, diags }
}

/// Decodes one resource node: its first key is the kind, its value the title; the shared
/// fields go to [`Meta`], the rest to the kind, every unknown field reported. On failure,
/// returns the id when it could be read.
pub fn decode_resource(node: Node) -> Result<Resource, (Option<ResourceId>, DeError)> {
    let fail = |m: Mark, msg: String| (None, DeError(vec![(Some(m), msg)]));
    let mark = node.mark;
    let Value::Map(entries) = node.value else {
        let found = node.describe();
        return Err(fail(mark, format!("a resource is a mapping like `file: /etc/motd`, found {found}")));
    };
    let mut entries = entries.into_iter();
    let Some((k, v)) = entries.next() else {
        return Err(fail(mark, "empty resource: its first key must be its kind, like `file: /etc/motd`".into()));
    };
    let first = k.as_str().unwrap_or("?");
    let kind: Kind = match kind_from_first_key(first) {
        Ok(kind) => kind,
        Err(m) => {
            // A misspelt kind still declares its id: relations to it are not reported again.
            let id = Kind::close_to(first).zip(v.as_str()).and_then(|(k, t)| ResourceId::new(k, t).ok());
            return Err((id, DeError(vec![(Some(k.mark), m.to_string())])));
        }
    };
    let title = match v.as_str() {
        Some(t) if !v.is_null() => t,
        _ => {
            return Err(fail(v.mark, format!("the {kind} title must be a string, found {}", v.describe())));
        }
    };
    let id = ResourceId::new(kind, title).map_err(|m| fail(v.mark, m.to_string()))?;
    let (meta_entries, spec_entries): (Vec<_>, Vec<_>) =
        entries.partition(|(k, _)| k.as_str().is_some_and(|k| Meta::FIELDS.contains(&k)));
    let meta_node = Node { mark, value: Value::Map(meta_entries) };
    let spec_node = Node { mark, value: Value::Map(spec_entries) };
    let meta = yaml::from_node::<Meta>(&meta_node);
    let spec = Spec::deserialize_kind(kind, NodeDe(&spec_node));
    match (meta, spec) {
        (Ok(meta), Ok(spec)) => Ok(Resource::new(id, meta, spec)),
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err((Some(id), e)),
        (Err(a), Err(b)) => Err((Some(id), DeError(a.0.into_iter().chain(b.0).collect()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads `text` and returns its diagnostics as `line:col: message` strings.
    fn check(text: &str) -> Vec<String> {
        match load("c.yaml", text, None) {
            Ok(_) => vec![],
            Err(d) => d.iter().map(|d| format!("{}:{}: {}", d.mark.line, d.mark.col, d.message)).collect(),
        }
    }

    #[test]
    fn a_good_catalog_loads_in_both_spellings() {
        let yaml = "format: 1\nresources:\n  - directory: /srv\n  - file: /srv/a\n    content: hi\n";
        let a = load("c.yaml", yaml, None).unwrap();
        let json = serde_json::to_string(&a.catalog).unwrap();
        let b = load("c.json", &json, None).unwrap();
        assert_eq!(a.catalog, b.catalog);
        assert_eq!(b.plan.order, vec![0, 1]);
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_place() {
        let text = "\
format: 1
resources:
  - file: /etc/a
    mdoe: \"0644\"
  - file: /etc/b
    backup: maybe
  - file: etc/c
  - file: /etc/d
    mode: \"0644\"
  - file: /etc/d
    mode: \"0600\"
  - file: /etc/e
    requires: [file:/etc/nope]
  - file: /etc/f
    requires: [file:/etc/g]
  - file: /etc/g
    requires: [file:/etc/f]
  - widget: x
";
        assert_eq!(
            check(text),
            [
                "4:5: unknown field `mdoe` (did you mean `mode`?)",
                "6:13: invalid type: string \"maybe\", expected a boolean",
                "7:11: path `etc/c` is relative; write it from the root, like `/etc/c`",
                "10:5: file:/etc/d is declared twice with different `mode` (see line 8)",
                "12:5: file:/etc/e requires file:/etc/nope, which is not declared",
                "14:5: dependency cycle: file:/etc/f requires file:/etc/g, file:/etc/g requires file:/etc/f (see line 16)",
                &format!("18:5: a resource's first key must be its kind ({}), found `widget`", Kind::names()),
            ]
        );
    }

    #[test]
    fn a_broken_resource_is_not_also_reported_as_undeclared() {
        let text = "format: 1\nresources:\n  - file: /a\n    colour: red\n  - file: /b\n    requires: [file:/a]\n";
        assert_eq!(
            check(text),
            [
                "4:5: unknown field `colour`; expected one of: ensure, content, source, content_sha256, size, mode, owner, group, backup, validate, force"
            ]
        );
    }

    #[test]
    fn syntax_errors_and_wrong_shapes() {
        assert_eq!(
            check("format: 1\nresources: [\n"),
            ["3:1: YAML syntax: while parsing a node, did not find expected node content"]
        );
        assert_eq!(check("- a\n"), ["1:1: a catalog is a mapping with `format` and `resources`, found a list"]);
        assert_eq!(check("format: 1\nresources: {}\n"), ["2:12: `resources` must be a list, found a mapping"]);
        assert_eq!(check("resources: []\n"), ["1:1: missing field `format`"]);
        assert_eq!(
            check("format: 3\nresources: []\n"),
            ["1:1: catalog format 3 is newer than this converge understands (2); upgrade converge"]
        );
        assert_eq!(
            check("format: 1\nresources:\n  - file: [a]\n"),
            ["3:11: the file title must be a string, found a list"]
        );
        assert_eq!(
            check("format: 1\nresources:\n  - file: /a\n    mode: \"0644\"\n    mode: \"0600\"\n"),
            ["5:5: duplicate key `mode` (first at line 4)"]
        );
    }

    #[test]
    fn json_problems_get_places_too() {
        let text = "{\"format\": 1, \"resources\": [\n {\"file\": \"/a\"},\n {\"file\": \"/a\", \"mode\": \"0600\"},\n {\"file\": \"/a\", \"mode\": \"0644\"}\n]}";
        assert_eq!(check(text), ["4:2: file:/a is declared twice with different `mode` (see line 2)"]);
        let text = "{\"format\": 1, \"resources\": [\n {\"file\": \"/a\", \"mdoe\": 1}]}";
        assert_eq!(check(text), ["2:17: unknown field `mdoe` (did you mean `mode`?)"]);
    }

    #[test]
    fn sources_are_read_by_the_caller() {
        let text =
            "format: 1\nresources:\n  - file: /a\n    source: files/a\n  - file: /b\n    source: files/missing\n";
        let read = |p: &str| {
            if p == "files/a" {
                Ok("A".to_string())
            } else {
                Err(SourceError::Io(std::io::Error::from_raw_os_error(2)))
            }
        };
        let e = load("c.yaml", text, Some(&read)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "c.yaml:5:5: file:/b: cannot read source files/missing: No such file or directory (os error 2)"
        );
        let ok = load("c.yaml", "format: 1\nresources:\n  - file: /a\n    source: files/a\n", Some(&read)).unwrap();
        let Spec::File(f) = &ok.catalog.resources[0].spec else { panic!() };
        assert_eq!((f.content.as_ref().and_then(|c| c.held()), f.source.as_deref()), (Some("A"), None));
        assert!(load("c.yaml", "format: 1\nresources:\n  - file: /a\n    source: files/a\n", None).is_err());
    }
}
