//! The kinds that edit what converge does not own, and the kernel's parameters, against the
//! real tools in disposable containers (Debian 12, and Debian 13 in CI's second pass): OpenSSH's
//! configuration edited line by line and block by block and checked by `sshd -t`, kernel
//! parameters set live and at boot through systemd-sysctl. For each: apply -> check with the
//! system's own tools -> apply again (no change) -> drift by hand -> a dry-run reports exactly
//! that drift and changes nothing -> apply repairs it. Gated: see `converge_e2e::container`.

use converge_e2e::container::{Container, enabled};
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
