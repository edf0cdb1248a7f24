//! Role files, parsed once per repository into templates of resources.
//!
//! A role: `include` (roles that come first), `params` (with defaults, overridden from data
//! under `params: {ROLE: {...}}`), and `resources`. In a resource, any string value holding
//! `{{ }}` or `{% %}` is a minijinja template; a value that is exactly `{{ expression }}` takes
//! the expression's own type (a list, a number). `when: EXPR` keeps a resource only when true,
//! `for_each: EXPR` repeats it for each item (`item`), `template: NAME` renders
//! `templates/NAME` into `content`, `source: PATH` inlines `files/PATH`. Every template is
//! compiled when the repository is loaded, so a syntax error is found without any node.

use converge_modules::diag::{Diagnostic, Mark};
use converge_modules::yaml::{self, Node, Spanned, Value as YValue};
use minijinja::Environment;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleHead {
    /// What the role is for (for people and the schema; the compiler does not use it).
    #[serde(default)]
    #[allow(dead_code)]
    pub description: Option<String>,
    /// Roles converged before this one.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub include: Vec<Spanned<String>>,
    /// Parameters and their defaults; data overrides them under `params: {ROLE: {NAME: VALUE}}`.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, serde_json::Value>")]
    pub params: BTreeMap<String, minijinja::Value>,
    /// Commit-confirmed apply for every file, directory and symlink of the role that sets no
    /// `confirm` of its own: changed, they must be confirmed (the host reaches its server again,
    /// and `check` passes) within `within` seconds, or the host puts them back.
    #[serde(default)]
    pub confirm: Option<converge_modules::catalog::Confirm>,
}

#[derive(Debug, Clone)]
pub struct Role {
    pub name: String,
    pub file: Arc<str>,
    pub head: RoleHead,
    pub resources: Vec<ResourceTemplate>,
}

/// A resource as written in a role, ready to render for a node.
#[derive(Debug, Clone)]
pub struct ResourceTemplate {
    pub mark: Mark,
    pub when: Option<Expr>,
    pub for_each: Option<Expr>,
    pub body: TNode,
}

/// An expression, compiled into the environment as a template named `name`.
#[derive(Debug, Clone)]
pub struct Expr {
    pub name: String,
    /// The expression as written, for messages.
    pub source: String,
    pub mark: Mark,
}

/// A YAML node with its templates found and compiled.
#[derive(Debug, Clone)]
pub enum TNode {
    /// Nothing to render inside.
    Lit(Node),
    /// A string template, compiled into the environment under `name`.
    Text {
        name: String,
        mark: Mark,
    },
    /// A whole value that is one expression: it keeps the expression's type.
    Expr(Expr),
    Seq {
        mark: Mark,
        items: Vec<TNode>,
    },
    Map {
        mark: Mark,
        entries: Vec<(Node, TNode)>,
    },
}

/// Compiles templates into the environment and reports their syntax errors with places.
pub struct Builder<'e> {
    pub env: &'e mut Environment<'static>,
    pub file: Arc<str>,
    pub diags: &'e mut Vec<Diagnostic>,
}

impl Builder<'_> {
    fn name(&self, mark: Mark) -> String {
        format!("{}:{}:{}", self.file, mark.line, mark.col)
    }

    fn add(&mut self, name: String, source: String, mark: Mark) -> bool {
        match self.env.add_template_owned(name, source) {
            Ok(()) => true,
            Err(e) => {
                let detail = e.detail().unwrap_or("invalid template");
                let at = match e.line() {
                    Some(l) if l > 1 => format!(" (template line {l})"),
                    _ => String::new(),
                };
                self.diags.push(Diagnostic::new(&*self.file, mark, format!("template syntax error: {detail}{at}")));
                false
            }
        }
    }

    /// Compiles an expression (written with or without `{{ }}`).
    pub fn expr(&mut self, source: &str, mark: Mark) -> Option<Expr> {
        let inner = whole_expression(source.trim()).unwrap_or(source);
        let name = format!("{}#expr", self.name(mark));
        let source = inner.trim().to_string();
        self.add(name.clone(), format!("{{% set __value = ({inner}) %}}"), mark).then_some(Expr { name, source, mark })
    }

    /// Finds and compiles the templates in a node.
    pub fn node(&mut self, node: Node) -> TNode {
        let mark = node.mark;
        match node.value {
            YValue::Scalar { ref text, .. } if !text.contains("{{") && !text.contains("{%") => TNode::Lit(node),
            YValue::Scalar { text, .. } => match whole_expression(&text) {
                Some(_) => match self.expr(&text, mark) {
                    Some(e) => TNode::Expr(e),
                    None => TNode::Lit(Node { mark, value: YValue::Scalar { text, plain: false } }),
                },
                None => {
                    let name = self.name(mark);
                    if self.add(name.clone(), text.clone(), mark) {
                        TNode::Text { name, mark }
                    } else {
                        TNode::Lit(Node { mark, value: YValue::Scalar { text, plain: false } })
                    }
                }
            },
            YValue::Seq(items) => {
                let items: Vec<TNode> = items.into_iter().map(|n| self.node(n)).collect();
                if items.iter().all(|t| matches!(t, TNode::Lit(_))) {
                    let items = items.into_iter().map(|t| if let TNode::Lit(n) = t { n } else { unreachable!() });
                    TNode::Lit(Node { mark, value: YValue::Seq(items.collect()) })
                } else {
                    TNode::Seq { mark, items }
                }
            }
            YValue::Map(entries) => {
                let entries: Vec<(Node, TNode)> = entries.into_iter().map(|(k, v)| (k, self.node(v))).collect();
                if entries.iter().all(|(_, t)| matches!(t, TNode::Lit(_))) {
                    let entries =
                        entries.into_iter().map(|(k, t)| if let TNode::Lit(n) = t { (k, n) } else { unreachable!() });
                    TNode::Lit(Node { mark, value: YValue::Map(entries.collect()) })
                } else {
                    TNode::Map { mark, entries }
                }
            }
        }
    }

    /// A resource of a role: its directives taken out, its templates compiled.
    pub fn resource(&mut self, node: Node) -> Option<ResourceTemplate> {
        let mark = node.mark;
        let YValue::Map(entries) = node.value else {
            let msg = "a resource is a mapping like `file: /etc/motd`".to_string();
            self.diags.push(Diagnostic::new(&*self.file, mark, msg));
            return None;
        };
        let (mut when, mut for_each) = (None, None);
        let mut body = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            let slot = match k.as_str() {
                Some("when") => &mut when,
                Some("for_each") => &mut for_each,
                _ => {
                    body.push((k, v));
                    continue;
                }
            };
            match v.as_str() {
                Some(src) if !v.is_null() => *slot = Some(self.expr(src, v.mark)?),
                _ => {
                    let msg = format!("`{}` is an expression, like \"data.admins\"", k.as_str().unwrap_or_default());
                    self.diags.push(Diagnostic::new(&*self.file, v.mark, msg));
                    return None;
                }
            }
        }
        let body = self.node(Node { mark, value: YValue::Map(body) });
        Some(ResourceTemplate { mark, when, for_each, body })
    }
}

/// The expression of a value that is exactly `{{ expression }}`, nothing before or after
/// (`"{{ x }}\n"` is text: it ends with a newline).
pub fn whole_expression(text: &str) -> Option<&str> {
    let inner = text.strip_prefix("{{")?.strip_suffix("}}")?;
    (!inner.contains("{{") && !inner.contains("}}") && !inner.contains("{%")).then(|| inner.trim())
}

/// Parses a role file: every problem becomes a diagnostic; the role is `None` when it cannot
/// be used at all.
pub fn parse(
    name: &str,
    file: Arc<str>,
    text: &str,
    env: &mut Environment<'static>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Role> {
    let root = match yaml::parse(text) {
        Ok(n) => n,
        Err(e) => {
            diags.extend(e.problems.into_iter().map(|(m, msg)| Diagnostic::new(&*file, m, msg)));
            return None;
        }
    };
    let root_mark = root.mark;
    let entries = match root.value {
        YValue::Map(entries) => entries,
        _ if root.is_null() => Vec::new(),
        _ => {
            diags.push(Diagnostic::new(
                &*file,
                root_mark,
                "a role file is a mapping with `include`, `params` and `resources`",
            ));
            return None;
        }
    };
    let (resources, head): (Vec<_>, Vec<_>) = entries.into_iter().partition(|(k, _)| k.as_str() == Some("resources"));
    let head_node = Node { mark: root_mark, value: YValue::Map(head) };
    let head: RoleHead = match yaml::from_node(&head_node) {
        Ok(h) => h,
        Err(e) => {
            diags.extend(e.0.into_iter().map(|(m, msg)| Diagnostic::new(&*file, m.unwrap_or(root_mark), msg)));
            RoleHead { description: None, include: Vec::new(), params: BTreeMap::new(), confirm: None }
        }
    };
    let mut builder = Builder { env, file: file.clone(), diags };
    let mut templates = Vec::new();
    if let Some((_, list)) = resources.into_iter().next() {
        match list.value {
            YValue::Seq(items) => templates.extend(items.into_iter().filter_map(|n| builder.resource(n))),
            _ if list.is_null() => {}
            _ => builder.diags.push(Diagnostic::new(&*file, list.mark, "`resources` must be a list")),
        }
    }
    Some(Role { name: name.to_string(), file, head, resources: templates })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_expressions() {
        assert_eq!(whole_expression("{{ data.admins }}"), Some("data.admins"));
        assert_eq!(whole_expression("{{x}}"), Some("x"));
        assert_eq!(whole_expression("{{ x }}\n"), None);
        assert_eq!(whole_expression("{{ a }}-{{ b }}"), None);
        assert_eq!(whole_expression("port {{ p }}"), None);
    }
}
