//! Streams through the real gateway on 127.0.0.1, against upstreams that
//! send their SSE bytes exactly as each test says: cut in the middle of an
//! event, usage the client did not ask for, keep-alives and role-only chunks
//! before a stall.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod gateway_common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_common::*;
use routeplane::budget::Budgets;
use routeplane::config::Config;
use routeplane::decision_log::{DecisionLog, Sink};
use routeplane::gateway::{FixedPolicy, Gateway, Options};
use routeplane::metrics::Metrics;
use routeplane::state::BudgetStore;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A budget on every tenant, so every stream settles into the ledger.
const BUDGET: &str = "protect { budget monthly per tenant $100 { block at 100% } }";

/// A gateway as `serve` runs it: budgets (memory store), metrics and a
/// decision log, over one `openai`-kind provider per upstream.
struct Observed {
    gw: Gw,
    store: Arc<dyn BudgetStore>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

async fn observed(providers: &[(&str, &str)], models: &[(&str, &str)], extra: &str) -> Observed {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{}state: {{ backend: memory }}\n", config(providers));
    let cfg = Config::parse("test.yaml", &text, Path::new("."), &|_| {
        Some("test-key".into())
    })
    .unwrap();
    let store = routeplane::state::open(&cfg.state).unwrap();
    let metrics = Arc::new(Metrics::new());
    let log = dir.path().join("decisions.jsonl");
    let (decision_log, _writer) =
        DecisionLog::start(Sink::File(log.clone()), 64, Some(metrics.clone())).unwrap();
    let opts = Options {
        metrics: Some(metrics),
        decision_log: Some(decision_log),
        budgets: Some(Arc::new(Budgets::new(store.clone()))),
    };
    let policy = policy(models, &format!("{BUDGET}\n{extra}"));
    let gw = Gateway::new(cfg, Arc::new(FixedPolicy::new(policy)), opts).unwrap();
    Observed {
        gw: serve_gateway(gw).await,
        store,
        log,
        _dir: dir,
    }
}

impl Observed {
    /// The decision log's record of `decision`, once written.
    async fn decision(&self, decision: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let found = text
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| v["decision_id"] == decision);
            if let Some(v) = found {
                return v;
            }
            assert!(Instant::now() < deadline, "{decision} not logged: {text}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The ledger once it holds `n` entries.
    async fn ledger(&self, n: usize) -> Vec<routeplane::state::LedgerEntry> {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let ledger = self.store.ledger(None).unwrap();
            if ledger.len() >= n {
                return ledger;
            }
            assert!(Instant::now() < deadline, "{ledger:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn hello_stream() -> Value {
    json!({ "model": "auto", "stream": true, "messages": [{ "role": "user", "content": "hi" }] })
}

fn content_chunk(text: &str) -> String {
    let c = json!({ "id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
        "choices": [{ "index": 0, "delta": { "content": text }, "finish_reason": null }] });
    format!("data: {c}\n\n")
}

/// Each piece as one HTTP chunk, flushed, with a short pause between them
/// so the gateway reads them one by one.
async fn send_pieces(sock: &mut TcpStream, pieces: &[String]) {
    let head =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    sock.write_all(head.as_bytes()).await.unwrap();
    for p in pieces {
        let chunk = format!("{:x}\r\n{p}\r\n", p.len());
        if sock.write_all(chunk.as_bytes()).await.is_err() {
            return;
        }
        let _ = sock.flush().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The events of an SSE body, split at blank lines; the body must end with one.
fn whole_events(body: &str) -> Vec<&str> {
    assert!(
        body.ends_with("\n\n"),
        "the body ends inside an event: {body:?}"
    );
    body.trim_end_matches('\n').split("\n\n").collect()
}

#[tokio::test]
async fn a_cut_in_the_middle_of_an_event_drops_the_half_event_before_the_error_event() {
    let url = socket_upstream(|mut sock| async move {
        let pieces = [
            content_chunk("hello "),
            content_chunk("from "),
            "data: {\"trunc".to_string(),
        ];
        send_pieces(&mut sock, &pieces).await;
        // Vanish without the terminating chunk.
    })
    .await;
    let gw = gateway(&config(&[("pa", &url)]), policy(&[("model-a", "pa")], "")).await;
    let r = gw.chat("sk-demo", hello_stream()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    let events = whole_events(&body);
    assert_eq!(events.len(), 3, "{body}");
    for e in &events {
        let data = e.strip_prefix("data: ").unwrap();
        let _: Value = serde_json::from_str(data).unwrap_or_else(|_| panic!("{e:?} in {body}"));
    }
    let last: Value = serde_json::from_str(events[2].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "reset", "{last}");
    assert!(!body.contains("trunc"), "{body}");
}

/// A chunk with no choices and the usage: what `include_usage` asks for.
fn usage_only_chunk(prompt: u64, completion: u64) -> String {
    let c = json!({ "id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
        "usage": { "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion } });
    format!("data: {c}\n\n")
}

fn is_usage_only(data: &str) -> bool {
    serde_json::from_str::<Value>(data)
        .is_ok_and(|v| v["choices"].as_array().is_some_and(Vec::is_empty) && v["usage"].is_object())
}

#[tokio::test]
async fn the_usage_chunk_the_gateway_asked_for_reaches_only_a_client_that_asked() {
    // As OpenAI does: the usage chunk only when the request asks for it.
    let up = raw_upstream(|req| {
        let mut events = content_chunk("hello");
        if req["stream_options"]["include_usage"] == true {
            events.push_str(&usage_only_chunk(11, 7));
        }
        events.push_str("data: [DONE]\n\n");
        http_sse(&events)
    })
    .await;
    let o = observed(&[("pa", &up.url)], &[("model-a", "pa")], "").await;
    let cases = [
        (None, false),
        (Some(json!({ "include_usage": false })), false),
        (Some(json!({ "include_usage": true })), true),
    ];
    for (i, (options, asked)) in cases.into_iter().enumerate() {
        let mut body = hello_stream();
        if let Some(options) = &options {
            body["stream_options"] = options.clone();
        }
        let r = o.gw.chat("sk-demo", body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let decision = header(&r, "x-routeplane-decision");
        let text = r.text().await.unwrap();
        let data = sse_data(&text);
        let usage_chunks = data.iter().filter(|d| is_usage_only(d)).count();
        assert_eq!(usage_chunks, usize::from(asked), "{options:?}: {text}");
        assert_eq!(data.last().unwrap(), "[DONE]", "{text}");
        assert!(data.iter().any(|d| d.contains("hello")), "{text}");
        // The gateway still asked upstream, and settled from the usage.
        assert_eq!(
            up.bodies.lock().unwrap()[i]["stream_options"]["include_usage"],
            true
        );
        let ledger = o.ledger(i + 1).await;
        let entry = ledger.iter().find(|e| e.id.contains(&decision)).unwrap();
        assert_eq!(
            (entry.input_tokens, entry.output_tokens),
            (11, 7),
            "{ledger:?}"
        );
        let logged = o.decision(&decision).await;
        assert_eq!(logged["output_tokens"], 7, "{logged}");
        assert_eq!(logged["input_tokens"], 11, "{logged}");
    }
}

fn role_chunk() -> String {
    let c = json!({ "id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
        "choices": [{ "index": 0, "delta": { "role": "assistant", "content": "" }, "finish_reason": null }] });
    format!("data: {c}\n\n")
}

/// An upstream that sends `before` (a keep-alive, a role chunk) and stalls.
async fn stalls_after(before: String) -> String {
    socket_upstream(move |mut sock| {
        let before = before.clone();
        async move {
            send_pieces(&mut sock, &[before]).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    })
    .await
}

/// `a` stalls after `before`; the first-token timeout must move on to `b`
/// with nothing of `a` sent to the client.
async fn falls_back_past(before: String) {
    let a = stalls_after(before.clone()).await;
    let b = upstream("b", |_| Act::Ok).await;
    let gw = gateway(
        &config(&[("pa", &a), ("pb", &b.url)]),
        policy(
            &[("model-a", "pa"), ("model-b", "pb")],
            "protect { timeout first_token 300ms total 3s }",
        ),
    )
    .await;
    let t0 = Instant::now();
    let r = gw.chat("sk-demo", hello_stream()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-routeplane-model"), "model-b", "{before:?}");
    let body = r.text().await.unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t0.elapsed()
    );
    assert!(!body.contains(before.trim_end()), "{body}");
    assert!(!body.contains("error"), "{body}");
    assert_eq!(sse_data(&body).last().unwrap(), "[DONE]", "{body}");
    assert_eq!(b.hits(), 1);
}

#[tokio::test]
async fn a_keep_alive_then_a_stall_falls_back_within_the_first_token_timeout() {
    falls_back_past(": keep-alive\n\n".to_string()).await;
}

#[tokio::test]
async fn a_role_chunk_then_a_stall_falls_back_within_the_first_token_timeout() {
    falls_back_past(role_chunk()).await;
}

#[tokio::test]
async fn a_role_chunk_then_content_reaches_the_client_in_order() {
    let url = socket_upstream(|mut sock| async move {
        let pieces = [
            ": keep-alive\n\n".to_string(),
            role_chunk(),
            content_chunk("hello"),
            "data: [DONE]\n\n".to_string(),
        ];
        send_pieces(&mut sock, &pieces).await;
        let _ = sock.write_all(b"0\r\n\r\n").await;
    })
    .await;
    let gw = gateway(
        &config(&[("pa", &url)]),
        policy(
            &[("model-a", "pa")],
            "protect { timeout first_token 2s total 5s }",
        ),
    )
    .await;
    let r = gw.chat("sk-demo", hello_stream()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    let expect = format!(
        ": keep-alive\n\n{}{}data: [DONE]\n\n",
        role_chunk(),
        content_chunk("hello")
    );
    assert_eq!(body, expect);
}

impl Observed {
    async fn metrics(&self) -> String {
        let r = self
            .gw
            .client
            .get(format!("{}/metrics", self.gw.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    }
}

/// `upstream` fails after two chunks reached the client; `/metrics` must
/// count a provider error with `code`, and the request as the 200 the client got.
async fn a_failure_after_the_first_token_is_counted(upstream_url: &str, extra: &str, code: &str) {
    let o = observed(&[("pa", upstream_url)], &[("model-a", "pa")], extra).await;
    let r = o.gw.chat("sk-demo", hello_stream()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let decision = header(&r, "x-routeplane-decision");
    let body = r.text().await.unwrap();
    assert!(body.contains(&format!("\"code\":\"{code}\"")), "{body}");
    let logged = o.decision(&decision).await;
    let last = logged["attempts"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["outcome"], "stream_cut", "{logged}");
    let metrics = o.metrics().await;
    let error = format!(
        "routeplane_provider_errors_total{{model=\"model-a\",provider=\"pa\",code=\"{code}\"}} 1"
    );
    assert!(
        metrics.lines().any(|l| l == error),
        "no `{error}` in\n{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("routeplane_requests_total{")
                && l.contains("model=\"model-a\"")
                && l.ends_with("status=\"200\"} 1")),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_stream_cut_after_the_first_token_is_a_provider_error_in_metrics() {
    let a = upstream("a", |_| Act::CutAfter(2)).await;
    a_failure_after_the_first_token_is_counted(&a.url, "", "reset").await;
}

#[tokio::test]
async fn a_stream_timed_out_after_the_first_token_is_a_provider_error_in_metrics() {
    let a = stalls_after(content_chunk("hello")).await;
    let protect = "protect { timeout total 300ms }";
    a_failure_after_the_first_token_is_counted(&a, protect, "timeout").await;
}
