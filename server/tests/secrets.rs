//! `converge-server secret` as an operator runs it: keys made, a value set from standard input
//! and never written in the clear, read back by any recipient, a recipient removed and re-keyed
//! out, and every broken file refused with its place.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_converge-server");

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn server(args: &[&str], stdin: Option<&str>) -> Out {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("CONVERGE_SECRETS_IDENTITY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default().as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(args: &[&str], stdin: Option<&str>) -> String {
    let out = server(args, stdin);
    assert_eq!(out.code, 0, "{args:?}: {}{}", out.stdout, out.stderr);
    out.stdout
}

/// Every file under `dir`, as bytes.
fn everything(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all.extend(everything(&p));
        } else {
            all.extend(std::fs::read(&p).unwrap());
        }
    }
    all
}

#[test]
fn set_show_rekey_and_every_refusal() {
    let t = tempfile::tempdir().unwrap();
    let (repo, keys) = (t.path().join("repo"), t.path().join("keys"));
    std::fs::create_dir_all(repo.join("data/secrets")).unwrap();
    std::fs::create_dir_all(&keys).unwrap();
    let key = |n: &str| keys.join(n).display().to_string();
    let server_r = ok(&["secret", "keygen", "--out", &key("server.key")], None);
    let alice_r = ok(&["secret", "keygen", "--out", &key("alice.key")], None);
    let mallory_r = ok(&["secret", "keygen", "--out", &key("mallory.key")], None);
    assert!(server_r.starts_with("age1") && alice_r.starts_with("age1") && mallory_r.starts_with("age1"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(key("alice.key")).unwrap().permissions().mode() & 0o777, 0o600);
    assert_ne!(server(&["secret", "keygen", "--out", &key("alice.key")], None).code, 0, "never overwritten");
    let recipients = format!("# the server\n{}# alice\n{}", server_r, alice_r);
    std::fs::write(repo.join("data/secrets/recipients"), &recipients).unwrap();
    let r = repo.display().to_string();

    ok(&["secret", "set", "--repo", &r, "db_password"], Some("Tr0ub4dor&3\n"));
    ok(&["secret", "set", "--repo", &r, "--level", "role/db", "replication"], Some("r3pl1c4\n"));
    let stored = everything(&repo.join("data/secrets"));
    for plain in ["Tr0ub4dor&3", "r3pl1c4"] {
        assert!(!String::from_utf8_lossy(&stored).contains(plain), "{plain} in the clear");
    }
    let common = std::fs::read_to_string(repo.join("data/secrets/common.yaml")).unwrap();
    assert!(common.contains("db_password: |\n  -----BEGIN AGE ENCRYPTED FILE-----"), "{common}");

    let show = |who: &str, level: &str, name: &str| {
        server(&["secret", "show", "--repo", &r, "--level", level, "--identity", &key(who), name], None)
    };
    assert_eq!(show("alice.key", "common", "db_password").stdout, "Tr0ub4dor&3");
    assert_eq!(show("server.key", "role/db", "replication").stdout, "r3pl1c4");
    let no = show("mallory.key", "common", "db_password");
    assert_eq!(no.code, 1);
    assert!(
        no.stderr.contains("common.yaml: db_password") && no.stderr.contains("none of the given identities"),
        "{}",
        no.stderr
    );
    assert!(show("alice.key", "common", "nope").stderr.contains("no secret `nope`"));

    // Changing one value changes only its own lines: a git diff says which one.
    ok(&["secret", "set", "--repo", &r, "other"], Some("x"));
    let after = std::fs::read_to_string(repo.join("data/secrets/common.yaml")).unwrap();
    let block = |text: &str, name: &str| {
        let start = text.find(&format!("{name}: |")).unwrap();
        text[start..].lines().take_while(|l| l.starts_with(name) || l.starts_with("  ")).collect::<Vec<_>>().join("\n")
    };
    assert_eq!(block(&common, "db_password"), block(&after, "db_password"), "untouched values keep their bytes");

    // alice leaves: rekey to the server alone; her key opens nothing any more.
    std::fs::write(repo.join("data/secrets/recipients"), format!("# the server\n{server_r}")).unwrap();
    let rekeyed = ok(&["secret", "rekey", "--repo", &r, "--identity", &key("server.key")], None);
    assert!(rekeyed.contains("3 secrets encrypted again to 1 recipient"), "{rekeyed}");
    assert_eq!(show("alice.key", "common", "db_password").code, 1);
    assert_eq!(show("server.key", "common", "db_password").stdout, "Tr0ub4dor&3");
    // A rekey by a key that cannot open everything changes nothing.
    let before = everything(&repo.join("data/secrets"));
    assert_eq!(server(&["secret", "rekey", "--repo", &r, "--identity", &key("alice.key")], None).code, 1);
    assert_eq!(everything(&repo.join("data/secrets")), before);

    // Refusals, each with its place, nothing changed.
    std::fs::write(repo.join("data/secrets/recipients"), format!("{server_r}not-a-key\n")).unwrap();
    let bad = server(&["secret", "set", "--repo", &r, "x"], Some("v"));
    assert!(
        bad.code == 1 && bad.stderr.contains("recipients:2: `not-a-key` is not an age recipient"),
        "{}",
        bad.stderr
    );
    std::fs::write(repo.join("data/secrets/recipients"), &server_r).unwrap();
    for (name, why) in [("1x", "cannot name a secret"), ("a-b", "cannot name a secret")] {
        let out = server(&["secret", "set", "--repo", &r, name], Some("v"));
        assert!(out.code == 1 && out.stderr.contains(why), "{name}: {}", out.stderr);
    }
    let out = server(&["secret", "set", "--repo", &r, "--level", "../../etc/x", "y"], Some("v"));
    assert!(out.code == 1 && out.stderr.contains("is not a data level"), "{}", out.stderr);
    std::fs::write(repo.join("data/secrets/node.yaml"), "api_token: plain text\n").unwrap();
    let out = show("server.key", "node", "api_token");
    assert!(out.stderr.contains("node.yaml:1:12: `api_token` is not an age-encrypted value"), "{}", out.stderr);
    std::fs::write(repo.join("data/secrets/node.yaml"), "[1, 2]\n").unwrap();
    assert!(show("server.key", "node", "x").stderr.contains("node.yaml:1:1: a secrets file is a mapping"));
    let huge = "x".repeat(70 << 10);
    let out = server(&["secret", "set", "--repo", &r, "huge"], Some(&huge));
    assert!(out.code == 1 && out.stderr.contains("a secret is at most"), "{}", out.stderr);
}
