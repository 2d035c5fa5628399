//! Cost of the input-token estimate on the request path: the bundled o200k
//! and cl100k encodings and the chars/4 approximation, on chat bodies of
//! 1k, 10k and 100k characters of mixed prose and code.
//!
//! Also the budget cycle one request adds on the gateway's path (balance
//! check, reserve, settle with a ledger entry) on the memory, SQLite and
//! Redis stores (Redis: a local `redis-server` on a free port, skipped when
//! not installed).
//!
//! Run: `cargo bench --bench estimate`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use routeplane::estimate::{input_tokens, Tokenizer};

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
    // Load both encodings before timing anything.
    Tokenizer::O200k.count("warm");
    Tokenizer::Cl100k.count("warm");
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

fn cycle(c: &mut Criterion) {
    use routeplane::state::{self, Charge, Counter, LedgerEntry};
    use std::sync::atomic::{AtomicU64, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let mut stores: Vec<(&str, std::sync::Arc<dyn state::BudgetStore>)> = vec![
        ("memory", state::open(&state::Backend::Memory).unwrap()),
        (
            "sqlite",
            state::open(&state::Backend::Sqlite(dir.path().join("b.db"))).unwrap(),
        ),
    ];
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let redis = std::process::Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--dir",
        ])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .ok();
    if redis.is_some() {
        let url = format!("redis://127.0.0.1:{port}/0");
        for _ in 0..200 {
            if let Ok(s) = state::open(&state::Backend::Redis(url.clone())) {
                stores.push(("redis", s));
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let charges = [
        Charge {
            counter: Counter {
                key: "monthly|tenant|bench".into(),
                period_start: 0,
            },
            limit: u64::MAX / 4,
        },
        Charge {
            counter: Counter {
                key: "daily|feature|chat".into(),
                period_start: 0,
            },
            limit: u64::MAX / 4,
        },
    ];
    let seq = AtomicU64::new(0);
    let mut g = c.benchmark_group("budget_cycle");
    for (name, store) in &stores {
        g.bench_function(*name, |b| {
            b.iter(|| {
                let id = format!("r{}", seq.fetch_add(1, Ordering::Relaxed));
                for ch in &charges {
                    store.balance(&ch.counter, 1).unwrap();
                }
                let r = store.reserve(&id, &charges, 100, 1, 60_000).unwrap();
                let e = LedgerEntry {
                    id: id.clone(),
                    ts_ms: 1,
                    tenant: "bench".into(),
                    feature: Some("chat".into()),
                    model: "m".into(),
                    input_tokens: 10,
                    output_tokens: 10,
                    estimated: 100,
                    actual: 50,
                };
                store.settle(&r, &e).unwrap()
            })
        });
    }
    g.finish();
    if let Some(mut child) = redis {
        let _ = child.kill();
        let _ = child.wait();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = bench, cycle
}
criterion_main!(benches);
