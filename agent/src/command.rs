//! Running a command from a catalog (an argv, never a shell string), bounded in time, inside
//! the managed root when it is not `/`.

use converge_modules::host::HostError;
use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How much of a command's output is kept for the report.
pub const OUTPUT_TAIL: usize = 2048;

/// Runs `argv` with a minimal environment, in `chroot` when given; fails with the exit status
/// and the tail of its output unless it exits 0 within `timeout`.
pub fn run(argv: &[String], chroot: Option<&Path>, timeout: Duration) -> Result<(), HostError> {
    let shown = argv.join(" ");
    let fail = |status: String, output: String| HostError::Command { command: shown.clone(), status, output };
    let (program, args) = argv.split_first().ok_or_else(|| fail("is empty".into(), String::new()))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(dir) = chroot {
        let dir = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| fail("root path has a NUL byte".into(), String::new()))?;
        // SAFETY: only async-signal-safe calls (chroot, chdir) on memory prepared before fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::chroot(dir.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.current_dir("/");
    }
    let mut child = cmd.spawn().map_err(|e| fail(format!("could not start: {e}"), String::new()))?;
    let mut readers = Vec::new();
    for pipe in [
        child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
        child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        readers.push(std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut pipe = pipe;
            let _ = pipe.read_to_end(&mut buf);
            buf
        }));
    }
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("timed out after {} s and was killed", timeout.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => break Err(format!("could not be waited for: {e}")),
        }
    };
    let mut output = Vec::new();
    for r in readers {
        output.extend(r.join().unwrap_or_default());
    }
    let start = output.len().saturating_sub(OUTPUT_TAIL);
    let tail = String::from_utf8_lossy(&output[start..]).into_owned();
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(fail(s.to_string(), tail)),
        Err(why) => Err(fail(why, tail)),
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
}
