//! `report`, `node`, `ca` and `token`: what a server's state holds, and changes to it.

use super::*;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum NodeAction {
    /// Every node: last seen, certificate, catalog, last report; and requests waiting.
    List {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Let a node that asked to enroll without a token have its certificate: the request
    /// whose key is KEY (the fingerprint the host printed, as `node list` shows it).
    Approve {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        name: String,
        /// The key's fingerprint: sha256:HEX (at least its first 16 hex digits).
        #[arg(long)]
        key: String,
    },
    /// Remove a waiting enrollment request (one from a key the host did not make).
    Reject {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        name: String,
    },
    /// Refuse a node's certificates from now on (it must bootstrap again to return).
    Revoke {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaAction {
    /// Begin a rollover: a successor CA, cross-signed by the current one; both are trusted
    /// until `ca retire`.
    Rotate {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// The CA in force, a rollover under way, and which hosts hold what.
    Status {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// End a rollover: the previous CA is trusted no more. Refused while a host with a live
    /// certificate lacks the new bundle or a certificate from the new CA, unless --force.
    Retire {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Retire even though hosts are not there yet (they will need to bootstrap again).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// A one-time token for one node name, or a pattern of names.
    New {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The node name (or glob pattern) it may enroll [*].
        #[arg(long, default_value = "*")]
        name: String,
        /// How long it stays valid [token_ttl of the configuration, 24h].
        #[arg(long)]
        ttl: Option<String>,
    },
    /// A token for the fleet page from another machine (loopback needs none).
    Operator {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// How long it stays valid.
        #[arg(long, default_value = "30d")]
        ttl: String,
    },
}

/// `converge-server report`.
pub fn report(
    config: &Path,
    node: Option<String>,
    failed: bool,
    since: Option<&str>,
    limit: i64,
    details: bool,
) -> Result<u8> {
    let (_, db) = open_db(config)?;
    let now = crate::db::now();
    let since = match since {
        None => None,
        Some(t) => Some(match converge_modules::settings::parse_duration(t) {
            Ok(d) => now - d,
            Err(_) => {
                converge_modules::time::Timestamp::parse(t)
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "--since {t}: give a duration like 24h or 7d, or a time like 2026-11-30T08:00:00Z"
                        )
                    })?
                    .0
            }
        }),
    };
    if let Some(n) = &node
        && db.node_rows(Some(n))?.is_empty()
    {
        bail!("there is no node {n} (converge-server node list shows them)");
    }
    let filter = crate::db::ReportFilter { node, failed, since, limit, bodies: true };
    let reports = db.reports(&filter)?;
    if reports.is_empty() {
        println!("no reports match");
    }
    for r in &reports {
        print!("{}", crate::view::report_text(&crate::view::report_view(r, now), details));
    }
    Ok(0)
}

pub fn node_command(action: NodeAction) -> Result<u8> {
    match action {
        NodeAction::List { config } => {
            let (config, db) = open_db(&config)?;
            let now = crate::db::now();
            let nodes = db.nodes()?;
            println!(
                "{:<28} {:<10} {:<12} {:<12} {:<14} {:>7} {:>6}  CERTIFICATE",
                "NODE", "STATUS", "LAST RUN", "COMMIT", "SERIAL", "CHANGED", "FAILED"
            );
            for n in &nodes {
                let v = crate::view::node_view(n, None, now, 2 * config.run_interval);
                let late = if v.late { " LATE" } else { "" };
                let pending = v.would_change.map_or(String::new(), |n| format!(" (dry-run since: {n} would change)"));
                println!(
                    "{:<28} {:<10} {:<12} {:<12} {:<14} {:>7} {:>6}  {}{late}{pending}",
                    v.name, v.status, v.last_run_ago, v.commit, v.serial, v.changed, v.failed, v.certificate
                );
                if let Some(e) = &v.compile_error {
                    let e = converge_modules::text::clip(e, 2000);
                    println!("{:<28} compile failing (last good catalog served): {e}", "");
                }
            }
            let pending = db.pending_list(now)?;
            for p in &pending {
                let state = if p.approved { "approved, waiting for the agent" } else { "waiting for approval" };
                println!(
                    "{:<28} enrollment requested {} from {}, key {}: {state}",
                    p.node,
                    when(Some(p.requested)),
                    if p.address.is_empty() { "?" } else { &p.address },
                    p.fingerprint
                );
            }
            if nodes.is_empty() && pending.is_empty() {
                println!("no nodes yet");
            }
        }
        NodeAction::Approve { config, name, key } => {
            let (_, db) = open_db(&config)?;
            let fingerprint = db.approve(&name, &key, crate::db::now())?.map_err(anyhow::Error::msg)?;
            println!("approved {name} with key {fingerprint}: it gets its certificate the next time it asks");
        }
        NodeAction::Reject { config, name } => {
            let (_, db) = open_db(&config)?;
            if !db.reject(&name)? {
                bail!("no enrollment request from {name} is waiting (converge-server node list shows them)");
            }
            println!("rejected the request waiting for {name}: the host may ask again");
        }
        NodeAction::Revoke { config, name } => {
            let (_, db) = open_db(&config)?;
            let n = db.revoke(&name, crate::db::now())?;
            if n == 0 {
                bail!("{name} has no live certificate");
            }
            println!("revoked {n} certificate(s) of {name}: it is refused from now on");
        }
    }
    Ok(0)
}

/// The hosts not yet through a CA rollover: those with a live certificate that do not hold
/// the new bundle, or whose newest certificate came from the previous CA.
pub fn behind_in_rollover(db: &crate::db::Db, ca: &crate::ca::Ca) -> Result<(usize, Vec<String>)> {
    let now = crate::db::now();
    let nodes = db.trust_of_nodes(now)?;
    let bundle = ca.bundle_hash();
    let behind = nodes
        .iter()
        .filter(|(_, held, issued)| {
            held.as_deref() != Some(bundle.as_str()) || ca.rotated_at.is_some_and(|r| *issued < r)
        })
        .map(|(n, ..)| n.clone())
        .collect();
    Ok((nodes.len(), behind))
}

pub fn ca_command(action: CaAction) -> Result<u8> {
    use crate::ca::Ca;
    match action {
        CaAction::Rotate { config } => {
            let (config, _) = open_db(&config)?;
            let hash = Ca::rotate(&config.state)?;
            println!("rollover begun: the new CA is {hash}; the previous one stays trusted until `ca retire`");
            println!("- the server takes it in within a second (its own certificate is issued by the new CA);");
            println!(
                "- each host adopts the bundle at its next run, and renews its certificate from the new CA at the one after;"
            );
            println!(
                "- `converge-server ca status --config ...` shows the hosts not there yet; then `converge-server ca retire --config ...`"
            );
            println!("- new hosts join with --ca-hash {hash} (the old hash works until the retirement)");
        }
        CaAction::Status { config } => {
            let (config, db) = open_db(&config)?;
            let ca = Ca::load(&config.state)?;
            let (not_before, not_after) = crate::ca::validity(&ca.der)?;
            let t = |s: i64| converge_modules::time::Timestamp(s).to_string();
            println!("CA          {} (from {} until {})", ca.hash(), t(not_before), t(not_after));
            match (&ca.previous, ca.rotated_at) {
                (Some((_, prev)), at) => {
                    println!(
                        "rollover    begun {}: the previous CA {} is still trusted",
                        at.map_or("?".to_string(), t),
                        crate::ca::cert_hash(prev)
                    );
                    let (total, behind) = behind_in_rollover(&db, &ca)?;
                    println!(
                        "hosts       {total} with a live certificate; {} not through the rollover yet",
                        behind.len()
                    );
                    for n in behind.iter().take(20) {
                        println!("            {n}");
                    }
                    if behind.len() > 20 {
                        println!("            and {} more", behind.len() - 20);
                    }
                    if behind.is_empty() {
                        println!("next        converge-server ca retire --config {}", config.file.display());
                    }
                }
                (None, _) => println!("rollover    none under way"),
            }
            println!("join with   --ca-hash {}", ca.hash());
        }
        CaAction::Retire { config, force } => {
            let (config, db) = open_db(&config)?;
            let ca = Ca::load(&config.state)?;
            if ca.previous.is_none() {
                bail!("no rollover is under way (converge-server ca status)");
            }
            let (_, behind) = behind_in_rollover(&db, &ca)?;
            if !behind.is_empty() && !force {
                let shown: Vec<&str> = behind.iter().take(10).map(String::as_str).collect();
                bail!(
                    "{} host(s) are not through the rollover yet ({}{}): they hold the previous bundle or a certificate \
                     from the previous CA, and would be cut off. Wait for their next runs, or --force (they then need a \
                     token and `converge bootstrap --ca-hash {}`)",
                    behind.len(),
                    shown.join(", "),
                    if behind.len() > 10 { ", ..." } else { "" },
                    ca.hash()
                );
            }
            // Certificates from the retired CA can no longer be used: revoked, so the fleet page
            // shows their hosts, and those can enroll again with a token.
            let revoked = match ca.rotated_at {
                Some(at) => db.revoke_issued_before(at, crate::db::now())?,
                None => Vec::new(),
            };
            Ca::retire(&config.state)?;
            println!("retired the previous CA: the server trusts only {} from within a second", ca.hash());
            if !revoked.is_empty() {
                println!(
                    "revoked the certificates from the previous CA of {} host(s): {}; each comes back with a token and \
                     `converge bootstrap --ca-hash {}`",
                    revoked.len(),
                    revoked.join(", "),
                    ca.hash()
                );
            }
        }
    }
    Ok(0)
}

pub fn token_command(action: TokenAction) -> Result<u8> {
    match action {
        TokenAction::New { config, name, ttl } => {
            let (config, db) = open_db(&config)?;
            let ttl = match ttl {
                Some(t) => converge_modules::settings::parse_duration(&t).map_err(anyhow::Error::msg)?,
                None => config.token_ttl,
            };
            let token = new_token(&db, &name, ttl)?;
            println!("{token}");
            let until = converge_modules::time::Timestamp(crate::db::now() + ttl);
            eprintln!("single-use, for `{name}`, valid until {until}");
        }
        TokenAction::Operator { config, ttl } => {
            let (_, db) = open_db(&config)?;
            let ttl = converge_modules::settings::parse_duration(&ttl).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
            let token = format!("cvo_{}", converge_modules::hash::hex(&crate::keys::random()?));
            let now = crate::db::now();
            db.add_operator(&converge_modules::hash::sha256_hex(token.as_bytes()), now, now + ttl)?;
            println!("{token}");
            let until = converge_modules::time::Timestamp(now + ttl);
            eprintln!(
                "for the fleet page until {until}: open https://SERVER/?token={token} once, or send `Authorization: Bearer {token}`"
            );
        }
    }
    Ok(0)
}

#[derive(Debug, clap::Subcommand)]
pub enum DbAction {
    /// Create the schema in an empty database, or bring it up to date (idempotent; several
    /// servers may run it at once). The embedded file is migrated whenever it is opened.
    Migrate {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Apply the report retention now (`serve` does it every hour): reports older than
    /// `report_retention` go (on PostgreSQL, their daily partitions are dropped).
    Prune {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Copy the embedded database (STATE/state.db, or --from) into the empty PostgreSQL
    /// database `server.toml` names: nodes, certificates, tokens, requests, catalogs, reports.
    /// Stop the server first.
    Import {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[arg(long, value_name = "FILE")]
        from: Option<PathBuf>,
    },
}

pub fn db_command(action: DbAction) -> Result<u8> {
    match action {
        DbAction::Migrate { config } => {
            let config = crate::config::Config::read(&config)?;
            match &config.database {
                None => {
                    crate::db::require_state(&config.state)?;
                    let path = config.state.join("state.db");
                    crate::db::Db::open(&path, 1)?;
                    println!("the embedded database {} is up to date", path.display());
                }
                Some(url) => {
                    let pg = crate::pg::Pg::new(url, 1, config.database_ca.as_deref())?;
                    let partitions = pg.block(pg.migrate(crate::db::now()))?;
                    println!(
                        "PostgreSQL {} is up to date: {} daily report partitions ({} to {})",
                        pg.shown,
                        partitions.len(),
                        partitions.first().map(String::as_str).unwrap_or("-"),
                        partitions.last().map(String::as_str).unwrap_or("-")
                    );
                }
            }
            Ok(0)
        }
        DbAction::Prune { config } => {
            let (config, db) = open_db(&config)?;
            let now = crate::db::now();
            let before = now - config.report_retention;
            match db.prune_reports(before, 10_000, now)? {
                crate::db::Pruned::Rows(n) => {
                    println!("deleted {n} reports received before {}", converge_modules::time::Timestamp(before))
                }
                crate::db::Pruned::Partitions(dropped) => println!(
                    "dropped {} daily report partitions ending before {}{}",
                    dropped.len(),
                    converge_modules::time::Timestamp(before),
                    if dropped.is_empty() { String::new() } else { format!(": {}", dropped.join(", ")) }
                ),
            }
            Ok(0)
        }
        DbAction::Import { config, from } => {
            let config = crate::config::Config::read(&config)?;
            let Some(url) = &config.database else {
                bail!("{}: no `database` to import into (a PostgreSQL URL)", config.file.display());
            };
            let from = from.unwrap_or_else(|| config.state.join("state.db"));
            if !from.is_file() {
                bail!("{} is not an embedded state database", from.display());
            }
            // Brought up to date first: an older file gains the columns PostgreSQL has.
            crate::db::Db::open(&from, 1)?;
            let pg = crate::pg::Pg::new(url, 1, config.database_ca.as_deref())?;
            let copied = pg.block(pg.import(&from, crate::db::now()))?;
            let counts: Vec<String> = copied.iter().map(|(t, n)| format!("{n} {t}")).collect();
            println!("copied {} into PostgreSQL {}: {}", from.display(), pg.shown, counts.join(", "));
            Ok(0)
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum RolloutAction {
    /// The rollout of the current commit: each wave, its hosts, who ran the commit, who failed.
    Status {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Open the next wave now (also of a halted rollout): its hosts get the commit at their
    /// next run.
    Promote {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Stop the rollout where it is: no further wave gets the commit until `resume`.
    Halt {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Why, for the fleet page and `status`.
        #[arg(long, default_value = "halted by an operator")]
        reason: String,
    },
    /// Go on with a halted rollout: the waves open again as the hosts' runs allow.
    Resume {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

/// `converge-server rollout`: the rollout of the commit the servers agree on, read and moved
/// in the shared state (every server takes a change in at its next look at the repository).
pub fn rollout_command(action: RolloutAction) -> Result<u8> {
    use crate::rollout::{Progress, State};
    let config = match &action {
        RolloutAction::Status { config }
        | RolloutAction::Promote { config }
        | RolloutAction::Halt { config, .. }
        | RolloutAction::Resume { config } => config.clone(),
    };
    let (config, db) = open_db(&config)?;
    let Some((_, commit)) = db.agreed()? else {
        bail!("no commit is current yet: the server proposes its branch's head when it starts");
    };
    let short = &commit[..commit.len().min(12)];
    let repo = crate::repo::Repo::from_git(&config.repo, &commit)?;
    let compiler = crate::compiler::Compiler::new(&repo);
    let Some(rollout) = compiler.site.as_ref().and_then(|s| s.rollout.clone()) else {
        println!("site.yaml at {short} has no `rollout`: every host gets a new commit at its next run");
        return Ok(0);
    };
    let Some(p) = db.rollout(&commit)? else {
        println!("the rollout of {short} has not begun yet: a server begins it at its next look at the repository");
        return Ok(0);
    };
    let now = crate::db::now();
    let moved = |new: Progress, what: &str| -> Result<u8> {
        if !db.advance_rollout(&p, &new)? {
            bail!(
                "the rollout of {short} changed meanwhile (a server or another operator): look again with rollout status"
            );
        }
        println!("rollout of {short}: {what}");
        Ok(0)
    };
    match action {
        RolloutAction::Status { .. } => {
            let state = match &p.state {
                State::Rolling => {
                    format!("rolling: wave {} of {} open since {}", p.wave + 1, rollout.len(), when(Some(p.since)))
                }
                State::Halted(why) => format!("HALTED since {}: {why}", when(Some(p.since))),
                State::Done => format!("done: every wave has it (since {})", when(Some(p.since))),
            };
            let kept =
                p.previous.as_deref().map(|c| format!(", replacing {}", &c[..c.len().min(12)])).unwrap_or_default();
            println!("rollout of {short}{kept}: {state}");
            println!(
                "{:<4} {:<20} {:>6} {:>7} {:>7} {:>8}  STATE",
                "WAVE", "NAME", "HOSTS", "RAN IT", "FAILED", "WAITING"
            );
            let hosts = db.host_runs(now)?;
            for (w, t) in crate::rollout::tally(&rollout, &commit, &hosts).into_iter().enumerate() {
                println!(
                    "{:<4} {:<20} {:>6} {:>7} {:>7} {:>8}  {}{}",
                    w + 1,
                    converge_modules::text::clip(rollout.name(w), 20),
                    t.hosts,
                    t.ran,
                    t.failed.len(),
                    t.hosts - t.ran,
                    if p.has(w) { "has it" } else { "keeps the previous commit" },
                    if t.failed.is_empty() { String::new() } else { format!(" (failed: {})", t.failed.join(", ")) }
                );
            }
            Ok(0)
        }
        RolloutAction::Promote { .. } => {
            if p.state == State::Done {
                bail!("the rollout of {short} is done: every wave has it");
            }
            let new = crate::rollout::next(&rollout, &p, now);
            let what = match new.state {
                State::Done => "every wave has it now".to_string(),
                _ => format!("wave {} ({}) gets it at its hosts' next runs", new.wave + 1, rollout.name(new.wave)),
            };
            moved(new, &what)
        }
        RolloutAction::Halt { reason, .. } => {
            if p.state != State::Rolling {
                bail!("the rollout of {short} is {}, not rolling", p.state.word());
            }
            let reason = converge_modules::text::clip(&reason, 500).into_owned();
            moved(Progress { state: State::Halted(reason), since: now, ..p.clone() }, "halted")
        }
        RolloutAction::Resume { .. } => {
            if !matches!(p.state, State::Halted(_)) {
                bail!("the rollout of {short} is {}, not halted", p.state.word());
            }
            moved(Progress { state: State::Rolling, since: now, ..p.clone() }, "rolling again")
        }
    }
}

/// `facts NODE`: what the node last reported about itself, which of those facts templates see
/// (declared in site.yaml), and a warning when its OS family contradicts its attributes.
pub fn facts(config: &Path, name: &str, json: bool) -> Result<u8> {
    use anyhow::{Context, anyhow};
    use serde_json::{Map, Value as Json};
    let (config, db) = open_db(config)?;
    let info = db.node(name)?.ok_or_else(|| anyhow!("no node {name} (converge-server node list shows them)"))?;
    let facts: Map<String, Json> = match info.facts.as_deref() {
        Some(text) => serde_json::from_str(text).with_context(|| format!("the facts stored for {name}"))?,
        None => bail!("{name} has not reported its facts yet (it does at its next run)"),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&facts)?);
        return Ok(0);
    }
    let repo = crate::repo::Repo::from_git(&config.repo, &config.branch)?;
    let compiler = crate::compiler::Compiler::new(&repo);
    let declared = compiler.site.as_ref().map(|s| s.facts.clone()).unwrap_or_default();
    println!(
        "{name}: facts reported {}, agent {}",
        when(info.row.last_seen),
        info.agent_version.as_deref().unwrap_or("?")
    );
    let width = facts.keys().map(String::len).max().unwrap_or(0);
    for (k, v) in &facts {
        let mark = match declared.get(k) {
            Some(d) => format!("   [declared: {}]", d.kind.name()),
            None => String::new(),
        };
        let value = converge_modules::text::clip(&v.to_string(), 200).into_owned();
        println!("  {k:<width$}  {}{mark}", converge_modules::text::clean(&value));
    }
    let missing: Vec<&String> = declared.keys().filter(|k| !facts.contains_key(*k)).collect();
    if !missing.is_empty() {
        println!(
            "declared but not reported (templates see their defaults): {}",
            missing.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    if let Some(w) = compiler.os_family_conflict(name, &facts) {
        println!("warning: {}", converge_modules::text::clean(&w));
        return Ok(2);
    }
    Ok(0)
}
