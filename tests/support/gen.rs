//! Random policies, tenants, requests and stats for the engine's property
//! tests and benchmarks. Everything is built from a seed so a failure prints
//! a reproducible case.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "test data generator"
)]

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use routeplane::compile::{compile_policy, CompiledPolicy};
use routeplane::decide::testkit::{Builder, RouteSpec};
use routeplane::decide::{BreakerState, ModelStats, RequestFeatures, Stats};
use routeplane::ir::*;
use routeplane::source::Sources;

pub const PLANS: [&str; 3] = ["free", "pro", "enterprise"];
pub const FEATURES: [&str; 5] = ["f0", "f1", "f2", "f3", "code"];
pub const ORGS: [&str; 3] = ["acme", "globex", "initech"];

/// A generated policy with what the generators need to make inputs for it.
pub struct Generated {
    pub policy: CompiledPolicy,
    pub models: usize,
    pub intents: Vec<String>,
}

/// A tenant: id and values by `AttrId` (plan, eu, org, quota, tags).
pub struct GenTenant {
    pub id: String,
    pub attrs: serde_json::Map<String, serde_json::Value>,
}

struct Ctx<'a> {
    rng: &'a mut StdRng,
    plan: AttrId,
    eu: AttrId,
    org: AttrId,
    quota: AttrId,
    tags: AttrId,
    priority: AttrId,
    models: usize,
}

impl Ctx<'_> {
    fn atom(&mut self, request_only: bool) -> Cond {
        let r = &mut *self.rng;
        let pick = if request_only {
            r.random_range(0..11)
        } else {
            r.random_range(0..17)
        };
        let req = |f| Field::Request(f);
        match pick {
            0 => Cond::Cmp(
                req(RequestField::Endpoint),
                CmpOp::Eq,
                Value::Enum(r.random_range(0..5)),
            ),
            1 => Cond::In(
                req(RequestField::ResponseFormat),
                (0..r.random_range(1..3))
                    .map(|_| Value::Enum(r.random_range(0..3)))
                    .collect(),
            ),
            2 => Cond::Bool(req(RequestField::HasTools)),
            3 => Cond::Bool(req(RequestField::HasImages)),
            4 => Cond::Bool(req(RequestField::Stream)),
            5 => Cond::Cmp(
                req(RequestField::Feature),
                CmpOp::Eq,
                Value::Str(FEATURES[r.random_range(0..5)].into()),
            ),
            6 => Cond::In(
                req(RequestField::Feature),
                (0..r.random_range(1..3))
                    .map(|_| Value::Str(FEATURES[r.random_range(0..5)].into()))
                    .collect(),
            ),
            7 => Cond::Cmp(
                req(RequestField::InputTokens),
                [CmpOp::Gt, CmpOp::Le, CmpOp::Ne][r.random_range(0..3)],
                Value::Number(r.random_range(0..4) as f64 * 1000.0),
            ),
            8 => Cond::Cmp(
                req(RequestField::MaxTokens),
                CmpOp::Lt,
                Value::Number(r.random_range(0..3) as f64 * 500.0),
            ),
            9 => {
                if r.random_bool(0.5) {
                    Cond::Contains(
                        req(RequestField::Prompt),
                        vec!["Alpha".into(), "ssn".into()],
                    )
                } else {
                    Cond::Matches(
                        req(RequestField::Prompt),
                        RegexLit(regex::Regex::new("be.a").unwrap()),
                    )
                }
            }
            10 => Cond::Cmp(
                req(RequestField::Meta(self.priority)),
                if r.random_bool(0.5) {
                    CmpOp::Eq
                } else {
                    CmpOp::Ne
                },
                Value::Enum(r.random_range(0..3)),
            ),
            11 => Cond::Cmp(
                Field::Tenant(self.plan),
                CmpOp::Eq,
                Value::Enum(r.random_range(0..3)),
            ),
            12 => Cond::Bool(Field::Tenant(self.eu)),
            13 => Cond::Cmp(
                Field::TenantId,
                CmpOp::Eq,
                Value::Str(format!("t{}", r.random_range(0..3))),
            ),
            14 => Cond::In(
                Field::Tenant(self.org),
                vec![Value::Str(ORGS[r.random_range(0..3)].into())],
            ),
            15 => Cond::Cmp(
                Field::Tenant(self.quota),
                CmpOp::Ge,
                Value::Number(r.random_range(0..3) as f64 * 10.0),
            ),
            _ => Cond::Has(Field::Tenant(self.tags), Value::Str("beta".into())),
        }
    }

    fn cond(&mut self, depth: u32, request_only: bool) -> Cond {
        let k = if depth == 0 {
            0
        } else {
            self.rng.random_range(0..6)
        };
        match k {
            0..=2 => self.atom(request_only),
            3 => Cond::Not(Box::new(self.cond(depth - 1, request_only))),
            4 => Cond::And(
                (0..self.rng.random_range(2..4))
                    .map(|_| self.cond(depth - 1, request_only))
                    .collect(),
            ),
            _ => Cond::Or(
                (0..self.rng.random_range(2..4))
                    .map(|_| self.cond(depth - 1, request_only))
                    .collect(),
            ),
        }
    }

    fn models(&mut self, min: usize, max: usize) -> Vec<ModelId> {
        let n = self.rng.random_range(min..=max);
        (0..n)
            .map(|_| ModelId(self.rng.random_range(0..self.models) as u32))
            .collect()
    }
}

/// Declares the fixed schema and returns the context.
fn schema(b: &mut Builder) -> (AttrId, AttrId, AttrId, AttrId, AttrId, AttrId) {
    let plan = b.tenant_attr(
        "plan",
        Type::Enum(PLANS.iter().map(|s| s.to_string()).collect()),
        Some(Value::Enum(0)),
    );
    let eu = b.tenant_attr("eu", Type::Bool, Some(Value::Bool(false)));
    let org = b.tenant_attr("org", Type::String, Some(Value::Str("acme".into())));
    let quota = b.tenant_attr("quota", Type::Number, Some(Value::Number(10.0)));
    let tags = b.tenant_attr(
        "tags",
        Type::List(Box::new(Type::String)),
        Some(Value::List(vec![])),
    );
    let priority = b.request_attr(
        "priority",
        Type::Enum(vec!["low".into(), "normal".into(), "high".into()]),
        Some(Value::Enum(1)),
    );
    (plan, eu, org, quota, tags, priority)
}

/// A random small policy: up to 12 models, 8 constraints, 8 classify rules, 4 intents.
pub fn policy(seed: u64) -> Generated {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut b = Builder::new();
    let (plan, eu, org, quota, tags, priority) = schema(&mut b);
    let providers: Vec<ProviderId> = (0..3)
        .map(|i| b.provider(&format!("p{i}"), if i == 2 { "eu" } else { "us" }))
        .collect();
    let n_models = rng.random_range(1..=12);
    for i in 0..n_models {
        let tier = if rng.random_bool(0.3) {
            Tier::Premium
        } else {
            Tier::Standard
        };
        let m = b.model(
            &format!("m{i}"),
            providers[rng.random_range(0..3)],
            rng.random_range(0..40) as f64 / 4.0,
            rng.random_range(0..80) as f64 / 4.0,
            rng.random_range(0..10) as f64 / 10.0,
            tier,
        );
        let model = &mut b.p.models[m.index()];
        model.enabled = rng.random_bool(0.9);
        // Mostly chat; the others serve other endpoints or none (video).
        if rng.random_bool(0.3) {
            model.kind = [
                ModelKind::Embeddings,
                ModelKind::Image,
                ModelKind::Audio,
                ModelKind::Video,
            ][rng.random_range(0..4)];
        }
        if rng.random_bool(0.3) {
            model.max_output = Some(rng.random_range(1..5) * 1000);
        }
    }
    let mut cx = Ctx {
        rng: &mut rng,
        plan,
        eu,
        org,
        quota,
        tags,
        priority,
        models: n_models,
    };
    let n_intents = cx.rng.random_range(1..=4);
    let intents: Vec<String> = (0..n_intents).map(|i| format!("i{i}")).collect();
    for i in 0..cx.rng.random_range(0..=8) {
        let effect = [Effect::Deny, Effect::AllowOnly, Effect::Require][cx.rng.random_range(0..3)];
        let removes = cx.models(0, 4);
        let when = if cx.rng.random_bool(0.8) {
            Some(cx.cond(2, false))
        } else {
            None
        };
        b.constraint(&format!("c{i}"), effect, &removes, when);
    }
    for _ in 0..cx.rng.random_range(0..=7) {
        let intent = intents[cx.rng.random_range(0..n_intents)].clone();
        let when = cx.cond(2, false);
        b.classify(&intent, Some(when));
    }
    b.classify(&intents[0], None);
    for (i, name) in intents.iter().enumerate() {
        for refined in [true, false] {
            if refined && !cx.rng.random_bool(0.4) {
                continue;
            }
            let score = if cx.rng.random_bool(0.2) {
                vec![]
            } else {
                let signals = [
                    Signal::Price,
                    Signal::Latency,
                    Signal::FirstToken,
                    Signal::Success,
                    Signal::Quality,
                    Signal::Health,
                ];
                (0..cx.rng.random_range(1..4))
                    .map(|_| {
                        (
                            signals[cx.rng.random_range(0..6)],
                            cx.rng.random_range(-2..10) as f64 / 10.0,
                        )
                    })
                    .collect()
            };
            let mut fallback: Vec<FallbackTarget> = cx
                .models(0, 2)
                .into_iter()
                .map(FallbackTarget::Model)
                .collect();
            if cx.rng.random_bool(0.4) {
                fallback.push(FallbackTarget::Route(IntentId(
                    cx.rng.random_range(0..n_intents) as u32,
                )));
            }
            let _ = i;
            let spec = RouteSpec {
                intent: name.clone(),
                when: refined.then(|| cx.cond(1, false)),
                candidates: cx.models(1, 5),
                score,
                premium_only: if cx.rng.random_bool(0.4) {
                    Some(cx.cond(1, false))
                } else {
                    None
                },
                fallback,
                downgrade: if cx.rng.random_bool(0.5) {
                    cx.models(0, 2)
                } else {
                    vec![]
                },
            };
            b.route(spec);
        }
    }
    // Refined routes must come first for an intent in the generated order to
    // not matter; the engine takes refined routes before the default anyway.
    let mut sources = Sources::new();
    sources.add(format!("gen-{seed}.route"), "");
    Generated {
        policy: compile_policy(b.p, sources),
        models: n_models,
        intents,
    }
}

pub fn tenant(seed: u64) -> GenTenant {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut attrs = serde_json::Map::new();
    if rng.random_bool(0.8) {
        attrs.insert("plan".into(), PLANS[rng.random_range(0..3)].into());
    }
    if rng.random_bool(0.7) {
        attrs.insert("eu".into(), rng.random_bool(0.5).into());
    }
    if rng.random_bool(0.7) {
        attrs.insert("org".into(), ORGS[rng.random_range(0..3)].into());
    }
    if rng.random_bool(0.7) {
        attrs.insert("quota".into(), (rng.random_range(0..4) * 10).into());
    }
    if rng.random_bool(0.5) {
        let tags: Vec<serde_json::Value> = if rng.random_bool(0.5) {
            vec!["beta".into()]
        } else {
            vec!["x".into()]
        };
        attrs.insert("tags".into(), tags.into());
    }
    GenTenant {
        id: format!("t{}", rng.random_range(0..4)),
        attrs,
    }
}

pub fn request(seed: u64, g: &Generated) -> RequestFeatures {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xfeed);
    let endpoints = [
        Endpoint::Chat,
        Endpoint::Embeddings,
        Endpoint::Images,
        Endpoint::AudioTranscription,
        Endpoint::AudioSpeech,
    ];
    let formats = [
        ResponseFormat::Text,
        ResponseFormat::JsonObject,
        ResponseFormat::JsonSchema,
    ];
    let prompts = ["", "hello alpha", "beta test", "my SSN is", "nothing"];
    let model = match rng.random_range(0..8) {
        0 => Some("auto".to_string()),
        1 => Some(format!("m{}", rng.random_range(0..g.models.max(1)))),
        2 => Some(g.intents[rng.random_range(0..g.intents.len())].clone()),
        3 => Some("nope".to_string()),
        _ => None,
    };
    let mut meta = Vec::new();
    if rng.random_bool(0.5) {
        meta.push((
            "priority".to_string(),
            ["low", "normal", "high", "bogus"][rng.random_range(0..4)].to_string(),
        ));
    }
    RequestFeatures {
        endpoint: endpoints[rng.random_range(0..5)],
        response_format: formats[rng.random_range(0..3)],
        has_tools: rng.random_bool(0.3),
        has_images: rng.random_bool(0.3),
        stream: rng.random_bool(0.5),
        input_tokens: rng.random_range(0..5000),
        max_tokens: if rng.random_bool(0.5) {
            Some(rng.random_range(0..2000))
        } else {
            None
        },
        feature: if rng.random_bool(0.7) {
            Some(FEATURES[rng.random_range(0..5)].to_string())
        } else {
            None
        },
        prompt: prompts[rng.random_range(0..5)].to_string(),
        model,
        meta,
        confirmed: rng.random_bool(0.3),
    }
}

/// Live stats by model index, plus a budget action.
pub struct GenStats {
    pub models: HashMap<u32, ModelStats>,
    pub budget: Option<BudgetAction>,
    /// A `confirm premium` threshold is crossed below a stronger action.
    pub confirm_premium: bool,
}

impl Stats for GenStats {
    fn model(&self, m: ModelId) -> ModelStats {
        self.models.get(&m.0).copied().unwrap_or_default()
    }
    fn budget_action(&self) -> Option<BudgetAction> {
        self.budget
    }
    fn premium_needs_confirmation(&self) -> bool {
        self.confirm_premium || self.budget == Some(BudgetAction::ConfirmPremium)
    }
}

pub fn stats(seed: u64, g: &Generated) -> GenStats {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xbeef);
    let mut models = HashMap::new();
    for i in 0..g.models {
        if rng.random_bool(0.5) {
            models.insert(
                i as u32,
                ModelStats {
                    latency_ms: rng
                        .random_bool(0.7)
                        .then(|| rng.random_range(50..5000) as f64),
                    first_token_ms: rng
                        .random_bool(0.5)
                        .then(|| rng.random_range(10..2000) as f64),
                    success_rate: rng
                        .random_bool(0.6)
                        .then(|| rng.random_range(0..=100) as f64 / 100.0),
                    breaker: [
                        BreakerState::Closed,
                        BreakerState::HalfOpen,
                        BreakerState::Open,
                    ][rng.random_range(0..3)],
                },
            );
        }
    }
    let budget = match rng.random_range(0..8) {
        0 => Some(BudgetAction::Warn),
        1 => Some(BudgetAction::ConfirmPremium),
        2 => Some(BudgetAction::Downgrade),
        3 => Some(BudgetAction::Block),
        _ => None,
    };
    let confirm_premium = budget > Some(BudgetAction::ConfirmPremium) && rng.random_bool(0.5);
    GenStats {
        models,
        budget,
        confirm_premium,
    }
}

/// A policy with `rules` rules, half constraints and half classification
/// rules, keyed on the feature tag and the tenant's plan like real policies,
/// for the scaling benchmark. 32 models, 16 intents.
pub fn scaled(rules: usize) -> CompiledPolicy {
    let mut rng = StdRng::seed_from_u64(rules as u64);
    let mut b = Builder::new();
    let (plan, _eu, org, _quota, _tags, _priority) = schema(&mut b);
    let providers: Vec<ProviderId> = (0..4).map(|i| b.provider(&format!("p{i}"), "us")).collect();
    let models: Vec<ModelId> = (0..32)
        .map(|i| {
            b.model(
                &format!("m{i}"),
                providers[i % 4],
                1.0 + (i % 7) as f64,
                2.0 + (i % 5) as f64,
                0.5 + (i % 10) as f64 / 20.0,
                if i % 8 == 0 {
                    Tier::Premium
                } else {
                    Tier::Standard
                },
            )
        })
        .collect();
    let feature = |i: usize| Value::Str(format!("feature-{i}"));
    for i in 0..rules / 2 {
        let removes: Vec<ModelId> = (0..2).map(|_| models[rng.random_range(0..32)]).collect();
        let when = match i % 4 {
            0 => Cond::Cmp(Field::Request(RequestField::Feature), CmpOp::Eq, feature(i)),
            1 => Cond::And(vec![
                Cond::Cmp(Field::Request(RequestField::Feature), CmpOp::Eq, feature(i)),
                Cond::Bool(Field::Request(RequestField::HasTools)),
            ]),
            2 => Cond::And(vec![
                Cond::Cmp(Field::Tenant(plan), CmpOp::Eq, Value::Enum((i % 3) as u32)),
                Cond::Cmp(Field::Request(RequestField::Feature), CmpOp::Eq, feature(i)),
            ]),
            _ => Cond::Cmp(
                Field::Tenant(org),
                CmpOp::Eq,
                Value::Str(format!("org-{i}")),
            ),
        };
        b.constraint(&format!("c{i}"), Effect::Deny, &removes, Some(when));
    }
    for i in 0..rules - rules / 2 {
        let intent = format!("i{}", i % 16);
        let when = match i % 3 {
            0 => Cond::Cmp(Field::Request(RequestField::Feature), CmpOp::Eq, feature(i)),
            1 => Cond::And(vec![
                Cond::Cmp(
                    Field::Request(RequestField::Endpoint),
                    CmpOp::Eq,
                    Value::Enum((i % 5) as u32),
                ),
                Cond::Cmp(Field::Request(RequestField::Feature), CmpOp::Eq, feature(i)),
            ]),
            _ => Cond::And(vec![
                Cond::Cmp(Field::Request(RequestField::Feature), CmpOp::Eq, feature(i)),
                Cond::Not(Box::new(Cond::Bool(Field::Request(RequestField::Stream)))),
            ]),
        };
        b.classify(&intent, Some(when));
    }
    b.classify("i0", None);
    for i in 0..16 {
        b.route(RouteSpec {
            intent: format!("i{i}"),
            candidates: (0..5).map(|k| models[(i * 3 + k) % 32]).collect(),
            score: vec![
                (Signal::Price, 0.4),
                (Signal::Latency, 0.3),
                (Signal::Quality, 0.3),
            ],
            fallback: vec![FallbackTarget::Model(models[(i + 7) % 32])],
            ..Default::default()
        });
    }
    let mut sources = Sources::new();
    sources.add(format!("scaled-{rules}.route"), "");
    compile_policy(b.p, sources)
}
