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
