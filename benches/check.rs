//! `routeplane check` speed: the example policies, and generated policies of
//! 100, 1,000 and 10,000 rules (parse + lower + check, what the CLI, the
//! language server and the gateway's reload all run).
//!
//! Run: `cargo bench --bench check`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use routeplane::source::Sources;

#[path = "../tests/support/text_gen.rs"]
mod text_gen;

fn one_file(text: &str) -> Sources {
    let mut s = Sources::new();
    s.add("generated.route", text);
    s
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("check");
    for name in ["startup", "saas", "enterprise"] {
        let dir = routeplane::load::read_policy(std::path::Path::new(&format!("policies/{name}")));
        let Ok(dir) = dir else { continue };
        let a = routeplane::analysis::analyze(&dir.sources);
        assert!(!a.has_errors(), "{name} has errors");
        group.bench_function(BenchmarkId::new("example", name), |b| {
            b.iter(|| routeplane::analysis::analyze(&dir.sources))
        });
    }
    for rules in [100, 1_000, 10_000] {
        let sources = one_file(&text_gen::policy_with_rules(rules));
        let a = routeplane::analysis::analyze(&sources);
        let errors: Vec<_> = a.errors().map(|d| d.message.clone()).take(3).collect();
        assert!(errors.is_empty(), "generated policy has errors: {errors:?}");
        if rules == 10_000 {
            group.sample_size(10);
        }
        group.bench_function(BenchmarkId::new("generated rules", rules), |b| {
            b.iter(|| routeplane::analysis::analyze(&sources))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
