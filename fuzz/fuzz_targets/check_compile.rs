//! Any text, split into up to three files at NUL bytes: analysis reports
//! problems without panicking or internal errors; a policy without errors
//! compiles, and its tenants resolve.
#![no_main]
use libfuzzer_sys::fuzz_target;
use routeplane::source::Sources;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut sources = Sources::new();
    for (i, part) in text.split('\0').take(3).enumerate() {
        sources.add(format!("f{i}.route"), part);
    }
    let analysis = routeplane::analysis::analyze(&sources);
    common::assert_no_internal_error(&analysis.diagnostics, &text);
    if !analysis.has_errors() {
        let compiled = match routeplane::compile::compile(&sources) {
            Ok(c) => c,
            Err(a) => panic!("analysis had no errors but compile failed: {:?}", a.diagnostics),
        };
        let _ = compiled.tenant("t", &serde_json::Map::new());
    }
});
