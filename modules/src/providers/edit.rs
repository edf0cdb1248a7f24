//! `file_line` and `file_block`: edits inside a file converge does not own (a package's configuration,
//! a file another tool writes), the habits of Puppet's `file_line` and Ansible's `lineinfile`
//! and `blockinfile`.
//!
//! The edit is a pure function from the file's bytes to its new bytes ([`edit_line`],
//! [`edit_block`]): every line it does not touch is kept byte for byte, invalid UTF-8 and a
//! missing final newline included. The file is replaced as a `file` is: atomically, with its
//! mode and owner, after `validate`, its old content in the backup store. A symlink is never
//! followed, and a file larger than [`MAX_EDITED`] is refused rather than read whole.
//!
//! Several edits of one file are converged one after the other in the catalog's order, each
//! reading what the one before wrote; a `file` resource of the same path comes first (it may
//! create the file) and may not also declare its `content`.

use super::{Checked, Observed, System, fail, fail_create, present};
use crate::catalog::{BlockSpec, Ensure, LineSpec, Resource, Spec};
use crate::host::{FileType, HostError, NewAttrs};
use crate::providers::ProviderError;
use crate::report::{Change, unified_diff};

/// The largest file an edit reads.
pub const MAX_EDITED: u64 = 16 << 20;

/// The most a regular expression of a catalog may cost to compile.
const REGEX_SIZE: usize = 1 << 20;

/// A regular expression of a catalog (or a template), bounded in what it costs to build.
pub fn regex(pattern: &str) -> Result<regex_lite::Regex, String> {
    regex_lite::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE)
        .build()
        .map_err(|e| format!("`{pattern}` is not a regular expression: {e}"))
}

/// The default marker of a block: `# BEGIN converge NAME` ... `# END converge NAME`.
pub fn default_marker(name: &str) -> String {
    format!("# {{mark}} converge {name}")
}

/// A file as lines without their newlines, and whether its last line ended with one.
struct Lines<'a> {
    lines: Vec<std::borrow::Cow<'a, [u8]>>,
    final_newline: bool,
}

impl<'a> Lines<'a> {
    fn split(content: &'a [u8]) -> Lines<'a> {
        let final_newline = content.is_empty() || content.ends_with(b"\n");
        let body = content.strip_suffix(b"\n").unwrap_or(content);
        let lines = if content.is_empty() { Vec::new() } else { body.split(|b| *b == b'\n').map(Into::into).collect() };
        Lines { lines, final_newline }
    }

    fn join(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.lines.iter().map(|l| l.len() + 1).sum());
        for (i, l) in self.lines.iter().enumerate() {
            if i > 0 {
                out.push(b'\n');
            }
            out.extend_from_slice(l);
        }
        if !self.lines.is_empty() && self.final_newline {
            out.push(b'\n');
        }
        out
    }

    /// The line numbers (from 0) whose text `re` matches; a line that is not UTF-8 is matched
    /// as it reads with its invalid bytes replaced.
    fn matching(&self, re: &regex_lite::Regex) -> Vec<usize> {
        (0..self.lines.len()).filter(|i| re.is_match(&String::from_utf8_lossy(&self.lines[*i]))).collect()
    }

    /// Where new lines go: after the last line `after` matches, before the first `before`
    /// matches, else at the end (a new line also ends the file's last line).
    fn insertion(&mut self, after: Option<&regex_lite::Regex>, before: Option<&regex_lite::Regex>) -> usize {
        if let Some(&last) = after.and_then(|re| self.matching(re).last().copied()).as_ref() {
            return last + 1;
        }
        if let Some(&first) = before.and_then(|re| self.matching(re).first().copied()).as_ref() {
            return first;
        }
        self.final_newline = true;
        self.lines.len()
    }
}

fn compiled(field: &str, pattern: Option<&str>) -> Result<Option<regex_lite::Regex>, String> {
    pattern.map(|p| regex(p).map_err(|e| format!("`{field}`: {e}"))).transpose()
}

/// The file's content with the line as declared. Pure.
pub fn edit_line(content: &[u8], l: &LineSpec, ensure: Ensure) -> Result<Vec<u8>, String> {
    let mut lines = Lines::split(content);
    let matches = compiled("match", l.matches.as_deref())?;
    let line = l.line.as_deref().map(str::as_bytes);
    let matched = matches.as_ref().map(|re| lines.matching(re)).unwrap_or_default();
    if matched.len() > 1 && l.multiple != Some(true) {
        let at: Vec<String> = matched.iter().take(10).map(|i| (i + 1).to_string()).collect();
        return Err(format!(
            "{} lines match `{}` (lines {}{}); narrow `match`, or set `multiple: true` to edit them all",
            matched.len(),
            l.matches.as_deref().unwrap_or_default(),
            at.join(", "),
            if matched.len() > at.len() { ", ..." } else { "" }
        ));
    }
    match (ensure, line) {
        (Ensure::Absent, _) => {
            let mut i = 0;
            lines.lines.retain(|have| {
                let gone = line.is_some_and(|l| have.as_ref() == l) || matched.contains(&i);
                i += 1;
                !gone
            });
        }
        (Ensure::Present, None) => return Err("`line` is needed to make the line present".into()),
        (Ensure::Present, Some(line)) => {
            if !matched.is_empty() {
                for i in matched {
                    lines.lines[i] = line.to_vec().into();
                }
            } else if !lines.lines.iter().any(|have| have.as_ref() == line) {
                let after = compiled("after", l.after.as_deref())?;
                let before = compiled("before", l.before.as_deref())?;
                let at = lines.insertion(after.as_ref(), before.as_ref());
                lines.lines.insert(at, line.to_vec().into());
            }
        }
    }
    Ok(lines.join())
}

/// The file's content with the block `name` as declared. Pure.
pub fn edit_block(content: &[u8], name: &str, b: &BlockSpec, ensure: Ensure) -> Result<Vec<u8>, String> {
    let mut lines = Lines::split(content);
    let marker = b.marker.clone().unwrap_or_else(|| default_marker(name));
    let (begin, end) = (marker.replace("{mark}", "BEGIN"), marker.replace("{mark}", "END"));
    let is = |l: &[u8], m: &str| l.strip_suffix(b"\r").unwrap_or(l) == m.as_bytes();
    let start = lines.lines.iter().position(|l| is(l, &begin));
    let stop = start.and_then(|s| lines.lines[s..].iter().position(|l| is(l, &end)).map(|e| s + e));
    let found = match (start, stop) {
        (Some(s), Some(e)) => Some((s, e)),
        (Some(s), None) => {
            return Err(format!(
                "line {} is the block's marker `{begin}` but no `{end}` follows it; put the end marker back \
                 (or remove the begin marker) by hand: converge will not guess where the block ends",
                s + 1
            ));
        }
        (None, _) if lines.lines.iter().any(|l| is(l, &end)) => {
            return Err(format!(
                "the block's end marker `{end}` is in the file without `{begin}` before it; fix the markers by hand"
            ));
        }
        (None, _) => None,
    };
    let mut block: Vec<std::borrow::Cow<[u8]>> = vec![begin.as_bytes().to_vec().into()];
    if let Some(text) = b.content.as_deref().filter(|t| !t.is_empty()) {
        block.extend(text.strip_suffix('\n').unwrap_or(text).split('\n').map(|l| l.as_bytes().to_vec().into()));
    }
    block.push(end.as_bytes().to_vec().into());
    match (ensure, found) {
        (Ensure::Absent, Some((s, e))) => {
            lines.lines.drain(s..=e);
        }
        (Ensure::Absent, None) => {}
        (Ensure::Present, Some((s, e))) => {
            lines.lines.splice(s..=e, block);
        }
        (Ensure::Present, None) => {
            let after = compiled("after", b.after.as_deref())?;
            let before = compiled("before", b.before.as_deref())?;
            let at = lines.insertion(after.as_ref(), before.as_ref());
            lines.lines.splice(at..at, block);
        }
    }
    Ok(lines.join())
}

/// The fields both edits share.
struct Edit<'a> {
    path: &'a str,
    create: bool,
    backup: bool,
    validate: Option<&'a [String]>,
}

fn edit_of(r: &Resource) -> Option<Edit<'_>> {
    match &r.spec {
        Spec::Line(l) => Some(Edit {
            path: &l.path,
            create: l.create == Some(true),
            backup: l.backup != Some(false),
            validate: l.validate.as_deref(),
        }),
        Spec::Block(b) => Some(Edit {
            path: &b.path,
            create: b.create == Some(true),
            backup: b.backup != Some(false),
            validate: b.validate.as_deref(),
        }),
        _ => None,
    }
}

/// The new content of `old` (empty for a file to create). Pure.
fn edited(r: &Resource, old: &[u8]) -> Result<Vec<u8>, String> {
    let ensure = r.spec.ensure();
    match &r.spec {
        Spec::Line(l) => edit_line(old, l, ensure),
        Spec::Block(b) => edit_block(old, &r.id.title, b, ensure),
        _ => Ok(old.to_vec()),
    }
}

/// Reads the file an edit changes.
pub fn inspect(sys: &System, r: &Resource) -> Result<Observed, ProviderError> {
    let Some(e) = edit_of(r) else { return Ok(Observed::default()) };
    let read = sys.host.read_file(e.path, MAX_EDITED).map_err(fail)?;
    let seen =
        Observed { stat: read.as_ref().map(|r| r.stat), content: read.and_then(|r| r.content), ..Observed::default() };
    if let Some(s) = seen.stat {
        if s.file_type != FileType::File {
            return Err(format!(
                "{} is a {}, not a regular file: {} edits only a regular file (a symlink is never followed)",
                e.path, s.file_type, r.id
            )
            .into());
        }
        if seen.content.is_none() {
            return Err(format!(
                "{} is {} bytes: larger than the {} MiB an edit reads; manage it as a `file`",
                e.path,
                s.size,
                MAX_EDITED >> 20
            )
            .into());
        }
    }
    Ok(seen)
}

/// What the edit changes, from what `inspect` saw. Pure but for the questions a dry-run asks
/// about what earlier changes will have made.
pub fn check(sys: &System, r: &Resource) -> Result<(Checked, Vec<Change>), ProviderError> {
    let Some(e) = edit_of(r) else { return Ok((Checked::default(), vec![])) };
    let seen = inspect(sys, r)?;
    let what = if matches!(r.spec, Spec::Line(_)) { "line" } else { "block" };
    let old = match &seen.content {
        Some(c) => c.as_slice(),
        None if !present(r) => return Ok((Checked { seen, ..Checked::default() }, vec![])),
        None if e.create => &[],
        // In a dry-run, an earlier resource (the `file`, a package, a command) may make it.
        None if sys.assumed_path(e.path) || sys.assumed_side_effects() => {
            let change = Change::new(what, "absent (the file is made by an earlier change)", "present");
            return Ok((Checked { seen, conditional: true, ..Checked::default() }, vec![change]));
        }
        None => {
            return Err(format!(
                "{} does not exist: declare it (a `file`, or the package that ships it, in `requires`), \
                 or set `create: true`",
                e.path
            )
            .into());
        }
    };
    if seen.stat.is_none() {
        sys.parent_must_exist(e.path, &seen)?;
    }
    let new = edited(r, old)?;
    if seen.stat.is_some() && new == old {
        return Ok((Checked { seen, ..Checked::default() }, vec![]));
    }
    let (from, to) = match (r.spec.ensure(), seen.stat.is_some()) {
        (Ensure::Absent, _) => ("present", "absent"),
        (_, true) => ("absent or different", "present"),
        (_, false) => ("absent (file created)", "present"),
    };
    let mut change = Change::new(what, from, to);
    if !r.sensitive() {
        change.diff = unified_diff(e.path, &format!("{} ({})", e.path, r.id), old, &new);
    }
    Ok((Checked { seen, ..Checked::default() }, vec![change]))
}

/// Writes the edited file: atomically, keeping its mode and owner.
pub fn apply(sys: &System, r: &Resource, state: &Checked) -> Result<(), ProviderError> {
    let Some(e) = edit_of(r) else { return Ok(()) };
    // Read again: an earlier edit of the same file in this run may have changed it.
    let seen = inspect(sys, r)?;
    let old = seen.content.as_deref().unwrap_or_default();
    let new = edited(r, old)?;
    if seen.stat.is_some() && new == old {
        return Ok(());
    }
    if seen.stat.is_some() && e.backup && !r.sensitive() {
        sys.host.backup(e.path).map_err(fail)?;
    }
    let attrs = match seen.stat.or(state.seen.stat) {
        Some(s) => NewAttrs { mode: s.mode, uid: Some(s.uid), gid: Some(s.gid) },
        None => NewAttrs { mode: 0o644, uid: None, gid: None },
    };
    sys.host.write_file(e.path, &new, attrs, e.validate).map_err(|err| match err {
        HostError::Command { command, status, .. } if r.sensitive() => ProviderError::Declared(format!(
            "validate `{command}` {status} (its output is hidden: the resource is sensitive)"
        )),
        HostError::Command { .. } => {
            ProviderError::Declared(format!("validate refused the edit, {} left as it was: {err}", e.path))
        }
        err => fail_create(err),
    })?;
    sys.path_changed(e.path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str, m: Option<&str>) -> LineSpec {
        LineSpec { path: "/f".into(), line: Some(text.into()), matches: m.map(Into::into), ..LineSpec::default() }
    }

    fn present(content: &str, l: &LineSpec) -> String {
        String::from_utf8(edit_line(content.as_bytes(), l, Ensure::Present).unwrap()).unwrap()
    }

    #[test]
    fn a_line_is_replaced_where_it_matches_else_added_at_the_end() {
        let l = line("PermitRootLogin no", Some("^#?PermitRootLogin"));
        assert_eq!(present("Port 22\n#PermitRootLogin yes\nX 1\n", &l), "Port 22\nPermitRootLogin no\nX 1\n");
        assert_eq!(present("Port 22\n", &l), "Port 22\nPermitRootLogin no\n");
        // No final newline: the old last line gets one, nothing else moves.
        assert_eq!(present("Port 22", &l), "Port 22\nPermitRootLogin no\n");
        assert_eq!(present("", &l), "PermitRootLogin no\n");
        // Idempotent: the second edit is the first.
        let once = present("a\n#PermitRootLogin yes\n", &l);
        assert_eq!(present(&once, &l), once);
    }

    #[test]
    fn several_matches_are_an_error_unless_multiple() {
        let l = line("x = 1", Some("^x ="));
        let e = edit_line(b"x = 2\ny\nx = 3\n", &l, Ensure::Present).unwrap_err();
        assert_eq!(e, "2 lines match `^x =` (lines 1, 3); narrow `match`, or set `multiple: true` to edit them all");
        let l = LineSpec { multiple: Some(true), ..l };
        assert_eq!(present("x = 2\ny\nx = 3\n", &l), "x = 1\ny\nx = 1\n");
    }

    #[test]
    fn after_and_before_place_a_new_line() {
        let after = LineSpec { after: Some("^\\[main\\]".into()), ..line("k = v", None) };
        assert_eq!(present("[main]\na = b\n[other]\n", &after), "[main]\nk = v\na = b\n[other]\n");
        let before = LineSpec { before: Some("^\\[other\\]".into()), ..line("k = v", None) };
        assert_eq!(present("[main]\na = b\n[other]\n", &before), "[main]\na = b\nk = v\n[other]\n");
        // An anchor that matches nothing: at the end.
        assert_eq!(present("a\n", &before), "a\nk = v\n");
    }

    #[test]
    fn absent_removes_the_line_and_what_match_matches() {
        let l = line("k = v", Some("^k ="));
        let out = edit_line(b"a\nk = v\nk = w\nb", &LineSpec { multiple: Some(true), ..l }, Ensure::Absent).unwrap();
        assert_eq!(out, b"a\nb");
    }

    #[test]
    fn bytes_that_are_not_utf8_are_kept() {
        let old = b"caf\xe9\nk = 1\n";
        let out = edit_line(old, &line("k = 2", Some("^k =")), Ensure::Present).unwrap();
        assert_eq!(out, b"caf\xe9\nk = 2\n");
    }

    fn block(content: &str) -> BlockSpec {
        BlockSpec { path: "/f".into(), content: Some(content.into()), ..BlockSpec::default() }
    }

    fn edit(old: &str, b: &BlockSpec, ensure: Ensure) -> Result<String, String> {
        edit_block(old.as_bytes(), "hosts", b, ensure).map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn a_block_is_added_replaced_and_removed_between_its_markers() {
        let b = block("10.0.0.1 db\n10.0.0.2 cache\n");
        let added = edit("127.0.0.1 localhost\n", &b, Ensure::Present).unwrap();
        assert_eq!(
            added,
            "127.0.0.1 localhost\n# BEGIN converge hosts\n10.0.0.1 db\n10.0.0.2 cache\n# END converge hosts\n"
        );
        assert_eq!(edit(&added, &b, Ensure::Present).unwrap(), added, "idempotent");
        let changed = edit(&added, &block("10.0.0.9 db\n"), Ensure::Present).unwrap();
        assert_eq!(changed, "127.0.0.1 localhost\n# BEGIN converge hosts\n10.0.0.9 db\n# END converge hosts\n");
        assert_eq!(edit(&changed, &b, Ensure::Absent).unwrap(), "127.0.0.1 localhost\n");
    }

    #[test]
    fn a_broken_marker_is_an_error_not_a_guess() {
        let b = block("x\n");
        let e = edit("a\n# BEGIN converge hosts\nx\n", &b, Ensure::Present).unwrap_err();
        assert!(e.starts_with("line 2 is the block's marker `# BEGIN converge hosts` but no `# END"), "{e}");
        let e = edit("a\n# END converge hosts\n", &b, Ensure::Present).unwrap_err();
        assert!(e.contains("without `# BEGIN converge hosts`"), "{e}");
    }

    #[test]
    fn a_custom_marker_and_an_anchor() {
        let b = BlockSpec { marker: Some("## {mark} pool".into()), after: Some("^upstream".into()), ..block("s1;") };
        assert_eq!(
            edit("upstream app {\n}\n", &b, Ensure::Present).unwrap(),
            "upstream app {\n## BEGIN pool\ns1;\n## END pool\n}\n"
        );
    }

    #[test]
    fn a_huge_pattern_is_refused_not_built() {
        let e = regex(&"(a|b)".repeat(100_000)).unwrap_err();
        assert!(e.contains("is not a regular expression"), "{}", &e[e.len() - 80..]);
    }

    mod on_a_host {
        use crate::host::memory::{MemHost, MemNode};
        use crate::providers::converge_yaml;
        use crate::report::Status;

        const SSHD: &str = "Port 22\n#PermitRootLogin yes\n";

        fn host() -> MemHost {
            MemHost::new().with_dir("/etc", 0o755).with_dir("/etc/ssh", 0o755).with_file(
                "/etc/ssh/sshd_config",
                SSHD,
                0o600,
            )
        }

        const EDITS: &str = "  - file_line: no-root\n    path: /etc/ssh/sshd_config\n    line: PermitRootLogin no\n    match: ^#?PermitRootLogin\n  - file_block: banner\n    path: /etc/ssh/sshd_config\n    content: |\n      Banner /etc/issue.net\n      MaxAuthTries 3\n";

        #[test]
        fn two_edits_of_one_file_then_nothing_and_a_dry_run_shows_the_diff() {
            let host = host();
            let dry = converge_yaml(&host, EDITS, true);
            assert!(dry.iter().all(|e| e.status == Status::WouldChange), "{dry:?}");
            let diff = dry[0].changes[0].diff.as_deref().unwrap();
            assert!(diff.contains("-#PermitRootLogin yes\n+PermitRootLogin no"), "{diff}");
            assert_eq!(host.content("/etc/ssh/sshd_config").as_deref(), Some(SSHD), "a dry-run changes nothing");
            let events = converge_yaml(&host, EDITS, false);
            assert!(events.iter().all(|e| e.status == Status::Changed), "{events:?}");
            assert_eq!(
                host.content("/etc/ssh/sshd_config").unwrap(),
                "Port 22\nPermitRootLogin no\n# BEGIN converge banner\nBanner /etc/issue.net\nMaxAuthTries 3\n# END converge banner\n"
            );
            let Some(MemNode::File { mode, .. }) = host.node("/etc/ssh/sshd_config") else { panic!() };
            assert_eq!(mode, 0o600, "the file keeps its mode");
            assert_eq!(host.backups().len(), 2, "the old content is kept");
            assert!(converge_yaml(&host, EDITS, false).iter().all(|e| e.status == Status::Unchanged));
        }

        #[test]
        fn a_missing_file_is_an_error_unless_created_or_made_earlier() {
            let host = MemHost::new().with_dir("/etc", 0o755);
            let line = "  - file_line: x\n    path: /etc/x.conf\n    line: a = 1\n";
            let e = converge_yaml(&host, line, false).pop().unwrap();
            assert_eq!(e.status, Status::Failed);
            assert!(e.message.unwrap().starts_with("/etc/x.conf does not exist: declare it"));
            let e = converge_yaml(&host, &format!("{line}    create: true\n"), false).pop().unwrap();
            assert_eq!(e.status, Status::Changed);
            assert_eq!(host.content("/etc/x.conf").as_deref(), Some("a = 1\n"));
            // A `file` that manages only the mode comes first and makes it.
            let host = MemHost::new().with_dir("/etc", 0o755);
            let both = format!("{line}  - file: /etc/x.conf\n    mode: \"0640\"\n");
            let events = converge_yaml(&host, &both, true);
            assert!(events.iter().all(|e| e.status == Status::WouldChange), "{events:?}");
            converge_yaml(&host, &both, false);
            assert_eq!(host.content("/etc/x.conf").as_deref(), Some("a = 1\n"));
        }

        #[test]
        fn a_symlink_is_never_followed_and_sensitive_shows_no_diff() {
            let host = host().with_symlink("/etc/link", "/etc/ssh/sshd_config");
            let e = converge_yaml(&host, "  - file_line: l\n    path: /etc/link\n    line: x\n", false).pop().unwrap();
            assert_eq!(e.status, Status::Failed);
            assert!(e.message.unwrap().contains("is a symlink, not a regular file"));
            let e = converge_yaml(
                &host,
                "  - file_line: l\n    path: /etc/ssh/sshd_config\n    line: secret\n    sensitive: true\n",
                false,
            )
            .pop()
            .unwrap();
            assert_eq!(e.status, Status::Changed);
            assert!(e.changes.iter().all(|c| c.diff.is_none()) && !format!("{e:?}").contains("secret"), "{e:?}");
            assert!(host.backups().is_empty(), "no backup of a sensitive edit");
        }

        #[test]
        fn a_purge_keeps_an_edited_file() {
            let host = host().with_file("/etc/ssh/stray", "x", 0o644);
            let yaml = format!("  - directory: /etc/ssh\n    purge: true\n    force: true\n{EDITS}");
            converge_yaml(&host, &yaml, false);
            assert!(host.content("/etc/ssh/sshd_config").unwrap().contains("PermitRootLogin no"));
            assert_eq!(host.content("/etc/ssh/stray"), None);
        }
    }

    #[test]
    fn the_catalog_refuses_what_cannot_be_edited() {
        let text = "format: 1\nresources:\n  - file_line: a\n    path: /etc/converge/agent.toml\n    line: x\n  - file: /etc/hosts\n    content: x\n  - file_block: b\n    path: /etc/hosts\n    content: y\n  - file_line: c\n    path: etc/x\n    line: x\n    match: \"(\"\n  - file_line: d\n    path: /etc/x\n  - file_block: e\n    path: /etc/x\n    content: z\n    marker: \"# converge\"\n  - file_line: f\n    path: /etc/x\n    line: \"a\\nb\"\n";
        let e = crate::load::load("c.yaml", text, None).unwrap_err().to_string();
        for want in [
            "3:5: file_line:a writes into /etc/converge/agent.toml, which is protected",
            "8:5: file_block:b edits /etc/hosts, whose whole content file:/etc/hosts declares",
            "11:5: file_line:c: `path`: path `etc/x` is relative",
            "11:5: file_line:c: `match`: `(` is not a regular expression",
            "15:5: file_line:d: give the `line` to make present",
            "17:5: file_block:e: `marker` is one line holding `{mark}`",
            "21:5: file_line:f: `line` is one line",
        ] {
            assert!(e.contains(want), "{want}\nin\n{e}");
        }
    }
}
