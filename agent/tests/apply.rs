//! `converge apply` as an operator runs it: the real binary, a catalog file, a temporary root.

mod common;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

const SITE: &str = "\
format: 1
resources:
  - directory: /srv/app
    mode: \"0750\"
  - file: /srv/app/config.ini
    content: |
      [main]
      port = 8080
    mode: \"0640\"
  - symlink: /srv/current
    target: /srv/app
  - directory: /srv
  - file: /etc/motd
    source: motd.txt
  - file: /etc/old.conf
    ensure: absent
";

fn site(s: &Scratch) -> String {
    s.catalog("motd.txt", "welcome\n");
    s.write("/etc/old.conf", "stale\n");
    s.catalog("site.yaml", SITE)
}

#[test]
fn apply_converges_then_changes_nothing() {
    let s = Scratch::new();
    let c = site(&s);
    let out = s.apply(&c, &[]);
    assert_eq!(out.code, 2, "changed: {}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("summary: 6 resources: 0 unchanged, 6 changed, 0 failed, 0 skipped"), "{}", out.stdout);
    assert_eq!(s.read("/srv/app/config.ini"), "[main]\nport = 8080\n");
    assert_eq!(s.read("/etc/motd"), "welcome\n");
    assert!(!s.at("/etc/old.conf").exists());
    assert_eq!(std::fs::read_link(s.at("/srv/current")).unwrap().to_str(), Some("/srv/app"));
    assert_eq!(std::fs::metadata(s.at("/srv/app")).unwrap().mode() & 0o7777, 0o750);
    assert_eq!(std::fs::metadata(s.at("/srv/app/config.ini")).unwrap().mode() & 0o7777, 0o640);

    let before = listing(&s.root());
    let again = s.apply(&c, &[]);
    assert_eq!(again.code, 0, "{}{}", again.stdout, again.stderr);
    assert!(again.stdout.contains("6 unchanged, 0 changed"), "{}", again.stdout);
    assert_eq!(listing(&s.root()), before, "a second run touches nothing");
}

#[test]
fn drift_is_previewed_without_touching_anything_then_repaired() {
    let s = Scratch::new();
    let c = site(&s);
    assert_eq!(s.apply(&c, &[]).code, 2);
    // Drift: content, mode, a deleted file, a retargeted link.
    s.write("/srv/app/config.ini", "[main]\nport = 1\n");
    std::fs::set_permissions(s.at("/srv/app"), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::remove_file(s.at("/etc/motd")).unwrap();
    std::fs::remove_file(s.at("/srv/current")).unwrap();
    symlink("/elsewhere", s.at("/srv/current")).unwrap();

    let before = listing(&s.root());
    let dry = s.apply(&c, &["--dry-run"]);
    assert_eq!(dry.code, 2, "{}{}", dry.stdout, dry.stderr);
    assert_eq!(listing(&s.root()), before, "dry-run touched nothing");
    for expected in [
        "would change directory:/srv/app\n      mode: 0777 -> 0750",
        "-port = 1\n        +port = 8080",
        "would change file:/etc/motd\n      ensure: absent -> file",
        "target: /elsewhere -> /srv/app",
        "2 unchanged, 4 would change",
    ] {
        assert!(dry.stdout.contains(expected), "missing {expected:?} in:\n{}", dry.stdout);
    }
    let fix = s.apply(&c, &[]);
    assert_eq!(fix.code, 2);
    assert!(fix.stdout.contains("4 changed"), "{}", fix.stdout);
    assert_eq!(s.apply(&c, &[]).code, 0, "repaired");
}

#[test]
fn replaced_content_goes_to_the_backup_store_under_the_root() {
    let s = Scratch::new();
    let c = site(&s);
    s.write("/srv/app/config.ini", "precious\n");
    s.apply(&c, &[]);
    let objects = s.at("/var/lib/converge/backups/objects");
    let kept: Vec<String> =
        std::fs::read_dir(&objects).unwrap().map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap()).collect();
    assert!(kept.contains(&"precious\n".to_string()) && kept.contains(&"stale\n".to_string()), "{kept:?}");
    let index = std::fs::read_to_string(s.at("/var/lib/converge/backups/index")).unwrap();
    assert!(index.contains("\"path\":\"/srv/app/config.ini\""), "{index}");
}

/// Each bad input: exit 1, its message names file and line, nothing on disk changes.
#[test]
fn bad_catalogs_change_nothing_and_say_where() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "unknown field",
            "format: 1\nresources:\n  - file: /a\n    contnet: x\n",
            ":4:5: unknown field `contnet` (did you mean `content`?)",
        ),
        (
            "wrong type",
            "format: 1\nresources:\n  - directory: /a\n    purge: sometimes\n",
            ":4:12: invalid type: string \"sometimes\", expected a boolean",
        ),
        ("relative path", "format: 1\nresources:\n  - file: etc/motd\n", ":3:11: path `etc/motd` is relative"),
        (
            "disagreeing duplicates",
            "format: 1\nresources:\n  - file: /a\n    mode: \"0644\"\n  - file: /a/\n    mode: \"0600\"\n",
            ":5:5: file:/a is declared twice with different `mode` (see line 3)",
        ),
        (
            "undeclared dependency",
            "format: 1\nresources:\n  - file: /a\n    requires: [directory:/nowhere]\n",
            ":3:5: file:/a requires directory:/nowhere, which is not declared",
        ),
        (
            "cycle",
            "format: 1\nresources:\n  - file: /a\n    requires: [file:/b]\n    notify: [file:/b]\n  - file: /b\n",
            ":3:5: dependency cycle: file:/a requires file:/b, file:/b is notified by file:/a (see line 6)",
        ),
        ("malformed yaml", "format: 1\nresources:\n  - file: /a\n   content: x\n", ":4:"),
        (
            "protected path",
            "format: 1\nresources:\n  - file: /etc/converge/agent.toml\n    content: x\n",
            ":3:5: file:/etc/converge/agent.toml is protected",
        ),
        (
            "future format",
            "format: 9\nresources: []\n",
            ":1:1: catalog format 9 is newer than this converge understands",
        ),
    ];
    for (what, text, expected) in cases {
        let s = Scratch::new();
        s.write("/a", "untouched");
        let c = s.catalog("bad.yaml", text);
        let before = listing(&s.root());
        let out = s.apply(&c, &[]);
        assert_eq!(out.code, 1, "{what}: {}", out.stderr);
        let want = format!("{c}{expected}");
        assert!(out.stderr.contains(&want), "{what}: expected {want:?} in:\n{}", out.stderr);
        assert!(out.stderr.contains("nothing was changed"), "{what}: {}", out.stderr);
        assert_eq!(listing(&s.root()), before, "{what}: the root was touched");
        assert!(out.stdout.is_empty(), "{what}: {}", out.stdout);
    }
}

#[test]
fn every_problem_is_reported_in_one_run_with_the_offending_line() {
    let s = Scratch::new();
    let c = s.catalog(
        "bad.yaml",
        "format: 1\nresources:\n  - file: /a\n    mdoe: \"0644\"\n  - file: b\n  - file: /c\n    requires: [file:/d]\n",
    );
    let out = s.apply(&c, &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains(&format!("{c}:4:5: unknown field `mdoe`")), "{}", out.stderr);
    assert!(out.stderr.contains(&format!("{c}:5:11: path `b` is relative")), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!("{c}:6:5: file:/c requires file:/d, which is not declared")),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("4 |     mdoe: \"0644\"\n  |     ^"), "{}", out.stderr);
    assert!(out.stderr.contains("3 problems; nothing was changed"), "{}", out.stderr);
}

#[test]
fn an_unreadable_catalog_exits_1() {
    let out = converge(&["apply", "/nonexistent/catalog.yaml", "--detailed-exitcodes"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("cannot read catalog /nonexistent/catalog.yaml"), "{}", out.stderr);
    let out = converge(&["apply"]);
    assert_eq!(out.code, 1, "usage errors exit 1, never 2: {}", out.stderr);
}

#[test]
fn json_and_catalogs_in_json() {
    let s = Scratch::new();
    let c = s.catalog("c.json", r#"{"format": 1, "resources": [{"file": "/hello", "content": "hi\n"}]}"#);
    let out = s.apply(&c, &["--format", "json"]);
    let lines: Vec<serde_json::Value> = out.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["type"], "start");
    assert_eq!(lines[1]["type"], "resource");
    assert_eq!(lines[1]["id"], "file:/hello");
    assert_eq!(lines[1]["status"], "changed");
    assert_eq!(lines[1]["changes"][0]["attribute"], "ensure");
    assert_eq!(lines[2]["type"], "summary");
    assert_eq!(lines[2]["changed"], 1);
    assert_eq!(s.read("/hello"), "hi\n");
}

#[test]
fn sensitive_values_never_appear_in_any_output() {
    let s = Scratch::new();
    s.write("/etc/secret", "old-password\n");
    let c = s.catalog("c.yaml", "format: 1\nresources:\n  - file: /etc/secret\n    content: \"new-password\\n\"\n    sensitive: true\n    mode: \"0600\"\n");
    for args in [&["--dry-run"][..], &["--dry-run", "--format", "json"], &["--format", "json", "-v"]] {
        let out = s.apply(&c, args);
        let all = format!("{}{}", out.stdout, out.stderr);
        assert!(!all.contains("password"), "{args:?} leaked: {all}");
        assert!(!all.contains("sha256:"), "not even a hash, which a dictionary could reverse: {all}");
        assert!(all.contains("13 bytes (sensitive)"), "its size is shown instead: {all}");
    }
    assert_eq!(s.read("/etc/secret"), "new-password\n");
    assert!(
        !s.at("/var/lib/converge/backups/objects").exists()
            || std::fs::read_dir(s.at("/var/lib/converge/backups/objects")).unwrap().count() == 0,
        "sensitive content is never backed up"
    );
}

#[test]
fn exit_codes_for_failures() {
    let s = Scratch::new();
    // /blocked is a directory: a file there needs force, so the run fails on it and skips its
    // dependent, and still converges the rest.
    std::fs::create_dir_all(s.at("/blocked/inner")).unwrap();
    let c = s.catalog("c.yaml", "format: 1\nresources:\n  - file: /blocked\n    content: x\n  - file: /after\n    content: y\n    requires: [file:/blocked]\n  - file: /ok\n    content: z\n");
    let out = s.apply(&c, &[]);
    assert_eq!(out.code, 6, "changed and failed: {}", out.stdout);
    assert!(
        out.stdout.contains(
            "FAILED       file:/blocked: /blocked is a directory, not a file; set `force: true` to replace it"
        ),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("skipped      file:/after: depends on file:/blocked, which failed"), "{}", out.stdout);
    assert_eq!(s.read("/ok"), "z");
    let out = s.apply(&c, &[]);
    assert_eq!(out.code, 4, "only failures now: {}", out.stdout);
    let root = s.root_str();
    let plain = converge(&["apply", &c, "--root", &root]);
    assert_eq!(plain.code, 1, "without --detailed-exitcodes a failure exits 1");
}

#[test]
fn owners_and_groups_resolve_against_the_roots_own_files() {
    let s = Scratch::new();
    s.write("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\ndeploy:x:4242:4242::/home/deploy:/bin/sh\n");
    s.write("/etc/group", "root:x:0:\nwww-data:x:4343:\n");
    let c = s.catalog("c.yaml", "format: 1\nresources:\n  - file: /srv/x\n    content: x\n    owner: deploy\n    group: www-data\n  - directory: /srv\n");
    let out = s.apply(&c, &[]);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    let m = std::fs::metadata(s.at("/srv/x")).unwrap();
    assert_eq!((m.uid(), m.gid()), (4242, 4343));
    // A user that exists on this machine but not in the root is unknown there.
    let c = s.catalog("c2.yaml", "format: 1\nresources:\n  - file: /srv/y\n    content: y\n    owner: daemon\n");
    let out = s.apply(&c, &[]);
    assert_eq!(out.code, 4);
    assert!(out.stdout.contains("owner `daemon` does not exist on this system"), "{}", out.stdout);
}

/// Symlinks planted inside the root, pointing out of it, absolute or relative: no read or write
/// through them reaches outside. Both resolvers are proven.
#[test]
fn no_symlink_inside_the_root_leads_outside() {
    for resolver in ["openat2", "walk"] {
        let s = Scratch::new();
        let outside = s.dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("victim"), "outside\n").unwrap();
        symlink(&outside, s.at("/abs")).unwrap(); // absolute path of the host
        symlink("../../outside", s.at("/rel")).unwrap(); // climbs out of the root
        std::fs::create_dir(s.at("/etc")).unwrap();
        symlink(outside.join("victim"), s.at("/etc/motd")).unwrap(); // the file itself is a link
        let before = listing(s.dir.path());
        let c = s.catalog(
            "c.yaml",
            "format: 1\nresources:\n  - file: /abs/victim\n    content: pwned\n  - file: /rel/victim\n    content: pwned\n  - file: /etc/motd\n    content: pwned\n    force: true\n  - directory: /rel/newdir\n",
        );
        let out = converge_env(&["apply", &c, "--root", &s.root_str()], &[("CONVERGE_RESOLVER", resolver)]);
        assert_eq!(std::fs::read_to_string(outside.join("victim")).unwrap(), "outside\n", "{resolver}: {}", out.stdout);
        assert!(!outside.join("newdir").exists(), "{resolver}");
        let after = listing(s.dir.path());
        for (path, what) in &before {
            if path.starts_with("outside") {
                assert_eq!(after.get(path), Some(what), "{resolver}: {path} changed");
            }
        }
        assert_eq!(
            after.keys().filter(|p| p.starts_with("outside")).count(),
            2,
            "{resolver}: nothing new outside: {after:?}"
        );
        // The link at /etc/motd itself was replaced (force), inside the root.
        assert_eq!(std::fs::read_to_string(s.at("/etc/motd")).unwrap(), "pwned", "{resolver}: {}", out.stdout);
    }
}

#[test]
fn a_held_lock_refuses_a_second_run() {
    let s = Scratch::new();
    let c = s.catalog("c.yaml", "format: 1\nresources:\n  - file: /x\n    content: x\n");
    assert_eq!(s.apply(&c, &[]).code, 2);
    let dir = std::fs::File::open(s.at("/var/lib/converge")).unwrap();
    dir.lock().unwrap(); // flock(2), as the agent's run lock
    std::fs::remove_file(s.at("/x")).unwrap();
    let out = s.apply(&c, &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("another converge run holds the lock"), "{}", out.stderr);
    assert!(!s.at("/x").exists());
    drop(dir);
    assert_eq!(s.apply(&c, &[]).code, 2);
}

#[test]
fn a_dry_run_on_a_fresh_root_creates_nothing() {
    let s = Scratch::new();
    let c = s.catalog("c.yaml", "format: 1\nresources:\n  - file: /x\n    content: x\n");
    let out = s.apply(&c, &["--dry-run"]);
    assert_eq!(out.code, 2);
    assert!(listing(&s.root()).is_empty(), "not even the state directory");
}

/// Copies a host program and the libraries it loads into the root, so that a command can run
/// chrooted there.
fn install_program(s: &Scratch, program: &str) {
    let ldd = std::process::Command::new("ldd").arg(program).output().unwrap();
    let mut files = vec![program.to_string()];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line.split_whitespace().find(|w| w.starts_with('/'));
        files.extend(path.map(str::to_string));
    }
    for f in files {
        let dest = s.at(&f);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&f, &dest).unwrap();
    }
}

#[test]
fn validate_runs_inside_the_root_and_a_refusal_keeps_the_old_file() {
    let s = Scratch::new();
    install_program(&s, "/usr/bin/grep");
    s.write("/etc/app.conf", "valid=1\n");
    let decl = |content: &str| {
        format!(
            "format: 1\nresources:\n  - file: /etc/app.conf\n    content: \"{content}\\n\"\n    validate: [/usr/bin/grep, -q, \"^valid=\", \"%\"]\n"
        )
    };
    let bad = s.catalog("bad.yaml", &decl("broken"));
    let out = s.apply(&bad, &[]);
    assert_eq!(out.code, 4, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("validate refused the new content, /etc/app.conf left as it was"), "{}", out.stdout);
    assert_eq!(s.read("/etc/app.conf"), "valid=1\n");
    assert!(!s.at("/etc/.app.conf.converge-new").exists(), "the temporary file is removed");
    let good = s.catalog("good.yaml", &decl("valid=2"));
    assert_eq!(s.apply(&good, &[]).code, 2);
    assert_eq!(s.read("/etc/app.conf"), "valid=2\n");
}

#[test]
fn purge_removes_strays_and_keeps_backups() {
    let s = Scratch::new();
    s.write("/etc/app.d/keep.conf", "keep\n");
    s.write("/etc/app.d/stray.conf", "stray\n");
    let c = s.catalog("c.yaml", "format: 1\nresources:\n  - directory: /etc/app.d\n    purge: true\n  - file: /etc/app.d/keep.conf\n    content: \"keep\\n\"\n");
    let dry = s.apply(&c, &["--dry-run"]);
    assert!(dry.stdout.contains("purge: /etc/app.d/stray.conf (file) -> absent"), "{}", dry.stdout);
    assert!(s.at("/etc/app.d/stray.conf").exists());
    assert_eq!(s.apply(&c, &[]).code, 2);
    assert!(!s.at("/etc/app.d/stray.conf").exists());
    assert!(s.at("/etc/app.d/keep.conf").exists());
    assert_eq!(s.apply(&c, &[]).code, 0);
}

#[test]
fn packages_on_a_root_without_a_package_system_fail_alone() {
    let s = Scratch::new();
    let c = s.catalog(
        "c.yaml",
        "format: 1\nresources:\n  - package: nginx\n  - file: /etc-nginx.conf\n    content: x\n    requires: [package:nginx]\n  - file: /motd\n    content: hi\n",
    );
    let out = s.apply(&c, &[]);
    assert_eq!(out.code, 6, "{}", out.stdout);
    assert!(
        out.stdout.contains("FAILED       package:nginx: ") && out.stdout.contains("converge cannot choose apt or dnf"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("skipped      file:/etc-nginx.conf"), "{}", out.stdout);
    assert_eq!(s.read("/motd"), "hi");
}

/// Large content is kept out of the agent's memory while it runs (in an unnamed file): a file
/// drifted to other bytes of the same size is still found and repaired, from either spelling,
/// across the store's buffers (80 KiB of content).
#[test]
fn large_content_kept_aside_is_compared_and_written_whole() {
    let n = 40;
    let body = |i: usize, tag: &str| format!("{tag} {i:02}\n").repeat(2048 / 7)[..2048].to_string();
    let mut yaml = String::from("format: 1\nresources:\n  - directory: /srv/big\n");
    for i in 0..n {
        yaml.push_str(&format!("  - file: /srv/big/f{i:02}\n    content: {:?}\n", body(i, "catalog")));
    }
    // (By hand: a resource's first key is its kind, and `json!` sorts keys.)
    let files: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"file":"/srv/big/f{i:02}","content":{}}}"#, serde_json::json!(body(i, "catalog"))))
        .collect();
    let json = format!(r#"{{"format":1,"resources":[{{"directory":"/srv/big"}},{}]}}"#, files.join(","));
    // Beyond the block YAML reader only at its end: read again, whole, by the full reader.
    let late = format!("{yaml}  - file: /srv/big/zz\n    content: |\n      block scalar\n");
    for (name, text) in [("big.yaml", &yaml), ("big.json", &json), ("late.yaml", &late)] {
        let s = Scratch::new();
        std::fs::create_dir_all(s.at("/var/lib/converge")).unwrap();
        std::fs::create_dir_all(s.at("/srv")).unwrap();
        let c = s.catalog(name, text);
        let env = [("CONVERGE_LOG", "converge=debug")];
        let root = s.root_str();
        let args = |extra: &[&'static str]| [&["apply", c.as_str(), "--root", root.as_str()][..], extra].concat();
        let first = converge_env(&args(&["--detailed-exitcodes"]), &env);
        assert_eq!(first.code, 2, "{name}: {}{}", first.stdout, first.stderr);
        assert!(first.stderr.contains(&format!("kept={n}")), "{name}: every content kept aside: {}", first.stderr);
        let again = first.stderr.contains("read again with the full one");
        assert_eq!(again, name == "late.yaml", "{name}: {}", first.stderr);
        for i in 0..n {
            assert_eq!(s.read(&format!("/srv/big/f{i:02}")), body(i, "catalog"), "{name}: f{i:02}");
        }
        // Same sizes, other bytes: only a byte-for-byte comparison finds them.
        for i in [0, n - 1] {
            s.write(&format!("/srv/big/f{i:02}"), &body(i, "drifted"));
        }
        let preview = converge_env(&args(&["--dry-run", "--detailed-exitcodes"]), &env);
        assert_eq!(preview.code, 2, "{name}: {}{}", preview.stdout, preview.stderr);
        assert!(preview.stdout.contains("+catalog 39"), "{name}: the diff shows the content: {}", preview.stdout);
        assert_eq!(s.read("/srv/big/f39"), body(39, "drifted"), "{name}: a dry-run changes nothing");
        let repair = converge_env(&args(&["--detailed-exitcodes"]), &env);
        assert_eq!(repair.code, 2, "{name}: {}{}", repair.stdout, repair.stderr);
        assert!(repair.stdout.contains("2 changed"), "{name}: {}", repair.stdout);
        for i in 0..n {
            assert_eq!(s.read(&format!("/srv/big/f{i:02}")), body(i, "catalog"), "{name}: f{i:02} repaired");
        }
        assert_eq!(converge_env(&args(&["--detailed-exitcodes"]), &env).code, 0, "{name}: converged");
    }
}
