//! `service`: systemd units ([`systemd`]).
//!
//! One query answers every service of a run. Enabling comes before starting. A notify restarts
//! (or reloads, where the catalog asks and the unit can) a running service once, after it
//! converged; a service this run started, or one that is stopped, is left as it is. In an
//! image (`--root`), only `enabled` is managed: nothing runs there.

use super::{Checked, Op, System, fail};
use crate::catalog::{Refresh, Resource, ServiceEnsure, ServiceSpec};
use crate::providers::ProviderError;
use crate::report::Change;

pub mod systemd;

/// A systemd unit as `systemctl show` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Unit {
    /// `LoadState` is not `not-found`.
    pub exists: bool,
    /// `ActiveState`: active, inactive, failed, activating...
    pub active: String,
    /// `UnitFileState`: enabled, disabled, static, masked, indirect...
    pub enabled: String,
    pub can_reload: bool,
    /// The unit file changed on disk since systemd read it.
    pub needs_daemon_reload: bool,
}

/// What to do to a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitAction {
    Start,
    Stop,
    Restart,
    Reload,
}

impl UnitAction {
    pub fn verb(self) -> &'static str {
        match self {
            UnitAction::Start => "start",
            UnitAction::Stop => "stop",
            UnitAction::Restart => "restart",
            UnitAction::Reload => "reload",
        }
    }
}

fn running(u: &Unit) -> bool {
    matches!(u.active.as_str(), "active" | "activating" | "reloading")
}

fn enabled(u: &Unit) -> bool {
    matches!(u.enabled.as_str(), "enabled" | "enabled-runtime" | "alias")
}

/// What makes the unit as declared. Pure.
pub fn diff(name: &str, s: &ServiceSpec, u: &Unit, image: bool) -> Result<(Vec<Change>, Op), ProviderError> {
    if !u.exists {
        return Err(format!("there is no unit {name} on this system (is the package that ships it installed?)").into());
    }
    let mut changes = Vec::new();
    let mut enable = None;
    match (s.enabled, u.enabled.as_str()) {
        (Some(true), "masked" | "masked-runtime") => {
            return Err(
                format!("{name} is masked: unmask it (systemctl unmask {name}) before it can be enabled").into()
            );
        }
        (Some(true), state @ ("static" | "indirect" | "generated" | "transient")) => {
            return Err(
                format!("{name} cannot be enabled: its unit file is {state} (it has no [Install] section)").into()
            );
        }
        (Some(want), _) if want != enabled(u) => {
            changes.push(Change::new("enabled", enabled(u).to_string(), want.to_string()));
            enable = Some(want);
        }
        _ => {}
    }
    let mut action = None;
    if !image {
        match s.ensure {
            Some(ServiceEnsure::Running) if !running(u) => {
                changes.push(Change::new("ensure", u.active.as_str(), "running"));
                action = Some(UnitAction::Start);
            }
            Some(ServiceEnsure::Stopped) if running(u) => {
                changes.push(Change::new("ensure", u.active.as_str(), "stopped"));
                action = Some(UnitAction::Stop);
            }
            _ => {}
        }
    }
    Ok((changes, Op::Unit { enable, action }))
}

/// `nginx` means `nginx.service`.
pub fn unit_name(title: &str) -> String {
    if title.contains('.') { title.to_string() } else { format!("{title}.service") }
}

pub fn check(sys: &System, r: &Resource, s: &ServiceSpec) -> Result<(Checked, Vec<Change>), ProviderError> {
    let name = unit_name(&r.id.title);
    let unit = sys.unit(&r.id.title)?;
    if !unit.exists && sys.dry() {
        // Its package may be installed by this run: say what the run would do.
        let mut changes = Vec::new();
        if let Some(e) = s.enabled {
            changes.push(Change::new("enabled", "absent", e.to_string()));
        }
        if s.ensure.is_some() && !sys.host.is_image() {
            let to = if s.ensure == Some(ServiceEnsure::Running) { "running" } else { "stopped" };
            changes.push(Change::new("ensure", "absent", to));
        }
        return Ok((Checked::default(), changes));
    }
    // A service this run started and that is not running now died after systemd said it
    // started (a simple unit's start returns at once): its journal says why.
    if sys.run.borrow().started.contains(&name) && !running(&unit) && s.ensure == Some(ServiceEnsure::Running) {
        let message = format!("{name} started but did not stay running (it is {} now)", unit.active);
        return Err(with_journal(sys, &name, message.into()));
    }
    let (changes, op) = diff(&name, s, &unit, sys.host.is_image())?;
    Ok((Checked { op, ..Checked::default() }, changes))
}

pub fn apply(sys: &System, r: &Resource, state: &Checked) -> Result<Option<String>, ProviderError> {
    let Op::Unit { enable, action } = &state.op else { return Ok(None) };
    let name = unit_name(&r.id.title);
    let result = (|| {
        if let Some(e) = enable {
            systemd::set_enabled(sys.host, &name, *e).map_err(fail)?;
        }
        if let Some(a) = action {
            systemd::action(sys.host, &name, *a).map_err(|e| with_journal(sys, &name, fail(e)))?;
            if *a == UnitAction::Start {
                sys.run.borrow_mut().started.insert(name.clone());
                // A service can start and die at once: say so with its journal.
                sys.forget_units();
                let now = sys.unit(&r.id.title)?;
                if !running(&now) {
                    let message = format!("{name} started but did not stay running (it is {} now)", now.active);
                    return Err(with_journal(sys, &name, message.into()));
                }
            }
        }
        Ok(None)
    })();
    sys.forget_units();
    result
}

/// A failure with the end of the unit's journal, which says why.
fn with_journal(sys: &System, name: &str, error: ProviderError) -> ProviderError {
    let journal = systemd::journal(sys.host, name);
    if journal.trim().is_empty() { error } else { ProviderError::Logged { source: Box::new(error), log: journal } }
}

/// A notify: restart or reload once, unless stopped or started by this very run.
pub fn refresh(sys: &System, r: &Resource, s: &ServiceSpec, dry_run: bool) -> Result<Option<String>, ProviderError> {
    let name = unit_name(&r.id.title);
    let how = s.refresh.unwrap_or(Refresh::Restart);
    if how == Refresh::None || sys.host.is_image() || sys.run.borrow().started.contains(&name) {
        return Ok(None);
    }
    let unit = sys.unit(&r.id.title)?;
    if !running(&unit) {
        return Ok(None);
    }
    let action = match how {
        Refresh::Reload if unit.can_reload => UnitAction::Reload,
        Refresh::ReloadOrRestart if unit.can_reload => UnitAction::Reload,
        _ => UnitAction::Restart,
    };
    let done = if action == UnitAction::Reload { "reloaded" } else { "restarted" };
    if dry_run {
        return Ok(Some(format!("would be {done}")));
    }
    let result = systemd::action(sys.host, &name, action).map_err(|e| with_journal(sys, &name, fail(e)));
    sys.forget_units();
    result?;
    sys.run.borrow_mut().started.insert(name);
    Ok(Some(done.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::memory::MemHost;
    use crate::providers::converge_yaml;
    use crate::report::Status;

    fn unit(active: &str, enabled: &str) -> Unit {
        Unit {
            exists: true,
            active: active.into(),
            enabled: enabled.into(),
            can_reload: true,
            needs_daemon_reload: false,
        }
    }

    fn spec(ensure: Option<ServiceEnsure>, enabled: Option<bool>) -> ServiceSpec {
        ServiceSpec { ensure, enabled, refresh: None }
    }

    #[test]
    fn pure_diff() {
        let (c, op) =
            diff("a.service", &spec(Some(ServiceEnsure::Running), Some(true)), &unit("inactive", "disabled"), false)
                .unwrap();
        assert_eq!(c, vec![Change::new("enabled", "false", "true"), Change::new("ensure", "inactive", "running")]);
        assert_eq!(op, Op::Unit { enable: Some(true), action: Some(UnitAction::Start) });
        let (c, _) =
            diff("a.service", &spec(Some(ServiceEnsure::Running), Some(true)), &unit("inactive", "disabled"), true)
                .unwrap();
        assert_eq!(c, vec![Change::new("enabled", "false", "true")], "an image only gets enabled");
        let (c, _) =
            diff("a.service", &spec(Some(ServiceEnsure::Stopped), Some(false)), &unit("active", "enabled"), false)
                .unwrap();
        assert_eq!(c, vec![Change::new("enabled", "true", "false"), Change::new("ensure", "active", "stopped")]);
        let e = diff("a.service", &spec(None, Some(true)), &unit("active", "static"), false).unwrap_err().to_string();
        assert!(e.contains("its unit file is static"), "{e}");
        let e = diff("a.service", &spec(None, Some(true)), &unit("active", "masked"), false).unwrap_err().to_string();
        assert!(e.contains("unmask"), "{e}");
        let e = diff("a.service", &spec(None, None), &Unit::default(), false).unwrap_err().to_string();
        assert!(e.contains("there is no unit a.service"), "{e}");
    }

    #[test]
    fn one_query_for_all_services_and_a_notify_restarts_once() {
        let host = MemHost::new()
            .with_dir("/etc", 0o755)
            .with_unit("web", true, "enabled")
            .with_unit("db", true, "enabled")
            .with_unit("cache", false, "disabled");
        let yaml = "  - file: /etc/web.conf\n    content: v1\n    notify: [service:web]\n  - file: /etc/web2.conf\n    content: v1\n    notify: [service:web]\n  - service: web\n    ensure: running\n  - service: db\n    ensure: running\n    enabled: true\n  - service: cache\n    ensure: running\n    enabled: true\n    notify: [exec:never]\n  - exec: never\n    command: [/bin/true]\n    refreshonly: true\n";
        let events = converge_yaml(&host, yaml, false);
        let by = |id: &str| events.iter().find(|e| e.id == id).unwrap().clone();
        assert_eq!(by("service:web").status, Status::Unchanged);
        assert_eq!(by("service:web").refresh.as_deref(), Some("restarted (notified by file:/etc/web.conf)"));
        assert_eq!(host.starts("web"), (1, 0), "two notifiers, one restart");
        assert_eq!(by("service:cache").status, Status::Changed);
        assert_eq!(host.unit("cache").unwrap().enabled, "enabled");
        // A no-op: one query, nothing else.
        let before = host.processes().len();
        let again = converge_yaml(&host, yaml, false);
        assert!(again.iter().all(|e| e.status == Status::Unchanged && e.refresh.is_none()), "{again:?}");
        assert_eq!(
            host.processes()[before..],
            ["systemctl show --property=Id,LoadState,ActiveState,UnitFileState,CanReload,NeedDaemonReload \
              -- web.service db.service cache.service"
                .to_string()]
        );
    }

    #[test]
    fn a_service_this_run_started_is_not_restarted_and_reload_is_used_when_asked() {
        let host =
            MemHost::new().with_dir("/etc", 0o755).with_unit("web", false, "enabled").with_unit("api", true, "enabled");
        let yaml = "  - file: /etc/a.conf\n    content: v1\n    notify: [service:web, service:api]\n  - service: web\n    ensure: running\n  - service: api\n    ensure: running\n    refresh: reload\n";
        let events = converge_yaml(&host, yaml, false);
        let by = |id: &str| events.iter().find(|e| e.id == id).unwrap().clone();
        assert_eq!(by("service:web").status, Status::Changed);
        assert_eq!(by("service:web").refresh, None, "started by this run: nothing more");
        assert_eq!(host.starts("web"), (1, 0));
        assert_eq!(by("service:api").refresh.as_deref(), Some("reloaded (notified by file:/etc/a.conf)"));
        assert_eq!(host.starts("api"), (0, 1));
    }

    #[test]
    fn a_changed_unit_file_reloads_systemd_before_any_service_acts() {
        let host = MemHost::new().with_dir("/etc/systemd/system", 0o755).with_unit("app", false, "disabled");
        let yaml = "  - file: /etc/systemd/system/app.service\n    content: \"[Service]\\nExecStart=/bin/app\\n\"\n    notify: [service:app]\n  - service: app\n    ensure: running\n    enabled: true\n";
        let events = converge_yaml(&host, yaml, false);
        assert!(events.iter().all(|e| e.status == Status::Changed), "{events:?}");
        let p = host.processes();
        let reload = p.iter().position(|x| x == "systemctl daemon-reload").expect("a daemon-reload");
        let enable = p.iter().position(|x| x == "systemctl enable -- app.service").unwrap();
        assert!(reload < enable, "{p:?}");
        assert_eq!(p.iter().filter(|x| *x == "systemctl daemon-reload").count(), 1);
    }

    #[test]
    fn a_dry_run_changes_nothing_and_predicts_a_refresh() {
        let host =
            MemHost::new().with_dir("/etc", 0o755).with_unit("web", true, "enabled").with_unit("db", false, "disabled");
        let yaml = "  - file: /etc/web.conf\n    content: v2\n    notify: [service:web]\n  - service: web\n    ensure: running\n  - service: db\n    ensure: running\n    enabled: true\n  - service: notyet\n    ensure: running\n";
        let events = converge_yaml(&host, yaml, true);
        let by = |id: &str| events.iter().find(|e| e.id == id).unwrap().clone();
        assert_eq!(by("service:web").refresh.as_deref(), Some("would be restarted (notified by file:/etc/web.conf)"));
        assert_eq!(by("service:db").status, Status::WouldChange);
        assert_eq!(by("service:notyet").status, Status::WouldChange, "its package may come in the same run");
        assert_eq!(host.mutations(), 0);
        assert_eq!(host.starts("web"), (0, 0));
    }
}
