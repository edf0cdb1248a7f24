//! `converge why` on a host that applied a catalog compiled from `catalogs/` (the example
//! repository): which resource manages a path, from which line of which role and commit, each
//! value down to the data layer that supplied it, signed by which key; with no server.

use converge_e2e::{Fleet, Server, converge_in};
use std::path::Path;

/// Every file of catalogs/, as (path, text).
fn example() -> Vec<(String, String)> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<(String, String)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, base, out);
            } else {
                let rel = p.strip_prefix(base).unwrap().display().to_string();
                out.push((rel, std::fs::read_to_string(&p).unwrap()));
            }
        }
    }
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../catalogs");
    let mut out = Vec::new();
    walk(&base, &base, &mut out);
    out
}

#[test]
fn why_names_the_role_line_template_and_the_data_layer_of_each_value_with_no_server() {
    let files = example();
    let refs: Vec<(&str, &str)> = files.iter().map(|(p, t)| (p.as_str(), t.as_str())).collect();
    let f = Fleet::new(&refs);
    let server = Server::start(&f.config());
    let root = f.root("web01.example.com");
    // Packages and services cannot converge in a scratch root; the catalog is applied all the same.
    converge_in(&root, &["bootstrap", "--server", &server.url, "--ca-hash", &f.ca_hash, "--token", &f.token]);
    drop(server);

    let out = converge_in(&root, &["why", "/etc/nginx/sites-available/site.conf"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let text = out.stdout;
    let role_line = std::fs::read_to_string(f.repo().join("roles/web.yaml"))
        .unwrap()
        .lines()
        .position(|l| l.contains("- file: /etc/nginx/sites-available/site.conf"))
        .unwrap()
        + 1;
    assert!(text.contains(&format!("declared at   roles/web.yaml:{role_line} (role web)")), "{text}");
    assert!(text.contains("content from  templates/nginx-site.conf.j2"), "{text}");
    // Each value from its own layer: the node's file, the role's data, the role's default.
    let from = |value: &str| {
        text.lines()
            .find(|l| l.contains(&format!(" {value} ")))
            .and_then(|l| l.split(" from ").nth(1))
            .map(|f| f.split(" (read at ").next().unwrap().to_string())
            .unwrap_or_else(|| panic!("{value} not in:\n{text}"))
    };
    assert_eq!(from("params.listen_port"), "data/node/web01.example.com.yaml");
    assert_eq!(from("params.server_name"), "data/role/web.yaml");
    assert_eq!(from("params.root"), "roles/web.yaml (the role's default)");
    // And where each is read: the template's line.
    let template = std::fs::read_to_string(f.repo().join("templates/nginx-site.conf.j2")).unwrap();
    let line = template.lines().position(|l| l.contains("params.server_name")).unwrap() + 1;
    assert!(text.contains(&format!("(read at templates/nginx-site.conf.j2:{line})")), "{text}");
    let head = String::from_utf8(
        std::process::Command::new("git")
            .args(["-C", &f.repo().display().to_string(), "rev-parse", "HEAD"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(text.contains(&format!("commit        {}", head.trim())), "{text}");
    assert!(text.contains("signed by     key "), "{text}");

    // A value read from the OS layer; an id; a path nothing manages.
    let chrony = converge_in(&root, &["why", "/etc/chrony/chrony.conf"]);
    assert_eq!(chrony.code, 0, "{}", chrony.stderr);
    let squeeze = |t: String| t.split_whitespace().collect::<Vec<_>>().join(" ");
    let (c, sshd) = (squeeze(chrony.stdout), squeeze(converge_in(&root, &["why", "file:/etc/ssh/sshd_config"]).stdout));
    assert!(c.contains("file data.chrony_conf from data/os/debian.yaml"), "{c}");
    assert!(sshd.contains("requires data.packages.ssh from data/os/debian.yaml"), "{sshd}");
    assert!(sshd.contains("notify data.services.ssh from data/os/debian.yaml"), "{sshd}");
    let by_id = converge_in(&root, &["why", "service:nginx"]);
    assert_eq!(by_id.code, 0, "{}", by_id.stderr);
    assert!(by_id.stdout.contains("roles/web.yaml:"), "{}", by_id.stdout);
    let none = converge_in(&root, &["why", "/etc/nginx/nginx.conf"]);
    assert_eq!(none.code, 1);
    assert!(none.stderr.contains("not managed"), "{}", none.stderr);
}

/// `converge doc KIND` prints, on the host with nothing else, the kind's section of the
/// reference generated with the schemas; an unknown kind names the close one.
#[test]
fn doc_prints_the_generated_reference_of_a_kind() {
    let reference =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/reference.md")).unwrap();
    for kind in ["file", "package", "exec"] {
        let out = converge_e2e::run("converge", &["doc", kind]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let section = reference.split(&format!("\n## {kind}\n")).nth(1).unwrap().split("\n## ").next().unwrap();
        assert_eq!(out.stdout.trim_end(), format!("{kind}\n{section}").trim_end());
    }
    let all = converge_e2e::run("converge", &["doc"]);
    assert!(
        all.stdout.contains("kinds: file, directory, symlink, package, user, group, service, exec"),
        "{}",
        all.stdout
    );
    let bad = converge_e2e::run("converge", &["doc", "fiel"]);
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("did you mean `file`?"), "{}", bad.stderr);
}
