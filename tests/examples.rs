//! The example policies under `policies/` parse without errors.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use routeplane::load;

#[test]
fn example_policies_parse() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let policies = load::discover(&[root]).unwrap();
    assert!(policies.len() >= 3);
    for p in &policies {
        for (id, f) in p.sources.iter() {
            let parsed = routeplane::syntax::parse_file(id, &f.text);
            assert!(
                parsed.diagnostics.is_empty(),
                "{}: {:#?}",
                f.name,
                parsed.diagnostics
            );
        }
    }
}
