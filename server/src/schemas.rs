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
    ]
}
