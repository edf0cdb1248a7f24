//! Package versions: how dpkg and rpm order them, and how a declared `ensure` version matches.
//!
//! Pure: no process is asked (`dpkg --compare-versions` would be one per comparison).

use std::cmp::Ordering;

/// Splits `epoch:rest` (epoch 0 when absent or not a number).
fn epoch(v: &str) -> (u64, &str) {
    match v.split_once(':') {
        Some((e, rest)) if !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()) => (e.parse().unwrap_or(0), rest),
        _ => (0, v),
    }
}

/// dpkg's order of a character in the non-digit part: `~` before everything (even the end),
/// then the end, then letters, then everything else.
fn deb_order(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(b'~') => -1,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => c as i32,
        Some(c) => c as i32 + 256,
    }
}

/// dpkg's `verrevcmp`: alternating non-digit and digit parts.
fn deb_part(a: &[u8], b: &[u8]) -> Ordering {
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit()) {
            let (ac, bc) = (deb_order(a.get(i).copied()), deb_order(b.get(j).copied()));
            if ac != bc {
                return ac.cmp(&bc);
            }
            i += 1;
            j += 1;
        }
        while a.get(i) == Some(&b'0') {
            i += 1;
        }
        while b.get(j) == Some(&b'0') {
            j += 1;
        }
        let mut first_diff = Ordering::Equal;
        while i < a.len() && j < b.len() && a[i].is_ascii_digit() && b[j].is_ascii_digit() {
            if first_diff == Ordering::Equal {
                first_diff = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if a.get(i).is_some_and(u8::is_ascii_digit) {
            return Ordering::Greater;
        }
        if b.get(j).is_some_and(u8::is_ascii_digit) {
            return Ordering::Less;
        }
        if first_diff != Ordering::Equal {
            return first_diff;
        }
    }
    Ordering::Equal
}

/// Orders two Debian versions (`[epoch:]upstream[-revision]`) as dpkg does.
pub fn compare_deb(a: &str, b: &str) -> Ordering {
    let ((ea, a), (eb, b)) = (epoch(a), epoch(b));
    let split = |v: &str| match v.rsplit_once('-') {
        Some((up, rev)) => (up.to_string(), rev.to_string()),
        None => (v.to_string(), String::new()),
    };
    let ((ua, ra), (ub, rb)) = (split(a), split(b));
    ea.cmp(&eb)
        .then_with(|| deb_part(ua.as_bytes(), ub.as_bytes()))
        .then_with(|| deb_part(ra.as_bytes(), rb.as_bytes()))
}

/// rpm's `rpmvercmp` on one part (version or release).
fn rpm_part(a: &str, b: &str) -> Ordering {
    if a == b {
        return Ordering::Equal;
    }
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    let sep = |c: u8| !c.is_ascii_alphanumeric() && c != b'~' && c != b'^';
    loop {
        while i < a.len() && sep(a[i]) {
            i += 1;
        }
        while j < b.len() && sep(b[j]) {
            j += 1;
        }
        // `~` sorts before anything, even the end.
        if a.get(i) == Some(&b'~') || b.get(j) == Some(&b'~') {
            if a.get(i) != Some(&b'~') {
                return Ordering::Greater;
            }
            if b.get(j) != Some(&b'~') {
                return Ordering::Less;
            }
            i += 1;
            j += 1;
            continue;
        }
        // `^` sorts after the end, but before anything else.
        if a.get(i) == Some(&b'^') || b.get(j) == Some(&b'^') {
            if i >= a.len() {
                return Ordering::Less;
            }
            if j >= b.len() {
                return Ordering::Greater;
            }
            if a[i] != b'^' {
                return Ordering::Greater;
            }
            if b[j] != b'^' {
                return Ordering::Less;
            }
            i += 1;
            j += 1;
            continue;
        }
        if i >= a.len() || j >= b.len() {
            break;
        }
        let numeric = a[i].is_ascii_digit();
        let kind = |c: &u8| if numeric { c.is_ascii_digit() } else { c.is_ascii_alphabetic() };
        let (si, sj) = (i, j);
        while i < a.len() && kind(&a[i]) {
            i += 1;
        }
        while j < b.len() && kind(&b[j]) {
            j += 1;
        }
        let (mut x, mut y) = (&a[si..i], &b[sj..j]);
        if y.is_empty() {
            // A number is newer than letters.
            return if numeric { Ordering::Greater } else { Ordering::Less };
        }
        if numeric {
            while x.first() == Some(&b'0') {
                x = &x[1..];
            }
            while y.first() == Some(&b'0') {
                y = &y[1..];
            }
            if x.len() != y.len() {
                return x.len().cmp(&y.len());
            }
        }
        match x.cmp(y) {
            Ordering::Equal => {}
            o => return o,
        }
    }
    match (i >= a.len(), j >= b.len()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        _ => Ordering::Greater,
    }
}

/// Orders two RPM versions (`[epoch:]version[-release]`) as rpm does.
pub fn compare_rpm(a: &str, b: &str) -> Ordering {
    let ((ea, a), (eb, b)) = (epoch(a), epoch(b));
    let split = |v: &str| match v.rsplit_once('-') {
        Some((ver, rel)) => (ver.to_string(), Some(rel.to_string())),
        None => (v.to_string(), None),
    };
    let ((va, ra), (vb, rb)) = (split(a), split(b));
    ea.cmp(&eb).then_with(|| rpm_part(&va, &vb)).then_with(|| match (ra, rb) {
        // A version without a release matches any release of it.
        (Some(x), Some(y)) => rpm_part(&x, &y),
        _ => Ordering::Equal,
    })
}

/// Whether `version` is what `ensure: PATTERN` asks for: a prefix when the pattern ends in
/// `*` (`1.24.*`, compared with and without the epoch), else the same version as `compare`
/// orders it (so `1.2-1` is `0:1.2-1`).
pub fn matches(version: &str, pattern: &str, compare: impl Fn(&str, &str) -> Ordering) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => version.starts_with(prefix) || epoch(version).1.starts_with(prefix),
        None => compare(version, pattern) == Ordering::Equal,
    }
}

/// The newest of `versions` that `pattern` matches.
pub fn best_match<'a>(
    versions: &'a [String],
    pattern: &str,
    compare: impl Fn(&str, &str) -> Ordering + Copy,
) -> Option<&'a String> {
    versions.iter().filter(|v| matches(v, pattern, compare)).max_by(|a, b| compare(a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use Ordering::*;

    #[test]
    fn debian_order() {
        for (a, b, o) in [
            ("1.0", "1.0", Equal),
            ("1.0", "1.1", Less),
            ("1.10", "1.9", Greater),
            ("1.0~rc1", "1.0", Less),
            ("1.0~~", "1.0~", Less),
            ("1.0", "1.0+b1", Less),
            ("1.0-1", "1.0-2", Less),
            ("1:0.9", "2.0", Greater),
            ("0:1.2-1", "1.2-1", Equal),
            ("1.2.3-1", "1.2.3-1ubuntu1", Less),
            ("2.36.1-8+deb12u1", "2.36.1-8", Greater),
            ("1.22.1-9", "1.22.1-9+deb12u4", Less),
            ("1.0a", "1.0", Greater),
            ("1.0", "1.0.0", Less),
            ("001", "1", Equal),
        ] {
            assert_eq!(compare_deb(a, b), o, "{a} vs {b}");
            assert_eq!(compare_deb(b, a), o.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn rpm_order() {
        for (a, b, o) in [
            ("1.0-1", "1.0-1", Equal),
            ("1.0-1", "1.0-2", Less),
            ("1.10-1", "1.9-1", Greater),
            ("1.0~rc1-1", "1.0-1", Less),
            ("1.0^git1-1", "1.0-1", Greater),
            ("1.0^git1-1", "1.0.1-1", Less),
            ("1.0a-1", "1.0-1", Greater),
            ("1.0-1.el9", "1.0-1.el9_2", Less),
            ("2:1.0-1", "1:9.0-1", Greater),
            ("1.0", "1.0-7", Equal),
            ("1.a-1", "1.1-1", Less),
        ] {
            assert_eq!(compare_rpm(a, b), o, "{a} vs {b}");
            assert_eq!(compare_rpm(b, a), o.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn patterns() {
        assert!(matches("1.24.0-1", "1.24.*", compare_deb));
        assert!(matches("1:1.24.0-1", "1.24.*", compare_deb));
        assert!(!matches("1.25.0-1", "1.24.*", compare_deb));
        assert!(matches("0:1.2-1", "1.2-1", compare_deb));
        assert!(!matches("1.2-2", "1.2-1", compare_deb));
        let versions: Vec<String> = ["1.24.0-1", "1.24.2-1", "1.25.0-1"].iter().map(|s| s.to_string()).collect();
        assert_eq!(best_match(&versions, "1.24.*", compare_deb).unwrap(), "1.24.2-1");
        assert_eq!(best_match(&versions, "1.26.*", compare_deb), None);
    }
}
