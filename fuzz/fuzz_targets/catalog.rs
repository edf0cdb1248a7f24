//! Fuzzes what the agent does with a catalog file: the YAML reader and its serde layer, the
//! JSON fast path and the streaming decoders, validation and planning. Nothing may panic, and
//! what is accepted must plan. A YAML catalog read from a reader is accepted exactly when its
//! text is, as the same catalog; and whatever the block reader reads (rather than leaving to
//! saphyr) it reads as saphyr does: the same nodes, places and errors.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = std::str::from_utf8(data).ok();
    let whole = text.map(|t| converge_modules::load::load("fuzz.yaml", t, None));
    let mut items = Vec::new();
    if let Some(block) = converge_modules::yaml::parse_block_from(data, "resources", &mut |n| items.push(n)) {
        let text = text.expect("the block reader reads UTF-8 only");
        let mut want = Vec::new();
        let saphyr = converge_modules::yaml::parse_streaming(text, "resources", &mut |n| want.push(n));
        assert_eq!((block, items), (saphyr, want), "the block reader and saphyr disagree");
    }
    if data.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        let streamed = converge_modules::load::load_yaml_from("fuzz.yaml", || Ok(data), None, &mut |_| {});
        let whole = whole.as_ref().and_then(|w| w.as_ref().ok());
        assert_eq!(streamed.map(|l| l.catalog), whole.map(|l| l.catalog.clone()), "reader and text disagree");
    }
    if let Ok(decoded) = converge_modules::stream::catalog_from_reader(data) {
        let _ = converge_modules::load::load_decoded("fuzz.json", decoded, None);
    }
});
