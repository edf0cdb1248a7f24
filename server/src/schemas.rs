//! JSON Schemas for the files operators write, generated from the Rust types that read them:
//! `site.yaml`, role files, data files, and catalogs (what `converge apply` reads and `compile`
//! prints).
//! Editors use them through the `yaml-language-server` modeline at the top of each file;
//! `converge-server schemas --out schemas` regenerates them and a test fails when they are stale.

use crate::role::RoleHead;
use crate::site::Site;
use converge_modules::catalog::{Catalog, Kind, resource_variant};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde_json::{Value, json};
use std::borrow::Cow;

/// A role file as the schema describes it (the compiler reads it through [`RoleHead`] and raw
/// resource nodes).
#[derive(JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct RoleFile {
    #[serde(flatten)]
    head: RoleHead,
    /// The resources this role declares. Any string value may be a minijinja template.
    #[serde(default)]
    resources: Vec<RoleResource>,
}

/// A file under `data/`: any values, merged along the hierarchy; `params` overrides roles'
/// params, by role and then by param.
#[derive(JsonSchema)]
#[allow(dead_code)]
struct DataFile {
    /// Values for roles' params: `params: {ROLE: {PARAM: VALUE}}` (a role's own params only).
    #[serde(default)]
    params: std::collections::BTreeMap<String, std::collections::BTreeMap<String, Value>>,
    /// Anything else a template reads as `data.NAME`.
    #[serde(flatten)]
    values: std::collections::BTreeMap<String, Value>,
}

/// A resource in a role: a catalog resource whose values may be templates, with directives.
struct RoleResource;

/// What a role's `directory` takes beyond a catalog's.
const DIRECTORY_SOURCE: &str = "A directory under files/ whose whole tree (subdirectories with this directory's mode, purge rules, owner and group; files 0644 with its owner and group) is declared under this path, with this directory's notify";

/// A string holding a minijinja template, accepted wherever a role gives a value.
fn templated() -> Value {
    json!({"type": "string", "pattern": "\\{\\{|\\{%", "description": "A minijinja template, rendered per node"})
}

impl JsonSchema for RoleResource {
    fn schema_name() -> Cow<'static, str> {
        "RoleResource".into()
    }

    fn json_schema(g: &mut SchemaGenerator) -> Schema {
        let expression = |what: &str| json!({"type": "string", "description": what});
        let variants: Vec<Value> = Kind::ALL
            .iter()
            .map(|&kind| {
                let mut extra = vec![
                    ("when", expression("Keep the resource only when this expression is true, like \"node.environment == 'production'\"")),
                    ("for_each", expression("Repeat the resource for each item of this list or map (as `item`), like \"data.admins\"")),
                ];
                if kind == Kind::File {
                    extra.push(("template", json!({"type": "string", "description": "Render templates/NAME into `content`"})));
                }
                if kind == Kind::Directory {
                    extra.push(("source", json!({"type": "string", "description": DIRECTORY_SOURCE})));
                }
                let mut v = resource_variant(kind, g, &extra);
                if let Some(props) = v.get_mut("properties").and_then(Value::as_object_mut) {
                    for (name, schema) in props.iter_mut() {
                        if name != "when" && name != "for_each" {
                            *schema = json!({"anyOf": [schema.take(), templated()]});
                        }
                    }
                }
                v
            })
            .collect();
        json_schema!({"oneOf": variants})
    }
}

fn document<T: JsonSchema>(id: &str, title: &str) -> String {
    let mut schema = SchemaGenerator::default().into_root_schema_for::<T>().to_value();
    if let Some(o) = schema.as_object_mut() {
        o.insert("$id".into(), json!(id));
        o.insert("title".into(), json!(title));
    }
    serde_json::to_string_pretty(&schema).expect("a schema serializes") + "\n"
}

/// Every schema, by file name.
pub fn all() -> Vec<(&'static str, String)> {
    vec![
        ("catalog.schema.json", document::<Catalog>("catalog.schema.json", "converge catalog")),
        ("role.schema.json", document::<RoleFile>("role.schema.json", "converge role file")),
        ("data.schema.json", document::<DataFile>("data.schema.json", "converge data file")),
        ("site.schema.json", document::<Site>("site.schema.json", "converge site.yaml")),
        ("reference.md", reference()),
    ]
}

/// The type of a property, for people: `string`, `list of resource ids`, `one of: a, b`.
fn type_of(schema: &Value, defs: &Value) -> String {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap_or(r);
        let def = &defs[name];
        if let Some(values) = def.get("enum").and_then(Value::as_array) {
            return format!("one of: {}", values.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "));
        }
        if let Some(variants) = def.get("oneOf").and_then(Value::as_array) {
            let words: Vec<&str> = variants.iter().filter_map(|v| v.get("const").and_then(Value::as_str)).collect();
            if words.len() == variants.len() {
                return format!("one of: {}", words.join(", "));
            }
        }
        return match name {
            "Mode" => "mode (\"0644\")".into(),
            "ResourceId" => "resource id (kind:title)".into(),
            other => match def.get("properties").and_then(Value::as_object) {
                Some(p) => format!("{{{}}}", p.keys().cloned().collect::<Vec<_>>().join(", ")),
                None => other.to_lowercase(),
            },
        };
    }
    if let Some(any) = schema.get("anyOf").and_then(Value::as_array) {
        let parts: Vec<String> =
            any.iter().filter(|v| v.get("type") != Some(&json!("null"))).map(|v| type_of(v, defs)).collect();
        return parts.join(" or ");
    }
    let t = match schema.get("type") {
        Some(Value::Array(ts)) => {
            ts.iter().filter_map(Value::as_str).find(|t| *t != "null").unwrap_or("any").to_string()
        }
        Some(Value::String(t)) => t.clone(),
        _ => "any".into(),
    };
    match t.as_str() {
        "array" => format!("list of {}", schema.get("items").map_or("any".into(), |i| type_of(i, defs))),
        "object" => "map".into(),
        "integer" => "integer".into(),
        other => other.to_string(),
    }
}

/// The resource reference: every kind and its fields, from the catalog's schema (so from the
/// same types), as markdown that reads as plain text too (`converge doc KIND` prints a kind).
pub fn reference() -> String {
    let catalog: Value = serde_json::from_str(&document::<Catalog>("catalog.schema.json", "")).expect("a schema");
    let defs = &catalog["$defs"];
    let mut out = String::from(
        "# converge resource reference\n\nGenerated with the JSON Schemas from the types the agent reads \
         (`converge-server schemas --out schemas`); `converge doc KIND` prints one kind. A field in [brackets] \
         in a description is its default.\n",
    );
    let shared = ["requires", "notify", "sensitive", "confirm"];
    for v in defs["Resource"]["oneOf"].as_array().into_iter().flatten() {
        let kind = v["title"].as_str().unwrap_or("?");
        out.push_str(&format!("\n## {kind}\n\n"));
        if let Some(d) = v.get("description").and_then(Value::as_str).filter(|d| !d.is_empty()) {
            out.push_str(&format!("{}\n\n", d.replace('\n', " ")));
        }
        let required: Vec<&str> = v["required"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let props = v["properties"].as_object().cloned().unwrap_or_default();
        let mut names: Vec<&String> = props.keys().filter(|k| !shared.contains(&k.as_str())).collect();
        // The title first, then the fields in order.
        names.sort_by_key(|n| (n.as_str() != kind, n.as_str()));
        let width = names.iter().map(|n| n.len()).max().unwrap_or(0);
        let rows: Vec<(String, String, String)> = names
            .iter()
            .map(|n| {
                let p = &props[n.as_str()];
                let t = type_of(p, defs);
                let req = if required.contains(&n.as_str()) { ", required" } else { "" };
                let d = p.get("description").and_then(Value::as_str).unwrap_or("").replace('\n', " ");
                (n.to_string(), format!("{t}{req}"), d)
            })
            .collect();
        let twidth = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).min(40);
        for (n, t, d) in rows {
            out.push_str(format!("    {n:<width$}  {t:<twidth$}  {d}\n").trim_end());
            out.push('\n');
        }
        // What a role adds: resolved by the server, so not in the catalog's types.
        match kind {
            "file" => out.push_str("    (in a role also: template  Render templates/NAME into `content`)\n"),
            "directory" => out.push_str(&format!("    (in a role also: source  {DIRECTORY_SOURCE})\n")),
            _ => {}
        }
        out.push_str(&format!("    (and the fields every kind has: {})\n", shared.join(", ")));
    }
    out.push_str("\n## fields every kind has\n\n");
    let meta = defs["Resource"]["oneOf"][0]["properties"].as_object().cloned().unwrap_or_default();
    for n in shared {
        let p = &meta[n];
        let d = p.get("description").and_then(Value::as_str).unwrap_or("").replace('\n', " ");
        out.push_str(&format!("    {n:<10}  {}  {d}\n", type_of(p, defs)));
    }
    out
}
