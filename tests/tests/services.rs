//! The real-service roles of catalogs/ (ssh, web, db, cache) in a booted Debian container, as
//! an operator would use them: the first run converges everything (a dry-run before it
//! predicted it exactly: see `Container::apply`), then each service is asked whether it works
//! (an HTTP request, a SQL query over TCP with the role's password, a PING, an SSH banner and
//! sshd's own view of its configuration); the second run changes nothing; drift made by hand is
//! predicted by a dry-run, resource for resource, and repaired. Runs on whichever Debian
//! release the testbed is (12 or 13: `.ci/run` runs it on both). Gated: see
//! `converge_e2e::container`.

use converge_e2e::container::{Container, enabled};
use converge_e2e::{Out, server_ok};
use std::collections::BTreeSet;
use std::path::Path;

const PASSWORD: &str = "app-password-change-me";

fn ids(out: &Out, status: &str) -> BTreeSet<String> {
    out.stdout
        .lines()
        .filter(|l| l.starts_with(&format!("  {status}")))
        .map(|l| l[15..].split(": ").next().unwrap_or_default().to_string())
        .collect()
}

/// Every service answers as the roles configure it.
fn services_answer(c: &Container) {
    let index =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../catalogs/files/index.html")).unwrap();
    assert_eq!(c.sh("curl -fsS http://127.0.0.1/"), index, "nginx serves the site");
    let sql = c.sh(&format!("PGPASSWORD={PASSWORD} psql -h 127.0.0.1 -U app -d app -tAc 'SELECT current_user'"));
    assert_eq!(sql.trim(), "app", "PostgreSQL: the app role logs into its database with its password");
    assert_eq!(c.sh("redis-cli -h 127.0.0.1 ping").trim(), "PONG");
    assert_eq!(c.sh("redis-cli -h 127.0.0.1 config get maxmemory").split_whitespace().nth(1), Some("268435456"));
    let sshd = c.sh("sshd -T");
    for line in ["permitrootlogin no", "passwordauthentication no", "allowgroups admins"] {
        assert!(sshd.lines().any(|l| l == line), "sshd -T lacks `{line}`:\n{sshd}");
    }
    let banner = c.sh("timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/22; head -c 8 <&3'");
    assert_eq!(banner, "SSH-2.0-", "sshd answers");
    let redis = c.sh("getent passwd redis");
    assert!(redis.trim_end().ends_with(":/var/lib/redis:/usr/sbin/nologin"), "{redis}");
}

#[test]
fn the_service_roles_converge_on_the_first_run_answer_and_repair_drift() {
    if !enabled("services") {
        return;
    }
    let c = Container::boot();
    let release = c.sh(". /etc/os-release; echo $VERSION_ID");
    let node = if release.trim() == "13" { "services13.test" } else { "services.test" };
    let facts = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(facts.path(), "memory_mb: 512\ncpus: 2\n").unwrap();
    let catalogs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../catalogs");
    let catalog = server_ok(&[
        "compile",
        "--repo",
        &catalogs.display().to_string(),
        "--node",
        node,
        "--facts",
        &facts.path().display().to_string(),
    ]);

    let first = c.apply("services.yaml", &catalog, &["--node", node]);
    assert_eq!(first.code, 2, "the first run converges everything:\n{}{}", first.stdout, first.stderr);
    services_answer(&c);
    let again = c.apply("services.yaml", &catalog, &["--node", node]);
    assert_eq!(again.code, 0, "the second run changes nothing:\n{}", again.stdout);

    // Drift by hand: a setting, a stopped service, an account's shell, a dropped database.
    c.sh("sed -i 's/^maxmemory 256mb/maxmemory 1gb/' /etc/redis/redis.conf && systemctl restart redis-server");
    c.sh("systemctl stop nginx && usermod -s /bin/bash redis && cd / && runuser -u postgres -- dropdb app");
    let dry = c.apply("services.yaml", &catalog, &["--node", node, "--dry-run"]);
    assert_eq!(dry.code, 2, "{}", dry.stdout);
    let expected: BTreeSet<String> =
        ["file:/etc/redis/redis.conf", "service:nginx", "user:redis", "exec:postgresql database app"]
            .map(String::from)
            .into();
    assert_eq!(ids(&dry, "would change"), expected, "the dry-run sees exactly the drift:\n{}", dry.stdout);
    let repair = c.apply("services.yaml", &catalog, &["--node", node]);
    assert_eq!(repair.code, 2, "{}{}", repair.stdout, repair.stderr);
    assert_eq!(ids(&repair, "changed"), expected, "{}", repair.stdout);
    services_answer(&c);
    assert_eq!(c.apply("services.yaml", &catalog, &["--node", node]).code, 0, "converged again");
}
