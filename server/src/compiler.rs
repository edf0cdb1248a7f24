//! The compiler: an operator repository in, one catalog per node out.
//!
//! `Compiler::new` parses the whole repository once (site.yaml, roles, data, templates) and
//! reports what is wrong with it whatever the node. `compile` is then a pure function of the
//! node name and its facts: classify -> resolve roles (includes first, cycles refused) ->
//! merge data (the hierarchy of site.yaml, later wins, maps merged deeply) -> params -> render
//! -> decode -> merge, check and plan (as every catalog is). A `Compiler` is immutable and
//! shared by threads.
//!
//! One value model from data to render: site attributes, role params and data files are read
//! from YAML straight into template values (`minijinja::Value`), merged and rendered as such;
//! only a host's facts (JSON from the wire) are converted, once per compile.

use crate::repo::Repo;
use crate::role::{self, Expr, Role, TNode};
use crate::secrets::SecretsKey;
use crate::site::{FactDecl, Site};
use converge_modules::catalog::Resource;
use converge_modules::catalog::{Catalog, FORMAT_SEALED, Input, Origin, Source};
use converge_modules::diag::{Diagnostic, Mark};
use converge_modules::load::{check_declared, decode_resource};
use converge_modules::sealed::{Field, Sealed};
use converge_modules::yaml::{self, Node, Spanned, Value as YValue};
use minijinja::value::ValueKind;
use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value};
use serde_json::{Map, Value as Json};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

pub const SITE: &str = "site.yaml";

/// The values a template reads (`data.nginx.port`), each with the first line naming it.
type Names = Arc<Vec<(String, Option<u32>)>>;

pub struct Compiler {
    pub source: Option<Source>,
    pub site: Option<Site>,
    roles: BTreeMap<String, Role>,
    /// `data/` files by level path (`os/debian`), with their file names and text (for
    /// `lookup --explain`, which names lines).
    data: BTreeMap<String, (Arc<str>, Value, Arc<str>)>,
    /// `data/secrets/` files by level path.
    secret_files: BTreeMap<String, Arc<str>>,
    /// The values each template names (`data.nginx.port`), read from its source once: the
    /// provenance of what a field read.
    names: Mutex<std::collections::HashMap<String, Names>>,
    /// `files/` by path under it.
    files: BTreeMap<String, Vec<u8>>,
    /// The blobs catalogs may name: the SHA-256 of each file under `files/` that travels as
    /// one (binary, or larger than [`MAX_INLINE`]), and its path.
    blobs: BTreeMap<String, String>,
    /// `data/secrets/` by level path: each name's value, opened with the server's secrets
    /// key, or (compiled without it) a placeholder that names it.
    secrets: BTreeMap<String, BTreeMap<String, Value>>,
    /// The server's secrets key, when compiling with it: the key of sealed values'
    /// fingerprints.
    key: Option<Arc<SecretsKey>>,
    env: Environment<'static>,
    /// Problems of the repository itself, found whatever the node.
    pub problems: Vec<Diagnostic>,
    /// Role files and templates that are there but could not be read (`roles/NAME`,
    /// `templates/NAME`), with their first error: what a use of one reports instead of
    /// "unknown" or "not found", so that one mistake is one error.
    broken: BTreeMap<String, Diagnostic>,
}

/// The environment every template renders in: undefined values are errors, never empty
/// strings; output is never HTML-escaped; a template's final newline is kept; a block tag's
/// own newline is dropped (as Ansible does).
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .keep_trailing_newline(true)
        .trim_blocks(true)
        .build()
        .expect("default delimiters");
    env.set_syntax(syntax);
    crate::filters::register(&mut env);
    env
}

impl Compiler {
    /// A compiler without the secrets key (`check`, `diff`, CI): each secret compiles as a
    /// placeholder naming it and its ciphertext.
    pub fn new(repo: &Repo) -> Compiler {
        Compiler::with_key(repo, None)
    }

    /// A compiler that opens the repository's secrets with `key` (in memory only).
    pub fn with_key(repo: &Repo, key: Option<Arc<SecretsKey>>) -> Compiler {
        let mut env = environment();
        let mut problems = Vec::new();
        let text = |path: &str, problems: &mut Vec<Diagnostic>| match repo.text(path) {
            Some(Ok(t)) => Some(t.to_string()),
            Some(Err(e)) => {
                problems.push(Diagnostic::new(path, Mark::UNKNOWN, e));
                None
            }
            None => None,
        };
        // What is there but broken: its own error is the one error (a use of it is not also
        // "not found" or "unknown").
        let mut broken = BTreeMap::new();
        for path in repo.under("templates") {
            let Some(source) = text(path, &mut problems) else { continue };
            let name = path["templates/".len()..].to_string();
            if let Err(e) = env.add_template_owned(name.clone(), source.clone()) {
                let d = template_error(&e, path, &source, None);
                broken.insert(format!("templates/{name}"), d.clone());
                problems.push(d);
            }
        }
        let site = match text(SITE, &mut problems) {
            None => {
                problems.push(Diagnostic::new(SITE, Mark::UNKNOWN, "the repository has no site.yaml"));
                None
            }
            Some(t) => parse_yaml::<Site>(SITE, &t, &mut problems),
        };
        let mut roles = BTreeMap::new();
        for path in repo.under("roles").filter(|p| p.ends_with(".yaml") || p.ends_with(".yml")) {
            let Some(source) = text(path, &mut problems) else { continue };
            let name = path["roles/".len()..].trim_end_matches(".yaml").trim_end_matches(".yml").to_string();
            let before = problems.len();
            match role::parse(&name, Arc::from(path), &source, &mut env, &mut problems) {
                Some(r) => {
                    roles.insert(name, r);
                }
                None => {
                    let d = problems.get(before).cloned();
                    broken.insert(
                        format!("roles/{name}"),
                        d.unwrap_or_else(|| Diagnostic::new(path, Mark::UNKNOWN, "cannot be read")),
                    );
                }
            }
        }
        let mut data = BTreeMap::new();
        let secrets_dir = format!("{}/", crate::secrets::DIR);
        let yaml_file = |p: &&str| p.ends_with(".yaml") || p.ends_with(".yml");
        let mut secrets = BTreeMap::new();
        let mut secret_files = BTreeMap::new();
        for path in repo.under(crate::secrets::DIR).filter(yaml_file) {
            let Some(source) = text(path, &mut problems) else { continue };
            let level = path[secrets_dir.len()..].trim_end_matches(".yaml").trim_end_matches(".yml").to_string();
            match crate::secrets::parse(&source) {
                Err((m, msg)) => problems.push(Diagnostic::new(path, m, msg)),
                Ok(entries) => {
                    let opened = entries.into_iter().filter_map(|(name, mark, armored)| {
                        match open_secret(key.as_deref(), &name, &armored) {
                            Ok(v) => Some((name, v)),
                            Err(msg) => {
                                problems.push(Diagnostic::new(path, mark, msg));
                                None
                            }
                        }
                    });
                    secret_files.insert(level.clone(), Arc::from(path));
                    secrets.insert(level, opened.collect());
                }
            }
        }
        for path in repo.under("data").filter(yaml_file).filter(|p| !p.starts_with(&secrets_dir)) {
            let Some(source) = text(path, &mut problems) else { continue };
            let level = path["data/".len()..].trim_end_matches(".yaml").trim_end_matches(".yml").to_string();
            match yaml::parse(&source) {
                Err(e) => problems.extend(e.problems.into_iter().map(|(m, msg)| Diagnostic::new(path, m, msg))),
                Ok(node) => {
                    check_param_overrides(path, &node, &roles, &broken, &mut problems);
                    match yaml::from_node::<Value>(&node) {
                        Ok(v) if v.kind() == ValueKind::Map => {
                            data.insert(level, (Arc::from(path), v, Arc::from(source.as_str())));
                        }
                        Ok(v) if v.is_none() => {}
                        Ok(_) => problems.push(Diagnostic::new(
                            path,
                            node.mark,
                            "a data file is a mapping of names to values",
                        )),
                        Err(e) => problems
                            .extend(e.0.into_iter().map(|(m, msg)| Diagnostic::new(path, m.unwrap_or(node.mark), msg))),
                    }
                }
            }
        }
        let files: BTreeMap<String, Vec<u8>> =
            repo.under("files").map(|p| (p["files/".len()..].to_string(), repo.files[p].clone())).collect();
        let blobs = files
            .iter()
            .filter(|(_, bytes)| travels_as_blob(bytes))
            .map(|(path, bytes)| (converge_modules::hash::sha256_hex(bytes), path.clone()))
            .collect();
        let mut compiler = Compiler {
            blobs,
            source: repo.source.clone(),
            site,
            roles,
            data,
            secret_files,
            names: Mutex::default(),
            files,
            secrets,
            key,
            env,
            problems,
            broken,
        };
        compiler.check_roles();
        compiler
    }

    /// Role references that cannot resolve, whatever the node: unknown roles and include cycles;
    /// and what is wrong with the rollout waves.
    fn check_roles(&mut self) {
        let mut problems = Vec::new();
        if let Some(rollout) = self.site.as_ref().and_then(|s| s.rollout.as_ref()) {
            problems.extend(rollout.problems().into_iter().map(|(m, msg)| Diagnostic::new(SITE, m, msg)));
        }
        if let Some(site) = &self.site {
            problems.extend(site.pin_problems().into_iter().map(|(m, msg)| Diagnostic::new(SITE, m, msg)));
            problems.extend(site.pattern_ties().into_iter().map(|(_, _, m, msg)| Diagnostic::new(SITE, m, msg)));
            problems.extend(site.unused_levels().into_iter().map(|(m, msg)| Diagnostic::new(SITE, m, msg)));
        }
        if let Some(site) = &self.site {
            for entry in site.nodes.values() {
                for r in &entry.value.roles {
                    if !self.roles.contains_key(&r.value) {
                        problems.push(self.no_role(SITE, r.mark, &r.value));
                    }
                }
            }
        }
        for role in self.roles.values() {
            for inc in &role.head.include {
                if !self.roles.contains_key(&inc.value) {
                    problems.push(self.no_role(&role.file, inc.mark, &inc.value));
                }
            }
            let (_, d) = self.order(&[Spanned { mark: Mark::UNKNOWN, value: role.name.clone() }]);
            problems.extend(d.into_iter().filter(|d| d.message.starts_with("include cycle")));
        }
        problems.sort_by(|a, b| (&a.file, a.mark, &a.message).cmp(&(&b.file, b.mark, &b.message)));
        problems.dedup();
        self.problems.extend(problems);
    }

    /// A use of the role `name` that cannot resolve at `mark` of `file`: unknown, or (there but
    /// broken) the role file's own error again, which `check` tells once.
    fn no_role(&self, file: &str, mark: Mark, name: &str) -> Diagnostic {
        match self.broken.get(&format!("roles/{name}")) {
            Some(d) => d.clone(),
            None => Diagnostic::new(file, mark, self.unknown_role(name)),
        }
    }

    fn unknown_role(&self, name: &str) -> String {
        let known: Vec<&str> = self.roles.keys().map(String::as_str).collect();
        format!(
            "unknown role `{name}` (roles: {})",
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        )
    }

    /// The roles to converge, included roles first, each once; and the problems of the ones
    /// that cannot be (unknown, or in an include cycle).
    fn order(&self, wanted: &[Spanned<String>]) -> (Vec<&Role>, Vec<Diagnostic>) {
        fn visit<'c>(
            c: &'c Compiler,
            name: &Spanned<String>,
            from: &str,
            stack: &mut Vec<String>,
            done: &mut Vec<&'c Role>,
            diags: &mut Vec<Diagnostic>,
        ) {
            let Some(role) = c.roles.get(&name.value) else {
                diags.push(c.no_role(from, name.mark, &name.value));
                return;
            };
            if let Some(pos) = stack.iter().position(|s| *s == name.value) {
                // Told once, from its first member by name, whichever role led into it.
                let mut cycle = stack[pos..].to_vec();
                let first = (0..cycle.len()).min_by_key(|&i| &cycle[i]).unwrap_or(0);
                cycle.rotate_left(first);
                cycle.push(cycle[0].clone());
                let closing = &c.roles[&cycle[cycle.len() - 2]];
                let mark = closing.head.include.iter().find(|i| i.value == cycle[0]).map_or(name.mark, |i| i.mark);
                let msg = format!("include cycle: {}", cycle.join(" -> "));
                if !diags.iter().any(|d| d.message == msg) {
                    diags.push(Diagnostic::new(&*closing.file, mark, msg));
                }
                return;
            }
            if done.iter().any(|r| r.name == name.value) {
                return;
            }
            stack.push(name.value.clone());
            for inc in &role.head.include {
                visit(c, inc, &role.file, stack, done, diags);
            }
            stack.pop();
            done.push(role);
        }
        let (mut done, mut diags) = (Vec::new(), Vec::new());
        for w in wanted {
            visit(self, w, SITE, &mut Vec::new(), &mut done, &mut diags);
        }
        (done, diags)
    }

    /// The declared facts: reported values of the declared type, else defaults.
    fn facts(&self, site: &Site, reported: &Map<String, Json>) -> Result<Map<String, Json>, Vec<Diagnostic>> {
        let mut out = Map::new();
        let mut diags = Vec::new();
        for (name, FactDecl { kind, default }) in &site.facts {
            match (reported.get(name), default) {
                (Some(v), _) if kind.accepts(v) => {
                    out.insert(name.clone(), v.clone());
                }
                (Some(v), _) => diags.push(Diagnostic::new(
                    SITE,
                    Mark::UNKNOWN,
                    format!("fact `{name}` is declared {} but the host reported {v}", kind.name()),
                )),
                (None, Some(d)) => {
                    out.insert(name.clone(), d.clone());
                }
                (None, None) => diags.push(Diagnostic::new(
                    SITE,
                    Mark::UNKNOWN,
                    format!("fact `{name}` was not reported and has no default in site.yaml"),
                )),
            }
        }
        if diags.is_empty() { Ok(out) } else { Err(diags) }
    }

    /// The node's levels of the data hierarchy, lowest precedence first.
    fn levels(site: &Site, node: &str, attributes: &BTreeMap<String, Value>, roles: &[&Role]) -> Vec<String> {
        let mut out = Vec::new();
        for level in &site.data {
            let variants: Vec<String> = if level.value.contains("{role}") {
                roles.iter().map(|r| level.value.replace("{role}", &r.name)).collect()
            } else {
                vec![level.value.clone()]
            };
            out.extend(variants.iter().filter_map(|path| expand(path, node, attributes)));
        }
        out
    }

    /// The node's data: every level of the hierarchy that exists, merged in order.
    fn data_for(&self, levels: &[String]) -> Value {
        let mut merged = Value::from(BTreeMap::<String, Value>::new());
        for v in levels.iter().filter_map(|l| self.data.get(l)) {
            merged = deep_merge(&merged, &v.1);
        }
        merged
    }

    /// The node's secrets: by name, from the last level of the hierarchy that has each.
    fn secrets_for(&self, levels: &[String]) -> Arc<SecretsView> {
        let mut values = BTreeMap::new();
        for level in levels.iter().filter_map(|l| self.secrets.get(l)) {
            values.extend(level.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        Arc::new(SecretsView { values, read: Mutex::new(BTreeSet::new()) })
    }

    /// Compiles the catalog of `node` with the facts it reported. Its sealed values are
    /// fingerprinted and left unsealed ([`Compiler::compile_open`] gives them too).
    pub fn compile(&self, node: &str, reported: &Map<String, Json>) -> Result<Catalog, Vec<Diagnostic>> {
        self.compile_open(node, reported).map(|(c, _)| c)
    }

    /// Takes the sensitive fields out of the resources into `sealed`, each with its
    /// fingerprint, and the values beside (in `sealed`'s order).
    fn seal_out(&self, node: &str, mut catalog: Catalog) -> (Catalog, Opened) {
        let mut opened = Vec::new();
        for r in &mut catalog.resources {
            for (field, value) in converge_modules::sealed::take_fields(r) {
                let id = r.id.to_string();
                let parts = [node.as_bytes(), id.as_bytes(), field.name().as_bytes(), value.as_bytes()];
                let fingerprint = crate::secrets::fingerprint(self.key.as_deref(), &parts);
                catalog.sealed.push(Sealed { resource: r.id.clone(), field, fingerprint });
                opened.push(zeroize::Zeroizing::new(value));
            }
        }
        if !catalog.sealed.is_empty() {
            catalog.format = FORMAT_SEALED;
        }
        (catalog, Opened { values: opened, placeholders: self.key.is_none() })
    }

    /// [`Compiler::compile`], and the values of its sealed fields, to seal to the host.
    pub fn compile_open(&self, node: &str, reported: &Map<String, Json>) -> Result<(Catalog, Opened), Vec<Diagnostic>> {
        self.compile_unhinted(node, reported).map_err(|mut diags| {
            for d in &mut diags {
                d.message.push_str(&self.undefined_hint(node, &d.message));
            }
            diags
        })
    }

    /// A node whose reported OS family is not the one its attributes choose its data by (its
    /// data then comes from the other family's files): what to say, if so.
    pub fn os_family_conflict(&self, node: &str, reported: &Map<String, Json>) -> Option<String> {
        let site = self.site.as_ref()?;
        let (_, entry) = site.classify(node).ok()?;
        let chosen = entry.value.attributes.get("os_family").or_else(|| site.attributes.get("os_family"))?;
        let chosen = chosen.as_str()?;
        let facts = reported.get("os_family")?.as_str()?;
        (facts != chosen).then(|| {
            format!(
                "{node} reports os_family `{facts}`, but its attributes choose `{chosen}` (site.yaml): its data comes \
                 from the `{chosen}` levels; set `os_family: {facts}` on its entry if the host is right"
            )
        })
    }

    /// What a template that read an undefined value most likely meant: a fact to declare, a
    /// data key or param spelt otherwise.
    fn undefined_hint(&self, node: &str, message: &str) -> String {
        let Some(name) = message.strip_prefix('`').and_then(|m| m.split_once("` is undefined")).map(|(n, _)| n) else {
            return String::new();
        };
        let Some(site) = &self.site else { return String::new() };
        let close =
            |word: &str, known: Vec<&str>| known.into_iter().find(|k| yaml::similar_name(word, k)).map(str::to_string);
        let mut parts = name.split('.');
        match parts.next() {
            Some("facts") => {
                let Some(fact) = parts.next() else { return String::new() };
                if site.facts.contains_key(fact) {
                    return String::new();
                }
                match close(fact, site.facts.keys().map(String::as_str).collect()) {
                    Some(k) => format!(" (did you mean `facts.{k}`?)"),
                    None => format!(
                        "; `{fact}` is not a declared fact: declare it in site.yaml under `facts:` (its type and \
                         default), templates see only declared facts"
                    ),
                }
            }
            Some("data") => {
                let Ok((_, entry)) = site.classify(node) else { return String::new() };
                let (roles, _) = self.order(&entry.value.roles);
                let mut attributes: BTreeMap<String, Value> = site.attributes.clone();
                attributes.extend(entry.value.attributes.clone());
                let mut v = self.data_for(&Compiler::levels(site, node, &attributes, &roles));
                let mut path = vec!["data"];
                for key in parts {
                    match v.get_attr(key).ok().filter(|x| !x.is_undefined()) {
                        Some(next) => v = next,
                        None => {
                            let keys: Vec<String> =
                                v.try_iter().map(|i| i.map(|k| k.to_string()).collect()).unwrap_or_default();
                            let at = path.join(".");
                            return match close(key, keys.iter().map(String::as_str).collect()) {
                                Some(k) => format!(" (did you mean `{at}.{k}`?)"),
                                None => format!(
                                    "; no data level sets `{at}.{key}` (`converge-server lookup NODE {} --explain` \
                                     shows each level of a node)",
                                    format!("{at}.{key}").trim_start_matches("data.")
                                ),
                            };
                        }
                    }
                    path.push(key);
                }
                String::new()
            }
            Some("params") => {
                let Some(p) = parts.next() else { return String::new() };
                let known = self.roles.values().flat_map(|r| r.head.params.keys().map(String::as_str)).collect();
                close(p, known).map(|k| format!(" (did you mean `params.{k}`?)")).unwrap_or_default()
            }
            _ => String::new(),
        }
    }

    fn compile_unhinted(&self, node: &str, reported: &Map<String, Json>) -> Result<(Catalog, Opened), Vec<Diagnostic>> {
        let Some(site) = &self.site else {
            return Err(vec![Diagnostic::new(SITE, Mark::UNKNOWN, "site.yaml could not be read; see its errors")]);
        };
        let (_, entry) = site.classify(node).map_err(|m| {
            // A tie `check` finds for the patterns themselves is that one error, not two.
            let tie = site
                .pattern_ties()
                .into_iter()
                .find(|(a, b, _, _)| m.contains(&format!("`{a}`")) && m.contains(&format!("`{b}`")));
            vec![match tie {
                Some((_, _, mark, msg)) => Diagnostic::new(SITE, mark, msg),
                None => Diagnostic::new(SITE, Mark::UNKNOWN, m),
            }]
        })?;
        let (roles, mut diags) = self.order(&entry.value.roles);
        let mut attributes: BTreeMap<String, Value> = site.attributes.clone();
        attributes.extend(entry.value.attributes.clone());
        let facts = match self.facts(site, reported) {
            Ok(f) => f,
            Err(d) => {
                diags.extend(d);
                return Err(diags);
            }
        };
        let levels = Compiler::levels(site, node, &attributes, &roles);
        let data = self.data_for(&levels);
        let secrets = self.secrets_for(&levels);
        let secrets_v = Value::from_dyn_object(secrets.clone());
        let mut node_v = attributes;
        node_v.insert("name".into(), Value::from(node));
        node_v.insert("roles".into(), roles.iter().map(|r| Value::from(r.name.as_str())).collect());
        // The facts are the one input that arrives as JSON: made template values once.
        let (node_v, facts_v) = (Value::from(node_v), Value::from(minijinja::value::Serde(&facts)));
        let overrides = data.get_attr("params").ok().filter(|v| !v.is_undefined());
        let data_v = data;

        let mut declared = Vec::new();
        let mut provenance = BTreeMap::new();
        let mut origins: Vec<(Arc<str>, Mark)> = Vec::new();
        let mut broken = HashSet::new();
        for role in roles {
            let mut params: BTreeMap<String, Value> = role.head.params.clone();
            // Only declared params take values from data (others are reported by `new`).
            if let Some(o) = overrides.as_ref().and_then(|p| p.get_attr(&role.name).ok())
                && o.kind() == ValueKind::Map
                && let Ok(keys) = o.try_iter()
            {
                for k in keys {
                    if let Some(name) = k.as_str().filter(|n| role.head.params.contains_key(*n)) {
                        params.insert(name.to_string(), o.get_item(&k).unwrap_or_default());
                    }
                }
            }
            let ctx = |item: Option<Value>| {
                let mut pairs = vec![
                    ("node", node_v.clone()),
                    ("facts", facts_v.clone()),
                    ("data", data_v.clone()),
                    ("params", Value::from(params.clone())),
                    ("secrets", secrets_v.clone()),
                ];
                pairs.extend(item.map(|i| ("item", i)));
                Value::from_pairs(pairs)
            };
            let base = ctx(None);
            for rt in &role.resources {
                let place = |mark: Mark, msg: String| Diagnostic::new(&*role.file, mark, msg);
                if let Some(w) = &rt.when {
                    match self.eval(w, &base) {
                        Ok(v) if !v.is_true() => continue,
                        Ok(_) => {}
                        Err(e) => {
                            diags.push(place(w.mark, e));
                            continue;
                        }
                    }
                }
                // A condition may read a secret (it yields one bit, which decides nothing
                // about the value); the items of a loop may not (they go anywhere).
                secrets.take_read();
                let items: Vec<Option<Value>> = match &rt.for_each {
                    None => vec![None],
                    Some(e) => match self.eval(e, &base).and_then(|v| iterate(&v)) {
                        Ok(_) if !secrets.take_read().is_empty() => {
                            diags.push(place(
                                e.mark,
                                "`for_each` cannot read secrets: read them in the field that needs one".into(),
                            ));
                            continue;
                        }
                        Ok(items) => items.into_iter().map(Some).collect(),
                        Err(msg) => {
                            diags.push(place(e.mark, msg));
                            continue;
                        }
                    },
                };
                for item in items {
                    let ctx = if item.is_some() { ctx(item) } else { base.clone() };
                    let mut tainted = BTreeMap::new();
                    let mut inlined = Inlined::default();
                    let rendered = self
                        .render_fields(&rt.body, &ctx, role, &secrets, &mut tainted)
                        .and_then(|n| self.inline_content(n, &ctx, role, &secrets, &mut tainted, &mut inlined));
                    let node = match rendered {
                        Ok(n) => n,
                        Err(d) => {
                            diags.push(d);
                            continue;
                        }
                    };
                    match decode_resource(node) {
                        Ok(mut r) => {
                            if let Some(c) = role.head.confirm.as_ref().filter(|_| r.id.kind.is_path()) {
                                r.meta.confirm.get_or_insert_with(|| c.clone());
                            }
                            if let Err(e) = taint(&mut r, &tainted) {
                                diags.extend(e.into_iter().map(|(m, msg)| place(m, msg)));
                                continue;
                            }
                            let origin = self.origin(role, rt, inlined.template, &levels);
                            let children = match &inlined.tree {
                                Some((m, source)) => match self.tree(&r, source) {
                                    Ok(c) => c,
                                    Err(msg) => {
                                        diags.push(place(*m, msg));
                                        continue;
                                    }
                                },
                                None => Vec::new(),
                            };
                            for c in children.into_iter() {
                                provenance.entry(c.id.to_string()).or_insert_with(|| origin.clone());
                                declared.push(c);
                                origins.push((role.file.clone(), rt.mark));
                            }
                            provenance.entry(r.id.to_string()).or_insert(origin);
                            declared.push(r);
                            origins.push((role.file.clone(), rt.mark));
                        }
                        Err((id, e)) => {
                            broken.extend(id);
                            // A decoder's message may quote a value: never a secret's.
                            let msg = |m: String| if tainted.is_empty() { m } else { secrets.scrub(&m) };
                            diags.extend(e.0.into_iter().map(|(m, text)| place(m.unwrap_or(rt.mark), msg(text))));
                        }
                    }
                }
            }
        }
        let mut place = |i: usize| (origins[i].0.to_string(), origins[i].1);
        match check_declared(declared, &broken, Vec::new(), &mut place) {
            Ok((resources, _)) if diags.is_empty() => Ok(self.seal_out(
                node,
                Catalog {
                    host: Some(node.to_string()),
                    source: self.source.clone(),
                    provenance,
                    ..Catalog::new(resources)
                },
            )),
            Ok(_) => Err(diags),
            Err(more) => {
                diags.extend(more);
                Err(diags)
            }
        }
    }

    /// How the data hierarchy resolves `key` (dotted: `nginx.port`, `params.web.port`) for
    /// `node`: each level in order, what it says, and the value that results (`lookup`).
    pub fn lookup(&self, node: &str, key: &str) -> Result<Lookup, String> {
        let site = self.site.as_ref().ok_or("site.yaml could not be read; see its errors")?;
        let (_, entry) = site.classify(node)?;
        let (roles, _) = self.order(&entry.value.roles);
        let mut attributes: BTreeMap<String, Value> = site.attributes.clone();
        attributes.extend(entry.value.attributes.clone());
        let path: Vec<&str> = key.split('.').collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(format!("`{key}` is not a key: give names joined by dots, like nginx.port"));
        }
        let levels = Compiler::levels(site, node, &attributes, &roles);
        let mut unused = Vec::new();
        for level in &site.data {
            if !level.value.contains("{role}") && expand(&level.value, node, &attributes).is_none() {
                unused.push(level.value.clone());
            }
        }
        let said = levels
            .iter()
            .map(|level| match self.data.get(level) {
                None => LevelValue { level: level.clone(), file: None, line: None, value: None },
                Some((file, v, text)) => LevelValue {
                    level: level.clone(),
                    file: Some(file.to_string()),
                    line: yaml::parse(text).ok().and_then(|n| line_of(&n, &path)),
                    value: lookup_path(v, &path),
                },
            })
            .collect();
        let default = match path.as_slice() {
            ["params", role, name, ..] => roles.iter().find(|r| r.name == *role).and_then(|r| {
                let v = lookup_path(r.head.params.get(*name)?, &path[3..])?;
                Some((r.file.to_string(), v))
            }),
            _ => None,
        };
        let merged = lookup_path(&self.data_for(&levels), &path);
        let value = merged.or_else(|| default.as_ref().map(|d| d.1.clone()));
        Ok(Lookup { value, levels: said, default, unused })
    }

    /// Where a resource rendered from `rt` came from, and each value its fields read.
    fn origin(&self, role: &Role, rt: &role::ResourceTemplate, template: Option<String>, levels: &[String]) -> Origin {
        let mut values: Vec<Input> = Vec::new();
        // `at`: the field's line in the role file; `None`: the line in the template that reads it.
        let mut add = |field: &str, templates: &[&str], at: Option<Mark>| {
            for t in templates {
                for (value, line) in self.names_read(t).iter() {
                    let Some(from) = self.source_of(value, role, levels) else { continue };
                    if values.iter().any(|i| i.field == field && &i.value == value) {
                        continue;
                    }
                    let line = at.map(|m| m.line).or(*line);
                    values.push(Input { field: field.to_string(), value: value.clone(), from, line });
                }
            }
        };
        if let Some(e) = &rt.when {
            add("when", &[&e.name], Some(e.mark));
        }
        if let Some(e) = &rt.for_each {
            add("for_each", &[&e.name], Some(e.mark));
        }
        if let TNode::Map { entries, .. } = &rt.body {
            for (k, v) in entries {
                let mut names = Vec::new();
                template_names(v, &mut names);
                add(k.as_str().unwrap_or("?"), &names, Some(k.mark));
            }
        }
        if let Some(t) = &template {
            add("content", &[t], None);
        }
        Origin {
            file: role.file.to_string(),
            line: rt.mark.line,
            template: template.map(|t| format!("templates/{t}")),
            values,
        }
    }

    /// The values the template `name` reads, by their dotted names, each with the first line
    /// of its source that names it (from its source, once).
    fn names_read(&self, name: &str) -> Names {
        let mut cache = self.names.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(v) = cache.get(name) {
            return v.clone();
        }
        let mut v: Vec<(String, Option<u32>)> = match self.env.get_template(name) {
            Ok(t) => {
                let lines: Vec<&str> = t.source().lines().collect();
                t.undeclared_variables(true)
                    .into_iter()
                    .map(|value| {
                        let line = lines.iter().position(|l| l.contains(value.as_str())).map(|i| i as u32 + 1);
                        (value, line)
                    })
                    .collect()
            }
            Err(_) => Vec::new(),
        };
        v.sort();
        let v = Arc::new(v);
        cache.insert(name.to_string(), v.clone());
        v
    }

    /// Where the value a template names (`data.nginx.port`) came from for a node whose data
    /// levels are `levels`; `None` for what is not an input (a loop variable, a function).
    fn source_of(&self, value: &str, role: &Role, levels: &[String]) -> Option<String> {
        let mut parts = value.split('.');
        let last_with = |path: &[&str]| {
            levels.iter().rev().find_map(|l| {
                let (file, v, _) = self.data.get(l)?;
                lookup_path(v, path).is_some().then(|| file.to_string())
            })
        };
        Some(match parts.next()? {
            "data" => {
                let path: Vec<&str> = parts.collect();
                if path.is_empty() {
                    "every data level, merged".into()
                } else {
                    last_with(&path).unwrap_or_else(|| "no data level has it".into())
                }
            }
            "params" => match parts.next() {
                None => return None,
                Some(k) => last_with(&["params", &role.name, k]).unwrap_or_else(|| Input::DEFAULT.into()),
            },
            "secrets" => {
                let name = parts.next()?;
                let level = levels.iter().rev().find(|l| self.secrets.get(*l).is_some_and(|m| m.contains_key(name)))?;
                self.secret_files.get(level).map(|f| f.to_string())?
            }
            "facts" => Input::FACTS.into(),
            "node" => match parts.next() {
                Some("name") => Input::NAME.into(),
                _ => Input::SITE.into(),
            },
            // The item of a loop comes from its `for_each`, which is listed itself.
            _ => return None,
        })
    }

    /// Evaluates a compiled expression to its value.
    fn eval(&self, e: &Expr, ctx: &Value) -> Result<Value, String> {
        let template = self.env.get_template(&e.name).map_err(|e| e.to_string())?;
        let captured = template.render_captured(ctx).map_err(|e| message(&e))?;
        // Assigning an undefined value is not an error to minijinja; using one is, to us.
        match captured.state().lookup("__value") {
            Some(v) if !v.is_undefined() => Ok(v),
            _ => Err(format!("`{}` is undefined", e.source)),
        }
    }

    /// Renders a resource's templates.
    fn render(&self, t: &TNode, ctx: &Value, role: &Role) -> Result<Node, Diagnostic> {
        let place = |mark: Mark, msg: String| Diagnostic::new(&*role.file, mark, msg);
        Ok(match t {
            TNode::Lit(n) => n.clone(),
            TNode::Text { name, mark } => {
                let template = self.env.get_template(name).map_err(|e| place(*mark, message(&e)))?;
                let text = template.render(ctx).map_err(|e| place(*mark, message(&e)))?;
                Node { mark: *mark, value: YValue::Scalar { text, plain: false } }
            }
            TNode::Expr(e) => to_node(&self.eval(e, ctx).map_err(|m| place(e.mark, m))?, e.mark),
            TNode::Seq { mark, items } => Node {
                mark: *mark,
                value: YValue::Seq(items.iter().map(|i| self.render(i, ctx, role)).collect::<Result<_, _>>()?),
            },
            TNode::Map { mark, entries } => Node {
                mark: *mark,
                value: YValue::Map(
                    entries
                        .iter()
                        .map(|(k, v)| Ok((k.clone(), self.render(v, ctx, role)?)))
                        .collect::<Result<_, _>>()?,
                ),
            },
        })
    }

    /// Renders a resource's templates, noting in `tainted` each field that read a secret.
    fn render_fields(
        &self,
        t: &TNode,
        ctx: &Value,
        role: &Role,
        secrets: &SecretsView,
        tainted: &mut BTreeMap<String, Mark>,
    ) -> Result<Node, Diagnostic> {
        let TNode::Map { mark, entries } = t else { return self.render(t, ctx, role) };
        let mut out = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            secrets.take_read();
            out.push((k.clone(), self.render(v, ctx, role)?));
            if !secrets.take_read().is_empty() {
                tainted.insert(k.as_str().unwrap_or_default().to_string(), k.mark);
            }
        }
        Ok(Node { mark: *mark, value: YValue::Map(out) })
    }

    /// The blob `hex`, when a catalog of this commit may name it.
    pub fn blob(&self, hex: &str) -> Option<&[u8]> {
        self.blobs.get(hex).and_then(|path| self.files.get(path)).map(Vec::as_slice)
    }

    /// What a `directory` with `source: DIR` holds: every directory and file under `files/DIR`,
    /// as resources under its path (Puppet's recursive `source`). Subdirectories take the
    /// directory's mode (0755 when it has none) and purge rules, files mode 0644; both take its
    /// owner, group, backup, sensitivity and notifications. Files are text (binary content
    /// waits for content-addressed blobs).
    fn tree(&self, dir: &Resource, source: &str) -> Result<Vec<Resource>, String> {
        use converge_modules::catalog::{DirectorySpec, FileSpec, Kind, Meta, Mode, ResourceId, Spec, join_path};

        let Spec::Directory(d) = &dir.spec else { return Ok(Vec::new()) };
        if d.ensure == Some(converge_modules::catalog::Ensure::Absent) {
            return Err(format!("{}: `source` fills a directory: it cannot be `ensure: absent`", dir.id));
        }
        let prefix = format!("{source}/");
        let meta = Meta { notify: dir.meta.notify.clone(), sensitive: dir.meta.sensitive, ..Meta::default() };
        let mut dirs: BTreeSet<String> = BTreeSet::new();
        let mut out = Vec::new();
        for (path, bytes) in self.files.range(prefix.clone()..).take_while(|(p, _)| p.starts_with(&prefix)) {
            let rel = &path[prefix.len()..];
            if out.len() + dirs.len() >= MAX_TREE {
                return Err(format!(
                    "files/{source} holds more than {MAX_TREE} entries: a tree that large belongs in a package"
                ));
            }
            let mut at = dir.id.title.clone();
            let parts: Vec<&str> = rel.split('/').collect();
            for p in &parts[..parts.len() - 1] {
                at = join_path(&at, p);
                dirs.insert(at.clone());
            }
            let id = ResourceId::new(Kind::File, &join_path(&at, parts[parts.len() - 1])).map_err(|e| e.to_string())?;
            let (content, content_sha256, size) = if travels_as_blob(bytes) && !dir.sensitive() {
                let (hash, _) = blob_fields(bytes);
                (None, Some(hash), Some(bytes.len() as u64))
            } else {
                let text = std::str::from_utf8(bytes).map_err(|_| {
                    format!("files/{path} is not UTF-8 text, and a sensitive directory's files cannot be blobs")
                })?;
                (Some(text.into()), None, None)
            };
            let spec = FileSpec {
                content,
                content_sha256,
                size,
                mode: Some(Mode(0o644)),
                owner: d.owner.clone(),
                group: d.group.clone(),
                backup: d.backup,
                ..FileSpec::default()
            };
            out.push(Resource::new(id, meta.clone(), Spec::File(spec)));
        }
        for p in dirs {
            let id = ResourceId::new(Kind::Directory, &p).map_err(|e| e.to_string())?;
            let spec = DirectorySpec {
                mode: Some(d.mode.unwrap_or(Mode(0o755))),
                owner: d.owner.clone(),
                group: d.group.clone(),
                purge: d.purge,
                purge_limit: d.purge_limit,
                backup: d.backup,
                ..DirectorySpec::default()
            };
            out.push(Resource::new(id, meta.clone(), Spec::Directory(spec)));
        }
        Ok(out)
    }

    /// Resolves `template:` and `source:` of a rendered resource into `content` (tainted when
    /// the template reads a secret).
    fn inline_content(
        &self,
        node: Node,
        ctx: &Value,
        role: &Role,
        secrets: &SecretsView,
        tainted: &mut BTreeMap<String, Mark>,
        out: &mut Inlined,
    ) -> Result<Node, Diagnostic> {
        let place = |mark: Mark, msg: String| Diagnostic::new(&*role.file, mark, msg);
        let mark = node.mark;
        let YValue::Map(mut entries) = node.value else { return Ok(node) };
        let take = |entries: &mut Vec<(Node, Node)>, key: &str| {
            entries.iter().position(|(k, _)| k.as_str() == Some(key)).map(|i| entries.remove(i))
        };
        let has_content = entries.iter().any(|(k, _)| k.as_str() == Some("content"));
        let sensitive = entries.iter().any(|(k, v)| k.as_str() == Some("sensitive") && v.as_str() == Some("true"));
        let kind_is_file = entries.first().is_some_and(|(k, _)| k.as_str() == Some("file"));
        if entries.first().is_some_and(|(k, _)| k.as_str() == Some("directory"))
            && let Some((_, v)) = take(&mut entries, "source")
        {
            let path = v
                .as_str()
                .filter(|_| !v.is_null())
                .ok_or_else(|| place(v.mark, "`source` names a directory in files/".into()))?;
            let path = path.strip_prefix("files/").unwrap_or(path).trim_end_matches('/');
            let prefix = format!("{path}/");
            if path.is_empty() || !self.files.keys().any(|f| f.starts_with(&prefix)) {
                return Err(place(v.mark, format!("source `{path}` is no directory with files in files/")));
            }
            out.tree = Some((v.mark, path.to_string()));
        }
        let template = take(&mut entries, "template");
        let source = if kind_is_file { take(&mut entries, "source") } else { None };
        let content = match (template, source) {
            (Some((k, _)), Some(_)) => return Err(place(k.mark, "`template` and `source` cannot both be set".into())),
            (Some((k, _)), None) if has_content => {
                return Err(place(k.mark, "`content` and `template` cannot both be set".into()));
            }
            (None, Some((k, _))) if has_content => {
                return Err(place(k.mark, "`content` and `source` cannot both be set".into()));
            }
            (Some((_, v)), None) => {
                let name = v
                    .as_str()
                    .filter(|_| !v.is_null())
                    .ok_or_else(|| place(v.mark, "`template` names a file in templates/".into()))?;
                let template =
                    self.env.get_template(name).map_err(|_| match self.broken.get(&format!("templates/{name}")) {
                        Some(d) => d.clone(),
                        None => place(v.mark, format!("template `{name}` not found in templates/")),
                    })?;
                secrets.take_read();
                let text = template.render(ctx).map_err(|e| {
                    template_error(&e, &format!("templates/{name}"), template.source(), Some((&role.file, v.mark)))
                })?;
                if !secrets.take_read().is_empty() {
                    tainted.insert("content".into(), v.mark);
                }
                out.template = Some(name.to_string());
                Some((v.mark, text))
            }
            (None, Some((_, v))) => {
                let path = v
                    .as_str()
                    .filter(|_| !v.is_null())
                    .ok_or_else(|| place(v.mark, "`source` names a file in files/".into()))?;
                let path = path.strip_prefix("files/").unwrap_or(path);
                let bytes = self
                    .files
                    .get(path)
                    .ok_or_else(|| place(v.mark, format!("source `{path}` not found in files/")))?;
                if travels_as_blob(bytes) && !sensitive {
                    let (hash, size) = blob_fields(bytes);
                    entries.push((scalar("content_sha256", v.mark, true), scalar(&hash, v.mark, false)));
                    entries.push((scalar("size", v.mark, true), scalar(&size, v.mark, true)));
                    return Ok(Node { mark, value: YValue::Map(entries) });
                }
                let text = std::str::from_utf8(bytes).map_err(|_| {
                    place(v.mark, format!("files/{path} is not UTF-8 text, and a sensitive file cannot be a blob"))
                })?;
                Some((v.mark, text.to_string()))
            }
            (None, None) => None,
        };
        if let Some((m, text)) = content {
            entries.push((scalar("content", m, true), scalar(&text, m, false)));
        }
        Ok(Node { mark, value: YValue::Map(entries) })
    }
}

/// What `inline_content` took from a resource besides its content.
#[derive(Default)]
struct Inlined {
    /// The template its content was rendered from.
    template: Option<String>,
    /// A directory's `source`: where it was written, and the directory under files/.
    tree: Option<(Mark, String)>,
}

/// The largest text a catalog carries inline; larger files (and every binary one) travel as
/// blobs.
pub const MAX_INLINE: usize = 64 << 10;

/// Whether a file of files/ travels as a blob rather than in a catalog.
fn travels_as_blob(bytes: &[u8]) -> bool {
    bytes.len() > MAX_INLINE || std::str::from_utf8(bytes).is_err()
}

/// `content_sha256` and `size` of a blob.
fn blob_fields(bytes: &[u8]) -> (String, String) {
    (format!("sha256:{}", converge_modules::hash::sha256_hex(bytes)), bytes.len().to_string())
}

/// The most entries a `directory`'s `source` may hold.
const MAX_TREE: usize = 10_000;

/// The `secrets` a template sees: the node's secrets by name. Every read is noted, so that
/// whatever reads one is sealed (and sensitive), and a field that cannot be sealed is refused.
struct SecretsView {
    values: BTreeMap<String, Value>,
    read: Mutex<BTreeSet<String>>,
}

impl SecretsView {
    /// The names read since the last call.
    fn take_read(&self) -> BTreeSet<String> {
        std::mem::take(&mut *self.read.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// `text` with every secret value in it replaced by its name.
    fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (name, v) in &self.values {
            if let Some(v) = v.as_str().filter(|v| !v.is_empty()) {
                out = out.replace(v, &format!("<secret {name}>"));
            }
        }
        out
    }
}

impl std::fmt::Debug for SecretsView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<secrets: {}>", self.values.keys().cloned().collect::<Vec<_>>().join(", "))
    }
}

impl minijinja::value::Object for SecretsView {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let name = key.as_str()?;
        let v = self.values.get(name)?;
        self.read.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(name.to_string());
        Some(v.clone())
    }
}

/// A secret's value: opened with the key, else a placeholder naming it and its ciphertext.
fn open_secret(key: Option<&SecretsKey>, name: &str, armored: &str) -> Result<Value, String> {
    let Some(key) = key else {
        let short = &converge_modules::hash::sha256_hex(armored.as_bytes())[..12];
        return Ok(Value::from(format!("<secret {name} {short}>")));
    };
    let bytes = crate::secrets::decrypt(armored, &key.identities).map_err(|e| {
        format!(
            "cannot open secret `{name}` with the server's secrets key: {e}; add the server's recipient to \
             {}/{} and run `converge-server secret rekey`",
            crate::secrets::DIR,
            crate::secrets::RECIPIENTS
        )
    })?;
    String::from_utf8(bytes).map(Value::from).map_err(|_| format!("secret `{name}` is not UTF-8 text"))
}

/// Marks a resource that read a secret sensitive; refuses a secret in a field that cannot be
/// sealed (a command's arguments, a path, an owner...).
fn taint(r: &mut Resource, tainted: &BTreeMap<String, Mark>) -> Result<(), Vec<(Mark, String)>> {
    if tainted.is_empty() {
        return Ok(());
    }
    let mut problems = Vec::new();
    for (field, mark) in tainted {
        if Field::named(field).and_then(|f| f.slot(&mut r.spec)).is_none() {
            problems.push((
                *mark,
                format!(
                    "`{field}` reads a secret, which may go only into a file's content (`content` or \
                     `template`), a command's `stdin` or a user's `password_hash`: a command takes a secret on \
                     stdin, never in its arguments"
                ),
            ));
        }
    }
    if r.meta.sensitive == Some(false) {
        let mark = tainted.values().next().copied().unwrap_or(Mark::UNKNOWN);
        problems.push((mark, format!("{} reads a secret but says `sensitive: false`", r.id)));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    r.meta.sensitive = Some(true);
    Ok(())
}

/// The values of a compiled catalog's sealed fields, in its `sealed` order, in memory only.
pub struct Opened {
    values: Vec<zeroize::Zeroizing<String>>,
    /// Compiled without the secrets key: the values are placeholders, never to be sealed.
    placeholders: bool,
}

impl Opened {
    /// Seals the values of `catalog` to `recipient`, the host's sealing key (one age file).
    pub fn seal(&self, catalog: &mut Catalog, recipient: &converge_modules::sealed::Recipient) -> anyhow::Result<()> {
        if self.placeholders && !self.values.is_empty() {
            anyhow::bail!("compiled without the secrets key: its secrets are placeholders");
        }
        Ok(converge_modules::sealed::seal(catalog, &self.values, recipient)?)
    }
}

fn scalar(text: &str, mark: Mark, plain: bool) -> Node {
    Node { mark, value: YValue::Scalar { text: text.to_string(), plain } }
}

/// Parses a YAML file into `T`, with every problem as a diagnostic.
fn parse_yaml<T: for<'a> serde::Deserialize<'a>>(file: &str, text: &str, problems: &mut Vec<Diagnostic>) -> Option<T> {
    let node = match yaml::parse(text) {
        Ok(n) => n,
        Err(e) => {
            problems.extend(e.problems.into_iter().map(|(m, msg)| Diagnostic::new(file, m, msg)));
            return None;
        }
    };
    match yaml::from_node::<T>(&node) {
        Ok(v) => Some(v),
        Err(e) => {
            problems.extend(e.0.into_iter().map(|(m, msg)| Diagnostic::new(file, m.unwrap_or(node.mark), msg)));
            None
        }
    }
}

/// Data overriding role params must name a role and one of its params.
fn check_param_overrides(
    file: &str,
    node: &Node,
    roles: &BTreeMap<String, Role>,
    broken: &BTreeMap<String, Diagnostic>,
    problems: &mut Vec<Diagnostic>,
) {
    let Some((_, params)) = node.as_map().and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some("params"))) else {
        return;
    };
    for (role_key, values) in params.as_map().unwrap_or_default() {
        let name = role_key.as_str().unwrap_or_default();
        let Some(role) = roles.get(name) else {
            // A role whose file is broken has its own error; its params cannot be known.
            if !broken.contains_key(&format!("roles/{name}")) {
                problems.push(Diagnostic::new(file, role_key.mark, format!("params for unknown role `{name}`")));
            }
            continue;
        };
        for (k, _) in values.as_map().unwrap_or_default() {
            let p = k.as_str().unwrap_or_default();
            if !role.head.params.contains_key(p) {
                let known: Vec<&str> = role.head.params.keys().map(String::as_str).collect();
                let its = if known.is_empty() {
                    "it declares none".to_string()
                } else {
                    format!("its params: {}", known.join(", "))
                };
                problems.push(Diagnostic::new(file, k.mark, format!("role `{name}` has no param `{p}` ({its})")));
            }
        }
    }
}

/// Replaces `{node}` and `{ATTRIBUTE}` in a data level; `None` when an attribute is unset.
fn expand(level: &str, node: &str, attributes: &BTreeMap<String, Value>) -> Option<String> {
    let mut out = String::with_capacity(level.len());
    let mut rest = level;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}')? + start;
        let key = &rest[start + 1..end];
        let value = if key == "node" {
            node.to_string()
        } else {
            let v = attributes.get(key)?;
            match v.kind() {
                ValueKind::String | ValueKind::Number | ValueKind::Bool => v.to_string(),
                _ => return None,
            }
        };
        out.push_str(&value);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// `b` merged over `a`: maps merge key by key, anything else is replaced by `b`.
pub fn deep_merge(a: &Value, b: &Value) -> Value {
    if a.kind() != ValueKind::Map || b.kind() != ValueKind::Map {
        return b.clone();
    }
    let entries = |v: &Value| -> Vec<(Value, Value)> {
        v.try_iter()
            .map(|keys| keys.map(|k| (k.clone(), v.get_item(&k).unwrap_or_default())).collect())
            .unwrap_or_default()
    };
    let mut merged = entries(a);
    let mut at: std::collections::HashMap<Value, usize> =
        merged.iter().enumerate().map(|(i, (k, _))| (k.clone(), i)).collect();
    for (k, v) in entries(b) {
        match at.get(&k) {
            Some(&i) => merged[i].1 = deep_merge(&merged[i].1, &v),
            None => {
                at.insert(k.clone(), merged.len());
                merged.push((k, v));
            }
        }
    }
    Value::from_pairs(merged)
}

/// A template value as a YAML node, keeping its type for the decoder.
fn to_node(v: &Value, mark: Mark) -> Node {
    let value = match v.kind() {
        ValueKind::Undefined | ValueKind::None => YValue::Scalar { text: "~".into(), plain: true },
        ValueKind::Bool | ValueKind::Number => YValue::Scalar { text: v.to_string(), plain: true },
        ValueKind::String => YValue::Scalar { text: v.as_str().unwrap_or_default().to_string(), plain: false },
        ValueKind::Map => YValue::Map(
            v.try_iter()
                .map(|keys| {
                    keys.map(|k| (to_node(&k, mark), to_node(&v.get_item(&k).unwrap_or_default(), mark))).collect()
                })
                .unwrap_or_default(),
        ),
        ValueKind::Seq | ValueKind::Iterable => {
            YValue::Seq(v.try_iter().map(|items| items.map(|i| to_node(&i, mark)).collect()).unwrap_or_default())
        }
        _ => YValue::Scalar { text: v.to_string(), plain: false },
    };
    Node { mark, value }
}

/// The items of a `for_each`: a list's elements, or a map's `{key, value}` pairs.
fn iterate(v: &Value) -> Result<Vec<Value>, String> {
    match v.kind() {
        ValueKind::Seq | ValueKind::Iterable => Ok(v.try_iter().map_err(|e| message(&e))?.collect()),
        ValueKind::Map => Ok(v
            .try_iter()
            .map_err(|e| message(&e))?
            .map(|k| Value::from_pairs([("key", k.clone()), ("value", v.get_item(&k).unwrap_or_default())]))
            .collect()),
        ValueKind::None | ValueKind::Undefined => Ok(Vec::new()),
        _ => Err(format!("`for_each` needs a list or a map, found {v}")),
    }
}

/// What went wrong in a template, in a sentence.
fn message(e: &minijinja::Error) -> String {
    let what = e.detail().map(str::to_string).unwrap_or_else(|| e.kind().to_string());
    match e.line() {
        Some(l) if l > 1 => format!("{what} (template line {l})"),
        _ => what,
    }
}

/// A diagnostic for an error in a template file, placed in that file; `used_at` is where a
/// role used it, named in the message.
fn template_error(e: &minijinja::Error, file: &str, source: &str, used_at: Option<(&str, Mark)>) -> Diagnostic {
    let line = e.line().unwrap_or(0) as u32;
    let col = e
        .range()
        .and_then(|r| source.get(..r.start))
        .map(|before| before.rsplit('\n').next().unwrap_or("").chars().count() as u32 + 1)
        .unwrap_or(1);
    let what = e.detail().map(str::to_string).unwrap_or_else(|| e.kind().to_string());
    let what =
        if e.kind() == minijinja::ErrorKind::SyntaxError { format!("template syntax error: {what}") } else { what };
    let msg = match used_at {
        Some((role, at)) => format!("{what} (used by {role}:{})", at.line),
        None => what,
    };
    Diagnostic::new(file, Mark::new(line, if line == 0 { 0 } else { col }), msg)
}

/// The names of the templates inside a field, in order.
fn template_names<'t>(t: &'t TNode, out: &mut Vec<&'t str>) {
    match t {
        TNode::Lit(_) => {}
        TNode::Text { name, .. } => out.push(name),
        TNode::Expr(e) => out.push(&e.name),
        TNode::Seq { items, .. } => items.iter().for_each(|i| template_names(i, out)),
        TNode::Map { entries, .. } => entries.iter().for_each(|(_, v)| template_names(v, out)),
    }
}

/// The value at a dotted path of a map value, if every step is there.
fn lookup_path(v: &Value, path: &[&str]) -> Option<Value> {
    let mut v = v.clone();
    for k in path {
        v = v.get_attr(k).ok().filter(|x| !x.is_undefined())?;
    }
    Some(v)
}

/// What one level of a node's data hierarchy says of a key.
#[derive(Debug)]
pub struct LevelValue {
    pub level: String,
    /// Its file, when there is one.
    pub file: Option<String>,
    /// The line of the key in it, when it has the key.
    pub line: Option<u32>,
    pub value: Option<Value>,
}

/// How a key resolves for a node ([`Compiler::lookup`]).
#[derive(Debug)]
pub struct Lookup {
    /// The value templates see (a param's default when no level sets it).
    pub value: Option<Value>,
    /// Every level of the node's hierarchy, lowest precedence first.
    pub levels: Vec<LevelValue>,
    /// For `params.ROLE.NAME`: the role's file and its default.
    pub default: Option<(String, Value)>,
    /// Levels of site.yaml the node does not have (an attribute they name is not set).
    pub unused: Vec<String>,
}

/// The line of the value at a dotted path of a parsed YAML mapping.
fn line_of(node: &Node, path: &[&str]) -> Option<u32> {
    let (mut n, mut line) = (node, None);
    for k in path {
        let YValue::Map(entries) = &n.value else { return None };
        let (key, value) = entries.iter().find(|(key, _)| key.as_str() == Some(*k))?;
        (n, line) = (value, Some(key.mark.line));
    }
    line
}
