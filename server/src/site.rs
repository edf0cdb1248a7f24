//! `site.yaml`: which node gets which roles, the server-side attributes that choose its data,
//! the data hierarchy, and the facts templates may use.
//!
//! Classification is trusted: a node's entry, roles, attributes and data come only from its
//! name and this file, never from facts (which a host reports about itself).

use converge_modules::yaml::Spanned;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// The data hierarchy, lowest precedence first: paths under `data/` (without `.yaml`) where
    /// `{node}`, `{role}` (one level per role) and `{ATTRIBUTE}` are replaced. A level whose
    /// attribute is unset, or whose file does not exist, is skipped.
    #[serde(default = "default_hierarchy")]
    #[schemars(with = "Vec<String>")]
    pub data: Vec<Spanned<String>>,
    /// The facts templates may use, with their types and defaults. Facts a host reports that
    /// are not declared here are not visible.
    #[serde(default)]
    pub facts: BTreeMap<String, FactDecl>,
    /// Server-side attributes every node starts with (an entry's own attributes win).
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, serde_json::Value>")]
    pub attributes: BTreeMap<String, minijinja::Value>,
    /// Node names and glob patterns (`*`, `?`) -> their roles and attributes. An exact name
    /// beats the longest matching pattern.
    #[schemars(with = "BTreeMap<String, NodeEntry>")]
    pub nodes: BTreeMap<String, Spanned<NodeEntry>>,
    /// Rollout waves: a new commit reaches them in order, each once the waves before have run
    /// it clean for a window (see `converge-server rollout`). Without it, every host gets a
    /// new commit at its next run.
    #[serde(default)]
    pub rollout: Option<crate::rollout::Rollout>,
    /// Hosts held at a commit whatever the branch says (a freeze, a migration): each pin names
    /// hosts (names and patterns, or attribute values) and a whole commit id. The first pin
    /// that takes a host wins.
    #[serde(default)]
    #[schemars(with = "Vec<Pin>")]
    pub pins: Vec<Spanned<Pin>>,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// Node names and glob patterns.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Or: attribute values every host it takes has (`{environment: staging}`).
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, serde_json::Value>")]
    pub attributes: BTreeMap<String, minijinja::Value>,
    /// The whole commit id (40 or 64 hex digits: a tag or branch could move).
    #[schemars(with = "String")]
    pub commit: Spanned<String>,
    /// Why, for the operators who wonder.
    #[serde(default)]
    pub reason: Option<String>,
}

fn default_hierarchy() -> Vec<Spanned<String>> {
    ["common", "os/{os_family}", "role/{role}", "node/{node}"]
        .iter()
        .map(|l| Spanned { mark: converge_modules::diag::Mark::UNKNOWN, value: l.to_string() })
        .collect()
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    #[schemars(with = "Vec<String>")]
    pub roles: Vec<Spanned<String>>,
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, serde_json::Value>")]
    pub attributes: BTreeMap<String, minijinja::Value>,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FactDecl {
    #[serde(rename = "type")]
    pub kind: FactType,
    /// The value when a host has not reported this fact (required for `check` to compile a
    /// node before it has reported).
    pub default: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FactType {
    String,
    Integer,
    Number,
    Boolean,
    List,
    Map,
}

impl FactType {
    pub fn accepts(self, v: &serde_json::Value) -> bool {
        use serde_json::Value as J;
        match self {
            FactType::String => v.is_string(),
            FactType::Integer => v.is_i64() || v.is_u64(),
            FactType::Number => v.is_number(),
            FactType::Boolean => v.is_boolean(),
            FactType::List => matches!(v, J::Array(_)),
            FactType::Map => matches!(v, J::Object(_)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FactType::String => "a string",
            FactType::Integer => "an integer",
            FactType::Number => "a number",
            FactType::Boolean => "a boolean",
            FactType::List => "a list",
            FactType::Map => "a map",
        }
    }
}

/// True for names that are patterns rather than node names.
pub fn is_pattern(name: &str) -> bool {
    name.contains(['*', '?'])
}

/// Matches a node name against a pattern: `*` is any run of characters, `?` one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let mut back: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                back = Some((pi, ni));
                pi += 1;
            }
            Some(c) if *c == '?' || *c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match back {
                Some((bp, bn)) => {
                    pi = bp + 1;
                    ni = bn + 1;
                    back = Some((bp, bn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// A name both glob patterns match, if there is one (the shortest such, with `x` where any
/// character would do): the product of the two patterns, searched breadth first.
pub fn overlap(a: &str, b: &str) -> Option<String> {
    let (p, q): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let (n, m) = (p.len(), q.len());
    // For each state (i, j): how it was reached (the state before, and the character read).
    let mut from: Vec<Option<(usize, Option<char>)>> = vec![None; (n + 1) * (m + 1)];
    let id = |i: usize, j: usize| i * (m + 1) + j;
    let mut queue = std::collections::VecDeque::from([(0usize, 0usize)]);
    from[0] = Some((0, None));
    while let Some((i, j)) = queue.pop_front() {
        if (i, j) == (n, m) {
            let mut out = Vec::new();
            let mut at = id(i, j);
            while at != 0 {
                let (prev, c) = from[at].expect("reached");
                out.extend(c);
                at = prev;
            }
            return Some(out.into_iter().rev().collect());
        }
        let (pc, qc) = (p.get(i).copied(), q.get(j).copied());
        let mut next: Vec<(usize, usize, Option<char>)> = Vec::new();
        if pc == Some('*') {
            next.push((i + 1, j, None));
        }
        if qc == Some('*') {
            next.push((i, j + 1, None));
        }
        if let (Some(x), Some(y)) = (pc, qc) {
            let ch = match (x, y) {
                ('*' | '?', '*' | '?') => Some('x'),
                ('*' | '?', c) | (c, '*' | '?') => Some(c),
                (c, d) => (c == d).then_some(c),
            };
            if let Some(ch) = ch {
                let ni = if x == '*' { i } else { i + 1 };
                let nj = if y == '*' { j } else { j + 1 };
                if (ni, nj) != (i, j) {
                    next.push((ni, nj, Some(ch)));
                }
            }
        }
        for (ni, nj, c) in next {
            if from[id(ni, nj)].is_none() {
                from[id(ni, nj)] = Some((id(i, j), c));
                queue.push_back((ni, nj));
            }
        }
    }
    None
}

impl Site {
    /// Patterns of `nodes` that tie for some name (the same length, and a name both match),
    /// whatever nodes exist: each with the later pattern's place.
    pub fn pattern_ties(&self) -> Vec<(String, String, converge_modules::diag::Mark, String)> {
        let patterns: Vec<(&String, &Spanned<NodeEntry>)> = self.nodes.iter().filter(|(k, _)| is_pattern(k)).collect();
        let mut out = Vec::new();
        for (i, (a, _)) in patterns.iter().enumerate() {
            for (b, entry) in &patterns[i + 1..] {
                if a.chars().count() != b.chars().count() {
                    continue;
                }
                if let Some(name) = overlap(a, b) {
                    let msg = format!(
                        "`{a}` and `{b}` are patterns of the same length that both match names like `{name}`: \
                         such a node could not be classified; make one of them longer or name such nodes exactly"
                    );
                    out.push((a.to_string(), b.to_string(), entry.mark, msg));
                }
            }
        }
        out
    }

    /// Levels of the data hierarchy that name an attribute no entry and no site attribute
    /// has: never used, most likely a typo. Each with its place and what was likely meant.
    pub fn unused_levels(&self) -> Vec<(converge_modules::diag::Mark, String)> {
        let mut known: Vec<&str> = self.attributes.keys().map(String::as_str).collect();
        known.extend(self.nodes.values().flat_map(|e| e.value.attributes.keys().map(String::as_str)));
        known.sort_unstable();
        known.dedup();
        let mut out = Vec::new();
        // The default hierarchy (site.yaml without `data:`) names attributes a site may not use.
        for level in self.data.iter().filter(|l| l.mark.is_known()) {
            let mut rest = level.value.as_str();
            while let Some(start) = rest.find('{') {
                let Some(end) = rest[start..].find('}') else { break };
                let attr = &rest[start + 1..start + end];
                rest = &rest[start + end + 1..];
                if matches!(attr, "node" | "role") || known.contains(&attr) {
                    continue;
                }
                let hint = match known.iter().find(|k| converge_modules::yaml::similar_name(attr, k)) {
                    Some(k) => format!("did you mean `{{{k}}}`?"),
                    None => format!("set `{attr}` in `attributes` (for every node) or on the entries that need it"),
                };
                out.push((level.mark, format!("the data level `{}` names the attribute `{attr}`, which no node has, so it is never used: {hint}", level.value)));
            }
        }
        out
    }

    /// The entry for `node`: its exact name, else the longest matching pattern. Two matching
    /// patterns of the same length are an error, as is no match.
    pub fn classify(&self, node: &str) -> Result<(&str, &Spanned<NodeEntry>), String> {
        if let Some((k, e)) = self.nodes.get_key_value(node).filter(|(k, _)| !is_pattern(k)) {
            return Ok((k, e));
        }
        let mut best: Vec<(&str, &Spanned<NodeEntry>)> = Vec::new();
        for (pattern, entry) in self.nodes.iter().filter(|(k, _)| is_pattern(k) && glob_match(k, node)) {
            match best.first().map(|(p, _)| p.len()) {
                Some(len) if pattern.len() < len => {}
                Some(len) if pattern.len() == len => best.push((pattern, entry)),
                _ => best = vec![(pattern, entry)],
            }
        }
        match best.as_slice() {
            [] => Err(format!("node `{node}` matches no entry of `nodes` in site.yaml")),
            [one] => Ok(*one),
            many => Err(format!(
                "node `{node}` matches {} equally well; make one of them longer or name the node exactly",
                many.iter().map(|(p, _)| format!("`{p}`")).collect::<Vec<_>>().join(" and ")
            )),
        }
    }

    /// The pin that holds `node`, if any: the first whose names or attributes take it.
    pub fn pin_of(&self, node: &str) -> Option<&Pin> {
        self.pins.iter().map(|p| &p.value).find(|p| {
            let named = p.nodes.iter().any(|n| n == node || (is_pattern(n) && glob_match(n, node)));
            let by_attributes = !p.attributes.is_empty()
                && self.classify(node).is_ok_and(|(_, entry)| {
                    p.attributes
                        .iter()
                        .all(|(k, v)| entry.value.attributes.get(k).or_else(|| self.attributes.get(k)) == Some(v))
                });
            named || by_attributes
        })
    }

    /// What is wrong with the pins, each with where.
    pub fn pin_problems(&self) -> Vec<(converge_modules::diag::Mark, String)> {
        let mut out = Vec::new();
        for p in &self.pins {
            let v = &p.value;
            let c = &v.commit.value;
            if !(matches!(c.len(), 40 | 64) && c.bytes().all(|b| b.is_ascii_hexdigit())) {
                out.push((
                    v.commit.mark,
                    format!(
                        "pin `commit`: `{}` is not a whole commit id (40 hex digits)",
                        converge_modules::text::clip(c, 80)
                    ),
                ));
            }
            if v.nodes.is_empty() == v.attributes.is_empty() {
                out.push((p.mark, "a pin names its hosts by `nodes` or by `attributes` (one of them)".to_string()));
            }
        }
        out
    }

    /// Whether an entry names `node` exactly or by a pattern.
    pub fn knows(&self, node: &str) -> bool {
        self.nodes.keys().any(|k| k == node || (is_pattern(k) && glob_match(k, node)))
    }

    /// The names `check` compiles: every exact name, and one example name per pattern (its
    /// `*` and `?` replaced) so that pattern-only entries are compiled too.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes
            .keys()
            .map(|k| if is_pattern(k) { k.replace('*', "example").replace('?', "x") } else { k.clone() })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_patterns_overlap_when_some_name_matches_both() {
        let both = |a: &str, b: &str| {
            let name = overlap(a, b);
            if let Some(n) = &name {
                assert!(glob_match(a, n) && glob_match(b, n), "{a} {b}: {n}");
            }
            name
        };
        assert_eq!(both("a*", "*b").as_deref(), Some("ab"));
        assert_eq!(both("web?.example.com", "*1.example.com").as_deref(), Some("web1.example.com"));
        assert_eq!(both("db*.lab", "web*.lab"), None);
        assert_eq!(both("*.a.com", "*.b.com"), None);
        assert!(both("*x*", "*y*").is_some());
        assert_eq!(both("a?c", "a?d"), None);
        assert_eq!(both("", "*"), Some(String::new()));
        // Long patterns stay cheap: the search is over pairs of positions.
        let long = "*a".repeat(200);
        assert!(both(&long, &long).is_some());
    }

    #[test]
    fn globs() {
        assert!(glob_match("*.example.com", "web01.example.com"));
        assert!(glob_match("web*", "web01.example.com"));
        assert!(glob_match("web??.example.com", "web01.example.com"));
        assert!(!glob_match("web?.example.com", "web01.example.com"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXbYbZc"));
        assert!(!glob_match("a*b", "ab-c"));
    }

    fn site(nodes: &str) -> Site {
        let text = format!("nodes:\n{nodes}");
        let n: &'static converge_modules::yaml::Node =
            Box::leak(Box::new(converge_modules::yaml::parse(&text).unwrap()));
        converge_modules::yaml::from_node(n).unwrap()
    }

    #[test]
    fn exact_beats_the_longest_pattern_and_ties_are_errors() {
        let s = site(
            "  web01.example.com: {roles: [a]}\n  \"web*.example.com\": {roles: [b]}\n  \"*.example.com\": {roles: [c]}\n  \"db?.example.com\": {roles: [d]}\n  \"db*.example.co?\": {roles: [e]}\n",
        );
        assert_eq!(s.classify("web01.example.com").unwrap().0, "web01.example.com");
        assert_eq!(s.classify("web02.example.com").unwrap().0, "web*.example.com");
        assert_eq!(s.classify("mail.example.com").unwrap().0, "*.example.com");
        assert!(s.classify("db1.example.com").unwrap_err().contains("equally well"));
        assert!(s.classify("host.other.org").unwrap_err().contains("matches no entry"));
    }
}
