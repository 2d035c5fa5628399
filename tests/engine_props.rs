//! Property tests of the decision engine over generated policies, tenants,
//! requests and live stats:
//! - the hard-constraint invariant: every attempted model is allowed by layer 1,
//!   computed independently of the compiled policy;
//! - differential: the compiled decision equals the plain IR interpreter's
//!   (`decide::reference`), attempts, intent, route, cost and denial alike.

#[path = "support/gen.rs"]
mod gen;

use proptest::prelude::*;
use routeplane::decide::{decide, explain, reference};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 600,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn attempts_stay_inside_the_allowed_set(policy_seed in any::<u64>(), input_seed in any::<u64>()) {
        let g = gen::policy(policy_seed);
        let t = gen::tenant(input_seed);
        let tenant = g.policy.tenant(&t.id, &t.attrs).unwrap();
        for k in 0..8u64 {
            let r = gen::request(input_seed.wrapping_add(k), &g);
            let s = gen::stats(input_seed.wrapping_add(k), &g);
            let d = decide(&g.policy, &tenant, &r, &s);
            let allowed = reference::allowed(&g.policy, &t.id, tenant.values(), &r);
            for m in &d.attempts {
                prop_assert!(allowed.contains(m), "seed {policy_seed}/{input_seed}+{k}: {m:?} not allowed; {d:?}");
            }
            let mut seen = d.attempts.clone();
            seen.sort();
            seen.dedup();
            prop_assert_eq!(seen.len(), d.attempts.len(), "duplicate attempts");
            prop_assert!(d.outcome.is_ok() != d.attempts.is_empty(), "outcome and attempts disagree: {:?}", d);
        }
    }

    #[test]
    fn compiled_matches_the_reference_interpreter(policy_seed in any::<u64>(), input_seed in any::<u64>()) {
        let g = gen::policy(policy_seed);
        let t = gen::tenant(input_seed);
        let tenant = g.policy.tenant(&t.id, &t.attrs).unwrap();
        for k in 0..8u64 {
            let r = gen::request(input_seed.wrapping_add(k), &g);
            let s = gen::stats(input_seed.wrapping_add(k), &g);
            let got = decide(&g.policy, &tenant, &r, &s);
            let want = reference::decide(&g.policy, &t.id, tenant.values(), &r, &s);
            prop_assert_eq!(&got, &want, "seed {}/{}+{}: {:?}", policy_seed, input_seed, k, r);
            // explain runs the same evaluation.
            prop_assert_eq!(&explain(&g.policy, &tenant, &r, &s).decision, &got);
        }
    }
}

#[test]
fn scaled_policies_match_the_reference_too() {
    for rules in [10, 100, 1000] {
        let p = gen::scaled(rules);
        let g = gen::Generated {
            policy: p,
            models: 32,
            intents: (0..16).map(|i| format!("i{i}")).collect(),
        };
        for seed in 0..200u64 {
            let t = gen::tenant(seed);
            let tenant = g.policy.tenant(&t.id, &t.attrs).unwrap();
            let mut r = gen::request(seed, &g);
            r.feature = Some(format!("feature-{}", seed % (rules as u64 + 3)));
            let s = gen::stats(seed, &g);
            let got = decide(&g.policy, &tenant, &r, &s);
            let want = reference::decide(&g.policy, &t.id, tenant.values(), &r, &s);
            assert_eq!(got, want, "rules {rules} seed {seed}");
        }
    }
}

#[test]
#[ignore = "prints the distribution of generated outcomes"]
fn outcome_distribution() {
    let mut counts = std::collections::BTreeMap::new();
    for seed in 0..2000u64 {
        let g = gen::policy(seed);
        let t = gen::tenant(seed);
        let tenant = g.policy.tenant(&t.id, &t.attrs).unwrap();
        let r = gen::request(seed, &g);
        let s = gen::stats(seed, &g);
        let d = decide(&g.policy, &tenant, &r, &s);
        let k = match &d.outcome {
            Ok(()) => format!("ok/{}", d.attempts.len().min(4)),
            Err(e) => e.code().to_string(),
        };
        *counts.entry(k).or_insert(0) += 1;
    }
    println!("{counts:#?}");
}

/// The example policies, lowered from text, against the reference
/// interpreter on many requests: checks that the compiled conditions read
/// lowered literals (enum variants, request metadata, defaults) the same way.
#[test]
fn example_policies_match_the_reference() {
    use rand::{Rng, SeedableRng};
    use routeplane::decide::{BreakerState, ModelStats, RequestFeatures};
    use routeplane::ir::{BudgetAction, Endpoint, ResponseFormat};
    let tenants: [(&str, &[serde_json::Value]); 3] = [
        ("startup", &[serde_json::json!({})]),
        (
            "saas",
            &[
                serde_json::json!({"plan": "free"}),
                serde_json::json!({"plan": "pro", "region": "eu"}),
                serde_json::json!({"plan": "enterprise", "region": "eu", "data_residency": true}),
                serde_json::json!({"plan": "enterprise", "tags": ["early-access"]}),
            ],
        ),
        (
            "enterprise",
            &[
                serde_json::json!({"team": "engineering"}),
                serde_json::json!({"team": "legal"}),
                serde_json::json!({"team": "marketing"}),
                serde_json::json!({"team": "support"}),
                serde_json::json!({"team": "research", "monthly_budget": 10}),
            ],
        ),
    ];
    let features = [
        "code-review",
        "code-assist",
        "contract-review",
        "contract-analysis",
        "email-draft",
        "research-notes",
        "search",
        "board-report",
        "other",
        "bogus",
    ];
    let prompts = [
        "",
        "def foo(x): pass",
        "please translate this",
        "diff --git a b",
        "Write a report on X",
        "hello",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (name, attrs_list) in tenants {
        let dir = routeplane::load::read_policy(std::path::Path::new(&format!(
            "{}/policies/{name}",
            env!("CARGO_MANIFEST_DIR")
        )))
        .unwrap();
        let p = routeplane::compile::compile(&dir.sources).unwrap();
        let mut names: Vec<String> = p.policy().models.iter().map(|m| m.name.clone()).collect();
        names.extend(p.policy().intents.iter().map(|i| i.name.clone()));
        for (ti, attrs) in attrs_list.iter().enumerate() {
            let serde_json::Value::Object(attrs) = attrs.clone() else {
                unreachable!()
            };
            let id = if ti == 0 {
                "ml-platform".to_string()
            } else {
                format!("t{ti}")
            };
            let t = p.tenant(&id, &attrs).unwrap();
            for k in 0..1500 {
                let mut meta = Vec::new();
                if rng.random_bool(0.5) {
                    meta.push((
                        "sensitivity".to_string(),
                        ["public", "internal", "confidential"][rng.random_range(0..3)].to_string(),
                    ));
                }
                if rng.random_bool(0.5) {
                    meta.push((
                        "priority".to_string(),
                        ["low", "normal", "high"][rng.random_range(0..3)].to_string(),
                    ));
                }
                let r = RequestFeatures {
                    endpoint: [
                        Endpoint::Chat,
                        Endpoint::Chat,
                        Endpoint::Embeddings,
                        Endpoint::Images,
                        Endpoint::AudioTranscription,
                    ][rng.random_range(0..5)],
                    response_format: [
                        ResponseFormat::Text,
                        ResponseFormat::Text,
                        ResponseFormat::JsonObject,
                        ResponseFormat::JsonSchema,
                    ][rng.random_range(0..4)],
                    has_tools: rng.random_bool(0.3),
                    has_images: rng.random_bool(0.2),
                    stream: rng.random_bool(0.5),
                    input_tokens: [10, 400, 3000, 40_000, 250_000][rng.random_range(0..5)],
                    max_tokens: [None, Some(100), Some(250), Some(5000)][rng.random_range(0..4)],
                    feature: rng
                        .random_bool(0.8)
                        .then(|| features[rng.random_range(0..features.len())].to_string()),
                    prompt: prompts[rng.random_range(0..prompts.len())].to_string(),
                    model: if rng.random_bool(0.3) {
                        Some(names[rng.random_range(0..names.len())].clone())
                    } else {
                        None
                    },
                    meta,
                    confirmed: rng.random_bool(0.3),
                };
                let mut models = std::collections::HashMap::new();
                for m in 0..p.policy().models.len() as u32 {
                    if rng.random_bool(0.6) {
                        continue;
                    }
                    models.insert(
                        m,
                        ModelStats {
                            latency_ms: Some(rng.random_range(100..3000) as f64),
                            first_token_ms: rng
                                .random_bool(0.5)
                                .then(|| rng.random_range(50..900) as f64),
                            success_rate: Some(rng.random_range(50..=100) as f64 / 100.0),
                            breaker: [
                                BreakerState::Closed,
                                BreakerState::Closed,
                                BreakerState::HalfOpen,
                                BreakerState::Open,
                            ][rng.random_range(0..4)],
                        },
                    );
                }
                let budget = [
                    None,
                    None,
                    Some(BudgetAction::Warn),
                    Some(BudgetAction::ConfirmPremium),
                    Some(BudgetAction::Downgrade),
                    Some(BudgetAction::Block),
                ][rng.random_range(0..6)];
                let stats = gen::GenStats {
                    models,
                    budget,
                    confirm_premium: budget == Some(BudgetAction::Downgrade)
                        && rng.random_bool(0.5),
                };
                let got = decide(&p, &t, &r, &stats);
                let want = reference::decide(&p, &id, t.values(), &r, &stats);
                assert_eq!(got, want, "{name} tenant {attrs:?} case {k}: {r:?}");
                let allowed = reference::allowed(&p, &id, t.values(), &r);
                assert!(
                    got.attempts.iter().all(|m| allowed.contains(m)),
                    "{name}: {got:?}"
                );
            }
        }
    }
}
