//! Running a command from a catalog (an argv, never a shell string), bounded in time, inside
//! the managed root when it is not `/`.

use converge_modules::host::{HostError, MAX_STDOUT, Ran};
use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How much of a command's output is kept for the report.
pub const OUTPUT_TAIL: usize = 2048;

/// A command and how to run it.
pub struct Spec<'a> {
    pub argv: &'a [String],
    /// Runs inside this directory as `/` (the managed root), when given.
    pub chroot: Option<&'a Path>,
    /// Runs as this user: uid, gid, supplementary groups, home (looked up by the caller).
    pub user: Option<(u32, u32, Vec<u32>, String, String)>,
    pub cwd: Option<&'a str>,
    /// Added to the minimal environment (PATH, LC_ALL=C).
    pub env: &'a [(String, String)],
    /// Written to standard input (secrets go here, never in argv).
    pub stdin: Option<&'a [u8]>,
    pub timeout: Duration,
}

impl<'a> Spec<'a> {
    pub fn new(argv: &'a [String], chroot: Option<&'a Path>, timeout: Duration) -> Spec<'a> {
        Spec { argv, chroot, user: None, cwd: None, env: &[], stdin: None, timeout }
    }
}

/// Runs `argv` with a minimal environment, in `chroot` when given; fails with the exit status
/// and the tail of its output unless it exits 0 within `timeout`.
pub fn run(argv: &[String], chroot: Option<&Path>, timeout: Duration) -> Result<(), HostError> {
    check(&Spec::new(argv, chroot, timeout))
}

/// Runs the command and demands exit 0.
pub fn check(spec: &Spec) -> Result<(), HostError> {
    let ran = execute(spec)?;
    if ran.success() {
        return Ok(());
    }
    let status = match (ran.code, ran.timed_out) {
        (_, true) => format!("timed out after {} s and was killed", spec.timeout.as_secs()),
        (Some(c), _) => format!("exit status: {c}"),
        (None, _) => "was killed by a signal".into(),
    };
    Err(HostError::Command { command: spec.argv.join(" "), status, output: ran.tail })
}

/// Runs the command to its end (or its timeout) and says how it ended, with its standard
/// output (at most [`MAX_STDOUT`]) and the tail of all its output; an error only when it
/// could not be started.
pub fn execute(spec: &Spec) -> Result<Ran, HostError> {
    let shown = spec.argv.join(" ");
    let fail = |status: String| HostError::Command { command: shown.clone(), status, output: String::new() };
    let (program, args) = spec.argv.split_first().ok_or_else(|| fail("is empty".into()))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(if spec.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let chroot = match spec.chroot {
        Some(dir) => {
            Some(CString::new(dir.as_os_str().as_bytes()).map_err(|_| fail("root path has a NUL byte".into()))?)
        }
        None => None,
    };
    let cwd = match spec.cwd {
        Some(d) => Some(CString::new(d).map_err(|_| fail("cwd has a NUL byte".into()))?),
        None => None,
    };
    if let Some((_, _, _, home, name)) = &spec.user {
        cmd.env("HOME", home).env("USER", name).env("LOGNAME", name);
    }
    let ids = spec.user.as_ref().map(|(uid, gid, groups, _, _)| (*uid, *gid, groups.clone()));
    if chroot.is_some() || cwd.is_some() || ids.is_some() {
        // SAFETY: only async-signal-safe calls (chroot, chdir, setgroups, setgid, setuid) on
        // memory prepared before fork. The workspace's one `unsafe` (std has no safe way to
        // act between fork and exec).
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || {
                if let Some(dir) = &chroot
                    && (libc::chroot(dir.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(dir) = &cwd
                    && libc::chdir(dir.as_ptr()) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some((uid, gid, groups)) = &ids
                    && (libc::setgroups(groups.len(), groups.as_ptr()) != 0
                        || libc::setgid(*gid) != 0
                        || libc::setuid(*uid) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().map_err(|e| fail(format!("could not start: {e}")))?;
    if let (Some(input), Some(mut pipe)) = (spec.stdin, child.stdin.take()) {
        use std::io::Write;
        let _ = pipe.write_all(input);
    }
    let readers: Vec<_> = [
        child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
        child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .enumerate()
    // Standard output is kept up to MAX_STDOUT (a tool's answer); of both, the tail. Both are
    // drained to the end, so a chatty command never blocks on a full pipe.
    .map(|(i, pipe)| std::thread::spawn(move || Kept::read(pipe, if i == 0 { MAX_STDOUT } else { 0 })))
    .collect();
    let started = Instant::now();
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() >= spec.timeout => {
                let _ = child.kill();
                timed_out = true;
                break child.wait().ok();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(_) => break None,
        }
    };
    let mut kept = readers.into_iter().map(|r| r.join().unwrap_or_default());
    let out = kept.next().unwrap_or_default();
    let err = kept.next().unwrap_or_default();
    let mut both = out.tail.clone();
    both.extend_from_slice(&err.tail);
    let tail = String::from_utf8_lossy(&both[both.len().saturating_sub(OUTPUT_TAIL)..]).into_owned();
    let stdout = String::from_utf8_lossy(&out.head).into_owned();
    Ok(Ran {
        code: if timed_out { None } else { status.and_then(|s| s.code()) },
        timed_out,
        tail,
        stdout,
        stdout_truncated: out.truncated,
    })
}

/// What is kept of one output stream: its beginning up to a bound, and its last bytes.
#[derive(Default)]
struct Kept {
    head: Vec<u8>,
    truncated: bool,
    tail: Vec<u8>,
}

impl Kept {
    fn read(mut pipe: Box<dyn Read + Send>, head_limit: usize) -> Kept {
        let mut kept = Kept::default();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            let room = head_limit.saturating_sub(kept.head.len());
            kept.head.extend_from_slice(&chunk[..room.min(n)]);
            kept.truncated |= n > room;
            kept.tail.extend_from_slice(chunk);
            if kept.tail.len() > 2 * OUTPUT_TAIL {
                kept.tail.drain(..kept.tail.len() - OUTPUT_TAIL);
            }
        }
        kept.truncated &= head_limit > 0;
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn success_failure_and_output_tail() {
        run(&argv(&["true"]), None, Duration::from_secs(10)).unwrap();
        let e = run(&argv(&["sh", "-c", "echo bad line 3 >&2; exit 3"]), None, Duration::from_secs(10)).unwrap_err();
        assert_eq!(e.to_string(), "`sh -c echo bad line 3 >&2; exit 3` exit status: 3: bad line 3");
    }

    #[test]
    fn a_hung_command_is_killed() {
        let e = run(&argv(&["sleep", "30"]), None, Duration::from_millis(200)).unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
    }

    #[test]
    fn a_missing_program_is_reported() {
        let e = run(&argv(&["/nonexistent/prog"]), None, Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("could not start"), "{e}");
    }

    #[test]
    fn a_flood_of_output_is_kept_within_its_bounds_and_said() {
        // 80 MiB on stdout and 8 MiB on stderr: drained to the end (the command is not blocked),
        // stdout kept up to MAX_STDOUT and marked cut, the tail bounded.
        let words = argv(&["sh", "-c", "head -c 83886080 /dev/zero; head -c 8388608 /dev/zero >&2; echo end >&2"]);
        let ran = execute(&Spec::new(&words, None, Duration::from_secs(60))).unwrap();
        assert_eq!(ran.code, Some(0));
        assert!(ran.stdout_truncated);
        assert_eq!(ran.stdout.len(), MAX_STDOUT);
        assert!(ran.tail.len() <= OUTPUT_TAIL && ran.tail.ends_with("end\n"), "{} bytes", ran.tail.len());
        // A short answer is whole.
        let words = argv(&["sh", "-c", "printf 'a\\nb\\n'"]);
        let ran = execute(&Spec::new(&words, None, Duration::from_secs(10))).unwrap();
        assert_eq!((ran.stdout.as_str(), ran.stdout_truncated), ("a\nb\n", false));
    }

    #[test]
    fn stdin_env_cwd_and_how_it_ended() {
        let env = [("GREETING".to_string(), "hi".to_string())];
        let words = argv(&["sh", "-c", "read x; echo \"$GREETING $x $(pwd)\"; exit 4"]);
        let spec = Spec {
            cwd: Some("/tmp"),
            env: &env,
            stdin: Some(b"there\n"),
            ..Spec::new(&words, None, Duration::from_secs(10))
        };
        let ran = execute(&spec).unwrap();
        assert_eq!((ran.code, ran.timed_out, ran.tail.as_str()), (Some(4), false, "hi there /tmp\n"));
        let words = argv(&["sleep", "30"]);
        let ran = execute(&Spec::new(&words, None, Duration::from_millis(100))).unwrap();
        assert!(ran.timed_out && ran.code.is_none());
    }
}
