//! Any bytes: the parser returns a tree and diagnostics, never panics, never
//! reports an internal error, and every diagnostic span lies inside the text.
#![no_main]
use libfuzzer_sys::fuzz_target;
use routeplane::source::FileId;
use routeplane::syntax::parse_file;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let parsed = parse_file(FileId(0), &text);
    common::assert_no_internal_error(&parsed.diagnostics, &text);
    for d in &parsed.diagnostics {
        for l in &d.labels {
            assert!(l.span.end() <= text.len(), "label span {:?} outside the text", l.span);
        }
    }
});
