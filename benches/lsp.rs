//! Latency of diagnostics in the editor: from a `didChange` of a ~5,000-line
//! policy to the `publishDiagnostics` that answers it, through the real
//! `routeplane lsp` binary over stdio.
//!
//! Run: `cargo bench --bench lsp`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::string_slice
)]

#[path = "../tests/lsp_support/mod.rs"]
mod lsp_support;
#[path = "../tests/support/text_gen.rs"]
mod text_gen;

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};

fn diagnostics_latency(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.route");
    // About 5,000 lines.
    let text = text_gen::policy_with_rules(1_600);
    let lines = text.lines().count();
    std::fs::write(&path, &text).unwrap();
    let uri = lsp_support::uri(&path);
    let mut client = lsp_support::Client::start(env!("CARGO_BIN_EXE_routeplane"));
    client.open(&uri, &text);
    let _ = client.diagnostics_for(&uri);
    let mut version = 1;
    let mut group = c.benchmark_group("lsp");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(10));
    group.bench_function(format!("didChange to diagnostics, {lines} lines"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                version += 1;
                // Alternate between a broken and a fixed edit so each run has new work.
                let edited = if version % 2 == 0 {
                    text.replace("route chat {", "route chat {\n  candidats [m0]")
                } else {
                    text.clone()
                };
                let start = Instant::now();
                client.change(&uri, version, &edited);
                let _ = client.diagnostics_for(&uri);
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
    client.shutdown();
}

criterion_group!(benches, diagnostics_latency);
criterion_main!(benches);
