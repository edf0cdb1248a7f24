//! The agent upgrading itself: a catalog manages the `converge` package like any package, and
//! on a live system the change waits for the end of the run (the package manager replaces the
//! binary and restarts `converge.service`, which would kill the run mid-way). After the run's
//! report, [`start`] launches `converge upgrade-self` detached from the agent: as a transient
//! systemd unit of its own (outside `converge.service`, so stopping the service never stops
//! it), or a process of its own session where there is no systemd. [`upgrade_self`] takes the
//! run lock, installs, and writes the outcome to `upgrade.json`; the next run reports it
//! ([`outcome`]). A failed upgrade leaves the agent that was there, which says why.

use crate::backup::BackupStore;
use crate::fs::Root;
use crate::host::RealHost;
use crate::state::{self, RunLock, STATE_DIR};
use anyhow::{Context, Result, anyhow};
use converge_modules::host::Host;
use converge_modules::providers::package::{self, Install};
use converge_modules::text::clip;
use converge_modules::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

const OUTCOME: &str = "/var/lib/converge/upgrade.json";

/// How the last upgrade went.
#[derive(Debug, Serialize, Deserialize)]
struct Outcome {
    version: String,
    started: Timestamp,
    finished: Timestamp,
    ok: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    detail: String,
}

#[derive(Debug, Clone, clap::Args)]
pub struct UpgradeArgs {
    /// The version to install (the newest on offer when left out).
    #[arg(long, value_name = "VERSION")]
    pub to: Option<String>,
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
}

/// Launches the upgrade the run deferred, if any, detached; returns what was done.
pub fn start(host: &RealHost, root: &std::path::Path) -> Option<String> {
    let install = host.deferred_upgrade()?;
    let exe = std::env::current_exe().ok()?;
    let mut argv: Vec<String> = vec![exe.display().to_string(), "upgrade-self".into()];
    if let Some(v) = &install.version {
        argv.extend(["--to".into(), v.clone()]);
    }
    argv.extend(["--root".into(), root.display().to_string()]);
    let unit = format!("converge-upgrade-{}", std::process::id());
    // A transient unit of its own, when systemd runs this host.
    let systemd = std::path::Path::new("/run/systemd/system").exists()
        && std::process::Command::new("systemd-run")
            .args([
                "--unit",
                &unit,
                "--collect",
                "--no-block",
                "--quiet",
                "--description",
                "converge upgrades itself",
                "--",
            ])
            .args(&argv)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if systemd {
        return Some(format!("the agent upgrade runs as {unit}.service"));
    }
    // Else a process of its own session, which outlives this one.
    use std::os::unix::process::CommandExt;
    let spawned = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn();
    Some(match spawned {
        Ok(c) => format!("the agent upgrade runs as process {}", c.id()),
        Err(e) => format!("the agent upgrade could not be started: {e}"),
    })
}

/// `converge upgrade-self`: installs the agent's own package, under the run lock (waiting a
/// little for the run that launched it to let go), and writes how it went.
pub fn upgrade_self(args: &UpgradeArgs) -> Result<i32> {
    let root = Root::open(&args.root).with_context(|| format!("cannot open root {}", args.root.display()))?;
    let started = Timestamp::now();
    let mut lock = RunLock::take(&root, false);
    for _ in 0..60 {
        if lock.is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        lock = RunLock::take(&root, false);
    }
    let lock = lock?;
    let host = RealHost::new(root, BackupStore::new(STATE_DIR));
    let install = Install { name: package::AGENT.into(), version: args.to.clone() };
    let done = package::tool_of(&host).map_err(|e| e.to_string()).and_then(|tool| {
        let options = crate::apply::tool_options();
        tool.install(&host, std::slice::from_ref(&install), false, &options).map_err(|e| e.to_string())
    });
    let outcome = Outcome {
        version: args.to.clone().unwrap_or_else(|| "the newest".into()),
        started,
        finished: Timestamp::now(),
        ok: done.is_ok(),
        detail: done.as_ref().err().map(|e| clip(e, 4000).into_owned()).unwrap_or_default(),
    };
    state::write(&host, OUTCOME, &serde_json::to_vec_pretty(&outcome)?, 0o644)?;
    drop(lock);
    done.map(|()| 0).map_err(|e| anyhow!("the agent upgrade failed: {e}"))
}

/// How the last upgrade went, once (the record is removed): for the run's notes.
pub fn outcome(host: &RealHost) -> Option<String> {
    let text = state::read_text(host.root(), OUTCOME, state::SMALL_FILE).ok();
    host.root().lstat(OUTCOME).ok().flatten()?;
    let _ = host.remove(OUTCOME);
    let Some(o) = text.and_then(|t| serde_json::from_str::<Outcome>(&t).ok()) else {
        return Some("the record of the last agent upgrade was damaged: removed".into());
    };
    Some(if o.ok {
        format!("the agent was upgraded to {} at {}", o.version, o.finished)
    } else {
        format!(
            "the agent upgrade to {} failed at {}: {}; the agent that was there goes on (and a run tries again)",
            o.version, o.finished, o.detail
        )
    })
}
