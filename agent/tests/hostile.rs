//! The agent against hostile input and its own damaged state, with the real binary in scratch
//! roots: unsigned catalogs on a host that trusts keys, two runs at once, devices and huge
//! files, hostile timestamps, and every kind of damage to the trust state. Nothing may panic,
//! nothing may roll the trust state back, and every refusal says what and where in one line.

mod common;
use common::*;
use converge_modules::catalog::{Catalog, FileSpec, Kind, Meta, Resource, ResourceId, Spec};
use converge_modules::time::Timestamp;
use converge_modules::trust::{self, CATALOG_TYPE, KEYS_TYPE, KeyList, KeyRole, TrustedKey};

const ROOT_SEED: u8 = 1;
const CATALOG_SEED: u8 = 2;
const APPLIED: &str = "/var/lib/converge/applied.json";

fn key_list(version: u64) -> String {
    let root = trust::key_from_seed(&[ROOT_SEED; 32]);
    let catalog = trust::key_from_seed(&[CATALOG_SEED; 32]);
    let list = KeyList {
        version,
        keys: vec![
            TrustedKey::new(&root.verifying_key(), KeyRole::Root),
            TrustedKey::new(&catalog.verifying_key(), KeyRole::Catalog),
        ],
    };
    serde_json::to_string(&trust::sign(KEYS_TYPE, &serde_json::to_vec(&list).unwrap(), &root)).unwrap()
}

/// A scratch root for node `web01` that trusts the test keys.
fn keyed() -> Scratch {
    let s = Scratch::new();
    s.write("/etc/hostname", "web01\n");
    s.write("/etc/converge/trusted-keys.json", &key_list(1));
    s
}

fn catalog(serial: u64, content: &str, issued: i64) -> Catalog {
    let r = Resource::new(
        ResourceId::new(Kind::File, "/hello").unwrap(),
        Meta::default(),
        Spec::File(FileSpec { content: Some(content.into()), ..Default::default() }),
    );
    Catalog {
        host: Some("web01".into()),
        serial: Some(serial),
        issued_at: Some(Timestamp(issued)),
        expires_at: Some(Timestamp(issued + 86_400)),
        ..Catalog::new(vec![r])
    }
}

fn envelope(serial: u64, content: &str) -> String {
    sign(&catalog(serial, content, Timestamp::now().0 - 60))
}

fn sign(c: &Catalog) -> String {
    let key = trust::key_from_seed(&[CATALOG_SEED; 32]);
    serde_json::to_string(&trust::sign(CATALOG_TYPE, &serde_json::to_vec(c).unwrap(), &key)).unwrap()
}

fn applied_serial(s: &Scratch) -> Option<u64> {
    let text = std::fs::read_to_string(s.at(APPLIED)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["applied"]["serial"].as_u64()
}

/// No panic, whatever happened.
fn sane(out: &Out) {
    assert!(!out.stderr.contains("internal error"), "a panic: {}", out.stderr);
    assert!(out.code == 0 || out.code == 1 || out.code == 2 || out.code == 4 || out.code == 6, "exit {}", out.code);
}

const PLAIN: &str = "format: 1\nresources:\n  - file: /plain\n    content: \"x\\n\"\n";

#[test]
fn a_host_that_trusts_keys_refuses_unsigned_catalogs_unless_told() {
    let s = keyed();
    let plain = s.catalog("plain.yaml", PLAIN);
    let out = s.apply(&plain, &[]);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("it is not signed, and this host trusts the keys in"), "{}", out.stderr);
    assert!(out.stderr.contains("--unsigned"), "says what to do: {}", out.stderr);
    assert!(!s.at("/plain").exists() && !s.at("/var/lib/converge/applied.json").exists());
    // The same file as JSON, which once slipped through when its text did not look signed.
    let json = s.catalog("plain.json", r#"{"format":1,"resources":[{"file":"/plain","content":"x\n"}]}"#);
    assert_eq!(s.apply(&json, &[]).code, 1);
    // The operator's explicit word.
    let out = s.apply(&plain, &["--unsigned"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_eq!(s.read("/plain"), "x\n");
    // --trusted-keys on a root without a key list also demands a signature.
    let bare = Scratch::new();
    let keys = s.at("/etc/converge/trusted-keys.json").display().to_string();
    let plain = bare.catalog("plain.yaml", PLAIN);
    assert_eq!(bare.apply(&plain, &["--trusted-keys", &keys]).code, 1);
    // --unsigned on an envelope is a mistake, not a way around its signature.
    let env = s.catalog("c.env", &envelope(10, "hi\n"));
    let out = s.apply(&env, &["--unsigned"]);
    assert!(out.code == 1 && out.stderr.contains("is a signed envelope"), "{}", out.stderr);
}

#[test]
fn a_plain_catalog_for_another_host_is_refused() {
    let s = Scratch::new();
    s.write("/etc/hostname", "web01\n");
    let other = s.catalog("other.yaml", &format!("format: 1\nhost: db01\n{}", &PLAIN["format: 1\n".len()..]));
    let out = s.apply(&other, &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("for host db01, and this is web01"), "{}", out.stderr);
    assert!(!s.at("/plain").exists());
    let mine = s.catalog("mine.yaml", &format!("format: 1\nhost: web01\n{}", &PLAIN["format: 1\n".len()..]));
    assert_eq!(s.apply(&mine, &[]).code, 2);
}

#[test]
fn two_runs_at_once_never_roll_the_trust_state_back() {
    // The interleaving that rolled the serial back: a large catalog (slow to verify) with the
    // lower serial starts first, a small one with the higher serial a moment later, and the
    // small one finishes before the large one takes the lock.
    let s = keyed();
    let big = "x".repeat(8 << 20);
    let first = s.catalog("first.env", &envelope(100, "100\n"));
    assert_eq!(s.apply(&first, &[]).code, 2);
    let root = s.root_str();
    let spawn = |path: &str| {
        std::process::Command::new(BIN)
            .args(["apply", path, "--root", &root])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut newest = 100;
    for round in 0..10u64 {
        let (low, high) = (100 + round * 10 + 1, 100 + round * 10 + 2);
        let slow = s.catalog(&format!("{low}.env"), &envelope(low, &big));
        let fast = s.catalog(&format!("{high}.env"), &envelope(high, &format!("{high}\n")));
        let a = spawn(&slow);
        std::thread::sleep(std::time::Duration::from_millis(5 * round));
        let b = spawn(&fast);
        let mut accepted = Vec::new();
        for (child, serial) in [(a, low), (b, high)] {
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!err.contains("internal error"), "{err}");
            if out.status.success() {
                accepted.push(serial);
            } else {
                assert!(
                    err.contains("another converge run holds the lock")
                        || err.contains("is older than the last applied"),
                    "a loser says why: {err}"
                );
            }
        }
        let now = applied_serial(&s).unwrap();
        assert!(now >= newest, "round {round}: the applied serial went back from {newest} to {now} ({accepted:?})");
        if let Some(max) = accepted.iter().max() {
            assert_eq!(now, *max, "round {round}: the newest accepted serial is the one recorded ({accepted:?})");
        }
        newest = now;
    }
}

#[test]
fn devices_and_huge_files_are_refused_without_being_read() {
    let s = keyed();
    let keys = s.at("/etc/converge/trusted-keys.json").display().to_string();
    let out = converge(&["verify", "--trusted-keys", &keys, "/dev/zero"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("not a regular file"), "{}", out.stderr);
    let out = s.apply("/dev/zero", &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("not a regular file"), "{}", out.stderr);
    // A sparse file past the envelope limit: refused by its size.
    let big = s.dir.path().join("big.env");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(trust::MAX_ENVELOPE as u64 + 1).unwrap();
    let out = converge(&["verify", "--trusted-keys", &keys, &big.display().to_string()]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("more than the"), "{}", out.stderr);
    assert!(out.stderr.len() < 400, "one short line: {}", out.stderr);
}

#[test]
fn a_fifo_is_refused_not_waited_on() {
    let s = keyed();
    let fifo = s.dir.path().join("catalog.yaml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let keys = s.at("/etc/converge/trusted-keys.json").display().to_string();
    let f = fifo.display().to_string();
    let root = s.root_str();
    for args in [vec!["apply", f.as_str(), "--root", root.as_str()], vec!["verify", "--trusted-keys", &keys, &f]] {
        let mut child = std::process::Command::new(BIN)
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{args:?} waits on a fifo");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("not a regular file"), "{args:?}: {err}");
    }
}

#[test]
fn a_refusal_is_one_short_line_whatever_the_envelope_holds() {
    let s = keyed();
    let hostile = format!(
        "{{\"payload_type\":\"{}\",\"payload\":\"\",\"signatures\":[{{\"keyid\":\"{}\",\"sig\":\"\"}}]}}",
        "\\n[ERROR] forged line\\u001b[2J".repeat(20_000),
        "k".repeat(100_000)
    );
    let env = s.catalog("hostile.env", &hostile);
    let out = s.apply(&env, &[]);
    assert_eq!(out.code, 1);
    assert_eq!(out.stderr.trim_end().lines().count(), 1, "{:.300}", out.stderr);
    assert!(out.stderr.len() < 600 && !out.stderr.contains('\x1b'), "{:.300}", out.stderr);
}

#[test]
fn hostile_timestamps_are_errors_never_panics() {
    let s = Scratch::new();
    let bad = s.catalog("t.yaml", "format: 1\nissued_at: \"2026-11-3é03:50:07Z\"\nresources: []\n");
    let out = s.apply(&bad, &[]);
    sane(&out);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("t.yaml:2:"), "placed: {}", out.stderr);
    // The same inside a signed payload.
    let s = keyed();
    let good = serde_json::to_string(&catalog(10, "x", Timestamp::now().0)).unwrap();
    let issued = Timestamp::now().to_string();
    let payload = good.replace(&issued, "2026-11-3é03:50:07Z");
    assert_ne!(payload, good);
    let key = trust::key_from_seed(&[CATALOG_SEED; 32]);
    let env = serde_json::to_string(&trust::sign(CATALOG_TYPE, payload.as_bytes(), &key)).unwrap();
    let out = s.apply(&s.catalog("t.env", &env), &[]);
    sane(&out);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("not a time like"), "{}", out.stderr);
}

#[test]
fn a_catalog_signed_far_ahead_does_not_freeze_the_host() {
    let s = keyed();
    let year = 365 * 86_400;
    let ahead = s.catalog("ahead.env", &sign(&catalog(10, "ahead\n", Timestamp::now().0 + year)));
    let out = s.apply(&ahead, &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stdout.contains("behind this catalog"), "reported: {}", out.stdout);
    let next = s.catalog("next.env", &envelope(11, "now\n"));
    let out = s.apply(&next, &[]);
    assert_eq!(out.code, 2, "the next catalog, issued at the real time, is fresh: {}", out.stderr);
}

/// A root that has applied serial 10, and its applied.json.
fn applied_ten() -> (Scratch, String) {
    let s = keyed();
    let first = s.catalog("ten.env", &envelope(10, "ten\n"));
    assert_eq!(s.apply(&first, &[]).code, 2);
    let text = s.read(APPLIED);
    (s, text)
}

#[test]
fn a_record_that_lowers_the_serial_is_repaired_from_its_own_signature() {
    let (s, text) = applied_ten();
    s.write(APPLIED, &text.replacen("\"serial\": 10", "\"serial\": 5", 1));
    let older = s.catalog("nine.env", &envelope(9, "nine\n"));
    let out = s.apply(&older, &[]);
    assert_eq!(out.code, 1, "an older catalog stays out: {}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("serial 9 is older than the last applied (10)"), "{}", out.stderr);
    assert!(s.at("/var/lib/converge/applied.json.damaged").exists(), "set aside for a look");
    assert_eq!(applied_serial(&s), Some(10), "rebuilt from the envelope it kept");
    assert_eq!(s.read("/hello"), "ten\n");
    // And it says so when a run goes on.
    let newer = s.catalog("eleven.env", &envelope(11, "eleven\n"));
    s.write(APPLIED, &s.read(APPLIED).replacen("\"serial\": 10", "\"serial\": 3", 1));
    let out = s.apply(&newer, &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stdout.contains("was damaged") && out.stdout.contains("rebuilt from its own signed envelope"),
        "{}",
        out.stdout
    );
}

#[test]
fn a_damaged_clock_floor_cannot_freeze_the_host() {
    let (s, text) = applied_ten();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let floor = v["applied"]["time_floor"].as_str().unwrap().to_string();
    s.write(APPLIED, &text.replace(&floor, "9999-12-31T23:59:59Z"));
    let next = s.catalog("eleven.env", &envelope(11, "eleven\n"));
    let out = s.apply(&next, &[]);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
}

#[test]
fn every_kind_of_damage_to_the_record_is_caught_and_never_lets_an_older_catalog_in() {
    type Damage = fn(&Scratch, &str);
    let damages: [(&str, Damage); 6] = [
        ("truncated", |s, t| s.write(APPLIED, &t[..t.len() / 2])),
        ("zeroed", |s, t| std::fs::write(s.at(APPLIED), vec![0u8; t.len()]).unwrap()),
        ("empty", |s, _| s.write(APPLIED, "")),
        ("a bit flipped in its envelope", |s, t| {
            let i = t.find("\"payload\": \"").unwrap() + 40;
            let mut b = t.as_bytes().to_vec();
            b[i] ^= 0x01;
            std::fs::write(s.at(APPLIED), b).unwrap();
        }),
        ("a symlink", |s, _| {
            std::fs::remove_file(s.at(APPLIED)).unwrap();
            std::os::unix::fs::symlink("/etc/hostname", s.at(APPLIED)).unwrap();
        }),
        ("not UTF-8", |s, t| {
            let mut b = t.as_bytes().to_vec();
            b[5] = 0xff;
            std::fs::write(s.at(APPLIED), b).unwrap();
        }),
    ];
    for (what, damage) in damages {
        let (s, text) = applied_ten();
        damage(&s, &text);
        let older = s.catalog("nine.env", &envelope(9, "nine\n"));
        let out = s.apply(&older, &[]);
        sane(&out);
        // Nothing stands in for the record (apply keeps no cache): the run stops and says so.
        assert_eq!(out.code, 1, "{what}: {}{}", out.stdout, out.stderr);
        assert!(
            out.stderr.contains("applied.json was damaged") && out.stderr.contains("set aside"),
            "{what}: {}",
            out.stderr
        );
        assert!(out.stderr.contains("starts afresh"), "{what}: says what happens next: {}", out.stderr);
        assert_eq!(out.stderr.trim_end().lines().count(), 1, "{what}: one line: {}", out.stderr);
        assert_eq!(s.read("/hello"), "ten\n", "{what}: nothing changed");
        assert!(s.at("/var/lib/converge/applied.json.damaged").exists(), "{what}");
    }
}

#[test]
fn a_damaged_key_list_is_named_and_nothing_is_applied() {
    for (what, text) in [("truncated", &key_list(1)[..40]), ("garbage", "\0\0\0")] {
        let s = keyed();
        s.write("/etc/converge/trusted-keys.json", text);
        let env = s.catalog("c.env", &envelope(10, "hi\n"));
        let out = s.apply(&env, &[]);
        sane(&out);
        assert_eq!(out.code, 1, "{what}");
        assert!(out.stderr.contains("trusted-keys.json") && out.stderr.contains("damaged"), "{what}: {}", out.stderr);
        assert!(!s.at("/hello").exists());
    }
    let s = keyed();
    std::fs::remove_file(s.at("/etc/converge/trusted-keys.json")).unwrap();
    std::fs::write(s.dir.path().join("elsewhere.json"), key_list(1)).unwrap();
    std::os::unix::fs::symlink(s.dir.path().join("elsewhere.json"), s.at("/etc/converge/trusted-keys.json")).unwrap();
    let out = s.apply(&s.catalog("c.env", &envelope(10, "hi\n")), &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("symbolic link"), "{}", out.stderr);
}

#[test]
fn a_damaged_upgrade_record_is_reported_and_removed_never_followed() {
    const RECORD: &str = "/var/lib/converge/upgrade.json";
    let s = Scratch::new();
    let plain = s.catalog("plain.yaml", PLAIN);
    // Garbage, non-UTF-8, huge: one note, the record gone, the run goes on.
    for bad in [b"{\"version\":".to_vec(), vec![0xff, 0xfe, 0x00], vec![b' '; 2 << 20]] {
        std::fs::create_dir_all(s.at("/var/lib/converge")).unwrap();
        std::fs::write(s.at(RECORD), &bad).unwrap();
        let out = s.apply(&plain, &[]);
        sane(&out);
        assert!(out.stdout.contains("the record of the last agent upgrade was damaged: removed"), "{}", out.stdout);
        assert!(!s.at(RECORD).exists());
    }
    // A symlink to a file elsewhere: never read through, never its target removed.
    s.write(
        "/etc/precious",
        r#"{"version":"9","started":"2026-12-02T08:00:00Z","finished":"2026-12-02T08:01:00Z","ok":true}"#,
    );
    let outside = s.at("/etc/precious");
    std::os::unix::fs::symlink(&outside, s.at(RECORD)).unwrap();
    let out = s.apply(&plain, &[]);
    sane(&out);
    assert!(!out.stdout.contains("upgraded to 9"), "{}", out.stdout);
    assert!(outside.exists() && std::fs::symlink_metadata(s.at(RECORD)).is_err());
    // A good record is said once.
    std::fs::write(
        s.at(RECORD),
        r#"{"version":"1.1.0","started":"2026-12-02T08:00:00Z","finished":"2026-12-02T08:01:00Z","ok":true}"#,
    )
    .unwrap();
    assert!(s.apply(&plain, &[]).stdout.contains("the agent was upgraded to 1.1.0"));
    assert!(!s.apply(&plain, &[]).stdout.contains("upgraded"));
}
