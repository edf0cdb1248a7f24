//! The Vagrant lab (`vagrant/`), without virtual machines: its Vagrantfile checked by ruby and
//! by Debian's vagrant, and its parts run as the Vagrantfile runs them, with booted containers
//! (systemd as PID 1) standing in for the machines and a pair of network namespaces for the
//! private network: `vagrant/lab prepare` on the host, `provision/db.sh` in the database,
//! `provision/server.sh` in both servers, `provision/agent.sh` in an agent, which joins through
//! `/bootstrap.sh` and knows both servers. Two machines share each namespace (the database with
//! the first server, the second server with the agent): their ports differ. Gated with the
//! container suite (`converge_e2e::container`).

use converge_e2e::container::{Container, NetPair, enabled};
use converge_e2e::{bin, copy_tree as sync, eventually, write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a provisioner as vagrant's shell provisioner does: uploaded (vagrant uses /tmp, which is
/// the container's own tmpfs here), then run as root.
fn provision(c: &Container, script: &str) -> converge_e2e::Out {
    provision_with(c, script, &[])
}

/// [`provision`], with the arguments the Vagrantfile gives the script.
fn provision_with(c: &Container, script: &str, args: &[&str]) -> converge_e2e::Out {
    std::fs::copy(source().join("vagrant/provision").join(script), c.path("/root/vagrant-shell")).unwrap();
    let mut argv = vec!["sh", "/root/vagrant-shell"];
    argv.extend(args);
    c.run(&argv)
}

#[test]
fn the_vagrantfile_is_valid_ruby_and_a_valid_vagrant_configuration() {
    if !enabled("Vagrantfile") {
        return;
    }
    let c = Container::boot();
    // vagrant-libvirt: a provider vagrant can check the lab's provider settings against (without
    // recommends, which would bring the libvirt daemon and qemu: 5 s, not 90).
    c.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends vagrant vagrant-libvirt >/dev/null");
    sync(&source().join("vagrant"), &c.path("/root/lab/vagrant"));
    sync(&source().join("catalogs"), &c.path("/root/lab/catalogs"));
    assert_eq!(c.sh("cd /root/lab/vagrant && ruby -c Vagrantfile"), "Syntax OK\n");
    let vagrant = |cmd: &str| {
        c.run_env(
            &["HOME=/root", "VAGRANT_CHECKPOINT_DISABLE=1"],
            &["sh", "-c", &format!("cd /root/lab/vagrant && {cmd}")],
        )
    };
    let out = vagrant("vagrant validate && vagrant status --machine-readable");
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("Vagrantfile validated successfully."), "{}", out.stdout);
    for machine in ["db", "server", "server2", "web", "alma"] {
        assert!(out.stdout.contains(&format!(",{machine},state,not_created")), "{machine}: {}", out.stdout);
    }
    // Validating is not bringing up: the trigger that prepares the lab did not run.
    assert!(!c.path("/root/lab/vagrant/.lab").exists());
    // And validate is a real check: a misspelt provider setting is refused.
    let vagrantfile = c.path("/root/lab/vagrant/Vagrantfile");
    let text = std::fs::read_to_string(&vagrantfile).unwrap();
    std::fs::write(&vagrantfile, text.replacen("lv.memory = 1024", "lv.memroy = 1024", 1)).unwrap();
    let out = vagrant("vagrant validate");
    assert_ne!(out.code, 0);
    assert!(format!("{}{}", out.stdout, out.stderr).contains("memroy"), "{}{}", out.stdout, out.stderr);
}

#[test]
fn the_lab_brings_up_two_servers_on_postgresql_and_an_agent_that_joins_through_bootstrap_sh() {
    if !enabled("the lab") {
        return;
    }
    let w = tempfile::tempdir().unwrap();
    let net = NetPair::new("l");
    // The operator's repository: any directory with a site.yaml (CONVERGE_LAB_REPO).
    let repo = w.path().join("repo");
    write(
        &repo,
        &[
            ("site.yaml", "nodes:\n  \"*.lab\":\n    roles: [box]\n"),
            (
                "roles/box.yaml",
                "resources:\n  - package: hello\n  - file: /etc/motd\n    content: \"{{ node.name }}, in the lab\\n\"\n",
            ),
        ],
    );

    // 1. The host: what the Vagrantfile's trigger runs before any machine boots.
    let lab = w.path().join("lab");
    let target = bin("converge").parent().unwrap().parent().unwrap().to_path_buf();
    let prepare = |extra: &[&str]| {
        Command::new(source().join("vagrant/lab"))
            .args(["prepare", "--dir", &lab.display().to_string(), "--server-ip", &net.a_ip])
            .args(["--db-ip", &net.a_ip, "--server2-ip", &net.b_ip])
            .args(["--repo", &repo.display().to_string(), "--profile", "debug"])
            .args(extra)
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .unwrap()
    };
    let out = prepare(&["--agent", "box.lab"]);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let url = std::fs::read_to_string(lab.join("fleet-page-url")).unwrap().trim().to_string();
    assert!(url.starts_with(&format!("https://{}:8443/?token=cvo_", net.a_ip)), "{url}");
    assert!(lab.join("offline/root.key").exists() && !lab.join("server/keys/root.key").exists());
    // Prepared twice: nothing is made again.
    let join = std::fs::read_to_string(lab.join("join/box.lab/join.sh")).unwrap();
    let again = prepare(&["--agent", "box.lab"]);
    assert!(again.status.success());
    assert_eq!(std::fs::read_to_string(lab.join("join/box.lab/join.sh")).unwrap(), join);

    assert!(lab.join("server2/server.toml").exists() && !lab.join("server2/keys/root.key").exists());
    let toml = std::fs::read_to_string(lab.join("server/server.toml")).unwrap();
    assert!(toml.contains(&format!("@{}:5432/converge", net.a_ip)), "{toml}");

    // 2. The database machine, then the server machine: their synced folders, then their
    // provisioners.
    let db = Container::boot_in_netns(&net.a);
    sync(&lab.join("db"), &db.path("/lab/db"));
    let out = provision_with(&db, "db.sh", &[&net.a_ip, &net.b_ip]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(!db.sh("ps -eo args").contains(&std::fs::read_to_string(lab.join("db/password")).unwrap()));
    let server = Container::boot_in_netns(&net.a);
    sync(&lab.join("server"), &server.path("/lab/server"));
    sync(&lab.join("packages"), &server.path("/lab/packages"));
    sync(&repo, &server.path("/lab/repo"));
    let out = provision(&server, "server.sh");
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("lab server: serving"), "{}", out.stdout);
    // It runs from its package, under its own user and hardened unit, with private state.
    let show = server.sh("systemctl show -p User,NoNewPrivileges,ProtectSystem,ActiveState converge-server");
    for want in ["User=converge-server", "NoNewPrivileges=yes", "ProtectSystem=strict", "ActiveState=active"] {
        assert!(show.contains(want), "{want}: {show}");
    }
    assert_eq!(
        server.sh("stat -c '%U %a' /var/lib/converge-server /var/lib/converge-server/state.db"),
        "converge-server 700\nconverge-server 600\n"
    );
    assert!(!server.path("/var/lib/converge-server/keys/root.key").exists(), "the root key stays on the host");
    // The second server: its state from `server add`, the same database.
    let server2 = Container::boot_in_netns(&net.b);
    sync(&lab.join("server2"), &server2.path("/lab/server"));
    sync(&lab.join("packages"), &server2.path("/lab/packages"));
    sync(&repo, &server2.path("/lab/repo"));
    let out = provision(&server2, "server.sh");
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let heads = |c: &Container| c.sh("runuser -u converge-server -- git -C /srv/converge/repo rev-parse HEAD");
    assert_eq!(heads(&server), heads(&server2), "both servers hold the same commit");

    // 3. The agent machine: only its own join line, then its provisioner.
    let agent = Container::boot_in_netns(&net.b);
    let _ = agent.run(&["rm", "-f", "/usr/local/bin/converge"]); // only what the package brings
    sync(&lab.join("join/box.lab"), &agent.path("/lab/join"));
    let out = provision(&agent, "agent.sh");
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(
        agent.sh("systemctl is-active converge; dpkg-query -W -f '${Status}' hello"),
        "active\ninstall ok installed"
    );
    assert_eq!(agent.sh("cat /etc/motd"), "box.lab, in the lab\n");
    let agent_toml = agent.sh("cat /etc/converge/agent.toml");
    assert!(agent_toml.contains("interval = \"2m\""), "{agent_toml}");
    assert!(agent_toml.contains(&format!("servers = [\"https://{}:8443\"]", net.b_ip)), "{agent_toml}");

    // 4. The fleet page: from the server itself (loopback), the agent in sync; from another
    // machine only with the operator token of fleet-page-url.
    eventually(Duration::from_secs(30), Duration::from_millis(500), || {
        let page = server.run(&["curl", "-sk", "https://127.0.0.1:8443/"]).stdout;
        if page.contains("data-node=\"box.lab\" data-status=\"in sync\"") {
            return Ok(());
        }
        let _ = agent.run(&["systemctl", "reload", "converge"]); // run now
        Err(format!("box.lab never showed in sync:\n{page}"))
    });
    // The second server shows the same fleet: one database.
    let page = server2.run(&["curl", "-sk", "https://127.0.0.1:8443/"]).stdout;
    assert!(page.contains("data-node=\"box.lab\" data-status=\"in sync\""), "{page}");
    let code = |url: &str| agent.sh(&format!("curl -sk -o /dev/null -w '%{{http_code}}' '{url}'"));
    assert_eq!(code(&format!("https://{}:8443/", net.a_ip)), "403");
    assert_eq!(code(&url), "303", "the token is taken and kept in a cookie");

    // 5. The operator changes the repository on the host and provisions the server again: the
    // agent, provisioned again, runs at once and converges to it.
    write(
        &repo,
        &[("roles/box.yaml", "resources:\n  - file: /etc/motd\n    content: \"{{ node.name }}, changed\\n\"\n")],
    );
    for s in [&server, &server2] {
        sync(&repo, &s.path("/lab/repo"));
        let out = provision(s, "server.sh");
        assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
        assert_eq!(s.sh("runuser -u converge-server -- git -C /srv/converge/repo rev-list --count HEAD"), "2\n");
    }
    assert_eq!(heads(&server), heads(&server2));
    eventually(Duration::from_secs(30), Duration::from_millis(1000), || {
        if agent.sh("cat /etc/motd") == "box.lab, changed\n" {
            return Ok(());
        }
        let out = provision(&agent, "agent.sh");
        assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
        Err(format!("the change never reached box.lab: {}", agent.sh("converge status")))
    });

    // 6. The first server halted (`vagrant halt server`): the agent goes on with the second,
    // whose page shows its runs.
    server.sh("systemctl stop converge-server");
    agent.sh("echo drifted > /etc/motd");
    eventually(Duration::from_secs(30), Duration::from_millis(1000), || {
        if agent.sh("cat /etc/motd") == "box.lab, changed\n" {
            return Ok(());
        }
        let _ = agent.run(&["systemctl", "reload", "converge"]);
        Err(format!("box.lab was not repaired with the first server away: {}", agent.sh("converge status")))
    });
}
