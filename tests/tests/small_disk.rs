//! The agent on a small disk: a 20 MiB tmpfs mounted in a private mount namespace of the
//! test's own (the machine's mounts never change), holding the managed root and the agent's
//! state. The backup store must stay within its share of the disk over many runs, refuse a
//! file too large to keep, and on a full disk fail the resource that wanted a backup (changing
//! nothing) instead of filling the disk for every run after. Gated with the container suite
//! (it needs root to mount).

use converge_e2e::container::enabled;
use converge_e2e::*;
use std::fmt::Write as _;

const MIB: usize = 1 << 20;

/// A catalog of `files` files of `size` bytes each whose content depends on `version`.
fn catalog(files: usize, size: usize, version: usize, extra: &str) -> String {
    let mut c = String::from("format: 1\nresources:\n  - directory: /data\n");
    for f in 0..files {
        let line = format!("v{version} f{f} ");
        let content = line.repeat(size / line.len() + 1)[..size].to_string();
        let _ = write!(c, "  - file: /data/f{f}\n    content: \"{content}\"\n");
    }
    c.push_str(extra);
    c
}

#[test]
fn the_backup_store_never_fills_a_small_disk() {
    if !enabled("small disk") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let disk = dir.join("disk");
    std::fs::create_dir(&disk).unwrap();
    // Phase 1: thirty runs, each replacing five files of 300 KiB (1.5 MiB of backups a run).
    for v in 0..30 {
        std::fs::write(dir.join(format!("bounded{v}.yaml")), catalog(5, 300 << 10, v, "")).unwrap();
    }
    // Phase 2: a file larger than the store takes for one (a tenth of 20 MiB, halved).
    let big = |v: usize, backup: &str| {
        let content = format!("big {v} ").repeat(3 * MIB / 6);
        format!("format: 1\nresources:\n  - file: /big\n    content: \"{content}\"\n{backup}")
    };
    std::fs::write(dir.join("big1.yaml"), big(1, "")).unwrap();
    std::fs::write(dir.join("big2.yaml"), big(2, "")).unwrap();
    std::fs::write(dir.join("big2-nobackup.yaml"), big(2, "    backup: false\n")).unwrap();
    // Phase 3: a full disk, then room again.
    std::fs::write(dir.join("full.yaml"), catalog(1, 300 << 10, 99, "")).unwrap();
    let script = format!(
        r#"set -u
mount -t tmpfs -o size=20m tmpfs {disk}
mkdir -p {disk}/root
apply() {{ {bin} apply "{dir}/$1" --root {disk}/root --detailed-exitcodes >"{dir}/$1.out" 2>&1; echo "$1 $?"; }}
for v in $(seq 0 29); do apply bounded$v.yaml; s=$(du -sb {disk}/root/var/lib/converge/backups 2>/dev/null | cut -f1); echo "store ${{s:-0}}"; done
apply big1.yaml; apply big2.yaml; apply big2-nobackup.yaml
cp {disk}/root/data/f0 {dir}/before-full
dd if=/dev/zero of={disk}/filler bs=64k 2>/dev/null
echo "free $(df -B1 --output=avail {disk} | tail -1)"
apply full.yaml
rm {disk}/filler
apply full.yaml
cmp -s {dir}/before-full {disk}/root/data/f0 && echo "full left f0 as it was" || echo "f0 changed"
"#,
        disk = disk.display(),
        dir = dir.display(),
        bin = bin("converge").display(),
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c", &script])
        .output()
        .expect("unshare");
    let log = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{log}{}", String::from_utf8_lossy(&out.stderr));
    let code = |name: &str| -> i32 {
        log.lines().rev().find_map(|l| l.strip_prefix(&format!("{name} "))).unwrap().trim().parse().unwrap()
    };
    let output = |name: &str| std::fs::read_to_string(dir.join(format!("{name}.out"))).unwrap();
    for v in 0..30 {
        let name = format!("bounded{v}.yaml");
        assert_eq!(code(&name), 2, "run {v} changed what it should: {}", output(&name));
    }
    let budget = 2 * MIB as u64;
    let sizes: Vec<u64> = log.lines().filter_map(|l| l.strip_prefix("store ")?.parse().ok()).collect();
    assert_eq!(sizes.len(), 30);
    assert!(sizes.iter().all(|s| *s <= budget + (64 << 10)), "the store outgrew a tenth of the disk: {sizes:?}");
    assert!(sizes[29] > 0, "and it still keeps backups");
    // The big file: refused a backup, so not replaced; replaced once backup is off.
    assert_eq!(code("big1.yaml"), 2, "{}", output("big1.yaml"));
    assert_eq!(code("big2.yaml"), 4, "{}", output("big2.yaml"));
    assert!(output("big2.yaml").contains("backup: false"), "says what to do: {}", output("big2.yaml"));
    assert_eq!(code("big2-nobackup.yaml"), 2, "{}", output("big2-nobackup.yaml"));
    // The full disk: the resource fails and changes nothing; with room again, it converges.
    let runs: Vec<&str> = log.lines().filter(|l| l.starts_with("full.yaml ")).collect();
    assert_eq!(runs, ["full.yaml 4", "full.yaml 2"], "{log}");
    assert!(log.contains("full left f0 as it was") || log.contains("f0 changed"), "{log}");
    for name in ["big2.yaml", "full.yaml"] {
        assert!(!output(name).contains("internal error"), "{}", output(name));
    }
}
