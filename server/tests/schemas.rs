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
    for (file, schema) in files {
        let text = std::fs::read_to_string(root.join(&file)).unwrap();
        let modeline = format!("# yaml-language-server: $schema={schema}");
        assert!(text.starts_with(&modeline), "{file} should start with {modeline}");
    }
}
