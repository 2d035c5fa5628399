use super::*;

fn parse(text: &str) -> Parsed {
    parse_file(FileId(0), text)
}

fn errors(text: &str) -> Vec<String> {
    parse(text)
        .diagnostics
        .iter()
        .map(|d| d.message.clone())
        .collect()
}

#[test]
fn parses_the_direction_example() {
    let src = r#"
tenant { plan: enum(free, pro, enterprise)  region: enum(us, eu)  data_residency: bool }
request { feature: string }
provider openai    { region us }
model gpt-4o-mini  { provider openai  kind chat  context 128k  price in $0.15 out $0.60 per 1M  caps [tools, json, vision]  quality 0.71 }
model dall-e-3 { provider openai kind image price $0.04 per image }
constraints {
  deny provider deepseek
  eu: deny models where model.region != eu when tenant.data_residency
  allow only [gpt-4o-mini, mistral-small] when tenant.plan == free
  require model.caps has vision when request.has_images
}
classify {
  embeddings when request.endpoint == embeddings
  extraction when request.response_format in [json_object, json_schema]
  code_review when request.feature == "code-review" and not request.stream
  secret when request.prompt matches /pass(word)?\/x/ or request.prompt contains ["ssn", "iban"]
  chat otherwise
}
route extraction when tenant.plan != free {
  candidates [gpt-4o-mini, mistral-small, gpt-4o]
  score 0.5 * price + 0.3 * latency - 0.2 * success
  premium only when request.feature in ["contract-review"]
  fallback [mistral-small, route chat]
  downgrade [gpt-4o-mini]
}
protect {
  retry 2 on [429, 5xx, timeout] backoff 200ms..2s
  timeout first_token 10s total 120s
  breaker per model open after 5 failures within 30s, probe after 15s
  limit concurrency 64 per model
  limit rate 600/min per tenant
  budget monthly per tenant $500 { warn at 80%  confirm premium at 90%  downgrade at 95%  block at 100% }
  budget every 7d per tenant and feature tenant.weekly { block at 100% }
}
"#;
    let p = parse(src);
    assert!(p.diagnostics.is_empty(), "{:#?}", p.diagnostics);
    assert_eq!(p.ast.items.len(), 9);
    let Some(Item::Protect(protect)) = p.ast.items.last() else {
        unreachable!()
    };
    assert_eq!(protect.rules.len(), 7);
}

#[test]
fn quantities_keep_unit_and_rate() {
    let q = parse_quantity("$2.50", Span::default());
    assert!(q.money);
    assert_eq!(q.value, 2.5);
    let q = parse_quantity("600/min", Span::default());
    assert_eq!(
        (q.value, q.unit.as_str(), q.per.as_deref()),
        (600.0, "", Some("min"))
    );
    let q = parse_quantity("128k", Span::default());
    assert_eq!((q.value, q.unit.as_str()), (128.0, "k"));
    let q = parse_quantity("-1.5ms", Span::default());
    assert_eq!((q.value, q.unit.as_str()), (-1.5, "ms"));
}

#[test]
fn reports_every_broken_item_and_keeps_the_good_ones() {
    let src = "model a { provider p kind chat }\nmodel b { provder p }\nprovider p { region us }\nroute chat { candidats [a] }\nprovider q {}\n";
    let p = parse(src);
    assert_eq!(p.diagnostics.len(), 2, "{:#?}", p.diagnostics);
    assert_eq!(p.ast.items.len(), 3);
    let first = &p.diagnostics[0];
    assert_eq!(first.help.as_deref(), Some("did you mean `provider`?"));
    assert_eq!(first.span().map(|s| s.start), Some(43));
}

#[test]
fn never_panics_on_garbage() {
    for src in [
        "",
        "}",
        "{",
        "model",
        "model x {",
        "\"unterminated",
        "route x when tenant. {",
        "é\u{0}\u{ffff}",
        "protect { budget }",
    ] {
        let _ = parse(src);
    }
    assert!(errors("").is_empty());
    assert!(errors("// only a comment\n").is_empty());
}

#[test]
fn comments_are_collected_outside_strings() {
    let src = "// top\nclassify { a when request.feature == \"x//y\" // trailing\n b otherwise }";
    let c = scan_comments(FileId(0), src);
    let texts: Vec<_> = c.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(texts, ["// top", "// trailing"]);
}

#[test]
fn names_may_contain_dashes_and_dots() {
    let p = parse("model claude-3.5-sonnet { provider anthropic kind chat }");
    assert!(p.diagnostics.is_empty(), "{:#?}", p.diagnostics);
    let Some(Item::Model(m)) = p.ast.items.first() else {
        unreachable!()
    };
    assert_eq!(m.name.name, "claude-3.5-sonnet");
}

#[test]
fn spans_do_not_cover_trailing_whitespace_or_comments() {
    let src =
        "constraints {\n  deny model a when request.has_tools   // why\n\n  deny model b\n}\n";
    let p = parse(src);
    assert!(p.diagnostics.is_empty(), "{:#?}", p.diagnostics);
    let Some(Item::Constraints(c)) = p.ast.items.first() else {
        unreachable!()
    };
    let rule = &c.rules[0];
    assert_eq!(
        src.get(rule.span.start()..rule.span.end()).unwrap(),
        "deny model a when request.has_tools"
    );
    let when = rule.when.as_ref().unwrap();
    assert_eq!(
        src.get(when.span().start()..when.span().end()).unwrap(),
        "request.has_tools"
    );
}

#[test]
fn a_huge_broken_word_is_quoted_short_and_fast() {
    // A 2 MB line of one word: the message quoted all of it, and the
    // did-you-mean edit distance against every keyword took seconds.
    let text = format!("provider p {{ region us }}\n{}\n", "x".repeat(2 << 20));
    let t0 = std::time::Instant::now();
    let p = parse(&text);
    assert!(t0.elapsed() < std::time::Duration::from_secs(20));
    assert_eq!(p.diagnostics.len(), 1);
    let d = &p.diagnostics[0];
    assert_eq!(
        d.message,
        format!("expected valid syntax, found `{}...`", "x".repeat(40))
    );
    assert!(d.span().is_some_and(|s| s.end() - s.start() == 40));
    assert!(d.suggestion.is_none());
}

#[test]
fn a_word_spelt_right_is_not_corrected() {
    // `provider` was "corrected" to `providers` (and `in` to `kind`), with a
    // machine-applicable suggestion, when the error was elsewhere in the item.
    for src in [
        "provider openai region us }\n",
        "provider m@@ { region eu }\n",
        "model x { provider openai kind chat price in $1 }\n",
    ] {
        let p = parse(src);
        assert_eq!(p.diagnostics.len(), 1, "{src}: {:#?}", p.diagnostics);
        let d = &p.diagnostics[0];
        assert!(d.suggestion.is_none(), "{src}: {d:#?}");
        assert!(
            !d.help.as_deref().unwrap_or("").contains("did you mean"),
            "{src}: {d:#?}"
        );
    }
}

#[test]
fn a_byte_order_mark_is_skipped() {
    // Notepad's UTF-8 starts with U+FEFF: the first item was a syntax error
    // on an invisible character, and every use of it an unknown name.
    let p = parse("\u{feff}provider p { region us }\nmodel m { provider p kind chat }\n");
    assert!(p.diagnostics.is_empty(), "{:#?}", p.diagnostics);
    assert_eq!(p.ast.items.len(), 2);
}

#[test]
fn deeply_nested_conditions_are_an_error_not_a_stack_overflow() {
    // 500 parentheses (3000 in a release build) overflowed the main thread's
    // stack while building the tree: `check`, `lsp` and a reload aborted.
    for (open, close) in [("(", ")"), ("not ", "")] {
        let deep = |n: usize| {
            format!(
                "classify {{ chat when {}request.stream{} }}\n",
                open.repeat(n),
                close.repeat(n)
            )
        };
        let ok = parse(&deep(MAX_NESTING));
        assert!(ok.diagnostics.is_empty(), "{:#?}", ok.diagnostics);
        let p = std::thread::Builder::new()
            .stack_size(8 << 20)
            .spawn(move || parse(&deep(600)).diagnostics)
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(p[0].message.contains("nests more than 64 levels"), "{p:#?}");
    }
}

#[test]
fn a_missing_open_brace_is_reported_just_after_the_name() {
    // pest located these at the item's keyword (or at the property on the
    // next line) and asked for anything but the `{`.
    for (src, message, at) in [
        (
            "model gpt-4o\n  provider openai\n}\n",
            "expected `{` after `model gpt-4o`, found `provider`",
            12,
        ),
        (
            "route chat [ candidates [a] ]\n",
            "expected `{` after `route chat`, found `[`",
            10,
        ),
        (
            "route chat when request.stream // why\n[ candidates [a] ]\n",
            "expected `{` after the condition of `route chat`, found `[`",
            30,
        ),
        (
            "constraints\n  deny model a\n}\n",
            "expected `{` after `constraints`, found `deny`",
            11,
        ),
        (
            "model x",
            "expected `{` after `model x`, found end of file",
            7,
        ),
        (
            "model x\nmodel y { provider p kind chat }\n",
            "expected `{` after `model x`, found the next item, `model`",
            7,
        ),
    ] {
        let p = parse(src);
        assert_eq!(p.diagnostics.len(), 1, "{src}: {:#?}", p.diagnostics);
        let d = &p.diagnostics[0];
        assert_eq!(d.message, message, "{src}");
        assert_eq!(
            d.span().map(|s| (s.start(), s.end())),
            Some((at, at)),
            "{src}"
        );
        assert!(
            d.help.as_deref().is_some_and(|h| h.contains("{ .. }")),
            "{d:#?}"
        );
    }
    // The `{` is there, or the error lies further in: pest's own error.
    for src in [
        "route chat when request.stream and {\n",
        "route chat when {\n",
        "model x { kind }\n",
        "model { kind chat }\n",
    ] {
        let p = parse(src);
        assert_eq!(p.diagnostics.len(), 1, "{src}: {:#?}", p.diagnostics);
        assert!(
            !p.diagnostics[0].message.starts_with("expected `{` after"),
            "{src}: {:#?}",
            p.diagnostics
        );
    }
}

#[test]
fn an_indented_item_after_a_broken_one_is_still_read() {
    // The recovery skipped to the next item in column 0 only: `  model b {`
    // vanished with the broken item before it.
    let src = "model a {\n  provider p\n  price in $1 out\n}\n  model b { provider p kind chat }\n\troute chat when request.stream { candidates [b] }\n  provider q { region us }\n";
    let p = parse(src);
    assert_eq!(p.diagnostics.len(), 1, "{:#?}", p.diagnostics);
    let names: Vec<String> = p
        .ast
        .items
        .iter()
        .map(|i| match i {
            Item::Model(m) => m.name.name.clone(),
            Item::Provider(p) => p.name.name.clone(),
            Item::Route(r) => r.intent.name.clone(),
            _ => String::new(),
        })
        .collect();
    assert_eq!(names, ["b", "chat", "q"]);
    // A property that names a provider is not an item: the broken model's
    // `  provider p` line stays in it, and its error is about the model.
    let p = parse("model a {\n  provider p\n  kind\n}\nprovider p { region us }\n");
    assert_eq!(p.diagnostics.len(), 1, "{:#?}", p.diagnostics);
    assert_eq!(p.ast.items.len(), 1);
}

#[test]
fn an_item_nested_in_a_block_is_one_error() {
    let src = "provider p {\n  region us\n  model m { provider p kind chat }\n}\nmodel n { provider p kind chat }\n";
    let p = parse(src);
    assert_eq!(p.diagnostics.len(), 1, "{:#?}", p.diagnostics);
    let d = &p.diagnostics[0];
    assert_eq!(
        d.message,
        "expected a provider property (`region`, `labels`) or `}`, found the next item, `model`"
    );
    // On the nested item's keyword, not on its indentation.
    let at = src.find("model m").unwrap();
    assert_eq!(d.span().map(|s| (s.start(), s.end())), Some((at, at + 5)));
    assert_eq!(p.ast.items.len(), 2);
    // A `}` with no unclosed item before it is still an error.
    assert_eq!(parse("provider p { region us }\n}\n").diagnostics.len(), 1);
}

#[test]
fn a_comment_ends_at_a_lone_carriage_return() {
    // In an old Mac file (lines end in a lone `\r`), the first comment ran
    // to the end of the file and hid every item.
    let src = "// top\rprovider p { region us } // why\rmodel m { provider p kind chat }\r";
    let p = parse(src);
    assert!(p.diagnostics.is_empty(), "{:#?}", p.diagnostics);
    assert_eq!(p.ast.items.len(), 2);
    let texts: Vec<_> = p.ast.comments.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(texts, ["// top", "// why"]);
}
