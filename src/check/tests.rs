use super::*;
use crate::analysis::analyze;
use crate::ir::Type;
use crate::source::{FileId, Sources};

const H: &str = "tenant { plan: enum(free, pro) eu: bool }
provider openai { region us }
provider mistral { region eu }
model a { provider openai kind chat }
model b { provider mistral kind chat }
model p { provider openai kind chat tier premium }
";

fn diagnostics(src: &str) -> (Vec<Diagnostic>, Sources) {
    let mut sources = Sources::new();
    sources.add("t.route", src);
    (analyze(&sources).diagnostics, sources)
}

/// `code@line` of every diagnostic. `unused-*` lints are dropped unless the
/// expectation mentions one, so cases need not use every declaration of `H`.
#[track_caller]
fn check(src: &str, expect: &[&str]) {
    let (ds, sources) = diagnostics(src);
    let f = sources.get(FileId(0)).unwrap();
    let keep_unused = expect.iter().any(|e| e.starts_with("unused-"));
    let got: Vec<String> = ds
        .iter()
        .filter(|d| keep_unused || !d.code.starts_with("route::unused-"))
        .map(|d| {
            format!(
                "{}@{}",
                d.code.trim_start_matches("route::"),
                d.span().map_or(0, |s| f.line_col(s.start()).0)
            )
        })
        .collect();
    assert_eq!(got, expect, "\nsource:\n{src}\n{ds:#?}");
}

fn message(src: &str, code: &str) -> Diagnostic {
    let (ds, _) = diagnostics(src);
    ds.into_iter()
        .find(|d| d.code == format!("route::{code}"))
        .unwrap_or_else(|| panic!("no {code} in {src}"))
}

#[test]
fn structure() {
    let cases: &[(&str, &[&str])] = &[
        ("classify { chat otherwise }\nroute chat { candidates [a, b] }", &[]),
        ("classify { chat when request.stream }\nroute chat { candidates [a, b] }", &["missing-default@7"]),
        ("", &["missing-default@4"]),
        ("classify { chat when request.stream\n other otherwise }\nroute other { candidates [a, b] }", &["missing-route@7"]),
        (
            "classify { chat when request.stream\n other otherwise }\nroute other { candidates [a, b] }\nroute chat when tenant.eu { candidates [a, b] }",
            &["missing-route@7"],
        ),
        ("classify { chat otherwise }\nroute chat { candidates [a, b] }\nroute chat { candidates [b, a] }", &["duplicate-route@9"]),
        ("classify { chat otherwise }\nroute chat { score 1 * price }", &["empty-route@8"]),
        (
            "classify { x when request.stream\n y otherwise }\nroute x { candidates [a] fallback [route y] }\nroute y { candidates [b] fallback [route x] }",
            &["fallback-cycle@10"],
        ),
        ("classify { x otherwise }\nroute x { candidates [a] fallback [b, route x] }", &["fallback-cycle@8"]),
        // A refined route may fall back to its own intent's default route.
        ("classify { chat otherwise }\nroute chat when tenant.plan == pro { candidates [p] fallback [route chat] }\nroute chat { candidates [a, b] }", &[]),
    ];
    for (src, expect) in cases {
        check(&format!("{H}{src}"), expect);
    }
    check("", &["empty-policy@1"]);
    check("// nothing yet\n", &["empty-policy@1"]);
    // Syntax errors: no empty-policy on top.
    check("model {", &["syntax@1"]);
}

#[test]
fn layering_and_coverage() {
    let cases: &[(&str, &[&str])] = &[
        ("constraints { no_b: deny [b] }\nclassify { chat otherwise }\nroute chat { candidates [a, b] }", &["candidate-denied@9"]),
        // Denied only for free tenants: only the route for free tenants is wrong.
        (
            "constraints { deny [b] when tenant.plan == free }\nclassify { chat otherwise }\nroute chat when tenant.plan == free { candidates [a, b] }\nroute chat { candidates [a, b] }",
            &["candidate-denied@9"],
        ),
        ("constraints { deny provider mistral }\nclassify { chat otherwise }\nroute chat { candidates [a] fallback [b] downgrade [b] }", &["candidate-denied@9", "no-effect@9", "candidate-denied@9"]),
        (
            "constraints { eu_only: deny models where model.region != eu when tenant.eu }\nclassify { chat otherwise }\nroute chat { candidates [a] fallback [p] }",
            &["coverage-hole@9"],
        ),
        // Premium models count only if premium is always allowed.
        ("classify { chat otherwise }\nroute chat { candidates [p, a] premium only when request.feature == \"x\" }", &[]),
        ("classify { chat otherwise }\nroute chat { candidates [p] fallback [p] premium only when request.feature == \"x\" }", &["coverage-hole@8"]),
        ("classify { chat otherwise }\nroute chat { candidates [p, p] }", &["duplicate-name@8"]),
        ("classify { chat otherwise }\nroute chat { candidates [p] fallback [route chat] premium only when request.stream }", &["coverage-hole@8", "fallback-cycle@8"]),
        ("classify { chat otherwise }\nroute chat { candidates [p, a] premium only when tenant.plan == pro }", &[]),
        ("constraints { deny [a] when tenant.plan == free }\nclassify { chat otherwise }\nroute chat { candidates [p, a] premium only when tenant.plan == pro }", &["coverage-hole@9"]),
        // A request-dependent constraint may not fire: no hole.
        ("constraints { require model.region == eu when request.has_images }\nclassify { chat otherwise }\nroute chat { candidates [a, b] }", &[]),
        ("constraints { deny [a] when tenant.eu or request.stream }\nclassify { chat otherwise }\nroute chat { candidates [a] fallback [b] }", &[]),
        ("constraints { deny [a, b] when tenant.eu or request.stream }\nclassify { chat otherwise }\nroute chat { candidates [a] fallback [b] }", &["coverage-hole@9"]),
        // An intent unreachable for a class is not checked for it: `chat` only
        // serves free tenants, for whom `a` is always denied.
        (
            "constraints { deny [a] when tenant.plan == free }\nclassify { pro_chat when tenant.plan == pro\n chat otherwise }\nroute pro_chat { candidates [a] fallback [p] }\nroute chat { candidates [b, a] }",
            &["candidate-denied@11"],
        ),
        // Fallback routes expand to the target's default route.
        (
            "constraints { deny [a] when tenant.eu }\nclassify { x when request.stream\n chat otherwise }\nroute x { candidates [a] fallback [route chat] }\nroute chat { candidates [b, a] }",
            &[],
        ),
        // Disabled models are not available.
        ("model d { provider openai kind chat disabled }\nclassify { chat otherwise }\nroute chat { candidates [d] fallback [d] }", &["coverage-hole@9", "disabled-candidate@9", "disabled-candidate@9"]),
        ("model d { provider openai kind chat disabled }\nclassify { chat otherwise }\nroute chat { candidates [d] }", &["coverage-hole@9", "single-candidate@9", "disabled-candidate@9"]),
    ];
    for (src, expect) in cases {
        check(&format!("{H}{src}"), expect);
    }
}

#[test]
fn coverage_hole_names_intent_class_and_removers() {
    let src = format!(
        "{H}constraints {{ eu_only: deny models where model.region != eu when tenant.eu and tenant.plan == free }}\nclassify {{ chat otherwise }}\nroute chat {{ candidates [a] fallback [p] }}"
    );
    let d = message(&src, "coverage-hole");
    assert_eq!(
        d.message,
        "no model is left for intent `chat` for tenant class `plan=free, eu=true`"
    );
    let help = d.help.unwrap();
    assert!(
        help.starts_with("`a` removed by `eu_only`, `p` removed by `eu_only`"),
        "{help}"
    );
    assert_eq!(d.labels.len(), 3);
}

#[test]
fn candidate_denied_labels_route_and_constraint() {
    let src = format!("{H}constraints {{ no_b: deny [b] }}\nclassify {{ chat otherwise }}\nroute chat {{ candidates [a, b] }}");
    let d = message(&src, "candidate-denied");
    assert!(
        d.message.contains("`b`") && d.message.contains("`no_b`"),
        "{}",
        d.message
    );
    assert_eq!(d.labels.len(), 2);
    assert!(d.labels[0].primary && !d.labels[1].primary);
}

#[test]
fn lints() {
    let r = "route x { candidates [a, b] }\nroute y { candidates [a, b] }\nroute chat { candidates [a, b] }\n";
    let cases: &[(&str, &[&str])] = &[
        ("classify { chat otherwise }\nroute chat { candidates [a, b] }", &["unused-attribute@1", "unused-attribute@1", "unused-model@6"]),
        (
            "provider x {}\nclassify { chat when tenant.eu or tenant.plan == pro\n chat otherwise }\nroute chat { candidates [a, b, p] }",
            &["unused-provider@7"],
        ),
        ("classify { chat otherwise }\nroute chat { candidates [a, b] score 0 * price + 0 * latency }", &["zero-weights@8"]),
        ("classify { chat otherwise }\nroute chat { candidates [a] }", &["single-candidate@8"]),
        ("classify { chat otherwise }\nroute chat { candidates [a] fallback [route chat] }", &["fallback-cycle@8"]),
        ("model d { provider openai kind chat disabled }\nclassify { chat otherwise }\nroute chat { candidates [a, d] }", &["disabled-candidate@9"]),
        // never-fires
        ("constraints { deny [a] when tenant.plan == free and tenant.plan == pro }\nclassify { chat otherwise }\nroute chat { candidates [a, b] }", &["never-fires@7"]),
        ("constraints { allow only [a, b, p] }\nclassify { chat otherwise }\nroute chat { candidates [a, b] }", &["never-fires@7"]),
        ("provider z {}\nconstraints { deny provider z }\nclassify { chat otherwise }\nroute chat { candidates [a, b] }", &["never-fires@8"]),
        // shadowed-rule
        (&format!("classify {{ x when request.stream\n y when request.stream\n chat otherwise }}\n{r}"), &["shadowed-rule@8"]),
        (&format!("classify {{ x when request.endpoint in [chat, embeddings]\n y when request.endpoint == chat\n chat otherwise }}\n{r}"), &["shadowed-rule@8"]),
        (
            &format!("classify {{ x when request.endpoint == chat\n x when request.endpoint == images\n y when request.endpoint in [chat, images]\n chat otherwise }}\n{r}"),
            &["shadowed-rule@9"],
        ),
        (&format!("classify {{ x when request.stream\n y when request.has_tools and request.stream\n chat otherwise }}\n{r}"), &["shadowed-rule@8"]),
        (&format!("classify {{ x when request.stream or request.has_images\n y when request.has_images\n chat otherwise }}\n{r}"), &["shadowed-rule@8"]),
        (&format!("classify {{ x when request.stream and request.has_tools\n y when request.stream\n chat otherwise }}\n{r}"), &[]),
        (&format!("classify {{ x when request.stream\n chat otherwise\n y when request.has_tools }}\n{r}"), &["shadowed-rule@9"]),
        (
            "classify { chat otherwise }\nroute chat when tenant.plan == pro { candidates [a, b] }\nroute chat when tenant.plan == pro and tenant.eu { candidates [a, b] }\nroute chat { candidates [a, b] }",
            &["shadowed-rule@9"],
        ),
    ];
    for (src, expect) in cases {
        check(&format!("{H}{src}"), expect);
    }
}

#[test]
fn lints_can_be_allowed_inline() {
    check(&format!("{H}classify {{ chat otherwise }}\n// allow(single-candidate)\nroute chat {{ candidates [a] }}"), &[]);
    check(&format!("{H}classify {{ chat otherwise }}\nroute chat {{ candidates [a] }} // allow(zero-weights, single-candidate)"), &[]);
    // Another lint's name, or two lines above, does not silence it.
    check(&format!("{H}classify {{ chat otherwise }}\n// allow(zero-weights)\nroute chat {{ candidates [a] }}"), &["single-candidate@9"]);
    check(&format!("{H}classify {{ chat otherwise }}\n// allow(single-candidate)\n\nroute chat {{ candidates [a] }}"), &["single-candidate@10"]);
    // Errors cannot be allowed, and the comment that tries is told so.
    check(
        &format!("{H}classify {{ chat otherwise }}\n// allow(empty-route)\nroute chat {{ }}"),
        &["unknown-lint@8", "empty-route@9"],
    );
    let told = |allow: &str| {
        let d = message(
            &format!("{H}classify {{ chat otherwise }}\n// allow({allow})\nroute chat {{ candidates [a] }}"),
            "unknown-lint",
        );
        (d.message, d.help.unwrap_or_default())
    };
    assert_eq!(
        told("empty-route"),
        (
            "`empty-route` is an error, not a lint".to_string(),
            "errors cannot be allowed: fix what it reports".to_string()
        )
    );
    // A lint written as the code its warnings show is a lint, not an error.
    assert_eq!(
        told("route::single-candidate"),
        (
            "`route::single-candidate` is not a lint".to_string(),
            "name the lint without `route::`: `allow(single-candidate)`".to_string()
        )
    );
}

#[test]
fn set_checks_wait_for_a_clean_lowering() {
    // The unknown model would otherwise also leave the route empty.
    check(
        &format!("{H}classify {{ chat otherwise }}\nroute chat {{ candidates [zz] }}"),
        &["unknown-model@8"],
    );
    // Structural errors that cannot come from the first error are still reported.
    check(
        &format!("{H}classify {{ chat otherwise }}\nroute chat {{ candidates [zz] }}\nroute chat {{ candidates [a, b] }}"),
        &["unknown-model@8", "duplicate-route@9"],
    );
}

// ------------------------------------------------------------ three-valued evaluation

fn plan(v: u32) -> Cond {
    Cond::Cmp(Field::Tenant(AttrId(0)), CmpOp::Eq, Value::Enum(v))
}
fn eu() -> Cond {
    Cond::Bool(Field::Tenant(AttrId(1)))
}
fn req() -> Cond {
    Cond::Bool(Field::Request(RequestField::Stream))
}

#[test]
fn eval3_truth_tables() {
    use Tri::*;
    let free_eu = [Some(Value::Enum(0)), Some(Value::Bool(true))];
    let unknown_eu = [Some(Value::Enum(1)), None];
    let cases: Vec<(Cond, &[Option<Value>], Tri)> = vec![
        (plan(0), &free_eu, True),
        (plan(1), &free_eu, False),
        (eu(), &unknown_eu, Unknown),
        (req(), &free_eu, Unknown),
        (Cond::Not(Box::new(req())), &free_eu, Unknown),
        (Cond::Not(Box::new(plan(1))), &free_eu, True),
        (Cond::And(vec![plan(1), req()]), &free_eu, False),
        (Cond::And(vec![plan(0), req()]), &free_eu, Unknown),
        (Cond::And(vec![plan(0), eu()]), &free_eu, True),
        (Cond::Or(vec![plan(0), req()]), &free_eu, True),
        (Cond::Or(vec![plan(1), req()]), &free_eu, Unknown),
        (Cond::Or(vec![plan(1), Cond::False]), &free_eu, False),
        (
            Cond::In(
                Field::Tenant(AttrId(0)),
                vec![Value::Enum(0), Value::Enum(1)],
            ),
            &unknown_eu,
            True,
        ),
        (
            Cond::Cmp(Field::TenantId, CmpOp::Eq, Value::Str("x".into())),
            &free_eu,
            Unknown,
        ),
        (Cond::And(vec![]), &free_eu, True),
        (Cond::Or(vec![]), &free_eu, False),
    ];
    for (c, t, want) in cases {
        assert_eq!(eval3(&c, t), want, "{c:?} over {t:?}");
    }
}

#[test]
fn classes_enumerate_only_finite_attributes_that_are_read() {
    let mut p = Policy::default();
    let attr = |name: &str, ty: Type| crate::ir::AttrDef {
        name: name.into(),
        ty,
        default: None,
        span: Span::default(),
    };
    p.tenant_attrs = vec![
        attr(
            "plan",
            Type::Enum(vec!["free".into(), "pro".into(), "ent".into()]),
        ),
        attr("eu", Type::Bool),
        attr("name", Type::String),
        attr("unread", Type::Bool),
    ];
    let when = |cond| {
        Some(crate::ir::When {
            cond,
            span: Span::default(),
        })
    };
    let rule = |cond| crate::ir::ClassifyRule {
        intent: IntentId(0),
        when: when(cond),
        span: Span::default(),
    };
    p.classify = vec![
        rule(Cond::And(vec![plan(0), eu()])),
        rule(Cond::Cmp(
            Field::Tenant(AttrId(2)),
            CmpOp::Eq,
            Value::Str("x".into()),
        )),
    ];
    let c = Classes::new(&p);
    assert_eq!(c.all.len(), 6);
    assert_eq!(c.describe(&c.all[5]), "tenant class `plan=ent, eu=true`");
    assert!(c.all.iter().all(|t| t[2].is_none() && t[3].is_none()));
    assert_eq!(Classes::new(&Policy::default()).describe(&[]), "any tenant");
}

#[test]
fn names_are_global_and_diagnostics_sorted_by_file() {
    let mut sources = Sources::new();
    sources.add(
        "b_routes.route",
        "classify { chat otherwise }\nroute chat { candidates [a, zz] }\n",
    );
    sources.add("a_models.route", "provider openai { region us }\nmodel a { provider openai kind chat }\nmodel a { provider openai kind chat }\n");
    let ds = analyze(&sources).diagnostics;
    let got: Vec<(u32, &str)> = ds
        .iter()
        .map(|d| (d.span().unwrap().file.0, d.code.as_str()))
        .collect();
    assert_eq!(
        got,
        [(0, "route::unknown-model"), (1, "route::duplicate-name")]
    );
}

#[test]
fn the_first_rule_in_source_order_is_named() {
    // `c2` fires for every tenant and is resolved once; `c1` depends on the
    // class, comes first, and is the one the message names.
    let src = format!("{H}constraints {{\n c1: deny [a] when not tenant.eu\n c2: deny [a]\n}}\nclassify {{ chat otherwise }}\nroute chat {{ candidates [a] fallback [a] }}");
    let d = message(&src, "coverage-hole");
    assert!(d.message.ends_with("`eu=false`"), "{}", d.message);
    assert!(
        d.help
            .as_deref()
            .unwrap()
            .starts_with("`a` removed by `c1`"),
        "{:?}",
        d.help
    );
}
