//! The example policies under `policies/` are clean: no error and no warning
//! (what `routeplane check --deny-warnings policies/` requires).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use routeplane::{analysis::analyze, load};

#[test]
fn example_policies_have_no_diagnostics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let policies = load::discover(&[root]).unwrap();
    let names: Vec<String> = policies
        .iter()
        .map(|p| p.root.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in ["enterprise", "saas", "startup"] {
        assert!(
            names.iter().any(|n| n == expected),
            "missing example policy `{expected}` in {names:?}"
        );
    }
    for p in &policies {
        let a = analyze(&p.sources);
        let shown: Vec<String> = a
            .diagnostics
            .iter()
            .map(|d| {
                format!(
                    "{} {}: {}",
                    d.span().map(|s| p.sources.location(s)).unwrap_or_default(),
                    d.code,
                    d.message
                )
            })
            .collect();
        assert!(
            shown.is_empty(),
            "{}:\n{}",
            p.root.display(),
            shown.join("\n")
        );
    }
}

/// Every construct of the grammar appears in at least one example policy, so
/// the examples double as a tour of the language.
#[test]
fn example_policies_use_every_construct() {
    use routeplane::syntax::ast::*;
    use std::collections::BTreeSet;

    fn lit(l: &Literal, seen: &mut BTreeSet<String>) {
        let tag = match l {
            Literal::Str(..) => "literal string",
            Literal::Regex(..) => "literal regex",
            Literal::Bool(..) => "literal bool",
            Literal::Quantity(_) => "literal number",
            Literal::Name(_) => "literal word",
            Literal::List(items, _) => {
                items.iter().for_each(|i| lit(i, seen));
                "literal list"
            }
        };
        seen.insert(tag.into());
    }
    fn expr(e: &Expr, seen: &mut BTreeSet<String>) {
        match e {
            Expr::Or(xs, _) | Expr::And(xs, _) => {
                seen.insert(
                    if matches!(e, Expr::Or(..)) {
                        "or"
                    } else {
                        "and"
                    }
                    .into(),
                );
                xs.iter().for_each(|x| expr(x, seen));
            }
            Expr::Not(x, _) | Expr::Paren(x, _) => {
                seen.insert(
                    if matches!(e, Expr::Not(..)) {
                        "not"
                    } else {
                        "parentheses"
                    }
                    .into(),
                );
                expr(x, seen);
            }
            Expr::Test(t) => {
                seen.insert(format!("field {}", t.path.scope.as_str()));
                let tag = match &t.op {
                    None => "bool test".to_string(),
                    Some(TestOp::Cmp(op, l)) => {
                        lit(l, seen);
                        format!("compare {}", op.as_str())
                    }
                    Some(TestOp::In { negated, list, .. }) => {
                        list.iter().for_each(|l| lit(l, seen));
                        if *negated { "not in" } else { "in" }.to_string()
                    }
                    Some(TestOp::Has(l)) => {
                        lit(l, seen);
                        "has".into()
                    }
                    Some(TestOp::Matches(l)) | Some(TestOp::Contains(l)) => {
                        lit(l, seen);
                        let op = if matches!(t.op, Some(TestOp::Matches(_))) {
                            "matches"
                        } else {
                            "contains"
                        };
                        let arg = match l {
                            Literal::Regex(..) => "regex",
                            Literal::List(..) => "list",
                            _ => "string",
                        };
                        format!("{op} {arg}")
                    }
                };
                seen.insert(tag);
            }
        }
    }
    fn ty(t: &TypeExpr, seen: &mut BTreeSet<String>) {
        let tag = match t {
            TypeExpr::Bool(_) => "type bool",
            TypeExpr::String(_) => "type string",
            TypeExpr::Number(_) => "type number",
            TypeExpr::Enum(..) => "type enum",
            TypeExpr::List(inner, _) => {
                ty(inner, seen);
                "type list"
            }
        };
        seen.insert(tag.into());
    }

    let mut seen = BTreeSet::new();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for p in load::discover(&[root]).unwrap() {
        for (id, f) in p.sources.iter() {
            for item in routeplane::syntax::parse_file(id, &f.text).ast.items {
                match item {
                    Item::Schema(s) => {
                        seen.insert(format!("{:?} schema", s.scope));
                        for a in &s.attrs {
                            ty(&a.ty, &mut seen);
                            if let Some(d) = &a.default {
                                seen.insert("attribute default".into());
                                lit(d, &mut seen);
                            }
                        }
                    }
                    Item::Provider(pr) => {
                        for prop in &pr.props {
                            seen.insert(format!("provider {}", prop.kind.keyword()));
                        }
                    }
                    Item::Model(m) => {
                        for prop in &m.props {
                            let tag = match &prop.kind {
                                PropKind::Price(Price::InOut { .. }) => "price in out".to_string(),
                                PropKind::Price(Price::Flat {
                                    per: PricePer::Tokens(q),
                                    ..
                                }) => format!("price per {}", q.text),
                                PropKind::Price(Price::Flat {
                                    per: PricePer::Unit(u),
                                    ..
                                }) => format!("price per {}", u.name),
                                PropKind::Enabled(false) => "disabled".into(),
                                k => k.keyword().to_string(),
                            };
                            seen.insert(format!("model {tag}"));
                        }
                    }
                    Item::Constraints(c) => {
                        for r in &c.rules {
                            if r.label.is_some() {
                                seen.insert("constraint label".into());
                            }
                            if let Some(w) = &r.when {
                                seen.insert("constraint when".into());
                                expr(w, &mut seen);
                            }
                            let (effect, target) = match &r.effect {
                                Effect::Deny(t) => ("deny", Some(t)),
                                Effect::AllowOnly(t) => ("allow only", Some(t)),
                                Effect::Require(e) => {
                                    expr(e, &mut seen);
                                    ("require", None)
                                }
                            };
                            seen.insert(effect.into());
                            match target {
                                Some(Target::Providers(ns, _)) => seen.insert(format!(
                                    "target provider{}",
                                    if ns.len() == 1 { "" } else { "s" }
                                )),
                                Some(Target::Models(ns, _)) => seen.insert(format!(
                                    "target model{}",
                                    if ns.len() == 1 { "" } else { "s" }
                                )),
                                Some(Target::Where(e, _)) => {
                                    expr(e, &mut seen);
                                    seen.insert("target models where".into())
                                }
                                None => false,
                            };
                        }
                    }
                    Item::Classify(c) => {
                        for r in &c.rules {
                            match &r.when {
                                Some(w) => {
                                    seen.insert("classify when".into());
                                    expr(w, &mut seen);
                                }
                                None => {
                                    seen.insert("classify otherwise".into());
                                }
                            }
                        }
                    }
                    Item::Route(r) => {
                        if let Some(w) = &r.when {
                            seen.insert("refined route".into());
                            expr(w, &mut seen);
                        }
                        for prop in &r.props {
                            seen.insert(format!("route {}", prop.kind.keyword()));
                            match &prop.kind {
                                RoutePropKind::Score(ts) if ts.iter().any(|t| t.negative) => {
                                    seen.insert("score minus".into());
                                }
                                RoutePropKind::PremiumOnly(e) => expr(e, &mut seen),
                                RoutePropKind::Fallback(items) => {
                                    for i in items {
                                        seen.insert(
                                            if matches!(i, FallbackItem::Route(_)) {
                                                "fallback route"
                                            } else {
                                                "fallback model"
                                            }
                                            .into(),
                                        );
                                    }
                                }
                                _ => {}
                            }
                        }
                    }
                    Item::Protect(pr) => {
                        for r in &pr.rules {
                            match &r.kind {
                                ProtectKind::Retry { on, backoff, .. } => {
                                    seen.insert(format!(
                                        "retry{}{}",
                                        if on.is_empty() { "" } else { " on" },
                                        if backoff.is_some() { " backoff" } else { "" }
                                    ));
                                }
                                ProtectKind::Timeout { parts } => {
                                    for (k, _) in parts {
                                        seen.insert(format!("timeout {}", k.name));
                                    }
                                }
                                ProtectKind::Breaker { scope, .. } => {
                                    seen.insert(format!("breaker per {}", scope.name));
                                }
                                ProtectKind::Limit { kind, scope, .. } => {
                                    seen.insert(format!("limit {}", kind.name));
                                    seen.insert(format!("limit per {}", scope.name));
                                }
                                ProtectKind::Budget(b) => {
                                    seen.insert(match &b.period {
                                        BudgetPeriod::Named(n) => format!("budget {}", n.name),
                                        BudgetPeriod::Every(_) => "budget every".into(),
                                    });
                                    seen.insert(format!(
                                        "budget per {}",
                                        b.scope
                                            .iter()
                                            .map(|s| s.name.as_str())
                                            .collect::<Vec<_>>()
                                            .join(" and ")
                                    ));
                                    seen.insert(match &b.amount {
                                        BudgetAmount::Money(_) => "budget amount".into(),
                                        BudgetAmount::Attr(_) => "budget attribute".to_string(),
                                    });
                                    for t in &b.thresholds {
                                        seen.insert(format!("threshold {}", t.action.name));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    let expected = [
        "Tenant schema",
        "Request schema",
        "type bool",
        "type string",
        "type number",
        "type enum",
        "type list",
        "attribute default",
        "provider region",
        "provider labels",
        "model provider",
        "model kind",
        "model context",
        "model max_output",
        "model price in out",
        "model price per 1M",
        "model price per 1k",
        "model price per image",
        "model price per second",
        "model price per minute",
        "model caps",
        "model region",
        "model tier",
        "model quality",
        "model tokenizer",
        "model disabled",
        "model labels",
        "or",
        "and",
        "not",
        "parentheses",
        "bool test",
        "compare ==",
        "compare !=",
        "compare <",
        "compare <=",
        "compare >",
        "compare >=",
        "in",
        "not in",
        "has",
        "matches regex",
        "matches string",
        "contains list",
        "contains string",
        "field tenant",
        "field request",
        "field model",
        "field provider",
        "literal string",
        "literal bool",
        "literal number",
        "literal word",
        "literal list",
        "constraint label",
        "constraint when",
        "deny",
        "allow only",
        "require",
        "target provider",
        "target providers",
        "target model",
        "target models",
        "target models where",
        "classify when",
        "classify otherwise",
        "refined route",
        "route candidates",
        "route score",
        "score minus",
        "route premium only",
        "route fallback",
        "fallback model",
        "fallback route",
        "route downgrade",
        "retry on backoff",
        "timeout first_token",
        "timeout total",
        "breaker per model",
        "breaker per provider",
        "limit concurrency",
        "limit rate",
        "limit tokens",
        "limit per tenant",
        "limit per feature",
        "limit per model",
        "limit per provider",
        "budget daily",
        "budget weekly",
        "budget monthly",
        "budget every",
        "budget per tenant",
        "budget per feature",
        "budget per tenant and feature",
        "budget amount",
        "budget attribute",
        "threshold warn",
        "threshold confirm_premium",
        "threshold downgrade",
        "threshold block",
    ];
    let missing: Vec<&str> = expected
        .iter()
        .copied()
        .filter(|e| !seen.contains(*e))
        .collect();
    assert!(
        missing.is_empty(),
        "constructs no example policy uses: {missing:?}\nseen: {seen:?}"
    );
}
