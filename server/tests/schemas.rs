//! The schemas in schemas/ are those the Rust types generate: a change to a role, site or
//! catalog type that is not followed by `converge-server schemas --out schemas` fails here.

#[test]
fn schemas_are_not_stale() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
    for (name, text) in converge_server::schemas::all() {
        let on_disk = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        assert!(
            on_disk == text,
            "schemas/{name} is stale: run `cargo run -p converge-server -- schemas --out schemas` and commit it"
        );
    }
}

#[test]
fn example_files_point_editors_at_their_schema() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = vec![
        ("catalogs/site.yaml".to_string(), "../schemas/site.schema.json"),
        ("demo/catalog.yaml".to_string(), "../schemas/catalog.schema.json"),
    ];
    for e in std::fs::read_dir(root.join("catalogs/roles")).unwrap() {
        files.push((
            format!("catalogs/roles/{}", e.unwrap().file_name().to_string_lossy()),
            "../../schemas/role.schema.json",
        ));
    }
    fn data_files(dir: &std::path::Path, depth: usize, out: &mut Vec<(String, String)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && !p.ends_with("secrets") {
                data_files(&p, depth + 1, out);
            } else if p.extension().is_some_and(|x| x == "yaml") {
                out.push((p.display().to_string(), format!("{}schemas/data.schema.json", "../".repeat(depth))));
            }
        }
    }
    let mut data = Vec::new();
    data_files(&root.join("catalogs/data"), 2, &mut data);
    assert!(data.len() >= 5, "{data:?}");
    for (file, schema) in &data {
        let text = std::fs::read_to_string(file).unwrap();
        assert!(
            text.starts_with(&format!("# yaml-language-server: $schema={schema}")),
            "{file} should point at {schema}"
        );
    }
    for (file, schema) in files {
        let text = std::fs::read_to_string(root.join(&file)).unwrap();
        let modeline = format!("# yaml-language-server: $schema={schema}");
        assert!(text.starts_with(&modeline), "{file} should start with {modeline}");
    }
}

/// What the schemas allow for a mode is what the loader takes: the octal string, and the
/// number YAML editors see in `mode: 0644` (and JSON's `644`); both read as octal digits.
#[test]
fn modes_written_as_numbers_are_modes_to_the_schemas_and_the_loader_alike() {
    let role: serde_json::Value = serde_json::from_str(
        &converge_server::schemas::all().into_iter().find(|(n, _)| *n == "role.schema.json").unwrap().1,
    )
    .unwrap();
    let mode = &role["$defs"]["Mode"]["anyOf"];
    assert_eq!(mode[0]["type"], "string");
    assert_eq!(mode[1]["type"], "integer", "{role:#}");
    for (text, want) in [
        ("format: 1\nresources:\n  - file: /x\n    mode: 0644\n", 0o644),
        ("format: 1\nresources:\n  - file: /x\n    mode: 750\n", 0o750),
        ("format: 1\nresources:\n  - file: /x\n    mode: \"0000\"\n", 0),
        (r#"{"format": 1, "resources": [{"file": "/x", "mode": 644}]}"#, 0o644),
    ] {
        let loaded = converge_modules::load::load("c.yaml", text, None).unwrap_or_else(|d| panic!("{text}: {d}"));
        let json = serde_json::to_value(&loaded.catalog.resources[0]).unwrap();
        assert_eq!(json["mode"], format!("{want:04o}"), "{text}");
    }
    let e = converge_modules::load::load("c.yaml", "format: 1\nresources:\n  - file: /x\n    mode: 888\n", None)
        .unwrap_err();
    assert!(e.to_string().contains("mode `888` is not 3 or 4 octal digits"), "{e}");
}

/// The reference (`schemas/reference.md`, which `converge doc` prints) and the catalog schema
/// come from one source: every kind and every field the schema has is in the reference, under
/// its kind, and the agent prints it.
#[test]
fn the_reference_and_the_schemas_come_from_one_source() {
    let all = converge_server::schemas::all();
    let get = |name: &str| all.iter().find(|(n, _)| *n == name).unwrap().1.clone();
    let catalog: serde_json::Value = serde_json::from_str(&get("catalog.schema.json")).unwrap();
    let reference = get("reference.md");
    for v in catalog["$defs"]["Resource"]["oneOf"].as_array().unwrap() {
        let kind = v["title"].as_str().unwrap();
        let section = reference
            .split(&format!("\n## {kind}\n"))
            .nth(1)
            .unwrap_or_else(|| panic!("no section for {kind}"))
            .split("\n## ")
            .next()
            .unwrap();
        for field in v["properties"].as_object().unwrap().keys() {
            let shared = ["requires", "notify", "sensitive", "confirm"].contains(&field.as_str());
            assert!(
                shared || section.lines().any(|l| l.trim_start().starts_with(&format!("{field} "))),
                "{kind}.{field} is not in the reference:\n{section}"
            );
        }
    }
}
