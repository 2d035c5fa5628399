//! Formatter tests: snapshots of messy inputs, and the round-trip properties
//! over those inputs, the example policies and generated trees.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::string_slice,
    clippy::panic,
    clippy::indexing_slicing
)]

use proptest::prelude::*;
use routeplane::fmt::{format_ast, format_source};
use routeplane::source::{FileId, Span};
use routeplane::syntax::ast::*;
use routeplane::syntax::parse_file;

fn fmt(text: &str) -> String {
    match format_source(FileId(0), text) {
        Ok(out) => out,
        Err(d) => panic!("refused: {d:#?}"),
    }
}

/// The round-trip properties for one input: a fixed point, the same tree, every comment kept.
#[track_caller]
fn assert_round_trip(name: &str, text: &str) {
    let once = fmt(text);
    let twice = fmt(&once);
    assert_eq!(once, twice, "{name}: fmt is not idempotent");
    let before = parse_file(FileId(0), text);
    let after = parse_file(FileId(0), &once);
    assert!(
        after.diagnostics.is_empty(),
        "{name}: output does not parse: {:#?}",
        after.diagnostics
    );
    assert_eq!(
        before.ast.items, after.ast.items,
        "{name}: fmt changed the tree"
    );
    let texts = |cs: &[Comment]| cs.iter().map(|c| c.text.clone()).collect::<Vec<_>>();
    assert_eq!(
        texts(&before.ast.comments),
        texts(&after.ast.comments),
        "{name}: comments lost or reordered"
    );
}

#[test]
fn snapshots() {
    insta::glob!("fmt/*.route", |path| {
        let text = std::fs::read_to_string(path).unwrap();
        insta::assert_snapshot!(fmt(&text));
    });
}

#[test]
fn inputs_round_trip() {
    insta::glob!("fmt/*.route", |path| {
        let text = std::fs::read_to_string(path).unwrap();
        assert_round_trip(&path.display().to_string(), &text);
    });
}

fn route_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            route_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "route") {
            out.push(p);
        }
    }
}

fn example_files() -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    route_files(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"),
        &mut files,
    );
    files.sort();
    assert!(files.len() >= 3);
    files
}

#[test]
fn example_policies_round_trip_and_are_formatted() {
    for f in example_files() {
        let text = std::fs::read_to_string(&f).unwrap();
        assert_round_trip(&f.display().to_string(), &text);
        assert_eq!(
            fmt(&text),
            text,
            "{} is not formatted: run `routeplane fmt policies`",
            f.display()
        );
    }
}

// ------------------------------------------------------------------ properties

/// Spread random whitespace and comments over an example: wherever the
/// grammar allows whitespace, the formatter must give back the same output.
fn mangle(text: &str, seed: &[u8]) -> String {
    // Split on single spaces between tokens, and re-join with random layout.
    let mut out = String::new();
    let mut k = 0;
    let mut in_comment = false;
    let mut in_string = false;
    for (i, c) in text.char_indices() {
        match c {
            '"' if !in_comment => in_string = !in_string,
            '/' if !in_string && text.get(i..i + 2) == Some("//") => in_comment = true,
            '\n' => in_comment = false,
            _ => {}
        }
        if c == ' ' && !in_comment && !in_string {
            let r = seed.get(k % seed.len().max(1)).copied().unwrap_or(0);
            k += 1;
            out.push_str(match r % 8 {
                0 => "\n",
                1 => "  ",
                2 => "\t",
                3 => " // noise\n",
                4 => "\n\n\n",
                _ => " ",
            });
        } else {
            out.push(c);
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn mangled_examples_round_trip(seed in proptest::collection::vec(any::<u8>(), 1..64), which in 0usize..16) {
        let files = example_files();
        let f = &files[which % files.len()];
        let text = std::fs::read_to_string(f).unwrap();
        let messy = mangle(&text, &seed);
        // Only layouts that still parse are interesting (a comment can land
        // between `$` and a digit only in theory: spaces never split a token).
        prop_assume!(parse_file(FileId(0), &messy).diagnostics.is_empty());
        assert_round_trip("mangled", &messy);
        let clean: Vec<_> = parse_file(FileId(0), &text).ast.items;
        prop_assert_eq!(parse_file(FileId(0), &fmt(&messy)).ast.items, clean);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random edits of the examples (mostly broken files): formatting never
    /// panics, and whatever it accepts it formats to a fixed point.
    #[test]
    fn edited_examples_never_panic(which in 0usize..16, at in any::<proptest::sample::Index>(), len in 0usize..40,
                                   insert in "[a-z{}\\[\\]()/\",.:=<>!\n #$%-]{0,12}") {
        let files = example_files();
        let text = std::fs::read_to_string(&files[which % files.len()]).unwrap();
        let start = at.index(text.len());
        let start = (0..=start).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        let end = (start + len..=text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
        let edited = format!("{}{}{}", &text[..start], insert, &text[end..]);
        let parses = parse_file(FileId(0), &edited).diagnostics.is_empty();
        match format_source(FileId(0), &edited) {
            Ok(out) => prop_assert_eq!(fmt(&out), out.clone(), "not a fixed point for:\n{}", edited),
            // Refused only for syntax errors, never by the formatter's own safety net.
            Err(d) => prop_assert!(!parses, "refused a file that parses: {:?}\n{}", d, edited),
        }
    }
}

/// Random trees shaped as the parser builds them print to text that parses
/// back to the same tree. (The generators nest deeply: run on a big stack.)
#[test]
fn generated_trees_round_trip() {
    let run = || {
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: 128,
            ..ProptestConfig::default()
        });
        let result = runner.run(&proptest::collection::vec(arb_item(), 0..6), |items| {
            let ast = FileAst {
                file: FileId(0),
                items,
                comments: Vec::new(),
            };
            let text = format_ast(&ast, "");
            let parsed = parse_file(FileId(0), &text);
            prop_assert!(
                parsed.diagnostics.is_empty(),
                "{}\n{:#?}",
                text,
                parsed.diagnostics
            );
            prop_assert_eq!(&parsed.ast.items, &ast.items, "{}", text);
            prop_assert_eq!(fmt(&text), text);
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    };
    std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(run)
        .unwrap()
        .join()
        .unwrap();
}

// ------------------------------------------------------------------ generators

fn sp() -> Span {
    Span::default()
}

fn ident(words: &'static [&'static str]) -> impl Strategy<Value = Ident> + Clone {
    proptest::sample::select(words).prop_map(|w| Ident {
        name: w.to_string(),
        span: sp(),
    })
}

const NAMES: &[&str] = &[
    "gpt-4o-mini",
    "claude-3.5-sonnet",
    "a",
    "b_2",
    "mistral-small",
    "x.y",
];

fn quantity(texts: &'static [&'static str]) -> impl Strategy<Value = Quantity> + Clone {
    proptest::sample::select(texts).prop_map(|t| routeplane::syntax::parse_quantity(t, sp()))
}

fn arb_literal() -> impl Strategy<Value = Literal> + Clone {
    let leaf = prop_oneof![
        r#"[a-z "\\\t\n]{0,6}"#.prop_map(|s| Literal::Str(s, sp())),
        "[a-z]{1,4}".prop_map(|s| Literal::Regex(s, sp())),
        any::<bool>().prop_map(|b| Literal::Bool(b, sp())),
        quantity(&["1", "0.5", "$2.50", "128k", "80%", "600/min"]).prop_map(Literal::Quantity),
        ident(NAMES).prop_map(Literal::Name),
    ];
    prop_oneof![4 => leaf.clone(), 1 => proptest::collection::vec(leaf, 0..3).prop_map(|v| Literal::List(v, sp()))]
}

fn arb_test() -> impl Strategy<Value = Expr> + Clone {
    let scope = proptest::sample::select(
        &[
            PathScope::Tenant,
            PathScope::Request,
            PathScope::Model,
            PathScope::Provider,
        ][..],
    );
    let cmp = proptest::sample::select(
        &[
            CmpOp::Eq,
            CmpOp::Ne,
            CmpOp::Lt,
            CmpOp::Le,
            CmpOp::Gt,
            CmpOp::Ge,
        ][..],
    );
    let op = prop_oneof![
        Just(None),
        (cmp, arb_literal()).prop_map(|(c, l)| Some(TestOp::Cmp(c, l))),
        (
            any::<bool>(),
            proptest::collection::vec(arb_literal(), 0..3)
        )
            .prop_map(|(negated, list)| Some(TestOp::In {
                negated,
                list,
                span: sp()
            })),
        arb_literal().prop_map(|l| Some(TestOp::Has(l))),
        "[a-z]{1,4}".prop_map(|s| Some(TestOp::Matches(Literal::Regex(s, sp())))),
        "[a-z]{0,4}".prop_map(|s| Some(TestOp::Contains(Literal::Str(s, sp())))),
    ];
    (
        scope,
        ident(&["plan", "has_images", "x", "input_tokens"]),
        op,
    )
        .prop_map(|(scope, field, op)| {
            Expr::Test(Test {
                path: Path {
                    scope,
                    field,
                    span: sp(),
                },
                op,
                span: sp(),
            })
        })
}

/// Conditions shaped as the parser builds them: `or` of `and` of `not`/tests,
/// with a `Paren` wherever a lower-precedence expression is nested.
fn arb_expr() -> impl Strategy<Value = Expr> + Clone {
    arb_test().prop_recursive(3, 16, 3, |inner| {
        let paren = inner.clone().prop_map(|e| Expr::Paren(Box::new(e), sp()));
        let atom = prop_oneof![arb_test(), paren];
        let not = atom.clone().prop_map(|e| Expr::Not(Box::new(e), sp()));
        let factor = prop_oneof![atom.clone(), not];
        let and = proptest::collection::vec(factor.clone(), 2..4).prop_map(|v| Expr::And(v, sp()));
        let term = prop_oneof![factor.clone(), and];
        let or = proptest::collection::vec(term.clone(), 2..4).prop_map(|v| Expr::Or(v, sp()));
        prop_oneof![term, or]
    })
}

fn arb_item() -> impl Strategy<Value = Item> {
    let names = proptest::collection::vec(ident(NAMES), 0..3);
    let prop = prop_oneof![
        ident(NAMES).prop_map(PropKind::Provider),
        ident(&["chat", "image"]).prop_map(PropKind::Kind),
        quantity(&["128k", "1M", "8191"]).prop_map(PropKind::Context),
        (
            quantity(&["$0.15", "2"]),
            quantity(&["0.60", "$10"]),
            quantity(&["1M", "1k"])
        )
            .prop_map(|(input, output, per)| PropKind::Price(Price::InOut {
                input,
                output,
                per: PricePer::Tokens(per)
            })),
        (quantity(&["$0.04"]), ident(&["image", "second"])).prop_map(
            |(amount, u)| PropKind::Price(Price::Flat {
                amount,
                per: PricePer::Unit(u)
            })
        ),
        names.clone().prop_map(PropKind::Caps),
        ident(&["premium", "standard"]).prop_map(PropKind::Tier),
        any::<bool>().prop_map(PropKind::Enabled),
    ];
    let target = prop_oneof![
        proptest::collection::vec(ident(NAMES), 1..3).prop_map(|v| Target::Providers(v, sp())),
        proptest::collection::vec(ident(NAMES), 0..3).prop_map(|v| Target::Models(v, sp())),
        arb_expr().prop_map(|e| Target::Where(e, sp())),
    ];
    let effect = prop_oneof![
        target.clone().prop_map(Effect::Deny),
        target.prop_map(Effect::AllowOnly),
        arb_expr().prop_map(Effect::Require),
    ];
    let constraint = (
        proptest::option::of(ident(&["eu_only", "r1"])),
        effect,
        proptest::option::of(arb_expr()),
    )
        .prop_map(|(label, effect, when)| Constraint {
            label,
            effect,
            when,
            span: sp(),
        });
    let classify =
        (ident(&["chat", "code"]), proptest::option::of(arb_expr())).prop_map(|(intent, when)| {
            ClassifyRule {
                intent,
                when,
                span: sp(),
            }
        });
    let term = (
        any::<bool>(),
        quantity(&["0.5", "1", "0"]),
        ident(&["price", "latency", "quality"]),
    )
        .prop_map(|(negative, weight, signal)| ScoreTerm {
            negative,
            weight,
            signal,
            span: sp(),
        });
    let route_prop = prop_oneof![
        names.clone().prop_map(RoutePropKind::Candidates),
        proptest::collection::vec(term, 1..4).prop_map(|mut v| {
            v[0].negative = false; // the grammar has no leading sign
            RoutePropKind::Score(v)
        }),
        arb_expr().prop_map(RoutePropKind::PremiumOnly),
        proptest::collection::vec(
            prop_oneof![
                ident(NAMES).prop_map(FallbackItem::Model),
                ident(NAMES).prop_map(FallbackItem::Route)
            ],
            0..3
        )
        .prop_map(RoutePropKind::Fallback),
        names.prop_map(RoutePropKind::Downgrade),
    ];
    let threshold = (
        ident(&["warn", "confirm_premium", "block"]),
        quantity(&["80%", "100%"]),
    )
        .prop_map(|(action, at)| Threshold {
            action,
            at,
            span: sp(),
        });
    let protect = prop_oneof![
        quantity(&["2"]).prop_map(|count| ProtectKind::Retry {
            count,
            on: Vec::new(),
            backoff: None
        }),
        (quantity(&["10s"]), quantity(&["2min"])).prop_map(|(a, b)| ProtectKind::Timeout {
            parts: vec![
                (
                    Ident {
                        name: "first_token".into(),
                        span: sp()
                    },
                    a
                ),
                (
                    Ident {
                        name: "total".into(),
                        span: sp()
                    },
                    b
                )
            ]
        }),
        (ident(&["tenant", "model"]), quantity(&["600/min", "64"])).prop_map(|(scope, amount)| {
            ProtectKind::Limit {
                kind: Ident {
                    name: "rate".into(),
                    span: sp(),
                },
                amount,
                scope,
            }
        }),
        proptest::collection::vec(threshold, 0..3).prop_map(|thresholds| ProtectKind::Budget(
            Budget {
                period: BudgetPeriod::Named(Ident {
                    name: "monthly".into(),
                    span: sp()
                }),
                scope: vec![Ident {
                    name: "tenant".into(),
                    span: sp()
                }],
                amount: BudgetAmount::Money(routeplane::syntax::parse_quantity("$500", sp())),
                thresholds,
            }
        )),
    ];
    prop_oneof![
        (
            ident(NAMES),
            proptest::collection::vec(prop.prop_map(|kind| Prop { kind, span: sp() }), 0..4)
        )
            .prop_map(|(name, props)| Item::Model(ModelDecl {
                name,
                props,
                span: sp()
            })),
        proptest::collection::vec(constraint, 0..3)
            .prop_map(|rules| Item::Constraints(ConstraintsBlock { rules, span: sp() })),
        proptest::collection::vec(classify, 0..3)
            .prop_map(|rules| Item::Classify(ClassifyBlock { rules, span: sp() })),
        (
            ident(&["chat", "extraction"]),
            proptest::option::of(arb_expr()),
            proptest::collection::vec(
                route_prop.prop_map(|kind| RouteProp { kind, span: sp() }),
                0..4
            )
        )
            .prop_map(|(intent, when, props)| Item::Route(RouteDecl {
                intent,
                when,
                props,
                span: sp()
            })),
        proptest::collection::vec(
            protect.prop_map(|kind| ProtectRule { kind, span: sp() }),
            0..4
        )
        .prop_map(|rules| Item::Protect(ProtectBlock { rules, span: sp() })),
    ]
}
