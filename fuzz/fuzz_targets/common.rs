//! Shared oracle: no diagnostic may be an internal error.
use routeplane::diag::Diagnostic;

pub fn assert_no_internal_error(diagnostics: &[Diagnostic], input: &str) {
    for d in diagnostics {
        assert!(
            d.code != "route::internal" && !d.message.contains("internal error"),
            "internal error `{}` on input {input:?}",
            d.message
        );
    }
}
