use std::collections::HashMap;

use super::testkit::*;
use super::*;
use crate::compile::compile_policy;
use crate::ir::*;
use crate::source::Sources;

/// A small SaaS-like policy:
/// - models: mini (cheap, standard, us), sonnet (mid, standard, eu), big (premium, us), local (eu, cheap)
/// - constraints: eu tenants deny non-eu; free plan allow only [mini, local]; images require sonnet|big
/// - classify: embeddings -> embed; json -> extract; feature "code" -> code; default chat
struct Fixture {
    p: CompiledPolicy,
    mini: ModelId,
    sonnet: ModelId,
    big: ModelId,
    local: ModelId,
    vectors: ModelId,
    plan: AttrId,
    region: AttrId,
}

fn fixture() -> Fixture {
    let mut b = Builder::new();
    let plan = b.tenant_attr(
        "plan",
        Type::Enum(vec!["free".into(), "pro".into()]),
        Some(Value::Enum(1)),
    );
    let region = b.tenant_attr(
        "region",
        Type::Enum(vec!["us".into(), "eu".into()]),
        Some(Value::Enum(0)),
    );
    let us = b.provider("openai", "us");
    let eu = b.provider("mistral", "eu");
    let mini = b.model("mini", us, 0.15, 0.60, 0.7, Tier::Standard);
    let sonnet = b.model("sonnet", eu, 3.0, 15.0, 0.9, Tier::Standard);
    let big = b.model("big", us, 10.0, 30.0, 0.95, Tier::Premium);
    let local = b.model("local", eu, 0.1, 0.1, 0.5, Tier::Standard);
    let vectors = b.model("vectors", eu, 0.02, 0.0, 0.5, Tier::Standard);
    b.set_kind(vectors, ModelKind::Embeddings);
    b.constraint(
        "eu_only",
        Effect::Deny,
        &[mini, big],
        Some(tenant_is(region, Value::Enum(1))),
    );
    b.constraint(
        "free_plan",
        Effect::AllowOnly,
        &[sonnet, big],
        Some(tenant_is(plan, Value::Enum(0))),
    );
    b.constraint(
        "vision",
        Effect::Require,
        &[mini, local],
        Some(req_bool(RequestField::HasImages)),
    );
    b.classify("embed", Some(endpoint_is(Endpoint::Embeddings)));
    b.classify(
        "extract",
        Some(Cond::In(
            Field::Request(RequestField::ResponseFormat),
            vec![
                Value::Enum(ResponseFormat::JsonObject as u32),
                Value::Enum(ResponseFormat::JsonSchema as u32),
            ],
        )),
    );
    b.classify(
        "code",
        Some(Cond::And(vec![
            feature_is("code"),
            Cond::Not(Box::new(req_bool(RequestField::Stream))),
        ])),
    );
    b.classify("chat", None);
    b.route(RouteSpec {
        intent: "embed".into(),
        candidates: vec![vectors, local],
        ..Default::default()
    });
    b.route(RouteSpec {
        intent: "extract".into(),
        candidates: vec![mini, sonnet],
        score: vec![(Signal::Price, 1.0)],
        fallback: vec![FallbackTarget::Model(local)],
        ..Default::default()
    });
    b.route(RouteSpec {
        intent: "code".into(),
        candidates: vec![big, sonnet, mini],
        score: vec![(Signal::Quality, 1.0)],
        premium_only: Some(tenant_is(plan, Value::Enum(1))),
        fallback: vec![FallbackTarget::Route(IntentId(3))],
        ..Default::default()
    });
    b.route(RouteSpec {
        intent: "chat".into(),
        candidates: vec![mini, sonnet, local],
        score: vec![(Signal::Price, 0.5), (Signal::Latency, 0.5)],
        fallback: vec![FallbackTarget::Model(big)],
        downgrade: vec![local],
        ..Default::default()
    });
    let mut src = Sources::new();
    src.add("fixture.route", "");
    Fixture {
        p: compile_policy(b.p, src),
        vectors,
        mini,
        sonnet,
        big,
        local,
        plan,
        region,
    }
}

fn tenant(f: &Fixture, attrs: serde_json::Value) -> TenantView {
    let serde_json::Value::Object(m) = attrs else {
        panic!()
    };
    f.p.tenant("t1", &m).unwrap()
}

struct MapStats(HashMap<ModelId, ModelStats>, Option<BudgetAction>);
impl Stats for MapStats {
    fn model(&self, m: ModelId) -> ModelStats {
        self.0.get(&m).copied().unwrap_or_default()
    }
    fn budget_action(&self) -> Option<BudgetAction> {
        self.1
    }
}

fn names(f: &Fixture, d: &Decision) -> Vec<String> {
    d.attempts
        .iter()
        .map(|m| f.p.model_name(*m).to_string())
        .collect()
}

/// Checks the compiled decision against the reference interpreter, and returns it.
fn both(f: &Fixture, t: &TenantView, r: &RequestFeatures, s: &dyn Stats) -> Decision {
    let d = decide(&f.p, t, r, s);
    let want = reference::decide(&f.p, &t.id, &t.values, r, s);
    assert_eq!(d, want, "compiled and reference disagree for {r:?}");
    d
}

fn req(model: Option<&str>) -> RequestFeatures {
    RequestFeatures {
        input_tokens: 1000,
        max_tokens: Some(500),
        model: model.map(Into::into),
        ..Default::default()
    }
}

#[test]
fn decisions_by_case() {
    let f = fixture();
    let cases: Vec<(serde_json::Value, RequestFeatures, &str, Vec<&str>)> = vec![
        // chat: price 0.5 + latency (unknown 0.5); cheapest first
        (
            serde_json::json!({}),
            req(None),
            "chat",
            vec!["local", "mini", "sonnet", "big"],
        ),
        // eu tenant: mini and big removed
        (
            serde_json::json!({"region": "eu"}),
            req(None),
            "chat",
            vec!["local", "sonnet"],
        ),
        // free plan: only mini, local
        (
            serde_json::json!({"plan": "free"}),
            req(None),
            "chat",
            vec!["local", "mini"],
        ),
        // json -> extract by price, fallback local
        (
            serde_json::json!({}),
            RequestFeatures {
                response_format: ResponseFormat::JsonSchema,
                ..req(None)
            },
            "extract",
            vec!["mini", "sonnet", "local"],
        ),
        // code for pro: quality order, premium allowed, then chat route's candidates + fallback
        (
            serde_json::json!({}),
            RequestFeatures {
                feature: Some("code".into()),
                ..req(None)
            },
            "code",
            vec!["big", "sonnet", "mini", "local"],
        ),
        // code for free: big is premium (and denied anyway)
        (
            serde_json::json!({"plan": "free"}),
            RequestFeatures {
                feature: Some("code".into()),
                ..req(None)
            },
            "code",
            vec!["mini", "local"],
        ),
        // streaming code is chat
        (
            serde_json::json!({}),
            RequestFeatures {
                feature: Some("code".into()),
                stream: true,
                ..req(None)
            },
            "chat",
            vec!["local", "mini", "sonnet", "big"],
        ),
        // images require sonnet|big (mini/local removed)
        (
            serde_json::json!({}),
            RequestFeatures {
                has_images: true,
                ..req(None)
            },
            "chat",
            vec!["sonnet", "big"],
        ),
        // embeddings
        (
            serde_json::json!({}),
            RequestFeatures {
                endpoint: Endpoint::Embeddings,
                ..req(None)
            },
            "embed",
            vec!["vectors"],
        ),
        // intent named by the client
        (
            serde_json::json!({}),
            req(Some("extract")),
            "extract",
            vec!["mini", "sonnet", "local"],
        ),
        // explicit model, then the chat route's fallbacks
        (
            serde_json::json!({}),
            req(Some("sonnet")),
            "chat",
            vec!["sonnet", "big"],
        ),
    ];
    for (attrs, r, intent, want) in cases {
        let t = tenant(&f, attrs.clone());
        let d = both(&f, &t, &r, &NoStats);
        assert_eq!(d.outcome, Ok(()), "{attrs} {r:?}");
        assert_eq!(f.p.intent_name(d.intent.unwrap()), intent, "{attrs} {r:?}");
        assert_eq!(names(&f, &d), want, "{attrs} {r:?}");
    }
}

#[test]
fn explicit_denied_model_names_the_rule() {
    let f = fixture();
    let t = tenant(&f, serde_json::json!({"region": "eu"}));
    let d = both(&f, &t, &req(Some("mini")), &NoStats);
    assert_eq!(
        d.outcome,
        Err(Denial::ModelDenied {
            model: f.mini,
            rule: ConstraintId(0)
        })
    );
    assert!(d.outcome.unwrap_err().message(&f.p).contains("`eu_only`"));
    // A request-dependent rule is named too.
    let t = tenant(&f, serde_json::json!({}));
    let d = both(
        &f,
        &t,
        &RequestFeatures {
            has_images: true,
            ..req(Some("local"))
        },
        &NoStats,
    );
    assert_eq!(
        d.outcome,
        Err(Denial::ModelDenied {
            model: f.local,
            rule: ConstraintId(2)
        })
    );
    let d = both(&f, &t, &req(Some("nope")), &NoStats);
    assert_eq!(d.outcome, Err(Denial::UnknownModel("nope".into())));
    let d = both(&f, &t, &req(Some("auto")), &NoStats);
    assert_eq!(d.outcome, Ok(()));
}

#[test]
fn a_model_only_serves_the_endpoints_of_its_kind() {
    let f = fixture();
    let t = tenant(&f, serde_json::json!({}));
    // `vectors` is the cheapest model of the `embed` route, but a chat
    // request sent to that intent only gets the chat model.
    let d = both(&f, &t, &req(Some("embed")), &NoStats);
    assert_eq!(names(&f, &d), ["local"]);
    // `explain` says why `vectors` is not a candidate.
    let tr = explain(&f.p, &t, &req(Some("embed")), &NoStats);
    assert_eq!(tr.cannot_serve, ["vectors"]);
    assert!(
        !tr.allowed.contains(&"vectors".to_string()),
        "{:?}",
        tr.allowed
    );
    let vectors = tr.candidates.iter().find(|c| c.model == "vectors").unwrap();
    assert_eq!(
        vectors.status,
        "cannot serve /v1/chat/completions (kind embeddings)"
    );
    let text = tr.to_string();
    assert!(
        text.contains("vectors cannot serve /v1/chat/completions: removed by kind"),
        "{text}"
    );
    // Named on chat completions, an embeddings model is a client error.
    let d = both(&f, &t, &req(Some("vectors")), &NoStats);
    let err = d.outcome.unwrap_err();
    assert_eq!(
        err,
        Denial::ModelCannotServe {
            model: f.vectors,
            endpoint: Endpoint::Chat
        }
    );
    assert_eq!(
        err.message(&f.p),
        "model `vectors` is of kind `embeddings`: it cannot serve /v1/chat/completions"
    );
    // And the other way round: a chat model named on the embeddings endpoint.
    let embeddings = RequestFeatures {
        endpoint: Endpoint::Embeddings,
        ..req(Some("mini"))
    };
    let d = both(&f, &t, &embeddings, &NoStats);
    assert!(matches!(
        d.outcome,
        Err(Denial::ModelCannotServe {
            endpoint: Endpoint::Embeddings,
            ..
        })
    ));
    // An images request classified to chat finds no model that serves it.
    let images = RequestFeatures {
        endpoint: Endpoint::Images,
        ..req(None)
    };
    let d = both(&f, &t, &images, &NoStats);
    let err = d.outcome.unwrap_err();
    assert!(
        err.message(&f.p).contains("on /v1/images/generations"),
        "{}",
        err.message(&f.p)
    );
}

#[test]
fn budget_actions() {
    let f = fixture();
    let t = tenant(&f, serde_json::json!({}));
    let s = |a| MapStats(HashMap::new(), Some(a));
    let d = both(&f, &t, &req(None), &s(BudgetAction::Block));
    assert_eq!(d.outcome, Err(Denial::BudgetBlocked));
    assert!(d.attempts.is_empty());
    let d = both(&f, &t, &req(None), &s(BudgetAction::ConfirmPremium));
    assert_eq!(names(&f, &d), ["local", "mini", "sonnet"]);
    let d = both(
        &f,
        &t,
        &RequestFeatures {
            confirmed: true,
            ..req(None)
        },
        &s(BudgetAction::ConfirmPremium),
    );
    assert_eq!(names(&f, &d), ["local", "mini", "sonnet", "big"]);
    let d = both(&f, &t, &req(Some("big")), &s(BudgetAction::ConfirmPremium));
    assert_eq!(d.outcome, Err(Denial::ConfirmationRequired));
    // chat has a downgrade list
    let d = both(&f, &t, &req(None), &s(BudgetAction::Downgrade));
    assert_eq!(names(&f, &d), ["local"]);
    // code has none: cheaper than the primary (big)
    let code = RequestFeatures {
        feature: Some("code".into()),
        ..req(None)
    };
    let d = both(&f, &t, &code, &s(BudgetAction::Downgrade));
    assert_eq!(names(&f, &d), ["sonnet", "mini", "local"]);
    let d = both(&f, &t, &code, &s(BudgetAction::Warn));
    assert_eq!(names(&f, &d), ["big", "sonnet", "mini", "local"]);
}

/// Past a downgrade threshold, a `confirm premium` threshold below it still
/// holds: spending more must not lift the premium guard.
#[test]
fn a_downgrade_keeps_the_premium_guard_of_a_lower_threshold() {
    struct Both(bool);
    impl Stats for Both {
        fn model(&self, _: ModelId) -> ModelStats {
            ModelStats::default()
        }
        fn budget_action(&self) -> Option<BudgetAction> {
            Some(BudgetAction::Downgrade)
        }
        fn premium_needs_confirmation(&self) -> bool {
            self.0
        }
    }
    let f = fixture();
    let t = tenant(&f, serde_json::json!({"plan": "pro"}));
    let code = RequestFeatures {
        feature: Some("code".into()),
        ..req(Some("big"))
    };
    // The downgrade already replaced the named premium model with cheaper
    // ones: nothing premium is left to confirm, and confirming would not
    // bring it back, so the request is served as the downgrade alone serves it.
    let d = both(&f, &t, &code, &Both(true));
    assert_eq!(d.outcome, Ok(()));
    assert_eq!(names(&f, &d), ["mini", "sonnet", "local"]);
    let d = both(&f, &t, &code, &Both(false));
    assert_eq!(names(&f, &d), ["mini", "sonnet", "local"]);

    // A downgrade list with a premium model in it: the guard removes it, and
    // a request naming it needs the confirmation.
    let mut b = Builder::new();
    let us = b.provider("openai", "us");
    let top = b.model("top", us, 20.0, 60.0, 0.99, Tier::Premium);
    let big = b.model("big", us, 10.0, 30.0, 0.95, Tier::Premium);
    let cheap = b.model("cheap", us, 0.1, 0.1, 0.5, Tier::Standard);
    b.classify("chat", None);
    b.route(RouteSpec {
        intent: "chat".into(),
        candidates: vec![top],
        downgrade: vec![big, cheap],
        ..Default::default()
    });
    let mut src = Sources::new();
    src.add("guard.route", "");
    let g = Fixture {
        p: compile_policy(b.p, src),
        ..f
    };
    let t = g.p.tenant("t1", &serde_json::Map::new()).unwrap();
    let d = both(&g, &t, &req(None), &Both(false));
    assert_eq!(names(&g, &d), ["big", "cheap"]);
    let d = both(&g, &t, &req(None), &Both(true));
    assert_eq!(names(&g, &d), ["cheap"]);
    // `explain` says the guard acted, not only that a downgrade did.
    let tr = explain(&g.p, &t, &req(None), &Both(true));
    assert!(tr.premium_held);
    let text = tr.to_string();
    assert!(
        text.contains(
            "budget action: downgrade\n  premium models held back until the client confirms"
        ),
        "{text}"
    );
    assert!(!explain(&g.p, &t, &req(None), &Both(false)).premium_held);
    let d = both(&g, &t, &req(Some("top")), &Both(true));
    assert_eq!(names(&g, &d), ["cheap"]);
    let d = both(&g, &t, &req(Some("big")), &Both(true));
    assert_eq!(d.outcome, Err(Denial::ConfirmationRequired));
    let confirmed = RequestFeatures {
        confirmed: true,
        ..req(Some("big"))
    };
    let d = both(&g, &t, &confirmed, &Both(true));
    assert_eq!(names(&g, &d), ["big", "cheap"]);
}

#[test]
fn live_stats_rank_and_open_breakers_go_last() {
    let f = fixture();
    let t = tenant(&f, serde_json::json!({}));
    let mut stats = HashMap::new();
    stats.insert(
        f.local,
        ModelStats {
            latency_ms: Some(4000.0),
            ..Default::default()
        },
    );
    stats.insert(
        f.mini,
        ModelStats {
            latency_ms: Some(400.0),
            ..Default::default()
        },
    );
    stats.insert(
        f.sonnet,
        ModelStats {
            latency_ms: Some(400.0),
            breaker: BreakerState::Open,
            ..Default::default()
        },
    );
    let s = MapStats(stats, None);
    let d = both(&f, &t, &req(None), &s);
    assert_eq!(names(&f, &d), ["mini", "local", "big", "sonnet"]);
    let tr = explain(&f.p, &t, &req(None), &s);
    assert_eq!(tr.attempts, ["mini", "local", "big", "sonnet"]);
    let mini = tr.candidates.iter().find(|c| c.model == "mini").unwrap();
    assert_eq!(mini.terms.len(), 2);
    assert_eq!(mini.terms[1].value, 1.0);
    let _ = (f.big, f.plan, f.region);
}

#[test]
fn estimated_cost_rounds_up() {
    let f = fixture();
    let r = RequestFeatures {
        input_tokens: 1,
        max_tokens: Some(1),
        ..Default::default()
    };
    // 0.15 + 0.60 micro-dollars -> 1
    assert_eq!(estimate_cost(&f.p, f.mini, &r), 1);
    let r = RequestFeatures {
        input_tokens: 1_000_000,
        max_tokens: None,
        ..Default::default()
    };
    // $0.15 + 1024 * 0.60 / 1M
    assert_eq!(estimate_cost(&f.p, f.mini, &r), 150_000 + 615);
}

#[test]
fn explain_names_rules_and_renders() {
    let f = fixture();
    let t = tenant(&f, serde_json::json!({"plan": "free", "region": "eu"}));
    let tr = explain(
        &f.p,
        &t,
        &RequestFeatures {
            has_images: true,
            ..req(None)
        },
        &NoStats,
    );
    assert_eq!(tr.outcome, "no-model-available");
    let fired: Vec<&str> = tr.constraints.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(fired, ["eu_only", "free_plan", "vision"]);
    let text = tr.to_string();
    assert!(
        text.contains("`eu_only` (fixture.route:1) removed mini, big"),
        "{text}"
    );
    let json = serde_json::to_value(&tr).unwrap();
    assert_eq!(json["constraints"][2]["tenant_only"], false);
}

#[test]
fn tenant_attrs_are_checked() {
    let f = fixture();
    let m = serde_json::json!({"plan": "gold", "regoin": "eu", "region": 3});
    let serde_json::Value::Object(m) = m else {
        panic!()
    };
    let errs = f.p.tenant("acme", &m).unwrap_err();
    assert_eq!(errs.len(), 3, "{errs:?}");
    assert!(
        errs.iter().any(|e| e.contains("did you mean `region`")),
        "{errs:?}"
    );
    assert!(errs.iter().any(|e| e.contains("`gold`")), "{errs:?}");
}

#[test]
fn features_from_openai_bodies() {
    let body = serde_json::json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "what is"}, {"type": "image_url", "image_url": {"url": "x"}}]}
        ],
        "tools": [{"type": "function"}],
        "response_format": {"type": "json_schema"},
        "max_completion_tokens": 50,
        "stream": true,
        "metadata": {"feature": "search", "team": "core", "n": 3}
    });
    let f = RequestFeatures::from_openai_json(Endpoint::Chat, &body);
    assert_eq!(f.prompt, "what is");
    assert!(f.has_images && f.has_tools && f.stream);
    assert_eq!(f.response_format, ResponseFormat::JsonSchema);
    assert_eq!(f.max_tokens, Some(50));
    assert_eq!(f.model.as_deref(), Some("gpt-4o"));
    assert_eq!(f.feature.as_deref(), Some("search"));
    assert_eq!(
        f.meta,
        [
            ("n".to_string(), "3".to_string()),
            ("team".to_string(), "core".to_string())
        ]
    );
    // "be brief" (8) + "what is" (7) = 15 chars -> 4 tokens, + 2 messages * 3
    assert_eq!(f.input_tokens, 10);
    for odd in [
        serde_json::json!(null),
        serde_json::json!([1, 2]),
        serde_json::json!("x"),
        serde_json::json!({"messages": "x", "tools": {}, "response_format": "json", "max_tokens": -1, "stream": "yes"}),
        serde_json::json!({"messages": [null, 1, {"content": {"a": 1}}, {"role": "user", "content": [null, 3, "plain"]}]}),
        serde_json::json!({"input": ["a", 1, "bc"], "metadata": [1]}),
    ] {
        let f = RequestFeatures::from_openai_json(Endpoint::Embeddings, &odd);
        assert_eq!(f.max_tokens, None);
        assert!(!f.stream && !f.has_tools);
    }
    // 9 characters -> 3 tokens, and the one token id
    let f = RequestFeatures::from_openai_json(
        Endpoint::Embeddings,
        &serde_json::json!({"input": ["abcd", 1, "abcde"]}),
    );
    assert_eq!(f.input_tokens, 4);
    // Token arrays are tokens: none of them was counted before, so a
    // request of 10,000 ids reserved nothing and passed every token limit.
    for (input, want) in [
        (serde_json::json!([1, 2, 3]), 3),
        (serde_json::json!([[1, 2], [3, 4, 5], []]), 5),
        (serde_json::json!(vec![7; 10_000]), 10_000),
    ] {
        let f = RequestFeatures::from_openai_json(
            Endpoint::Embeddings,
            &serde_json::json!({ "input": input }),
        );
        assert_eq!(f.input_tokens, want, "{input}");
    }
}

#[test]
fn classification_tree_switches_and_indexes() {
    // Many feature-keyed rules: the leaf index must still find the first match.
    let mut b = Builder::new();
    let p = b.provider("p", "us");
    let m = b.model("m", p, 1.0, 1.0, 0.5, Tier::Standard);
    for i in 0..50 {
        b.classify(
            &format!("i{i}"),
            Some(Cond::And(vec![
                feature_is(&format!("f{}", i % 10)),
                req_bool(RequestField::HasTools),
            ])),
        );
    }
    b.classify("late", Some(endpoint_is(Endpoint::Chat)));
    b.classify("other", None);
    for i in 0..50 {
        b.route(RouteSpec {
            intent: format!("i{i}"),
            candidates: vec![m],
            ..Default::default()
        });
    }
    b.route(RouteSpec {
        intent: "late".into(),
        candidates: vec![m],
        ..Default::default()
    });
    b.route(RouteSpec {
        intent: "other".into(),
        candidates: vec![m],
        ..Default::default()
    });
    let p = compile_policy(b.p, Sources::new());
    assert!(matches!(p.tree, Node::Switch(..)));
    let t = p.tenant("x", &serde_json::Map::new()).unwrap();
    let check = |r: RequestFeatures, want: &str| {
        let d = decide(&p, &t, &r, &NoStats);
        assert_eq!(d, reference::decide(&p, "x", &t.values, &r, &NoStats));
        assert_eq!(p.intent_name(d.intent.unwrap()), want, "{r:?}");
    };
    check(
        RequestFeatures {
            feature: Some("f3".into()),
            has_tools: true,
            ..Default::default()
        },
        "i3",
    );
    check(
        RequestFeatures {
            feature: Some("f3".into()),
            ..Default::default()
        },
        "late",
    );
    check(
        RequestFeatures {
            feature: Some("f3".into()),
            endpoint: Endpoint::Images,
            ..Default::default()
        },
        "other",
    );
    check(
        RequestFeatures {
            feature: Some("zz".into()),
            has_tools: true,
            ..Default::default()
        },
        "late",
    );
}

#[test]
fn sent_request_attributes_are_checked_against_their_declared_types() {
    let mut src = Sources::new();
    src.add(
        "p.route",
        r#"request {
  feature: enum(search, other) = other
  sensitivity: enum(public, confidential) = public
  urgent: bool = false
  weight: number = 1
  note: string = ""
}
provider p { region us }
model m { provider p kind chat }
constraints {
  secret: deny models where model.quality > 2 when request.sensitivity == confidential and request.urgent and request.weight > 1 and request.note == "x" and request.feature == search
}
classify { chat otherwise }
route chat { candidates [m] }
"#,
    );
    let p = crate::compile::compile(&src).unwrap();
    let with = |feature: Option<&str>, meta: &[(&str, &str)]| RequestFeatures {
        feature: feature.map(str::to_string),
        meta: meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..RequestFeatures::default()
    };
    let fine = [
        with(None, &[]),
        with(Some("search"), &[("sensitivity", "confidential")]),
        with(None, &[("urgent", "yes"), ("urgent2", "whatever")]),
        with(None, &[("weight", " 2.5 "), ("note", "anything at all")]),
    ];
    for r in &fine {
        assert_eq!(r.check_declared(&p), Ok(()), "{r:?}");
    }
    for (r, want) in [
        (
            with(None, &[("sensitivity", "Confidential")]),
            "`sensitivity` is `Confidential`, which the policy does not accept: send one of `public`, `confidential` (`x-routeplane-meta-sensitivity` or `metadata.sensitivity`)",
        ),
        (
            with(Some("serch"), &[]),
            "`feature` is `serch`, which the policy does not accept: send one of `search`, `other` (`x-routeplane-feature` or `metadata.feature`)",
        ),
        (with(None, &[("urgent", "yes please")]), "send `true` or `false`"),
        (with(None, &[("weight", "NaN")]), "send a number"),
        (with(None, &[("weight", "1e999")]), "send a number"),
    ] {
        let got = r.check_declared(&p).unwrap_err();
        assert!(got.contains(want), "{got}");
    }
    let long = with(Some(&"x".repeat(500)), &[])
        .check_declared(&p)
        .unwrap_err();
    assert!(long.contains(&format!("`{}...`", "x".repeat(64))), "{long}");
}
