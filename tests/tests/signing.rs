//! Signed catalogs from end to end: the server's keys, compile --sign, the agent's checks,
//! and a full key rotation as an operator performs it.

use converge_e2e::*;
use std::path::Path;

fn compile_signed(repo: &Path, key: &Path, keys: &Path, out: &Path) {
    let env = server_ok(&[
        "compile",
        "--repo",
        &repo.display().to_string(),
        "--node",
        "web01",
        "--sign",
        &key.display().to_string(),
        "--keys",
        &keys.display().to_string(),
    ]);
    std::fs::write(out, env).unwrap();
}

fn apply(env: &Path, root: &Path) -> Out {
    run("converge", &["apply", &env.display().to_string(), "--root", &root.display().to_string()])
}

fn held_version(root: &Path) -> u64 {
    let text = std::fs::read(root.join("etc/converge/trusted-keys.json")).unwrap();
    converge_modules::trust::read_key_list(&text).unwrap().0.version
}

fn role(motd: &str) -> String {
    format!("resources:\n  - file: /etc/motd\n    content: \"{motd}\\n\"\n")
}

#[test]
fn a_full_key_rotation() {
    let t = tempfile::tempdir().unwrap();
    let (keys, repo, root) = (t.path().join("keys"), t.path().join("repo"), t.path().join("root"));
    let list = keys.join("trusted-keys.json");
    let s = |p: &Path| p.display().to_string();

    // Day 0: keys, a repository, an agent that trusts version 1.
    let said = server_ok(&["keygen", "--out", &s(&keys)]);
    assert!(said.contains("keep it offline"), "{said}");
    write(&repo, &[("site.yaml", "nodes:\n  web01: {roles: [motd]}\n"), ("roles/motd.yaml", &role("day 0"))]);
    write(&root, &[("etc/hostname", "web01\n")]);
    std::fs::create_dir_all(root.join("etc/converge")).unwrap();
    std::fs::copy(&list, root.join("etc/converge/trusted-keys.json")).unwrap();
    let e0 = t.path().join("e0.env");
    compile_signed(&repo, &keys.join("catalog.key"), &list, &e0);
    let out = apply(&e0, &root);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(std::fs::read_to_string(root.join("etc/motd")).unwrap(), "day 0\n");
    let verified = run("converge", &["verify", "--trusted-keys", &s(&list), &s(&e0)]);
    assert!(verified.stdout.contains("host       web01"), "{}", verified.stdout);

    // Day 1: a second catalog key is made and added by the root key (version 2); the server
    // signs with it, and the agent adopts version 2 from the envelope.
    server_ok(&["keygen", "--out", &s(&keys), "--name", "catalog-2"]);
    server_ok(&[
        "keys",
        "add",
        "--keys",
        &s(&list),
        "--root-key",
        &s(&keys.join("root.key")),
        &s(&keys.join("catalog-2.pub")),
    ]);
    let v2 = t.path().join("v2.json");
    std::fs::copy(&list, &v2).unwrap();
    write(&repo, &[("roles/motd.yaml", &role("day 1"))]);
    let e1 = t.path().join("e1.env");
    compile_signed(&repo, &keys.join("catalog-2.key"), &list, &e1);
    let out = apply(&e1, &root);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(held_version(&root), 2);
    assert_eq!(std::fs::read_to_string(root.join("etc/motd")).unwrap(), "day 1\n");

    // Day 2: the first catalog key is retired (version 3).
    let listed = server_ok(&["keys", "list", "--keys", &s(&list)]);
    let old_id =
        listed.lines().find(|l| l.ends_with("Catalog")).unwrap().split_whitespace().next().unwrap().to_string();
    server_ok(&["keys", "retire", "--keys", &s(&list), "--root-key", &s(&keys.join("root.key")), &old_id]);
    // The server refuses to sign with a key the list no longer has.
    let refused = run(
        "converge-server",
        &[
            "compile",
            "--repo",
            &s(&repo),
            "--node",
            "web01",
            "--sign",
            &s(&keys.join("catalog.key")),
            "--keys",
            &s(&list),
        ],
    );
    assert_eq!(refused.code, 1);
    assert!(refused.stderr.contains("is not a catalog key of the list"), "{}", refused.stderr);
    write(&repo, &[("roles/motd.yaml", &role("day 2"))]);
    let e2 = t.path().join("e2.env");
    compile_signed(&repo, &keys.join("catalog-2.key"), &list, &e2);
    assert_eq!(apply(&e2, &root).code, 0);
    assert_eq!(held_version(&root), 3);

    // Whoever still holds the retired key cannot use it: with the older list it carried, or
    // with no list at all, the agent refuses and changes nothing.
    write(&repo, &[("roles/motd.yaml", &role("attacker"))]);
    let stolen = t.path().join("stolen.env");
    compile_signed(&repo, &keys.join("catalog.key"), &v2, &stolen);
    let out = apply(&stolen, &root);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("version 2 is older than the version 3 held"), "{}", out.stderr);
    let bare = t.path().join("bare.env");
    let env = server_ok(&["compile", "--repo", &s(&repo), "--node", "web01", "--sign", &s(&keys.join("catalog.key"))]);
    std::fs::write(&bare, env).unwrap();
    let out = apply(&bare, &root);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("no valid signature by a trusted catalog key"), "{}", out.stderr);
    assert_eq!(std::fs::read_to_string(root.join("etc/motd")).unwrap(), "day 2\n");
}

#[test]
fn sign_stamps_times_and_serial_and_verify_reads_them() {
    let t = tempfile::tempdir().unwrap();
    let keys = t.path().join("keys");
    let s = |p: &Path| p.display().to_string();
    server_ok(&["keygen", "--out", &s(&keys)]);
    write(t.path(), &[("c.yaml", "format: 1\nhost: web01\nresources:\n  - file: /etc/motd\n    content: hi\n")]);
    let env = server_ok(&[
        "sign",
        &s(&keys.join("catalog.key")),
        &s(&t.path().join("c.yaml")),
        "--serial",
        "42",
        "--ttl",
        "1h",
    ]);
    std::fs::write(t.path().join("c.env"), env).unwrap();
    let out = run(
        "converge",
        &["verify", "--trusted-keys", &s(&keys.join("trusted-keys.json")), &s(&t.path().join("c.env"))],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("serial     42"), "{}", out.stdout);
    // A catalog with no host cannot be signed.
    write(t.path(), &[("nohost.yaml", "format: 1\nresources: []\n")]);
    let out = run("converge-server", &["sign", &s(&keys.join("catalog.key")), &s(&t.path().join("nohost.yaml"))]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("names no host"), "{}", out.stderr);
}
