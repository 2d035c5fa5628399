//! Cost of the input-token estimate on the request path: the bundled o200k
//! and cl100k encodings and the chars/4 approximation, on chat bodies of
//! 1k, 10k and 100k characters of mixed prose and code.
//!
//! Run: `cargo bench --bench estimate`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use routeplane::estimate::{input_tokens, warm_up, Tokenizer};

fn prompt(chars: usize) -> String {
    let para = "The gateway reserves the estimated cost before dispatch and settles the actual \
cost after the response. fn settle(r: &Reservation, actual: u64) -> Result<(), Error> { \
ledger.insert(r.id, actual)?; } Numbers such as 1234567 and URLs like https://example.com/a?b=c \
appear too; ünïcödé and 日本語のテキスト as well.\n";
    let mut s = String::with_capacity(chars + para.len());
    while s.len() < chars {
        s.push_str(para);
    }
    s.chars().take(chars).collect()
}

fn bench(c: &mut Criterion) {
    warm_up();
    let mut g = c.benchmark_group("input_tokens");
    for chars in [1_000usize, 10_000, 100_000] {
        let body = serde_json::json!({
            "model": "auto",
            "messages": [
                {"role": "system", "content": "You are a careful assistant."},
                {"role": "user", "content": prompt(chars)}
            ]
        });
        g.throughput(Throughput::Bytes(chars as u64));
        for (name, tok) in [
            ("o200k", Tokenizer::O200k),
            ("cl100k", Tokenizer::Cl100k),
            ("approx", Tokenizer::Approx),
        ] {
            g.bench_with_input(BenchmarkId::new(name, chars), &body, |b, body| {
                b.iter(|| input_tokens(tok, body))
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
