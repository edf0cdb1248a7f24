//! Running a system's tools through [`Host::run`]: the building blocks every
//! `providers::<kind>::<tool>` module shares. A tool module builds its command lines and
//! parses its outputs here in the library (pure, tested on captured output); the host only
//! runs them.

use crate::host::{FileRead, Host, HostError, HostResult, Ran, Run};
use std::time::Duration;

/// How long a query may take.
pub const QUERY: Duration = Duration::from_secs(120);
/// How long a package transaction may take.
pub const TRANSACTION: Duration = Duration::from_secs(1800);
/// How long an account or unit change may take (a unit's own start timeout comes first).
pub const CHANGE: Duration = Duration::from_secs(600);
/// The largest system database file read (the dpkg status of a big host is ~10 MiB).
const DATABASE_LIMIT: u64 = 256 << 20;

/// What the caller of the providers decides about the tools (from its settings or
/// environment: this library reads neither).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolOptions {
    /// Seconds apt and dnf wait for another package manager to let go of its lock.
    pub lock_timeout: u64,
}

impl Default for ToolOptions {
    fn default() -> Self {
        ToolOptions { lock_timeout: 120 }
    }
}

pub fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// Runs `run` and demands exit 0; how it ended.
pub fn check(host: &dyn Host, run: &Run) -> HostResult<Ran> {
    let ran = host.run(run)?;
    if ran.success() {
        return Ok(ran);
    }
    Err(HostError::Command { command: run.argv.join(" "), status: ran.describe(run.timeout), output: ran.tail })
}

/// Runs a query whose exit status says nothing alone (`rpm -q` fails when one package is
/// missing): its whole answer, or an error when the answer was too long to be whole.
pub fn query(host: &dyn Host, run: &Run) -> HostResult<Ran> {
    let ran = host.run(run)?;
    if ran.stdout_truncated {
        return Err(HostError::Refused(format!(
            "`{}` answered more than {} MiB: refused rather than read in part",
            run.argv.join(" "),
            crate::host::MAX_STDOUT >> 20
        )));
    }
    Ok(ran)
}

/// As [`query`], demanding exit 0.
pub fn checked_query(host: &dyn Host, run: &Run) -> HostResult<Ran> {
    let ran = query(host, run)?;
    if !ran.success() {
        return Err(HostError::Command {
            command: run.argv.join(" "),
            status: ran.describe(run.timeout),
            output: ran.tail,
        });
    }
    Ok(ran)
}

/// The most symlinks followed to a system file (`/etc/os-release` is one, to
/// `../usr/lib/os-release`).
const MAX_LINKS: usize = 8;

/// The text of a system file (`/etc/passwd`, dpkg's status), `None` when there is none. A
/// symlink is followed as the system's tools would, each hop resolved by the host (inside the
/// root), at most [`MAX_LINKS`] of them.
pub fn read_text(host: &dyn Host, path: &str) -> HostResult<Option<String>> {
    let mut at = path.to_string();
    for _ in 0..=MAX_LINKS {
        match host.read_file(&at, DATABASE_LIMIT)? {
            None => return Ok(None),
            Some(FileRead { content: Some(c), .. }) => return Ok(Some(String::from_utf8_lossy(&c).into_owned())),
            Some(FileRead { stat, .. }) if stat.file_type == crate::host::FileType::Symlink => {
                let target = host.read_link(&at)?;
                at = resolve(&at, &target);
            }
            Some(FileRead { stat, .. }) => {
                return Err(HostError::Refused(format!(
                    "{path} is a {} of {} bytes, not a system file converge can read",
                    stat.file_type, stat.size
                )));
            }
        }
    }
    Err(HostError::Refused(format!("{path}: more than {MAX_LINKS} symlinks to follow")))
}

/// Where the symlink at `link` pointing to `target` leads: an absolute, normal path (`..`
/// never climbs above `/`).
fn resolve(link: &str, target: &str) -> String {
    let base = if target.starts_with('/') { "" } else { link.rsplit_once('/').map_or("", |(dir, _)| dir) };
    let mut parts: Vec<&str> = Vec::new();
    for part in base.split('/').chain(target.split('/')) {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// `KEY=value` of an os-release file (quotes removed).
pub fn os_release_field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('=')).map(|v| v.trim().trim_matches('"').to_string())
}

/// The family of a system from its os-release text (debian, redhat, suse, arch, alpine).
pub fn os_family(os_release: &str) -> Option<&'static str> {
    let id = os_release_field(os_release, "ID").unwrap_or_default();
    let like = os_release_field(os_release, "ID_LIKE").unwrap_or_default();
    let words: Vec<&str> = std::iter::once(id.as_str()).chain(like.split_whitespace()).collect();
    let has = |w: &[&str]| words.iter().any(|x| w.contains(x));
    if has(&["debian", "ubuntu"]) {
        Some("debian")
    } else if has(&["rhel", "fedora", "centos", "rocky", "almalinux"]) {
        Some("redhat")
    } else if has(&["suse", "opensuse", "sles"]) {
        Some("suse")
    } else if has(&["arch"]) {
        Some("arch")
    } else if has(&["alpine"]) {
        Some("alpine")
    } else {
        None
    }
}

/// The host's os-release text (`/etc/os-release`, else `/usr/lib/os-release`).
pub fn os_release(host: &dyn Host) -> HostResult<Option<String>> {
    match read_text(host, "/etc/os-release")? {
        Some(t) => Ok(Some(t)),
        None => read_text(host, "/usr/lib/os-release"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_from_os_release() {
        for (text, want) in [
            ("ID=debian\nVERSION_ID=\"12\"\n", Some("debian")),
            ("ID=ubuntu\nID_LIKE=debian\n", Some("debian")),
            ("ID=\"almalinux\"\nID_LIKE=\"rhel centos fedora\"\n", Some("redhat")),
            ("ID=linuxmint\nID_LIKE=\"ubuntu debian\"\n", Some("debian")),
            ("ID=opensuse-leap\nID_LIKE=\"suse opensuse\"\n", Some("suse")),
            ("ID=nixos\n", None),
            ("", None),
        ] {
            assert_eq!(os_family(text), want, "{text:?}");
        }
        assert_eq!(os_release_field("VERSION_ID=\"9.4\"\n", "VERSION_ID").as_deref(), Some("9.4"));
        assert_eq!(os_release_field("ID_LIKE=x\n", "ID"), None, "a key is whole");
    }

    #[test]
    fn an_answer_cut_short_is_refused_never_read_in_part() {
        use crate::host::memory::MemHost;
        let host = MemHost::new().with_runner(|_, _| Ran {
            code: Some(0),
            stdout: "pkg:\n  Candidate: 1.0\n".into(),
            stdout_truncated: true,
            ..Ran::default()
        });
        let a = argv(&["some-tool", "query"]);
        let e = query(&host, &Run::new(&a, QUERY)).unwrap_err().to_string();
        assert!(e.contains("`some-tool query` answered more than 64 MiB"), "{e}");
        let failing = MemHost::new().with_runner(|_, _| Ran { code: Some(3), tail: "no".into(), ..Ran::default() });
        let e = checked_query(&failing, &Run::new(&a, QUERY)).unwrap_err().to_string();
        assert_eq!(e, "`some-tool query` exited with 3: no");
    }

    #[test]
    fn system_files_are_read_through_their_symlinks_inside_the_root() {
        use crate::host::memory::MemHost;
        assert_eq!(resolve("/etc/os-release", "../usr/lib/os-release"), "/usr/lib/os-release");
        assert_eq!(resolve("/etc/os-release", "/usr/lib/os-release"), "/usr/lib/os-release");
        assert_eq!(resolve("/etc/x", "../../../../etc/y"), "/etc/y", "never above /");
        let host = MemHost::new()
            .with_file("/usr/lib/os-release", "ID=almalinux\n", 0o644)
            .with_symlink("/etc/os-release", "../usr/lib/os-release")
            .with_symlink("/etc/loop", "/etc/loop");
        assert_eq!(read_text(&host, "/etc/os-release").unwrap().as_deref(), Some("ID=almalinux\n"));
        let e = read_text(&host, "/etc/loop").unwrap_err().to_string();
        assert!(e.contains("more than 8 symlinks"), "{e}");
        assert_eq!(read_text(&host, "/etc/none").unwrap(), None);
    }
}
