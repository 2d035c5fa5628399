use super::*;

/// Format `input` and compare with `expect`; then check the output is a fixed point.
#[track_caller]
fn check(input: &str, expect: &str) {
    let out = match format_source(FileId(0), input) {
        Ok(out) => out,
        Err(d) => panic!("refused: {d:#?}"),
    };
    assert_eq!(out, expect, "\n--- got:\n{out}\n--- expected:\n{expect}");
    let again = format_source(FileId(0), &out).unwrap();
    assert_eq!(again, out, "not idempotent");
}

#[test]
fn items_are_blocks_with_one_property_per_line() {
    check(
        "provider openai { region us labels [a,b] }",
        "provider openai {\n  region us\n  labels [a, b]\n}\n",
    );
    check("provider x{}", "provider x {}\n");
    check(
        "model m{provider p kind chat context 128k price in $0.15 out 0.60 per 1M tier premium disabled}",
        "model m {\n  provider p\n  kind chat\n  context 128k\n  price in $0.15 out 0.60 per 1M\n  tier premium\n  disabled\n}\n",
    );
    check(
        "model i { price $0.04   per image }",
        "model i {\n  price $0.04 per image\n}\n",
    );
    check(
        "tenant{plan:enum(a,b)=a tags:list(string)=[ ] n:number}",
        "tenant {\n  plan: enum(a, b) = a\n  tags: list(string) = []\n  n: number\n}\n",
    );
}

#[test]
fn items_are_separated_by_one_blank_line() {
    check(
        "provider a {}\n\n\n\nprovider b {}provider c {}",
        "provider a {}\n\nprovider b {}\n\nprovider c {}\n",
    );
    check("", "");
    check("\n\n", "");
}

#[test]
fn targets_use_singular_for_one_name() {
    check(
        "constraints { deny providers [x] deny provider [x, y] allow only [a] x: allow only models [a,b] when tenant.p deny models where model.tier == premium }",
        "constraints {\n  deny provider x\n  deny providers [x, y]\n  allow only model a\n  x: allow only models [a, b] when tenant.p\n  deny models where model.tier == premium\n}\n",
    );
}

#[test]
fn conditions_have_canonical_spacing() {
    check(
        "classify { a when request.x==1 and(request.y!=b or not request.z)  b when request.s matches /a\\/b/ or request.s contains[\"x\",\"y\"] c when request.n not  in [1,2] d otherwise }",
        "classify {\n  a when request.x == 1 and (request.y != b or not request.z)\n  b when request.s matches /a\\/b/ or request.s contains [\"x\", \"y\"]\n  c when request.n not in [1, 2]\n  d otherwise\n}\n",
    );
    // Strings keep their escapes as written.
    check(
        "classify { a when request.s matches \"\\\\d+\" b otherwise }",
        "classify {\n  a when request.s matches \"\\\\d+\"\n  b otherwise\n}\n",
    );
}

#[test]
fn routes_and_scores() {
    check(
        "route x when tenant.a{candidates[a,b] score 0.5*price+0.3 * latency - 0.2*success premium only when request.f fallback[a,route y] downgrade [b]}",
        "route x when tenant.a {\n  candidates [a, b]\n  score 0.5 * price + 0.3 * latency - 0.2 * success\n  premium only when request.f\n  fallback [a, route y]\n  downgrade [b]\n}\n",
    );
}

#[test]
fn protect_rules() {
    check(
        "protect { retry 2 on [429,5xx] backoff 200ms .. 2s timeout first_token 10s total 120s breaker per model open after 5 failures within 30s probe after 15s limit rate 600/min per tenant budget every 14d per tenant and feature tenant.b { warn at 80% confirm premium at 90% } budget daily per feature $5 {} }",
        "protect {\n  retry 2 on [429, 5xx] backoff 200ms..2s\n  timeout first_token 10s total 120s\n  breaker per model open after 5 failures within 30s, probe after 15s\n  limit rate 600/min per tenant\n  budget every 14d per tenant and feature tenant.b {\n    warn at 80%\n    confirm premium at 90%\n  }\n  budget daily per feature $5 {}\n}\n",
    );
}

#[test]
fn comments_stay_in_place() {
    // Leading, trailing, end-of-block and end-of-file comments.
    check(
        "// head\n\n// about a\nprovider a { // header\n  // before region\n  region us // trailing\n  // end of block\n}\n// end of file\n",
        "// head\n\n// about a\nprovider a { // header\n  // before region\n  region us // trailing\n  // end of block\n}\n// end of file\n",
    );
    // A block written on one line keeps its trailing comment on the header line.
    check(
        "provider a { region us } // main\n",
        "provider a { // main\n  region us\n}\n",
    );
    // Comments between the items of a list keep the list one item per line.
    check(
        "constraints {\n  allow only [\n    a, // cheap\n    b,\n  ] when tenant.x\n}\n",
        "constraints {\n  allow only models [\n    a, // cheap\n    b,\n  ] when tenant.x\n}\n",
    );
    check(
        "route r { candidates [a, // first\n\n // then\n b\n // last\n ] fallback [route x, // r\n c] }",
        "route r {\n  candidates [\n    a, // first\n\n    // then\n    b,\n    // last\n  ]\n  fallback [\n    route x, // r\n    c,\n  ]\n}\n",
    );
    check(
        "tenant { plan: enum(free, // the default\n pro) = free }",
        "tenant {\n  plan: enum(\n    free, // the default\n    pro,\n  ) = free\n}\n",
    );
    check(
        "protect { retry 2 on [429, // rate limited\n 5xx] backoff 1s..2s }",
        "protect {\n  retry 2 on [\n    429, // rate limited\n    5xx,\n  ] backoff 1s..2s\n}\n",
    );
    // Elsewhere in a rule, comments move to just before it.
    check(
        "constraints {\n  deny models [a, b] when // why\n    tenant.x\n  require model.caps has // what\n x\n}\n",
        "constraints {\n  // why\n  deny models [a, b] when tenant.x\n  // what\n  require model.caps has x\n}\n",
    );
    // Comments in an empty block and in a file with no items.
    check(
        "classify {\n  // nothing yet\n}\n",
        "classify {\n  // nothing yet\n}\n",
    );
    check("\n// a\n\n\n// b\n", "// a\n\n// b\n");
}

#[test]
fn blank_lines_between_rules_are_kept_once() {
    check(
        "protect {\n\n  retry 1\n\n\n  // why\n  timeout total 1s\n  limit rate 1/s per tenant\n\n}\n",
        "protect {\n  retry 1\n\n  // why\n  timeout total 1s\n  limit rate 1/s per tenant\n}\n",
    );
}

#[test]
fn syntax_errors_are_refused() {
    let err = format_source(FileId(0), "model a { provder p }\nprovider p {}\n").unwrap_err();
    assert_eq!(err[0].code, "route::syntax");
}

#[test]
fn trees_built_in_code_get_the_parentheses_they_need() {
    let t = |f: &str| {
        Expr::Test(Test {
            path: Path {
                scope: PathScope::Request,
                field: Ident {
                    name: f.into(),
                    span: Span::default(),
                },
                span: Span::default(),
            },
            op: None,
            span: Span::default(),
        })
    };
    let e = Expr::Not(
        Box::new(Expr::And(
            vec![t("a"), Expr::Or(vec![t("b"), t("c")], Span::default())],
            Span::default(),
        )),
        Span::default(),
    );
    assert_eq!(expr(&e, ""), "not (request.a and (request.b or request.c))");
}

#[test]
fn a_byte_order_mark_is_dropped() {
    let out = format_source(FileId(0), "\u{feff}provider p { region us } // x\n").unwrap();
    assert_eq!(out, "provider p { // x\n  region us\n}\n");
}
