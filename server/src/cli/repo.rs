//! `compile`, `check`, `diff` and `schemas`: an operator repository, no server state.

use super::*;
use crate::cli::keys::signed;
use crate::compiler::Compiler;
use crate::repo::Repo;
use crate::{diff, site};
use converge_modules::catalog::Catalog;
use converge_modules::diag::Diagnostic;
use serde_json::{Map, Value as Json};
use std::collections::BTreeMap;

/// Reads a facts file: a map, in YAML or JSON.
pub fn read_facts(path: &Path) -> Result<Map<String, Json>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read facts {}", path.display()))?;
    let node = converge_modules::yaml::parse(&text).map_err(|e| {
        let (m, msg) = &e.problems[0];
        anyhow::anyhow!("{}:{}:{}: {msg}", path.display(), m.line, m.col)
    })?;
    match converge_modules::yaml::from_node::<Json>(&node) {
        Ok(Json::Object(m)) => Ok(m),
        Ok(Json::Null) => Ok(Map::new()),
        Ok(_) => bail!("{}: facts are a mapping of names to values", path.display()),
        Err(e) => bail!("{}: {e}", path.display()),
    }
}

/// Prints diagnostics with their source lines, paths shown under `shown` (the repository as
/// the operator named it). Each carries the nodes it occurred for, if any.
pub fn print_diagnostics(repo: &Repo, shown: &str, diags: Vec<NodeDiagnostic>) -> usize {
    let mut grouped: BTreeMap<(String, u32, u32, String), Vec<String>> = BTreeMap::new();
    for (d, nodes) in diags {
        grouped.entry((d.file, d.mark.line, d.mark.col, d.message)).or_default().extend(nodes);
    }
    let n = grouped.len();
    for ((file, line, col, message), mut nodes) in grouped {
        nodes.sort();
        nodes.dedup();
        let mut message = message;
        if !nodes.is_empty() {
            let more = if nodes.len() > 3 { format!(" and {} more", nodes.len() - 3) } else { String::new() };
            message = format!("{message} [node {}{more}]", nodes.into_iter().take(3).collect::<Vec<_>>().join(", "));
        }
        let d = Diagnostic::new(format!("{shown}/{file}"), converge_modules::diag::Mark::new(line, col), message);
        let source = repo.text(&file).and_then(Result::ok);
        eprintln!("{}\n", d.render(source));
    }
    n
}

/// The compiler of `repo`, with the secrets key when one is given.
fn compiler(repo: &Repo, key: Option<&Path>) -> Result<Compiler> {
    let key = key.map(crate::secrets::SecretsKey::read).transpose()?.map(std::sync::Arc::new);
    Ok(Compiler::with_key(repo, key))
}

pub fn compile(
    dir: &Path,
    node: &str,
    facts: Option<&Path>,
    format: Format,
    signing: &Signing,
    key: Option<&Path>,
) -> Result<u8> {
    let repo = Repo::from_dir(dir)?;
    let facts = facts.map(read_facts).transpose()?.unwrap_or_default();
    let compiler = compiler(&repo, key)?;
    let shown = dir.display().to_string();
    let catalog = match compiler.compile(node, &facts) {
        Ok(c) if compiler.problems.is_empty() => c,
        result => {
            let mut diags: Vec<_> = compiler.problems.iter().cloned().map(|d| (d, vec![])).collect();
            if let Err(e) = result {
                diags.extend(e.into_iter().map(|d| (d, vec![])));
            }
            let n = print_diagnostics(&repo, &shown, diags);
            bail!("{n} problem{} in {shown}; no catalog for {node}", if n == 1 { "" } else { "s" });
        }
    };
    if let Some(key) = &signing.sign {
        if !catalog.sealed.is_empty() {
            bail!(
                "the catalog of {node} holds secrets ({} sealed values): only `converge-server serve` signs it, \
                 sealing them to the host's own key",
                catalog.sealed.len()
            );
        }
        let envelope = signed(catalog, key, signing.keys.as_deref(), None, &signing.ttl)?;
        print!("{envelope}");
        return Ok(0);
    }
    let text = match format {
        Format::Yaml => yaml_serde::to_string(&catalog).context("cannot write YAML")?,
        Format::Json => serde_json::to_string_pretty(&catalog).context("cannot write JSON")? + "\n",
    };
    print!("{text}");
    Ok(0)
}

/// Compiles every node; returns the catalogs that compiled and every diagnostic (with the
/// nodes it came from).
pub fn compile_all(
    repo: &Repo,
    facts_for: &dyn Fn(&str) -> Result<Map<String, Json>>,
    only: Option<&str>,
    key: Option<&Path>,
) -> Result<(BTreeMap<String, Catalog>, Vec<NodeDiagnostic>)> {
    let compiler = compiler(repo, key)?;
    let names: Vec<String> =
        node_names(&compiler).into_iter().filter(|n| only.is_none_or(|p| site::glob_match(p, n))).collect();
    compile_names(&compiler, &names, facts_for)
}

/// The names a repository's site compiles (see [`site::Site::node_names`]).
fn node_names(compiler: &Compiler) -> Vec<String> {
    compiler.site.as_ref().map(|s| s.node_names()).unwrap_or_default()
}

/// Compiles `names`; returns the catalogs that compiled and every diagnostic (the
/// repository's own, and each node's with its name).
fn compile_names(
    compiler: &Compiler,
    names: &[String],
    facts_for: &dyn Fn(&str) -> Result<Map<String, Json>>,
) -> Result<(BTreeMap<String, Catalog>, Vec<NodeDiagnostic>)> {
    let mut diags: Vec<_> = compiler.problems.iter().cloned().map(|d| (d, vec![])).collect();
    let mut catalogs = BTreeMap::new();
    for name in names {
        match compiler.compile(name, &facts_for(name)?) {
            Ok(c) => {
                catalogs.insert(name.clone(), c);
            }
            Err(e) => diags.extend(e.into_iter().map(|d| (d, vec![name.clone()]))),
        }
    }
    Ok((catalogs, diags))
}

pub fn check(dir: &Path, facts_dir: Option<&Path>, key: Option<&Path>) -> Result<u8> {
    let repo = Repo::from_dir(dir)?;
    let facts_for = |node: &str| -> Result<Map<String, Json>> {
        let Some(fd) = facts_dir else { return Ok(Map::new()) };
        for ext in ["yaml", "yml", "json"] {
            let p = fd.join(format!("{node}.{ext}"));
            if p.exists() {
                return read_facts(&p);
            }
        }
        Ok(Map::new())
    };
    let (catalogs, diags) = compile_all(&repo, &facts_for, None, key)?;
    let shown = dir.display().to_string();
    if diags.is_empty() {
        let resources: usize = catalogs.values().map(|c| c.resources.len()).sum();
        let n = catalogs.len();
        println!("{shown}: {n} node{} compiled, {resources} resources, no problems", if n == 1 { "" } else { "s" });
        return Ok(0);
    }
    let n = print_diagnostics(&repo, &shown, diags);
    eprintln!("{shown}: {n} problem{}", if n == 1 { "" } else { "s" });
    Ok(1)
}

/// Every node either side names is compiled on both sides, each through its own site: a node
/// named exactly on one side and matched by a pattern on the other (moved to an entry of its
/// own) shows only what changes for it. A node no entry of one side matches is said to appear
/// or go, not listed as every resource added or removed.
pub fn diff(dir: &Path, from: &str, to: Option<&str>, only: Option<&str>, key: Option<&Path>) -> Result<u8> {
    let no_facts = |_: &str| Ok(Map::new());
    let after = match to {
        Some(rev) => Repo::from_git(dir, rev)?,
        None => Repo::from_dir(dir)?,
    };
    let to_is_tree = to.is_none();
    let to = to.unwrap_or("the working tree");
    let repos = [Repo::from_git(dir, from)?, after];
    let compilers = [compiler(&repos[0], key)?, compiler(&repos[1], key)?];
    let mut names: Vec<String> =
        compilers.iter().flat_map(node_names).filter(|n| only.is_none_or(|p| site::glob_match(p, n))).collect();
    names.sort();
    names.dedup();
    let mut sides = Vec::new();
    for (side, ((compiler, repo), rev)) in compilers.iter().zip(&repos).zip([from, to]).enumerate() {
        let here: Vec<String> =
            names.iter().filter(|n| compiler.site.as_ref().is_some_and(|s| s.knows(n))).cloned().collect();
        let (catalogs, diags) = compile_names(compiler, &here, &no_facts)?;
        if !diags.is_empty() {
            // A revision's files as REV:PATH (as git names them), the working tree's by path.
            let shown = if side == 1 && to_is_tree { dir.display().to_string() } else { format!("{rev}:") };
            let n = print_diagnostics(repo, &shown, diags);
            bail!("{n} problem{} at {rev}; fix them before comparing", if n == 1 { "" } else { "s" });
        }
        sides.push(catalogs);
    }
    let (a, b) = (&sides[0], &sides[1]);
    let mut differ = 0;
    for node in &names {
        let text = match (a.get(node), b.get(node)) {
            (None, None) => continue,
            (None, Some(c)) => format!("node {node}: new at {to} ({} resources)\n", c.resources.len()),
            (Some(c), None) => format!("node {node}: gone at {to} (it had {} resources)\n", c.resources.len()),
            (Some(x), Some(y)) => {
                let d = diff::diff(x, y, (from, to));
                if d.is_empty() {
                    continue;
                }
                diff::render(node, &d)
            }
        };
        differ += 1;
        print!("{text}");
    }
    println!("{differ} of {} nodes change between {from} and {to}", names.len());
    Ok(if differ > 0 { 2 } else { 0 })
}

/// `lookup NODE KEY [--explain]`: the value of a data key for a node, as templates see it;
/// with `explain`, each level of the node's hierarchy and what it says (Puppet's
/// `lookup --explain`).
pub fn lookup(dir: &Path, node: &str, key: &str, explain: bool) -> Result<u8> {
    let repo = Repo::from_dir(dir)?;
    let compiler = Compiler::new(&repo);
    let found = compiler.lookup(node, key).map_err(|e| anyhow::anyhow!("{node}: {e}"))?;
    let show = |v: &minijinja::Value| serde_json::to_string(v).unwrap_or_else(|_| v.to_string());
    let mut out = String::new();
    match &found.value {
        Some(v) => out.push_str(&format!("{node}: {key} = {}\n", show(v))),
        None => out.push_str(&format!("{node}: {key} is not set at any level\n")),
    }
    if explain {
        out.push_str(
            "the levels of its data hierarchy, lowest precedence first (later levels win; maps merge deeply):\n",
        );
        let last = found.levels.iter().rposition(|l| l.value.is_some());
        let is_map = found.value.as_ref().is_some_and(|v| v.kind() == minijinja::value::ValueKind::Map);
        for (i, l) in found.levels.iter().enumerate() {
            let place = match (&l.file, l.line) {
                (Some(f), Some(line)) => format!("{f}:{line}"),
                (Some(f), None) => f.clone(),
                (None, _) => format!("data/{}.yaml (no such file)", l.level),
            };
            let said = match &l.value {
                Some(v) if Some(i) == last && !is_map => format!("{}   <- this one", show(v)),
                Some(v) => show(v),
                None => "-".into(),
            };
            out.push_str(&format!("  {:>2}. {place:<50} {said}\n", i + 1));
        }
        if let Some((file, v)) = &found.default {
            let mark = if last.is_none() { "   <- this one (no level sets it)" } else { "" };
            out.push_str(&format!("      {:<50} {}{mark}\n", format!("{file} (the role's default)"), show(v)));
        }
        if is_map && last.is_some() {
            out.push_str("  a map: every level that sets it is merged into it, key by key\n");
        }
        for level in &found.unused {
            out.push_str(&format!("  not a level of {node}: {level} (the node has no such attribute)\n"));
        }
    }
    // Keys and values come from the repository: each line escaped, so none drives the terminal.
    for line in out.lines() {
        println!("{}", converge_modules::text::clean(line));
    }
    Ok(if found.value.is_some() { 0 } else { 1 })
}

pub fn schemas(out: &Path, modelines: Option<&Path>) -> Result<u8> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for (name, text) in crate::schemas::all() {
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if let Some(repo) = modelines {
        let n = point_at_schemas(repo, out)?;
        println!("{n} files of {} point at their schema in {}", repo.display(), out.display());
    }
    Ok(0)
}

/// `to` as a path relative to the directory `from` (both made absolute first).
fn relative(from: &Path, to: &Path) -> Result<PathBuf> {
    let (from, to) = (std::fs::canonicalize(from)?, std::fs::canonicalize(to)?);
    let (a, b): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..a.len() {
        out.push("..");
    }
    for c in &b[common..] {
        out.push(c);
    }
    Ok(out)
}

/// Puts (or replaces) the `yaml-language-server` modeline at the top of site.yaml, each role
/// and each data file (not secrets) of `repo`, pointing at the schemas in `out`; each file
/// replaced atomically, its mode kept. Returns how many files point there.
fn point_at_schemas(repo: &Path, out: &Path) -> Result<usize> {
    let mut files = vec![(repo.join("site.yaml"), "site.schema.json")];
    fn walk(dir: &Path, schema: &'static str, files: &mut Vec<(PathBuf, &'static str)>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() && !p.ends_with("secrets") {
                walk(&p, schema, files);
            } else if t.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                files.push((p, schema));
            }
        }
    }
    walk(&repo.join("roles"), "role.schema.json", &mut files);
    walk(&repo.join("data"), "data.schema.json", &mut files);
    let mut n = 0;
    for (file, schema) in files.into_iter().filter(|(f, _)| f.is_file()) {
        let dir = file.parent().unwrap_or(repo);
        let target = relative(dir, out)?.join(schema);
        let line = format!("# yaml-language-server: $schema={}", target.display());
        let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let body = match text.split_once('\n') {
            Some((first, rest)) if first.starts_with("# yaml-language-server:") => rest,
            _ if text.starts_with("# yaml-language-server:") => "",
            _ => text.as_str(),
        };
        let new = format!("{line}\n{body}");
        if new != text {
            let tmp = tempfile::NamedTempFile::new_in(dir)?;
            std::fs::write(tmp.path(), &new)?;
            std::fs::set_permissions(tmp.path(), std::fs::metadata(&file)?.permissions())?;
            tmp.persist(&file).with_context(|| format!("cannot replace {}", file.display()))?;
        }
        n += 1;
    }
    Ok(n)
}
