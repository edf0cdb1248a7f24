//! `timer`: a scheduled command, as a systemd timer and the service it starts.
//!
//! Why timers rather than cron lines: every host converge manages runs systemd already (the
//! `service` kind needs it), and a timer does what a fleet needs of a scheduled job and cron
//! does not: a run never overlaps the one before (a unit that is still running is not
//! started again); `randomized_delay` spreads the same job across thousands of hosts instead
//! of having them all hit one backup server at 03:00; `persistent` catches up a run missed
//! while the host was down; a `timeout` stops a run that hangs; the output goes to the
//! journal (`journalctl -u converge-NAME`) rather than to local mail nobody reads; and
//! `systemctl list-timers` shows when each ran and runs next. Nothing is installed for it.
//! A cron schedule of five fields is read as the calendar event it means ([`calendar`]), so a
//! crontab line moves over as it is.
//!
//! Two unit files, `/etc/systemd/system/converge-NAME.service` and `.timer`, written whole;
//! the timer is enabled and started (in an image: enabled only). The command is an argv,
//! quoted for systemd, its `%` and `$` kept literal.

use super::{Checked, Op, System, fail, fail_create, present};
use crate::catalog::{Resource, TimerSpec};
use crate::host::{NewAttrs, Run};
use crate::providers::ProviderError;
use crate::providers::service::{UnitAction, systemd};
use crate::report::{Change, unified_diff};
use std::time::Duration;

/// The unit files of timer `name`: (service, timer).
pub fn unit_files(name: &str) -> [String; 2] {
    [format!("/etc/systemd/system/converge-{name}.service"), format!("/etc/systemd/system/converge-{name}.timer")]
}

/// The timer unit's name.
pub fn timer_unit(name: &str) -> String {
    format!("converge-{name}.timer")
}

const DOW: [&str; 8] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];

/// One cron field as systemd's: `*`, `*/n`, `a`, `a-b`, `a-b/n`, `a,b`; names for months and
/// weekdays. `(lowest, highest)` bound the values.
fn cron_field(field: &str, what: &str, (lo, hi): (u32, u32), names: &[&str]) -> Result<String, String> {
    let number = |s: &str| -> Result<u32, String> {
        let n = match names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
            Some(i) => i as u32 + lo,
            None => s.parse().map_err(|_| format!("`{s}` is not a {what}"))?,
        };
        if n < lo || n > hi {
            return Err(format!("{what} {n} is outside {lo}-{hi}"));
        }
        Ok(n)
    };
    let mut values: Vec<String> = Vec::new();
    for part in field.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                Some(s.parse::<u32>().ok().filter(|s| *s > 0).ok_or(format!("`{part}`: a step is a number above 0"))?),
            ),
            None => (part, None),
        };
        let (a, b) = match range {
            "*" => (lo, hi),
            r => match r.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None => {
                    let a = number(r)?;
                    (a, if step.is_some() { hi } else { a })
                }
            },
        };
        if a > b {
            return Err(format!("`{part}`: the range runs backwards"));
        }
        match (range, step) {
            ("*", None) => return Ok("*".into()),
            ("*", Some(s)) => values.push(format!("{lo}/{s}")),
            _ if a == b => values.push(a.to_string()),
            (_, None) => values.push(format!("{a}..{b}")),
            (_, Some(s)) => values.extend((a..=b).step_by(s as usize).map(|v| v.to_string())),
        }
    }
    Ok(values.join(","))
}

/// A schedule as a systemd calendar event: one of cron's five fields
/// (`minute hour day-of-month month day-of-week`), a cron shorthand (`@daily`), or a
/// calendar event as it is (`daily`, `Mon..Fri 03:00`, `*:0/15`). Pure.
pub fn calendar(schedule: &str) -> Result<String, String> {
    let s = schedule.trim();
    if s.is_empty() || s.contains(['\n', '\r']) {
        return Err("`schedule` is one line, like `*/15 * * * *` or `Mon..Fri 03:00`".into());
    }
    if let Some(short) = s.strip_prefix('@') {
        return match short {
            "hourly" | "daily" | "weekly" | "monthly" | "yearly" => Ok(short.to_string()),
            "annually" => Ok("yearly".into()),
            "midnight" => Ok("daily".into()),
            "reboot" => Err("`@reboot` is not a schedule: declare a `service` that starts at boot".into()),
            other => Err(format!("`@{other}` is not a cron shorthand (@hourly, @daily, @weekly, @monthly, @yearly)")),
        };
    }
    let fields: Vec<&str> = s.split_whitespace().collect();
    let cron_like =
        fields.len() == 5 && fields.iter().all(|f| f.chars().all(|c| c.is_ascii_alphanumeric() || "*/,-".contains(c)));
    if !cron_like {
        return Ok(s.to_string());
    }
    let minute = cron_field(fields[0], "minute", (0, 59), &[])?;
    let hour = cron_field(fields[1], "hour", (0, 23), &[])?;
    let dom = cron_field(fields[2], "day of the month", (1, 31), &[])?;
    let month = cron_field(fields[3], "month", (1, 12), &MONTHS)?;
    let dow = cron_field(fields[4], "day of the week", (0, 7), &["sun", "mon", "tue", "wed", "thu", "fri", "sat"])?;
    if dom != "*" && dow != "*" {
        return Err(format!(
            "`{s}` restricts both the day of the month and the weekday: cron runs when either matches, a \
             calendar event only when both do; declare two timers, one for each"
        ));
    }
    let weekday = match dow.as_str() {
        "*" => String::new(),
        list => {
            let names: Vec<String> = list
                .split(',')
                .map(|p| match p.split_once("..") {
                    Some((a, b)) => {
                        format!("{}..{}", DOW[a.parse::<usize>().unwrap_or(0)], DOW[b.parse::<usize>().unwrap_or(0)])
                    }
                    None => DOW[p.parse::<usize>().unwrap_or(0)].to_string(),
                })
                .collect();
            format!("{} ", names.join(","))
        }
    };
    Ok(format!("{weekday}*-{month}-{dom} {hour}:{minute}:00"))
}

/// An argv as one `ExecStart=` line: each word double-quoted, systemd's specifiers (`%`) and
/// variables (`$`) kept literal. Pure.
pub fn exec_line(argv: &[String]) -> String {
    argv.iter()
        .map(|w| {
            let escaped = w.replace('\\', "\\\\").replace('"', "\\\"").replace('%', "%%").replace('$', "$$");
            format!("\"{escaped}\"")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The two unit files of a timer, whole. Pure.
pub fn units(name: &str, t: &TimerSpec) -> Result<[String; 2], String> {
    let calendar = calendar(t.schedule.as_deref().unwrap_or_default())?;
    let head = format!("# Managed by converge (timer:{name}); edits are overwritten.\n");
    let description = t.description.clone().unwrap_or_else(|| format!("converge timer {name}"));
    let mut service = format!(
        "{head}[Unit]\nDescription={description}\n\n[Service]\nType=oneshot\nExecStart={}\n",
        exec_line(&t.command)
    );
    if let Some(u) = &t.user {
        service.push_str(&format!("User={u}\n"));
    }
    if let Some(d) = &t.cwd {
        service.push_str(&format!("WorkingDirectory={d}\n"));
    }
    for (k, v) in t.environment.iter().flatten() {
        let pair = format!("{k}={v}").replace('\\', "\\\\").replace('"', "\\\"").replace('%', "%%");
        service.push_str(&format!("Environment=\"{pair}\"\n"));
    }
    match t.timeout {
        Some(s) => service.push_str(&format!("TimeoutStartSec={s}\n")),
        None => service.push_str("TimeoutStartSec=infinity\n"),
    }
    let mut timer = format!("{head}[Unit]\nDescription={description}\n\n[Timer]\nOnCalendar={calendar}\n");
    timer.push_str(&format!("Persistent={}\n", t.persistent != Some(false)));
    if let Some(d) = t.randomized_delay.filter(|d| *d > 0) {
        timer.push_str(&format!("RandomizedDelaySec={d}\n"));
    }
    timer.push_str("\n[Install]\nWantedBy=timers.target\n");
    Ok([service, timer])
}

const MAX_UNIT: u64 = 1 << 20;

pub fn check(sys: &System, r: &Resource, t: &TimerSpec) -> Result<(Checked, Vec<Change>), ProviderError> {
    let name = r.id.title.as_str();
    let files = unit_files(name);
    let mut have: Vec<Option<Vec<u8>>> = Vec::new();
    for f in &files {
        let read = sys.host.read_file(f, MAX_UNIT).map_err(fail)?;
        have.push(read.map(|r| r.content.unwrap_or_default()));
    }
    let unit = sys.unit(&timer_unit(name))?;
    let mut changes = Vec::new();
    if !present(r) {
        if have.iter().any(Option::is_some) {
            changes.push(Change::new("ensure", "present", "absent"));
        }
        return Ok((Checked::default(), changes));
    }
    let want = units(name, t).map_err(ProviderError::Declared)?;
    for ((file, old), new) in files.iter().zip(&have).zip(&want) {
        if old.as_deref() == Some(new.as_bytes()) {
            continue;
        }
        let what = if file.ends_with(".timer") { "timer unit" } else { "service unit" };
        let mut change = Change::new(what, if old.is_some() { "different" } else { "absent" }, "as declared");
        if !r.sensitive() {
            change.diff =
                unified_diff(file, &format!("{file} (catalog)"), old.as_deref().unwrap_or_default(), new.as_bytes());
        }
        changes.push(change);
    }
    let written = !changes.is_empty();
    let fresh = !unit.exists;
    let enabled = matches!(unit.enabled.as_str(), "enabled" | "enabled-runtime");
    let mut enable = None;
    if !enabled {
        changes.push(Change::new("enabled", if fresh { "absent".into() } else { unit.enabled.clone() }, "enabled"));
        enable = Some(true);
    }
    let mut action = None;
    if !sys.host.is_image() {
        let active = matches!(unit.active.as_str(), "active" | "activating" | "reloading");
        if !active {
            changes.push(Change::new("active", if fresh { "absent".into() } else { unit.active.clone() }, "active"));
            action = Some(UnitAction::Start);
        } else if written {
            // A running timer takes a new schedule when restarted.
            action = Some(UnitAction::Restart);
        }
    }
    Ok((Checked { op: Op::Unit { enable, action }, ..Checked::default() }, changes))
}

pub fn apply(sys: &System, r: &Resource, t: &TimerSpec, state: &Checked) -> Result<(), ProviderError> {
    let name = r.id.title.as_str();
    let files = unit_files(name);
    let unit = timer_unit(name);
    if !present(r) {
        if !sys.host.is_image() && sys.unit(&unit)?.exists {
            let a = vec!["systemctl".to_string(), "disable".into(), "--now".into(), "--".into(), unit.clone()];
            crate::providers::tool::check(sys.host, &Run::new(&a, crate::providers::tool::CHANGE)).map_err(fail)?;
        } else if sys.host.is_image() {
            systemd::set_enabled(sys.host, &unit, false).map_err(fail)?;
        }
        for f in files.iter().rev() {
            if sys.host.stat(f).map_err(fail)?.is_some() {
                sys.host.remove(f).map_err(fail)?;
                sys.path_changed(f);
            }
        }
        sys.forget_units();
        return Ok(());
    }
    let want = units(name, t).map_err(ProviderError::Declared)?;
    if !sys.host.is_image() {
        // A schedule systemd would not read is refused before it replaces a working one.
        let calendar = calendar(t.schedule.as_deref().unwrap_or_default()).map_err(ProviderError::Declared)?;
        let a = vec!["systemd-analyze".to_string(), "calendar".into(), "--".into(), calendar.clone()];
        let ran = sys.host.run(&Run::new(&a, Duration::from_secs(30))).map_err(fail)?;
        if !ran.success() {
            return Err(format!("systemd does not read `{calendar}` as a calendar event: {}", ran.tail.trim()).into());
        }
    }
    let attrs = NewAttrs { mode: 0o644, uid: Some(0), gid: Some(0) };
    for (f, content) in files.iter().zip(&want) {
        let same = sys.host.read_file(f, MAX_UNIT).map_err(fail)?.and_then(|r| r.content).as_deref()
            == Some(content.as_bytes());
        if !same {
            sys.host.write_file(f, content.as_bytes(), attrs, None).map_err(fail_create)?;
            sys.path_changed(f);
        }
    }
    // The unit query reloads systemd first when a unit file changed.
    sys.forget_units();
    let now = sys.unit(&unit)?;
    let Op::Unit { enable, action } = &state.op else { return Ok(()) };
    let enabled = matches!(now.enabled.as_str(), "enabled" | "enabled-runtime");
    if enable.is_some() || !enabled {
        systemd::set_enabled(sys.host, &unit, true).map_err(fail)?;
    }
    if !sys.host.is_image() {
        let verb = match action {
            Some(a) => *a,
            None if !matches!(now.active.as_str(), "active") => UnitAction::Start,
            None => return Ok(()),
        };
        systemd::action(sys.host, &unit, verb).map_err(fail)?;
    }
    sys.forget_units();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_schedules_read_as_calendar_events() {
        for (cron, systemd) in [
            ("*/15 * * * *", "*-*-* *:0/15:00"),
            ("0 3 * * *", "*-*-* 3:0:00"),
            ("30 2 * * 1-5", "Mon..Fri *-*-* 2:30:00"),
            ("0 0 1 */3 *", "*-1/3-1 0:0:00"),
            ("0 4 * * 0,6", "Sun,Sat *-*-* 4:0:00"),
            ("0 4 * * 7", "Sun *-*-* 4:0:00"),
            ("5 1-10/3 * jan,jul *", "*-1,7-* 1,4,7,10:5:00"),
            ("@daily", "daily"),
            ("Mon..Fri 03:00", "Mon..Fri 03:00"),
            ("hourly", "hourly"),
        ] {
            assert_eq!(calendar(cron).as_deref(), Ok(systemd), "{cron}");
        }
    }

    #[test]
    fn schedules_that_mean_something_else_are_refused() {
        let e = calendar("0 3 1 * 1").unwrap_err();
        assert!(e.contains("cron runs when either matches"), "{e}");
        assert!(calendar("61 * * * *").unwrap_err().contains("minute 61 is outside 0-59"));
        assert!(calendar("@reboot").unwrap_err().contains("declare a `service`"));
        assert!(calendar("*/0 * * * *").unwrap_err().contains("a step is a number above 0"));
        assert!(calendar("a\nb").is_err());
    }

    #[test]
    fn commands_are_quoted_for_systemd() {
        let argv: Vec<String> = ["/usr/bin/date", "+%F $HOME", "a\"b"].iter().map(|s| s.to_string()).collect();
        assert_eq!(exec_line(&argv), r#""/usr/bin/date" "+%%F $$HOME" "a\"b""#);
    }

    mod on_a_host {
        use crate::host::memory::MemHost;
        use crate::providers::converge_yaml;
        use crate::report::Status;

        const BACKUP: &str = "  - timer: backup\n    command: [/usr/local/bin/backup, --all]\n    schedule: \"0 3 * * *\"\n    randomized_delay: 1800\n";

        fn host() -> MemHost {
            MemHost::new()
                .with_dir("/etc", 0o755)
                .with_dir("/etc/systemd", 0o755)
                .with_dir("/etc/systemd/system", 0o755)
        }

        #[test]
        fn written_enabled_started_then_nothing() {
            let host = host();
            let dry = converge_yaml(&host, BACKUP, true).pop().unwrap();
            assert_eq!(dry.status, Status::WouldChange);
            let attrs: Vec<&str> = dry.changes.iter().map(|c| c.attribute.as_str()).collect();
            assert_eq!(attrs, ["service unit", "timer unit", "enabled", "active"]);
            assert_eq!(host.content("/etc/systemd/system/converge-backup.timer"), None, "a dry-run writes nothing");
            let e = converge_yaml(&host, BACKUP, false).pop().unwrap();
            assert_eq!(e.status, Status::Changed, "{e:?}");
            let timer = host.content("/etc/systemd/system/converge-backup.timer").unwrap();
            assert!(timer.contains("OnCalendar=*-*-* 3:0:00\nPersistent=true\nRandomizedDelaySec=1800\n"), "{timer}");
            let service = host.content("/etc/systemd/system/converge-backup.service").unwrap();
            assert!(service.contains("ExecStart=\"/usr/local/bin/backup\" \"--all\"\n"), "{service}");
            let unit = host.unit("converge-backup.timer").unwrap();
            assert_eq!((unit.active.as_str(), unit.enabled.as_str()), ("active", "enabled"));
            assert_eq!(converge_yaml(&host, BACKUP, false).pop().unwrap().status, Status::Unchanged);
            // A new schedule restarts the running timer.
            let later = BACKUP.replace("0 3 * * *", "0 4 * * *");
            let starts = host.starts("converge-backup.timer").0;
            assert_eq!(converge_yaml(&host, &later, false).pop().unwrap().status, Status::Changed);
            assert_eq!(host.starts("converge-backup.timer").0, starts + 1);
        }

        #[test]
        fn absent_stops_disables_and_removes() {
            let host = host();
            converge_yaml(&host, BACKUP, false);
            let gone = "  - timer: backup\n    ensure: absent\n";
            assert_eq!(converge_yaml(&host, gone, false).pop().unwrap().status, Status::Changed);
            assert_eq!(host.content("/etc/systemd/system/converge-backup.timer"), None);
            assert_eq!(host.content("/etc/systemd/system/converge-backup.service"), None);
            assert_eq!(converge_yaml(&host, gone, false).pop().unwrap().status, Status::Unchanged);
        }
    }
}
