//! Hostile input against the real binary: well over 100 bad requests, sent as
//! raw bytes so nothing is sanitised by a client library. Each must get a clear
//! 4xx (an OpenAI-style JSON error wherever the gateway answers, not hyper), the
//! server must never panic, and it must keep serving good requests throughout.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/binary.rs"]
mod binary;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use binary::Server;

fn start() -> Server {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    Server::start(
        root,
        std::path::Path::new("examples/gateway.yaml"),
        &["--listen", "127.0.0.1:0", "--no-watch"],
        &[],
    )
}

/// Send raw bytes, return (status, body). A closed connection without an answer is status 0.
fn raw(addr: &str, bytes: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn post(path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n{headers}\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

const AUTH: &str = "Authorization: Bearer sk-demo\r\nContent-Type: application/json\r\n";
const CHAT: &str = "/v1/chat/completions";

/// The bad requests: (name, raw request).
fn cases() -> Vec<(String, Vec<u8>)> {
    let mut c: Vec<(String, Vec<u8>)> = Vec::new();
    let good = br#"{"model":"auto","messages":[{"role":"user","content":"hi"}]}"#;
    // Authentication.
    for (name, h) in [
        (
            "no auth header",
            "Content-Type: application/json\r\n".to_string(),
        ),
        ("bearer without key", "Authorization: Bearer\r\n".into()),
        ("bearer empty key", "Authorization: Bearer \r\n".into()),
        ("wrong key", "Authorization: Bearer sk-wrong\r\n".into()),
        ("key prefix only", "Authorization: Bearer sk-dem\r\n".into()),
        (
            "key with suffix",
            "Authorization: Bearer sk-demo2\r\n".into(),
        ),
        ("basic auth", "Authorization: Basic c2stZGVtbzo=\r\n".into()),
        (
            "lowercase scheme and wrong key",
            "Authorization: bearer nope\r\n".into(),
        ),
        (
            "huge key",
            format!("Authorization: Bearer {}\r\n", "k".repeat(16_000)),
        ),
        (
            "non-ascii key",
            "Authorization: Bearer sk-d\u{e9}mo\r\n".into(),
        ),
        (
            "admin token as tenant key",
            "Authorization: Bearer admin-demo\r\n".into(),
        ),
        (
            "two auth headers, first wrong",
            "Authorization: Bearer nope\r\nAuthorization: Bearer sk-demo\r\n".into(),
        ),
    ] {
        c.push((format!("auth: {name}"), post(CHAT, &h, good)));
    }
    // Malformed JSON.
    for body in [
        "",
        "{",
        "}",
        "[",
        "[]",
        "null",
        "true",
        "123",
        "\"text\"",
        "{\"model\":}",
        "{\"model\":\"auto\",}",
        "{\"model\":\"auto\"} trailing",
        "{'model':'auto'}",
        "{\"model\":\"auto\",\"messages\":[}",
        "\u{feff}{}",
        "{\"model\":\"auto\",\"messages\":[{\"role\":\"user\",\"content\":\"unterminated}]}",
        "{\"a\":1e99999}",
        "{\"model\":\"auto\"\"messages\":[]}",
        "NaN",
        "{\"model\":\"\\ud800\"}",
        // A key twice in one object (the second spelled with an escape).
        "{\"model\":\"auto\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"model\":\"x\"}",
        "{\"model\":\"auto\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"mod\\u0065l\":\"x\"}",
        "{\"stream\":false,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"stream\":true}",
        // A key twice deeper down: the upstream could read the other content.
        "{\"model\":\"auto\",\"messages\":[{\"role\":\"user\",\"content\":\"my ssn\",\"content\":\"hi\"}]}",
    ] {
        c.push((
            format!("malformed json: {body:?}"),
            post(CHAT, AUTH, body.as_bytes()),
        ));
    }
    // Wrong types and missing fields.
    for body in [
        r#"{"model":"auto"}"#,
        r#"{"model":"auto","messages":"hi"}"#,
        r#"{"model":"auto","messages":42}"#,
        r#"{"model":"auto","messages":{"role":"user"}}"#,
        r#"{"model":"auto","messages":[]}"#,
        r#"{"model":"auto","messages":[42]}"#,
        r#"{"model":"auto","messages":["hi"]}"#,
        r#"{"model":"auto","messages":[{"content":"hi"}]}"#,
        r#"{"model":"auto","messages":[{"role":"user"}]}"#,
        r#"{"model":"auto","messages":[{"role":7,"content":"hi"}]}"#,
        r#"{"model":"auto","messages":[{"role":"user","content":42}]}"#,
        r#"{"model":42,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":["a"],"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":{"x":1},"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":null,"messages":[{"role":"user","content":"hi"}],"stream":"yes"}"#,
        r#"{"model":"auto","messages":[{"role":"user","content":"hi"}],"stream":"yes"}"#,
        r#"{"model":"auto","messages":[{"role":"user","content":"hi"}],"stream":1}"#,
        r#"{"model":"auto","messages":[{"role":"user","content":"hi"}],"max_tokens":-1}"#,
        r#"{"model":"auto","messages":[{"role":"user","content":"hi"}],"max_tokens":"10"}"#,
        r#"{"model":"auto","messages":[{"role":"user","content":"hi"}],"max_tokens":1.5}"#,
        r#"{"model":"auto","messages":[{"role":"user","content":"hi"}],"max_tokens":1e30}"#,
        r#"{"model":"auto","messages":[{"role":"user","content":"hi"}],"response_format":"json"}"#,
        r#"{"model":"auto","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"xml"}}"#,
        r#"{"model":"auto","messages":[{"role":"user","content":"hi"}],"tools":"all"}"#,
        r#"{"model":"auto","messages":[{"role":"user","content":[{"type":"image_url"}]}],"tools":{}}"#,
        r#"{"model":"auto","messages":[{"role":"user","content":"hi"}],"metadata":"x"}"#,
        r#"{"model":"auto","messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":"yes"}}"#,
    ] {
        c.push((
            format!("wrong types: {body}"),
            post(CHAT, AUTH, body.as_bytes()),
        ));
    }
    // Unknown models and intents.
    for model in [
        "gpt-99",
        "",
        " ",
        "GPT-4O",
        "auto ",
        "../../etc/passwd",
        "http://169.254.169.254/",
        "a\u{0}b",
        &"m".repeat(5000),
    ] {
        let body =
            serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
                .to_string();
        c.push((
            format!("unknown model: {:.40}", model),
            post(CHAT, AUTH, body.as_bytes()),
        ));
    }
    // Size and nesting.
    let deep = format!(
        "{{\"model\":\"auto\",\"messages\":{}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    c.push((
        "deeply nested arrays".into(),
        post(CHAT, AUTH, deep.as_bytes()),
    ));
    let deep_obj = format!(
        "{{\"model\":\"auto\",\"x\":{}1{}}}",
        "{\"a\":".repeat(50_000),
        "}".repeat(50_000)
    );
    c.push((
        "deeply nested objects".into(),
        post(CHAT, AUTH, deep_obj.as_bytes()),
    ));
    let huge = format!(
        "{{\"model\":\"auto\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
        "a".repeat(40 << 20)
    );
    c.push(("40 MiB body".into(), post(CHAT, AUTH, huge.as_bytes())));
    c.push((
        "content-length larger than the limit, no body".into(),
        format!("POST {CHAT} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{AUTH}Content-Length: 999999999999\r\n\r\n").into_bytes(),
    ));
    c.push((
        "chunked body larger than the limit".into(),
        {
            let mut r = format!("POST {CHAT} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{AUTH}Transfer-Encoding: chunked\r\n\r\n").into_bytes();
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..40 {
                r.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                r.extend_from_slice(&chunk);
                r.extend_from_slice(b"\r\n");
            }
            r.extend_from_slice(b"0\r\n\r\n");
            r
        },
    ));
    // Invalid UTF-8.
    for bytes in [
        &b"\xff\xfe\xfd"[..],
        b"{\"model\":\"auto\",\"messages\":[{\"role\":\"user\",\"content\":\"\xc3\x28\"}]}",
        b"{\"model\":\"\xed\xa0\x80\"}",
        b"\x00\x00\x00\x00",
    ] {
        c.push((
            format!("invalid utf-8: {:?}", String::from_utf8_lossy(bytes)),
            post(CHAT, AUTH, bytes),
        ));
    }
    // Headers: oversized, injected, odd.
    c.push((
        "oversized header".into(),
        post(
            CHAT,
            &format!("{AUTH}X-Big: {}\r\n", "b".repeat(1 << 20)),
            good,
        ),
    ));
    c.push((
        "ten thousand headers".into(),
        post(
            CHAT,
            &format!("{AUTH}{}", "X-H: v\r\n".repeat(10_000)),
            good,
        ),
    ));
    c.push((
        "header without colon".into(),
        post(CHAT, &format!("{AUTH}NoColonHere\r\n"), good),
    ));
    c.push((
        "header injection in feature".into(),
        post(
            CHAT,
            &format!("{AUTH}X-Routeplane-Feature: a\rSet-Cookie: x=1\r\n"),
            good,
        ),
    ));
    c.push((
        "obs-fold header".into(),
        post(
            CHAT,
            &format!("{AUTH}X-Routeplane-Feature: a\r\n b\r\n"),
            good,
        ),
    ));
    c.push((
        "nul in header".into(),
        post(
            CHAT,
            &format!("{AUTH}X-Routeplane-Feature: a\u{0}b\r\n"),
            good,
        ),
    ));
    c.push((
        "control chars in feature".into(),
        post(
            CHAT,
            &format!("{AUTH}X-Routeplane-Feature: \u{1b}[31m\r\n"),
            good,
        ),
    ));
    c.push(("conflicting content-length".into(), format!("POST {CHAT} HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!").into_bytes()));
    c.push(("content-length and chunked".into(), format!("POST {CHAT} HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").into_bytes()));
    c.push((
        "negative content-length".into(),
        format!("POST {CHAT} HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: -1\r\n\r\n").into_bytes(),
    ));
    c.push(("garbage request line".into(), b"HELLO\r\n\r\n".to_vec()));
    c.push(("http/0.9".into(), b"GET /\r\n".to_vec()));
    c.push((
        "unsupported http version".into(),
        b"GET /v1/models HTTP/9.9\r\nHost: x\r\n\r\n".to_vec(),
    ));
    c.push(("upstream url in header".into(), post(CHAT, &format!("{AUTH}X-Upstream-Url: http://127.0.0.1:1/\r\nX-Routeplane-Base-Url: http://127.0.0.1:1/\r\n"), br#"{"model":"nope-model","messages":[{"role":"user","content":"hi"}]}"#)));
    // Paths and methods.
    for (method, path) in [
        ("GET", CHAT),
        ("PUT", CHAT),
        ("DELETE", "/v1/embeddings"),
        ("POST", "/v1/models"),
        ("POST", "/v1/unknown"),
        ("GET", "/v1/../etc/passwd"),
        ("GET", "/%2e%2e/%2e%2e/"),
        ("POST", "/v1/chat/completions/extra"),
        ("GET", "/admin/policy"),
        ("POST", "/admin/reload"),
        ("GET", "/admin/reload"),
        ("GET", "/admin/../v1/models"),
        ("PATCH", "/metrics"),
        ("GET", "//v1//models"),
    ] {
        c.push((format!("{method} {path}"), format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{AUTH}Content-Length: 0\r\n\r\n").into_bytes()));
    }
    // Admin with wrong tokens.
    for tok in ["", "wrong", "sk-demo", "admin-dem", "admin-demo2"] {
        c.push((format!("admin token {tok:?}"), format!("GET /admin/policy HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {tok}\r\n\r\n").into_bytes()));
        c.push((format!("admin reload token {tok:?}"), format!("POST /admin/reload HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {tok}\r\nContent-Length: 0\r\n\r\n").into_bytes()));
    }
    // Other endpoints with bad bodies.
    for (path, body) in [
        ("/v1/embeddings", "{}"),
        ("/v1/embeddings", r#"{"model":"auto","input":42}"#),
        ("/v1/embeddings", r#"{"model":"auto","input":{"a":1}}"#),
        ("/v1/embeddings", "not json"),
        ("/v1/images/generations", "{}"),
        ("/v1/images/generations", r#"{"prompt":42}"#),
        ("/v1/images/generations", "[1,2,3]"),
        ("/v1/audio/speech", "{}"),
        ("/v1/audio/speech", r#"{"input":["x"]}"#),
        ("/v1/audio/transcriptions", "not multipart"),
        ("/v1/audio/transcriptions", "{}"),
        ("/v1/embeddings", r#"{"model":"gpt-99","input":"x"}"#),
    ] {
        c.push((format!("{path}: {body}"), post(path, AUTH, body.as_bytes())));
    }
    // Budget confirmation header with odd values on a denied model.
    for v in ["yes please", "1\r\nX-Evil: 1", ""] {
        c.push((
            format!("confirm header {v:?}"),
            post(
                CHAT,
                &format!("{AUTH}X-Routeplane-Confirm: {v}\r\n"),
                br#"{"model":"gpt-99","messages":[{"role":"user","content":"hi"}]}"#,
            ),
        ));
    }
    // Routing headers and metadata that do not fit what the policy declares.
    let hi = br#"{"model":"auto","messages":[{"role":"user","content":"hi"}]}"#;
    for (name, headers) in [
        (
            "enum value with a typo",
            "X-Routeplane-Meta-Priority: hihg\r\n".to_string(),
        ),
        (
            "enum value in capitals",
            "X-Routeplane-Meta-Priority: HIGH\r\n".to_string(),
        ),
        (
            "feature tag of 4 KB",
            format!("X-Routeplane-Feature: {}\r\n", "f".repeat(4096)),
        ),
        (
            "confirm header `maybe`",
            "X-Routeplane-Confirm: maybe\r\n".to_string(),
        ),
        (
            "misspelt routing header",
            "X-Routeplane-Featur: search\r\n".to_string(),
        ),
        (
            "undeclared attribute header",
            "X-Routeplane-Meta-Priorty: low\r\n".to_string(),
        ),
        (
            "feature header twice",
            "X-Routeplane-Feature: a\r\nX-Routeplane-Feature: b\r\n".to_string(),
        ),
    ] {
        c.push((name.into(), post(CHAT, &format!("{AUTH}{headers}"), hi)));
    }
    let mut latin1 = post(CHAT, AUTH, hi);
    let at = latin1.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 2;
    latin1.splice(at..at, b"X-Routeplane-Feature: caf\xe9\r\n".iter().copied());
    c.push(("feature tag not ASCII".into(), latin1));
    c.push((
        "metadata enum value with a typo".into(),
        post(
            CHAT,
            AUTH,
            br#"{"model":"auto","metadata":{"priority":"hihg"},"messages":[{"role":"user","content":"hi"}]}"#,
        ),
    ));
    c
}

/// A value the policy would not recognise is refused with a message that
/// names the attribute, the value and what it accepts, not routed as if the
/// client had sent nothing.
#[test]
fn routing_values_that_do_not_fit_the_policy_are_refused_by_name() {
    let server = start();
    let hi = br#"{"model":"auto","messages":[{"role":"user","content":"hi"}]}"#;
    let ask = |headers: &str, body: &[u8]| {
        let (status, body) = raw(&server.addr, &post(CHAT, &format!("{AUTH}{headers}"), body));
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        (
            status,
            json["error"]["message"].as_str().unwrap_or("").to_string(),
        )
    };
    let (status, message) = ask("X-Routeplane-Meta-Priority: hihg\r\n", hi);
    assert_eq!(status, 400, "{message}");
    assert!(
        message.contains("`priority` is `hihg`")
            && message.contains("one of `low`, `normal`, `high`")
            && message.contains("x-routeplane-meta-priority"),
        "{message}"
    );
    let (status, message) = ask(
        "",
        br#"{"model":"auto","metadata":{"priority":"urgent"},"messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("`priority` is `urgent`"), "{message}");
    let (status, message) = ask("X-Routeplane-Confirm: maybe\r\n", hi);
    assert_eq!(status, 400, "{message}");
    assert!(
        message.contains("`x-routeplane-confirm` is `maybe`"),
        "{message}"
    );
    let (status, message) = ask(
        &format!("X-Routeplane-Feature: {}\r\n", "f".repeat(129)),
        hi,
    );
    assert_eq!(status, 400, "{message}");
    assert!(
        message.contains("129 bytes") && message.contains("128"),
        "{message}"
    );
    // A header naming an attribute the policy does not declare is a misspelling
    // until shown otherwise; the body's `metadata` is OpenAI's and may carry anything.
    let (status, message) = ask("X-Routeplane-Meta-Priorty: low\r\n", hi);
    assert_eq!(status, 400, "{message}");
    assert!(
        message.contains("does not declare: did you mean `x-routeplane-meta-priority`?"),
        "{message}"
    );
    let (status, message) = ask(
        "",
        br#"{"model":"auto","metadata":{"trace":"abc"},"messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(status, 200, "{message}");
    // What fits is served: a declared variant, a confirmation declined.
    for headers in [
        "X-Routeplane-Meta-Priority: high\r\n",
        "X-Routeplane-Confirm: no\r\n",
    ] {
        let (status, message) = ask(headers, hi);
        assert_eq!(status, 200, "{headers}: {message}");
    }
    let (status, message) = ask(
        &format!("X-Routeplane-Feature: {}\r\n", "f".repeat(128)),
        hi,
    );
    assert_eq!(status, 200, "{message}");
}

fn assert_serves(addr: &str) {
    let (status, body) = raw(
        addr,
        &post(
            CHAT,
            AUTH,
            br#"{"model":"auto","messages":[{"role":"user","content":"hi"}]}"#,
        ),
    );
    assert_eq!(
        status, 200,
        "the gateway stopped serving good requests: {body}"
    );
}

#[test]
fn every_bad_request_gets_a_clear_4xx_and_the_server_keeps_serving() {
    let server = start();
    let cases = cases();
    assert!(cases.len() >= 100, "only {} hostile cases", cases.len());
    let mut failures = Vec::new();
    for (i, (name, bytes)) in cases.iter().enumerate() {
        let (status, body) = raw(&server.addr, bytes);
        let json: Option<serde_json::Value> = serde_json::from_str(&body).ok();
        let message = json
            .as_ref()
            .and_then(|j| j["error"]["message"].as_str())
            .unwrap_or("");
        // hyper answers protocol errors itself (bare 400/431/505 or a closed
        // connection); everything the gateway answers is an OpenAI-style error.
        let protocol_level =
            status == 0 || (body.trim().is_empty() && matches!(status, 400 | 413 | 431 | 505));
        let ok = (400..500).contains(&status) && (protocol_level || !message.is_empty())
            || (status == 0 && protocol_level)
            || (status == 505 && protocol_level);
        if !ok {
            failures.push(format!("{name}: status {status}, body {:.200}", body));
        }
        if i % 20 == 0 {
            assert_serves(&server.addr);
        }
    }
    assert_serves(&server.addr);
    let log = server.log();
    assert!(!log.contains("panicked"), "the gateway panicked:\n{log}");
    assert!(
        failures.is_empty(),
        "{} of {} cases were not a clear 4xx:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
