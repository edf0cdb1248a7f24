//! `exec`: a guarded command (an argv, never a shell string), run through the host.
//!
//! Guards decide whether it runs: `creates` (a path that must not exist yet), `onlyif` (a
//! command that must succeed) and `unless` (one that must fail). Guards only read, so they run
//! in a dry-run too; the command itself never does. `refreshonly` commands run only when
//! notified. A command runs at most once a run; the tail of its output goes into the report.
//!
//! A secret goes to the command on standard input (`stdin`), never shown, and neither is the
//! output of a command given one (it may echo it). A sensitive command is shown by its program
//! alone: its arguments, environment and output appear in no output, report or error.

use super::{Checked, Op, System, fail};
use crate::catalog::{ExecSpec, Resource};
use crate::host::{HostError, Ran, Run};
use crate::providers::ProviderError;
use crate::report::Change;
use std::time::Duration;

pub const DEFAULT_TIMEOUT: u64 = 300;

fn timeout(e: &ExecSpec) -> Duration {
    Duration::from_secs(e.timeout.map_or(DEFAULT_TIMEOUT, u64::from))
}

fn env(e: &ExecSpec) -> Vec<(String, String)> {
    e.environment.iter().flatten().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Runs `argv` (the command or a guard) as the resource says; `stdin` for the command only.
fn run(sys: &System, r: &Resource, e: &ExecSpec, argv: &[String], stdin: Option<&str>) -> Result<Ran, ProviderError> {
    let env = env(e);
    let cmd = Run {
        user: e.user.as_deref(),
        cwd: e.cwd.as_deref(),
        env: &env,
        stdin: stdin.map(str::as_bytes),
        ..Run::new(argv, timeout(e))
    };
    sys.host.run(&cmd).map_err(|err| match err {
        // The host names the whole command line when it cannot start it.
        HostError::Command { status, .. } if r.sensitive() => {
            HostError::Command { command: shown(r, argv), status, output: String::new() }.into()
        }
        other => fail(other),
    })
}

/// Why the guards say no, or `None` when the command should run.
fn guarded(sys: &System, r: &Resource, e: &ExecSpec) -> Result<Option<String>, ProviderError> {
    if let Some(path) = &e.creates
        && (sys.assumed_path(path) || sys.host.stat(path).map_err(fail)?.is_some())
    {
        return Ok(Some(format!("{path} exists")));
    }
    if let Some(guard) = &e.onlyif
        && !run(sys, r, e, guard, None)?.success()
    {
        return Ok(Some("its onlyif command failed".into()));
    }
    if let Some(guard) = &e.unless
        && run(sys, r, e, guard, None)?.success()
    {
        return Ok(Some("its unless command succeeded".into()));
    }
    Ok(None)
}

/// A command line as outputs and reports show it: a sensitive one by its program alone.
fn shown(r: &Resource, argv: &[String]) -> String {
    match argv.split_first() {
        Some((program, rest)) if r.sensitive() && !rest.is_empty() => {
            format!("{program} ({} arguments hidden: sensitive)", rest.len())
        }
        _ => argv.join(" "),
    }
}

pub fn check(sys: &System, r: &Resource, e: &ExecSpec) -> Result<(Checked, Vec<Change>), ProviderError> {
    if e.refreshonly == Some(true) || sys.run.borrow().ran.contains(&r.id.to_string()) {
        return Ok((Checked::default(), vec![]));
    }
    match guarded(sys, r, e) {
        Ok(Some(_)) => return Ok((Checked::default(), vec![])),
        Ok(None) => {}
        // In a dry-run after a planned package or command, a guard may not be able to run yet
        // (its program or its user comes with the package): the run decides, so the command is
        // predicted to run.
        Err(_) if sys.assumed_side_effects() => {}
        Err(e) => return Err(e),
    }
    let change = Change::new("command", "not run", format!("run `{}`", shown(r, &e.command)));
    Ok((Checked { op: Op::Run, ..Checked::default() }, vec![change]))
}

/// Runs the command; the tail of its output is the report's note.
pub fn apply(sys: &System, r: &Resource, e: &ExecSpec) -> Result<Option<String>, ProviderError> {
    sys.run.borrow_mut().ran.insert(r.id.to_string());
    let ran = run(sys, r, e, &e.command, e.stdin.as_deref());
    // A command can change anything: accounts, units and packages are read again.
    sys.forget_system();
    let ran = ran?;
    let tail = if r.sensitive() || e.stdin.is_some() || ran.tail.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", ran.tail.trim_end())
    };
    if ran.success() {
        Ok((!tail.is_empty()).then(|| format!("output{tail}")))
    } else {
        Err(format!("`{}` {}{tail}", shown(r, &e.command), ran.describe(timeout(e))).into())
    }
}

/// A notify runs the command (its guards permitting), once a run.
pub fn refresh(sys: &System, r: &Resource, e: &ExecSpec, dry_run: bool) -> Result<Option<String>, ProviderError> {
    if sys.run.borrow().ran.contains(&r.id.to_string()) {
        return Ok(None);
    }
    if let Some(why) = guarded(sys, r, e)? {
        return Ok(Some(format!("not run: {why}")));
    }
    if dry_run {
        return Ok(Some(format!("would run `{}`", shown(r, &e.command))));
    }
    apply(sys, r, e).map(|note| Some(note.map_or("ran".to_string(), |n| format!("ran, {n}"))))
}

#[cfg(test)]
mod tests {
    use crate::host::Ran;
    use crate::host::memory::{MemHost, MemNode};
    use crate::providers::converge_yaml;
    use crate::report::Status;

    fn ok(tail: &str) -> Ran {
        Ran { code: Some(0), tail: tail.into(), ..Ran::default() }
    }

    fn exit(code: i32, tail: &str) -> Ran {
        Ran { code: Some(code), tail: tail.into(), ..Ran::default() }
    }

    #[test]
    fn guards_decide_and_the_output_tail_is_reported() {
        let host =
            MemHost::new().with_file("/etc/done", "", 0o644).with_runner(|host, cmd| match cmd.argv[0].as_str() {
                "/bin/false" => exit(1, ""),
                "/bin/true" => ok(""),
                "/usr/bin/make-it" => {
                    host.put("/var/made", MemNode::File { content: vec![], mode: 0o644, uid: 0, gid: 0 });
                    ok("made it\n")
                }
                "/usr/bin/broken" => exit(3, "E: no such thing\n"),
                _ => ok(""),
            });
        let yaml = "  - exec: skipped-creates\n    command: [/usr/bin/never]\n    creates: /etc/done\n  - exec: skipped-onlyif\n    command: [/usr/bin/never]\n    onlyif: [/bin/false]\n  - exec: skipped-unless\n    command: [/usr/bin/never]\n    unless: [/bin/true]\n  - exec: make\n    command: [/usr/bin/make-it]\n    creates: /var/made\n  - exec: broken\n    command: [/usr/bin/broken, --now]\n";
        let events = converge_yaml(&host, yaml, false);
        let by = |id: &str| events.iter().find(|e| e.id == id).unwrap().clone();
        for id in ["exec:skipped-creates", "exec:skipped-onlyif", "exec:skipped-unless"] {
            assert_eq!(by(id).status, Status::Unchanged, "{id}");
        }
        assert_eq!(by("exec:make").status, Status::Changed);
        assert_eq!(by("exec:make").message.as_deref(), Some("output: made it"));
        assert_eq!(by("exec:broken").status, Status::Failed);
        assert_eq!(
            by("exec:broken").message.as_deref(),
            Some("`/usr/bin/broken --now` exited with 3: E: no such thing")
        );
        assert!(!host.processes().iter().any(|p| p.contains("never")), "{:?}", host.processes());
        // Again: `make` is guarded by what it made.
        let again = converge_yaml(&host, yaml, false);
        assert_eq!(again.iter().find(|e| e.id == "exec:make").unwrap().status, Status::Unchanged);
    }

    #[test]
    fn a_sensitive_command_is_shown_by_its_program_alone_and_a_secret_goes_on_stdin() {
        use std::{cell::RefCell, rc::Rc};
        type Seen = Vec<(String, Option<String>)>;
        let stdins: Rc<RefCell<Seen>> = Rc::default();
        let seen = stdins.clone();
        let host = MemHost::new().with_runner(move |_, cmd| {
            let stdin = cmd.stdin.map(|b| String::from_utf8_lossy(b).into_owned());
            seen.borrow_mut().push((cmd.argv[0].clone(), stdin));
            match cmd.argv[0].as_str() {
                "/usr/bin/fail" => exit(2, "token s3cret rejected"),
                "/bin/false" => exit(1, ""),
                _ => ok("logged in with s3cret"),
            }
        });
        let yaml = "
  - exec: login
    command: [/usr/bin/login-tool, --token, s3cret]
    environment: {TOKEN: s3cret}
    sensitive: true
  - exec: password
    command: [/usr/bin/psql, --set-password-from-stdin]
    stdin: \"s3cret\\n\"
    unless: [/bin/false]
  - exec: broken
    command: [/usr/bin/fail, --token, s3cret]
    sensitive: true
";
        for dry_run in [true, false] {
            let events = converge_yaml(&host, yaml, dry_run);
            let all = serde_json::to_string(&events).unwrap();
            assert!(!all.contains("s3cret"), "a secret in the events (dry-run {dry_run}): {all}");
            let login = events.iter().find(|e| e.id == "exec:login").unwrap();
            assert_eq!(login.changes[0].to, "run `/usr/bin/login-tool (2 arguments hidden: sensitive)`");
        }
        let events = converge_yaml(&host, yaml, false);
        let broken = events.iter().find(|e| e.id == "exec:broken").unwrap();
        assert_eq!(broken.message.as_deref(), Some("`/usr/bin/fail (2 arguments hidden: sensitive)` exited with 2"));
        let stdins = stdins.borrow();
        assert!(stdins.contains(&("/usr/bin/psql".into(), Some("s3cret\n".into()))), "{stdins:?}");
        assert!(
            stdins.iter().all(|(p, s)| p == "/usr/bin/psql" || s.is_none()),
            "only the command gets it: {stdins:?}"
        );
    }

    #[test]
    fn a_dry_run_runs_guards_but_never_the_command() {
        let host = MemHost::new().with_runner(|_, cmd| if cmd.argv[0] == "/bin/false" { exit(1, "") } else { ok("") });
        let yaml = "  - exec: x\n    command: [/usr/bin/change-things]\n    unless: [/bin/false]\n";
        let events = converge_yaml(&host, yaml, true);
        assert_eq!(events[0].status, Status::WouldChange);
        assert_eq!(host.processes(), vec!["/bin/false"]);
    }

    #[test]
    fn refreshonly_runs_once_when_notified() {
        let host = MemHost::new().with_dir("/etc", 0o755);
        let yaml = "  - file: /etc/a\n    content: x\n    notify: [exec:apply]\n  - file: /etc/b\n    content: x\n    notify: [exec:apply]\n  - exec: apply\n    command: [/sbin/sysctl, --system]\n    refreshonly: true\n";
        let events = converge_yaml(&host, yaml, false);
        assert_eq!(events[2].status, Status::Unchanged);
        assert_eq!(events[2].refresh.as_deref(), Some("ran (notified by file:/etc/a)"));
        assert_eq!(host.processes(), vec!["/sbin/sysctl --system"]);
        let again = converge_yaml(&host, yaml, false);
        assert_eq!(again[2].refresh, None, "nothing changed, nothing notified");
    }

    #[test]
    fn a_timeout_says_so() {
        let host = MemHost::new().with_runner(|_, _| Ran {
            code: None,
            timed_out: true,
            tail: "waiting\n".into(),
            ..Ran::default()
        });
        let events =
            converge_yaml(&host, "  - exec: slow\n    command: [/bin/sleep, \"100\"]\n    timeout: 2\n", false);
        assert_eq!(events[0].message.as_deref(), Some("`/bin/sleep 100` was killed after 2 s (its timeout): waiting"));
    }
}
