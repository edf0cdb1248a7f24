//! The compiler and secrets: a value read from `secrets` makes what reads it sensitive and
//! sealed, with a keyed fingerprint; it compiles to a placeholder without the key; it can go
//! only where it can be sealed; and only the host it is sealed to opens it.

use converge_modules::catalog::{FORMAT_SEALED, Spec};
use converge_modules::sealed::{self, Field, Identity};
use converge_server::compiler::Compiler;
use converge_server::repo::Repo;
use converge_server::secrets::{self, SecretsKey};
use serde_json::Map;
use std::sync::Arc;

const SITE: &str = "\
data: [common, \"role/{role}\", \"node/{node}\"]
nodes:
  app1: {roles: [app]}
  app2: {roles: [app]}
  web1: {roles: [web]}
";

const APP: &str = "\
params:
  password_secret: db_password
resources:
  - file: /etc/app/db.conf
    template: db.conf.j2
  - file: /etc/app/token
    content: \"{{ secrets.api_token }}\"
    mode: \"0600\"
  - exec: load-password
    command: [/usr/bin/app-admin, set-password]
    stdin: \"{{ secrets[params.password_secret] }}\"
  - file: /etc/app/plain
    content: \"on\\n\"
    when: \"secrets.api_token != ''\"
";

const WEB: &str = "resources:\n  - file: /etc/motd\n    content: \"web\\n\"\n";

/// A repository whose secrets are encrypted to the server's key and an operator's; the
/// server's key.
fn repo_with(secrets_of: &[(&str, &str, &str)], extra: &[(&str, &str)]) -> (Repo, Arc<SecretsKey>) {
    let server = Identity::generate();
    let key = Arc::new(SecretsKey::of(vec![server.clone()]));
    let recipients = [server.to_public(), Identity::generate().to_public()];
    let mut files: Vec<(String, String)> = vec![
        ("site.yaml".into(), SITE.into()),
        ("roles/app.yaml".into(), APP.into()),
        ("roles/web.yaml".into(), WEB.into()),
        ("templates/db.conf.j2".into(), "user=app\npassword={{ secrets.db_password }}\n".into()),
    ];
    let mut levels: std::collections::BTreeMap<&str, String> = Default::default();
    for (level, name, value) in secrets_of {
        let armored = secrets::encrypt(value.as_bytes(), &recipients).unwrap();
        let entry = levels.entry(level).or_default();
        entry.push_str(&format!("{name}: |\n"));
        for line in armored.lines() {
            entry.push_str(&format!("  {line}\n"));
        }
    }
    for (level, text) in levels {
        files.push((format!("data/secrets/{level}.yaml"), text));
    }
    files.extend(extra.iter().map(|(p, t)| (p.to_string(), t.to_string())));
    (Repo::from_files(files.iter().map(|(p, t)| (p.as_str(), t.as_str()))), key)
}

const SECRETS: &[(&str, &str, &str)] =
    &[("common", "api_token", "tok-Bravo-93d2"), ("role/app", "db_password", "pw-Alpha-7c1e")];

#[test]
fn what_reads_a_secret_is_sealed_with_a_keyed_fingerprint_and_only_its_host_opens_it() {
    let (repo, key) = repo_with(SECRETS, &[]);
    let compiler = Compiler::with_key(&repo, Some(key));
    assert_eq!(compiler.problems, vec![]);
    let (mut catalog, opened) = compiler.compile_open("app1", &Map::new()).unwrap();
    assert_eq!(catalog.format, FORMAT_SEALED);
    let sealed: Vec<(String, Field)> = catalog.sealed.iter().map(|s| (s.resource.to_string(), s.field)).collect();
    assert_eq!(
        sealed,
        [
            ("file:/etc/app/db.conf".to_string(), Field::Content),
            ("file:/etc/app/token".to_string(), Field::Content),
            ("exec:load-password".to_string(), Field::Stdin),
        ]
    );
    assert!(catalog.sealed.iter().all(|s| s.fingerprint.starts_with("hmac-sha256:")));
    assert!(catalog.sealed_values.is_none(), "sealed only when handed to a host");
    let plain = catalog.resources.iter().find(|r| r.id.title == "/etc/app/plain").unwrap();
    assert!(!plain.sensitive(), "a condition on a secret decides nothing about its value");
    for r in catalog.resources.iter().filter(|r| r.id.title != "/etc/app/plain") {
        assert!(r.sensitive(), "{} reads a secret", r.id);
    }
    let wire = serde_json::to_string(&catalog).unwrap();
    assert!(!wire.contains("pw-Alpha") && !wire.contains("tok-Bravo"), "{wire}");

    let (host, thief) = (Identity::generate(), Identity::generate());
    opened.seal(&mut catalog, &host.to_public()).unwrap();
    let wire = serde_json::to_string(&catalog).unwrap();
    assert!(!wire.contains("pw-Alpha") && !wire.contains("tok-Bravo"), "{wire}");
    let mut stolen = catalog.clone();
    assert!(sealed::open(&mut stolen, Some(&thief), "k").is_err(), "another host's key opens nothing");
    sealed::open(&mut catalog, Some(&host), "k").unwrap();
    let content = |title: &str| {
        let r = catalog.resources.iter().find(|r| r.id.title == title).unwrap();
        match &r.spec {
            Spec::File(f) => f.content.clone().unwrap().into_string().unwrap(),
            Spec::Exec(e) => e.stdin.clone().unwrap(),
            _ => unreachable!(),
        }
    };
    assert_eq!(content("/etc/app/db.conf"), "user=app\npassword=pw-Alpha-7c1e\n");
    assert_eq!(content("/etc/app/token"), "tok-Bravo-93d2");
    assert_eq!(content("load-password"), "pw-Alpha-7c1e");

    // web1 reads no secret: its catalog is as it always was.
    let web = compiler.compile("web1", &Map::new()).unwrap();
    assert!(web.sealed.is_empty() && web.format == 1);
}

#[test]
fn without_the_key_secrets_compile_as_placeholders_and_a_change_still_shows() {
    let (repo, _) = repo_with(SECRETS, &[]);
    let compiler = Compiler::new(&repo);
    assert_eq!(compiler.problems, vec![]);
    let (catalog, opened) = compiler.compile_open("app1", &Map::new()).unwrap();
    assert!(catalog.sealed.iter().all(|s| s.fingerprint.starts_with("sha256:")));
    let mut c = catalog.clone();
    assert!(opened.seal(&mut c, &Identity::generate().to_public()).is_err(), "a placeholder is never sealed");
    // Another ciphertext of a secret (set again) gives another fingerprint, even unopened.
    let (again, _) = repo_with(&[("common", "api_token", "tok-Bravo-93d2"), SECRETS[1]], &[]);
    let other = Compiler::new(&again).compile("app1", &Map::new()).unwrap();
    let token = |c: &converge_modules::catalog::Catalog| {
        c.sealed.iter().find(|s| s.resource.title == "/etc/app/token").unwrap().fingerprint.clone()
    };
    assert_ne!(token(&catalog), token(&other));
}

#[test]
fn with_the_key_a_fingerprint_changes_with_the_value_alone_and_only_where_it_is_read() {
    let server = Identity::generate();
    let key = Arc::new(SecretsKey::of(vec![server.clone()]));
    let build = |token: &str| {
        let text = |name: &str, v: &str| {
            let a = secrets::encrypt(v.as_bytes(), &[server.to_public()]).unwrap();
            format!("{name}: |\n{}", a.lines().map(|l| format!("  {l}\n")).collect::<String>())
        };
        let files = [
            ("site.yaml", SITE.to_string()),
            ("roles/app.yaml", APP.to_string()),
            ("roles/web.yaml", WEB.to_string()),
            ("templates/db.conf.j2", "password={{ secrets.db_password }}\n".to_string()),
            ("data/secrets/common.yaml", text("api_token", token)),
            ("data/secrets/role/app.yaml", text("db_password", "pw")),
        ];
        let repo = Repo::from_files(files.iter().map(|(p, t)| (*p, t.as_str())));
        let c = Compiler::with_key(&repo, Some(key.clone()));
        (c.compile("app1", &Map::new()).unwrap(), c.compile("web1", &Map::new()).unwrap())
    };
    let (a1, w1) = build("one");
    let (a2, _) = build("one"); // the same value, encrypted anew
    let (a3, w3) = build("two");
    let fp =
        |c: &converge_modules::catalog::Catalog| c.sealed.iter().map(|s| s.fingerprint.clone()).collect::<Vec<_>>();
    assert_eq!(fp(&a1), fp(&a2), "the same value, the same fingerprint");
    assert_ne!(fp(&a1)[1], fp(&a3)[1], "the token changed");
    assert_eq!(fp(&a1)[0], fp(&a3)[0], "the password did not");
    let sha = converge_modules::trust::resources_sha256;
    assert_ne!(sha(&a1), sha(&a3), "app1 gets a new serial");
    assert_eq!(sha(&w1), sha(&w3), "web1, which reads no secret, does not");
}

#[test]
fn a_secret_goes_only_where_it_can_be_sealed() {
    let bad = |role: &str| {
        let (repo, key) = repo_with(SECRETS, &[("roles/web.yaml", role)]);
        let compiler = Compiler::with_key(&repo, Some(key));
        let e = compiler.compile("web1", &Map::new()).unwrap_err();
        e.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n")
    };
    let e = bad("resources:\n  - exec: x\n    command: [/bin/tool, \"{{ secrets.api_token }}\"]\n");
    assert!(e.contains("roles/web.yaml:3:5: `command` reads a secret") && e.contains("on stdin"), "{e}");
    assert!(!e.contains("tok-Bravo"), "{e}");
    let e = bad("resources:\n  - file: \"/etc/{{ secrets.api_token }}\"\n");
    assert!(e.contains("`file` reads a secret"), "{e}");
    let e =
        bad("resources:\n  - exec: x\n    command: [/bin/true]\n    environment: {T: \"{{ secrets.api_token }}\"}\n");
    assert!(e.contains("roles/web.yaml:4:5: `environment` reads a secret"), "{e}");
    let e = bad("resources:\n  - file: /a\n    content: \"{{ secrets.api_token }}\"\n    sensitive: false\n");
    assert!(e.contains("reads a secret but says `sensitive: false`"), "{e}");
    let e = bad("resources:\n  - file: \"/{{ item }}\"\n    for_each: \"{{ [secrets.api_token] }}\"\n");
    assert!(e.contains("`for_each` cannot read secrets"), "{e}");
    // A problem the decoder finds in a field that read a secret never quotes it.
    let e = bad("resources:\n  - file: /a\n    mode: \"{{ secrets.api_token }}\"\n");
    assert!(e.contains("roles/web.yaml:3:") && e.contains("<secret api_token>") && !e.contains("tok-Bravo"), "{e}");
    let e = bad("resources:\n  - file: /a\n    content: \"{{ secrets.nope }}\"\n");
    assert!(e.contains("roles/web.yaml") && e.contains("undefined"), "{e}");
}

#[test]
fn a_secret_the_server_cannot_open_is_named_with_its_place_and_nothing_else() {
    let (repo, _) = repo_with(SECRETS, &[]);
    let stranger = Arc::new(SecretsKey::of(vec![Identity::generate()]));
    let compiler = Compiler::with_key(&repo, Some(stranger));
    let shown: Vec<String> = compiler.problems.iter().map(|d| d.to_string()).collect();
    assert_eq!(shown.len(), 2, "{shown:?}");
    assert!(shown[0].starts_with("data/secrets/common.yaml:1:1: cannot open secret `api_token`"), "{shown:?}");
    assert!(shown[0].contains("secret rekey"), "{shown:?}");
    let (broken, key) = repo_with(SECRETS, &[("data/secrets/node/web1.yaml", "token: hunter2\n")]);
    let shown: Vec<String> = Compiler::with_key(&broken, Some(key)).problems.iter().map(|d| d.to_string()).collect();
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert!(
        shown[0].starts_with("data/secrets/node/web1.yaml:1:8: `token` is not an age-encrypted value"),
        "{shown:?}"
    );
    assert!(!shown[0].contains("hunter2"), "{shown:?}");
}
