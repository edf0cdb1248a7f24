//! The compiler on the example repository (golden catalogs) and on broken ones (every class of
//! mistake, with its file, line and message).

use converge_modules::load::load;
use converge_server::compiler::Compiler;
use converge_server::repo::Repo;
use serde_json::Map;
use std::path::Path;

fn catalogs() -> Repo {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../catalogs");
    let mut repo = Repo::from_dir(&dir).expect("catalogs/ loads");
    repo.source = None; // the commit changes with every commit; snapshots must not
    repo
}

/// Every node of catalogs/ compiles to its golden catalog, in the YAML an operator reads.
#[test]
fn golden_catalogs_of_every_node() {
    let compiler = Compiler::new(&catalogs());
    assert_eq!(compiler.problems, vec![], "catalogs/ has problems");
    let names = compiler.site.as_ref().unwrap().node_names();
    assert!(names.len() >= 6, "{names:?}");
    for name in names {
        let mut catalog = compiler.compile(&name, &Map::new()).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        // The resources, as an operator reviews them; their provenance has tests of its own.
        catalog.provenance.clear();
        let yaml = yaml_serde::to_string(&catalog).unwrap();
        insta::assert_snapshot!(name.clone(), yaml);
    }
}

/// What `compile --format yaml` prints is accepted by `converge apply` as it is, and means the
/// same catalog; so is the JSON.
#[test]
fn compiled_yaml_and_json_round_trip_through_the_agents_loader() {
    let compiler = Compiler::new(&catalogs());
    for name in compiler.site.as_ref().unwrap().node_names() {
        let catalog = compiler.compile(&name, &Map::new()).unwrap();
        let yaml = yaml_serde::to_string(&catalog).unwrap();
        let back = load("compiled.yaml", &yaml, None).unwrap_or_else(|d| panic!("{name}: {d}\n{yaml}"));
        assert_eq!(back.catalog, catalog, "{name}");
        let json = serde_json::to_string(&catalog).unwrap();
        assert_eq!(load("compiled.json", &json, None).unwrap().catalog, catalog, "{name}");
    }
}

#[test]
fn facts_reach_templates_and_undeclared_facts_do_not() {
    let compiler = Compiler::new(&catalogs());
    let facts: Map<String, serde_json::Value> =
        serde_json::from_str(r#"{"memory_mb": 16384, "cpus": 8, "os_family": "redhat", "secret_fact": "x"}"#).unwrap();
    let c = compiler.compile("db01.example.com", &facts).unwrap();
    let conf = c.resources.iter().find(|r| r.id.title == "/etc/postgresql/15/main/conf.d/converge.conf").unwrap();
    let text = serde_json::to_string(conf).unwrap();
    assert!(text.contains("shared_buffers = 4096MB") && text.contains("max_worker_processes = 8"), "{text}");
    // A fact never chooses data: os_family came from the host, the data stays Debian's.
    assert!(c.resources.iter().any(|r| r.id.to_string() == "service:ssh"));
    let bad: Map<String, serde_json::Value> = serde_json::from_str(r#"{"cpus": "many"}"#).unwrap();
    let e = compiler.compile("db01.example.com", &bad).unwrap_err();
    assert!(e[0].message.contains("fact `cpus` is declared an integer"), "{e:?}");
}

#[test]
fn attributes_choose_data_and_params_come_from_the_hierarchy() {
    let compiler = Compiler::new(&catalogs());
    let redhat = compiler.compile("db02.example.com", &Map::new()).unwrap();
    let ids: Vec<String> = redhat.resources.iter().map(|r| r.id.to_string()).collect();
    assert!(ids.contains(&"service:sshd".to_string()) && ids.contains(&"file:/etc/chrony.conf".to_string()), "{ids:?}");
    let web01 = compiler.compile("web01.example.com", &Map::new()).unwrap();
    let site = web01.resources.iter().find(|r| r.id.title == "/etc/nginx/sites-available/site.conf").unwrap();
    let text = serde_json::to_string(site).unwrap();
    assert!(
        text.contains("listen 8080") && text.contains("server_name www.example.com"),
        "node data and role data: {text}"
    );
}

/// A repository with one of every class of mistake.
fn broken() -> Repo {
    Repo::from_files([
        ("site.yaml", "nodes:\n  \"*\":\n    roles: [app, ghost]\n  cyc:\n    roles: [loop-a]\n"),
        (
            "roles/app.yaml",
            "params:\n  port: 80\nresources:\n  - file: /etc/app.conf\n    template: app.conf.j2\n  - file: /etc/app.conf\n    content: other\n  - file: /etc/other.conf\n    template: nowhere.j2\n  - file: /etc/undef\n    content: \"{{ params.prot }}\"\n  - file: /etc/typo\n    mdoe: \"0644\"\n  - directory: /srv\n    purge: sometimes\n  - file: /etc/needs\n    content: x\n    requires: [package:ghost]\n  - file: /etc/broken\n    content: \"{{ unclosed \"\n",
        ),
        ("roles/bad-yaml.yaml", "resources:\n  - file: /x\n   content: y\n"),
        ("roles/loop-a.yaml", "include: [loop-b]\n"),
        ("roles/loop-b.yaml", "include: [loop-a]\n"),
        ("templates/app.conf.j2", "port = {{ params.port }}\n"),
        ("templates/syntax.j2", "{% if x %}\nnever closed\n"),
        ("data/common.yaml", "params:\n  app:\n    prot: 1\n"),
    ])
}

/// `check` in-process: the repository's problems and every node's, as file:line: message.
fn check(repo: &Repo) -> Vec<String> {
    let compiler = Compiler::new(repo);
    let mut all = compiler.problems.clone();
    for node in compiler.site.as_ref().map(|s| s.node_names()).unwrap_or_default() {
        all.extend(compiler.compile(&node, &Map::new()).err().unwrap_or_default());
    }
    let mut lines: Vec<String> = all.iter().map(|d| format!("{}:{}: {}", d.file, d.mark.line, d.message)).collect();
    lines.sort();
    lines.dedup();
    lines
}

#[test]
fn every_mistake_is_reported_in_one_run_with_its_place() {
    let found = check(&broken());
    let expected = [
        ("malformed YAML", "roles/bad-yaml.yaml:3: YAML syntax"),
        ("unknown role", "site.yaml:3: unknown role `ghost`"),
        ("include cycle", "roles/loop-b.yaml:1: include cycle: loop-a -> loop-b -> loop-a"),
        ("template syntax error in a file", "templates/syntax.j2:2: template syntax error"),
        ("template syntax error inline", "roles/app.yaml:20: template syntax error"),
        ("undefined variable", "roles/app.yaml:11: `params.prot` is undefined"),
        ("missing template file", "roles/app.yaml:9: template `nowhere.j2` not found in templates/"),
        ("unknown key", "roles/app.yaml:13: unknown field `mdoe` (did you mean `mode`?)"),
        ("wrong type", "roles/app.yaml:15: invalid type: string \"sometimes\", expected a boolean"),
        (
            "disagreeing declarations",
            "roles/app.yaml:6: file:/etc/app.conf is declared twice with different `content` (see line 4)",
        ),
        ("undeclared dependency", "roles/app.yaml:16: file:/etc/needs requires package:ghost, which is not declared"),
        ("unknown param in data", "data/common.yaml:3: role `app` has no param `prot` (its params: port)"),
    ];
    for (what, want) in expected {
        assert!(found.iter().any(|f| f.starts_with(want)), "{what}: expected {want:?} in:\n{}", found.join("\n"));
    }
    assert_eq!(found.iter().filter(|f| f.contains("include cycle")).count(), 1, "a cycle is told once: {found:?}");
}

#[test]
fn for_each_when_and_native_values() {
    let repo = Repo::from_files([
        ("site.yaml", "nodes:\n  n1: {roles: [r], attributes: {tier: a}}\n  n2: {roles: [r], attributes: {tier: b}}\n"),
        (
            "roles/r.yaml",
            "resources:\n  - user: \"{{ item.name }}\"\n    for_each: data.users\n    uid: \"{{ item.uid }}\"\n    groups: \"{{ item.groups }}\"\n  - group: \"{{ item.key }}\"\n    for_each: \"{{ data.groups }}\"\n    gid: \"{{ item.value }}\"\n  - file: /only-on-a\n    when: node.tier == 'a'\n    content: \"{{ node.name }}\\n\"\n",
        ),
        (
            "data/common.yaml",
            "users:\n  - {name: ann, uid: 3001, groups: [ops, dev]}\n  - {name: ben, uid: 3002, groups: []}\ngroups: {ops: 4001, dev: 4002}\n",
        ),
    ]);
    let compiler = Compiler::new(&repo);
    assert_eq!(compiler.problems, vec![]);
    let yaml = |n: &str| yaml_serde::to_string(&compiler.compile(n, &Map::new()).unwrap()).unwrap();
    let n1 = yaml("n1");
    for want in [
        "- user: ann\n  uid: 3001\n  groups:\n  - ops\n  - dev\n",
        "- group: dev\n  gid: 4002\n",
        "- file: /only-on-a\n  content: |\n    n1\n",
    ] {
        assert!(n1.contains(want), "missing {want:?} in\n{n1}");
    }
    assert!(!yaml("n2").contains("/only-on-a"));
}

#[test]
fn a_tie_between_patterns_is_a_check_error() {
    let repo =
        Repo::from_files([("site.yaml", "nodes:\n  \"a*\": {roles: []}\n  \"*b\": {roles: []}\n  ab: {roles: []}\n")]);
    let compiler = Compiler::new(&repo);
    assert!(compiler.compile("ab", &Map::new()).is_ok(), "the exact name wins");
    let e = compiler.compile("axb", &Map::new()).unwrap_err();
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].message.starts_with("`*b` and `a*` are patterns of the same length that both match names like `ab`"),
        "{e:?}"
    );
    // `check` finds it from the patterns alone, once, at the later one's line, with no node
    // that happens to hit it.
    let repo = Repo::from_files([(
        "site.yaml",
        "nodes:\n  \"web?.lab\": {roles: []}\n  \"*eb1.lab\": {roles: []}\n  \"db*.lab\": {roles: []}\n  \"*.lab\": {roles: []}\n",
    )]);
    let found = check(&repo);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0].starts_with(
            "site.yaml:2: `*eb1.lab` and `web?.lab` are patterns of the same length that both match names like `web1.lab`"
        ),
        "{found:?}"
    );
}

/// `confirm` on a resource or a whole role: the role's covers its paths (not its packages),
/// a resource's own wins; what cannot be confirmed is refused with its line.
#[test]
fn confirm_is_given_by_a_role_to_its_paths_and_refused_where_it_cannot_work() {
    let repo = Repo::from_files([
        ("site.yaml", "nodes:\n  ok: {roles: [net]}\n  bad: {roles: [wrong]}\n"),
        (
            "roles/net.yaml",
            "confirm: {within: 60, check: [/usr/bin/host, example.com]}\nresources:\n  - package: nftables\n  - file: /etc/nftables.conf\n    content: x\n    notify: [service:nftables]\n  - file: /etc/resolv.conf\n    content: y\n    confirm: {within: 20}\n  - service: nftables\n",
        ),
        (
            "roles/wrong.yaml",
            "resources:\n  - package: curl\n    confirm: {within: 60}\n  - file: /etc/a\n    content: x\n    confirm: {within: 5}\n  - file: /etc/b\n    content: x\n    confirm: {within: 60, check: [host, example.com]}\n  - file: /etc/c\n    content: x\n    confirm: {within: 60, later: true}\n",
        ),
    ]);
    let compiler = Compiler::new(&repo);
    let c = compiler.compile("ok", &Map::new()).unwrap();
    let confirm = |id: &str| c.resources.iter().find(|r| r.id.to_string() == id).unwrap().meta.confirm.clone();
    assert_eq!(confirm("package:nftables"), None);
    assert_eq!(confirm("service:nftables"), None);
    let nft = confirm("file:/etc/nftables.conf").unwrap();
    assert_eq!((nft.within, nft.check.unwrap()[0].as_str()), (60, "/usr/bin/host"));
    assert_eq!(confirm("file:/etc/resolv.conf").unwrap().within, 20, "its own wins");
    let found = check(&repo);
    for want in [
        "roles/wrong.yaml:2: package:curl: `confirm` undoes a change by restoring a path",
        "roles/wrong.yaml:4: file:/etc/a: `confirm.within` is 5 s",
        "roles/wrong.yaml:7: file:/etc/b: `confirm.check` is a command whose program is an absolute path",
        "roles/wrong.yaml:12: unknown field `later`",
    ] {
        assert!(found.iter().any(|f| f.starts_with(want)), "expected {want:?} in:\n{}", found.join("\n"));
    }
}

/// The filters Ansible users reach for work in roles and templates, and a filter's refusal is
/// reported at its place like any template error.
#[test]
fn ansible_filters_in_roles_and_templates_and_their_errors_with_places() {
    let repo = Repo::from_files([
        ("site.yaml", "nodes:\n  web1: {roles: [app]}\n  bad: {roles: [bad]}\n"),
        (
            "roles/app.yaml",
            "params:\n  conf: /etc/app/app.conf\n  extra: {b: 2}\nresources:\n  - file: \"{{ params.conf }}\"\n    template: app.j2\n  - file: \"/etc/app/{{ params.conf | basename | regex_replace('\\\\.conf$', '.json') }}\"\n    content: \"{{ {'a': 1} | combine(params.extra) | to_json }}\"\n",
        ),
        (
            "templates/app.j2",
            "dir={{ params.conf | dirname }}\nsum={{ 'abc' | hash }}\ncmd=echo {{ \"it's\" | quote }}\n{{ {'k': [1]} | to_yaml }}",
        ),
        ("roles/bad.yaml", "resources:\n  - file: /etc/x\n    content: \"{{ 'x' | regex_replace('(', '') }}\"\n"),
    ]);
    let compiler = Compiler::new(&repo);
    assert_eq!(compiler.problems, vec![]);
    let c = compiler.compile("web1", &Map::new()).unwrap();
    let content = |id: &str| {
        let r = c.resources.iter().find(|r| r.id.to_string() == id).unwrap_or_else(|| panic!("{id}: {c:?}"));
        serde_json::to_value(r).unwrap()["content"].as_str().unwrap().to_string()
    };
    assert_eq!(
        content("file:/etc/app/app.conf"),
        "dir=/etc/app\nsum=ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\ncmd=echo 'it'\"'\"'s'\nk:\n- 1\n"
    );
    assert_eq!(content("file:/etc/app/app.json"), r#"{"a": 1, "b": 2}"#);
    let found = check(&repo);
    assert!(
        found.iter().any(|f| f.starts_with("roles/bad.yaml:3:") && f.contains("`(` is not a regular expression")),
        "{found:?}"
    );
}

/// One mistake, one error: a role file that does not parse is not also an "unknown role" in
/// site.yaml and a "params for unknown role" in data; a template with a syntax error is not
/// also "not found" where a role uses it; a tab in indentation is said at the tab.
#[test]
fn one_mistake_gives_one_error() {
    let base = |role: &str, extra: &[(&'static str, &'static str)]| {
        let mut files: Vec<(&str, String)> = vec![
            ("site.yaml", "nodes:\n  web1: {roles: [web]}\n  web2: {roles: [base]}\n".into()),
            ("roles/base.yaml", "include: [web]\n".into()),
            ("roles/web.yaml", role.to_string()),
            ("data/common.yaml", "params:\n  web:\n    port: 8080\n".into()),
        ];
        files.extend(extra.iter().map(|(p, t)| (*p, t.to_string())));
        let refs: Vec<(&str, &str)> = files.iter().map(|(p, t)| (*p, t.as_str())).collect();
        check(&Repo::from_files(refs))
    };
    let found = base("params:\n  port: 80\nresources:\n  - file: /etc/x\n   content: y\n", &[]);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(found[0].starts_with("roles/web.yaml:5: YAML syntax"), "{found:?}");

    let found = base(
        "params:\n  port: 80\nresources:\n  - file: /etc/x\n    template: t.j2\n",
        &[("templates/t.j2", "{% if x %}\nnever closed\n")],
    );
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(found[0].starts_with("templates/t.j2:2: template syntax error"), "{found:?}");

    let found = base("params:\n  port: 80\nresources:\n  - file: /etc/x\n\tcontent: y\n", &[]);
    assert_eq!(
        found,
        [
            "roles/web.yaml:5: YAML indents with spaces, never tabs: this line begins with a tab (replace it with spaces)"
        ]
    );

    // A role that is not there at all is still unknown, everywhere it is named.
    let repo = Repo::from_files([
        ("site.yaml", "nodes:\n  web1: {roles: [ghost]}\n"),
        ("data/common.yaml", "params:\n  ghost: {a: 1}\n"),
    ]);
    let found = check(&repo);
    assert!(found.iter().any(|f| f.starts_with("site.yaml:2: unknown role `ghost`")), "{found:?}");
    assert!(found.iter().any(|f| f.starts_with("data/common.yaml:2: params for unknown role `ghost`")), "{found:?}");
}

/// Hints for habits from other tools and from YAML 1.1, each on its error: a command as a
/// string, `yes` for a boolean, an unquoted `{{ }}`, an undeclared fact, a misspelt data key or
/// param, a data level whose attribute no node has.
#[test]
fn errors_hint_at_what_people_coming_from_other_tools_meant() {
    let repo = Repo::from_files([
        (
            "site.yaml",
            "data: [common, \"os/{os_famly}\"]\nattributes: {os_family: debian}\nfacts:\n  cpus: {type: integer, default: 2}\nnodes:\n  web1: {roles: [web]}\n",
        ),
        (
            "roles/web.yaml",
            "params:\n  port: 80\nresources:\n  - exec: restart\n    command: systemctl restart nginx\n  - file: /etc/b\n    content: x\n    backup: no\n  - file: /etc/c\n    content: \"{{ facts.memory }}\"\n  - file: /etc/d\n    content: \"{{ data.ngnix.port }}\"\n  - file: /etc/e\n    content: \"{{ data.nginx.prot }}\"\n  - file: /etc/f\n    content: \"{{ params.prot }}\"\n  - file: /etc/g\n    content: \"{{ facts.cpu }}\"\n",
        ),
        ("roles/quote.yaml", "resources:\n  - file: /etc/a\n    content: {{ data.x }}\n"),
        ("data/common.yaml", "nginx: {port: 80}\n"),
    ]);
    let found = check(&repo).join("\n");
    for want in [
        "roles/web.yaml:5: invalid type: string \"systemctl restart nginx\", expected a sequence: write a list, one word an item, like [systemctl, restart, nginx]",
        "roles/web.yaml:8: invalid type: string \"no\", expected a boolean; YAML 1.2 reads `no` and `off` as text: write false",
        "roles/web.yaml:10: `facts.memory` is undefined; `memory` is not a declared fact: declare it in site.yaml under `facts:`",
        "roles/web.yaml:12: `data.ngnix` is undefined (did you mean `data.nginx`?)",
        "roles/web.yaml:14: `data.nginx.prot` is undefined (did you mean `data.nginx.port`?)",
        "roles/web.yaml:16: `params.prot` is undefined (did you mean `params.port`?)",
        "roles/web.yaml:18: `facts.cpu` is undefined (did you mean `facts.cpus`?)",
        "site.yaml:1: the data level `os/{os_famly}` names the attribute `os_famly`, which no node has, so it is never used: did you mean `{os_family}`?",
    ] {
        assert!(found.lines().any(|l| l.starts_with(want)), "{want}\nnot in:\n{found}");
    }
    // The unquoted template, in a role of its own (a node uses it).
    let repo = Repo::from_files([
        ("site.yaml", "nodes:\n  web1: {roles: [quote]}\n"),
        ("roles/quote.yaml", "resources:\n  - file: /etc/a\n    content: {{ data.x }}\n"),
    ]);
    let found = check(&repo);
    assert!(found[0].contains("a value that begins with `{` is a YAML mapping: put a template in quotes"), "{found:?}");
}

/// A `directory` with `source:` stands for the tree under files/: its subdirectories and
/// files, with its owner, group, mode (subdirectories), purge rules and notifications.
#[test]
fn a_directory_with_a_source_is_the_tree_under_files() {
    let repo = Repo::from_files([
        ("site.yaml", "nodes:\n  n: {roles: [site]}\n"),
        (
            "roles/site.yaml",
            "resources:\n  - directory: /srv/www\n    source: site/\n    mode: \"0750\"\n    owner: www-data\n    purge: true\n    notify: [service:nginx]\n  - service: nginx\n",
        ),
        ("files/site/index.html", "<h1>hi</h1>\n"),
        ("files/site/css/site.css", "body {}\n"),
        ("files/site/css/print/p.css", "@media print {}\n"),
        ("files/other.txt", "not in the tree\n"),
    ]);
    let compiler = Compiler::new(&repo);
    assert_eq!(compiler.problems, vec![]);
    let c = compiler.compile("n", &Map::new()).unwrap();
    let ids: Vec<String> = c.resources.iter().map(|r| r.id.to_string()).collect();
    for id in [
        "directory:/srv/www",
        "directory:/srv/www/css",
        "directory:/srv/www/css/print",
        "file:/srv/www/index.html",
        "file:/srv/www/css/site.css",
        "file:/srv/www/css/print/p.css",
    ] {
        assert!(ids.contains(&id.to_string()), "{id} in {ids:?}");
    }
    assert!(!ids.iter().any(|i| i.contains("other")), "{ids:?}");
    let yaml = yaml_serde::to_string(&c).unwrap();
    assert!(yaml.contains("- directory: /srv/www/css\n  mode: '0750'\n  owner: www-data\n  purge: true\n  notify:\n  - service:nginx\n"), "{yaml}");
    assert!(yaml.contains("- file: /srv/www/css/site.css\n  content: |\n    body {}\n  mode: '0644'\n  owner: www-data\n  notify:\n  - service:nginx\n"), "{yaml}");
    // Where each came from: the directory's line in its role.
    assert_eq!(c.provenance["file:/srv/www/css/site.css"].file, "roles/site.yaml");

    let bad = Repo::from_files([
        ("site.yaml", "nodes:\n  n: {roles: [site]}\n"),
        (
            "roles/site.yaml",
            "resources:\n  - directory: /srv/a\n    source: nowhere\n  - directory: /srv/b\n    source: site\n    ensure: absent\n",
        ),
        ("files/site/x", "x\n"),
    ]);
    assert_eq!(
        check(&bad),
        [
            "roles/site.yaml:3: source `nowhere` is no directory with files in files/",
            "roles/site.yaml:5: directory:/srv/b: `source` fills a directory: it cannot be `ensure: absent`",
        ]
    );
}

/// A binary file, or a text larger than a catalog carries, travels as a blob: its hash and size
/// in the catalog, its bytes served by hash and by nothing else.
#[test]
fn binary_and_large_files_travel_as_blobs() {
    let mut repo = Repo::from_files([
        ("site.yaml", "nodes:\n  n: {roles: [r]}\n"),
        (
            "roles/r.yaml",
            "resources:\n  - directory: /srv\n  - file: /srv/tool\n    source: tool.bin\n  - file: /srv/big.txt\n    source: big.txt\n  - file: /srv/small.txt\n    source: small.txt\n  - directory: /srv/tree\n    source: tree\n",
        ),
        ("files/small.txt", "small\n"),
    ]);
    let binary: Vec<u8> = (0..=255u8).collect();
    let big = "x".repeat(70 << 10);
    repo.files.insert("files/tool.bin".into(), binary.clone());
    repo.files.insert("files/big.txt".into(), big.clone().into_bytes());
    repo.files.insert("files/tree/logo.png".into(), vec![0x89, b'P', b'N', b'G', 0xff]);
    let compiler = Compiler::new(&repo);
    assert_eq!(compiler.problems, vec![]);
    let c = compiler.compile("n", &Map::new()).unwrap();
    let file = |p: &str| match &c.resources.iter().find(|r| r.id.title == p).unwrap().spec {
        converge_modules::catalog::Spec::File(f) => f.clone(),
        _ => panic!(),
    };
    let hex = converge_modules::hash::sha256_hex(&binary);
    assert_eq!(file("/srv/tool").content_sha256, Some(format!("sha256:{hex}")));
    assert_eq!((file("/srv/tool").size, file("/srv/tool").content), (Some(256), None));
    assert!(file("/srv/big.txt").content_sha256.is_some(), "over 64 KiB of text");
    assert_eq!(file("/srv/small.txt").content.as_ref().and_then(|c| c.held()), Some("small\n"));
    assert!(file("/srv/tree/logo.png").content_sha256.is_some(), "in a directory's tree too");
    assert_eq!(compiler.blob(&hex), Some(binary.as_slice()));
    let small = converge_modules::hash::sha256_hex(b"small\n");
    assert_eq!(compiler.blob(&small), None, "what travels inline is not served as a blob");
    // What `converge apply` reads of the compiled catalog is the same.
    let yaml = yaml_serde::to_string(&c).unwrap();
    assert_eq!(load("c.yaml", &yaml, None).unwrap().catalog, c);

    // A sensitive binary file cannot be sealed, nor fetched: refused.
    repo.files.insert(
        "roles/r.yaml".into(),
        b"resources:\n  - file: /srv/tool\n    source: tool.bin\n    sensitive: true\n".to_vec(),
    );
    let e = check(&repo);
    assert_eq!(e, ["roles/r.yaml:3: files/tool.bin is not UTF-8 text, and a sensitive file cannot be a blob"]);
}
