//! `decide` on the example policies and on generated policies of growing size.
//!
//! cargo bench --bench decide -- --warm-up-time 1 --measurement-time 3
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "benchmark setup"
)]

#[path = "../tests/support/gen.rs"]
mod gen;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use routeplane::compile::compile;
use routeplane::decide::{decide, NoStats, RequestFeatures};
use routeplane::ir::Endpoint;

fn examples(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide/example");
    let cases: [(&str, serde_json::Value, serde_json::Value); 3] = [
        (
            "startup",
            serde_json::json!({}),
            serde_json::json!({"metadata": {"feature": "email-draft"}}),
        ),
        (
            "saas",
            serde_json::json!({"plan": "enterprise", "region": "eu", "data_residency": true}),
            serde_json::json!({"metadata": {"feature": "contract-review"}, "max_tokens": 500}),
        ),
        (
            "enterprise",
            serde_json::json!({"team": "engineering"}),
            serde_json::json!({"metadata": {"feature": "code-review", "sensitivity": "internal"}, "max_tokens": 500}),
        ),
    ];
    for (name, attrs, extra) in cases {
        let dir = routeplane::load::read_policy(std::path::Path::new(&format!("policies/{name}")))
            .unwrap();
        let p = compile(&dir.sources)
            .map_err(|a| format!("{:?}", a.diagnostics))
            .unwrap();
        let serde_json::Value::Object(attrs) = attrs else {
            unreachable!()
        };
        let t = p.tenant("bench", &attrs).unwrap();
        let mut body = serde_json::json!({
            "model": "auto",
            "messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Summarise the attached notes in three bullet points, please."}],
        });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let r = RequestFeatures::from_openai_json(Endpoint::Chat, &body);
        assert!(decide(&p, &t, &r, &NoStats).outcome.is_ok());
        group.bench_function(name, |b| {
            b.iter(|| decide(black_box(&p), black_box(&t), black_box(&r), &NoStats))
        });
    }
    group.finish();
}

fn scaled(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide/rules");
    for rules in [10usize, 100, 1_000, 10_000] {
        let p = gen::scaled(rules);
        let mut attrs = serde_json::Map::new();
        attrs.insert("plan".into(), "pro".into());
        attrs.insert("org".into(), "org-3".into());
        let t = p.tenant("bench", &attrs).unwrap();
        // A feature some rules key on, in the middle of the list.
        let r = RequestFeatures {
            feature: Some(format!("feature-{}", rules / 2 + 1)),
            input_tokens: 800,
            max_tokens: Some(400),
            has_tools: true,
            ..RequestFeatures::default()
        };
        group.bench_with_input(BenchmarkId::from_parameter(rules), &rules, |b, _| {
            b.iter(|| decide(black_box(&p), black_box(&t), black_box(&r), &NoStats))
        });
    }
    group.finish();
}

criterion_group!(benches, examples, scaled);
criterion_main!(benches);
