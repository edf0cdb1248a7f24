//! The kinds that edit what converge does not own, and the kernel's parameters, against the
//! real tools in disposable containers (Debian 12, and Debian 13 in CI's second pass): OpenSSH's
//! configuration edited line by line and block by block and checked by `sshd -t`, kernel
//! parameters set live and at boot through systemd-sysctl. For each: apply -> check with the
//! system's own tools -> apply again (no change) -> drift by hand -> a dry-run reports exactly
//! that drift and changes nothing -> apply repairs it. Gated: see `converge_e2e::container`.

use converge_e2e::container::{Container, Deb, build_rpm, enabled, run_ok};
use converge_e2e::{assert_code, changed};

const SSHD: &str = "format: 1
resources:
  - package: openssh-server
  - file_line: no-root-login
    path: /etc/ssh/sshd_config
    line: PermitRootLogin no
    match: ^#?PermitRootLogin
    validate: [/usr/sbin/sshd, -t, -f, \"%\"]
    requires: [package:openssh-server]
  - file_block: hardening
    path: /etc/ssh/sshd_config
    before: ^Match
    content: |
      MaxAuthTries 3
      LoginGraceTime 20
    validate: [/usr/sbin/sshd, -t, -f, \"%\"]
    requires: [package:openssh-server]
";

#[test]
fn sshd_config_edited_by_line_and_block_and_checked_by_sshd() {
    if !enabled("file_line") {
        return;
    }
    let c = Container::boot();
    let out = c.apply("sshd.yaml", SSHD, &[]);
    assert_code(&out, 2, "first run");
    let effective =
        || c.sh("/usr/sbin/sshd -T 2>/dev/null | grep -E '^(permitrootlogin|maxauthtries|logingracetime) ' | sort");
    let after = effective();
    assert_eq!(after, "logingracetime 20\nmaxauthtries 3\npermitrootlogin no\n", "sshd reads what converge wrote");
    let config = c.sh("cat /etc/ssh/sshd_config");
    let set: Vec<&str> =
        config.lines().filter(|l| l.starts_with("PermitRootLogin") || l.starts_with("#PermitRootLogin")).collect();
    assert_eq!(set, ["PermitRootLogin no"], "the commented default was replaced: {config}");
    assert!(
        config.contains("# BEGIN converge hardening\nMaxAuthTries 3\nLoginGraceTime 20\n# END converge hardening\n")
    );
    // Everything else is as the package shipped it.
    let shipped = c.sh("sed -e '/PermitRootLogin/d' -e '/converge hardening/d' -e '/^MaxAuthTries 3$/d' -e '/^LoginGraceTime 20$/d' /etc/ssh/sshd_config | md5sum");
    let original = c.sh("sed -e '/PermitRootLogin/d' /usr/share/openssh/sshd_config | md5sum");
    assert_eq!(shipped, original, "no other line moved");
    assert_code(&c.apply("sshd.yaml", SSHD, &[]), 0, "second run: nothing to do");

    // Drift: the line edited by hand, the block changed.
    c.sh("sed -i -e 's/^PermitRootLogin no/PermitRootLogin yes/' -e 's/^MaxAuthTries 3/MaxAuthTries 9/' /etc/ssh/sshd_config");
    let drifted = c.sh("md5sum /etc/ssh/sshd_config");
    let dry = c.apply("sshd.yaml", SSHD, &["--dry-run"]);
    assert_code(&dry, 2, "dry-run on drift");
    assert_eq!(changed(&dry), ["file_line:no-root-login", "file_block:hardening"], "{}", dry.stdout);
    assert!(
        dry.stdout.contains("-PermitRootLogin yes") && dry.stdout.contains("+PermitRootLogin no"),
        "{}",
        dry.stdout
    );
    assert!(dry.stdout.contains("-MaxAuthTries 9") && dry.stdout.contains("+MaxAuthTries 3"), "{}", dry.stdout);
    assert_eq!(c.sh("md5sum /etc/ssh/sshd_config"), drifted, "a dry-run changes nothing");
    assert_code(&c.apply("sshd.yaml", SSHD, &[]), 2, "repair");
    assert_eq!(effective(), after);

    // A line sshd refuses never reaches the file.
    let bad = SSHD.replace("line: PermitRootLogin no", "line: PermitRootLogin sometimes");
    let before = c.sh("md5sum /etc/ssh/sshd_config");
    let out = c.apply("bad.yaml", &bad, &[]);
    assert_code(&out, 4, "validate refuses");
    assert!(out.stdout.contains("validate refused the edit, /etc/ssh/sshd_config left as it was"), "{}", out.stdout);
    assert_eq!(c.sh("md5sum /etc/ssh/sshd_config"), before);

    // Removing: the block and its markers go, the line goes.
    let gone = SSHD
        .replace("    before: ^Match\n", "    ensure: absent\n")
        .replace("    match: ^#?PermitRootLogin\n", "    match: ^#?PermitRootLogin\n    ensure: absent\n");
    assert_code(&c.apply("gone.yaml", &gone, &[]), 2, "removal");
    let config = c.sh("cat /etc/ssh/sshd_config");
    assert!(!config.contains("converge") && !config.lines().any(|l| l.starts_with("PermitRootLogin")), "{config}");
    assert_code(&c.apply("gone.yaml", &gone, &[]), 0, "removed: nothing to do");
}

const SYSCTL: &str = "format: 1
resources:
  - sysctl: net.ipv4.ip_forward
    value: 1
  - sysctl: net.ipv4.ip_local_port_range
    value: \"20000  60999\"
";

#[test]
fn kernel_parameters_live_and_at_boot() {
    if !enabled("sysctl") {
        return;
    }
    let c = Container::boot();
    let state = || c.sh("sysctl -n net.ipv4.ip_forward net.ipv4.ip_local_port_range");
    assert_code(&c.apply("s.yaml", SYSCTL, &[]), 2, "first run");
    assert_eq!(state(), "1\n20000\t60999\n");
    assert_eq!(
        c.sh("cat /etc/sysctl.d/99-zz-converge-net.ipv4.ip_forward.conf"),
        "# Managed by converge (sysctl:net.ipv4.ip_forward); edits are overwritten.\nnet.ipv4.ip_forward = 1\n"
    );
    assert_code(&c.apply("s.yaml", SYSCTL, &[]), 0, "second run: nothing to do");

    // What the boot does: every file, in its order, gives converge's values.
    c.sh("sysctl -qw net.ipv4.ip_forward=0 && sysctl -qw net.ipv4.ip_local_port_range='32768 60999'");
    let drifted = state();
    let dry = c.apply("s.yaml", SYSCTL, &["--dry-run"]);
    assert_code(&dry, 2, "dry-run on drift");
    assert!(
        dry.stdout.contains("value: 0 -> 1") && dry.stdout.contains("value: 32768 60999 -> 20000 60999"),
        "{}",
        dry.stdout
    );
    assert_eq!(state(), drifted, "a dry-run changes nothing");
    c.sh("/lib/systemd/systemd-sysctl");
    assert_eq!(state(), "1\n20000\t60999\n", "the boot's own tool sets converge's values");

    // A file read after converge's one would win at boot: named, and nothing written.
    c.sh("echo 'net.ipv4.ip_forward = 0' >> /etc/sysctl.conf");
    let out = c.apply("s.yaml", SYSCTL, &[]);
    assert_code(&out, 4, "a later file overrides");
    assert!(
        out.stdout.contains("/etc/sysctl.conf:")
            && out.stdout.contains("sets net.ipv4.ip_forward = 0 and is read after"),
        "{}",
        out.stdout
    );
    c.sh("sed -i '$d' /etc/sysctl.conf");

    // A parameter a container cannot set fails as still differing, never as a false success.
    let out = c.apply("vm.yaml", "format: 1\nresources:\n  - sysctl: vm.swappiness\n    value: 7\n", &[]);
    assert_code(&out, 4, "read-only /proc/sys");
    assert!(out.stdout.contains("still differs after apply: value:"), "{}", out.stdout);
    let out = c.apply("no.yaml", "format: 1\nresources:\n  - sysctl: net.ipv4.no_such_thing\n    value: 1\n", &[]);
    assert_code(&out, 4, "an unknown parameter");
    assert!(out.stdout.contains("the kernel has no parameter net.ipv4.no_such_thing"), "{}", out.stdout);
}

const TIMER: &str = "format: 1
resources:
  - timer: stamp
    command: [/bin/sh, -c, \"date +%s >> /var/tmp/stamps\"]
    schedule: \"*/5 * * * *\"
    randomized_delay: 60
";

#[test]
fn a_timer_scheduled_by_systemd_runs_its_command() {
    if !enabled("timer") {
        return;
    }
    let c = Container::boot();
    assert_code(&c.apply("t.yaml", TIMER, &[]), 2, "first run");
    let state = || c.sh("systemctl is-active converge-stamp.timer; systemctl is-enabled converge-stamp.timer; true");
    assert_eq!(state(), "active\nenabled\n");
    let shown = c.sh("systemctl show -p TimersCalendar converge-stamp.timer");
    assert!(shown.contains("OnCalendar=*-*-* *:00/5:00"), "systemd reads the cron schedule: {shown}");
    assert!(c.sh("systemctl list-timers --all --no-pager").contains("converge-stamp.timer"));
    // What the timer starts runs the command, `%` and all.
    c.sh("systemctl start converge-stamp.service");
    let stamps = c.sh("cat /var/tmp/stamps");
    assert!(stamps.trim().parse::<u64>().is_ok(), "the command ran as written: {stamps:?}");
    assert_code(&c.apply("t.yaml", TIMER, &[]), 0, "second run: nothing to do");

    // Drift: disabled and stopped, its unit file edited.
    c.sh("systemctl disable --now -q converge-stamp.timer && sed -i 's/RandomizedDelaySec=60/RandomizedDelaySec=1/' /etc/systemd/system/converge-stamp.timer && systemctl daemon-reload");
    let drifted = state();
    let dry = c.apply("t.yaml", TIMER, &["--dry-run"]);
    assert_code(&dry, 2, "dry-run on drift");
    assert_eq!(changed(&dry), ["timer:stamp"], "{}", dry.stdout);
    assert!(
        dry.stdout.contains("-RandomizedDelaySec=1") && dry.stdout.contains("enabled: disabled -> enabled"),
        "{}",
        dry.stdout
    );
    assert_eq!(state(), drifted, "a dry-run changes nothing");
    assert_code(&c.apply("t.yaml", TIMER, &[]), 2, "repair");
    assert_eq!(state(), "active\nenabled\n");
    assert!(c.sh("systemctl show -p RandomizedDelayUSec converge-stamp.timer").contains("1min"));

    // A calendar event systemd cannot read never replaces the working one.
    let bad = TIMER.replace("\"*/5 * * * *\"", "\"Mon..Fry 03:00\"");
    let out = c.apply("bad.yaml", &bad, &[]);
    assert_code(&out, 4, "a schedule systemd refuses");
    assert!(out.stdout.contains("systemd does not read `Mon..Fry 03:00` as a calendar event"), "{}", out.stdout);
    assert!(c.sh("cat /etc/systemd/system/converge-stamp.timer").contains("OnCalendar=*-*-* *:0/5:00"));

    let gone = "format: 1\nresources:\n  - timer: stamp\n    ensure: absent\n";
    assert_code(&c.apply("gone.yaml", gone, &[]), 2, "removal");
    assert_eq!(c.sh("ls /etc/systemd/system/ | grep -c converge-stamp; true"), "0\n");
    assert!(!c.sh("systemctl list-timers --all --no-pager").contains("converge-stamp"));
    assert_code(&c.apply("gone.yaml", gone, &[]), 0, "removed: nothing to do");
}

const MOUNT: &str = "format: 1
resources:
  - directory: /srv/scratch
  - mount: /srv/scratch
    device: tmpfs
    fstype: tmpfs
    options: size=1m,mode=0750
";

#[test]
fn a_filesystem_in_fstab_and_mounted() {
    if !enabled("mount") {
        return;
    }
    let c = Container::boot();
    c.sh("echo '# a comment the agent keeps' >> /etc/fstab");
    let fstab_before = c.sh("cat /etc/fstab");
    assert_code(&c.apply("m.yaml", MOUNT, &[]), 2, "first run");
    let state = || c.sh("findmnt -n -r -o SOURCE,FSTYPE,OPTIONS /srv/scratch; true");
    let after = state();
    assert!(after.starts_with("tmpfs tmpfs ") && after.contains("size=1024k") && after.contains("mode=750"), "{after}");
    assert_eq!(c.sh("cat /etc/fstab"), format!("{fstab_before}tmpfs /srv/scratch tmpfs size=1m,mode=0750 0 0\n"));
    // What the boot reads: systemd's generator made a mount unit of the entry.
    assert!(c.sh("systemctl show -p Where,What srv-scratch.mount").contains("Where=/srv/scratch"));
    assert_code(&c.apply("m.yaml", MOUNT, &[]), 0, "second run: nothing to do");

    // Drift: unmounted by hand.
    c.sh("umount /srv/scratch");
    let dry = c.apply("m.yaml", MOUNT, &["--dry-run"]);
    assert_code(&dry, 2, "dry-run on drift");
    assert_eq!(changed(&dry), ["mount:/srv/scratch"], "{}", dry.stdout);
    assert!(dry.stdout.contains("mounted: no -> yes"), "{}", dry.stdout);
    assert_eq!(state(), "", "a dry-run changes nothing");
    assert_code(&c.apply("m.yaml", MOUNT, &[]), 2, "repair");
    assert_eq!(state(), after);

    // New options: the entry changes and the mounted filesystem takes them.
    let bigger = MOUNT.replace("size=1m", "size=2m");
    c.sh("echo hello > /srv/scratch/kept");
    assert_code(&c.apply("m.yaml", &bigger, &[]), 2, "remount");
    assert!(state().contains("size=2048k"), "{}", state());
    assert_eq!(c.sh("cat /srv/scratch/kept"), "hello\n", "a remount keeps what the filesystem holds");

    // Busy: umount's own words, and the entry stays.
    let mut busy = c.spawn(&["sh", "-c", "cd /srv/scratch && exec sleep 600"]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let gone = "format: 1\nresources:\n  - mount: /srv/scratch\n    ensure: absent\n";
    let out = c.apply("gone.yaml", gone, &[]);
    assert_code(&out, 4, "a busy filesystem");
    assert!(out.stdout.contains("umount -- /srv/scratch") && out.stdout.contains("busy"), "{}", out.stdout);
    assert!(c.sh("cat /etc/fstab").contains("/srv/scratch"), "nothing else changed");
    c.sh("pkill -x sleep; sleep 0.3");
    let _ = busy.wait();
    assert_code(&c.apply("gone.yaml", gone, &[]), 2, "removal");
    assert_eq!(state(), "");
    assert_eq!(c.sh("cat /etc/fstab"), fstab_before, "every other line as it was");
}

/// A key made for the test, in a keyring of its own: its armored public half.
fn new_key(home: &std::path::Path, who: &str) -> String {
    std::fs::create_dir_all(home).unwrap();
    std::fs::set_permissions(home, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let gpg = |args: &[&str]| {
        run_ok(
            std::process::Command::new("gpg").arg("--homedir").arg(home).args(["--batch", "--quiet"]).args(args),
            "gpg",
        )
    };
    gpg(&[
        "--passphrase",
        "",
        "--quick-gen-key",
        &format!("{who} <{who}@example.invalid>"),
        "ed25519",
        "sign",
        "never",
    ]);
    gpg(&["--armor", "--export"])
}

/// A flat apt repository in `dir` holding `deb`, its InRelease signed with the key in `home`.
fn signed_repo(dir: &std::path::Path, home: &std::path::Path, deb: &Deb) {
    std::fs::create_dir_all(dir).unwrap();
    let work = tempfile::tempdir().unwrap();
    deb.build(work.path(), dir);
    let index = run_ok(std::process::Command::new("dpkg-scanpackages").arg(".").current_dir(dir), "dpkg-scanpackages");
    std::fs::write(dir.join("Packages"), &index).unwrap();
    let date = run_ok(std::process::Command::new("date").args(["-R", "-u"]), "date");
    let release = format!(
        "Origin: converge-test\nLabel: converge-test\nSuite: ./\nDate: {}\nSHA256:\n {} {} Packages\n",
        date.trim(),
        converge_modules::hash::sha256_hex(index.as_bytes()),
        index.len()
    );
    std::fs::write(dir.join("Release"), release).unwrap();
    run_ok(
        std::process::Command::new("gpg")
            .arg("--homedir")
            .arg(home)
            .args(["--batch", "--quiet", "--yes", "--clearsign", "-o"])
            .arg(dir.join("InRelease"))
            .arg(dir.join("Release")),
        "gpg --clearsign",
    );
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        std::fs::set_permissions(e.path(), std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    }
}

fn repository(name: &str, key: &str) -> String {
    let key: String = key.lines().map(|l| format!("      {l}\n")).collect();
    format!("  - repository: {name}\n    url: file:/srv/signed\n    suites: [./]\n    key: |\n{key}")
}

#[test]
fn a_signed_apt_repository_with_its_own_key() {
    if !enabled("repository") {
        return;
    }
    let c = Container::boot();
    let w = tempfile::tempdir().unwrap();
    let key = new_key(&w.path().join("gpg"), "signer");
    let stranger = new_key(&w.path().join("other"), "stranger");
    let deb = Deb::new("cvt-signed", "1.0").file("/usr/share/cvt-signed/version", "1.0\n", 0o644);
    signed_repo(&c.path("/srv/signed"), &w.path().join("gpg"), &deb);
    std::fs::set_permissions(c.path("/srv/signed"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let catalog = format!("format: 1\nresources:\n  - package: cvt-signed\n{}", repository("signed", &key));
    let out = c.apply("r.yaml", &catalog, &[]);
    assert_code(&out, 2, "first run");
    // The package came after the repository that offers it, in the same run.
    assert_eq!(changed(&out), ["repository:signed", "package:cvt-signed"], "{}", out.stdout);
    assert_eq!(c.sh("cat /usr/share/cvt-signed/version"), "1.0\n");
    assert!(c.sh("apt-cache policy cvt-signed").contains("file:/srv/signed ./"));
    let sources = c.sh("cat /etc/apt/sources.list.d/converge-signed.sources");
    assert!(sources.contains("Signed-By: /etc/apt/keyrings/converge-signed.asc\n"), "{sources}");
    assert_code(&c.apply("r.yaml", &catalog, &[]), 0, "second run: nothing to do");

    // Drift: the key removed by hand.
    c.sh("rm /etc/apt/keyrings/converge-signed.asc");
    let dry = c.apply("r.yaml", &catalog, &["--dry-run"]);
    assert_code(&dry, 2, "dry-run on drift");
    assert_eq!(changed(&dry), ["repository:signed"], "{}", dry.stdout);
    assert!(dry.stdout.contains("key: absent -> sha256:"), "{}", dry.stdout);
    assert_eq!(c.sh("ls /etc/apt/keyrings/"), "", "a dry-run changes nothing");
    assert_code(&c.apply("r.yaml", &catalog, &[]), 2, "repair");

    // A key that did not sign it: refused, put back, and apt left working.
    let wrong = format!("format: 1\nresources:\n{}", repository("wrong", &stranger));
    let out = c.apply("w.yaml", &wrong, &[]);
    assert_code(&out, 4, "a wrong key");
    assert!(out.stdout.contains("repository wrong was refused, its files put back as they were"), "{}", out.stdout);
    assert_eq!(c.sh("ls /etc/apt/sources.list.d/ | grep -c converge-wrong; true"), "0\n");
    c.sh("apt-get update -qq");

    let gone = "format: 1\nresources:\n  - repository: signed\n    ensure: absent\n";
    assert_code(&c.apply("g.yaml", gone, &[]), 2, "removal");
    assert_eq!(c.sh("ls /etc/apt/sources.list.d/ /etc/apt/keyrings/ | grep -c converge; true"), "0\n");
}

/// dnf and rpm from the host into an install root: a repository whose RPMs are signed, its
/// key imported, a package installed from it; an RPM signed by another key refused.
#[test]
fn a_signed_dnf_repository_into_an_install_root() {
    if !enabled("dnf repository") {
        return;
    }
    let w = tempfile::tempdir().unwrap();
    let (build, repo, root) = (w.path().join("build"), w.path().join("repo"), w.path().join("root"));
    let key = new_key(&w.path().join("gpg"), "rpm-signer");
    new_key(&w.path().join("other"), "stranger");
    std::fs::create_dir_all(&repo).unwrap();
    for (name, home) in [("cvt-signed-rpm", "gpg"), ("cvt-stranger-rpm", "other")] {
        let rpm = build_rpm(name, "1.0", &build);
        let dest = repo.join(rpm.file_name().unwrap());
        std::fs::copy(&rpm, &dest).unwrap();
        let who = if home == "gpg" { "rpm-signer" } else { "stranger" };
        run_ok(
            std::process::Command::new("rpmsign")
                .args(["--addsign", "--define", "__gpg /usr/bin/gpg", "--define"])
                .arg(format!("_gpg_name {who}"))
                .arg("--define")
                .arg(format!("_gpg_path {}", w.path().join(home).display()))
                .args(["--define", "_gpg_sign_cmd_extra_args --batch --pinentry-mode loopback --passphrase ''"])
                .arg(&dest),
            "rpmsign",
        );
    }
    run_ok(std::process::Command::new("createrepo_c").arg("-q").arg(&repo), "createrepo_c");
    converge_e2e::write(
        &root,
        &[
            ("etc/os-release", "ID=rocky\nID_LIKE=\"rhel centos fedora\"\nVERSION_ID=9\n"),
            ("etc/hostname", "rpmhost\n"),
        ],
    );
    for d in ["etc/yum.repos.d", "etc/pki/rpm-gpg"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let key: String = key.lines().map(|l| format!("      {l}\n")).collect();
    let repository = format!("  - repository: signed\n    url: file://{}\n    key: |\n{key}", repo.display());
    let apply = |packages: &str| {
        let path = w.path().join("r.yaml");
        std::fs::write(&path, format!("format: 1\nresources:\n{packages}{repository}")).unwrap();
        converge_e2e::Out::from(
            std::process::Command::new(converge_e2e::bin("converge"))
                .args([
                    "apply",
                    &path.display().to_string(),
                    "--root",
                    &root.display().to_string(),
                    "--detailed-exitcodes",
                ])
                .output()
                .unwrap(),
        )
    };
    let out = apply("  - package: cvt-signed-rpm\n");
    assert_code(&out, 2, "repository and package");
    let repo_file = std::fs::read_to_string(root.join("etc/yum.repos.d/converge-signed.repo")).unwrap();
    assert!(
        repo_file.contains("gpgcheck=1\ngpgkey=file:///etc/pki/rpm-gpg/RPM-GPG-KEY-converge-signed\n"),
        "{repo_file}"
    );
    let q = run_ok(std::process::Command::new("rpm").arg("--root").arg(&root).args(["-q", "cvt-signed-rpm"]), "rpm -q");
    assert_eq!(q, "cvt-signed-rpm-1.0-1.noarch\n");
    assert_code(&apply("  - package: cvt-signed-rpm\n"), 0, "again: nothing to do");
    // A package the key did not sign is refused by dnf, and so by the run.
    let out = apply("  - package: cvt-stranger-rpm\n");
    assert_code(&out, 4, "signed by a stranger");
    assert!(out.stdout.contains("package:cvt-stranger-rpm"), "{}", out.stdout);
    let q =
        std::process::Command::new("rpm").arg("--root").arg(&root).args(["-q", "cvt-stranger-rpm"]).output().unwrap();
    assert!(!q.status.success(), "not installed");
}

/// A `directory` with a `source` from a role, compiled by the server and converged by the
/// agent into a scratch root: the tree arrives, and a file taken out of files/ is purged.
#[test]
fn a_directory_tree_from_the_repository_is_copied_and_purged() {
    let w = tempfile::tempdir().unwrap();
    let (repo, root) = (w.path().join("repo"), w.path().join("root"));
    converge_e2e::write(
        &repo,
        &[
            ("site.yaml", "nodes:\n  n: {roles: [site]}\n"),
            (
                "roles/site.yaml",
                "resources:\n  - directory: /srv\n  - directory: /srv/www\n    source: site\n    mode: \"0750\"\n    purge: true\n",
            ),
            ("files/site/index.html", "<h1>hi</h1>\n"),
            ("files/site/css/site.css", "body {}\n"),
            ("files/site/css/old.css", "old {}\n"),
        ],
    );
    std::fs::create_dir_all(&root).unwrap();
    let apply = || {
        let yaml = converge_e2e::server_ok(&["compile", "--repo", &repo.display().to_string(), "--node", "n"]);
        std::fs::write(w.path().join("c.yaml"), yaml).unwrap();
        converge_e2e::converge_in(
            &root,
            &["apply", &w.path().join("c.yaml").display().to_string(), "--detailed-exitcodes", "--node", "n"],
        )
    };
    assert_code(&apply(), 2, "first run");
    let read = |p: &str| std::fs::read_to_string(root.join(p)).ok();
    assert_eq!(read("srv/www/css/site.css").as_deref(), Some("body {}\n"));
    assert_eq!(read("srv/www/index.html").as_deref(), Some("<h1>hi</h1>\n"));
    let mode = |p: &str| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(root.join(p)).unwrap().permissions()) & 0o7777
    };
    assert_eq!((mode("srv/www/css"), mode("srv/www/css/site.css")), (0o750, 0o644));
    assert_code(&apply(), 0, "second run: nothing to do");
    // Taken out of the repository: purged from the host; a stray file too.
    std::fs::remove_file(repo.join("files/site/css/old.css")).unwrap();
    std::fs::write(root.join("srv/www/css/stray.css"), "x").unwrap();
    let out = apply();
    assert_code(&out, 2, "purge");
    assert_eq!(read("srv/www/css/old.css"), None, "{}", out.stdout);
    assert_eq!(read("srv/www/css/stray.css"), None, "{}", out.stdout);
    assert_eq!(read("srv/www/css/site.css").as_deref(), Some("body {}\n"));
}
