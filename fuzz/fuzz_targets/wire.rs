//! Fuzzes the bodies the server reads from the network, as it reads them: JSON into the wire
//! types, then their bounds; a report that passes is digested and clipped as the server and
//! agent do. Nothing may panic or overflow.
#![no_main]

use converge_modules::wire::{CatalogRequest, EnrollRequest, Report};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut r) = serde_json::from_slice::<Report>(data) {
        if r.check().is_ok() {
            let s = &r.summary;
            // What the server stores: sums of bounded counts.
            let _ = (s.changed + s.would_change) as i64;
        }
        // What the agent clips always fits; only counts it does not make can still be wrong.
        r.clip();
        if let Err(e) = r.check().map_err(|e| e.to_string()) {
            assert!(e.starts_with("summary.") || e.starts_with("info.resources"), "clipped, still refused: {e}");
        }
    }
    if let Ok(e) = serde_json::from_slice::<EnrollRequest>(data) {
        let _ = e.check();
    }
    if let Ok(c) = serde_json::from_slice::<CatalogRequest>(data) {
        let _ = c.check();
    }
    if let Ok(name) = std::str::from_utf8(data) {
        let _ = converge_modules::wire::check_node_name(name);
        let _ = converge_modules::text::clip(name, 64);
    }
});
