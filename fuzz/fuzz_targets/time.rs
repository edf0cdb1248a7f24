//! Fuzzes the text of times and durations (catalogs, reports, `--since`, `--ttl`,
//! configuration): a parse is an answer or an error, never a panic; what parses prints and
//! parses back the same; and hostile text is made printable.
#![no_main]

use converge_modules::time::Timestamp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(t) = Timestamp::parse(s) {
        assert_eq!(Timestamp::parse(&t.to_string()), Ok(t));
        let _ = t.checked_add(i64::MAX);
    }
    if let Ok(d) = converge_modules::settings::parse_duration(s) {
        assert!(d <= converge_modules::settings::MAX_DURATION);
        let _ = Timestamp::now().checked_add(d).expect("a century from now is a time");
    }
    let clean = converge_modules::text::clean(s);
    assert!(!clean.contains('\n') && !clean.contains('\u{1b}'));
});
