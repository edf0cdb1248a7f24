//! Honest runs, on a memory host whose package install scripts do what Debian's do: a first run
//! converges, a dry-run predicts the run exactly, and a change the plan did not foresee is said.

use super::converge_yaml;
use crate::host::memory::{MemHost, MemNode};
use crate::report::{ResourceEvent, Status};
use std::collections::BTreeSet;

/// The ids with `status`.
fn with(events: &[ResourceEvent], status: Status) -> BTreeSet<String> {
    events.iter().filter(|e| e.status == status).map(|e| e.id.clone()).collect()
}

/// Dry-runs `yaml` on one fresh host and runs it on another: the dry-run must predict the run
/// (what would change is what changed, nothing fails in either), and the run must plan every
/// change it makes. Returns the run's events.
fn predicted_exactly(fresh: impl Fn() -> MemHost, yaml: &str) -> Vec<ResourceEvent> {
    let dry = converge_yaml(&fresh(), yaml, true);
    let host = fresh();
    let real = converge_yaml(&host, yaml, false);
    let show = |events: &[ResourceEvent]| format!("{events:#?}");
    assert_eq!(with(&dry, Status::Failed), BTreeSet::new(), "the dry-run failed: {}", show(&dry));
    assert_eq!(with(&real, Status::Failed), BTreeSet::new(), "the run failed: {}", show(&real));
    assert_eq!(with(&real, Status::Unplanned), BTreeSet::new(), "unplanned: {}", show(&real));
    assert_eq!(
        with(&dry, Status::WouldChange),
        with(&real, Status::Changed),
        "dry {} real {}",
        show(&dry),
        show(&real)
    );
    let again = converge_yaml(&host, yaml, false);
    assert!(again.iter().all(|e| e.status == Status::Unchanged), "a second run changes nothing: {}", show(&again));
    real
}

const CACHE_ROLE: &str = "
  - package: cache-server
  - group: cache
    system: true
    requires: [package:cache-server]
  - user: cache
    system: true
    gid: cache
    home: /var/lib/cache
    shell: /usr/sbin/nologin
    requires: [group:cache]
  - directory: /var/lib/cache/data
    owner: cache
    group: cache
    mode: '0750'
    requires: [user:cache]
  - directory: /etc/cache
  - file: /etc/cache/cache.conf
    content: \"port 6379\\n\"
    notify: [service:cache-server]
  - service: cache-server
    ensure: running
    enabled: true
    requires: [package:cache-server]
";

/// A Debian host where installing `cache-server` makes its user and group (`adduser
/// --system`), its home and its unit.
fn debian_with_cache_package() -> MemHost {
    MemHost::new()
        .with_dir("/etc", 0o755)
        .with_dir("/var/lib", 0o755)
        .with_available("cache-server", &["7.0-1"])
        .with_install_script("cache-server", |h| {
            h.add_account("cache", 110, "/var/lib/cache");
            h.put("/var/lib/cache", MemNode::Directory { mode: 0o750, uid: 110, gid: 110 });
            h.add_unit("cache-server", true, "enabled");
        })
}

#[test]
fn a_package_that_makes_its_account_does_not_fail_the_first_run() {
    let real = predicted_exactly(debian_with_cache_package, CACHE_ROLE);
    let user = real.iter().find(|e| e.id == "user:cache").unwrap();
    assert_eq!(user.status, Status::Changed);
    assert_eq!(user.message.as_deref(), Some("made so by an earlier change of this run"), "{user:?}");
}

#[test]
fn a_dry_run_plans_with_the_accounts_and_homes_the_run_makes() {
    let yaml = "
  - group: deploy
  - user: alice
    gid: deploy
    requires: [group:deploy]
  - directory: /srv/app
    owner: alice
    group: deploy
    requires: [user:alice]
  - file: /home/alice/.profile
    content: \"umask 027\\n\"
    owner: alice
    requires: [user:alice]
  - exec: /srv/app/setup
    command: [/usr/bin/setup]
    creates: /srv/app
";
    let fresh = || MemHost::new().with_dir("/home", 0o755).with_dir("/srv", 0o755);
    let real = predicted_exactly(fresh, yaml);
    assert_eq!(real.len(), 5);
    assert_eq!(with(&real, Status::Unchanged), BTreeSet::from(["exec:/srv/app/setup".to_string()]), "its guard holds");
}

#[test]
fn a_change_the_plan_did_not_foresee_is_reported_unplanned() {
    // The package's install overwrites a file the catalog manages, which was in sync.
    let host = MemHost::new()
        .with_file("/etc/app.conf", "mine\n", 0o644)
        .with_available("app", &["1.0"])
        .with_install_script("app", |h| {
            h.put("/etc/app.conf", MemNode::File { content: b"theirs\n".to_vec(), mode: 0o644, uid: 0, gid: 0 })
        });
    let yaml = "
  - package: app
  - file: /etc/app.conf
    content: \"mine\\n\"
    requires: [package:app]
";
    let events = converge_yaml(&host, yaml, false);
    let file = events.iter().find(|e| e.id == "file:/etc/app.conf").unwrap();
    assert_eq!(file.status, Status::Unplanned, "{events:#?}");
    assert!(file.message.as_deref().unwrap().contains("its plan found it unchanged"), "{file:?}");
    assert_eq!(host.content("/etc/app.conf").as_deref(), Some("mine\n"), "the change was still made");
}

#[test]
fn a_file_a_package_ships_and_the_catalog_removes_is_predicted_and_removed() {
    let yaml = "
  - package: web
  - file: /etc/web/sites-enabled/default
    ensure: absent
    requires: [package:web]
";
    let ships = || {
        MemHost::new().with_dir("/etc", 0o755).with_available("web", &["1.0"]).with_install_script("web", |h| {
            h.put(
                "/etc/web/sites-enabled/default",
                MemNode::File { content: b"x".to_vec(), mode: 0o644, uid: 0, gid: 0 },
            )
        })
    };
    let dry = converge_yaml(&ships(), yaml, true);
    assert_eq!(dry[1].message.as_deref(), Some("only if an earlier change of this run makes it"), "{dry:#?}");
    let real = predicted_exactly(ships, yaml);
    assert_eq!(real[1].status, Status::Changed);
    // A package that does not ship it: nothing was removed, and the run does not claim otherwise.
    let bare = MemHost::new().with_dir("/etc", 0o755).with_available("web", &["1.0"]);
    let real = converge_yaml(&bare, yaml, false);
    assert_eq!((real[1].status.clone(), real[1].message.as_deref()), (Status::Unchanged, None), "{real:#?}");
}

#[test]
fn a_command_makes_what_its_creates_guard_names() {
    let yaml = "
  - exec: make-marker
    command: [/usr/bin/make-marker]
    creates: /srv/marker
  - exec: once-marked
    command: [/usr/bin/slow]
    creates: /srv/marker
";
    let fresh = || {
        MemHost::new().with_dir("/srv", 0o755).with_runner(|h, cmd| {
            if cmd.argv[0] == "/usr/bin/make-marker" {
                h.put("/srv/marker", MemNode::File { content: vec![], mode: 0o644, uid: 0, gid: 0 });
            }
            crate::host::Ran { code: Some(0), ..Default::default() }
        })
    };
    let real = predicted_exactly(fresh, yaml);
    assert_eq!(with(&real, Status::Changed), BTreeSet::from(["exec:make-marker".to_string()]));
}
