//! The example policies under `policies/` are clean: no error and no warning
//! (what `routeplane check --deny-warnings policies/` requires).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use routeplane::{analysis::analyze, load};

#[test]
fn example_policies_have_no_diagnostics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let policies = load::discover(&[root]).unwrap();
    let names: Vec<String> = policies
        .iter()
        .map(|p| p.root.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in ["enterprise", "saas", "startup"] {
        assert!(
            names.iter().any(|n| n == expected),
            "missing example policy `{expected}` in {names:?}"
        );
    }
    for p in &policies {
        let a = analyze(&p.sources);
        let shown: Vec<String> = a
            .diagnostics
            .iter()
            .map(|d| {
                format!(
                    "{} {}: {}",
                    d.span().map(|s| p.sources.location(s)).unwrap_or_default(),
                    d.code,
                    d.message
                )
            })
            .collect();
        assert!(
            shown.is_empty(),
            "{}:\n{}",
            p.root.display(),
            shown.join("\n")
        );
    }
}
