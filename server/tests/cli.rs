//! `converge-server compile | check | diff` as an operator runs them: the real binary.

use converge_e2e::git;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_converge-server");

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn server(args: &[&str]) -> Out {
    let out = Command::new(BIN).args(args).output().expect("run converge-server");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn write(dir: &Path, files: &[(&str, &str)]) {
    for (path, text) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
}

const SITE: &str = "nodes:\n  web1: {roles: [web]}\n  web2: {roles: [web]}\n  db1: {roles: [db]}\n";

fn first_commit(dir: &Path) {
    write(
        dir,
        &[
            ("site.yaml", SITE),
            ("roles/base.yaml", "resources:\n  - file: /etc/motd\n    template: motd.j2\n  - package: curl\n"),
            (
                "roles/web.yaml",
                "include: [base]\nparams:\n  port: 80\nresources:\n  - package: apache2\n  - file: /etc/site.conf\n    content: \"listen {{ params.port }}\\nroot /var/www\\n\"\n",
            ),
            ("roles/db.yaml", "include: [base]\nresources:\n  - package: postgresql\n"),
            ("templates/motd.j2", "Welcome to {{ node.name }}\n"),
            ("data/node/web2.yaml", "params:\n  web:\n    port: 8080\n"),
        ],
    );
    git(dir, &["init", "-q", "-b", "main"]);
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "first"]);
}

/// The second commit: web servers move from apache2 to nginx and listen on 8000 (web2 keeps
/// its own port), the motd template changes for every node, db1 is untouched otherwise.
fn second_commit(dir: &Path) {
    write(
        dir,
        &[
            (
                "roles/web.yaml",
                "include: [base]\nparams:\n  port: 8000\nresources:\n  - package: nginx\n  - file: /etc/site.conf\n    content: \"listen {{ params.port }}\\nroot /var/www\\n\"\n    mode: \"0644\"\n",
            ),
            ("templates/motd.j2", "Welcome to {{ node.name }}. Managed by converge.\n"),
        ],
    );
    git(dir, &["commit", "-q", "-am", "second"]);
}

#[test]
fn diff_finds_exactly_the_per_node_changes() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    first_commit(dir);
    second_commit(dir);
    let repo = dir.display().to_string();
    let out = server(&["diff", "--repo", &repo, "--from", "HEAD~1", "--to", "HEAD"]);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    let text = out.stdout;
    let node = |name: &str| -> String {
        let start = text.find(&format!("node {name}:")).unwrap_or_else(|| panic!("no {name} in\n{text}"));
        let rest = &text[start + 1..];
        let end = rest.find("\nnode ").map_or(rest.len(), |i| i + 1);
        text[start..start + 1 + end].to_string()
    };
    let web1 = node("web1");
    assert!(web1.starts_with("node web1: 1 added, 1 removed, 2 changed\n"), "{web1}");
    assert!(web1.contains("  + package:nginx\n  - package:apache2\n"), "{web1}");
    assert!(web1.contains("-listen 80\n") && web1.contains("+listen 8000\n"), "{web1}");
    assert!(web1.contains("      mode: (unset) -> \"0644\"\n"), "{web1}");
    assert!(web1.contains("-Welcome to web1\n") && web1.contains("+Welcome to web1. Managed by converge.\n"), "{web1}");
    let web2 = node("web2");
    assert!(!web2.contains("listen"), "web2 keeps its own port: only the mode changes: {web2}");
    assert!(web2.contains("mode: (unset) -> \"0644\""), "{web2}");
    let db1 = node("db1");
    assert!(db1.starts_with("node db1: 0 added, 0 removed, 1 changed\n  ~ file:/etc/motd\n"), "{db1}");
    assert!(text.ends_with("3 of 3 nodes change between HEAD~1 and HEAD\n"), "{text}");

    let only = server(&["diff", "--repo", &repo, "--from", "HEAD~1", "--to", "HEAD", "--node", "db*"]);
    assert!(only.stdout.contains("node db1") && !only.stdout.contains("node web1"), "{}", only.stdout);
    let same = server(&["diff", "--repo", &repo, "--from", "HEAD", "--to", "HEAD"]);
    assert_eq!(same.code, 0, "{}", same.stdout);
    assert_eq!(same.stdout, "0 of 3 nodes change between HEAD and HEAD\n");
    // The working tree was never touched by reading revisions.
    let status = Command::new("git").arg("-C").arg(dir).args(["status", "--porcelain"]).output().unwrap();
    assert!(status.stdout.is_empty());
}

/// A node moved from a pattern to an entry of its own is compared with what the pattern gave
/// it; a node that appears or goes is said to, not listed resource by resource.
#[test]
fn diff_follows_a_node_from_a_pattern_to_its_own_entry() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    first_commit(dir);
    write(dir, &[("site.yaml", "nodes:\n  web*: {roles: [web]}\n  db1: {roles: [db]}\n")]);
    git(dir, &["commit", "-q", "-am", "web by pattern"]);
    write(
        dir,
        &[(
            "site.yaml",
            "nodes:\n  web*: {roles: [web]}\n  web7: {roles: [web], attributes: {tier: gold}}\n  db2: {roles: [db]}\n",
        )],
    );
    git(dir, &["commit", "-q", "-am", "web7 by name, db1 becomes db2"]);
    let repo = dir.display().to_string();
    let out = server(&["diff", "--repo", &repo, "--from", "HEAD~1", "--to", "HEAD"]);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(!out.stdout.contains("node web7"), "web7 gets what the pattern gave it: nothing changes\n{}", out.stdout);
    assert!(out.stdout.contains("node db1: gone at HEAD (it had 3 resources)\n"), "{}", out.stdout);
    assert!(out.stdout.contains("node db2: new at HEAD (3 resources)\n"), "{}", out.stdout);
    assert!(!out.stdout.contains("  + "), "no resource listed as added: {}", out.stdout);
    assert!(out.stdout.ends_with("2 of 4 nodes change between HEAD~1 and HEAD\n"), "{}", out.stdout);
}

#[test]
fn diff_of_an_unknown_revision_says_so() {
    let t = tempfile::tempdir().unwrap();
    first_commit(t.path());
    let out = server(&["diff", "--repo", &t.path().display().to_string(), "--from", "nope", "--to", "HEAD"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("nope is not a commit of"), "{}", out.stderr);
}

#[test]
fn check_exit_codes_and_output() {
    let catalogs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../catalogs").display().to_string();
    let ok = server(&["check", "--repo", &catalogs]);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert!(ok.stdout.contains("11 nodes compiled"), "{}", ok.stdout);

    let t = tempfile::tempdir().unwrap();
    write(
        t.path(),
        &[
            ("site.yaml", "nodes:\n  n1: {roles: [r]}\n"),
            ("roles/r.yaml", "resources:\n  - file: /a\n    content: \"{{ data.missing }}\"\n  - file: b\n"),
        ],
    );
    let bad = server(&["check", "--repo", &t.path().display().to_string()]);
    assert_eq!(bad.code, 1);
    let shown = t.path().display().to_string();
    assert!(
        bad.stderr.contains(&format!(
            "{shown}/roles/r.yaml:3:14: `data.missing` is undefined; no data level sets `data.missing` \
             (`converge-server lookup NODE missing --explain` shows each level of a node) [node n1]"
        )),
        "{}",
        bad.stderr
    );
    assert!(bad.stderr.contains("3 |     content: \"{{ data.missing }}\"\n  |              ^"), "{}", bad.stderr);
    assert!(bad.stderr.contains(&format!("{shown}/roles/r.yaml:4:11: path `b` is relative")), "{}", bad.stderr);
    assert!(bad.stderr.ends_with(": 2 problems\n"), "{}", bad.stderr);
}

#[test]
fn check_uses_recorded_facts() {
    let t = tempfile::tempdir().unwrap();
    write(
        t.path(),
        &[
            ("site.yaml", "facts:\n  cpus: {type: integer, default: 1}\nnodes:\n  n1: {roles: [r]}\n"),
            ("roles/r.yaml", "resources:\n  - file: /cpus\n    content: \"{{ facts.cpus }}\"\n"),
            ("facts/n1.json", "{\"cpus\": \"eight\"}"),
        ],
    );
    let repo = t.path().display().to_string();
    let facts = t.path().join("facts").display().to_string();
    assert_eq!(server(&["check", "--repo", &repo]).code, 0);
    let out = server(&["check", "--repo", &repo, "--facts-dir", &facts]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("fact `cpus` is declared an integer but the host reported \"eight\""),
        "{}",
        out.stderr
    );
}

#[test]
fn compile_prints_yaml_or_json() {
    let catalogs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../catalogs").display().to_string();
    let yaml = server(&["compile", "--repo", &catalogs, "--node", "web07.example.com"]);
    assert_eq!(yaml.code, 0, "{}", yaml.stderr);
    assert!(yaml.stdout.starts_with("format: 1\nhost: web07.example.com\n"), "{}", yaml.stdout);
    let json = server(&["compile", "--repo", &catalogs, "--node", "web07.example.com", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["host"], "web07.example.com");
    let unknown = server(&["compile", "--repo", &catalogs, "--node", "mail.other.org"]);
    assert_eq!(unknown.code, 1);
    assert!(
        unknown.stderr.contains("node `mail.other.org` matches no entry of `nodes` in site.yaml"),
        "{}",
        unknown.stderr
    );
}

#[test]
fn hostile_durations_and_times_are_one_line_errors_never_panics() {
    let t = tempfile::tempdir().unwrap();
    let keys = t.path().join("keys");
    assert_eq!(server(&["keygen", "--out", &keys.display().to_string()]).code, 0);
    let catalog = t.path().join("c.yaml");
    std::fs::write(&catalog, "format: 1\nhost: web01\nresources: []\n").unwrap();
    let key = keys.join("catalog.key").display().to_string();
    let c = catalog.display().to_string();
    for ttl in ["9223372036854775807s", "99999999999999999999d", "36501d", "é"] {
        let out = server(&["sign", &key, &c, "--ttl", ttl]);
        assert_eq!(out.code, 1, "--ttl {ttl}: {}", out.stdout);
        assert!(!out.stderr.contains("panicked") && out.stderr.lines().count() == 1, "{}", out.stderr);
    }
    assert_eq!(server(&["sign", &key, &c, "--ttl", "36500d"]).code, 0, "a century is the most");
    // A catalog whose times are not times.
    std::fs::write(&catalog, "format: 1\nhost: web01\nissued_at: \"2026-11-3é03:50:07Z\"\nresources: []\n").unwrap();
    let out = server(&["sign", &key, &c]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("c.yaml:3:") && !out.stderr.contains("panicked"), "{}", out.stderr);
}

/// What `converge-server check` prints for a repository with problems, as a snapshot: every
/// problem at once, each with its file, line, column, source line and the nodes it hit.
#[test]
fn check_output_snapshot() {
    let t = tempfile::tempdir().unwrap();
    write(
        t.path(),
        &[
            ("site.yaml", "nodes:\n  web1: {roles: [web]}\n  web2: {roles: [web, nope]}\n"),
            (
                "roles/web.yaml",
                "params:\n  port: 80\nresources:\n  - file: /etc/web.conf\n    content: \"{{ data.missing }}\"\n  - file: relative\n  - servcie: nginx\n",
            ),
        ],
    );
    let out = server(&["check", "--repo", &t.path().display().to_string()]);
    assert_eq!(out.code, 1);
    let shown = out.stderr.replace(&t.path().display().to_string(), "[repo]");
    insta::assert_snapshot!("check_problems", shown);
}

/// `lookup NODE KEY --explain` on catalogs/: the value a template sees, and each level of the
/// node's data hierarchy with the file and line that set it; a param's role default; a key
/// nothing sets exits 1; a node site.yaml does not know is an error that says so.
#[test]
fn lookup_explains_how_the_hierarchy_resolved_a_value() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../catalogs");
    let r = repo.display().to_string();
    let out = server(&["lookup", "web01.example.com", "params.web.listen_port", "--repo", &r, "--explain"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "web01.example.com: params.web.listen_port = 8080");
    let level =
        |name: &str| *lines.iter().find(|l| l.contains(name)).unwrap_or_else(|| panic!("{name}:\n{}", out.stdout));
    let node_line = std::fs::read_to_string(repo.join("data/node/web01.example.com.yaml"))
        .unwrap()
        .lines()
        .position(|l| l.contains("listen_port"))
        .unwrap()
        + 1;
    assert!(level("data/node/web01.example.com.yaml").contains(&format!(".yaml:{node_line}")), "{}", out.stdout);
    assert!(level("data/node/web01.example.com.yaml").ends_with("8080   <- this one"), "{}", out.stdout);
    assert!(level("data/role/web.yaml").ends_with(" -"), "the role's data sets server_name, not the port");
    assert!(level("data/environment/staging.yaml").contains("no such file"), "{}", out.stdout);
    assert!(level("the role's default").ends_with(" 80"), "{}", out.stdout);
    // Lowest precedence first: common before the node's own file.
    let pos = |name: &str| lines.iter().position(|l| l.contains(name)).unwrap();
    assert!(pos("data/common.yaml") < pos("data/os/debian.yaml") && pos("data/os/debian.yaml") < pos("data/node/"));

    // Another node of the same role: the role's default.
    let out = server(&["lookup", "web02.example.com", "params.web.listen_port", "--repo", &r, "--explain"]);
    assert!(out.stdout.starts_with("web02.example.com: params.web.listen_port = 80\n"), "{}", out.stdout);
    assert!(out.stdout.contains("(the role's default)") && out.stdout.contains("<- this one (no level sets it)"));
    // Without --explain, the value alone; unset keys and unknown nodes.
    let out = server(&["lookup", "web01.example.com", "packages.ssh", "--repo", &r]);
    assert_eq!(out.stdout, "web01.example.com: packages.ssh = \"openssh-server\"\n");
    let out = server(&["lookup", "web01.example.com", "no.such.key", "--repo", &r]);
    assert_eq!((out.code, out.stdout.contains("not set at any level")), (1, true), "{}", out.stdout);
    let out = server(&["lookup", "nobody.nowhere", "packages", "--repo", &r]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("nobody.nowhere"), "{}", out.stderr);
    let out = server(&["lookup", "web01.example.com", "a..b", "--repo", &r]);
    assert!(out.stderr.contains("not a key"), "{}", out.stderr);
}

/// `diff` without `--to` compares HEAD (or `--from`) with the working tree: what the next
/// commit would do to each node, before it is made (uncommitted and untracked files too).
#[test]
fn diff_previews_the_working_tree_before_a_commit() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    first_commit(dir);
    let repo = dir.display().to_string();
    let same = server(&["diff", "--repo", &repo]);
    assert_eq!(same.code, 0, "{}{}", same.stdout, same.stderr);
    assert!(same.stdout.ends_with("0 of 3 nodes change between HEAD and the working tree\n"), "{}", same.stdout);
    // Not committed: a changed template and a new data file.
    write(dir, &[("templates/motd.j2", "Hello {{ node.name }}\n"), ("data/node/db1.yaml", "x: 1\n")]);
    let out = server(&["diff", "--repo", &repo]);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("-Welcome to db1\n") && out.stdout.contains("+Hello db1\n"), "{}", out.stdout);
    assert!(out.stdout.ends_with("3 of 3 nodes change between HEAD and the working tree\n"), "{}", out.stdout);
    // A mistake in the working tree is said, with its place, and nothing is compared.
    write(dir, &[("roles/db.yaml", "include: [base]\nresources:\n  - package: [postgresql\n")]);
    let bad = server(&["diff", "--repo", &repo]);
    assert_eq!(bad.code, 1);
    let place = format!("{}/roles/db.yaml:4", dir.display());
    assert!(bad.stderr.contains(&place) && bad.stderr.contains("at the working tree"), "{}", bad.stderr);
}

/// `schemas --out REPO/.schemas --modelines REPO`: every YAML file of a repository points at its
/// schema, relative to itself and inside the repository, so the hints travel with a copy of it;
/// the files are otherwise unchanged, and a second run changes nothing.
#[test]
fn schemas_with_modelines_travel_with_the_repository() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("ops");
    converge_e2e::copy_tree(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../catalogs"), &repo);
    let before = std::fs::read_to_string(repo.join("data/os/debian.yaml")).unwrap();
    let out = repo.join(".schemas");
    let (o, r) = (out.display().to_string(), repo.display().to_string());
    let run = server(&["schemas", "--out", &o, "--modelines", &r]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let first = |p: &str| std::fs::read_to_string(repo.join(p)).unwrap().lines().next().unwrap().to_string();
    assert_eq!(first("site.yaml"), "# yaml-language-server: $schema=.schemas/site.schema.json");
    assert_eq!(first("roles/web.yaml"), "# yaml-language-server: $schema=../.schemas/role.schema.json");
    assert_eq!(first("data/os/debian.yaml"), "# yaml-language-server: $schema=../../.schemas/data.schema.json");
    let after = std::fs::read_to_string(repo.join("data/os/debian.yaml")).unwrap();
    assert_eq!(
        after.lines().skip(1).collect::<Vec<_>>(),
        before.lines().skip(1).collect::<Vec<_>>(),
        "only the modeline changed"
    );
    // Moved elsewhere, every hint still names a schema that is there.
    let moved = t.path().join("elsewhere");
    std::fs::rename(&repo, &moved).unwrap();
    for f in ["site.yaml", "roles/web.yaml", "data/common.yaml", "data/os/debian.yaml"] {
        let line = std::fs::read_to_string(moved.join(f)).unwrap().lines().next().unwrap().to_string();
        let target = line.split("$schema=").nth(1).unwrap();
        assert!(moved.join(f).parent().unwrap().join(target).is_file(), "{f}: {target}");
    }
    let snapshot = |dir: &Path| std::fs::read_to_string(dir.join("roles/web.yaml")).unwrap();
    let was = snapshot(&moved);
    let again = server(&[
        "schemas",
        "--out",
        &moved.join(".schemas").display().to_string(),
        "--modelines",
        &moved.display().to_string(),
    ]);
    assert_eq!(again.code, 0);
    assert_eq!(snapshot(&moved), was, "a second run changes nothing");
    // The compiler reads the repository as before.
    let check = server(&["check", "--repo", &moved.display().to_string()]);
    assert_eq!(check.code, 0, "{}", check.stderr);
}
