//! Fuzzes what the agent does with a catalog file: the YAML reader and its serde layer, the
//! JSON fast path and the streaming decoder, validation and planning. Nothing may panic, and
//! what is accepted must plan.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = converge_modules::load::load("fuzz.yaml", text, None);
    }
    if let Ok(decoded) = converge_modules::stream::catalog_from_reader(data) {
        let _ = converge_modules::load::load_decoded("fuzz.json", decoded, None);
    }
});
