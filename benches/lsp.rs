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

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};

/// A realistic large policy: many models, constraints, classify rules and routes.
pub fn big_policy(models: usize) -> String {
    let mut s = String::from("tenant {\n  plan: enum(free, pro, enterprise)\n  region: enum(us, eu)\n  data_residency: bool\n}\n\n");
    for p in 0..10 {
        s += &format!(
            "provider p{p} {{\n  region {}\n}}\n\n",
            if p % 2 == 0 { "us" } else { "eu" }
        );
    }
    for m in 0..models {
        s += &format!(
            "model m{m} {{\n  provider p{}\n  kind chat\n  context 128k\n  price in $0.{:02} out $0.{:02} per 1M\n  caps [tools, json]\n  quality 0.{}\n}}\n\n",
            m % 10,
            m % 90 + 10,
            m % 80 + 20,
            m % 9 + 1
        );
    }
    s += "constraints {\n";
    for m in 0..models {
        s += &format!("  deny model m{m} when tenant.plan == free and tenant.region == eu\n");
    }
    s += "  allow only [m0, m1, m2] when tenant.plan == free\n}\n\nclassify {\n";
    let intents = models / 5;
    for i in 0..intents {
        s += &format!("  intent{i} when request.feature == \"f{i}\"\n");
    }
    s += "  chat otherwise\n}\n\n";
    for i in 0..intents {
        s += &format!("route intent{i} {{\n  candidates [m0, m{}, m{}]\n  score 0.5 * price + 0.5 * latency\n  fallback [m1]\n}}\n\n", i % models, (i + 7) % models);
    }
    s += "route chat {\n  candidates [m0, m1, m2]\n  fallback [m1]\n}\n";
    s
}

fn diagnostics_latency(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.route");
    let text = big_policy(450);
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
