//! Protocol tests: drive `routeplane lsp` over stdio with JSON-RPC.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::string_slice
)]

mod lsp_support;

use lsp_support::{pos_of, uri, Client};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_routeplane");

const CATALOGUE: &str = "provider openai { region us }\n\
model gpt-4o-mini {\n  provider openai\n  kind chat\n  price in $0.15 out $0.60 per 1M\n}\n\
model gpt-4o {\n  provider openai\n  kind chat\n}\n";

const ROUTING: &str = "tenant {\n  plan: enum(free, pro)\n}\n\
classify {\n  chat otherwise\n}\n\
route chat {\n  candidates [gpt-4o-mini, gpt-4o]\n  fallback [gpt-4o-mini]\n}\n\
constraints {\n  allow only [gpt-4o-mini] when tenant.plan == free\n}\n";

fn policy_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("catalogue.route"), CATALOGUE).unwrap();
    std::fs::write(dir.path().join("routing.route"), ROUTING).unwrap();
    dir
}

#[test]
fn syntax_errors_arrive_as_diagnostics_and_clear_when_fixed() {
    let dir = policy_dir();
    let path = dir.path().join("routing.route");
    let u = uri(&path);
    let mut c = Client::start(BIN);
    let broken = ROUTING.replace("candidates", "candidats");
    c.open(&u, &broken);
    let diags = c.diagnostics_for(&u);
    let syntax: Vec<_> = diags
        .iter()
        .filter(|d| d["code"] == "route::syntax")
        .collect();
    assert_eq!(syntax.len(), 1, "{diags:#?}");
    assert_eq!(syntax[0]["range"]["start"], pos_of(&broken, "candidats"));
    assert_eq!(syntax[0]["severity"], 1);
    assert!(syntax[0]["message"]
        .as_str()
        .unwrap()
        .contains("did you mean `candidates`?"));

    c.change(&u, 2, ROUTING);
    let diags = c.diagnostics_for(&u);
    assert!(
        diags.iter().all(|d| d["code"] != "route::syntax"),
        "{diags:#?}"
    );
    c.shutdown();
}

#[test]
fn navigation_works_across_files() {
    let dir = policy_dir();
    let routing = dir.path().join("routing.route");
    let catalogue = dir.path().join("catalogue.route");
    let (ru, cu) = (uri(&routing), uri(&catalogue));
    let mut c = Client::start(BIN);
    c.open(&ru, ROUTING);
    let _ = c.diagnostics_for(&ru);

    // Definition of a candidate is in the other file.
    let at = pos_of(ROUTING, "gpt-4o-mini, gpt-4o]");
    let def = c.request(
        "textDocument/definition",
        json!({"textDocument": {"uri": ru}, "position": at}),
    );
    assert_eq!(def["result"]["uri"], cu, "{def}");
    assert_eq!(
        def["result"]["range"]["start"],
        pos_of(CATALOGUE, "gpt-4o-mini {")
    );

    // References: the declaration, two in the route, one in the constraint.
    let refs = c.request(
        "textDocument/references",
        json!({"textDocument": {"uri": ru}, "position": at, "context": {"includeDeclaration": true}}),
    );
    assert_eq!(refs["result"].as_array().unwrap().len(), 4, "{refs}");

    // Rename edits both files.
    let ren = c.request(
        "textDocument/rename",
        json!({"textDocument": {"uri": ru}, "position": at, "newName": "mini"}),
    );
    let changes = ren["result"]["changes"].as_object().unwrap();
    assert_eq!(changes.len(), 2, "{ren}");
    assert_eq!(changes[&ru].as_array().unwrap().len(), 3);
    assert_eq!(changes[&cu].as_array().unwrap().len(), 1);
    let bad = c.request(
        "textDocument/rename",
        json!({"textDocument": {"uri": ru}, "position": at, "newName": "not a name"}),
    );
    assert!(bad["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not a valid name"));

    // Hover on a model shows the catalogue entry.
    let hover = c.request(
        "textDocument/hover",
        json!({"textDocument": {"uri": ru}, "position": at}),
    );
    let text = hover["result"]["contents"]["value"].as_str().unwrap();
    assert!(
        text.contains("model") && text.contains("gpt-4o-mini"),
        "{text}"
    );

    // Hover on an attribute and on a keyword.
    let hover = c.request(
        "textDocument/hover",
        json!({"textDocument": {"uri": ru}, "position": pos_of(ROUTING, "plan ==")}),
    );
    assert!(
        hover["result"]["contents"]["value"]
            .as_str()
            .unwrap()
            .contains("tenant attribute"),
        "{hover}"
    );
    let hover = c.request(
        "textDocument/hover",
        json!({"textDocument": {"uri": ru}, "position": pos_of(ROUTING, "classify")}),
    );
    assert!(
        hover["result"]["contents"]["value"]
            .as_str()
            .unwrap()
            .contains("first match wins"),
        "{hover}"
    );

    // The outline.
    let syms = c.request(
        "textDocument/documentSymbol",
        json!({"textDocument": {"uri": ru}}),
    );
    let names: Vec<&str> = syms["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tenant", "classify", "route chat", "constraints"]);
    c.shutdown();
}

#[test]
fn completion_offers_what_fits_the_cursor() {
    let dir = policy_dir();
    let path = dir.path().join("routing.route");
    let u = uri(&path);
    let mut c = Client::start(BIN);
    c.open(&u, ROUTING);
    let _ = c.diagnostics_for(&u);
    let complete = |c: &mut Client, text: &str, version: i64| -> Vec<String> {
        c.change(&u, version, text);
        let end = text.len();
        let before = &text[..end];
        let line = before.matches('\n').count();
        let col = before.rsplit('\n').next().unwrap().encode_utf16().count();
        let r = c.request(
            "textDocument/completion",
            json!({"textDocument": {"uri": u}, "position": {"line": line, "character": col}}),
        );
        r["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["label"].as_str().unwrap().to_string())
            .collect()
    };
    let labels = complete(&mut c, &format!("{ROUTING}route chat when tenant."), 2);
    assert!(labels.contains(&"plan".to_string()), "{labels:?}");
    let labels = complete(
        &mut c,
        &format!("{ROUTING}route chat when tenant.plan == "),
        3,
    );
    assert_eq!(labels, ["free", "pro"]);
    let labels = complete(
        &mut c,
        &format!("{ROUTING}route chat {{\n  candidates [gpt"),
        4,
    );
    assert!(labels.contains(&"gpt-4o-mini".to_string()), "{labels:?}");
    let labels = complete(&mut c, &format!("{ROUTING}route chat {{\n  "), 5);
    assert!(
        labels.contains(&"candidates".to_string()) && labels.contains(&"fallback".to_string()),
        "{labels:?}"
    );
    let labels = complete(&mut c, &format!("{ROUTING}\n"), 6);
    assert!(
        labels.contains(&"model".to_string()) && labels.contains(&"protect".to_string()),
        "{labels:?}"
    );
    c.shutdown();
}

#[test]
fn half_typed_input_and_unknown_requests_never_stop_the_server() {
    let dir = policy_dir();
    let path = dir.path().join("routing.route");
    let u = uri(&path);
    let mut c = Client::start(BIN);
    c.open(&u, ROUTING);
    let _ = c.diagnostics_for(&u);
    let junk = [
        "route chat {",
        "}}}}",
        "model \"\u{0}",
        "constraints { deny models where model.",
        "é😀",
        "protect { budget monthly per",
    ];
    for (i, text) in junk.iter().enumerate() {
        c.change(&u, 10 + i as i64, text);
        let _ = c.diagnostics_for(&u);
        for method in [
            "textDocument/hover",
            "textDocument/completion",
            "textDocument/definition",
        ] {
            let r = c.request(
                method,
                json!({"textDocument": {"uri": u}, "position": {"line": 0, "character": 3}}),
            );
            assert!(
                r.get("error").is_none() || r["error"]["code"] != -32603,
                "{method} on {text:?}: {r}"
            );
        }
        let r = c.request(
            "textDocument/documentSymbol",
            json!({"textDocument": {"uri": u}}),
        );
        assert!(r.get("error").is_none(), "{r}");
    }
    // Positions far outside the document are clamped.
    let r = c.request(
        "textDocument/hover",
        json!({"textDocument": {"uri": u}, "position": {"line": 9999, "character": 9999}}),
    );
    assert!(r.get("error").is_none(), "{r}");
    // An unknown method is an error answer, and the server goes on.
    let r = c.request("routeplane/unknown", json!({}));
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not supported"));
    let r = c.request(
        "textDocument/documentSymbol",
        json!({"textDocument": {"uri": u}}),
    );
    assert!(r.get("error").is_none());
    c.shutdown();
}

#[test]
fn formatting_matches_routeplane_fmt_and_refuses_broken_files() {
    let dir = policy_dir();
    let path = dir.path().join("routing.route");
    let u = uri(&path);
    let mut c = Client::start(BIN);
    let messy = "classify {   chat    otherwise }\nroute chat{candidates [gpt-4o-mini,gpt-4o]  fallback [gpt-4o-mini]}\n";
    c.open(&u, messy);
    let _ = c.diagnostics_for(&u);
    let r = c.request(
        "textDocument/formatting",
        json!({"textDocument": {"uri": u}, "options": {"tabSize": 2, "insertSpaces": true}}),
    );
    let edits = r["result"].as_array().unwrap();
    assert_eq!(edits.len(), 1, "{r}");
    let expected = routeplane::fmt::format_source(routeplane::source::FileId(0), messy).unwrap();
    assert_eq!(edits[0]["newText"], expected);
    c.change(&u, 2, "route chat {");
    let _ = c.diagnostics_for(&u);
    let r = c.request(
        "textDocument/formatting",
        json!({"textDocument": {"uri": u}, "options": {"tabSize": 2, "insertSpaces": true}}),
    );
    assert!(
        r["result"].is_null(),
        "a broken file must not be formatted: {r}"
    );
    c.shutdown();
}
