use super::*;
use crate::source::{FileId, Sources};
use crate::syntax::parse_file;

fn lower_src(src: &str) -> (Lowered, Sources) {
    let mut sources = Sources::new();
    let id = sources.add("t.route", src);
    let parsed = parse_file(id, src);
    assert!(
        parsed.diagnostics.is_empty(),
        "syntax errors: {:#?}",
        parsed.diagnostics
    );
    (lower(&[parsed.ast]), sources)
}

/// `code@line` of every lowering diagnostic, in order.
fn codes(src: &str) -> Vec<String> {
    let (l, sources) = lower_src(src);
    let f = sources.get(FileId(0)).unwrap();
    let mut v: Vec<(u32, String)> = l
        .diagnostics
        .iter()
        .map(|d| {
            let s = d.span().unwrap();
            (
                s.start,
                format!(
                    "{}@{}",
                    d.code.trim_start_matches("route::"),
                    f.line_col(s.start()).0
                ),
            )
        })
        .collect();
    v.sort();
    v.into_iter().map(|x| x.1).collect()
}

#[track_caller]
fn check(src: &str, expect: &[&str]) {
    let full = format!("{CATALOGUE}{src}");
    let got = codes(&full);
    // The catalogue takes CATALOGUE_LINES lines; report lines relative to `src`.
    let got: Vec<String> = got
        .iter()
        .map(|s| {
            let (c, l) = s.split_once('@').unwrap();
            format!("{c}@{}", l.parse::<usize>().unwrap() - CATALOGUE_LINES)
        })
        .collect();
    assert_eq!(got, expect, "\nsource:\n{src}");
}

const CATALOGUE: &str = "tenant { plan: enum(free, pro) eu: bool budget: number }
request { team: string }
provider openai { region us }
provider mistral { region eu labels [gdpr] }
model a { provider openai kind chat context 128k price in $0.15 out $0.60 per 1M caps [tools, vision] quality 0.7 }
model b { provider mistral kind chat tier premium price in 2 out 6 per 1k }
model e { provider openai kind embeddings price $0.02 per 1M }
";
const CATALOGUE_LINES: usize = 7;

#[test]
fn catalogue_lowers_with_units_and_defaults() {
    let (l, _) = lower_src(CATALOGUE);
    assert!(l.diagnostics.is_empty(), "{:#?}", l.diagnostics);
    let p = &l.policy;
    let a = &p.models[0];
    assert_eq!(
        (
            a.context,
            a.pricing.input_per_mtok,
            a.pricing.output_per_mtok
        ),
        (128_000, 150_000, 600_000)
    );
    assert_eq!(a.region.as_deref(), Some("us"));
    let b = &p.models[1];
    assert_eq!(
        (b.pricing.input_per_mtok, b.pricing.output_per_mtok, b.tier),
        (2_000_000_000, 6_000_000_000, ir::Tier::Premium)
    );
    assert_eq!((b.quality, b.enabled, b.context), (0.5, true, 0));
    assert_eq!(p.models[2].pricing.input_per_mtok, 20_000);
}

#[test]
fn flat_prices_per_image_and_minute() {
    let (l, _) = lower_src("provider o {}\nmodel i { provider o kind image price $0.04 per image }\nmodel w { provider o kind audio price $0.006 per minute }");
    assert!(l.diagnostics.is_empty(), "{:#?}", l.diagnostics);
    assert_eq!(l.policy.models[0].pricing.per_image, 40_000);
    assert_eq!(l.policy.models[1].pricing.per_audio_second, 100);
}

#[test]
fn constraint_removes_are_static_sets() {
    let src = format!(
        "{CATALOGUE}constraints {{
  deny provider mistral
  allow only [a] when tenant.plan == free
  eu: deny models where model.region != eu when tenant.eu
  require model.caps has vision when request.has_images
  deny models where model.price_in > $1
  deny models where provider.labels has gdpr or model.kind == embeddings
}}"
    );
    let (l, _) = lower_src(&src);
    assert!(l.diagnostics.is_empty(), "{:#?}", l.diagnostics);
    let removes: Vec<Vec<u32>> = l
        .policy
        .constraints
        .iter()
        .map(|c| c.removes.iter().map(|m| m.0).collect())
        .collect();
    assert_eq!(
        removes,
        vec![
            vec![1],
            vec![1, 2],
            vec![0, 2],
            vec![1, 2],
            vec![1],
            vec![1, 2]
        ]
    );
    let names: Vec<&str> = l
        .policy
        .constraints
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "constraints[1]",
            "constraints[2]",
            "eu",
            "constraints[4]",
            "constraints[5]",
            "constraints[6]"
        ]
    );
}

#[test]
fn diagnostics_by_code() {
    // One case per line: source after the catalogue -> `code@line` relative to it.
    let cases: &[(&str, &[&str])] = &[
        ("", &[]),
        ("model c { provider opnai kind chat }", &["unknown-provider@1"]),
        ("model c { provider openai kind chatt }", &["unknown-kind@1"]),
        ("model c { kind chat }", &["missing-property@1"]),
        ("model c { provider openai }", &["missing-property@1"]),
        ("model a { provider openai kind chat }", &["duplicate-name@1"]),
        ("provider openai {}", &["duplicate-name@1"]),
        ("model c { provider openai kind chat kind chat }", &["duplicate-property@1"]),
        ("model c { provider openai kind chat context 5ms }", &["unit-mismatch@1"]),
        ("model c { provider openai kind chat price in -1 out 1 per 1M }", &["invalid-range@1"]),
        ("model c { provider openai kind chat quality 1.5 }", &["invalid-range@1"]),
        ("model c { provider openai kind chat tier gold }", &["unknown-word@1"]),
        ("model c { provider openai kind chat price $1 per frame }", &["unknown-word@1"]),
        ("model c { provider openai kind chat price in 1 out 2 per image }", &["unit-mismatch@1"]),
        ("tenant { plan: bool }", &["duplicate-name@1"]),
        ("tenant { id: string }", &["duplicate-name@1"]),
        ("request { stream: bool }", &["duplicate-name@1"]),
        ("tenant { tier: enum(x, y) = z }", &["unknown-variant@1"]),
        ("constraints { deny [a, zz] }", &["unknown-model@1"]),
        ("constraints { deny provider deepsek }", &["unknown-provider@1"]),
        ("constraints { deny [a] when tenant.plan == fre }", &["unknown-variant@1"]),
        ("constraints { deny [a] when tenant.plna == free }", &["unknown-attribute@1"]),
        ("constraints { deny [a] when request.endpont == chat }", &["unknown-attribute@1"]),
        ("constraints { deny [a] when tenant.plan > 3 }", &["type-mismatch@1"]),
        ("constraints { deny [a] when tenant.plan == 3 }", &["type-mismatch@1"]),
        ("constraints { deny [a] when tenant.plan }", &["type-mismatch@1"]),
        ("constraints { deny [a] when request.input_tokens > 4ms }", &["unit-mismatch@1"]),
        ("constraints { deny [a] when request.prompt matches /a(/ }", &["invalid-regex@1"]),
        ("constraints { deny [a] when model.kind == chat }", &["wrong-scope@1"]),
        ("constraints { deny models where tenant.eu }", &["wrong-scope@1"]),
        ("constraints { require model.caps has visoin }", &["unknown-capability@1"]),
        ("constraints { deny models where model.region == eur }", &["unknown-variant@1"]),
        // Regions are open: a region no model is in yet is fine, a near miss is not.
        ("constraints { deny models where model.region == ap when tenant.eu }", &[]),
        ("constraints { deny models where model.tier == gold }", &["unknown-variant@1"]),
        ("constraints { deny models where model.colour == red }", &["unknown-attribute@1"]),
        ("constraints {\n x: deny [a]\n x: deny [b]\n}", &["duplicate-name@3"]),
        ("classify { c otherwise }\nroute d { candidates [a] }", &["unknown-intent@2"]),
        ("classify { c otherwise }\nroute c { candidates [a] score 1 * prize }", &["unknown-signal@2"]),
        ("classify { c otherwise }\nroute c { candidates [a] score 1s * price }", &["unit-mismatch@2"]),
        ("classify { c otherwise }\nroute c { candidates [a, a] }", &["duplicate-name@2"]),
        ("classify { c otherwise }\nroute c { candidates [a] candidates [b] }", &["duplicate-property@2"]),
        ("classify { c otherwise }\nroute c { candidates [a] fallback [route x] }", &["unknown-intent@2"]),
        ("classify { c otherwise }\nroute c { candidates [a] premium only when model.tier == premium }", &["wrong-scope@2"]),
        ("protect { retry 2 on [429, 5xx, timeout, 200, 3xx, oops] backoff 2s..200ms }", &["invalid-range@1", "invalid-range@1", "unknown-word@1", "invalid-range@1"]),
        ("protect { retry 2 }\nprotect { retry 3 }", &["duplicate-property@2"]),
        ("protect { timeout first_token 10 total 2min }", &["unit-mismatch@1"]),
        ("protect { timeout first_token 10s total 2s }", &["invalid-range@1"]),
        ("protect { breaker per tenant open after 5 failures within 30s, probe after 15s }", &["unknown-word@1"]),
        ("protect { limit rate 600 per tenant }", &["unit-mismatch@1"]),
        ("protect { limit concurrency 64 per team }", &["unknown-word@1"]),
        ("protect { budget monthly per tenant $500 { warn at 80% block at 120% } }", &["invalid-range@1"]),
        ("protect { budget monthly per tenant $500 { warn at 80 } }", &["unit-mismatch@1"]),
        ("protect { budget yearly per tenant $500 { block at 100% } }", &["unknown-word@1"]),
        ("protect { budget monthly per tenant $500 { shout at 80% } }", &["unknown-word@1"]),
        ("protect { budget monthly per tenant tenant.plan { block at 100% } }", &["type-mismatch@1"]),
        ("protect { budget monthly per tenant request.team { block at 100% } }", &["wrong-scope@1"]),
        ("protect { budget every 14d per tenant and feature tenant.budget { block at 100% } }", &[]),
    ];
    for (src, expect) in cases {
        check(src, expect);
    }
}

#[test]
fn unknown_names_suggest_a_replacement() {
    let (l, _) = lower_src(&format!(
        "{CATALOGUE}constraints {{ deny provider mistrl }}"
    ));
    let d = &l.diagnostics[0];
    assert_eq!(d.help.as_deref(), Some("did you mean `mistral`?"));
    assert_eq!(
        d.suggestion.as_ref().map(|s| s.replacement.as_str()),
        Some("mistral")
    );
}

#[test]
fn conditions_are_typed() {
    let src = format!(
        "{CATALOGUE}classify {{
  x when request.endpoint == embeddings and tenant.plan in [free, pro] and not request.stream
  y when request.input_tokens > 8k or request.prompt contains [\"SSN\", iban]
  z when request.team == \"infra\" and tenant.budget >= $100
  w otherwise
}}"
    );
    let (l, _) = lower_src(&src);
    assert!(l.diagnostics.is_empty(), "{:#?}", l.diagnostics);
    let c = &l.policy.classify;
    assert_eq!(c.len(), 4);
    let s = format!("{:?}", c[1].when.as_ref().unwrap().cond);
    assert!(s.contains("Number(8000.0)") && s.contains("\"ssn\""), "{s}");
    let s = format!("{:?}", c[0].when.as_ref().unwrap().cond);
    assert!(
        s.contains("Enum(1)") && s.contains("Not(Bool(Request(Stream)))"),
        "{s}"
    );
    assert!(c[3].when.is_none());
}

#[test]
fn protect_converts_units() {
    let src = "protect {
  retry 2 on [429, 5xx, timeout] backoff 200ms..2s
  timeout first_token 10s total 2min
  breaker per model open after 5 failures within 30s, probe after 15s
  limit concurrency 64 per model
  limit rate 600/min per tenant
  limit tokens 1M/h per tenant
  budget monthly per tenant $500 { block at 100% warn at 80% confirm premium at 90% }
}";
    let (l, _) = lower_src(src);
    assert!(l.diagnostics.is_empty(), "{:#?}", l.diagnostics);
    let p = &l.policy.protect;
    let r = p.retry.as_ref().unwrap();
    assert_eq!(
        (r.count, r.backoff_min_ms, r.backoff_max_ms),
        (2, 200, 2000)
    );
    assert_eq!(
        r.on,
        vec![
            ir::RetryOn::Status(429),
            ir::RetryOn::StatusClass(5),
            ir::RetryOn::Timeout
        ]
    );
    assert_eq!(
        (p.timeout.first_token_ms, p.timeout.total_ms),
        (Some(10_000), Some(120_000))
    );
    assert_eq!(p.breakers[0].window_ms, 30_000);
    assert_eq!(
        p.limits[1].kind,
        ir::LimitKind::Rate {
            requests: 600,
            window_ms: 60_000
        }
    );
    assert_eq!(
        p.limits[2].kind,
        ir::LimitKind::Tokens {
            tokens: 1_000_000,
            window_ms: 3_600_000
        }
    );
    let b = &p.budgets[0];
    assert_eq!(b.amount, ir::BudgetAmount::Fixed(500_000_000));
    let pcts: Vec<f64> = b.thresholds.iter().map(|t| t.percent).collect();
    assert_eq!(pcts, [80.0, 90.0, 100.0]);
}

#[test]
fn routes_resolve_names() {
    let src = format!(
        "{CATALOGUE}classify {{ chat otherwise }}
route chat {{ candidates [a, b] score 0.7 * quality - 0.3 * price premium only when tenant.plan == pro fallback [e, route chat] downgrade [a] }}"
    );
    let (l, _) = lower_src(&src);
    assert!(l.diagnostics.is_empty(), "{:#?}", l.diagnostics);
    let r = &l.policy.routes[0];
    assert_eq!(r.candidates.len(), 2);
    assert_eq!(r.score[1].weight, -0.3);
    assert_eq!(r.fallback[1].target, ir::FallbackTarget::Route(IntentId(0)));
    assert!(l.usage.models.iter().all(|u| *u));
}
