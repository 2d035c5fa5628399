//! Provider translation end to end: the Anthropic Messages API behind the
//! OpenAI-compatible front, the built-in mock on every endpoint, limits, and
//! policy swaps under load.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod gateway_common;

use std::sync::Arc;
use std::time::Duration;

use gateway_common::*;
use serde_json::{json, Value};

fn anthropic_config(url: &str) -> String {
    format!(
        "policy: unused\ntenants:\n  - id: demo\n    key: sk-demo\nproviders:\n  - name: pa\n    kind: anthropic\n    base_url: {url}\n    api_key_env: KEY\n    models: {{ model-a: claude-upstream-id }}\n"
    )
}

/// An Anthropic Messages answer, as a raw HTTP 200.
fn anthropic_message(content: Value, stop_reason: &str, (input, output): (u64, u64)) -> String {
    http_json(
        200,
        &json!({ "id": "msg_1", "type": "message", "role": "assistant",
            "content": content, "stop_reason": stop_reason,
            "usage": { "input_tokens": input, "output_tokens": output } })
        .to_string(),
    )
}

#[tokio::test]
async fn anthropic_chat_is_translated_both_ways() {
    let up = raw_upstream(|_| {
        anthropic_message(
            json!([{ "type": "text", "text": "bonjour" }]),
            "end_turn",
            (7, 3),
        )
    })
    .await;
    let gw = gateway(&anthropic_config(&up.url), policy(&[("model-a", "pa")], "")).await;
    let body = json!({ "model": "auto", "max_tokens": 20, "messages": [
        { "role": "system", "content": "be nice" }, { "role": "user", "content": "hi" }] });
    let r = gw.chat("sk-demo", body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-routeplane-provider"), "pa");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "bonjour");
    assert_eq!(v["usage"]["prompt_tokens"], 7);
    let sent = up.bodies.lock().unwrap()[0].clone();
    assert_eq!(sent["model"], "claude-upstream-id");
    assert_eq!(sent["system"], "be nice");
    assert_eq!(sent["max_tokens"], 20);
    assert_eq!(sent["messages"][0]["content"][0]["text"], "hi");
}

#[tokio::test]
async fn anthropic_refusals_reach_the_client_as_openai_errors() {
    let up = raw_upstream(|_| {
        http_json(
            400,
            &json!({ "type": "error", "error": { "type": "invalid_request_error",
            "message": "messages: roles must alternate" } })
            .to_string(),
        )
    })
    .await;
    let gw = gateway(&anthropic_config(&up.url), policy(&[("model-a", "pa")], "")).await;
    let body = json!({ "model": "auto", "messages": [{ "role": "user", "content": "hi" }] });
    let r = gw.chat("sk-demo", body).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(header(&r, "x-routeplane-provider"), "pa");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["message"], "messages: roles must alternate");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(
        v.get("type").is_none(),
        "the Anthropic envelope leaked: {v}"
    );
}

#[tokio::test]
async fn anthropic_streams_become_openai_chunks() {
    let up = raw_upstream(|_| {
        http_sse(concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":4}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi \"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"there\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":2}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        ))
    })
    .await;
    let gw = gateway(&anthropic_config(&up.url), policy(&[("model-a", "pa")], "")).await;
    let body = json!({ "model": "auto", "stream": true, "messages": [{ "role": "user", "content": "hi" }] });
    let r = gw.chat("sk-demo", body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let data = sse_data(&text);
    let content: String = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(content, "Hi there");
    assert_eq!(data.last().unwrap(), "[DONE]");
    assert_eq!(up.bodies.lock().unwrap()[0]["stream"], true);
}

#[tokio::test]
async fn anthropic_gets_tool_choice_and_a_json_instruction() {
    let up = raw_upstream(|_| {
        anthropic_message(
            json!([{ "type": "tool_use", "id": "t1", "name": "lookup", "input": { "q": "x" } }]),
            "tool_use",
            (9, 4),
        )
    })
    .await;
    let gw = gateway(&anthropic_config(&up.url), policy(&[("model-a", "pa")], "")).await;
    let body = json!({ "model": "auto", "max_completion_tokens": null, "max_tokens": 30,
        "messages": [{ "role": "user", "content": "look it up" }],
        "tools": [{ "type": "function", "function": { "name": "lookup", "parameters": { "type": "object" } } }],
        "tool_choice": { "type": "function", "function": { "name": "lookup" } },
        "parallel_tool_calls": false, "user": "u-1",
        "response_format": { "type": "json_schema", "json_schema": { "name": "hit",
            "schema": { "type": "object", "properties": { "q": { "type": "string" } } } } } });
    let r = gw.chat("sk-demo", body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    let sent = up.bodies.lock().unwrap()[0].clone();
    assert_eq!(
        sent["tool_choice"],
        json!({ "type": "tool", "name": "lookup", "disable_parallel_tool_use": true })
    );
    assert_eq!(sent["max_tokens"], 30);
    assert_eq!(sent["metadata"], json!({ "user_id": "u-1" }));
    let system = sent["system"].as_str().unwrap();
    assert!(system.contains("single JSON object"), "{system}");
    assert!(
        system.contains(r#"{"properties":{"q":{"type":"string"}},"type":"object"}"#),
        "{system}"
    );
    for key in ["response_format", "parallel_tool_calls", "user"] {
        assert!(sent.get(key).is_none(), "`{key}` leaked upstream: {sent}");
    }
}

#[tokio::test]
async fn anthropic_refuses_n_above_one_with_a_400_naming_it() {
    let up = raw_upstream(|_| http_json(200, "{}")).await;
    let gw = gateway(&anthropic_config(&up.url), policy(&[("model-a", "pa")], "")).await;
    let body =
        json!({ "model": "auto", "n": 2, "messages": [{ "role": "user", "content": "hi" }] });
    let r = gw.chat("sk-demo", body).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["param"], "n");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("`n`"), "{msg}");
    assert!(
        up.bodies.lock().unwrap().is_empty(),
        "the refused request reached the upstream"
    );
}

/// `model-a` on Anthropic (upstream `a`, answering "hi"), then `model-b` on
/// an OpenAI-compatible upstream `b`.
async fn anthropic_then_openai(protect: &str) -> (Gw, Upstream, Upstream) {
    let a = raw_upstream(|_| {
        anthropic_message(
            json!([{ "type": "text", "text": "hi" }]),
            "end_turn",
            (3, 1),
        )
    })
    .await;
    let b = upstream("b", |_| Act::Ok).await;
    let config = format!(
        "{}  - name: pb\n    kind: openai\n    base_url: {}\n    api_key_env: KEY\n",
        anthropic_config(&a.url),
        b.url
    );
    let gw = gateway(
        &config,
        policy(&[("model-a", "pa"), ("model-b", "pb")], protect),
    )
    .await;
    (gw, a, b)
}

/// What one provider's API cannot carry another may: `n: 2` skips the
/// Anthropic model (never sent) and is served by the OpenAI-compatible one.
#[tokio::test]
async fn a_request_anthropic_cannot_carry_falls_back_to_a_model_that_can() {
    let (gw, a, b) = anthropic_then_openai("").await;
    let body =
        json!({ "model": "auto", "n": 2, "messages": [{ "role": "user", "content": "hi" }] });
    let r = gw.chat("sk-demo", body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-routeplane-model"), "model-b");
    assert!(
        a.bodies.lock().unwrap().is_empty(),
        "model-a was sent the request"
    );
    assert_eq!(b.hits(), 1);
    // The breaker did not hear of it: model-a still serves what it can carry.
    let r = gw
        .chat(
            "sk-demo",
            json!({ "model": "auto", "messages": [{ "role": "user", "content": "hi" }] }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-routeplane-model"), "model-a");
}

fn n_two() -> Value {
    json!({ "model": "auto", "n": 2, "messages": [{ "role": "user", "content": "hi" }] })
}

/// A request Anthropic cannot carry takes nothing from the Anthropic model:
/// no rate-limit token, no attempt counted as sent.
#[tokio::test]
async fn a_request_anthropic_cannot_carry_takes_none_of_its_limits() {
    let (gw, _a, _b) = anthropic_then_openai("protect { limit rate 2/min per model }").await;
    for _ in 0..2 {
        let r = gw.chat("sk-demo", n_two()).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-routeplane-model"), "model-b");
        assert_eq!(
            header(&r, "x-routeplane-attempts"),
            "1",
            "only model-b was sent it"
        );
    }
    // model-a's two tokens are still there.
    let hi = json!({ "model": "auto", "messages": [{ "role": "user", "content": "hi" }] });
    for _ in 0..2 {
        let r = gw.chat("sk-demo", hi.clone()).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-routeplane-model"), "model-a");
    }
}

/// When another model failed, that failure is the answer (a 502 the client
/// may retry), not the 400 about what Anthropic cannot carry.
#[tokio::test]
async fn an_upstream_failure_is_not_hidden_behind_an_unsupported_parameter() {
    let a = upstream("a", |_| Act::Status(500, None)).await;
    let b = raw_upstream(|_| http_json(200, "{}")).await;
    let config = format!(
        "policy: unused\ntenants:\n  - id: demo\n    key: sk-demo\nproviders:\n  - name: pa\n    kind: openai\n    base_url: {}\n    api_key_env: KEY\n  - name: pb\n    kind: anthropic\n    base_url: {}\n    api_key_env: KEY\n",
        a.url, b.url
    );
    let gw = gateway(&config, policy(&[("model-a", "pa"), ("model-b", "pb")], "")).await;
    let r = gw.chat("sk-demo", n_two()).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("model-b (unsupported_parameter)"), "{msg}");
}

const MOCK: &str = "policy: unused\ntenants:\n  - id: demo\n    key: sk-demo\nproviders:\n  - name: pm\n    kind: mock\n    mock: { latency: 20ms, first_token: 5ms, usage: { prompt_tokens: 3, completion_tokens: 8 }, chunks: 4 }\n";

fn mock_policy() -> routeplane::gateway::engine::CompiledPolicy {
    let mut sources = routeplane::source::Sources::new();
    sources.add(
        "m.route",
        "provider pm { region us }\n\
         model chat-m { provider pm kind chat context 8k price in $1 out $1 per 1M }\n\
         model emb-m { provider pm kind embeddings context 8k price in $1 out $0 per 1M }\n\
         model img-m { provider pm kind image price $0.01 per image }\n\
         model aud-m { provider pm kind audio price $0.01 per minute }\n\
         classify {\n  emb when request.endpoint == embeddings\n  img when request.endpoint == images\n  aud when request.endpoint in [audio_speech, audio_transcription]\n  chat otherwise\n}\n\
         route chat { candidates [chat-m] } // allow(single-candidate)\n\
         route emb { candidates [emb-m] } // allow(single-candidate)\n\
         route img { candidates [img-m] } // allow(single-candidate)\n\
         route aud { candidates [aud-m] } // allow(single-candidate)\n",
    );
    match routeplane::gateway::engine::compile(&sources) {
        Ok(p) => p,
        Err(a) => panic!(
            "{:#?}",
            a.errors().map(|d| d.message.clone()).collect::<Vec<_>>()
        ),
    }
}

#[tokio::test]
async fn the_mock_answers_every_endpoint() {
    let gw = gateway(MOCK, mock_policy()).await;
    let post = |path: &str, body: Value| {
        gw.client
            .post(format!("{}{path}", gw.url))
            .bearer_auth("sk-demo")
            .json(&body)
            .send()
    };
    let r = post(
        "/v1/chat/completions",
        json!({ "messages": [{ "role": "user", "content": "hi" }] }),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 8);
    let r = post(
        "/v1/chat/completions",
        json!({ "stream": true, "messages": [{ "role": "user", "content": "hi" }] }),
    )
    .await
    .unwrap();
    let data = sse_data(&r.text().await.unwrap());
    // Role, four pieces, the finish and `[DONE]`: the mock's usage chunk
    // reaches only a client that asked for it, as OpenAI sends it.
    assert_eq!(data.len(), 1 + 4 + 1 + 1, "{data:#?}");
    let r = post(
        "/v1/chat/completions",
        json!({ "stream": true, "stream_options": { "include_usage": true },
                "messages": [{ "role": "user", "content": "hi" }] }),
    )
    .await
    .unwrap();
    let data = sse_data(&r.text().await.unwrap());
    assert_eq!(data.len(), 1 + 4 + 1 + 1 + 1, "{data:#?}");
    let r = post("/v1/embeddings", json!({ "input": ["a", "b"] }))
        .await
        .unwrap();
    assert_eq!(header(&r, "x-routeplane-model"), "emb-m");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    let r = post("/v1/images/generations", json!({ "prompt": "a cat" }))
        .await
        .unwrap();
    assert_eq!(header(&r, "x-routeplane-model"), "img-m");
    let r = post(
        "/v1/audio/speech",
        json!({ "input": "hello", "voice": "alloy" }),
    )
    .await
    .unwrap();
    assert_eq!(header(&r, "content-type"), "audio/mpeg");
    let form = "--X\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nauto\r\n--X\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\r\n--X--\r\n";
    let r = gw
        .client
        .post(format!("{}/v1/audio/transcriptions", gw.url))
        .bearer_auth("sk-demo")
        .header("content-type", "multipart/form-data; boundary=X")
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-routeplane-model"), "aud-m");
}

#[tokio::test]
async fn a_tenant_rate_limit_answers_429_with_retry_after() {
    let a = upstream("a", |_| Act::Ok).await;
    let gw = gateway(
        &config(&[("pa", &a.url)]),
        policy(
            &[("model-a", "pa")],
            "protect { limit rate 2/min per tenant }",
        ),
    )
    .await;
    let hello = json!({ "model": "auto", "messages": [{ "role": "user", "content": "hi" }] });
    for _ in 0..2 {
        assert_eq!(
            gw.chat("sk-demo", hello.clone())
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let r = gw.chat("sk-demo", hello.clone()).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(!header(&r, "retry-after").is_empty());
    // Another tenant has its own window.
    assert_eq!(
        gw.chat("sk-other", hello).send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn a_model_concurrency_limit_sends_the_overflow_to_the_next_model() {
    let a = upstream("a", |_| Act::Slow(Duration::from_millis(300))).await;
    let b = upstream("b", |_| Act::Ok).await;
    let gw = gateway(
        &config(&[("pa", &a.url), ("pb", &b.url)]),
        policy(
            &[("model-a", "pa"), ("model-b", "pb")],
            "protect { limit concurrency 1 per model }",
        ),
    )
    .await;
    let hello = json!({ "model": "auto", "messages": [{ "role": "user", "content": "hi" }] });
    let first = gw.chat("sk-demo", hello.clone()).send();
    let second = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        gw.chat("sk-demo", hello.clone()).send().await
    };
    let (r1, r2) = tokio::join!(first, second);
    assert_eq!(header(&r1.unwrap(), "x-routeplane-model"), "model-a");
    assert_eq!(header(&r2.unwrap(), "x-routeplane-model"), "model-b");
}

#[tokio::test]
async fn policy_swaps_under_load_fail_no_request() {
    let a = upstream("a", |_| Act::Ok).await;
    let cfg = config(&[("pa", &a.url), ("pb", &a.url)]);
    let fixed = Arc::new(routeplane::gateway::FixedPolicy::new(policy(
        &[("model-a", "pa"), ("model-b", "pb")],
        "",
    )));
    let c = routeplane::config::Config::parse("t.yaml", &cfg, std::path::Path::new("."), &|_| {
        Some("k".into())
    })
    .unwrap();
    let gw = routeplane::gateway::Gateway::new(c, fixed.clone(), Default::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/v1/chat/completions",
        listener.local_addr().unwrap()
    );
    tokio::spawn(routeplane::gateway::server::serve(
        listener,
        gw.clone(),
        std::future::pending(),
    ));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..8 {
        let (url, stop) = (url.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let (mut ok, mut bad) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = client
                    .post(&url)
                    .bearer_auth("sk-demo")
                    .json(&json!({ "model": "auto", "messages": [{ "role": "user", "content": "hi" }] }))
                    .send()
                    .await
                    .unwrap();
                if r.status() == 200 { ok += 1 } else { bad += 1 }
            }
            (ok, bad)
        }));
    }
    for i in 0..60 {
        let order: &[(&str, &str)] = if i % 2 == 0 {
            &[("model-b", "pb"), ("model-a", "pa")]
        } else {
            &[("model-a", "pa"), ("model-b", "pb")]
        };
        fixed.set(policy(order, &format!("// version {i}")));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut bad) = (0, 0);
    for h in load {
        let (o, b) = h.await.unwrap();
        ok += o;
        bad += b;
    }
    assert_eq!(bad, 0);
    assert!(ok > 60, "only {ok} requests");
    assert_eq!(gw.runtime().policy.version(), fixed_version(&fixed));
}

fn fixed_version(f: &routeplane::gateway::FixedPolicy) -> String {
    use routeplane::gateway::PolicySource;
    f.current().policy.version().to_string()
}
