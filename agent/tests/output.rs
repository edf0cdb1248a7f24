//! What `converge apply` prints, as snapshots (`cargo insta review` after a deliberate
//! change): the text for people and the JSON Lines for programs, on a run that changes, fails,
//! skips and leaves things as they are, then its dry-run. Times and the scratch path are
//! normalised; everything else is exactly what an operator sees.

mod common;
use common::{Scratch, converge_env};

const CATALOG: &str = "format: 1
resources:
  - directory: /etc/app
  - file: /etc/app/app.conf
    content: \"port = 8080\\n\"
    mode: \"0640\"
  - file: /etc/app/unchanged.conf
    content: \"same\\n\"
  - symlink: /etc/app/current
    target: /etc/app/app.conf
  - file: /missing/dir/x.conf
    content: x
  - file: /etc/app/after-failure.conf
    content: y
    requires: [file:/missing/dir/x.conf]
";

/// The output with what changes from run to run replaced: the scratch path, durations.
fn normalise(s: &Scratch, text: &str) -> String {
    let text = text.replace(&s.dir.path().display().to_string(), "[scratch]");
    let mut out = String::new();
    for line in text.lines() {
        let mut line = line.to_string();
        for (start, end) in [("\"duration_ms\":", ","), ("\"duration_ms\":", "}"), (" in ", " s")] {
            if let Some(i) = line.find(start) {
                let from = i + start.len();
                if let Some(j) = line[from..].find(end) {
                    let number = &line[from..from + j];
                    if !number.is_empty() && number.chars().all(|c| c.is_ascii_digit() || c == '.') {
                        line.replace_range(from..from + j, "[t]");
                    }
                }
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[test]
fn apply_text_and_json_for_a_run_and_its_dry_run() {
    for format in ["text", "json"] {
        let s = Scratch::new();
        s.write("/etc/app/unchanged.conf", "same\n");
        let catalog = s.catalog("site.yaml", CATALOG);
        let dry = s.apply(&catalog, &["--dry-run", "--format", format, "--color", "never"]);
        let run = s.apply(&catalog, &["--format", format, "--color", "never"]);
        assert_eq!((dry.code, run.code), (6, 6), "changes and failures both: {}{}", run.stdout, run.stderr);
        insta::assert_snapshot!(format!("apply_{format}_dry_run"), normalise(&s, &dry.stdout));
        insta::assert_snapshot!(format!("apply_{format}"), normalise(&s, &run.stdout));
    }
}

/// With `CONVERGE_LOG=debug`, each resource's line names its resource inside the run's span,
/// which names the node, serial and commit: a log line found alone in a journal says where it
/// came from.
#[test]
fn log_lines_carry_the_run_and_the_resource() {
    let s = Scratch::new();
    let c = s.catalog(
        "c.json",
        r#"{"format":1,"host":"web1","serial":42,"source":{"repository":"ops","commit":"c0ffee"},"resources":[{"file":"/motd","content":"hi\n"}]}"#,
    );
    let root = s.root();
    let out = converge_env(
        &["apply", "--root", root.to_str().unwrap(), "--node", "web1", &c],
        &[("CONVERGE_LOG", "debug"), ("NO_COLOR", "1")],
    );
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("converged") && !l.contains("plan:"))
        .unwrap_or_else(|| panic!("no resource line: {}", out.stderr));
    for field in [
        "run{",
        "node=\"web1\"",
        "serial=42",
        "commit=\"c0ffee\"",
        "dry_run=false",
        "resource{id=file:/motd}",
        "status=Changed",
    ] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
    let planned = out.stderr.lines().find(|l| l.contains("converged") && l.contains("plan:")).expect("the plan's line");
    assert!(planned.contains("resource{id=file:/motd}") && planned.contains("status=WouldChange"), "{planned}");
    let quiet = converge_env(&["apply", "--root", root.to_str().unwrap(), "--node", "web1", &c], &[]);
    assert_eq!((quiet.code, quiet.stderr.as_str()), (0, ""), "nothing on stderr by default");
}
