//! Fuzzes the server's compiler on an operator repository: site.yaml, a role, a data file and
//! a template, cut from the input at NUL bytes, then every node compiled. Nothing a
//! repository holds may panic or hang the compiler.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut parts = text.split('\0');
    let site = parts.next().unwrap_or_default();
    let role = parts.next().unwrap_or("resources: []\n");
    let common = parts.next().unwrap_or("{}\n");
    let template = parts.next().unwrap_or("");
    let repo = converge_server::repo::Repo::from_files([
        ("site.yaml", site),
        ("roles/r.yaml", role),
        ("data/common.yaml", common),
        ("templates/t.j2", template),
    ]);
    let compiler = converge_server::compiler::Compiler::new(&repo);
    let names = compiler.site.as_ref().map(|s| s.node_names()).unwrap_or_default();
    for name in names.iter().take(4) {
        let _ = compiler.compile(name, &serde_json::Map::new());
    }
});
