//! The code map is kept true by this test: every module a crate's header comment or the
//! README's code map names exists, and every module a crate declares is named in both.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The crates whose maps are checked: directory and root file.
const CRATES: &[(&str, &str)] = &[("modules", "lib.rs"), ("agent", "main.rs"), ("server", "lib.rs")];

/// Whether `path` (`host` or `host::memory`) is a module of the crate in `src`.
fn exists(src: &Path, path: &str) -> bool {
    let rel = path.replace("::", "/");
    src.join(format!("{rel}.rs")).is_file() || src.join(&rel).join("mod.rs").is_file()
}

/// The modules `root` declares (`mod x;`, `pub mod x;`).
fn declared(root: &str) -> BTreeSet<String> {
    root.lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("pub ").unwrap_or(l);
            l.strip_prefix("mod ")?.strip_suffix(';').map(str::to_string)
        })
        .collect()
}

/// The names in `` [`x`] `` links of the `//!` header; a path is kept up to its last
/// lower-case segment (`host::Host` is the module `host`).
fn header_links(root: &str) -> BTreeSet<String> {
    let header: String = root.lines().take_while(|l| l.starts_with("//!")).collect::<Vec<_>>().join("\n");
    let mut out = BTreeSet::new();
    for part in header.split("[`").skip(1) {
        let Some(name) = part.split_once("`]").map(|(n, _)| n) else { continue };
        let module: Vec<&str> =
            name.split("::").take_while(|s| s.chars().next().is_some_and(|c| c.is_ascii_lowercase())).collect();
        if !module.is_empty() && !name.contains(' ') {
            out.insert(module.join("::"));
        }
    }
    out
}

/// The README's code map entry of `dir`: from its `- **`dir/`**` line to the next crate.
fn readme_section(readme: &str, dir: &str) -> String {
    let start =
        readme.find(&format!("- **`{dir}/`**")).unwrap_or_else(|| panic!("README: no code map entry for {dir}/"));
    let rest = &readme[start + 4..];
    let end = rest.find("\n- **").unwrap_or(rest.len());
    rest[..end].to_string()
}

/// The modules a README entry names: every `` `name` — `` (its description follows).
fn readme_modules(section: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in section.match_indices("` —") {
        let before = &section[..i];
        let Some(open) = before.rfind('`') else { continue };
        let name = &before[open + 1..];
        if name.chars().all(|c| c.is_ascii_lowercase() || c == '_' || c == ':' || c == '.') {
            out.insert(name.trim_end_matches(".rs").to_string());
        }
    }
    out
}

#[test]
fn every_module_the_maps_name_exists_and_every_module_is_named() {
    let root = workspace();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut problems = Vec::new();
    for (dir, file) in CRATES {
        let src = root.join(dir).join("src");
        let text = std::fs::read_to_string(src.join(file)).unwrap();
        let modules = declared(&text);
        let links = header_links(&text);
        let section = readme_section(&readme, dir);
        let named = readme_modules(&section);
        for m in &links {
            if !exists(&src, m) {
                problems.push(format!("{dir}/src/{file}: the header names `{m}`, which is no module"));
            }
        }
        for m in &named {
            if m != "main" && !exists(&src, m) {
                problems.push(format!("README code map of {dir}/: `{m}` is no module"));
            }
        }
        for m in &modules {
            if !links.contains(m) {
                problems.push(format!("{dir}/src/{file}: the header does not name the module `{m}`"));
            }
            if !named.contains(m) {
                problems.push(format!("README code map of {dir}/: the module `{m}` is not named"));
            }
        }
        assert!(!modules.is_empty() && !named.is_empty(), "{dir}: nothing read");
    }
    assert!(problems.is_empty(), "the code map is not true:\n{}", problems.join("\n"));
}

#[test]
fn the_reader_finds_what_it_should() {
    let text = "//! - [`catalog`]: the model; [`host::memory`] and [`host::Host`]\n//! [`Loaded`]\n\npub mod catalog;\nmod host;\n";
    assert_eq!(declared(text), BTreeSet::from(["catalog".to_string(), "host".to_string()]));
    assert_eq!(header_links(text), BTreeSet::from(["catalog".to_string(), "host".into(), "host::memory".into()]));
    let section = "`repo` — loads. `site` — `site.yaml`: classification. `main.rs` — the CLI.";
    assert_eq!(readme_modules(section), BTreeSet::from(["repo".to_string(), "site".into(), "main".into()]));
}
