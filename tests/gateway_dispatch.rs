//! The gateway against upstreams that misbehave on purpose.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod gateway_common;

use std::time::{Duration, Instant};

use gateway_common::*;
use serde_json::{json, Value};

fn hello() -> Value {
    json!({ "model": "auto", "messages": [{ "role": "user", "content": "hi" }] })
}

fn hello_stream() -> Value {
    json!({ "model": "auto", "stream": true, "messages": [{ "role": "user", "content": "hi" }] })
}

fn protect_retry(count: u32) -> String {
    format!("protect {{ retry {count} on [429, 5xx, timeout, reset] backoff 10ms..2s }}")
}

#[tokio::test]
async fn answers_with_routing_headers_and_the_upstream_body() {
    let a = upstream("a", |_| Act::Ok).await;
    let gw = gateway(&config(&[("pa", &a.url)]), policy(&[("model-a", "pa")], "")).await;
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-routeplane-model"), "model-a");
    assert_eq!(header(&r, "x-routeplane-provider"), "pa");
    assert_eq!(
        header(&r, "x-routeplane-policy"),
        gw.gw.runtime().policy.version()
    );
    assert_eq!(header(&r, "x-routeplane-intent"), "chat");
    assert_eq!(header(&r, "x-routeplane-attempts"), "1");
    assert!(!header(&r, "x-routeplane-decision").is_empty());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "hello from a");
    // Only `model` is rewritten; the upstream got the provider key, not the tenant's.
    let sent = a.bodies.lock().unwrap()[0].clone();
    assert_eq!(sent["model"], "model-a");
    assert_eq!(sent["messages"], hello()["messages"]);
}

#[tokio::test]
async fn the_upstream_gets_the_clients_bytes_with_only_the_model_replaced() {
    let a = upstream("a", |_| Act::Ok).await;
    let gw = gateway(&config(&[("pa", &a.url)]), policy(&[("model-a", "pa")], "")).await;
    // Key order, a seed above 2^64, a number's spelling and escapes: a JSON
    // tree written back out would change all four.
    let sent = r#"{"seed": 18446744073709551617, "model": "auto",
        "messages": [{"role": "user", "content": "caf\u00e9"}], "temperature": 1.0E0}"#;
    let r = gw.chat_raw("sk-demo", sent).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let got = String::from_utf8(a.raw_bodies.lock().unwrap()[0].clone()).unwrap();
    assert_eq!(got, sent.replace(r#""auto""#, r#""model-a""#));
}

#[tokio::test]
async fn a_second_model_field_is_refused_before_any_upstream() {
    let a = upstream("a", |_| Act::Ok).await;
    let gw = gateway(&config(&[("pa", &a.url)]), policy(&[("model-a", "pa")], "")).await;
    // An upstream that keeps the first `model` would serve a model the
    // gateway never decided on.
    let r = gw
        .chat_raw(
            "sk-demo",
            r#"{"model":"other","messages":[{"role":"user","content":"hi"}],"model":"auto"}"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("`model` appears twice in the same object"),
        "{msg}"
    );
    assert_eq!(a.hits(), 0);
}

#[tokio::test]
async fn retries_a_5xx_then_succeeds_on_the_same_model() {
    let a = upstream("a", |n| {
        if n == 0 {
            Act::Status(503, None)
        } else {
            Act::Ok
        }
    })
    .await;
    let gw = gateway(
        &config(&[("pa", &a.url)]),
        policy(&[("model-a", "pa")], &protect_retry(2)),
    )
    .await;
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-routeplane-attempts"), "2");
    assert_eq!(a.hits(), 2);
}

#[tokio::test]
async fn honours_retry_after_on_429() {
    let a = upstream("a", |n| {
        if n == 0 {
            Act::Status(429, Some(1))
        } else {
            Act::Ok
        }
    })
    .await;
    let gw = gateway(
        &config(&[("pa", &a.url)]),
        policy(&[("model-a", "pa")], &protect_retry(1)),
    )
    .await;
    let t = Instant::now();
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        t.elapsed() >= Duration::from_millis(950),
        "waited only {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn a_retry_after_beyond_the_backoff_cap_falls_back_at_once() {
    let a = upstream("a", |_| Act::Status(429, Some(60))).await;
    let b = upstream("b", |_| Act::Ok).await;
    let gw = two_models(&a, &b, &protect_retry(3)).await;
    let t = Instant::now();
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-routeplane-model"), "model-b");
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(a.hits(), 1);
}

#[tokio::test]
async fn falls_back_when_retries_are_spent() {
    let a = upstream("a", |_| Act::Status(500, None)).await;
    let b = upstream("b", |_| Act::Ok).await;
    let gw = two_models(&a, &b, &protect_retry(2)).await;
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-routeplane-model"), "model-b");
    assert_eq!(header(&r, "x-routeplane-attempts"), "4");
    assert_eq!(a.hits(), 3);
}

#[tokio::test]
async fn a_status_outside_the_retry_filter_falls_back_without_retrying() {
    let a = upstream("a", |_| Act::Status(401, None)).await;
    let b = upstream("b", |_| Act::Ok).await;
    let gw = two_models(&a, &b, &protect_retry(2)).await;
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(header(&r, "x-routeplane-model"), "model-b");
    assert_eq!(a.hits(), 1);
}

#[tokio::test]
async fn a_connection_reset_falls_back() {
    let a = upstream("a", |_| Act::Reset).await;
    let b = upstream("b", |_| Act::Ok).await;
    let gw = two_models(&a, &b, "").await;
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-routeplane-model"), "model-b");
}

#[tokio::test]
async fn every_upstream_failing_is_a_502_listing_the_attempts() {
    let a = upstream("a", |_| Act::Status(500, None)).await;
    let gw = gateway(
        &config(&[("pa", &a.url)]),
        policy(&[("model-a", "pa")], &protect_retry(1)),
    )
    .await;
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("model-a (500), model-a (500)"), "{msg}");
    assert_eq!(v["error"]["type"], "upstream_error");
}

#[tokio::test]
async fn every_upstream_rate_limiting_is_a_429_with_the_shortest_retry_after() {
    let a = upstream("a", |_| Act::Status(429, Some(60))).await;
    let b = upstream("b", |_| Act::Status(429, Some(30))).await;
    let gw = two_models(&a, &b, &protect_retry(1)).await;
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "retry-after"), "30");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_rate_limited", "{v}");
    assert_eq!(v["error"]["type"], "rate_limit_exceeded");
    // One that failed otherwise makes it an upstream failure again.
    let c = upstream("c", |_| Act::Status(500, None)).await;
    let gw = two_models(&a, &c, "").await;
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(r.status(), 502);
}

#[tokio::test]
async fn a_slow_upstream_times_out_with_504() {
    let a = upstream("a", |_| Act::Slow(Duration::from_secs(5))).await;
    let protect = "protect { timeout total 200ms }";
    let gw = gateway(
        &config(&[("pa", &a.url)]),
        policy(&[("model-a", "pa")], protect),
    )
    .await;
    let t = Instant::now();
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_slow_first_token_falls_back_before_anything_reached_the_client() {
    let a = upstream("a", |_| Act::SlowFirstChunk(Duration::from_secs(5))).await;
    let b = upstream("b", |_| Act::Ok).await;
    let protect = "protect { timeout first_token 200ms total 10s }";
    let gw = two_models(&a, &b, protect).await;
    let r = gw.chat("sk-demo", hello_stream()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-routeplane-model"), "model-b");
    let body = r.text().await.unwrap();
    assert!(
        body.contains("hello ") && body.contains("from ") && body.contains("\"b\""),
        "{body}"
    );
    assert_eq!(sse_data(&body).last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn streams_pass_through_and_a_failure_before_the_first_byte_falls_back() {
    let a = upstream("a", |_| Act::Status(503, None)).await;
    let b = upstream("b", |_| Act::Ok).await;
    let gw = two_models(&a, &b, "").await;
    let r = gw.chat("sk-demo", hello_stream()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "text/event-stream");
    let body = r.text().await.unwrap();
    let data = sse_data(&body);
    assert_eq!(data.len(), 5, "{data:#?}");
    assert_eq!(data[4], "[DONE]");
    assert!(!body.contains("error"));
}

#[tokio::test]
async fn a_stream_cut_halfway_ends_with_an_explicit_error_event() {
    let a = upstream("a", |_| Act::CutAfter(2)).await;
    let b = upstream("b", |_| Act::Ok).await;
    let gw = two_models(&a, &b, &protect_retry(2)).await;
    let r = gw.chat("sk-demo", hello_stream()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-routeplane-model"), "model-a");
    let body = r.text().await.unwrap();
    let data = sse_data(&body);
    // Two chunks reached the client, so no fallback: the stream ends with an error.
    assert_eq!(data.len(), 3, "{body}");
    let last: Value = serde_json::from_str(&data[2]).unwrap();
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("mid-stream")
            || last["error"]["message"]
                .as_str()
                .unwrap()
                .contains("before completion"),
        "{last}"
    );
    assert!(!body.contains("[DONE]"));
    assert_eq!(b.hits(), 0);
}

#[tokio::test]
async fn the_model_breaker_opens_and_later_requests_skip_the_model() {
    let a = upstream("a", |_| Act::Status(500, None)).await;
    let b = upstream("b", |_| Act::Ok).await;
    let protect = "protect { breaker per model open after 2 failures within 10s, probe after 60s }";
    let gw = two_models(&a, &b, protect).await;
    for _ in 0..5 {
        let r = gw.chat("sk-demo", hello()).send().await.unwrap();
        assert_eq!(header(&r, "x-routeplane-model"), "model-b");
    }
    assert_eq!(a.hits(), 2, "the breaker opened after two failures");
    let states = gw.gw.breaker_states();
    assert!(
        states
            .iter()
            .any(|(k, s)| k == "model:model-a"
                && *s == routeplane::gateway::engine::BreakerState::Open),
        "{states:?}"
    );
}

#[tokio::test]
async fn auth_errors_are_401_openai_errors() {
    let a = upstream("a", |_| Act::Ok).await;
    let gw = gateway(&config(&[("pa", &a.url)]), policy(&[("model-a", "pa")], "")).await;
    let r = gw
        .client
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    let r = gw.chat("sk-wrong", hello()).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(a.hits(), 0);
}

#[tokio::test]
async fn bad_requests_get_clear_4xx() {
    let a = upstream("a", |_| Act::Ok).await;
    let cfg = format!("{}max_body: 1KiB\n", config(&[("pa", &a.url)]));
    let gw = gateway(&cfg, policy(&[("model-a", "pa")], "")).await;
    let post = |body: &'static str| {
        gw.client
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth("sk-demo")
            .body(body)
            .send()
    };
    let r = post("{not json").await.unwrap();
    assert_eq!(r.status(), 400);
    let r = post("[]").await.unwrap();
    assert_eq!(r.status(), 400);
    let r = post("{\"model\": \"auto\"}").await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("missing `messages`"));
    let big =
        json!({ "model": "auto", "messages": [{ "role": "user", "content": "x".repeat(5000) }] });
    let r = gw.chat("sk-demo", big).send().await.unwrap();
    assert_eq!(r.status(), 413);
    let r = gw
        .chat(
            "sk-demo",
            json!({ "model": "model-x", "messages": [{ "role": "user", "content": "hi" }] }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did you mean `model-a`"),
        "{v}"
    );
    let r = gw
        .client
        .get(format!("{}/v1/nothing", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(a.hits(), 0);
}

#[tokio::test]
async fn a_denied_model_is_403_naming_the_rule() {
    let a = upstream("a", |_| Act::Ok).await;
    let p = policy(
        &[("model-a", "pa"), ("model-b", "pa")],
        "constraints { no_b: deny [model-b] when tenant.plan == pro }",
    );
    let gw = gateway(&config(&[("pa", &a.url)]), p).await;
    let r = gw
        .chat(
            "sk-demo",
            json!({ "model": "model-b", "messages": [{ "role": "user", "content": "hi" }] }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("denied by rule `no_b` (test.route:7)"),
        "{v}"
    );
    let models: Value = gw
        .client
        .get(format!("{}/v1/models", gw.url))
        .bearer_auth("sk-demo")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["model-a"]);
}

#[tokio::test]
async fn healthz_answers() {
    let a = upstream("a", |_| Act::Ok).await;
    let gw = gateway(&config(&[("pa", &a.url)]), policy(&[("model-a", "pa")], "")).await;
    let r = gw
        .client
        .get(format!("{}/healthz", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn an_upstream_400_reaches_the_client_without_the_provider_key() {
    let a = raw_upstream(|_| {
        http_json(400, r#"{"error":{"message":"invalid request for key test-key","type":"invalid_request_error"}}"#)
    })
    .await;
    let b = upstream("b", |_| Act::Ok).await;
    let gw = two_models(&a, &b, "").await;
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(
        r.status(),
        400,
        "the client's own mistake is not retried elsewhere"
    );
    let body = r.text().await.unwrap();
    assert!(
        body.contains("invalid request for key [redacted]"),
        "{body}"
    );
    assert_eq!(b.hits(), 0);
}

#[tokio::test]
async fn the_provider_breaker_opens_for_all_its_models() {
    let a = upstream("a", |_| Act::Status(503, None)).await;
    let b = upstream("b", |_| Act::Ok).await;
    let protect =
        "protect { breaker per provider open after 2 failures within 10s, probe after 60s }";
    let models = [("model-a1", "pa"), ("model-a2", "pa"), ("model-b", "pb")];
    let gw = gateway(
        &config(&[("pa", &a.url), ("pb", &b.url)]),
        policy(&models, protect),
    )
    .await;
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    // a1 and a2 failed once each: the provider's breaker opened.
    assert_eq!(header(&r, "x-routeplane-model"), "model-b");
    assert_eq!(header(&r, "x-routeplane-attempts"), "3");
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(header(&r, "x-routeplane-model"), "model-b");
    assert_eq!(
        header(&r, "x-routeplane-attempts"),
        "1",
        "open breakers are skipped, not tried"
    );
    assert_eq!(a.hits(), 2);
}

#[tokio::test]
async fn two_gateways_never_share_decision_ids() {
    let a = upstream("a", |_| Act::Ok).await;
    let cfg = config(&[("pa", &a.url)]);
    let one = gateway(&cfg, policy(&[("model-a", "pa")], "")).await;
    let two = gateway(&cfg, policy(&[("model-a", "pa")], "")).await;
    let (x, y) = (one.gw.next_decision_id(), two.gw.next_decision_id());
    assert_ne!(
        x, y,
        "two instances started together produced the same decision id"
    );
    assert_ne!(x.split('-').next(), y.split('-').next());
}

/// A model's kind decides which endpoints it serves: the cheap embeddings
/// model of a mixed route never gets a chat request, and naming it on chat
/// completions is the client's mistake, told as such.
#[tokio::test]
async fn a_model_only_gets_requests_its_kind_serves() {
    let a = upstream("a", |_| Act::Ok).await;
    let src = "provider pa { region us }
model chatty { provider pa kind chat price in $1 out $2 per 1M }
model vectors { provider pa kind embeddings price $0.02 per 1M }
classify { chat otherwise }
route chat { candidates [vectors, chatty] score 1 * price }
";
    let mut sources = routeplane::source::Sources::new();
    sources.add("kinds.route", src.to_string());
    let policy = routeplane::gateway::engine::compile(&sources).unwrap();
    let gw = gateway(&config(&[("pa", &a.url)]), policy).await;
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-routeplane-model"), "chatty");
    let named = json!({ "model": "vectors", "messages": [{ "role": "user", "content": "hi" }] });
    let r = gw.chat("sk-demo", named).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_cannot_serve");
    assert_eq!(
        v["error"]["message"],
        "model `vectors` is of kind `embeddings`: it cannot serve /v1/chat/completions"
    );
    // Only the chat request reached the upstream.
    assert_eq!(a.bodies.lock().unwrap().len(), 1);
}

/// A client that leaves while its request is the breaker's one probe does
/// not leave the breaker half-open with the probe taken: the next request
/// probes again (before, the model stayed shut until a restart).
#[tokio::test]
async fn a_probe_whose_client_left_gives_its_turn_back() {
    // 1st: a failure opens the breaker; 2nd (the probe): hangs; then healthy.
    let a = upstream("a", |n| match n {
        0 => Act::Status(500, None),
        1 => Act::Slow(Duration::from_secs(30)),
        _ => Act::Ok,
    })
    .await;
    let protect =
        "protect { breaker per model open after 1 failures within 10s, probe after 50ms }";
    let gw = gateway(
        &config(&[("pa", &a.url)]),
        policy(&[("model-a", "pa")], protect),
    )
    .await;
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(r.status(), 502);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The probe: the client gives up after 300 ms and closes the connection.
    let gone = gw
        .chat("sk-demo", hello())
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gone.is_err(), "the probe should have hung");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = gw.chat("sk-demo", hello()).send().await.unwrap();
    assert_eq!(r.status(), 200, "the breaker kept the lost probe");
    assert_eq!(header(&r, "x-routeplane-model"), "model-a");
}
