//! Secrets never leak: after a full run of the real binary (good requests,
//! streams, auth failures, denials, upstream errors, admin and metrics), no
//! provider key, tenant key or admin token appears in the logs, the decision
//! log, the metrics or any response the clients saw.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/binary.rs"]
mod binary;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use binary::Server;

const PROVIDER_KEY: &str = "sk-provider-SECRET-7f3a9c";
const TENANT_KEY: &str = "sk-tenant-SECRET-41b2e8";
const ADMIN_TOKEN: &str = "admin-SECRET-d00d1e";

/// An OpenAI-compatible upstream on 127.0.0.1 that requires the provider key
/// and fails every third request with a 500.
fn upstream() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let authorized = Arc::new(AtomicUsize::new(0));
    let seen = authorized.clone();
    std::thread::spawn(move || {
        let mut n = 0usize;
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            n += 1;
            let mut reader = BufReader::new(s.try_clone().unwrap());
            let mut len = 0usize;
            let mut auth_ok = false;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if line.trim_end() == format!("authorization: Bearer {PROVIDER_KEY}")
                    || line.trim_end() == format!("Authorization: Bearer {PROVIDER_KEY}")
                {
                    auth_ok = true;
                }
            }
            let mut body = vec![0; len];
            let _ = reader.read_exact(&mut body);
            let (status, payload) = if !auth_ok {
                (
                    401,
                    r#"{"error":{"message":"bad key","type":"auth"}}"#.to_string(),
                )
            } else if n % 3 == 0 {
                seen.fetch_add(1, Ordering::SeqCst);
                (
                    500,
                    r#"{"error":{"message":"upstream exploded","type":"server_error"}}"#
                        .to_string(),
                )
            } else {
                seen.fetch_add(1, Ordering::SeqCst);
                (200, r#"{"id":"x","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#.to_string())
            };
            let _ = write!(s, "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{payload}", payload.len());
        }
    });
    (url, authorized)
}

fn request(addr: &str, method: &str, path: &str, auth: &str, body: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn no_secret_appears_anywhere_after_a_full_run() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream_url, authorized) = upstream();
    std::fs::write(
        dir.path().join("policy.route"),
        "tenant {\n  plan: enum(free, pro) = pro\n}\n\nprovider vendor {\n  region us\n}\n\n\
         model chat-a {\n  provider vendor\n  kind chat\n  price in $1 out $2 per 1M\n}\n\n\
         model chat-b {\n  provider vendor\n  kind chat\n  price in $2 out $4 per 1M\n}\n\n\
         constraints {\n  free_plan: allow only [chat-a] when tenant.plan == free\n}\n\n\
         classify {\n  chat otherwise\n}\n\n\
         route chat {\n  candidates [chat-a, chat-b]\n  fallback [chat-b]\n}\n\n\
         protect {\n  retry 1 on [5xx] backoff 1ms..5ms\n}\n",
    )
    .unwrap();
    let log_path = dir.path().join("decisions.jsonl");
    std::fs::write(
        dir.path().join("gateway.yaml"),
        format!(
            "listen: 127.0.0.1:0\npolicy: .\ndecision_log: decisions.jsonl\nproviders:\n  - name: vendor\n    kind: openai\n    base_url: {upstream_url}\n    api_key_env: TEST_PROVIDER_KEY\n\
             tenants:\n  - id: acme\n    key: {TENANT_KEY}\n    attrs: {{ plan: pro }}\n  - id: cheap\n    key: {TENANT_KEY}-free\n    attrs: {{ plan: free }}\n\
             admin:\n  token_env: TEST_ADMIN_TOKEN\n"
        ),
    )
    .unwrap();
    let server = Server::start(
        dir.path(),
        &dir.path().join("gateway.yaml"),
        &["--no-watch"],
        &[
            ("TEST_PROVIDER_KEY", PROVIDER_KEY),
            ("TEST_ADMIN_TOKEN", ADMIN_TOKEN),
            ("ROUTEPLANE_LOG", "debug"),
        ],
    );
    let addr = server.addr.clone();

    let chat = r#"{"model":"auto","messages":[{"role":"user","content":"hello"}]}"#;
    let mut seen = String::new();
    for _ in 0..6 {
        seen += &request(&addr, "POST", "/v1/chat/completions", TENANT_KEY, chat);
    }
    seen += &request(
        &addr,
        "POST",
        "/v1/chat/completions",
        TENANT_KEY,
        r#"{"model":"auto","stream":true,"messages":[{"role":"user","content":"hello"}]}"#,
    );
    let denied = request(
        &addr,
        "POST",
        "/v1/chat/completions",
        &format!("{TENANT_KEY}-free"),
        r#"{"model":"chat-b","messages":[{"role":"user","content":"hello"}]}"#,
    );
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    // A denial names its line in the decision log, like any answer.
    let denial_id = denied
        .lines()
        .find_map(|l| l.strip_prefix("x-routeplane-decision: "))
        .unwrap_or_else(|| panic!("no decision id on the denial:\n{denied}"))
        .trim()
        .to_string();
    seen += &denied;
    seen += &request(&addr, "POST", "/v1/chat/completions", "sk-wrong", chat);
    seen += &request(
        &addr,
        "POST",
        "/v1/chat/completions",
        &format!("{TENANT_KEY}x"),
        chat,
    );
    seen += &request(
        &addr,
        "POST",
        "/v1/chat/completions",
        TENANT_KEY,
        r#"{"model":"nope","messages":[{"role":"user","content":"hello"}]}"#,
    );
    seen += &request(&addr, "POST", "/v1/chat/completions", TENANT_KEY, "{broken");
    seen += &request(&addr, "GET", "/v1/models", TENANT_KEY, "");
    seen += &request(&addr, "GET", "/admin/policy", ADMIN_TOKEN, "");
    seen += &request(&addr, "GET", "/admin/policy", "wrong", "");
    let metrics = request(&addr, "GET", "/metrics", ADMIN_TOKEN, "");
    assert!(metrics.contains("200 OK"), "{metrics}");
    seen += &metrics;

    assert!(
        authorized.load(Ordering::SeqCst) >= 4,
        "the upstream never saw the provider key"
    );
    assert!(seen.contains("\"ok\""), "no good answer came back:\n{seen}");
    // A clean stop flushes the decision log and the ledger.
    let mut server = server;
    let stopped = server.stop(Duration::from_secs(10));
    assert!(
        stopped.is_some_and(|s| s.success()),
        "no clean stop: {stopped:?}\n{}",
        server.log()
    );
    let mut stdout = String::new();
    let _ = server
        .child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout);
    let decisions = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        decisions.lines().count() >= 6,
        "the decision log is missing lines:\n{decisions}"
    );
    assert!(
        decisions
            .lines()
            .any(|l| l.contains(&format!("\"decision_id\":\"{denial_id}\""))
                && l.contains("\"status\":403")),
        "the denial's id {denial_id} is not in the decision log:\n{decisions}"
    );
    let log = server.log();

    for (what, text) in [
        ("responses", &seen),
        ("logs", &log),
        ("stdout", &stdout),
        ("decision log", &decisions),
    ] {
        for secret in [PROVIDER_KEY, TENANT_KEY, ADMIN_TOKEN] {
            assert!(
                !text.contains(secret),
                "`{secret}` leaked into the {what}:\n{text}"
            );
        }
    }
}
