//! The template filters people reach for from Ansible and Salt, beside minijinja's own
//! (`tojson`, `default`, `join`, `map`, `select`, `items`, `dictsort`, `unique`, `indent`, ...):
//! `to_json`, `to_yaml`, `b64encode`, `b64decode`, `regex_replace`, `regex_search`, `basename`,
//! `dirname`, `combine`, `quote` and `hash`. Each is pure; each refuses what it cannot do with
//! an error that says what it wanted, which the compiler reports at the template's place.

use base64ct::{Base64, Encoding};
use minijinja::value::{Kwargs, Rest, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};
use sha2::Digest;

fn invalid(msg: String) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg)
}

/// Adds the filters to `env`.
pub fn register(env: &mut Environment<'static>) {
    env.add_filter("to_json", minijinja::filters::tojson);
    env.add_filter("to_yaml", to_yaml);
    env.add_filter("b64encode", |s: String| Base64::encode_string(s.as_bytes()));
    env.add_filter("b64decode", b64decode);
    env.add_filter("regex_replace", regex_replace);
    env.add_filter("regex_search", regex_search);
    env.add_filter("basename", |p: String| basename(&p).to_string());
    env.add_filter("dirname", |p: String| dirname(&p).to_string());
    env.add_filter("combine", combine);
    env.add_filter("quote", |s: String| quote(&s));
    env.add_filter("hash", hash);
}

/// YAML, as yaml_serde writes it (a final newline; `| trim` takes it off).
fn to_yaml(v: Value) -> Result<String, Error> {
    yaml_serde::to_string(&v).map_err(|e| invalid(format!("to_yaml: {e}")))
}

fn b64decode(s: String) -> Result<String, Error> {
    let bytes = Base64::decode_vec(s.trim()).map_err(|_| invalid("b64decode: the value is not base64".into()))?;
    String::from_utf8(bytes).map_err(|_| invalid("b64decode: the decoded bytes are not UTF-8 text".into()))
}

fn regex(pattern: &str) -> Result<regex_lite::Regex, Error> {
    // A pattern is written by the operator, but a huge one costs the compile: bounded, as the
    // catalog's own patterns are.
    converge_modules::providers::edit::regex(pattern).map_err(invalid)
}

/// Python's `\1` and `\g<name>` (what Ansible's regex_replace takes) as `${1}` and `${name}`;
/// `$1` works as it is.
fn replacement(r: &str) -> String {
    let mut out = String::with_capacity(r.len());
    let mut chars = r.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek().copied()) {
            ('\\', Some(d)) if d.is_ascii_digit() => {
                chars.next();
                out.push_str(&format!("${{{d}}}"));
            }
            ('\\', Some('g')) => {
                chars.next();
                if chars.peek() == Some(&'<') {
                    chars.next();
                    let name: String = chars.by_ref().take_while(|&c| c != '>').collect();
                    out.push_str(&format!("${{{name}}}"));
                } else {
                    out.push_str("\\g");
                }
            }
            ('\\', Some('\\')) => {
                chars.next();
                out.push('\\');
            }
            _ => out.push(c),
        }
    }
    out
}

fn regex_replace(s: String, pattern: String, with: Option<String>) -> Result<String, Error> {
    Ok(regex(&pattern)?.replace_all(&s, replacement(with.as_deref().unwrap_or("")).as_str()).into_owned())
}

/// The first match, or none (`is none` tests it).
fn regex_search(s: String, pattern: String) -> Result<Value, Error> {
    Ok(regex(&pattern)?.find(&s).map_or(Value::from(()), |m| Value::from(m.as_str())))
}

/// As Python's `os.path.basename`: what follows the last `/`.
fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// As Python's `os.path.dirname`: what precedes the last `/` (`/` for a file at the root).
fn dirname(p: &str) -> &str {
    match p.rfind('/') {
        None => "",
        Some(0) => "/",
        Some(i) if p[..i].trim_end_matches('/').is_empty() => "/",
        Some(i) => &p[..i],
    }
}

/// Maps merged left to right, later keys winning; `recursive=true` merges nested maps too.
fn combine(first: Value, rest: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let recursive: Option<bool> = kwargs.get("recursive")?;
    kwargs.assert_all_used()?;
    let mut out = first;
    for next in rest.iter() {
        for v in [&out, next] {
            if v.kind() != ValueKind::Map {
                return Err(invalid(format!("combine merges mappings, and was given {}", v.kind())));
            }
        }
        out = if recursive.unwrap_or(false) {
            crate::compiler::deep_merge(&out, next)
        } else {
            let mut map: std::collections::BTreeMap<String, Value> = std::collections::BTreeMap::new();
            for v in [&out, next] {
                for k in v.try_iter()? {
                    map.insert(k.to_string(), v.get_item(&k)?);
                }
            }
            Value::from(map)
        };
    }
    Ok(out)
}

/// As Python's `shlex.quote` (Ansible's `quote`): safe words as they are, anything else in
/// single quotes.
fn quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./-_".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\"'\"'"))
}

/// The hex digest of the text: `sha256` (the default) or `sha512`.
fn hash(s: String, algorithm: Option<String>) -> Result<String, Error> {
    Ok(match algorithm.as_deref().unwrap_or("sha256") {
        "sha256" => converge_modules::hash::hex(&sha2::Sha256::digest(s.as_bytes())),
        "sha512" => converge_modules::hash::hex(&sha2::Sha512::digest(s.as_bytes())),
        other => return Err(invalid(format!("hash: `{other}` is not an algorithm it knows (sha256, sha512)"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str, ctx: Value) -> Result<String, String> {
        let mut env = Environment::new();
        register(&mut env);
        env.render_str(template, ctx).map_err(|e| format!("{e:#}"))
    }

    fn r(template: &str) -> String {
        render(template, Value::from(())).unwrap_or_else(|e| panic!("{template}: {e}"))
    }

    #[test]
    fn each_filter_does_what_ansible_users_expect() {
        // As Python's json.dumps (which Ansible's to_json and Jinja's tojson are): ", " and ": ".
        assert_eq!(r("{{ {'a': [1, 'x']} | to_json }}"), r#"{"a": [1, "x"]}"#);
        assert_eq!(r("{{ {'a': [1, 'x']} | tojson }}"), r#"{"a": [1, "x"]}"#);
        assert_eq!(r("{{ {'a': 1, 'b': ['x']} | to_yaml }}"), "a: 1\nb:\n- x\n");
        assert_eq!(r("{{ 'hello' | b64encode }}"), "aGVsbG8=");
        assert_eq!(r("{{ 'aGVsbG8=' | b64decode }}"), "hello");
        assert_eq!(
            r(r"{{ 'host-01.example.com' | regex_replace('^(\\w+)-(\\d+)', '\\2-\\1') }}"),
            "01-host.example.com"
        );
        assert_eq!(r("{{ 'a.b.c' | regex_replace('\\\\.', '/') }}"), "a/b/c");
        assert_eq!(r("{{ 'v1.22.3' | regex_replace('v(?P<major>\\\\d+).*', '\\\\g<major>') }}"), "1");
        assert_eq!(r("{{ 'a1b22' | regex_replace('[0-9]+') }}"), "ab");
        assert_eq!(r("{{ 'eth0 up' | regex_search('eth[0-9]+') }}"), "eth0");
        assert_eq!(r("{{ 'lo' | regex_search('eth[0-9]+') is none }}"), "True");
        assert_eq!(
            r("{{ '/etc/nginx/nginx.conf' | basename }} {{ '/etc/nginx/nginx.conf' | dirname }}"),
            "nginx.conf /etc/nginx"
        );
        assert_eq!(r("[{{ '/etc/' | basename }}] {{ '/motd' | dirname }} [{{ 'motd' | dirname }}]"), "[] / []");
        assert_eq!(
            r("{{ {'a': 1, 'n': {'x': 1}} | combine({'b': 2, 'n': {'y': 2}}) | tojson }}"),
            r#"{"a": 1, "b": 2, "n": {"y": 2}}"#
        );
        assert_eq!(
            r("{{ {'a': 1, 'n': {'x': 1}} | combine({'n': {'y': 2}}, {'c': 3}, recursive=true) | tojson }}"),
            r#"{"a": 1, "c": 3, "n": {"x": 1, "y": 2}}"#
        );
        assert_eq!(
            r("{{ 'safe/path-1.conf' | quote }} {{ \"it's a $HOME\" | quote }} {{ '' | quote }}"),
            "safe/path-1.conf 'it'\"'\"'s a $HOME' ''"
        );
        assert_eq!(r("{{ 'abc' | hash }}"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(r("{{ 'abc' | hash('sha512') }}").len(), 128);
    }

    #[test]
    fn what_a_filter_cannot_do_is_an_error_that_says_what_it_wanted() {
        let e = render("{{ 'x' | regex_replace('(', '') }}", Value::from(())).unwrap_err();
        assert!(e.contains("`(` is not a regular expression"), "{e}");
        let e = render("{{ '!!' | b64decode }}", Value::from(())).unwrap_err();
        assert!(e.contains("not base64"), "{e}");
        let e = render("{{ '/w==' | b64decode }}", Value::from(())).unwrap_err();
        assert!(e.contains("not UTF-8"), "{e}");
        let e = render("{{ 'x' | hash('md5') }}", Value::from(())).unwrap_err();
        assert!(e.contains("sha256, sha512"), "{e}");
        let e = render("{{ {'a': 1} | combine([1]) }}", Value::from(())).unwrap_err();
        assert!(e.contains("combine merges mappings"), "{e}");
        let e = render("{{ {'a': 1} | combine({'b': 1}, deep=true) }}", Value::from(())).unwrap_err();
        assert!(e.contains("deep"), "{e}");
        let huge = format!("{{{{ 'x' | regex_replace('{}', '') }}}}", "(a{1000}){1000}");
        assert!(render(&huge, Value::from(())).unwrap_err().contains("not a regular expression"));
    }
}
