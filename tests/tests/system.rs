//! The system kinds against real systems: apt/dpkg, shadow-utils and systemd in disposable
//! containers (systemd as PID 1), and dnf/rpm in an install root. Gated: see
//! `converge_e2e::container`. For each kind: apply -> check with the system's own tools ->
//! apply again (no change) -> drift by hand -> a dry-run reports exactly that drift and
//! changes nothing -> apply repairs it.

use converge_e2e::container::{Container, build_rpm, enabled};
use converge_e2e::{Out, assert_code, bin, changed, write};
use std::process::Command;

#[test]
fn packages_install_pin_remove_and_repair_drift() {
    if !enabled("packages") {
        return;
    }
    let c = Container::boot();
    c.sh("apt-get install -y -qq cvb-pkg-001 >/dev/null");
    let catalog = "format: 1\nresources:\n  - package: hello\n  - package: cvt-hello\n    ensure: \"1.0\"\n    allow_downgrade: true\n  - package: cvb-pkg-001\n    ensure: absent\n  - package: bash\n";
    let out = c.apply("p.yaml", catalog, &[]);
    assert_code(&out, 2, "first run");
    let state = || {
        c.sh("dpkg-query -W -f '${Package} ${Version} ${db:Status-Abbrev}\\n' hello cvt-hello cvb-pkg-001 2>/dev/null; true")
    };
    let after = state();
    let hello = c.sh("apt-cache policy hello | sed -n 's/^ *Candidate: //p'");
    assert!(after.contains(&format!("hello {} ii", hello.trim())), "{after}");
    assert!(after.contains("cvt-hello 1.0 ii"), "{after}");
    assert!(!after.contains("cvb-pkg-001 1.0 ii"), "{after}");
    assert_code(&c.apply("p.yaml", catalog, &[]), 0, "second run: nothing to do");

    // Drift: another version, a removal, an install.
    c.sh("apt-get install -y -qq cvt-hello=2.0 cvb-pkg-001 >/dev/null && apt-get remove -y -qq hello >/dev/null");
    let drifted = state();
    let dry = c.apply("p.yaml", catalog, &["--dry-run"]);
    assert_code(&dry, 2, "dry-run on drift");
    assert_eq!(changed(&dry), vec!["package:hello", "package:cvt-hello", "package:cvb-pkg-001"], "{}", dry.stdout);
    assert!(dry.stdout.contains("version: 2.0 -> 1.0"), "{}", dry.stdout);
    assert!(dry.stdout.contains("ensure: 1.0 -> absent"), "{}", dry.stdout);
    assert_eq!(state(), drifted, "a dry-run changes nothing");
    let out = c.apply("p.yaml", catalog, &[]);
    assert_code(&out, 2, "repair");
    assert_eq!(state(), after);
    assert_code(&c.apply("p.yaml", catalog, &[]), 0, "converged again");
}

#[test]
fn users_and_groups_with_exact_membership_and_a_hidden_password() {
    if !enabled("users") {
        return;
    }
    let c = Container::boot();
    c.sh("useradd -m olduser");
    let hash = "$6$saltsalt$3fH7.Gd8bwBvGZRdqR8f7EoDvRzjeiHKYNjJY2GqMvEUZZRu6iN8LpZXkD4BSnGqKdXc8pIhQv0PrVfHxvgg01";
    let catalog = format!(
        "format: 1\nresources:\n  - group: ops\n    gid: 3000\n  - user: deploy\n    uid: 3000\n    gid: ops\n    groups: [adm, users]\n    shell: /bin/bash\n    comment: Deploy\n    password_hash: \"{hash}\"\n  - user: olduser\n    ensure: absent\n    remove_home: true\n"
    );
    let out = c.apply("u.yaml", &catalog, &[]);
    assert_code(&out, 2, "first run");
    assert!(!out.stdout.contains(hash) && !out.stderr.contains(hash), "the hash never shows: {}", out.stdout);
    let state = || {
        c.sh("getent passwd deploy olduser; getent group ops; id -Gn deploy; getent shadow deploy | cut -d: -f2; ls -d /home/*")
    };
    let after = state();
    assert!(after.contains("deploy:x:3000:3000:Deploy:/home/deploy:/bin/bash"), "{after}");
    assert!(after.contains("ops:x:3000:"), "{after}");
    assert!(after.contains("ops adm users"), "{after}");
    assert!(after.contains(hash), "{after}");
    assert!(!after.contains("olduser"), "{after}");
    assert!(after.contains("/home/deploy"), "a home is made: {after}");
    assert_code(&c.apply("u.yaml", &catalog, &[]), 0, "second run");

    c.sh("usermod -s /bin/sh -c Someone deploy && gpasswd -d deploy adm >/dev/null && usermod -aG sudo deploy");
    let drifted = state();
    let dry = c.apply("u.yaml", &catalog, &["--dry-run"]);
    assert_code(&dry, 2, "dry-run on drift");
    assert_eq!(changed(&dry), vec!["user:deploy"], "{}", dry.stdout);
    for line in ["groups: sudo, users -> adm, users", "shell: /bin/sh -> /bin/bash", "comment: Someone -> Deploy"] {
        assert!(dry.stdout.contains(line), "{line} in {}", dry.stdout);
    }
    assert_eq!(state(), drifted);
    assert_code(&c.apply("u.yaml", &catalog, &[]), 2, "repair");
    assert_eq!(state(), after);
}

#[test]
fn services_running_enabled_and_repaired() {
    if !enabled("services") {
        return;
    }
    let c = Container::boot();
    let catalog =
        "format: 1\nresources:\n  - package: cvt-svc\n  - service: cvt-svc\n    ensure: running\n    enabled: true\n";
    assert_code(&c.apply("s.yaml", catalog, &[]), 2, "first run");
    let state = || c.sh("systemctl is-active cvt-svc; systemctl is-enabled cvt-svc; true");
    assert_eq!(state(), "active\nenabled\n");
    assert_code(&c.apply("s.yaml", catalog, &[]), 0, "second run");
    c.sh("systemctl stop cvt-svc && systemctl disable -q cvt-svc");
    let dry = c.apply("s.yaml", catalog, &["--dry-run"]);
    assert_code(&dry, 2, "dry-run on drift");
    assert!(
        dry.stdout.contains("enabled: false -> true") && dry.stdout.contains("ensure: inactive -> running"),
        "{}",
        dry.stdout
    );
    assert_eq!(state(), "inactive\ndisabled\n");
    assert_code(&c.apply("s.yaml", catalog, &[]), 2, "repair");
    assert_eq!(state(), "active\nenabled\n");
}

#[test]
fn guarded_commands_and_a_dry_run_that_never_runs_them() {
    if !enabled("exec") {
        return;
    }
    let c = Container::boot();
    c.sh("mkdir -m 1777 /srv/t");
    let catalog = "format: 1\nresources:\n  - exec: make-marker\n    command: [/bin/sh, -c, \"echo made > /srv/t/marker; echo done making\"]\n    creates: /srv/t/marker\n  - exec: unless-true\n    command: [/bin/touch, /srv/t/never1]\n    unless: [/bin/true]\n  - exec: onlyif-false\n    command: [/bin/touch, /srv/t/never2]\n    onlyif: [/bin/false]\n  - exec: as-nobody\n    command: [/bin/sh, -c, \"id -un > /srv/t/whoami; pwd >> /srv/t/whoami\"]\n    user: nobody\n    cwd: /srv/t\n    unless: [/usr/bin/test, -s, /srv/t/whoami]\n  - exec: slow\n    command: [/bin/sleep, \"30\"]\n    timeout: 1\n    creates: /srv/t/marker\n";
    let dry = c.apply("e.yaml", catalog, &["--dry-run"]);
    assert_code(&dry, 2, "dry-run");
    // slow is guarded by the marker that make-marker says it makes: the dry-run knows it will
    // not run.
    assert_eq!(changed(&dry), vec!["exec:make-marker", "exec:as-nobody"], "{}", dry.stdout);
    assert_eq!(c.sh("ls /srv/t"), "", "a dry-run runs no command");
    let out = c.apply("e.yaml", catalog, &[]);
    assert_code(&out, 2, "run");
    assert!(out.stdout.contains("output: done making"), "{}", out.stdout);
    assert_eq!(c.sh("cat /srv/t/marker /srv/t/whoami"), "made\nnobody\n/srv/t\n");
    assert_eq!(c.sh("ls /srv/t"), "marker\nwhoami\n");
    assert_code(&c.apply("e.yaml", catalog, &[]), 0, "guards hold");
    // A command past its timeout is killed and says so.
    let slow = "format: 1\nresources:\n  - exec: slow\n    command: [/bin/sleep, \"30\"]\n    timeout: 1\n";
    let out = c.apply("slow.yaml", slow, &[]);
    assert_code(&out, 4, "timeout");
    assert!(out.stdout.contains("`/bin/sleep 30` was killed after 1 s (its timeout)"), "{}", out.stdout);
}

#[test]
fn a_notify_restarts_once_and_reload_keeps_the_process() {
    if !enabled("notify") {
        return;
    }
    let c = Container::boot();
    let catalog = |v: &str| {
        format!(
            "format: 1\nresources:\n  - package: cvt-svc\n  - file: /etc/cvt-svc.conf\n    content: \"{v}\\n\"\n    notify: [service:cvt-svc]\n  - file: /etc/cvt-svc.extra\n    content: \"{v}\\n\"\n    notify: [service:cvt-svc]\n  - service: cvt-svc\n    ensure: running\n  - package: nginx\n  - file: /etc/nginx/conf.d/converge.conf\n    content: \"# {v}\\n\"\n    notify: [service:nginx]\n  - service: nginx\n    ensure: running\n    refresh: reload\n"
        )
    };
    let starts = || c.sh("grep -c start /var/log/cvt-svc.log || true").trim().to_string();
    let nginx_pid = || c.sh("systemctl show -p MainPID --value nginx").trim().to_string();
    let first = c.apply("n.yaml", &catalog("v1"), &[]);
    assert_code(&first, 2, "first run");
    assert_eq!(starts(), "1", "started by this run: the notify does nothing more\n{}", first.stdout);
    let pid = nginx_pid();
    let second = c.apply("n.yaml", &catalog("v2"), &[]);
    assert_code(&second, 2, "changed configuration");
    assert!(second.stdout.contains("restarted (notified by file:/etc/cvt-svc.conf)"), "{}", second.stdout);
    assert_eq!(starts(), "2", "two files changed, one restart");
    assert!(second.stdout.contains("reloaded (notified by file:/etc/nginx/conf.d/converge.conf)"), "{}", second.stdout);
    assert_eq!(nginx_pid(), pid, "a reload keeps the main process");
    assert_eq!(c.sh("systemctl is-active nginx").trim(), "active");
    assert_code(&c.apply("n.yaml", &catalog("v2"), &[]), 0, "nothing changed, nothing notified");
    assert_eq!(starts(), "2");
}

#[test]
fn a_changed_unit_file_is_reloaded_before_its_service_acts() {
    if !enabled("daemon-reload") {
        return;
    }
    let c = Container::boot();
    let unit = |d: &str| {
        format!(
            "format: 1\nresources:\n  - file: /etc/systemd/system/cvt-local.service\n    content: \"[Unit]\\nDescription={d}\\n[Service]\\nExecStart=/bin/sleep infinity\\n[Install]\\nWantedBy=multi-user.target\\n\"\n    notify: [service:cvt-local]\n  - service: cvt-local\n    ensure: running\n    enabled: true\n"
        )
    };
    assert_code(&c.apply("d.yaml", &unit("first"), &[]), 2, "a new unit");
    assert_eq!(c.sh("systemctl is-active cvt-local").trim(), "active");
    let out = c.apply("d.yaml", &unit("second"), &[]);
    assert_code(&out, 2, "a changed unit");
    assert!(out.stdout.contains("restarted"), "{}", out.stdout);
    let show = c.sh("systemctl show -p Description,NeedDaemonReload cvt-local");
    assert!(show.contains("Description=second") && show.contains("NeedDaemonReload=no"), "{show}");
}

#[test]
fn failures_stay_on_their_resource() {
    if !enabled("failures") {
        return;
    }
    let c = Container::boot();
    let catalog = "format: 1\nresources:\n  - package: cvt-hello\n  - package: does-not-exist\n  - file: /etc/needs-it\n    content: x\n    requires: [package:does-not-exist]\n  - package: cvt-broken\n  - service: cvt-broken\n    ensure: running\n  - user: taken\n    uid: 1\n  - file: /etc/fine\n    content: fine\n";
    let out = c.apply("f.yaml", catalog, &[]);
    assert_code(&out, 6, "changes and failures");
    let line = |id: &str| out.stdout.lines().find(|l| l.contains(id)).unwrap_or_default().to_string();
    assert!(line("package:cvt-hello").contains("changed"), "{}", out.stdout);
    assert!(line("package:cvt-broken").contains("changed"), "{}", out.stdout);
    assert!(line("file:/etc/fine").contains("changed"), "{}", out.stdout);
    assert!(
        line("package:does-not-exist").contains("no package `does-not-exist` in the configured repositories"),
        "{}",
        out.stdout
    );
    assert!(line("file:/etc/needs-it").contains("skipped"), "{}", out.stdout);
    assert!(line("user:taken").contains("uid 1 is already the user daemon's"), "{}", out.stdout);
    assert!(line("service:cvt-broken").contains("FAILED"), "{}", out.stdout);
    assert!(out.stdout.contains("cvt-broken: /etc/cvt-broken.conf is missing"), "the journal's tail: {}", out.stdout);
    assert_eq!(c.sh("dpkg-query -W -f '${Version}' cvt-hello"), "2.0");
}

#[test]
fn a_held_dpkg_lock_is_waited_for_then_reported() {
    if !enabled("dpkg-lock") {
        return;
    }
    let c = Container::boot();
    // cvt-slow's preinst sleeps: apt holds the dpkg lock meanwhile.
    let mut holder = c.spawn(&["apt-get", "install", "-y", "-qq", "cvt-slow"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while c.run(&["sh", "-c", "pgrep -f 'cvt-slow.*preinst' || pgrep -x sleep"]).code != 0 {
        assert!(std::time::Instant::now() < deadline, "the lock holder never started");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let started = std::time::Instant::now();
    let out = c.apply_env(
        &["CONVERGE_PACKAGE_LOCK_TIMEOUT=2"],
        "l.yaml",
        "format: 1\nresources:\n  - package: cvt-hello\n",
        &[],
    );
    assert_code(&out, 4, "locked");
    assert!(
        out.stdout.contains("the package database is locked by another process and stayed locked for 2 s"),
        "{}",
        out.stdout
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(12), "bounded: {:?}", started.elapsed());
    let _ = holder.wait();
    assert_code(&c.apply("l.yaml", "format: 1\nresources:\n  - package: cvt-hello\n", &[]), 2, "after the lock");
}

/// An image under --root, without booting it: apt and shadow-utils chrooted, units enabled with
/// `systemctl --root`, services never started.
#[test]
fn an_image_under_root() {
    if !enabled("image") {
        return;
    }
    let tb = converge_e2e::container::testbed();
    let repo = converge_e2e::container::repo();
    let w = tempfile::tempdir().unwrap();
    let (upper, work, root) = (w.path().join("upper"), w.path().join("work"), w.path().join("root"));
    for d in [&upper, &work, &root] {
        std::fs::create_dir_all(d).unwrap();
    }
    let opts =
        format!("lowerdir={},upperdir={},workdir={}", tb.join("tree").display(), upper.display(), work.display());
    assert!(
        Command::new("mount").args(["-t", "overlay", "overlay", "-o", &opts]).arg(&root).status().unwrap().success()
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(root.clone());
    // The image's apt reads the local repository at /srv/repo, as in a container.
    let srv = root.join("srv/repo");
    std::fs::create_dir_all(&srv).unwrap();
    for e in std::fs::read_dir(&repo).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "Packages" || name.starts_with("cvt-svc") {
            std::fs::copy(e.path(), srv.join(&name)).unwrap();
        }
    }
    assert!(Command::new("chroot").arg(&root).args(["apt-get", "update", "-qq"]).status().unwrap().success());
    write(&root, &[("etc/hostname", "image\n")]);
    let catalog = "format: 1\nresources:\n  - package: cvt-svc\n  - service: cvt-svc\n    ensure: running\n    enabled: true\n  - group: app\n  - user: app\n    gid: app\n    system: true\n  - file: /etc/app.conf\n    content: x\n    owner: app\n";
    let path = w.path().join("i.yaml");
    std::fs::write(&path, catalog).unwrap();
    let apply = |extra: &[&str]| {
        let out = Command::new(bin("converge"))
            .args(["apply", &path.display().to_string(), "--root", &root.display().to_string(), "--detailed-exitcodes"])
            .args(extra)
            .output()
            .unwrap();
        Out::from(out)
    };
    let out = apply(&[]);
    assert_code(&out, 2, "into the image");
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(passwd.lines().any(|l| l.starts_with("app:x:")), "the image's passwd: {passwd}");
    let host_passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    assert!(!host_passwd.lines().any(|l| l.starts_with("app:x:")) || passwd == host_passwd, "the host is untouched");
    let wants = root.join("etc/systemd/system/multi-user.target.wants/cvt-svc.service");
    assert!(wants.symlink_metadata().is_ok(), "enabled in the image: {}", out.stdout);
    let status = std::fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
    assert!(status.contains("Package: cvt-svc"), "installed in the image");
    assert_code(&apply(&[]), 0, "again: nothing to do");
}

/// dnf and rpm from the host into an install root, with RPMs the test builds.
#[test]
fn dnf_into_an_install_root() {
    if !enabled("dnf") {
        return;
    }
    let w = tempfile::tempdir().unwrap();
    let (build, repo, root) = (w.path().join("build"), w.path().join("repo"), w.path().join("root"));
    for d in [&build, &repo, &root] {
        std::fs::create_dir_all(d).unwrap();
    }
    for (name, version) in [("cvt-rpm-a", "1.0"), ("cvt-rpm-b", "1.0"), ("cvt-rpm-b", "2.0")] {
        let rpm = build_rpm(name, version, &build);
        std::fs::copy(&rpm, repo.join(rpm.file_name().unwrap())).unwrap();
    }
    assert!(Command::new("createrepo_c").arg("-q").arg(&repo).status().unwrap().success());
    write(
        &root,
        &[
            ("etc/os-release", "ID=rocky\nID_LIKE=\"rhel centos fedora\"\nVERSION_ID=9\n"),
            ("etc/hostname", "rpmhost\n"),
            (
                "etc/yum.repos.d/local.repo",
                &format!("[local]\nname=local\nbaseurl=file://{}\ngpgcheck=0\nenabled=1\n", repo.display()),
            ),
        ],
    );
    let catalog = "format: 1\nresources:\n  - package: cvt-rpm-a\n  - package: cvt-rpm-b\n    ensure: \"1.0*\"\n";
    let path = w.path().join("r.yaml");
    std::fs::write(&path, catalog).unwrap();
    let apply = |extra: &[&str]| {
        let out = Command::new(bin("converge"))
            .args(["apply", &path.display().to_string(), "--root", &root.display().to_string(), "--detailed-exitcodes"])
            .args(extra)
            .output()
            .unwrap();
        Out::from(out)
    };
    let dry = apply(&["--dry-run"]);
    assert_code(&dry, 2, "dry-run");
    assert!(dry.stdout.contains("ensure: absent -> 1.0-1"), "{}", dry.stdout);
    let out = apply(&[]);
    assert_code(&out, 2, "install");
    let q = Command::new("rpm").arg("--root").arg(&root).args(["-q", "cvt-rpm-a", "cvt-rpm-b"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&q.stdout), "cvt-rpm-a-1.0-1.noarch\ncvt-rpm-b-1.0-1.noarch\n");
    assert_code(&apply(&[]), 0, "again");
    // Removal, with every operand after `--` (rpm, dnf remove).
    std::fs::write(&path, "format: 1\nresources:\n  - package: cvt-rpm-a\n    ensure: absent\n").unwrap();
    assert_code(&apply(&[]), 2, "remove");
    let q = Command::new("rpm").arg("--root").arg(&root).args(["-q", "cvt-rpm-a"]).output().unwrap();
    assert!(!q.status.success(), "removed: {}", String::from_utf8_lossy(&q.stdout));
    assert_code(&apply(&[]), 0, "removed, again");
}
