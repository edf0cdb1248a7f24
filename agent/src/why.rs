//! `converge why PATH|ID`: which resource of the catalog this host last applied manages a
//! path, declared on which line of which role, rendered from which template, each value it read
//! and the data layer that supplied it, at which commit, signed by which key. Answered from
//! the signed catalog the host holds, verified again, with no server.

use crate::backup::BackupStore;
use crate::fs::Root;
use crate::host::RealHost;
use crate::signed::Trust;
use crate::state::{AgentConfig, RunLock, STATE_DIR};
use anyhow::{Context, Result, anyhow};
use converge_modules::catalog::{Catalog, Kind, Resource, ResourceId};
use converge_modules::text::clean;
use std::fmt::Write;
use std::path::Path;

pub fn why(root: &Path, target: &str) -> Result<i32> {
    let root = Root::open(root).with_context(|| format!("cannot open root {}", root.display()))?;
    let lock = RunLock::take(&root, true)?;
    let host = RealHost::new(root, BackupStore::new(STATE_DIR));
    let config = AgentConfig::load(host.root())?;
    let trust = Trust::load(&host, &lock, None, config.name.clone())?;
    let envelope = trust.last_envelope(&host).ok_or_else(|| anyhow!("no catalog has been applied on this host yet"))?;
    let bytes = serde_json::to_vec(&envelope)?;
    let verified = trust
        .verify(&host, &bytes, true, true)
        .map_err(|r| anyhow!("the catalog this host applied no longer verifies ({r}): run converge"))?;
    match explain(&verified.catalog, target, &verified.signed_by) {
        Ok(text) => {
            print!("{text}");
            Ok(0)
        }
        Err(text) => {
            eprint!("{text}");
            Ok(1)
        }
    }
}

/// The resource `target` names: an id (`file:/etc/x`), else a path a path kind manages.
fn find<'c>(catalog: &'c Catalog, target: &str) -> Option<&'c Resource> {
    if !target.starts_with('/')
        && let Ok(id) = ResourceId::parse(target)
    {
        return catalog.resources.iter().find(|r| r.id == id);
    }
    let path = match target.trim_end_matches('/') {
        "" => "/",
        p => p,
    };
    catalog.resources.iter().find(|r| r.path() == Some(path))
}

/// What `why` prints for `target` (`Err`: it is not managed, and what is nearest).
pub fn explain(catalog: &Catalog, target: &str, signed_by: &str) -> Result<String, String> {
    let c = |s: &str| clean(s).into_owned();
    let Some(r) = find(catalog, target) else {
        let mut out = format!("{} is not managed by the catalog this host applied", c(target));
        // The nearest directory above it that is (a purge or a recursive owner may touch it).
        let above = target.starts_with('/').then(|| {
            catalog
                .resources
                .iter()
                .filter(|r| r.id.kind == Kind::Directory)
                .filter_map(|r| r.path().map(|p| (p, r)))
                .filter(|(p, _)| *p == "/" || target.starts_with(&format!("{p}/")))
                .max_by_key(|(p, _)| p.len())
        });
        if let Some(Some((_, dir))) = above {
            let _ = write!(out, "; the nearest managed directory above it is {}", c(&dir.id.to_string()));
            if let Some(o) = catalog.provenance.get(&dir.id.to_string()) {
                let _ = write!(out, " ({}:{})", c(&o.file), o.line);
            }
        }
        out.push('\n');
        return Err(out);
    };
    let id = r.id.to_string();
    let mut out = format!("{}\n", c(&id));
    let mut line = |label: &str, text: String| {
        let _ = writeln!(out, "  {label:<13} {text}");
    };
    match catalog.provenance.get(&id) {
        Some(o) => {
            line("declared at", format!("{}:{} (role {})", c(&o.file), o.line, c(o.role())));
            if let Some(t) = &o.template {
                line("content from", c(t));
            }
            let width = o.values.iter().map(|i| i.field.len()).max().unwrap_or(0);
            let vwidth = o.values.iter().map(|i| i.value.len()).max().unwrap_or(0);
            for (k, i) in o.values.iter().enumerate() {
                let at = i.read_at(o).map(|a| format!(" (read at {})", c(&a))).unwrap_or_default();
                let text =
                    format!("{:<width$}  {:<vwidth$}  from {}{at}", c(&i.field), c(&i.value), c(&i.from_text(o)));
                line(if k == 0 { "values" } else { "" }, text);
            }
        }
        None => line(
            "declared at",
            "unknown: this catalog carries no provenance (compiled by an older server, or for an older agent)".into(),
        ),
    }
    if let Some(s) = &catalog.source {
        line("commit", format!("{} of {}", c(&s.commit), c(&s.repository)));
    }
    let mut serial = catalog.serial.map(|s| format!("serial {s}")).unwrap_or_else(|| "no serial".into());
    if let Some(t) = catalog.issued_at {
        let _ = write!(serial, ", issued {t}");
    }
    if let Some(t) = catalog.expires_at {
        let _ = write!(serial, ", expires {t}");
    }
    line("catalog", serial);
    line("signed by", format!("key {}", c(signed_by)));
    if let Some(cf) = &r.meta.confirm {
        let check = cf.check.as_ref().map(|a| format!(", check {}", c(&a.join(" ")))).unwrap_or_default();
        line("confirm", format!("within {} s{check}", cf.within));
    }
    if !r.meta.notify.is_empty() {
        line("notifies", r.meta.notify.iter().map(|n| c(&n.to_string())).collect::<Vec<_>>().join(", "));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use converge_modules::catalog::{Input, Origin, Source};

    #[test]
    fn a_path_an_id_and_a_path_below_a_managed_directory() {
        let yaml = "format: 1\nresources:\n  - directory: /etc/app\n  - file: /etc/app/app.conf\n    content: x\n    notify: [service:app]\n  - service: app\n";
        let mut catalog = converge_modules::load::load("c.yaml", yaml, None).unwrap().catalog;
        catalog.source = Some(Source { repository: "git@example.com:ops".into(), commit: "ab".repeat(20) });
        catalog.provenance.insert(
            "file:/etc/app/app.conf".into(),
            Origin {
                file: "roles/app.yaml".into(),
                line: 7,
                template: Some("templates/app.conf.j2".into()),
                values: vec![Input {
                    field: "content".into(),
                    value: "data.app.port".into(),
                    from: "data/os/debian.yaml\x1b[2J".into(),
                    line: Some(3),
                }],
            },
        );
        let text = explain(&catalog, "/etc/app/app.conf", "k1").unwrap();
        assert!(text.starts_with("file:/etc/app/app.conf\n"), "{text}");
        assert!(text.contains("declared at   roles/app.yaml:7 (role app)"), "{text}");
        assert!(text.contains("content from  templates/app.conf.j2"), "{text}");
        assert!(text.contains("content  data.app.port  from data/os/debian.yaml"), "{text}");
        assert!(text.contains("(read at templates/app.conf.j2:3)"), "{text}");
        assert!(!text.contains('\x1b'), "what the catalog says cannot drive the terminal");
        assert!(text.contains(&format!("commit        {} of git@example.com:ops", "ab".repeat(20))), "{text}");
        assert!(text.contains("signed by     key k1") && text.contains("notifies      service:app"), "{text}");
        assert_eq!(explain(&catalog, "file:/etc/app/app.conf", "k1").unwrap(), text, "by id too");
        let service = explain(&catalog, "service:app", "k1").unwrap();
        assert!(service.contains("no provenance"), "{service}");
        let below = explain(&catalog, "/etc/app/other.conf", "k1").unwrap_err();
        assert!(below.contains("not managed") && below.contains("directory:/etc/app"), "{below}");
        assert!(!explain(&catalog, "/var/x", "k1").unwrap_err().contains("directory:"));
    }
}
