//! Shared oracle: no diagnostic may be an internal error.
use routeplane::diag::Diagnostic;

pub fn assert_no_internal_error(diagnostics: &[Diagnostic], input: &str) {
    for d in diagnostics {
        assert!(
            // `starts_with`: a message may quote the input, and the input
            // may say "internal error" (a fuzzer found `allow(internal error)`).
            d.code != "route::internal" && !d.message.starts_with("internal error"),
            "internal error `{}` on input {input:?}",
            d.message
        );
    }
}
