//! For any text that parses: formatting is idempotent, the formatted text
//! parses to the same tree (spans aside), and every comment survives.
#![no_main]
use libfuzzer_sys::fuzz_target;
use routeplane::source::FileId;
use routeplane::syntax::parse_file;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let before = parse_file(FileId(0), text);
    if !before.diagnostics.is_empty() {
        // Broken files are refused by the formatter, never rewritten.
        assert!(routeplane::fmt::format_source(FileId(0), text).is_err());
        return;
    }
    let once = routeplane::fmt::format_source(FileId(0), text).expect("a file that parses formats");
    let twice = routeplane::fmt::format_source(FileId(0), &once).expect("formatted output parses");
    assert_eq!(once, twice, "fmt is not idempotent");
    let after = parse_file(FileId(0), &once);
    assert!(after.diagnostics.is_empty(), "formatted output has errors: {:?}", after.diagnostics);
    assert_eq!(before.ast.items, after.ast.items, "formatting changed the meaning");
    let mut a: Vec<&str> = before.ast.comments.iter().map(|c| c.text.as_str()).collect();
    let mut b: Vec<&str> = after.ast.comments.iter().map(|c| c.text.as_str()).collect();
    a.sort_unstable();
    b.sort_unstable();
    assert_eq!(a, b, "comments were lost or changed");
});
